"""Per-tile overhead of the Nion Swift bridge against ``micrography serve``.

Run ``python -m benchmarks.nion_bridge --json runs/bench-nion.json`` from the repository
root (about a minute; needs the ``nion`` extra). Both instruments image the same synthetic
specimen (seed 0, default imaging) and are asked for the same tiles over ZeroMQ on loopback by a
:class:`~agent.protocol.client.ZmqMicroscope`, each with a fresh request id:

``serve``
    :class:`~simulator.server.InstrumentServer` around :class:`~simulator.drivers.SimulatedMicroscope`
    (what ``micrography serve`` runs): link + rendering; the simulator's clock is virtual, so no
    scan time is spent.
``bridge``
    The same server around :class:`NionScanDriver` inside headless Nion Swift: link + Nion's
    record (frame parameters, acquisition thread, calibrations, metadata) + usim's scan, which
    takes the real frame time (rows x cols x dwell), + rendering by the usim specimen device.

Per tile it reports the median round trip of each, the nominal frame time, the render time of
the usim specimen device alone, ``bridge - serve``, and the per-tile overhead of the bridge,
``bridge - max(frame time, render)``: usim renders the frame when the scan starts and then
waits out the frame time, so a tile can never come back sooner than the longer of the two;
whatever the bridge takes beyond that is Nion's record path, the bridge's checks and the link.
``nion_record`` times Nion's ``record()`` alone for the same frames, so ``bridge - record`` is
what the bridge itself (frame mapping, calibration checks, tile building) and the ZeroMQ link add.
Figures are printed and written as JSON; there are no pass/fail targets.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from agent.benchmarking import machine_info, summarise, write_report
from agent.driver import ScanRequest
from agent.protocol.client import ZmqMicroscope
from simulator.config import SimulatorConfig
from simulator.drivers import SimulatedMicroscope
from simulator.server import InstrumentServer

TILE_SIZES: tuple[int, ...] = (256, 512)
PIXEL_SIZE_NM = 0.02
SEED = 0


def _requests(tile_px: int, dwell_us: float, repeats: int) -> list[ScanRequest]:
    """Tiles spread over the middle of the specimen, one fresh request id each."""
    return [
        ScanRequest(
            x_nm=60.0 + 8.0 * (index % 5),
            y_nm=60.0 + 8.0 * (index // 5),
            shape=(tile_px, tile_px),
            pixel_size_nm=PIXEL_SIZE_NM,
            dwell_us=dwell_us,
        )
        for index in range(repeats + 1)  # the first is an untimed warm-up
    ]


def _round_trips(endpoint: str, requests: list[ScanRequest]) -> list[float]:
    seconds = []
    with ZmqMicroscope(endpoint, timeout_s=30.0) as remote:
        for index, request in enumerate(requests):
            start = time.perf_counter()
            remote.acquire(request)
            if index:
                seconds.append(time.perf_counter() - start)
    return seconds


def _records(driver: Any, requests: list[ScanRequest]) -> list[float]:
    """Seconds of Nion's own ``record()`` for the frames the bridge would command (no link, no checks)."""
    from nionswift_plugin.micrography_bridge.geometry import frame_parameters_for

    seconds = []
    for index, request in enumerate(requests):
        frame = {
            **driver.scan.get_record_frame_parameters(),
            **frame_parameters_for(request, driver.calibration),
        }
        frame = {key: value for key, value in frame.items() if value is not None}
        frame["enabled_channel_indexes"] = [0]
        while driver.scan.is_recording:
            time.sleep(0.001)
        start = time.perf_counter()
        driver.scan.record(frame, timeout=60.0)
        if index:
            seconds.append(time.perf_counter() - start)
    return seconds


def benchmark_nion_bridge(repeats: int = 5, dwell_us: float = 1.0) -> dict[str, Any]:
    """Measure both instruments on every tile size.

    Parameters
    ----------
    repeats : int
        Timed tiles per size and instrument.
    dwell_us : float
        Dwell per pixel, microseconds (sets usim's real frame time).

    Returns
    -------
    dict
        Machine facts, Nion versions, and one row per tile size with medians in seconds.
    """
    from importlib.metadata import version

    from nionswift_plugin.micrography_bridge.headless import HeadlessSwift
    from nionswift_plugin.micrography_bridge.usim_specimen import SpecimenScanGenerator

    config = SimulatorConfig(seed=SEED)
    serve: dict[int, list[float]] = {}
    with (
        SimulatedMicroscope(config) as microscope,
        InstrumentServer(microscope, "tcp://127.0.0.1:*") as server,
    ):
        for tile_px in TILE_SIZES:
            serve[tile_px] = _round_trips(server.endpoint, _requests(tile_px, dwell_us, repeats))
        specimen = microscope.ground_truth

    render: dict[int, list[float]] = {}
    generator = SpecimenScanGenerator(config, specimen)
    from nion.device_kit.ScanDevice import ScanFrameParameters

    for tile_px in TILE_SIZES:
        frame = ScanFrameParameters(
            size=(tile_px, tile_px),
            fov_nm=tile_px * PIXEL_SIZE_NM,
            pixel_time_us=dwell_us,
            center_nm=(0.0, 0.0),
        )
        generator.generate_scan_data(None, frame)
        render[tile_px] = []
        for _ in range(repeats):
            start = time.perf_counter()
            generator.generate_scan_data(None, frame)
            render[tile_px].append(time.perf_counter() - start)

    bridge: dict[int, list[float]] = {}
    record: dict[int, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="micrography-bench-nion-") as scratch:
        settings = {
            "bind": "tcp://127.0.0.1:*",
            "hardware_source_id": "micrography_usim_scan",
            "instrument_id": "micrography_usim_scan_stem_controller",
            "detectors": {"HAADF": 0},
            "field_nm": list(config.specimen.size_nm),
            "max_tile_shape": [1024, 1024],
            "usim_specimen": {"seed": SEED},
        }
        settings_file = Path(scratch) / "bridge.yaml"
        settings_file.write_text(yaml.safe_dump(settings), encoding="utf-8")
        with HeadlessSwift(settings_file, workdir=Path(scratch) / "swift") as swift:
            host = swift.bridge()
            if host is None or not swift.periodic_until(host.ready, timeout_s=60.0) or host.error:
                raise RuntimeError(f"the bridge did not start: {getattr(host, 'error', None)}")
            for tile_px in TILE_SIZES:
                bridge[tile_px] = _round_trips(host.server.endpoint, _requests(tile_px, dwell_us, repeats))
                record[tile_px] = _records(host.driver, _requests(tile_px, dwell_us, repeats))

    rows = []
    for tile_px in TILE_SIZES:
        frame_s = tile_px * tile_px * dwell_us * 1e-6
        serve_s = statistics.median(serve[tile_px])
        bridge_s = statistics.median(bridge[tile_px])
        render_s = statistics.median(render[tile_px])
        record_s = statistics.median(record[tile_px])
        rows.append(
            {
                "tile_px": tile_px,
                "dwell_us": dwell_us,
                "frame_time_s": frame_s,
                "serve": summarise(serve[tile_px]),
                "bridge": summarise(bridge[tile_px]),
                "usim_render": summarise(render[tile_px]),
                "nion_record": summarise(record[tile_px]),
                "bridge_minus_record_s": bridge_s - record_s,
                "nion_overhead_s": bridge_s - max(frame_s, render_s),
                "bridge_minus_serve_s": bridge_s - serve_s,
            }
        )
    return {
        "benchmark": "nion_bridge",
        "machine": machine_info(),
        "versions": {
            name: version(name) for name in ("nionswift", "nionswift-instrumentation", "nionswift-usim")
        },
        "pixel_size_nm": PIXEL_SIZE_NM,
        "repeats": repeats,
        "rows": rows,
    }


def format_report(report: dict[str, Any]) -> str:
    """The benchmark as a text table (milliseconds)."""
    versions = ", ".join(f"{name} {value}" for name, value in report["versions"].items())
    lines = [
        f"Nion bridge vs micrography serve ({versions}); medians of {report['repeats']} tiles, ms",
        f"{'tile':>9} {'dwell us':>8} {'frame':>8} {'serve':>8} {'bridge':>8} {'render':>8} "
        f"{'record':>8} {'bridge-serve':>12} {'bridge overhead':>15} {'bridge-record':>13}",
    ]
    for row in report["rows"]:
        lines.append(
            f"{row['tile_px']:>4}x{row['tile_px']:<4} {row['dwell_us']:>8g} "
            f"{1e3 * row['frame_time_s']:>8.1f} "
            f"{1e3 * row['serve']['median_s']:>8.1f} {1e3 * row['bridge']['median_s']:>8.1f} "
            f"{1e3 * row['usim_render']['median_s']:>8.1f} {1e3 * row['nion_record']['median_s']:>8.1f} "
            f"{1e3 * row['bridge_minus_serve_s']:>12.1f} {1e3 * row['nion_overhead_s']:>15.1f} "
            f"{1e3 * row['bridge_minus_record_s']:>13.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="PATH", help="write the figures here")
    parser.add_argument("--repeats", type=int, default=5, help="timed tiles per size (default 5)")
    parser.add_argument("--dwell", type=float, default=1.0, metavar="US", help="dwell per pixel (default 1)")
    args = parser.parse_args(argv)
    report = benchmark_nion_bridge(repeats=args.repeats, dwell_us=args.dwell)
    print(format_report(report))
    write_report(report, args.json)
    if args.json:
        print(f"written: {args.json}")
        json.loads(Path(args.json).read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
