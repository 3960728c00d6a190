from __future__ import annotations

import numpy as np
import pytest
import torch

from agent.columns import SPECIES_A, SPECIES_B, SPECIES_O, Columns, find_columns
from agent.driver import ScanRequest, Tile
from agent.graph import (
    EDGE_FEATURES,
    NODE_FEATURES,
    GraphConfig,
    MoleculeGraph,
    nn_distances_by_pair,
    species_counts,
)
from analysis.ground_truth import match_columns
from simulator.config import SimulatorConfig
from simulator.drivers import SimulatedMicroscope
from simulator.specimen import LABEL_CODE, SITE_B, Specimen
from tests.conftest import IDEAL_IMAGING

PIXEL_NM = 0.02


@pytest.fixture(scope="module")
def microscope(small_config: SimulatorConfig, small_specimen: Specimen) -> SimulatedMicroscope:
    imaging = IDEAL_IMAGING.model_copy(update={"poisson_noise": True})
    ideal = small_config.ideal_instrument()  # merged columns are compared with ground-truth positions
    return SimulatedMicroscope(ideal.model_copy(update={"imaging": imaging}), small_specimen)


def scan(microscope: SimulatedMicroscope, x: float, y: float, size: int) -> Tile:
    return microscope.acquire(
        ScanRequest(
            x_nm=x,
            y_nm=y,
            shape=(size, size),
            pixel_size_nm=PIXEL_NM,
            dwell_us=64.0,
            request_id=f"graph-{x:.2f}-{y:.2f}-{size}",
        )
    )


@pytest.fixture(scope="module")
def single(microscope: SimulatedMicroscope) -> tuple[MoleculeGraph, Tile, Columns]:
    tile = scan(microscope, 15.0, 15.0, 400)
    columns = find_columns(tile)
    graph = MoleculeGraph()
    graph.merge(columns, tile.extent_nm)
    return graph, tile, columns


@pytest.fixture(scope="module")
def stitched(microscope: SimulatedMicroscope) -> MoleculeGraph:
    # Four 240 px tiles overlapping by 80 px cover the same 8 x 8 nm as the single 400 px tile.
    graph = MoleculeGraph()
    for dx in (-1.6, 1.6):
        for dy in (-1.6, 1.6):
            tile = scan(microscope, 15.0 + dx, 15.0 + dy, 240)
            graph.merge(find_columns(tile), tile.extent_nm)
    return graph


def test_knn_edges_join_a_and_b_columns(single: tuple[MoleculeGraph, Tile, Columns]) -> None:
    graph, _, columns = single
    # Every cation column is a node; the pure-O columns the finder reports are not.
    assert len(graph) == np.count_nonzero(columns.species != SPECIES_O)
    assert graph.neighbours.shape == (len(graph), 4)
    interior = graph.interior
    assert interior.sum() > 0.6 * len(graph)
    # In the [001] projection the four nearest are of the other species (defects aside).
    own = graph.species[interior][:, None]
    other = graph.species[graph.neighbours[interior]]
    assert np.mean(own != other) > 0.95
    distances = nn_distances_by_pair(graph)
    assert distances["A-B"].mean() == pytest.approx(396 / np.sqrt(2), rel=0.01)
    assert species_counts(graph)["A"] == pytest.approx(species_counts(graph)["B"], rel=0.15)


def test_node_features_measure_lattice_and_polarization(
    single: tuple[MoleculeGraph, Tile, Columns], small_specimen: Specimen
) -> None:
    graph, _, _ = single
    assert graph.features.shape == (len(graph), len(NODE_FEATURES))
    interior = graph.interior
    assert np.median(graph.feature("lattice_distance_pm")[interior]) == pytest.approx(396, rel=0.005)
    assert np.median(graph.feature("coordination_deviation")[interior]) == 0
    # B-column shift against the true shift of the same columns.
    b_nodes = np.flatnonzero(interior & (graph.species == SPECIES_B))
    true_xy = np.stack([small_specimen.x_nm, small_specimen.y_nm], 1)
    match = match_columns(np.stack([graph.x_nm[b_nodes], graph.y_nm[b_nodes]], 1), true_xy, 0.1)
    true_b = match.truth[small_specimen.site[match.truth] == SITE_B]
    found_b = b_nodes[match.found[small_specimen.site[match.truth] == SITE_B]]
    true_shift = small_specimen.polarization[true_b] * 25.0 / np.sqrt(2)  # pm per unit P component
    measured = np.stack(
        [graph.feature("polarization_x_pm")[found_b], graph.feature("polarization_y_pm")[found_b]], 1
    )
    clean = small_specimen.label[true_b] == LABEL_CODE["normal"]
    error = np.hypot(*(measured[clean] - true_shift[clean]).T)
    assert np.median(error) < 4.0  # pm


def test_vacancy_neighbours_lose_coordination(
    microscope: SimulatedMicroscope, small_specimen: Specimen
) -> None:
    vacancy = next(f for f in small_specimen.features if f.kind == "vacancy")
    x, y = (min(max(v, 4.0), 26.0) for v in vacancy.center_nm)
    tile = scan(microscope, x, y, 300)
    graph = MoleculeGraph()
    graph.merge(find_columns(tile), tile.extent_nm)
    true_xy = np.stack([small_specimen.x_nm, small_specimen.y_nm], 1)
    match = match_columns(np.stack([graph.x_nm, graph.y_nm], 1), true_xy, 0.1)
    near_vacancy = small_specimen.label[match.truth] == LABEL_CODE["vacancy"]
    deviation = graph.feature("coordination_deviation")[match.found]
    interior = graph.interior[match.found]
    assert np.mean(deviation[near_vacancy & interior] < 0) > 0.8
    normal = small_specimen.label[match.truth] == LABEL_CODE["normal"]
    assert np.mean(deviation[normal & interior] == 0) > 0.95


def test_four_overlapping_tiles_equal_one_tile(
    single: tuple[MoleculeGraph, Tile, Columns], stitched: MoleculeGraph
) -> None:
    graph, tile, _ = single
    # Overlap columns appear once: no two nodes closer than a third of the A-B distance.
    positions = np.stack([stitched.x_nm, stitched.y_nm], 1)
    from scipy.spatial import cKDTree

    assert not cKDTree(positions).query_pairs(0.1)
    assert stitched.observations.max() == 4
    # Compare the interior: same columns at the same places, same species and features.
    x_min, x_max, y_min, y_max = tile.extent_nm
    box = (x_min + 0.5, x_max - 0.5, y_min + 0.5, y_max - 0.5)
    one, four = graph.nodes_in(*box), stitched.nodes_in(*box)
    # Dim columns at the edge of detection may be found in one tiling and not the other.
    assert abs(one.size - four.size) <= max(2, 0.005 * one.size)
    match = match_columns(
        np.stack([stitched.x_nm[four], stitched.y_nm[four]], 1),
        np.stack([graph.x_nm[one], graph.y_nm[one]], 1),
        0.05,
    )
    assert match.found.size >= one.size - 2
    assert match.rms() < 0.005  # nm: 0.25 px
    assert np.mean(stitched.species[four[match.found]] == graph.species[one[match.truth]]) > 0.99
    both_interior = stitched.interior[four[match.found]] & graph.interior[one[match.truth]]
    index = NODE_FEATURES.index("lattice_distance_pm")
    difference = (
        stitched.features[four[match.found]][both_interior, index]
        - graph.features[one[match.truth]][both_interior, index]
    )
    assert np.median(np.abs(difference)) < 3.0  # pm


def test_merge_recomputes_only_near_the_tile(microscope: SimulatedMicroscope) -> None:
    graph = MoleculeGraph()
    first = scan(microscope, 8.0, 8.0, 240)
    graph.merge(find_columns(first), first.extent_nm)
    before = graph.features.copy()
    second = scan(microscope, 22.0, 22.0, 240)
    report = graph.merge(find_columns(second), second.extent_nm)
    assert report.matched == 0 and report.added > 200
    x_min, x_max, y_min, y_max = second.extent_nm
    margin = 2 * 0.396 + 1e-6
    xs, ys = graph.x_nm[report.updated_nodes], graph.y_nm[report.updated_nodes]
    assert np.all(
        (xs >= x_min - margin) & (xs <= x_max + margin) & (ys >= y_min - margin) & (ys <= y_max + margin)
    )
    np.testing.assert_array_equal(graph.features[: len(before)], before)


def test_scan_edges_are_not_interior(single: tuple[MoleculeGraph, Tile, Columns]) -> None:
    graph, tile, _ = single
    x_min, x_max, y_min, y_max = tile.extent_nm
    edge = np.minimum.reduce([graph.x_nm - x_min, x_max - graph.x_nm, graph.y_nm - y_min, y_max - graph.y_nm])
    assert not graph.interior[edge < 0.5].any()
    assert graph.interior[edge > 1.0].all()


def test_spatial_queries_match_brute_force(single: tuple[MoleculeGraph, Tile, Columns]) -> None:
    graph, _, _ = single
    box = (12.3, 14.1, 15.5, 17.9)
    expected = np.flatnonzero(
        (graph.x_nm >= box[0]) & (graph.x_nm <= box[1]) & (graph.y_nm >= box[2]) & (graph.y_nm <= box[3])
    )
    np.testing.assert_array_equal(graph.nodes_in(*box), expected)
    near = graph.nodes_near(15.0, 15.0, 0.5)
    expected = np.flatnonzero(np.hypot(graph.x_nm - 15.0, graph.y_nm - 15.0) <= 0.5)
    np.testing.assert_array_equal(near, expected)
    assert graph.nodes_in(100, 101, 100, 101).size == 0


def test_pyg_export(single: tuple[MoleculeGraph, Tile, Columns]) -> None:
    graph, _, _ = single
    data = graph.to_pyg(device="cpu")
    assert data.num_nodes == len(graph)
    assert data.x.shape == (len(graph), len(NODE_FEATURES)) and data.x.dtype == torch.float32
    assert data.edge_attr.shape == (data.edge_index.shape[1], len(EDGE_FEATURES))
    source, target = data.edge_index
    pairs = set(zip(source.tolist(), target.tolist(), strict=True))
    assert all((t, s) in pairs for s, t in list(pairs)[:500])  # undirected
    assert float(data.edge_attr[:, 0].median()) == pytest.approx(280, rel=0.02)  # pm: A-B neighbours
    subset = graph.nodes_near(15.0, 15.0, 1.0)
    sub = graph.to_pyg(subset)
    assert sub.num_nodes == subset.size
    assert int(sub.edge_index.max()) < subset.size
    np.testing.assert_array_equal(sub.node_id.numpy(), subset)


def test_empty_tile_records_the_scanned_area() -> None:
    graph = MoleculeGraph(GraphConfig(k_neighbours=6))
    report = graph.merge(Columns.empty("vacuum", tile_id="t1"), (0.0, 5.0, 0.0, 5.0))
    assert report.added == 0 and len(graph) == 0
    assert graph.tile_extents == [(0.0, 5.0, 0.0, 5.0)] and graph.tile_ids == ["t1"]
    assert graph.neighbours.shape == (0, 6)
    assert SPECIES_A == 0


def _lattice_columns(xy: np.ndarray, species: np.ndarray, spacing: float) -> Columns:
    count = len(xy)
    return Columns(
        x_nm=xy[:, 0], y_nm=xy[:, 1], row_px=xy[:, 1] / PIXEL_NM, col_px=xy[:, 0] / PIXEL_NM,
        intensity=np.where(species == SPECIES_A, 10.0, 2.0),
        scattering=np.where(species == SPECIES_A, 10.0, 2.0),
        peak_height=np.ones(count), background=np.zeros(count), width_px=np.full(count, 1.5),
        species=species, abnormal=np.zeros(count, dtype=bool), quality=np.ones(count),
        pixel_size_nm=PIXEL_NM, lattice_spacing_nm=spacing,
    )  # fmt: skip


def test_lattice_rotation_sees_a_rotated_grain_not_the_frame_rotation() -> None:
    # A frame rotated by 44 degrees puts the square lattice next to the 45-degree ambiguity: the
    # absolute orientation of neighbouring columns jumps between -45 and +45. A grain turned by a
    # further 6 degrees is the defect; only it may show in the feature.
    spacing, cells = 0.4, 40
    i, j = np.meshgrid(np.arange(cells), np.arange(cells), indexing="ij")
    a_xy = np.stack([i.ravel(), j.ravel()], 1) * spacing
    xy = np.concatenate([a_xy, a_xy + 0.5 * spacing])
    species = np.r_[np.full(len(a_xy), SPECIES_A), np.full(len(a_xy), SPECIES_B)].astype(np.int8)
    centre = np.full(2, 0.5 * cells * spacing)

    def rotate(points: np.ndarray, degrees: float) -> np.ndarray:
        c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
        return (points - centre) @ np.array([[c, s], [-s, c]]) + centre

    radius = np.hypot(*(xy - centre).T)
    grain = radius < 4.0
    xy = np.where(grain[:, None], rotate(xy, 50.0), rotate(xy, 44.0))
    graph = MoleculeGraph(GraphConfig(lattice_spacing_nm=spacing))
    half = 0.5 * cells * spacing * np.sqrt(2)
    extent = (centre[0] - half, centre[0] + half, centre[1] - half, centre[1] + half)
    graph.merge(_lattice_columns(xy, species, spacing), extent)
    rotation = graph.feature("lattice_rotation_deg")
    orientation = graph.lattice_orientation_deg
    node_radius = np.hypot(graph.x_nm - centre[0], graph.y_nm - centre[1])
    # The reference box reaches 2.3 nm (its corner, cells rounded): the matrix starts 2.5 nm beyond
    # the grain, the core 2.4 nm inside it.
    matrix = (node_radius > 6.5) & (node_radius < 8.0)
    # The rims start a spacing from the boundary, where a column's own four neighbours share its grain.
    inner_rim, outer_rim = (
        (node_radius > 3.0) & (node_radius < 3.5),
        (node_radius > 4.5) & (node_radius < 5.0),
    )
    core = node_radius < 1.6
    assert matrix.sum() > 300 and min(inner_rim.sum(), outer_rim.sum(), core.sum()) > 50
    # The frame's own orientation is found (modulo 90 degrees) ...
    matrix_4 = np.angle(np.exp(4j * np.radians(orientation[matrix])).mean()) / 4
    assert np.degrees(matrix_4) == pytest.approx(44.0, abs=0.01)
    assert np.nanmin(orientation) < -44 and np.nanmax(orientation) > 44  # the grain wraps to -40
    # ... but the feature is zero in the matrix and inside the grain (each is its own reference),
    # and on the rim the grain is turned forwards from the mixed reference, the matrix backwards.
    assert np.abs(rotation[matrix]).max() < 0.01
    assert np.abs(rotation[core]).max() < 0.01
    # (Columns on the boundary itself have mixed neighbours and odd orientations: a little slack.)
    assert np.all((rotation[inner_rim] > -0.5) & (rotation[inner_rim] < 6.5))
    assert np.all((rotation[outer_rim] < 0.5) & (rotation[outer_rim] > -6.5))
    assert np.median(rotation[inner_rim]) > 0.5 and np.median(rotation[outer_rim]) < -0.5


def test_columns_outside_a_cut_scanned_area_still_match_the_nodes_they_fall_on() -> None:
    # The scanned area of a tile is cut to the lattice it found (a film edge, a dim strip); the
    # columns beyond the cut are still columns seen before, not new nodes beside the old ones.
    spacing = 0.4
    i, j = np.meshgrid(np.arange(20), np.arange(20), indexing="ij")
    xy = np.stack([i.ravel() * spacing, j.ravel() * spacing], 1) + 0.2
    species = np.full(len(xy), SPECIES_A, dtype=np.int8)
    graph = MoleculeGraph(GraphConfig(lattice_spacing_nm=spacing))
    graph.merge(_lattice_columns(xy, species, spacing), (0.0, 8.0, 0.0, 8.0))
    again = _lattice_columns(xy + 0.01, species, spacing)
    report = graph.merge(again, (0.0, 5.0, 0.0, 8.0))  # the second tile's area cut at x = 5 nm
    assert report.added == 0 and report.matched == len(xy)
    assert len(graph) == len(xy)
