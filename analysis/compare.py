"""``micrography compare``: discovery curves of several sessions or policies in one figure.

Inputs are session journals and/or the JSON of ``micrography bench guidance``.
A journal recorded on the simulated microscope is judged against its regenerated
specimen (:func:`analysis.guidance.recorded_ground_truth`): the fraction of the
planted features *imaged* after every tile, and the fraction *detected* (a node
above the session's detection threshold) at the fixed budgets, from a replay of
the session. A journal without ground truth (a real instrument, a replayed
image) still shows its tiles, dose and region scores, and the table says why
its fractions are missing. A benchmark JSON gives, per policy and layout, the
mean and spread over its seeds at the budgets it recorded.

Budgets are fractions of the tiles needed to cover the whole stage (as in the
benchmark): at 10 %, 25 % and 50 % by default.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from agent.config import validate_config
from agent.driver import ScanRequest
from agent.errors import MicrographyError
from agent.session import Session, SessionConfig, StepRecord
from agent.survey import CandidateGrid
from analysis.bench_guidance import BUDGET_FRACTIONS, budget_tiles
from analysis.figures import DOSE_UNIT, SCORE_UNIT
from analysis.guidance import (
    detected_features,
    recorded_ground_truth,
    recorded_simulator,
    replayed_exposure_truths,
)
from analysis.replay import RecordedInstrument, open_recorded, progress_bar, replay_journal

FRACTION_KEYS = ("imaged_fraction", "detected_fraction")


class CompareError(MicrographyError, ValueError):
    """Inputs that cannot be compared (an unreadable or malformed benchmark JSON, nothing to compare)."""


@dataclass
class RunCurve:
    """The discovery curve of one session.

    Parameters
    ----------
    seed : int or None
        Session / specimen seed.
    grid_tiles : int or None
        Tiles needed to cover the stage (the budget unit); None if unknown.
    points : list of dict
        In acquisition order: ``tiles``, ``tile_fraction``, ``mean_dose_e_per_a2`` (stage mean,
        e-/A^2), ``imaged_fraction`` and ``detected_fraction`` (None where not measured),
        ``best_score`` (highest region score so far; None for benchmark rows).
    source : str
        The file it came from.
    """

    seed: int | None
    grid_tiles: int | None
    points: list[dict[str, Any]]
    source: str


@dataclass
class Series:
    """One line of the figure: a session, or a policy over several seeds.

    Parameters
    ----------
    label : str
        Legend label.
    kind : str
        ``journal`` or ``bench``.
    runs : list of RunCurve
        The sessions averaged (one for a single journal).
    note : str
        Why fractions are missing (no ground truth), if they are.
    group : str
        Series of the same group share a colour (the policy of a benchmark series).
    dashed : bool
        Drawn dashed (benchmark control layout, where no policy can exploit structure).
    """

    label: str
    kind: str
    runs: list[RunCurve] = field(default_factory=list)
    note: str = ""
    group: str = ""
    dashed: bool = False


# ----------------------------------------------------------------------------- benchmark JSON


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def load_bench_series(path: str | Path) -> list[Series]:
    """Read ``micrography bench guidance --json`` output into one series per policy and layout.

    Parameters
    ----------
    path : str or pathlib.Path
        The benchmark JSON.

    Returns
    -------
    list of Series
        Label ``"POLICY (LAYOUT)"``; one run per seed, with a point per recorded budget.

    Raises
    ------
    CompareError
        If the file is missing, not JSON, has no ``rows`` or a row lacks a field or holds a
        value out of range; the message names the file, the row and the field.
    """
    path = Path(path)
    fix = "write it with `micrography bench guidance --json PATH`"
    if not path.is_file():
        raise CompareError(f"{path}: benchmark JSON not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise CompareError(f"{path}: not a text file, so not a benchmark JSON; {fix}") from None
    except json.JSONDecodeError as error:
        raise CompareError(
            f"{path}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}); {fix}"
        ) from None
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not rows:
        raise CompareError(f"{path}: no 'rows' list of results, so not a guidance benchmark; {fix}")
    runs: dict[tuple[str, str], dict[int, list[dict[str, Any]]]] = {}
    for number, row in enumerate(rows):
        where = f"{path}: row {number}"
        if not isinstance(row, dict):
            raise CompareError(
                f"{where} is {type(row).__name__}, not an object with policy, seed and fractions"
            )
        for key in ("policy", "seed", "budget_fraction", *FRACTION_KEYS):
            if key not in row:
                raise CompareError(f"{where} has no {key!r}; {fix}")
        if not isinstance(row["policy"], str) or not isinstance(row["seed"], int):
            raise CompareError(
                f"{where}: policy must be a name and seed an integer (got {row['policy']!r}, {row['seed']!r})"
            )
        for key in ("budget_fraction", *FRACTION_KEYS):
            if not _number(row[key]) or not 0.0 <= row[key] <= 1.0:
                raise CompareError(f"{where}: {key} is {row[key]!r}; it must be a fraction between 0 and 1")
        for key in ("tiles", "mean_dose_e_per_a2"):
            if key in row and not _number(row[key]):
                raise CompareError(f"{where}: {key} is {row[key]!r}; it must be a number")
        layout = str(row.get("layout", "default"))
        runs.setdefault((row["policy"], layout), {}).setdefault(row["seed"], []).append(row)
    curves = _bench_curves(data.get("curves"), path)
    series = []
    for (policy, layout), seeds in runs.items():
        entry = Series(label=f"{policy} ({layout})", kind="bench", group=policy, dashed=layout != "default")
        for seed, chosen in sorted(seeds.items()):
            chosen = sorted(chosen, key=lambda r: r["budget_fraction"])
            tiles = [r.get("tiles") for r in chosen]
            grid = (
                round(tiles[-1] / chosen[-1]["budget_fraction"])
                if tiles[-1] and chosen[-1]["budget_fraction"]
                else None
            )
            points = [
                {
                    "tiles": r.get("tiles"),
                    "tile_fraction": float(r["budget_fraction"]),
                    "mean_dose_e_per_a2": r.get("mean_dose_e_per_a2"),
                    "imaged_fraction": float(r["imaged_fraction"]),
                    "detected_fraction": float(r["detected_fraction"]),
                    "best_score": None,
                }
                for r in chosen
            ]
            curve = curves.get((policy, layout, seed))
            if curve is not None:
                grid, points = _with_curve(curve, points)
            entry.runs.append(RunCurve(seed, grid, points, str(path)))
        series.append(entry)
    return series


def _bench_curves(curves: Any, path: Path) -> dict[tuple[str, str, int], dict[str, Any]]:
    """The per-tile curves of a benchmark JSON by (policy, layout, seed); empty for older files."""
    if curves is None:
        return {}
    if not isinstance(curves, list):
        raise CompareError(f"{path}: 'curves' is {type(curves).__name__}, not a list of sessions")
    found = {}
    for number, curve in enumerate(curves):
        where = f"{path}: curve {number}"
        if not isinstance(curve, dict) or not isinstance(curve.get("points"), list):
            raise CompareError(f"{where} is not an object with a 'points' list")
        grid = curve.get("grid_tiles")
        if not isinstance(grid, int) or grid < 1:
            raise CompareError(f"{where}: grid_tiles is {grid!r}; it must be a positive whole number")
        for point in curve["points"]:
            if not isinstance(point, dict) or not _number(point.get("tiles")):
                raise CompareError(f"{where}: a point without a number of tiles")
            imaged = point.get("imaged_fraction")
            if not _number(imaged) or not 0.0 <= imaged <= 1.0:
                raise CompareError(f"{where}: imaged_fraction {imaged!r} is not a fraction between 0 and 1")
        found[(str(curve.get("policy")), str(curve.get("layout", "default")), curve.get("seed"))] = curve
    return found


def _with_curve(curve: dict[str, Any], checkpoints: list[dict[str, Any]]) -> tuple[int, list[dict[str, Any]]]:
    """Per-tile points of a benchmark session; detected fractions where the rows measured them."""
    grid = int(curve["grid_tiles"])
    detected = {point["tiles"]: point["detected_fraction"] for point in checkpoints if point["tiles"]}
    points = [
        {
            "tiles": int(point["tiles"]),
            "tile_fraction": float(point["tiles"]) / grid,
            "mean_dose_e_per_a2": point.get("mean_dose_e_per_a2")
            if _number(point.get("mean_dose_e_per_a2"))
            else None,
            "imaged_fraction": float(point["imaged_fraction"]),
            "detected_fraction": detected.get(int(point["tiles"])),
            "best_score": None,
        }
        for point in curve["points"]
    ]
    return grid, points


# ----------------------------------------------------------------------------- journals


def journal_curve(
    path: str | Path, fractions: Sequence[float] = BUDGET_FRACTIONS, progress: bool = True
) -> tuple[RunCurve, str, str]:
    """The discovery curve of one recorded session.

    With ground truth the session is replayed (no microscope) to count detected features at
    each budget; without it the curve holds tiles, dose and the recorded region scores only.

    Parameters
    ----------
    path : str or pathlib.Path
        The session journal.
    fractions : sequence of float
        Budgets (fractions of the tiles covering the stage) at which detection is counted.
    progress : bool
        Show a progress bar for the replay.

    Returns
    -------
    curve : RunCurve
        The curve.
    policy : str
        The session's policy.
    note : str
        Empty with ground truth, else why imaged and detected fractions are missing.
    """
    contents = open_recorded(path)
    config = validate_config(contents.config, SessionConfig, f"{path} (recorded configuration)")
    grid = CandidateGrid.tiling(
        RecordedInstrument(contents).describe(), config.tiles.shape, config.tiles.pixel_size_nm
    )
    checkpoints = budget_tiles(len(grid), fractions)
    specimen, reason = recorded_ground_truth(contents)
    points: list[dict[str, Any]] = []
    best = -math.inf
    for step in contents.steps:
        record = step.record
        if record.get("kind") == "survey":
            continue
        score = record.get("score")
        best = max(best, score) if score is not None and math.isfinite(score) else best
        tiles = len(points) + 1
        points.append(
            {
                "tiles": tiles,
                "tile_fraction": tiles / len(grid),
                "mean_dose_e_per_a2": record.get("mean_dose_e_per_a2"),
                "imaged_fraction": None,
                "detected_fraction": None,
                "best_score": None if best == -math.inf else best,
            }
        )
    if specimen is not None:
        detected: dict[int, float] = {}
        simulator, _ = recorded_simulator(contents)
        requests = [ScanRequest.model_validate(step.record["request"]) for step in contents.steps]
        exposures = replayed_exposure_truths(simulator, specimen, requests) if simulator is not None else {}

        def count_detected(session: Session, record: StepRecord) -> None:
            tiles = sum(step.kind != "survey" for step in session.steps)
            if record.kind != "survey" and (tiles in checkpoints or tiles == len(points)):
                found = detected_features(session, specimen, exposures)
                detected[tiles] = len(found) / len(specimen.features)

        result = replay_journal(
            path,
            progress=progress,
            contents=contents,
            ground_truth=(specimen, reason),
            on_step=count_detected,
        )
        assert result.tracker is not None
        for point, tracked in zip(points, result.tracker.curve, strict=True):
            point["imaged_fraction"] = tracked["imaged_fraction"]
            point["detected_fraction"] = detected.get(int(point["tiles"]))
    return RunCurve(config.seed, len(grid), points, str(path)), config.policy, reason


def load_journal_series(
    paths: Sequence[str | Path],
    by_policy: bool = False,
    fractions: Sequence[float] = BUDGET_FRACTIONS,
    progress: bool = True,
) -> list[Series]:
    """One series per journal, or per policy (mean and spread over the journals' seeds).

    Parameters
    ----------
    paths : sequence of str or pathlib.Path
        Session journals.
    by_policy : bool
        Average journals of the same policy into one series.
    fractions : sequence of float
        Budgets at which detection is counted.
    progress : bool
        Show progress bars.

    Returns
    -------
    list of Series
        In the order of first appearance.
    """
    series: dict[str, Series] = {}
    with progress_bar("reading journals", progress and len(paths) > 1) as bar:
        task = bar.add_task("journals", total=len(paths))
        for path in paths:
            curve, policy, note = journal_curve(path, fractions, progress)
            label = (
                policy
                if by_policy
                else f"{policy} seed {curve.seed} ({Path(path).parent.name or Path(path).stem})"
            )
            while not by_policy and label in series:
                label += "'"
            entry = series.setdefault(label, Series(label=label, kind="journal"))
            entry.runs.append(curve)
            entry.note = "; ".join(dict.fromkeys(filter(None, [entry.note, note])))
            bar.advance(task)
    return list(series.values())


# ----------------------------------------------------------------------------- table, figure, files


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values))


def fractions_table(
    series: Sequence[Series], fractions: Sequence[float] = BUDGET_FRACTIONS
) -> list[dict[str, Any]]:
    """Imaged and detected fractions, tiles and dose of each series at each budget.

    Parameters
    ----------
    series : sequence of Series
        What to tabulate.
    fractions : sequence of float
        Budgets, as fractions of the tiles covering the stage.

    Returns
    -------
    list of dict
        Per series and budget: ``series``, ``kind``, ``budget_fraction``, ``runs`` (sessions that
        reached the budget), ``tiles``, ``mean_dose_e_per_a2``, ``imaged_mean``, ``imaged_std``,
        ``detected_mean``, ``detected_std`` (std over runs; None where nothing was measured),
        ``note``.
    """
    rows = []
    for entry in series:
        for fraction in fractions:
            reached = []
            for run in entry.runs:
                if entry.kind == "bench":
                    found = [p for p in run.points if abs(p["tile_fraction"] - fraction) < 1e-9]
                else:
                    target = max(1, round(fraction * run.grid_tiles)) if run.grid_tiles else None
                    found = [p for p in run.points if p["tiles"] == target]
                reached += found[:1]
            imaged = [p["imaged_fraction"] for p in reached if p["imaged_fraction"] is not None]
            detected = [p["detected_fraction"] for p in reached if p["detected_fraction"] is not None]
            tiles = [p["tiles"] for p in reached if p["tiles"] is not None]
            dose = [p["mean_dose_e_per_a2"] for p in reached if p["mean_dose_e_per_a2"] is not None]
            imaged_mean, imaged_std = _mean_std(imaged)
            detected_mean, detected_std = _mean_std(detected)
            rows.append(
                {
                    "series": entry.label,
                    "kind": entry.kind,
                    "budget_fraction": fraction,
                    "runs": len(reached),
                    "tiles": float(np.mean(tiles)) if tiles else None,
                    "mean_dose_e_per_a2": float(np.mean(dose)) if dose else None,
                    "imaged_mean": imaged_mean,
                    "imaged_std": imaged_std,
                    "detected_mean": detected_mean,
                    "detected_std": detected_std,
                    "note": entry.note or ("" if reached else "budget not reached"),
                }
            )
    return rows


def format_table(rows: list[dict[str, Any]], fractions: Sequence[float] = BUDGET_FRACTIONS) -> str:
    """The fractions table as text: one line per series, a cell ``imaged/detected`` per budget."""
    labels = list(dict.fromkeys(row["series"] for row in rows))
    width = max([len(label) for label in labels] + [6])
    lines = [f"{'series':<{width}} " + " ".join(f"{f'{round(f * 100)}% tiles':>22}" for f in fractions)]
    notes = []
    for label in labels:
        cells = []
        for fraction in fractions:
            row = next(r for r in rows if r["series"] == label and r["budget_fraction"] == fraction)
            if not row["runs"]:
                cells.append("not reached")
            elif row["imaged_mean"] is None:
                cells.append(f"- ({row['tiles']:.0f} t, {row['mean_dose_e_per_a2']:.0f} e/A2)")
            else:
                spread = f"±{row['imaged_std']:.2f}" if row["runs"] > 1 else ""
                detected = "-" if row["detected_mean"] is None else f"{row['detected_mean']:.2f}"
                cells.append(f"{row['imaged_mean']:.2f}{spread}/{detected} (n={row['runs']})")
        lines.append(f"{label:<{width}} " + " ".join(f"{cell:>22}" for cell in cells))
        note = next((r["note"] for r in rows if r["series"] == label and r["note"]), "")
        if note and note != "budget not reached":
            notes.append(f"{label}: no imaged/detected fractions: {note}")
    lines.append("cells: imaged/detected fraction of planted features (mean ± std over runs, n runs)")
    lines += notes
    return "\n".join(lines)


def _aligned(runs: list[RunCurve], x_key: str, y_key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and std of ``y_key`` over runs at each ``tile_fraction`` they share; x is the mean ``x_key``."""
    groups: dict[float, list[tuple[float, float]]] = {}
    for run in runs:
        for point in run.points:
            x, y = point.get(x_key), point.get(y_key)
            if x is not None and y is not None:
                groups.setdefault(round(point["tile_fraction"], 9), []).append((float(x), float(y)))
    keys = sorted(groups)
    x = np.array([np.mean([p[0] for p in groups[k]]) for k in keys])
    y = np.array([np.mean([p[1] for p in groups[k]]) for k in keys])
    spread = np.array([np.std([p[1] for p in groups[k]]) for k in keys])
    return x, y, spread


def write_compare_figure(series: Sequence[Series], path: str | Path) -> Path:
    """Discovery against tiles and dose (imaged, detected), dose against tiles and the best score so far.

    Parameters
    ----------
    series : sequence of Series
        Lines to draw; several runs are drawn as their mean with a ± std band.
    path : str or pathlib.Path
        PNG to write.

    Returns
    -------
    pathlib.Path
        The PNG written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axes = plt.subplots(2, 3, figsize=(16, 9.5), constrained_layout=True)
    panels = [
        (axes[0, 0], "tile_fraction", "imaged_fraction", "fraction of planted features imaged"),
        (axes[0, 1], "mean_dose_e_per_a2", "imaged_fraction", "fraction of planted features imaged"),
        (axes[1, 0], "tile_fraction", "detected_fraction", "fraction of planted features detected"),
        (axes[1, 1], "mean_dose_e_per_a2", "detected_fraction", "fraction of planted features detected"),
        (axes[0, 2], "tile_fraction", "mean_dose_e_per_a2", f"dose spent, stage mean ({DOSE_UNIT})"),
        (axes[1, 2], "tile_fraction", "best_score", f"highest tile interest so far ({SCORE_UNIT})"),
    ]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    groups = list(dict.fromkeys(entry.group or entry.label for entry in series))
    for entry in series:
        colour = colours[groups.index(entry.group or entry.label) % len(colours)]
        for ax, x_key, y_key, _ in panels:
            x, y, spread = _aligned(entry.runs, x_key, y_key)
            if not x.size:
                continue
            # Markers only where the points are few (budget checkpoints); a per-tile curve is a line.
            marker = "o" if x.size < 12 else None
            style = "--" if entry.dashed else "-"
            ax.plot(x, y, style, color=colour, marker=marker, markersize=3, label=entry.label)
            if len(entry.runs) > 1:
                ax.fill_between(x, y - spread, y + spread, color=colour, alpha=0.2, linewidth=0)
    for ax, x_key, y_key, ylabel in panels:
        ax.set_xlabel(
            "fraction of the tiles covering the stage"
            if x_key == "tile_fraction"
            else f"dose spent, stage mean ({DOSE_UNIT})"
        )
        ax.set_ylabel(ylabel)
        if y_key in FRACTION_KEYS:
            ax.set_ylim(0, 1.02)
        if not ax.lines:
            empty = (
                "nothing measured (no ground truth)"
                if y_key in FRACTION_KEYS
                else "no region scores recorded"
            )
            ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes)
        for fraction in BUDGET_FRACTIONS:
            if x_key == "tile_fraction":
                ax.axvline(fraction, color="grey", linewidth=0.5, linestyle=":")
    # The dose panel is the emptiest, and it has every series that recorded a dose.
    order = [axes[0, 2], *(ax for ax, *_ in panels)]
    labelled = next((ax for ax in order if ax.get_legend_handles_labels()[0]), None)
    if labelled is not None:
        labelled.legend(loc="best", fontsize=8)
    axes[0, 0].set_title("Imaged against tiles")
    axes[0, 1].set_title("Imaged against dose")
    axes[1, 0].set_title("Detected (node above threshold) against tiles")
    axes[1, 1].set_title("Detected against dose")
    axes[0, 2].set_title("Dose per tile budget")
    axes[1, 2].set_title("Best tile interest found (journals)")
    figure.suptitle(
        "Discovery of planted features by session / policy (band: ± std over seeds; dashed: control layout)"
    )
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def run_compare(
    inputs: Sequence[str | Path],
    out: str | Path,
    by_policy: bool = False,
    fractions: Sequence[float] = BUDGET_FRACTIONS,
    progress: bool = True,
) -> dict[str, Any]:
    """Compare journals and/or benchmark JSON files; write ``compare.png``, ``compare.json``, ``compare.csv``.

    Parameters
    ----------
    inputs : sequence of str or pathlib.Path
        Session journals (``.h5``) and/or ``micrography bench guidance`` JSON files (``.json``).
    out : str or pathlib.Path
        Output folder.
    by_policy : bool
        Average journals of the same policy (over their seeds) into one line.
    fractions : sequence of float
        Budgets for the table, fractions of the tiles covering the stage.
    progress : bool
        Show progress bars on stderr.

    Returns
    -------
    dict
        ``inputs``, ``fractions``, ``table`` (:func:`fractions_table`), ``series`` (label, kind,
        runs with their points, note) and ``files``.
    """
    if not inputs:
        raise CompareError("nothing to compare: give session journals (.h5) and/or a benchmark JSON")
    for fraction in fractions:
        if not 0.0 < fraction <= 1.0:
            raise CompareError(f"budget fraction {fraction!r}: give fractions of the stage between 0 and 1")
    bench = [Path(p) for p in inputs if Path(p).suffix.lower() == ".json"]
    journals = [Path(p) for p in inputs if Path(p).suffix.lower() != ".json"]
    series: list[Series] = []
    for path in bench:
        series += load_bench_series(path)
    if journals:
        series += load_journal_series(journals, by_policy, fractions, progress)
    table = fractions_table(series, fractions)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figure = write_compare_figure(series, out / "compare.png")
    csv_path = out / "compare.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    report = {
        "inputs": [str(p) for p in inputs],
        "fractions": list(fractions),
        "table": table,
        "series": [
            {
                "label": entry.label,
                "kind": entry.kind,
                "note": entry.note,
                "runs": [vars(run) for run in entry.runs],
            }
            for entry in series
        ],
        "files": {"figure": str(figure), "csv": str(csv_path), "json": str(out / "compare.json")},
    }
    (out / "compare.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report
