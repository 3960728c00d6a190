"""Where a tile really was: registration against the imaged overlap or the survey, and a drift model.

A real stage or scan offset lands nanometres from where it was asked, and the specimen
drifts between and within frames. The session therefore measures every tile's placement
before its columns are merged into the stitched graph:

1. **Within-frame drift** from the lattice. Drift during a frame shears the imaged lattice
   (each line is imaged a line time later than the one above it). The projected perovskite
   lattice is square, so the shear of the two measured lattice vectors gives the drift
   velocity during the frame (:func:`frame_velocity`); it is fused with the drift model's
   prediction and undone column by column.
2. **A prior** from the :class:`DriftTracker`, a Kalman filter on instrument time over the
   drift offset and velocity, plus the instrument's placement error: where the tile should
   be, with what uncertainty.
3. **Against the survey** (:func:`register_to_survey`): the tile, low-passed to remove the
   lattice and resampled to the survey's pixels, is matched by normalised cross-correlation
   (scikit-image's ``match_template``) inside the prior's window. Coarse (a fraction of a
   nanometre), with an uncertainty from the peak.
4. **Against the imaged overlap** (:func:`register_to_graph`): the tile's columns against the
   stitched graph's nodes. The lattice is periodic, so position alone cannot tell one cell
   from the next (nor an A from a B column); every lattice translation inside the window is
   scored by the agreement of species and of each column's intensity residual (substitution
   and thickness make every column's brightness a fingerprint), all at once with FFTs on the
   lattice-indexed columns, and the winning cell is refined by the mean displacement of the
   matched columns: a few picometres.
5. **Onto the stitched lattice** (:func:`snap_to_overlap`): a tile the survey or the prediction
   placed that still overlaps stitched columns is moved onto their lattice by local
   nearest-neighbour matching, so that its overlap never doubles the columns there.

The result is a :class:`Placement`: the measured offset of the tile's first pixel, the drift
velocity within the frame, their uncertainty and how they were measured. A tile that cannot
be registered (vacuum, amorphous, no overlap and a featureless survey) keeps the predicted
placement with the prior's uncertainty, flagged ``registered=False``, never silently.

Every step is deterministic given the tiles in order, so a resumed or replayed session
reproduces the placements bit for bit.

scikit-image's ``phase_cross_correlation`` was tried for the overlap and rejected: on a
periodic lattice its peak at one cell off is nearly as high as the true one, and it has no
notion of species; ``match_template`` serves the coarse, lattice-free survey match.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import Field
from scipy import fft as scipy_fft
from scipy import ndimage
from scipy.spatial import cKDTree
from skimage.feature import match_template

from agent.columns import SPECIES_A, Columns
from agent.config import StrictModel
from agent.driver import Tile

METHODS: tuple[str, ...] = ("overlap", "lattice", "survey", "predicted")
"""How a placement was measured, from the most to the least precise.

``overlap``: matched to the stitched columns, cell picked by the fingerprint (pm precise);
``lattice``: matched to the stitched columns, but the fingerprint could not tell one cell
from the next, so the cell nearest the prediction was taken (no duplicate columns, absolute
position only as good as the prediction); ``survey``: matched on the survey (coarse);
``predicted``: the drift model's prediction, unmeasured (``registered`` False).
"""


class RegistrationConfig(StrictModel):
    """How tiles are placed before they are stitched; lengths in nm, times in s."""

    enabled: bool = Field(True, description="register every tile; off trusts the instrument's placement")
    placement_sigma_nm: float = Field(
        3.0, gt=0, description="how far a frame may land from its request (1 sigma, per axis), nm"
    )
    drift_walk_nm_per_s_per_sqrt_s: float = Field(
        0.01, ge=0, description="random walk of the drift velocity in the drift model"
    )
    initial_drift_sigma_nm_per_s: float = Field(0.1, gt=0, description="prior spread of the drift velocity")
    max_drift_nm_per_s: float = Field(
        2.0, gt=0, description="a lattice shear implying a faster drift is rejected as not drift"
    )
    velocity_sigma_floor_nm_per_s: float = Field(
        0.02, gt=0, description="smallest uncertainty of a drift velocity read from one tile's lattice shear"
    )
    square_lattice: bool = Field(
        True, description="the projected lattice is square: its shear measures the drift within a frame"
    )
    search_sigmas: float = Field(3.0, gt=0, description="search window half-width, in prior sigmas")
    min_overlap_columns: int = Field(
        50, ge=4, description="columns matched in the overlap for an overlap registration"
    )
    min_lock_columns: int = Field(
        12,
        ge=3,
        description="stitched columns a survey-placed or predicted tile must overlap to be snapped onto "
        "their lattice (fewer are merged as placed)",
    )
    min_species_agreement: float = Field(
        0.6, gt=0.5, le=1.0, description="share of overlap columns whose species must agree (A on B: ~0.2)"
    )
    min_overlap_score: float = Field(
        5.0, gt=0, description="fingerprint z-score (residual correlation x sqrt(columns)) a match must reach"
    )
    min_overlap_margin: float = Field(
        1.5, gt=0, description="the winning cell must beat every cell beyond its neighbours by this score"
    )
    fingerprint_edge_fraction: float = Field(
        1.0, ge=0, description="columns this close to a tile edge (x spacing) carry no fingerprint: cut blobs"
    )
    survey_blur_nm: float = Field(
        0.6, gt=0, description="low-pass that removes the lattice before the survey match"
    )
    min_survey_correlation: float = Field(
        0.85, gt=0, lt=1, description="normalised cross-correlation a survey match must reach"
    )
    survey_margin: float = Field(
        0.05, gt=0, lt=1, description="a survey match must beat every other local peak by this correlation"
    )
    survey_sigma_floor_nm: float = Field(
        0.1, gt=0, description="smallest uncertainty claimed for a survey registration, nm"
    )
    overlap_sigma_floor_nm: float = Field(
        0.003, gt=0, description="smallest uncertainty claimed for an overlap registration, nm"
    )


@dataclass(frozen=True)
class Placement:
    """Where a tile was on the specimen: measured offset, drift within the frame, uncertainty.

    The specimen point imaged at pixel ``(row, col)`` is
    ``tile.pixel_to_stage(row, col) + offset_nm + velocity_nm_per_s * row * line_time_s``
    in the session's frame (the survey's, or the first tile's when there is no survey).

    Parameters
    ----------
    tile_id : str
        Request id of the tile.
    method : str
        ``"overlap"``, ``"lattice"``, ``"survey"`` or ``"predicted"`` (see :data:`METHODS`).
    offset_nm : tuple of float
        Offset ``(dx, dy)`` of the tile's first pixel from its nominal position, nm.
    sigma_nm : float
        One-sigma uncertainty of the offset, per axis, nm.
    velocity_nm_per_s : tuple of float
        Drift velocity ``(vx, vy)`` during the frame, nm/s.
    line_time_s : float
        Time from one scan line to the next, s.
    registered : bool
        False when no measurement placed the tile (it keeps the prediction).
    reason : str
        Why the tile was not registered, or what was used ("" when nothing to say).
    matched_columns : int
        Columns matched in the overlap (0 for other methods).
    predicted_offset_nm : tuple of float
        The drift model's prediction before measurement, nm.
    predicted_sigma_nm : float
        Its one-sigma uncertainty, nm.
    moves : tuple
        Parts of the mosaic this tile joined, moved onto its lattice before it was merged:
        ``((tile ids, (dx, dy) nm), ...)``; apply them with
        :meth:`agent.graph.MoleculeGraph.translate_tiles` before merging the tile.
    quality : float
        How distinct the measurement was: the fingerprint z-score of an overlap or lattice
        match, the peak correlation of a survey match (0 otherwise).
    """

    tile_id: str
    method: str
    offset_nm: tuple[float, float]
    sigma_nm: float
    velocity_nm_per_s: tuple[float, float] = (0.0, 0.0)
    line_time_s: float = 0.0
    registered: bool = True
    reason: str = ""
    matched_columns: int = 0
    predicted_offset_nm: tuple[float, float] = (0.0, 0.0)
    predicted_sigma_nm: float = 0.0
    moves: tuple[tuple[tuple[str, ...], tuple[float, float]], ...] = ()
    quality: float = 0.0

    def shift_nm(self, row_px: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Offset of each scan row from its nominal position, nm (placement plus drift)."""
        t = np.asarray(row_px, dtype=float) * self.line_time_s
        return (
            self.offset_nm[0] + self.velocity_nm_per_s[0] * t,
            self.offset_nm[1] + self.velocity_nm_per_s[1] * t,
        )

    def apply(self, columns: Columns) -> Columns:
        """The columns moved from nominal stage positions to the session's specimen frame.

        Examples
        --------
        >>> from agent.columns import Columns
        >>> found = Columns.empty("", 0.02)
        >>> len(Placement("t", "survey", (1.0, 2.0), 0.2).apply(found))
        0
        """
        if len(columns) == 0:
            return columns
        dx, dy = self.shift_nm(columns.row_px)
        site_dx, site_dy = self.shift_nm(columns.vacancies.row_px)
        return dataclasses.replace(
            columns,
            x_nm=columns.x_nm + dx,
            y_nm=columns.y_nm + dy,
            vacancies=columns.vacancies.shifted(site_dx, site_dy),
        )

    def extent_nm(self, tile: Tile) -> tuple[float, float, float, float]:
        """The tile's area in the specimen frame, ``(x_min, x_max, y_min, y_max)`` nm (its bounding box)."""
        x_min, x_max, y_min, y_max = tile.extent_nm
        dx, dy = self.shift_nm(np.array([0.0, tile.shape[0] - 1.0]))
        return (x_min + dx.min(), x_max + dx.max(), y_min + dy.min(), y_max + dy.max())

    def to_record(self) -> dict[str, Any]:
        """JSON-friendly record (journals)."""
        return {
            "tile_id": self.tile_id,
            "method": self.method,
            "offset_nm": list(self.offset_nm),
            "sigma_nm": self.sigma_nm,
            "velocity_nm_per_s": list(self.velocity_nm_per_s),
            "line_time_s": self.line_time_s,
            "registered": self.registered,
            "reason": self.reason,
            "matched_columns": self.matched_columns,
            "predicted_offset_nm": list(self.predicted_offset_nm),
            "predicted_sigma_nm": self.predicted_sigma_nm,
            "moves": [{"tiles": list(tiles), "shift_nm": list(shift)} for tiles, shift in self.moves],
            "quality": self.quality,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Placement:
        """Inverse of :meth:`to_record`."""
        return cls(
            tile_id=str(record["tile_id"]),
            method=str(record["method"]),
            offset_nm=(float(record["offset_nm"][0]), float(record["offset_nm"][1])),
            sigma_nm=float(record["sigma_nm"]),
            velocity_nm_per_s=(float(record["velocity_nm_per_s"][0]), float(record["velocity_nm_per_s"][1])),
            line_time_s=float(record["line_time_s"]),
            registered=bool(record["registered"]),
            reason=str(record["reason"]),
            matched_columns=int(record["matched_columns"]),
            predicted_offset_nm=(
                float(record["predicted_offset_nm"][0]),
                float(record["predicted_offset_nm"][1]),
            ),
            predicted_sigma_nm=float(record["predicted_sigma_nm"]),
            moves=tuple(
                (tuple(str(t) for t in move["tiles"]), tuple(float(v) for v in move["shift_nm"][:2]))
                for move in record.get("moves", [])
            ),
            quality=float(record.get("quality", 0.0)),
        )

    @classmethod
    def nominal(cls, tile: Tile) -> Placement:
        """The instrument's own placement, unmeasured (registration switched off)."""
        return cls(tile.request.request_id, "predicted", (0.0, 0.0), 0.0, registered=False,
                   reason="registration is off", line_time_s=line_time_s(tile))  # fmt: skip


def line_time_s(tile: Tile) -> float:
    """Time from one scan line to the next, s (frame time over rows; 0 when the tile has no timing)."""
    duration = tile.t_end - tile.t_start
    return max(duration, 0.0) / tile.shape[0]


# ---------------------------------------------------------------------------- lattice and drift


@dataclass(frozen=True)
class LatticeVectors:
    """The two lattice vectors of a tile measured in nominal stage nm (drift not removed).

    Parameters
    ----------
    a1, a2 : numpy.ndarray
        Vectors ``(x, y)`` in nm; ``a2`` is about ``a1`` turned by +90 degrees.
    sigma_nm : float
        Standard error of each vector's components, nm.
    count : int
        Neighbour pairs used.
    """

    a1: np.ndarray
    a2: np.ndarray
    sigma_nm: float
    count: int


def _lattice_pairs(columns: Columns, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """Neighbour vectors along the lattice (A-A and B-B, not A-B) and the first column of each pair."""
    points = np.stack([columns.x_nm, columns.y_nm], 1)
    pairs = cKDTree(points).query_pairs(1.2 * spacing, output_type="ndarray")
    if pairs.size == 0:
        return np.zeros((0, 2)), np.zeros(0, dtype=np.int64)
    vectors = points[pairs[:, 1]] - points[pairs[:, 0]]
    keep = np.hypot(vectors[:, 0], vectors[:, 1]) > 0.8 * spacing  # A-B pairs at a/sqrt 2 are not
    return vectors[keep], pairs[keep, 0]


def _vectors_from_pairs(vectors: np.ndarray, theta: float) -> LatticeVectors | None:
    """Median lattice vectors of neighbour vectors, sorted by direction about ``theta``."""
    if vectors.shape[0] < 60:
        return None
    angle = np.arctan2(vectors[:, 1], vectors[:, 0])
    quadrant = np.round((angle - theta) / (0.5 * math.pi)).astype(np.int64) % 4
    folded = np.where((quadrant >= 2)[:, None], -vectors, vectors)
    first, second = folded[quadrant % 2 == 0], folded[quadrant % 2 == 1]
    if first.shape[0] < 30 or second.shape[0] < 30:
        return None
    a1, a2 = np.median(first, axis=0), np.median(second, axis=0)
    spread = 1.4826 * np.median(np.abs(np.concatenate([first - a1, second - a2])))
    count = min(first.shape[0], second.shape[0])
    return LatticeVectors(
        a1, a2, float(1.25 * spread / math.sqrt(count)), int(first.shape[0] + second.shape[0])
    )


def _orientation(vectors: np.ndarray) -> float:
    """Lattice orientation (radians, modulo 90 degrees) from the four-fold mean of neighbour directions."""
    angle = np.arctan2(vectors[:, 1], vectors[:, 0])
    return float(np.angle(np.exp(4j * angle).mean())) / 4.0


def frame_velocity(
    vectors: LatticeVectors, pixel_size_nm: float, line_time: float
) -> tuple[np.ndarray, float]:
    """Drift velocity during a frame from the shear of a square lattice.

    A column imaged ``dr`` rows after another is imaged ``dr * line_time`` later, so a drift
    ``v`` adds ``v * dr * line_time`` to every measured lattice vector. For a square lattice
    the true vectors satisfy ``A2 = R A1`` (R: +90 degrees), which gives two equations for ``v``.

    Parameters
    ----------
    vectors : LatticeVectors
        Measured lattice vectors in nominal nm.
    pixel_size_nm : float
        Pixel size, nm.
    line_time : float
        Time between scan lines, s.

    Returns
    -------
    velocity : numpy.ndarray
        ``(vx, vy)`` in nm/s.
    sigma : float
        Its one-sigma uncertainty per axis, nm/s (infinite when the timing is unknown).

    Examples
    --------
    >>> a1, a2 = np.array([0.4, 0.0]), np.array([0.0, 0.4])
    >>> v = np.array([0.1, 0.0]); t_line = 0.004; rows = 0.4 / 0.02
    >>> measured = LatticeVectors(a1, a2 - v * rows * t_line, 1e-4, 500)
    >>> velocity, sigma = frame_velocity(measured, 0.02, t_line)
    >>> bool(np.allclose(velocity, v))
    True
    """
    if line_time <= 0:
        return np.zeros(2), math.inf
    rotate = np.array([[0.0, -1.0], [1.0, 0.0]])
    # The measured row component is the number of lines between the two columns: exact.
    dr1, dr2 = vectors.a1[1] / pixel_size_nm, vectors.a2[1] / pixel_size_nm
    # measured u = A - v * dr * t and A2 = R A1  =>  (dr2 I - dr1 R) v t = R u1 - u2
    matrix = line_time * (dr2 * np.eye(2) - dr1 * rotate)
    velocity = -np.linalg.solve(matrix, vectors.a2 - rotate @ vectors.a1)
    sigma = math.sqrt(2.0) * vectors.sigma_nm / (line_time * math.hypot(dr1, dr2))
    return velocity, sigma


def tile_velocity(
    columns: Columns, spacing_nm: float, line_time: float, blocks: int = 3
) -> tuple[np.ndarray, float, LatticeVectors] | None:
    """Drift velocity during a frame: the median over blocks of the tile of :func:`frame_velocity`.

    A strain field (dislocation core, rotated patch) shears the lattice like drift does, but
    only locally; the median over a ``blocks x blocks`` split of the tile leaves it out.

    Parameters
    ----------
    columns : Columns
        Columns of one tile in nominal stage coordinates.
    spacing_nm : float
        Expected A-A spacing, nm.
    line_time : float
        Time between scan lines, s.
    blocks : int
        Blocks per side (fewer for small tiles: each needs about 100 columns).

    Returns
    -------
    (velocity, sigma, vectors) or None
        ``(vx, vy)`` nm/s, its one-sigma per axis (nm/s, infinite without timing) and the whole
        tile's :class:`LatticeVectors`; None without a lattice.
    """
    if len(columns) < 40:
        return None
    vectors, first = _lattice_pairs(columns, spacing_nm)
    if vectors.shape[0] < 60:
        return None
    theta = _orientation(vectors)
    whole = _vectors_from_pairs(vectors, theta)
    if whole is None:
        return None
    if line_time <= 0:
        return np.zeros(2), math.inf, whole
    blocks = max(1, min(blocks, int(math.sqrt(len(columns) / 100))))
    edges_x = np.quantile(columns.x_nm, np.linspace(0, 1, blocks + 1))
    edges_y = np.quantile(columns.y_nm, np.linspace(0, 1, blocks + 1))
    bx = np.clip(np.searchsorted(edges_x, columns.x_nm, side="right") - 1, 0, blocks - 1)
    by = np.clip(np.searchsorted(edges_y, columns.y_nm, side="right") - 1, 0, blocks - 1)
    block_of_pair = (by * blocks + bx)[first]
    estimates, sigmas = [], []
    for index in range(blocks * blocks):
        measured = _vectors_from_pairs(vectors[block_of_pair == index], theta)
        if measured is None:
            continue
        velocity, sigma = frame_velocity(measured, columns.pixel_size_nm, line_time)
        estimates.append(velocity)
        sigmas.append(sigma)
    if not estimates:
        return *frame_velocity(whole, columns.pixel_size_nm, line_time), whole
    values = np.array(estimates)
    velocity = np.median(values, axis=0)
    floor = float(np.median(sigmas)) / math.sqrt(values.shape[0])
    if values.shape[0] >= 3:
        spread = 1.4826 * float(np.median(np.abs(values - velocity)))
        return velocity, max(1.25 * spread / math.sqrt(values.shape[0]), floor), whole
    return velocity, float(np.median(sigmas)), whole


@dataclass
class DriftTracker:
    """Kalman filter on instrument time over the drift offset and velocity, per axis.

    State per axis: drift offset ``D`` (nm, zero at the session's first exposure) and drift
    velocity ``V`` (nm/s), ``D' = V``, ``V`` a random walk. A registered tile measures
    ``D(t_start)`` plus the instrument's placement error; the lattice shear measures ``V``.

    Parameters
    ----------
    walk : float
        Random walk of the velocity, nm/s per sqrt(s).
    velocity_sigma : float
        Prior one-sigma of the velocity, nm/s.
    placement_sigma : float
        One-sigma placement error of a frame, nm (measurement noise of the offset).

    Examples
    --------
    >>> tracker = DriftTracker(walk=0.0, velocity_sigma=1.0, placement_sigma=0.01)
    >>> for t in (0.0, 10.0, 20.0):
    ...     tracker.update_offset(t, np.array([0.05 * t, 0.0]), 0.001)
    >>> round(float(tracker.predict(30.0)[0][0]), 2)
    1.5
    """

    walk: float
    velocity_sigma: float
    placement_sigma: float
    t: float | None = None
    state: np.ndarray = field(default_factory=lambda: np.zeros((2, 2)))  # per axis: (D, V)
    cov: np.ndarray = field(default_factory=lambda: np.zeros((2, 2)))  # shared by both axes

    def __post_init__(self) -> None:
        self.cov = np.diag([0.0, self.velocity_sigma**2])

    def _advance(self, t: float) -> None:
        if self.t is None:
            self.t = t
            return
        dt = max(t - self.t, 0.0)
        transition = np.array([[1.0, dt], [0.0, 1.0]])
        q = self.walk**2
        noise = q * np.array([[dt**3 / 3.0, dt**2 / 2.0], [dt**2 / 2.0, dt]])
        self.state = self.state @ transition.T
        self.cov = transition @ self.cov @ transition.T + noise
        self.t = t

    def predict(self, t: float) -> tuple[np.ndarray, float, np.ndarray, float]:
        """Predicted drift offset and velocity at instrument time ``t`` (the filter is not changed).

        Returns
        -------
        offset : numpy.ndarray
            ``(dx, dy)`` nm.
        offset_sigma : float
            Its one-sigma per axis, nm, placement error included.
        velocity : numpy.ndarray
            ``(vx, vy)`` nm/s.
        velocity_sigma : float
            Its one-sigma per axis, nm/s.
        """
        dt = 0.0 if self.t is None else max(t - self.t, 0.0)
        transition = np.array([[1.0, dt], [0.0, 1.0]])
        q = self.walk**2
        cov = transition @ self.cov @ transition.T + q * np.array(
            [[dt**3 / 3.0, dt**2 / 2.0], [dt**2 / 2.0, dt]]
        )
        state = self.state @ transition.T
        return (
            state[:, 0].copy(),
            math.sqrt(cov[0, 0] + self.placement_sigma**2),
            state[:, 1].copy(),
            math.sqrt(cov[1, 1]),
        )

    def _update(self, h: np.ndarray, measured: np.ndarray, variance: float) -> None:
        innovation_var = float(h @ self.cov @ h) + variance
        gain = self.cov @ h / innovation_var
        self.state = self.state + (measured - self.state @ h)[:, None] * gain[None, :]
        self.cov = self.cov - np.outer(gain, h @ self.cov)

    def update_velocity(self, t: float, velocity: np.ndarray, sigma: float) -> None:
        """Take a velocity measured around instrument time ``t`` (nm/s, one-sigma ``sigma``)."""
        if not math.isfinite(sigma):
            return
        self._advance(t)
        self._update(np.array([0.0, 1.0]), np.asarray(velocity, dtype=float), sigma**2)

    def update_offset(self, t: float, offset: np.ndarray, sigma: float) -> None:
        """Take a tile's offset measured at instrument time ``t`` (nm, one-sigma ``sigma``)."""
        self._advance(t)
        self._update(
            np.array([1.0, 0.0]), np.asarray(offset, dtype=float), sigma**2 + self.placement_sigma**2
        )


# ---------------------------------------------------------------------------- survey


@dataclass(frozen=True)
class SurveyMatch:
    """A tile matched on the survey.

    Parameters
    ----------
    offset_nm : numpy.ndarray
        Offset ``(dx, dy)`` of the tile from its nominal position, nm.
    sigma_nm : float
        One-sigma uncertainty per axis, nm.
    correlation : float
        Peak normalised cross-correlation.
    survey_row : float
        Survey row at the tile's centre (the survey was scanned line by line: its drift
        at that row is the tile's too).
    """

    offset_nm: np.ndarray
    sigma_nm: float
    correlation: float
    survey_row: float = 0.0


def _low_pass_on_grid(
    image: np.ndarray,
    pixel_nm: float,
    blur_nm: float,
    x_nm: np.ndarray,
    y_nm: np.ndarray,
) -> np.ndarray:
    """The image blurred by ``blur_nm``, sampled at ``(x_nm, y_nm)`` measured from its pixel (0, 0)."""
    # Block-average first: blurring a 512^2 tile by 30 px directly costs more than the whole match.
    factor = max(1, int(blur_nm / pixel_nm / 3.0))
    rows, cols = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
    reduced = image[:rows, :cols].reshape(rows // factor, factor, cols // factor, factor).mean(axis=(1, 3))
    sigma_px = blur_nm / (pixel_nm * factor)
    smooth = ndimage.gaussian_filter(reduced.astype(np.float64), sigma_px, mode="nearest")
    # Block centres sit (factor - 1) / 2 px from the block's first pixel.
    row = (y_nm / pixel_nm - 0.5 * (factor - 1)) / factor
    col = (x_nm / pixel_nm - 0.5 * (factor - 1)) / factor
    return ndimage.map_coordinates(smooth, [row, col], order=1, mode="nearest")


def register_to_survey(
    tile: Tile,
    survey: Tile,
    prior_offset_nm: np.ndarray,
    search_nm: float,
    config: RegistrationConfig,
) -> SurveyMatch | None:
    """Place a tile on the survey by normalised cross-correlation of lattice-free images.

    Parameters
    ----------
    tile : Tile
        The high-resolution tile.
    survey : Tile
        The survey scan, at a coarser pixel size.
    prior_offset_nm : numpy.ndarray
        Expected offset ``(dx, dy)`` of the tile from its nominal position, nm.
    search_nm : float
        Half-width of the searched window around the prior, nm.
    config : RegistrationConfig
        Blur and acceptance thresholds.

    Returns
    -------
    SurveyMatch or None
        None when the match is not distinct (featureless survey, tile outside it).
    """
    step = survey.pixel_size_nm
    blur = config.survey_blur_nm
    x_min, x_max, y_min, y_max = tile.extent_nm
    width, height = x_max - x_min, y_max - y_min
    n_x, n_y = int(width // step) - 1, int(height // step) - 1
    if min(n_x, n_y) < 8:
        return None
    # Template: the tile sampled on a survey-pitched grid, from its first pixel (nominal frame).
    grid_x = (np.arange(n_x) + 0.5) * step
    grid_y = (np.arange(n_y) + 0.5) * step
    gy, gx = np.meshgrid(grid_y, grid_x, indexing="ij")
    template = _low_pass_on_grid(tile.image, tile.pixel_size_nm, blur, gx.ravel(), gy.ravel()).reshape(
        gx.shape
    )
    margin = math.ceil(search_nm / step) + 1
    # Where the template's first sample lands in survey pixels, for the prior offset.
    x0 = tile.origin_nm[0] + 0.5 * step + prior_offset_nm[0] - survey.origin_nm[0]
    y0 = tile.origin_nm[1] + 0.5 * step + prior_offset_nm[1] - survey.origin_nm[1]
    col0, row0 = math.floor(x0 / step) - margin, math.floor(y0 / step) - margin
    rows, cols = survey.shape
    r_lo, r_hi = max(row0, 0), min(row0 + n_y + 2 * margin + 1, rows)
    c_lo, c_hi = max(col0, 0), min(col0 + n_x + 2 * margin + 1, cols)
    if r_hi - r_lo < n_y + 2 or c_hi - c_lo < n_x + 2:
        return None
    crop = survey.image[r_lo:r_hi, c_lo:c_hi].astype(np.float64)
    crop = ndimage.gaussian_filter(
        crop, math.sqrt(max(blur**2 - (0.3 * step) ** 2, 0.0)) / step, mode="nearest"
    )
    ncc = match_template(crop, template)
    peak = np.unravel_index(int(np.argmax(ncc)), ncc.shape)
    correlation = float(ncc[peak])
    if correlation < config.min_survey_correlation:
        return None
    # A second peak (another local maximum, not the shoulder of this one) nearly as high means an
    # ambiguous, repetitive or featureless survey.
    maxima = (ncc == ndimage.maximum_filter(ncc, size=3, mode="nearest")) & (ncc > -1)
    maxima[peak] = False
    runner_up = float(ncc[maxima].max()) if maxima.any() else -1.0
    if runner_up > correlation - config.survey_margin:
        return None
    sub = []
    curvature = []
    for axis in (0, 1):
        index = list(peak)
        if 0 < peak[axis] < ncc.shape[axis] - 1:
            index[axis] -= 1
            low = float(ncc[tuple(index)])
            index[axis] += 2
            high = float(ncc[tuple(index)])
            denominator = low - 2 * correlation + high
            sub.append(0.5 * (low - high) / denominator if denominator < 0 else 0.0)
            curvature.append(-denominator)
        else:
            sub.append(0.0)
            curvature.append(0.0)
    found_row = r_lo + peak[0] + float(np.clip(sub[0], -0.5, 0.5))
    found_col = c_lo + peak[1] + float(np.clip(sub[1], -0.5, 0.5))
    offset = np.array(
        [found_col * step - (x0 - prior_offset_nm[0]), found_row * step - (y0 - prior_offset_nm[1])]
    )
    # The peak's width against the correlation's distance from 1 sets the uncertainty.
    k = min(curvature) if min(curvature) > 0 else 1e-3
    sigma = step * math.sqrt(max(1.0 - correlation, 0.01) / k) * 0.5
    return SurveyMatch(offset, max(sigma, config.survey_sigma_floor_nm), correlation, found_row + 0.5 * n_y)


# ---------------------------------------------------------------------------- overlap


@dataclass(frozen=True)
class OverlapMatch:
    """A tile's columns matched to the stitched graph.

    Parameters
    ----------
    offset_nm : numpy.ndarray
        Offset ``(dx, dy)`` that moves the tile's (drift-corrected) columns onto the graph, nm.
    sigma_nm : float
        One-sigma uncertainty per axis, nm.
    matched : int
        Columns matched.
    search : CellSearch
        How the cell was chosen; ``search.decisive`` False means lattice-locked only: the
        columns coincide with the stitched ones, but which cell is a guess (the prior's).
    velocity_correction : numpy.ndarray
        Change to the assumed drift velocity within the frame, nm/s.
    reference : numpy.ndarray
        Indices of the reference columns (the part of the mosaic) the tile was registered to.
    """

    offset_nm: np.ndarray
    sigma_nm: float
    matched: int
    search: CellSearch
    velocity_correction: np.ndarray = field(default_factory=lambda: np.zeros(2))
    reference: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def _residual_intensity(points: np.ndarray, scattering: np.ndarray, species: np.ndarray) -> np.ndarray:
    """Each column's brightness over the median of its 12 nearest same-species columns, minus 1.

    Dividing by the neighbourhood removes thickness and the A/B contrast, leaving the
    column's own fingerprint (substitution, vacancy content, counting noise).
    """
    residual = np.zeros(points.shape[0])
    for kind in np.unique(species):
        members = np.flatnonzero(species == kind)
        if members.size < 4:
            continue
        k = min(13, members.size)
        _, near = cKDTree(points[members]).query(points[members], k=k)
        reference = np.median(scattering[members][near[:, 1:]], axis=1)
        safe = np.where(reference > 0, reference, 1.0)
        residual[members] = np.where(reference > 0, scattering[members] / safe - 1.0, 0.0)
    # A vacancy-bearing or amorphous-edge column is far off its neighbours; clipped, it cannot
    # outweigh the hundreds of ordinary fingerprints.
    spread = 1.4826 * float(np.median(np.abs(residual))) + 1e-12
    return np.clip(residual, -3 * spread, 3 * spread)


def _lattice_grid(
    points: np.ndarray,
    basis: np.ndarray,
    origin: np.ndarray,
    values: list[np.ndarray],
    shape: tuple[int, int],
    corner: np.ndarray,
) -> list[np.ndarray]:
    """Scatter per-column values onto the integer cells of a lattice (the nearest cell of each column)."""
    fractional = np.linalg.solve(basis, (points - origin).T).T
    cells = np.rint(fractional).astype(np.int64) - corner
    inside = (cells[:, 0] >= 0) & (cells[:, 0] < shape[0]) & (cells[:, 1] >= 0) & (cells[:, 1] < shape[1])
    grids = []
    for value in values:
        grid = np.zeros(shape)
        grid[cells[inside, 0], cells[inside, 1]] = value[inside]
        grids.append(grid)
    return grids


def _combined_basis(vectors: LatticeVectors) -> np.ndarray:
    """Columns ``(a1 + a2) / 2`` and ``(a1 - a2) / 2``: the cells of the combined A+B pattern, nm."""
    return np.stack([0.5 * (vectors.a1 + vectors.a2), 0.5 * (vectors.a1 - vectors.a2)], 1)


def _lattice_phase(positions: np.ndarray, basis: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """Circular mean of the positions' fractional lattice coordinates about ``origin``, in [-1/2, 1/2)."""
    fraction = np.linalg.solve(basis, (positions - origin).T).T
    return np.angle(np.exp(2j * math.pi * fraction).mean(axis=0)) / (2 * math.pi)


@dataclass(frozen=True)
class LatticeSnap:
    """A tile moved onto the lattice of the stitched columns it overlaps.

    Parameters
    ----------
    shift_nm : numpy.ndarray
        Shift ``(dx, dy)`` added to the tile's placement, nm (at most about 1.6 half diagonals).
    matched : int
        Tile columns that coincide with stitched columns after the shift.
    agreement : float
        Share of them whose species agree.
    reference : numpy.ndarray
        Indices (into the reference columns) of the matched stitched columns.
    """

    shift_nm: np.ndarray
    matched: int
    agreement: float
    reference: np.ndarray


def snap_to_overlap(
    points: np.ndarray,
    species: np.ndarray,
    reference_points: np.ndarray,
    reference_species: np.ndarray,
    vectors: LatticeVectors,
    min_columns: int = 12,
    min_agreement: float = 0.6,
) -> LatticeSnap | None:
    """The smallest shift that puts a tile's columns on the stitched columns they overlap.

    A tile placed by the survey or by the prediction alone sits up to a few tenths of a
    nanometre off the lattice of the columns already stitched where it overlaps them; merged as
    it is, every overlapping column would become a second node beside the first. This finds the
    tile's sub-cell phase against the stitched columns from their nearest-neighbour
    displacements (a circular mean in lattice coordinates, so a phase near a cell boundary does
    not split), then takes the nearest lattice translation of that phase at which the species
    agree. It is local, nearest-neighbour matching, so strain and small distortions of the
    stitched graph across the search window do not matter (as they do for lattice indexing).

    Parameters
    ----------
    points : numpy.ndarray
        The tile's columns ``(x, y)`` where the tile is placed now, nm, shape ``(n, 2)``.
    species : numpy.ndarray
        Their species codes.
    reference_points, reference_species : numpy.ndarray
        The stitched columns near the tile, nm, and their species.
    vectors : LatticeVectors
        The lattice vectors of the specimen (drift removed), nm.
    min_columns : int
        Overlapping columns needed (fewer: None).
    min_agreement : float
        Share of matched columns whose species must agree (an A-on-B shift gives about 0.2).

    Returns
    -------
    LatticeSnap or None
        None when fewer than ``min_columns`` columns overlap or no nearby translation puts
        agreeing species on each other.

    Examples
    --------
    >>> a = 0.4
    >>> i, j = np.meshgrid(np.arange(10), np.arange(10), indexing="ij")
    >>> a_sites = np.stack([i.ravel() * a, j.ravel() * a], 1)
    >>> lattice = np.concatenate([a_sites, a_sites + a / 2])
    >>> kinds = np.repeat([SPECIES_A, 1], 100)
    >>> vectors = LatticeVectors(np.array([a, 0.0]), np.array([0.0, a]), 0.0, 100)
    >>> snap = snap_to_overlap(lattice + [0.13, -0.05], kinds, lattice, kinds, vectors)
    >>> np.round(snap.shift_nm, 3).tolist(), snap.matched
    ([-0.13, 0.05], 200)
    """
    if len(points) < min_columns or len(reference_points) < min_columns:
        return None
    basis = _combined_basis(vectors)
    cell = float(np.hypot(*basis[:, 0]))
    tree = cKDTree(reference_points)
    # Within the combined A+B lattice every point is at most cell / sqrt 2 from a column.
    distance, nearest = tree.query(points, distance_upper_bound=0.75 * cell)
    near = np.isfinite(distance)
    if np.count_nonzero(near) < min_columns:
        return None
    phase = _lattice_phase(reference_points[nearest[near]] - points[near], basis, np.zeros(2))
    steps = np.arange(-2, 3)
    m, n = np.meshgrid(steps, steps, indexing="ij")
    candidates = (phase + np.stack([m.ravel(), n.ravel()], 1)) @ basis.T
    order = np.argsort(np.hypot(*candidates.T), kind="stable")
    tolerance = 0.35 * cell
    for candidate in candidates[order]:
        if np.hypot(*candidate) > 1.6 * cell:
            break
        moved = points + candidate
        distance, nearest = tree.query(moved, distance_upper_bound=tolerance)
        matched = np.flatnonzero(np.isfinite(distance))
        if matched.size < min_columns:
            continue
        agrees = species[matched] == reference_species[nearest[matched]]
        agreement = float(np.mean(agrees))
        if agreement < min_agreement:
            continue
        same = matched[agrees]
        fine = np.median(reference_points[nearest[same]] - moved[same], axis=0)
        return LatticeSnap(candidate + fine, int(matched.size), agreement, nearest[matched])
    return None


def register_to_graph(
    points: np.ndarray,
    scattering: np.ndarray,
    species: np.ndarray,
    reference_points: np.ndarray,
    reference_scattering: np.ndarray,
    reference_species: np.ndarray,
    vectors: LatticeVectors,
    prior_offset_nm: np.ndarray,
    search_nm: float,
    config: RegistrationConfig,
    row_time_s: np.ndarray | None = None,
    velocity_sigma: float = 0.0,
    reference_group: np.ndarray | None = None,
    group_weight: np.ndarray | None = None,
    fingerprint: np.ndarray | None = None,
    reference_fingerprint: np.ndarray | None = None,
    group_priority: np.ndarray | None = None,
) -> OverlapMatch | None:
    """Register a tile's columns against already stitched columns; never one cell off.

    Position alone repeats every lattice translation and every A-to-B shift, so every cell
    of the combined A+B lattice inside the window is scored by the share of matched columns
    whose species agree and by the correlation of the columns' intensity residuals; the
    winner is refined by least squares on the matched columns.

    Parameters
    ----------
    points : numpy.ndarray
        Tile columns ``(x, y)``, nm, drift within the frame removed (nominal frame), shape ``(n, 2)``.
    scattering, species : numpy.ndarray
        Per tile column.
    reference_points, reference_scattering, reference_species : numpy.ndarray
        The stitched columns near the tile.
    vectors : LatticeVectors
        The tile's lattice vectors (drift removed), nm.
    prior_offset_nm : numpy.ndarray
        Expected offset ``(dx, dy)``, nm.
    search_nm : float
        Half-width of the searched window, nm.
    config : RegistrationConfig
        Acceptance thresholds.
    row_time_s : numpy.ndarray, optional
        Time each tile column was imaged after the frame start, s; with ``velocity_sigma``
        the refinement also corrects the drift velocity within the frame.
    velocity_sigma : float
        Prior one-sigma of the assumed velocity, nm/s (0 keeps it).
    reference_group : numpy.ndarray, optional
        Label of each reference column's part of the mosaic (tiles registered to each other);
        parts placed independently need not share a lattice phase and are searched separately.
    group_weight : numpy.ndarray, optional
        Per reference column, the weight (columns) of its part: with no decisive cell the tile
        snaps onto the heaviest part it overlaps.
    fingerprint, reference_fingerprint : numpy.ndarray, optional
        Which columns' intensities may serve as fingerprints (False: too close to a tile edge).
    group_priority : numpy.ndarray, optional
        Per reference column, the rank of its part as an anchor: where the tile is decisively
        placed against several parts, it registers to the highest-ranked one (the others then
        move onto it); without it, to the best-scored one.

    Returns
    -------
    OverlapMatch or None
        None when too few columns overlap or no cell stands out.
    """
    if len(points) < config.min_overlap_columns or len(reference_points) < config.min_overlap_columns:
        return None
    # The combined A+B pattern repeats every half diagonal: its cells are (a1 +- a2) / 2.
    basis = _combined_basis(vectors)
    origin = points[0] + prior_offset_nm
    if reference_group is None:
        groups = [np.arange(len(reference_points))]
    else:
        labels = np.asarray(reference_group)
        groups = [np.flatnonzero(labels == label) for label in np.unique(labels)]
    # B columns carry no fingerprint of their own (Fe+O columns vary little), and columns cut by
    # a tile edge are dim in every tile (they would correlate two tiles laid edge on edge).
    tile_fp = species == SPECIES_A
    reference_fp = reference_species == SPECIES_A
    if fingerprint is not None:
        tile_fp &= fingerprint
    if reference_fingerprint is not None:
        reference_fp &= reference_fingerprint
    tile_residual = np.where(tile_fp, _residual_intensity(points, scattering, species), 0.0)
    reference_residual = np.where(
        reference_fp, _residual_intensity(reference_points, reference_scattering, reference_species), 0.0
    )
    decisive: tuple[CellSearch, np.ndarray, tuple[float, float]] | None = None
    locked: tuple[CellSearch, np.ndarray, float] | None = None
    for members in groups:
        if members.size < config.min_overlap_columns:
            continue
        found = _search_cells(
            points + prior_offset_nm, species, tile_residual,
            reference_points[members], reference_species[members], reference_residual[members],
            basis, origin, search_nm, config,
        )  # fmt: skip
        if found is None:
            continue
        # Every decisive match is exact against its own part; which part anchors the tile decides
        # which parts move, so the rank comes first and the score only breaks ties.
        rank = (0.0 if group_priority is None else float(group_priority[int(members[0])]), found.score)
        if found.decisive and (decisive is None or rank > decisive[2]):
            decisive = (found, members, rank)
        # Lacking a decisive cell, snap onto the part of the mosaic with the most weight behind it.
        weight = found.overlap if group_weight is None else group_weight[int(members[0])]
        if found.locked_offset_nm is not None and (locked is None or weight > locked[2]):
            locked = (found, members, weight)
    chosen = (decisive[:2] if decisive is not None else None) or (None if locked is None else locked[:2])
    if chosen is None:
        return None
    found, members = chosen
    offset = prior_offset_nm + (found.offset_nm if found.decisive else found.locked_offset_nm)
    match = _refine_overlap(
        points, species, reference_points[members], reference_species[members], offset, vectors,
        config, row_time_s, velocity_sigma, found,
    )  # fmt: skip
    return None if match is None else dataclasses.replace(match, reference=members)


@dataclass(frozen=True)
class CellSearch:
    """The outcome of scoring every lattice translation in the search window.

    Parameters
    ----------
    decisive : bool
        The fingerprint picked one cell (z-score and margin over every rival met).
    score : float
        Best cell's score: fingerprint z-score less the prior's penalty.
    z : float
        Its fingerprint z-score (residual correlation x sqrt(fingerprinted columns)).
    margin : float
        Its score over the best cell beyond its neighbours.
    offset_nm : numpy.ndarray
        Offset of the best cell from the prior, nm.
    locked_offset_nm : numpy.ndarray or None
        Offset of the admissible cell nearest the prior (species agree, enough overlap), nm:
        where the tile goes when the fingerprint cannot tell cells apart; None when no such
        cell lies within 1.5 cells of the prior (the prediction does not overlap the columns).
    overlap : int
        Columns overlapping at the locked cell.
    """

    decisive: bool
    score: float
    z: float
    margin: float
    offset_nm: np.ndarray
    locked_offset_nm: np.ndarray | None
    overlap: int


def _search_cells(
    shifted: np.ndarray,
    species: np.ndarray,
    tile_residual: np.ndarray,
    reference_points: np.ndarray,
    reference_species: np.ndarray,
    reference_residual: np.ndarray,
    basis: np.ndarray,
    origin: np.ndarray,
    search_nm: float,
    config: RegistrationConfig,
) -> CellSearch | None:
    """Score every lattice translation in the window at once (FFTs on lattice-indexed columns).

    Returns None when no cell has enough overlapping columns of agreeing species.
    """
    sub_cell = basis @ (
        _lattice_phase(reference_points, basis, origin) - _lattice_phase(shifted, basis, origin)
    )
    cell = float(np.hypot(*basis[:, 0]))
    window = math.ceil(search_nm / cell) + 1
    frac_tile = np.linalg.solve(basis, (shifted + sub_cell - origin).T).T
    frac_reference = np.linalg.solve(basis, (reference_points - origin).T).T
    low = np.floor(np.minimum(frac_tile.min(axis=0), frac_reference.min(axis=0))).astype(np.int64) - 1
    high = np.ceil(np.maximum(frac_tile.max(axis=0), frac_reference.max(axis=0))).astype(np.int64) + 1
    size = high - low + 1
    shape = tuple(int(scipy_fft.next_fast_len(int(s + 2 * window + 1), real=True)) for s in size)
    sign_tile = np.where(species == SPECIES_A, 1.0, -1.0)
    sign_reference = np.where(reference_species == SPECIES_A, 1.0, -1.0)
    tile_mask = (tile_residual != 0).astype(float)
    reference_mask = (reference_residual != 0).astype(float)
    tile_grids = _lattice_grid(shifted + sub_cell, basis, origin,
                               [np.ones(len(shifted)), sign_tile, tile_residual, tile_mask, tile_residual**2],
                               shape, low)  # fmt: skip
    ref_grids = _lattice_grid(reference_points, basis, origin,
                              [np.ones(len(reference_points)), sign_reference, reference_residual,
                               reference_mask, reference_residual**2], shape, low)  # fmt: skip
    tile_spectra = [np.conj(scipy_fft.rfft2(grid)) for grid in tile_grids]
    ref_spectra = [scipy_fft.rfft2(grid) for grid in ref_grids]

    shifts = np.arange(-window, window + 1)
    s0, s1 = np.meshgrid(shifts, shifts, indexing="ij")
    at = (s0 % shape[0], s1 % shape[1])

    def correlate(a: int, b: int) -> np.ndarray:
        # c[s] = sum_k tile[k] reference[k + s]: the tile moved by s cells onto the reference.
        return scipy_fft.irfft2(tile_spectra[a] * ref_spectra[b], s=shape)[at]

    n = correlate(0, 0)
    agreement = np.where(n > 0.5, (correlate(1, 1) / np.maximum(n, 1) + 1) / 2, 0.0)
    fingerprinted = correlate(3, 3)
    # Pearson (without the mean) over the overlapping fingerprints at each shift.
    power = np.sqrt(np.clip(correlate(4, 3) * correlate(3, 4), 0.0, None))
    correlation = np.where(
        (fingerprinted > 0.5) & (power > 0), correlate(2, 2) / np.maximum(power, 1e-12), 0.0
    )
    offsets = s0[..., None] * basis[:, 0] + s1[..., None] * basis[:, 1]
    inside = np.hypot(offsets[..., 0], offsets[..., 1]) <= search_nm + cell
    enough = inside & (n >= config.min_overlap_columns)
    valid = enough & (agreement >= config.min_species_agreement)
    if not valid.any():
        return None
    z = correlation * np.sqrt(np.maximum(fingerprinted, 0.0))
    # The prior on the placement weighs far cells down, so noise far away cannot win.
    distance = np.hypot(*(offsets + sub_cell).transpose(2, 0, 1))
    score = np.where(valid, z - 0.5 * (distance / max(search_nm / config.search_sigmas, 1e-3)) ** 2, -np.inf)
    best = np.unravel_index(int(np.argmax(score)), score.shape)
    far = np.hypot(s0 - s0[best], s1 - s1[best]) > 1.5
    rival = float(score[far & valid].max()) if np.any(far & valid) else -math.inf
    margin = float(score[best]) - rival
    decisive = bool(z[best] >= config.min_overlap_score and margin >= config.min_overlap_margin)
    nearest = np.unravel_index(int(np.argmin(np.where(valid, distance, np.inf))), distance.shape)
    # Snapping to the lattice is only evidence-free bookkeeping when the prediction itself puts
    # the tile on the stitched columns; farther away, any lattice cell would "agree".
    lockable = bool(distance[nearest] <= 1.5 * cell)
    return CellSearch(
        decisive=decisive,
        score=float(score[best]),
        z=float(z[best]),
        margin=margin,
        offset_nm=sub_cell + offsets[best],
        locked_offset_nm=sub_cell + offsets[nearest] if lockable else None,
        overlap=round(float(n[nearest])) if lockable else 0,
    )


def _refine_overlap(
    points: np.ndarray,
    species: np.ndarray,
    reference_points: np.ndarray,
    reference_species: np.ndarray,
    offset: np.ndarray,
    vectors: LatticeVectors,
    config: RegistrationConfig,
    row_time_s: np.ndarray | None,
    velocity_sigma: float,
    search: CellSearch,
) -> OverlapMatch | None:
    """Least-squares offset (and drift-velocity correction) from the columns matched at the winning cell."""
    spacing = float(np.hypot(*vectors.a1))
    tree = cKDTree(reference_points)
    matched = 0
    sigma = math.inf
    velocity = np.zeros(2)
    times = np.zeros(len(points)) if row_time_s is None else np.asarray(row_time_s, dtype=float)
    # The cell search indexes columns on one lattice; where the stitched columns bend (strain,
    # an earlier tile's drift) its cell can be an A-on-B one locally. Among the chosen cell and
    # its four species-swapping neighbours, keep the one whose columns agree in species here.
    half_diagonals = [
        np.zeros(2),
        *(sign * (vectors.a1 + turn * vectors.a2) / 2 for sign in (1, -1) for turn in (1, -1)),
    ]
    agreeing = []
    for step in half_diagonals:
        distance, nearest = tree.query(points + offset + step, distance_upper_bound=0.35 * spacing)
        ok = np.isfinite(distance)
        ok[ok] &= reference_species[nearest[ok]] == species[ok]
        agreeing.append(int(np.count_nonzero(ok)))
    # A neighbour replaces the chosen cell only when clearly better (a wrong cell matches ~20 %).
    best = int(np.argmax(agreeing))
    if agreeing[best] > 1.5 * max(agreeing[0], 1):
        offset = offset + half_diagonals[best]
    for _ in range(3):
        moved = points + offset + times[:, None] * velocity
        distance, nearest = tree.query(moved, distance_upper_bound=0.3 * spacing)
        ok = np.isfinite(distance)
        ok[ok] &= reference_species[nearest[ok]] == species[ok]
        if np.count_nonzero(ok) < config.min_overlap_columns:
            return None
        residual = reference_points[nearest[ok]] - moved[ok]
        centre = np.median(residual, axis=0)
        spread = 1.4826 * np.median(np.abs(residual - centre), axis=0) + 1e-6
        keep = np.all(np.abs(residual - centre) <= 3 * spread, axis=1)
        r, t = residual[keep], times[ok][keep]
        noise = float(np.sqrt((r.std(axis=0) ** 2).mean())) + 1e-6
        if velocity_sigma > 0 and t.size and np.ptp(t) > 0:
            # Per axis: r = do + dv t, with a Gaussian prior on dv.
            normal = np.array([[t.size, t.sum()], [t.sum(), (t**2).sum() + (noise / velocity_sigma) ** 2]])
            rhs = np.stack([r.sum(axis=0), (r * t[:, None]).sum(axis=0)])
            solution = np.linalg.solve(normal, rhs)
            offset, velocity = offset + solution[0], velocity + solution[1]
            sigma = noise * math.sqrt(float(np.linalg.inv(normal)[0, 0]))
        else:
            offset = offset + r.mean(axis=0)
            sigma = noise / math.sqrt(max(r.shape[0], 1))
        matched = int(np.count_nonzero(keep))
    return OverlapMatch(offset, max(sigma, config.overlap_sigma_floor_nm), matched, search, velocity)


# ---------------------------------------------------------------------------- the registrar


class Registrar:
    """Places every tile of a session: drift model, survey match, overlap match.

    Call :meth:`add_survey` with each survey tile, then :meth:`place` with each tile and
    its columns (nominal stage coordinates) and the stitched graph before the merge.

    Parameters
    ----------
    config : RegistrationConfig, optional
        Thresholds and priors.

    Examples
    --------
    >>> registrar = Registrar(RegistrationConfig(enabled=False))
    >>> registrar.tracker.placement_sigma
    3.0
    """

    def __init__(self, config: RegistrationConfig | None = None) -> None:
        self.config = config or RegistrationConfig()
        self.tracker = DriftTracker(
            self.config.drift_walk_nm_per_s_per_sqrt_s,
            self.config.initial_drift_sigma_nm_per_s,
            self.config.placement_sigma_nm,
        )
        self.surveys: list[Tile] = []
        self.placements: list[Placement] = []
        self._parent: dict[str, str] = {}  # union-find over tile ids: the parts of the mosaic
        self.shifts: dict[str, np.ndarray] = {}  # later moves of each tile, nm
        self._by_id: dict[str, Placement] = {}

    def part_of(self, tile_id: str) -> str:
        """The part of the mosaic a tile belongs to (tiles registered to each other), by a member's id."""
        root = self._parent.setdefault(tile_id, tile_id)
        while root != self._parent[root]:
            self._parent[root] = self._parent[self._parent[root]]
            root = self._parent[root]
        return root

    def _join(self, first: str, second: str) -> None:
        self._parent[self.part_of(first)] = self.part_of(second)

    def current_offset_nm(self, tile_id: str) -> np.ndarray:
        """A tile's placement offset now: as measured plus every later move of its part, nm."""
        placement = self._by_id[tile_id]
        return np.asarray(placement.offset_nm) + self.shifts.get(tile_id, np.zeros(2))

    def add_survey(self, tile: Tile) -> None:
        """Use a survey tile as the coarse reference; the first exposure defines the frame."""
        self.surveys.append(tile)
        if self.tracker.t is None:
            self.tracker.t = tile.t_start

    def place(self, tile: Tile, columns: Columns, graph: Any, spacing_nm: float = 0.396) -> Placement:
        """Measure where ``tile`` was; ``columns`` are its columns in nominal stage coordinates.

        Parameters
        ----------
        tile : Tile
            The tile just acquired.
        columns : Columns
            Its columns, nominal stage coordinates (as :func:`agent.columns.find_columns` gives).
        graph : MoleculeGraph
            The stitched graph before this tile is merged.
        spacing_nm : float
            Expected A-A lattice spacing, nm (the graph's).

        Returns
        -------
        Placement
            Measured (or predicted, flagged) placement; also kept in :attr:`placements`.
        """
        if not self.config.enabled:
            placement = Placement.nominal(tile)
            self._keep(placement)
            return placement
        config = self.config
        t_line = line_time_s(tile)
        t_mid = 0.5 * (tile.t_start + tile.t_end)
        tracker = self.tracker
        if tracker.t is None:
            tracker.t = tile.t_start
        measured = tile_velocity(columns, spacing_nm, t_line)
        vectors = None if measured is None else measured[2]
        velocity = tracker.predict(t_mid)[2]
        if (
            measured is not None
            and config.square_lattice
            and np.hypot(*measured[0]) <= config.max_drift_nm_per_s
        ):
            # Strain shears the lattice too: a floor keeps one tile from claiming more than it knows.
            tracker.update_velocity(
                t_mid, measured[0], max(measured[1], config.velocity_sigma_floor_nm_per_s)
            )
            velocity = tracker.predict(t_mid)[2]
        drift, prior_sigma, _, _ = tracker.predict(t_mid)
        half_frame = t_mid - tile.t_start
        # The offset of the frame's first pixel: the drift at t_start.
        prior = drift - velocity * half_frame
        is_first = not self.placements and len(graph) == 0 and not self.surveys
        if is_first:
            # The first exposure defines the session's frame.
            prior_sigma = 0.0
        corrected = self._drift_corrected(columns, velocity, t_line)
        method, offset, sigma, matched, reason, registered = "predicted", prior, prior_sigma, 0, "", True
        quality = 0.0
        if is_first:
            reason = "first tile: defines the session frame"
        search = config.search_sigmas * prior_sigma
        overlap = None
        context = None
        if not is_first and len(graph) and vectors is not None and len(columns):
            # The overlap first: it is exact when present; a survey match only narrows a window
            # that the overlap search covers anyway.
            context = self._overlap_context(columns, vectors, velocity, t_line, tile, graph, prior, search)
            if context is not None:
                overlap = self._overlap(corrected, columns, context, prior, search, t_line)
        moves: list[tuple[tuple[str, ...], tuple[float, float]]] = []
        tile_id = tile.request.request_id
        if overlap is not None and context is not None:
            velocity = velocity + overlap.velocity_correction
            offset, matched, quality = overlap.offset_nm, overlap.matched, overlap.search.z
            if overlap.search.decisive:
                method, sigma = "overlap", overlap.sigma_nm
            else:
                method, sigma = "lattice", max(prior_sigma, overlap.sigma_nm)
                reason = (
                    f"lattice-locked to the overlap: its fingerprint (z {overlap.search.z:.1f}) cannot tell "
                    "one cell from the next; the cell is the prediction's"
                )
            anchor = context.parts[int(overlap.reference[0])]
            self._join(tile_id, anchor)
            placed = corrected + offset + (columns.row_px * t_line)[:, None] * overlap.velocity_correction
            moves = self._bridges(placed, columns, context, anchor, tile_id)
        elif not is_first and self.surveys:
            survey = self.surveys[-1]
            survey_match = register_to_survey(tile, survey, prior, search, config)
            if survey_match is not None:
                # The survey drifted while it was scanned: its row r sits where the specimen was
                # r line times after the survey began (the session frame is the survey's start).
                scanned_s = survey_match.survey_row * line_time_s(survey)
                shift = velocity * scanned_s
                # ... and the drift velocity then is known only so well: it blurs deep survey rows.
                drift_sigma = max(tracker.predict(t_mid)[3], config.velocity_sigma_floor_nm_per_s) * scanned_s
                method, offset = "survey", survey_match.offset_nm + shift
                sigma = math.hypot(survey_match.sigma_nm, drift_sigma)
                quality = survey_match.correlation
        self.part_of(tile_id)
        if method in ("survey", "predicted") and not is_first and vectors is not None and len(columns):
            # Placed without the overlap search, the tile may still overlap stitched columns;
            # merged off their lattice, each of those would become a second node.
            true_vectors = _specimen_vectors(vectors, velocity, t_line, tile.pixel_size_nm)
            snapped = self._snap(corrected + offset, columns, tile, graph, true_vectors, offset)
            if snapped is not None:
                snap, anchor = snapped
                offset = offset + snap.shift_nm
                matched = snap.matched
                self._join(tile_id, anchor)
                if method == "predicted":
                    method, quality = "lattice", 0.0
                    reason = (
                        f"lattice-locked to {snap.matched} stitched columns at the prediction: no cell "
                        "search was possible; the cell is the prediction's"
                    )
                else:
                    reason = f"lattice-locked to {snap.matched} stitched columns at the survey's placement"
        if method == "predicted" and not is_first:
            registered = False
            reason = (
                "no lattice in the tile (vacuum, amorphous)" if vectors is None
                else "no imaged overlap and no distinct survey match"
            )  # fmt: skip
        placement = Placement(
            tile_id=tile_id,
            method=method,
            offset_nm=(float(offset[0]), float(offset[1])),
            sigma_nm=float(sigma),
            velocity_nm_per_s=(float(velocity[0]), float(velocity[1])),
            line_time_s=t_line,
            registered=registered,
            reason=reason,
            matched_columns=matched,
            predicted_offset_nm=(float(prior[0]), float(prior[1])),
            predicted_sigma_nm=float(prior_sigma),
            moves=tuple(moves),
            quality=float(quality),
        )
        if registered:
            # The filter stands at mid-frame: carry the first pixel's offset there.
            tracker.update_offset(t_mid, np.asarray(offset) + velocity * half_frame, max(sigma, 1e-4))
        self._keep(placement)
        return placement

    def _keep(self, placement: Placement) -> None:
        self.placements.append(placement)
        self._by_id[placement.tile_id] = placement

    def _bridges(
        self,
        placed: np.ndarray,
        columns: Columns,
        context: _OverlapContext,
        anchor: str,
        tile_id: str,
    ) -> list[tuple[tuple[str, ...], tuple[float, float]]]:
        """Move the other parts of the mosaic the tile overlaps onto its lattice; join them to it.

        Each part was placed only as well as the instrument's placement; where the new tile
        overlaps two, it fixes their relative position, so the lighter part moves (the cell
        nearest its present place, or the one its fingerprint picks) instead of leaving
        duplicate columns where the parts meet.
        """
        moves = []
        tile_tree = cKDTree(placed)
        for part in sorted(set(context.parts) - {anchor}):
            members = np.flatnonzero(np.asarray(context.parts) == part)
            if members.size < self.config.min_overlap_columns:
                continue
            points = context.reference[members]
            # Only the part's columns that lie on the new tile take part.
            near = np.isfinite(tile_tree.query(points, distance_upper_bound=context.spacing)[0])
            if np.count_nonzero(near) < self.config.min_overlap_columns:
                continue
            match = register_to_graph(
                points[near], context.scattering[members][near], context.species[members][near],
                placed, columns.scattering, columns.species,
                context.vectors, np.zeros(2), self.config.search_sigmas * self.config.placement_sigma_nm,
                self.config,
            )  # fmt: skip
            if match is not None:
                offset = match.offset_nm
            else:
                # No cell search possible (the indexing slipped): at least the part's columns
                # under the tile go onto its lattice, the cell nearest where the part is now.
                snap = snap_to_overlap(
                    points[near], context.species[members][near], placed, columns.species, context.vectors,
                    self.config.min_lock_columns, self.config.min_species_agreement,
                )  # fmt: skip
                if snap is None:
                    continue
                offset = snap.shift_nm
            tiles = tuple(sorted(t for t in self._parent if self.part_of(t) == part))
            shift = (float(offset[0]), float(offset[1]))
            for name in tiles:
                self.shifts[name] = self.shifts.get(name, np.zeros(2)) + np.asarray(shift)
            self._join(part, tile_id)
            moves.append((tiles, shift))
        return moves

    def _snap(
        self,
        placed: np.ndarray,
        columns: Columns,
        tile: Tile,
        graph: Any,
        vectors: LatticeVectors,
        offset: np.ndarray,
    ) -> tuple[LatticeSnap, str] | None:
        """Snap a tile placed at ``offset`` onto the stitched columns it overlaps, and the part it joins."""
        x_min, x_max, y_min, y_max = tile.extent_nm
        margin = 0.5
        nodes = graph.nodes_in(x_min + offset[0] - margin, x_max + offset[0] + margin,
                               y_min + offset[1] - margin, y_max + offset[1] + margin)  # fmt: skip
        if nodes.size < self.config.min_lock_columns:
            return None
        snap = snap_to_overlap(
            placed,
            columns.species,
            np.stack([graph.x_nm[nodes], graph.y_nm[nodes]], 1),
            graph.species[nodes],
            vectors,
            self.config.min_lock_columns,
            self.config.min_species_agreement,
        )
        if snap is None:
            return None
        tiles, counts = np.unique(graph.first_tile[nodes[snap.reference]], return_counts=True)
        parts: dict[str, int] = {}
        for index, count in zip(tiles, counts, strict=True):
            part = self.part_of(graph.tile_ids[int(index)])
            parts[part] = parts.get(part, 0) + int(count)
        # The part with the most columns under the tile anchors it (ties: the first by name).
        anchor = max(sorted(parts), key=parts.__getitem__)
        return snap, anchor

    @staticmethod
    def _drift_corrected(columns: Columns, velocity: np.ndarray, t_line: float) -> np.ndarray:
        t = columns.row_px * t_line
        return np.stack([columns.x_nm + velocity[0] * t, columns.y_nm + velocity[1] * t], 1)

    def _away_from_edges(self, columns: Columns, tile: Tile, spacing: float) -> np.ndarray:
        """Columns farther than ``fingerprint_edge_fraction`` spacings from every tile edge."""
        margin = self.config.fingerprint_edge_fraction * spacing / tile.pixel_size_nm
        rows, cols = tile.shape
        return (
            (columns.row_px >= margin) & (columns.row_px <= rows - 1 - margin)
            & (columns.col_px >= margin) & (columns.col_px <= cols - 1 - margin)
        )  # fmt: skip

    def _overlap_context(
        self,
        columns: Columns,
        vectors: LatticeVectors,
        velocity: np.ndarray,
        t_line: float,
        tile: Tile,
        graph: Any,
        offset: np.ndarray,
        search: float,
    ) -> _OverlapContext | None:
        """The stitched columns within reach of the tile, with the part of the mosaic of each."""
        x_min, x_max, y_min, y_max = tile.extent_nm
        reach = search + 1.0
        nodes = graph.nodes_in(x_min + offset[0] - reach, x_max + offset[0] + reach,
                               y_min + offset[1] - reach, y_max + offset[1] + reach)  # fmt: skip
        if nodes.size < self.config.min_overlap_columns:
            return None
        tiles, of_node = np.unique(graph.first_tile[nodes], return_inverse=True)
        part_of_tile = [self.part_of(graph.tile_ids[k]) for k in tiles]
        labels = {part: index for index, part in enumerate(sorted(set(part_of_tile)))}
        label = np.array([labels[part] for part in part_of_tile])[of_node]
        parts = [part_of_tile[k] for k in of_node]
        sizes = np.bincount(label)
        # A part's rank as an anchor: its tiles, and among equals the one holding the session's
        # first placed tile, so the frame stays where the first tile put it and the lighter part moves.
        first = self.placements[0].tile_id if self.placements else None
        ranks = {
            part: sum(1 for t in self._parent if self.part_of(t) == part)
            + (0.5 if first is not None and self.part_of(first) == part else 0.0)
            for part in labels
        }
        priority = np.array([ranks[part] for part in sorted(labels, key=labels.__getitem__)])[label]
        true_vectors = _specimen_vectors(vectors, velocity, t_line, tile.pixel_size_nm)
        return _OverlapContext(
            reference=np.stack([graph.x_nm[nodes], graph.y_nm[nodes]], 1),
            scattering=graph.scattering[nodes],
            species=graph.species[nodes],
            fingerprint=graph.weight[nodes] >= 0.6,
            parts=parts,
            label=label,
            weight=sizes[label].astype(float),
            priority=priority,
            vectors=true_vectors,
            spacing=float(np.hypot(*vectors.a1)),
            tile_fingerprint=self._away_from_edges(columns, tile, float(np.hypot(*vectors.a1))),
        )

    def _overlap(
        self,
        points: np.ndarray,
        columns: Columns,
        context: _OverlapContext,
        offset: np.ndarray,
        search: float,
        t_line: float,
    ) -> OverlapMatch | None:
        return register_to_graph(
            points, columns.scattering, columns.species,
            context.reference, context.scattering, context.species,
            context.vectors, np.asarray(offset, dtype=float), max(search, 0.5), self.config,
            row_time_s=columns.row_px * t_line,
            velocity_sigma=max(self.tracker.predict(self.tracker.t or 0.0)[3], 0.02),
            reference_group=context.label,
            group_weight=context.weight,
            fingerprint=context.tile_fingerprint,
            reference_fingerprint=context.fingerprint,
            group_priority=context.priority,
        )  # fmt: skip


def _specimen_vectors(
    vectors: LatticeVectors, velocity: np.ndarray, t_line: float, pixel_size_nm: float
) -> LatticeVectors:
    """A tile's lattice vectors with the drift shear undone: the specimen's, nm."""
    shear = velocity * t_line / pixel_size_nm
    return LatticeVectors(
        vectors.a1 + shear * vectors.a1[1],
        vectors.a2 + shear * vectors.a2[1],
        vectors.sigma_nm,
        vectors.count,
    )


@dataclass(frozen=True)
class _OverlapContext:
    """The stitched columns near a tile, as registration needs them."""

    reference: np.ndarray
    scattering: np.ndarray
    species: np.ndarray
    fingerprint: np.ndarray
    parts: list[str]
    label: np.ndarray
    weight: np.ndarray
    priority: np.ndarray
    vectors: LatticeVectors
    spacing: float
    tile_fingerprint: np.ndarray
