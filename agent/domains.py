"""Ferroelectric domains and domain walls from B-column shifts.

In BiFeO3 viewed along [001] the B (Fe-O) column sits off the centre of its A-cell along
the projected polarization. Averaged over a few unit cells the shift is a clean map of the
domains, and a domain wall is where that map jumps between two directions (a quarter turn
across 71° and 109° walls, a half turn across 180° walls).

:func:`find_wall` looks for one straight wall in a set of B shifts (a tile) and returns it
as a :class:`WallSegment`: a point on the wall and its direction in stage nanometres. Walls
in ferroelectric films run straight for long distances along crystallographic planes, so a
segment seen in one tile says where the wall goes next; the guided policy follows it
(:meth:`agent.policy.AcquisitionPolicy.ingest_walls`). Defect clusters gather on walls.

Units: positions in nm, shifts in pm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import Field
from scipy.spatial import cKDTree

from agent.columns import Columns
from agent.config import StrictModel
from agent.graph import b_site_displacement

_BOUNDARY_NEIGHBOURS = 9
"""A column and its eight nearest same-site neighbours decide whether it sits on the boundary."""


class WallConfig(StrictModel):
    """How a domain wall is recognised in a tile's B-column shifts."""

    smoothing_radius_nm: float = Field(
        1.2, gt=0, description="shifts are averaged over this radius (about three unit cells) first"
    )
    min_separation_pm: float = Field(
        15.0, gt=0, description="least difference of the mean smoothed shifts of the two domains"
    )
    min_contrast: float = Field(
        3.0, gt=0, description="least ratio of that difference to the spread of shifts within a domain"
    )
    max_residual_nm: float = Field(
        0.6, gt=0, description="the boundary columns must lie this close (RMS) to one straight line"
    )
    min_side_fraction: float = Field(
        0.03, gt=0, lt=0.5, description="least share of the columns on the smaller side of the wall"
    )
    min_boundary_columns: int = Field(10, ge=3, description="least number of columns on the boundary")
    min_columns: int = Field(100, ge=10, description="least number of B columns with a complete cell")


@dataclass(frozen=True)
class WallSegment:
    """A straight piece of a domain wall, in stage coordinates.

    Parameters
    ----------
    point_nm : tuple of float
        ``(x, y)`` centre of the boundary columns, nm.
    direction : tuple of float
        Vector along the wall ``(tx, ty)``, stored normalised to unit length; its sign
        carries no meaning.
    half_length_nm : float
        Half the extent of the boundary columns along the wall, nm.
    residual_nm : float
        RMS distance of the boundary columns from the line, nm.
    separation_pm : float
        Difference of the mean smoothed B shifts on the two sides, pm.
    contrast : float
        ``separation_pm`` over the RMS spread of smoothed shifts within a side.
    polarization_pm : tuple of tuple of float
        Mean smoothed shift ``(dx, dy)`` in pm on the side the normal ``(-ty, tx)`` points
        away from, then on the side it points to.

    Raises
    ------
    ValueError
        If the point, direction, length or residual is not finite, the direction is zero or
        the length negative.
    """

    point_nm: tuple[float, float]
    direction: tuple[float, float]
    half_length_nm: float
    residual_nm: float
    separation_pm: float
    contrast: float
    polarization_pm: tuple[tuple[float, float], tuple[float, float]]

    def __post_init__(self) -> None:
        numbers = (*self.point_nm, *self.direction, self.half_length_nm, self.residual_nm)
        if not all(math.isfinite(value) for value in numbers):
            raise ValueError(
                f"a wall segment needs a finite point, direction, length and residual; got {self}"
            )
        norm = math.hypot(*self.direction)
        if norm < 1e-9:
            raise ValueError(f"a wall segment needs a non-zero direction, got {self.direction}")
        if self.half_length_nm < 0:
            raise ValueError(f"half_length_nm must be >= 0, got {self.half_length_nm}")
        # Stored as a unit vector: wall_interest and offsets_nm measure distances with it. One
        # that is unit already is kept bit for bit, so records read back equal.
        if abs(norm - 1.0) > 1e-12:
            object.__setattr__(self, "direction", (self.direction[0] / norm, self.direction[1] / norm))

    @property
    def normal(self) -> np.ndarray:
        """Unit normal ``(-ty, tx)``."""
        return np.array([-self.direction[1], self.direction[0]])

    @property
    def angle_deg(self) -> float:
        """Direction of the wall from the stage x axis, degrees in [0, 180)."""
        return math.degrees(math.atan2(self.direction[1], self.direction[0])) % 180.0

    @property
    def rotation_deg(self) -> float:
        """Angle between the polarizations of the two sides, degrees (about 90 or 180 in BiFeO3)."""
        (ax, ay), (bx, by) = self.polarization_pm
        return abs(math.degrees(math.atan2(ax * by - ay * bx, ax * bx + ay * by)))

    def offsets_nm(self, points_nm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where points lie relative to the wall's line.

        Parameters
        ----------
        points_nm : numpy.ndarray
            ``(n, 2)`` stage positions, nm.

        Returns
        -------
        along, across : numpy.ndarray
            Signed distance along the wall from :attr:`point_nm` and signed distance from
            the line, nm, shape ``(n,)`` each.
        """
        relative = np.asarray(points_nm, dtype=np.float64).reshape(-1, 2) - np.asarray(self.point_nm)
        return relative @ np.asarray(self.direction), relative @ self.normal

    def to_record(self) -> dict[str, Any]:
        """JSON-friendly dictionary (the journal's ``wall`` entry)."""
        return {
            "point_nm": list(self.point_nm),
            "direction": list(self.direction),
            "half_length_nm": self.half_length_nm,
            "residual_nm": self.residual_nm,
            "separation_pm": self.separation_pm,
            "contrast": self.contrast,
            "polarization_pm": [list(side) for side in self.polarization_pm],
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> WallSegment:
        """Inverse of :meth:`to_record`."""
        first, second = record["polarization_pm"]
        return cls(
            point_nm=(float(record["point_nm"][0]), float(record["point_nm"][1])),
            direction=(float(record["direction"][0]), float(record["direction"][1])),
            half_length_nm=float(record["half_length_nm"]),
            residual_nm=float(record["residual_nm"]),
            separation_pm=float(record["separation_pm"]),
            contrast=float(record["contrast"]),
            polarization_pm=((float(first[0]), float(first[1])), (float(second[0]), float(second[1]))),
        )


def smooth_displacement(positions_nm: np.ndarray, displacement: np.ndarray, radius_nm: float) -> np.ndarray:
    """Mean displacement of the points within ``radius_nm`` of each point (itself included).

    Parameters
    ----------
    positions_nm : numpy.ndarray
        ``(N, 2)`` positions, nanometres.
    displacement : numpy.ndarray
        ``(N, 2)`` vectors to average (any unit).
    radius_nm : float
        Averaging radius, nanometres.

    Returns
    -------
    numpy.ndarray
        ``(N, 2)`` averaged vectors, in the unit of ``displacement``.

    Examples
    --------
    >>> positions = np.array([[0.0, 0.0], [0.4, 0.0], [5.0, 0.0]])
    >>> shifts = np.array([[10.0, 0.0], [20.0, 0.0], [0.0, 30.0]])
    >>> smooth_displacement(positions, shifts, 1.0).tolist()
    [[15.0, 0.0], [15.0, 0.0], [0.0, 30.0]]
    """
    positions_nm = np.asarray(positions_nm, dtype=np.float64)
    displacement = np.asarray(displacement, dtype=np.float64)
    count = positions_nm.shape[0]
    if count == 0:
        return displacement.copy()
    tree = cKDTree(positions_nm)
    # A fixed number of neighbours keeps the average vectorised; it grows until the farthest
    # one lies outside the radius for every point, so any radius is honoured.
    k = min(64, count)
    while True:
        # A list of k values keeps the result 2-d even for a single neighbour.
        ranks = list(range(1, k + 1))
        distance, index = tree.query(positions_nm, k=ranks, distance_upper_bound=radius_nm, workers=-1)
        if k == count or not np.isfinite(distance[:, -1]).any():
            break
        k = min(2 * k, count)
    inside = np.isfinite(distance)
    safe = np.where(inside, index, 0)
    summed = (displacement[safe] * inside[..., None]).sum(axis=1)
    return summed / np.maximum(inside.sum(axis=1), 1)[:, None]


def _two_level_split(values: np.ndarray) -> float:
    """Otsu's threshold of 1-d values: the split that maximises the between-class variance."""
    ordered = np.sort(values)
    count = ordered.size
    cumulative = np.cumsum(ordered)
    below = np.arange(1, count)
    mean_below = cumulative[:-1] / below
    mean_above = (cumulative[-1] - cumulative[:-1]) / (count - below)
    between = below * (count - below) * (mean_below - mean_above) ** 2
    split = int(np.argmax(between))
    return 0.5 * (ordered[split] + ordered[split + 1])


def find_wall(
    positions_nm: np.ndarray, displacement_pm: np.ndarray, config: WallConfig | None = None
) -> WallSegment | None:
    """The straight domain wall crossing a set of B columns, if there is one.

    The shifts are smoothed over ``config.smoothing_radius_nm``, split in two along their
    principal direction (Otsu's threshold), and accepted as two domains when their mean
    shifts differ by at least ``min_separation_pm`` and ``min_contrast`` times the spread
    within each. The wall is the line through the columns that have both domains among
    their nearest neighbours; it must be straight to within ``max_residual_nm``. A phase
    boundary that curves, several walls crossing, or noise gives None.

    Parameters
    ----------
    positions_nm : numpy.ndarray
        ``(N, 2)`` B-column positions ``(x, y)``, nm.
    displacement_pm : numpy.ndarray
        ``(N, 2)`` B-column shifts from their A-cell centres, pm.
    config : WallConfig, optional
        Detection thresholds.

    Returns
    -------
    WallSegment or None
        The wall, or None when the columns show a single domain (or no clear wall).

    Examples
    --------
    >>> ij = np.stack(np.meshgrid(np.arange(30), np.arange(30)), -1).reshape(-1, 2)
    >>> positions = 0.4 * ij + 0.2
    >>> shifts = np.where(positions[:, :1] < 6.0, [[18.0, 18.0]], [[18.0, -18.0]])
    >>> wall = find_wall(positions, shifts)
    >>> round(wall.point_nm[0], 1), round(wall.angle_deg)
    (6.0, 90)
    """
    config = config or WallConfig()
    positions = np.asarray(positions_nm, dtype=np.float64)
    shifts = np.asarray(displacement_pm, dtype=np.float64)
    for name, array in (("positions_nm", positions), ("displacement_pm", shifts)):
        if array.ndim != 2 or array.shape[1] != 2:
            raise ValueError(f"{name} must have shape (N, 2), got {array.shape}")
    if positions.shape[0] != shifts.shape[0]:
        raise ValueError(f"{positions.shape[0]} positions but {shifts.shape[0]} shifts")
    finite = np.isfinite(positions).all(axis=1) & np.isfinite(shifts).all(axis=1)
    positions, shifts = positions[finite], shifts[finite]
    count = positions.shape[0]
    if count < config.min_columns:
        return None
    smoothed = smooth_displacement(positions, shifts, config.smoothing_radius_nm)
    centred = smoothed - smoothed.mean(axis=0)
    principal = np.linalg.svd(centred, full_matrices=False)[2][0]
    projection = centred @ principal
    min_side = max(1, math.ceil(config.min_side_fraction * count))
    side = projection > _two_level_split(projection)
    # A wall that only clips a corner leaves too few columns to measure the far domain.
    if not min_side <= side.sum() <= count - min_side:
        return None
    mean_low, mean_high = smoothed[~side].mean(axis=0), smoothed[side].mean(axis=0)
    separation = float(np.hypot(*(mean_high - mean_low)))
    spread = math.sqrt(
        (((smoothed[side] - mean_high) ** 2).sum() + ((smoothed[~side] - mean_low) ** 2).sum()) / count
    )
    contrast = separation / max(spread, 1e-9)
    if separation < config.min_separation_pm or contrast < config.min_contrast:
        return None

    tree = cKDTree(positions)
    neighbours = min(_BOUNDARY_NEIGHBOURS, count)
    # Half the smoothing radius, but never less than the next-nearest columns (a small radius
    # would otherwise leave no neighbour to compare with).
    spacing = float(np.median(tree.query(positions, k=2)[0][:, 1]))
    reach = max(0.5 * config.smoothing_radius_nm, 1.5 * spacing)
    distance, index = tree.query(positions, k=neighbours, distance_upper_bound=reach)
    present = np.isfinite(distance)
    labels = np.where(present, side[np.where(present, index, 0)], side[:, None])
    boundary = positions[labels.min(axis=1) != labels.max(axis=1)]
    if boundary.shape[0] < config.min_boundary_columns:
        return None
    centre = boundary.mean(axis=0)
    axes = np.linalg.svd(boundary - centre, full_matrices=False)[2]
    direction = axes[0]
    residual = float(np.sqrt((((boundary - centre) @ axes[1]) ** 2).mean()))
    if residual > config.max_residual_nm:
        return None
    along = (boundary - centre) @ direction
    # A sign convention (x component >= 0) so that records of a wall read alike; for a wall
    # within a few degrees of vertical, measurement noise still picks either sign.
    if direction[0] < -1e-12 or (abs(direction[0]) <= 1e-12 and direction[1] < 0):
        direction = -direction
    normal = np.array([-direction[1], direction[0]])
    beyond = (positions - centre) @ normal > 0
    before, after = (smoothed[mask].mean(axis=0) if mask.any() else np.zeros(2) for mask in (~beyond, beyond))
    polarization = ((float(before[0]), float(before[1])), (float(after[0]), float(after[1])))
    return WallSegment(
        point_nm=(float(centre[0]), float(centre[1])),
        direction=(float(direction[0]), float(direction[1])),
        half_length_nm=float(0.5 * (along.max() - along.min())),
        residual_nm=residual,
        separation_pm=separation,
        contrast=float(contrast),
        polarization_pm=polarization,
    )


def wall_in_tile(columns: Columns, config: WallConfig | None = None) -> WallSegment | None:
    """The domain wall crossing one tile, if there is one, from the tile's own columns.

    The tile's columns, not the stitched graph, are used: where two tiles overlap, a
    small registration error between them would shift A columns of one tile against B
    columns of the other and fake a domain.

    Parameters
    ----------
    columns : Columns
        Columns found in the tile (stage positions, species and lattice spacing).
    config : WallConfig, optional
        Detection thresholds.

    Returns
    -------
    WallSegment or None
        See :func:`find_wall`; None as well when the tile has no lattice.
    """
    if columns.lattice_spacing_nm is None or len(columns) == 0:
        return None
    positions = np.stack([columns.x_nm, columns.y_nm], axis=1)
    shifts_nm, valid = b_site_displacement(positions, columns.species, columns.lattice_spacing_nm)
    return find_wall(positions[valid], shifts_nm[valid] * 1e3, config)
