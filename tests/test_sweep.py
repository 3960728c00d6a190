"""Sweeps on Dask (analysis/sweep.py, ``micrography sweep``) and the specimen layout family.

The clusters are real: a ``LocalCluster`` of two worker processes started by the command
line, and a ``dask scheduler`` with two ``dask worker`` processes on 127.0.0.1 standing in
for a batch cluster. Results are compared with the serial command's, number for number.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import pytest

from agent.cli import main
from agent.driver import ScanRequest
from agent.errors import ConfigError
from agent.session import BudgetConfig, ScanSettings, Session, SessionConfig
from analysis.analyze import AnalyzeConfig, run_analysis
from analysis.bench_anomaly import anomaly_report, anomaly_tasks
from analysis.bench_guidance import benchmark_guidance, guidance_tasks
from analysis.bench_sweep import comparable, task_overheads
from analysis.replay import run_replay
from analysis.sweep import (
    ResultStore,
    SweepError,
    SweepRun,
    SweepTask,
    analyze_tasks,
    check_scheduler,
    dask_client,
    replay_tasks,
    run_sweep,
)
from simulator.config import SimulatorConfig
from simulator.drivers import SimulatedMicroscope
from simulator.layouts import (
    FAMILY_HELD_OUT_SEEDS,
    FAMILY_TUNING_SEEDS,
    LayoutFamily,
    family_specimen,
    layout_specimen,
)
from simulator.specimen import Specimen

SMALL = {"seeds": [3, 4], "policies": ["guided", "random"], "control_seed": None, "budgets": [0.02]}
SMALL_ARGS = [
    "--seeds",
    "3",
    "4",
    "--policies",
    "guided",
    "random",
    "--control-seed",
    "-1",
    "--budgets",
    "0.02",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def serial_guidance() -> dict:
    """``micrography bench guidance``'s report of four short sessions, run serially here."""
    return benchmark_guidance(**SMALL)


# ----------------------------------------------------------------------------- layout family


def test_layout_family_is_deterministic_within_its_ranges_and_split_into_disjoint_seeds() -> None:
    ranges = LayoutFamily()
    layouts = [family_specimen(seed) for seed in FAMILY_HELD_OUT_SEEDS]
    assert layouts == [family_specimen(seed) for seed in FAMILY_HELD_OUT_SEEDS]
    assert not set(FAMILY_TUNING_SEEDS) & set(FAMILY_HELD_OUT_SEEDS)
    assert len(FAMILY_HELD_OUT_SEEDS) >= 30
    for layout in layouts:
        assert ranges.domain_walls[0] <= layout.domain_walls <= ranges.domain_walls[1]
        assert ranges.dislocations[0] <= layout.dislocations <= ranges.dislocations[1]
        assert ranges.wall_meander_nm[0] <= layout.wall_meander_nm <= ranges.wall_meander_nm[1]
        assert 0.0 <= layout.cluster_near_feature_probability <= 1.0
        assert layout.phase_patches in (0, 1) and layout.amorphous_patches in (0, 1)
    # The family spans its ranges rather than repeating one film.
    assert len({layout.domain_walls for layout in layouts}) >= 6
    assert {layout.phase_patches for layout in layouts} == {0, 1}
    assert layout_specimen("family", 2000) == layouts[0]
    assert layout_specimen("control", 0).domain_walls == 0


@pytest.mark.parametrize(
    ("ranges", "message"),
    [
        ({"domain_walls": (5, 2)}, "low <= high"),
        ({"dislocations": (-1, 3)}, "negative"),
        ({"cluster_near_feature_probability": (0.2, 1.5)}, "within"),
    ],
)
def test_layout_family_ranges_are_validated(ranges: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LayoutFamily(**ranges)


def test_unknown_layout_and_negative_family_seed_are_refused() -> None:
    with pytest.raises(ConfigError, match="unknown specimen layout 'spiral'"):
        layout_specimen("spiral", 0)
    with pytest.raises(ConfigError, match="non-negative"):
        family_specimen(-1)


# ----------------------------------------------------------------------------- keys and the store


def test_a_task_key_follows_its_inputs_and_nothing_else(tmp_path: Path) -> None:
    image = tmp_path / "image.npy"
    np.save(image, np.zeros((4, 4)))
    first = SweepTask("analyze", "image", {"image": str(image), "seed": 0}, (str(image),))
    assert (
        first.key == SweepTask("analyze", "other label", {"image": str(image), "seed": 0}, (str(image),)).key
    )
    assert first.key != SweepTask("analyze", "image", {"image": str(image), "seed": 1}, (str(image),)).key
    np.save(image, np.ones((5, 5)))  # the same path with new content is a new task
    assert first.key != SweepTask("analyze", "image", {"image": str(image), "seed": 0}, (str(image),)).key


def test_the_result_store_reads_back_what_it_wrote_and_ignores_a_torn_file(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    outcome = {"key": "0123456789abcdef", "result": {"value": [1.5, None]}, "error": None}
    store.save(outcome)
    assert store.load(outcome["key"]) == outcome
    assert list(store.folder.iterdir()) == [store.path(outcome["key"])]  # no partial file left
    store.path("fedcba9876543210").write_text('{"key": "fedcba98', encoding="utf-8")
    assert store.load("fedcba9876543210") is None  # a torn file counts as not done: rerun it


# ----------------------------------------------------------------------------- guidance on clusters


def _sweep_json(out: Path) -> dict:
    return json.loads((out / "sweep.json").read_text(encoding="utf-8"))


def test_a_local_cluster_sweep_equals_the_serial_command_and_a_rerun_runs_nothing(
    serial_guidance: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sweep"
    args = ["sweep", "guidance", *SMALL_ARGS, "--workers", "2", "--quiet", "--out", str(out)]
    assert main(args) == 0
    report = json.loads((out / "guidance.json").read_text(encoding="utf-8"))
    assert comparable(report) == json.loads(json.dumps(comparable(serial_guidance)))
    summary = _sweep_json(out)
    assert (summary["tasks"], summary["ran"], summary["cached"], summary["workers"]) == (4, 4, 0, 2)
    assert len({task["worker"] for task in summary["per_task"]}) == 2  # both workers took tasks
    assert summary["scheduler"].startswith("tcp://127.0.0.1:")
    assert len(list((out / "tasks").glob("*.json"))) == 4
    capsys.readouterr()

    assert main(args) == 0
    assert "4 done before, 0 run now" in capsys.readouterr().out
    again = json.loads((out / "guidance.json").read_text(encoding="utf-8"))
    assert comparable(again) == comparable(report)


@contextmanager
def _external_cluster(tmp_path: Path, processes: list[subprocess.Popen]) -> Iterator[tuple[str, list]]:
    """``dask scheduler`` and two ``dask worker`` processes on 127.0.0.1; yields the address and workers.

    Every process started here or appended to ``processes`` by the test is killed on the way out,
    whatever failed.
    """
    scheduler_file = tmp_path / "scheduler.json"
    log = (tmp_path / "cluster.log").open("w")
    loopback = ["--host", "127.0.0.1", "--dashboard-address", "127.0.0.1:0"]
    try:
        processes.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "dask",
                    "scheduler",
                    *loopback,
                    "--port",
                    "0",
                    "--scheduler-file",
                    str(scheduler_file),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=ENV,
            )
        )
        deadline = time.monotonic() + 60
        address = None
        while address is None and time.monotonic() < deadline:
            try:  # the scheduler creates the file, then writes it: read it once it parses
                address = json.loads(scheduler_file.read_text(encoding="utf-8"))["address"]
            except (OSError, ValueError, KeyError):
                time.sleep(0.1)
        assert address is not None, "dask scheduler wrote no scheduler file within 60 s"
        command = [
            sys.executable,
            "-m",
            "dask",
            "worker",
            address,
            "--nthreads",
            "1",
            "--no-nanny",
            *loopback,
        ]
        workers = [
            subprocess.Popen(
                [*command, "--name", f"worker-{index}"], stdout=log, stderr=subprocess.STDOUT, env=ENV
            )
            for index in range(2)
        ]
        processes.extend(workers)
        from distributed import Client

        with Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=90)
            pids = client.run(os.getpid)
        # The test kills a worker by pid, so it must know which process is which.
        assert sorted(pids.values()) == sorted(worker.pid for worker in workers)
        yield address, workers
    finally:
        for process in processes:
            process.kill()
            process.wait(timeout=30)
        log.close()


def _sweep_process(address: str, out: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "agent.cli", "sweep", "guidance", *SMALL_ARGS,
               "--scheduler", address, "--quiet", "--out", str(out)]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def _wait_for_results(out: Path, count: int, process: subprocess.Popen, timeout: float = 120) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = sorted((out / "tasks").glob("*.json")) if (out / "tasks").exists() else []
        if len(done) >= count:
            return done
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} results after {timeout} s")


def test_an_external_cluster_survives_a_killed_worker_and_a_killed_client_loses_nothing(
    serial_guidance: dict, tmp_path: Path
) -> None:
    processes: list[subprocess.Popen] = []
    with _external_cluster(tmp_path, processes) as (address, workers):
        # A worker dies mid-sweep: the scheduler gives its task to the other; nothing finished is lost.
        out = tmp_path / "worker-killed"
        sweep = _sweep_process(address, out)
        processes.append(sweep)
        first = _wait_for_results(out, 1, sweep)[0]
        kept = (first.read_bytes(), first.stat().st_mtime_ns)
        workers[0].send_signal(signal.SIGKILL)
        stdout, stderr = sweep.communicate(timeout=240)
        assert sweep.returncode == 0, stderr
        assert "4 tasks, 0 done before, 4 run now" in stdout
        assert (first.read_bytes(), first.stat().st_mtime_ns) == kept
        report = json.loads((out / "guidance.json").read_text(encoding="utf-8"))
        assert comparable(report) == json.loads(json.dumps(comparable(serial_guidance)))

        # The client dies mid-sweep: a rerun runs exactly the tasks without a stored result.
        out = tmp_path / "client-killed"
        sweep = _sweep_process(address, out)
        processes.append(sweep)
        _wait_for_results(out, 1, sweep)
        sweep.send_signal(signal.SIGKILL)
        sweep.wait(timeout=30)
        done = len(list((out / "tasks").glob("*.json")))
        assert 1 <= done < 4
        rerun = _sweep_process(address, out)
        processes.append(rerun)
        stdout, stderr = rerun.communicate(timeout=240)
        assert rerun.returncode == 0, stderr
        assert f"4 tasks, {done} done before, {4 - done} run now" in stdout
        report = json.loads((out / "guidance.json").read_text(encoding="utf-8"))
        assert comparable(report) == json.loads(json.dumps(comparable(serial_guidance)))


def test_an_unreachable_scheduler_is_one_clear_error() -> None:
    with pytest.raises(SweepError, match=r"cannot reach the Dask scheduler at tcp://127\.0\.0\.1:9"):  # noqa: SIM117
        with dask_client("tcp://127.0.0.1:9", connect_timeout_s=1.0):
            pass
    with pytest.raises(SweepError, match="expected an address"):
        check_scheduler("127.0.0.1:8786", None)


# ----------------------------------------------------------------------------- replay and analyze


@pytest.fixture(scope="module")
def journal(
    tmp_path_factory: pytest.TempPathFactory, small_config: SimulatorConfig, small_specimen: Specimen
) -> Path:
    config = SessionConfig(
        policy="guided", seed=small_config.seed, budget=BudgetConfig(max_tiles=6),
        tiles=ScanSettings(pixel_size_nm=0.02, dwell_us=8.0, shape=(256, 256)), start_tiles=3,
        warmup_steps=20, simulator=small_config.model_dump(mode="json"),
    )  # fmt: skip
    path = tmp_path_factory.mktemp("session") / "guided" / "journal.h5"
    with SimulatedMicroscope(small_config, small_specimen) as microscope:
        Session(microscope, config, path).run()
    return path


def test_a_failing_replay_is_reported_and_the_others_finish_and_stay_done(
    journal: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    not_a_journal = tmp_path / "empty" / "journal.h5"
    not_a_journal.parent.mkdir()
    with h5py.File(not_a_journal, "w") as handle:
        handle.attrs["note"] = "an HDF5 file, but no session's journal"
    out = tmp_path / "sweep"
    args = ["sweep", "replay", str(journal), str(not_a_journal), "--serial", "--quiet", "--out", str(out)]
    assert main(args) == 1
    captured = capsys.readouterr()
    assert "failed: empty: JournalError" in captured.err
    assert captured.err.strip().splitlines()[-1].startswith("micrography: error: 1 of 2 tasks failed")
    rows = (out / "replays.csv").read_text(encoding="utf-8").splitlines()
    assert rows[1].startswith("guided,") and rows[2].startswith("empty,")
    summary = _sweep_json(out)
    assert (summary["ran"], [failure["label"] for failure in summary["failed"]]) == (1, ["empty"])

    # What the sweep wrote for the good journal is what `micrography replay` writes.
    swept = json.loads((out / "replay" / "guided" / "replay.json").read_text(encoding="utf-8"))
    direct = run_replay(journal, tmp_path / "direct", progress=False)
    assert swept["reproduction"] == direct["reproduction"]
    assert swept["final_region_scores"] == direct["final_region_scores"]
    assert swept["reproduction"]["scores_reproduced"] and swept["reproduction"]["nodes_reproduced"]

    assert main(args) == 1  # the rerun keeps the finished replay and retries only the failed one
    assert "2 tasks, 1 done before, 0 run now" in capsys.readouterr().out


def test_an_analyze_sweep_writes_each_image_as_analyze_does(
    tmp_path: Path, small_config: SimulatorConfig, small_specimen: Specimen
) -> None:
    with SimulatedMicroscope(small_config.ideal_instrument(), small_specimen) as microscope:
        tile = microscope.acquire(
            ScanRequest(x_nm=15, y_nm=15, shape=(512, 512), pixel_size_nm=0.02, dwell_us=8)
        )
    good = tmp_path / "tile.npy"
    np.save(good, tile.image)
    broken = tmp_path / "line.npy"
    np.save(broken, np.zeros(64))
    options = {"pixel_size_nm": 0.02, "gae_steps": 20, "vae_steps": 40, "cluster_sample": 2000}
    tasks = analyze_tasks([good, broken], tmp_path / "sweep", options)
    summary = run_sweep("analyze", tasks, tmp_path / "sweep", serial=True, progress=False)
    assert [failure["label"] for failure in summary["failed"]] == ["line"]
    row = summary["report"]["rows"][0]
    direct = run_analysis(good, tmp_path / "direct", AnalyzeConfig(**options)).summary
    assert row["columns"] == direct["columns"]["total"] > 500
    assert row["anomalous_columns"] == direct["anomaly"]["anomalous_columns"]
    written = json.loads(
        (tmp_path / "sweep" / "analyze" / "tile" / "analysis.json").read_text(encoding="utf-8")
    )
    assert written["columns"] == direct["columns"]


def test_replay_tasks_refuse_a_missing_or_non_hdf5_journal_before_running(tmp_path: Path) -> None:
    text = tmp_path / "journal.h5"
    text.write_text("not hdf5\n", encoding="utf-8")
    with pytest.raises(SweepError, match="not an HDF5 file"):
        replay_tasks([text], tmp_path / "out")
    with pytest.raises(SweepError, match="no such file"):
        replay_tasks([tmp_path / "missing.h5"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- task lists and reports


def test_guidance_tasks_cover_specimens_by_policies_and_refuse_bad_input() -> None:
    tasks = guidance_tasks(seeds=[0, 1], policies=["guided", "random"], control_seed=100,
                           budgets=[0.25, 0.1], family_seeds=[2000])  # fmt: skip
    assert [(t["layout"], t["seed"], t["policy"]) for t in tasks] == [
        ("default", 0, "guided"), ("default", 0, "random"), ("default", 1, "guided"),
        ("default", 1, "random"), ("family", 2000, "guided"), ("family", 2000, "random"),
        ("control", 100, "guided"), ("control", 100, "random"),
    ]  # fmt: skip
    assert all(t["budgets"] == [0.1, 0.25] for t in tasks)
    with pytest.raises(ConfigError, match="unknown policy 'clever'"):
        guidance_tasks(policies=["clever"])
    with pytest.raises(ConfigError, match="budget fraction lies in"):
        guidance_tasks(budgets=[1.5])


def test_anomaly_tasks_differ_only_in_the_training_seed_and_the_report_gives_mean_and_spread() -> None:
    tasks = anomaly_tasks(training_seeds=[0, 1, 2], evaluation_seeds=[0], training_specimens=[1001])
    assert [task["config"]["seed"] for task in tasks] == [0, 1, 2]
    assert len({json.dumps({**task["config"], "seed": None}, sort_keys=True) for task in tasks}) == 1
    with pytest.raises(ConfigError, match="both trained on and evaluated"):
        anomaly_tasks(evaluation_seeds=[1001], training_specimens=[1001])

    def result(seed: int, auroc: float) -> dict:
        rows = [{"scorer": s, "defect_class": c, "auroc": auroc, "average_precision": auroc / 2,
                 "precision_top_0.1%": auroc / 4, "precision_top_1%": auroc / 8,
                 "positives": 10, "training_seed": seed}
                for s in ("gae", "seed_gae", "nn_distance", "intensity", "polarization")
                for c in ("all", "vacancy", "substitution", "dislocation_core", "domain_wall", "strained",
                          "amorphous_phase")]  # fmt: skip
        timing = {
            "score_100k_nodes_s": 0.1 * (seed + 1),
            "online_update_s": 0.05,
            "score_nodes": 100,
            "online_steps": 3,
        }
        return {"training_seed": seed, "rows": rows, "timing": timing, "nodes_scored": 1000}

    report = anomaly_report([result(0, 0.90), result(1, 0.94), result(2, 0.98)], tasks)
    entry = next(e for e in report["summary"] if (e["scorer"], e["defect_class"]) == ("gae", "all"))
    assert entry["auroc_mean"] == pytest.approx(0.94)
    assert entry["auroc_std"] == pytest.approx(0.04)
    assert entry["precision_top_0.1%_mean"] == pytest.approx(0.94 / 4)
    assert entry["precision_top_1%_std"] == pytest.approx(0.04 / 8)
    assert report["training_seeds"] == [0, 1, 2] and len(report["rows"]) == 3 * 35
    assert report["timing"]["score_100k_nodes_s"] == pytest.approx(0.2)  # the median over seeds


def test_task_overheads_exclude_work_and_queueing() -> None:
    tasks = [SweepTask("guidance", "a", {"a": 1}), SweepTask("guidance", "b", {"b": 1})]
    run = SweepRun(
        outcomes=[
            {"worker": "w", "started_at": 100.05, "seconds": 2.0},  # 0.05 s to start, 0.05 s to arrive
            {"worker": "w", "started_at": 102.10, "seconds": 2.0},  # queued until 102.05, arrives 0.2 s late
        ],
        cached=0, ran=2, failures=[], wall_s=4.3, workers=1, scheduler="tcp://127.0.0.1:1",
        timeline={tasks[0].key: (100.0, 102.1), tasks[1].key: (100.0, 104.3)},
    )  # fmt: skip
    assert task_overheads(tasks, run) == pytest.approx([0.10, 0.25])
