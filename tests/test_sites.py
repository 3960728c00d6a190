"""Lattice sites, species, abnormal columns and vacancy sites (agent.lattice, agent.materials).

Images come from three independent sources: the simulator (now with pure-O columns), the
multislice fixtures rendered offline with abTEM, and pixel-integrated Gaussian blobs from
the benchmark's own generator.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from agent.columns import (
    SPECIES_A,
    SPECIES_B,
    SPECIES_O,
    ColumnFinderConfig,
    check_pixel_size,
    estimate_pixel_size,
    find_columns_in_image,
    vacancy_probability,
)
from agent.config import validate_config
from agent.errors import ConfigError, InvalidImageError
from agent.graph import MoleculeGraph
from agent.lattice import fit_lattice
from agent.materials import Material, material_named
from analysis.bench_columns import MULTISLICE_FIXTURES, perovskite_blob_image
from analysis.ground_truth import SiteTruth, score_sites, site_figures, specimen_site_truth
from simulator.config import SimulatorConfig
from simulator.imaging import render_rotated_tile_image
from simulator.multislice import load_fixture
from simulator.specimen import Specimen, generate_specimen
from tests.conftest import SMALL_SPECIMEN

PIXEL_NM = 0.02
SPACING_PX = 0.396 / PIXEL_NM
BORDER_PX = 0.15 * SPACING_PX + 1


@pytest.fixture(scope="module")
def specimen() -> Specimen:
    return generate_specimen(SMALL_SPECIMEN, 3)


def _tile(
    specimen: Specimen, centre: tuple[float, float], rotation_deg: float, dwell_us: float, seed: int = 0
) -> np.ndarray:
    config = SimulatorConfig(seed=3, specimen=SMALL_SPECIMEN).ideal_instrument()
    electrons = config.instrument.beam_current_pa * 1e-12 * dwell_us * 1e-6 / 1.602176634e-19
    return render_rotated_tile_image(
        specimen,
        centre,
        (256, 256),
        PIXEL_NM,
        math.radians(rotation_deg),
        dwell_us,
        electrons,
        config.imaging,
        np.random.default_rng(seed),
    )


def _figures(specimen: Specimen, centre: tuple[float, float], rotation_deg: float, dwell_us: float) -> dict:
    image = _tile(specimen, centre, rotation_deg, dwell_us)
    columns = find_columns_in_image(image, PIXEL_NM)
    truth = specimen_site_truth(specimen, centre, image.shape, PIXEL_NM, math.radians(rotation_deg))
    counts = score_sites(columns, truth, SPACING_PX, BORDER_PX, image.shape)
    return {**site_figures(counts), **counts}


def _cluster(specimen: Specimen, kind: str) -> tuple[float, float]:
    feature = next(f for f in specimen.features if f.kind == kind)
    return tuple(min(max(v, 4.0), 26.0) for v in feature.center_nm)  # type: ignore[return-value]


# ----------------------------------------------------------------------------- three populations


def test_o_columns_are_drawn_and_never_labelled_b(specimen: Specimen) -> None:
    # At high dose the faint pure-O columns are found: they are O, and every B column is B.
    figures = _figures(specimen, (15.0, 15.0), 0.0, 100.0)
    assert figures["o_true"] > 200 and figures["o_found"] > 20
    assert figures["o_as_b"] == 0
    assert figures["species_accuracy_a"] >= 0.995 and figures["species_accuracy_b"] >= 0.995
    assert figures["recall_b"] >= 0.995


@pytest.mark.parametrize("rotation_deg", [0.0, 30.0, 90.0, 137.0])
def test_sites_hold_at_any_scan_rotation(specimen: Specimen, rotation_deg: float) -> None:
    figures = _figures(specimen, _cluster(specimen, "vacancy"), rotation_deg, 32.0)
    assert figures["species_accuracy_a"] >= 0.995 and figures["species_accuracy_b"] >= 0.995
    assert figures["o_as_b"] == 0
    assert figures["a_vacant"] + figures["b_vacant"] >= 3
    found = figures["a_vacant_found"] + figures["b_vacant_found"]
    assert found >= 0.9 * (figures["a_vacant"] + figures["b_vacant"])
    assert figures["false_vacancy_rate"] <= 0.005


def test_dim_b_columns_at_low_dose_are_found_at_their_sites(specimen: Specimen) -> None:
    # At 2 us most B columns are below the peak threshold; the site test finds them.
    image = _tile(specimen, (15.0, 15.0), 0.0, 2.0)
    strict = find_columns_in_image(image, PIXEL_NM, config=ColumnFinderConfig(vacancy_prior=0.49))
    default = find_columns_in_image(image, PIXEL_NM)
    truth = specimen_site_truth(specimen, (15.0, 15.0), image.shape, PIXEL_NM)
    recall = site_figures(score_sites(default, truth, SPACING_PX, BORDER_PX, image.shape))["recall_b"]
    assert recall >= 0.98
    assert default.species_counts()["B"] >= strict.species_counts()["B"]


# ----------------------------------------------------------------------------- abnormal and vacancies


def test_sm_substituted_a_columns_are_flagged(specimen: Specimen) -> None:
    figures = _figures(specimen, _cluster(specimen, "substitution"), 30.0, 32.0)
    assert figures["substituted"] >= 10
    assert figures["substituted_flagged"] >= 0.95
    assert figures["normal_a_flagged"] <= 0.01


def test_abnormal_columns_on_both_sublattices() -> None:
    image, truth = perovskite_blob_image(3, cells=12, noise=0.01)
    # Only the crystal: the vacuum margin around the blobs is no part of a real tile.
    image = image[24:-24, 24:-24]
    truth = SiteTruth(truth.x_px - 24, truth.y_px - 24, truth.species, truth.sm_fraction, truth.vacant)
    rows, cols = np.indices(image.shape)
    a_index = int(np.flatnonzero(truth.species == SPECIES_A)[52])
    b_index = int(np.flatnonzero(truth.species == SPECIES_B)[64])
    # One A column 35 % dimmer (a substitution), one B column 60 % brighter (a heavy cation).
    for index, change in ((a_index, -0.35), (b_index, 0.6 * 0.3)):
        image = image + change * np.exp(
            -((cols - truth.x_px[index]) ** 2 + (rows - truth.y_px[index]) ** 2) / (2 * 2.2**2)
        )
    columns = find_columns_in_image(image, 0.396 / 16)
    flagged = np.flatnonzero(columns.abnormal)
    positions = np.stack([columns.col_px[flagged], columns.row_px[flagged]], 1)
    for index, code in ((a_index, SPECIES_A), (b_index, SPECIES_B)):
        distance = np.hypot(*(positions - (truth.x_px[index], truth.y_px[index])).T)
        assert distance.min() < 1.0
        assert columns.species[flagged[np.argmin(distance)]] == code
    # The two altered columns, and at most 1 % of the ~290 others at 3.5 robust sigma.
    assert flagged.size <= 2 + 3
    assert columns.intensity_z[flagged].min() < -3.5 or columns.intensity_z[flagged].max() > 3.5


def test_vacancy_probability_weighs_the_noise_and_the_prior() -> None:
    typical = np.full(3, 10.0)
    clean = vacancy_probability(np.array([0.5, 6.0, 9.0]), typical, 1.0)
    assert clean[0] > 0.99 and clean[1] < 0.05 and clean[2] < 1e-6
    # At low signal the same heights are far less conclusive, and a rarer vacancy needs more.
    noisy = vacancy_probability(np.array([0.5]), np.array([3.0]), 1.0)
    assert 0.05 < noisy[0] < 0.95
    assert vacancy_probability(np.array([0.5]), np.array([3.0]), 1.0, prior=0.001)[0] < noisy[0]


def test_vacancy_sites_reach_the_graph(specimen: Specimen) -> None:
    centre = _cluster(specimen, "vacancy")
    image = _tile(specimen, centre, 0.0, 32.0)
    config = SimulatorConfig(seed=3, specimen=SMALL_SPECIMEN)
    origin = (centre[0] - 127.5 * PIXEL_NM, centre[1] - 127.5 * PIXEL_NM)
    columns = find_columns_in_image(image, PIXEL_NM, origin)
    confident = columns.vacancies.confidence >= 0.5
    assert confident.sum() >= 2
    graph = MoleculeGraph()
    graph.merge(columns, (origin[0], origin[0] + 255 * PIXEL_NM, origin[1], origin[1] + 255 * PIXEL_NM))
    assert len(graph.vacancy_sites) == len(columns.vacancies)
    seen = graph.feature("vacant_neighbour_sites")
    site = columns.vacancies.select(confident)
    distance = np.hypot(graph.x_nm[:, None] - site.x_nm[None, :], graph.y_nm[:, None] - site.y_nm[None, :])
    next_to_vacancy = distance.min(axis=1) < 0.8 * config.specimen.lattice_nm
    far = distance.min(axis=1) > 1.5 * config.specimen.lattice_nm
    assert np.all(seen[next_to_vacancy] >= 0.5)
    assert np.all(seen[far] == 0)


# ----------------------------------------------------------------------------- multislice


FIXTURES = sorted(MULTISLICE_FIXTURES.glob("*.npz"))


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_multislice_fixture_sites_and_species(path: Path) -> None:
    fixture = load_fixture(path)
    truth = SiteTruth(
        fixture.column_x_px,
        fixture.column_y_px,
        fixture.column_site,
        fixture.column_sm_fraction.astype(float),
        fixture.column_vacant,
    )
    spacing = 0.396 / fixture.pixel_size_nm
    for image in (fixture.image, fixture.noisy):
        if image is None:
            continue
        columns = find_columns_in_image(image, fixture.pixel_size_nm)
        counts = score_sites(columns, truth, spacing, 0.15 * spacing + 1, image.shape)
        figures = site_figures(counts)
        assert figures["recall_a"] == 1.0 and figures["recall_b"] == 1.0
        assert figures["species_accuracy_a"] == 1.0 and figures["species_accuracy_b"] == 1.0
        assert figures["o_as_b"] == 0
        assert counts["rms_a_px"] < 0.15
        if counts["a_vacant"] + counts["b_vacant"]:
            assert (
                counts["a_vacant_found"] + counts["b_vacant_found"] == counts["a_vacant"] + counts["b_vacant"]
            )
        assert counts["false_vacancies"] == 0


# ----------------------------------------------------------------------------- materials and pixel size


def test_a_non_polar_material_names_its_species() -> None:
    # SrTiO3: the B column (Ti + O) is about half as bright as Sr.
    image, truth = perovskite_blob_image(1, cells=10, b_amplitude=0.46)
    columns = find_columns_in_image(image, 0.3905 / 16, config=ColumnFinderConfig(material="SrTiO3-001"))
    assert columns.material == "SrTiO3-001"
    counts = score_sites(columns, truth, 16.0, 16.0, image.shape)
    assert site_figures(counts)["species_accuracy_b"] == 1.0
    strontium = material_named("srtio3-001")
    assert not strontium.polar and strontium.label("A") == "Sr" and strontium.label("B") == "Ti"


def test_material_descriptions_are_validated() -> None:
    with pytest.raises(ConfigError, match="unknown material 'LaMnO3'"):
        material_named("LaMnO3")
    bad = {
        "name": "two-a",
        "formula": "X",
        "a_nm": 0.4,
        "sites": [
            {"name": "A", "role": "A", "position": [0, 0], "atoms": {"Sr": 1}, "label": "Sr"},
            {"name": "A2", "role": "A", "position": [0.5, 0.5], "atoms": {"Ti": 1}, "label": "Ti"},
        ],
    }
    with pytest.raises(ConfigError, match="exactly one site must have role 'A'"):
        validate_config(bad, Material, "material")
    bad["sites"][1] = {"name": "B", "role": "B", "position": [0.5, 0.5], "atoms": {"Xx": 1}, "label": "?"}
    with pytest.raises(ConfigError, match=r"unknown element\(s\) \['Xx'\]"):
        validate_config(bad, Material, "material")
    with pytest.raises(ConfigError, match="polarization_site"):
        validate_config({**bad, "sites": [*bad["sites"][:1], bad["sites"][0] | {"name": "B", "role": "B"}],
                         "polar": True}, Material, "material")  # fmt: skip


def test_the_pixel_size_is_estimated_from_the_lattice(specimen: Specimen) -> None:
    image = _tile(specimen, (15.0, 15.0), 30.0, 32.0)
    assert estimate_pixel_size(image) == pytest.approx(PIXEL_NM, rel=0.01)
    strontium, _ = perovskite_blob_image(2, cells=14, b_amplitude=0.46)
    # The (1, 1) ring is the strongest of SrTiO3; the cell is still found at sqrt 2 x it.
    assert estimate_pixel_size(strontium, "SrTiO3-001") == pytest.approx(0.3905 / 16, rel=0.01)


@pytest.mark.parametrize(
    ("pixel_nm", "message"),
    [
        (0.2, r"spans 1.98 px, too few to resolve columns; is the pixel size in Angstrom rather than nm "
              r"\(then give 0.02\)\?"),
        (0.0002, r"more than a third of the 256x256 image; is the pixel size in pm or Angstrom"),
        (0.03, r"lattice spacing is 19.\d px = 0.59\d nm at 0.03 nm/px, but BiFeO3-001 has a = 0.396 nm "
               r"\(\+5\d %\); check the pixel size \(the lattice implies 0.019\d+ nm/px"),
        (0.0141, r"BiFeO3-001 has a = 0.396 nm \(-29 %\)"),
    ],
)  # fmt: skip
def test_a_wrong_pixel_size_is_a_clear_error(specimen: Specimen, pixel_nm: float, message: str) -> None:
    image = _tile(specimen, (15.0, 15.0), 0.0, 32.0)
    with pytest.raises(InvalidImageError, match=message):
        check_pixel_size(image, pixel_nm, source="tile")
    assert check_pixel_size(image, PIXEL_NM) == pytest.approx(SPACING_PX, rel=0.01)
    assert check_pixel_size(image, 1.15 * PIXEL_NM) == pytest.approx(SPACING_PX, rel=0.01)


def test_the_lattice_follows_the_scan_rotation(specimen: Specimen) -> None:
    for rotation in (0.0, 30.0, 137.0):
        image = _tile(specimen, (15.0, 15.0), rotation, 32.0)
        fit = fit_lattice(image.astype(np.float32), SPACING_PX, material_named("BiFeO3-001"))
        assert fit is not None
        assert fit.spacing_px == pytest.approx(SPACING_PX, rel=0.01)
        # The cell axis lies along the specimen's x axis, seen from the rotated frame (mod 90).
        assert (fit.rotation_deg + rotation) % 90 == pytest.approx(0, abs=1.0) or (
            (fit.rotation_deg + rotation) % 90 == pytest.approx(90, abs=1.0)
        )


def test_a_tile_of_another_material_says_so(specimen: Specimen) -> None:
    image = _tile(specimen, (15.0, 15.0), 0.0, 32.0)
    columns = find_columns_in_image(image, 0.03)
    assert len(columns) == 0
    assert "but BiFeO3-001 has 0.396 nm (+5" in columns.reason and "check the pixel size" in columns.reason
    assert SPECIES_O == 2


# ----------------------------------------------------------------------------- micrography analyze


@pytest.fixture(scope="module")
def strontium_npy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    image, _ = perovskite_blob_image(4, cells=14, b_amplitude=0.46, noise=0.02)
    path = tmp_path_factory.mktemp("sto") / "sto.npy"
    np.save(path, image.astype(np.float32))
    return path


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--pixel-size", "0.244"], r"spans 1.6\d px, too few to resolve columns; is the pixel size in Ang"),
        (["--pixel-size", "0.0002441"], r"more than a third of the 256x256 image; is the pixel size in pm"),
        (["--pixel-size", "0.035"], r"SrTiO3-001 has a = 0.3905 nm \(\+4\d %\); check the pixel size"),
        (["--pixel-size", "wide"], r"--pixel-size: expected a number of nm or 'auto', got 'wide'"),
        (["--pixel-size", "auto", "--material", "Perovskite"], r"unknown material 'Perovskite'; built in"),
    ],
)  # fmt: skip
def test_analyze_refuses_a_wrong_pixel_size_or_material_before_any_work(
    strontium_npy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], message: str
) -> None:
    from agent.cli import main

    out = tmp_path / "out"
    material = [] if "--material" in options else ["--material", "SrTiO3-001"]
    assert main(["analyze", str(strontium_npy), "--out", str(out), "--quiet", *material, *options]) == 1
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and "Traceback" not in error
    assert re.search(message, error), error
    assert not out.exists(), "nothing is written before the input is known to be good"


def test_analyze_of_a_non_polar_material_with_an_estimated_pixel_size(
    strontium_npy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent.cli import main

    out = tmp_path / "sto"
    arguments = ["analyze", str(strontium_npy), "--out", str(out), "--quiet", "--material", "SrTiO3-001"]
    assert main([*arguments, "--pixel-size", "auto", "--gae-steps", "5", "--vae-steps", "5"]) == 0
    printed = capsys.readouterr().out
    assert "SrTiO3-001 at 0.024" in printed and " Sr, " in printed and " Ti; " in printed
    summary = json.loads((out / "analysis.json").read_text())
    assert summary["material"]["labels"] == {"A": "Sr", "B": "Ti", "O": "O"}
    assert summary["image"]["pixel_size_nm"] == pytest.approx(0.3905 / 16, rel=0.01)
    assert summary["polarization"] == {
        "skipped": "SrTiO3-001 is not polar: no polarization or domains are reported"
    }
    page = (out / "report.html").read_text()
    assert "Polarization and domains</h2>" not in page and "is not polar" in page
    # 14 x 14 A columns, less those the border drops; no vacancies in a perfect crystal.
    assert 150 <= summary["columns"]["counts"]["A"] <= 196
    assert summary["columns"]["vacancy_sites"] == {"A": 0, "B": 0}
