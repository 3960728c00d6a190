"""Micrography's synthetic specimen inside Nion's simulated STEM (nionswift-usim).

usim's stock samples have no atoms and their noise does not follow the dose. Here a
:class:`SpecimenScanGenerator` renders the synthetic Sm-BFO specimen with Micrography's own
image formation (:func:`simulator.imaging.render_rotated_tile_image`: HAADF Z-contrast
columns, Poisson counts from beam current x pixel time, read noise, jitter, drift), and
:func:`register_specimen_scan_device` puts it behind an unchanged usim scan device, so
frames go through Nion's real scan stack (frame parameters, acquisition threads,
calibrations, metadata).

Geometry follows usim's ``ScanDataGenerator``: the frame centre sits at ``center_nm`` minus
the instrument's ``actual_offset_m`` (stage position minus beam shift) in the scan-offset
frame, and a frame rotated by ``rotation_rad`` steps its columns along ``(cos r, sin r)``
(usim crops its data with ``Core.function_crop_rotated(..., -rotation)``, which is that).
The pixel size is ``fov_nm / max(rows, cols)``, the scale Nion's calibrations report; usim's
stock generator uses ``fov_size_nm`` instead, which disagrees with the calibrations on
non-square frames. The scan-offset frame is turned by ``rotation_deg`` against the specimen:
that is the scan rotation the bridge has to know (its ``scan_rotation_deg``).
"""

from __future__ import annotations

import gettext
import math
import threading
from typing import Any

import numpy as np

from agent.driver import electrons_per_pixel
from simulator.config import SimulatorConfig
from simulator.imaging import render_rotated_tile_image
from simulator.specimen import Specimen, generate_specimen

_ = gettext.gettext
_NOISE_STREAM = 2  # spawn-key prefix of usim frames (0 is the specimen, 1 SimulatedMicroscope)


class SpecimenScanGenerator:
    """A usim scan-data generator that images Micrography's synthetic specimen.

    Parameters
    ----------
    config : SimulatorConfig
        Specimen, imaging and instrument settings (the beam current is the fallback when the
        instrument has no ``BeamCurrent`` control).
    specimen : Specimen, optional
        A specimen generated beforehand; by default generated from ``config``.
    rotation_deg : float
        Angle of the scan-offset frame's x axis from the specimen's x axis, degrees.

    Notes
    -----
    The scan-offset origin (``center_nm = (0, 0)`` at zero stage position and beam shift) is
    the middle of the specimen, so the bridge's default field (the specimen extent) maps
    one to one onto the specimen's coordinates.
    """

    def __init__(
        self, config: SimulatorConfig, specimen: Specimen | None = None, rotation_deg: float = 0.0
    ) -> None:
        self.config = config
        self.specimen = specimen or generate_specimen(config.specimen, config.seed)
        self.rotation_rad = math.radians(rotation_deg)
        width, height = self.specimen.size_nm
        self.origin_nm = (0.5 * width, 0.5 * height)
        self.frames = 0
        """Frames rendered (each is one exposure of the specimen)."""
        self._lock = threading.Lock()

    def beam_current_pa(self, instrument: Any) -> float:
        """Probe current, pA: the instrument's ``BeamCurrent`` control (amperes), else the config's."""
        value = instrument.get_value("BeamCurrent") if instrument is not None else None
        return float(value) * 1e12 if value else self.config.instrument.beam_current_pa

    def generate_scan_data(self, instrument: Any, scan_frame_parameters: Any) -> np.ndarray:
        """Render one frame as usim's scan device asks for it.

        Parameters
        ----------
        instrument : nion.usim_device.InstrumentDevice.Instrument
            The simulated instrument (stage position, beam shift, beam current).
        scan_frame_parameters : nion.device_kit.ScanDevice.ScanFrameParameters
            ``size`` (rows, cols), ``fov_nm``, ``center_nm`` (y, x), ``rotation_rad``,
            ``pixel_time_us``.

        Returns
        -------
        numpy.ndarray
            float32 ``(rows, cols)`` detected electrons per pixel.
        """
        rows, cols = (int(n) for n in scan_frame_parameters.size)
        pixel_nm = float(scan_frame_parameters.fov_nm) / max(rows, cols)
        centre = scan_frame_parameters.center_nm
        offset = getattr(getattr(instrument, "value_manager", None), "actual_offset_m", None)
        offset_x = float(offset.x) * 1e9 if offset is not None else 0.0
        offset_y = float(offset.y) * 1e9 if offset is not None else 0.0
        cx, cy = float(centre.x) - offset_x, float(centre.y) - offset_y
        cos_a, sin_a = math.cos(self.rotation_rad), math.sin(self.rotation_rad)
        stage_centre = (
            self.origin_nm[0] + cos_a * cx - sin_a * cy,
            self.origin_nm[1] + sin_a * cx + cos_a * cy,
        )
        rotation = self.rotation_rad + float(scan_frame_parameters.rotation_rad)
        dwell_us = float(scan_frame_parameters.pixel_time_us)
        with self._lock:
            self.frames += 1
            frame = self.frames
        rng = np.random.default_rng(
            np.random.SeedSequence(self.config.seed, spawn_key=(_NOISE_STREAM, frame))
        )
        return render_rotated_tile_image(
            self.specimen,
            stage_centre,
            (rows, cols),
            pixel_nm,
            rotation,
            dwell_us,
            electrons_per_pixel(self.beam_current_pa(instrument), dwell_us),
            self.config.imaging,
            rng,
        )


def register_specimen_scan_device(
    generator: SpecimenScanGenerator, scan_device_id: str = "micrography_usim_scan"
) -> tuple[Any, Any]:
    """Register a usim instrument and scan device that image ``generator``'s specimen.

    Parameters
    ----------
    generator : SpecimenScanGenerator
        The specimen renderer.
    scan_device_id : str
        Hardware source id of the scan device; its STEM controller is ``<id>_stem_controller``.

    Returns
    -------
    instrument, scan_module
        The registered components; give them to :func:`unregister_specimen_scan_device`.
    """
    from nion.device_kit import ScanDevice
    from nion.instrumentation import scan_base
    from nion.usim_device import InstrumentDevice
    from nion.usim_device import ScanDevice as UsimScanDevice
    from nion.utils import Registry

    instrument = InstrumentDevice.Instrument(
        f"{scan_device_id}_stem_controller",
        InstrumentDevice.ValueManager(),
        InstrumentDevice.AxisManager(),
        generator,
    )
    # The instrument reports (and the generator images with) the simulator's probe current.
    instrument.set_value("BeamCurrent", generator.config.instrument.beam_current_pa * 1e-12)

    class _ScanModule(scan_base.ScanModule):
        def __init__(self) -> None:
            self.stem_controller_id = instrument.instrument_id
            self.device = ScanDevice.Device(
                scan_device_id,
                _("Micrography specimen (usim)"),
                instrument,
                UsimScanDevice.ScanBoxSimulator(generator),
            )
            field = max(generator.specimen.size_nm)
            modes = (
                scan_base.ScanSettingsMode(
                    _("Fast"),
                    "fast",
                    ScanDevice.ScanFrameParameters(pixel_size=(256, 256), pixel_time_us=1, fov_nm=field / 8),
                ),
                scan_base.ScanSettingsMode(
                    _("Slow"),
                    "slow",
                    ScanDevice.ScanFrameParameters(pixel_size=(512, 512), pixel_time_us=1, fov_nm=field / 4),
                ),
                scan_base.ScanSettingsMode(
                    _("Record"),
                    "record",
                    ScanDevice.ScanFrameParameters(pixel_size=(1024, 1024), pixel_time_us=1, fov_nm=field),
                ),
            )
            self.settings = scan_base.ScanSettings(
                scan_device_id, modes, lambda d: ScanDevice.ScanFrameParameters(d), 0, 2
            )

    scan_module = _ScanModule()
    Registry.register_component(instrument, {"instrument_controller", "stem_controller"})
    Registry.register_component(scan_module, {"scan_module"})
    return instrument, scan_module


def unregister_specimen_scan_device(instrument: Any, scan_module: Any) -> None:
    """Remove what :func:`register_specimen_scan_device` registered (the scan device first)."""
    from nion.utils import Registry

    Registry.unregister_component(scan_module, {"scan_module"})
    Registry.unregister_component(instrument, {"instrument_controller", "stem_controller"})
