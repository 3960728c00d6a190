"""The live view's server, feeds and command line, over real sockets on 127.0.0.1 (no browser).

tests/test_view_browser.py drives the page itself in headless Chromium.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.cli import main
from agent.journal import JournalError, read_journal
from agent.session import Session, StepRecord
from agent.view import JournalFeed, SessionFeed, ViewError, ViewServer, parse_bind
from agent.view.feed import TILE_VIEW_PX
from simulator.config import SimulatorConfig
from simulator.drivers import SimulatedMicroscope
from simulator.specimen import Specimen
from tests.test_operator import SHORT


def test_a_bind_address_is_checked_and_any_other_than_loopback_gets_a_token() -> None:
    assert parse_bind("127.0.0.1:8765", None) == ("127.0.0.1", 8765, None)
    assert parse_bind("localhost:0", None)[2] is None
    host, port, token = parse_bind("0.0.0.0:9000", None)
    assert (host, port) == ("0.0.0.0", 9000) and token and len(token) >= 20
    assert parse_bind("0.0.0.0:9000", "given")[2] == "given"
    with pytest.raises(ViewError, match=r"--view-bind '8765': give HOST:PORT, e.g. 127.0.0.1:8765"):
        parse_bind("8765", None)
    with pytest.raises(ViewError, match=r"'microscope-pc' is not an IP address"):
        parse_bind("microscope-pc:80", None)


def request(url: str, body: dict[str, Any] | None = None, token: str | None = None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url, data=data, headers=headers, method="POST" if body is not None else "GET"
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


class Listener:
    """A WebSocket client in a thread: every message the view sends, decoded."""

    def __init__(self, url: str) -> None:
        self.messages: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._listen(url)), daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    async def _listen(self, url: str) -> None:
        import websockets

        async with websockets.connect(url, max_size=None) as socket:
            self._ready.set()
            while not self._stop.is_set():
                try:
                    self.messages.append(json.loads(await asyncio.wait_for(socket.recv(), 0.2)))
                except TimeoutError:
                    continue

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def test_the_socket_sends_every_step_as_the_session_journaled_it(
    small_config: SimulatorConfig, small_specimen: Specimen, tmp_path: Path
) -> None:
    records: list[StepRecord] = []
    with SimulatedMicroscope(small_config, small_specimen) as microscope:
        session = Session(microscope, SHORT, tmp_path / "journal.h5")
        feed = SessionFeed(session, discovered=lambda: (len(records), 30))

        def on_step(record: StepRecord) -> None:
            records.append(record)
            feed.on_step(record)

        session.on_step = on_step
        with ViewServer(feed.hub, feed.state, session.operator, "127.0.0.1:0") as server:
            listener = Listener(server.url.replace("http", "ws", 1) + "ws")
            session.run()
            feed.finished()
            deadline = time.monotonic() + 10
            while not any(m["type"] == "state" for m in listener.messages) and time.monotonic() < deadline:
                time.sleep(0.05)
            listener.close()
            status, state = request(server.url + "api/state")
    hello, *rest = listener.messages
    assert hello["type"] == "hello" and hello["info"]["session_id"] == "oper"
    assert hello["info"]["stage_nm"] == [0.0, 30.0, 0.0, 30.0] and hello["info"]["features_total"] == 30
    steps = [m for m in rest if m["type"] == "step"]
    tiles = [r for r in records if r.kind != "survey"]
    assert [m["step"]["index"] for m in steps] == [r.index for r in tiles]
    survey = next(m["survey"] for m in rest if m["type"] == "survey")
    assert len(base64.b64decode(survey["grey"])) == survey["shape"][0] * survey["shape"][1]
    for message, record in zip(steps, tiles, strict=True):
        step, tile = message["step"], message["tile"]
        assert step["extent_nm"] == pytest.approx(list(record.extent_nm))
        assert step["score"] == (pytest.approx(record.score) if np.isfinite(record.score) else None)
        assert step["request_id"] == record.request.request_id
        # The tile image is block-averaged to at most 256 px; the columns land on it.
        factor = int(np.ceil(max(record.tile.shape) / TILE_VIEW_PX))
        assert tile["shape"] == [record.tile.shape[0] // factor, record.tile.shape[1] // factor]
        if not len(record.columns.col_px):
            assert tile["columns"] is None
            continue
        xy = np.frombuffer(base64.b64decode(tile["columns"]["xy"]), dtype="<f4").reshape(-1, 2)
        assert tile["columns"]["count"] == len(record.columns.col_px) == len(xy)
        np.testing.assert_allclose(xy[:, 0], (record.columns.col_px + 0.5) / factor - 0.5, atol=1e-4)
        sites = np.frombuffer(base64.b64decode(tile["columns"]["site"]), dtype=np.uint8)
        np.testing.assert_array_equal(sites, record.columns.species)
    # The surrogate's posterior is the one the last decision used.
    assert session.policy is not None
    mean, _ = session.policy.decision_posterior
    sent = np.frombuffer(base64.b64decode(steps[-1]["maps"]["surrogate_mean"]), dtype="<f4")
    np.testing.assert_allclose(sent, mean, rtol=1e-6)
    assert steps[-1]["step"]["discovered"] == len(records)
    assert status == 200 and state["state"]["phase"] == "finished"
    assert state["state"]["budget"]["tiles"] == len(tiles) == 7


def test_the_api_acts_refuses_with_a_reason_and_needs_the_token_off_loopback(
    small_config: SimulatorConfig, small_specimen: Specimen
) -> None:
    with SimulatedMicroscope(small_config, small_specimen) as microscope:
        session = Session(microscope, SHORT)
        feed = SessionFeed(session)
        with ViewServer(feed.hub, feed.state, session.operator, "127.0.0.1:0", token="s3cret") as server:
            base = f"http://127.0.0.1:{server.port}/"
            assert server.url == base + "?token=s3cret"
            assert request(base + "api/state")[0] == 401
            assert request(base + "api/control", {"action": "pause"})[0] == 401
            assert request(base + "api/control", {"action": "pause"}, token="wrong")[0] == 401
            with pytest.raises(urllib.error.HTTPError):
                urllib.request.urlopen(base, timeout=5)
            assert urllib.request.urlopen(server.url, timeout=5).status == 200
            status, body = request(base + "api/control", {"action": "pause"}, token="s3cret")
            assert (status, body["accepted"]) == (200, "pause") and session.operator.paused
            status, body = request(base + "api/control", {"action": "look"}, token="s3cret")
            assert status == 400 and body["error"].startswith(
                "operator action: a 'look' mark needs region_nm"
            )
            status, body = request(base + "api/state", token="s3cret")
            assert body["state"]["phase"] == "paused" and body["state"]["queued"] == ["pause"]
            assert [a.action for a in session.operator.queued] == ["pause"]


def test_micrography_control_sends_actions_and_says_when_nothing_listens(
    small_config: SimulatorConfig, small_specimen: Specimen, capsys: pytest.CaptureFixture[str]
) -> None:
    with SimulatedMicroscope(small_config, small_specimen) as microscope:
        session = Session(microscope, SHORT)
        feed = SessionFeed(session)
        with ViewServer(feed.hub, feed.state, session.operator, "127.0.0.1:0") as server:
            url = server.url
            assert main(["control", "skip", "--region", "1", "5", "2", "6", "--url", url]) == 0
            assert (
                main(["control", "set", "--setting", "budget.max_tiles", "--value", "3", "--url", url]) == 0
            )
            assert main(["control", "set", "--setting", "tiles.shape", "--value", "3", "--url", url]) == 1
            assert main(["control", "status", "--url", url]) == 0
    out, err = capsys.readouterr()
    assert "accepted: skip x 1.0-5.0 nm, y 2.0-6.0 nm" in out and "accepted: set budget.max_tiles = 3" in out
    assert "survey: 0 of 7 tiles, 0 marks" in out  # the set waits for a step to take effect
    assert "setting 'tiles.shape' cannot change live" in err and err.count("\n") == 1
    taken = session.operator.take()
    assert [(a.action, a.source) for a in taken] == [("skip", "cli"), ("set", "cli")]
    assert main(["control", "pause", "--url", f"http://127.0.0.1:{server.port}/"]) == 1
    assert "no live view answers there" in capsys.readouterr().err


def test_the_journal_view_follows_a_journal_another_process_writes_and_is_read_only(
    small_config: SimulatorConfig, tmp_path: Path
) -> None:
    import yaml

    config = SHORT.model_copy(update={"simulator": small_config.model_dump(mode="json"), "seed": 3})
    (tmp_path / "session.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_none=True)))
    out = tmp_path / "run"
    writer = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "--real-time", "--config", str(tmp_path / "session.yaml"),
         "--out", str(out)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    journal = out / "journal.h5"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                feed = JournalFeed(journal, poll_s=0.05)
                break
            except JournalError:  # not created yet
                time.sleep(0.1)
        with ViewServer(feed.hub, feed.state, None, "127.0.0.1:0") as server:
            feed.start()
            listener = Listener(server.url.replace("http", "ws", 1) + "ws")
            seen_while_running = 0
            while writer.poll() is None:
                seen_while_running = max(
                    seen_while_running, len(feed.hub.steps) if writer.poll() is None else 0
                )
                time.sleep(0.05)
            deadline = time.monotonic() + 10
            while feed.hub.state.get("phase") != "finished" and time.monotonic() < deadline:
                time.sleep(0.05)
            feed.close()
            listener.close()
            status, body = request(server.url + "api/control", {"action": "pause"})
    finally:
        writer.kill()
    assert writer.returncode == 0
    assert status == 409 and "this view shows a journal" in body["error"]
    recorded = [s for s in read_journal(journal).steps if s.record["kind"] != "survey"]
    assert seen_while_running >= 1  # it followed the journal while it grew
    assert [s["index"] for s in feed.hub.steps] == [s.index for s in recorded]
    streamed = [m["step"]["request_id"] for m in listener.messages if m["type"] == "step"]
    assert streamed == [s.record["request"]["request_id"] for s in recorded][-len(streamed) :]
    assert feed.hub.state["phase"] == "finished" and feed.hub.state["stop_reason"].startswith("tile budget")
    assert feed.hub.tile is not None and feed.hub.tile["index"] == recorded[-1].index
    for summary, step in zip(feed.hub.steps, recorded, strict=True):
        assert summary["request_id"] == step.record["request"]["request_id"]


def test_the_journal_view_shows_the_marks_the_journal_holds(tmp_path: Path, small_config: SimulatorConfig,
                                                            small_specimen: Specimen) -> None:  # fmt: skip
    journal = tmp_path / "journal.h5"
    with SimulatedMicroscope(small_config, small_specimen) as microscope:
        session = Session(microscope, SHORT, journal)
        actions = {
            3: {"action": "skip", "region_nm": [0, 5, 0, 5]},
            5: {"action": "look", "region_nm": [20, 29, 20, 29]},
        }

        def on_step(record: StepRecord) -> None:
            if record.index in actions:
                session.operator.submit(actions[record.index])

        session.on_step = on_step
        session.run()
    feed = JournalFeed(journal)
    feed.poll()
    assert feed.hub.state["phase"] == "finished"
    assert feed.hub.state["marks"] == [
        {"kind": "skip", "region_nm": [0.0, 5.0, 0.0, 5.0]},
        {"kind": "look", "region_nm": [20.0, 29.0, 20.0, 29.0]},
    ]
    assert [(e["what"], e["step"]) for e in feed.hub.state["log"]] == [("skip", 4), ("look", 6)]


def test_micrography_view_serves_a_journal_and_run_refuses_a_bad_bind_before_exposing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "session"
    assert main(["run", "--view", "--view-bind", "nowhere", "--out", str(out), "--budget", "1"]) == 1
    assert "--view-bind 'nowhere': give HOST:PORT" in capsys.readouterr().err
    assert not out.exists()
    missing = tmp_path / "none.h5"
    assert main(["view", str(missing)]) == 1
    assert "none.h5: no such file" in capsys.readouterr().err


def test_micrography_view_prints_its_url_and_serves_the_page(
    small_config: SimulatorConfig, small_specimen: Specimen, tmp_path: Path
) -> None:
    journal = tmp_path / "journal.h5"
    with SimulatedMicroscope(small_config, small_specimen) as microscope:
        three = SHORT.model_copy(update={"budget": SHORT.budget.model_copy(update={"max_tiles": 3})})
        Session(microscope, three, journal).run()
    process = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "view", str(journal), "--view-bind", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stdout.readline()
        assert line.startswith(f"live view of {journal}: http://127.0.0.1:")
        url = line.split(": ", 1)[1].split(" ")[0]
        page = urllib.request.urlopen(url, timeout=10).read().decode()
        assert "<title>Micrography live view</title>" in page
        status, body = request(url + "api/state")
        assert status == 200 and body["steps"] == 3 and body["state"]["phase"] == "finished"
        assert body["info"]["controllable"] is False
    finally:
        process.terminate()
        process.wait(10)
