from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from agent.cli import main
from tests.conftest import SMALL_SPECIMEN


@pytest.fixture
def small_config_file(tmp_path: Path) -> Path:
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump({"seed": 4, "specimen": SMALL_SPECIMEN.model_dump(mode="json")}))
    return path


def test_console_script_help_lists_every_command() -> None:
    executable = shutil.which("micrography")
    assert executable, "the micrography console script is not installed"
    result = subprocess.run([executable, "--help"], capture_output=True, text=True, check=True)
    for command in ("simulate", "describe", "acquire", "bench"):
        assert command in result.stdout


@pytest.mark.parametrize("command", ["simulate", "describe", "acquire", "bench"])
def test_each_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: micrography " + command in capsys.readouterr().out


def test_simulate_writes_dataset_ground_truth_and_preview(
    tmp_path: Path, small_config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert (
        main(["simulate", "--config", str(small_config_file), "--seed", "9", "--out", str(out), "--preview"])
        == 0
    )
    names = sorted(path.name for path in out.iterdir())
    assert names == [
        "Sm_10_9_HAADF.h5",
        "Sm_10_9_UCParameterization.h5",
        "ground_truth.h5",
        "preview.png",
        "simulator.yaml",
    ]
    assert (out / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "dislocation_core" in printed and "preview:" in printed
    # The written configuration reproduces the run.
    written = yaml.safe_load((out / "simulator.yaml").read_text())
    assert written["seed"] == 9


def test_acquire_saves_a_tile_and_reports_it(
    tmp_path: Path, small_config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "tile.npy"
    status = main(
        [
            "acquire",
            "--config",
            str(small_config_file),
            "--x",
            "15",
            "--y",
            "15",
            "--rows",
            "64",
            "--cols",
            "96",
            "--pixel-size",
            "0.02",
            "--dwell",
            "2",
            "--out",
            str(out),
        ]
    )
    assert status == 0
    assert np.load(out).shape == (64, 96)
    summary = json.loads(capsys.readouterr().out)
    assert summary["dose_e_per_a2"] == pytest.approx(6242, rel=1e-3)


def test_an_acquired_tiff_keeps_its_calibration_for_rosettasciio_and_for_analyze(
    tmp_path: Path, small_config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from rsciio.tiff import file_reader

    from simulator.dataset import load_image

    out = tmp_path / "tile.tif"
    command = ["acquire", "--config", str(small_config_file), "--x", "15", "--y", "12", "--rows", "64",
               "--cols", "96", "--pixel-size", "0.02", "--dwell", "2", "--out", str(out)]  # fmt: skip
    assert main(command) == 0
    summary = json.loads(capsys.readouterr().out)
    (signal,) = file_reader(str(out))
    height, width = signal["axes"]
    # Axes in nm from the tile's stage origin (the first pixel's centre, hyperspy's offset too).
    assert (height["units"], width["units"]) == ("nm", "nm")
    assert height["scale"] == width["scale"] == pytest.approx(0.02)
    assert [width["offset"], height["offset"]] == pytest.approx(summary["origin_nm"])
    assert summary["origin_nm"] == pytest.approx([15 - 95 * 0.01, 12 - 63 * 0.01])
    recorded = load_image(out)  # no pixel size given: the file carries it
    assert recorded.pixel_size_nm == pytest.approx(0.02)
    assert recorded.attrs["origin_nm"] == pytest.approx(summary["origin_nm"])
    np.testing.assert_array_equal(recorded.image, signal["data"])
    assert signal["data"].shape == (64, 96) and signal["data"].mean() == pytest.approx(summary["mean_counts"])


def test_user_errors_are_one_line_without_traceback(
    tmp_path: Path, small_config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(
        [
            "acquire",
            "--config",
            str(small_config_file),
            "--x",
            "29.9",
            "--y",
            "15",
            "--out",
            str(tmp_path / "t.npy"),
        ]
    )
    error = capsys.readouterr().err
    assert status == 1
    assert error.startswith("micrography: error: requested field spans x =")
    assert "Traceback" not in error

    bad = tmp_path / "bad.yaml"
    bad.write_text("imaging:\n  probe_sigma: 1\n")
    assert main(["describe", "--config", str(bad)]) == 1
    assert "bad.yaml: imaging.probe_sigma: unknown key" in capsys.readouterr().err


def test_describe_prints_the_instrument(small_config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["describe", "--config", str(small_config_file)]) == 0
    description = json.loads(capsys.readouterr().out)
    assert description["stage_x_nm"] == [0.0, 30.0]


def test_replay_via_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = np.arange(200 * 300, dtype=np.float32).reshape(200, 300)
    np.save(tmp_path / "scan.npy", image)
    status = main(
        [
            "acquire",
            "--replay",
            str(tmp_path / "scan.npy"),
            "--replay-pixel-size",
            "0.05",
            "--x",
            "5",
            "--y",
            "5",
            "--rows",
            "20",
            "--cols",
            "20",
            "--pixel-size",
            "0.05",
            "--dwell",
            "100",
            "--out",
            str(tmp_path / "crop.npy"),
        ]
    )
    # A .npy states no dwell nor gain: refused before exposing, naming the options.
    assert status == 1
    error = capsys.readouterr().err
    assert "does not state its dose" in error and "--replay-dwell" in error
    assert not (tmp_path / "crop.npy").exists()
    status = main(
        ["acquire", "--replay", str(tmp_path / "scan.npy"), "--replay-pixel-size", "0.05",
         "--replay-dwell", "100", "--replay-counts-per-unit", "1", "--x", "5", "--y", "5",
         "--rows", "20", "--cols", "20", "--pixel-size", "0.05", "--dwell", "100",
         "--out", str(tmp_path / "crop.npy")]
    )  # fmt: skip
    assert status == 0, capsys.readouterr().err
    np.testing.assert_array_equal(np.load(tmp_path / "crop.npy"), image[90:110, 90:110])
    assert main(["describe", "--replay", str(tmp_path / "scan.npy")]) == 1
    assert "pixel_size_nm" in capsys.readouterr().err


def test_train_writes_a_loadable_checkpoint(tmp_path: Path, small_config_file: Path) -> None:
    from agent.anomaly import AnomalyScorer

    out = tmp_path / "gae.pt"
    status = main(["train", "--out", str(out), "--simulator-config", str(small_config_file),
                   "--seeds", "5", "--steps", "3"])  # fmt: skip
    assert status == 0
    scorer = AnomalyScorer.load(out, device="cpu")
    assert scorer.steps_trained == 3 and scorer.fitted


def test_deterministic_training_gives_the_same_weights_bit_for_bit(
    tmp_path: Path, small_config_file: Path
) -> None:
    import torch

    from agent.anomaly import AnomalyScorer

    weights = []
    for name in ("first.pt", "second.pt"):
        out = tmp_path / name
        status = main(["train", "--out", str(out), "--simulator-config", str(small_config_file),
                       "--seeds", "5", "--steps", "12", "--dwell", "16", "--deterministic"])  # fmt: skip
        assert status == 0
        scorer = AnomalyScorer.load(out, device="cpu")
        assert scorer.provenance["dwell_us"] == 16.0 and scorer.provenance["deterministic"]
        assert scorer.provenance["simulator"] == "custom" and scorer.provenance["specimen_seeds"] == [5]
        weights.append((scorer.model.state_dict(), scorer.error_scale))
    for key, value in weights[0][0].items():
        assert torch.equal(value, weights[1][0][key]), key
    assert torch.equal(weights[0][1], weights[1][1])


def test_train_refuses_a_dwell_that_is_not_positive(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", "--out", str(tmp_path / "gae.pt"), "--dwell", "0"]) == 1
    assert "--dwell must be a positive number of µs, got 0" in capsys.readouterr().err
    assert not (tmp_path / "gae.pt").exists()
