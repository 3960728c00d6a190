"""CUDA check and figures for the column finder, the graph-autoencoder scorer, analyze and a session.

Run on a machine with a GPU (``python benchmarks/gpu_check.py --out DIR``); it prints a table and
writes ``gpu_check.json``. It checks that the torch (CUDA) column-finding path agrees with the
numpy path on a 4096 x 4096 tile and times both, times scoring a ~1M-node molecule graph with
the graph autoencoder on CUDA and on the CPU, runs ``micrography analyze`` on a 4096 x 4096
synthetic image with the GAE and VAE on CUDA and on the CPU, and runs the same 16-tile guided
session on the CPU and on CUDA in the same process (per-stage medians, whether the decisions are
identical, and where they first differ), then the pipelined loop on CUDA. Target: median per-tile
step <= 0.03 s on CUDA.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from scipy.spatial import cKDTree

from agent.anomaly import AnomalyConfig, AnomalyScorer
from agent.columns import SPECIES_A, SPECIES_B, ColumnFinderConfig, Columns, find_columns
from agent.driver import ScanRequest
from agent.graph import MoleculeGraph
from simulator.config import SimulatorConfig, SpecimenConfig
from simulator.drivers import SimulatedMicroscope
from simulator.specimen import SITE_A, SITE_B, generate_specimen


def _timed(function: Callable[[], object], repeats: int, synchronize: bool) -> list[float]:
    function()
    if synchronize:
        torch.cuda.synchronize()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        if synchronize:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return seconds


def check_columns(report: dict, device: str) -> None:
    config = SimulatorConfig().ideal_instrument()
    with SimulatedMicroscope(config) as microscope:
        tile = microscope.acquire(
            ScanRequest(
                x_nm=80, y_nm=80, shape=(4096, 4096), pixel_size_nm=0.02, dwell_us=32.0, request_id="gpu"
            )
        )
    cpu = find_columns(tile, ColumnFinderConfig(device="cpu"))
    cuda = find_columns(tile, ColumnFinderConfig(device=device))
    distance, nearest = cKDTree(np.stack([cpu.row_px, cpu.col_px], 1)).query(
        np.stack([cuda.row_px, cuda.col_px], 1)
    )
    paired = distance < 0.5
    report["columns"] = {
        "tile_px": 4096,
        "columns_cpu": len(cpu),
        "columns_cuda": len(cuda),
        "paired_within_half_px": int(paired.sum()),
        "max_position_difference_px": float(distance[paired].max()) if paired.any() else None,
        "species_agreement": float(np.mean(cpu.species[nearest[paired]] == cuda.species[paired])),
        "cpu_s": statistics.median(
            _timed(lambda: find_columns(tile, ColumnFinderConfig(device="cpu")), 3, False)
        ),
        "cuda_s": statistics.median(
            _timed(lambda: find_columns(tile, ColumnFinderConfig(device=device)), 5, device == "cuda")
        ),
    }


def check_scorer(report: dict, size_nm: float, device: str) -> None:
    specimen = generate_specimen(SpecimenConfig(size_nm=(size_nm, size_nm)), seed=21)
    lattice = np.isin(specimen.site, (SITE_A, SITE_B))
    count = int(lattice.sum())
    zeros = np.zeros(count)
    rng = np.random.default_rng(0)
    columns = Columns(
        x_nm=specimen.x_nm[lattice] + rng.normal(0, 0.003, count),
        y_nm=specimen.y_nm[lattice] + rng.normal(0, 0.003, count),
        row_px=zeros,
        col_px=zeros,
        intensity=specimen.weight[lattice].astype(float),
        scattering=specimen.weight[lattice].astype(float) * rng.normal(1, 0.02, count),
        peak_height=zeros,
        background=zeros,
        width_px=np.full(count, 1.75),
        species=np.where(specimen.site[lattice] == SITE_A, SPECIES_A, SPECIES_B).astype(np.int8),
        abnormal=np.zeros(count, dtype=bool),
        quality=np.full(count, 0.95),
        pixel_size_nm=0.02,
        lattice_spacing_nm=0.396,
    )
    start = time.perf_counter()
    graph = MoleculeGraph()
    graph.merge(columns, (0.0, size_nm, 0.0, size_nm))
    build_s = time.perf_counter() - start
    data = graph.to_pyg()
    cuda_scorer = AnomalyScorer(AnomalyConfig(device=device, warmup_steps=50, batch_nodes=20000))
    start = time.perf_counter()
    cuda_scorer.fit([data])
    fit_s = time.perf_counter() - start
    on_device = data.to(device)
    cuda_s = _timed(lambda: cuda_scorer.score(on_device), 5, device == "cuda")
    path = Path("/tmp/gpu_gae.pt")
    cuda_scorer.save(path)
    cpu_scorer = AnomalyScorer.load(path, device="cpu")
    cpu_s = _timed(lambda: cpu_scorer.score(data), 2, False)
    agree = np.max(np.abs(cpu_scorer.score(data).score - cuda_scorer.score(on_device).score))
    report["scorer"] = {
        "nodes": int(data.num_nodes),
        "edges": int(data.edge_index.shape[1]),
        "graph_build_s": build_s,
        "fit_50_steps_cuda_s": fit_s,
        "score_cuda_s": statistics.median(cuda_s),
        "score_cpu_s": statistics.median(cpu_s),
        "cpu_threads": torch.get_num_threads(),
        "max_score_difference_cpu_vs_cuda": float(agree),
    }


def check_analyze(report: dict, device: str, out: Path, size_px: int = 4096) -> None:
    from analysis.analyze import AnalyzeConfig, run_analysis
    from simulator.export import export_specimen

    pixel_size_nm = 0.02
    side_nm = size_px * pixel_size_nm
    config = SimulatorConfig(seed=0, specimen=SpecimenConfig(size_nm=(side_nm, side_nm)))
    specimen = generate_specimen(config.specimen, 0)
    exported = export_specimen(specimen, config, out / "analyze-data", pixel_size_nm=pixel_size_nm)
    figures: dict = {"image_px": size_px, "true_columns": len(specimen)}
    for name in (device, "cpu"):
        start = time.perf_counter()
        outputs = run_analysis(exported.dataset.haadf, out / f"analyze-{name}", AnalyzeConfig(device=name))
        summary = outputs.summary
        figures[name] = {
            "wall_s": time.perf_counter() - start,
            "stages_s": summary["timings_s"],
            "columns": summary["columns"]["total"],
            "peak_memory_mb": summary["peak_memory_mb"],
            "anomalous_columns": summary["anomaly"]["anomalous_columns"],
        }
        print(json.dumps({name: figures[name]}, indent=2), flush=True)
    report["analyze"] = figures


SESSION_TARGET_STEP_S = 0.03
"""Issue target: median per-tile step (tile in -> next request out) on CUDA, 512 x 512 tiles."""


def _session_run(name: str, device: str, out: Path, lookahead: int) -> tuple[object, dict, float]:
    from agent.columns import ColumnFinderConfig
    from agent.session import BudgetConfig, Session, SessionConfig

    defaults = SessionConfig()
    config = SessionConfig(
        budget=BudgetConfig(max_tiles=16),
        session_id=f"gpu-check-{name}",
        lookahead_tiles=lookahead,
        anomaly=defaults.anomaly.model_copy(update={"device": device}),
        columns=ColumnFinderConfig(device=device),
    )
    with SimulatedMicroscope(SimulatorConfig(seed=0)) as microscope:
        journal = out / f"session-{name}" / "journal.h5"
        journal.unlink(missing_ok=True)  # a rerun in the same folder starts afresh
        session = Session(microscope, config, journal_path=journal)
        start = time.perf_counter()
        summary = session.run()
    return session, summary, time.perf_counter() - start


def check_session(report: dict, out: Path, device: str = "cuda") -> None:
    """The same 16-tile guided session on the CPU and on ``device`` in this process: stage medians
    and decisions side by side, then the pipelined loop on ``device``."""
    from agent.session import DECISION_STAGES

    figures: dict[str, dict] = {}
    decisions: dict[str, list[tuple[float, float]]] = {}
    scores: dict[str, list[float]] = {}
    runs = (("cpu-reference", "cpu", 0), (device, device, 0), (f"{device}-pipelined", device, 1))
    for name, where, lookahead in runs:
        session, summary, wall = _session_run(name, where, out, lookahead)
        guided = [step for step in session.steps if step.kind == "guided"]
        latency = [sum(step.timings.get(stage, 0.0) for stage in DECISION_STAGES) for step in guided]
        figures[name] = {
            "scorer_device": str(session.scorer.device) if session.scorer is not None else None,
            "tiles": summary["tiles"],
            "wall_s": wall,
            "median_step_s": statistics.median(latency) if latency else None,
            "median_stage_s": {
                stage: statistics.median(step.timings.get(stage, 0.0) for step in guided)
                for stage in DECISION_STAGES
            }
            if guided
            else {},
            "instrument_dead_time_fraction": summary["instrument_dead_time_fraction"],
        }
        decisions[name] = [(s.request.x_nm, s.request.y_nm) for s in session.steps]
        scores[name] = [s.score for s in session.steps if s.kind != "survey"]
        print(json.dumps({name: figures[name]}, indent=2), flush=True)
    cpu, gpu = decisions["cpu-reference"], decisions[device]
    diverged = next((k for k, (a, b) in enumerate(zip(cpu, gpu, strict=False)) if a != b), None)
    reference = scores["cpu-reference"]
    common = min(len(reference), len(scores[device]), diverged if diverged is not None else len(cpu))
    score_gap = max(
        (abs(a - b) for a, b in zip(reference[:common], scores[device][:common], strict=True)
         if np.isfinite(a) and np.isfinite(b)),
        default=0.0,
    )  # fmt: skip
    step = figures[device]["median_step_s"]
    report["session"] = {
        **figures,
        "identical_decisions": diverged is None and len(cpu) == len(gpu),
        "first_different_step": diverged,
        "max_region_score_difference_before_it": score_gap,
        "target_step_s": SESSION_TARGET_STEP_S,
        "target_met": step is not None and step <= SESSION_TARGET_STEP_S,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--size-nm", type=float, default=285.0, help="specimen edge for the ~1M-node graph")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run")
    parser.add_argument("--skip-scorer", action="store_true", help="only the column-finding check")
    parser.add_argument("--skip-analyze", action="store_true", help="no analyze run")
    parser.add_argument("--analyze-px", type=int, default=4096, help="edge of the analyzed image, px")
    parser.add_argument("--skip-session", action="store_true", help="no guided session")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    check_columns(report, args.device)
    print(json.dumps(report, indent=2), flush=True)
    checks = [
        ("scorer", args.skip_scorer, lambda: check_scorer(report, args.size_nm, args.device)),
        ("session", args.skip_session, lambda: check_session(report, out, args.device)),
        ("analyze", args.skip_analyze, lambda: check_analyze(report, args.device, out, args.analyze_px)),
    ]
    for name, skip, check in checks:
        if skip:
            continue
        try:
            check()
        except Exception as error:  # one failing check must not lose the others' figures
            report[name] = {"error": f"{type(error).__name__}: {error}"}
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
        print(json.dumps({name: report[name]}, indent=2), flush=True)


if __name__ == "__main__":
    main()
