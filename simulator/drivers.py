"""The simulated microscope: a driver that images the synthetic specimen."""

from __future__ import annotations

import hashlib
import math
import time

import numpy as np

from agent.driver import (
    DoseMap,
    InstrumentDescription,
    MicroscopeDriver,
    ScanRequest,
    Tile,
    electrons_per_pixel,
)
from simulator.config import SimulatorConfig
from simulator.imaging import frame_time_s, render_tile_image
from simulator.specimen import Specimen, generate_specimen

_NOISE_STREAM = 1  # spawn-key prefix of the per-exposure noise streams (0 is the specimen)


def _id_words(request_id: str) -> tuple[int, ...]:
    """A request id as four 32-bit words (a stable hash), to key its noise stream."""
    digest = hashlib.sha256(request_id.encode("utf-8")).digest()
    return tuple(int.from_bytes(digest[index : index + 4], "little") for index in range(0, 16, 4))


class SimulatedMicroscope(MicroscopeDriver):
    """A STEM that scans the synthetic Sm-BFO specimen.

    The stage spans the specimen, ``[0, width] x [0, height]`` nanometres. Each
    exposure is rendered with its own noise stream derived from the seed and the
    request id, so the same requests give identical tiles, also across a restart
    of the instrument (which is what lets an interrupted session resume exactly).
    A dose map records every exposure; with ``instrument.max_dose_e_per_a2`` set,
    a scan that would push any area past the limit is refused before exposure.

    Time is simulated: the instrument clock starts at the wall-clock time of
    construction and advances by the frame time (and a stage settle time when the
    tile centre moves), so sessions run as fast as the computer allows while
    tiles carry realistic instrument timestamps.

    Parameters
    ----------
    config : SimulatorConfig, optional
        Specimen, imaging and instrument parameters.
    specimen : Specimen, optional
        A specimen generated beforehand; by default one is generated from ``config``.

    Examples
    --------
    Not run as a test (it builds the full 160 nm specimen, several seconds)::

        from agent.driver import ScanRequest
        with SimulatedMicroscope() as microscope:
            tile = microscope.acquire(ScanRequest(x_nm=80, y_nm=80, shape=(512, 512),
                                                  pixel_size_nm=0.02, dwell_us=2.0))
    """

    def __init__(self, config: SimulatorConfig | None = None, specimen: Specimen | None = None) -> None:
        super().__init__()
        self.config = config or SimulatorConfig()
        self._specimen = specimen or generate_specimen(self.config.specimen, self.config.seed)
        instrument = self.config.instrument
        width, height = self._specimen.size_nm
        self._description = InstrumentDescription(
            name=instrument.name,
            stage_x_nm=(0.0, float(width)),
            stage_y_nm=(0.0, float(height)),
            pixel_size_nm=instrument.pixel_size_nm,
            max_tile_shape=instrument.max_tile_shape,
            detectors=instrument.detectors,
            beam_current_pa=instrument.beam_current_pa,
            dwell_us=instrument.dwell_us,
            max_dose_e_per_a2=instrument.max_dose_e_per_a2,
        )
        self.dose_map = DoseMap((0.0, float(width)), (0.0, float(height)), instrument.dose_map_cell_nm)
        self.clock_s = time.time()
        self._stage_nm: tuple[float, float] | None = None

    def describe(self) -> InstrumentDescription:
        """Stage limits (the specimen extent), pixel-size and dwell ranges, detectors, beam current."""
        return self._description

    def check(self, request: ScanRequest) -> None:
        """Check the instrument limits and, when one is set, the per-area dose limit."""
        super().check(request)
        limit = self._description.max_dose_e_per_a2
        if limit is not None:
            self.dose_map.check(request.extent_nm, self._description.dose_of(request), limit)

    @property
    def ground_truth(self) -> Specimen:
        """The specimen with its labels: for evaluation only, never for the agent's decisions."""
        return self._specimen

    def _acquire(self, request: ScanRequest) -> Tile:
        self._raise_if_aborted(request)
        rng = np.random.default_rng(
            np.random.SeedSequence(
                self.config.seed, spawn_key=(_NOISE_STREAM, *_id_words(request.request_id))
            )
        )
        per_pixel = electrons_per_pixel(self._description.beam_current_pa, request.dwell_us)
        image = render_tile_image(
            self._specimen,
            request.origin_nm,
            request.shape,
            request.pixel_size_nm,
            request.dwell_us,
            per_pixel,
            self.config.imaging,
            rng,
        )
        dose = self._description.dose_of(request)
        self.dose_map.add(request.extent_nm, dose)

        centre = (request.x_nm, request.y_nm)
        moved = self._stage_nm is None or not math.isclose(
            math.dist(centre, self._stage_nm), 0.0, abs_tol=1e-9
        )
        self._stage_nm = centre
        t_start = self.clock_s + (self.config.instrument.stage_settle_s if moved else 0.0)
        t_end = t_start + frame_time_s(request.shape, request.dwell_us, self.config.imaging)
        self.clock_s = t_end
        return Tile(
            image=image,
            request=request,
            origin_nm=request.origin_nm,
            pixel_size_nm=request.pixel_size_nm,
            dose_e_per_a2=dose,
            t_start=t_start,
            t_end=t_end,
            metadata={
                "instrument": self._description.name,
                "beam_current_pa": self._description.beam_current_pa,
                "electrons_per_pixel": per_pixel,
                "units": "detected electrons",
                "exposure": self.exposures,
                "seed": self.config.seed,
            },
        )
