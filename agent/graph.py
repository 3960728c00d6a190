"""The molecule graph: atomic columns as nodes, nearest neighbours as edges, stitched across tiles.

Every tile's :class:`~agent.columns.Columns` are merged in stage coordinates
into one :class:`MoleculeGraph`. A column seen in two overlapping tiles becomes
one node (matched within a tolerance; positions and intensities are averaged,
weighted by fit quality and distance from the tile edge). Edges (K nearest
neighbours, K = 4 as in the research write-up) and node features are
recomputed only near the new tile, so a merge costs in proportion to the tile,
not to the graph.

Node features (:data:`NODE_FEATURES`, physical units in the names):

* nearest-neighbour distances to the K nearest columns (mean, spread, minimum);
* local lattice: mean distance to the four nearest same-species columns, the
  largest departure of their angles from a square, and the rotation of the
  local square lattice from that of the columns within ~1.4 nm (the bent planes
  round a dislocation core and the rim of a rotated grain stand out; the rotation
  of the whole frame, a uniform scan skew and the 90-degree ambiguity of a square
  lattice do not);
* polarization proxy: shift of a B column from the centre of its four A
  neighbours (for A columns, the mean shift of their B neighbours), in pm, and
  its largest change to a same-species neighbour (high on domain walls);
* coordination deviation: columns within the first A-B and A-A shells minus
  the 8 of the ideal perovskite projection;
* intensity relative to the same-species neighbours and to the same-species
  columns of the surrounding ~5 x 5 nm (clusters of substituted columns are
  uniform inside, so only the wider reference sees them), width relative to
  the neighbours, species, fit quality;
* vacant neighbour sites: the confidence-weighted count of the finder's vacancy
  sites (:class:`~agent.columns.VacancySites`) within the first neighbour shell, so
  an empty A or B site is seen by its neighbours although it has no node.

Nodes whose neighbourhood reaches beyond the scanned area are marked not
:attr:`MoleculeGraph.interior`: their missing neighbours are the edge of the
scan, not a defect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import Field
from scipy.spatial import cKDTree

from agent.columns import SPECIES_A, SPECIES_B, SPECIES_O, Columns
from agent.config import StrictModel

NODE_FEATURES: tuple[str, ...] = (
    "nn_distance_mean_pm",
    "nn_distance_std_pm",
    "nn_distance_min_pm",
    "lattice_distance_pm",
    "lattice_angle_deviation_deg",
    "lattice_rotation_deg",
    "polarization_x_pm",
    "polarization_y_pm",
    "polarization_pm",
    "polarization_contrast_pm",
    "coordination_deviation",
    "relative_intensity",
    "regional_intensity",
    "relative_width",
    "is_b_site",
    "fit_quality",
    "vacant_neighbour_sites",
)
"""Names (and units) of the columns of the node-feature matrix; the feature schema."""

EDGE_FEATURES: tuple[str, ...] = ("distance_pm", "cos_angle", "sin_angle", "pair_aa", "pair_ab", "pair_bb")
"""Names of the edge attributes: length, direction and species pair of each kNN edge."""

_FEATURE_INDEX = {name: index for index, name in enumerate(NODE_FEATURES)}
_PERFECT_COORDINATION = 8  # four A-B plus four same-species neighbours in the [001] projection
_REGION_CELLS = 2  # the regional intensity reference spans (2 * 2 + 1)^2 cells around a node
# The orientation reference spans (2 * 3 + 1)^2 cells of one spacing: it stays inside the context
# that a merge recomputes (four spacings beyond the affected nodes).
_ORIENTATION_CELLS = 3


class GraphConfig(StrictModel):
    """How columns become a graph and how tiles are stitched."""

    k_neighbours: int = Field(4, ge=1, le=16, description="edges per node (K nearest columns)")
    lattice_spacing_nm: float = Field(
        0.396, gt=0, description="expected A-A spacing; sets shells and margins when a tile gives none"
    )
    match_tolerance_fraction: float = Field(
        0.35,
        gt=0,
        lt=0.5,
        description="two observations within this x spacing are one column: half the closest "
        "spacing real columns can have (a / sqrt 2), so a registration error of up to 0.14 nm "
        "still stitches",
    )
    edge_weight_fraction: float = Field(
        0.7, gt=0, description="observations this close to their tile edge (x spacing) weigh less"
    )
    cell_nm: float = Field(1.0, gt=0, description="cell of the spatial index")
    region_cell_nm: float = Field(
        1.0, gt=0, description="cell of the regional intensity reference (5 x 5 cells around a node)"
    )


@dataclass(frozen=True)
class MergeReport:
    """What one merge did.

    Parameters
    ----------
    added : int
        New nodes.
    matched : int
        Columns that matched an existing node (overlap with earlier tiles).
    updated_nodes : numpy.ndarray
        Ids of the nodes whose edges and features were recomputed.
    """

    added: int
    matched: int
    updated_nodes: np.ndarray


class MoleculeGraph:
    """Atomic columns of every scanned tile, stitched into one graph in stage coordinates.

    Parameters
    ----------
    config : GraphConfig, optional
        K, spacing, matching tolerance.

    Examples
    --------
    >>> graph = MoleculeGraph()
    >>> len(graph)
    0
    """

    def __init__(self, config: GraphConfig | None = None) -> None:
        self.config = config or GraphConfig()
        self._size = 0
        capacity = 1024
        k = self.config.k_neighbours
        self._x = np.zeros(capacity)
        self._y = np.zeros(capacity)
        self._species = np.zeros(capacity, dtype=np.int8)
        self._abnormal = np.zeros(capacity, dtype=bool)
        self._scattering = np.zeros(capacity)
        self._width = np.zeros(capacity)
        self._quality = np.zeros(capacity)
        self._weight = np.zeros(capacity)
        self._observations = np.zeros(capacity, dtype=np.int32)
        self._first_tile = np.zeros(capacity, dtype=np.int32)
        self._neighbours = np.full((capacity, k), -1, dtype=np.int64)
        self._features = np.zeros((capacity, len(NODE_FEATURES)), dtype=np.float32)
        self._interior = np.zeros(capacity, dtype=bool)
        self._displacement = np.zeros((capacity, 2))
        # exp(4i theta) of each node's local square lattice as (cos, sin); (0, 0) where undefined.
        self._orientation = np.zeros((capacity, 2))
        self._cells: dict[tuple[int, int], np.ndarray] = {}
        # Vacancy sites: x, y (nm), confidence and the tile that reported them.
        self._vacancies = np.zeros((0, 4))
        self.tile_extents: list[tuple[float, float, float, float]] = []
        self.tile_ids: list[str] = []
        self.lattice_spacing_nm = self.config.lattice_spacing_nm

    # ------------------------------------------------------------------ read access

    def __len__(self) -> int:
        return self._size

    @property
    def x_nm(self) -> np.ndarray:
        """Node x positions on the stage, nanometres (read-only view)."""
        return self._view(self._x)

    @property
    def y_nm(self) -> np.ndarray:
        """Node y positions on the stage, nanometres (read-only view)."""
        return self._view(self._y)

    @property
    def species(self) -> np.ndarray:
        """Node species, :data:`~agent.columns.SPECIES_A` or :data:`~agent.columns.SPECIES_B`."""
        return self._view(self._species)

    @property
    def scattering(self) -> np.ndarray:
        """Column intensity per incident electron per pixel, averaged over observations."""
        return self._view(self._scattering)

    @property
    def observations(self) -> np.ndarray:
        """How many tiles saw each node."""
        return self._view(self._observations)

    @property
    def abnormal(self) -> np.ndarray:
        """Whether each column's intensity was an outlier for its site (see :class:`Columns`)."""
        return self._view(self._abnormal)

    @property
    def width_nm(self) -> np.ndarray:
        """Fitted column width (Gaussian sigma), nm, averaged over observations."""
        return self._view(self._width)

    @property
    def quality(self) -> np.ndarray:
        """Correlation of each column with a Gaussian of its fitted width, in [-1, 1]."""
        return self._view(self._quality)

    @property
    def neighbours(self) -> np.ndarray:
        """``(N, K)`` ids of each node's K nearest columns (-1 where fewer exist)."""
        return self._view(self._neighbours)

    @property
    def features(self) -> np.ndarray:
        """``(N, F)`` node features, columns named by :data:`NODE_FEATURES`."""
        return self._view(self._features)

    @property
    def interior(self) -> np.ndarray:
        """True for nodes whose neighbourhood lies wholly inside the scanned area."""
        return self._view(self._interior)

    @property
    def displacement_nm(self) -> np.ndarray:
        """``(N, 2)`` polarization proxy (x, y): B shift from its A-cell centre, nanometres."""
        return self._view(self._displacement)

    @property
    def lattice_orientation_deg(self) -> np.ndarray:
        """Orientation of each node's local square lattice, degrees in (-45, 45] (NaN where undefined).

        A square lattice looks the same after 90 degrees, so the angle is defined modulo 90:
        average ``exp(4j * radians(angle))`` over nodes, never the angles themselves.
        """
        cos4, sin4 = self._orientation[: self._size].T
        defined = (cos4 != 0) | (sin4 != 0)
        return np.where(defined, np.degrees(np.arctan2(sin4, cos4)) / 4, np.nan)

    @property
    def weight(self) -> np.ndarray:
        """Summed observation weight of each node (fit quality, less near a tile edge); 1: one clean look."""
        return self._view(self._weight)

    @property
    def first_tile(self) -> np.ndarray:
        """Index into :attr:`tile_ids` of the tile that first saw each node."""
        return self._view(self._first_tile)

    def _view(self, array: np.ndarray) -> np.ndarray:
        view = array[: self._size]
        view.flags.writeable = False
        return view

    def feature(self, name: str) -> np.ndarray:
        """One node feature by name (see :data:`NODE_FEATURES`)."""
        return self.features[:, _FEATURE_INDEX[name]]

    # ------------------------------------------------------------------ spatial queries

    def _cell_range(self, low: float, high: float) -> range:
        cell = self.config.cell_nm
        return range(math.floor(low / cell), math.floor(high / cell) + 1)

    def nodes_in(self, x_min: float, x_max: float, y_min: float, y_max: float) -> np.ndarray:
        """Ids of the nodes inside a stage rectangle (edges inclusive), sorted.

        Parameters
        ----------
        x_min, x_max, y_min, y_max : float
            Rectangle, nanometres.

        Returns
        -------
        numpy.ndarray
            int64 node ids.
        """
        # Averaging can move a node a little past the cell it was filed in; look one tolerance wider.
        slack = self.config.match_tolerance_fraction * self.lattice_spacing_nm
        pieces = [
            self._cells[key]
            for ix in self._cell_range(x_min - slack, x_max + slack)
            for iy in self._cell_range(y_min - slack, y_max + slack)
            if (key := (ix, iy)) in self._cells
        ]
        if not pieces:
            return np.zeros(0, dtype=np.int64)
        ids = np.concatenate(pieces)
        x, y = self._x[ids], self._y[ids]
        inside = (x >= x_min) & (x <= x_max) & (y >= y_min) & (y <= y_max)
        return np.sort(ids[inside])

    def nodes_near(self, x_nm: float, y_nm: float, radius_nm: float) -> np.ndarray:
        """Ids of the nodes within ``radius_nm`` of a stage point, sorted by id."""
        ids = self.nodes_in(x_nm - radius_nm, x_nm + radius_nm, y_nm - radius_nm, y_nm + radius_nm)
        close = np.hypot(self._x[ids] - x_nm, self._y[ids] - y_nm) <= radius_nm
        return ids[close]

    # ------------------------------------------------------------------ merging

    def _grow(self, needed: int) -> None:
        capacity = self._x.shape[0]
        if needed <= capacity:
            return
        new_capacity = max(needed, 2 * capacity)
        for name in ("_x", "_y", "_species", "_abnormal", "_scattering", "_width", "_quality", "_weight",
                     "_observations", "_first_tile", "_interior"):  # fmt: skip
            old = getattr(self, name)
            grown = np.zeros(new_capacity, dtype=old.dtype)
            grown[:capacity] = old
            setattr(self, name, grown)
        for name, fill in (("_neighbours", -1), ("_features", 0), ("_displacement", 0), ("_orientation", 0)):
            old = getattr(self, name)
            grown = np.full((new_capacity, old.shape[1]), fill, dtype=old.dtype)
            grown[:capacity] = old
            setattr(self, name, grown)

    def _file_in_cells(self, ids: np.ndarray) -> None:
        cell = self.config.cell_nm
        ix = np.floor(self._x[ids] / cell).astype(np.int64)
        iy = np.floor(self._y[ids] / cell).astype(np.int64)
        order = np.lexsort((iy, ix))
        ix, iy, ids = ix[order], iy[order], ids[order]
        starts = np.flatnonzero(np.r_[True, (np.diff(ix) != 0) | (np.diff(iy) != 0)])
        ends = np.r_[starts[1:], ids.size]
        for start, end in zip(starts, ends, strict=True):
            key = (int(ix[start]), int(iy[start]))
            existing = self._cells.get(key)
            self._cells[key] = (
                ids[start:end] if existing is None else np.concatenate([existing, ids[start:end]])
            )

    def _observation_weight(
        self, columns: Columns, extent_nm: tuple[float, float, float, float]
    ) -> np.ndarray:
        """Trust in each observation: fit quality, lowered near the tile edge where columns are cut."""
        x_min, x_max, y_min, y_max = extent_nm
        edge = np.minimum.reduce(
            [columns.x_nm - x_min, x_max - columns.x_nm, columns.y_nm - y_min, y_max - columns.y_nm]
        )
        ramp = np.clip(edge / (self.config.edge_weight_fraction * self.lattice_spacing_nm), 0.05, 1.0)
        return np.clip(columns.quality, 0.05, 1.0) * ramp

    def merge(
        self, columns: Columns, extent_nm: tuple[float, float, float, float] | None = None
    ) -> MergeReport:
        """Add one tile's columns to the graph and update edges and features near it.

        Parameters
        ----------
        columns : Columns
            Columns of the tile, in stage coordinates.
        extent_nm : tuple of float, optional
            ``(x_min, x_max, y_min, y_max)`` of the tile (``Tile.extent_nm``); it defines the
            scanned area. Defaults to the columns' bounding box.

        Returns
        -------
        MergeReport
            Counts of new and matched columns and the ids recomputed.
        """
        if columns.lattice_spacing_nm is not None and len(self) == 0:
            self.lattice_spacing_nm = columns.lattice_spacing_nm
        # The graph is the cation lattice; pure-O columns stay in the Columns table only.
        if np.any(columns.species == SPECIES_O):
            columns = columns.select(columns.species != SPECIES_O)
        spacing = self.lattice_spacing_nm
        if extent_nm is None:
            if len(columns) == 0:
                return MergeReport(0, 0, np.zeros(0, dtype=np.int64))
            half = 0.5 * spacing
            extent_nm = (
                float(columns.x_nm.min() - half), float(columns.x_nm.max() + half),
                float(columns.y_nm.min() - half), float(columns.y_nm.max() + half),
            )  # fmt: skip
        self.tile_extents.append(tuple(float(v) for v in extent_nm))  # type: ignore[arg-type]
        self.tile_ids.append(columns.tile_id)
        tile_index = len(self.tile_ids) - 1
        self._add_vacancies(columns, tile_index)
        if len(columns) == 0:
            return MergeReport(0, 0, np.zeros(0, dtype=np.int64))

        tolerance = self.config.match_tolerance_fraction * spacing
        x_min, x_max, y_min, y_max = extent_nm
        weight_new = self._observation_weight(columns, extent_nm)
        # Columns may lie outside the scanned area (cut to the lattice it found): they match too.
        existing = self.nodes_in(
            min(x_min, float(columns.x_nm.min())) - tolerance,
            max(x_max, float(columns.x_nm.max())) + tolerance,
            min(y_min, float(columns.y_nm.min())) - tolerance,
            max(y_max, float(columns.y_nm.max())) + tolerance,
        )
        matched_new = np.zeros(0, dtype=np.int64)
        matched_old = np.zeros(0, dtype=np.int64)
        if existing.size:
            tree = cKDTree(np.stack([self._x[existing], self._y[existing]], 1))
            distance, nearest = tree.query(
                np.stack([columns.x_nm, columns.y_nm], 1), distance_upper_bound=tolerance
            )
            found = np.isfinite(distance)
            candidates_new = np.flatnonzero(found)
            candidates_old = existing[nearest[found]]
            # Two new columns on one node: the closer one matches, the other becomes a node.
            order = np.argsort(distance[found], kind="stable")
            _, first = np.unique(candidates_old[order], return_index=True)
            matched_new = candidates_new[order[first]]
            matched_old = candidates_old[order[first]]
            self._update_matched(matched_old, columns, matched_new, weight_new[matched_new])

        fresh = np.ones(len(columns), dtype=bool)
        fresh[matched_new] = False
        fresh_ids = self._append(columns.select(fresh), weight_new[fresh], tile_index)
        updated = self._recompute_near(extent_nm)
        return MergeReport(added=int(fresh_ids.size), matched=int(matched_new.size), updated_nodes=updated)

    def translate_tiles(self, tile_ids: set[str] | list[str], shift_nm: tuple[float, float]) -> np.ndarray:
        """Move the nodes first seen in some tiles, and those tiles' extents, by one shift.

        Registration uses this when a new tile bridges two parts of the mosaic that were placed
        independently (each only as well as the instrument's placement): the smaller part is
        moved onto the new tile's lattice so that the two agree, instead of leaving duplicate
        columns where they meet.

        Parameters
        ----------
        tile_ids : collection of str
            Request ids of the tiles to move (as in :attr:`tile_ids`).
        shift_nm : tuple of float
            ``(dx, dy)``, nanometres.

        Returns
        -------
        numpy.ndarray
            Ids of the nodes whose features were recomputed.
        """
        wanted = set(tile_ids)
        indices = np.array([k for k, name in enumerate(self.tile_ids) if name in wanted], dtype=np.int64)
        if indices.size == 0 or len(self) == 0:
            return np.zeros(0, dtype=np.int64)
        dx, dy = float(shift_nm[0]), float(shift_nm[1])
        moved = np.flatnonzero(np.isin(self.first_tile, indices))
        before = [self.tile_extents[k] for k in indices]
        self._x[moved] += dx
        self._y[moved] += dy
        carried = np.isin(self._vacancies[:, 3], indices)
        self._vacancies[carried, 0] += dx
        self._vacancies[carried, 1] += dy
        for k in indices:
            x0, x1, y0, y1 = self.tile_extents[k]
            self.tile_extents[k] = (x0 + dx, x1 + dx, y0 + dy, y1 + dy)
        # The spatial index is keyed by position: file every node afresh.
        self._cells = {}
        self._file_in_cells(np.arange(self._size, dtype=np.int64))
        after = [self.tile_extents[k] for k in indices]
        updated = [self._recompute_near(extent) for extent in [*before, *after]]
        return np.unique(np.concatenate(updated)) if updated else np.zeros(0, dtype=np.int64)

    def _update_matched(
        self, nodes: np.ndarray, columns: Columns, rows: np.ndarray, weight: np.ndarray
    ) -> None:
        old_weight = self._weight[nodes]
        total = old_weight + weight
        for target, values in (
            (self._x, columns.x_nm[rows]),
            (self._y, columns.y_nm[rows]),
            (self._scattering, columns.scattering[rows]),
            (self._width, columns.width_px[rows] * columns.pixel_size_nm),
        ):
            target[nodes] = (target[nodes] * old_weight + values * weight) / total
        # Species and the abnormal flag follow the more trusted observation.
        better = weight > old_weight
        self._species[nodes[better]] = columns.species[rows[better]]
        self._abnormal[nodes[better]] = columns.abnormal[rows[better]]
        self._quality[nodes] = np.maximum(self._quality[nodes], columns.quality[rows])
        self._weight[nodes] = total
        self._observations[nodes] += 1

    def _append(self, columns: Columns, weight: np.ndarray, tile_index: int) -> np.ndarray:
        count = len(columns)
        start = self._size
        self._grow(start + count)
        ids = np.arange(start, start + count, dtype=np.int64)
        self._x[ids] = columns.x_nm
        self._y[ids] = columns.y_nm
        self._species[ids] = columns.species
        self._abnormal[ids] = columns.abnormal
        self._scattering[ids] = columns.scattering
        self._width[ids] = columns.width_px * columns.pixel_size_nm
        self._quality[ids] = columns.quality
        self._weight[ids] = weight
        self._observations[ids] = 1
        self._first_tile[ids] = tile_index
        self._neighbours[ids] = -1
        self._size = start + count
        if count:
            self._file_in_cells(ids)
        return ids

    # ------------------------------------------------------------------ edges and features

    @property
    def vacancy_sites(self) -> np.ndarray:
        """``(M, 3)`` vacancy sites of all merged tiles: x, y (nm) and confidence (one row per site)."""
        return self._vacancies[:, :3].copy()

    def _add_vacancies(self, columns: Columns, tile_index: int) -> None:
        """File a tile's vacancy sites; a site reported again keeps its highest confidence."""
        sites = columns.vacancies
        if len(sites) == 0:
            return
        new = np.stack([sites.x_nm, sites.y_nm, sites.confidence, np.full(len(sites), tile_index)], 1)
        if len(self._vacancies):
            tolerance = self.config.match_tolerance_fraction * self.lattice_spacing_nm
            distance, nearest = cKDTree(self._vacancies[:, :2]).query(
                new[:, :2], distance_upper_bound=tolerance
            )
            seen = np.isfinite(distance)
            np.maximum.at(self._vacancies[:, 2], nearest[seen], new[seen, 2])
            new = new[~seen]
        self._vacancies = np.concatenate([self._vacancies, new])

    def _recompute_near(self, extent_nm: tuple[float, float, float, float]) -> np.ndarray:
        """Recompute neighbours, polarization and features of the nodes a merge can have changed."""
        spacing = self.lattice_spacing_nm
        margin = 2.0 * spacing
        x_min, x_max, y_min, y_max = extent_nm
        affected = self.nodes_in(x_min - margin, x_max + margin, y_min - margin, y_max + margin)
        # Features of affected nodes read their neighbours' polarization, which reads theirs.
        context = self.nodes_in(
            x_min - 3 * margin, x_max + 3 * margin, y_min - 3 * margin, y_max + 3 * margin
        )
        self._compute(affected, context)
        return affected

    def _compute(self, affected: np.ndarray, context: np.ndarray) -> None:
        spacing = self.lattice_spacing_nm
        k = self.config.k_neighbours
        positions = np.stack([self._x[context], self._y[context]], 1)
        species = self._species[context]
        local = np.searchsorted(context, affected)  # affected is a subset of the sorted context

        # K nearest columns of any species: the edges.
        tree = cKDTree(positions)
        count = min(k + 1, context.size)
        distance, nearest = tree.query(positions[local], k=count, workers=-1)
        distance, nearest = np.atleast_2d(distance)[:, 1:], np.atleast_2d(nearest)[:, 1:]
        neighbours = np.full((affected.size, k), -1, dtype=np.int64)
        neighbours[:, : nearest.shape[1]] = context[nearest]
        self._neighbours[affected] = neighbours

        # Same- and other-species neighbour sets.
        same = {}
        for code in (SPECIES_A, SPECIES_B):
            members = np.flatnonzero(species == code)
            same[code] = (members, cKDTree(positions[members]) if members.size else None)

        def nearest_of(code: int, where: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
            members, species_tree = same[code]
            result_d = np.full((where.shape[0], n), np.inf)
            result_i = np.full((where.shape[0], n), -1, dtype=np.int64)
            if species_tree is None or where.shape[0] == 0:
                return result_d, result_i
            take = min(n, members.size)
            d, i = species_tree.query(where, k=take, workers=-1)
            d, i = d.reshape(where.shape[0], take), i.reshape(where.shape[0], take)
            result_d[:, :take], result_i[:, :take] = d, members[i]
            return result_d, result_i

        # Polarization proxy of every B in the context: shift from the centre of its four A columns.
        displacement, valid = b_site_displacement(positions, species, spacing, a_tree=same[SPECIES_A])
        # A columns carry the mean shift of their (valid) B neighbours.
        a_context = np.flatnonzero(species == SPECIES_A)
        if a_context.size:
            d_b, i_b = nearest_of(SPECIES_B, positions[a_context], 4)
            use = (d_b < 0.95 * spacing) & np.where(i_b >= 0, valid[np.where(i_b >= 0, i_b, 0)], False)
            summed = (displacement[np.where(i_b >= 0, i_b, 0)] * use[:, :, None]).sum(axis=1)
            counts = use.sum(axis=1)
            displacement[a_context] = np.where(
                counts[:, None] > 0, summed / np.maximum(counts, 1)[:, None], 0.0
            )
        self._displacement[affected] = displacement[local]

        features = np.zeros((affected.size, len(NODE_FEATURES)), dtype=np.float64)
        finite = np.where(np.isfinite(distance), distance, np.nan)
        features[:, _FEATURE_INDEX["nn_distance_mean_pm"]] = np.nanmean(finite, axis=1) * 1e3
        features[:, _FEATURE_INDEX["nn_distance_std_pm"]] = np.nanstd(finite, axis=1) * 1e3
        features[:, _FEATURE_INDEX["nn_distance_min_pm"]] = np.nanmin(finite, axis=1) * 1e3

        own_species = species[local]
        same_d = np.full((affected.size, 4), np.inf)
        same_i = np.full((affected.size, 4), -1, dtype=np.int64)
        for code in (SPECIES_A, SPECIES_B):
            rows = np.flatnonzero(own_species == code)
            if rows.size:
                d, i = nearest_of(code, positions[local[rows]], 5)
                same_d[rows], same_i[rows] = d[:, 1:], i[:, 1:]  # the first is the node itself
        has = same_i >= 0
        safe = np.where(has, same_i, 0)
        vectors = positions[safe] - positions[local][:, None, :]
        angles = np.arctan2(vectors[..., 1], vectors[..., 0])
        features[:, _FEATURE_INDEX["lattice_distance_pm"]] = (
            np.nanmean(np.where(has & np.isfinite(same_d), same_d, np.nan), axis=1) * 1e3
        )
        sorted_angles = np.sort(np.where(has, angles, np.nan), axis=1)
        gaps = np.diff(np.concatenate([sorted_angles, sorted_angles[:, :1] + 2 * np.pi], axis=1), axis=1)
        features[:, _FEATURE_INDEX["lattice_angle_deviation_deg"]] = np.degrees(
            np.nanmax(np.abs(gaps - np.pi / 2), axis=1)
        )
        # Orientation of a square lattice is defined modulo 90 degrees: average 4 theta.
        local_4 = np.nansum(np.where(has, np.exp(4j * angles), 0), axis=1)
        magnitude = np.abs(local_4)
        unit = np.where(magnitude > 0, local_4 / np.where(magnitude > 0, magnitude, 1), 0)
        self._orientation[affected] = np.stack([unit.real, unit.imag], 1)
        features[:, _FEATURE_INDEX["lattice_rotation_deg"]] = self._lattice_rotation(
            positions, context, local
        )

        shift = displacement[local]
        features[:, _FEATURE_INDEX["polarization_x_pm"]] = shift[:, 0] * 1e3
        features[:, _FEATURE_INDEX["polarization_y_pm"]] = shift[:, 1] * 1e3
        features[:, _FEATURE_INDEX["polarization_pm"]] = np.hypot(shift[:, 0], shift[:, 1]) * 1e3
        # Largest change of the polarization proxy to a same-species neighbour: high on domain walls.
        jump = np.hypot(*(displacement[safe] - shift[:, None, :]).transpose(2, 0, 1))
        features[:, _FEATURE_INDEX["polarization_contrast_pm"]] = np.where(has, jump, 0.0).max(axis=1) * 1e3

        ab_shell = 1.2 * spacing / math.sqrt(2)
        same_shell = 1.2 * spacing
        within_any = tree.query_ball_point(positions[local], ab_shell, return_length=True, workers=-1) - 1
        same_within = np.sum(has & (same_d < same_shell), axis=1)
        features[:, _FEATURE_INDEX["coordination_deviation"]] = (
            within_any + same_within - _PERFECT_COORDINATION
        )

        scattering = self._scattering[context]
        width = self._width[context]
        for name, values in (("relative_intensity", scattering), ("relative_width", width)):
            reference = np.nanmedian(np.where(has, values[safe], np.nan), axis=1)
            own = values[local]
            features[:, _FEATURE_INDEX[name]] = np.where(
                np.isfinite(reference) & (reference > 0), own / np.where(reference > 0, reference, 1) - 1, 0.0
            )
        features[:, _FEATURE_INDEX["regional_intensity"]] = self._regional_intensity(
            positions, species, scattering, local
        )
        features[:, _FEATURE_INDEX["is_b_site"]] = own_species == SPECIES_B
        features[:, _FEATURE_INDEX["fit_quality"]] = self._quality[affected]
        if len(self._vacancies):
            # The first shell reaches the A-A distance: an empty site's four A-B and four same-site
            # neighbours all see it.
            vacancy_tree = cKDTree(self._vacancies[:, :2])
            near = vacancy_tree.query_ball_point(positions[local], 1.1 * spacing, workers=-1)
            confidence = self._vacancies[:, 2]
            features[:, _FEATURE_INDEX["vacant_neighbour_sites"]] = [
                float(confidence[hits].sum()) if hits else 0.0 for hits in near
            ]
        self._features[affected] = np.nan_to_num(features, nan=0.0, posinf=0.0, neginf=0.0)
        self._interior[affected] = self._inside_scanned(self._x[affected], self._y[affected])

    def _lattice_rotation(self, positions: np.ndarray, context: np.ndarray, local: np.ndarray) -> np.ndarray:
        """Rotation of each node's local lattice from the mean orientation around it, degrees.

        The reference is the circular mean of ``exp(4i theta)`` over the nodes of the cells of one
        spacing within three cells of the node's, summed with an integral image so the cost is
        linear in the context. The difference is wrapped to (-45, 45].
        """
        cell = self.lattice_spacing_nm
        orientation = self._orientation[context]
        ix = np.floor(positions[:, 0] / cell).astype(np.int64)
        iy = np.floor(positions[:, 1] / cell).astype(np.int64)
        reach = _ORIENTATION_CELLS
        x0, y0 = ix.min() - reach, iy.min() - reach
        width, height = ix.max() - x0 + reach + 2, iy.max() - y0 + reach + 2
        flat = (iy - y0 + 1) * width + (ix - x0 + 1)  # row and column 0 of the integral stay zero
        summed = []
        for component in orientation.T:
            grid = np.bincount(flat, weights=component, minlength=width * height).reshape(height, width)
            summed.append(grid.cumsum(axis=0).cumsum(axis=1))
        gx, gy = ix[local] - x0 + 1, iy[local] - y0 + 1
        low_x, high_x, low_y, high_y = gx - reach - 1, gx + reach, gy - reach - 1, gy + reach
        reference = [
            s[high_y, high_x] - s[low_y, high_x] - s[high_y, low_x] + s[low_y, low_x] for s in summed
        ]
        own = orientation[local]
        # Angle of own * conj(reference): the rotation of 4 theta, then back to theta.
        rotation = np.arctan2(
            own[:, 1] * reference[0] - own[:, 0] * reference[1],
            own[:, 0] * reference[0] + own[:, 1] * reference[1],
        )
        defined = ((own != 0).any(axis=1)) & ((reference[0] != 0) | (reference[1] != 0))
        return np.where(defined, np.degrees(rotation) / 4, 0.0)

    def _regional_intensity(
        self, positions: np.ndarray, species: np.ndarray, scattering: np.ndarray, local: np.ndarray
    ) -> np.ndarray:
        """Intensity over the median of same-species cell medians in the surrounding 5 x 5 cells, minus 1.

        A median of cell medians ignores a cluster covering a few cells, so a uniformly
        substituted cluster stands out against the lattice around it.
        """
        cell = self.config.region_cell_nm
        ix = np.floor(positions[:, 0] / cell).astype(np.int64)
        iy = np.floor(positions[:, 1] / cell).astype(np.int64)
        result = np.zeros(local.size)
        for code in (SPECIES_A, SPECIES_B):
            members = np.flatnonzero(species == code)
            targets = np.flatnonzero(species[local] == code)
            if members.size == 0 or targets.size == 0:
                continue
            x0, y0 = ix[members].min() - _REGION_CELLS, iy[members].min() - _REGION_CELLS
            width = ix[members].max() - x0 + _REGION_CELLS + 1
            height = iy[members].max() - y0 + _REGION_CELLS + 1
            flat = (iy[members] - y0) * width + (ix[members] - x0)
            order = np.lexsort((scattering[members], flat))
            flat_sorted, values = flat[order], scattering[members][order]
            cells, start, count = np.unique(flat_sorted, return_index=True, return_counts=True)
            medians = np.full(width * height, np.nan)
            medians[cells] = 0.5 * (values[start + (count - 1) // 2] + values[start + count // 2])
            grid = medians.reshape(height, width)
            node = local[targets]
            gy, gx = iy[node] - y0, ix[node] - x0
            offsets = np.arange(-_REGION_CELLS, _REGION_CELLS + 1)
            block = grid[
                (gy[:, None, None] + offsets[None, :, None]), (gx[:, None, None] + offsets[None, None, :])
            ]
            reference = np.nanmedian(block.reshape(targets.size, -1), axis=1)
            own = scattering[node]
            result[targets] = np.where(
                reference > 0, own / np.where(reference > 0, reference, 1.0) - 1.0, 0.0
            )
        return result

    def _inside_scanned(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """True where probes 1.5 spacings around a point all fall inside some scanned tile."""
        reach = 1.5 * self.lattice_spacing_nm
        inset = 0.2 * self.lattice_spacing_nm
        extents = np.asarray(self.tile_extents)
        inside = np.ones(x.size, dtype=bool)
        for dx, dy in ((reach, 0), (-reach, 0), (0, reach), (0, -reach),
                       (reach, reach), (reach, -reach), (-reach, reach), (-reach, -reach)):  # fmt: skip
            px, py = (x + dx)[:, None], (y + dy)[:, None]
            covered = (
                (px >= extents[None, :, 0] + inset) & (px <= extents[None, :, 1] - inset)
                & (py >= extents[None, :, 2] + inset) & (py <= extents[None, :, 3] - inset)
            )  # fmt: skip
            inside &= covered.any(axis=1)
        return inside

    # ------------------------------------------------------------------ export and statistics

    def edges(self, nodes: np.ndarray | None = None) -> np.ndarray:
        """Undirected kNN edges as a ``(2, E)`` array of node ids, each pair once in each direction.

        Parameters
        ----------
        nodes : numpy.ndarray, optional
            Restrict to edges whose both ends are among these ids.

        Returns
        -------
        numpy.ndarray
            int64 ``(2, E)``, sorted by source then target.
        """
        ids = np.arange(self._size) if nodes is None else np.asarray(nodes, dtype=np.int64)
        neighbours = self._neighbours[ids]
        source = np.repeat(ids, neighbours.shape[1])
        target = neighbours.ravel()
        keep = target >= 0
        if nodes is not None:
            keep &= np.isin(target, ids)
        source, target = source[keep], target[keep]
        # One int64 key per directed pair: a 1-D unique sorts 2-5x faster than unique(axis=0) on
        # pairs, in the same order (source, then target).
        size = max(self._size, 1)
        key = np.unique(np.r_[source * size + target, target * size + source])
        return np.stack([key // size, key % size]).astype(np.int64, copy=False)

    def edge_attributes(self, edge_index: np.ndarray) -> np.ndarray:
        """``(E, 6)`` attributes of edges (see :data:`EDGE_FEATURES`)."""
        source, target = edge_index
        dx = self._x[target] - self._x[source]
        dy = self._y[target] - self._y[source]
        length = np.hypot(dx, dy)
        safe = np.where(length > 0, length, 1.0)
        pair = self._species[source].astype(np.int64) + self._species[target].astype(np.int64)
        return np.stack([length * 1e3, dx / safe, dy / safe, pair == 0, pair == 1, pair == 2], axis=1).astype(
            np.float32
        )

    def to_pyg(self, nodes: np.ndarray | None = None, device: str | Any = "cpu") -> Any:
        """Export the graph (or the subgraph of ``nodes``) as a PyTorch Geometric ``Data``.

        Parameters
        ----------
        nodes : numpy.ndarray, optional
            Node ids to keep; the subgraph's nodes are renumbered in this order (sorted).
        device : str or torch.device
            Where the tensors go.

        Returns
        -------
        torch_geometric.data.Data
            ``x`` (features, float32), ``edge_index``, ``edge_attr``, ``pos`` (nm), ``species``,
            ``interior`` and ``node_id`` (ids in this graph).
        """
        import torch
        from torch_geometric.data import Data

        ids = np.arange(self._size) if nodes is None else np.unique(np.asarray(nodes, dtype=np.int64))
        edge_index = self.edges(ids if nodes is not None else None)
        attributes = self.edge_attributes(edge_index)
        local_index = np.searchsorted(ids, edge_index)
        return Data(
            x=torch.from_numpy(self._features[ids].copy()),
            edge_index=torch.from_numpy(local_index),
            edge_attr=torch.from_numpy(attributes),
            pos=torch.from_numpy(np.stack([self._x[ids], self._y[ids]], 1).astype(np.float32)),
            species=torch.from_numpy(self._species[ids].astype(np.int64)),
            interior=torch.from_numpy(self._interior[ids].copy()),
            node_id=torch.from_numpy(ids),
        ).to(device)


# ----------------------------------------------------------------------------- statistics


def b_site_displacement(
    positions_nm: np.ndarray,
    species: np.ndarray,
    lattice_spacing_nm: float,
    *,
    a_tree: tuple[np.ndarray, cKDTree | None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Polarization proxy: shift of each B column from the centre of its four nearest A columns.

    Parameters
    ----------
    positions_nm : numpy.ndarray
        ``(N, 2)`` column positions ``(x, y)``, nanometres.
    species : numpy.ndarray
        ``(N,)`` :data:`~agent.columns.SPECIES_A` or :data:`~agent.columns.SPECIES_B`.
    lattice_spacing_nm : float
        A-A spacing, nanometres; the four A neighbours must lie within 0.95 of it (a B column
        next to a vacancy, a scan edge or a dislocation core has no proper cell).
    a_tree : tuple, optional
        ``(indices of the A columns, cKDTree of their positions)`` when the caller has built it.

    Returns
    -------
    displacement : numpy.ndarray
        ``(N, 2)`` shift ``(dx, dy)`` in nanometres; zero for A columns and B columns without a cell.
    valid : numpy.ndarray
        ``(N,)`` True for B columns with a complete cell of four A neighbours.
    """
    count = positions_nm.shape[0]
    displacement = np.zeros((count, 2))
    valid = np.zeros(count, dtype=bool)
    b_columns = np.flatnonzero(species == SPECIES_B)
    if a_tree is None:
        members = np.flatnonzero(species == SPECIES_A)
        a_tree = (members, cKDTree(positions_nm[members]) if members.size else None)
    members, tree = a_tree
    if b_columns.size == 0 or tree is None or members.size < 4:
        return displacement, valid
    distance, index = tree.query(positions_nm[b_columns], k=4, workers=-1)
    ok = np.all(distance < 0.95 * lattice_spacing_nm, axis=1)
    centre = positions_nm[members[index]].mean(axis=1)
    displacement[b_columns[ok]] = positions_nm[b_columns[ok]] - centre[ok]
    valid[b_columns[ok]] = True
    return displacement, valid


def nn_distances_by_pair(graph: MoleculeGraph, interior_only: bool = True) -> dict[str, np.ndarray]:
    """Nearest-neighbour (kNN edge) distances per species pair, the write-up's lattice statistic.

    Parameters
    ----------
    graph : MoleculeGraph
        The graph.
    interior_only : bool
        Use only edges between interior nodes (scan edges distort the statistics).

    Returns
    -------
    dict
        ``{"A-A": ..., "A-B": ..., "B-B": ...}`` distances in picometres, each edge once.
    """
    edge_index = graph.edges()
    source, target = edge_index
    once = source < target
    source, target = source[once], target[once]
    if interior_only:
        keep = graph.interior[source] & graph.interior[target]
        source, target = source[keep], target[keep]
    distance = (
        np.hypot(graph.x_nm[target] - graph.x_nm[source], graph.y_nm[target] - graph.y_nm[source]) * 1e3
    )
    pair = graph.species[source].astype(int) + graph.species[target].astype(int)
    return {name: distance[pair == code] for code, name in enumerate(("A-A", "A-B", "B-B"))}


def species_counts(graph: MoleculeGraph) -> dict[str, int]:
    """Number of A and B nodes in the graph."""
    return {
        "A": int(np.count_nonzero(graph.species == SPECIES_A)),
        "B": int(np.count_nonzero(graph.species == SPECIES_B)),
    }


def nn_distances_by_species(
    graph: MoleculeGraph, neighbours: int = 4, interior_only: bool = True
) -> dict[str, np.ndarray]:
    """Distances from each column to its nearest columns of each species, per species pair.

    Unlike :func:`nn_distances_by_pair` (kNN edges, where the four nearest columns of any
    column are almost always of the other species) this resolves every pair's own first
    shell: A-A and B-B near the lattice spacing, A-B near spacing / sqrt(2), split by the
    polarization into a short and a long pair.

    Parameters
    ----------
    graph : MoleculeGraph
        The graph.
    neighbours : int
        Nearest columns of the other species taken per column (4 in the perovskite projection).
    interior_only : bool
        Measure only from interior columns (scan edges would add long distances).

    Returns
    -------
    dict
        ``{"A-A": ..., "A-B": ..., "B-B": ...}`` distances in picometres; same-species pairs
        appear once from each end.
    """
    positions = np.stack([graph.x_nm, graph.y_nm], 1)
    origin = graph.interior if interior_only else np.ones(len(graph), dtype=bool)
    result: dict[str, np.ndarray] = {}
    for name, source, target in (("A-A", SPECIES_A, SPECIES_A), ("A-B", SPECIES_A, SPECIES_B),
                                 ("B-B", SPECIES_B, SPECIES_B)):  # fmt: skip
        start = np.flatnonzero((graph.species == source) & origin)
        members = np.flatnonzero(graph.species == target)
        skip = 1 if source == target else 0  # a column is its own nearest same-species column
        take = min(neighbours + skip, members.size)
        if start.size == 0 or take <= skip:
            result[name] = np.zeros(0)
            continue
        distance, _ = cKDTree(positions[members]).query(positions[start], k=take, workers=-1)
        result[name] = np.atleast_2d(distance)[:, skip:].ravel() * 1e3
    return result
