from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import curve_fit

from simulator.config import ImagingConfig
from simulator.imaging import (
    add_detector_noise,
    column_signal,
    frame_time_s,
    render_expected_counts,
    render_tile_image,
)
from simulator.specimen import LABEL_CODE, SITE_A, SITE_B, Specimen
from tests.conftest import IDEAL_IMAGING

PIXEL_NM = 0.02
ORIGIN = (5.01, 6.013)  # deliberately off the lattice so columns fall between pixels
SHAPE = (300, 320)


def gaussian_2d(
    coords: tuple[np.ndarray, np.ndarray],
    height: float,
    row0: float,
    col0: float,
    sigma: float,
    offset: float,
) -> np.ndarray:
    rows, cols = coords
    return offset + height * np.exp(-((rows - row0) ** 2 + (cols - col0) ** 2) / (2 * sigma**2))


def fit_peak(image: np.ndarray, row: float, col: float, half: int = 5) -> tuple[float, float, float]:
    r0, c0 = round(row), round(col)
    window = image[r0 - half : r0 + half + 1, c0 - half : c0 + half + 1]
    rows, cols = np.mgrid[r0 - half : r0 + half + 1, c0 - half : c0 + half + 1]
    start = (window.max() - window.min(), row, col, 1.5, window.min())
    params, _ = curve_fit(gaussian_2d, (rows.ravel(), cols.ravel()), window.ravel(), p0=start)
    return params[1], params[2], params[0]


@pytest.fixture(scope="module")
def ideal_tile(small_specimen: Specimen) -> np.ndarray:
    return render_expected_counts(small_specimen, ORIGIN, SHAPE, PIXEL_NM, 1000.0, IDEAL_IMAGING)


def columns_in_tile(specimen: Specimen, margin_px: float = 8) -> np.ndarray:
    x0, y0 = ORIGIN
    margin = margin_px * PIXEL_NM
    return specimen.columns_in(
        x0 + margin,
        x0 + (SHAPE[1] - 1) * PIXEL_NM - margin,
        y0 + margin,
        y0 + (SHAPE[0] - 1) * PIXEL_NM - margin,
    )


def test_column_peaks_sit_on_ground_truth_positions(small_specimen: Specimen, ideal_tile: np.ndarray) -> None:
    inside = columns_in_tile(small_specimen)
    # Columns at the amorphous patch's rim share their pixels with contaminant atoms: not isolated.
    lattice = inside[
        np.isin(small_specimen.site[inside], [SITE_A, SITE_B])
        & (small_specimen.label[inside] != LABEL_CODE["amorphous"])
    ]
    assert lattice.size > 100
    errors = []
    for column in lattice[:: max(lattice.size // 60, 1)]:
        true_row = (small_specimen.y_nm[column] - ORIGIN[1]) / PIXEL_NM
        true_col = (small_specimen.x_nm[column] - ORIGIN[0]) / PIXEL_NM
        row, col, _ = fit_peak(ideal_tile, true_row, true_col)
        errors.append(np.hypot(row - true_row, col - true_col))
    # Sub-pixel: the fitted centre of every column is within 0.05 px of the truth.
    assert max(errors) < 0.05


def test_a_columns_brighter_than_b_and_sm_dimmer_than_bi(
    small_specimen: Specimen, ideal_tile: np.ndarray
) -> None:
    inside = columns_in_tile(small_specimen)
    inside = inside[small_specimen.label[inside] != LABEL_CODE["amorphous"]]
    heights = {}
    for column in inside:
        row = (small_specimen.y_nm[column] - ORIGIN[1]) / PIXEL_NM
        col = (small_specimen.x_nm[column] - ORIGIN[0]) / PIXEL_NM
        lattice = small_specimen.site[column] in (SITE_A, SITE_B)
        heights[column] = fit_peak(ideal_tile, row, col)[2] if lattice else 0.0
    a_heights = [h for c, h in heights.items() if small_specimen.site[c] == SITE_A]
    b_heights = [h for c, h in heights.items() if small_specimen.site[c] == SITE_B]
    assert min(a_heights) > 3 * max(b_heights)
    # Within the A columns, peak height falls with the Sm fraction (Z 62 vs 83).
    a_columns = [c for c in heights if small_specimen.site[c] == SITE_A]
    sm = small_specimen.sm_fraction[a_columns]
    height = np.array([heights[c] for c in a_columns])
    assert np.corrcoef(sm, height)[0, 1] < -0.5


def test_substitution_cluster_columns_image_dimmer(small_specimen: Specimen) -> None:
    substituted = np.flatnonzero(
        (small_specimen.label == LABEL_CODE["substitution"]) & (small_specimen.site == SITE_A)
    )
    column = substituted[0]
    x, y = small_specimen.x_nm[column], small_specimen.y_nm[column]
    origin = (x - 1.0, y - 1.0)
    image = render_expected_counts(small_specimen, origin, (101, 101), PIXEL_NM, 1000.0, IDEAL_IMAGING)
    near = small_specimen.columns_in(x - 0.8, x + 0.8, y - 0.8, y + 0.8)
    bi_rich = [c for c in near if small_specimen.site[c] == SITE_A and small_specimen.sm_fraction[c] < 0.2]
    heights = {}
    for c in [column, *bi_rich]:
        heights[c] = fit_peak(
            image,
            (small_specimen.y_nm[c] - origin[1]) / PIXEL_NM,
            (small_specimen.x_nm[c] - origin[0]) / PIXEL_NM,
        )[2]
    if bi_rich:
        assert heights[column] < 0.9 * np.mean([heights[c] for c in bi_rich])


def test_noise_variance_follows_poisson_statistics(small_specimen: Specimen) -> None:
    imaging = ImagingConfig(detector_noise_counts=0.0).without_scan_errors()
    rng = np.random.default_rng(0)
    relative_noise = []
    for electrons in (100.0, 400.0, 1600.0):
        expected = render_expected_counts(small_specimen, ORIGIN, SHAPE, PIXEL_NM, electrons, imaging)
        noisy = add_detector_noise(expected, imaging, rng)
        residual = noisy - expected
        # Poisson: variance equals the mean, pixel by pixel.
        assert residual.var() == pytest.approx(expected.mean(), rel=0.03)
        assert abs(residual.mean()) < 0.01 * expected.mean()
        relative_noise.append(residual.std() / expected.mean())
    # Four times the dose halves the relative noise.
    assert relative_noise[0] / relative_noise[1] == pytest.approx(2.0, rel=0.05)
    assert relative_noise[1] / relative_noise[2] == pytest.approx(2.0, rel=0.05)


def test_read_noise_adds_to_counting_noise(small_specimen: Specimen) -> None:
    imaging = ImagingConfig(detector_noise_counts=3.0).without_scan_errors()
    expected = render_expected_counts(small_specimen, ORIGIN, SHAPE, PIXEL_NM, 200.0, imaging)
    noisy = add_detector_noise(expected, imaging, np.random.default_rng(1))
    assert (noisy - expected).var() == pytest.approx(expected.mean() + 9.0, rel=0.04)


def test_same_seed_gives_identical_tiles(small_specimen: Specimen) -> None:
    imaging = ImagingConfig()
    tiles = [
        render_tile_image(
            small_specimen, ORIGIN, (128, 128), PIXEL_NM, 2.0, 250.0, imaging, np.random.default_rng(seed)
        )
        for seed in (7, 7, 8)
    ]
    np.testing.assert_array_equal(tiles[0], tiles[1])
    assert not np.array_equal(tiles[0], tiles[2])
    assert tiles[0].dtype == np.float32


def test_survey_pixels_average_the_same_signal(small_specimen: Specimen) -> None:
    # A 10 x 10 nm area at 0.02 nm/px and at 0.5 nm/px carries the same mean signal per pixel.
    fine = render_expected_counts(small_specimen, (10.01, 10.01), (500, 500), 0.02, 100.0, IDEAL_IMAGING)
    coarse = render_expected_counts(small_specimen, (10.25, 10.25), (20, 20), 0.5, 100.0, IDEAL_IMAGING)
    assert coarse.mean() == pytest.approx(fine.mean(), rel=0.01)
    # Block averages of the fine image reproduce the coarse pixels.
    blocks = fine.reshape(20, 25, 20, 25).mean(axis=(1, 3))
    np.testing.assert_allclose(coarse, blocks, rtol=0.02)


def test_drift_and_jitter_move_the_lattice(small_specimen: Specimen) -> None:
    drifting = IDEAL_IMAGING.model_copy(update={"drift_nm_per_s": (0.0, 20.0), "flyback_us": 0.0})
    rng = np.random.default_rng(0)
    shape = (200, 200)
    still = render_expected_counts(small_specimen, ORIGIN, shape, PIXEL_NM, 100.0, IDEAL_IMAGING)
    moved = render_tile_image(small_specimen, ORIGIN, shape, PIXEL_NM, 10.0, 100.0, drifting, rng)
    # After 150 lines of 2 ms, drift of 20 nm/s has moved the specimen by 6 nm along y ...
    assert frame_time_s(shape, 10.0, drifting) == pytest.approx(0.4)
    assert not np.allclose(moved[150:], still[150:], rtol=0.05)
    # ... while the first line is where it should be.
    np.testing.assert_allclose(moved[0], still[0], rtol=1e-4, atol=1e-3)


def test_column_signal_places_a_single_column() -> None:
    image = column_signal(np.array([10.25]), np.array([7.5]), np.array([2.0]), (20, 30), 1.2)
    rows, cols = np.mgrid[:20, :30]
    centroid = ((image * rows).sum() / image.sum(), (image * cols).sum() / image.sum())
    assert centroid == pytest.approx((7.5, 10.25), abs=1e-3)
    # Pixel-averaged blob keeps its integral: height x 2 pi sigma^2.
    assert image.sum() == pytest.approx(2.0 * 2 * np.pi * 1.2**2, rel=1e-4)
