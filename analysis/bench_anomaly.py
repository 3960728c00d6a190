"""``micrography bench anomaly``: how well anomaly scores rank planted defects above normal lattice.

Specimens with seeds never used for training are scanned at atomic resolution,
their molecule graphs labelled from the ground truth, and every scorer ranks
the interior nodes: per-node ROC AUC and average precision of defect nodes
against normal nodes, overall and per defect class, for the graph autoencoder
(``gae``), the write-up's GAE (``seed_gae``) and the hand-crafted baselines
(``nn_distance``, ``intensity``, ``polarization``). Timing: scoring 100k nodes
and one online update after a 512 x 512 tile.

Targets: GAE overall AUROC >= 0.95 and no worse than the best hand-crafted
baseline on any class; scoring 100k nodes <= 0.2 s and one online update
<= 0.1 s on 2 CPU cores.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import Progress
from sklearn.metrics import average_precision_score, roc_auc_score
from torch_geometric.data import Data

from agent.anomaly import (
    SHIPPED_MODEL,
    AnomalyConfig,
    AnomalyScorer,
    baseline_scores,
    deterministic_torch,
    resolve_checkpoint,
)
from agent.benchmarking import machine_info
from agent.errors import ConfigError
from analysis.training import TRAINING_SEEDS, LabelledGraph, defect_mask, scan_specimen
from simulator.config import SimulatorConfig
from simulator.specimen import LABEL_CODE

EVALUATION_SEEDS: tuple[int, ...] = (0, 1, 2)
DEFECT_CLASSES: tuple[str, ...] = (
    "all", "vacancy", "substitution", "dislocation_core", "domain_wall", "strained", "amorphous_phase",
)  # fmt: skip
SCORERS: tuple[str, ...] = ("gae", "seed_gae", "nn_distance", "intensity", "polarization")
DEFAULT_TRAINING_SEEDS: tuple[int, ...] = (0, 1, 2, 3, 4)
"""Training seeds of the autoencoders: one run is one sample, so the benchmark reports five."""
TOP_SHARES: dict[str, float] = {"precision_top_0.1%": 0.001, "precision_top_1%": 0.01}
"""Row keys and shares of the ranked nodes whose precision the rows report."""
RANKING_KEYS: tuple[str, ...] = ("auroc", "average_precision", *TOP_SHARES)
"""Per-row figures that the summary gives as mean and spread over the training seeds."""
TARGETS = {"gae_auroc_all": 0.95, "score_100k_nodes_s": 0.2, "online_update_s": 0.1}


def top_precision(y_true: np.ndarray, y_score: np.ndarray, share: float) -> float:
    """Share of true defects among the ``share`` highest-scoring nodes (at least one node).

    What a microscopist sees scrolling the top of the list; it cannot exceed the share of
    defects in the pool (``positive_share`` in the rows) when that is below ``share``.

    Examples
    --------
    >>> top_precision(np.array([True, False, False, False]), np.array([0.9, 0.8, 0.1, 0.2]), 0.5)
    0.5
    """
    count = max(1, round(share * y_true.size))
    order = np.argsort(-y_score, kind="stable")[:count]
    return float(y_true[order].mean())


def _class_rows(scorer: str, scores: list[np.ndarray], labels: list[np.ndarray]) -> list[dict[str, Any]]:
    """AUROC and AP per defect class, pooled over specimens (defect nodes vs normal nodes)."""
    rows = []
    for defect_class in DEFECT_CLASSES:
        truth, values = [], []
        for score, label in zip(scores, labels, strict=True):
            positive = defect_mask(label, defect_class)
            negative = label == LABEL_CODE["normal"]
            keep = positive | negative
            truth.append(positive[keep])
            values.append(score[keep])
        y_true, y_score = np.concatenate(truth), np.concatenate(values)
        ranking: dict[str, float | None] = dict.fromkeys(RANKING_KEYS)
        if y_true.any() and not y_true.all():
            ranking["auroc"] = float(roc_auc_score(y_true, y_score))
            ranking["average_precision"] = float(average_precision_score(y_true, y_score))
            ranking |= {key: top_precision(y_true, y_score, share) for key, share in TOP_SHARES.items()}
        rows.append({
            "scorer": scorer,
            "defect_class": defect_class,
            **ranking,
            "positives": int(y_true.sum()),
            "positive_share": float(y_true.mean()),
        })  # fmt: skip
    return rows


def _summary(rows: Sequence[dict[str, Any]], scorers: Sequence[str]) -> list[dict[str, Any]]:
    """Per scorer and class: mean and sample standard deviation of each ranking figure over the runs."""
    summary = []
    for scorer in scorers:
        for defect_class in DEFECT_CLASSES:
            mine = [r for r in rows if r["scorer"] == scorer and r["defect_class"] == defect_class]
            entry: dict[str, Any] = {"scorer": scorer, "defect_class": defect_class, "seeds": len(mine)}
            for key in RANKING_KEYS:
                # Rows kept by an older sweep may lack the top-of-list figures.
                values = [r[key] for r in mine if r.get(key) is not None]
                entry[f"{key}_mean"] = float(np.mean(values)) if values else None
                entry[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else None
            summary.append(entry)
    return summary


def _timing(scorer: AnomalyScorer, evaluation: LabelledGraph, repeats: int = 5) -> dict[str, float]:
    """Seconds to score 100k nodes and to run one online update after a 512 x 512 tile."""
    graph = evaluation.graph
    data = graph.to_pyg()
    count = min(100_000, data.num_nodes)
    hundred_k = data.subgraph(torch.arange(count))
    scorer.score(hundred_k)
    score_s = [_seconds(lambda: scorer.score(hundred_k)) for _ in range(repeats)]
    # The nodes an update sees after a 512 x 512 tile at 0.02 nm/px: the tile and its margin.
    online = scorer.copy()
    width = 512 * 0.02
    update_s = []
    for index in range(repeats):
        x, y = 20.0 + 15.0 * index, 80.0
        nodes = graph.nodes_in(x - width / 2 - 1, x + width / 2 + 1, y - width / 2 - 1, y + width / 2 + 1)
        tile_graph = graph.to_pyg(nodes)
        update_s.append(_seconds(lambda tile_graph=tile_graph: online.update(tile_graph)))
    return {
        "score_100k_nodes_s": statistics.median(score_s),
        "online_update_s": statistics.median(update_s),
        "score_nodes": count,
        "online_steps": online.config.online_steps,
    }


def _seconds(function: Any) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


@lru_cache(maxsize=8)
def _scanned(seed: int) -> LabelledGraph:
    """A specimen's labelled graph, scanned once per process.

    Every training-seed task of a benchmark scans the same specimens; a worker that runs
    several of them scans each specimen once (about 20 s and 300 MB per specimen).
    """
    return scan_specimen(seed)


def anomaly_tasks(
    training_seeds: Sequence[int] = DEFAULT_TRAINING_SEEDS,
    evaluation_seeds: Sequence[int] = EVALUATION_SEEDS,
    training_specimens: Sequence[int] = TRAINING_SEEDS,
    config: AnomalyConfig | None = None,
) -> list[dict[str, Any]]:
    """The tasks of an anomaly benchmark: one per training seed.

    Parameters
    ----------
    training_seeds : sequence of int
        Seeds of the autoencoders' initialisation and sampling (``AnomalyConfig.seed``).
    evaluation_seeds : sequence of int
        Specimens scored (never trained on).
    training_specimens : sequence of int
        Specimens the autoencoders are trained on, without labels.
    config : AnomalyConfig, optional
        GAE configuration; its ``seed`` is replaced by each training seed.

    Returns
    -------
    list of dict
        The arguments of :func:`run_anomaly_task`.

    Raises
    ------
    ConfigError
        If no training seed is given, or a specimen is both trained on and evaluated.
    """
    if not training_seeds:
        raise ConfigError("give at least one training seed")
    shared = sorted(set(training_specimens) & set(evaluation_seeds))
    if shared:
        raise ConfigError(f"specimen seeds {shared} are both trained on and evaluated; keep them disjoint")
    base = (config or AnomalyConfig(device="cpu")).model_dump(mode="json")
    return [
        {
            "training_seed": int(seed),
            "evaluation_seeds": [int(s) for s in evaluation_seeds],
            "training_specimens": [int(s) for s in training_specimens],
            "config": base | {"seed": int(seed)},
        }
        for seed in dict.fromkeys(training_seeds)
    ]


def run_anomaly_task(task: dict[str, Any], progress: Progress | None = None) -> dict[str, Any]:
    """Train both autoencoders with one training seed, score the evaluation specimens, time it.

    The same function serves ``micrography bench anomaly`` and ``micrography sweep anomaly``.

    Parameters
    ----------
    task : dict
        One item of :func:`anomaly_tasks`.
    progress : rich.progress.Progress, optional
        Shows the training steps.

    Returns
    -------
    dict
        ``training_seed``, ``rows`` (``scorer``, ``defect_class``, ``auroc``,
        ``average_precision``, ``positives``, ``training_seed``), ``timing``, ``nodes_scored``.
    """
    config = AnomalyConfig.model_validate(task["config"])
    training = [_scanned(seed).graph.to_pyg() for seed in task["training_specimens"]]
    evaluation = [_scanned(seed) for seed in task["evaluation_seeds"]]
    models = {}
    for name, architecture in (("gae", config.architecture), ("seed_gae", "seed")):
        model = AnomalyScorer(config.model_copy(update={"architecture": architecture}))
        step = None
        if progress is not None:
            bar = progress.add_task(f"training {name} (seed {config.seed})", total=config.warmup_steps)

            def step(done: int, bar: Any = bar) -> None:
                progress.update(bar, completed=done)

        model.fit(training, progress=step)
        models[name] = model
    scores: dict[str, list[np.ndarray]] = {name: [] for name in SCORERS}
    labels = []
    for item in evaluation:
        data = item.graph.to_pyg()
        keep = item.evaluable
        labels.append(item.label[keep])
        for name, model in models.items():
            scores[name].append(model.score(data).score[keep])
        for name, values in baseline_scores(data).items():
            scores[name].append(values[keep])
    rows = [
        row | {"training_seed": config.seed}
        for name in SCORERS
        for row in _class_rows(name, scores[name], labels)
    ]
    return {
        "training_seed": config.seed,
        "rows": rows,
        "timing": _timing(models["gae"], evaluation[0]),
        "nodes_scored": int(sum(label.size for label in labels)),
    }


def anomaly_report(results: Sequence[dict[str, Any]], tasks: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Gather the results of :func:`run_anomaly_task` into the benchmark's report.

    Parameters
    ----------
    results : sequence of dict
        One per training seed, in task order.
    tasks : sequence of dict
        The tasks they came from.

    Returns
    -------
    dict
        ``rows`` (per scorer, class and training seed), ``summary`` (per scorer and class: mean
        and standard deviation over training seeds of AUROC and AP), ``timing`` (medians over
        the seeds), ``targets``, ``machine``.
    """
    rows = [row for result in results for row in result["rows"]]
    summary = _summary(rows, SCORERS)
    timing = {
        key: statistics.median(result["timing"][key] for result in results)
        for key in ("score_100k_nodes_s", "online_update_s")
    }
    timing |= {key: results[0]["timing"][key] for key in ("score_nodes", "online_steps")}
    first = tasks[0]
    return {
        "benchmark": "anomaly",
        "evaluation_seeds": first["evaluation_seeds"],
        "training_specimens": first["training_specimens"],
        "training_seeds": [result["training_seed"] for result in results],
        "nodes_scored": results[0]["nodes_scored"],
        "rows": rows,
        "summary": summary,
        "timing": timing,
        "config": {key: value for key, value in first["config"].items() if key != "seed"},
        "targets": TARGETS,
        "machine": machine_info(),
    }


SESSION_GRID = 6
"""The session-sized comparison scans a 6 x 6 grid of a session's tiles (``SessionConfig().tiles``:
512 px at 0.02 nm/px and 8 µs; about a 40-tile session) at the centre of each evaluation specimen."""
SESSION_START = ((1, 1), (4, 4), (1, 4), (4, 1))
"""Grid cells of the four spread-out start tiles the warm-up trains on (and the shipped model
recalibrates on)."""
SESSION_SCORERS = ("shipped", "shipped_as_trained", "warmup")


def session_model_comparison(
    checkpoint: str | Path | None = None,
    evaluation_seeds: Sequence[int] = EVALUATION_SEEDS,
    warmup_seeds: Sequence[int] = DEFAULT_TRAINING_SEEDS,
    warmup_steps: int | None = None,
    progress: Progress | None = None,
    *,
    grid: int = SESSION_GRID,
    start_cells: Sequence[tuple[int, int]] = SESSION_START,
) -> dict[str, Any]:
    """The shipped model against a GAE warmed up on the start tiles, on session-sized data.

    Each evaluation specimen is scanned as a session scans it: tiles of 512 px at 0.02 nm/px
    and 8 µs, a 6 x 6 grid at the centre, and four spread-out start tiles scanned on their own.
    The warm-up (``--checkpoint none``) trains a new GAE on the start tiles' graph for the
    session's warm-up steps, once per warm-up seed; the checkpoint is loaded and, as sessions
    do by default, its error scales are measured again on the start tiles (also reported
    without that). Every scorer then ranks the evaluable nodes of the grid. The instrument
    places tiles exactly (node labels come from stage positions); its noise is the session's.

    Parameters
    ----------
    checkpoint : str or pathlib.Path, optional
        The checkpoint to compare (default: the shipped model).
    evaluation_seeds : sequence of int
        Specimens scanned and scored.
    warmup_seeds : sequence of int
        Seeds of the warmed-up GAEs (one run is one sample).
    warmup_steps : int, optional
        Warm-up steps (default: :class:`~agent.session.SessionConfig`'s).
    progress : rich.progress.Progress, optional
        Shows the scans.
    grid : int
        Tiles along each side of the scanned square.
    start_cells : sequence of (int, int)
        Grid cells (column, row) of the start tiles.

    Returns
    -------
    dict
        ``rows`` (per scorer, class and, for the warm-up, seed), ``summary`` (per scorer and
        class: mean and spread over warm-up seeds), the checkpoint's ``provenance`` and the
        scan settings.
    """
    from agent.session import SessionConfig

    session = SessionConfig()
    path = resolve_checkpoint(SHIPPED_MODEL if checkpoint is None else checkpoint)
    if path is None:
        raise ConfigError("the session comparison needs a checkpoint to compare with the warm-up")
    steps = session.warmup_steps if warmup_steps is None else warmup_steps
    tiles = session.tiles
    tile_nm = tiles.shape[0] * tiles.pixel_size_nm
    scan = {"tile_px": tiles.shape[0], "pixel_size_nm": tiles.pixel_size_nm, "dwell_us": tiles.dwell_us}
    regions, starts = [], []
    bar = (
        progress.add_task("scanning session-sized regions", total=len(evaluation_seeds)) if progress else None
    )
    width, height = SimulatorConfig().specimen.size_nm
    for seed in evaluation_seeds:
        x0, y0 = width / 2 - grid * tile_nm / 2, height / 2 - grid * tile_nm / 2
        region = (x0, x0 + grid * tile_nm, y0, y0 + grid * tile_nm)
        centres = [(x0 + (i + 0.5) * tile_nm, y0 + (j + 0.5) * tile_nm) for i, j in start_cells]
        regions.append(scan_specimen(seed, region_nm=region, **scan))
        starts.append(scan_specimen(seed, centres_nm=centres, **scan).graph.to_pyg())
        if progress is not None and bar is not None:
            progress.advance(bar)
    labels = [item.label[item.evaluable] for item in regions]
    data = [item.graph.to_pyg() for item in regions]

    def ranked(prepare: Callable[[Data], AnomalyScorer]) -> list[np.ndarray]:
        # Each specimen's session warms up (or recalibrates) on its own start tiles.
        return [
            prepare(start).score(d).score[item.evaluable]
            for start, d, item in zip(starts, data, regions, strict=True)
        ]

    loaded = AnomalyScorer.load(path, device=session.anomaly.device)

    def shipped(start: Data) -> AnomalyScorer:
        model = loaded.copy()
        model.recalibrate([start])
        return model

    rows = _class_rows("shipped", ranked(shipped), labels)
    rows += _class_rows("shipped_as_trained", ranked(lambda start: loaded), labels)
    for seed in warmup_seeds:
        config = session.anomaly.model_copy(update={"seed": int(seed), "warmup_steps": steps})

        def warmed_up(start: Data, config: AnomalyConfig = config) -> AnomalyScorer:
            model = AnomalyScorer(config)
            model.fit([start])
            return model

        rows += [row | {"warmup_seed": int(seed)} for row in _class_rows("warmup", ranked(warmed_up), labels)]
    return {
        "checkpoint": str(path),
        "provenance": loaded.provenance,
        "evaluation_seeds": [int(seed) for seed in evaluation_seeds],
        "warmup_seeds": [int(seed) for seed in warmup_seeds],
        "warmup_steps": steps,
        "scan": scan | {"grid": grid, "start_tiles": len(start_cells)},
        "nodes_scored": int(sum(label.size for label in labels)),
        "rows": rows,
        "summary": _summary(rows, SESSION_SCORERS),
    }


def benchmark_anomaly(
    evaluation_seeds: Sequence[int] = EVALUATION_SEEDS,
    training_specimens: Sequence[int] = TRAINING_SEEDS,
    training_seeds: Sequence[int] = DEFAULT_TRAINING_SEEDS,
    config: AnomalyConfig | None = None,
    *,
    session_checkpoint: str | Path | None = SHIPPED_MODEL,
    deterministic: bool = False,
) -> dict[str, Any]:
    """Train on training specimens with each training seed, score unseen specimens, report per class.

    The seeds run one after another in this process; ``micrography sweep anomaly`` runs the
    same tasks on a Dask cluster.

    Parameters
    ----------
    evaluation_seeds : sequence of int
        Specimens scored (never trained on).
    training_specimens : sequence of int
        Specimens the autoencoders are trained on, without labels.
    training_seeds : sequence of int
        Training seeds; each trains both autoencoders afresh.
    config : AnomalyConfig, optional
        GAE configuration (the ``seed_gae`` uses the same with ``architecture="seed"``).
    session_checkpoint : str or pathlib.Path, optional
        Checkpoint for :func:`session_model_comparison` (default the shipped model; None skips it).
    deterministic : bool
        Run in :func:`~agent.anomaly.deterministic_torch`: one thread, deterministic algorithms,
        the same figures bit for bit on every run (slower).

    Returns
    -------
    dict
        See :func:`anomaly_report`; with ``session_model`` (the comparison) and ``deterministic``.
    """
    tasks = anomaly_tasks(training_seeds, evaluation_seeds, training_specimens, config)
    results = []
    with Progress(transient=True) as progress, deterministic_torch() if deterministic else nullcontext():
        scans = progress.add_task("scanning specimens", total=len(training_specimens) + len(evaluation_seeds))
        for seed in [*training_specimens, *evaluation_seeds]:
            _scanned(seed)
            progress.advance(scans)
        for task in tasks:
            results.append(run_anomaly_task(task, progress))
        report = anomaly_report(results, tasks)
        if session_checkpoint is not None:
            report["session_model"] = session_model_comparison(
                session_checkpoint, evaluation_seeds, training_seeds, progress=progress
            )
    report["deterministic"] = deterministic
    return report


def format_report(report: dict[str, Any]) -> str:
    """AUROC and AP per scorer and class, mean and spread over the training seeds, as a text table."""
    classes = list(DEFECT_CLASSES)
    seeds = report["training_seeds"]
    lines = [
        f"training seeds {seeds}; cells: AUROC mean±std / AP mean over the seeds",
        f"{'scorer':<12}" + "".join(f"{name[:16]:>19}" for name in classes),
    ]
    for scorer in SCORERS:
        cells = []
        for defect_class in classes:
            entry = next(
                e for e in report["summary"] if e["scorer"] == scorer and e["defect_class"] == defect_class
            )
            if entry["auroc_mean"] is None:
                cells.append("-")
                continue
            spread = "" if entry["auroc_std"] is None else f"±{entry['auroc_std']:.3f}"
            cells.append(f"{entry['auroc_mean']:.3f}{spread}/{entry['average_precision_mean']:.2f}")
        lines.append(f"{scorer:<12}" + "".join(f"{cell:>19}" for cell in cells))
    gae = {e["defect_class"]: e for e in report["summary"] if e["scorer"] == "gae"}
    lines.append(
        "gae precision among the top 0.1 % / 1 % of nodes: "
        + ", ".join(
            f"{name} {gae[name]['precision_top_0.1%_mean']:.2f}/{gae[name]['precision_top_1%_mean']:.2f}"
            for name in classes
            if gae[name]["precision_top_0.1%_mean"] is not None
        )
    )
    timing = report["timing"]
    lines.append(
        f"scoring {timing['score_nodes']:,} nodes: {timing['score_100k_nodes_s']:.3f} s "
        f"(target {TARGETS['score_100k_nodes_s']} s); one online update ({timing['online_steps']} steps): "
        f"{timing['online_update_s']:.3f} s (target {TARGETS['online_update_s']} s); medians over the seeds"
    )
    if "session_model" in report:
        lines += format_session_model(report["session_model"])
    return "\n".join(lines)


def format_session_model(comparison: dict[str, Any]) -> list[str]:
    """The shipped-model-versus-warm-up table of :func:`session_model_comparison` as text lines."""
    scan = comparison["scan"]
    lines = [
        f"session-sized data: {scan['grid']} x {scan['grid']} tiles of {scan['tile_px']} px at "
        f"{scan['pixel_size_nm']:g} nm/px and {scan['dwell_us']:g} µs, {comparison['nodes_scored']:,} "
        f"nodes; warm-up {comparison['warmup_steps']} steps on {scan['start_tiles']} start tiles, seeds "
        f"{comparison['warmup_seeds']}; cells: AUROC mean±std / AP",
    ]
    classes = [
        name
        for name in DEFECT_CLASSES
        if any(e["defect_class"] == name and e["auroc_mean"] is not None for e in comparison["summary"])
    ]
    lines.append(f"{'scorer':<20}" + "".join(f"{name[:16]:>19}" for name in classes))
    for scorer in SESSION_SCORERS:
        cells = []
        for name in classes:
            entry = next(
                e for e in comparison["summary"] if e["scorer"] == scorer and e["defect_class"] == name
            )
            spread = "" if entry["auroc_std"] is None else f"±{entry['auroc_std']:.3f}"
            cells.append(f"{entry['auroc_mean']:.3f}{spread}/{entry['average_precision_mean']:.2f}")
        lines.append(f"{scorer:<20}" + "".join(f"{cell:>19}" for cell in cells))
    return lines
