from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree

from simulator.config import SpecimenConfig
from simulator.specimen import (
    LABEL_CODE,
    LABELS,
    SITE_A,
    SITE_B,
    SITE_CONTAMINANT,
    SITE_O,
    Specimen,
    generate_specimen,
)
from tests.conftest import specimen_with


def test_default_specimen_is_large_and_deterministic() -> None:
    first = generate_specimen(seed=5)
    second = generate_specimen(seed=5)
    assert first.size_nm == (160.0, 160.0)
    cations = np.isin(first.site, (SITE_A, SITE_B))
    assert 250_000 < np.count_nonzero(cations) < 400_000
    # Two pure-O columns per cell, at the cell edges.
    assert np.count_nonzero(first.site == SITE_O) == pytest.approx(np.count_nonzero(cations), rel=0.02)
    np.testing.assert_array_equal(first.x_nm, second.x_nm)
    np.testing.assert_array_equal(first.label, second.label)
    other = generate_specimen(seed=6)
    assert len(other) != len(first) or not np.array_equal(other.x_nm, first.x_nm)


def test_every_feature_kind_is_planted_with_labels(small_specimen: Specimen) -> None:
    kinds = {feature.kind for feature in small_specimen.features}
    assert kinds == set(LABELS) - {"normal"}
    counts = small_specimen.label_counts()
    for name in LABELS:
        assert counts[name] > 0, name
    # Every labelled column points at a feature of its own kind (or a core for 'strained').
    labelled = np.flatnonzero(small_specimen.label != LABEL_CODE["normal"])
    for column in labelled[::50]:
        feature = small_specimen.features[small_specimen.feature_id[column]]
        label = LABELS[small_specimen.label[column]]
        assert feature.kind == label or (label == "strained" and feature.kind == "dislocation_core")


def test_columns_in_matches_a_brute_force_search(small_specimen: Specimen) -> None:
    box = (7.3, 12.9, 20.1, 24.4)
    found = small_specimen.columns_in(*box)
    x, y = small_specimen.x_nm, small_specimen.y_nm
    expected = np.flatnonzero((x >= box[0]) & (x <= box[1]) & (y >= box[2]) & (y <= box[3]))
    np.testing.assert_array_equal(found, expected)
    assert small_specimen.columns_in(-10, -5, -10, -5).size == 0


def test_vacancies_are_missing_columns(small_specimen: Specimen) -> None:
    vacancies = small_specimen.vacancies
    assert vacancies["x_nm"].size >= 3
    cations = np.isin(small_specimen.site, (SITE_A, SITE_B))
    tree = cKDTree(np.stack([small_specimen.x_nm[cations], small_specimen.y_nm[cations]], 1))
    distance, _ = tree.query(np.stack([vacancies["x_nm"], vacancies["y_nm"]], 1))
    # The nearest remaining cation is a neighbour (A-B distance a/sqrt 2), never one on the site.
    assert distance.min() > 0.5 * small_specimen.config.lattice_nm
    # Vacancies are cation sites; the pure-O columns are never removed.
    assert np.all(np.isin(vacancies["site"], (SITE_A, SITE_B)))


def test_substituted_columns_are_sm_rich_and_dimmer(small_specimen: Specimen) -> None:
    a_sites = small_specimen.site == SITE_A
    substituted = a_sites & (small_specimen.label == LABEL_CODE["substitution"])
    matrix = a_sites & (small_specimen.label == LABEL_CODE["normal"])
    assert small_specimen.sm_fraction[substituted].mean() == pytest.approx(0.6, abs=0.05)
    assert small_specimen.sm_fraction[matrix].mean() == pytest.approx(0.10, abs=0.01)
    # Sm (Z=62) scatters (62/83)^1.7 = 0.61 as strongly as Bi; thickness varies slowly.
    thickness = small_specimen.thickness_factor(small_specimen.x_nm, small_specimen.y_nm)
    relative = small_specimen.weight / thickness
    assert relative[substituted].mean() < relative[matrix].mean() - 0.1
    b_sites = small_specimen.site == SITE_B
    assert relative[b_sites].max() < 0.2 < relative[matrix].min()


def test_b_columns_follow_the_domain_polarization() -> None:
    config = specimen_with(size_nm=(20.0, 20.0), domain_walls=1, thickness_gradient=0.0)
    specimen = generate_specimen(config, seed=2)
    cells = specimen.unit_cells()
    wall = specimen.features[0]
    normal = np.array(wall.params["normal"])
    flips = np.array(wall.params["flips"][:2])
    # Signed distance of each cell from the wall's straight line (meander < 1.5 nm).
    side = (cells.center_nm - np.array(wall.center_nm)[:, None]).T @ normal
    far_negative, far_positive = side < -3.0, side > 3.0
    shift_negative = cells.displacement_nm[:, far_negative].mean(axis=1)
    shift_positive = cells.displacement_nm[:, far_positive].mean(axis=1)
    # In a fully polar domain each in-plane component is +-0.025/sqrt 2 nm.
    np.testing.assert_allclose(np.abs(shift_negative), 0.025 / np.sqrt(2), rtol=0.05)
    np.testing.assert_allclose(shift_positive, shift_negative * flips, rtol=0.05)


def test_dislocation_core_changes_coordination(small_specimen: Specimen) -> None:
    lattice = small_specimen.config.lattice_nm
    a_sites = np.flatnonzero(small_specimen.site == SITE_A)
    tree = cKDTree(np.stack([small_specimen.x_nm[a_sites], small_specimen.y_nm[a_sites]], 1))

    def coordination(points: list[int]) -> list[int]:
        return [len(tree.query_ball_point(tree.data[i], 1.25 * lattice)) - 1 for i in points]

    for feature in small_specimen.features:
        if feature.kind == "dislocation_core":
            near = tree.query_ball_point(feature.center_nm, 2 * lattice)
            assert any(c != 4 for c in coordination(near)), "no coordination change at the core"
    # Away from every feature and the specimen edge, each A column has four A neighbours.
    x, y = small_specimen.x_nm[a_sites], small_specimen.y_nm[a_sites]
    interior = (x > 1) & (x < 29) & (y > 1) & (y < 29)
    matrix = np.flatnonzero(interior & (small_specimen.label[a_sites] == LABEL_CODE["normal"]))
    assert np.mean(np.array(coordination(list(matrix[::7]))) == 4) > 0.99


def test_amorphous_patch_holds_contaminants_not_lattice(small_specimen: Specimen) -> None:
    contaminants = small_specimen.site == SITE_CONTAMINANT
    assert contaminants.sum() > 50
    assert np.all(small_specimen.label[contaminants] == LABEL_CODE["amorphous"])
    assert np.all(small_specimen.cell_ij[contaminants] == -1)


def test_unit_cells_are_square_in_the_matrix(small_specimen: Specimen) -> None:
    cells = small_specimen.unit_cells()
    assert len(cells.a_nm) > 0.8 * (small_specimen.site == SITE_B).sum()
    assert np.median(cells.a_nm) == pytest.approx(small_specimen.config.lattice_nm, rel=0.01)
    assert np.median(cells.alpha_deg) == pytest.approx(90.0, abs=0.2)


def test_invalid_specimen_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="at least four lattice spacings"):
        SpecimenConfig(size_nm=(1.0, 1.0))
    with pytest.raises(ValueError, match="vacancies_per_cluster"):
        SpecimenConfig(vacancies_per_cluster=(5, 2))
