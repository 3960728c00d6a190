"""``micrography bench pipeline``: how long the instrument waits for the agent, and what look-ahead costs.

Two parts:

- **Dead time per dwell.** Guided sessions of 512 x 512 tiles on the default specimen, at several
  dwell times, with the sequential loop (``lookahead_tiles=0``) and the pipelined one (``1``), on
  a simulated instrument in ``real_time`` mode (each scan takes its stage settle and frame time
  on the wall clock, as on a physical instrument). Reported per dwell and loop: the instrument's
  dead-time fraction (waiting for the agent, over waiting plus scanning; stage settling is
  neither) as mean and spread over the seeds, and the median wait. Targets: <= 5 % at 2 us and
  <= 10 % at 1 us with the pipelined loop, on 2 CPU cores. The survey is a quick 640 x 640 frame
  (it does not enter the tile loop's dead time; a real-time 4096 x 4096 survey would take a
  minute per session). The 2 us and 1 us cases run again on an instrument without stage settling
  (moving by beam shift), where the agent has only the frame time to keep up: information, the
  targets are judged on the default instrument (0.5 s settle per move).
- **What look-ahead costs.** The guidance bench's guided sessions (default layout, seeds 0-4, as
  fast as the computer allows: the choices do not depend on timing) with both loops: the imaged
  fraction at 10 % and 25 % of the stage, mean and spread, and the paired difference. Target:
  pipelined no more than 0.02 below sequential at 25 % (paired
  mean difference).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

from rich.progress import Progress

from agent.benchmarking import machine_info, mean_spread
from agent.session import BudgetConfig, ScanSettings, Session, SessionConfig
from analysis.bench_guidance import DEFAULT_SEEDS, run_policy_session
from simulator.config import SimulatorConfig, SpecimenConfig
from simulator.drivers import SimulatedMicroscope
from simulator.specimen import generate_specimen

TARGETS = {"dead_time_at_2us": 0.05, "dead_time_at_1us": 0.10, "imaged_at_25_difference": 0.02}
DWELLS_US: tuple[float, ...] = (8.0, 2.0, 1.0)
DEAD_TIME_SEEDS: tuple[int, ...] = (10, 11, 12, 13, 14)
"""Specimen and session seeds of the dead-time part (none of them tuned on)."""
LOOKAHEADS: tuple[int, ...] = (0, 1)
NO_SETTLE_DWELLS_US: tuple[float, ...] = (2.0, 1.0)
QUICK_SURVEY = ScanSettings(pixel_size_nm=0.25, dwell_us=1.0, shape=(640, 640))


def dead_time_session(
    seed: int,
    dwell_us: float,
    lookahead: int,
    tiles: int,
    specimen: SpecimenConfig | None = None,
    stage_settle_s: float | None = None,
) -> dict[str, Any]:
    """One real-time guided session; its dead time and step timings.

    Parameters
    ----------
    seed : int
        Specimen and session seed.
    dwell_us : float
        Tile dwell time, us per pixel.
    lookahead : int
        ``SessionConfig.lookahead_tiles``.
    tiles : int
        Tiles after the survey.
    specimen : SpecimenConfig, optional
        The specimen (default: the simulator's default 160 nm film).
    stage_settle_s : float, optional
        The instrument's settle time per move, s (default: the simulator's, 0.5 s); 0 for an
        instrument that moves between tiles by beam shift, which leaves the agent only the frame.

    Returns
    -------
    dict
        ``dead_time_fraction``, ``dead_time_s``, ``scan_time_s``, ``median_wait_s`` (over the
        tiles after the first), ``median_timings_s`` and ``wall_s``.
    """
    simulator = SimulatorConfig(seed=seed, specimen=specimen or SpecimenConfig())
    simulator = simulator.model_copy(
        update={
            "instrument": simulator.instrument.model_copy(
                update={"real_time": True}
                | ({} if stage_settle_s is None else {"stage_settle_s": stage_settle_s})
            )
        }
    )
    built = generate_specimen(simulator.specimen, seed)
    config = SessionConfig(
        seed=seed,
        budget=BudgetConfig(max_tiles=tiles),
        survey=QUICK_SURVEY,
        tiles=ScanSettings(pixel_size_nm=0.02, dwell_us=dwell_us, shape=(512, 512)),
        lookahead_tiles=lookahead,
    )
    with SimulatedMicroscope(simulator, built) as microscope:
        session = Session(microscope, config)
        started = time.perf_counter()
        summary = session.run()
        wall = time.perf_counter() - started
    waits = [step.timings["instrument_wait"] for step in session.steps if "instrument_wait" in step.timings]
    return {
        "dead_time_fraction": summary["instrument_dead_time_fraction"],
        "dead_time_s": summary["instrument_dead_time_s"],
        "scan_time_s": summary["instrument_scan_time_s"],
        "median_wait_s": float(statistics.median(waits)),
        "median_timings_s": summary["median_timings_s"],
        "wall_s": wall,
    }


def benchmark_dead_time(
    dwells_us: Sequence[float] = DWELLS_US,
    seeds: Sequence[int] = DEAD_TIME_SEEDS,
    tiles: int = 16,
    lookaheads: Sequence[int] = LOOKAHEADS,
    specimen: SpecimenConfig | None = None,
    no_settle_dwells_us: Sequence[float] = NO_SETTLE_DWELLS_US,
) -> dict[str, Any]:
    """Dead time of the sequential and the pipelined loop per dwell (see the module notes).

    The dwells in ``no_settle_dwells_us`` run a second time on an instrument without stage settling
    (moves by beam shift), where the agent has only the frame time to keep up.
    """
    cases = [(dwell, None) for dwell in dwells_us] + [(dwell, 0.0) for dwell in no_settle_dwells_us]
    rows = []
    with Progress() as progress:
        task = progress.add_task("real-time sessions", total=len(cases) * len(seeds) * len(lookaheads))
        for dwell, settle in cases:
            for lookahead in lookaheads:
                runs = []
                for seed in seeds:
                    runs.append(dead_time_session(seed, dwell, lookahead, tiles, specimen, settle))
                    progress.advance(task)
                rows.append(
                    {
                        "dwell_us": dwell,
                        "stage_settle_s": settle,
                        "lookahead_tiles": lookahead,
                        "dead_time_fraction": mean_spread([r["dead_time_fraction"] for r in runs]),
                        "median_wait_s": mean_spread([r["median_wait_s"] for r in runs]),
                        "runs": runs,
                    }
                )
    return {"tiles": tiles, "seeds": list(seeds), "rows": rows}


def benchmark_lookahead_guidance(
    seeds: Sequence[int] = DEFAULT_SEEDS, budgets: Sequence[float] = (0.10, 0.25)
) -> dict[str, Any]:
    """Imaged fraction of guided sessions with each loop on the guidance bench's specimens."""
    imaged: dict[int, dict[float, list[float]]] = {d: {b: [] for b in budgets} for d in LOOKAHEADS}
    with Progress() as progress:
        task = progress.add_task("guided sessions", total=len(seeds) * len(LOOKAHEADS))
        for seed in seeds:
            for lookahead in LOOKAHEADS:
                result = run_policy_session(
                    "guided", seed, budgets=budgets, session=SessionConfig(lookahead_tiles=lookahead)
                )
                for budget in budgets:
                    imaged[lookahead][budget].append(result["checkpoints"][budget]["imaged_fraction"])
                progress.advance(task)
    rows = []
    for budget in budgets:
        sequential, pipelined = imaged[0][budget], imaged[1][budget]
        rows.append(
            {
                "budget_fraction": budget,
                "sequential": mean_spread(sequential),
                "pipelined": mean_spread(pipelined),
                "difference": mean_spread([p - s for p, s in zip(pipelined, sequential, strict=True)]),
                "per_seed": {"sequential": sequential, "pipelined": pipelined},
            }
        )
    return {"seeds": list(seeds), "rows": rows}


def benchmark_pipeline(
    dwells_us: Sequence[float] = DWELLS_US,
    seeds: Sequence[int] = DEAD_TIME_SEEDS,
    tiles: int = 16,
    guidance: bool = True,
    specimen: SpecimenConfig | None = None,
    no_settle_dwells_us: Sequence[float] = NO_SETTLE_DWELLS_US,
) -> dict[str, Any]:
    """Both parts, with the targets judged (see the module notes).

    Parameters
    ----------
    dwells_us : sequence of float
        Tile dwell times of the dead-time part, us.
    seeds : sequence of int
        Seeds of the dead-time part.
    tiles : int
        Tiles per dead-time session.
    guidance : bool
        Also run the look-ahead guidance comparison (ten full guided sessions, several minutes).
    specimen : SpecimenConfig, optional
        Specimen of the dead-time part (default: the simulator's default film).
    no_settle_dwells_us : sequence of float
        Dwells also measured without stage settling (information; the targets are judged on the
        default instrument).

    Returns
    -------
    dict
        ``dead_time`` and ``guidance`` (or None) as from :func:`benchmark_dead_time` and
        :func:`benchmark_lookahead_guidance`, ``targets``, ``target_results`` and ``machine``.
    """
    dead = benchmark_dead_time(
        dwells_us, seeds, tiles, specimen=specimen, no_settle_dwells_us=no_settle_dwells_us
    )
    results: dict[str, Any] = {}
    for key, dwell in (("dead_time_at_2us", 2.0), ("dead_time_at_1us", 1.0)):
        row = next(
            (
                r
                for r in dead["rows"]
                if r["dwell_us"] == dwell and r["lookahead_tiles"] == 1 and r["stage_settle_s"] is None
            ),
            None,
        )
        if row is not None:
            value = row["dead_time_fraction"]["mean"]
            results[key] = {"value": value, "met": value <= TARGETS[key]}
    comparison = benchmark_lookahead_guidance() if guidance else None
    if comparison is not None:
        at_25 = next(r for r in comparison["rows"] if r["budget_fraction"] == 0.25)
        # Met when the pipelined loop images no less than 0.02 below the sequential one.
        difference = at_25["difference"]["mean"]
        results["imaged_at_25_difference"] = {
            "value": difference,
            "met": difference >= -TARGETS["imaged_at_25_difference"],
        }
    return {
        "benchmark": "pipeline",
        "dead_time": dead,
        "guidance": comparison,
        "targets": TARGETS,
        "target_results": results,
        "machine": machine_info(),
    }


def format_report(report: dict[str, Any]) -> str:
    """The pipeline benchmark as text tables."""
    dead = report["dead_time"]
    lines = [
        f"instrument dead time, guided sessions of {dead['tiles']} tiles of 512^2 (real-time instrument), "
        f"seeds {', '.join(map(str, dead['seeds']))}: mean +- sd",
        f"{'dwell us':>9} {'settle s':>9} {'loop':>11} {'dead time':>17} {'median wait s':>17}",
    ]
    for row in dead["rows"]:
        loop = "pipelined" if row["lookahead_tiles"] else "sequential"
        settle = "default" if row["stage_settle_s"] is None else f"{row['stage_settle_s']:g}"
        fraction, wait = row["dead_time_fraction"], row["median_wait_s"]
        lines.append(
            f"{row['dwell_us']:>9g} {settle:>9} {loop:>11}"
            f" {fraction['mean']:>9.1%} +- {fraction['std']:<5.1%}"
            f" {wait['mean']:>9.3f} +- {wait['std']:.3f}"
        )
    if report.get("guidance"):
        guidance = report["guidance"]
        lines += [
            "",
            f"guided imaged fraction, seeds {', '.join(map(str, guidance['seeds']))}: mean +- sd",
            f"{'budget':>7} {'sequential':>16} {'pipelined':>16} {'difference':>17}",
        ]
        for row in guidance["rows"]:
            cells = [row[k] for k in ("sequential", "pipelined", "difference")]
            lines.append(
                f"{row['budget_fraction']:>7.0%} "
                + " ".join(f"{c['mean']:>8.3f} +- {c['std']:.3f}" for c in cells)
            )
    lines.append("")
    for key, result in report["target_results"].items():
        verdict = "met" if result["met"] else "MISSED"
        lines.append(f"target {key}: {result['value']:.3f} (target {TARGETS[key]}) {verdict}")
    return "\n".join(lines)
