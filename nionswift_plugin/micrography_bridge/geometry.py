"""Where a Nion scan frame lies on Micrography's stage: plain functions, no Nion import.

Frames
------
Stage (Micrography)
    ``(x, y)`` nanometres, x along tile columns, y along rows; the bridge offers the field
    ``[0, W] x [0, H]`` to the agent.
Nion scan-offset frame
    The frame in which Nion's ``center_nm`` (stored ``(y, x)``) is expressed, with the scan
    at ``rotation_rad = 0``. Its origin (``center_nm = (0, 0)``, stage and beam shift as the
    operator left them) is the middle of the field, ``(W / 2, H / 2)``; its x axis makes the
    calibrated angle ``scan_rotation`` with the stage x axis.
Nion scan frame
    A frame with ``rotation_rad = r`` steps its columns along ``(cos r, sin r)`` and its rows
    along ``(-sin r, cos r)`` of the scan-offset frame (``Geometry.FloatPoint.rotate`` in
    ``nion.utils``, as ``ScanDevice.current_probe_position`` and usim apply it).

So a pixel ``(u, v)`` nanometres from the frame centre lies at stage
``origin + R(scan_rotation) @ center + R(scan_rotation + r) @ (u, v)``. The bridge commands
``r = -scan_rotation`` so that tiles are stage-aligned, as a :class:`~agent.driver.Tile`
must be, and checks in what Nion returns that this is what was executed.

Nion's spatial calibrations follow ``scan_base.get_scan_calibrations``: scale ``fov_nm /
max(rows, cols)`` on both axes, units ``"nm"``, calibrations ordered ``(rows, cols)`` = ``(y,
x)``, and offset ``-center - scale * n / 2``, so the calibrated value of the frame's middle
(index ``n / 2``, pixel edges at integers) is ``-center_nm``. The bridge recovers the centre
from the calibration with that convention and requires it to agree with the frame
parameters Nion reports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from agent.driver import ScanRequest
from agent.errors import CalibrationError

ANGLE_TOLERANCE_RAD = 1e-6
"""Largest rotation of a returned frame against the stage that still counts as aligned."""

POSITION_TOLERANCE_PX = 1e-3
"""Largest disagreement, in pixels, between a commanded and a reported frame centre."""

SCALE_RTOL = 1e-6
"""Largest relative disagreement between the requested and the calibrated pixel size."""

NM_PER_UNIT: dict[str, float] = {"nm": 1.0, "um": 1e3, "µm": 1e3, "μm": 1e3, "Å": 0.1, "A": 0.1, "pm": 1e-3}
"""Length units a Nion calibration may carry, in nanometres."""


def wrap_angle(angle_rad: float) -> float:
    """An angle brought into ``(-pi, pi]``, radians.

    Examples
    --------
    >>> round(wrap_angle(3 * math.pi / 2), 6)
    -1.570796
    """
    wrapped = math.remainder(angle_rad, 2 * math.pi)
    return math.pi if math.isclose(wrapped, -math.pi) else wrapped


def rotate(x: float, y: float, angle_rad: float) -> tuple[float, float]:
    """A vector ``(x, y)`` turned by ``angle_rad`` (x towards y), as Nion's ``FloatPoint.rotate``."""
    cos_a, sin_a = math.cos(angle_rad), math.sin(angle_rad)
    return (cos_a * x - sin_a * y, sin_a * x + cos_a * y)


@dataclass(frozen=True)
class StageCalibration:
    """How the Nion scan-offset frame sits on the stage the bridge offers the agent.

    Parameters
    ----------
    field_nm : tuple of float
        Stage field ``(W, H)`` offered to the agent, nanometres; its middle is the Nion
        scan-offset origin.
    scan_rotation_rad : float
        Angle of the Nion scan x axis (at ``rotation_rad = 0``) from the stage x axis, radians;
        measured once on the instrument (see ``docs/nion.md``).
    """

    field_nm: tuple[float, float]
    scan_rotation_rad: float = 0.0

    @property
    def origin_nm(self) -> tuple[float, float]:
        """Stage position ``(x, y)`` of the Nion scan-offset origin, nanometres."""
        return (0.5 * self.field_nm[0], 0.5 * self.field_nm[1])

    @property
    def compensating_rotation_rad(self) -> float:
        """The Nion ``rotation_rad`` that makes a frame's axes the stage axes, radians."""
        return wrap_angle(-self.scan_rotation_rad)

    def center_nm_for(self, x_nm: float, y_nm: float) -> tuple[float, float]:
        """Nion ``center_nm`` ``(y, x)`` that centres a frame on stage ``(x_nm, y_nm)``."""
        ox, oy = self.origin_nm
        cx, cy = rotate(x_nm - ox, y_nm - oy, -self.scan_rotation_rad)
        return (cy, cx)

    def stage_of_center(self, center_nm: tuple[float, float]) -> tuple[float, float]:
        """Stage position ``(x, y)`` of a frame centred at Nion ``center_nm`` ``(y, x)``, nanometres."""
        ox, oy = self.origin_nm
        dx, dy = rotate(center_nm[1], center_nm[0], self.scan_rotation_rad)
        return (ox + dx, oy + dy)


def frame_parameters_for(
    request: ScanRequest, calibration: StageCalibration, rotation_rad: float | None = None
) -> dict[str, Any]:
    """The Nion frame parameters that execute ``request`` (stage-aligned by default).

    Parameters
    ----------
    request : ScanRequest
        Tile centre in stage nm, shape, pixel size, dwell.
    calibration : StageCalibration
        Where the scan-offset frame lies on the stage.
    rotation_rad : float, optional
        Nion scan rotation to use; by default the one that makes the frame stage-aligned.

    Returns
    -------
    dict
        ``pixel_size`` ``(rows, cols)``, ``fov_nm`` (the longer side, as Nion defines it),
        ``pixel_time_us``, ``center_nm`` ``(y, x)`` and ``rotation_rad``; subscan keys are
        ``None`` so a subscan the operator left set is switched off.
    """
    rows, cols = request.shape
    return {
        "pixel_size": (rows, cols),
        "fov_nm": max(rows, cols) * request.pixel_size_nm,
        "pixel_time_us": request.dwell_us,
        "center_nm": calibration.center_nm_for(request.x_nm, request.y_nm),
        "rotation_rad": calibration.compensating_rotation_rad if rotation_rad is None else rotation_rad,
        "subscan_pixel_size": None,
        "subscan_fractional_size": None,
        "subscan_fractional_center": None,
        "subscan_rotation": None,
    }


@dataclass(frozen=True)
class AxisCalibration:
    """One of Nion's dimensional calibrations: ``value = offset + scale * index``, in ``units``."""

    offset: float
    scale: float
    units: str


@dataclass(frozen=True)
class ReportedFrame:
    """What Nion says it scanned: the frame's data shape, calibrations and metadata.

    Parameters
    ----------
    shape : tuple of int
        Data shape ``(rows, cols)``.
    calibrations : tuple of AxisCalibration
        Dimensional calibrations in data order ``(rows, cols)``.
    center_nm : tuple of float
        ``center_nm`` ``(y, x)`` from the frame metadata (``scan.center_y_nm``, ``scan.center_x_nm``).
    rotation_rad : float
        Scan rotation from the metadata (``scan.rotation``), radians.
    pixel_time_us : float
        Dwell per pixel from the metadata, microseconds.
    channel_name : str
        Detector channel of the data (``hardware_source.channel_name``).
    """

    shape: tuple[int, int]
    calibrations: tuple[AxisCalibration, AxisCalibration]
    center_nm: tuple[float, float]
    rotation_rad: float
    pixel_time_us: float
    channel_name: str

    @classmethod
    def from_xdata(cls, xdata: Any) -> ReportedFrame:
        """Read a Nion ``DataAndMetadata`` frame.

        Parameters
        ----------
        xdata : nion.data.DataAndMetadata.DataAndMetadata
            A frame as ``record()`` returns it.

        Returns
        -------
        ReportedFrame
            Its shape, calibrations and scan metadata.

        Raises
        ------
        CalibrationError
            If the frame is not 2-D or lacks the scan metadata the placement needs.
        """
        shape = tuple(int(n) for n in xdata.data_shape)
        calibrations = tuple(
            AxisCalibration(float(c.offset), float(c.scale), str(c.units or ""))
            for c in xdata.dimensional_calibrations
        )
        if len(shape) != 2 or len(calibrations) != 2:
            raise CalibrationError(
                f"Nion returned a {len(shape)}-D frame {shape} with {len(calibrations)} calibrations; "
                "a tile needs a 2-D image (is a sequence or a 1-D line scan configured?)"
            )
        metadata = xdata.metadata
        scan = metadata.get("scan", {})
        source = metadata.get("hardware_source", {})
        try:
            center = (float(scan["center_y_nm"]), float(scan["center_x_nm"]))
            rotation = float(scan.get("rotation", math.radians(float(scan.get("rotation_deg", 0.0)))))
            pixel_time_us = float(
                source.get("pixel_time_us", scan["scan_device_parameters"]["pixel_time_us"])
            )
        except (KeyError, TypeError, ValueError) as error:
            raise CalibrationError(
                f"the Nion frame lacks scan metadata needed to place it on the stage ({error!r}); "
                "is the hardware source a scan device?"
            ) from None
        return cls(
            shape=(shape[0], shape[1]),
            calibrations=(calibrations[0], calibrations[1]),
            center_nm=center,
            rotation_rad=rotation,
            pixel_time_us=pixel_time_us,
            channel_name=str(source.get("channel_name", "")),
        )


def place_frame(
    reported: ReportedFrame, request: ScanRequest, calibration: StageCalibration
) -> tuple[tuple[float, float], float]:
    """Stage placement of a returned frame, checked against what was commanded.

    Parameters
    ----------
    reported : ReportedFrame
        What Nion says it scanned.
    request : ScanRequest
        What the agent asked for.
    calibration : StageCalibration
        Where the scan-offset frame lies on the stage.

    Returns
    -------
    origin_nm : tuple of float
        Stage position ``(x, y)`` of the centre of pixel ``(0, 0)``, nanometres.
    pixel_size_nm : float
        Pixel size from the calibrations, nanometres.

    Raises
    ------
    CalibrationError
        If the shape, the units, the scale of either axis, the centre (from the metadata or
        from the calibration offsets), the dwell or the rotation differ from the request, or
        the frame would be rotated against the stage.
    """
    rows, cols = request.shape
    if reported.shape != (rows, cols):
        raise CalibrationError(
            f"Nion returned a {reported.shape[0]}x{reported.shape[1]} px frame for a {rows}x{cols} px "
            "request; check that no subscan or binning is forced on the scan device"
        )
    scales = []
    for axis, cal in zip(("rows (y)", "columns (x)"), reported.calibrations, strict=True):
        factor = NM_PER_UNIT.get(cal.units)
        if factor is None:
            raise CalibrationError(
                f"the Nion calibration of the {axis} is in {cal.units!r}, not a length; "
                "the scan device must report spatial calibrations (not time) to place tiles"
            )
        scale = cal.scale * factor
        if not math.isclose(scale, request.pixel_size_nm, rel_tol=SCALE_RTOL):
            raise CalibrationError(
                f"Nion calibrated the {axis} at {scale:.6g} nm/px for a requested "
                f"{request.pixel_size_nm:.6g} "
                "nm/px; the scan device changed the field of view (limit or rounding)"
            )
        scales.append(scale)
    pixel = scales[1]
    tolerance_nm = POSITION_TOLERANCE_PX * pixel
    commanded = calibration.center_nm_for(request.x_nm, request.y_nm)
    for index, (axis, n) in enumerate((("y", rows), ("x", cols))):
        cal = reported.calibrations[index]
        from_offset = -(cal.offset + cal.scale * n / 2) * NM_PER_UNIT[cal.units]
        if abs(from_offset - reported.center_nm[index]) > tolerance_nm:
            raise CalibrationError(
                f"the Nion calibration offset puts the frame centre at {axis} = {from_offset:.6g} nm but the "
                f"frame reports center_{axis}_nm = {reported.center_nm[index]:.6g} nm; the calibration "
                "convention of this scan device is not Nion's, so the tile cannot be placed"
            )
        if abs(reported.center_nm[index] - commanded[index]) > tolerance_nm:
            raise CalibrationError(
                f"Nion scanned at center_{axis}_nm = {reported.center_nm[index]:.6g} nm instead of the "
                f"commanded {commanded[index]:.6g} nm; a scan-offset limit may have clipped it"
            )
    if not math.isclose(reported.pixel_time_us, request.dwell_us, rel_tol=1e-6):
        raise CalibrationError(
            f"Nion dwelt {reported.pixel_time_us:.6g} us per pixel instead of the requested "
            f"{request.dwell_us:.6g} us; the dose of the tile would be wrong"
        )
    misalignment = wrap_angle(calibration.scan_rotation_rad + reported.rotation_rad)
    if abs(misalignment) > ANGLE_TOLERANCE_RAD:
        raise CalibrationError(
            f"the frame is rotated by {math.degrees(misalignment):.4g} deg against the stage (Nion "
            f"rotation {math.degrees(reported.rotation_rad):.4g} deg, calibrated scan rotation "
            f"{math.degrees(calibration.scan_rotation_rad):.4g} deg); Micrography tiles must be "
            "stage-aligned: let the bridge set the scan rotation"
        )
    centre_x, centre_y = calibration.stage_of_center(reported.center_nm)
    origin = (centre_x - 0.5 * (cols - 1) * pixel, centre_y - 0.5 * (rows - 1) * pixel)
    return origin, pixel
