"""The link from the command line: ``micrography serve``, ``keys generate``, ``bench link``."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from agent.cli import main
from agent.driver import ScanRequest
from agent.protocol.client import ZmqMicroscope
from agent.protocol.security import CurveClientKeys
from simulator.config import SimulatorConfig
from simulator.specimen import Specimen
from tests.conftest import SMALL_SPECIMEN

pytestmark = pytest.mark.timeout(60)


def test_help_lists_the_link_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "serve" in out and "keys" in out
    for argv, option in (
        (["serve", "--help"], "--allowed-clients"),
        (["keys", "generate", "--help"], "--name"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
        assert option in capsys.readouterr().out


def test_keys_generate_writes_a_pair_and_never_overwrites(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keys", "generate", "--out", str(tmp_path), "--name", "agent"]) == 0
    out = capsys.readouterr().out
    assert "agent.key" in out and "Z85 public key:" in out
    assert stat.S_IMODE(os.stat(tmp_path / "agent.key_secret").st_mode) == 0o600
    assert main(["keys", "generate", "--out", str(tmp_path), "--name", "agent"]) == 1
    assert "already exists" in capsys.readouterr().err


def test_serve_refuses_an_unsafe_address_before_starting(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--bind", "tcp://0.0.0.0:5555", "--no-journal"]) == 1
    assert "without CURVE would let anyone" in capsys.readouterr().err
    assert main(["serve", "--curve-secret-key", "x.key_secret"]) == 1
    assert "go together" in capsys.readouterr().err


def test_serve_with_curve_journal_and_log_then_graceful_stop(tmp_path: Path) -> None:
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump({"seed": 4, "specimen": SMALL_SPECIMEN.model_dump(mode="json")}))
    keys = tmp_path / "keys"
    for name, folder in (("server", keys), ("agent", keys / "clients")):
        assert main(["keys", "generate", "--out", str(folder), "--name", name]) == 0
    endpoint_file, log = tmp_path / "endpoints.json", tmp_path / "serve.log"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent.cli",
            "serve",
            "--config",
            str(config),
            "--bind",
            "tcp://127.0.0.1:*",
            "--journal",
            str(tmp_path / "journal"),
            "--curve-secret-key",
            str(keys / "server.key_secret"),
            "--allowed-clients",
            str(keys / "clients"),
            "--heartbeat",
            "0.2",
            "--log",
            str(log),
            "--endpoint-file",
            str(endpoint_file),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30.0
        while not endpoint_file.exists() or not endpoint_file.read_text():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "micrography serve did not start"
            time.sleep(0.05)
        endpoint = json.loads(endpoint_file.read_text())["endpoint"]
        curve = CurveClientKeys.from_files(keys / "clients" / "agent.key_secret", keys / "server.key")
        with ZmqMicroscope(endpoint, curve=curve) as remote:
            tile = remote.acquire(
                ScanRequest(x_nm=15, y_nm=15, shape=(64, 64), pixel_size_nm=0.02, dwell_us=2.0)
            )
            status = remote.status()
        assert tile.shape == (64, 64)
        assert status.exposures == 1 and status.journal == str(tmp_path / "journal")
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err
    assert "serving Micrography simulated STEM on tcp://127.0.0.1:" in out and "CURVE on" in out
    assert "instrument server stopped" in out
    logged = log.read_text()
    for expected in (
        "hello from",
        "describe -> ok",
        "acquire",
        "exposed 64x64 px",
        "status -> ok",
        "shutting down",
    ):
        assert expected in logged
    assert (tmp_path / "journal" / "journal.jsonl").read_text().count('"event":"done"') == 1


def test_bench_link_writes_the_documented_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from simulator import link_bench

    real = link_bench.benchmark_link
    # The full benchmark takes a minute; the wiring and the report format are the same on tiny tiles.
    monkeypatch.setattr(
        link_bench,
        "benchmark_link",
        lambda repeats: real(tile_sizes=(64,), curve_modes=(False, True), repeats=1, abort_repeats=1),
    )
    out_file = tmp_path / "bench-link.json"
    assert main(["bench", "link", "--repeats", "1", "--json", str(out_file)]) == 0
    report = json.loads(out_file.read_text())
    assert report["benchmark"] == "link"
    combos = {(row["transport"], row["tile_px"], row["curve"]) for row in report["rows"]}
    assert combos == {(t, 64, c) for t in ("micrography", "raw_zmq", "json_list") for c in (False, True)}
    for row in report["rows"]:
        assert {"transport", "tile_px", "curve", "median_roundtrip_s", "throughput_mb_s"} <= set(row)
        assert row["median_roundtrip_s"] > 0 and row["throughput_mb_s"] > 0
    # One real 4096x4096 exposure of the simulator, aborted a second in: it stopped part-way.
    abort = report["abort"]
    assert len(abort["seconds"]) == 1 and 0 < abort["median_s"] < 10.0
    assert 0 < abort["rows_scanned"][0] < abort["rows"] == 4096
    assert any(target["name"].startswith("abort to 'aborted' reply") for target in report["targets"])
    printed = capsys.readouterr().out
    assert "micrography" in printed and "abort 1 s into a 4096x4096 exposure" in printed


def test_run_over_a_curve_link_from_the_command_line(
    tmp_path: Path,
    small_config: SimulatorConfig,
    small_specimen: Specimen,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The documented remote set-up: `run --instrument` with CURVE keys, refused without them."""
    from agent.protocol.security import CurveServerKeys
    from agent.session import BudgetConfig, ScanSettings, SessionConfig
    from simulator.drivers import SimulatedMicroscope
    from simulator.server import InstrumentServer

    keys = tmp_path / "keys"
    for name, folder in (("server", keys), ("agent", keys / "clients"), ("stranger", keys)):
        assert main(["keys", "generate", "--out", str(folder), "--name", name]) == 0
    session = SessionConfig(
        budget=BudgetConfig(max_tiles=2),
        survey=ScanSettings(pixel_size_nm=0.5, dwell_us=2.0, shape=(4096, 4096)),
        tiles=ScanSettings(pixel_size_nm=0.02, dwell_us=4.0, shape=(128, 128)),
        start_tiles=2,
        warmup_steps=5,
    )
    config = tmp_path / "session.yaml"
    config.write_text(yaml.safe_dump(session.model_dump(mode="json")), encoding="utf-8")
    capsys.readouterr()
    curve = CurveServerKeys.from_files(keys / "server.key_secret", keys / "clients")
    with (
        SimulatedMicroscope(small_config, small_specimen) as microscope,
        InstrumentServer(
            microscope, "tcp://127.0.0.1:*", events_bind="tcp://127.0.0.1:*", curve=curve
        ) as server,
    ):
        assert server.endpoint is not None
        run = ["run", "--instrument", server.endpoint, "--config", str(config)]
        # A client key the server does not list: refused at the handshake, nothing exposed.
        stranger = [
            "--curve-secret-key",
            str(keys / "stranger.key_secret"),
            "--curve-server-key",
            str(keys / "server.key"),
        ]
        assert main([*run, *stranger, "--out", str(tmp_path / "refused")]) == 1
        assert "micrography: error: " in capsys.readouterr().err
        # Half a key pair is a one-line mistake, caught before connecting.
        assert (
            main(
                [
                    *run,
                    "--curve-secret-key",
                    str(keys / "clients" / "agent.key_secret"),
                    "--out",
                    str(tmp_path / "half"),
                ]
            )
            == 1
        )
        assert "--curve-server-key" in capsys.readouterr().err
        assert server.status().exposures == 0
        agent = [
            "--curve-secret-key",
            str(keys / "clients" / "agent.key_secret"),
            "--curve-server-key",
            str(keys / "server.key"),
        ]
        assert main([*run, *agent, "--out", str(tmp_path / "session")]) == 0, capsys.readouterr().err
        summary = json.loads((tmp_path / "session" / "summary.json").read_text())
        # The survey and the two start tiles went over the encrypted link and were exposed once each.
        assert server.status().exposures == 1 + 2
        assert summary["tiles"] == 2
