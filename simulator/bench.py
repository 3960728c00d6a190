"""``micrography bench simulator``: how fast the simulated microscope renders tiles.

Targets on 2 CPU cores: a 512x512 high-resolution tile in <= 0.05 s and a
4096x4096 one in <= 3 s (median), including counting noise and scan distortions.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from rich.progress import Progress

from agent.benchmarking import machine_info, summarise, time_calls
from agent.driver import ScanRequest
from simulator.config import SimulatorConfig
from simulator.drivers import SimulatedMicroscope
from simulator.specimen import generate_specimen

TARGETS_S: dict[int, float] = {512: 0.05, 4096: 3.0}
"""Median render-time targets per tile edge (pixels), seconds on 2 cores."""


def benchmark_simulator(
    config: SimulatorConfig | None = None,
    *,
    pixel_size_nm: float = 0.02,
    repeats: int = 5,
    dwell_us: float = 2.0,
) -> dict[str, Any]:
    """Time specimen generation and tile rendering.

    Parameters
    ----------
    config : SimulatorConfig, optional
        Simulator configuration; the default specimen is about 160 x 160 nm.
    pixel_size_nm : float
        Pixel size of the high-resolution tiles, nanometres (0.02 nm puts ~20 px between A columns).
    repeats : int
        Timed renders per tile size (the median is reported).
    dwell_us : float
        Dwell per pixel, microseconds.

    Returns
    -------
    dict
        ``{"benchmark": "simulator", "rows": [...], "specimen": {...}, "machine": {...}}``; each row
        has ``tile_px``, ``pixel_size_nm``, ``columns_in_tile``, ``median_s``, ``target_s`` and
        ``meets_target``.
    """
    config = config or SimulatorConfig()
    start = time.perf_counter()
    specimen = generate_specimen(config.specimen, config.seed)
    generation_s = time.perf_counter() - start
    width, height = specimen.size_nm
    rows = []
    with SimulatedMicroscope(config, specimen) as microscope, Progress(transient=True) as progress:
        task = progress.add_task("rendering tiles", total=len(TARGETS_S) * (repeats + 1))
        for tile_px, target in TARGETS_S.items():
            request = ScanRequest(
                x_nm=0.5 * width,
                y_nm=0.5 * height,
                shape=(tile_px, tile_px),
                pixel_size_nm=pixel_size_nm,
                dwell_us=dwell_us,
            )
            half = 0.5 * tile_px * pixel_size_nm
            in_tile = specimen.columns_in(
                0.5 * width - half, 0.5 * width + half, 0.5 * height - half, 0.5 * height + half
            ).size

            def render(request: ScanRequest = request) -> None:
                # A fresh id per call: a repeated id would be answered from the retry cache.
                microscope.acquire(request.model_copy(update={"request_id": uuid.uuid4().hex}))
                progress.advance(task)

            figures = summarise(time_calls(render, repeats))
            rows.append(
                {
                    "tile_px": tile_px,
                    "pixel_size_nm": pixel_size_nm,
                    "columns_in_tile": int(in_tile),
                    **figures,
                    "target_s": target,
                    "meets_target": figures["median_s"] <= target,
                }
            )
    return {
        "benchmark": "simulator",
        "rows": rows,
        "specimen": {
            "size_nm": list(specimen.size_nm),
            "columns": len(specimen),
            "features": len(specimen.features),
            "generation_s": generation_s,
        },
        "repeats": repeats,
        "machine": machine_info(),
    }


def format_report(report: dict[str, Any]) -> str:
    """The simulator benchmark as a small text table."""
    lines = [
        f"specimen: {report['specimen']['columns']:,} columns over "
        f"{report['specimen']['size_nm'][0]:g} x {report['specimen']['size_nm'][1]:g} nm, "
        f"generated in {report['specimen']['generation_s']:.2f} s",
        f"{'tile':>10} {'px (nm)':>8} {'columns':>8} {'median s':>9} {'target s':>9}  ok",
    ]
    for row in report["rows"]:
        lines.append(
            f"{row['tile_px']:>5}x{row['tile_px']:<4} {row['pixel_size_nm']:>8g} "
            f"{row['columns_in_tile']:>8,} "
            f"{row['median_s']:>9.3f} {row['target_s']:>9.2f}  {'yes' if row['meets_target'] else 'NO'}"
        )
    return "\n".join(lines)
