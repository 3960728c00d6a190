"""The simulated microscope: a driver that images the synthetic specimen."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from agent.driver import (
    DoseMap,
    InstrumentDescription,
    MicroscopeDriver,
    ScanRequest,
    Tile,
    electrons_per_pixel,
)
from agent.errors import AcquisitionAborted
from simulator.config import SimulatorConfig
from simulator.imaging import (
    add_read_noise,
    counting_noise,
    flyback_offsets_nm,
    frame_time_s,
    line_time_us,
    render_expected_counts_steps,
)
from simulator.specimen import Specimen, generate_specimen

_NOISE_STREAM = 1  # spawn-key prefix of the per-exposure noise streams (0 is the specimen)
_ERROR_STREAM = 2  # spawn-key prefix of the per-exposure placement and drift streams
_MOVE_TOLERANCE_NM = 1e-9  # a requested centre this close to the previous one is no move
_NOISE_BAND_PIXELS = 1 << 16  # pixels of noise drawn between two looks at the abort flag (~3 ms)


def _stream(seed: int, prefix: int, exposure: int) -> np.random.Generator:
    """The random stream of one exposure, keyed by seed, stream prefix and the exposure's ordinal.

    The ordinal (0 for the instrument's first exposure, counting replayed ones) and not the request
    id keys the stream: a detector's noise and a stage's landing error do not depend on what a
    client names its scans, so the same configuration and seed give the same session whatever
    its session id.
    """
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(prefix, exposure)))


@dataclass(frozen=True, eq=False)
class ExposureTruth:
    """Where one exposure of the simulated microscope really looked: ground truth, for evaluation only.

    Offsets are from the nominal position the tile reports (``tile.pixel_to_stage``), in
    specimen coordinates, nanometres. The specimen point imaged at pixel ``(r, c)`` is
    ``tile.pixel_to_stage(r, c) + row_offset_nm[r] + (col_offset_nm[c], 0)``; see
    :meth:`SimulatedMicroscope.true_position_nm`.

    Parameters
    ----------
    placement_error_nm : tuple of float
        Landing error ``(x, y)`` of the frame's stage move or scan offset (random plus hysteresis).
    drift_offset_nm : tuple of float
        Specimen drift ``(x, y)`` accumulated since the instrument started, at the frame's first pixel.
    offset_nm : tuple of float
        Total offset of pixel ``(0, 0)``: placement plus drift at the start (line jitter and flyback
        lag of that pixel excluded).
    row_offset_nm : numpy.ndarray
        Total offset ``(x, y)`` of each scan line, shape ``(rows, 2)``: placement, drift at the
        line's time and line jitter; flyback lag excluded.
    col_offset_nm : numpy.ndarray
        Flyback-settling x offset of each column, shape ``(cols,)``.
    velocity_nm_per_s : tuple of float
        Mean drift velocity ``(x, y)`` during the frame, nm/s.
    """

    placement_error_nm: tuple[float, float]
    drift_offset_nm: tuple[float, float]
    offset_nm: tuple[float, float]
    row_offset_nm: np.ndarray
    col_offset_nm: np.ndarray
    velocity_nm_per_s: tuple[float, float]


@dataclass(frozen=True)
class _Frame:
    """One frame's share of the instrument's physical state, as the stage and drift left it."""

    placement_nm: np.ndarray  # (2,)
    drift_rows_nm: np.ndarray  # (rows, 2), drift at each line's start
    velocity_nm_per_s: np.ndarray  # (2,)
    t_start: float
    t_end: float


def _pair(values: np.ndarray) -> tuple[float, float]:
    """Two numbers as a plain tuple of floats."""
    return (float(values[0]), float(values[1]))


class SimulatedMicroscope(MicroscopeDriver):
    """A STEM that scans the synthetic Sm-BFO specimen, with a real instrument's errors.

    The stage spans the specimen, ``[0, width] x [0, height]`` nanometres. Each
    exposure is rendered with its own noise stream derived from the seed and the
    exposure's ordinal on this instrument, so the same sequence of requests gives
    identical tiles whatever their ids, also across a restart of the instrument
    (which is what lets an interrupted session resume exactly: :meth:`resume_after`
    replays the physical state and the exposure count the restart lost). A retried
    request id is answered from the driver's cache, never rendered again.
    A dose map records every exposure; with ``instrument.max_dose_e_per_a2`` set,
    a scan that would push any area past the limit is refused before exposure.

    Like a real instrument, a frame does not land exactly where it was asked (see
    ``docs/instrument.md``): every move of the requested centre lands off by a random
    error plus hysteresis along the move; the specimen drifts, continuing from frame to
    frame (a constant rate, a random walk of the velocity and a transient after each
    move), which also shears the lattice within a frame; each line is jittered and its
    first columns lag after the flyback. Tiles report the nominal position
    (``origin_nm`` of the request); :meth:`exposure_truth` says where each one really was.

    Time is simulated: the instrument clock starts at the wall-clock time of
    construction and advances by the frame time (and a stage settle time when the
    tile centre moves), so sessions run as fast as the computer allows while
    tiles carry realistic instrument timestamps. Drift depends only on differences
    of this clock, never on the wall clock.

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
            truth = microscope.exposure_truth(tile.request.request_id)
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
        # Physical state: the last requested centre, where it really landed, and the drift.
        self._stage_nm: np.ndarray | None = None
        self._placement_nm = np.zeros(2)
        self._drift_nm = np.zeros(2)
        self._walk_velocity_nm_per_s = np.zeros(2)
        self._move_direction = np.zeros(2)
        self._since_move_s = math.inf
        self._truth: dict[str, tuple[ScanRequest, ExposureTruth]] = {}

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

    def exposure_truth(self, request_id: str) -> ExposureTruth:
        """Where the exposure of ``request_id`` really looked; for evaluation only.

        Parameters
        ----------
        request_id : str
            Id of an exposure this instrument made (or replayed with :meth:`resume_after`).

        Returns
        -------
        ExposureTruth
            Placement error, drift and per-line and per-column offsets of that frame.

        Raises
        ------
        KeyError
            If this instrument never executed that request.
        """
        try:
            return self._truth[request_id][1]
        except KeyError:
            raise KeyError(
                f"no exposure {request_id!r} on this instrument; ground truth exists only for "
                "requests it executed or replayed"
            ) from None

    def true_position_nm(self, request_id: str, row: object, col: object) -> tuple[np.ndarray, np.ndarray]:
        """Specimen position really imaged at pixel coordinates of an exposure, in nanometres.

        Implements the :class:`ExposureTruth` contract, ``tile.pixel_to_stage(r, c) +
        row_offset_nm[r] + (col_offset_nm[c], 0)``; fractional coordinates interpolate the
        offsets linearly between neighbouring lines and columns.

        Parameters
        ----------
        request_id : str
            Id of the exposure.
        row, col : array_like
            Pixel coordinates; integer values are pixel centres.

        Returns
        -------
        x_nm, y_nm : numpy.ndarray
            Specimen coordinates, nanometres.
        """
        self.exposure_truth(request_id)  # raises, with a message, for an unknown id
        request, truth = self._truth[request_id]
        r = np.asarray(row, dtype=float)
        c = np.asarray(col, dtype=float)
        rows, cols = request.shape
        x0, y0 = request.origin_nm
        line = np.arange(rows)
        x = x0 + c * request.pixel_size_nm + np.interp(r, line, truth.row_offset_nm[:, 0])
        x = x + np.interp(c, np.arange(cols), truth.col_offset_nm)
        y = y0 + r * request.pixel_size_nm + np.interp(r, line, truth.row_offset_nm[:, 1])
        return x, y

    def resume_after(self, requests: Sequence[ScanRequest], t_end: float | None) -> None:
        """Replay the stage moves and drift of requests executed before the agent restarted.

        The physical state (stage position, landing error, drift) is brought to where a
        real instrument would have kept it, without rendering, so the next acquisition
        equals the one an uninterrupted instrument would have made. The exposure counter,
        total dose and per-area dose map take the replayed scans too: the specimen kept
        their dose, and the dose limit must not forget it. Ground
        truth of the replayed requests becomes available through :meth:`exposure_truth`.

        Parameters
        ----------
        requests : sequence of ScanRequest
            The requests already executed, in order.
        t_end : float or None
            Instrument time the last one ended, seconds since the epoch; the next frame
            starts after it. None keeps this instrument's clock.
        """
        with self._lock:
            for request in requests:
                self._record(request, self._advance(request), self._noise_stream())
                # The specimen kept its dose: the per-area limit and the counters go on from it.
                dose = self._description.dose_of(request)
                self.dose_map.add(request.extent_nm, dose)
                self._exposures += 1
                self._total_dose += dose
            if t_end is not None:
                self.clock_s = float(t_end)

    def _noise_stream(self) -> np.random.Generator:
        """The detector noise of the exposure about to be made (the next ordinal)."""
        return _stream(self.config.seed, _NOISE_STREAM, self.exposures)

    def _advance(self, request: ScanRequest) -> _Frame:
        """Move the stage to ``request``, let the specimen drift through its frame, advance the clock."""
        instrument, imaging = self.config.instrument, self.config.imaging
        rng = _stream(self.config.seed, _ERROR_STREAM, self.exposures)
        landing = rng.standard_normal(2) * instrument.placement_sigma_nm
        rows, cols = request.shape
        walk = rng.standard_normal((rows + 1, 2, 2))  # the velocity's random walk, per time step

        centre = np.array([request.x_nm, request.y_nm], dtype=float)
        if self._stage_nm is None:
            moved = True  # the first frame lands somewhere from an unknown previous position
            self._placement_nm = landing
        else:
            delta = centre - self._stage_nm
            axes = np.abs(delta) > _MOVE_TOLERANCE_NM
            moved = bool(axes.any())
            if moved:
                hysteresis = instrument.hysteresis_nm * np.sign(delta)
                self._placement_nm = np.where(axes, landing + hysteresis, self._placement_nm)
                self._move_direction = delta / float(np.hypot(delta[0], delta[1]))
        if moved:
            self._since_move_s = 0.0
        self._stage_nm = centre

        # Time steps: the settle after a move (to line 0), then one line each (to t_end).
        line_s = line_time_us(cols, request.dwell_us, imaging) * 1e-6
        dt = np.full(rows + 1, line_s)
        dt[0] = instrument.stage_settle_s if moved else 0.0
        ages = self._since_move_s + np.concatenate([[0.0], np.cumsum(dt)])
        tau = imaging.settle_drift_tau_s
        decay = np.exp(-ages / tau)
        transient = imaging.settle_drift_nm_per_s * tau * (decay[:-1] - decay[1:])
        # The random walk integrated exactly over each step (velocity and position jointly Gaussian).
        sigma = imaging.drift_random_walk_nm_per_s_per_sqrt_s
        dv = sigma * np.sqrt(dt)[:, None] * walk[:, :, 0]
        v_before = self._walk_velocity_nm_per_s + np.concatenate([np.zeros((1, 2)), np.cumsum(dv, 0)[:-1]])
        walked = v_before * dt[:, None] + sigma * dt[:, None] ** 1.5 * (
            0.5 * walk[:, :, 0] + walk[:, :, 1] / (2.0 * math.sqrt(3.0))
        )
        step = (
            np.asarray(imaging.drift_nm_per_s, dtype=float)[None, :] * dt[:, None]
            + transient[:, None] * self._move_direction[None, :]
            + walked
        )
        drift = self._drift_nm + np.concatenate([np.zeros((1, 2)), np.cumsum(step, 0)])  # (rows + 2, 2)

        self._drift_nm = drift[-1]
        self._walk_velocity_nm_per_s = v_before[-1] + dv[-1]
        self._since_move_s = float(ages[-1])
        t_start = self.clock_s + float(dt[0])
        t_end = t_start + frame_time_s(request.shape, request.dwell_us, imaging)
        self.clock_s = t_end
        return _Frame(
            placement_nm=self._placement_nm.copy(),
            drift_rows_nm=drift[1 : rows + 1],
            velocity_nm_per_s=(drift[-1] - drift[1]) / (rows * line_s),
            t_start=t_start,
            t_end=t_end,
        )

    def _record(self, request: ScanRequest, frame: _Frame, noise: np.random.Generator) -> ExposureTruth:
        """Draw the line jitter from the exposure's noise stream and keep the frame's ground truth."""
        imaging = self.config.imaging
        rows, cols = request.shape
        row_offset = frame.placement_nm[None, :] + frame.drift_rows_nm
        if imaging.line_jitter_nm > 0:
            row_offset[:, 0] += noise.normal(0.0, imaging.line_jitter_nm, rows)
        col_offset = (
            flyback_offsets_nm(cols, request.dwell_us, imaging)
            if imaging.flyback_settle_nm > 0
            else np.zeros(cols)
        )
        row_offset.setflags(write=False)
        col_offset.setflags(write=False)
        truth = ExposureTruth(
            placement_error_nm=_pair(frame.placement_nm),
            drift_offset_nm=_pair(frame.drift_rows_nm[0]),
            offset_nm=_pair(frame.placement_nm + frame.drift_rows_nm[0]),
            row_offset_nm=row_offset,
            col_offset_nm=col_offset,
            velocity_nm_per_s=_pair(frame.velocity_nm_per_s),
        )
        self._truth[request.request_id] = (request, truth)
        return truth

    def _acquire(self, request: ScanRequest) -> Tile:
        self._raise_if_aborted(request)  # not started yet: nothing exposed, the id stays free
        began = time.monotonic()
        clock_before = self.clock_s
        frame = self._advance(request)
        rng = self._noise_stream()
        truth = self._record(request, frame, rng)
        per_pixel = electrons_per_pixel(self._description.beam_current_pa, request.dwell_us)
        pixel = request.pixel_size_nm
        rows, cols = request.shape
        rows_moved = bool(np.any(truth.row_offset_nm != 0))
        columns_moved = bool(np.any(truth.col_offset_nm != 0))
        imaging = self.config.imaging
        # The frame is formed and read out in bands of lines, like a raster scan, and the abort
        # flag is looked at between bands (some 30 ms of work apart): an abort stops the scan
        # within about a line. The noise is drawn band after band in one stream, the same values
        # as for the whole frame at once, so an uninterrupted scan gives the same bits as ever.
        expected = np.zeros(request.shape, dtype=np.float64)
        image = np.empty(request.shape, dtype=np.float32)
        band_rows = max(1, _NOISE_BAND_PIXELS // cols)
        scanned = 0
        for final in render_expected_counts_steps(
            expected,
            self._specimen,
            request.origin_nm,
            pixel,
            per_pixel,
            imaging,
            dx_px=truth.row_offset_nm[:, 0] / pixel if rows_moved else None,
            dy_px=truth.row_offset_nm[:, 1] / pixel if rows_moved else None,
            dx_col_px=truth.col_offset_nm / pixel if columns_moved else None,
        ):
            while True:
                if self.abort_requested:
                    self._stop(request, scanned)
                if scanned >= final:
                    break
                stop = min(final, scanned + band_rows)
                image[scanned:stop] = counting_noise(expected[scanned:stop], imaging, rng)
                scanned = stop
        del expected
        # Read noise comes after every count in the stream (the order of the whole-frame draw).
        for start in range(0, rows, band_rows):
            if self.abort_requested:
                self._stop(request, rows)
            add_read_noise(image[start : start + band_rows], imaging, rng)
        if self.config.instrument.real_time:
            self._keep_pace(request, began, frame.t_start - clock_before, frame.t_end - frame.t_start)
        dose = self._description.dose_of(request)
        self.dose_map.add(request.extent_nm, dose)
        return Tile(
            image=image,
            request=request,
            origin_nm=request.origin_nm,
            pixel_size_nm=request.pixel_size_nm,
            dose_e_per_a2=dose,
            t_start=frame.t_start,
            t_end=frame.t_end,
            metadata={
                "instrument": self._description.name,
                "beam_current_pa": self._description.beam_current_pa,
                "electrons_per_pixel": per_pixel,
                "units": "detected electrons",
                "exposure": self.exposures,
                "seed": self.config.seed,
            },
        )

    def _keep_pace(self, request: ScanRequest, began: float, settle_s: float, frame_s: float) -> None:
        """Wait until the settle and the frame would be over on a physical instrument (wall clock).

        An abort during the wait stops the scan at the line the beam would have reached.
        """
        deadline = began + settle_s + frame_s
        while (remaining := deadline - time.monotonic()) > 0:
            if self._abort.wait(min(remaining, 0.05)):
                scanned_s = time.monotonic() - began - settle_s
                self._stop(request, int(request.shape[0] * min(max(scanned_s / frame_s, 0.0), 1.0)))

    def _stop(self, request: ScanRequest, rows_scanned: int) -> None:
        """End an aborted scan: dose the lines scanned (at least the first), then raise.

        Raises
        ------
        AcquisitionAborted
            Always, with the lines scanned, their dose averaged over the field and their extent.
        """
        rows = request.shape[0]
        # The beam is on the specimen from the moment the scan starts: at least one line is dosed.
        rows_scanned = min(max(rows_scanned, 1), rows)
        x_min, x_max, y_min, _ = request.extent_nm
        band = (x_min, x_max, y_min, y_min + rows_scanned * request.pixel_size_nm)
        dose = self._description.dose_of(request)
        self.dose_map.add(band, dose)
        raise AcquisitionAborted(
            f"acquisition {request.request_id} was aborted after {rows_scanned} of {rows} lines; those "
            f"lines received {dose:.6g} e-/A^2 (counted), so the id is not exposed again",
            rows_scanned=rows_scanned,
            dose_e_per_a2=dose * rows_scanned / rows,
            extent_nm=band,
        )
