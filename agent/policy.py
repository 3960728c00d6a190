"""Acquisition policies: which candidate region the microscope scans next.

Every policy speaks the interface bluesky-adaptive agents use, so a session (or any
outside driver) can run it step by step:

``suggest(n)`` -> list of :class:`~agent.driver.ScanRequest`
    The next ``n`` scans (fewer when fewer remain, an empty list when none does),
    ordered by a greedy nearest-neighbour tour from the current stage position.
``ingest(requests, scores)``
    The interest measured on those tiles (NaN: no lattice found, treated as low interest).
``ask`` / ``tell``
    Aliases of ``suggest`` / ``ingest``.
``ingest_walls(walls)``
    Domain-wall segments seen in imaged tiles (:class:`~agent.domains.WallSegment`); the
    guided policy follows them, the others only keep them.

Whatever the policy, a suggestion never repeats a candidate (acquired or already
suggested), never leaves the stage, never pushes any area past the per-area dose limit
(the policy's and the instrument's) and never exceeds the total dose budget. Exposures the
session makes on its own (survey, start tiles) are reported with :meth:`mark_exposed`.

The per-area check is exact: the policy keeps the dose of every exposure on the
arrangement of exposure edges (:class:`PeakDoseLedger`), where dose is constant on each
cell, and admits a candidate only if the highest dose anywhere in its area stays within the
limit. A cell of any :class:`~agent.driver.DoseMap` holds the area-weighted *mean* dose over
the cell, never more than the highest pointwise dose in it, so the instrument's own dose
map (whatever its cell size and alignment) can never see the limit crossed either.

Policies
--------
:class:`GuidedPolicy`
    Gaussian-process surrogate of graph-based interest, UCB / EI / Thompson / uncertainty.
:class:`ImageGPPolicy`
    The same on raw tile image statistics (the image-based active-learning anchor).
:class:`RasterPolicy`, :class:`RandomPolicy`, :class:`SurveyContrastPolicy`
    Baselines without learning.
:class:`OraclePolicy`
    Knows the ground truth; for evaluation only.

:func:`make_policy` builds any of them by name. Stage positions are in nm, dwell in µs,
dose in e-/Å², scores in the units of whatever interest the session ingests.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterable, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field
from scipy.special import ndtr

from agent.config import StrictModel
from agent.domains import WallSegment
from agent.driver import DoseMap, InstrumentDescription, ScanRequest
from agent.errors import MicrographyError, OutsideStageError
from agent.surrogate import GPSurrogate, SurrogateConfig
from agent.survey import SURVEY_FEATURES, CandidateGrid

POLICY_NAMES: tuple[str, ...] = ("guided", "raster", "random", "survey", "image_gp", "oracle")
"""Names :func:`make_policy` accepts."""

LEARNED_INPUTS: tuple[str, ...] = ("survey_prior", "wall_interest")
"""Inputs of the guided policy's model besides position with ``learn_weights``: the survey prior
where positive (:func:`survey_interest`, standard deviations above the mean) and
:meth:`GuidedPolicy.wall_interest` (0-1)."""

Acquisition = Literal["ucb", "ei", "thompson", "uncertainty"]

_SNAP_DECIMALS = 6
"""Exposure edges are rounded to 1e-6 nm so equal edges computed two ways coincide."""

_DOSE_RTOL = 1e-9
"""Relative tolerance of dose comparisons (the instrument's DoseMap allows the same)."""


WALL_DIRECTION_UNCERTAINTY_DEG = 5.0
"""How far a wall's direction measured in one 10 nm tile may be off, degrees.

On simulated walls at session dose the error was 0-3° for most tiles and about 6° at most
(partly the walls' slow meander). A wall extended far from where it was seen is searched in
a band that widens with this angle.
"""

_WALL_POSITION_TOLERANCE_NM = 1.0
"""Uncertainty of a wall's position across the wall where it was seen, nm."""


class PolicyError(MicrographyError, ValueError):
    """A policy was asked for something it cannot do (unknown name, bad ingest, missing input)."""


class PolicyConfig(StrictModel):
    """Acquisition policy settings.

    ``name`` labels the policy in reports and prefixes its request ids
    (``f"{name}-{counter:05d}"``, unless ``AcquisitionPolicy.request_prefix`` is set: a session
    puts its session id in front), so a session replays identically.
    """

    name: str = Field("guided", min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$", description="label, id prefix")
    acquisition: Acquisition = Field("ucb", description="acquisition function of GP policies")
    beta: float = Field(2.0, ge=0, description="UCB: mean + beta * standard deviation")
    xi: float = Field(0.0, ge=0, description="EI: improvement margin, score units")
    travel_cost_per_um: float = Field(
        0.05, ge=0, description="acquisition penalty per micrometre of stage travel, score units"
    )
    saturation: float = Field(
        0.0,
        ge=0,
        description=(
            "GP policies: penalty, in standard deviations of the observed scores, per acquired tile "
            "nearby (Gaussian over 1.5 tile widths); values interest that is not yet imaged"
        ),
    )
    survey_prior: float = Field(
        0.0,
        ge=0,
        description=(
            "guided policy: weight of the survey's lattice-fringe interest in the acquisition value, in "
            "standard deviations of the observed scores per standard deviation of that interest; "
            "0 turns it off"
        ),
    )
    wall_follow: float = Field(
        0.0,
        ge=0,
        description=(
            "guided policy: bonus, in standard deviations of the observed scores, for candidates that a "
            "domain wall seen in an imaged tile runs into (defects gather on walls); 0 turns it off"
        ),
    )
    interest_transform: Literal["none", "log1p"] = Field(
        "none",
        description=(
            "GP policies: what the surrogate models, the tile interest as measured or log(1 + interest) "
            "(interest is heavy-tailed: about 1 on normal lattice, hundreds on a dislocation core)"
        ),
    )
    learn_weights: bool = Field(
        False,
        description=(
            "guided policy: the survey prior and the walls followed become inputs of the Gaussian "
            "process (linear terms whose weights it learns from the tiles; survey_prior and wall_follow "
            "are then the prior means and spreads of those weights) instead of fixed bonuses"
        ),
    )
    use_surrogate: bool = Field(
        True,
        description=(
            "guided policy: false drops the Gaussian process (an ablation: the same survey, wall and "
            "saturation terms with their fixed weights, nothing learned from the tiles)"
        ),
    )
    wall_reach_tiles: float = Field(
        6.0, gt=0, description="guided policy: how far along a wall its bonus reaches, in tile widths (1/e)"
    )
    dose_cost: float = Field(
        0.0, ge=0, description="penalty per per-area limit already used in a candidate's area, score units"
    )
    dwell_us: float = Field(2.0, gt=0, description="dwell of the suggested scans, µs per pixel")
    detector: str = Field("HAADF", min_length=1, description="detector of the suggested scans")
    max_dose_e_per_a2: float | None = Field(None, gt=0, description="per-area dose limit, e-/Å²; None: none")
    total_dose_budget_e_per_a2: float | None = Field(
        None, gt=0, description="sum of the doses of all exposures (as the driver counts), e-/Å²; None: none"
    )
    nan_score: float | None = Field(
        None, description="value ingested for a NaN score; None: the lowest finite score seen (0 before any)"
    )
    dose_map_cell_nm: float = Field(1.0, gt=0, description="cell of the reported DoseMap, nm")
    seed: int = Field(0, description="seeds random choices (random policy, Thompson samples)")


def _snap(values: Any) -> np.ndarray:
    return np.round(np.asarray(values, dtype=np.float64), _SNAP_DECIMALS)


def nearest_neighbour_tour(points_nm: np.ndarray, start_nm: Sequence[float] | None = None) -> list[int]:
    """Visiting order of ``points_nm`` by the greedy nearest-neighbour rule.

    Parameters
    ----------
    points_nm : numpy.ndarray
        Stage positions ``(x, y)``, shape ``(k, 2)``, in nm.
    start_nm : sequence of float or None
        Where the stage starts, ``(x, y)`` nm; None starts at the first point.

    Returns
    -------
    list of int
        Row indices of ``points_nm`` in visiting order (ties go to the lower index, so a
        batch ranked best-first keeps its order among equally near members).
    """
    points = np.asarray(points_nm, dtype=np.float64).reshape(-1, 2)
    remaining = list(range(points.shape[0]))
    if not remaining:
        return []
    here = points[0] if start_nm is None else np.asarray(start_nm, dtype=np.float64)
    order = []
    while remaining:
        distance = np.hypot(points[remaining, 0] - here[0], points[remaining, 1] - here[1])
        order.append(remaining.pop(int(np.argmin(distance))))
        here = points[order[-1]]
    return order


def tour_length_nm(points_nm: np.ndarray, start_nm: Sequence[float] | None = None) -> float:
    """Stage travel visiting ``points_nm`` in the given order from ``start_nm`` (None: the first), nm."""
    points = np.asarray(points_nm, dtype=np.float64).reshape(-1, 2)
    if start_nm is not None:
        points = np.vstack([np.asarray(start_nm, dtype=np.float64), points])
    return float(np.hypot(*np.diff(points, axis=0).T).sum()) if len(points) > 1 else 0.0


class PeakDoseLedger:
    """Exact pointwise dose from rectangular exposures, on a coordinate-compressed grid.

    The lines ``xs`` and ``ys`` include every exposure edge, so the accumulated dose is
    constant on each cell between them and the highest dose inside any rectangle is the
    maximum over the cells it overlaps. New edges split cells as exposures arrive.

    Parameters
    ----------
    x_edges_nm, y_edges_nm : array_like
        Initial lines (for example the stage limits and all candidate edges), in nm.
    """

    def __init__(self, x_edges_nm: Any, y_edges_nm: Any) -> None:
        self._xs = np.unique(_snap(x_edges_nm))
        self._ys = np.unique(_snap(y_edges_nm))
        if self._xs.size < 2 or self._ys.size < 2:
            raise ValueError("a dose ledger needs at least two distinct edges along each axis")
        self._dose = np.zeros((self._ys.size - 1, self._xs.size - 1), dtype=np.float64)

    @staticmethod
    def _insert(edges: np.ndarray, dose: np.ndarray, edge: float, axis: int) -> tuple[np.ndarray, np.ndarray]:
        k = int(np.searchsorted(edges, edge))
        if k < edges.size and edges[k] == edge:
            return edges, dose
        if k == 0 or k == edges.size:
            # Outside the current lines: a new cell with no dose yet.
            shape = list(dose.shape)
            shape[axis] = 1
            dose = np.concatenate([np.zeros(shape), dose] if k == 0 else [dose, np.zeros(shape)], axis=axis)
        else:
            # Split cell k - 1 in two, both keeping its dose.
            dose = np.insert(dose, k - 1, np.take(dose, k - 1, axis=axis), axis=axis)
        return np.insert(edges, k, edge), dose

    def _cells(self, extent: np.ndarray) -> tuple[slice, slice]:
        """Cells overlapping ``extent`` by a positive area."""
        x0 = max(int(np.searchsorted(self._xs, extent[0], side="right")) - 1, 0)
        x1 = min(int(np.searchsorted(self._xs, extent[1], side="left")), self._xs.size - 1)
        y0 = max(int(np.searchsorted(self._ys, extent[2], side="right")) - 1, 0)
        y1 = min(int(np.searchsorted(self._ys, extent[3], side="left")), self._ys.size - 1)
        return slice(y0, max(y1, y0)), slice(x0, max(x1, x0))

    def add(self, extent_nm: Sequence[float], dose_e_per_a2: float) -> None:
        """Add a uniform exposure of ``extent_nm`` = (x_min, x_max, y_min, y_max), e-/Å² (negative undoes)."""
        extent = _snap(extent_nm)
        for edge in extent[:2]:
            self._xs, self._dose = self._insert(self._xs, self._dose, float(edge), axis=1)
        for edge in extent[2:]:
            self._ys, self._dose = self._insert(self._ys, self._dose, float(edge), axis=0)
        rows, cols = self._cells(extent)
        self._dose[rows, cols] += dose_e_per_a2
        if dose_e_per_a2 < 0:
            # Undoing leaves rounding residue; dose is never negative.
            np.clip(self._dose[rows, cols], 0.0, None, out=self._dose[rows, cols])

    def peak(self, extent_nm: Sequence[float]) -> float:
        """Highest accumulated dose anywhere inside ``extent_nm``, e-/Å² (0 outside all exposures)."""
        rows, cols = self._cells(_snap(extent_nm))
        block = self._dose[rows, cols]
        return float(block.max()) if block.size else 0.0

    @property
    def max_dose(self) -> float:
        """Highest accumulated dose anywhere, e-/Å²."""
        return float(self._dose.max()) if self._dose.size else 0.0


def tile_dose(
    grid: CandidateGrid, description: InstrumentDescription, dwell_us: float, detector: str
) -> float:
    """Dose of one candidate tile at this dwell, e-/Å², after the instrument has accepted the dwell.

    Raises
    ------
    agent.errors.ScanRequestError
        If the instrument refuses the dwell or detector (the stage position is not in question).
    """
    probe = grid.request(0, dwell_us, detector, request_id="probe")
    with contextlib.suppress(OutsideStageError):
        description.check(probe)
    return description.dose_of(probe)


class AcquisitionPolicy(ABC):
    """Common interface and bookkeeping of all policies.

    Subclasses implement :meth:`_choose` (the next candidate among the admissible ones) and,
    if they learn, :meth:`_observe`. The base class owns the admissibility rules (not
    acquired, not pending, inside the stage, per-area dose limit, total dose budget), the
    nearest-neighbour ordering of batches, deterministic request ids and the report.

    Parameters
    ----------
    grid : CandidateGrid
        Candidate regions.
    description : InstrumentDescription
        The instrument: stage limits, dose per scan (:meth:`InstrumentDescription.dose_of`)
        and its own per-area dose limit, if any.
    config : PolicyConfig or None
        Policy settings; None for the defaults.

    Raises
    ------
    ScanRequestError
        If the candidates cannot be scanned on this instrument with this dwell and detector.
    """

    kind: ClassVar[str] = "base"
    """Name of the policy family, as :func:`make_policy` knows it."""
    score_source: ClassVar[Literal["graph", "image"]] = "graph"
    """What :meth:`ingest` expects: graph interest scores or raw tile image statistics.

    Policies that do not learn (raster, random, survey, oracle) ignore the scores for their
    choices but keep them for :meth:`report`; always ingest executed scans, NaN if unscored.
    """
    follows_walls: ClassVar[bool] = False
    """Whether the policy's choices use the domain walls given to :meth:`ingest_walls`."""

    def __init__(
        self, grid: CandidateGrid, description: InstrumentDescription, config: PolicyConfig | None = None
    ) -> None:
        self.grid = grid
        self.description = description
        self.config = config if config is not None else PolicyConfig(name=self.kind)
        m = len(grid)
        limits = [v for v in (self.config.max_dose_e_per_a2, description.max_dose_e_per_a2) if v is not None]
        self.dose_limit_e_per_a2: float | None = min(limits) if limits else None
        # One probe request validates dwell, detector, shape and pixel size once; only the
        # stage check differs between candidates.
        self._inside = np.ones(m, dtype=bool)
        self._dose_per_scan = 0.0
        for index in range(m):
            probe = grid.request(index, self.config.dwell_us, self.config.detector, request_id="probe")
            try:
                description.check(probe)
            except OutsideStageError:
                self._inside[index] = False
            if index == 0:
                self._dose_per_scan = description.dose_of(probe)
        self._acquired = np.zeros(m, dtype=bool)
        self._pending: dict[str, int] = {}  # request id -> candidate, suggested but not ingested
        self._reserved: list[int] = []  # candidates chosen in the batch being built
        self._exposed_ids: set[str] = set()  # request ids whose dose is recorded
        self._ingested_ids: set[str] = set()
        self._acquisition_order: list[int] = []
        self._observations: list[tuple[int, float, float, float]] = []  # (index, x, y, score)
        self._counter = 0
        self.request_prefix: str = self.config.name
        """Request ids are ``f"{request_prefix}-{counter:05d}"``; a session puts its id in front."""
        self._total_dose = 0.0
        self._travel_nm = 0.0
        self._stage_nm: np.ndarray | None = None
        self._ledger = PeakDoseLedger(
            np.concatenate([grid.extents[:, 0], grid.extents[:, 1], description.stage_x_nm]),
            np.concatenate([grid.extents[:, 2], grid.extents[:, 3], description.stage_y_nm]),
        )
        self._peak = np.zeros(m, dtype=np.float64)  # highest dose already inside each candidate
        self.dose_map = DoseMap(description.stage_x_nm, description.stage_y_nm, self.config.dose_map_cell_nm)
        self._lowest_score = math.inf
        self._walls: list[WallSegment] = []
        self._skipped = np.zeros(m, dtype=bool)  # the operator's "skip" marks
        self._looked = np.zeros(m, dtype=bool)  # the operator's "look here" marks
        self._marks: list[tuple[str, tuple[float, float, float, float]]] = []

    # ------------------------------------------------------------------ state

    @property
    def stage_position_nm(self) -> tuple[float, float] | None:
        """Where the stage is (or will be after the pending scans), ``(x, y)`` nm; None if unknown."""
        return None if self._stage_nm is None else (float(self._stage_nm[0]), float(self._stage_nm[1]))

    def set_stage_position(self, x_nm: float, y_nm: float) -> None:
        """Tell the policy where the stage is, in nm (travel costs are measured from here)."""
        self._stage_nm = np.array([x_nm, y_nm], dtype=np.float64)

    @property
    def acquired(self) -> np.ndarray:
        """Boolean mask of candidates already imaged (or marked exposed), shape ``(m,)``."""
        view = self._acquired.view()
        view.setflags(write=False)
        return view

    @property
    def acquisition_order(self) -> list[int]:
        """Candidate indices in the order they were acquired."""
        return list(self._acquisition_order)

    @property
    def dose_per_scan_e_per_a2(self) -> float:
        """Dose one candidate scan delivers, e-/Å²."""
        return self._dose_per_scan

    @property
    def total_dose_e_per_a2(self) -> float:
        """Sum of the doses of all exposures recorded or pending, e-/Å²."""
        return self._total_dose

    def admissible(self) -> np.ndarray:
        """Mask of candidates :meth:`suggest` may return now, shape ``(m,)``.

        A candidate is admissible if it lies inside the stage, is neither acquired nor
        pending nor marked "skip" by the operator, its scan keeps every point of its area within
        the per-area dose limit, and its dose fits the remaining total dose budget.
        """
        mask = self._inside & ~self._acquired & ~self._skipped
        mask[list(self._pending.values())] = False
        mask[self._reserved] = False
        dose = self._dose_per_scan
        if self.dose_limit_e_per_a2 is not None:
            mask &= self._peak + dose <= self.dose_limit_e_per_a2 * (1.0 + _DOSE_RTOL)
        budget = self.config.total_dose_budget_e_per_a2
        if budget is not None and self._total_dose + dose > budget * (1.0 + _DOSE_RTOL):
            mask[:] = False
        return mask

    # ------------------------------------------------------------------ exposures

    def _expose(self, extent: Sequence[float], dose: float) -> None:
        """Record dose on the ledger, the dose map and the candidates it touches."""
        self._ledger.add(extent, dose)
        if dose >= 0:
            self.dose_map.add(tuple(extent), dose)  # type: ignore[arg-type]
        else:
            self.dose_map.map_e_per_a2 -= self.dose_map.exposure(tuple(extent), -dose)  # type: ignore[arg-type]
            np.clip(self.dose_map.map_e_per_a2, 0.0, None, out=self.dose_map.map_e_per_a2)
        self._total_dose = max(self._total_dose + dose, 0.0)
        e = self.grid.extents
        touched = np.flatnonzero(
            (e[:, 0] < extent[1]) & (e[:, 1] > extent[0]) & (e[:, 2] < extent[3]) & (e[:, 3] > extent[2])
        )
        for index in touched:
            self._peak[index] = self._ledger.peak(e[index])

    def mark_exposed(self, request: ScanRequest) -> None:
        """Record an exposure the policy did not suggest (survey, start tiles, manual scans).

        Its dose enters the dose bookkeeping (once per request id) and, if it scans a
        candidate exactly, that candidate counts as acquired and is never suggested. Pass
        its score to :meth:`ingest` as well if it should inform the model.

        Parameters
        ----------
        request : ScanRequest
            The scan that was executed.
        """
        self._record_exposure(request)
        index = self.grid.match(request)
        if index >= 0 and not self._acquired[index]:
            self._mark_acquired(index)
        self._stage_nm = np.array([request.x_nm, request.y_nm], dtype=np.float64)

    def _record_exposure(self, request: ScanRequest) -> None:
        if request.request_id in self._exposed_ids:
            return
        self._exposed_ids.add(request.request_id)
        self._expose(request.extent_nm, self.description.dose_of(request))

    def _mark_acquired(self, index: int) -> None:
        self._acquired[index] = True
        self._acquisition_order.append(index)
        self._on_acquired(index)

    def release(self, requests: Iterable[ScanRequest]) -> None:
        """Return suggested but never executed requests to the pool and undo their dose.

        Parameters
        ----------
        requests : iterable of ScanRequest
            Requests from :meth:`suggest` that were not (and will not be) executed. A
            request that did expose (even partly) must be ingested or marked exposed instead.
        """
        for request in requests:
            index = self._pending.pop(request.request_id, None)
            if index is None:
                continue
            self._exposed_ids.discard(request.request_id)
            self._expose(request.extent_nm, -self.description.dose_of(request))
            self._on_released(index)

    # ------------------------------------------------------------------ operator marks

    def mark_region(self, kind: Literal["skip", "look"], region_nm: Sequence[float]) -> int:
        """Take an operator's mark on a stage region into account from the next suggestion on.

        Parameters
        ----------
        kind : {"skip", "look"}
            ``"skip"``: candidates whose area overlaps the region are never suggested.
            ``"look"``: while any candidate inside the region (its centre in it) is admissible,
            suggestions come from those, ranked by the policy as usual.
        region_nm : sequence of float
            ``(x_min, x_max, y_min, y_max)`` in stage nm.

        Returns
        -------
        int
            How many candidates the mark covers.
        """
        x0, x1, y0, y1 = (float(v) for v in region_nm)
        if kind == "skip":
            e = self.grid.extents
            covered = (e[:, 0] < x1) & (e[:, 1] > x0) & (e[:, 2] < y1) & (e[:, 3] > y0)
            self._skipped |= covered
        elif kind == "look":
            c = self.grid.centres
            covered = (c[:, 0] >= x0) & (c[:, 0] <= x1) & (c[:, 1] >= y0) & (c[:, 1] <= y1)
            self._looked |= covered
        else:
            raise PolicyError(f"unknown mark {kind!r}; choose skip or look")
        self._marks.append((kind, (x0, x1, y0, y1)))
        return int(covered.sum())

    def clear_marks(self) -> None:
        """Forget every operator mark ("skip" regions become admissible again)."""
        self._skipped[:] = False
        self._looked[:] = False
        self._marks = []

    @property
    def marks(self) -> list[tuple[str, tuple[float, float, float, float]]]:
        """The operator's marks in force, ``(kind, (x_min, x_max, y_min, y_max) nm)``, oldest first."""
        return list(self._marks)

    def set_dwell(self, dwell_us: float) -> None:
        """Suggest tiles with this pixel dwell from now on (µs); the dose per scan follows.

        Raises
        ------
        agent.driver.DriverError
            If the instrument does not accept the dwell (checked on a probe request).
        """
        config = self.config.model_copy(update={"dwell_us": float(dwell_us)})
        self._dose_per_scan = tile_dose(self.grid, self.description, config.dwell_us, config.detector)
        self.config = config

    # ------------------------------------------------------------------ interface

    def suggest(self, n: int = 1) -> list[ScanRequest]:
        """The next scans to make.

        Parameters
        ----------
        n : int
            Number of scans wanted.

        Returns
        -------
        list of ScanRequest
            Up to ``n`` requests, ordered by a greedy nearest-neighbour tour from the current
            stage position; fewer when fewer candidates remain admissible, empty when none
            does. They count as pending (and their dose as spent) until ingested or released.
        """
        if n < 0:
            raise PolicyError(f"suggest(n) needs n >= 0, got {n}")
        if n == 0:
            return []
        chosen: list[int] = []
        self._reserved = chosen
        try:
            self._begin_batch(n)
            for _ in range(n):
                mask = self.admissible()
                if not mask.any():
                    break
                looked = mask & self._looked
                if looked.any():
                    mask = looked  # the operator's "look here" comes first, in the policy's own order
                index = self._choose(mask, chosen)
                if index is None:
                    break
                if not mask[index]:
                    raise AssertionError(f"{type(self).__name__} chose inadmissible candidate {index}")
                chosen.append(int(index))
                # Book the dose now: the next batch member must respect this one's exposure.
                self._expose(self.grid.extents[index], self._dose_per_scan)
        except BaseException:
            # Leave no half-built batch behind: undo the booked dose and any claims.
            for index in chosen:
                self._expose(self.grid.extents[index], -self._dose_per_scan)
            self._reserved = []
            for index in chosen:
                self._on_released(index)
            raise
        self._reserved = []
        requests = []
        for index in self._tour(chosen):
            request_id = f"{self.request_prefix}-{self._counter:05d}"
            self._counter += 1
            request = self.grid.request(index, self.config.dwell_us, self.config.detector, request_id)
            self._pending[request_id] = index
            self._exposed_ids.add(request_id)
            if self._stage_nm is not None:
                self._travel_nm += float(np.hypot(*(self.grid.centres[index] - self._stage_nm)))
            self._stage_nm = self.grid.centres[index].astype(np.float64)
            requests.append(request)
        return requests

    def ingest(self, requests: Sequence[ScanRequest], scores: Sequence[float]) -> None:
        """Learn the interest measured on executed scans.

        Parameters
        ----------
        requests : sequence of ScanRequest
            Executed scans: usually ones :meth:`suggest` returned, but any scan is accepted
            (its dose is recorded if it was not already).
        scores : sequence of float
            Interest of each tile, in the units of :attr:`score_source`; NaN means no lattice
            was found and is ingested as low interest (``config.nan_score``, or the lowest
            finite score seen so far).

        Raises
        ------
        PolicyError
            If the lengths differ or a request id was already ingested.
        """
        values = np.asarray(list(scores), dtype=np.float64)
        if values.ndim != 1 or values.shape[0] != len(requests):
            raise PolicyError(
                f"ingest needs one score per request: {len(requests)} requests, {values.size} scores"
            )
        if np.isinf(values).any():
            raise PolicyError(
                "scores must be finite numbers or NaN (no lattice found), got an infinite value"
            )
        ids = [request.request_id for request in requests]
        repeated = sorted({rid for rid in ids if rid in self._ingested_ids or ids.count(rid) > 1})
        if repeated:
            raise PolicyError(
                f"request(s) {', '.join(repeated)} were already ingested; a tile's score is learned once"
            )
        finite = values[np.isfinite(values)]
        if finite.size:
            self._lowest_score = min(self._lowest_score, float(finite.min()))
        fill = self.config.nan_score
        if fill is None:
            fill = self._lowest_score if math.isfinite(self._lowest_score) else 0.0
        values = np.where(np.isnan(values), fill, values)
        indices = np.empty(len(requests), dtype=np.int64)
        for k, request in enumerate(requests):
            index = self._pending.pop(request.request_id, None)
            if index is None:
                self._record_exposure(request)
                index = self.grid.match(request)
            if index >= 0 and not self._acquired[index]:
                self._mark_acquired(index)
            indices[k] = index
            self._ingested_ids.add(request.request_id)
            self._observations.append((int(index), request.x_nm, request.y_nm, float(values[k])))
        if requests:
            self._stage_nm = np.array([requests[-1].x_nm, requests[-1].y_nm], dtype=np.float64)
        positions = np.array([[r.x_nm, r.y_nm] for r in requests], dtype=np.float64).reshape(-1, 2)
        self._observe(indices, positions, values)

    def ingest_walls(self, walls: Iterable[WallSegment]) -> None:
        """Learn where domain walls run, as seen in imaged tiles.

        Policies with :attr:`follows_walls` value the candidates a wall runs into; the others
        keep the walls for :meth:`report` only.

        Parameters
        ----------
        walls : iterable of WallSegment
            Wall segments in stage coordinates (:func:`agent.domains.wall_in_tile`).

        Raises
        ------
        PolicyError
            If an item is not a :class:`~agent.domains.WallSegment`.
        """
        walls = list(walls)
        for wall in walls:
            # A WallSegment checks its own numbers when it is made.
            if not isinstance(wall, WallSegment):
                raise PolicyError(f"ingest_walls takes WallSegment objects, got {type(wall).__name__}")
        self._walls.extend(walls)

    @property
    def walls(self) -> list[WallSegment]:
        """Domain-wall segments ingested so far, in ingestion order."""
        return list(self._walls)

    def ask(self, n: int = 1) -> list[ScanRequest]:
        """Alias of :meth:`suggest` (the bluesky-adaptive name)."""
        return self.suggest(n)

    def tell(self, requests: Sequence[ScanRequest], scores: Sequence[float]) -> None:
        """Alias of :meth:`ingest` (the bluesky-adaptive name)."""
        self.ingest(requests, scores)

    def report(self) -> dict[str, Any]:
        """State of the policy, JSON-serialisable.

        Returns
        -------
        dict
            ``policy`` (config name), ``kind``, ``score_source``, ``candidates``, ``acquired``,
            ``pending``, ``admissible`` (counts), ``best_regions`` (up to five ingested regions
            with the highest scores: index, x_nm, y_nm, score), ``dose`` (``per_scan``,
            ``total``, ``peak`` and ``limit``/``budget`` in e-/Å², None where unset),
            ``stage_travel_nm`` (along the suggested tours), ``walls`` (domain-wall segments
            ingested), ``marks`` (the operator's, ``{"kind", "region_nm"}``) and ``surrogate``
            (its summary, or None).
        """
        best = sorted(self._observations, key=lambda item: -item[3])[:5]
        return {
            "policy": self.config.name,
            "kind": self.kind,
            "score_source": self.score_source,
            "candidates": len(self.grid),
            "acquired": int(self._acquired.sum()),
            "pending": len(self._pending),
            "admissible": int(self.admissible().sum()),
            "marks": [{"kind": kind, "region_nm": list(region)} for kind, region in self._marks],
            "best_regions": [
                {"index": index, "x_nm": float(x), "y_nm": float(y), "score": float(score)}
                for index, x, y, score in best
            ],
            "dose": {
                "per_scan_e_per_a2": self._dose_per_scan,
                "total_e_per_a2": self._total_dose,
                "peak_e_per_a2": self._ledger.max_dose,
                "limit_e_per_a2": self.dose_limit_e_per_a2,
                "budget_e_per_a2": self.config.total_dose_budget_e_per_a2,
            },
            "stage_travel_nm": self._travel_nm,
            "walls": len(self._walls),
            "surrogate": self.surrogate_summary(),
        }

    # ------------------------------------------------------------------ helpers for subclasses

    def _tour(self, chosen: list[int]) -> list[int]:
        """Greedy nearest-neighbour order of ``chosen`` from the stage position."""
        if len(chosen) < 2:
            return list(chosen)
        order = nearest_neighbour_tour(self.grid.centres[chosen], self.stage_position_nm)
        return [chosen[k] for k in order]

    def _origin(self, chosen: list[int]) -> np.ndarray | None:
        """Where travel to the next batch member starts: the last member, else the stage."""
        if chosen:
            return self.grid.centres[chosen[-1]]
        return self._stage_nm

    def _travel_penalty(self, chosen: list[int]) -> np.ndarray:
        """Travel cost to every candidate, score units (zeros when the start is unknown)."""
        origin = self._origin(chosen)
        if origin is None or self.config.travel_cost_per_um == 0:
            return np.zeros(len(self.grid))
        distance_um = (
            np.hypot(self.grid.centres[:, 0] - origin[0], self.grid.centres[:, 1] - origin[1]) / 1000
        )
        return self.config.travel_cost_per_um * distance_um

    def _dose_penalty(self) -> np.ndarray:
        """Penalty for dose already in each candidate's area, score units."""
        if self.config.dose_cost == 0 or self.dose_limit_e_per_a2 is None:
            return np.zeros(len(self.grid))
        return self.config.dose_cost * self._peak / self.dose_limit_e_per_a2

    @staticmethod
    def _argmax(values: np.ndarray, mask: np.ndarray) -> int:
        """Index of the largest value among ``mask`` (the lowest index on ties)."""
        masked = np.where(mask, values, -np.inf)
        return int(np.argmax(masked))

    def surrogate_summary(self) -> dict[str, Any] | None:
        """The surrogate's summary (hyper-parameters, points), or None for policies without one."""
        return None

    # ------------------------------------------------------------------ hooks

    def _begin_batch(self, n: int) -> None:  # noqa: B027 - optional hook, empty by default
        """Prepare a batch of ``n`` choices (compute a posterior once, for example)."""

    @abstractmethod
    def _choose(self, admissible: np.ndarray, chosen: list[int]) -> int | None:
        """Next candidate among ``admissible`` given the batch ``chosen`` so far; None to stop."""

    def _observe(self, indices: np.ndarray, positions_nm: np.ndarray, scores: np.ndarray) -> None:  # noqa: B027
        """Learn from ingested scores (candidate index or -1, positions nm, finite scores)."""

    def _on_acquired(self, index: int) -> None:  # noqa: B027
        """Called when a candidate becomes acquired."""

    def _on_released(self, index: int) -> None:  # noqa: B027
        """Called when a pending candidate is released."""


class RasterPolicy(AcquisitionPolicy):
    """Serpentine raster over the grid: row 0 left to right, row 1 right to left, and so on.

    Skips candidates that are not admissible (dose, acquired) and ignores scores.
    """

    kind: ClassVar[str] = "raster"
    score_source: ClassVar[Literal["graph", "image"]] = "graph"

    def __init__(
        self, grid: CandidateGrid, description: InstrumentDescription, config: PolicyConfig | None = None
    ) -> None:
        super().__init__(grid, description, config)
        rows, cols = grid.grid_shape
        order = np.arange(rows * cols).reshape(rows, cols)
        order[1::2] = order[1::2, ::-1]
        self._order = order.ravel()

    def _choose(self, admissible: np.ndarray, chosen: list[int]) -> int | None:
        usable = self._order[admissible[self._order]]
        return int(usable[0]) if usable.size else None


class RandomPolicy(AcquisitionPolicy):
    """Uniformly random admissible candidates, from a generator seeded by ``config.seed``."""

    kind: ClassVar[str] = "random"
    score_source: ClassVar[Literal["graph", "image"]] = "graph"

    def __init__(
        self, grid: CandidateGrid, description: InstrumentDescription, config: PolicyConfig | None = None
    ) -> None:
        super().__init__(grid, description, config)
        self._rng = np.random.default_rng(self.config.seed)

    def _choose(self, admissible: np.ndarray, chosen: list[int]) -> int | None:
        return int(self._rng.choice(np.flatnonzero(admissible)))


def _require_features(features: Any, grid: CandidateGrid, who: str) -> np.ndarray:
    if features is None:
        raise PolicyError(
            f"{who} needs survey features: pass agent.survey.survey_features(survey_tile, grid)"
        )
    values = np.asarray(features, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] != len(grid):
        raise PolicyError(
            f"survey features must have one row per candidate, shape ({len(grid)}, f); got {values.shape}"
        )
    if not np.isfinite(values).all():
        raise PolicyError("survey features contain NaN or infinite values")
    return values


SURVEY_PRIOR_LOSS_WEIGHT = 0.5
"""Weight of fringe loss against fringe distortion in :func:`survey_interest`.

Distortion marks dislocations and strained patches reliably at survey doses; loss of fringe
strength also follows counting noise, so it counts half.
"""


def survey_interest(features: np.ndarray) -> np.ndarray:
    """Where a survey suggests structure worth imaging: distorted or fading lattice fringes.

    Parameters
    ----------
    features : numpy.ndarray
        Per-candidate survey features, shape ``(m, 6)``, columns as in
        :data:`agent.survey.SURVEY_FEATURES` (already standardised).

    Returns
    -------
    numpy.ndarray
        Shape ``(m,)``: ``fringe_distortion + 0.5 * fringe_loss``, standardised to zero mean
        and unit spread over the candidates (all zeros when it does not vary).

    Raises
    ------
    PolicyError
        If the fringe columns are missing.
    """
    values = np.asarray(features, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] != len(SURVEY_FEATURES):
        raise PolicyError(
            f"the survey prior needs the {len(SURVEY_FEATURES)} columns of agent.survey.survey_features "
            f"({', '.join(SURVEY_FEATURES)}); got shape {values.shape}"
        )
    distortion = values[:, SURVEY_FEATURES.index("fringe_distortion")]
    loss = values[:, SURVEY_FEATURES.index("fringe_loss")]
    interest = distortion + SURVEY_PRIOR_LOSS_WEIGHT * loss
    spread = float(interest.std())
    if spread <= 1e-12:
        return np.zeros_like(interest)
    return (interest - interest.mean()) / spread


class SurveyContrastPolicy(AcquisitionPolicy):
    """Ranks candidates by how much their survey patch stands out; no learning.

    Interest is ``hypot(contrast, texture)`` from :func:`agent.survey.survey_features`
    (columns 2 and 3): a region brighter or darker than its neighbours, or with a different
    fine-scale texture, is a likely wall, patch or defect cluster. Travel cost applies.

    Parameters
    ----------
    grid, description, config
        As for :class:`AcquisitionPolicy`.
    survey_features : numpy.ndarray
        Per-candidate survey features, shape ``(m, f)`` with ``f >= 4``, columns as in
        :data:`agent.survey.SURVEY_FEATURES`.
    """

    kind: ClassVar[str] = "survey"
    score_source: ClassVar[Literal["graph", "image"]] = "graph"

    def __init__(
        self,
        grid: CandidateGrid,
        description: InstrumentDescription,
        config: PolicyConfig | None,
        survey_features: np.ndarray,
    ) -> None:
        super().__init__(grid, description, config)
        features = _require_features(survey_features, grid, "the survey-contrast policy")
        if features.shape[1] < 4:
            raise PolicyError(
                f"the survey-contrast policy needs the 4 survey feature columns, got {features.shape[1]}"
            )
        self.interest = np.hypot(features[:, 2], features[:, 3])

    def _choose(self, admissible: np.ndarray, chosen: list[int]) -> int | None:
        return self._argmax(self.interest - self._travel_penalty(chosen) - self._dose_penalty(), admissible)


class GuidedPolicy(AcquisitionPolicy):
    """Surrogate-guided acquisition over the candidate regions.

    The acquisition value of every admissible candidate comes from the surrogate's posterior
    (mean ``mu``, standard deviation ``sigma``):

    ``ucb``
        ``mu + beta * sigma`` (default).
    ``ei``
        Expected improvement over the best score ingested so far (plus ``xi``).
    ``thompson``
        One joint posterior sample per batch member; its argmax.
    ``uncertainty``
        ``sigma`` (pure exploration).

    plus, when survey features are given and ``config.survey_prior`` is positive, the
    survey prior (:func:`survey_interest`: where the survey's lattice fringes are distorted
    or lost, scaled by the spread of the observed scores), plus, when ``config.wall_follow``
    is positive, a bonus for the candidates that the domain walls seen so far run into
    (:meth:`wall_interest`; vacancy and substitution clusters gather on walls, and walls run
    straight for long distances, but the coarse survey cannot see them), minus the travel cost from the
    current stage position (or the previous batch member), the optional dose cost and the
    saturation penalty near imaged tiles. The prior matters most before the surrogate has
    seen the specimen; the surrogate's mean then adds what the graph scores teach, such as
    defect clusters gathering around a dislocation. Batches use the *kriging believer*: after each pick the
    posterior covariance is conditioned on a fantasy observation equal to its mean, which
    leaves the mean unchanged and shrinks the uncertainty around the pick, so the next
    member goes elsewhere. This is exact for a GP and needs one full-covariance prediction.

    Parameters
    ----------
    grid, description, config
        As for :class:`AcquisitionPolicy`.
    surrogate : GPSurrogate or None
        The model; None builds one with default settings for this stage.
    survey_features : numpy.ndarray or None
        Per-candidate survey features, shape ``(m, f)``, columns as in
        :data:`agent.survey.SURVEY_FEATURES`; required when the surrogate uses them, and the
        source of the survey prior.
    """

    kind: ClassVar[str] = "guided"
    score_source: ClassVar[Literal["graph", "image"]] = "graph"
    follows_walls: ClassVar[bool] = True
    learns_weights: ClassVar[bool] = True

    def __init__(
        self,
        grid: CandidateGrid,
        description: InstrumentDescription,
        surrogate: GPSurrogate | None = None,
        config: PolicyConfig | None = None,
        survey_features: np.ndarray | None = None,
    ) -> None:
        super().__init__(grid, description, config)
        if surrogate is None:
            surrogate = GPSurrogate(stage_x_nm=description.stage_x_nm, stage_y_nm=description.stage_y_nm)
        self.surrogate = surrogate
        self.learned = self.config.learn_weights and self.learns_weights
        """True when the survey prior and the walls are model inputs (``learn_weights``)."""
        self._features: np.ndarray | None = None
        if self.learned:
            if surrogate.feature_dim != len(LEARNED_INPUTS) or surrogate.config.feature_kernel != "linear":
                raise PolicyError(
                    f"learn_weights needs a surrogate with a linear kernel over {len(LEARNED_INPUTS)} inputs "
                    f"({', '.join(LEARNED_INPUTS)}); build the policy with make_policy"
                )
        elif surrogate.feature_dim:
            features = _require_features(survey_features, grid, "a surrogate with use_survey_features")
            if features.shape[1] != surrogate.feature_dim:
                raise PolicyError(
                    f"the surrogate expects {surrogate.feature_dim} survey features, got {features.shape[1]}"
                )
            self._features = features
        self.survey_prior: np.ndarray | None = None
        """Survey interest per candidate (:func:`survey_interest`), None without survey features."""
        if survey_features is not None and self.config.survey_prior > 0:
            self.survey_prior = survey_interest(_require_features(survey_features, grid, "the survey prior"))
        self._rng = np.random.default_rng(self.config.seed)
        self._batch: dict[str, Any] = {}
        self._scores_seen: list[float] = []
        self._predictions: list[tuple[float, float, float]] = []

    @property
    def model_unit(self) -> str:
        """Unit of the surrogate's values (means, spreads, the calibration): the interest's, or its log."""
        return "log(1 + RMS z)" if self.config.interest_transform == "log1p" else "RMS z"

    def model_values(self, scores: np.ndarray) -> np.ndarray:
        """Tile interest as the surrogate models it (:attr:`PolicyConfig.interest_transform`).

        Parameters
        ----------
        scores : numpy.ndarray
            Tile interest, score units.

        Returns
        -------
        numpy.ndarray
            The same, or ``sign(s) * log(1 + |s|)`` (a log that keeps the sign of a negative score).
        """
        values = np.asarray(scores, dtype=np.float64)
        if self.config.interest_transform == "log1p":
            return np.sign(values) * np.log1p(np.abs(values))
        return values

    def _candidate_inputs(self) -> np.ndarray | None:
        """Model inputs besides position at every candidate: survey features, or the learned inputs."""
        if not self.learned:
            return self._features
        # Only distorted or fading fringes (a positive prior) say something; a linear weight on the
        # whole signed prior would, once negative, send the policy to the most perfect lattice.
        prior = np.zeros(len(self.grid)) if self.survey_prior is None else np.maximum(self.survey_prior, 0.0)
        return np.column_stack([prior, self.wall_interest()])

    def _rows_of(self, inputs: np.ndarray, indices: Sequence[int], positions_nm: np.ndarray) -> np.ndarray:
        """Inputs of observed tiles: their candidate's (an off-grid tile takes the one containing it)."""
        rows = [
            int(index) if index >= 0 else self.grid.index_of(x, y)
            for index, (x, y) in zip(indices, positions_nm, strict=True)
        ]
        return np.array([inputs[r] if r >= 0 else np.zeros(inputs.shape[1]) for r in rows]).reshape(
            len(rows), inputs.shape[1]
        )

    def _observe(self, indices: np.ndarray, positions_nm: np.ndarray, scores: np.ndarray) -> None:
        scores = self.model_values(scores)
        self._scores_seen.extend(float(v) for v in scores)
        if not self.config.use_surrogate:
            return
        inputs = self._candidate_inputs()
        features = None if inputs is None else self._rows_of(inputs, indices, positions_nm)
        if self.learned and len(self.surrogate):
            # Walls seen since change the inputs of earlier tiles too: refit on the current ones.
            earlier = self._observations[: len(self.surrogate)]
            self.surrogate.replace_features(
                self._rows_of(
                    inputs, [o[0] for o in earlier], np.array([[o[1], o[2]] for o in earlier]).reshape(-1, 2)
                )
            )
        if len(self.surrogate) >= self.surrogate.config.fit_min_points:
            # What the model predicted for these tiles before seeing them: its calibration.
            mean, variance = self.surrogate(positions_nm, features)
            spread = np.sqrt(np.clip(variance, 0.0, None) + self.surrogate.noise_variance)
            self._predictions.extend(zip(scores.tolist(), mean.tolist(), spread.tolist(), strict=True))
        self.surrogate.update(positions_nm, scores, features)

    def calibration(self) -> dict[str, Any]:
        """How often the measured interest of a new tile fell inside the model's predictive intervals.

        Each tile ingested once the surrogate had fitted (``fit_min_points`` tiles) is compared
        with the prediction made just before: mean and standard deviation of the predictive
        distribution (posterior variance plus observation noise), score units.

        Returns
        -------
        dict
            ``tiles`` (how many were predicted), ``within_68`` and ``within_95`` (share within
            1 and 1.96 standard deviations; None before any), ``median_abs_z`` and
            ``predictions`` (per tile: measured, mean, sd).
        """
        if not self._predictions:
            return {"tiles": 0, "within_68": None, "within_95": None, "median_abs_z": None, "predictions": []}
        measured, mean, spread = (np.array(column) for column in zip(*self._predictions, strict=True))
        z = np.abs(measured - mean) / np.maximum(spread, 1e-12)
        return {
            "tiles": int(z.size),
            "within_68": float(np.mean(z <= 1.0)),
            "within_95": float(np.mean(z <= 1.96)),
            "median_abs_z": float(np.median(z)),
            "predictions": [list(row) for row in self._predictions],
        }

    def _begin_batch(self, n: int) -> None:
        acquisition = self.config.acquisition
        centres = self.grid.centres
        if not self.config.use_surrogate:
            # No model: every candidate has the same (zero) value; the fixed terms decide.
            zeros = np.zeros(len(self.grid))
            self._batch = {"mean": zeros, "variance": zeros.copy(), "covariance": None, "best": 0.0}
            return
        if acquisition == "thompson":
            samples = self.surrogate.sample(centres, self._candidate_inputs(), n, self._rng)
            self._batch = {"samples": samples}
            return
        if n > 1:
            mean, covariance = self.surrogate.predict(centres, self._candidate_inputs(), full_cov=True)
            variance = np.clip(np.diag(covariance).copy(), 0.0, None)
        else:
            mean, variance = self.surrogate(centres, self._candidate_inputs())
            covariance = None
        observed = self.surrogate.observed_values
        best = float(observed.max()) if observed.size else 0.0
        self._batch = {"mean": mean, "variance": variance, "covariance": covariance, "best": best}

    @property
    def decision_posterior(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Mean and variance at every candidate that the last :meth:`suggest` used (read-only copies).

        None before the first suggestion and for Thompson sampling (which draws samples instead);
        costs nothing, unlike :meth:`posterior`, so a live view can show it after every step.
        """
        batch = self._batch
        if "mean" not in batch:
            return None
        return np.array(batch["mean"], dtype=np.float64), np.array(batch["variance"], dtype=np.float64)

    def posterior(self) -> tuple[np.ndarray, np.ndarray]:
        """The surrogate's mean and variance of interest at every candidate, score units (squared).

        Returns
        -------
        mean, variance : numpy.ndarray
            Shape ``(m,)`` each, for the candidates in grid order.
        """
        return self.surrogate(self.grid.centres, self._candidate_inputs())

    def acquisition_values(self) -> np.ndarray:
        """Acquisition value of every candidate now, without costs, in score units.

        Returns
        -------
        numpy.ndarray
            Shape ``(m,)``; for Thompson sampling, one fresh posterior sample.
        """
        self._begin_batch(1)
        return self._acquisition(0)

    def _acquisition(self, member: int) -> np.ndarray:
        batch = self._batch
        if "samples" in batch:
            return batch["samples"][member]
        mean, sigma = batch["mean"], np.sqrt(batch["variance"])
        acquisition = self.config.acquisition
        if acquisition == "ucb":
            return mean + self.config.beta * sigma
        if acquisition == "uncertainty":
            return sigma
        improvement = mean - batch["best"] - self.config.xi
        safe = np.where(sigma > 0, sigma, 1.0)
        z = improvement / safe
        expected = improvement * ndtr(z) + safe * np.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)
        return np.where(sigma > 0, expected, np.maximum(improvement, 0.0))

    def _score_spread(self) -> float:
        """Standard deviation of the scores ingested so far (1 before two exist): the unit of the bonuses."""
        # The values the model learned from (the surrogate's own, when there is one).
        observed = np.asarray(self._scores_seen)
        return float(observed.std()) if observed.size > 1 else 1.0

    def _prior_bonus(self) -> np.ndarray | float:
        """Survey prior in score units: ``survey_prior`` x spread of the observed scores x interest."""
        if self.survey_prior is None or self.learned:
            return 0.0
        spread = self._score_spread()
        return self.config.survey_prior * spread * self.survey_prior

    def wall_interest(self) -> np.ndarray:
        """How strongly each candidate lies on the continuation of an ingested domain wall.

        A wall segment is extended as a straight line in both directions. A candidate the
        line crosses gets ``exp(-d / reach)``, ``d`` being how far beyond the segment's own
        length it lies along the wall and ``reach`` ``config.wall_reach_tiles`` tile widths;
        candidates beside the line count less the farther they are from it, with a
        tolerance that grows with the distance from the segment's centre as the direction's
        uncertainty (:data:`WALL_DIRECTION_UNCERTAINTY_DEG`) allows. Several segments give
        the maximum, so an early segment keeps its own pull after later ones are measured.

        Returns
        -------
        numpy.ndarray
            Shape ``(m,)``, values in [0, 1]; zeros before any wall is ingested.
        """
        interest = np.zeros(len(self.grid))
        if not self._walls:
            return interest
        half_x, half_y = 0.5 * np.asarray(self.grid.tile_size_nm, dtype=np.float64)
        reach = self.config.wall_reach_tiles * max(self.grid.tile_size_nm)
        slope = math.tan(math.radians(WALL_DIRECTION_UNCERTAINTY_DEG))
        for wall in self._walls:
            along, across = wall.offsets_nm(self.grid.centres)
            normal = wall.normal
            # The line crosses a tile when its distance from the centre is within this.
            crossing = half_x * abs(normal[0]) + half_y * abs(normal[1])
            beyond = np.maximum(np.abs(along) - wall.half_length_nm, 0.0)
            # A direction error pivots the line about the segment's centre.
            tolerance = _WALL_POSITION_TOLERANCE_NM + slope * np.abs(along)
            miss = np.maximum(np.abs(across) - crossing, 0.0)
            interest = np.maximum(interest, np.exp(-beyond / reach - 0.5 * (miss / tolerance) ** 2))
        return interest

    def _wall_bonus(self) -> np.ndarray | float:
        """Wall-following bonus in score units: ``wall_follow`` x spread of the observed scores."""
        if self.config.wall_follow <= 0 or not self._walls or self.learned:
            return 0.0
        spread = self._score_spread()
        return self.config.wall_follow * spread * self.wall_interest()

    def _saturation_penalty(self, chosen: list[int]) -> np.ndarray | float:
        """Penalty near acquired (and already chosen) tiles: their interest has been imaged already.

        Regions of high interest are often large (a non-polar patch, a wall running for
        many tiles); without this the policy keeps returning to structure it has seen.
        """
        if self.config.saturation <= 0:
            return 0.0
        taken = self.acquired.copy()
        taken[chosen] = True
        if not taken.any():
            return 0.0
        spread = self._score_spread()
        reach = 1.5 * max(self.grid.tile_size_nm)
        centres = self.grid.centres
        offsets = centres[:, None, :] - centres[taken][None, :, :]
        crowding = np.exp(-(offsets**2).sum(axis=2) / (2 * reach**2)).sum(axis=1)
        return self.config.saturation * spread * crowding

    def _choose(self, admissible: np.ndarray, chosen: list[int]) -> int | None:
        value = (
            self._acquisition(len(chosen))
            + self._prior_bonus()
            + self._wall_bonus()
            - self._travel_penalty(chosen)
            - self._dose_penalty()
            - self._saturation_penalty(chosen)
        )
        index = self._argmax(value, admissible)
        covariance = self._batch.get("covariance")
        if covariance is not None:
            # Kriging believer: condition on y_index = mean[index]; the mean is unchanged.
            column = covariance[:, index].copy()
            covariance -= np.outer(column, column) / (column[index] + self.surrogate.noise_variance)
            self._batch["variance"] = np.clip(np.diag(covariance).copy(), 0.0, None)
            self._batch["best"] = max(self._batch["best"], float(self._batch["mean"][index]))
        return index

    def surrogate_summary(self) -> dict[str, Any] | None:
        """The surrogate's summary (hyper-parameters, points, sparse or exact)."""
        return self.surrogate.summary()


class ImageGPPolicy(GuidedPolicy):
    """Spatial GP on raw tile image statistics, without the graph (the image-based anchor).

    Identical machinery to :class:`GuidedPolicy`; the session ingests a raw statistic of each
    tile (for example :func:`agent.survey.lattice_disorder`) instead of graph interest.
    """

    kind: ClassVar[str] = "image_gp"
    score_source: ClassVar[Literal["graph", "image"]] = "image"
    learns_weights: ClassVar[bool] = False
    # Walls are found from atomic columns, which this image-statistics anchor is meant to do without.
    follows_walls: ClassVar[bool] = False


class OraclePolicy(AcquisitionPolicy):
    """Knows where the planted features are; picks the region with most features not yet imaged.

    For evaluation only (an upper reference for guidance). Greedy set cover: after a region
    is acquired (or suggested), its features count as imaged, so overlapping regions lose
    them too. Ties go to the nearer region, then the lower index.

    Parameters
    ----------
    grid, description, config
        As for :class:`AcquisitionPolicy`.
    truth : numpy.ndarray or sequence of collections
        Either the number of planted features per candidate, shape ``(m,)`` (each counted as
        distinct to its candidate), or per candidate the ids of the features it contains
        (overlapping candidates share ids).
    """

    kind: ClassVar[str] = "oracle"
    score_source: ClassVar[Literal["graph", "image"]] = "graph"

    def __init__(
        self,
        grid: CandidateGrid,
        description: InstrumentDescription,
        config: PolicyConfig | None,
        truth: np.ndarray | Sequence[Iterable[Hashable]],
    ) -> None:
        super().__init__(grid, description, config)
        m = len(grid)
        if isinstance(truth, np.ndarray) and truth.ndim == 1 and np.issubdtype(truth.dtype, np.number):
            counts = truth
            if counts.shape != (m,) or (counts < 0).any() or not np.isfinite(counts).all():
                raise PolicyError(
                    f"oracle truth counts must be non-negative, shape ({m},); got {counts.shape}"
                )
            sets = [{(index, k) for k in range(round(float(count)))} for index, count in enumerate(counts)]
        else:
            sets = [set(ids) for ids in truth]
            if len(sets) != m:
                raise PolicyError(
                    f"oracle truth needs one set of feature ids per candidate ({m}), got {len(sets)}"
                )
        self._features = sets
        self._imaged: set[Hashable] = set()
        self._gain = np.array([len(s) for s in sets], dtype=np.float64)
        self._holders: dict[Hashable, list[int]] = {}
        for index, ids in enumerate(sets):
            for feature in ids:
                self._holders.setdefault(feature, []).append(index)

    def _claim(self, index: int) -> None:
        for feature in self._features[index] - self._imaged:
            self._imaged.add(feature)
            for holder in self._holders[feature]:
                self._gain[holder] -= 1

    def _choose(self, admissible: np.ndarray, chosen: list[int]) -> int | None:
        origin = self._origin(chosen)
        distance = (
            np.zeros(len(self.grid))
            if origin is None
            else np.hypot(self.grid.centres[:, 0] - origin[0], self.grid.centres[:, 1] - origin[1])
        )
        candidates = np.flatnonzero(admissible)
        # Most new features first, then the shortest move, then the lowest index.
        order = np.lexsort((candidates, distance[candidates], -self._gain[candidates]))
        index = int(candidates[order[0]])
        self._claim(index)
        return index

    def _on_acquired(self, index: int) -> None:
        self._claim(index)

    def _on_released(self, index: int) -> None:
        # Recount from what is really acquired or still pending.
        self._imaged = set()
        self._gain = np.array([len(s) for s in self._features], dtype=np.float64)
        for kept in [*np.flatnonzero(self._acquired), *self._pending.values()]:
            self._claim(int(kept))

    @property
    def imaged_features(self) -> int:
        """Number of distinct planted features in acquired or pending regions."""
        return len(self._imaged)


def make_policy(
    name: str,
    grid: CandidateGrid,
    description: InstrumentDescription,
    config: PolicyConfig | None = None,
    *,
    survey_features: np.ndarray | None = None,
    surrogate_config: SurrogateConfig | None = None,
    truth: np.ndarray | Sequence[Iterable[Hashable]] | None = None,
) -> AcquisitionPolicy:
    """Build a policy by name.

    Parameters
    ----------
    name : str
        One of :data:`POLICY_NAMES`: ``guided``, ``raster``, ``random``, ``survey``,
        ``image_gp``, ``oracle``.
    grid : CandidateGrid
        Candidate regions.
    description : InstrumentDescription
        The instrument.
    config : PolicyConfig or None
        Policy settings; None: defaults with ``name`` as label.
    survey_features : numpy.ndarray or None
        Per-candidate survey features ``(m, f)``; required by ``survey``, used by ``guided``
        when ``surrogate_config.use_survey_features`` (default: on when features are given).
    surrogate_config : SurrogateConfig or None
        Surrogate settings of ``guided`` and ``image_gp`` (``image_gp`` never uses survey features).
    truth : numpy.ndarray or sequence of collections or None
        Ground truth for ``oracle``: feature counts or feature-id sets per candidate.

    Returns
    -------
    AcquisitionPolicy
        The policy.

    Raises
    ------
    PolicyError
        For an unknown name (the message lists the known ones) or a missing input.
    """
    if name not in POLICY_NAMES:
        raise PolicyError(f"unknown policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")
    if config is None:
        config = PolicyConfig(name=name)
    stage = {"stage_x_nm": description.stage_x_nm, "stage_y_nm": description.stage_y_nm}
    if name == "guided":
        if surrogate_config is None:
            surrogate_config = SurrogateConfig(
                use_survey_features=survey_features is not None, seed=config.seed
            )
        if config.learn_weights:
            # The fixed weights become the prior of learned ones: mean, and as wide (standardised units).
            learned = surrogate_config.model_copy(
                update={"use_survey_features": True, "feature_kernel": "linear"}
            )
            weights = (config.survey_prior, config.wall_follow)
            surrogate = GPSurrogate(
                learned, len(LEARNED_INPUTS), **stage,
                feature_variances=[max(w, 0.1) ** 2 for w in weights], feature_weight_means=weights,
            )  # fmt: skip
            return GuidedPolicy(grid, description, surrogate, config, survey_features)
        feature_dim = 0
        if surrogate_config.use_survey_features:
            feature_dim = _require_features(
                survey_features, grid, "the guided policy with use_survey_features"
            ).shape[1]
        surrogate = GPSurrogate(surrogate_config, feature_dim, **stage)
        return GuidedPolicy(grid, description, surrogate, config, survey_features)
    if name == "image_gp":
        base = surrogate_config if surrogate_config is not None else SurrogateConfig(seed=config.seed)
        surrogate = GPSurrogate(base.model_copy(update={"use_survey_features": False}), 0, **stage)
        return ImageGPPolicy(grid, description, surrogate, config)
    if name == "raster":
        return RasterPolicy(grid, description, config)
    if name == "random":
        return RandomPolicy(grid, description, config)
    if name == "survey":
        return SurveyContrastPolicy(grid, description, config, survey_features)  # type: ignore[arg-type]
    if truth is None:
        raise PolicyError("the oracle policy needs the ground truth: feature counts or id sets per candidate")
    return OraclePolicy(grid, description, config, truth)
