"""The live view in a real browser (headless Debian chromium via Selenium) against a running session.

The session runs on a simulated instrument that keeps real time (stage settling and frame time
on the wall clock), so a person-speed page has tiles to watch and a pause to make.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from agent.acquisition import BudgetConfig
from agent.session import Session
from agent.view import SessionFeed, ViewServer
from analysis.browser import BrowserMissing, headless_chromium
from analysis.replay import replay_journal
from simulator.config import SimulatorConfig
from simulator.drivers import SimulatedMicroscope
from simulator.specimen import Specimen
from tests.test_operator import SHORT, overlaps


@pytest.fixture
def browser() -> Any:
    try:
        driver = headless_chromium()
    except BrowserMissing as error:
        if os.environ.get("CI"):
            raise  # CI installs chromium (.ci/run): a missing browser there is a failure
        pytest.skip(str(error))
    yield driver
    driver.quit()


def wait_until(condition: Any, timeout_s: float = 30.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def test_watch_pause_mark_and_stop_a_session_from_the_page(
    browser: Any, small_config: SimulatorConfig, small_specimen: Specimen, tmp_path: Path
) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    simulator = small_config.model_copy(
        update={
            "instrument": small_config.instrument.model_copy(
                update={"real_time": True, "stage_settle_s": 0.3}
            )
        }
    )
    config = SHORT.model_copy(update={"budget": BudgetConfig(max_tiles=30), "lookahead_tiles": 1})
    journal = tmp_path / "journal.h5"
    with SimulatedMicroscope(simulator, small_specimen) as microscope:
        session = Session(microscope, config, journal)
        feed = SessionFeed(session)
        session.on_step = feed.on_step
        with ViewServer(feed.hub, feed.state, session.operator, "127.0.0.1:0") as server:
            runner = threading.Thread(target=lambda: (session.run(), feed.finished()), daemon=True)
            runner.start()
            browser.get(server.url)
            count = lambda: int(browser.find_element(By.ID, "tile-count").text or 0)  # noqa: E731
            # The page loads and the tile count advances as tiles are journaled.
            first = wait_until(lambda: count() >= 3 and count(), what="three tiles on the page")
            wait_until(lambda: count() > first, what="the tile count to advance")
            assert browser.find_element(By.ID, "phase").text.lower() == "running"

            # Drag a "skip" mark over the left half of the stage on the survey canvas.
            browser.find_element(By.ID, "mark-skip").click()
            canvas = browser.find_element(By.ID, "survey")
            scale = browser.execute_script(
                "const c = arguments[0], r = c.getBoundingClientRect(); return r.width / c.width;", canvas
            )
            size = canvas.size
            corner = [v * scale for v in browser.execute_script("return view.toCanvas(0.2, 0.2);")]
            far = [v * scale for v in browser.execute_script("return view.toCanvas(14.8, 29.8);")]
            centre = (size["width"] / 2, size["height"] / 2)
            ActionChains(browser).move_to_element_with_offset(
                canvas, int(corner[0] - centre[0]), int(corner[1] - centre[1])
            ).click_and_hold().move_by_offset(
                int(far[0] - corner[0]), int(far[1] - corner[1])
            ).release().perform()
            wait_until(lambda: "accepted: skip" in browser.find_element(By.ID, "message").text, 10, "the ack")
            marked = session.operator.received[-1]
            assert marked.action == "skip" and marked.source == "page"
            x0, x1, y0, y1 = marked.region_nm
            assert x0 == pytest.approx(0.2, abs=0.2) and x1 == pytest.approx(14.8, abs=0.2)
            assert y0 == pytest.approx(0.2, abs=0.2) and y1 == pytest.approx(29.8, abs=0.2)
            wait_until(lambda: session.policy is not None and session.policy.marks, 20, "the mark applied")

            # Pause: the instrument finishes the scan in progress and starts no other.
            wait_until(lambda: count() >= first + 2, what="two more tiles")
            browser.find_element(By.ID, "pause").click()
            wait_until(lambda: session.operator.paused, 5, "the pause to arrive")
            at_click = len(session.steps)
            wait_until(
                lambda: browser.find_element(By.ID, "phase").text.lower() == "paused", 5, "paused pill"
            )
            time.sleep(2.0)
            held = len(session.steps)
            assert held <= at_click + config.lookahead_tiles + 1
            time.sleep(1.0)
            assert len(session.steps) == held  # nothing moves while paused
            browser.find_element(By.ID, "resume").click()
            wait_until(lambda: len(session.steps) > held, 10, "the session to go on after resume")

            # Stop after this tile: the session ends, interrupted (resumable), and the page says so.
            browser.find_element(By.ID, "stop").click()
            runner.join(30)
            assert not runner.is_alive() and session.interrupted
            assert session.stop_reason == "stopped by the operator (page)"
            wait_until(lambda: browser.find_element(By.ID, "phase").text.lower() == "stopped", 5, "stopped")
            shown = browser.execute_script("return view.steps.filter(s => s.kind !== 'survey').length;")
            assert shown == sum(step.kind != "survey" for step in session.steps)
            lags = browser.execute_script("return view.latencies;")
            assert len(lags) >= 5  # measured against the 0.5 s target by `micrography bench view`

    # No tile decided after the mark took effect touches the skipped region.
    applied = next(s.index for s in session.steps if "operator" in s.extra and
                   any(a["action"] == "skip" for a in s.extra["operator"]))  # fmt: skip
    later = [s for s in session.steps if (s.extra.get("decided_after_step") or -1) >= applied]
    assert later and not any(overlaps(s.request.extent_nm, marked.region_nm) for s in later)
    # The journal replays to the same session, marks included; every action is journaled.
    replayed = replay_journal(journal, progress=False)
    assert [s.request.request_id for s in replayed.session.steps] == [
        s.request.request_id for s in session.steps
    ]
    assert replayed.session.policy is not None and replayed.session.policy.marks == session.policy.marks
    journaled = [a["action"] for s in session.steps for a in s.extra.get("operator", [])]
    assert journaled[:3] == ["skip", "pause", "resume"]
