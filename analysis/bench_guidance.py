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

from agent.benchmarking import machine_info
from agent.errors import ConfigError
from agent.policy import POLICY_NAMES
from agent.session import DECISION_STAGES, BudgetConfig, Session, SessionConfig, StepRecord
from agent.survey import CandidateGrid
from analysis.guidance import DiscoveryTracker, detected_features
from simulator.config import SimulatorConfig
from simulator.drivers import SimulatedMicroscope
from simulator.layouts import layout_specimen
from simulator.specimen import generate_specimen

BUDGET_FRACTIONS: tuple[float, ...] = (0.10, 0.25, 0.50)
DEFAULT_SEEDS: tuple[int, ...] = (0, 1, 2, 3, 4)
CONTROL_SEED = 100
TARGETS = {"guided_imaged_at_25": 0.80, "guided_over_image_gp_at_25": 1.3, "median_step_s": 0.15}


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
        Policy name.
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
        ``curve`` (per tile: tiles, dose, imaged fraction), ``checkpoints`` (imaged and detected
        fraction at each budget fraction), ``step_latency_s`` and ``total_features``.
    """
    check_budgets(budgets)
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
        config = base.model_copy(
            update={"policy": policy, "seed": seed, "budget": BudgetConfig(max_tiles=budget),
                    "session_id": base.session_id or f"bench-{policy}-{layout}-{seed}"}
        )  # fmt: skip
        tracker = DiscoveryTracker(specimen, grid)
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
                    "detected_fraction": len(detected) / tracker.total,
                    "tiles": tiles,
                    "mean_dose_e_per_a2": record.extra.get("mean_dose_e_per_a2", float("nan")),
                }

        truth = tracker.candidates if policy == "oracle" else None
        holder["session"] = Session(microscope, config, on_step=on_step, truth=truth)
        holder["session"].run()
    return {
        "policy": policy,
        "seed": seed,
        "layout": layout,
        "grid_tiles": len(grid),
        "total_features": tracker.total,
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
    policies: Sequence[str] = POLICY_NAMES,
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
        Policies to compare.
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
    unknown = [policy for policy in policies if policy not in POLICY_NAMES]
    if unknown or not policies:
        named = repr(unknown[0]) if unknown else "(none given)"
        raise ConfigError(f"unknown policy {named}; choose from {', '.join(POLICY_NAMES)}")
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
    return result


def _area_under(curve: list[dict[str, float]], grid_tiles: int, key: str, until: float) -> float:
    """Area under a discovery curve against the fraction of tiles, normalised to [0, 1] up to ``until``."""
    fractions = np.array([0.0] + [point["tiles"] / grid_tiles for point in curve])
    values = np.array([0.0] + [point[key] for point in curve])
    keep = fractions <= until + 1e-9
    return float(np.trapezoid(values[keep], fractions[keep]) / until)


def benchmark_guidance(
    seeds: Sequence[int] = DEFAULT_SEEDS,
    policies: Sequence[str] = POLICY_NAMES,
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
        if policy == "guided":
            latencies.extend(result["step_latency_s"])
    median_step = statistics.median(latencies) if latencies else None
    return {
        "benchmark": "guidance",
        "budgets": sorted(float(b) for b in set(budgets)),
        "rows": rows,
        "curves": curves,
        "areas": {name: float(np.mean(values)) for name, values in areas.items()},
        "latency": {
            "median_step_s": median_step,
            "p95_step_s": float(np.percentile(latencies, 95)) if latencies else None,
            "steps": len(latencies),
            "stages": list(DECISION_STAGES),
        },
        "targets": TARGETS,
        "target_results": target_results(rows, median_step),
        "instrument": instrument,
        "machine": machine_info(),
    }


def _mean_fraction(
    rows: list[dict[str, Any]], policy: str, layout: str, budget_fraction: float, key: str
) -> float | None:
    """Mean of ``key`` (imaged or detected fraction) over the seeds of one policy, layout and budget.

    None when no row matches.
    """
    values = [
        row[key]
        for row in rows
        if (row["policy"], row["layout"]) == (policy, layout)
        and abs(row["budget_fraction"] - budget_fraction) < 1e-9
    ]
    return float(np.mean(values)) if values else None


def target_results(rows: list[dict[str, Any]], median_step_s: float | None) -> dict[str, dict[str, Any]]:
    """Each of :data:`TARGETS` with what was measured and whether it is met.

    Parameters
    ----------
    rows : list of dict
        The benchmark's rows (``policy``, ``layout``, ``budget_fraction``, ``imaged_fraction``).
    median_step_s : float or None
        Median decision latency of the guided sessions, s.

    Returns
    -------
    dict
        Per target name: ``target``, ``measured`` (None when not measured, and for the ratio
        when the image-only GP imaged nothing) and ``met`` (None when not measured).
    """
    guided = _mean_fraction(rows, "guided", "default", 0.25, "imaged_fraction")
    anchor = _mean_fraction(rows, "image_gp", "default", 0.25, "imaged_fraction")
    ratio = None if guided is None or anchor is None or anchor == 0 else guided / anchor
    measured = {
        "guided_imaged_at_25": (guided, lambda value, target: value >= target),
        "guided_over_image_gp_at_25": (ratio, lambda value, target: value >= target),
        "median_step_s": (median_step_s, lambda value, target: value <= target),
    }
    results = {
        name: {
            "target": TARGETS[name],
            "measured": value,
            "met": None if value is None else bool(holds(value, TARGETS[name])),
        }
        for name, (value, holds) in measured.items()
    }
    if guided is not None and anchor == 0:
        # No finite ratio: any feature imaged is infinitely more than none.
        results["guided_over_image_gp_at_25"]["met"] = guided > 0
    return results


def format_report(report: dict[str, Any]) -> str:
    """Mean imaged / detected fractions per policy, layout and budget, as a text table."""
    budgets = report.get("budgets", BUDGET_FRACTIONS)
    lines = [
        f"instrument: {report.get('instrument', 'realistic')}",
        f"{'policy':<9} {'layout':<8} "
        + " ".join(f"{f'{f * 100:g}% tiles':>14}" for f in budgets)
        + f" {'AUC':>6}",
    ]
    keys = sorted({(row["policy"], row["layout"]) for row in report["rows"]}, key=lambda k: (k[1], k[0]))
    for policy, layout in keys:
        cells = []
        for fraction in budgets:
            imaged = _mean_fraction(report["rows"], policy, layout, fraction, "imaged_fraction")
            detected = _mean_fraction(report["rows"], policy, layout, fraction, "detected_fraction")
            cells.append("-" if imaged is None or detected is None else f"{imaged:.2f}/{detected:.2f}")
        area = report["areas"].get(f"{policy}/{layout}", float("nan"))
        lines.append(
            f"{policy:<9} {layout:<8} " + " ".join(f"{cell:>14}" for cell in cells) + f" {area:>6.3f}"
        )
    latency = report["latency"]
    lines.append("cells: imaged/detected fraction of planted features (mean over seeds)")
    if latency["median_step_s"] is not None:
        lines.append(
            f"decision latency (tile in -> next request out): median {latency['median_step_s']:.3f} s, "
            f"p95 {latency['p95_step_s']:.3f} s over {latency['steps']} steps"
        )
    for name, result in report.get("target_results", {}).items():
        if result["measured"] is None:
            lines.append(f"target {name}: {result['target']:g} (not measured)")
        else:
            verdict = "met" if result["met"] else "NOT met"
            lines.append(f"target {name}: {result['target']:g}, measured {result['measured']:.3f}: {verdict}")
    return "\n".join(lines)
