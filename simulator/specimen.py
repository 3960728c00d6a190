"""A procedural Sm-doped BiFeO3 specimen with ground truth, viewed along [001].

The specimen is a table of atomic columns in stage nanometres. A columns (Bi
partly replaced by Sm) sit on a square lattice, B columns (Fe-O) at the cell
centres, shifted by the local ferroelectric polarization. Planted features,
each with a ground-truth label per column and a region record:

* ferroelectric domains separated by long, slightly meandering 71°, 109° and
  180° walls (the polarization is a <111> vector; a wall flips one, two or
  three of its components);
* edge dislocations with their isotropic-elastic displacement field and a
  changed coordination at the core, plus locally rotated ("strained") patches;
* vacancy clusters (missing columns) and Sm-substitution clusters (dimmer A
  columns), placed preferentially near walls and dislocations as in real films;
* a Sm-rich, non-polar patch (the phase boundary) and an amorphous patch;
* a thickness gradient that scales every column's intensity.

Pure-O columns at the cell edges, (1/2, 0) and (0, 1/2) from an A column, are there
as in a real [001] image (``SpecimenConfig.oxygen_columns``), with their weak Z**1.7
contrast; they follow every displacement field but carry no label of their own.

Rendering a window only touches the columns inside it: columns are stored
sorted by spatial bin with an index of bin offsets (:meth:`Specimen.columns_in`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

from simulator.config import SpecimenConfig

LABELS: tuple[str, ...] = (
    "normal",
    "vacancy",
    "substitution",
    "dislocation_core",
    "domain_wall",
    "strained",
    "amorphous",
    "phase",
)
"""Ground-truth column labels; a column's ``label`` is an index into this tuple."""

LABEL_CODE: dict[str, int] = {name: code for code, name in enumerate(LABELS)}

SITE_A, SITE_B, SITE_CONTAMINANT, SITE_O = 0, 1, 2, 3
"""Column kinds: perovskite A site (Bi/Sm), B site (Fe-O), amorphous contaminant atom, pure-O column."""

SITE_NAMES: tuple[str, ...] = ("A", "B", "contaminant", "O")

Z_BI, Z_SM, Z_FE, Z_O = 83, 62, 26, 8
HAADF_EXPONENT = 1.7
"""Column brightness grows as the sum of Z**1.7 over the atoms in the column."""

_BI_SCATTERING = Z_BI**HAADF_EXPONENT
_SM_RELATIVE = Z_SM**HAADF_EXPONENT / _BI_SCATTERING
_FEO_RELATIVE = (Z_FE**HAADF_EXPONENT + Z_O**HAADF_EXPONENT) / _BI_SCATTERING
_O_RELATIVE = Z_O**HAADF_EXPONENT / _BI_SCATTERING
_POISSON_RATIO = 0.3

# Higher priority labels overwrite lower ones where features overlap; the
# order follows how a microscopist ranks them (cores first, patches last).
_LABEL_PRIORITY = ("phase", "strained", "substitution", "vacancy", "domain_wall", "dislocation_core")


def thickness_factor(x_nm: np.ndarray, y_nm: np.ndarray, config: SpecimenConfig, seed: int) -> np.ndarray:
    """Relative specimen thickness at stage positions: a linear wedge, 1 at the centre.

    Parameters
    ----------
    x_nm, y_nm : numpy.ndarray
        Stage positions, nanometres.
    config : SpecimenConfig
        Gives the extent and the relative thickness change across the specimen.
    seed : int
        Specimen seed; it fixes the direction of the wedge.

    Returns
    -------
    numpy.ndarray
        Thickness relative to nominal.
    """
    angle = float(np.random.default_rng([seed, 7]).uniform(0, 2 * math.pi))
    width, height = config.size_nm
    span = abs(width * math.cos(angle)) + abs(height * math.sin(angle))
    along = (np.asarray(x_nm) - 0.5 * width) * math.cos(angle) + (np.asarray(y_nm) - 0.5 * height) * math.sin(
        angle
    )
    return 1.0 + config.thickness_gradient * along / span


@dataclass(frozen=True)
class PlantedFeature:
    """One planted feature, for region-level ground truth.

    Parameters
    ----------
    feature_id : int
        Index of the feature in :attr:`Specimen.features`; columns refer to it.
    kind : str
        One of :data:`LABELS` other than ``"normal"``.
    center_nm : tuple of float
        Representative position ``(x, y)`` in nanometres.
    bbox_nm : tuple of float
        ``(x_min, x_max, y_min, y_max)`` the feature affects, in nanometres, clipped to the specimen.
    params : dict
        Kind-specific parameters (wall angle and type, Burgers vector, radius, ...).
    """

    feature_id: int
    kind: str
    center_nm: tuple[float, float]
    bbox_nm: tuple[float, float, float, float]
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class UnitCells:
    """Per-unit-cell parameters in stage units, the layout of the Sm-BFO dataset.

    Every cell is a B column with all four A neighbours present.

    Parameters
    ----------
    ab : numpy.ndarray
        Cell indices ``(2, N)``: (i along x, j along y).
    center_nm : numpy.ndarray
        Centre of mass of the four A columns, ``(2, N)`` as (x, y), nanometres.
    displacement_nm : numpy.ndarray
        B-column shift from that centre, ``(2, N)`` as (x, y), nanometres (the polarization proxy).
    area_nm2, a_nm, alpha_deg : numpy.ndarray
        Cell area, mean edge length and angle between the edges.
    a_weight, b_weight : numpy.ndarray
        Mean A-column and the B-column scattering weights (intensity proxies).
    """

    ab: np.ndarray
    center_nm: np.ndarray
    displacement_nm: np.ndarray
    area_nm2: np.ndarray
    a_nm: np.ndarray
    alpha_deg: np.ndarray
    a_weight: np.ndarray
    b_weight: np.ndarray


@dataclass
class Specimen:
    """Atomic columns of the synthetic specimen with ground truth.

    Column arrays all have length N and are sorted by spatial bin.

    Parameters
    ----------
    config : SpecimenConfig
        The parameters it was generated from.
    seed : int
        The generating seed.
    x_nm, y_nm : numpy.ndarray
        Column positions, nanometres (float64).
    site : numpy.ndarray
        :data:`SITE_A`, :data:`SITE_B` or :data:`SITE_CONTAMINANT` (int8).
    weight : numpy.ndarray
        Scattering strength relative to a pure Bi column of nominal thickness (float32).
    sm_fraction : numpy.ndarray
        Fraction of Sm atoms in an A column, 0 elsewhere (float32).
    label : numpy.ndarray
        Ground-truth label, index into :data:`LABELS` (int8).
    feature_id : numpy.ndarray
        Planted feature a column belongs to, -1 for none (int32).
    cell_ij : numpy.ndarray
        Lattice indices ``(N, 2)`` (-1 for contaminants) (int32).
    polarization : numpy.ndarray
        Projected polarization ``(N, 2)`` as (Px, Py), each in [-1, 1], on B columns (float32).
    vacancies : dict of numpy.ndarray
        Removed columns: ``x_nm``, ``y_nm``, ``site``, ``feature_id``.
    features : list of PlantedFeature
        Region-level ground truth.
    members : dict of numpy.ndarray or None
        Every column and vacant site of each planted feature, ``x_nm``, ``y_nm`` and
        ``feature_id``, before the label priority gives each column a single feature (a column
        of a vacancy cluster on a wall is listed under both); None for a specimen read from
        files that do not hold it (:meth:`feature_members` then falls back on ``feature_id``).
    """

    config: SpecimenConfig
    seed: int
    x_nm: np.ndarray
    y_nm: np.ndarray
    site: np.ndarray
    weight: np.ndarray
    sm_fraction: np.ndarray
    label: np.ndarray
    feature_id: np.ndarray
    cell_ij: np.ndarray
    polarization: np.ndarray
    vacancies: dict[str, np.ndarray]
    features: list[PlantedFeature]
    bin_size_nm: float = 2.0
    members: dict[str, np.ndarray] | None = field(default=None, repr=False)
    _bin_start: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.int64), repr=False)
    _bins_x: int = 0
    _bins_y: int = 0

    @classmethod
    def from_columns(
        cls,
        config: SpecimenConfig,
        seed: int,
        columns: dict[str, np.ndarray],
        vacancies: dict[str, np.ndarray],
        features: list[PlantedFeature],
        bin_size_nm: float = 2.0,
        members: dict[str, np.ndarray] | None = None,
    ) -> Specimen:
        """Build a specimen from column arrays, sorting them by spatial bin for window queries.

        Parameters
        ----------
        config : SpecimenConfig
            The generating parameters (they give the extent).
        seed : int
            The generating seed.
        columns : dict of numpy.ndarray
            One array per column field of :class:`Specimen` (``x_nm``, ``y_nm``, ``site``, ...).
        vacancies : dict of numpy.ndarray
            Removed columns.
        features : list of PlantedFeature
            Region-level ground truth.
        bin_size_nm : float
            Edge of the square bins of the spatial index, nanometres.
        members : dict of numpy.ndarray, optional
            Every column and vacant site of each feature (:attr:`Specimen.members`).

        Returns
        -------
        Specimen
            Columns reordered by bin, with the bin-offset index.
        """
        width, height = config.size_nm
        bins_x = max(math.ceil(width / bin_size_nm), 1)
        bins_y = max(math.ceil(height / bin_size_nm), 1)
        bx = np.clip((columns["x_nm"] // bin_size_nm).astype(np.int64), 0, bins_x - 1)
        by = np.clip((columns["y_nm"] // bin_size_nm).astype(np.int64), 0, bins_y - 1)
        flat = by * bins_x + bx
        order = np.argsort(flat, kind="stable")
        columns = {name: values[order] for name, values in columns.items()}
        bin_start = np.searchsorted(flat[order], np.arange(bins_x * bins_y + 1))
        return cls(
            config=config,
            seed=seed,
            vacancies=vacancies,
            features=features,
            bin_size_nm=bin_size_nm,
            members=members,
            _bin_start=bin_start,
            _bins_x=bins_x,
            _bins_y=bins_y,
            **columns,
        )

    @property
    def size_nm(self) -> tuple[float, float]:
        """Specimen extent ``(x, y)`` in nanometres; it spans ``[0, x] x [0, y]``."""
        return self.config.size_nm

    def __len__(self) -> int:
        return int(self.x_nm.size)

    def columns_in(self, x_min: float, x_max: float, y_min: float, y_max: float) -> np.ndarray:
        """Indices of the columns inside a stage rectangle (cost grows with the rectangle).

        Parameters
        ----------
        x_min, x_max, y_min, y_max : float
            Rectangle, nanometres; edges inclusive.

        Returns
        -------
        numpy.ndarray
            Sorted int64 column indices.
        """
        bx0 = max(math.floor(x_min / self.bin_size_nm), 0)
        bx1 = min(math.floor(x_max / self.bin_size_nm), self._bins_x - 1)
        by0 = max(math.floor(y_min / self.bin_size_nm), 0)
        by1 = min(math.floor(y_max / self.bin_size_nm), self._bins_y - 1)
        if bx0 > bx1 or by0 > by1:
            return np.zeros(0, dtype=np.int64)
        # Bins are sorted row-major, so each bin row contributes one contiguous run.
        rows = np.arange(by0, by1 + 1)
        starts = self._bin_start[rows * self._bins_x + bx0]
        stops = self._bin_start[rows * self._bins_x + bx1 + 1]
        candidates = np.concatenate([np.arange(a, b) for a, b in zip(starts, stops, strict=True)])
        x, y = self.x_nm[candidates], self.y_nm[candidates]
        inside = (x >= x_min) & (x <= x_max) & (y >= y_min) & (y <= y_max)
        return candidates[inside]

    def thickness_factor(self, x_nm: np.ndarray, y_nm: np.ndarray) -> np.ndarray:
        """Relative specimen thickness at stage positions (1 at the centre); see :func:`thickness_factor`."""
        return thickness_factor(x_nm, y_nm, self.config, self.seed)

    def feature_members(self) -> dict[str, np.ndarray]:
        """Positions of every column and vacant site of each planted feature.

        Returns
        -------
        dict of numpy.ndarray
            ``x_nm``, ``y_nm`` (nanometres) and ``feature_id``, one entry per (point, feature)
            pair: :attr:`members` when the specimen was generated here, else the columns by
            their single ``feature_id`` and the vacant sites.
        """
        if self.members is not None:
            return self.members
        planted = self.feature_id >= 0
        return {
            "x_nm": np.concatenate([self.x_nm[planted], self.vacancies["x_nm"]]),
            "y_nm": np.concatenate([self.y_nm[planted], self.vacancies["y_nm"]]),
            "feature_id": np.concatenate([self.feature_id[planted], self.vacancies["feature_id"]]),
        }

    def label_counts(self) -> dict[str, int]:
        """Number of columns carrying each ground-truth label."""
        counts = np.bincount(self.label, minlength=len(LABELS))
        return {name: int(counts[code]) for code, name in enumerate(LABELS)}

    def unit_cells(self) -> UnitCells:
        """Per-unit-cell parameters (dataset layout) from the column positions.

        The corners of a cell are the four A columns nearest its B column,
        found geometrically as a parameterization of a real image would; cells
        whose corners are missing (vacancies, cores, amorphous patches) are left out.

        Returns
        -------
        UnitCells
            One entry per B column with four A neighbours at lattice-like distances.
        """
        a_columns = np.flatnonzero(self.site == SITE_A)
        b_columns = np.flatnonzero(self.site == SITE_B)
        tree = cKDTree(np.stack([self.x_nm[a_columns], self.y_nm[a_columns]], 1))
        distance, nearest = tree.query(np.stack([self.x_nm[b_columns], self.y_nm[b_columns]], 1), k=4)
        # An ideal corner lies a/sqrt(2) from the B column; a missing corner pulls in a far one.
        complete = distance[:, 3] < 0.95 * self.config.lattice_nm
        b_columns, corners = b_columns[complete], a_columns[nearest[complete]]
        # Order corners counter-clockwise from the lower left, so edges are well defined.
        angle = np.arctan2(
            self.y_nm[corners] - self.y_nm[b_columns, None], self.x_nm[corners] - self.x_nm[b_columns, None]
        )
        order = np.argsort((angle + 0.75 * np.pi) % (2 * np.pi), axis=1)
        corners = np.take_along_axis(corners, order, axis=1)
        cx, cy = self.x_nm[corners], self.y_nm[corners]
        center = np.stack([cx.mean(axis=1), cy.mean(axis=1)])
        displacement = np.stack([self.x_nm[b_columns], self.y_nm[b_columns]]) - center
        # Corners 0..3 run lower-left, lower-right, upper-right, upper-left; average opposite edges.
        edge_i = np.stack(
            [(cx[:, 1] - cx[:, 0] + cx[:, 2] - cx[:, 3]) / 2, (cy[:, 1] - cy[:, 0] + cy[:, 2] - cy[:, 3]) / 2]
        )
        edge_j = np.stack(
            [(cx[:, 3] - cx[:, 0] + cx[:, 2] - cx[:, 1]) / 2, (cy[:, 3] - cy[:, 0] + cy[:, 2] - cy[:, 1]) / 2]
        )
        len_i, len_j = np.hypot(*edge_i), np.hypot(*edge_j)
        cross = edge_i[0] * edge_j[1] - edge_i[1] * edge_j[0]
        cos_alpha = (edge_i * edge_j).sum(axis=0) / (len_i * len_j)
        return UnitCells(
            ab=np.stack([self.cell_ij[b_columns, 0], self.cell_ij[b_columns, 1]]).astype(np.int64),
            center_nm=center,
            displacement_nm=displacement,
            area_nm2=np.abs(cross),
            a_nm=0.5 * (len_i + len_j),
            alpha_deg=np.degrees(np.arccos(np.clip(cos_alpha, -1, 1))),
            a_weight=self.weight[corners].mean(axis=1).astype(np.float64),
            b_weight=self.weight[b_columns].astype(np.float64),
        )


# ----------------------------------------------------------------------------- generation


@dataclass
class _Wall:
    point: np.ndarray
    normal: np.ndarray
    flips: np.ndarray  # +1 keeps a component of P = (x, y, z), -1 flips it across the wall
    meander: float
    wavelength: float
    phase: float
    wall_type: int

    def signed_distance(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        dx, dy = x - self.point[0], y - self.point[1]
        along = -dx * self.normal[1] + dy * self.normal[0]
        across = dx * self.normal[0] + dy * self.normal[1]
        return across + self.meander * np.sin(2 * math.pi * along / self.wavelength + self.phase)


def _blob_radius(angle: np.ndarray, radius: float, harmonics: np.ndarray) -> np.ndarray:
    """Radius of an irregular blob at polar ``angle``; ``harmonics`` rows are (order, amp, phase)."""
    r = np.full_like(angle, radius, dtype=float)
    for order, amplitude, phase in harmonics:
        r += radius * amplitude * np.cos(order * angle + phase)
    return r


def _random_point(rng: np.random.Generator, config: SpecimenConfig) -> np.ndarray:
    margin = config.edge_margin_nm
    width, height = config.size_nm
    margin_x, margin_y = min(margin, 0.4 * width), min(margin, 0.4 * height)
    return np.array([rng.uniform(margin_x, width - margin_x), rng.uniform(margin_y, height - margin_y)])


def _point_near(
    rng: np.random.Generator,
    config: SpecimenConfig,
    walls: list[_Wall],
    cores: list[np.ndarray],
) -> np.ndarray:
    """A point close to a wall or dislocation core with the configured probability."""
    anchors_exist = bool(walls or cores)
    if not anchors_exist or rng.random() >= config.cluster_near_feature_probability:
        return _random_point(rng, config)
    width, height = config.size_nm
    for _ in range(50):
        if cores and (not walls or rng.random() < 0.5):
            base = cores[rng.integers(len(cores))]
        else:
            wall = walls[rng.integers(len(walls))]
            # Walk along the wall to a random spot inside the specimen.
            tangent = np.array([-wall.normal[1], wall.normal[0]])
            base = wall.point + tangent * rng.uniform(-max(width, height), max(width, height))
        offset = rng.normal(size=2)
        offset *= rng.uniform(0, config.cluster_near_distance_nm) / max(np.linalg.norm(offset), 1e-9)
        candidate = base + offset
        margin = min(config.edge_margin_nm, 0.4 * min(width, height))
        if margin <= candidate[0] <= width - margin and margin <= candidate[1] <= height - margin:
            return candidate
    return _random_point(rng, config)


def _bbox(center: np.ndarray, radius: float, config: SpecimenConfig) -> tuple[float, float, float, float]:
    width, height = config.size_nm
    return (
        float(max(center[0] - radius, 0.0)),
        float(min(center[0] + radius, width)),
        float(max(center[1] - radius, 0.0)),
        float(min(center[1] + radius, height)),
    )


def _edge_dislocation_displacement(
    dx: np.ndarray, dy: np.ndarray, burgers: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Isotropic-elastic displacement of an edge dislocation at the origin.

    The cut lies along the negative glide direction, so the field carries one
    extra half plane of columns ending at the core.
    """
    b = float(np.hypot(*burgers))
    bx, by = burgers / b
    along = dx * bx + dy * by
    across = -dx * by + dy * bx
    r2 = np.maximum(along**2 + across**2, (0.05 * b) ** 2)
    nu = _POISSON_RATIO
    u_along = b / (2 * math.pi) * (np.arctan2(across, along) + along * across / (2 * (1 - nu) * r2))
    u_across = (
        -b
        / (2 * math.pi)
        * ((1 - 2 * nu) / (4 * (1 - nu)) * np.log(r2 / b**2) + (along**2 - across**2) / (4 * (1 - nu) * r2))
    )
    return u_along * bx - u_across * by, u_along * by + u_across * bx


def generate_specimen(config: SpecimenConfig | None = None, seed: int = 0) -> Specimen:
    """Generate the synthetic Sm-BFO specimen, deterministically for a seed.

    Parameters
    ----------
    config : SpecimenConfig, optional
        Specimen parameters; the defaults give about 160 x 160 nm and 330k columns.
    seed : int
        Random seed; the same seed and config give the same specimen.

    Returns
    -------
    Specimen
        Columns with ground truth.

    Examples
    --------
    >>> from simulator.config import SpecimenConfig
    >>> specimen = generate_specimen(SpecimenConfig(size_nm=(20.0, 20.0)), seed=1)
    >>> len(specimen) > 4000
    True
    """
    config = config or SpecimenConfig()
    rng = np.random.default_rng(seed)
    a = config.lattice_nm
    width, height = config.size_nm
    cells_x, cells_y = int(width // a), int(height // a)

    # Ideal lattice: A at cell corners, B at cell centres, both inside [0, size].
    ii, jj = np.meshgrid(np.arange(cells_x), np.arange(cells_y), indexing="ij")
    ii, jj = ii.ravel(), jj.ravel()
    n_cells = ii.size
    kinds = [SITE_A, SITE_B] + ([SITE_O, SITE_O] if config.oxygen_columns else [])
    cell_ij = np.concatenate([np.stack([ii, jj], 1)] * len(kinds)).astype(np.int32)
    site = np.concatenate([np.full(n_cells, kind) for kind in kinds]).astype(np.int8)
    # Offsets in the cell: A at (1/4, 1/4), B at (3/4, 3/4), O at (3/4, 1/4) and (1/4, 3/4).
    offset_x = np.repeat(np.array([0.25, 0.75, 0.75, 0.25][: len(kinds)]), n_cells)
    offset_y = np.repeat(np.array([0.25, 0.75, 0.25, 0.75][: len(kinds)]), n_cells)
    x0 = (cell_ij[:, 0] + offset_x) * a
    y0 = (cell_ij[:, 1] + offset_y) * a
    is_b = site == SITE_B

    features: list[PlantedFeature] = []
    label_masks: dict[str, list[tuple[np.ndarray, int]]] = {name: [] for name in _LABEL_PRIORITY}

    # Ferroelectric domains. P0 is the <111> polarization on the side where every
    # signed wall distance is negative; crossing wall w multiplies P by its flips.
    walls: list[_Wall] = []
    wall_types = (71, 109, 180)
    for w in range(config.domain_walls):
        wall_type = wall_types[w % 3] if w < 3 else int(rng.choice(wall_types))
        in_plane = int(rng.integers(2))
        flips = np.ones(3)
        if wall_type == 71:
            flips[in_plane] = -1
            angle = math.pi / 4 + math.pi / 2 * int(rng.integers(2))
        elif wall_type == 109:
            flips[in_plane] = -1
            flips[2] = -1
            angle = math.pi / 2 * int(rng.integers(2))
        else:
            flips[:] = -1
            angle = rng.uniform(0, math.pi)
        normal = np.array([math.cos(angle), math.sin(angle)])
        wall = _Wall(
            point=_random_point(rng, config),
            normal=normal,
            flips=flips,
            meander=config.wall_meander_nm * rng.uniform(0.5, 1.0),
            wavelength=rng.uniform(0.3, 0.6) * max(width, height),
            phase=rng.uniform(0, 2 * math.pi),
            wall_type=wall_type,
        )
        walls.append(wall)
    p0 = rng.choice([-1.0, 1.0], size=3)
    polar = np.tile(p0, (x0.size, 1))
    for wall in walls:
        distance = wall.signed_distance(x0, y0)
        flip_profile = -np.tanh(distance / config.wall_width_nm)
        for component in range(3):
            if wall.flips[component] < 0:
                polar[:, component] *= flip_profile
        feature = PlantedFeature(
            feature_id=len(features),
            kind="domain_wall",
            center_nm=(float(wall.point[0]), float(wall.point[1])),
            bbox_nm=(0.0, float(width), 0.0, float(height)),
            params={
                "wall_type_deg": wall.wall_type,
                "normal": [float(v) for v in wall.normal],
                "meander_nm": wall.meander,
                "wavelength_nm": wall.wavelength,
                "phase_rad": wall.phase,
                "flips": [int(v) for v in wall.flips],
            },
        )
        features.append(feature)
        label_masks["domain_wall"].append(
            (np.abs(distance) < max(config.wall_width_nm, 0.5 * a), feature.feature_id)
        )

    # Non-polar, Sm-rich patches: polarization fades to zero inside.
    suppression = np.ones(x0.size)
    sm_local = np.full(x0.size, config.sm_fraction)
    for _ in range(config.phase_patches):
        center = _random_point(rng, config)
        harmonics = np.stack([[2, 3, 4], rng.uniform(0.05, 0.15, 3), rng.uniform(0, 2 * np.pi, 3)], 1)
        dx, dy = x0 - center[0], y0 - center[1]
        rim = _blob_radius(np.arctan2(dy, dx), config.phase_patch_radius_nm, harmonics)
        depth = np.hypot(dx, dy) - rim
        inside = depth < 0
        suppression *= 1 / (1 + np.exp(-depth / 1.0))
        sm_local[inside] = config.phase_sm_fraction
        feature = PlantedFeature(
            feature_id=len(features),
            kind="phase",
            center_nm=(float(center[0]), float(center[1])),
            bbox_nm=_bbox(center, 1.5 * config.phase_patch_radius_nm, config),
            params={"radius_nm": config.phase_patch_radius_nm, "sm_fraction": config.phase_sm_fraction},
        )
        features.append(feature)
        label_masks["phase"].append((inside, feature.feature_id))
    polar *= suppression[:, None]

    # B columns sit off-centre along the projected polarization.
    shift = config.polar_displacement_nm / math.sqrt(2)
    x = x0 + np.where(is_b, shift * polar[:, 0], 0.0)
    y = y0 + np.where(is_b, shift * polar[:, 1], 0.0)

    # Edge dislocations, placed near walls when there are walls, kept apart from each other.
    cores: list[np.ndarray] = []
    for _ in range(config.dislocations):
        for _attempt in range(100):
            core = _point_near(rng, config, walls, [])
            if all(np.linalg.norm(core - other) > 6.0 for other in cores):
                break
        cores.append(core)
        direction = int(rng.integers(4))
        burgers = a * np.array([(1, 0), (0, 1), (-1, 0), (0, -1)][direction], dtype=float)
        ux, uy = _edge_dislocation_displacement(x0 - core[0], y0 - core[1], burgers)
        x += ux
        y += uy
        feature = PlantedFeature(
            feature_id=len(features),
            kind="dislocation_core",
            center_nm=(float(core[0]), float(core[1])),
            bbox_nm=_bbox(core, config.strain_radius_nm, config),
            params={"burgers_nm": [float(v) for v in burgers]},
        )
        features.append(feature)

    # Locally rotated lattice patches (strain from an inclusion or bending).
    for _ in range(config.strained_patches):
        center = _point_near(rng, config, walls, cores)
        radius = config.strained_patch_radius_nm
        theta = math.radians(config.strained_patch_rotation_deg) * rng.choice([-1, 1])
        dx, dy = x - center[0], y - center[1]
        local = theta * np.exp(-(dx**2 + dy**2) / (2 * (0.6 * radius) ** 2))
        x = center[0] + dx * np.cos(local) - dy * np.sin(local)
        y = center[1] + dx * np.sin(local) + dy * np.cos(local)
        feature = PlantedFeature(
            feature_id=len(features),
            kind="strained",
            center_nm=(float(center[0]), float(center[1])),
            bbox_nm=_bbox(center, radius, config),
            params={"radius_nm": radius, "rotation_deg": math.degrees(theta)},
        )
        features.append(feature)
        label_masks["strained"].append((np.hypot(x - center[0], y - center[1]) < radius, feature.feature_id))

    keep = np.ones(x.size, dtype=bool)
    for feature in features:
        if feature.kind != "dislocation_core":
            continue
        core = np.array(feature.center_nm)
        r = np.hypot(x - core[0], y - core[1])
        label_masks["strained"].append((r < config.strain_radius_nm, feature.feature_id))
        label_masks["dislocation_core"].append((r < config.dislocation_core_radius_nm, feature.feature_id))
        # Where the extra half plane ends, columns crowd together; drop the
        # later of any pair too close to be separate columns (the coordination change).
        # Cations first (their nearest distance is a / sqrt 2), then O columns, which sit only
        # a / 2 from their cations, against everything that is left.
        cations = np.isin(site, (SITE_A, SITE_B))
        for members, too_close in ((cations, 0.5 * a), (np.ones_like(cations), 0.3 * a)):
            near = np.flatnonzero((r < 3 * a) & members)
            tree = cKDTree(np.stack([x[near], y[near]], 1))
            for first, second in tree.query_pairs(too_close):
                if keep[near[first]] and keep[near[second]]:
                    keep[near[max(first, second)]] = False

    # Vacancy clusters: missing columns, mostly on A sites.
    vacancy_sites: list[np.ndarray] = []
    vacancy_features: list[np.ndarray] = []
    # Vacancies are cation sites; a tree of the cations alone also keeps the random draws (and
    # so the specimen) the same with and without O columns.
    cation_index = np.flatnonzero(np.isin(site, (SITE_A, SITE_B)))
    lattice_tree = cKDTree(np.stack([x[cation_index], y[cation_index]], 1))
    for _ in range(config.vacancy_clusters):
        center = _point_near(rng, config, walls, cores)
        hits = lattice_tree.query_ball_point(center, config.cluster_radius_nm)
        members = cation_index[np.array(hits, dtype=np.int64)]
        members = members[keep[members]]
        if members.size == 0:
            continue
        low, high = config.vacancies_per_cluster
        count = min(int(rng.integers(low, high + 1)), members.size)
        preference = np.where(site[members] == SITE_A, 0.7, 0.3)
        chosen = rng.choice(members, size=count, replace=False, p=preference / preference.sum())
        feature = PlantedFeature(
            feature_id=len(features),
            kind="vacancy",
            center_nm=(float(center[0]), float(center[1])),
            bbox_nm=_bbox(center, config.cluster_radius_nm + a, config),
            params={"count": int(count)},
        )
        features.append(feature)
        keep[chosen] = False
        vacancy_sites.append(chosen)
        vacancy_features.append(np.full(count, feature.feature_id))
        # The columns that lost a neighbour carry the label: a vacancy has no node of its own.
        neighbours = np.zeros(x.size, dtype=bool)
        for hits in lattice_tree.query_ball_point(np.stack([x[chosen], y[chosen]], 1), 1.05 * a):
            neighbours[cation_index[hits]] = True
        label_masks["vacancy"].append((neighbours, feature.feature_id))

    # Sm-substitution clusters: Sm-rich, dimmer A columns.
    for _ in range(config.substitution_clusters):
        center = _point_near(rng, config, walls, cores)
        inside = (np.hypot(x - center[0], y - center[1]) < config.cluster_radius_nm) & (site == SITE_A)
        sm_local[inside] = config.substitution_sm_fraction
        feature = PlantedFeature(
            feature_id=len(features),
            kind="substitution",
            center_nm=(float(center[0]), float(center[1])),
            bbox_nm=_bbox(center, config.cluster_radius_nm, config),
            params={"sm_fraction": config.substitution_sm_fraction, "columns": int(inside.sum())},
        )
        features.append(feature)
        label_masks["substitution"].append((inside, feature.feature_id))

    # Per-column composition and scattering weight.
    thickness = thickness_factor(x0, y0, config, seed)
    n_atoms = config.atoms_per_column
    # Drawn for the cation columns only (O columns hold no Sm): the random stream, and so every
    # feature placed after this, is the same with and without O columns.
    cations = np.isin(site, (SITE_A, SITE_B))
    sm_count = np.zeros(site.size, dtype=np.int64)
    sm_count[cations] = rng.binomial(n_atoms, np.clip(sm_local[cations], 0, 1))
    sm_fraction = np.where(site == SITE_A, sm_count / n_atoms, 0.0)
    weight = (
        np.select(
            [site == SITE_A, site == SITE_B],
            [1 - sm_fraction * (1 - _SM_RELATIVE), _FEO_RELATIVE],
            _O_RELATIVE,
        )
        * thickness
    )
    if config.position_jitter_nm > 0:
        x = x + rng.normal(0, config.position_jitter_nm, x.size)
        y = y + rng.normal(0, config.position_jitter_nm, y.size)

    label = np.zeros(x.size, dtype=np.int8)
    feature_id = np.full(x.size, -1, dtype=np.int32)
    for name in _LABEL_PRIORITY:
        for mask, fid in label_masks[name]:
            label[mask] = LABEL_CODE[name]
            feature_id[mask] = fid

    # Amorphous patches replace the crystal by randomly placed light clusters.
    extra_x: list[np.ndarray] = []
    extra_y: list[np.ndarray] = []
    extra_weight: list[np.ndarray] = []
    extra_feature: list[np.ndarray] = []
    interfaces: list[tuple[np.ndarray, int]] = []
    for _ in range(config.amorphous_patches):
        center = _random_point(rng, config)
        radius = config.amorphous_patch_radius_nm
        harmonics = np.stack([[2, 3, 5], rng.uniform(0.08, 0.2, 3), rng.uniform(0, 2 * np.pi, 3)], 1)
        dx, dy = x - center[0], y - center[1]
        depth = np.hypot(dx, dy) - _blob_radius(np.arctan2(dy, dx), radius, harmonics)
        feature = PlantedFeature(
            feature_id=len(features),
            kind="amorphous",
            center_nm=(float(center[0]), float(center[1])),
            bbox_nm=_bbox(center, 1.6 * radius, config),
            params={"radius_nm": radius},
        )
        features.append(feature)
        keep &= depth >= 0
        interface = (depth >= 0) & (depth < a)
        label[interface] = LABEL_CODE["amorphous"]
        feature_id[interface] = feature.feature_id
        interfaces.append((interface, feature.feature_id))
        # Fill the blob with atoms at about the crystal's column density.
        box = 1.6 * radius
        n_candidates = rng.poisson((2 * box) ** 2 * 2 / a**2)
        cx = center[0] + rng.uniform(-box, box, n_candidates)
        cy = center[1] + rng.uniform(-box, box, n_candidates)
        cdx, cdy = cx - center[0], cy - center[1]
        inside = np.hypot(cdx, cdy) < _blob_radius(np.arctan2(cdy, cdx), radius, harmonics)
        inside &= (cx >= 0) & (cx <= width) & (cy >= 0) & (cy <= height)
        extra_x.append(cx[inside])
        extra_y.append(cy[inside])
        extra_weight.append(rng.uniform(0.05, 0.4, int(inside.sum())))
        extra_feature.append(np.full(int(inside.sum()), feature.feature_id))

    removed = np.concatenate(vacancy_sites) if vacancy_sites else np.zeros(0, dtype=np.int64)
    vacancies = {
        "x_nm": x[removed],
        "y_nm": y[removed],
        "site": site[removed],
        "feature_id": np.concatenate(vacancy_features).astype(np.int32)
        if vacancy_features
        else np.zeros(0, np.int32),
    }

    # Every column and vacant site of each feature, before the label priority gives each column
    # one feature: a vacancy cluster on a wall belongs to the cluster and to the wall.
    pairs = [(np.flatnonzero(mask & keep), fid) for masks in label_masks.values() for mask, fid in masks]
    pairs += [(np.flatnonzero(interface & keep), fid) for interface, fid in interfaces]
    stacked = [np.stack([index, np.full(index.size, fid)], 1) for index, fid in pairs]
    column_pairs = np.unique(np.concatenate(stacked), axis=0) if stacked else np.zeros((0, 2), np.int64)
    members = {
        "x_nm": np.concatenate([x[column_pairs[:, 0]], *extra_x, vacancies["x_nm"]]),
        "y_nm": np.concatenate([y[column_pairs[:, 0]], *extra_y, vacancies["y_nm"]]),
        "feature_id": np.concatenate([column_pairs[:, 1], *extra_feature, vacancies["feature_id"]]).astype(
            np.int32
        ),
    }
    mx, my = members["x_nm"], members["y_nm"]
    on_specimen = (mx >= 0) & (mx <= width) & (my >= 0) & (my <= height)
    members = {name: values[on_specimen] for name, values in members.items()}

    polarization = np.where(is_b[:, None], polar[:, :2], 0.0)
    n_extra = sum(part.size for part in extra_x)
    columns = {
        "x_nm": np.concatenate([x[keep], *extra_x]),
        "y_nm": np.concatenate([y[keep], *extra_y]),
        "site": np.concatenate([site[keep], np.full(n_extra, SITE_CONTAMINANT)]).astype(np.int8),
        "weight": np.concatenate([weight[keep], *extra_weight]).astype(np.float32),
        "sm_fraction": np.concatenate([sm_fraction[keep], np.zeros(n_extra)]).astype(np.float32),
        "label": np.concatenate([label[keep], np.full(n_extra, LABEL_CODE["amorphous"])]).astype(np.int8),
        "feature_id": np.concatenate([feature_id[keep], *extra_feature]).astype(np.int32),
        "cell_ij": np.concatenate([cell_ij[keep], np.full((n_extra, 2), -1)]).astype(np.int32),
        "polarization": np.concatenate([polarization[keep], np.zeros((n_extra, 2))]).astype(np.float32),
    }
    inside = (
        (columns["x_nm"] >= 0)
        & (columns["x_nm"] <= width)
        & (columns["y_nm"] >= 0)
        & (columns["y_nm"] <= height)
    )
    columns = {name: values[inside] for name, values in columns.items()}
    return Specimen.from_columns(config, seed, columns, vacancies, features, members=members)
