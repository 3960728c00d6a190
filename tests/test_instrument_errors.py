"""The simulated instrument's errors: placement, hysteresis, drift, flyback, and their ground truth."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.ndimage import maximum_filter
from scipy.spatial import cKDTree

from agent.driver import ScanRequest, Tile, electrons_per_pixel
from simulator.config import SimulatorConfig
from simulator.drivers import ExposureTruth, SimulatedMicroscope
from simulator.imaging import line_time_us, render_expected_counts
from simulator.specimen import SITE_A, Specimen

PIXEL_NM = 0.02
SHAPE = (64, 64)


def scan(
    x: float, y: float, request_id: str, shape: tuple[int, int] = SHAPE, dwell: float = 2.0
) -> ScanRequest:
    return ScanRequest(
        x_nm=x, y_nm=y, shape=shape, pixel_size_nm=PIXEL_NM, dwell_us=dwell, request_id=request_id
    )


def noise_free(config: SimulatorConfig) -> SimulatorConfig:
    imaging = config.imaging.model_copy(update={"poisson_noise": False, "detector_noise_counts": 0.0})
    return config.model_copy(update={"imaging": imaging})


def only(
    config: SimulatorConfig, imaging: dict[str, object] | None = None, **instrument: object
) -> SimulatorConfig:
    """The ideal instrument of ``config`` with just the given errors switched back on."""
    ideal = config.ideal_instrument()
    return ideal.model_copy(
        update={
            "imaging": ideal.imaging.model_copy(update=imaging or {}),
            "instrument": ideal.instrument.model_copy(update=instrument),
        }
    )


def assert_same_truth(first: ExposureTruth, second: ExposureTruth) -> None:
    assert first.placement_error_nm == second.placement_error_nm
    assert first.drift_offset_nm == second.drift_offset_nm
    assert first.offset_nm == second.offset_nm
    assert first.velocity_nm_per_s == second.velocity_nm_per_s
    np.testing.assert_array_equal(first.row_offset_nm, second.row_offset_nm)
    np.testing.assert_array_equal(first.col_offset_nm, second.col_offset_nm)


def test_defaults_are_a_realistic_instrument() -> None:
    config = SimulatorConfig()
    assert config.instrument.placement_sigma_nm == 2.0
    assert config.instrument.hysteresis_nm == 1.0
    assert config.imaging.drift_nm_per_s == (0.01, 0.006)
    assert config.imaging.drift_random_walk_nm_per_s_per_sqrt_s == 0.002
    assert config.imaging.settle_drift_nm_per_s == 0.05
    assert config.imaging.settle_drift_tau_s == 30.0
    assert config.imaging.flyback_settle_nm == 0.02
    assert config.imaging.flyback_settle_us == 30.0
    assert config.imaging.distortions
    assert not config.ideal_instrument().imaging.distortions


def test_a_moved_tile_lands_off_by_its_exposure_truth(
    small_config: SimulatorConfig, small_specimen: Specimen
) -> None:
    # Placement error only: the frame is an undistorted render at the true origin.
    config = noise_free(only(small_config, placement_sigma_nm=2.0, hysteresis_nm=1.0))
    with SimulatedMicroscope(config, small_specimen) as microscope:
        microscope.acquire(scan(10.0, 15.0, "before"))
        tile = microscope.acquire(scan(15.0, 15.0, "moved"))
        truth = microscope.exposure_truth("moved")
    assert tile.origin_nm == scan(15.0, 15.0, "moved").origin_nm  # it reports where it believes it is
    assert math.hypot(*truth.placement_error_nm) > 0.5
    assert truth.offset_nm == truth.placement_error_nm
    per_pixel = electrons_per_pixel(config.instrument.beam_current_pa, 2.0)
    true_origin = (tile.origin_nm[0] + truth.offset_nm[0], tile.origin_nm[1] + truth.offset_nm[1])
    at_truth = render_expected_counts(small_specimen, true_origin, SHAPE, PIXEL_NM, per_pixel, config.imaging)
    nominal = render_expected_counts(
        small_specimen, tile.origin_nm, SHAPE, PIXEL_NM, per_pixel, config.imaging
    )
    scale = float(at_truth.max())
    np.testing.assert_allclose(tile.image, at_truth, rtol=0, atol=1e-4 * scale)
    assert np.abs(tile.image - nominal).max() > 0.2 * scale


def test_true_positions_of_bright_pixels_are_columns(
    small_config: SimulatorConfig, small_specimen: Specimen
) -> None:
    # Every error on (defaults), noise off: the brightest pixels map onto A columns.
    config = noise_free(small_config)
    with SimulatedMicroscope(config, small_specimen) as microscope:
        microscope.acquire(scan(10.0, 15.0, "before", shape=(128, 128)))
        tile = microscope.acquire(scan(15.0, 15.0, "moved", shape=(128, 128)))
        peaks = (tile.image == maximum_filter(tile.image, size=9)) & (tile.image > 0.6 * tile.image.max())
        rows, cols = np.nonzero(peaks[5:-5, 5:-5])
        rows, cols = rows + 5, cols + 5
        x, y = microscope.true_position_nm("moved", rows, cols)
    assert rows.size >= 10
    a_columns = np.flatnonzero(small_specimen.site == SITE_A)
    tree = cKDTree(np.stack([small_specimen.x_nm[a_columns], small_specimen.y_nm[a_columns]], 1))
    true_distance, _ = tree.query(np.stack([x, y], 1))
    nominal_distance, _ = tree.query(np.stack(tile.pixel_to_stage(rows, cols), 1))
    # Within a pixel of a column (the peak pixel is up to half a pixel from the centre per axis).
    assert true_distance.max() < 0.75 * PIXEL_NM
    assert np.median(nominal_distance) > 3 * PIXEL_NM


def test_hysteresis_depends_on_the_direction_of_approach(
    small_config: SimulatorConfig, small_specimen: Specimen
) -> None:
    config = only(small_config, placement_sigma_nm=0.0, hysteresis_nm=1.0)
    errors = {}
    with SimulatedMicroscope(config, small_specimen) as microscope:
        for name, (x, y) in {
            "a": (10.0, 12.0),
            "from_left": (15.0, 15.0),
            "b": (20.0, 15.0),
            "from_right": (15.0, 15.0),
        }.items():
            microscope.acquire(scan(x, y, name))
            errors[name] = microscope.exposure_truth(name).placement_error_nm
    difference = np.subtract(errors["from_left"], errors["from_right"])
    assert difference[0] == pytest.approx(2 * config.instrument.hysteresis_nm)
    # The last move was along x only: y keeps the error of its last move (+y into from_left).
    assert errors["from_right"][1] == errors["from_left"][1] == pytest.approx(1.0)


def test_hysteresis_survives_a_random_placement_error_on_average(
    small_config: SimulatorConfig, small_specimen: Specimen
) -> None:
    config = only(small_config, placement_sigma_nm=2.0, hysteresis_nm=1.0)
    left, right = [], []
    with SimulatedMicroscope(config, small_specimen) as microscope:
        for index in range(200):
            microscope.acquire(scan(10.0, 15.0, f"l{index}", shape=(4, 4)))
            left.append(microscope.acquire(scan(15.0, 15.0, f"t{index}l", shape=(4, 4))))
            microscope.acquire(scan(20.0, 15.0, f"r{index}", shape=(4, 4)))
            right.append(microscope.acquire(scan(15.0, 15.0, f"t{index}r", shape=(4, 4))))
        from_left = [microscope.exposure_truth(t.request.request_id).placement_error_nm[0] for t in left]
        from_right = [microscope.exposure_truth(t.request.request_id).placement_error_nm[0] for t in right]
    # 200 pairs of sigma 2 nm: the mean difference is 2 nm +- 0.2 nm (1 sigma).
    assert np.mean(from_left) - np.mean(from_right) == pytest.approx(2.0, abs=0.7)
    assert np.std(from_left) == pytest.approx(2.0, rel=0.2)


def test_a_repeated_request_at_the_same_position_draws_no_new_error(
    small_config: SimulatorConfig, small_specimen: Specimen
) -> None:
    with SimulatedMicroscope(small_config, small_specimen) as microscope:
        first = microscope.acquire(scan(15.0, 15.0, "first"))
        again = microscope.acquire(scan(15.0, 15.0, "again"))
        truth, truth_again = microscope.exposure_truth("first"), microscope.exposure_truth("again")
    assert truth_again.placement_error_nm == truth.placement_error_nm
    assert math.hypot(*truth.placement_error_nm) > 0
    # No move, no settle time: the second frame follows the first at once.
    assert again.t_start == first.t_end


def test_drift_continues_across_frames(small_config: SimulatorConfig, small_specimen: Specimen) -> None:
    rate = (0.3, -0.2)
    config = only(small_config, imaging={"drift_nm_per_s": rate})
    with SimulatedMicroscope(config, small_specimen) as microscope:
        tiles = [microscope.acquire(scan(x, 15.0, f"f{i}")) for i, x in enumerate((10.0, 12.0, 12.0, 20.0))]
        truths = [microscope.exposure_truth(f"f{i}") for i in range(4)]
    for (tile, truth), (later, later_truth) in zip(
        zip(tiles, truths, strict=True), zip(tiles[1:], truths[1:], strict=True), strict=False
    ):
        elapsed = later.t_start - tile.t_start
        assert elapsed > 0
        growth = np.subtract(later_truth.drift_offset_nm, truth.drift_offset_nm)
        np.testing.assert_allclose(growth, np.multiply(rate, elapsed), rtol=0, atol=1e-6)
    assert truths[0].placement_error_nm == (0.0, 0.0)
    assert truths[-1].offset_nm == truths[-1].drift_offset_nm


def test_drift_shears_the_frame(small_config: SimulatorConfig, small_specimen: Specimen) -> None:
    rate = (0.3, -0.2)
    config = only(small_config, imaging={"drift_nm_per_s": rate})
    shape, dwell = (48, 40), 8.0
    with SimulatedMicroscope(config, small_specimen) as microscope:
        microscope.acquire(scan(15.0, 15.0, "frame", shape=shape, dwell=dwell))
        truth = microscope.exposure_truth("frame")
    line_s = line_time_us(shape[1], dwell, config.imaging) * 1e-6
    rows = np.arange(shape[0])
    expected = truth.row_offset_nm[0] + np.outer(rows * line_s, rate)
    np.testing.assert_allclose(truth.row_offset_nm, expected, rtol=0, atol=1e-9)
    across = truth.row_offset_nm[-1] - truth.row_offset_nm[0]
    np.testing.assert_allclose(across, np.multiply(rate, (shape[0] - 1) * line_s), rtol=1e-9)
    assert truth.velocity_nm_per_s == pytest.approx(rate)


def test_drift_after_a_move_follows_the_move_and_decays(
    small_config: SimulatorConfig, small_specimen: Specimen
) -> None:
    config = only(small_config, imaging={"settle_drift_nm_per_s": 0.05, "settle_drift_tau_s": 30.0})
    with SimulatedMicroscope(config, small_specimen) as microscope:
        microscope.acquire(scan(10.0, 15.0, "start"))
        moved = microscope.acquire(scan(13.0, 19.0, "moved"))  # along (0.6, 0.8)
        later = microscope.acquire(scan(13.0, 19.0, "later"))
        first, second = microscope.exposure_truth("moved"), microscope.exposure_truth("later")
    speed = math.hypot(*first.velocity_nm_per_s)
    assert first.velocity_nm_per_s[0] / speed == pytest.approx(0.6)
    assert first.velocity_nm_per_s[1] / speed == pytest.approx(0.8)
    # Settled for 0.5 s before the frame: about 0.05 * exp(-0.5 / 30).
    assert speed == pytest.approx(0.05 * math.exp(-0.5 / 30.0), rel=1e-3)
    ratio = math.hypot(*second.velocity_nm_per_s) / speed
    assert ratio == pytest.approx(math.exp(-(later.t_start - moved.t_start) / 30.0), rel=1e-6)


def test_the_drift_velocity_walks(small_config: SimulatorConfig, small_specimen: Specimen) -> None:
    config = only(small_config, imaging={"drift_random_walk_nm_per_s_per_sqrt_s": 0.002})
    with SimulatedMicroscope(config, small_specimen) as microscope:
        for index in range(5):
            microscope.acquire(scan(10.0 + index, 15.0, f"w{index}", shape=(32, 32)))
        velocities = [microscope.exposure_truth(f"w{index}").velocity_nm_per_s for index in range(5)]
    assert len(set(velocities)) == 5
    # After ~2.6 s of instrument time the walk has reached roughly 0.002 * sqrt(2.6) nm/s.
    assert 1e-5 < max(abs(v) for pair in velocities for v in pair) < 0.02


def test_flyback_lag_decays_along_the_line(small_config: SimulatorConfig, small_specimen: Specimen) -> None:
    config = only(small_config, imaging={"flyback_settle_nm": 0.02, "flyback_settle_us": 30.0})
    dwell = 3.0
    with SimulatedMicroscope(config, small_specimen) as microscope:
        microscope.acquire(scan(15.0, 15.0, "frame", dwell=dwell))
        truth = microscope.exposure_truth("frame")
        x, y = microscope.true_position_nm("frame", np.array([0, 0, 5]), np.array([0, 10, 10]))
    expected = 0.02 * np.exp(-np.arange(SHAPE[1]) * dwell / 30.0)
    np.testing.assert_allclose(truth.col_offset_nm, expected, rtol=1e-12)
    assert truth.col_offset_nm[10] == pytest.approx(0.02 * math.exp(-1.0))
    np.testing.assert_array_equal(truth.row_offset_nm, 0.0)
    origin = scan(15.0, 15.0, "frame").origin_nm
    np.testing.assert_allclose(x, origin[0] + np.array([0, 10, 10]) * PIXEL_NM + expected[[0, 10, 10]])
    np.testing.assert_allclose(y, origin[1] + np.array([0, 0, 5]) * PIXEL_NM)


def test_the_ideal_instrument_has_no_offsets(small_config: SimulatorConfig, small_specimen: Specimen) -> None:
    ideal = small_config.ideal_instrument()
    assert ideal.imaging.poisson_noise == small_config.imaging.poisson_noise
    assert ideal.imaging.detector_noise_counts == small_config.imaging.detector_noise_counts
    with SimulatedMicroscope(ideal, small_specimen) as microscope:
        for index, (x, y) in enumerate(((10.0, 10.0), (15.0, 15.0), (15.0, 15.0), (12.0, 18.0))):
            microscope.acquire(scan(x, y, f"i{index}"))
            truth = microscope.exposure_truth(f"i{index}")
            assert truth.placement_error_nm == truth.drift_offset_nm == truth.offset_nm == (0.0, 0.0)
            assert truth.velocity_nm_per_s == (0.0, 0.0)
            np.testing.assert_array_equal(truth.row_offset_nm, 0.0)
            np.testing.assert_array_equal(truth.col_offset_nm, 0.0)


@pytest.mark.parametrize(
    ("imaging", "instrument", "moves"),
    [
        ({}, {"placement_sigma_nm": 2.0}, {"placement"}),
        ({}, {"hysteresis_nm": 1.0}, {"placement"}),
        ({"drift_nm_per_s": (0.01, 0.006)}, {}, {"drift", "rows"}),
        ({"drift_random_walk_nm_per_s_per_sqrt_s": 0.002}, {}, {"drift", "rows"}),
        ({"settle_drift_nm_per_s": 0.05}, {}, {"drift", "rows"}),
        ({"line_jitter_nm": 0.004}, {}, {"rows"}),
        ({"flyback_settle_nm": 0.02}, {}, {"cols"}),
    ],
)
def test_each_error_is_switched_on_and_off_by_its_own_setting(
    small_config: SimulatorConfig,
    small_specimen: Specimen,
    imaging: dict[str, object],
    instrument: dict[str, object],
    moves: set[str],
) -> None:
    config = only(small_config, imaging, **instrument)
    with SimulatedMicroscope(config, small_specimen) as microscope:
        microscope.acquire(scan(10.0, 12.0, "a", shape=(16, 16)))
        microscope.acquire(scan(15.0, 15.0, "b", shape=(16, 16)))
        truth = microscope.exposure_truth("b")
    shear = truth.row_offset_nm - truth.row_offset_nm[0]
    seen = {
        name
        for name, value in (
            ("placement", np.any(np.array(truth.placement_error_nm) != 0)),
            ("drift", np.any(np.array(truth.drift_offset_nm) != 0)),
            ("rows", np.any(shear != 0)),
            ("cols", np.any(truth.col_offset_nm != 0)),
        )
        if value
    }
    assert seen == moves


def _acquire_all(microscope: SimulatedMicroscope, requests: list[ScanRequest]) -> list[Tile]:
    return [microscope.acquire(request) for request in requests]


RUN = [
    scan(10.0, 10.0, "A", shape=(48, 48)),
    scan(14.0, 11.0, "B", shape=(48, 48)),
    scan(14.0, 11.0, "C", shape=(48, 48)),
    scan(12.0, 16.0, "D", shape=(48, 48)),
]


def test_same_config_seed_and_requests_give_the_same_tiles_and_truth(
    small_config: SimulatorConfig, small_specimen: Specimen
) -> None:
    with (
        SimulatedMicroscope(small_config, small_specimen) as first,
        SimulatedMicroscope(small_config, small_specimen) as second,
    ):
        second.clock_s += 1234.5  # a different wall clock changes nothing physical
        for one, two in zip(_acquire_all(first, RUN), _acquire_all(second, RUN), strict=True):
            np.testing.assert_array_equal(one.image, two.image)
            assert_same_truth(
                first.exposure_truth(one.request.request_id), second.exposure_truth(two.request.request_id)
            )
    other_seed = small_config.model_copy(update={"seed": small_config.seed + 1})
    with SimulatedMicroscope(other_seed, small_specimen) as third:
        _acquire_all(third, RUN)
        assert third.exposure_truth("D").offset_nm != first.exposure_truth("D").offset_nm


def test_resume_after_replays_the_physical_state(
    small_config: SimulatorConfig, small_specimen: Specimen
) -> None:
    with SimulatedMicroscope(small_config, small_specimen) as uninterrupted:
        tiles = _acquire_all(uninterrupted, RUN)
    with SimulatedMicroscope(small_config, small_specimen) as restarted:
        restarted.resume_after(RUN[:3], tiles[2].t_end)
        # The specimen kept its dose: counters and the per-area dose map go on from the replayed scans.
        assert restarted.exposures == 3
        assert restarted.total_dose_e_per_a2 == pytest.approx(sum(tile.dose_e_per_a2 for tile in tiles[:3]))
        with SimulatedMicroscope(small_config, small_specimen) as reference:
            _acquire_all(reference, RUN[:3])
            np.testing.assert_allclose(restarted.dose_map.map_e_per_a2, reference.dose_map.map_e_per_a2)
        resumed = restarted.acquire(RUN[3])
        assert_same_truth(restarted.exposure_truth("C"), uninterrupted.exposure_truth("C"))
        assert_same_truth(restarted.exposure_truth("D"), uninterrupted.exposure_truth("D"))
    np.testing.assert_array_equal(resumed.image, tiles[3].image)
    assert resumed.t_start == tiles[3].t_start and resumed.t_end == tiles[3].t_end
    # Without the replay the restarted instrument would have placed D elsewhere.
    with SimulatedMicroscope(small_config, small_specimen) as forgetful:
        forgetful.acquire(RUN[3])
        assert forgetful.exposure_truth("D").offset_nm != uninterrupted.exposure_truth("D").offset_nm


def test_exposure_truth_of_an_unknown_request_says_so(
    small_config: SimulatorConfig, small_specimen: Specimen
) -> None:
    with SimulatedMicroscope(small_config, small_specimen) as microscope:
        with pytest.raises(KeyError, match="no exposure 'nope'"):
            microscope.exposure_truth("nope")
        with pytest.raises(KeyError, match="no exposure"):
            microscope.true_position_nm("nope", 0, 0)
