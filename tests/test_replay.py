"""The replay microscope: tiles cut from a recorded image."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from agent.driver import ScanRequest
from agent.errors import (
    ConfigError,
    DriverClosedError,
    OutOfRangeError,
    OutsideStageError,
    ScanRequestError,
)
from simulator.dataset import RecordedImage, UnitCellParameters, load_image, write_dataset
from simulator.replay import ReplayMicroscope

PIXEL_NM = 0.05


def recorded(
    image: np.ndarray, pixel_size_nm: float | None = PIXEL_NM, attrs: dict | None = None
) -> RecordedImage:
    """A recording in counts at 10 us dwell, as the simulator's exports state it."""
    return RecordedImage(
        image=image.astype(np.float32),
        pixel_size_nm=pixel_size_nm,
        source=Path("frame.npy"),
        attrs={"dwell_us": 10.0, "units": "counts"} if attrs is None else attrs,
    )


def aligned_request(
    row0: int,
    col0: int,
    shape: tuple[int, int],
    pixel_nm: float = PIXEL_NM,
    dwell_us: float = 10.0,
    step: int = 1,
) -> ScanRequest:
    """Request whose pixel (0, 0) centre is the centre of the step x step block at (row0, col0)."""
    rows, cols = shape
    origin_x = (col0 + 0.5 * step) * PIXEL_NM
    origin_y = (row0 + 0.5 * step) * PIXEL_NM
    return ScanRequest(
        x_nm=origin_x + 0.5 * (cols - 1) * pixel_nm,
        y_nm=origin_y + 0.5 * (rows - 1) * pixel_nm,
        shape=shape,
        pixel_size_nm=pixel_nm,
        dwell_us=dwell_us,
    )


@pytest.fixture
def random_image() -> np.ndarray:
    return np.random.default_rng(0).random((64, 80)).astype(np.float32) * 1000


def test_describe_stage_limits_from_image(random_image):
    microscope = ReplayMicroscope(recorded(random_image), beam_current_pa=30.0)
    description = microscope.describe()
    assert description.stage_x_nm == pytest.approx((0.0, 80 * PIXEL_NM))
    assert description.stage_y_nm == pytest.approx((0.0, 64 * PIXEL_NM))
    assert description.pixel_size_nm == pytest.approx((PIXEL_NM, 64 * PIXEL_NM))
    assert description.detectors == ("HAADF",)
    assert description.beam_current_pa == 30.0


def test_aligned_request_returns_the_source_pixels(random_image):
    microscope = ReplayMicroscope(recorded(random_image))
    request = aligned_request(10, 7, (16, 20))
    tile = microscope.acquire(request)
    assert np.array_equal(tile.image, random_image[10:26, 7:27])
    assert tile.image.dtype == np.float32
    assert tile.origin_nm == pytest.approx(((7 + 0.5) * PIXEL_NM, (10 + 0.5) * PIXEL_NM))
    assert tile.metadata["resampled"] is False
    assert tile.metadata["source"] == "frame.npy"
    assert tile.metadata["recorded_pixel_size_nm"] == PIXEL_NM
    assert tile.dose_e_per_a2 == pytest.approx(microscope.describe().dose_of(request))
    # The tile is a copy: editing it must not change what later requests see.
    tile.image[:] = -1
    again = microscope.acquire(aligned_request(10, 7, (16, 20)))
    assert np.array_equal(again.image, random_image[10:26, 7:27])


def test_whole_image_is_one_aligned_tile(random_image):
    microscope = ReplayMicroscope(recorded(random_image))
    tile = microscope.acquire(aligned_request(0, 0, (64, 80)))
    assert np.array_equal(tile.image, random_image)


def test_coarser_pixels_match_block_mean_of_smooth_image():
    rows, cols = np.mgrid[0:128, 0:128]
    smooth = 500 + 200 * np.sin(2 * np.pi * rows / 50) * np.cos(2 * np.pi * cols / 64)
    microscope = ReplayMicroscope(recorded(smooth))
    tile = microscope.acquire(aligned_request(8, 16, (40, 48), pixel_nm=2 * PIXEL_NM, step=2))
    block = smooth[8 : 8 + 80, 16 : 16 + 96].reshape(40, 2, 48, 2).mean(axis=(1, 3))
    assert tile.metadata["resampled"] is True
    assert tile.pixel_size_nm == 2 * PIXEL_NM
    np.testing.assert_allclose(tile.image, block, atol=0.01 * 200)


def test_sub_pixel_shift_interpolates():
    ramp = np.tile(np.arange(40, dtype=np.float32) * 3.0, (30, 1))
    microscope = ReplayMicroscope(recorded(ramp))
    request = ScanRequest(
        x_nm=(10.25 + 0.5 + 4.5) * PIXEL_NM,
        y_nm=15 * PIXEL_NM,
        shape=(10, 10),
        pixel_size_nm=PIXEL_NM,
        dwell_us=10.0,
    )
    tile = microscope.acquire(request)
    assert tile.metadata["resampled"] is True
    np.testing.assert_allclose(tile.image[0], (10.25 + np.arange(10)) * 3.0, rtol=1e-5)


def test_request_outside_stage_exposes_nothing(random_image):
    microscope = ReplayMicroscope(recorded(random_image))
    outside = aligned_request(60, 70, (16, 16))
    with pytest.raises(OutsideStageError, match="outside the stage limits"):
        microscope.acquire(outside)
    with pytest.raises(OutOfRangeError, match="pixel size"):
        microscope.acquire(aligned_request(0, 0, (4, 4), pixel_nm=0.5 * PIXEL_NM))
    assert microscope.exposures == 0
    assert microscope.total_dose_e_per_a2 == 0.0


def test_lower_dwell_adds_poisson_noise_of_the_right_size():
    level, counts_per_unit, recorded_dwell, dwell = 100.0, 0.5, 10.0, 2.0
    flat = np.full((128, 160), level)
    microscope = ReplayMicroscope(
        recorded(flat), recorded_dwell_us=recorded_dwell, counts_per_unit=counts_per_unit, seed=3
    )
    tile = microscope.acquire(aligned_request(0, 0, (128, 160), dwell_us=dwell))
    expected_variance = level * (recorded_dwell / dwell) / counts_per_unit
    assert tile.metadata["shot_noise"] is True
    assert tile.image.mean() == pytest.approx(level, rel=0.02)
    assert tile.image.var() == pytest.approx(expected_variance, rel=0.1)
    # The detector counts whole electrons: image values are multiples of 1 / (cpu * ratio).
    counts = tile.image * counts_per_unit * dwell / recorded_dwell
    np.testing.assert_allclose(counts, np.round(counts), atol=1e-3)


def test_dwell_of_the_recording_returns_its_pixels(random_image):
    microscope = ReplayMicroscope(recorded(random_image), recorded_dwell_us=10.0)
    tile = microscope.acquire(aligned_request(0, 0, (8, 8), dwell_us=10.0))
    assert tile.metadata["shot_noise"] is False
    assert np.array_equal(tile.image, random_image[:8, :8])


def test_same_seed_same_tiles(random_image):
    def session(seed: int) -> list[np.ndarray]:
        microscope = ReplayMicroscope(recorded(random_image), seed=seed)
        return [
            microscope.acquire(aligned_request(4, 4, (16, 16), dwell_us=1.0)).image,
            microscope.acquire(aligned_request(4, 4, (16, 16), dwell_us=1.0)).image,
        ]

    first, second, other = session(7), session(7), session(8)
    for a, b in zip(first, second, strict=True):
        assert np.array_equal(a, b)
    assert not np.array_equal(first[0], first[1]), "each exposure draws new noise"
    assert not np.array_equal(first[0], other[0])


def test_virtual_clock_and_bookkeeping(random_image):
    microscope = ReplayMicroscope(recorded(random_image))
    first = microscope.acquire(aligned_request(0, 0, (16, 20), dwell_us=5.0))
    second = microscope.acquire(aligned_request(0, 0, (16, 20), dwell_us=5.0))
    # Epoch seconds in float64 resolve about 0.2 us.
    assert first.t_end - first.t_start == pytest.approx(16 * 20 * 5.0e-6, abs=1e-6)
    assert second.t_start >= first.t_end
    assert microscope.exposures == 2
    assert microscope.total_dose_e_per_a2 == pytest.approx(first.dose_e_per_a2 + second.dose_e_per_a2)


def test_retried_request_id_is_not_exposed_twice(random_image):
    microscope = ReplayMicroscope(recorded(random_image))
    request = aligned_request(0, 0, (8, 8), dwell_us=1.0)
    first = microscope.acquire(request)
    assert microscope.acquire(request) is first
    assert microscope.exposures == 1
    reused = aligned_request(8, 8, (8, 8)).model_copy(update={"request_id": request.request_id})
    with pytest.raises(ScanRequestError, match="already used for a different scan"):
        microscope.acquire(reused)


def test_missing_pixel_size_is_a_clear_error(tmp_path, random_image):
    with pytest.raises(ConfigError, match="pixel size of this image is unknown; pass pixel_size"):
        ReplayMicroscope(recorded(random_image, pixel_size_nm=None))
    path = tmp_path / "frame.npy"
    np.save(path, random_image)
    with pytest.raises(ConfigError, match="pass pixel_size_nm"):
        ReplayMicroscope.from_path(path)
    microscope = ReplayMicroscope.from_path(
        path, pixel_size_nm=0.1, recorded_dwell_us=10.0, counts_per_unit=1.0
    )
    assert microscope.describe().stage_x_nm == pytest.approx((0.0, 8.0))


def test_closed_driver_refuses(random_image):
    with ReplayMicroscope(recorded(random_image)) as microscope:
        pass
    with pytest.raises(DriverClosedError):
        microscope.acquire(aligned_request(0, 0, (4, 4)))


def test_ground_truth_cells_in_a_tile(tmp_path):
    image = np.random.default_rng(2).random((50, 60)).astype(np.float32)
    x = np.array([2.0, 10.0, 30.5, 55.0])
    y = np.array([3.0, 20.0, 40.0, 45.0])
    n = x.size
    cells = UnitCellParameters(
        ab=np.stack([np.arange(n), np.zeros(n, dtype=np.int64)]),
        x_px=x,
        y_px=y,
        pxy=np.zeros((2, n)),
        vol=np.ones(n),
        a=np.ones(n),
        alpha=np.full(n, 90.0),
        i1=np.ones(n),
        i5=np.ones(n),
    )
    files = write_dataset(
        tmp_path,
        image,
        cells,
        pixel_size_nm=0.04,
        composition_pct=13,
        index=0,
        extra_attrs={"dwell_us": 10.0},
    )
    microscope = ReplayMicroscope.from_path(files.haadf)
    assert microscope.pixel_size_nm == 0.04
    truth = microscope.ground_truth
    assert truth is not None and len(truth) == n
    tile = microscope.acquire(
        ScanRequest(x_nm=0.8, y_nm=0.8, shape=(40, 40), pixel_size_nm=0.04, dwell_us=10.0)
    )
    inside = microscope.uc_parameters_in(tile.extent_nm)
    assert inside is not None
    np.testing.assert_array_equal(inside.cells.ab[0], [0, 1])
    np.testing.assert_allclose(inside.x_nm, (x[:2] + 0.5) * 0.04)
    np.testing.assert_allclose(inside.y_nm, (y[:2] + 0.5) * 0.04)
    # The stage position maps back onto the tile pixel where the cell was recorded.
    row, col = tile.stage_to_pixel(inside.x_nm, inside.y_nm)
    np.testing.assert_allclose(row, y[:2])
    np.testing.assert_allclose(col, x[:2])


def test_replay_of_a_loaded_file_without_cells_has_no_ground_truth(tmp_path, random_image):
    path = tmp_path / "frame.npy"
    np.save(path, random_image)
    microscope = ReplayMicroscope(
        load_image(path, pixel_size_nm=PIXEL_NM), recorded_dwell_us=10.0, counts_per_unit=1.0
    )
    assert microscope.ground_truth is None
    assert microscope.uc_parameters_in((0.0, 1.0, 0.0, 1.0)) is None


def test_a_rotated_frame_is_the_aligned_frame_turned(tmp_path: Path) -> None:
    image = np.random.default_rng(0).random((200, 300)).astype(np.float32)
    np.save(tmp_path / "noise.npy", image)
    replay = ReplayMicroscope.from_path(
        tmp_path / "noise.npy", pixel_size_nm=0.1, recorded_dwell_us=10.0, counts_per_unit=1.0
    )
    centre = (15.0, 10.0)  # on recorded pixel edges: 60 x 60 px frames sit on recorded pixels
    aligned = replay.expose_frame(centre, (60, 60), 0.1, 0.0, dwell_us=20.0)
    crop = image[100 - 30 : 100 + 30, 150 - 30 : 150 + 30]
    np.testing.assert_array_equal(aligned, crop)
    # Turned by 90 degrees, the frame's columns run along stage +y: pixel (i, j) sees the
    # aligned frame's row j, column 59 - i.
    turned = replay.expose_frame(centre, (60, 60), 0.1, math.pi / 2, dwell_us=20.0)
    np.testing.assert_allclose(turned, aligned.T[::-1, :], atol=1e-5)
    # A shorter dwell than the recording's adds shot noise around the same signal.
    noisy = replay.expose_frame(centre, (60, 60), 0.1, 0.0, dwell_us=5.0)
    assert not np.array_equal(noisy, aligned) and abs(noisy.mean() - aligned.mean()) < 0.05


def test_recording_without_dose_is_refused_with_the_options_to_give(random_image):
    with pytest.raises(
        ConfigError, match=r"does not state its dose.*--replay-dwell US.*--replay-counts-per-unit"
    ):
        ReplayMicroscope(recorded(random_image, attrs={}))
    with pytest.raises(ConfigError, match=r"--replay-counts-per-unit") as refused:
        ReplayMicroscope(recorded(random_image, attrs={"dwell_us": 8.0}))
    assert "--replay-dwell" not in str(refused.value)
    with pytest.raises(ConfigError, match=r"counts per unit must be a positive number, got -1"):
        ReplayMicroscope(recorded(random_image, attrs={}), recorded_dwell_us=8.0, counts_per_unit=-1.0)


def test_recorded_dose_from_the_file_or_the_caller(random_image):
    stated = ReplayMicroscope(recorded(random_image, attrs={"dwell_us": 8.0, "counts_per_unit": 250.0}))
    tile = stated.acquire(aligned_request(0, 0, (8, 8), dwell_us=2.0))
    assert tile.metadata["recorded_dwell_us"] == 8.0 and tile.metadata["counts_per_unit"] == 250.0
    given = ReplayMicroscope(recorded(random_image, attrs={}), recorded_dwell_us=4.0, counts_per_unit=0.5)
    assert given.describe().dwell_us == (0.1, 4.0)


def test_dwell_longer_than_the_recording_is_refused_before_exposing(random_image):
    microscope = ReplayMicroscope(recorded(random_image))  # recorded at 10 us
    assert microscope.describe().dwell_us[1] == 10.0
    with pytest.raises(OutOfRangeError, match="dwell"):
        microscope.acquire(aligned_request(0, 0, (8, 8), dwell_us=12.0))
    assert microscope.exposures == 0
    tile = microscope.acquire(aligned_request(0, 0, (8, 8), dwell_us=10.0))
    # Dose reported is the dose of the dwell delivered, and equals the recorded one here.
    assert tile.dose_e_per_a2 == pytest.approx(microscope.describe().dose_of(tile.request))


def test_normalised_recording_keeps_its_grey_levels_at_low_dose():
    """A [0, 1] image at 1000 electrons per unit: a 5x lower dose stays a continuum, not 5 levels."""
    smooth = np.linspace(0.2, 0.8, 64 * 80, dtype=np.float32).reshape(64, 80)
    microscope = ReplayMicroscope(recorded(smooth, attrs={"dwell_us": 10.0}), counts_per_unit=1000.0)
    tile = microscope.acquire(aligned_request(0, 0, (32, 32), dwell_us=2.0))
    assert np.unique(tile.image).size > 50
    assert tile.image.mean() == pytest.approx(smooth[:32, :32].mean(), rel=0.02)
    # The same image taken for counts (one electron per unit) is what used to happen silently.
    as_counts = ReplayMicroscope(recorded(smooth, attrs={"dwell_us": 10.0}), counts_per_unit=1.0)
    assert np.unique(as_counts.acquire(aligned_request(0, 0, (32, 32), dwell_us=2.0)).image).size <= 6
