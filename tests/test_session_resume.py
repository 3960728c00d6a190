"""Sessions that stop and go on: request ids per session, SIGKILL and Ctrl-C, resume, bad inputs.

The subprocess tests run the real command line (``python -m agent.cli run``) on a small specimen
with an instrument-time budget, kill it for real, resume it, and compare with an uninterrupted
run of the same configuration. The instrument tests run real ``InstrumentServer`` threads with a
persistent exposure journal on 127.0.0.1 and talk to them through ``ZmqMicroscope``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from agent.anomaly import CheckpointError
from agent.cli import main
from agent.driver import ScanRequest, Tile
from agent.errors import MicrographyError
from agent.journal import END_KIND, JournalStep, SessionJournal, read_journal, rewrite_backup
from agent.session import (
    REPLAYED_KEY,
    BudgetConfig,
    ScanSettings,
    Session,
    SessionConfig,
    SessionError,
)
from simulator.config import SimulatorConfig
from simulator.drivers import SimulatedMicroscope
from simulator.specimen import Specimen

TIME_BUDGET_S = 6.5
"""Instrument seconds: the survey and six 256^2 tiles of about 1 s each (stage settling included)."""

SESSION = SessionConfig(
    budget=BudgetConfig(max_tiles=None, max_time_s=TIME_BUDGET_S),
    tiles=ScanSettings(pixel_size_nm=0.02, dwell_us=8.0, shape=(256, 256)),
    start_tiles=3,
    warmup_steps=20,
)
"""A small guided session that stops on its instrument-time budget."""

INSTRUMENT_SESSION = SessionConfig(
    budget=BudgetConfig(max_tiles=3),
    survey=ScanSettings(pixel_size_nm=0.5, dwell_us=2.0, shape=(4096, 4096)),
    tiles=ScanSettings(pixel_size_nm=0.02, dwell_us=4.0, shape=(128, 128)),
    start_tiles=2,
    warmup_steps=5,
)
"""Three small tiles after a coarse survey: enough to see whose tiles an instrument exposes."""

COMMAND = [sys.executable, "-m", "agent.cli", "run"]


PINNED_ID = "w7"
"""A fixed session id, so that two runs make the same request ids."""
SEED = 7
"""Specimen and session seed: the first guided tile lands across a wall, before the kill."""


def write_config(path: Path, small_config: SimulatorConfig, **updates: object) -> Path:
    values = SESSION.model_copy(update=updates).model_dump(mode="json")
    values["seed"] = SEED
    values["simulator"] = {"specimen": small_config.specimen.model_dump(mode="json")}
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return path


def wait_for_steps(process: subprocess.Popen, journal: Path, steps: int, timeout_s: float = 240) -> int:
    """Poll the journal a live session writes until it holds ``steps`` complete steps."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, "the session ended before it could be interrupted"
        if journal.exists():
            try:
                found = len(read_journal(journal).steps)
            except MicrographyError:
                found = 0  # caught while being created
            if found >= steps:
                return found
        time.sleep(0.03)
    raise AssertionError(f"no {steps} steps in {journal} after {timeout_s} s")


def relative_times(steps: list[JournalStep]) -> np.ndarray:
    """(t_start, t_end) of every tile, from the first tile's start (the instrument clock's origin differs)."""
    times = np.array([[s.record["tile"]["t_start"], s.record["tile"]["t_end"]] for s in steps])
    return times - times[0, 0]


def assert_monotonic(steps: list[JournalStep]) -> None:
    times = relative_times(steps)
    assert np.all(times[:, 1] >= times[:, 0])
    assert np.all(times[1:, 0] >= times[:-1, 1]), "a tile started before the previous one ended"


def assert_summary_timings_are_the_journals(summary: dict, steps: list[JournalStep]) -> None:
    """The summary's medians are over every tile as timed live: the journal's timings, not a replay's."""
    tiles = [s for s in steps if s.record["kind"] != "survey"]
    for stage, median in summary["median_timings_s"].items():
        # The first step after a resume has no instrument wait (the process was not running).
        timed = [s.record["timings"][stage] for s in tiles if stage in s.record["timings"]]
        assert median == pytest.approx(float(np.median(timed)))
    waits = [s.record["timings"].get("instrument_wait", 0.0) for s in steps]
    assert summary["instrument_dead_time_s"] == pytest.approx(sum(waits))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, small_config: SimulatorConfig) -> Path:
    """An uninterrupted run of the session with a fixed session id (so its tiles can be compared).

    Run in this process (the killed ones run in their own): the same code gives the same session.
    """
    root = tmp_path_factory.mktemp("reference")
    config = write_config(root / "session.yaml", small_config, session_id=PINNED_ID)
    out = root / "complete"
    assert main(["run", "--config", str(config), "--out", str(out)]) == 0
    return out


def test_a_killed_and_resumed_session_with_a_time_budget_ends_as_the_uninterrupted_one(
    reference: Path, tmp_path: Path, small_config: SimulatorConfig
) -> None:
    config = write_config(tmp_path / "session.yaml", small_config, session_id=PINNED_ID)
    out = tmp_path / "killed"
    journal = out / "journal.h5"
    process = subprocess.Popen([*COMMAND, "--config", str(config), "--out", str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for_steps(process, journal, 4)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    before = read_journal(journal)
    assert before.end is None and 4 <= len(before.steps) < 8, "the session was not killed mid-way"
    assert not (out / "summary.json").exists()

    assert main(["run", "--resume", str(journal)]) == 0  # in this process: no second start-up
    resumed, complete = read_journal(journal), read_journal(reference / "journal.h5")
    # The same session: request ids in order, decisions, walls (one before the kill), scores, last
    # image, end record.
    assert [s.record["request"] for s in resumed.steps] == [s.record["request"] for s in complete.steps]
    assert [s.record["decision"] for s in resumed.steps] == [s.record["decision"] for s in complete.steps]
    assert [s.record.get("wall") for s in resumed.steps] == [s.record.get("wall") for s in complete.steps]
    assert any(s.record.get("wall") is not None for s in resumed.steps[1 : len(before.steps)])
    np.testing.assert_allclose(
        np.array([s.record["score"] for s in resumed.steps], dtype=float),
        np.array([s.record["score"] for s in complete.steps], dtype=float),
        rtol=1e-6,
    )
    np.testing.assert_array_equal(resumed.steps[-1].image, complete.steps[-1].image)
    assert resumed.end is not None and resumed.end["stop_reason"] == complete.end["stop_reason"]
    assert "instrument-time budget" in resumed.end["stop_reason"]
    # Instrument time: the same clock, step by step, never going back at the resume point.
    assert_monotonic(resumed.steps)
    np.testing.assert_allclose(relative_times(resumed.steps), relative_times(complete.steps), atol=1e-6)
    assert [s.record["instrument_time_s"] for s in resumed.steps] == pytest.approx(
        [s.record["instrument_time_s"] for s in complete.steps]
    )
    # The summary: same tiles, dose and instrument time; the journal named; live timings.
    summary = json.loads((out / "summary.json").read_text())
    expected = json.loads((reference / "summary.json").read_text())
    assert summary["tiles"] == expected["tiles"] >= 5
    for key in ("mean_dose_e_per_a2", "instrument_time_s", "nodes", "imaged_features", "wall_segments"):
        assert summary[key] == pytest.approx(expected[key]), key
    assert summary["journal"] == str(journal) and summary["session_id"] == PINNED_ID
    assert summary["resumed"]["replayed_steps"] == len(before.steps) and summary["resumed"]["rebuild_s"] > 0
    assert not summary["interrupted"]
    assert_summary_timings_are_the_journals(summary, resumed.steps)
    assert not rewrite_backup(journal).exists(), "the rewritten journal's old copy is removed"
    # The per-column tables: the same columns, species and scores as the uninterrupted session's.
    from agent.column_table import read_tables

    (columns, vacancies), (expected_columns, expected_vacancies) = (
        read_tables(folder / "columns.h5") for folder in (out, reference)
    )
    assert len(columns["x_nm"]) == summary["nodes"]
    for name in ("x_nm", "y_nm", "species", "interior", "anomalous"):
        np.testing.assert_array_equal(columns[name], expected_columns[name], err_msg=name)
    np.testing.assert_allclose(columns["score"], expected_columns["score"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(vacancies["x_nm"], expected_vacancies["x_nm"])


def test_ctrl_c_finishes_the_tile_writes_summary_and_report_and_says_how_to_resume(
    reference: Path, tmp_path: Path, small_config: SimulatorConfig
) -> None:
    config = write_config(tmp_path / "session.yaml", small_config)  # a new random session id
    out = tmp_path / "interrupted"
    journal = out / "journal.h5"
    process = subprocess.Popen([*COMMAND, "--config", str(config), "--out", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_for_steps(process, journal, 3)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
        process.wait(timeout=30)
    assert process.returncode == 130, stderr
    resume = next(line.strip() for line in stderr.splitlines() if line.strip().startswith("micrography run"))
    assert resume == f"micrography run --resume {journal}"
    assert "Traceback" not in stderr
    interrupted = read_journal(journal)
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "report.png").stat().st_size > 0
    assert summary["interrupted"] and summary["stop_reason"] == "interrupted (Ctrl-C)"
    # The tile in progress was finished and journaled: the journal holds every step the summary counts.
    assert len(interrupted.steps) == summary["survey_tiles"] + summary["tiles"] >= 3
    assert interrupted.end is None
    session_id = interrupted.session_id
    assert session_id and session_id != PINNED_ID and summary["session_id"] == session_id

    # The printed command goes on with the same session id and ends on the budget.
    assert main(resume.split()[1:]) == 0
    resumed = read_journal(journal)
    ids = [s.record["request"]["request_id"] for s in resumed.steps]
    assert ids[: len(interrupted.steps)] == [s.record["request"]["request_id"] for s in interrupted.steps]
    assert all(i.startswith(f"{session_id}-") for i in ids) and len(set(ids)) == len(ids)
    assert_monotonic(resumed.steps)
    final = json.loads((out / "summary.json").read_text())
    expected = json.loads((reference / "summary.json").read_text())
    # Other noise (another session id), but the same budget of the same instrument: tiles, dose, time.
    assert final["tiles"] == expected["tiles"]
    assert final["mean_dose_e_per_a2"] == pytest.approx(expected["mean_dose_e_per_a2"])
    assert final["instrument_time_s"] == pytest.approx(expected["instrument_time_s"])
    assert not final["interrupted"] and resumed.end is not None


def test_resuming_a_complete_session_says_so_and_exposes_and_writes_nothing(
    reference: Path,
    small_config: SimulatorConfig,
    small_specimen: Specimen,
    capsys: pytest.CaptureFixture[str],
) -> None:
    journal = reference / "journal.h5"
    before = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in reference.iterdir()}
    assert main(["run", "--resume", str(journal)]) == 0
    printed = capsys.readouterr().out
    assert "this session is complete (instrument-time budget of 6.5 s spent" in printed
    assert "nothing was exposed or written" in printed
    assert {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in reference.iterdir()} == before
    # The library rebuilds it read-only, and running it does nothing.
    with SimulatedMicroscope(small_config, small_specimen) as scope:
        session = Session.resume(scope, journal)
        # Resuming replays the journal's scans into the instrument's counters (the specimen kept
        # their dose); running a complete session must add no exposure to them.
        replayed = scope.exposures
        assert replayed == len(read_journal(journal).steps)
        assert session.complete and session.run()["tiles"] == len(read_journal(journal).steps) - 1
        assert scope.exposures == replayed and "instrument-time budget" in session.stop_reason
    assert {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in reference.iterdir()} == before


# ----------------------------------------------------------------------------- request ids and instruments


@pytest.fixture
def served(tmp_path: Path, small_config: SimulatorConfig, small_specimen: Specimen) -> Iterator[object]:
    """A real instrument server with a persistent exposure journal, in a thread on 127.0.0.1."""
    from simulator.server import InstrumentServer

    with SimulatedMicroscope(small_config, small_specimen) as microscope:
        server = InstrumentServer(microscope, "tcp://127.0.0.1:*", events_bind="tcp://127.0.0.1:*",
                                  journal=tmp_path / "serve-journal", heartbeat_s=0.2)  # fmt: skip
        server.start()
        try:
            yield server
        finally:
            server.stop(grace_s=2.0)


def test_two_sessions_in_a_row_on_one_persistent_server_both_expose_every_tile(
    served: object, tmp_path: Path
) -> None:
    from agent.protocol.client import ZmqMicroscope

    other_dwell = INSTRUMENT_SESSION.model_copy(
        update={"tiles": INSTRUMENT_SESSION.tiles.model_copy(update={"dwell_us": 2.0})}
    )
    sessions = []
    with ZmqMicroscope(served.endpoint) as remote:
        for k, config in enumerate((INSTRUMENT_SESSION, INSTRUMENT_SESSION, other_dwell)):
            session = Session(remote, config, tmp_path / f"s{k}" / "journal.h5")
            session.run()
            sessions.append(session)
        status = remote.status()
    steps = [step for session in sessions for step in session.steps]
    assert all(session.summary()["tiles"] == 3 for session in sessions)
    # Every tile each session asked for was exposed for it: none answered from the server's journal.
    assert status.exposures == len(steps) == 3 * 4
    assert not any(step.tile.metadata.get(REPLAYED_KEY) for step in steps)
    ids = [step.request.request_id for step in steps]
    assert len(set(ids)) == len(ids)
    assert len({session.session_id for session in sessions}) == 3
    # Each session's tiles are its own exposures: scanned after the previous session's last tile.
    ends = [max(step.tile.t_end for step in session.steps) for session in sessions]
    starts = [min(step.tile.t_start for step in session.steps) for session in sessions]
    assert starts[1] >= ends[0] and starts[2] >= ends[1]
    assert [s.request.dwell_us for s in sessions[2].steps[1:]] == [2.0] * 3


def test_a_session_whose_ids_an_instrument_already_exposed_is_refused_over_the_link(
    served: object, tmp_path: Path
) -> None:
    from agent.protocol.client import ZmqMicroscope

    pinned = INSTRUMENT_SESSION.model_copy(update={"session_id": "reused"})
    with ZmqMicroscope(served.endpoint) as remote:
        Session(remote, pinned, tmp_path / "first" / "journal.h5").run()
        exposed = remote.status().exposures
        with pytest.raises(SessionError, match="a tile it had made before"):
            Session(remote, pinned, tmp_path / "second" / "journal.h5").run()
        assert remote.status().exposures == exposed


class ReplayingMicroscope(SimulatedMicroscope):
    """A simulated instrument that marks the ids ending in ``replayed`` as answered from its journal."""

    replayed: frozenset[str] = frozenset()

    def _acquire(self, request: ScanRequest) -> Tile:
        tile = super()._acquire(request)
        if any(request.request_id.endswith(f"-{name}") for name in self.replayed):
            tile.metadata[REPLAYED_KEY] = True
        return tile


def test_a_fresh_session_refuses_an_old_tile_and_a_resumed_one_takes_only_the_one_in_flight(
    tmp_path: Path, small_config: SimulatorConfig, small_specimen: Specimen
) -> None:
    config = INSTRUMENT_SESSION.model_copy(update={"budget": BudgetConfig(max_tiles=4)})
    journal = tmp_path / "journal.h5"
    with ReplayingMicroscope(small_config, small_specimen) as microscope:
        microscope.replayed = frozenset({"start-00001"})
        session = Session(microscope, config, journal)
        with pytest.raises(SessionError, match=r"start-00001 with a tile it had made before"):
            session.run()
    contents = read_journal(journal)
    assert [s.record["kind"] for s in contents.steps] == ["survey", "start"] and contents.end is None
    # Resumed: the tile in flight when the session stopped may come back from the instrument...
    with ReplayingMicroscope(small_config, small_specimen) as microscope:
        microscope.replayed = frozenset({"start-00001", "guided-00001"})
        resumed = Session.resume(microscope, journal)
        with pytest.raises(SessionError, match=r"guided-00001 with a tile it had made before"):
            resumed.run()  # ... but no later one
    contents = read_journal(journal)
    assert contents.steps[2].record["tile"]["metadata"][REPLAYED_KEY] is True
    assert [s.record["request"]["request_id"].rsplit("-", 2)[-2] for s in contents.steps] == [
        "overview", "start", "start", "guided"
    ]  # fmt: skip


def test_the_simulated_instruments_exposure_counter_goes_on_after_a_resume(
    tmp_path: Path, small_config: SimulatorConfig, small_specimen: Specimen
) -> None:
    journal = tmp_path / "journal.h5"
    short = INSTRUMENT_SESSION.model_copy(update={"budget": BudgetConfig(max_tiles=2)})
    with SimulatedMicroscope(small_config, small_specimen) as microscope:
        Session(microscope, short, journal).run()
    with SimulatedMicroscope(small_config, small_specimen) as microscope:
        Session.resume(microscope, journal, INSTRUMENT_SESSION).run()
        assert microscope.exposures == 4
    counters = [s.record["tile"]["metadata"]["exposure"] for s in read_journal(journal).steps]
    assert counters == [0, 1, 2, 3]


def test_a_version_1_journal_resumes_with_its_unprefixed_request_ids(
    tmp_path: Path, small_config: SimulatorConfig, small_specimen: Specimen
) -> None:
    journal = tmp_path / "journal.h5"
    short = INSTRUMENT_SESSION.model_copy(update={"budget": BudgetConfig(max_tiles=2)})
    with SimulatedMicroscope(small_config, small_specimen) as microscope:
        session = Session(microscope, short, journal)
        session.session_id = None  # as written before session ids existed
        session.config = session.config.model_copy(update={"session_id": None})
        session.run()
    with h5py.File(journal, "r+") as file:  # a version-1 journal: no session id, no end record
        file.attrs["version"] = 1
        file["record_index"].resize(len(file["record_index"]) - 1, axis=0)
    assert read_journal(journal).session_id is None
    with SimulatedMicroscope(small_config, small_specimen) as microscope:
        resumed = Session.resume(microscope, journal, INSTRUMENT_SESSION)
        resumed.run()
    ids = [s.record["request"]["request_id"] for s in read_journal(journal).steps]
    assert ids == ["overview-00000", "start-00000", "start-00001", "guided-00000"]
    assert resumed.summary()["session_id"] is None


def test_an_interrupted_rewrite_of_the_journal_is_put_back(tmp_path: Path) -> None:
    """Ctrl-C while a resume copies the journal must not lose the steps it had not copied yet."""
    journal = tmp_path / "journal.h5"
    with SessionJournal(journal, config={}, instrument={}, session_id="s") as writer:
        for index in range(3):
            writer.append({"index": index, "kind": "start"}, image=np.zeros((4, 4)))
    backup = rewrite_backup(journal)
    os.replace(journal, backup)
    with SessionJournal(journal, config={}, instrument={}, session_id="s") as partial:
        partial.append({"index": 0, "kind": "start"}, image=np.zeros((4, 4)))
    writer, contents = SessionJournal.continue_from(journal)
    writer.close()
    assert len(contents.steps) == 3 and len(read_journal(journal).steps) == 3
    assert not backup.exists() and read_journal(journal).session_id == "s"


def test_the_end_record_is_not_a_step(tmp_path: Path) -> None:
    journal = tmp_path / "journal.h5"
    with SessionJournal(journal, config={}, instrument={}) as writer:
        writer.append({"kind": "survey"})
        writer.append_end({"stop_reason": "tile budget of 1 spent"})
        assert writer.steps == 1
    contents = read_journal(journal)
    assert len(contents.steps) == 1 and contents.end["kind"] == END_KIND
    assert contents.end["stop_reason"] == "tile budget of 1 spent"


def test_a_journal_path_that_is_a_folder_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "session").mkdir()
    with pytest.raises(MicrographyError, match=r"session is a folder, not a session journal file"):
        read_journal(tmp_path / "session")


# ----------------------------------------------------------------------------- inputs checked first


@pytest.fixture
def client_and_server(served: object) -> Iterator[tuple[object, object]]:
    from agent.protocol.client import ZmqMicroscope

    with ZmqMicroscope(served.endpoint) as remote:
        yield remote, served


def test_a_bad_checkpoint_fails_before_the_first_exposure(
    tmp_path: Path, client_and_server: tuple[object, object]
) -> None:
    remote, _ = client_and_server
    missing = INSTRUMENT_SESSION.model_copy(update={"checkpoint": str(tmp_path / "missing.pt")})
    with pytest.raises(CheckpointError, match=r"missing\.pt: checkpoint not found"):
        Session(remote, missing, tmp_path / "out" / "journal.h5")
    (tmp_path / "fake.pt").write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match=r"fake\.pt: not a readable checkpoint"):
        Session(remote, missing.model_copy(update={"checkpoint": str(tmp_path / "fake.pt")}))
    assert remote.status().exposures == 0 and not (tmp_path / "out").exists()


READ_ONLY = Path("/sys/micrography-read-only")
"""A folder nobody can create (sysfs refuses new entries, even to root)."""


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--checkpoint", "{tmp}/missing.pt", "--out", "{tmp}/new"], "missing.pt"),
        (["--checkpoint", "{tmp}/fake.pt", "--out", "{tmp}/new"], "fake.pt"),
        (["--out", "{tmp}/notes.txt"], "notes.txt is a file"),
        (["--out", "{tmp}/notes.txt/session"], "notes.txt is a file"),
        (["--out", f"{READ_ONLY}/session"], "cannot write"),
        (["--resume", "{tmp}/empty-folder"], "empty-folder is a folder without journal.h5"),
        (["--resume", "{tmp}/notes.txt"], "notes.txt"),
    ],
    ids=["checkpoint-missing", "checkpoint-not-torch", "out-file", "out-under-file", "out-read-only",
         "resume-folder", "resume-not-a-journal"],
)  # fmt: skip
def test_run_checks_its_inputs_before_the_first_exposure(
    args: list[str],
    named: str,
    tmp_path: Path,
    client_and_server: tuple[object, object],
    capsys: pytest.CaptureFixture[str],
) -> None:
    remote, served = client_and_server
    workspace = tmp_path / "workspace"  # beside the server's exposure journal
    workspace.mkdir()
    (workspace / "fake.pt").write_text("not a checkpoint\n")
    (workspace / "notes.txt").write_text("notes\n")
    (workspace / "empty-folder").mkdir()
    before = sorted(workspace.rglob("*"))
    argv = [arg.replace("{tmp}", str(workspace)) for arg in args]
    assert main(["run", "--instrument", served.endpoint, *argv]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("micrography: error: ") and named in lines[0], lines
    assert remote.status().exposures == 0
    assert sorted(workspace.rglob("*")) == before, "nothing is written (no journal, no output folder)"


def test_a_journal_from_before_recalibration_resumes_with_its_checkpoint_as_trained(tmp_path: Path) -> None:
    # Journals written before `recalibrate_checkpoint` existed used their checkpoint unchanged.
    old = {key: value for key, value in SessionConfig(checkpoint="model.pt").model_dump(mode="json").items()
           if key != "recalibrate_checkpoint"}  # fmt: skip
    SessionJournal(tmp_path / "old.h5", config=old, instrument={}).close()
    assert read_journal(tmp_path / "old.h5").config["recalibrate_checkpoint"] is False
    new = SessionConfig(checkpoint="model.pt").model_dump(mode="json")
    SessionJournal(tmp_path / "new.h5", config=new, instrument={}).close()
    assert read_journal(tmp_path / "new.h5").config["recalibrate_checkpoint"] is True
