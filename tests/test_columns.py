from __future__ import annotations

import numpy as np
import pytest

from agent.columns import (
    SPECIES_A,
    SPECIES_B,
    ColumnFinderConfig,
    Columns,
    detect_peaks,
    estimate_lattice_spacing,
    find_columns,
    find_columns_in_image,
)
from agent.columns_torch import detect_peaks_torch
from agent.driver import ScanRequest, Tile
from agent.errors import InvalidImageError
from analysis.ground_truth import match_columns, score_columns
from simulator.config import SimulatorConfig
from simulator.drivers import SimulatedMicroscope
from simulator.specimen import LABEL_CODE, Specimen
from tests.conftest import IDEAL_IMAGING

PIXEL_NM = 0.02
BORDER_NM = 0.15 * 0.396 + PIXEL_NM


@pytest.fixture(scope="module")
def ideal_microscope(small_config: SimulatorConfig, small_specimen: Specimen) -> SimulatedMicroscope:
    noisy_ideal = IDEAL_IMAGING.model_copy(update={"poisson_noise": True, "detector_noise_counts": 0.5})
    ideal = small_config.ideal_instrument()  # found columns are compared with ground-truth positions
    return SimulatedMicroscope(ideal.model_copy(update={"imaging": noisy_ideal}), small_specimen)


def acquire(
    microscope: SimulatedMicroscope, x: float, y: float, size: int = 384, dwell: float = 64.0
) -> Tile:
    return microscope.acquire(
        ScanRequest(
            x_nm=x,
            y_nm=y,
            shape=(size, size),
            pixel_size_nm=PIXEL_NM,
            dwell_us=dwell,
            request_id=f"columns-{x:.2f}-{y:.2f}-{size}-{dwell:g}",
        )
    )


@pytest.fixture(scope="module")
def high_dose_tile(ideal_microscope: SimulatedMicroscope) -> Tile:
    return acquire(ideal_microscope, 11.0, 19.0)


def test_peaks_find_true_columns_sub_pixel(high_dose_tile: Tile, small_specimen: Specimen) -> None:
    columns = find_columns(high_dose_tile)
    score = score_columns(columns, small_specimen, high_dose_tile.extent_nm, inset_nm=BORDER_NM)
    assert score["true"] > 600
    assert score["recall"] >= 0.995
    assert score["precision"] >= 0.995
    assert score["rms_a_px"] < 0.08
    assert score["rms_b_px"] < 0.2
    assert score["species_accuracy"] >= 0.99
    # Stage and pixel positions agree through the tile's placement.
    x, y = high_dose_tile.pixel_to_stage(columns.row_px, columns.col_px)
    np.testing.assert_allclose(columns.x_nm, x)
    np.testing.assert_allclose(columns.y_nm, y)
    assert columns.lattice_spacing_nm == pytest.approx(0.396, rel=0.01)
    assert columns.reason == ""


def test_seed_pipeline_is_the_weaker_reference(high_dose_tile: Tile, small_specimen: Specimen) -> None:
    seed = find_columns(high_dose_tile, ColumnFinderConfig(method="seed"))
    peaks = find_columns(high_dose_tile)
    seed_score = score_columns(seed, small_specimen, high_dose_tile.extent_nm, inset_nm=BORDER_NM)
    peaks_score = score_columns(peaks, small_specimen, high_dose_tile.extent_nm, inset_nm=BORDER_NM)
    assert seed_score["recall"] > 0.9
    assert seed_score["rms_px"] > peaks_score["rms_px"]


def test_intensity_scales_with_the_electrons_per_pixel(ideal_microscope: SimulatedMicroscope) -> None:
    low = find_columns(acquire(ideal_microscope, 15.0, 8.0, dwell=32.0))
    high = find_columns(acquire(ideal_microscope, 15.0, 8.0, dwell=64.0))
    a_low = np.median(low.intensity[low.species == SPECIES_A])
    a_high = np.median(high.intensity[high.species == SPECIES_A])
    assert a_high / a_low == pytest.approx(2.0, rel=0.05)
    # Per incident electron the two doses agree.
    assert np.median(high.scattering[high.species == SPECIES_A]) == pytest.approx(
        np.median(low.scattering[low.species == SPECIES_A]), rel=0.03
    )


def test_lattice_spacing_is_estimated_from_the_image(high_dose_tile: Tile) -> None:
    assert estimate_lattice_spacing(high_dose_tile.image) == pytest.approx(0.396 / PIXEL_NM, rel=0.005)
    noise = np.random.default_rng(0).poisson(5.0, (256, 256)).astype(np.float32)
    assert estimate_lattice_spacing(noise) is None


def test_lattice_spacing_of_a_large_image_with_an_amorphous_centre() -> None:
    rows, cols = np.mgrid[:1100, :1100]
    image = 3 + np.cos(2 * np.pi * cols / 12.5) + np.cos(2 * np.pi * rows / 12.5)
    rng = np.random.default_rng(1)
    image[250:850, 250:850] = rng.poisson(3.0, (600, 600))
    assert estimate_lattice_spacing(image) == pytest.approx(12.5, rel=0.01)


@pytest.mark.parametrize("shape", [(96, 160), (160, 96), (96, 96)])
def test_small_and_non_square_tiles_find_their_columns(
    ideal_microscope: SimulatedMicroscope, small_specimen: Specimen, shape: tuple[int, int]
) -> None:
    # A 96 px side holds only about 7 A-A periods at 0.03 nm/px: the lattice rings fill much of
    # the searched band of the spectrum, which once hid the lattice from the spacing estimate.
    tile = ideal_microscope.acquire(
        ScanRequest(
            x_nm=11.0, y_nm=17.0, shape=shape, pixel_size_nm=0.03, dwell_us=16.0, request_id=f"small-{shape}"
        )
    )
    columns = find_columns(tile)
    assert columns.lattice_spacing_nm == pytest.approx(0.396, rel=0.02)
    score = score_columns(columns, small_specimen, tile.extent_nm, inset_nm=BORDER_NM)
    assert score["recall"] >= 0.95
    assert score["precision"] >= 0.95


def test_substituted_columns_are_flagged_abnormal(
    ideal_microscope: SimulatedMicroscope, small_specimen: Specimen
) -> None:
    cluster = next(f for f in small_specimen.features if f.kind == "substitution")
    x, y = cluster.center_nm
    x = min(max(x, 4.0), 26.0)
    y = min(max(y, 4.0), 26.0)
    tile = acquire(ideal_microscope, x, y, size=384, dwell=100.0)
    columns = find_columns(tile)
    true_xy = np.stack([small_specimen.x_nm, small_specimen.y_nm], 1)
    match = match_columns(np.stack([columns.x_nm, columns.y_nm], 1), true_xy, 0.1)
    # Sm-rich by composition: a wall or vacancy label can hide the substitution label.
    substituted = small_specimen.sm_fraction[match.truth] >= 0.4
    flagged = columns.abnormal[match.found]
    assert substituted.any()
    # Sm-rich columns are flagged, and few flags fall on other lattice columns (atoms of the
    # amorphous patch sit on no site and may be flagged: they are unusual).
    lattice = small_specimen.label[match.truth] != LABEL_CODE["amorphous"]
    assert flagged[substituted].mean() > 0.9
    assert flagged[~substituted & lattice].mean() < 0.01


def test_vacuum_and_featureless_tiles_give_no_columns_and_a_reason() -> None:
    vacuum = np.random.default_rng(1).poisson(2.0, (256, 256)).astype(np.float32)
    found = find_columns_in_image(vacuum, PIXEL_NM)
    assert len(found) == 0 and "no lattice periodicity" in found.reason
    flat = np.full((256, 256), 7.0, dtype=np.float32)
    found = find_columns_in_image(flat, PIXEL_NM, config=ColumnFinderConfig(lattice_spacing_nm=0.396))
    assert len(found) == 0 and "noise levels above the background" in found.reason


def test_nan_and_saturated_pixels_are_masked_with_a_warning(high_dose_tile: Tile) -> None:
    image = high_dose_tile.image.copy()
    image[100:102, 100:105] = np.nan
    with pytest.warns(RuntimeWarning, match=r"masked 10 NaN, infinite or saturated pixels"):
        columns = find_columns_in_image(image, PIXEL_NM, high_dose_tile.origin_nm)
    assert len(columns) > 600 and columns.masked_pixels == 10
    level = float(np.percentile(high_dose_tile.image, 99.9))
    with pytest.warns(RuntimeWarning, match="saturated"):
        find_columns_in_image(
            high_dose_tile.image, PIXEL_NM, config=ColumnFinderConfig(saturation_level=level)
        )
    all_nan = np.full((64, 64), np.nan, dtype=np.float32)
    assert "every pixel" in find_columns_in_image(all_nan, PIXEL_NM).reason


def test_tile_smaller_than_three_spacings_is_rejected(high_dose_tile: Tile) -> None:
    small = high_dose_tile.image[:40, :40]
    with pytest.raises(InvalidImageError, match=r"40x40 px tile spans fewer than three lattice spacings"):
        find_columns_in_image(small, PIXEL_NM, config=ColumnFinderConfig(lattice_spacing_nm=0.396))


def test_unresolved_pixel_size_gives_a_reason(high_dose_tile: Tile) -> None:
    columns = find_columns_in_image(
        high_dose_tile.image, 0.2, config=ColumnFinderConfig(lattice_spacing_nm=0.396)
    )
    assert len(columns) == 0 and "not resolved" in columns.reason


def test_torch_path_agrees_with_numpy(high_dose_tile: Tile) -> None:
    spacing = 0.396 / PIXEL_NM
    numpy_fit = detect_peaks(high_dose_tile.image, spacing)
    torch_fit = detect_peaks_torch(high_dose_tile.image, spacing, device="cpu")
    assert torch_fit.row.size == numpy_fit.row.size
    order_numpy = np.lexsort((numpy_fit.col, numpy_fit.row))
    order_torch = np.lexsort((torch_fit.col, torch_fit.row))
    np.testing.assert_allclose(torch_fit.row[order_torch], numpy_fit.row[order_numpy], atol=1e-3)
    np.testing.assert_allclose(torch_fit.col[order_torch], numpy_fit.col[order_numpy], atol=1e-3)
    np.testing.assert_allclose(torch_fit.height[order_torch], numpy_fit.height[order_numpy], rtol=1e-3)
    np.testing.assert_allclose(torch_fit.width[order_torch], numpy_fit.width[order_numpy], rtol=1e-3)


def test_cuda_request_without_cuda_is_a_clear_error(high_dose_tile: Tile) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(InvalidImageError, match="no CUDA device"):
        find_columns(high_dose_tile, ColumnFinderConfig(device="cuda"))


def test_columns_table_selects_and_counts(high_dose_tile: Tile) -> None:
    columns = find_columns(high_dose_tile)
    b_only = columns.select(columns.species == SPECIES_B)
    assert len(b_only) == columns.species_counts()["B"]
    assert np.all(b_only.species == SPECIES_B)
    assert b_only.pixel_size_nm == columns.pixel_size_nm
    empty = Columns.empty("nothing here")
    assert len(empty) == 0 and empty.reason == "nothing here"
    assert set(columns.species_counts()) == {
        "A",
        "B",
        "O",
        "A_abnormal",
        "B_abnormal",
        "A_vacancy",
        "B_vacancy",
    }
    assert abs(columns.species_counts()["A"] - columns.species_counts()["B"]) < 0.1 * len(columns)


def _tile_at(specimen, config, origin_nm: tuple[float, float], size_px: int = 256, pixel_nm: float = 0.02):  # type: ignore[no-untyped-def]
    """A noisy simulated tile whose pixel (0, 0) is centred at ``origin_nm``, and its extent."""
    from agent.driver import electrons_per_pixel
    from simulator.imaging import add_detector_noise, render_expected_counts

    per_pixel = electrons_per_pixel(config.instrument.beam_current_pa, 4.0)
    expected = render_expected_counts(
        specimen, origin_nm, (size_px, size_px), pixel_nm, per_pixel, config.imaging
    )
    image = add_detector_noise(expected, config.imaging, np.random.default_rng(0))
    x0, y0 = origin_nm[0] - 0.5 * pixel_nm, origin_nm[1] - 0.5 * pixel_nm
    return image, (x0, x0 + size_px * pixel_nm, y0, y0 + size_px * pixel_nm)


def test_the_lattice_extent_cuts_the_vacuum_past_the_specimen_edge_and_nothing_else(
    small_config, small_specimen
) -> None:  # type: ignore[no-untyped-def]
    from agent.columns import lattice_extent

    width, height = small_specimen.size_nm
    spacing = small_specimen.config.lattice_nm

    def found(origin: tuple[float, float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
        image, extent = _tile_at(small_specimen, small_config, origin)
        columns = find_columns_in_image(image.astype(np.float32), 0.02)
        # Column positions are from the image's corner: move them onto the stage.
        return lattice_extent(columns.x_nm + extent[0], columns.y_nm + extent[2], extent, spacing), extent

    # A tile that runs 2 nm past the right edge and 1.5 nm past the bottom edge of the film.
    lattice, extent = found((width - 3.1, height - 3.6))
    assert lattice[0] == extent[0] and lattice[2] == extent[2]
    assert abs(lattice[1] - width) < 0.6 and abs(lattice[3] - height) < 0.6
    # Inside the film, vacancy clusters and substitutions included, the tile keeps its extent.
    for cluster in (f for f in small_specimen.features if f.kind in ("vacancy", "substitution")):
        cx, cy = cluster.center_nm
        origin = (min(max(cx - 2.56, 0.5), width - 5.7), min(max(cy - 2.56, 0.5), height - 5.7))
        lattice, extent = found(origin)
        assert lattice == extent, cluster.kind
