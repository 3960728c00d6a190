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
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.driver import electrons_per_pixel
from simulator.config import SimulatorConfig
from simulator.imaging import render_rotated_tile_image
from simulator.replay import ReplayMicroscope
from simulator.specimen import Specimen, generate_specimen

_ = gettext.gettext
_NOISE_STREAM = 2  # spawn-key prefix of usim frames (0 is the specimen, 1 SimulatedMicroscope)


@dataclass(frozen=True)
class StageFrame:
    """A usim frame as it lies on the specimen: centre, shape, pixel, rotation, dwell."""

    centre_nm: tuple[float, float]
    shape: tuple[int, int]
    pixel_size_nm: float
    rotation_rad: float
    dwell_us: float


class UsimScanGenerator:
    """What every Micrography usim generator shares: where usim's frame lies on the specimen.

    Parameters
    ----------
    size_nm : tuple of float
        Extent ``(W, H)`` of the specimen or recording; the scan-offset origin is its middle.
    rotation_deg : float
        Angle of the scan-offset frame's x axis from the specimen's x axis, degrees.
    """

    def __init__(self, size_nm: tuple[float, float], rotation_deg: float = 0.0) -> None:
        self.rotation_rad = math.radians(rotation_deg)
        self.origin_nm = (0.5 * size_nm[0], 0.5 * size_nm[1])
        self.frames = 0
        """Frames rendered (each is one exposure of the specimen)."""
        self._lock = threading.Lock()

    def stage_frame(self, instrument: Any, scan_frame_parameters: Any) -> StageFrame:
        """Where usim's frame lies on the specimen (counts it as one frame).

        Parameters
        ----------
        instrument : nion.usim_device.InstrumentDevice.Instrument or None
            The simulated instrument (stage position minus beam shift, ``actual_offset_m``).
        scan_frame_parameters : nion.device_kit.ScanDevice.ScanFrameParameters
            ``size`` (rows, cols), ``fov_nm``, ``center_nm`` (y, x), ``rotation_rad``,
            ``pixel_time_us``.

        Returns
        -------
        StageFrame
            Centre in specimen nm, shape, pixel size ``fov_nm / max(rows, cols)`` (Nion's
            calibrated scale), rotation against the specimen, dwell.
        """
        rows, cols = (int(n) for n in scan_frame_parameters.size)
        centre = scan_frame_parameters.center_nm
        offset = getattr(getattr(instrument, "value_manager", None), "actual_offset_m", None)
        offset_x = float(offset.x) * 1e9 if offset is not None else 0.0
        offset_y = float(offset.y) * 1e9 if offset is not None else 0.0
        cx, cy = float(centre.x) - offset_x, float(centre.y) - offset_y
        cos_a, sin_a = math.cos(self.rotation_rad), math.sin(self.rotation_rad)
        with self._lock:
            self.frames += 1
        return StageFrame(
            centre_nm=(
                self.origin_nm[0] + cos_a * cx - sin_a * cy,
                self.origin_nm[1] + sin_a * cx + cos_a * cy,
            ),
            shape=(rows, cols),
            pixel_size_nm=float(scan_frame_parameters.fov_nm) / max(rows, cols),
            rotation_rad=self.rotation_rad + float(scan_frame_parameters.rotation_rad),
            dwell_us=float(scan_frame_parameters.pixel_time_us),
        )


class SpecimenScanGenerator(UsimScanGenerator):
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
        super().__init__(self.specimen.size_nm, rotation_deg)

    def beam_current_pa(self, instrument: Any) -> float:
        """Probe current, pA: the instrument's ``BeamCurrent`` control (amperes), else the config's."""
        value = instrument.get_value("BeamCurrent") if instrument is not None else None
        return float(value) * 1e12 if value else self.config.instrument.beam_current_pa

    def generate_scan_data(self, instrument: Any, scan_frame_parameters: Any) -> np.ndarray:
        """Render one frame as usim's scan device asks for it (see :meth:`stage_frame`).

        Returns
        -------
        numpy.ndarray
            float32 ``(rows, cols)`` detected electrons per pixel; counts follow beam current x
            pixel time.
        """
        frame = self.stage_frame(instrument, scan_frame_parameters)
        rng = np.random.default_rng(
            np.random.SeedSequence(self.config.seed, spawn_key=(_NOISE_STREAM, self.frames))
        )
        return render_rotated_tile_image(
            self.specimen,
            frame.centre_nm,
            frame.shape,
            frame.pixel_size_nm,
            frame.rotation_rad,
            frame.dwell_us,
            electrons_per_pixel(self.beam_current_pa(instrument), frame.dwell_us),
            self.config.imaging,
            rng,
        )


class ReplayScanGenerator(UsimScanGenerator):
    """A usim scan-data generator that serves a recorded image (the replay microscope's sources).

    Parameters
    ----------
    replay : ReplayMicroscope
        The recording (Sm-BFO dataset layout, ``.npy``, ``.tif``) with its pixel size and dose model.
    rotation_deg : float
        Angle of the scan-offset frame's x axis from the recording's x axis, degrees.
    """

    def __init__(self, replay: ReplayMicroscope, rotation_deg: float = 0.0) -> None:
        self.replay = replay
        description = replay.describe()
        super().__init__((description.stage_x_nm[1], description.stage_y_nm[1]), rotation_deg)

    def generate_scan_data(self, instrument: Any, scan_frame_parameters: Any) -> np.ndarray:
        """Resample the recording on usim's frame, with the shot noise of its pixel time.

        Returns
        -------
        numpy.ndarray
            float32 ``(rows, cols)`` in recorded units (see :class:`~simulator.replay.ReplayMicroscope`).
        """
        frame = self.stage_frame(instrument, scan_frame_parameters)
        return self.replay.expose_frame(
            frame.centre_nm, frame.shape, frame.pixel_size_nm, frame.rotation_rad, frame.dwell_us
        )


def register_specimen_scan_device(
    generator: UsimScanGenerator, scan_device_id: str = "micrography_usim_scan"
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
    beam_current_pa = (
        generator.config.instrument.beam_current_pa
        if isinstance(generator, SpecimenScanGenerator)
        else generator.replay.describe().beam_current_pa
    )
    instrument.set_value("BeamCurrent", beam_current_pa * 1e-12)

    class _ScanModule(scan_base.ScanModule):
        def __init__(self) -> None:
            self.stem_controller_id = instrument.instrument_id
            self.device = ScanDevice.Device(
                scan_device_id,
                _("Micrography specimen (usim)"),
                instrument,
                UsimScanDevice.ScanBoxSimulator(generator),
            )
            field = 2 * max(generator.origin_nm)
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
