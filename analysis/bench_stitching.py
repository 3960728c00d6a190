"""``micrography bench stitching``: whether tiles stitch on a realistic instrument.

Raster and guided sessions with overlapping tiles run on 40 x 40 nm specimens (seeds the
registration was never tuned on) under three instruments: the simulator's realistic
default, the same with every drift term off, and a stressed one (0.3 nm/s drift and 5 nm
placement error). Every figure is measured against the simulator's ground truth
(:meth:`simulator.drivers.SimulatedMicroscope.exposure_truth`):

* duplicate nodes: two graph nodes closer than 0.4 lattice spacings that image the same
  ground-truth column (each node, moved by the frame translation below, is the column nearest
  to it), as a share of all nodes; also only the pairs whose nodes come from different tiles
  (a pair inside one tile is the column finder's double detection, not stitching). Closeness
  alone (``close_pair_fraction``, also reported) overcounts: the atoms of an amorphous patch
  are closer than that, and so are a B and an O column where the B column is displaced;
* residual placement error of each tile: the measured offset of its first pixel against the
  true one, after removing the one translation that relates the session's frame (the
  survey's) to the specimen, split by how the tile was placed and by whether it truly
  overlapped an earlier tile by 1 nm or more; a tile the survey placed is also measured in the
  survey's own frame (its placement as measured, against the true offset from the survey's):
  that is the survey registration's error, the survey target's figure, while the mosaic's
  frame is only as good as the prediction that placed its first tile;
* stitched column positions: every column of every tile moved by its measured placement,
  against the ground-truth column it images (found through the true placement, so a tile
  registered one cell off counts as off by a cell), RMS, next to the single-tile RMS (the
  same columns through their true placement: the column finder's own error);
* seams: median anomaly score of interior nodes within one lattice spacing of a tile edge
  that lies inside another tile, over the median of the other interior nodes;
* the registration stage's time per tile.

Targets (issue "Tiles that stitch on a real instrument"): duplicates <= 0.2 % of nodes;
residual placement median <= 0.02 nm for tiles with >= 1 nm true overlap and <= 0.3 nm for
survey-only registration; stitched RMS <= 1.5 x single-tile RMS; seam / interior score
<= 1.1; registration <= 15 ms median per tile.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np
from rich.progress import Progress
from scipy.spatial import cKDTree

from agent.benchmarking import machine_info
from agent.session import BudgetConfig, ScanSettings, Session, SessionConfig
from simulator.config import SimulatorConfig, SpecimenConfig
from simulator.drivers import SimulatedMicroscope
from simulator.specimen import Specimen, generate_specimen

SEEDS: tuple[int, ...] = (20, 21, 22, 23, 24)
"""Specimen seeds of the benchmark; registration was tuned on seeds 3 and 100-129 only."""

SPECIMEN = SpecimenConfig(
    size_nm=(40.0, 40.0),
    domain_walls=2,
    dislocations=2,
    strained_patches=1,
    vacancy_clusters=3,
    substitution_clusters=3,
    phase_patches=1,
    phase_patch_radius_nm=5.0,
    amorphous_patches=1,
    amorphous_patch_radius_nm=3.0,
    edge_margin_nm=5.0,
)
"""A 40 x 40 nm specimen with every kind of planted feature."""

SESSION = SessionConfig(
    budget=BudgetConfig(max_tiles=9),
    tiles=ScanSettings(pixel_size_nm=0.02, dwell_us=8.0, shape=(512, 512)),
    tile_overlap_fraction=0.3,
    start_tiles=3,
    warmup_steps=30,
)
"""512^2 tiles at 0.2 A/px (10.24 nm) whose neighbours overlap by about 3 nm."""

TARGETS = {
    "duplicate_fraction": 0.002,
    "overlap_residual_median_nm": 0.02,
    "survey_residual_median_nm": 0.3,
    "stitched_over_single_rms": 1.5,
    "seam_over_interior_score": 1.1,
    "register_median_s": 0.015,
}


def instruments() -> dict[str, SimulatorConfig]:
    """The three instruments of the benchmark, by name."""
    realistic = SimulatorConfig(specimen=SPECIMEN)
    no_drift = realistic.model_copy(
        update={
            "imaging": realistic.imaging.model_copy(
                update={
                    "drift_nm_per_s": (0.0, 0.0),
                    "drift_random_walk_nm_per_s_per_sqrt_s": 0.0,
                    "settle_drift_nm_per_s": 0.0,
                }
            )
        }
    )
    stressed = realistic.model_copy(
        update={
            "imaging": realistic.imaging.model_copy(update={"drift_nm_per_s": (0.24, 0.18)}),
            "instrument": realistic.instrument.model_copy(update={"placement_sigma_nm": 5.0}),
        }
    )
    return {"realistic": realistic, "drift_off": no_drift, "drift_0.3_placement_5nm": stressed}


def _true_extent(extent: tuple[float, float, float, float], offset: Sequence[float]) -> np.ndarray:
    x0, x1, y0, y1 = extent
    return np.array([x0 + offset[0], x1 + offset[0], y0 + offset[1], y1 + offset[1]])


def _overlap_nm(a: np.ndarray, b: np.ndarray) -> float:
    """Smaller side of the intersection of two extents, nm (0 when they do not meet)."""
    width = min(a[1], b[1]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[2], b[2])
    return max(0.0, min(width, height))


def evaluate_session(session: Session, microscope: SimulatedMicroscope, specimen: Specimen) -> dict[str, Any]:
    """Stitching figures of one finished session against the simulator's ground truth.

    Parameters
    ----------
    session : Session
        A session that ran on ``microscope``.
    microscope : SimulatedMicroscope
        Its instrument (holds the true placement of every exposure).
    specimen : Specimen
        The specimen imaged.

    Returns
    -------
    dict
        Per-tile placements and errors, and the session's summary figures.
    """
    spacing = session.config.graph.lattice_spacing_nm
    truth_points = np.stack([specimen.x_nm, specimen.y_nm], 1)
    truth_tree = cKDTree(truth_points)
    steps = [step for step in session.steps if step.kind != "survey" and step.placement is not None]
    surveys = [step for step in session.steps if step.kind == "survey"]
    # A survey match places a tile in the survey's frame (the survey's first pixel at its start),
    # which the mosaic need not share: the mosaic's parts are only as well placed as the prediction.
    survey_truth = (
        np.asarray(microscope.exposure_truth(surveys[-1].request.request_id).offset_nm) if surveys else None
    )
    # Where registration has each tile at the end: as measured, plus later moves of its part.
    measured = np.array([session.registrar.current_offset_nm(step.request.request_id) for step in steps])
    true = np.array([microscope.exposure_truth(step.request.request_id).offset_nm for step in steps])
    # One translation relates the session's frame to the specimen's.
    frame = np.median(measured - true, axis=0) if steps else np.zeros(2)
    tiles = []
    placed_errors, single_errors = [], []
    earlier: list[np.ndarray] = []
    for step, offset_m, offset_t in zip(steps, measured, true, strict=True):
        tile_extent = _true_extent(step.tile.extent_nm, offset_t)
        overlap = max((_overlap_nm(tile_extent, other) for other in earlier), default=0.0)
        earlier.append(tile_extent)
        residual = offset_m - offset_t - frame
        survey_frame_residual = (
            float(np.hypot(*(np.asarray(step.placement.offset_nm) - (offset_t - survey_truth))))
            if survey_truth is not None
            else None
        )
        columns = step.columns
        if columns is not None and len(columns):
            x_true, y_true = microscope.true_position_nm(
                step.request.request_id, columns.row_px, columns.col_px
            )
            distance, nearest = truth_tree.query(np.stack([x_true, y_true], 1), distance_upper_bound=0.1)
            found = np.isfinite(distance)
            final = dataclasses.replace(step.placement, offset_nm=tuple(offset_m))
            placed = final.apply(columns)
            target = truth_points[nearest[found]]
            placed_errors.append(np.stack([placed.x_nm[found], placed.y_nm[found]], 1) - frame - target)
            single_errors.append(np.stack([x_true[found], y_true[found]], 1) - target)
        tiles.append(
            {
                "request_id": step.request.request_id,
                "method": step.placement.method,
                "registered": step.placement.registered,
                "true_overlap_nm": overlap,
                "residual_nm": float(np.hypot(*residual)),
                "survey_frame_residual_nm": survey_frame_residual,
                "claimed_sigma_nm": step.placement.sigma_nm,
                "quality": step.placement.quality,
                "register_s": step.timings.get("register", float("nan")),
            }
        )
    graph = session.graph
    points = np.stack([graph.x_nm, graph.y_nm], 1)
    close = (
        cKDTree(points).query_pairs(0.4 * spacing, output_type="ndarray") if len(graph) else np.zeros((0, 2))
    )
    close_nodes = np.unique(close.ravel()).size
    # A duplicate is one column seen twice: both nodes of the pair image the same true column.
    if close.size:
        _, imaged = truth_tree.query(points - frame)
        close = close[imaged[close[:, 0]] == imaged[close[:, 1]]]
    duplicates = np.unique(close.ravel()).size
    # Pairs inside one tile are the column finder's double detections, not stitching.
    between = close[graph.first_tile[close[:, 0]] != graph.first_tile[close[:, 1]]] if close.size else close
    duplicates_between = np.unique(between.ravel()).size
    scores = session.node_scores()
    interior = graph.interior & np.isfinite(scores)
    near_seam = np.zeros(len(graph), dtype=bool)
    extents = [np.asarray(extent) for extent in graph.tile_extents]
    # Inside each tile's extent, a spacing in from its edges: a seam is a tile edge inside another
    # tile (the border of the scanned area is no seam).
    inside = [
        (points[:, 0] > e[0] + spacing) & (points[:, 0] < e[1] - spacing)
        & (points[:, 1] > e[2] + spacing) & (points[:, 1] < e[3] - spacing)
        for e in extents
    ]  # fmt: skip
    for index, extent in enumerate(extents):
        inside_other = np.zeros(len(graph), dtype=bool)
        for other, within in enumerate(inside):
            if other != index:
                inside_other |= within
        for axis, edge in ((0, extent[0]), (0, extent[1]), (1, extent[2]), (1, extent[3])):
            low, high = (extent[2], extent[3]) if axis == 0 else (extent[0], extent[1])
            along = points[:, 1 - axis]
            on_edge = (np.abs(points[:, axis] - edge) <= spacing) & (along >= low) & (along <= high)
            near_seam |= on_edge & inside_other
    seam_scores, inner_scores = scores[interior & near_seam], scores[interior & ~near_seam]
    placed_all = np.concatenate(placed_errors) if placed_errors else np.zeros((0, 2))
    single_all = np.concatenate(single_errors) if single_errors else np.zeros((0, 2))
    return {
        "tiles": tiles,
        "nodes": len(graph),
        "duplicate_nodes": int(duplicates),
        "duplicate_fraction": duplicates / max(len(graph), 1),
        "duplicate_fraction_between_tiles": duplicates_between / max(len(graph), 1),
        "close_pair_fraction": close_nodes / max(len(graph), 1),
        "stitched_rms_nm": float(np.sqrt((placed_all**2).sum(axis=1).mean())) if placed_all.size else None,
        "single_tile_rms_nm": float(np.sqrt((single_all**2).sum(axis=1).mean())) if single_all.size else None,
        "seam_nodes": int(seam_scores.size),
        "seam_over_interior_score": float(np.median(seam_scores) / np.median(inner_scores))
        if seam_scores.size and inner_scores.size and np.median(inner_scores) > 0
        else None,
    }


def run_case(instrument: SimulatorConfig, policy: str, seed: int) -> dict[str, Any]:
    """One session of ``policy`` on the benchmark specimen of ``seed`` under ``instrument``.

    A raster session starts from one tile and grows as a mosaic, as a microscopist stitching
    an area would; a guided one starts from its usual spread-out tiles.
    """
    config = instrument.model_copy(update={"seed": seed})
    specimen = generate_specimen(config.specimen, seed)
    # A fixed session id: a rerun of the benchmark journals the same request ids.
    update: dict[str, Any] = {"policy": policy, "seed": seed, "session_id": f"bench-{policy}-{seed}"}
    if policy == "raster":
        update["start_tiles"] = 1
    session_config = SESSION.model_copy(update=update)
    with SimulatedMicroscope(config, specimen) as microscope:
        session = Session(microscope, session_config)
        session.run()
        return evaluate_session(session, microscope, specimen)


def _median(values: list[float]) -> float | None:
    finite = [v for v in values if v is not None and np.isfinite(v)]
    return float(statistics.median(finite)) if finite else None


def _spread(values: list[float]) -> dict[str, float | None]:
    finite = [v for v in values if v is not None and np.isfinite(v)]
    if not finite:
        return {"mean": None, "std": None}
    return {"mean": float(np.mean(finite)), "std": float(np.std(finite))}


def summarise_cases(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Figures over the sessions of one instrument: means and spreads over seeds, pooled tile medians."""
    tiles = [tile for case in cases for tile in case["tiles"]]
    with_overlap = [t for t in tiles if t["true_overlap_nm"] >= 1.0]
    by_method: dict[str, Any] = {}
    for method in ("overlap", "lattice", "survey", "predicted"):
        chosen = [t for t in tiles if t["method"] == method]
        by_method[method] = {
            "tiles": len(chosen),
            "residual_median_nm": _median([t["residual_nm"] for t in chosen]),
            "survey_frame_residual_median_nm": _median([t["survey_frame_residual_nm"] for t in chosen]),
            "within_2_sigma": float(np.mean([t["residual_nm"] <= 2 * t["claimed_sigma_nm"] for t in chosen]))
            if chosen
            else None,
        }
    ratios = [
        c["stitched_rms_nm"] / c["single_tile_rms_nm"]
        for c in cases
        if c["stitched_rms_nm"] is not None and c["single_tile_rms_nm"]
    ]
    return {
        "sessions": len(cases),
        "tiles": len(tiles),
        "duplicate_fraction": _spread([c["duplicate_fraction"] for c in cases]),
        "duplicate_fraction_between_tiles": _spread([c["duplicate_fraction_between_tiles"] for c in cases]),
        "close_pair_fraction": _spread([c["close_pair_fraction"] for c in cases]),
        "tiles_with_1nm_overlap": len(with_overlap),
        "overlap_residual_median_nm": _median([t["residual_nm"] for t in with_overlap]),
        "overlap_registered_share": float(np.mean([t["method"] == "overlap" for t in with_overlap]))
        if with_overlap
        else None,
        "by_method": by_method,
        "stitched_rms_nm": _spread([c["stitched_rms_nm"] for c in cases]),
        "single_tile_rms_nm": _spread([c["single_tile_rms_nm"] for c in cases]),
        "stitched_over_single_rms": _spread(ratios),
        "seam_over_interior_score": _spread([c["seam_over_interior_score"] for c in cases]),
        "register_median_s": _median([t["register_s"] for t in tiles]),
    }


def benchmark_stitching(
    seeds: Sequence[int] = SEEDS, policies: Sequence[str] = ("raster", "guided"), progress: bool = True
) -> dict[str, Any]:
    """Run every instrument x policy x seed and summarise against the targets.

    Parameters
    ----------
    seeds : sequence of int
        Specimen seeds.
    policies : sequence of str
        Session policies.
    progress : bool
        Show a progress bar.

    Returns
    -------
    dict
        ``machine``, ``results[instrument][policy]`` summaries, the raw ``cases``, and
        ``target_results`` (each target with its worst measured value and whether it is met).
    """
    chosen = instruments()
    results: dict[str, Any] = {}
    cases: dict[str, Any] = {}
    total = len(chosen) * len(policies) * len(seeds)
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("stitching sessions", total=total)
        for name, instrument in chosen.items():
            results[name], cases[name] = {}, {}
            for policy in policies:
                runs = []
                for seed in seeds:
                    runs.append(run_case(instrument, policy, seed))
                    bar.advance(task)
                cases[name][policy] = runs
                results[name][policy] = summarise_cases(runs)
    return {
        "benchmark": "stitching",
        "machine": machine_info(),
        "seeds": list(seeds),
        "session": SESSION.model_dump(mode="json"),
        "results": results,
        "cases": cases,
        "target_results": target_results(results),
    }


def target_results(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target per instrument and policy: measured value, required value, met or not."""
    rows = []
    for instrument, policies in results.items():
        for policy, summary in policies.items():
            measured = {
                "duplicate_fraction": summary["duplicate_fraction"]["mean"],
                "overlap_residual_median_nm": summary["overlap_residual_median_nm"],
                "survey_residual_median_nm": summary["by_method"]["survey"][
                    "survey_frame_residual_median_nm"
                ],
                "stitched_over_single_rms": summary["stitched_over_single_rms"]["mean"],
                "seam_over_interior_score": summary["seam_over_interior_score"]["mean"],
                "register_median_s": summary["register_median_s"],
            }
            for key, required in TARGETS.items():
                value = measured[key]
                rows.append(
                    {
                        "instrument": instrument,
                        "policy": policy,
                        "target": key,
                        "measured": value,
                        "required_at_most": required,
                        "met": None if value is None else bool(value <= required),
                    }
                )
    return rows


def format_report(report: dict[str, Any]) -> str:
    """The benchmark's table as text."""

    def number(value: float | None, digits: int = 3) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    lines = [
        "stitching: raster and guided sessions, 512^2 tiles with ~3 nm overlap, 40 x 40 nm specimens, "
        f"seeds {report['seeds']}",
        f"{'instrument':<26} {'policy':<7} {'dup %':>12} {'between %':>10} {'close %':>8} {'ovl res nm':>11} "
        f"{'ovl reg':>8} "
        f"{'lattice':>8} {'survey res':>11} {'RMS ratio':>13} {'seam/int':>12} {'reg ms':>7}",
    ]
    for instrument, policies in report["results"].items():
        for policy, s in policies.items():
            dup = s["duplicate_fraction"]
            ratio = s["stitched_over_single_rms"]
            seam = s["seam_over_interior_score"]
            lattice = s["by_method"]["lattice"]["tiles"]
            lines.append(
                f"{instrument:<26} {policy:<7} "
                f"{number(None if dup['mean'] is None else 100 * dup['mean'], 2):>5}±"
                f"{number(None if dup['std'] is None else 100 * dup['std'], 2):<6} "
                f"{number(100 * s['duplicate_fraction_between_tiles']['mean'], 2):>10} "
                f"{number(100 * s['close_pair_fraction']['mean'], 2):>8} "
                f"{number(s['overlap_residual_median_nm'], 4):>11} "
                f"{number(s['overlap_registered_share'], 2):>8} {lattice:>8} "
                f"{number(s['by_method']['survey']['survey_frame_residual_median_nm'], 3):>11} "
                f"{number(ratio['mean'], 2):>6}±{number(ratio['std'], 2):<6} "
                f"{number(seam['mean'], 2):>5}±{number(seam['std'], 2):<6} "
                f"{number(None if s['register_median_s'] is None else 1e3 * s['register_median_s'], 1):>7}"
            )
    lines.append("")
    for row in report["target_results"]:
        verdict = "n/a" if row["met"] is None else ("met" if row["met"] else "MISSED")
        lines.append(
            f"  {row['instrument']:<26} {row['policy']:<7} {row['target']:<28} "
            f"{number(row['measured'], 4):>9} <= {row['required_at_most']:<7g} {verdict}"
        )
    return "\n".join(lines)
