"""The pipelined loop (``lookahead_tiles``) and its acquisition worker (agent/acquisition.py).

Real simulated instruments throughout: the worker drives ``SimulatedMicroscope.acquire`` from its
thread while the session finds columns and updates its models in the test's thread.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from agent.acquisition import STOP_REQUESTED, AcquisitionWorker, BudgetConfig, InstrumentLedger
from agent.driver import ScanRequest, Tile
from agent.errors import ScanRequestError
from agent.journal import read_journal
from agent.session import ScanSettings, Session, SessionConfig, StepRecord
from simulator.config import SimulatorConfig
from simulator.drivers import SimulatedMicroscope
from simulator.specimen import Specimen

PIPELINED = SessionConfig(
    budget=BudgetConfig(max_tiles=6),
    survey=ScanSettings(pixel_size_nm=0.25, dwell_us=1.0, shape=(1024, 1024)),
    tiles=ScanSettings(pixel_size_nm=0.02, dwell_us=4.0, shape=(192, 192)),
    start_tiles=2,
    warmup_steps=10,
    lookahead_tiles=1,
    session_id="pipe",
)
"""A short pipelined session on the small specimen (many 3.84 nm candidates)."""


class WatchedMicroscope(SimulatedMicroscope):
    """Notes, as each scan starts, how many steps the session has finished (the agent's progress)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.session: Session | None = None
        self.started: dict[str, int] = {}

    def _acquire(self, request: ScanRequest) -> Tile:
        self.started[request.request_id] = -1 if self.session is None else len(self.session.steps)
        return super()._acquire(request)


def run(
    config: SimulatorConfig,
    specimen: Specimen,
    session_config: SessionConfig,
    journal: Path | None = None,
    on_step: object = None,
) -> tuple[Session, WatchedMicroscope]:
    with WatchedMicroscope(config, specimen) as microscope:
        session = Session(microscope, session_config, journal, on_step=on_step)  # type: ignore[arg-type]
        microscope.session = session
        session.run()
    return session, microscope


@pytest.mark.parametrize("lookahead", [0, 1])
def test_the_pipelined_loop_hands_the_instrument_its_next_tile_before_working_on_the_last(
    lookahead: int, small_config: SimulatorConfig, small_specimen: Specimen
) -> None:
    config = PIPELINED.model_copy(update={"lookahead_tiles": lookahead})
    session, microscope = run(small_config, small_specimen, config)
    guided = [step for step in session.steps if step.kind == "guided"]
    assert len(guided) == 4
    for step in guided:
        # Steps finished when this tile's scan began, and the step after which it was chosen: with
        # look-ahead even the first guided tile, chosen while the last start tile was scanned.
        assert microscope.started[step.request.request_id] == step.index - lookahead
        assert step.extra["decided_after_step"] == step.index - 1 - lookahead
    decisions = [len(step.decision) for step in session.steps if step.kind != "survey"]
    assert decisions == ([1] * 6 if lookahead else [0, 1, 1, 1, 1, 1])
    if lookahead:
        assert {"instrument_wait", "agent_wait"} <= set(guided[-1].timings)


def test_the_pipelined_loop_stops_at_each_budget_exactly_and_exposes_nothing_beyond_it(
    small_config: SimulatorConfig, small_specimen: Specimen
) -> None:
    limit = 20_000.0
    limited = small_config.model_copy(
        update={"instrument": small_config.instrument.model_copy(update={"max_dose_e_per_a2": limit})}
    )
    overlapping = PIPELINED.model_copy(update={"tile_overlap_fraction": 0.25})
    session, microscope = run(limited, small_specimen, overlapping)
    assert session.stop_reason == "tile budget of 6 spent"
    # A seventh tile was decided (one ahead) but never exposed.
    assert len(session._next) == 2 and microscope.exposures == len(session.steps) == 7
    assert set(microscope.started) == {step.request.request_id for step in session.steps}
    for step in session.steps:
        session.description.check(step.request)  # inside the stage, dwell and pixel limits
    assert microscope.dose_map.map_e_per_a2.max() <= limit * (1 + 1e-9)

    for budget, reason in (
        (BudgetConfig(max_tiles=None, max_time_s=4.0), "instrument-time budget of 4 s spent"),
        (BudgetConfig(max_tiles=None, max_mean_dose_e_per_a2=700.0), "dose budget of 700 e-/A^2"),
    ):
        budgeted = PIPELINED.model_copy(update={"budget": budget})
        session, microscope = run(small_config, small_specimen, budgeted)
        assert session.stop_reason.startswith(reason)
        assert microscope.exposures == len(session.steps)
        # The last tile crossed the budget; the one before it had not.
        spent = [
            step.extra["instrument_time_s" if budget.max_time_s else "mean_dose_e_per_a2"]
            for step in session.steps
            if step.kind != "survey"
        ]
        bound = budget.max_time_s or budget.max_mean_dose_e_per_a2
        assert spent[-2] < bound <= spent[-1]


def test_a_stop_request_finishes_the_tiles_under_way_and_loses_no_exposure(
    tmp_path: Path, small_config: SimulatorConfig, small_specimen: Specimen
) -> None:
    holder: dict[str, Session] = {}

    def stop_after_first_guided(record: StepRecord) -> None:
        if record.kind == "guided":
            holder["session"].request_stop("interrupted (test)")

    with WatchedMicroscope(small_config, small_specimen) as microscope:
        session = Session(microscope, PIPELINED, tmp_path / "journal.h5", on_step=stop_after_first_guided)
        holder["session"] = session
        session.run()
    assert session.interrupted and session.stop_reason == "interrupted (test)"
    # The tile in flight when the stop came was scanned, worked on and journaled; none after it.
    assert [step.kind for step in session.steps][-2:] == ["guided", "guided"]
    assert microscope.exposures == len(session.steps) == len(read_journal(tmp_path / "journal.h5").steps)


def test_a_pipelined_session_killed_mid_tile_resumes_to_the_uninterrupted_state(
    tmp_path: Path, small_config: SimulatorConfig, small_specimen: Specimen
) -> None:
    reference, _ = run(small_config, small_specimen, PIPELINED, tmp_path / "reference.h5")

    class Killed(Exception):
        pass

    def kill_after_second_guided(record: StepRecord) -> None:
        if record.kind == "guided" and record.index == 4:
            raise Killed  # the tile after it is being scanned: it is aborted and lost

    with pytest.raises(Killed):
        run(small_config, small_specimen, PIPELINED, tmp_path / "killed.h5", on_step=kill_after_second_guided)
    assert len(read_journal(tmp_path / "killed.h5").steps) == 5
    with SimulatedMicroscope(small_config, small_specimen) as microscope:
        resumed = Session.resume(microscope, tmp_path / "killed.h5")
        assert [r.request_id for r in resumed._next] == [
            r.request_id for r in (reference.steps[5].request, reference.steps[6].request)
        ]
        resumed.run()
    assert resumed.stop_reason == reference.stop_reason == "tile budget of 6 spent"
    assert [s.request for s in resumed.steps] == [s.request for s in reference.steps]
    assert [s.decision for s in resumed.steps] == [s.decision for s in reference.steps]
    for mine, theirs in zip(resumed.steps, reference.steps, strict=True):
        assert mine.tile is not None and theirs.tile is not None
        np.testing.assert_array_equal(mine.tile.image, theirs.tile.image)
    np.testing.assert_allclose(resumed.node_scores(), reference.node_scores(), rtol=1e-5, atol=1e-6)
    contents = read_journal(tmp_path / "killed.h5")
    assert contents.end is not None and len(contents.steps) == len(reference.steps)


def small_requests(count: int, dwell_us: float = 2.0) -> list[ScanRequest]:
    return [
        ScanRequest(x_nm=6.0 + 4.0 * k, y_nm=15.0, shape=(64, 64), pixel_size_nm=0.02, dwell_us=dwell_us)
        for k in range(count)
    ]


def test_the_worker_scans_in_order_and_halts_on_the_first_error_or_stop(
    small_config: SimulatorConfig, small_specimen: Specimen
) -> None:
    area = 30.0 * 30.0 * 100.0
    with SimulatedMicroscope(small_config, small_specimen) as microscope:
        worker = AcquisitionWorker(microscope, InstrumentLedger(area), BudgetConfig(max_tiles=None),
                                   threading.Event())  # fmt: skip
        bad = ScanRequest(x_nm=15.0, y_nm=15.0, shape=(64, 64), pixel_size_nm=0.02, dwell_us=1000.0)
        requests = small_requests(2)
        for request in (requests[0], bad, requests[1]):
            worker.submit(request, "guided")
        first, second, third = worker.result(5), worker.result(5), worker.result(5)
        worker.close()
        assert first.tile is not None and first.tile.request == requests[0] and first.wait_s is None
        assert isinstance(second.error, ScanRequestError) and "dwell" in str(second.error)
        assert third.refused == f"{bad.request_id} failed (OutOfRangeError): nothing after it is scanned"
        assert microscope.exposures == 1  # nothing scanned after the refusal

        stop = threading.Event()
        worker = AcquisitionWorker(microscope, worker.ledger, BudgetConfig(max_tiles=None), stop)
        more = small_requests(3)
        worker.submit(more[0], "guided")
        assert worker.result(5).tile is not None
        stop.set()
        worker.submit(more[1], "guided")
        assert worker.result(5).refused == STOP_REQUESTED
        worker.close()
        assert microscope.exposures == 2 and worker.ledger.tiles == 2


def test_a_real_time_instrument_takes_its_settle_and_frame_time_and_aborts_within_the_wait(
    small_config: SimulatorConfig, small_specimen: Specimen
) -> None:
    import time

    from agent.errors import AcquisitionAborted

    paced = small_config.model_copy(
        update={"instrument": small_config.instrument.model_copy(update={"real_time": True})}
    )
    with SimulatedMicroscope(paced, small_specimen) as microscope:
        request = ScanRequest(x_nm=15.0, y_nm=15.0, shape=(256, 256), pixel_size_nm=0.02, dwell_us=4.0)
        began = time.monotonic()
        tile = microscope.acquire(request)
        took = time.monotonic() - began
        instrument_s = tile.t_end - (tile.t_start - paced.instrument.stage_settle_s)
        assert took >= instrument_s  # settle 0.5 s and a 0.27 s frame, never sooner
        timer = threading.Timer(0.6, microscope.abort)
        timer.start()
        with pytest.raises(AcquisitionAborted, match=r"aborted after \d+ of 256 lines") as stopped:
            microscope.acquire(request.model_copy(update={"x_nm": 20.0, "request_id": "second"}))
        timer.join()
        # Aborted 0.1 s into the 0.27 s frame: some lines dosed, not all.
        assert 0 < stopped.value.rows_scanned < 256


def test_a_resumed_pipelined_session_takes_back_only_the_tiles_that_were_out_when_it_stopped(
    tmp_path: Path, small_config: SimulatorConfig, small_specimen: Specimen
) -> None:
    from agent.session import REPLAYED_KEY, SessionError
    from tests.test_session_resume import ReplayingMicroscope

    journal = tmp_path / "journal.h5"
    with ReplayingMicroscope(small_config, small_specimen) as microscope:
        microscope.replayed = frozenset({"start-00001"})
        with pytest.raises(SessionError, match=r"start-00001 with a tile it had made before"):
            Session(microscope, PIPELINED, journal).run()
        assert microscope.exposures == 3  # the worker scanned nothing after the refused tile
    assert [s.record["kind"] for s in read_journal(journal).steps] == ["survey", "start"]
    # Two requests may be out at once (lookahead 1): the first two scans after the resume may come
    # back from the instrument's memory, the third may not.
    with ReplayingMicroscope(small_config, small_specimen) as microscope:
        microscope.replayed = frozenset({"start-00001", "guided-00000", "guided-00001"})
        resumed = Session.resume(microscope, journal)
        with pytest.raises(SessionError, match=r"guided-00001 with a tile it had made before"):
            resumed.run()
    steps = read_journal(journal).steps
    assert [s.record["request"]["request_id"].split("-", 1)[1] for s in steps] == [
        "overview-00000", "start-00000", "start-00001", "guided-00000"
    ]  # fmt: skip
    assert all(s.record["tile"]["metadata"].get(REPLAYED_KEY) for s in steps[2:])


def test_the_pipeline_benchmark_reports_dead_time_per_dwell_and_loop_and_judges_its_targets() -> None:
    from analysis.bench_pipeline import benchmark_pipeline, format_report
    from tests.conftest import SMALL_SPECIMEN

    report = benchmark_pipeline(
        dwells_us=(1.0,), seeds=(3,), tiles=5, guidance=False, specimen=SMALL_SPECIMEN, no_settle_dwells_us=()
    )
    rows = report["dead_time"]["rows"]
    assert [(row["dwell_us"], row["lookahead_tiles"]) for row in rows] == [(1.0, 0), (1.0, 1)]
    for row in rows:
        (run,) = row["runs"]
        # Five tiles after the survey, each with its wait: 512 lines of 512 us plus a 20 us flyback.
        assert run["scan_time_s"] == pytest.approx(5 * 512 * (512 * 1.0 + 20.0) * 1e-6, rel=1e-6)
        assert (
            0
            <= run["dead_time_fraction"]
            == pytest.approx(run["dead_time_s"] / (run["dead_time_s"] + run["scan_time_s"]))
        )
        # Every tile took its settle and frame time on the wall clock: five of them at least.
        assert run["wall_s"] > 5 * (0.5 + 0.27)
    assert set(report["target_results"]) == {"dead_time_at_1us"} and report["guidance"] is None
    table = format_report(report)
    assert "sequential" in table and "pipelined" in table and "target dead_time_at_1us" in table


def test_micrography_replay_reproduces_a_pipelined_journal(
    tmp_path: Path, small_config: SimulatorConfig, small_specimen: Specimen
) -> None:
    from analysis.replay import format_replay, run_replay

    run(small_config, small_specimen, PIPELINED, tmp_path / "journal.h5")
    report = run_replay(tmp_path / "journal.h5", tmp_path / "replay")
    reproduction = report["reproduction"]
    assert reproduction["decisions_reproduced"] and reproduction["nodes_reproduced"]
    assert reproduction["scores_reproduced"] and reproduction["max_abs_score_difference"] == 0.0
    table = format_replay(report)
    # The pipelined loop's own timings are in the breakdown, the columns aligned to the longest name.
    header = next(line for line in table.splitlines() if line.startswith("stage "))
    row = next(line for line in table.splitlines() if line.startswith("instrument_wait "))
    assert header.index("recorded median") + len("recorded median") == row.index(" s ", 16) + 2


def test_a_journal_from_before_the_pipelined_loop_resumes_sequential(
    tmp_path: Path, small_config: SimulatorConfig, small_specimen: Specimen
) -> None:
    import json

    import h5py

    sequential = PIPELINED.model_copy(update={"lookahead_tiles": 0})
    reference, _ = run(small_config, small_specimen, sequential)

    def kill_after_first_guided(record: StepRecord) -> None:
        if record.kind == "guided":
            raise KeyboardInterrupt

    journal = tmp_path / "old.h5"
    with pytest.raises(KeyboardInterrupt):
        run(small_config, small_specimen, sequential, journal, on_step=kill_after_first_guided)
    # Journals written before lookahead_tiles existed have no such key: they were sequential.
    with h5py.File(journal, "a") as file:
        config = json.loads(file.attrs["config"])
        del config["lookahead_tiles"]
        file.attrs["config"] = json.dumps(config)
    assert read_journal(journal).config["lookahead_tiles"] == 0
    with SimulatedMicroscope(small_config, small_specimen) as microscope:
        resumed = Session.resume(microscope, journal)
        assert resumed.config.lookahead_tiles == 0
        resumed.run()
    assert [s.request for s in resumed.steps] == [s.request for s in reference.steps]
    assert [s.decision for s in resumed.steps] == [s.decision for s in reference.steps]
