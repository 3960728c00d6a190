"""The bad-input sweep: user mistakes end in one line, exit status 1, and nothing exposed or lost.

Each case runs the real command line (:func:`agent.cli.main`) in a workspace holding a small
simulator configuration, a recorded image, an existing file and folder, and a text file. For
every mistake the test asserts exit status 1, exactly one line on stderr that starts with
``micrography: error:`` and names the problem, no traceback, and that no file of the
workspace was created, changed or removed (so nothing was exposed, written or lost).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from agent.cli import main
from tests.conftest import SMALL_SPECIMEN

READ_ONLY = Path("/sys/micrography-read-only")
"""A folder that cannot be created, whoever runs the tests (sysfs refuses new entries, even to root)."""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Inputs every mistake starts from; nothing in here may change."""
    root = tmp_path_factory.mktemp("mistakes")
    (root / "small.yaml").write_text(
        yaml.safe_dump({"seed": 4, "specimen": SMALL_SPECIMEN.model_dump(mode="json")}), encoding="utf-8"
    )
    (root / "unknown-key.yaml").write_text("seed: 4\nspecimn: {}\n", encoding="utf-8")
    (root / "broken.yaml").write_text("seed: [4\n", encoding="utf-8")
    image = np.random.default_rng(0).random((96, 96)).astype(np.float32)
    np.save(root / "image.npy", image)
    np.save(root / "existing.npy", image[:8, :8])
    (root / "notes.txt").write_text("not an image\n", encoding="utf-8")
    (root / "fake.npy").write_text("not numpy\n", encoding="utf-8")
    (root / "fake.h5").write_text("not hdf5\n", encoding="utf-8")
    (root / "fake.pt").write_text("not a checkpoint\n", encoding="utf-8")
    (root / "existing.pt").write_bytes(b"a checkpoint someone trained\n")
    (root / "folder").mkdir()
    (root / "folder" / "keep.txt").write_text("keep\n", encoding="utf-8")
    (root / "session").mkdir()  # a session folder without its journal
    return root


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and modification time."""
    state = {}
    for path in sorted(root.rglob("*")):
        info = path.stat()
        state[str(path.relative_to(root))] = (info.st_size, info.st_mtime_ns)
    return state


SIM = ["--config", "{ws}/small.yaml"]
ACQUIRE = ["acquire", *SIM, "--x", "15", "--y", "15", "--rows", "32", "--cols", "32"]
REPLAY = ["--replay", "{ws}/image.npy", "--replay-pixel-size", "0.05"]
REPLAY_DOSE = [*REPLAY, "--replay-dwell", "2", "--replay-counts-per-unit", "100"]
NEW = "{ws}/new"  # never created by a refused command
SWEEP_G = ["sweep", "guidance", "--seeds", "3", "--policies", "random", "--control-seed", "-1"]

MISTAKES: list[tuple[str, list[str], str]] = [
    # acquire: scan values
    ("acquire-dwell-zero", [*ACQUIRE, "--dwell", "0", "--out", f"{NEW}/t.npy"], "dwell"),
    ("acquire-dwell-negative", [*ACQUIRE, "--dwell", "-1", "--out", f"{NEW}/t.npy"], "dwell"),
    ("acquire-dwell-nan", [*ACQUIRE, "--dwell", "nan", "--out", f"{NEW}/t.npy"], "dwell"),
    ("acquire-rows-zero", [*ACQUIRE, "--rows", "0", "--out", f"{NEW}/t.npy"], "shape"),
    ("acquire-cols-negative", [*ACQUIRE, "--cols", "-5", "--out", f"{NEW}/t.npy"], "shape"),
    ("acquire-pixel-zero", [*ACQUIRE, "--pixel-size", "0", "--out", f"{NEW}/t.npy"], "pixel_size"),
    ("acquire-x-nan", [*ACQUIRE, "--x", "nan", "--out", f"{NEW}/t.npy"], "x_nm"),
    ("acquire-y-inf", [*ACQUIRE, "--y", "inf", "--out", f"{NEW}/t.npy"], "y_nm"),
    ("acquire-outside-stage", [*ACQUIRE, "--x", "1e6", "--out", f"{NEW}/t.npy"], "stage"),
    ("acquire-detector", [*ACQUIRE, "--detector", "BF", "--out", f"{NEW}/t.npy"], "detector"),
    ("acquire-too-many-rows", [*ACQUIRE, "--rows", "100000", "--out", f"{NEW}/t.npy"], "shape"),
    # acquire: where the tile goes
    ("acquire-out-suffix", [*ACQUIRE, "--out", f"{NEW}/t.txt"], ".npy"),
    ("acquire-out-folder", [*ACQUIRE, "--out", "{ws}/folder"], "folder"),
    ("acquire-out-under-file", [*ACQUIRE, "--out", "{ws}/notes.txt/t.npy"], "notes.txt"),
    ("acquire-out-exists", [*ACQUIRE, "--out", "{ws}/existing.npy"], "exists"),
    ("acquire-out-read-only", [*ACQUIRE, "--out", f"{READ_ONLY}/t.npy"], "cannot write"),
    # instruments
    ("config-missing", ["describe", "--config", "{ws}/missing.yaml"], "missing.yaml"),
    ("config-folder", ["describe", "--config", "{ws}/folder"], "folder"),
    ("config-unknown-key", ["describe", "--config", "{ws}/unknown-key.yaml"], "specimn"),
    ("config-broken-yaml", ["describe", "--config", "{ws}/broken.yaml"], "broken.yaml"),
    ("replay-missing", ["describe", "--replay", "{ws}/missing.npy"], "missing.npy"),
    ("replay-not-numpy",
     ["describe", "--replay", "{ws}/fake.npy", "--replay-pixel-size", "0.05"], "fake.npy"),
    ("replay-no-pixel-size", ["describe", "--replay", "{ws}/image.npy"], "pixel size"),
    ("replay-no-dose", ["describe", *REPLAY], "does not state its dose"),
    ("replay-dwell-negative",
     ["describe", *REPLAY, "--replay-dwell", "-2", "--replay-counts-per-unit", "1"], "dwell"),
    ("replay-dwell-too-long",
     [*ACQUIRE[:1], *REPLAY_DOSE, "--x", "2", "--y", "2", "--rows", "8", "--cols", "8",
                               "--pixel-size", "0.05", "--dwell", "4", "--out", f"{NEW}/t.npy"], "dwell 4"),
    # analyze
    ("analyze-missing", ["analyze", "{ws}/missing.npy", "--pixel-size", "0.02", "--out", NEW], "missing.npy"),
    ("analyze-not-an-image",
     ["analyze", "{ws}/notes.txt", "--pixel-size", "0.02", "--out", NEW], "notes.txt"),
    ("analyze-pixel-zero", ["analyze", "{ws}/image.npy", "--pixel-size", "0", "--out", NEW], "pixel"),
    ("analyze-pixel-huge", ["analyze", "{ws}/image.npy", "--pixel-size", "1000", "--out", NEW], "pixel"),
    ("analyze-pixel-word", ["analyze", "{ws}/image.npy", "--pixel-size", "big", "--out", NEW], "pixel"),
    ("analyze-material", ["analyze", "{ws}/image.npy", "--pixel-size", "0.02", "--material", "Unobtainium",
                          "--out", NEW], "Unobtainium"),
    ("analyze-model-missing",
     ["analyze", "{ws}/image.npy", "--pixel-size", "0.02", "--model", "{ws}/missing.pt",
                               "--out", NEW], "missing.pt"),
    ("analyze-gae-steps", ["analyze", "{ws}/image.npy", "--pixel-size", "0.02", "--gae-steps", "-1",
                           "--out", NEW], "gae_steps"),
    ("analyze-out-file", ["analyze", "{ws}/image.npy", "--pixel-size", "0.02", "--out", "{ws}/notes.txt"],
     "notes.txt"),
    ("analyze-out-read-only", ["analyze", "{ws}/image.npy", "--pixel-size", "0.02", "--out", str(READ_ONLY)],
     "cannot write"),
    # run
    ("run-checkpoint-missing", ["run", "--checkpoint", "{ws}/missing.pt", "--out", NEW], "missing.pt"),
    ("run-checkpoint-not-torch", ["run", "--checkpoint", "{ws}/fake.pt", "--out", NEW], "fake.pt"),
    ("run-policy", ["run", "--policy", "clever", "--out", NEW], "clever"),
    ("run-budget-zero", ["run", "--budget", "0", "--out", NEW], "budget"),
    ("run-out-file", ["run", "--out", "{ws}/notes.txt"], "notes.txt"),
    ("run-out-read-only", ["run", "--out", str(READ_ONLY)], "cannot write"),
    ("run-resume-folder", ["run", "--resume", "{ws}/session"], "journal"),
    ("run-resume-missing", ["run", "--resume", "{ws}/missing.h5"], "missing.h5"),
    ("run-resume-not-hdf5", ["run", "--resume", "{ws}/fake.h5"], "fake.h5"),
    ("run-instrument-endpoint", ["run", "--instrument", "localhost:5555", "--out", NEW], "localhost:5555"),
    ("run-lookahead-negative", ["run", "--lookahead", "-1", "--out", NEW], "lookahead_tiles"),
    ("run-real-time-remote", ["run", "--instrument", "tcp://127.0.0.1:5999", "--real-time", "--out", NEW],
     "--real-time"),
    ("run-instrument-curve-key", ["run", "--instrument", "tcp://127.0.0.1:5999", "--curve-server-key",
                                  "{ws}/missing.key", "--curve-secret-key", "{ws}/notes.txt", "--out", NEW],
     "missing.key"),
    # replay and compare
    ("replay-journal-folder", ["replay", "{ws}/session", "--out", NEW], "journal"),
    ("replay-journal-missing", ["replay", "{ws}/missing.h5", "--out", NEW], "missing.h5"),
    ("replay-journal-not-hdf5", ["replay", "{ws}/fake.h5", "--out", NEW], "fake.h5"),
    ("replay-every-zero", ["replay", "{ws}/fake.h5", "--every", "0", "--out", NEW], "every"),
    ("replay-out-file", ["replay", "{ws}/fake.h5", "--out", "{ws}/notes.txt"], "notes.txt"),
    ("compare-folder", ["compare", "{ws}/folder", "--out", NEW], "folder"),
    ("compare-missing", ["compare", "{ws}/missing.h5", "--out", NEW], "missing.h5"),
    ("compare-budget-fraction", ["compare", "{ws}/fake.h5", "--budgets", "2", "--out", NEW], "2"),
    ("compare-out-file", ["compare", "{ws}/fake.h5", "--out", "{ws}/notes.txt"], "notes.txt"),
    # simulate, train, keys, serve, bench
    ("simulate-out-file", ["simulate", *SIM, "--out", "{ws}/notes.txt"], "notes.txt"),
    ("simulate-out-read-only", ["simulate", *SIM, "--out", str(READ_ONLY)], "cannot write"),
    ("simulate-pixel-zero", ["simulate", *SIM, "--pixel-size", "0", "--out", NEW], "pixel"),
    ("simulate-dwell-negative", ["simulate", *SIM, "--dwell", "-2", "--out", NEW], "dwell"),
    ("train-out-folder",
     ["train", "--out", "{ws}/folder", "--simulator-config", "{ws}/small.yaml"], "folder"),
    ("train-out-exists",
     ["train", "--out", "{ws}/existing.pt", "--simulator-config", "{ws}/small.yaml"], "exists"),
    ("train-out-read-only", ["train", "--out", f"{READ_ONLY}/m.pt", "--simulator-config", "{ws}/small.yaml"],
     "cannot write"),
    ("train-steps-zero",
     ["train", "--out", f"{NEW}/m.pt", "--steps", "0", "--simulator-config", "{ws}/small.yaml"],
     "steps"),
    ("config-show-which", ["config", "show", "--config", "{ws}/notes.txt"], "session|simulator"),
    ("config-show-missing", ["config", "show", "session", "--config", "{ws}/missing.yaml"], "missing.yaml"),
    ("keys-out-file", ["keys", "generate", "--out", "{ws}/notes.txt"], "notes.txt"),
    ("keys-out-read-only", ["keys", "generate", "--out", str(READ_ONLY)], "cannot write"),
    ("keys-name-path", ["keys", "generate", "--out", NEW, "--name", "../escape"], "name"),
    ("serve-curve-key-missing", ["serve", *SIM, "--curve-secret-key", "{ws}/missing.key_secret",
                                 "--allowed-clients", "{ws}/folder"], "missing.key_secret"),
    ("serve-heartbeat-zero", ["serve", *SIM, "--heartbeat", "0", "--no-journal"], "heartbeat"),
    ("serve-bind-public", ["serve", *SIM, "--bind", "tcp://0.0.0.0:5999", "--no-journal"], "CURVE"),
    ("serve-log-read-only",
     ["serve", *SIM, "--no-journal", "--log", f"{READ_ONLY}/serve.log"], "cannot write"),
    ("bench-repeats-zero", ["bench", "link", "--repeats", "0"], "repeats"),
    ("bench-json-folder", ["bench", "link", "--json", "{ws}/folder"], "folder"),
    # sweep: every input checked before a cluster starts or a task runs
    ("sweep-policy", [*SWEEP_G, "--policies", "clever", "--out", NEW], "clever"),
    ("sweep-budget-zero", [*SWEEP_G, "--budgets", "0", "--out", NEW], "budget"),
    ("sweep-scheduler-address", [*SWEEP_G, "--scheduler", "localhost:8786", "--out", NEW], "--scheduler"),
    ("sweep-scheduler-file-missing",
     [*SWEEP_G, "--scheduler-file", "{ws}/missing.json", "--out", NEW], "missing.json"),
    ("sweep-scheduler-and-file",
     [*SWEEP_G, "--scheduler", "tcp://127.0.0.1:8786", "--scheduler-file", "{ws}/notes.txt", "--out", NEW],
     "not both"),
    ("sweep-workers-zero", [*SWEEP_G, "--workers", "0", "--out", NEW], "--workers"),
    ("sweep-serial-and-workers", [*SWEEP_G, "--serial", "--workers", "2", "--out", NEW], "--serial"),
    ("sweep-threads-zero", [*SWEEP_G, "--threads-per-task", "0", "--out", NEW], "--threads-per-task"),
    ("sweep-out-file", [*SWEEP_G, "--out", "{ws}/notes.txt"], "notes.txt"),
    ("sweep-out-read-only", [*SWEEP_G, "--out", str(READ_ONLY)], "cannot write"),
    ("sweep-anomaly-overlap",
     ["sweep", "anomaly", "--evaluation-seeds", "1001", "--serial", "--out", NEW], "1001"),
    ("sweep-replay-missing", ["sweep", "replay", "{ws}/missing.h5", "--serial", "--out", NEW], "missing.h5"),
    ("sweep-replay-not-hdf5", ["sweep", "replay", "{ws}/fake.h5", "--serial", "--out", NEW], "fake.h5"),
    ("sweep-replay-folder", ["sweep", "replay", "{ws}/session", "--serial", "--out", NEW], "journal"),
    ("sweep-analyze-missing",
     ["sweep", "analyze", "{ws}/image.npy", "{ws}/missing.npy", "--serial", "--out", NEW], "missing.npy"),
    ("sweep-analyze-material", ["sweep", "analyze", "{ws}/image.npy", "--material", "Unobtainium",
                                "--serial", "--out", NEW], "Unobtainium"),
]  # fmt: skip


def test_the_sweep_is_at_least_forty_mistakes() -> None:
    assert len(MISTAKES) >= 40
    assert len({name for name, _, _ in MISTAKES}) == len(MISTAKES)


def test_the_read_only_folder_is_read_only() -> None:
    """The cases that write to :data:`READ_ONLY` rely on it refusing everyone."""
    with pytest.raises(OSError):
        READ_ONLY.mkdir(parents=True)
    with pytest.raises(OSError), tempfile.TemporaryFile(dir=READ_ONLY.parent):
        pass


@pytest.mark.parametrize(("args", "names"), [(args, names) for _, args, names in MISTAKES],
                         ids=[name for name, _, _ in MISTAKES])  # fmt: skip
def test_a_mistake_is_one_line_and_loses_nothing(
    args: list[str],
    names: str,
    workspace: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(workspace)  # default output folders (runs/...) land here, and are seen
    before = snapshot(workspace)
    argv = [arg.replace("{ws}", str(workspace)) for arg in args]
    status = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert status == 1, f"exit status {status}; stderr: {captured.err}"
    assert len(lines) == 1, f"expected one line, got:\n{captured.err}"
    assert lines[0].startswith("micrography: error: "), lines[0]
    assert "Traceback" not in captured.err
    assert names.lower() in lines[0].lower(), f"{names!r} not named in: {lines[0]}"
    assert snapshot(workspace) == before, "a refused command created, changed or removed files"
    assert not os.path.exists(READ_ONLY)
