"""The Nion bridge's stage <-> scan mapping and its checks, as plain functions (no Nion needed)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from agent.driver import ScanRequest
from agent.errors import CalibrationError, ConfigError
from nionswift_plugin.micrography_bridge.config import BridgeConfig, load_bridge_config
from nionswift_plugin.micrography_bridge.geometry import (
    AxisCalibration,
    ReportedFrame,
    StageCalibration,
    frame_parameters_for,
    place_frame,
    rotate,
    wrap_angle,
)
from simulator.imaging import render_expected_counts, render_rotated_expected_counts
from simulator.specimen import Specimen
from tests.conftest import IDEAL_IMAGING

FIELD = (30.0, 30.0)


def request(**overrides: object) -> ScanRequest:
    values: dict[str, object] = {
        "x_nm": 12.0,
        "y_nm": 20.0,
        "shape": (96, 128),
        "pixel_size_nm": 0.03,
        "dwell_us": 2.0,
    }
    values.update(overrides)
    return ScanRequest(**values)  # type: ignore[arg-type]


def nion_reports(scan: ScanRequest, frame: dict[str, object]) -> ReportedFrame:
    """What Nion's scan_base.get_scan_calibrations and update_scan_properties report for ``frame``."""
    rows, cols = frame["pixel_size"]  # type: ignore[misc]
    scale = frame["fov_nm"] / max(rows, cols)  # type: ignore[operator]
    cy, cx = frame["center_nm"]  # type: ignore[misc]
    return ReportedFrame(
        shape=(rows, cols),
        calibrations=(
            AxisCalibration(-cy - scale * rows * 0.5, scale, "nm"),
            AxisCalibration(-cx - scale * cols * 0.5, scale, "nm"),
        ),
        center_nm=(cy, cx),
        rotation_rad=frame["rotation_rad"],  # type: ignore[arg-type]
        pixel_time_us=frame["pixel_time_us"],  # type: ignore[arg-type]
        channel_name="HAADF",
    )


@pytest.mark.parametrize("rotation_deg", [0.0, 30.0, -90.0, 137.0, 180.0])
def test_a_commanded_frame_is_placed_where_the_request_asked(rotation_deg: float) -> None:
    calibration = StageCalibration(FIELD, math.radians(rotation_deg))
    scan = request()
    frame = frame_parameters_for(scan, calibration)
    assert frame["pixel_size"] == (96, 128) and frame["fov_nm"] == pytest.approx(128 * 0.03)
    assert frame["rotation_rad"] == pytest.approx(wrap_angle(-math.radians(rotation_deg)))
    assert frame["subscan_pixel_size"] is None and frame["pixel_time_us"] == 2.0
    # The commanded centre, turned back into the stage frame, is the request's centre.
    assert calibration.stage_of_center(frame["center_nm"]) == pytest.approx((12.0, 20.0))
    origin, pixel = place_frame(nion_reports(scan, frame), scan, calibration)
    assert pixel == pytest.approx(0.03)
    assert origin == pytest.approx(scan.origin_nm, abs=1e-9)


def test_rotation_and_centre_follow_nions_rotate() -> None:
    # Nion's FloatPoint.rotate turns x towards y; so does ours.
    assert rotate(1.0, 0.0, math.pi / 2) == pytest.approx((0.0, 1.0))
    calibration = StageCalibration(FIELD, math.radians(90.0))
    # With the scan x axis along stage y, a tile 5 nm right of the middle is 5 nm along scan -y.
    assert calibration.center_nm_for(20.0, 15.0) == pytest.approx((-5.0, 0.0))
    assert wrap_angle(3 * math.pi) == pytest.approx(math.pi)


def test_every_disagreement_with_the_command_is_refused() -> None:
    calibration = StageCalibration(FIELD, math.radians(30.0))
    scan = request()
    good = nion_reports(scan, frame_parameters_for(scan, calibration))
    rows, cols = good.calibrations
    cases = [
        (replace(good, shape=(128, 96)), "128x96 px frame for a 96x128 px request"),
        (replace(good, calibrations=(rows, replace(cols, units="s"))), "in 's', not a length"),
        (replace(good, calibrations=(replace(rows, scale=0.031), cols)), "0.031 nm/px for a requested"),
        (replace(good, rotation_rad=0.0), r"rotated by 30 deg against the stage"),
        (replace(good, pixel_time_us=1.0), "dwelt 1 us per pixel instead of the requested 2 us"),
        (replace(good, center_nm=(good.center_nm[0] + 1.0, good.center_nm[1])), "calibration offset puts"),
    ]
    for reported, message in cases:
        with pytest.raises(CalibrationError, match=message):
            place_frame(reported, scan, calibration)
    # A centre clipped by the device, reported consistently in metadata and calibration.
    shifted_frame = {**frame_parameters_for(scan, calibration), "center_nm": (0.0, 0.0)}
    with pytest.raises(CalibrationError, match="instead of the commanded"):
        place_frame(nion_reports(scan, shifted_frame), scan, calibration)
    # Calibrations in micrometres are converted, not refused.
    micrometres = replace(
        good,
        calibrations=tuple(AxisCalibration(c.offset / 1e3, c.scale / 1e3, "µm") for c in good.calibrations),
    )
    assert place_frame(micrometres, scan, calibration)[0] == pytest.approx(scan.origin_nm, abs=1e-9)


@pytest.mark.parametrize("rotation_deg", [0.0, 30.0, -90.0])
def test_a_rotated_render_is_the_axis_aligned_one_turned(
    small_specimen: Specimen, rotation_deg: float
) -> None:
    # A frame turned by r, centred on c, sees column (x, y) where an aligned frame sees it turned by -r.
    shape, pixel, centre = (64, 80), 0.03, (14.0, 16.0)
    rotated = render_rotated_expected_counts(
        small_specimen, centre, shape, pixel, math.radians(rotation_deg), 100.0, IDEAL_IMAGING
    )
    if rotation_deg == 0.0:
        origin = (centre[0] - 0.5 * (shape[1] - 1) * pixel, centre[1] - 0.5 * (shape[0] - 1) * pixel)
        aligned = render_expected_counts(small_specimen, origin, shape, pixel, 100.0, IDEAL_IMAGING)
        np.testing.assert_allclose(rotated, aligned, rtol=1e-5)  # float32 erf inside
        return
    # The brightest pixel of the rotated frame lies, on the stage, on a bright (A) column.
    row, col = np.unravel_index(int(np.argmax(rotated)), shape)
    u, v = (col - 0.5 * (shape[1] - 1)) * pixel, (row - 0.5 * (shape[0] - 1)) * pixel
    dx, dy = rotate(u, v, math.radians(rotation_deg))
    distance = np.hypot(small_specimen.x_nm - (centre[0] + dx), small_specimen.y_nm - (centre[1] + dy))
    nearest = int(np.argmin(distance))
    assert distance[nearest] < pixel and small_specimen.weight[nearest] > 0.5


def test_bridge_settings_are_validated_with_the_key_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MICROGRAPHY_NION_BRIDGE", raising=False)
    assert load_bridge_config() is None  # no settings: the bridge stays off
    settings = tmp_path / "bridge.yaml"
    settings.write_text("field_nm: [30, 30]\nscan_rotation: 12\n", encoding="utf-8")
    monkeypatch.setenv("MICROGRAPHY_NION_BRIDGE", str(settings))
    with pytest.raises(ConfigError, match="scan_rotation"):
        load_bridge_config()
    settings.write_text("field_nm: [2000, 2000]\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="more than the largest scan field"):
        load_bridge_config()
    settings.write_text("hardware_source_id: superscan\nusim_specimen: {seed: 1}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="must be the usim specimen's scan_device_id"):
        load_bridge_config()
    settings.write_text("field_nm: [30, 30]\nscan_rotation_deg: -12.5\n", encoding="utf-8")
    config = load_bridge_config()
    assert isinstance(config, BridgeConfig) and config.scan_rotation_deg == -12.5
