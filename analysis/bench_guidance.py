"""``micrography bench guidance``: how much of what matters each policy finds per tile and per dose.

Every policy runs a session on several specimen seeds (layout ``default``, the
spatially structured films of the simulator), optionally on specimens of the
layout family (:mod:`simulator.layouts`), and on one ``control`` specimen
whose features are placed uniformly at random with no survey contrast, where
no honest policy can beat random by much. For each session the discovery curve
is recorded: the fraction of planted features *imaged* (a high-resolution tile
covering the feature was acquired) against tiles and dose, and the fraction
*detected* (one of the feature's nodes scores above the session's threshold) at
10 %, 25 % and 50 % of the tiles needed to cover the whole stage.

Targets: at 25 % of the tiles the guided policy has imaged >= 80 % of the
planted features and >= 1.3x what the image-only spatial GP has imaged; median
decision latency (tile in -> next request out, acquisition excluded) <= 0.15 s
on 2 CPU cores.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np
from rich.progress import Progress

from agent.benchmarking import machine_info, mean_spread
from agent.errors import ConfigError
from agent.policy import POLICY_NAMES, GuidedPolicy
from agent.session import DECISION_STAGES, BudgetConfig, Session, SessionConfig, StepRecord
from agent.survey import CandidateGrid
from analysis.guidance import DiscoveryTracker, detected_features, true_offsets
from simulator.config import SimulatorConfig
from simulator.drivers import SimulatedMicroscope
from simulator.layouts import layout_specimen
from simulator.specimen import generate_specimen

ABLATIONS: dict[str, tuple[str, dict[str, dict[str, Any]]]] = {
    "no_gp": ("guided", {"acquisition": {"use_surrogate": False}}),
    "gp_position": ("guided", {"acquisition": {"survey_prior": 0.0, "wall_follow": 0.0, "saturation": 0.0}}),
    "survey_only": (
        "guided",
        {"acquisition": {"use_surrogate": False, "wall_follow": 0.0, "saturation": 0.0}},
    ),
    "guided_log1p": (
        "guided",
        {"acquisition": {"interest_transform": "log1p"}, "surrogate": {"lengthscale_prior_sigma": 0.5}},
    ),
    "guided_learned": (
        "guided",
        {
            "acquisition": {"interest_transform": "log1p", "learn_weights": True},
            "surrogate": {"lengthscale_prior_sigma": 0.5},
        },
    ),
}
"""Variants of the guided policy: name -> (policy, settings changed per section of the session config).

``no_gp`` keeps the survey prior, wall following and saturation with their fixed weights but
learns nothing from the tiles; ``gp_position`` is the Gaussian process on stage position alone;
``survey_only`` ranks candidates by the survey prior (and travel) only; ``guided_log1p`` models
log(1 + interest) with a log-normal prior on the lengthscale (heavy-tailed interest);
``guided_learned`` also makes the survey prior and the walls inputs of the model, with weights it
learns (``acquisition.learn_weights``).
"""

VARIANTS: tuple[str, ...] = (*POLICY_NAMES, *ABLATIONS)
"""What a guidance benchmark can compare: the policies and the ablations of the guided one."""

LATE_AFTER_TILES = 30
"""The late-session discovery rate counts features imaged per tile after this many tiles."""

BUDGET_FRACTIONS: tuple[float, ...] = (0.10, 0.25, 0.50)
DEFAULT_SEEDS: tuple[int, ...] = (0, 1, 2, 3, 4)
CONTROL_SEED = 100
TARGETS: dict[str, Any] = {
    "guided_imaged_at_25": 0.84,
    "guided_over_image_gp_at_25": 1.3,
    "median_step_s": 0.15,
    # On the held-out layout family (judged when the benchmark ran family specimens):
    "family_guided_imaged_at_25": 0.85,
    "family_guided_strict_imaged_at_25": 0.70,
    "family_guided_worst_decile_at_25": 0.65,
    "family_guided_over_random_at_25": 1.6,
    "family_guided_late_rate_over_random": 1.5,
    "family_guided_over_no_gp_at_25": 1.15,
    "family_calibration_within_68": (0.61, 0.75),
    "family_calibration_within_95": (0.90, 0.99),
}
"""What the guided policy must reach; pairs are (low, high) ranges."""


def budget_tiles(grid_tiles: int, fractions: Sequence[float] = BUDGET_FRACTIONS) -> dict[int, float]:
    """Tile count at each budget fraction (at least one tile), as the benchmark counts it.

    Parameters
    ----------
    grid_tiles : int
        Tiles needed to cover the stage.
    fractions : sequence of float
        Budgets as fractions of ``grid_tiles``.

    Returns
    -------
    dict
        ``{tiles: fraction}``.
    """
    return {max(1, round(fraction * grid_tiles)): fraction for fraction in fractions}


def run_policy_session(
    policy: str,
    seed: int,
    layout: str = "default",
    budgets: Sequence[float] = BUDGET_FRACTIONS,
    session: SessionConfig | None = None,
    instrument: str = "realistic",
) -> dict[str, Any]:
    """One session of one policy on one specimen, with its discovery curve.

    A session runs to the largest budget; the smaller budgets are checkpoints on the way.
    No policy plans on the budget left, so a checkpoint equals a session stopped there.

    Parameters
    ----------
    policy : str
        Policy name or ablation (:data:`ABLATIONS`).
    seed : int
        Specimen and session seed.
    layout : str
        ``"default"``, ``"control"`` or ``"family"`` (:func:`simulator.layouts.layout_specimen`).
    budgets : sequence of float
        Checkpoints, as fractions of the tiles needed to cover the stage, in (0, 1].
    session : SessionConfig, optional
        Session settings (policy, seed and budget are set here).
    instrument : str
        ``"realistic"`` (the simulator's default: placement error, drift, scan distortions)
        or ``"ideal"`` (every instrument error off).

    Returns
    -------
    dict
        ``curve`` (per tile: tiles, dose, imaged fraction lenient and strict), ``checkpoints``
        (imaged, strictly imaged and detected fraction at each budget fraction),
        ``step_latency_s``, ``total_features``, ``strict_total_features`` and ``calibration``
        (:meth:`agent.policy.GuidedPolicy.calibration` without the per-tile list; None for
        policies without a model).
    """
    check_budgets(budgets)
    base_policy, changes = ABLATIONS.get(policy, (policy, {}))
    simulator = SimulatorConfig(seed=seed, specimen=layout_specimen(layout, seed))
    if instrument == "ideal":
        simulator = simulator.ideal_instrument()
    elif instrument != "realistic":
        raise ConfigError(f"instrument must be 'realistic' or 'ideal', got {instrument!r}")
    specimen = generate_specimen(simulator.specimen, seed)
    base = session or SessionConfig()
    with SimulatedMicroscope(simulator, specimen) as microscope:
        grid = CandidateGrid.tiling(microscope.describe(), base.tiles.shape, base.tiles.pixel_size_nm)
        checkpoints = budget_tiles(len(grid), budgets)
        budget = max(checkpoints)
        # A fixed session id: a rerun of the benchmark journals the same request ids.
        sections = {name: getattr(base, name).model_copy(update=values) for name, values in changes.items()}
        config = base.model_copy(
            update={"policy": base_policy, "seed": seed, "budget": BudgetConfig(max_tiles=budget),
                    "session_id": base.session_id or f"bench-{policy}-{layout}-{seed}", **sections}
        )  # fmt: skip
        tracker = DiscoveryTracker(specimen, grid, true_offsets(microscope))
        results: dict[float, dict[str, float]] = {}
        latencies: list[float] = []
        holder: dict[str, Session] = {}

        def on_step(record: StepRecord) -> None:
            tracker(record)
            if record.kind == "guided":
                latencies.append(sum(record.timings.get(stage, 0.0) for stage in DECISION_STAGES))
            tiles = len(tracker.curve)
            if record.kind != "survey" and tiles in checkpoints:
                detected = detected_features(holder["session"], specimen)
                results[checkpoints[tiles]] = {
                    "imaged_fraction": len(tracker.imaged) / tracker.total,
                    "strict_imaged_fraction": len(tracker.strict_imaged) / max(tracker.strict_total, 1),
                    "detected_fraction": len(detected) / tracker.total,
                    "tiles": tiles,
                    "mean_dose_e_per_a2": record.extra.get("mean_dose_e_per_a2", float("nan")),
                }

        truth = tracker.candidates if base_policy == "oracle" else None
        holder["session"] = Session(microscope, config, on_step=on_step, truth=truth)
        holder["session"].run()
        calibration = None
        guided = holder["session"].policy
        if isinstance(guided, GuidedPolicy) and guided.config.use_surrogate:
            calibration = {k: v for k, v in guided.calibration().items() if k != "predictions"}
    return {
        "policy": policy,
        "seed": seed,
        "layout": layout,
        "grid_tiles": len(grid),
        "total_features": tracker.total,
        "strict_total_features": tracker.strict_total,
        "calibration": calibration,
        "curve": tracker.curve,
        "checkpoints": results,
        "step_latency_s": latencies,
    }


def check_budgets(budgets: Sequence[float], what: str = "budgets") -> None:
    """Refuse an empty budget list or a budget outside (0, 1] before any session starts.

    Parameters
    ----------
    budgets : sequence of float
        Budget fractions of the tiles covering the stage.
    what : str
        How the message names them (an option, for the command line).

    Raises
    ------
    ConfigError
        Naming the first bad budget.
    """
    if not budgets:
        raise ConfigError(f"{what}: give at least one budget fraction")
    for fraction in budgets:
        if not (math.isfinite(fraction) and 0 < fraction <= 1):
            raise ConfigError(f"{what}: a budget fraction lies in (0, 1], got {fraction:g}")


def guidance_tasks(
    seeds: Sequence[int] = DEFAULT_SEEDS,
    policies: Sequence[str] = VARIANTS,
    control_seed: int | None = CONTROL_SEED,
    budgets: Sequence[float] = BUDGET_FRACTIONS,
    instrument: str = "realistic",
    family_seeds: Sequence[int] = (),
) -> list[dict[str, Any]]:
    """The sessions of a guidance benchmark, one task each, in the benchmark's order.

    Parameters
    ----------
    seeds : sequence of int
        Default-layout specimen seeds.
    policies : sequence of str
        Policies and ablations to compare (:data:`VARIANTS`).
    control_seed : int or None
        Seed of the control specimen (None skips it).
    budgets : sequence of float
        Budget checkpoints, fractions of the tiles covering the stage.
    instrument : str
        ``"realistic"`` or ``"ideal"``.
    family_seeds : sequence of int
        Seeds of the layout family (:func:`simulator.layouts.family_specimen`).

    Returns
    -------
    list of dict
        Per session: ``policy``, ``seed``, ``layout``, ``budgets`` and ``instrument``, the
        arguments of :func:`run_guidance_task`.

    Raises
    ------
    ConfigError
        For an unknown policy or instrument or a bad budget, before any session runs.
    """
    check_budgets(budgets)
    unknown = [policy for policy in policies if policy not in VARIANTS]
    if unknown or not policies:
        named = repr(unknown[0]) if unknown else "(none given)"
        raise ConfigError(f"unknown policy {named}; choose from {', '.join(VARIANTS)}")
    if instrument not in ("realistic", "ideal"):
        raise ConfigError(f"instrument must be 'realistic' or 'ideal', got {instrument!r}")
    specimens = [(seed, "default") for seed in seeds]
    specimens += [(seed, "family") for seed in family_seeds]
    if control_seed is not None:
        specimens.append((control_seed, "control"))
    return [
        {"policy": policy, "seed": int(seed), "layout": layout,
         "budgets": sorted(float(b) for b in set(budgets)), "instrument": instrument}
        for seed, layout in specimens
        for policy in policies
    ]  # fmt: skip


def run_guidance_task(task: dict[str, Any]) -> dict[str, Any]:
    """Run one task of :func:`guidance_tasks`: one session, and the figures the benchmark keeps.

    The same function serves ``micrography bench guidance`` and ``micrography sweep guidance``.

    Parameters
    ----------
    task : dict
        ``policy``, ``seed``, ``layout``, ``budgets``, ``instrument``.

    Returns
    -------
    dict
        :func:`run_policy_session`'s result, with the checkpoints keyed by budget fraction as
        text (JSON object keys) and ``area`` (area under the imaged curve up to the largest budget).
    """
    result = run_policy_session(
        task["policy"], task["seed"], task["layout"], task["budgets"], instrument=task["instrument"]
    )
    result["checkpoints"] = {
        repr(float(fraction)): figures for fraction, figures in result["checkpoints"].items()
    }
    result["area"] = _area_under(
        result["curve"], result["grid_tiles"], "imaged_fraction", max(task["budgets"])
    )
    result["late_rate"] = late_discovery_rate(result["curve"], result["total_features"])
    return result


def late_discovery_rate(
    curve: list[dict[str, float]], total_features: int, after_tiles: int = LATE_AFTER_TILES
) -> float | None:
    """Planted features imaged per tile after the first ``after_tiles`` tiles of a session.

    Parameters
    ----------
    curve : list of dict
        The session's discovery curve (``tiles``, ``imaged_fraction``), one point per tile.
    total_features : int
        Planted features of the specimen.
    after_tiles : int
        Tiles before the late part begins.

    Returns
    -------
    float or None
        Features per tile, lenient scoring; None when the session took no more than
        ``after_tiles`` tiles.

    Examples
    --------
    >>> curve = [{"tiles": t, "imaged_fraction": min(t, 40) / 100} for t in range(1, 51)]
    >>> round(late_discovery_rate(curve, 100), 3)
    0.5
    """
    if len(curve) <= after_tiles:
        return None
    start, end = curve[after_tiles - 1], curve[-1]
    gained = (end["imaged_fraction"] - start["imaged_fraction"]) * total_features
    return float(gained / (end["tiles"] - start["tiles"]))


def _area_under(curve: list[dict[str, float]], grid_tiles: int, key: str, until: float) -> float:
    """Area under a discovery curve against the fraction of tiles, normalised to [0, 1] up to ``until``."""
    fractions = np.array([0.0] + [point["tiles"] / grid_tiles for point in curve])
    values = np.array([0.0] + [point[key] for point in curve])
    keep = fractions <= until + 1e-9
    return float(np.trapezoid(values[keep], fractions[keep]) / until)


def benchmark_guidance(
    seeds: Sequence[int] = DEFAULT_SEEDS,
    policies: Sequence[str] = VARIANTS,
    control_seed: int | None = CONTROL_SEED,
    budgets: Sequence[float] = BUDGET_FRACTIONS,
    instrument: str = "realistic",
    family_seeds: Sequence[int] = (),
) -> dict[str, Any]:
    """Run every policy on every seed (and the control specimen) and collect the discovery figures.

    Sessions run one after another in this process; ``micrography sweep guidance`` runs the
    same tasks (:func:`guidance_tasks`, :func:`run_guidance_task`) on a Dask cluster and
    gathers them with the same :func:`guidance_report`.

    Parameters
    ----------
    seeds : sequence of int
        Default-layout specimen seeds.
    policies : sequence of str
        Policies to compare.
    control_seed : int or None
        Seed of the control specimen (None skips it).
    budgets : sequence of float
        Budget checkpoints, as fractions of the tiles covering the stage.
    instrument : str
        ``"realistic"`` or ``"ideal"`` (see :func:`run_policy_session`).
    family_seeds : sequence of int
        Seeds of the layout family.

    Returns
    -------
    dict
        See :func:`guidance_report`.
    """
    tasks = guidance_tasks(seeds, policies, control_seed, budgets, instrument, family_seeds)
    results = []
    with Progress(transient=True) as progress:
        bar = progress.add_task("guided-session benchmark", total=len(tasks))
        for task in tasks:
            results.append(run_guidance_task(task))
            progress.advance(bar)
    return guidance_report(results, budgets, instrument)


def guidance_report(
    results: Sequence[dict[str, Any]],
    budgets: Sequence[float] = BUDGET_FRACTIONS,
    instrument: str = "realistic",
) -> dict[str, Any]:
    """Gather the results of :func:`run_guidance_task` into the benchmark's tables.

    Parameters
    ----------
    results : sequence of dict
        One per session, in task order.
    budgets : sequence of float
        The budget checkpoints the sessions ran with.
    instrument : str
        The instrument they ran on (recorded in the report).

    Returns
    -------
    dict
        ``instrument``, ``budgets``, ``rows`` (``policy``, ``layout``, ``seed``,
        ``budget_fraction``, ``imaged_fraction``, ``detected_fraction``), ``curves`` (per
        session: ``policy``, ``layout``, ``seed``, ``grid_tiles``, ``total_features`` and
        ``points``, one per tile with ``tiles``, ``mean_dose_e_per_a2`` and ``imaged_fraction``),
        ``areas`` (area under the imaged curve per policy and layout), ``latency``
        (``median_step_s``, ``p95_step_s``), ``targets``, ``target_results``
        (:func:`target_results`), ``machine``.
    """
    rows: list[dict[str, Any]] = []
    curves: list[dict[str, Any]] = []
    areas: dict[str, list[float]] = {}
    late: dict[str, list[float]] = {}
    calibrations: dict[str, list[float]] = {}
    latencies: list[float] = []
    for result in results:
        policy, seed, layout = result["policy"], result["seed"], result["layout"]
        for key, figures in sorted(result["checkpoints"].items(), key=lambda item: float(item[0])):
            rows.append(
                {
                    "policy": policy,
                    "layout": layout,
                    "seed": seed,
                    "budget_fraction": float(key),
                    "imaged_fraction": figures["imaged_fraction"],
                    "strict_imaged_fraction": figures.get("strict_imaged_fraction"),
                    "detected_fraction": figures["detected_fraction"],
                    "tiles": figures["tiles"],
                    "mean_dose_e_per_a2": figures["mean_dose_e_per_a2"],
                }
            )
        curves.append(
            {
                "policy": policy,
                "layout": layout,
                "seed": seed,
                "grid_tiles": result["grid_tiles"],
                "total_features": result["total_features"],
                "points": result["curve"],
            }
        )
        areas.setdefault(f"{policy}/{layout}", []).append(result["area"])
        if result.get("late_rate") is not None:
            late.setdefault(f"{policy}/{layout}", []).append(result["late_rate"])
        calibration = result.get("calibration")
        if calibration and calibration["tiles"]:
            pooled = calibrations.setdefault(f"{policy}/{layout}", [0, 0.0, 0.0])
            pooled[0] += calibration["tiles"]
            pooled[1] += calibration["within_68"] * calibration["tiles"]
            pooled[2] += calibration["within_95"] * calibration["tiles"]
        if policy == "guided":
            latencies.extend(result["step_latency_s"])
    median_step = statistics.median(latencies) if latencies else None
    late_summary = {name: mean_spread(values) for name, values in late.items()}
    calibration_summary = {
        name: {"tiles": int(tiles), "within_68": in68 / tiles, "within_95": in95 / tiles}
        for name, (tiles, in68, in95) in calibrations.items()
    }
    return {
        "benchmark": "guidance",
        "budgets": sorted(float(b) for b in set(budgets)),
        "rows": rows,
        "curves": curves,
        "areas": {name: float(np.mean(values)) for name, values in areas.items()},
        "late_rate": late_summary,
        "calibration": calibration_summary,
        "latency": {
            "median_step_s": median_step,
            "p95_step_s": float(np.percentile(latencies, 95)) if latencies else None,
            "steps": len(latencies),
            "stages": list(DECISION_STAGES),
        },
        "targets": TARGETS,
        "target_results": target_results(rows, median_step, late_summary, calibration_summary),
        "instrument": instrument,
        "machine": machine_info(),
    }


def _mean_fraction(
    rows: list[dict[str, Any]], policy: str, layout: str, budget_fraction: float, key: str
) -> float | None:
    """Mean of ``key`` (imaged or detected fraction) over the seeds of one policy, layout and budget.

    None when no row matches (or none holds ``key``: reports written before strict scoring).
    """
    values = [
        row[key]
        for row in rows
        if (row["policy"], row["layout"]) == (policy, layout)
        and abs(row["budget_fraction"] - budget_fraction) < 1e-9
        and row.get(key) is not None
    ]
    return float(np.mean(values)) if values else None


def _at_least(value: float, target: float) -> bool:
    return value >= target


def _at_most(value: float, target: float) -> bool:
    return value <= target


def _within(value: float, target: tuple[float, float]) -> bool:
    return target[0] <= value <= target[1]


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None:
        return None
    if denominator == 0:
        return math.inf if numerator > 0 else None
    return numerator / denominator


def target_results(
    rows: list[dict[str, Any]],
    median_step_s: float | None,
    late_rate: dict[str, dict[str, float]] | None = None,
    calibration: dict[str, dict[str, float]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Each of :data:`TARGETS` with what was measured and whether it is met.

    Parameters
    ----------
    rows : list of dict
        The benchmark's rows (``policy``, ``layout``, ``seed``, ``budget_fraction``,
        ``imaged_fraction``, ``strict_imaged_fraction``).
    median_step_s : float or None
        Median decision latency of the guided sessions, s.
    late_rate : dict, optional
        Late-session discovery rate per ``policy/layout`` (mean and spread).
    calibration : dict, optional
        Pooled interval coverage per ``policy/layout``.

    Returns
    -------
    dict
        Per target name: ``target``, ``measured`` (None when not measured; a ratio over zero
        is infinite when the numerator is positive) and ``met`` (None when not measured).
    """
    late_rate = late_rate or {}
    calibration = calibration or {}
    guided = _mean_fraction(rows, "guided", "default", 0.25, "imaged_fraction")
    anchor = _mean_fraction(rows, "image_gp", "default", 0.25, "imaged_fraction")
    family = [
        row["imaged_fraction"]
        for row in rows
        if (row["policy"], row["layout"]) == ("guided", "family")
        and abs(row["budget_fraction"] - 0.25) < 1e-9
    ]
    family_guided = _mean_fraction(rows, "guided", "family", 0.25, "imaged_fraction")

    def late(policy: str) -> float | None:
        entry = late_rate.get(f"{policy}/family")
        return None if entry is None else entry["mean"]

    covered = calibration.get("guided/family")
    measured = {
        "guided_imaged_at_25": (guided, _at_least),
        "guided_over_image_gp_at_25": (_ratio(guided, anchor), _at_least),
        "median_step_s": (median_step_s, _at_most),
        "family_guided_imaged_at_25": (family_guided, _at_least),
        "family_guided_strict_imaged_at_25": (
            _mean_fraction(rows, "guided", "family", 0.25, "strict_imaged_fraction"),
            _at_least,
        ),
        "family_guided_worst_decile_at_25": (float(np.percentile(family, 10)) if family else None, _at_least),
        "family_guided_over_random_at_25": (
            _ratio(family_guided, _mean_fraction(rows, "random", "family", 0.25, "imaged_fraction")),
            _at_least,
        ),
        "family_guided_late_rate_over_random": (_ratio(late("guided"), late("random")), _at_least),
        "family_guided_over_no_gp_at_25": (
            _ratio(family_guided, _mean_fraction(rows, "no_gp", "family", 0.25, "imaged_fraction")),
            _at_least,
        ),
        "family_calibration_within_68": (
            None if covered is None else covered["within_68"],
            _within,
        ),
        "family_calibration_within_95": (
            None if covered is None else covered["within_95"],
            _within,
        ),
    }
    return {
        name: {
            "target": TARGETS[name],
            "measured": value,
            "met": None if value is None else bool(holds(value, TARGETS[name])),
        }
        for name, (value, holds) in measured.items()
    }


def format_report(report: dict[str, Any]) -> str:
    """Mean imaged (lenient, strict) and detected fractions per policy, layout and budget, as text."""
    budgets = report.get("budgets", BUDGET_FRACTIONS)
    rows = report["rows"]
    lines = [
        f"instrument: {report.get('instrument', 'realistic')}",
        f"{'policy':<11} {'layout':<8} "
        + " ".join(f"{f'{f * 100:g}% tiles':>16}" for f in budgets)
        + f" {'AUC':>6} {'late rate':>11}",
    ]
    keys = sorted({(row["policy"], row["layout"]) for row in rows}, key=lambda k: (k[1], k[0]))
    for policy, layout in keys:
        cells = []
        for fraction in budgets:
            values = [
                _mean_fraction(rows, policy, layout, fraction, key)
                for key in ("imaged_fraction", "strict_imaged_fraction", "detected_fraction")
            ]
            cells.append("/".join("-" if v is None else f"{v:.2f}" for v in values))
        area = report["areas"].get(f"{policy}/{layout}", float("nan"))
        late = report.get("late_rate", {}).get(f"{policy}/{layout}")
        late_cell = "-" if late is None else f"{late['mean']:.3f}±{late['std']:.3f}"
        lines.append(
            f"{policy:<11} {layout:<8} "
            + " ".join(f"{cell:>16}" for cell in cells)
            + f" {area:>6.3f} {late_cell:>11}"
        )
    lines.append(
        "cells: imaged / strictly imaged / detected fraction of planted features (mean over seeds); "
        f"late rate: features imaged per tile after {LATE_AFTER_TILES} tiles (mean ± sd)"
    )
    for name, covered in sorted(report.get("calibration", {}).items()):
        lines.append(
            f"calibration {name}: {covered['within_68']:.0%} of {covered['tiles']} new tiles inside the "
            f"68 % predictive interval, {covered['within_95']:.0%} inside the 95 % one"
        )
    latency = report["latency"]
    if latency["median_step_s"] is not None:
        lines.append(
            f"decision latency (tile in -> next request out): median {latency['median_step_s']:.3f} s, "
            f"p95 {latency['p95_step_s']:.3f} s over {latency['steps']} steps"
        )
    for name, result in report.get("target_results", {}).items():
        target = result["target"]
        target_text = f"{target[0]:g}-{target[1]:g}" if isinstance(target, list | tuple) else f"{target:g}"
        if result["measured"] is None:
            lines.append(f"target {name}: {target_text} (not measured)")
        else:
            verdict = "met" if result["met"] else "NOT met"
            lines.append(f"target {name}: {target_text}, measured {result['measured']:.3f}: {verdict}")
    return "\n".join(lines)
