"""``NionScanDriver``: a Micrography driver whose scans Nion Swift executes.

The driver turns each :class:`~agent.driver.ScanRequest` into Nion frame parameters
(:func:`~nionswift_plugin.micrography_bridge.geometry.frame_parameters_for`), records one
frame of the requested channel through the Nion Swift API, and builds the
:class:`~agent.driver.Tile` from the frame's own calibrations and metadata
(:func:`~nionswift_plugin.micrography_bridge.geometry.place_frame`). Everything else a
server needs (validation, retries answered from the cache, exposure counting, the protocol)
comes from :class:`~agent.driver.MicroscopeDriver` and :class:`~simulator.server.InstrumentServer`.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any, Protocol

import numpy as np

from agent.driver import DoseMap, InstrumentDescription, MicroscopeDriver, ScanRequest, Tile
from agent.errors import CalibrationError, OutOfRangeError
from nionswift_plugin.micrography_bridge.config import BridgeConfig
from nionswift_plugin.micrography_bridge.geometry import (
    ANGLE_TOLERANCE_RAD,
    ReportedFrame,
    StageCalibration,
    frame_parameters_for,
    place_frame,
    wrap_angle,
)

_IDLE_POLL_S = 0.002


class ScanSource(Protocol):
    """The part of Nion's ``Facade.HardwareSource`` (API ``~1.0``) the driver uses."""

    @property
    def is_recording(self) -> bool:
        """True while a record is in progress."""

    def get_record_frame_parameters(self) -> dict[str, Any]:
        """The record settings the operator left on the device."""

    def record(
        self,
        frame_parameters: dict[str, Any] | None = None,
        channels_enabled: list[bool] | None = None,
        timeout: float | None = None,
    ) -> list[Any]:
        """Record one frame; a list of ``DataAndMetadata``, one per enabled channel."""

    def abort_recording(self) -> None:
        """Stop the record in progress."""


class NionScanDriver(MicroscopeDriver):
    """A microscope whose scans Nion Swift executes on a scan hardware source.

    Parameters
    ----------
    scan : ScanSource
        The Nion scan hardware source (``api.get_hardware_source_by_id(id, "~1.0")``).
    config : BridgeConfig
        Field, calibration, limits and detector channels.
    beam_current_pa : float
        Probe current, picoamperes (read from the instrument by the plug-in).
    name : str
        Instrument name reported to the agent.

    Notes
    -----
    Acquisitions run on the caller's thread, one at a time (the server's worker thread). Nion's
    ``record`` refuses to start while a previous record is still winding down (``assert not
    self.is_recording``), so every record first waits until the device is idle.
    """

    def __init__(
        self, scan: ScanSource, config: BridgeConfig, beam_current_pa: float, name: str = "Nion Swift"
    ) -> None:
        super().__init__()
        self.scan = scan
        self.config = config
        self.calibration = StageCalibration(config.field_nm, math.radians(config.scan_rotation_deg))
        width, height = config.field_nm
        self._description = InstrumentDescription(
            name=name,
            stage_x_nm=(0.0, float(width)),
            stage_y_nm=(0.0, float(height)),
            pixel_size_nm=config.pixel_size_nm,
            max_tile_shape=config.max_tile_shape,
            detectors=tuple(config.detectors),
            beam_current_pa=beam_current_pa,
            dwell_us=config.dwell_us,
            max_dose_e_per_a2=config.max_dose_e_per_a2,
        )
        self.dose_map = DoseMap((0.0, float(width)), (0.0, float(height)), config.dose_map_cell_nm)
        self._recording = threading.Event()

    def calibrate(self, scan_rotation_deg: float) -> None:
        """Take a newly measured scan rotation (after the operator re-calibrated it), degrees.

        Parameters
        ----------
        scan_rotation_deg : float
            Angle of the Nion scan x axis (at ``rotation_rad = 0``) from the stage x axis.
        """
        with self._lock:  # never between commanding a frame and placing it
            self.calibration = StageCalibration(self.config.field_nm, math.radians(scan_rotation_deg))

    def describe(self) -> InstrumentDescription:
        """The field offered, pixel-size and dwell ranges, detectors and beam current."""
        return self._description

    def check(self, request: ScanRequest) -> None:
        """Instrument limits, the scan field, the rotation policy and the per-area dose limit."""
        super().check(request)
        fov = max(request.shape) * request.pixel_size_nm
        if fov > self.config.max_fov_nm:
            raise OutOfRangeError(
                f"a {request.shape[0]}x{request.shape[1]} px tile at {request.pixel_size_nm:g} nm/px spans "
                f"{fov:g} nm, more than the largest scan field {self.config.max_fov_nm:g} nm"
            )
        misalignment = self._misalignment_rad(self._frame_for(request))
        if abs(misalignment) > ANGLE_TOLERANCE_RAD:
            raise OutOfRangeError(
                f"the scan would be rotated by {math.degrees(misalignment):.4g} deg against the stage: the "
                "operator's scan rotation is kept because compensate_rotation is off, and a tile must be "
                "stage-aligned; set the scan rotation in Nion Swift to "
                f"{math.degrees(self.calibration.compensating_rotation_rad):.4g} deg or turn "
                "compensate_rotation on in the bridge settings (nothing was exposed)"
            )
        limit = self._description.max_dose_e_per_a2
        if limit is not None:
            self.dose_map.check(request.extent_nm, self._description.dose_of(request), limit)

    def abort(self) -> None:
        """Stop the frame in progress on the Nion scan device."""
        super().abort()
        if self._recording.is_set():
            self.scan.abort_recording()

    def _frame_for(self, request: ScanRequest) -> dict[str, Any]:
        """The operator's record settings with what the request fixes replaced."""
        operator = self.scan.get_record_frame_parameters()
        rotation = None if self.config.compensate_rotation else float(operator.get("rotation_rad", 0.0))
        frame = {**operator, **frame_parameters_for(request, self.calibration, rotation_rad=rotation)}
        return {key: value for key, value in frame.items() if value is not None}

    def _misalignment_rad(self, frame: dict[str, Any]) -> float:
        return wrap_angle(self.calibration.scan_rotation_rad + float(frame["rotation_rad"]))

    def _wait_until_idle(self, request: ScanRequest) -> None:
        deadline = time.monotonic() + self.config.record_timeout_s
        while self.scan.is_recording:
            self._raise_if_aborted(request)
            if time.monotonic() > deadline:
                raise CalibrationError(
                    f"the Nion scan device stayed busy for {self.config.record_timeout_s:g} s (is someone "
                    f"else recording?); request {request.request_id} was not exposed"
                )
            time.sleep(_IDLE_POLL_S)

    def _acquire(self, request: ScanRequest) -> Tile:
        self._raise_if_aborted(request)
        channel = self.config.detectors[request.detector]
        frame = self._frame_for(request)
        frame["enabled_channel_indexes"] = [channel]
        frame_s = request.shape[0] * request.shape[1] * request.dwell_us * 1e-6
        self._wait_until_idle(request)
        self._recording.set()
        try:
            t_start = time.time()
            xdatas = self.scan.record(frame, timeout=frame_s + self.config.record_timeout_s)
            t_end = time.time()
        finally:
            self._recording.clear()
        self._raise_if_aborted(request)
        dose = self._description.dose_of(request)
        # The specimen was exposed whatever the checks below find: its dose is recorded first.
        self.dose_map.add(request.extent_nm, dose)
        frames = [x for x in xdatas or [] if x is not None]
        reported = [ReportedFrame.from_xdata(x) for x in frames]
        name = request.detector
        matching = [i for i, r in enumerate(reported) if r.channel_name == name]
        if not matching:
            raise CalibrationError(
                f"Nion returned no {name} frame (channels {[r.channel_name for r in reported]}) for request "
                f"{request.request_id}; check the detectors mapping of the bridge (channel {channel})"
            )
        xdata, frame_report = frames[matching[0]], reported[matching[0]]
        origin, pixel = place_frame(frame_report, request, self.calibration)
        image = np.ascontiguousarray(xdata.data, dtype=np.float32)
        return Tile(
            image=image,
            request=request,
            origin_nm=origin,
            pixel_size_nm=pixel,
            dose_e_per_a2=dose,
            t_start=t_start,
            t_end=t_end,
            metadata={
                "instrument": self._description.name,
                "nion_hardware_source": xdata.metadata.get("hardware_source", {}).get("hardware_source_id"),
                "nion_center_nm": list(frame_report.center_nm),
                "nion_rotation_rad": frame_report.rotation_rad,
                "beam_current_pa": self._description.beam_current_pa,
                "exposure": self.exposures,
            },
        )
