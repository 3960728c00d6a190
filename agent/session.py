"""A guided acquisition session: survey, start tiles, then the loop until the budget is spent.

Each step of the loop::

    acquire -> columns -> register (placement and drift within the frame, agent.registration)
            -> graph merge in the specimen frame -> GAE update and scores -> region score
            -> domain wall in the tile (policy.ingest_walls)
            -> surrogate update (policy.ingest) -> next request (policy.suggest)

is timed, and appended to the :class:`~agent.journal.SessionJournal` before the
next exposure. With ``lookahead_tiles`` = 0 the loop is sequential: the instrument waits for every
decision. With ``lookahead_tiles`` >= 1 it is pipelined: an
:class:`~agent.acquisition.AcquisitionWorker` scans the requests already decided while the session
works on the tiles already back, and after each tile the policy tops the decided, unprocessed
requests up to ``lookahead_tiles + 1`` (pending ones are not admissible, so it never chooses a
tile twice). Which tile is chosen after which step follows from that rule alone, never from
timing (``decided_after_step`` in each journaled step says what was known), so journals replay
and sessions resume exactly; the worker checks the budget and a stop request before each scan
with the tiles exposed so far, as the sequential loop does.

A session interrupted at any point is resumed with :meth:`Session.resume`: the recorded
steps are replayed through the same deterministic pipeline (no exposure), the rebuilt
decisions are checked against the recorded ones, and the loop continues where it stopped,
so the final state equals that of an uninterrupted run with the same seed. A session
that ended (budget spent) journals an end record; resumed with the same budget it
is rebuilt read-only (:attr:`Session.complete`) and :meth:`Session.run` exposes and
writes nothing.

Every request id starts with the session's id (``SessionConfig.session_id``; by
default a new random one per session, kept in the journal and reused on resume):
an instrument that remembers the ids it exposed (``micrography serve`` with its
exposure journal) must never take a new session's scan for an old one and answer
it with an old tile. A tile the driver marks as not exposed for this request
(``tile.metadata["replayed"]``) is refused in a fresh session; after a resume only
the first ``lookahead_tiles + 1`` acquisitions may be (the exposures out when the session stopped).

Instrument time (the ``max_time_s`` budget, ``summary()["instrument_time_s"]``) is
summed step by step on the instrument's clock: from the end of the previous tile to
the end of this one, so stage settling and the pipeline's wait count; where the
instrument clock went back (a restarted instrument), only the tile's own scan time.

The session never sees ground truth. An optional ``on_step`` callback (used by
the command line and the benchmarks for evaluation and progress bars) receives
each step's record after it is journaled.
"""

from __future__ import annotations

import math
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
import torch
from pydantic import Field, model_validator

from agent.acquisition import (
    Acquired,
    AcquisitionWorker,
    BudgetConfig,
    InstrumentLedger,
)
from agent.anomaly import (
    SHIPPED_MODEL,
    AnomalyConfig,
    AnomalyScorer,
    CheckpointError,
    region_scores,
    resolve_checkpoint,
    single_thread_torch,
)
from agent.columns import ColumnFinderConfig, Columns, find_columns, lattice_extent
from agent.config import StrictModel
from agent.domains import WallConfig, WallSegment, wall_in_tile
from agent.driver import MicroscopeDriver, ScanRequest, Tile
from agent.errors import MicrographyError
from agent.graph import GraphConfig, MoleculeGraph
from agent.journal import JournalStep, SessionJournal, read_journal, recover_rewrite
from agent.operator import OperatorAction, OperatorDesk, OperatorError
from agent.policy import POLICY_NAMES, AcquisitionPolicy, PolicyConfig, make_policy, tile_dose
from agent.registration import Placement, Registrar, RegistrationConfig
from agent.surrogate import SurrogateConfig
from agent.survey import CandidateGrid, lattice_disorder, survey_features, survey_request

STEP_STAGES: tuple[str, ...] = (
    "acquire", "columns", "register", "graph", "anomaly", "region_score", "walls", "surrogate", "decision",
)  # fmt: skip
"""Stages timed in every step, in pipeline order (``StepRecord.timings`` keys)."""

DECISION_STAGES: tuple[str, ...] = STEP_STAGES[1:]
"""The stages from a tile's arrival to the next request: the decision latency."""


NOTHING_ADMISSIBLE = "no admissible region is left (dose limits or everything scanned)"
"""Stop reason of a session whose policy has no candidate left to suggest."""


class SessionError(MicrographyError, RuntimeError):
    """A session cannot start, continue or resume."""


SESSION_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"
"""What a session id may look like: it prefixes request ids (at most 128 printable characters)."""

REPLAYED_KEY = "replayed"
"""Tile metadata key by which a driver says the tile was not exposed for this request.

A driver sets ``tile.metadata["replayed"] = True`` when the instrument answered the first
attempt of an acquisition with a tile it had made before (from its reply cache or journal).
"""


def new_session_id() -> str:
    """A fresh session id: the UTC start time and 24 random bits, e.g. ``20250314-101502-a3f9c1``.

    Returns
    -------
    str
        22 characters matching :data:`SESSION_ID_PATTERN`; readable in an instrument's log and
        sorted by start time.
    """
    return f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


class ScanSettings(StrictModel):
    """Pixel size, shape and dwell of one kind of scan."""

    pixel_size_nm: float = Field(gt=0, description="pixel size on the specimen")
    dwell_us: float = Field(gt=0, description="time the beam spends on each pixel")
    shape: tuple[int, int] = Field((512, 512), description="frame size, rows x columns")


class SessionConfig(StrictModel):
    """Everything a guided session needs; ``configs/session.yaml`` is loaded into it."""

    policy: str = Field("guided", description=f"one of {', '.join(POLICY_NAMES)}")
    seed: int = Field(0, description="seeds the scorer, the surrogate and the policy")
    session_id: str | None = Field(
        None,
        pattern=SESSION_ID_PATTERN,
        description="prefix of every request id; null makes a new random one per session (recorded in "
        "the journal and kept on resume), so an instrument that remembers ids never answers a new scan "
        "with an old tile. The simulator's noise and placement errors follow the order of exposures, "
        "not the ids, so a simulated session repeats with the same seed whatever its id",
    )
    budget: BudgetConfig = BudgetConfig()
    survey: ScanSettings = ScanSettings(pixel_size_nm=0.25, dwell_us=4.0, shape=(4096, 4096))
    tiles: ScanSettings = ScanSettings(pixel_size_nm=0.02, dwell_us=8.0, shape=(512, 512))
    tile_overlap_fraction: float = Field(
        0.0,
        ge=0.0,
        lt=0.5,
        description="nominal overlap of neighbouring candidate tiles (share of a tile side); "
        "an overlap of a few nm lets registration place each tile to picometres",
    )
    start_tiles: int = Field(4, ge=1, description="spread-out tiles before the first decision")
    lookahead_tiles: int = Field(
        1,
        ge=0,
        le=4,
        description="requests decided ahead of the tile being worked on. 1: the pipelined loop, the "
        "instrument scans the next tile (chosen with what was known one tile earlier) while the agent "
        "works on the last one. 0: the sequential loop, the instrument waits for every decision",
    )
    checkpoint: str | None = Field(
        SHIPPED_MODEL,
        description="GAE checkpoint: 'shipped' (the model shipped with the package), a file written by "
        "`micrography train`, or 'none' (or null) to train one on the start tiles",
    )
    recalibrate_checkpoint: bool = Field(
        True,
        description="with a checkpoint, measure its error scales again on the start tiles, so that "
        "scores of normal lattice stay about 1 at this session's dose and noise",
    )
    warmup_steps: int = Field(
        60, ge=1, description="GAE steps on the start tiles when no checkpoint is given"
    )
    detection_threshold: float = Field(3.0, gt=0, description="node score above which a node is 'detected'")
    region_top_fraction: float = Field(
        0.02,
        gt=0,
        le=1,
        description="region score = mean of this top share of node scores (small clusters count)",
    )
    columns: ColumnFinderConfig = ColumnFinderConfig()
    registration: RegistrationConfig = RegistrationConfig()
    graph: GraphConfig = GraphConfig()
    walls: WallConfig = WallConfig()
    anomaly: AnomalyConfig = AnomalyConfig(device="auto", online_steps=4)
    surrogate: SurrogateConfig = SurrogateConfig()
    acquisition: PolicyConfig = PolicyConfig(beta=1.0, saturation=1.0, survey_prior=1.0, wall_follow=4.0)
    simulator: dict[str, Any] | None = Field(
        None,
        description="the simulated instrument (simulator.config.SimulatorConfig keys) for `micrography run`",
    )

    overridden_keys: ClassVar[dict[str, str]] = {
        "anomaly.warmup_steps": "not used by a session, which warms up for `warmup_steps`",
        "anomaly.region_top_fraction": "not used by a session, which scores tiles by `region_top_fraction`",
        "anomaly.seed": "not used by a session, which seeds the scorer with `seed`",
        "surrogate.seed": "not used by a session, which seeds the surrogate with `seed`",
        "acquisition.name": "not used by a session, which runs `policy`",
        "acquisition.dwell_us": "not used by a session, which scans at `tiles.dwell_us`",
        "acquisition.seed": "not used by a session, which seeds the policy with `seed`",
    }
    """Nested keys a session sets from its own top-level keys: leave them at their defaults."""

    @model_validator(mode="after")
    def _overridden_keys_left_alone(self) -> Self:
        for key, why in self.overridden_keys.items():
            section, name = key.split(".")
            default = getattr(type(self).model_fields[section].default, name)
            if getattr(getattr(self, section), name) != default:
                raise ValueError(f"{key} is {why}; set that instead")
        return self


@dataclass
class StepRecord:
    """What one step did, as journaled (JSON-friendly).

    Parameters
    ----------
    index : int
        Step number from 0 (the survey tiles come first).
    kind : str
        ``"survey"``, ``"start"`` or ``"guided"``.
    request : ScanRequest
        The scan executed.
    tile : Tile or None
        The tile (None when rebuilt from a journal without images).
    columns : Columns or None
        Columns found (None for survey tiles), at the instrument's nominal stage positions.
    score : float
        Region interest ingested by the policy (NaN for survey tiles).
    decision : list of dict
        The next request(s) chosen after this step.
    timings : dict
        Seconds per stage.
    extra : dict
        Counts and summaries (nodes, new nodes, dose spent, surrogate summary).
    placement : Placement or None
        Where the tile was measured to be (None for survey tiles); ``placement.apply(columns)``
        gives the columns in the session's specimen frame, as merged into the graph.
    """

    index: int
    kind: str
    request: ScanRequest
    tile: Tile | None
    columns: Columns | None
    score: float
    decision: list[dict[str, Any]]
    timings: dict[str, float]
    extra: dict[str, Any] = field(default_factory=dict)
    placement: Placement | None = None

    @property
    def extent_nm(self) -> tuple[float, float, float, float]:
        """The tile's area in the specimen frame as registered at its step, else as requested, nm.

        A later tile may move it (``Placement.moves``); the graph's ``tile_extents`` are current.
        """
        if self.placement is not None and self.tile is not None:
            return self.placement.extent_nm(self.tile)
        return self.request.extent_nm

    def to_record(self) -> dict[str, Any]:
        """The journal's JSON record of this step."""
        tile = self.tile
        return {
            "index": self.index,
            "kind": self.kind,
            "request": self.request.model_dump(mode="json"),
            "tile": None
            if tile is None
            else {
                "origin_nm": list(tile.origin_nm),
                "pixel_size_nm": tile.pixel_size_nm,
                "dose_e_per_a2": tile.dose_e_per_a2,
                "t_start": tile.t_start,
                "t_end": tile.t_end,
                "metadata": tile.metadata,
            },
            "placement": None if self.placement is None else self.placement.to_record(),
            "score": None if not math.isfinite(self.score) else self.score,
            "decision": self.decision,
            "timings": self.timings,
            **self.extra,
        }


def tile_interest(
    graph: MoleculeGraph,
    scorer: AnomalyScorer | None,
    extent_nm: tuple[float, float, float, float],
    top_fraction: float,
) -> float:
    """Region interest of one tile: the mean of the top share of its interior nodes' anomaly scores.

    This is what a session tells its policy about each tile; averaging only the top share
    lets a small defect cluster count in a tile of otherwise perfect lattice.

    Parameters
    ----------
    graph : MoleculeGraph
        The stitched graph.
    scorer : AnomalyScorer or None
        A fitted scorer (None or unfitted gives NaN).
    extent_nm : tuple of float
        The tile's ``(x_min, x_max, y_min, y_max)`` on the stage, nm.
    top_fraction : float
        Share of the highest node scores averaged.

    Returns
    -------
    float
        Interest in the scorer's units (robust z), NaN when the tile has no interior node.
    """
    if scorer is None or not scorer.fitted:
        return math.nan
    x_min, x_max, y_min, y_max = extent_nm
    nodes = graph.nodes_in(x_min, x_max, y_min, y_max)
    nodes = nodes[graph.interior[nodes]]
    if nodes.size == 0:
        return math.nan
    scores = scorer.score(graph.to_pyg(nodes)).score
    return float(region_scores(scores, np.zeros(nodes.size, dtype=np.int64), 1, top_fraction)[0])


def scanned_extent(
    placed: Columns, placement: Placement, tile: Tile, lattice_spacing_nm: float
) -> tuple[float, float, float, float]:
    """Where a placed tile counts as scanned: its registered extent, cut to the lattice it found.

    Columns along a film edge inside the tile (or in a tile that landed past the edge) are then
    the rim of the scan, not anomalies (:func:`agent.columns.lattice_extent`).

    Parameters
    ----------
    placed : Columns
        The tile's columns in the specimen frame (``placement.apply(columns)``).
    placement : Placement
        The tile's placement.
    tile : Tile
        The tile.
    lattice_spacing_nm : float
        Lattice spacing, nm.

    Returns
    -------
    tuple of float
        ``(x_min, x_max, y_min, y_max)``, nm.
    """
    return lattice_extent(placed.x_nm, placed.y_nm, placement.extent_nm(tile), lattice_spacing_nm)


def apply_moves(graph: MoleculeGraph, placement: Placement) -> np.ndarray:
    """Move the parts of the mosaic a tile's registration joined (``placement.moves``); before its merge.

    Parameters
    ----------
    graph : MoleculeGraph
        The stitched graph.
    placement : Placement
        The new tile's placement.

    Returns
    -------
    numpy.ndarray
        Ids of the nodes whose features changed.
    """
    moved = [graph.translate_tiles(tiles, shift) for tiles, shift in placement.moves]
    return np.unique(np.concatenate(moved)) if moved else np.zeros(0, dtype=np.int64)


def session_column_config(config: SessionConfig) -> ColumnFinderConfig:
    """The column finder a session uses: its own settings, told the material's spacing (``graph``).

    Knowing the spacing keeps a tile that lands partly on vacuum or an amorphous patch (the
    stage is never exactly where it was asked) from reading the clutter as the lattice.

    Parameters
    ----------
    config : SessionConfig
        Session settings.

    Returns
    -------
    ColumnFinderConfig
        ``config.columns`` with ``expected_spacing_nm`` set when it was not.
    """
    if config.columns.expected_spacing_nm is not None:
        return config.columns
    return config.columns.model_copy(update={"expected_spacing_nm": config.graph.lattice_spacing_nm})


def check_checkpoint(config: SessionConfig) -> None:
    """Raise now if the session's checkpoint cannot be loaded, rather than after the start tiles.

    Loads it once and throws it away; the torch random state is left as it was, so the session
    that loads it again after its start tiles is the same as without this check.

    Parameters
    ----------
    config : SessionConfig
        Session settings (``checkpoint``, ``anomaly.device``).

    Raises
    ------
    CheckpointError
        If the file is missing, unreadable, or not a checkpoint this version can use.
    """
    path = resolve_checkpoint(config.checkpoint)
    if path is None:
        return
    try:
        with torch.random.fork_rng(devices=[]):
            AnomalyScorer.load(path, device=config.anomaly.device)
    except CheckpointError as error:
        message = str(error)
        if "not a readable checkpoint" in message:
            # torch's own explanation runs over many lines and suggests unsafe loading: say what it is.
            message = (
                f"{path}: not a readable checkpoint (not a file written by `micrography "
                "train`, or damaged); give a graph-autoencoder checkpoint or none"
            )
        raise CheckpointError(message.splitlines()[0]) from None


def session_scorer(config: SessionConfig, graph: MoleculeGraph) -> AnomalyScorer:
    """The scorer a session starts scoring with: the checkpoint, or a GAE warmed up on ``graph``.

    Parameters
    ----------
    config : SessionConfig
        Session settings (``checkpoint``, ``recalibrate_checkpoint``, ``anomaly``, ``seed``,
        ``warmup_steps``).
    graph : MoleculeGraph
        The graph of the start tiles: the GAE's training data without a checkpoint, the data
        its error scales are measured on again with one.

    Returns
    -------
    AnomalyScorer
        A fitted scorer.
    """
    path = resolve_checkpoint(config.checkpoint)
    if path is not None:
        scorer = AnomalyScorer.load(path, device=config.anomaly.device)
        if config.recalibrate_checkpoint and len(graph):
            scorer.recalibrate([graph.to_pyg()])
        return scorer
    anomaly = config.anomaly.model_copy(update={"seed": config.seed, "warmup_steps": config.warmup_steps})
    scorer = AnomalyScorer(anomaly)
    scorer.fit([graph.to_pyg()])
    return scorer


class Session:
    """One guided acquisition session on one instrument.

    Parameters
    ----------
    driver : MicroscopeDriver
        The instrument (simulated, replayed, or remote over ZeroMQ).
    config : SessionConfig, optional
        Policy, budget, scan settings and models.
    journal_path : str or pathlib.Path, optional
        Where to journal the session (HDF5); None keeps no journal.
    on_step : callable, optional
        Called with each :class:`StepRecord` after it is journaled (evaluation, progress).
    truth : object, optional
        Ground truth for the ``oracle`` policy only (per-candidate feature-id sets).

    Raises
    ------
    SessionError
        For an unknown policy.
    CheckpointError
        If ``config.checkpoint`` cannot be loaded (checked here, before anything is exposed).

    Examples
    --------
    Not run as a test (a whole session takes about a minute)::

        with SimulatedMicroscope() as microscope:
            session = Session(microscope, SessionConfig(), journal_path="runs/s/journal.h5")
            session.run()
    """

    def __init__(
        self,
        driver: MicroscopeDriver,
        config: SessionConfig | None = None,
        journal_path: str | Path | None = None,
        on_step: Callable[[StepRecord], None] | None = None,
        truth: Any = None,
    ) -> None:
        self.driver = driver
        config = config or SessionConfig()
        if config.policy not in POLICY_NAMES:
            raise SessionError(f"unknown policy {config.policy!r}; choose one of {', '.join(POLICY_NAMES)}")
        check_checkpoint(config)
        if config.session_id is None:
            config = config.model_copy(update={"session_id": new_session_id()})
        self.config = config
        self.session_id: str | None = config.session_id
        """Prefix of every request id of this session (None: a version-1 journal's unprefixed ids)."""
        self.on_step = on_step
        self.description = driver.describe()
        self.grid = CandidateGrid.tiling(
            self.description,
            self.config.tiles.shape,
            self.config.tiles.pixel_size_nm,
            self.config.tile_overlap_fraction,
        )
        self.graph = MoleculeGraph(self.config.graph)
        self.registrar = Registrar(self.config.registration)
        self._column_config = session_column_config(self.config)
        self.scorer: AnomalyScorer | None = None
        self.policy: AcquisitionPolicy | None = None
        self.steps: list[StepRecord] = []
        self.survey_tiles: list[Tile] = []
        self.features: np.ndarray | None = None
        self.truth = truth
        self.stop_reason = ""
        self._journal_path = Path(journal_path) if journal_path is not None else None
        self._journal: SessionJournal | None = None
        self._next: list[ScanRequest] = []
        (x0, x1), (y0, y1) = self.description.stage_x_nm, self.description.stage_y_nm
        self._ledger = InstrumentLedger(stage_area_a2=(x1 - x0) * (y1 - y0) * 100.0)
        self._decided_after: dict[str, int] = {}  # request id -> the step after which it was chosen
        self._replay: list[JournalStep] = []
        self._replay_problems: list[str] = []
        self._pending_starts: list[tuple[ScanRequest, Tile, tuple[float, float, float, float]]] = []
        self._stop = threading.Event()
        self._stop_reason = ""
        self.interrupted = False
        """True when the session stopped on :meth:`request_stop` (or an exception), not on its budget."""
        # After a resume, the first acquisitions may be ones the instrument made before the stop
        # (in flight, or back but not yet journaled): at most lookahead_tiles + 1 of them.
        self._may_replay = 0
        self._live_timings: dict[int, dict[str, float]] = {}  # step -> timings as it ran live
        # When the driver last handed back a tile (wall clock): the instrument waits from then on.
        self._acquire_returned: float | None = None
        self._resumed: dict[str, Any] | None = None
        self.operator = OperatorDesk(check=self._check_operator_action, on_stop=self.request_stop)
        """Where pause, resume, stop, region marks and live settings arrive (:mod:`agent.operator`)."""
        self._worker: AcquisitionWorker | None = None
        self._paused_before_next = 0.0  # operator pause since the last tile came back, s
        self.complete = False
        """True for a session rebuilt from the journal of one that ended (nothing left to run)."""

    # ------------------------------------------------------------------ public API

    def run(self) -> dict[str, Any]:
        """Run (or continue) the session until the budget is spent; returns :meth:`summary`.

        A complete session journals its end record (resuming it is then refused). A session
        stopped by :meth:`request_stop` finishes the step in progress, journals it and returns
        with :attr:`interrupted` set; one stopped by an exception (Ctrl-C, an instrument error)
        keeps every step journaled before it. Both can be resumed.
        """
        if self.complete:
            return self.summary()  # rebuilt from a complete journal: nothing to expose or write
        with single_thread_torch():
            try:
                self._open_journal()
                if self.config.lookahead_tiles > 0:
                    self._run_pipelined()
                else:
                    self._run_sequential()
                if not self.interrupted and self._journal is not None:
                    self._journal.append_end(self._end_record())
            except BaseException:
                self.interrupted = True
                self.stop_reason = self.stop_reason or "interrupted"
                raise
            finally:
                self.close()
        return self.summary()

    def _run_sequential(self) -> None:
        """Acquire, work on the tile, decide, acquire again: the instrument waits for every decision."""
        if not self.survey_tiles:
            self._survey()
        if not self._stopping():
            self._start()
        while self._hold() and self._within_budget():
            if not self._next:
                self.stop_reason = NOTHING_ADMISSIBLE
                break
            self._step(self._next.pop(0), "guided")
        else:
            self.stop_reason = self.stop_reason or "budget spent"

    def _run_pipelined(self) -> None:
        """Hand the instrument its next requests before it finishes the current one.

        An :class:`~agent.acquisition.AcquisitionWorker` scans the submitted requests in order
        while this thread works on the tiles already back; after each tile the policy tops the
        decided-but-unprocessed requests up to ``lookahead_tiles + 1``. Which tile is chosen after
        which step is fixed by that rule, not by timing, so the journal replays exactly. At most
        ``lookahead_tiles + 1`` requests are out (submitted, not yet journaled) at any time, survey
        and start tiles included: a session killed at any moment has at most that many exposures
        the journal does not know, and those are the first it asks for again on resume.
        """
        depth = self.config.lookahead_tiles + 1
        worker = AcquisitionWorker(
            self.driver,
            self._ledger,
            self.config.budget,
            self._stop,
            check_tile=self._check_exposed,
            hold=lambda: self.operator.wait_while_paused(self._stop),
        )
        self._worker = worker
        planned: deque[tuple[ScanRequest, str]] = deque()
        surveying = not self.survey_tiles
        if surveying:
            planned.extend((request, "survey") for request in self._survey_requests())
        done = {step.request.request_id for step in self.steps}
        planned.extend((r, "start") for r in self._start_requests() if r.request_id not in done)
        if not planned and not self._next:
            self._next = self._ensure_policy().suggest(depth)
        submitted: deque[tuple[ScanRequest, str]] = deque()
        handed: set[str] = set()
        failed = True
        try:
            while True:
                planned.extend((r, "guided") for r in self._next if r.request_id not in handed)
                handed.update(r.request_id for r in self._next)
                while planned and len(submitted) < depth:
                    submitted.append(planned.popleft())
                    worker.submit(*submitted[-1])
                if not submitted:
                    if self._within_budget():
                        self.stop_reason = NOTHING_ADMISSIBLE
                    break
                asked = time.perf_counter()
                result = worker.result()
                result.collected_s = time.perf_counter() - asked
                request, kind = submitted.popleft()
                if result.request.request_id != request.request_id:
                    raise AssertionError(f"the worker returned {result.request.request_id} for {request}")
                if result.error is not None:
                    raise result.error
                if result.refused is not None:
                    if not self._stopping():
                        self.stop_reason = result.refused
                    break
                if kind == "guided":
                    expected = self._next.pop(0)
                    if expected.request_id != request.request_id:
                        raise AssertionError(f"scanned {request.request_id} before {expected.request_id}")
                self._step(request, kind, acquired=result)
                if kind == "survey" and not any(k == "survey" for _, k in (*submitted, *planned)):
                    self.features = survey_features(self.survey_tiles, self.grid)
            failed = False
        finally:
            if surveying and self.features is None and self.survey_tiles:
                self.features = survey_features(self.survey_tiles, self.grid)
            worker.close(abort=failed)
            self._worker = None

    def request_stop(self, reason: str = "interrupted") -> None:
        """Stop after the step in progress (safe from a signal handler or another thread).

        The tile being scanned is finished, carried through the pipeline and journaled, then
        :meth:`run` returns with :attr:`interrupted` set and ``stop_reason`` = ``reason``; the
        journal has no end record, so the session can be resumed.

        Parameters
        ----------
        reason : str
            Why, for the summary (e.g. ``"interrupted (Ctrl-C)"``).
        """
        self._stop_reason = reason
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        """True once :meth:`request_stop` was called."""
        return self._stop.is_set()

    def _stopping(self) -> bool:
        if self._stop.is_set():
            self.interrupted = True
            self.stop_reason = self._stop_reason
            return True
        return False

    def _end_record(self) -> dict[str, Any]:
        return {
            "stop_reason": self.stop_reason,
            "budget": self.config.budget.model_dump(mode="json"),
            "tiles": sum(step.kind != "survey" for step in self.steps),
            "steps": len(self.steps),
            "mean_dose_e_per_a2": self._ledger.mean_dose_e_per_a2,
            "instrument_time_s": self._ledger.instrument_time_s,
        }

    @classmethod
    def resume(
        cls,
        driver: MicroscopeDriver,
        journal_path: str | Path,
        config: SessionConfig | None = None,
        on_step: Callable[[StepRecord], None] | None = None,
        truth: Any = None,
    ) -> Session:
        """Rebuild an interrupted session from its journal, ready to :meth:`run` on.

        Parameters
        ----------
        driver : MicroscopeDriver
            The instrument to continue on (it must describe the same stage).
        journal_path : str or pathlib.Path
            The interrupted session's journal.
        config : SessionConfig, optional
            Overrides; by default the configuration recorded in the journal (a different
            budget is allowed, anything else must match for the replay to be faithful).
        on_step, truth
            As for :class:`Session`.

        Returns
        -------
        Session
            A session whose state equals the interrupted one's at its last complete step, with
            the same session id (its next request ids continue the recorded ones). For the
            journal of a session that ended, resumed with the recorded budget, the session is
            rebuilt without touching the journal and :attr:`complete` is True: :meth:`run`
            then returns its summary at once.

        Raises
        ------
        SessionError
            If the configuration differs in more than the budget, or the instrument differs.
        """
        journal_path = Path(journal_path)
        recover_rewrite(journal_path)
        contents = read_journal(journal_path)
        recorded = SessionConfig.model_validate(contents.config)
        # A version-1 journal has no session id: its request ids carry no prefix.
        session_id = recorded.session_id
        if config is None:
            config = recorded
        elif (
            config.model_copy(
                update={
                    "budget": recorded.budget,
                    "session_id": session_id if config.session_id is None else config.session_id,
                }
            )
            != recorded
        ):
            raise SessionError(
                f"{journal_path}: the configuration differs from the recorded one in more than the budget; "
                "resume with the recorded configuration"
            )
        complete = contents.end is not None and config.budget == recorded.budget
        session = cls(driver, config.model_copy(update={"session_id": session_id}), None, on_step, truth)
        # A version-1 journal has no session id, and the rebuilt session must not invent one.
        session.session_id = session_id
        session.config = session.config.model_copy(update={"session_id": session_id})
        if session.description.model_dump(mode="json") != contents.instrument:
            raise SessionError(
                f"{journal_path}: recorded on another instrument ({contents.instrument.get('name')}); "
                "resume on the instrument the session started on"
            )
        if not complete:
            session._journal, contents = SessionJournal.continue_from(journal_path, contents)
        session._journal_path = journal_path
        session._replay = list(contents.steps)
        session._replay_problems = contents.problems
        started = time.perf_counter()
        with single_thread_torch():
            session._rebuild()
        session._resumed = {
            "replayed_steps": len(contents.steps),
            "rebuild_s": time.perf_counter() - started,
        }
        if complete:
            session.complete = True
            session.stop_reason = str((contents.end or {}).get("stop_reason", "complete"))
        return session

    def summary(self) -> dict[str, Any]:
        """Counts, dose and time spent, stop reason, domain-wall segments seen, median timings per stage.

        Returns
        -------
        dict
            ``tiles`` (after the survey), ``mean_dose_e_per_a2`` (stage average),
            ``instrument_time_s`` (instrument clock, summed step by step: see the module notes),
            ``median_timings_s`` (per stage, over every tile of the session as timed when it was
            taken live: tiles from before a resume keep their journaled timings), ``resumed``
            (None, or ``replayed_steps`` and ``rebuild_s``: the steps rebuilt from the journal
            when this process resumed it, without exposing, and the seconds that took),
            ``interrupted``, ``session_id`` and ``journal`` (its path, or None), among others;
            ``instrument_dead_time_fraction``: the share of the time from the first exposure to
            the last in which the instrument was not scanning (:meth:`dead_time`);
            ``operator_actions`` (every action received, :mod:`agent.operator`) and
            ``operator_pause_s`` (seconds the operator held the instrument).
        """
        guided = [s for s in self.steps if s.kind != "survey"]
        timings: dict[str, list[float]] = {}
        for step in guided:
            for stage, seconds in self._live_timings.get(step.index, step.timings).items():
                timings.setdefault(stage, []).append(seconds)
        dead = self.dead_time()
        return {
            "policy": self.config.policy,
            "seed": self.config.seed,
            "lookahead_tiles": self.config.lookahead_tiles,
            "session_id": self.session_id,
            "tiles": len(guided),
            "survey_tiles": len(self.survey_tiles),
            "nodes": len(self.graph),
            "mean_dose_e_per_a2": self._ledger.mean_dose_e_per_a2,
            "instrument_time_s": self._ledger.instrument_time_s,
            "stop_reason": self.stop_reason,
            "interrupted": self.interrupted,
            "wall_segments": 0 if self.policy is None else len(self.policy.walls),
            "median_timings_s": {stage: float(np.median(values)) for stage, values in timings.items()},
            "instrument_dead_time_s": dead["dead_s"],
            "instrument_scan_time_s": dead["scan_s"],
            "instrument_dead_time_fraction": dead["fraction"],
            "resumed": self._resumed,
            "journal": None if self._journal_path is None else str(self._journal_path),
            # Every action received by this process, applied or not (a stop during the last tile is
            # journaled nowhere else); the journal has those that took effect, with their steps.
            "operator_actions": [action.model_dump(mode="json") for action in self.operator.received],
            "operator_pause_s": self.operator.paused_s,
        }

    def dead_time(self) -> dict[str, float | None]:
        """How long the instrument waited for the agent, against how long it scanned.

        The wait before a tile is the wall time from the driver handing back the previous tile to
        the agent asking for this one (``timings["instrument_wait"]`` of each step, journaled): in
        the sequential loop the instrument idles for every analysis and decision; in the pipelined
        one (``lookahead_tiles`` >= 1) only where the agent took longer than a scan, and at the
        first decision. Stage settling is the instrument's own time, neither waiting nor scanning:
        the simulator's ``real_time`` mode spends it on the wall clock. The scan time
        is each tile's own frame time on the instrument's clock (``t_end - t_start``). Steps
        replayed from a journal count with their recorded waits; the first step after a resume
        has none (the process was not running).

        Returns
        -------
        dict
            ``dead_s`` (summed waits, seconds), ``scan_s`` (summed frame times of the tiles that
            have a wait, seconds) and ``fraction`` (``dead_s / (dead_s + scan_s)``, None before a
            second tile).
        """
        dead = scan = 0.0
        for step in self.steps[1:]:
            wait = self._live_timings.get(step.index, step.timings).get("instrument_wait")
            if wait is None:
                continue
            dead += float(wait)
            if step.tile is not None:
                scan += max(step.tile.t_end - step.tile.t_start, 0.0)
        total = dead + scan
        return {"dead_s": dead, "scan_s": scan, "fraction": dead / total if total > 0 else None}

    def node_scores(self) -> np.ndarray:
        """Current anomaly score of every node (NaN before the scorer is trained)."""
        if self.scorer is None or not self.scorer.fitted or len(self.graph) == 0:
            return np.full(len(self.graph), np.nan)
        return self.scorer.score(self.graph.to_pyg()).score

    # ------------------------------------------------------------------ stages

    def _open_journal(self) -> None:
        if self._journal is None and self._journal_path is not None:
            self._journal = SessionJournal(
                self._journal_path,
                self.config.model_dump(mode="json"),
                self.description.model_dump(mode="json"),
                session_id=self.session_id,
            )

    def _request_id(self, name: str) -> str:
        """``name`` with the session id in front (version-1 journals: as it is)."""
        return name if self.session_id is None else f"{self.session_id}-{name}"

    def _survey_requests(self) -> list[ScanRequest]:
        survey = self.config.survey
        # "overview" ids keep clear of the policies' own prefixes (one of them is named "survey").
        return survey_request(
            self.description,
            survey.pixel_size_nm,
            survey.dwell_us,
            survey.shape,
            request_prefix=self._request_id("overview"),
        )

    def _survey(self) -> None:
        for request in self._survey_requests():
            if not self._hold() or self._stopping():
                break
            self._step(request, "survey")
        self.features = survey_features(self.survey_tiles, self.grid)

    def _ensure_policy(self) -> AcquisitionPolicy:
        if self.policy is None:
            config = self.config.acquisition.model_copy(
                update={
                    "name": self.config.policy,
                    "dwell_us": self.config.tiles.dwell_us,
                    "seed": self.config.seed,
                }
            )
            self.policy = make_policy(
                self.config.policy,
                self.grid,
                self.description,
                config,
                survey_features=self.features,
                surrogate_config=self.config.surrogate.model_copy(update={"seed": self.config.seed}),
                truth=self.truth,
            )
            self.policy.request_prefix = self._request_id(self.config.policy)
            for tile in self.survey_tiles:
                self.policy.mark_exposed(tile.request)
        return self.policy

    def _start_requests(self) -> list[ScanRequest]:
        """Spread-out start tiles: farthest-point sampling over the candidate grid from its centre."""
        centres = self.grid.centres
        chosen = [int(np.argmin(np.hypot(*(centres - centres.mean(axis=0)).T)))]
        distance = np.hypot(*(centres - centres[chosen[0]]).T)
        while len(chosen) < min(self.config.start_tiles, len(centres)):
            chosen.append(int(np.argmax(distance)))
            distance = np.minimum(distance, np.hypot(*(centres - centres[chosen[-1]]).T))
        return [
            self.grid.request(
                index, self.config.tiles.dwell_us, request_id=self._request_id(f"start-{k:05d}")
            )
            for k, index in enumerate(chosen)
        ]

    def _start(self) -> None:
        policy = self._ensure_policy()
        done = {step.request.request_id for step in self.steps}
        for request in self._start_requests():
            if request.request_id not in done and self._hold() and self._within_budget():
                self._step(request, "start")
        if not self._next and not self.stop_reason:
            self._next = policy.suggest(1)

    def _score_tile(
        self, request: ScanRequest, tile: Tile | None, extent_nm: tuple[float, float, float, float]
    ) -> float:
        """Region interest of a tile: mean of its top node scores (interior nodes), or an image statistic.

        ``extent_nm`` is the tile's registered area in the specimen frame.
        """
        policy = self._ensure_policy()
        if policy.score_source == "image":
            return float(lattice_disorder(tile.image)) if tile is not None else math.nan
        return tile_interest(self.graph, self.scorer, extent_nm, self.config.region_top_fraction)

    def _train_scorer(self) -> None:
        """Load the checkpoint, or warm up the GAE on the start tiles' graph."""
        self.scorer = session_scorer(self.config, self.graph)

    def close(self) -> None:
        """Close the session's journal (a session rebuilt by :meth:`resume` but never run holds it open)."""
        if self._journal is not None:
            self._journal.close()

    def _step(
        self,
        request: ScanRequest,
        kind: str,
        recorded: JournalStep | None = None,
        acquired: Acquired | None = None,
    ) -> StepRecord:
        """Acquire one tile (or take it from the journal or the acquisition worker) and work on it."""
        timings: dict[str, float] = {}
        start = time.perf_counter()
        if acquired is not None:
            assert acquired.tile is not None
            tile = acquired.tile
            if acquired.wait_s is not None:
                timings["instrument_wait"] = acquired.wait_s
            timings["agent_wait"] = acquired.collected_s
            if acquired.paused_s:
                timings["operator_pause"] = acquired.paused_s
        elif recorded is None:
            paused, self._paused_before_next = self._paused_before_next, 0.0
            if paused:
                timings["operator_pause"] = paused
            if self._acquire_returned is not None:
                # A sequential loop leaves the instrument idle from one tile's return to the next
                # request; the operator's pause is the operator's time, not the agent's.
                timings["instrument_wait"] = max(start - self._acquire_returned - paused, 0.0)
            tile = self.driver.acquire(request)
            self._acquire_returned = time.perf_counter()
            self._check_exposed(tile)
        else:
            tile = tile_from_record(recorded, request)
        timings["acquire"] = acquired.acquire_s if acquired is not None else time.perf_counter() - start
        self._ledger.account(tile, kind)  # the same for a live tile and its replay
        if kind == "survey":
            self.survey_tiles.append(tile)
            self.registrar.add_survey(tile)
            record = StepRecord(len(self.steps), kind, request, tile, None, math.nan, [], timings)
            self._finish(record, recorded)
            return record

        tick = time.perf_counter()
        columns = recorded.columns if recorded is not None and recorded.columns is not None else None
        if columns is None:
            columns = find_columns(tile, self._column_config)
        timings["columns"] = time.perf_counter() - tick
        tick = time.perf_counter()
        placement = self.registrar.place(tile, columns, self.graph, self.config.graph.lattice_spacing_nm)
        if recorded is not None and recorded.record.get("placement") not in (None, placement.to_record()):
            raise SessionError(
                f"replaying step {recorded.index} of the journal placed tile {request.request_id} at "
                f"{placement.to_record()} but the session had placed it at {recorded.record['placement']}; "
                "the configuration or the software changed since"
            )
        placed = placement.apply(columns)
        extent = scanned_extent(placed, placement, tile, self.config.graph.lattice_spacing_nm)
        timings["register"] = time.perf_counter() - tick
        tick = time.perf_counter()
        moved = apply_moves(self.graph, placement)
        merge = self.graph.merge(placed, extent)
        updated = np.union1d(merge.updated_nodes, moved)
        timings["graph"] = time.perf_counter() - tick

        tick = time.perf_counter()
        policy = self._ensure_policy()
        starts_done = (
            kind == "start" and sum(s.kind == "start" for s in self.steps) + 1 >= self.config.start_tiles
        )
        if self.scorer is None and (starts_done or kind == "guided") and len(self.graph):
            self._train_scorer()
            self._ingest_pending_starts()
        elif self.scorer is not None and updated.size:
            self.scorer.update(self.graph.to_pyg(updated))
        timings["anomaly"] = time.perf_counter() - tick

        tick = time.perf_counter()
        score = self._score_tile(request, tile, extent)
        timings["region_score"] = time.perf_counter() - tick
        tick = time.perf_counter()
        wall = self._find_wall(policy, placed)
        timings["walls"] = time.perf_counter() - tick
        tick = time.perf_counter()
        if self.scorer is not None or policy.score_source == "image":
            policy.ingest([request], [score])
        else:
            self._pending_starts.append((request, tile, extent))
        timings["surrogate"] = time.perf_counter() - tick

        operator = self._apply_operator(policy, recorded)
        decision: list[ScanRequest] = []
        tick = time.perf_counter()
        # Start tiles still to come count as requests already out: with look-ahead, the first guided
        # tiles are chosen while the last start tiles are scanned (from what is known by then).
        lookahead = self.config.lookahead_tiles
        coming: list[ScanRequest] = []
        if kind == "start" and lookahead:
            taken = sum(s.kind == "start" for s in self.steps) + 1
            coming = self._start_requests()[taken:]
        deciding = starts_done if not lookahead else len(coming) <= lookahead
        if kind == "guided" or (kind == "start" and deciding):
            # Keep lookahead_tiles requests decided beyond the one the instrument will scan next.
            out = [*coming, *self._next]
            wanted = lookahead + 1 - len(out)
            if wanted > 0:
                if out:
                    # The stage will be at the last request out when the next one is scanned.
                    policy.set_stage_position(out[-1].x_nm, out[-1].y_nm)
                decision = policy.suggest(wanted)
                self._next.extend(decision)
                for chosen in decision:
                    self._decided_after[chosen.request_id] = len(self.steps)
        timings["decision"] = time.perf_counter() - tick
        extra = {
            "nodes": len(self.graph),
            "added_nodes": merge.added,
            "matched_nodes": merge.matched,
            "columns_found": len(columns),
            "columns_reason": columns.reason,
            "mean_dose_e_per_a2": self._ledger.mean_dose_e_per_a2,
            "instrument_time_s": self._ledger.instrument_time_s,
            "surrogate": policy.surrogate_summary(),
            "wall": None if wall is None else wall.to_record(),
            # What was known when this tile was chosen: the steps up to this one (None: a start tile).
            "decided_after_step": self._decided_after.get(request.request_id),
        }
        if operator:
            extra["operator"] = [action.model_dump(mode="json") for action in operator]
        record = StepRecord(
            len(self.steps), kind, request, tile, columns, score,
            [r.model_dump(mode="json") for r in decision], timings, extra, placement,
        )  # fmt: skip
        self._finish(record, recorded)
        return record

    def _find_wall(self, policy: AcquisitionPolicy, columns: Columns) -> WallSegment | None:
        """The domain wall crossing the tile, told to a policy that follows walls (None otherwise)."""
        if not policy.follows_walls or policy.config.wall_follow <= 0:
            return None
        wall = wall_in_tile(columns, self.config.walls)
        if wall is not None:
            policy.ingest_walls([wall])
        return wall

    def _ingest_pending_starts(self) -> None:
        """Score the start tiles once the scorer exists and tell the policy about them."""
        policy = self._ensure_policy()
        for request, tile, extent in self._pending_starts:
            policy.ingest([request], [self._score_tile(request, tile, extent)])
        self._pending_starts = []

    def _check_exposed(self, tile: Tile) -> None:
        """Refuse a tile the instrument did not expose for this request (an id an earlier session used)."""
        may_replay = self._may_replay > 0
        self._may_replay = max(self._may_replay - 1, 0)
        if tile.metadata.get(REPLAYED_KEY) is True and not may_replay:
            raise SessionError(
                f"the instrument answered {tile.request.request_id} with a tile it had made before, not "
                f"a new exposure: an earlier session used the same request ids (session id "
                f"{self.session_id}). This session takes no old tiles; start it again with another "
                "session_id (or none, for a new random one)"
            )

    def _finish(self, record: StepRecord, recorded: JournalStep | None) -> None:
        if recorded is not None:
            # The summary's timings are those of each step as it ran, not of its replay.
            live = recorded.record.get("timings")
            if isinstance(live, dict):
                self._live_timings[record.index] = {k: float(v) for k, v in live.items()}
        if record.kind == "survey":
            record.extra["instrument_time_s"] = self._ledger.instrument_time_s
        self.steps.append(record)
        if recorded is None:
            if self._journal is not None:
                self._journal.append(record.to_record(), image=record.tile.image if record.tile else None,
                                     columns=record.columns)  # fmt: skip
        else:
            expected = recorded.record.get("decision", [])
            if expected != record.decision:
                raise SessionError(
                    f"replaying step {record.index} of the journal chose {record.decision} but the session "
                    f"had chosen {expected}; the configuration or the software changed since"
                )
        if self.on_step is not None:
            self.on_step(record)

    # ------------------------------------------------------------------ operator

    def _hold(self) -> bool:
        """Wait while the operator has the session paused; False once a stop is requested."""
        self._paused_before_next += self.operator.wait_while_paused(self._stop)
        return not self._stop.is_set()

    def _check_operator_action(self, action: OperatorAction) -> None:
        """Refuse, on arrival, an action this session could not apply (a dwell the instrument refuses)."""
        if action.action != "set":
            return
        try:
            self._updated_config(action.setting or "", action.value)
        except (ValueError, MicrographyError) as error:
            raise OperatorError(f"operator action refused: {action.describe()}: {error}") from None

    def _updated_config(self, setting: str, value: float | None) -> SessionConfig:
        """The configuration with one live setting changed (validated, also by the instrument)."""
        config = self.config
        if setting == "dwell_us":
            tile_dose(self.grid, self.description, float(value or 0.0), self.config.acquisition.detector)
            return config.model_copy(update={"tiles": config.tiles.model_copy(update={"dwell_us": value})})
        key = setting.removeprefix("budget.")
        if key == "max_tiles" and value is not None:
            if value != int(value):
                raise OperatorError(f"budget.max_tiles must be a whole number, got {value:g}")
            value = int(value)
        budget = BudgetConfig.model_validate({**config.budget.model_dump(), key: value})
        return config.model_copy(update={"budget": budget})

    def _apply_operator(
        self, policy: AcquisitionPolicy, recorded: JournalStep | None
    ) -> list[OperatorAction]:
        """Apply the operator's actions queued since the last decision (or, replaying, the journaled ones)."""
        if recorded is not None:
            actions = [OperatorAction.model_validate(a) for a in recorded.record.get("operator", [])]
        else:
            actions = [a.model_copy(update={"step": len(self.steps)}) for a in self.operator.take()]
        for action in actions:
            if action.action in ("skip", "look"):
                assert action.region_nm is not None
                policy.mark_region(action.action, action.region_nm)  # type: ignore[arg-type]
            elif action.action == "clear_marks":
                policy.clear_marks()
            elif action.action == "set":
                self.config = self._updated_config(action.setting or "", action.value)
                if action.setting == "dwell_us":
                    policy.set_dwell(self.config.tiles.dwell_us)
                elif self._worker is not None:
                    self._worker.budget = self.config.budget
        return actions

    # ------------------------------------------------------------------ budget and dose

    def _within_budget(self) -> bool:
        if self._stopping():
            return False
        spent = self._ledger.spent(self.config.budget)
        if spent is not None:
            self.stop_reason = spent
            return False
        return True

    # ------------------------------------------------------------------ resuming

    def _rebuild(self) -> None:
        """Replay the journaled steps through the pipeline without exposing anything."""
        replay = self._replay
        survey_count = sum(step.record.get("kind") == "survey" for step in replay)
        for step in replay[:survey_count]:
            request = ScanRequest.model_validate(step.record["request"])
            self._step(request, "survey", recorded=step)
        if survey_count:
            self.features = survey_features(self.survey_tiles, self.grid)
        for step in replay[survey_count:]:
            request = ScanRequest.model_validate(step.record["request"])
            if step.record["kind"] == "guided":
                expected = self._next.pop(0) if self._next else None
                if expected is None or expected.request_id != request.request_id:
                    raise SessionError(
                        f"replaying the journal: step {step.index} scanned {request.request_id} but the "
                        f"session would have chosen {None if expected is None else expected.request_id}"
                    )
            self._step(request, step.record["kind"], recorded=step)
        # A simulated instrument restarted with the agent catches up on its stage moves and drift;
        # a real one kept them (the default hook does nothing).
        requests = [ScanRequest.model_validate(step.record["request"]) for step in replay]
        t_end = (replay[-1].record.get("tile") or {}).get("t_end") if replay else None
        self.driver.resume_after(requests, t_end)
        self._replay = []
        # The exposures in flight when the session stopped may come back from the instrument's journal.
        self._may_replay = self.config.lookahead_tiles + 1


def tile_from_record(step: JournalStep, request: ScanRequest) -> Tile:
    """Rebuild a Tile from a journal step (its image and recorded placement)."""
    meta = step.record.get("tile") or {}
    if step.image is None:
        raise SessionError(f"journal step {step.index} has no image; it cannot be replayed")
    return Tile(
        image=np.asarray(step.image, dtype=np.float32),
        request=request,
        origin_nm=tuple(meta.get("origin_nm", request.origin_nm)),  # type: ignore[arg-type]
        pixel_size_nm=float(meta.get("pixel_size_nm", request.pixel_size_nm)),
        dose_e_per_a2=float(meta.get("dose_e_per_a2", 0.0)),
        t_start=float(meta.get("t_start", 0.0)),
        t_end=float(meta.get("t_end", 0.0)),
        metadata=dict(meta.get("metadata", {})),
    )
