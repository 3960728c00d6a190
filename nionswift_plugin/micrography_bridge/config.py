"""Settings of the Nion Swift bridge (``BridgeConfig``), read from a YAML file.

The plug-in reads the file named by the environment variable ``MICROGRAPHY_NION_BRIDGE``
when Nion Swift loads it; without the variable the bridge stays off, so installing the
package never opens a port on a microscope PC by surprise. ``docs/nion.md`` documents every
key; an unknown key or a wrong type is an error that names the key and the file.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Self

from pydantic import Field, model_validator

from agent.config import StrictModel, load_config

CONFIG_ENV = "MICROGRAPHY_NION_BRIDGE"
"""Environment variable naming the bridge's YAML file."""


class UsimSpecimenConfig(StrictModel):
    """Put Micrography's synthetic specimen into a usim scan device (simulation and tests only)."""

    seed: int = Field(0, description="specimen seed")
    simulator_config: str | None = Field(None, description="simulator YAML (default: built-in)")
    replay: str | None = Field(
        None, description="serve this recording (Sm-BFO .h5 layout, .npy, .tif) instead of the specimen"
    )
    replay_pixel_size_nm: float | None = Field(None, gt=0, description="pixel size of the recording")
    replay_dwell_us: float | None = Field(
        None, gt=0, description="dwell the recording was made with, us (when the file lacks it)"
    )
    replay_counts_per_unit: float | None = Field(
        None, gt=0, description="detected electrons per unit of the recorded signal (when the file lacks it)"
    )
    rotation_deg: float = Field(
        0.0,
        description="angle of the usim scan x axis from the specimen x (the bridge calibrates it)",
    )
    scan_device_id: str = Field("micrography_usim_scan", description="hardware source id it registers")


class BridgeConfig(StrictModel):
    """What the bridge serves and how it maps Micrography's stage onto the Nion scan."""

    bind: str = Field("tcp://127.0.0.1:5555", description="command endpoint (ROUTER)")
    events_bind: str | None = Field("auto", description="event endpoint; auto = command port + 1")
    curve_secret_key: str | None = Field(None, description="server .key_secret: turns CURVE on")
    allowed_clients: str | None = Field(None, description="client public key file or folder")
    insecure: bool = Field(False, description="allow a non-loopback bind without CURVE")
    journal: str | None = Field(None, description="exposure journal folder (None: in memory only)")
    endpoint_file: str | None = Field(None, description="write the bound endpoints here as JSON")
    heartbeat_s: float = Field(1.0, gt=0)

    hardware_source_id: str = Field("usim_scan_device", description="Nion scan hardware source")
    instrument_id: str = Field("usim_stem_controller", description="Nion STEM controller (beam current)")
    detectors: dict[str, int] = Field(
        default_factory=lambda: {"HAADF": 0, "MAADF": 1},
        description="Micrography detector name -> Nion channel index",
    )
    field_nm: tuple[float, float] = Field((160.0, 160.0), description="stage field (W, H) offered")
    scan_rotation_deg: float = Field(0.0, description="calibrated angle of the scan x axis from stage x")
    compensate_rotation: bool = Field(
        True, description="command rotation_rad = -scan_rotation; False refuses scans when it is not 0"
    )
    pixel_size_nm: tuple[float, float] = Field((0.005, 2.0), description="(min, max) pixel size")
    max_tile_shape: tuple[int, int] = Field((2048, 2048))
    dwell_us: tuple[float, float] = Field((0.1, 100.0), description="(min, max) dwell per pixel")
    max_fov_nm: float = Field(1600.0, gt=0, description="largest scan field the device accepts")
    beam_current_pa: float | None = Field(
        None, gt=0, description="probe current; None reads the instrument's BeamCurrent control"
    )
    max_dose_e_per_a2: float | None = Field(None, gt=0)
    dose_map_cell_nm: float = Field(0.5, gt=0)
    record_timeout_s: float = Field(30.0, gt=0, description="added to the frame time before giving up")
    usim_specimen: UsimSpecimenConfig | None = Field(
        None, description="simulate Micrography's specimen in a usim scan device and serve that"
    )

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.usim_specimen is not None and self.hardware_source_id != self.usim_specimen.scan_device_id:
            raise ValueError(
                f"hardware_source_id {self.hardware_source_id!r} must be the usim specimen's scan_device_id "
                f"{self.usim_specimen.scan_device_id!r}, or the bridge would scan another device"
            )
        for name in ("pixel_size_nm", "dwell_us"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(f"{name} must be (min, max) with 0 < min <= max, got {(low, high)}")
        diagonal = math.hypot(*self.field_nm)
        if diagonal > self.max_fov_nm:
            raise ValueError(
                f"the stage field {self.field_nm} nm spans {diagonal:.0f} nm corner to corner, more than the "
                f"largest scan field max_fov_nm = {self.max_fov_nm:g} nm; make field_nm smaller"
            )
        return self


def load_bridge_config(path: str | Path | None = None) -> BridgeConfig | None:
    """The bridge settings from ``path``, or from the file named by ``MICROGRAPHY_NION_BRIDGE``.

    Parameters
    ----------
    path : str or pathlib.Path, optional
        A YAML file; by default the environment variable is read.

    Returns
    -------
    BridgeConfig or None
        None when no file is named: the bridge stays off.

    Raises
    ------
    ConfigError
        If the file is missing, unreadable or invalid.
    """
    named = path if path is not None else os.environ.get(CONFIG_ENV)
    if not named:
        return None
    return load_config(named, BridgeConfig)
