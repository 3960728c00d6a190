from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from agent.driver import (
    DoseMap,
    InstrumentDescription,
    MicroscopeDriver,
    ScanRequest,
    Tile,
    dose_e_per_a2,
    electrons_per_pixel,
    require_finite,
)
from agent.errors import (
    DoseLimitError,
    DriverClosedError,
    InvalidImageError,
    OutOfRangeError,
    OutsideStageError,
    ScanRequestError,
)

DESCRIPTION = InstrumentDescription(
    name="test STEM",
    stage_x_nm=(0.0, 100.0),
    stage_y_nm=(0.0, 50.0),
    pixel_size_nm=(0.01, 1.0),
    max_tile_shape=(1024, 1024),
    detectors=("HAADF", "BF"),
    beam_current_pa=20.0,
    dwell_us=(0.5, 50.0),
)


def request(**overrides: object) -> ScanRequest:
    values = {"x_nm": 50.0, "y_nm": 25.0, "shape": (100, 200), "pixel_size_nm": 0.1, "dwell_us": 2.0}
    values.update(overrides)
    return ScanRequest(**values)


class CountingDriver(MicroscopeDriver):
    """A driver whose exposures return a constant image; the real drivers are tested elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def describe(self) -> InstrumentDescription:
        return DESCRIPTION

    def _acquire(self, request: ScanRequest) -> Tile:
        self.calls += 1
        return Tile(
            image=np.full(request.shape, float(self.calls), dtype=np.float32),
            request=request,
            origin_nm=request.origin_nm,
            pixel_size_nm=request.pixel_size_nm,
            dose_e_per_a2=DESCRIPTION.dose_of(request),
            t_start=0.0,
            t_end=1.0,
        )


def test_dose_arithmetic() -> None:
    # 20 pA for 2 us is 249.7 electrons; on a 1 A x 1 A pixel that is 249.7 e-/A^2.
    assert electrons_per_pixel(20.0, 2.0) == pytest.approx(249.68, rel=1e-4)
    assert dose_e_per_a2(20.0, 2.0, 0.1) == pytest.approx(249.68, rel=1e-4)
    assert dose_e_per_a2(20.0, 2.0, 0.01) == pytest.approx(24968, rel=1e-4)


def test_request_geometry() -> None:
    scan = request(shape=(3, 5), pixel_size_nm=1.0)
    assert scan.origin_nm == (48.0, 24.0)
    assert scan.extent_nm == (47.5, 52.5, 23.5, 26.5)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("pixel_size_nm", 0.0, "greater than 0"),
        ("dwell_us", -1.0, "greater than 0"),
        ("x_nm", float("nan"), "finite"),
        ("shape", (0, 10), "at least 1x1"),
        ("request_id", "", "at least 1 character"),
    ],
)
def test_impossible_requests_are_rejected(field: str, value: object, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        request(**{field: value})


def test_unknown_request_field_is_rejected() -> None:
    with pytest.raises(ValidationError, match="Extra inputs"):
        request(dwel_us=3.0)


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (
            {"x_nm": 95.0},
            OutsideStageError,
            r"x = 85\.000 to 105\.000 nm, outside the stage limits 0\.000 to 100\.000",
        ),
        ({"y_nm": 1.0}, OutsideStageError, r"y = -4\.000 to 6\.000 nm"),
        (
            {"pixel_size_nm": 2.0, "shape": (10, 10)},
            OutOfRangeError,
            r"pixel size 2 nm is outside the range 0\.01-1 nm",
        ),
        ({"dwell_us": 100.0}, OutOfRangeError, r"dwell 100 us is outside the range 0\.5-50 us"),
        ({"shape": (2048, 10)}, OutOfRangeError, r"2048x10 px exceeds the largest tile 1024x1024"),
        ({"detector": "EELS"}, OutOfRangeError, r"detector 'EELS' is not available.*'HAADF', 'BF'"),
    ],
)
def test_description_check_names_value_and_limit(overrides: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        DESCRIPTION.check(request(**overrides))


def test_a_tile_that_exactly_fills_the_stage_is_allowed() -> None:
    DESCRIPTION.check(request(x_nm=50.0, y_nm=25.0, shape=(500, 1000), pixel_size_nm=0.1 - 1e-12))


def test_invalid_description_ranges() -> None:
    with pytest.raises(ValidationError, match=r"dwell_us must be \(min, max\)"):
        InstrumentDescription(**{**DESCRIPTION.model_dump(), "dwell_us": (5.0, 1.0)})


def test_tile_maps_pixels_to_stage_and_back() -> None:
    scan = request(shape=(4, 6), pixel_size_nm=0.5)
    tile = Tile(np.zeros((4, 6), np.float32), scan, scan.origin_nm, 0.5, 1.0, 0.0, 1.0)
    x, y = tile.pixel_to_stage(3, 5)
    assert (float(x), float(y)) == (51.25, 25.75)
    row, col = tile.stage_to_pixel(x, y)
    assert (float(row), float(col)) == (3.0, 5.0)
    assert tile.extent_nm == scan.extent_nm


def test_tile_rejects_wrong_images() -> None:
    scan = request(shape=(4, 6))
    with pytest.raises(InvalidImageError, match="float32"):
        Tile(np.zeros((4, 6)), scan, scan.origin_nm, 0.1, 1.0, 0.0, 1.0)
    with pytest.raises(InvalidImageError, match=r"differs from the requested \(4, 6\)"):
        Tile(np.zeros((6, 4), np.float32), scan, scan.origin_nm, 0.1, 1.0, 0.0, 1.0)


def test_require_finite_counts_bad_pixels() -> None:
    image = np.ones((10, 10), np.float32)
    image[0, :3] = np.nan
    image[5, 5] = np.inf
    with pytest.raises(InvalidImageError, match=r"scan\.npy: 4 of 100 pixels are NaN or infinite"):
        require_finite(image, "scan.npy")


def test_driver_validates_before_exposing_and_caches_retries() -> None:
    driver = CountingDriver()
    with pytest.raises(OutsideStageError):
        driver.acquire(request(x_nm=-10.0))
    assert driver.calls == 0 and driver.exposures == 0

    scan = request()
    first = driver.acquire(scan)
    again = driver.acquire(scan)
    assert again is first and driver.calls == 1 and driver.exposures == 1
    assert driver.total_dose_e_per_a2 == pytest.approx(DESCRIPTION.dose_of(scan))

    clash = request(x_nm=40.0, request_id=scan.request_id)
    with pytest.raises(ScanRequestError, match="already used for a different scan"):
        driver.acquire(clash)


def test_driver_context_manager_closes() -> None:
    with CountingDriver() as driver:
        driver.acquire(request())
    assert driver.closed
    with pytest.raises(DriverClosedError, match="CountingDriver is closed"):
        driver.acquire(request())


def test_dose_map_accumulates_fractional_coverage() -> None:
    dose = DoseMap((0.0, 10.0), (0.0, 4.0), cell_nm=1.0)
    assert dose.map_e_per_a2.shape == (4, 10)
    dose.add((0.5, 2.0, 0.0, 1.0), 100.0)
    np.testing.assert_allclose(dose.map_e_per_a2[0, :3], [50.0, 100.0, 0.0])
    assert dose.dose_at(1.5, 0.5) == 100.0
    dose.add((1.0, 2.0, 0.0, 1.0), 100.0)
    assert dose.dose_at(1.5, 0.5) == 200.0


def test_dose_map_refuses_a_scan_over_the_limit() -> None:
    dose = DoseMap((0.0, 10.0), (0.0, 10.0), cell_nm=1.0)
    dose.add((0.0, 5.0, 0.0, 5.0), 800.0)
    dose.check((5.0, 10.0, 0.0, 5.0), 800.0, limit=1000.0)  # untouched area: fine
    with pytest.raises(
        DoseLimitError, match=r"to 1600 e-/A\^2, above the per-area limit of 1000 e-/A\^2 \(already 800\)"
    ):
        dose.check((4.0, 6.0, 0.0, 5.0), 800.0, limit=1000.0)
