from __future__ import annotations

import threading

import numpy as np
import pytest

from agent.driver import ScanRequest
from agent.errors import AcquisitionAborted, DoseLimitError, OutOfRangeError, OutsideStageError
from simulator.config import InstrumentConfig, SimulatorConfig
from simulator.drivers import SimulatedMicroscope
from simulator.imaging import frame_time_s
from simulator.specimen import Specimen


def scan(**overrides: object) -> ScanRequest:
    values = {"x_nm": 15.0, "y_nm": 15.0, "shape": (128, 128), "pixel_size_nm": 0.02, "dwell_us": 2.0}
    values.update(overrides)
    return ScanRequest(**values)


def test_describe_reports_the_specimen_as_stage(
    small_config: SimulatorConfig, small_specimen: Specimen
) -> None:
    with SimulatedMicroscope(small_config, small_specimen) as microscope:
        description = microscope.describe()
    assert description.stage_x_nm == (0.0, 30.0)
    assert description.stage_y_nm == (0.0, 30.0)
    assert description.beam_current_pa == small_config.instrument.beam_current_pa
    assert "HAADF" in description.detectors


def test_tile_carries_placement_dose_and_instrument_time(
    small_config: SimulatorConfig, small_specimen: Specimen
) -> None:
    with SimulatedMicroscope(small_config, small_specimen) as microscope:
        request = scan()
        tile = microscope.acquire(request)
        second = microscope.acquire(scan(x_nm=16.0))
    assert tile.image.shape == (128, 128) and tile.image.dtype == np.float32
    assert tile.origin_nm == pytest.approx((15.0 - 63.5 * 0.02, 15.0 - 63.5 * 0.02))
    # 20 pA x 2 us on (0.2 A)^2 pixels
    assert tile.dose_e_per_a2 == pytest.approx(249.68 / 0.04, rel=1e-4)
    assert tile.t_end - tile.t_start == pytest.approx(
        frame_time_s((128, 128), 2.0, small_config.imaging), abs=1e-6
    )
    assert second.t_start >= tile.t_end + small_config.instrument.stage_settle_s - 1e-9
    assert tile.metadata["electrons_per_pixel"] == pytest.approx(249.68, rel=1e-4)


def test_same_seed_same_requests_same_tiles(small_config: SimulatorConfig, small_specimen: Specimen) -> None:
    requests = [scan(), scan(x_nm=10.0)]
    images = []
    for _ in range(2):
        with SimulatedMicroscope(small_config, small_specimen) as microscope:
            images.append(
                [
                    microscope.acquire(r.model_copy(update={"request_id": str(i)})).image
                    for i, r in enumerate(requests)
                ]
            )
    for first, second in zip(images[0], images[1], strict=True):
        np.testing.assert_array_equal(first, second)
    # Two exposures of the same area differ by their noise.
    assert not np.array_equal(images[0][0], images[0][1])


def test_bad_requests_raise_before_any_dose(small_config: SimulatorConfig, small_specimen: Specimen) -> None:
    with SimulatedMicroscope(small_config, small_specimen) as microscope:
        with pytest.raises(OutsideStageError, match=r"outside the stage limits 0\.000 to 30\.000 nm"):
            microscope.acquire(scan(x_nm=29.5))
        with pytest.raises(OutOfRangeError, match="dwell 500 us"):
            microscope.acquire(scan(dwell_us=500.0))
        assert microscope.exposures == 0
        assert microscope.dose_map.map_e_per_a2.max() == 0.0


def test_dose_map_and_per_area_limit(small_specimen: Specimen, small_config: SimulatorConfig) -> None:
    limited = small_config.model_copy(
        update={"instrument": InstrumentConfig(max_dose_e_per_a2=10_000.0, dose_map_cell_nm=0.5)}
    )
    with SimulatedMicroscope(limited, small_specimen) as microscope:
        first = microscope.acquire(scan())  # 6242 e-/A^2
        assert microscope.dose_map.dose_at(15.0, 15.0) == pytest.approx(first.dose_e_per_a2)
        assert microscope.dose_map.dose_at(5.0, 5.0) == 0.0
        with pytest.raises(DoseLimitError, match="above the per-area limit of 10000"):
            microscope.acquire(scan())
        assert microscope.exposures == 1
        microscope.acquire(scan(x_nm=5.0, y_nm=5.0))  # a fresh area is still allowed
        assert microscope.exposures == 2


def test_retry_with_same_id_does_not_expose_again(
    small_config: SimulatorConfig, small_specimen: Specimen
) -> None:
    with SimulatedMicroscope(small_config, small_specimen) as microscope:
        request = scan()
        first = microscope.acquire(request)
        again = microscope.acquire(request)
        assert again is first
        assert microscope.exposures == 1
        assert microscope.dose_map.dose_at(15.0, 15.0) == pytest.approx(first.dose_e_per_a2)


def test_abort_stops_an_acquisition(small_config: SimulatorConfig, small_specimen: Specimen) -> None:
    class SlowMicroscope(SimulatedMicroscope):
        started = threading.Event()

        def _acquire(self, request: ScanRequest):  # type: ignore[override]
            self.started.set()
            self._abort.wait(5.0)
            return super()._acquire(request)

    microscope = SlowMicroscope(small_config, small_specimen)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            microscope.acquire(scan())
        except AcquisitionAborted as error:
            errors.append(error)

    worker = threading.Thread(target=run)
    worker.start()
    assert microscope.started.wait(5.0)
    microscope.abort()
    worker.join(5.0)
    assert errors and "aborted" in str(errors[0])
    assert microscope.exposures == 0


def test_ground_truth_is_the_specimen(small_config: SimulatorConfig, small_specimen: Specimen) -> None:
    with SimulatedMicroscope(small_config, small_specimen) as microscope:
        assert microscope.ground_truth is small_specimen


def test_a_restarted_microscope_gives_the_same_tile_for_the_same_request(
    small_config: SimulatorConfig, small_specimen: Specimen
) -> None:
    request = scan(request_id="session-00007")
    history = scan(x_nm=10.0, request_id="session-00006")
    with SimulatedMicroscope(small_config, small_specimen) as first:
        end = first.acquire(history).t_end  # a different history before it
        before = first.acquire(request).image
    with SimulatedMicroscope(small_config, small_specimen) as restarted:
        restarted.resume_after([history], end)  # the instrument's state survives the restart
        after = restarted.acquire(request).image
        # The replayed history counts: the specimen kept that scan's dose.
        assert restarted.exposures == 2 and restarted.total_dose_e_per_a2 == first.total_dose_e_per_a2
    np.testing.assert_array_equal(before, after)


def test_the_same_scans_under_other_ids_give_the_same_tiles(
    small_config: SimulatorConfig, small_specimen: Specimen
) -> None:
    # Noise and placement follow the exposure's ordinal, not the name a client gives it: two
    # sessions that differ only in their session id image the same specimen the same way.
    first_ids, other_ids = ("a-00000", "a-00001"), ("b-00000", "b-00001")
    tiles: list[list[np.ndarray]] = []
    truths = []
    for ids in (first_ids, other_ids):
        with SimulatedMicroscope(small_config, small_specimen) as microscope:
            tiles.append(
                [microscope.acquire(scan(x_nm=10.0 + 5 * k, request_id=i)).image for k, i in enumerate(ids)]
            )
            truths.append(microscope.exposure_truth(ids[1]).placement_error_nm)
    for a, b in zip(*tiles, strict=True):
        np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))
    assert truths[0] == truths[1]  # the landing errors are drawn by ordinal too
    # A different history gives a different draw: the noise is not replayed from the first scan.
    assert not np.array_equal(tiles[0][0], tiles[0][1])
