"""Operator control of a running session (agent/operator.py): pause, stop, marks, live settings.

Real simulated instruments and real journals: the actions are sent from the session's own
``on_step`` hook or from another thread, as the live view's web server sends them.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from agent.acquisition import BudgetConfig
from agent.journal import read_journal
from agent.operator import OperatorAction, OperatorDesk, OperatorError
from agent.policy import RasterPolicy
from agent.session import ScanSettings, Session, SessionConfig, StepRecord
from agent.survey import CandidateGrid
from analysis.replay import replay_journal
from simulator.config import SimulatorConfig
from simulator.drivers import SimulatedMicroscope
from simulator.specimen import Specimen

SHORT = SessionConfig(
    budget=BudgetConfig(max_tiles=7),
    survey=ScanSettings(pixel_size_nm=0.25, dwell_us=1.0, shape=(1024, 1024)),
    tiles=ScanSettings(pixel_size_nm=0.02, dwell_us=4.0, shape=(192, 192)),
    start_tiles=2,
    warmup_steps=10,
    session_id="oper",
)
"""A short session on the small specimen (3.84 nm candidates on a 30 nm stage)."""


def overlaps(extent: tuple[float, float, float, float] | list[float], region: tuple[float, ...]) -> bool:
    x0, x1, y0, y1 = extent
    return x0 < region[1] and x1 > region[0] and y0 < region[3] and y1 > region[2]


def test_the_desk_refuses_malformed_actions_with_one_line() -> None:
    desk = OperatorDesk()
    with pytest.raises(OperatorError, match=r"a 'skip' mark needs region_nm"):
        desk.submit({"action": "skip"})
    with pytest.raises(OperatorError, match=r"region_nm \[5.0, 1.0, 0.0, 2.0\] is empty"):
        desk.submit({"action": "look", "region_nm": [5, 1, 0, 2]})
    with pytest.raises(OperatorError, match=r"setting 'seed' cannot change live; choose one of dwell_us"):
        desk.submit({"action": "set", "setting": "seed", "value": 3})
    with pytest.raises(OperatorError, match=r"action: Input should be 'pause'"):
        desk.submit({"action": "jump"})
    with pytest.raises(OperatorError) as error:
        desk.submit({"action": "set", "setting": "dwell_us", "value": -1})
    assert "\n" not in str(error.value) and "must be positive" in str(error.value)
    assert desk.take() == [] and desk.received == []  # nothing refused is queued


def test_pause_holds_until_resume_and_stop_releases_it() -> None:
    stopped: list[str] = []
    desk = OperatorDesk(on_stop=stopped.append)
    desk.submit({"action": "pause", "source": "page"})
    assert desk.paused
    threading.Timer(0.3, desk.submit, args=({"action": "resume"},)).start()
    held = desk.wait_while_paused(threading.Event())
    assert 0.25 < held < 2.0 and not desk.paused
    desk.submit({"action": "pause"})
    desk.submit({"action": "stop", "source": "cli"})
    assert not desk.paused and stopped == ["stopped by the operator (cli)"]
    assert [a.action for a in desk.take()] == ["pause", "resume", "pause", "stop"]
    assert desk.paused_s == pytest.approx(held)


def test_skip_and_look_marks_are_data_for_every_policy(small_config: SimulatorConfig) -> None:
    with SimulatedMicroscope(small_config) as microscope:
        description = microscope.describe()
    grid = CandidateGrid.tiling(description, (192, 192), 0.02)
    policy = RasterPolicy(grid, description)
    first = policy.suggest(1)[0]
    policy.release([first])
    # Skip the raster's first row: no suggestion touches it any more.
    skip = (0.0, 30.0, 0.0, float(grid.extents[0, 3]) + 0.5)
    covered = policy.mark_region("skip", skip)
    assert covered >= grid.grid_shape[1]
    suggested = policy.suggest(5)
    assert not any(overlaps(r.extent_nm, skip) for r in suggested)
    policy.release(suggested)
    # Look here: a far corner comes first, though the raster would get there last.
    look = tuple(float(v) for v in (grid.centres[-1] - 1.0).tolist() + (grid.centres[-1] + 1.0).tolist())
    look = (look[0], look[2], look[1], look[3])
    assert policy.mark_region("look", look) == 1
    assert grid.match(policy.suggest(1)[0]) == len(grid) - 1
    assert [m["kind"] for m in policy.report()["marks"]] == ["skip", "look"]
    policy.clear_marks()
    assert policy.marks == [] and policy.admissible()[0]


def run_session(
    config: SimulatorConfig,
    specimen: Specimen,
    session_config: SessionConfig,
    journal: Path,
    actions: dict[int, list[dict[str, object]]],
) -> Session:
    """Run a session that sends ``actions[k]`` to its desk right after step ``k`` is journaled."""
    holder: dict[str, Session] = {}

    def on_step(record: StepRecord) -> None:
        for action in actions.get(record.index, []):
            holder["session"].operator.submit(action)

    with SimulatedMicroscope(config, specimen) as microscope:
        session = Session(microscope, session_config, journal, on_step=on_step)
        holder["session"] = session
        session.run()
    return session


@pytest.mark.parametrize("lookahead", [0, 1])
def test_a_skip_mark_keeps_the_next_suggestions_out_and_the_replay_reproduces_it(
    lookahead: int, small_config: SimulatorConfig, small_specimen: Specimen, tmp_path: Path
) -> None:
    config = SHORT.model_copy(update={"lookahead_tiles": lookahead})
    plain = run_session(small_config, small_specimen, config, tmp_path / "plain.h5", {})
    first_guided = next(s.index for s in plain.steps if s.kind == "guided")
    # Skip where the plain session went next, as a microscopist who saw it coming would.
    later = [s for s in plain.steps if s.kind == "guided"][1:]
    x0, x1, y0, y1 = later[0].request.extent_nm
    skip = (x0 + 0.5, x1 - 0.5, y0 + 0.5, y1 - 0.5)
    mark = {"action": "skip", "region_nm": list(skip), "source": "test"}
    journal = tmp_path / "marked.h5"
    session = run_session(small_config, small_specimen, config, journal, {first_guided: [mark]})
    applied = [s for s in session.steps if "operator" in s.extra]
    assert len(applied) == 1 and applied[0].index == first_guided + 1
    recorded = applied[0].extra["operator"][0]
    assert recorded["action"] == "skip" and recorded["step"] == first_guided + 1
    assert recorded["received_unix_s"] > 0
    # Every tile decided after the mark stays out of the region; the plain session went there.
    decided = [s for s in session.steps if (s.extra.get("decided_after_step") or -1) >= first_guided + 1]
    assert decided and not any(overlaps(s.request.extent_nm, skip) for s in decided)
    assert any(overlaps(s.request.extent_nm, skip) for s in plain.steps if s.kind == "guided")
    assert session.policy is not None and session.policy.marks[0][0] == "skip"
    # The journal holds the mark with its step; the replay reproduces every decision with it.
    steps = read_journal(journal).steps
    assert steps[first_guided + 1].record["operator"][0]["region_nm"] == list(skip)
    replayed = replay_journal(journal, progress=False)
    assert [s.request.request_id for s in replayed.session.steps] == [
        s.request.request_id for s in session.steps
    ]
    assert replayed.session.policy is not None and replayed.session.policy.marks == session.policy.marks


def test_live_settings_change_the_next_tiles_and_are_journaled(
    small_config: SimulatorConfig, small_specimen: Specimen, tmp_path: Path
) -> None:
    config = SHORT.model_copy(update={"lookahead_tiles": 0})
    actions = {
        2: [
            {"action": "set", "setting": "dwell_us", "value": 2.0},
            {"action": "set", "setting": "budget.max_tiles", "value": 4},
        ]
    }
    session = run_session(small_config, small_specimen, config, tmp_path / "j.h5", actions)
    tiles = [s for s in session.steps if s.kind != "survey"]
    assert len(tiles) == 4 and session.stop_reason.startswith("tile budget of 4")
    dwell = [s.request.dwell_us for s in tiles]
    assert dwell[-1] == 2.0 and dwell[0] == 4.0
    assert session.config.tiles.dwell_us == 2.0 and session.config.budget.max_tiles == 4
    replayed = replay_journal(tmp_path / "j.h5", progress=False)
    assert replayed.session.config.tiles.dwell_us == 2.0


def test_a_dwell_the_instrument_refuses_is_refused_on_arrival(
    small_config: SimulatorConfig, small_specimen: Specimen
) -> None:
    with SimulatedMicroscope(small_config, small_specimen) as microscope:
        session = Session(microscope, SHORT)
        with pytest.raises(OperatorError, match=r"operator action refused: set dwell_us = 1e\+06: .*dwell"):
            session.operator.submit({"action": "set", "setting": "dwell_us", "value": 1e6})
        assert session.operator.take() == []


@pytest.mark.parametrize("lookahead", [0, 1])
def test_pause_stops_the_instrument_within_a_tile_and_is_not_dead_time(
    lookahead: int, small_config: SimulatorConfig, small_specimen: Specimen
) -> None:
    config = SHORT.model_copy(update={"lookahead_tiles": lookahead, "budget": BudgetConfig(max_tiles=5)})
    scans: list[float] = []
    paused_at: dict[str, float] = {}

    class Clocked(SimulatedMicroscope):
        def _acquire(self, request):  # type: ignore[no-untyped-def]
            scans.append(time.monotonic())
            return super()._acquire(request)

    with Clocked(small_config, small_specimen) as microscope:

        def on_step(record: StepRecord) -> None:
            if record.kind == "start" and "t" not in paused_at:
                session.operator.submit({"action": "pause", "source": "test"})
                paused_at["t"] = time.monotonic()
                paused_at["scans"] = len(scans)
                threading.Timer(1.0, session.operator.submit, args=({"action": "resume"},)).start()

        session = Session(microscope, config, on_step=on_step)
        session.run()
    # At most the scan already under way starts during the pause; nothing else for a second.
    during = [t for t in scans if paused_at["t"] < t < paused_at["t"] + 0.9]
    assert len(scans) - paused_at["scans"] >= 2 and len(during) <= lookahead
    held = [s.timings.get("operator_pause", 0.0) for s in session.steps]
    assert 0.8 < sum(held) < 3.0
    assert all(s.timings.get("instrument_wait", 0.0) < 0.8 for s in session.steps)
    assert [a.action for a in session.operator.received] == ["pause", "resume"]
    assert np.isclose(session.operator.paused_s, sum(held), atol=0.05)


def test_an_operator_action_round_trips_through_json() -> None:
    action = OperatorAction(action="look", region_nm=(1.0, 2.0, 3.0, 4.0), source="page", step=7)
    assert OperatorAction.model_validate(action.model_dump(mode="json")) == action
    assert action.describe() == "look x 1.0-2.0 nm, y 3.0-4.0 nm"
