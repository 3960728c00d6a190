from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from agent.domains import WallSegment
from agent.errors import MicrographyError
from agent.journal import read_journal
from agent.session import BudgetConfig, ScanSettings, Session, SessionConfig
from analysis.guidance import DiscoveryTracker
from simulator.config import SimulatorConfig
from simulator.drivers import SimulatedMicroscope
from simulator.specimen import LABEL_CODE, Specimen, generate_specimen
from tests.conftest import SMALL_SPECIMEN

SMALL_SESSION = SessionConfig(
    budget=BudgetConfig(max_tiles=10),
    survey=ScanSettings(pixel_size_nm=0.25, dwell_us=4.0, shape=(4096, 4096)),
    tiles=ScanSettings(pixel_size_nm=0.02, dwell_us=8.0, shape=(256, 256)),
    start_tiles=3,
    warmup_steps=20,
)


def run_session(
    config: SimulatorConfig, specimen: Specimen, session: SessionConfig, journal: Path | None
) -> Session:
    with SimulatedMicroscope(config, specimen) as microscope:
        guided = Session(microscope, session, journal)
        guided.run()
    return guided


def test_a_short_session_respects_budget_limits_and_journals_every_step(
    tmp_path: Path, small_config: SimulatorConfig, small_specimen: Specimen
) -> None:
    limited = small_config.model_copy(
        update={"instrument": small_config.instrument.model_copy(update={"max_dose_e_per_a2": 30_000.0})}
    )
    session = run_session(limited, small_specimen, SMALL_SESSION, tmp_path / "journal.h5")
    summary = session.summary()
    assert summary["tiles"] == 10 and summary["survey_tiles"] == 1
    assert summary["stop_reason"] == "tile budget of 10 spent"
    requests = [step.request for step in session.steps]
    # Every scan inside the stage, never the same tile twice.
    description = session.description
    for request in requests:
        description.check(request)
    guided = [r for r in requests if not r.request_id.startswith("overview")]
    assert len({(r.x_nm, r.y_nm) for r in guided}) == len(guided)
    # The instrument's own dose map never went past the limit (it would have refused the scan).
    assert session.driver.dose_map.map_e_per_a2.max() <= 30_000.0 * (1 + 1e-9)
    contents = read_journal(tmp_path / "journal.h5")
    assert len(contents.steps) == 11 and not contents.problems
    assert contents.steps[0].record["kind"] == "survey"
    last = contents.steps[-1]
    assert last.image.shape == (256, 256) and last.columns is not None
    assert set(last.record["timings"]) >= {"columns", "graph", "anomaly", "surrogate", "decision"}
    assert contents.config["policy"] == "guided"


def test_budget_in_dose_and_time(small_config: SimulatorConfig, small_specimen: Specimen) -> None:
    by_dose = SMALL_SESSION.model_copy(
        update={"budget": BudgetConfig(max_tiles=None, max_mean_dose_e_per_a2=3000.0)}
    )
    session = run_session(small_config, small_specimen, by_dose, None)
    assert "dose budget" in session.stop_reason
    assert session.summary()["mean_dose_e_per_a2"] >= 3000.0
    by_time = SMALL_SESSION.model_copy(update={"budget": BudgetConfig(max_tiles=None, max_time_s=3.0)})
    session = run_session(small_config, small_specimen, by_time, None)
    assert "instrument-time budget" in session.stop_reason


@pytest.mark.parametrize("policy", ["raster", "random", "survey", "image_gp"])
def test_baseline_policies_run_a_session(
    policy: str, small_config: SimulatorConfig, small_specimen: Specimen
) -> None:
    config = SMALL_SESSION.model_copy(update={"policy": policy, "budget": BudgetConfig(max_tiles=5)})
    session = run_session(small_config, small_specimen, config, None)
    assert session.summary()["tiles"] == 5


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_a_small_guided_session_images_more_planted_features_than_raster(seed: int) -> None:
    """10 tiles of 36 on a 30 nm specimen whose features are known: guided beats raster clearly."""
    config = SimulatorConfig(seed=seed, specimen=SMALL_SPECIMEN)
    specimen = generate_specimen(config.specimen, seed)
    imaged = {}
    for policy in ("guided", "raster"):
        with SimulatedMicroscope(config, specimen) as microscope:
            session = Session(microscope, SMALL_SESSION.model_copy(update={"policy": policy, "seed": seed}))
            tracker = DiscoveryTracker(specimen, session.grid)
            session.on_step = tracker
            session.run()
        assert session.summary()["tiles"] == 10
        imaged[policy] = len(tracker.imaged)
    assert imaged["guided"] >= imaged["raster"] + 3, imaged


def test_a_guided_session_journals_the_walls_it_follows(
    tmp_path: Path, small_config: SimulatorConfig
) -> None:
    # Seed 5: on the realistic instrument its first tile lands across a wall.
    small_config = small_config.model_copy(update={"seed": 5})
    small_specimen = generate_specimen(small_config.specimen, small_config.seed)
    session = run_session(small_config, small_specimen, SMALL_SESSION, tmp_path / "journal.h5")
    records = [step.record for step in read_journal(tmp_path / "journal.h5").steps[1:]]
    walls = [WallSegment.from_record(record["wall"]) for record in records if record["wall"] is not None]
    assert walls and walls == session.policy.walls
    assert all("walls" in record["timings"] for record in records)
    # Every wall found lies on a planted one: its centre within 1 nm of a wall column, once moved
    # from the session's frame to the specimen's through its tile's true placement.
    on_wall = small_specimen.label == LABEL_CODE["domain_wall"]
    planted = np.stack([small_specimen.x_nm[on_wall], small_specimen.y_nm[on_wall]], 1)
    for record in records:
        if record["wall"] is None:
            continue
        tile_id = record["request"]["request_id"]
        truth = np.asarray(session.driver.exposure_truth(tile_id).offset_nm)
        point = np.asarray(record["wall"]["point_nm"]) + truth - session.registrar.current_offset_nm(tile_id)
        assert np.hypot(*(planted - point).T).min() < 1.0
    # The image-only anchor never looks for walls.
    anchor = run_session(
        small_config, small_specimen, SMALL_SESSION.model_copy(update={"policy": "image_gp"}), None
    )
    assert not anchor.policy.walls and all(step.extra.get("wall") is None for step in anchor.steps[1:])


def test_unknown_policy_is_a_clear_error(small_config: SimulatorConfig, small_specimen: Specimen) -> None:
    with (
        SimulatedMicroscope(small_config, small_specimen) as microscope,
        pytest.raises(MicrographyError, match="unknown policy 'greedy'"),
    ):
        Session(microscope, SMALL_SESSION.model_copy(update={"policy": "greedy"}))


def test_killed_session_resumes_to_the_same_final_state(
    tmp_path: Path, small_config: SimulatorConfig
) -> None:
    """Kill a real session process mid-way with SIGKILL, resume it, compare with an uninterrupted run."""
    session_yaml = tmp_path / "session.yaml"
    values = SMALL_SESSION.model_dump(mode="json")
    values["simulator"] = {"specimen": small_config.specimen.model_dump(mode="json")}
    session_yaml.write_text(yaml.safe_dump(values))
    # Seed 5: on the realistic instrument its first tile crosses a wall, before any kill.
    command = [sys.executable, "-m", "agent.cli", "run", "--config", str(session_yaml), "--seed", "5"]

    complete = tmp_path / "complete"
    subprocess.run([*command, "--out", str(complete)], check=True, capture_output=True, timeout=300)

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(
        [*command, "--out", str(interrupted)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    journal = interrupted / "journal.h5"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            if journal.exists():
                try:
                    if len(read_journal(journal).steps) >= 7:
                        break
                except MicrographyError:
                    pass  # caught while being created
            time.sleep(0.05)
        process.kill()
    finally:
        process.wait(timeout=30)
    steps_before = len(read_journal(journal).steps)
    assert 7 <= steps_before < 14, "the session was not interrupted mid-way"

    subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", "--resume", str(journal)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    resumed_steps = read_journal(journal).steps
    complete_steps = read_journal(complete / "journal.h5").steps
    assert [s.record["request"] for s in resumed_steps] == [s.record["request"] for s in complete_steps]
    assert [s.record["decision"] for s in resumed_steps] == [s.record["decision"] for s in complete_steps]
    np.testing.assert_array_equal(resumed_steps[-1].image, complete_steps[-1].image)
    # The walls found before the kill were rebuilt from the journal, and the same ones found after.
    walls = [s.record.get("wall") for s in resumed_steps]
    assert walls == [s.record.get("wall") for s in complete_steps]
    assert any(wall is not None for wall in walls[1:steps_before])
    scores = [s.record["score"] for s in resumed_steps]
    expected = [s.record["score"] for s in complete_steps]
    np.testing.assert_allclose(np.array(scores, dtype=float), np.array(expected, dtype=float), rtol=1e-6)
    summary = json.loads((interrupted / "summary.json").read_text())
    reference = json.loads((complete / "summary.json").read_text())
    keys = ("tiles", "nodes", "mean_dose_e_per_a2", "imaged_features", "detected_features", "wall_segments")
    for key in keys:
        assert summary[key] == pytest.approx(reference[key]), key


def test_resume_refuses_a_different_configuration(
    tmp_path: Path, small_config: SimulatorConfig, small_specimen: Specimen
) -> None:
    run_session(
        small_config,
        small_specimen,
        SMALL_SESSION.model_copy(update={"budget": BudgetConfig(max_tiles=4)}),
        tmp_path / "journal.h5",
    )
    with SimulatedMicroscope(small_config, small_specimen) as microscope:
        with pytest.raises(MicrographyError, match="differs from the recorded one"):
            Session.resume(microscope, tmp_path / "journal.h5", SMALL_SESSION.model_copy(update={"seed": 9}))
        # A longer budget is fine: the session goes on where it stopped.
        resumed = Session.resume(
            microscope,
            tmp_path / "journal.h5",
            SMALL_SESSION.model_copy(update={"budget": BudgetConfig(max_tiles=6)}),
        )
        before = microscope.exposures
        resumed.run()
    assert resumed.summary()["tiles"] == 6
    assert microscope.exposures == before + 2  # only the two new tiles were exposed


def test_a_guided_session_over_zeromq_equals_the_in_process_one(
    small_config: SimulatorConfig, small_specimen: Specimen
) -> None:
    from agent.protocol.client import ZmqMicroscope
    from simulator.server import InstrumentServer

    config = SMALL_SESSION.model_copy(update={"budget": BudgetConfig(max_tiles=6)})
    local = run_session(small_config, small_specimen, config, None)
    with SimulatedMicroscope(small_config, small_specimen) as served:
        server = InstrumentServer(
            served, "tcp://127.0.0.1:*", events_bind="tcp://127.0.0.1:*", heartbeat_s=0.2
        )
        server.start()
        try:
            with ZmqMicroscope(server.endpoint) as remote:
                wired = Session(remote, config)
                wired.run()
        finally:
            server.stop(grace_s=2.0)
    assert [s.request for s in wired.steps] == [s.request for s in local.steps]
    assert [s.score for s in wired.steps[1:]] == pytest.approx(
        [s.score for s in local.steps[1:]], nan_ok=True
    )
    assert len(wired.graph) == len(local.graph)
