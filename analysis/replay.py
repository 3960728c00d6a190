"""``micrography replay``: rebuild a recorded session step by step, draw it, time it and re-score it.

The recorded steps go back through the session's own pipeline (the rebuild that
:meth:`agent.session.Session.resume` does: graph merge, GAE training and online
updates, region scores, surrogate, policy, with every decision checked against
the recorded one) on a :class:`RecordedInstrument` that never exposes. The
journal itself is never written to: the rebuild runs on a private copy.

After any chosen step the replay draws the session as it was then (survey with
the tile path and order so far, node scores over the stitched graph, surrogate
mean and uncertainty); at the end it compares every replayed region score with
the recorded one, tabulates the time per stage (as recorded and as replayed) and,
given another model checkpoint or configuration, re-scores the recorded tiles
and measures how the ranking of the imaged regions would change (Spearman and
Kendall rank correlation, top-k overlap, a figure of old against new ranks).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.patheffects as path_effects
import matplotlib.pyplot as plt
import numpy as np
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from scipy import stats

from agent.anomaly import AnomalyScorer
from agent.columns import find_columns
from agent.config import validate_config
from agent.driver import InstrumentDescription, MicroscopeDriver, ScanRequest, Tile
from agent.errors import MicrographyError
from agent.graph import MoleculeGraph
from agent.journal import JournalContents, JournalError, read_journal
from agent.protocol.messages import jsonable

# The session's own switch to single-threaded torch, so re-scored reductions repeat its bits exactly.
from agent.registration import Placement
from agent.session import (
    DECISION_STAGES,
    STEP_STAGES,
    Session,
    SessionConfig,
    SessionError,
    StepRecord,
    apply_moves,
    scanned_extent,
    session_column_config,
    session_scorer,
    single_thread_torch,
    tile_interest,
)
from agent.survey import CandidateGrid
from analysis.figures import SCORE_UNIT
from analysis.guidance import (
    DiscoveryTracker,
    detected_features,
    exposure_truths,
    recorded_ground_truth,
    recorded_simulator,
    write_session_report,
)
from simulator.specimen import Specimen

SCORE_TOLERANCE = 1e-9
"""Largest difference between a replayed and a recorded region score still counted as reproduced."""


class ReplayError(MicrographyError, ValueError):
    """A journal cannot be replayed or re-scored as asked."""


def progress_bar(description: str, enabled: bool = True) -> Progress:
    """A transient progress bar on stderr (steps done of all, elapsed time)."""
    return Progress(
        TextColumn(description),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
        disable=not enabled,
    )


def open_recorded(path: str | Path) -> JournalContents:
    """Read a journal for replay: every complete step, or a clear error if there is none.

    Parameters
    ----------
    path : str or pathlib.Path
        The session journal (HDF5).

    Returns
    -------
    JournalContents
        The recovered steps; ``problems`` says what was lost (an interrupted last step, an
        unreadable step and the ones after it).

    Raises
    ------
    JournalError
        If the file is missing, not a journal, or holds no complete step.
    """
    contents = read_journal(path)
    if not contents.steps:
        lost = "; ".join(contents.problems) or "the session stopped before its first step was recorded"
        raise JournalError(
            f"{contents.path}: no complete step could be recovered ({lost}); nothing to replay"
        )
    return contents


class RecordedInstrument(MicroscopeDriver):
    """The instrument a journal was recorded on, as far as a replay needs it: its description only.

    Parameters
    ----------
    contents : JournalContents
        The journal; its recorded instrument description is what :meth:`describe` returns.
    """

    def __init__(self, contents: JournalContents) -> None:
        super().__init__()
        self._path = contents.path
        try:
            self._description = InstrumentDescription.model_validate(contents.instrument)
        except ValidationError as error:
            problem = error.errors()[0]
            raise ReplayError(
                f"{contents.path}: the recorded instrument description is unreadable "
                f"({'.'.join(map(str, problem['loc']))}: {problem['msg']}); the journal cannot be replayed"
            ) from None

    def describe(self) -> InstrumentDescription:
        """The recorded stage, pixel-size and dwell ranges, detectors and beam current."""
        return self._description

    def _acquire(self, request: ScanRequest) -> Tile:
        raise ReplayError(
            f"{self._path}: a replay never exposes, and {request.request_id} is not a recorded step"
        )


@dataclass
class StepSnapshot:
    """One replayed step next to its record.

    Parameters
    ----------
    index : int
        Step number (the survey tiles come first).
    kind : str
        ``survey``, ``start`` or ``guided``.
    request_id : str
        The scan's id.
    tile : int
        Number of the high-resolution tile (1 = first; 0 for survey tiles).
    x_nm, y_nm : float
        Tile centre on the stage, nanometres.
    recorded_score, replayed_score : float or None
        Region score as recorded and as rebuilt (None where the step had none yet).
    recorded_nodes, replayed_nodes : int or None
        Nodes of the stitched graph after the step.
    mean_dose_e_per_a2 : float
        Dose spent so far, averaged over the stage, e-/A^2.
    recorded_timings, replayed_timings : dict
        Seconds per stage.
    surrogate_points : int or None
        Observations in the surrogate after the step (rebuilt).
    imaged_fraction : float or None
        Fraction of the planted features imaged so far (ground truth only).
    figure : str or None
        The figure of the session at this step, if one was drawn.
    """

    index: int
    kind: str
    request_id: str
    tile: int
    x_nm: float
    y_nm: float
    recorded_score: float | None
    replayed_score: float | None
    recorded_nodes: int | None
    replayed_nodes: int | None
    mean_dose_e_per_a2: float
    recorded_timings: dict[str, float]
    replayed_timings: dict[str, float]
    surrogate_points: int | None = None
    imaged_fraction: float | None = None
    figure: str | None = None

    @property
    def score_difference(self) -> float:
        """|replayed - recorded| region score; 0 where neither has one, inf where only one has."""
        if self.recorded_score is None and self.replayed_score is None:
            return 0.0
        if self.recorded_score is None or self.replayed_score is None:
            return math.inf
        return abs(self.replayed_score - self.recorded_score)


def _journal_name(path: Path) -> str:
    """The journal's folder and name: sessions all write ``journal.h5``, their folders tell them apart."""
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def _finite_or_none(value: Any) -> float | None:
    return None if value is None or not math.isfinite(float(value)) else float(value)


class _ReplayObserver:
    """The ``on_step`` callback of a replay: snapshots, figures, discovery and the progress bar."""

    def __init__(
        self,
        contents: JournalContents,
        figure_steps: set[int],
        figure_dir: Path,
        tracker: DiscoveryTracker | None,
        progress: Progress,
        task: Any,
        hook: Callable[[Session, StepRecord], None] | None = None,
    ) -> None:
        self.hook = hook
        self.contents = contents
        self.figure_steps = figure_steps
        self.figure_dir = figure_dir
        self.tracker = tracker
        self.progress = progress
        self.task = task
        self.session: Session | None = None
        self.snapshots: list[StepSnapshot] = []
        self.tiles = 0

    def __call__(self, record: StepRecord) -> None:
        recorded = self.contents.steps[record.index].record
        if self.tracker is not None:
            self.tracker(record)
        self.tiles += record.kind != "survey"
        surrogate = record.extra.get("surrogate") or {}
        snapshot = StepSnapshot(
            index=record.index,
            kind=record.kind,
            request_id=record.request.request_id,
            tile=self.tiles if record.kind != "survey" else 0,
            x_nm=record.request.x_nm,
            y_nm=record.request.y_nm,
            recorded_score=_finite_or_none(recorded.get("score")),
            replayed_score=_finite_or_none(record.score),
            recorded_nodes=recorded.get("nodes"),
            replayed_nodes=record.extra.get("nodes"),
            mean_dose_e_per_a2=float(
                recorded.get("mean_dose_e_per_a2", record.extra.get("mean_dose_e_per_a2", 0))
            ),
            recorded_timings={k: float(v) for k, v in recorded.get("timings", {}).items()},
            replayed_timings=dict(record.timings),
            surrogate_points=surrogate.get("n_points"),
            imaged_fraction=(
                None
                if self.tracker is None or record.kind == "survey" or not self.tracker.total
                else len(self.tracker.imaged) / self.tracker.total
            ),
        )
        if record.index in self.figure_steps and self.session is not None:
            name = _journal_name(self.contents.path)
            label = f"tile {snapshot.tile}" if snapshot.tile else "survey"
            path = write_session_report(
                self.session,
                self.figure_dir / f"step-{record.index:04d}.png",
                tracker=self.tracker,
                title=f"Replay of {name}: step {record.index} ({record.kind}, {label})",
                dpi=72,
            )
            snapshot.figure = str(path)
        self.snapshots.append(snapshot)
        if self.hook is not None and self.session is not None:
            self.hook(self.session, record)
        self.progress.advance(self.task)


class _ObservedSession(Session):
    """A Session that tells its replay observer who it is (:meth:`Session.resume` builds it)."""

    def __init__(
        self,
        driver: MicroscopeDriver,
        config: SessionConfig | None = None,
        journal_path: str | Path | None = None,
        on_step: Any = None,
        truth: Any = None,
    ) -> None:
        super().__init__(driver, config, journal_path, on_step, truth)
        if isinstance(on_step, _ReplayObserver):
            on_step.session = self


@dataclass
class ReplayResult:
    """A replayed session and everything measured on the way.

    Parameters
    ----------
    contents : JournalContents
        The journal as read (``problems`` lists what was lost).
    session : Session
        The rebuilt session at its last recorded step.
    snapshots : list of StepSnapshot
        One per replayed step.
    ground_truth : str
        Empty when the specimen was regenerated, else why there is no ground truth.
    tracker : DiscoveryTracker or None
        Discovery of the planted features (ground truth only).
    detected_features : int or None
        Planted features with a node above the detection threshold at the end.
    """

    contents: JournalContents
    session: Session
    snapshots: list[StepSnapshot]
    ground_truth: str
    tracker: DiscoveryTracker | None = None
    detected_features: int | None = None
    figures: list[str] = field(default_factory=list)

    @property
    def tile_steps(self) -> list[StepRecord]:
        """The rebuilt high-resolution steps (no survey), in acquisition order."""
        return [step for step in self.session.steps if step.kind != "survey"]

    def reproduction(self) -> dict[str, Any]:
        """How closely the rebuild reproduced the record: region scores and node counts per step."""
        compared = [s for s in self.snapshots if s.recorded_score is not None or s.replayed_score is not None]
        worst = max((s.score_difference for s in compared), default=0.0)
        nodes = [s for s in self.snapshots if s.recorded_nodes is not None]
        return {
            "steps": len(self.snapshots),
            "scores_compared": len(compared),
            "max_abs_score_difference": worst,
            "scores_reproduced": worst <= SCORE_TOLERANCE,
            "nodes_reproduced": all(s.recorded_nodes == s.replayed_nodes for s in nodes),
            "decisions_reproduced": True,  # the rebuild raises on the first decision that differs
        }


def parse_steps(text: str | None, count: int) -> set[int]:
    """Step numbers from ``"3,5,10-12"`` (``"last"`` is the final step), each checked against the journal.

    Parameters
    ----------
    text : str or None
        Comma-separated step numbers or ranges.
    count : int
        Steps in the journal.

    Returns
    -------
    set of int
        Valid step indices.
    """
    chosen: set[int] = set()
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if part == "last":
                chosen.add(count - 1)
                continue
            low, _, high = part.partition("-")
            first, last = int(low), int(high or low)
        except ValueError:
            raise ReplayError(
                f"--steps {text!r}: {part!r} is not a step number or range; write e.g. 3,5,10-12"
            ) from None
        if not 0 <= first <= last < count:
            raise ReplayError(f"--steps {text!r}: {part!r} is outside the journal's steps 0-{count - 1}")
        chosen.update(range(first, last + 1))
    return chosen


def replay_journal(
    path: str | Path,
    figure_dir: str | Path | None = None,
    figure_steps: Iterable[int] = (),
    progress: bool = True,
    contents: JournalContents | None = None,
    ground_truth: tuple[Specimen | None, str] | None = None,
    on_step: Callable[[Session, StepRecord], None] | None = None,
) -> ReplayResult:
    """Rebuild a recorded session step by step without a microscope.

    Parameters
    ----------
    path : str or pathlib.Path
        The session journal; it is only read.
    figure_dir : str or pathlib.Path, optional
        Where per-step figures go (``step-NNNN.png``); needed when ``figure_steps`` is given.
    figure_steps : iterable of int
        Steps after which the session is drawn as it was then.
    progress : bool
        Show a progress bar on stderr.
    contents : JournalContents, optional
        The journal already read (saves reading it twice).
    ground_truth : (Specimen or None, str), optional
        :func:`analysis.guidance.recorded_ground_truth` of the journal, if already known.
    on_step : callable, optional
        Called with the rebuilt session and each step's record after the step (the session as
        it was then: evaluate it, draw it; do not change it).

    Returns
    -------
    ReplayResult
        The rebuilt session, a snapshot per step and the discovery of planted features where
        the specimen could be regenerated.

    Raises
    ------
    JournalError
        If the journal is unreadable or holds no complete step.
    ReplayError
        If the rebuild diverges from the record (another software version or configuration).
    """
    path = Path(path)
    contents = contents or open_recorded(path)
    config = validate_config(contents.config, SessionConfig, f"{path} (recorded configuration)")
    instrument = RecordedInstrument(contents)
    specimen, reason = ground_truth or recorded_ground_truth(contents)
    steps = set(figure_steps)
    if steps and figure_dir is None:
        raise ReplayError("per-step figures were asked for but no folder to write them to")
    with progress_bar(f"replaying {path.name}", progress) as bar:
        task = bar.add_task("replay", total=len(contents.steps))
        tracker = None
        if specimen is not None:
            grid = CandidateGrid.tiling(instrument.describe(), config.tiles.shape, config.tiles.pixel_size_nm)
            tracker = DiscoveryTracker(specimen, grid)
        observer = _ReplayObserver(contents, steps, Path(figure_dir or "."), tracker, bar, task, on_step)
        with tempfile.TemporaryDirectory(prefix="micrography-replay-") as scratch:
            # Session.resume appends to the journal it rebuilds from; a copy keeps the record untouched.
            copy = Path(scratch) / path.name
            shutil.copyfile(path, copy)
            try:
                session = _ObservedSession.resume(instrument, copy, config, on_step=observer)
            except SessionError as error:
                raise ReplayError(f"{path}: {str(error).replace(str(copy), str(path))}") from None
            finally:
                if observer.session is not None:
                    observer.session.close()
    detected = None
    if specimen is not None:
        simulator, _ = recorded_simulator(contents)
        detected = len(detected_features(session, specimen, exposure_truths(session, simulator, specimen)))
    return ReplayResult(
        contents=contents,
        session=session,
        snapshots=observer.snapshots,
        ground_truth=reason,
        tracker=tracker,
        detected_features=detected,
        figures=[s.figure for s in observer.snapshots if s.figure],
    )


# ----------------------------------------------------------------------------- region scores and re-scoring


def tile_region_scores(
    graph: MoleculeGraph,
    scorer: AnomalyScorer | None,
    extents_nm: Iterable[tuple[float, float, float, float]],
    top_fraction: float,
) -> np.ndarray:
    """Region score of each tile: the mean of the top share of its interior nodes' anomaly scores.

    The same rule the session uses when it tells the policy how interesting a tile was (the
    tile's interior nodes are scored as their own subgraph).

    Parameters
    ----------
    graph : MoleculeGraph
        The stitched graph.
    scorer : AnomalyScorer or None
        A fitted scorer (None or unfitted gives NaN everywhere).
    extents_nm : iterable of (x_min, x_max, y_min, y_max)
        Tile extents on the stage, nanometres.
    top_fraction : float
        Share of the highest node scores averaged.

    Returns
    -------
    numpy.ndarray
        One score per tile, NaN where a tile has no interior node.
    """
    extents = list(extents_nm)
    with single_thread_torch():
        scores = [tile_interest(graph, scorer, extent, top_fraction) for extent in extents]
    return np.array(scores, dtype=np.float64)


def final_region_scores(result: ReplayResult) -> np.ndarray:
    """Region score of every imaged tile with the session's final graph and scorer."""
    session = result.session
    return tile_region_scores(
        session.graph,
        session.scorer,
        # The graph's extents: registration may have moved a tile after its step (a bridge).
        session.graph.tile_extents,
        session.config.region_top_fraction,
    )


def rescoring_config(
    recorded: SessionConfig, config_path: str | Path | None = None, checkpoint: str | Path | None = None
) -> SessionConfig:
    """The configuration to re-score with: a YAML file's and/or another GAE checkpoint.

    Parameters
    ----------
    recorded : SessionConfig
        The session's recorded configuration (the starting point).
    config_path : str or pathlib.Path, optional
        A session YAML; its column finder, graph, anomaly model, warm-up, start tiles, seed,
        region and detection settings replace the recorded ones.
    checkpoint : str or pathlib.Path, optional
        A GAE checkpoint to load instead of training on the start tiles.

    Returns
    -------
    SessionConfig
        The re-scoring configuration.
    """
    from agent.config import load_config

    if config_path is None and checkpoint is None:
        raise ReplayError(
            "re-scoring needs another model (--model CHECKPOINT) or configuration (--config YAML)"
        )
    config = load_config(config_path, SessionConfig) if config_path is not None else recorded
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise ReplayError(f"{checkpoint}: checkpoint not found; train one with `micrography train`")
        config = config.model_copy(update={"checkpoint": str(checkpoint)})
    return config


def rescore_tiles(
    steps: list[StepRecord], config: SessionConfig, recorded: SessionConfig, progress: bool = True
) -> tuple[MoleculeGraph, AnomalyScorer | None]:
    """Carry recorded tiles through column finding, graph and GAE with another configuration or model.

    The tiles and their order are the recorded ones (nothing is re-decided); the scorer is
    trained (or loaded) when the session would have, after the start tiles, and follows the
    specimen with the same online updates, so the result is what the session would have
    scored with this model. Columns are re-found only when the column-finder settings differ.

    Parameters
    ----------
    steps : list of StepRecord
        The replayed session's steps (survey steps are skipped).
    config : SessionConfig
        The re-scoring configuration (:func:`rescoring_config`).
    recorded : SessionConfig
        The session's own configuration (the recorded columns were found with its settings).
    progress : bool
        Show a progress bar on stderr.

    Returns
    -------
    graph : MoleculeGraph
        The stitched graph under ``config.graph``.
    scorer : AnomalyScorer or None
        The scorer after the last tile (None if the graph stayed empty).
    """
    tiles = [step for step in steps if step.kind != "survey"]
    graph = MoleculeGraph(config.graph)
    scorer: AnomalyScorer | None = None
    starts = 0
    with progress_bar("re-scoring the recorded tiles", progress) as bar, single_thread_torch():
        task = bar.add_task("rescore", total=len(tiles))
        for step in tiles:
            if step.tile is None:
                raise ReplayError(f"step {step.index} has no recorded image; it cannot be re-scored")
            columns = step.columns
            if columns is None or config.columns != recorded.columns:
                columns = find_columns(step.tile, session_column_config(config))
            # The recorded placement: re-scoring changes the model, not where the tiles were.
            placement = step.placement or Placement.nominal(step.tile)
            moved = apply_moves(graph, placement)
            placed = placement.apply(columns)
            merge = graph.merge(
                placed, scanned_extent(placed, placement, step.tile, config.graph.lattice_spacing_nm)
            )
            updated = np.union1d(merge.updated_nodes, moved)
            starts += step.kind == "start"
            ready = step.kind == "guided" or starts >= config.start_tiles
            if scorer is None and ready and len(graph):
                scorer = session_scorer(config, graph)
            elif scorer is not None and updated.size:
                scorer.update(graph.to_pyg(updated))
            bar.advance(task)
    return graph, scorer


def rank_change(old: np.ndarray, new: np.ndarray, top_k: int = 5) -> dict[str, Any]:
    """How the ranking of regions changes from ``old`` to ``new`` scores (rank 1 = most interesting).

    Parameters
    ----------
    old, new : numpy.ndarray
        Region scores of the same tiles; tiles with a NaN in either are left out.
    top_k : int
        Size of the top list whose overlap is reported.

    Returns
    -------
    dict
        ``tiles`` compared, ``spearman`` and ``kendall`` rank correlations (NaN for fewer than
        two tiles or constant scores), ``top_k`` and ``top_k_overlap`` (shared share of the two
        top-k lists), ``old_rank`` and ``new_rank`` per tile (None where left out).
    """
    old = np.asarray(old, dtype=float)
    new = np.asarray(new, dtype=float)
    valid = np.isfinite(old) & np.isfinite(new)
    old_rank = np.full(old.size, np.nan)
    new_rank = np.full(new.size, np.nan)
    # Ordinal ranks (ties by tile order) so that each rank is held by exactly one tile.
    old_rank[valid] = stats.rankdata(-old[valid], method="ordinal")
    new_rank[valid] = stats.rankdata(-new[valid], method="ordinal")
    count = int(valid.sum())
    spearman = kendall = math.nan
    if count >= 2 and np.ptp(old[valid]) > 0 and np.ptp(new[valid]) > 0:
        spearman = float(stats.spearmanr(old[valid], new[valid]).statistic)
        kendall = float(stats.kendalltau(old[valid], new[valid]).statistic)
    k = min(top_k, count)
    top_old = set(np.flatnonzero(valid & (old_rank <= k)).tolist())
    top_new = set(np.flatnonzero(valid & (new_rank <= k)).tolist())
    return {
        "tiles": count,
        "spearman": spearman,
        "kendall": kendall,
        "top_k": k,
        "top_k_overlap": len(top_old & top_new) / k if k else math.nan,
        "old_rank": [None if math.isnan(r) else int(r) for r in old_rank],
        "new_rank": [None if math.isnan(r) else int(r) for r in new_rank],
    }


def write_rank_figure(
    old: np.ndarray, new: np.ndarray, change: dict[str, Any], path: str | Path, new_label: str
) -> Path:
    """Old against new region rank (left) and score (right) of every imaged tile, labelled by tile number.

    Parameters
    ----------
    old, new : numpy.ndarray
        Region scores as the session had them and under the new model.
    change : dict
        :func:`rank_change` of the two.
    path : str or pathlib.Path
        PNG to write.
    new_label : str
        What the new scores come from (axis label).

    Returns
    -------
    pathlib.Path
        The PNG written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 5.5), constrained_layout=True)
    ranks = [
        (o, n, t + 1)
        for t, (o, n) in enumerate(zip(change["old_rank"], change["new_rank"], strict=True))
        if o
    ]
    top = change["top_k"]
    in_top = np.array([o <= top or n <= top for o, n, _ in ranks], dtype=bool)
    rank_array = np.array([(o, n) for o, n, _ in ranks], dtype=float).reshape(-1, 2)
    for ax, xy in ((left, rank_array), (right, np.column_stack([old, new])[[t - 1 for *_, t in ranks]])):
        ax.scatter(*xy[~in_top].T, color="#1f77b4", s=18, label=f"in neither top {top}")
        ax.scatter(*xy[in_top].T, color="#d62728", s=18, label=f"in a top {top}")
    outline = [path_effects.withStroke(linewidth=2, foreground="white")]
    for old_rank, new_rank, tile in ranks:
        left.annotate(
            str(tile), (old_rank, new_rank), fontsize=7, xytext=(3, 3), textcoords="offset points",
            path_effects=outline,
        )  # fmt: skip
    count = max(len(ranks), 1)
    left.plot([1, count], [1, count], "--", color="grey", linewidth=0.8, label="same rank")
    left.set_xlim(count + 1, 0)
    left.set_ylim(count + 1, 0)
    left.set_xlabel("region rank as the session scored it (1 = most interesting)")
    left.set_ylabel(f"region rank with {new_label}")
    left.set_title(
        f"Spearman {change['spearman']:.2f}, Kendall {change['kendall']:.2f}, "
        f"top-{top} overlap {change['top_k_overlap']:.0%}"
    )
    left.legend(loc="lower right", fontsize=8)
    finite = np.concatenate([np.asarray(old, float), np.asarray(new, float)])
    finite = finite[np.isfinite(finite)]
    if finite.size:
        low, high = float(finite.min()), float(finite.max())
        right.plot([low, high], [low, high], "--", color="grey", linewidth=0.8, label="same score")
    right.set_xlabel(f"tile interest as the session scored it ({SCORE_UNIT})")
    right.set_ylabel(f"tile interest with {new_label} ({SCORE_UNIT})")
    right.set_title(f"{change['tiles']} imaged tiles; numbers on the left: acquisition order")
    right.legend(loc="upper left", fontsize=8)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def timing_breakdown(snapshots: list[StepSnapshot]) -> dict[str, Any]:
    """Seconds per pipeline stage over the high-resolution steps, as recorded and as replayed.

    Parameters
    ----------
    snapshots : list of StepSnapshot
        The replay's snapshots.

    Returns
    -------
    dict
        ``recorded`` and ``replayed``: per stage ``median_s``, ``mean_s``, ``total_s``;
        ``latency`` (median tile in -> next request out, acquisition excluded, as recorded).
    """
    tiles = [s for s in snapshots if s.kind != "survey"]
    result: dict[str, Any] = {"steps": len(tiles)}
    for source in ("recorded", "replayed"):
        table: dict[str, dict[str, float]] = {}
        recorded_stages = {stage for s in tiles for stage in getattr(s, f"{source}_timings")}
        stages = [*STEP_STAGES, *sorted(recorded_stages - set(STEP_STAGES))]
        for stage in stages:
            values = [
                getattr(s, f"{source}_timings")[stage]
                for s in tiles
                if stage in getattr(s, f"{source}_timings")
            ]
            if values:
                table[stage] = {
                    "median_s": float(np.median(values)),
                    "mean_s": float(np.mean(values)),
                    "total_s": float(np.sum(values)),
                }
        result[source] = table
    latencies = [sum(v for k, v in s.recorded_timings.items() if k in DECISION_STAGES) for s in tiles]
    result["latency"] = {"median_s": float(np.median(latencies)) if latencies else None}
    return result


def format_timings(timings: dict[str, Any]) -> str:
    """The timing breakdown as an aligned text table."""
    recorded, replayed = timings["recorded"], timings["replayed"]
    stages = list(dict.fromkeys([*recorded, *replayed]))
    width = max([len("stage"), *map(len, stages)])
    lines = [
        f"{'stage':<{width}} {'recorded median':>16} {'recorded total':>15} "
        f"{'replay median':>14} {'replay total':>13}"
    ]
    for stage in stages:
        cells = []
        for table in (recorded, replayed):
            figures = table.get(stage)
            cells += (
                ["-", "-"]
                if figures is None
                else [f"{figures['median_s']:.4f} s", f"{figures['total_s']:.3f} s"]
            )
        lines.append(f"{stage:<{width}} {cells[0]:>16} {cells[1]:>15} {cells[2]:>14} {cells[3]:>13}")
    latency = timings["latency"]["median_s"]
    if latency is not None:
        lines.append(
            f"recorded median tile in -> next request out: {latency:.3f} s over {timings['steps']} tiles"
        )
    lines.append("(the replay takes columns from the journal, so its column stage is only a lookup)")
    return "\n".join(lines)


def run_replay(
    journal: str | Path,
    out: str | Path,
    every: int | None = None,
    steps: str | None = None,
    checkpoint: str | Path | None = None,
    config_path: str | Path | None = None,
    top_k: int = 5,
    progress: bool = True,
) -> dict[str, Any]:
    """Replay a journal and write its figures and ``replay.json``; re-score if a model or config is given.

    Parameters
    ----------
    journal : str or pathlib.Path
        The session journal.
    out : str or pathlib.Path
        Output folder: ``replay.png`` (the session at its last step), ``steps/step-NNNN.png``,
        ``replay.json`` and, when re-scoring, ``rescore.png``.
    every : int, optional
        Draw the session after every N-th high-resolution tile as well.
    steps : str, optional
        Draw it after these steps too (``"3,5,10-12,last"``).
    checkpoint : str or pathlib.Path, optional
        Re-score with this GAE checkpoint.
    config_path : str or pathlib.Path, optional
        Re-score with this session configuration (YAML).
    top_k : int
        Size of the top list compared when re-scoring.
    progress : bool
        Show progress bars on stderr.

    Returns
    -------
    dict
        What ``replay.json`` holds: journal, problems, ground truth, reproduction check, per-step
        snapshots, final region scores, timings, figures and the re-scoring (or None).
    """
    if every is not None and every < 1:
        raise ReplayError(f"--every {every}: draw every N-th tile with N >= 1")
    if top_k < 1:
        raise ReplayError(f"--top-k {top_k}: compare a top list of at least one region")
    out = Path(out)
    contents = open_recorded(journal)
    recorded = validate_config(contents.config, SessionConfig, f"{journal} (recorded configuration)")
    # Settle what to re-score with before the replay, so a mistyped path fails at once.
    new_config = None
    if checkpoint is not None or config_path is not None:
        new_config = rescoring_config(recorded, config_path, checkpoint)
    chosen = parse_steps(steps, len(contents.steps))
    if every:
        tiles = [s.index for s in contents.steps if s.record.get("kind") != "survey"]
        chosen.update(tiles[every - 1 :: every])
    out.mkdir(parents=True, exist_ok=True)
    result = replay_journal(journal, out / "steps", chosen, progress, contents)
    session = result.session
    final_figure = write_session_report(
        session,
        out / "replay.png",
        tracker=result.tracker,
        title=f"Replay of {_journal_name(Path(journal))}: all {len(result.snapshots)} steps",
    )
    final = final_region_scores(result)
    tile_steps = result.tile_steps
    recorded_scores = [s.recorded_score for s in result.snapshots if s.kind != "survey"]
    report: dict[str, Any] = {
        "journal": str(journal),
        "problems": list(contents.problems),
        "policy": session.config.policy,
        "seed": session.config.seed,
        "ground_truth": {
            "available": not result.ground_truth,
            "reason": result.ground_truth or None,
            "planted_features": None if result.tracker is None else result.tracker.total,
            "imaged_features": None if result.tracker is None else len(result.tracker.imaged),
            "detected_features": result.detected_features,
        },
        "reproduction": result.reproduction(),
        "summary": session.summary(),
        "steps": [{**vars(s), "score_difference": s.score_difference} for s in result.snapshots],
        "final_region_scores": [
            {
                "tile": number + 1,
                "step": step.index,
                "request_id": step.request.request_id,
                "x_nm": step.request.x_nm,
                "y_nm": step.request.y_nm,
                "recorded_score": recorded,
                "final_score": float(score),
            }
            for number, (step, recorded, score) in enumerate(
                zip(tile_steps, recorded_scores, final, strict=True)
            )
        ],
        "timings": timing_breakdown(result.snapshots),
        "figures": {"final": str(final_figure), "steps": result.figures},
        "rescore": None,
    }
    if new_config is not None:
        graph, scorer = rescore_tiles(session.steps, new_config, session.config, progress)
        new = tile_region_scores(graph, scorer, session.graph.tile_extents, new_config.region_top_fraction)
        label = f"model {Path(checkpoint).name}" if checkpoint else f"config {Path(config_path or '').name}"
        if checkpoint and config_path:
            label = f"{Path(config_path).name} + {Path(checkpoint).name}"
        change = rank_change(final, new, top_k)
        figure = write_rank_figure(final, new, change, out / "rescore.png", label)
        report["rescore"] = {
            "model": None if checkpoint is None else str(checkpoint),
            "config": None if config_path is None else str(config_path),
            "nodes": len(graph),
            "old_scores": final.tolist(),
            "new_scores": new.tolist(),
            **change,
            "figure": str(figure),
        }
    report = jsonable(report)
    (out / "replay.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def format_replay(report: dict[str, Any]) -> str:
    """What a replay found, for the terminal: reproduction, discovery, timings, rank change."""
    reproduction = report["reproduction"]
    lines = [
        f"journal         {report['journal']} ({reproduction['steps']} steps; policy {report['policy']}, "
        f"seed {report['seed']})",
    ]
    lines += [f"warning         {problem}" for problem in report["problems"]]
    verdict = "reproduced" if reproduction["scores_reproduced"] else "NOT reproduced"
    lines.append(
        f"region scores   {verdict}: {reproduction['scores_compared']} compared, largest difference "
        f"{reproduction['max_abs_score_difference']:.3g}; decisions and node counts "
        + ("match" if reproduction["nodes_reproduced"] else "differ")
    )
    truth = report["ground_truth"]
    if truth["available"]:
        lines.append(
            f"ground truth    {truth['imaged_features']} of {truth['planted_features']} planted features "
            "imaged, "
            f"{truth['detected_features']} detected"
        )
    else:
        lines.append(f"ground truth    none: {truth['reason']}")
    lines.append(format_timings(report["timings"]))
    rescore = report["rescore"]
    if rescore is not None:
        lines.append(
            f"re-scored       {rescore['tiles']} tiles: Spearman {_fmt(rescore['spearman'])}, Kendall "
            f"{_fmt(rescore['kendall'])}, top-{rescore['top_k']} overlap {_fmt(rescore['top_k_overlap'])}"
        )
        moves = [
            (abs(o - n), t + 1, o, n)
            for t, (o, n) in enumerate(zip(rescore["old_rank"], rescore["new_rank"], strict=True))
            if o is not None and n is not None and o != n
        ]
        for _, tile, old_rank, new_rank in sorted(moves, reverse=True)[:5]:
            lines.append(f"                tile {tile}: rank {old_rank} -> {new_rank}")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"
