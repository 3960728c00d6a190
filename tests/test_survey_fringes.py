"""The survey's lattice-fringe analysis and the guided policy's survey prior."""

from __future__ import annotations

import numpy as np
import pytest

from agent.driver import InstrumentDescription
from agent.policy import PolicyConfig, PolicyError, make_policy, survey_interest
from agent.survey import SURVEY_FEATURES, CandidateGrid, lattice_fringes, survey_features, survey_request
from simulator.config import SimulatorConfig
from simulator.drivers import SimulatedMicroscope
from simulator.specimen import generate_specimen
from tests.conftest import specimen_with


def lattice_with_dislocation(size: int = 192, core: tuple[float, float] = (120.0, 70.0)) -> np.ndarray:
    """Two crossed fringe systems, 4.5 px apart, with one edge dislocation at ``core`` (row, col)."""
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float64)
    # Edge dislocation: the displacement along x winds by one period around the core.
    winding = np.arctan2(rows - core[0], cols - core[1]) / (2 * np.pi)
    period = 4.5
    return 3.0 + np.cos(2 * np.pi * (cols / period + winding)) + np.cos(2 * np.pi * rows / period)


def test_a_perfect_lattice_has_no_distortion_and_full_strength() -> None:
    rows, cols = np.mgrid[0:128, 0:128]
    lattice = 2 + np.cos(2 * np.pi * 0.3 * cols) + np.cos(2 * np.pi * 0.3 * rows)
    fringes = lattice_fringes(lattice)
    assert fringes is not None
    # The fringe vectors are refined off the Fourier grid (0.3 is not a multiple of 1/128).
    np.testing.assert_allclose(np.sort(np.abs(fringes.fringe_vectors).max(axis=1)), [0.3, 0.3], atol=1e-4)
    inner = (slice(12, -12), slice(12, -12))
    assert fringes.distortion[inner].max() < 0.02
    np.testing.assert_allclose(fringes.strength[inner], 1.0, atol=0.05)


def test_a_dislocation_is_the_most_distorted_place() -> None:
    fringes = lattice_with_dislocation()
    found = lattice_fringes(fringes, sigma_px=3.0)
    assert found is not None
    row, col = np.unravel_index(int(np.argmax(found.distortion)), found.distortion.shape)
    assert abs(row - 120) <= 3 and abs(col - 70) <= 3
    far = found.distortion[20:60, 120:170]
    assert found.distortion.max() > 10 * np.median(far)


def test_fading_fringes_lose_strength() -> None:
    rows, cols = np.mgrid[0:160, 0:160].astype(np.float64)
    fade = np.where(np.hypot(rows - 80, cols - 40) < 10, 0.1, 1.0)
    image = 3 + fade * (np.cos(2 * np.pi * cols / 3.7) + np.cos(2 * np.pi * rows / 3.7))
    found = lattice_fringes(image, sigma_px=3.0)
    assert found is not None
    assert found.strength[80, 40] < 0.4
    assert found.strength[80, 120] > 0.9


def test_the_border_does_not_read_as_distorted_or_faded() -> None:
    rng = np.random.default_rng(3)
    rows, cols = np.mgrid[0:200, 0:200].astype(np.float64)
    lattice = 3 + np.cos(2 * np.pi * cols / 3.7) + np.cos(2 * np.pi * rows / 3.7)
    found = lattice_fringes(rng.poisson(2.0 * lattice).astype(float), sigma_px=4.0)
    assert found is not None
    border = np.ones(found.strength.shape, dtype=bool)
    border[24:-24, 24:-24] = False
    # Counting noise alone: the border is no more distorted or faded than the inside.
    assert found.distortion[border].max() <= 1.05 * found.distortion[~border].max()
    assert found.strength[border].min() >= 0.95 * found.strength[~border].min()


def test_no_fringes_in_noise_or_tiny_images() -> None:
    rng = np.random.default_rng(0)
    assert lattice_fringes(rng.poisson(5.0, (128, 128)).astype(float)) is None
    assert lattice_fringes(np.ones((16, 16))) is None
    assert lattice_fringes(np.ones(64)) is None


@pytest.fixture(scope="module")
def moire_survey() -> tuple[CandidateGrid, list, np.ndarray, InstrumentDescription]:
    """A real simulated survey at 0.25 nm/px (moiré fringes) of a specimen with two dislocations."""
    specimen_config = specimen_with(
        size_nm=(40.0, 40.0), dislocations=2, thickness_gradient=0.0, edge_margin_nm=8.0
    )
    # Survey features are compared with the planted cores in stage coordinates: an ideal stage.
    config = SimulatorConfig(seed=5, specimen=specimen_config).ideal_instrument()
    specimen = generate_specimen(config.specimen, config.seed)
    cores = np.array([f.center_nm for f in specimen.features if f.kind == "dislocation_core"])
    with SimulatedMicroscope(config, specimen) as microscope:
        description = microscope.describe()
        grid = CandidateGrid.tiling(description, (250, 250), 0.02)
        requests = survey_request(description, 0.25, 4.0, (4096, 4096))
        survey = [microscope.acquire(request) for request in requests]
    return grid, survey, cores, description


def test_survey_features_point_at_the_dislocations(moire_survey: tuple) -> None:
    grid, survey, cores, _ = moire_survey
    features = survey_features(survey, grid)
    assert features.shape == (len(grid), len(SURVEY_FEATURES))
    distortion = features[:, SURVEY_FEATURES.index("fringe_distortion")]
    top = set(np.argsort(-distortion)[:4].tolist())
    # Each core lies in (or on the edge of) one of the few most distorted candidates.
    for x_nm, y_nm in cores:
        near = {
            index
            for index, (x_min, x_max, y_min, y_max) in enumerate(grid.extents)
            if x_min - 0.5 <= x_nm <= x_max + 0.5 and y_min - 0.5 <= y_nm <= y_max + 0.5
        }
        assert near & top, f"no top-distortion candidate near the core at ({x_nm:.1f}, {y_nm:.1f}) nm"


def test_guided_policy_with_survey_prior_goes_to_the_dislocations_first(moire_survey: tuple) -> None:
    grid, survey, _, stem = moire_survey
    features = survey_features(survey, grid)
    with_prior = make_policy(
        "guided", grid, stem, PolicyConfig(name="guided", survey_prior=1.0), survey_features=features
    )
    without = make_policy("guided", grid, stem, PolicyConfig(name="guided"), survey_features=features)
    interest = survey_interest(features)
    first = with_prior.suggest(1)[0]
    assert grid.match(first) == int(np.argmax(interest))
    assert without.survey_prior is None  # type: ignore[attr-defined]
    # The prior is standardised interest, highest where the fringes are most distorted.
    assert abs(float(interest.mean())) < 1e-9 and abs(float(interest.std()) - 1.0) < 1e-9


def test_survey_interest_needs_the_fringe_columns() -> None:
    with pytest.raises(PolicyError, match="needs the 6 columns"):
        survey_interest(np.zeros((10, 4)))
    np.testing.assert_array_equal(survey_interest(np.zeros((5, 6))), np.zeros(5))
