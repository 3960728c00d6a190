"""``micrography bench analyze``: the full-frame analysis of a 4096 x 4096 image, timed end to end.

A synthetic specimen the size of the field of view is rendered at 0.02 nm/px (about
80,000 columns) and written in the Sm-BFO dataset layout (so the comparison with the
dataset's ``Pxy`` runs too); then ``micrography analyze`` runs on it in a fresh
process, exactly as a user would start it, and reports the wall time of each stage
and the peak resident memory of that process. Targets on 2 cores: under 60 s and
under 4 GB.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from agent.benchmarking import machine_info

TARGET_SECONDS = 60.0
TARGET_PEAK_MB = 4096.0


def benchmark_analyze(
    size_px: int = 4096,
    pixel_size_nm: float = 0.02,
    seed: int = 0,
    out_dir: str | Path = "runs/bench-analyze",
) -> dict[str, Any]:
    """Render a synthetic image, analyse it in a fresh process and report the figures.

    Parameters
    ----------
    size_px : int
        Edge of the square image, pixels.
    pixel_size_nm : float
        Pixel size, nanometres (0.02: about 20 px per unit cell).
    seed : int
        Specimen seed.
    out_dir : str or pathlib.Path
        Where the dataset (``data/``) and the analysis outputs (``analysis/``) go.

    Returns
    -------
    dict
        Machine, image, per-stage seconds, wall time of the process, peak memory, targets.
    """
    from rich.console import Console

    from simulator.config import SimulatorConfig, SpecimenConfig
    from simulator.export import export_specimen
    from simulator.specimen import generate_specimen

    out_dir = Path(out_dir)
    side_nm = size_px * pixel_size_nm
    config = SimulatorConfig(seed=seed, specimen=SpecimenConfig(size_nm=(side_nm, side_nm)))
    with Console(stderr=True).status(f"rendering a {size_px} x {size_px} px synthetic specimen"):
        specimen = generate_specimen(config.specimen, seed)
        exported = export_specimen(specimen, config, out_dir / "data", pixel_size_nm=pixel_size_nm)
    analysis_dir = out_dir / "analysis"
    command = [
        sys.executable,
        "-m",
        "agent.cli",
        "analyze",
        str(exported.dataset.haadf),
        "--out",
        str(analysis_dir),
    ]
    # The child must run this checkout's code, whatever the caller's working directory.
    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
    }
    load_before = os.getloadavg()
    start = time.perf_counter()
    completed = subprocess.run(command, env=env, check=False)
    wall = time.perf_counter() - start
    if completed.returncode != 0:
        raise RuntimeError(f"micrography analyze exited with status {completed.returncode}")
    child_peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    summary = json.loads((analysis_dir / "analysis.json").read_text())
    stages = summary["timings_s"]
    return {
        "machine": machine_info(),
        "load_average_1min_before": load_before[0],
        "load_average_1min_after": os.getloadavg()[0],
        "image": {
            "shape_px": [size_px, size_px],
            "pixel_size_nm": pixel_size_nm,
            "columns": summary["columns"]["total"],
            "true_columns": len(specimen),
        },
        "stages_s": {name: value for name, value in stages.items() if name != "total"},
        "analysis_s": stages["total"],
        "process_wall_s": wall,
        "peak_memory_mb": child_peak_mb,
        "targets": {"process_wall_s": TARGET_SECONDS, "peak_memory_mb": TARGET_PEAK_MB},
        "meets_targets": bool(wall < TARGET_SECONDS and child_peak_mb < TARGET_PEAK_MB),
        "outputs": {
            name: str(analysis_dir / name) for name in ("analysis.png", "report.html", "analysis.json")
        },
    }


def format_report(report: dict[str, Any]) -> str:
    """The benchmark as aligned text lines."""
    image = report["image"]
    targets = report["targets"]
    lines = [
        f"image            {image['shape_px'][0]} x {image['shape_px'][1]} px at "
        f"{image['pixel_size_nm']:g} nm/px, {image['columns']:,} columns found "
        f"({image['true_columns']:,} in the specimen)",
        f"machine          {report['machine']['cpu_count']} CPUs, 1-min load average "
        f"{report['load_average_1min_before']:.1f} before / {report['load_average_1min_after']:.1f} after",
        "stage seconds    " + ", ".join(f"{name} {value:.1f}" for name, value in report["stages_s"].items()),
        f"analysis         {report['analysis_s']:.1f} s in stages; {report['process_wall_s']:.1f} s for "
        f"the whole process (target < {targets['process_wall_s']:.0f} s)",
        f"peak memory      {report['peak_memory_mb']:.0f} MB (target < {targets['peak_memory_mb']:.0f} MB)",
        f"meets targets    {'yes' if report['meets_targets'] else 'NO'}",
        f"outputs          {report['outputs']['report.html']}",
    ]
    return "\n".join(lines)
