"""The driver contract between the agent and a microscope.

An instrument (simulated, replayed or real) implements :class:`MicroscopeDriver`.
The agent only ever sees :class:`InstrumentDescription`, sends
:class:`ScanRequest` objects and receives :class:`Tile` objects.

Conventions
-----------
* Stage positions and sizes are in nanometres, dwell in microseconds, beam
  current in picoamperes, dose in electrons per square angstrom, times in
  seconds since the epoch.
* Images are indexed ``[row, col]``; positions are ``(x, y)`` with x along
  columns and y along rows. A tile's pixel ``(row, col)`` lies at stage
  ``(origin_x + col * pixel_size, origin_y + row * pixel_size)``.
"""

from __future__ import annotations

import math
import threading
import uuid
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agent.errors import (
    AcquisitionAborted,
    DoseLimitError,
    DriverClosedError,
    ExposureInterruptedError,
    InvalidImageError,
    OutOfRangeError,
    OutsideStageError,
    ScanRequestError,
)

ELEMENTARY_CHARGE_C = 1.602176634e-19
"""Charge of one electron, in coulombs."""


def electrons_per_pixel(beam_current_pa: float, dwell_us: float) -> float:
    """Number of electrons the probe delivers while dwelling on one pixel.

    Parameters
    ----------
    beam_current_pa : float
        Probe current, in picoamperes.
    dwell_us : float
        Dwell time per pixel, in microseconds.

    Returns
    -------
    float
        Electrons per pixel.

    Examples
    --------
    >>> round(electrons_per_pixel(50.0, 1.0), 1)
    312.1
    """
    return beam_current_pa * 1e-12 * dwell_us * 1e-6 / ELEMENTARY_CHARGE_C


def dose_e_per_a2(beam_current_pa: float, dwell_us: float, pixel_size_nm: float) -> float:
    """Electron dose delivered to the specimen by one scan, in electrons per square angstrom.

    Parameters
    ----------
    beam_current_pa : float
        Probe current, in picoamperes.
    dwell_us : float
        Dwell time per pixel, in microseconds.
    pixel_size_nm : float
        Pixel size, in nanometres (1 nm = 10 Å).

    Returns
    -------
    float
        Dose in e-/Å².

    Examples
    --------
    >>> round(dose_e_per_a2(50.0, 1.0, 0.01), 0)
    31208.0
    """
    pixel_area_a2 = (pixel_size_nm * 10.0) ** 2
    return electrons_per_pixel(beam_current_pa, dwell_us) / pixel_area_a2


class ScanRequest(BaseModel):
    """One scan the agent asks the instrument to perform.

    Parameters
    ----------
    x_nm, y_nm : float
        Stage position of the tile centre, in nanometres.
    shape : tuple of int
        Tile shape ``(rows, cols)`` in pixels.
    pixel_size_nm : float
        Pixel size, in nanometres.
    dwell_us : float
        Dwell time per pixel, in microseconds.
    detector : str
        Detector to read, for example ``"HAADF"``.
    request_id : str
        Unique id; retrying a request with the same id must never expose twice.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    x_nm: float
    y_nm: float
    shape: tuple[int, int]
    pixel_size_nm: float = Field(gt=0)
    dwell_us: float = Field(gt=0)
    detector: str = "HAADF"
    request_id: str = Field(default_factory=lambda: uuid.uuid4().hex, min_length=1)

    @field_validator("x_nm", "y_nm", "pixel_size_nm", "dwell_us")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {value}")
        return value

    @field_validator("shape")
    @classmethod
    def _positive_shape(cls, value: tuple[int, int]) -> tuple[int, int]:
        if value[0] < 1 or value[1] < 1:
            raise ValueError(f"tile shape must be at least 1x1 pixels, got {value}")
        return value

    @property
    def width_nm(self) -> float:
        """Field of view along x (columns), in nanometres."""
        return self.shape[1] * self.pixel_size_nm

    @property
    def height_nm(self) -> float:
        """Field of view along y (rows), in nanometres."""
        return self.shape[0] * self.pixel_size_nm

    @property
    def origin_nm(self) -> tuple[float, float]:
        """Stage position ``(x, y)`` of the centre of pixel ``(0, 0)``, in nanometres."""
        return (
            self.x_nm - 0.5 * (self.shape[1] - 1) * self.pixel_size_nm,
            self.y_nm - 0.5 * (self.shape[0] - 1) * self.pixel_size_nm,
        )

    @property
    def extent_nm(self) -> tuple[float, float, float, float]:
        """Area the scan covers, ``(x_min, x_max, y_min, y_max)`` in nanometres (pixel edges)."""
        half_w, half_h = 0.5 * self.width_nm, 0.5 * self.height_nm
        return (self.x_nm - half_w, self.x_nm + half_w, self.y_nm - half_h, self.y_nm + half_h)


class InstrumentDescription(BaseModel):
    """What an instrument can do; the agent plans within these limits.

    Parameters
    ----------
    name : str
        Human-readable instrument name.
    stage_x_nm, stage_y_nm : tuple of float
        Accessible stage range ``(min, max)``; a whole tile must lie inside, in nanometres.
    pixel_size_nm : tuple of float
        Smallest and largest pixel size, in nanometres.
    max_tile_shape : tuple of int
        Largest tile ``(rows, cols)`` in pixels.
    detectors : list of str
        Detector names accepted in :attr:`ScanRequest.detector`.
    beam_current_pa : float
        Probe current, in picoamperes.
    dwell_us : tuple of float
        Shortest and longest dwell time per pixel, in microseconds.
    max_dose_e_per_a2 : float or None
        Per-area dose limit the instrument enforces, in e-/Å²; None for no limit.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    stage_x_nm: tuple[float, float]
    stage_y_nm: tuple[float, float]
    pixel_size_nm: tuple[float, float]
    max_tile_shape: tuple[int, int]
    detectors: tuple[str, ...] = ("HAADF",)
    beam_current_pa: float = Field(gt=0)
    dwell_us: tuple[float, float]
    max_dose_e_per_a2: float | None = None

    @model_validator(mode="after")
    def _ordered_ranges(self) -> Self:
        for name in ("stage_x_nm", "stage_y_nm", "pixel_size_nm", "dwell_us"):
            low, high = getattr(self, name)
            if not low <= high:
                raise ValueError(f"{name} must be (min, max) with min <= max, got {(low, high)}")
        return self

    def check(self, request: ScanRequest) -> None:
        """Raise if the instrument cannot execute ``request``; return silently otherwise.

        Parameters
        ----------
        request : ScanRequest
            The scan to check.

        Raises
        ------
        OutOfRangeError
            If the detector, shape, pixel size or dwell is outside the instrument range.
        OutsideStageError
            If any part of the field of view lies outside the stage limits.
        """
        if request.detector not in self.detectors:
            raise OutOfRangeError(
                f"detector {request.detector!r} is not available on {self.name}; "
                f"choose one of {list(self.detectors)}"
            )
        rows, cols = request.shape
        if rows > self.max_tile_shape[0] or cols > self.max_tile_shape[1]:
            raise OutOfRangeError(
                f"tile shape {rows}x{cols} px exceeds the largest tile "
                f"{self.max_tile_shape[0]}x{self.max_tile_shape[1]} px"
            )
        low, high = self.pixel_size_nm
        if not low <= request.pixel_size_nm <= high:
            raise OutOfRangeError(
                f"pixel size {request.pixel_size_nm:g} nm is outside the range {low:g}-{high:g} nm"
            )
        low, high = self.dwell_us
        if not low <= request.dwell_us <= high:
            raise OutOfRangeError(f"dwell {request.dwell_us:g} us is outside the range {low:g}-{high:g} us")
        x_min, x_max, y_min, y_max = request.extent_nm
        # A tiny tolerance keeps a tile that exactly fills the stage from failing on rounding.
        tolerance = 1e-9 * max(1.0, abs(self.stage_x_nm[1]), abs(self.stage_y_nm[1]))
        for axis, (low_edge, high_edge), (stage_low, stage_high) in (
            ("x", (x_min, x_max), self.stage_x_nm),
            ("y", (y_min, y_max), self.stage_y_nm),
        ):
            if low_edge < stage_low - tolerance or high_edge > stage_high + tolerance:
                raise OutsideStageError(
                    f"requested field spans {axis} = {low_edge:.3f} to {high_edge:.3f} nm, "
                    f"outside the stage limits {stage_low:.3f} to {stage_high:.3f} nm; "
                    f"move the tile centre or make the tile smaller"
                )

    def dose_of(self, request: ScanRequest) -> float:
        """Dose one execution of ``request`` delivers, in e-/Å²."""
        return dose_e_per_a2(self.beam_current_pa, request.dwell_us, request.pixel_size_nm)


@dataclass(frozen=True)
class Tile:
    """An image acquired for one :class:`ScanRequest`, placed on the stage.

    Parameters
    ----------
    image : numpy.ndarray
        Detector signal, float32, shape ``(rows, cols)``.
    request : ScanRequest
        The request that produced the tile.
    origin_nm : tuple of float
        Stage position ``(x, y)`` of the centre of pixel ``(0, 0)``, in nanometres.
    pixel_size_nm : float
        Pixel size, in nanometres.
    dose_e_per_a2 : float
        Dose delivered by this scan, in e-/Å².
    t_start, t_end : float
        Start and end of the scan, in seconds since the epoch (instrument clock).
    metadata : dict
        Free instrument metadata (beam current, detector gain, ...); JSON-serialisable values.
    """

    image: np.ndarray
    request: ScanRequest
    origin_nm: tuple[float, float]
    pixel_size_nm: float
    dose_e_per_a2: float
    t_start: float
    t_end: float
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.image.ndim != 2:
            raise InvalidImageError(f"a tile image must be 2-D (rows, cols), got shape {self.image.shape}")
        if self.image.dtype != np.float32:
            raise InvalidImageError(f"a tile image must be float32, got {self.image.dtype}")
        if tuple(self.image.shape) != tuple(self.request.shape):
            raise InvalidImageError(
                f"tile image shape {self.image.shape} differs from the requested {self.request.shape}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        """Image shape ``(rows, cols)`` in pixels."""
        return (int(self.image.shape[0]), int(self.image.shape[1]))

    @property
    def extent_nm(self) -> tuple[float, float, float, float]:
        """Area covered, ``(x_min, x_max, y_min, y_max)`` in nanometres, to the pixel edges."""
        x0, y0 = self.origin_nm
        half = 0.5 * self.pixel_size_nm
        rows, cols = self.shape
        return (
            x0 - half,
            x0 + (cols - 1) * self.pixel_size_nm + half,
            y0 - half,
            y0 + (rows - 1) * self.pixel_size_nm + half,
        )

    def pixel_to_stage(self, row: Any, col: Any) -> tuple[np.ndarray, np.ndarray]:
        """Stage position of (fractional) pixel coordinates.

        Parameters
        ----------
        row, col : array_like
            Pixel coordinates; integer values are pixel centres.

        Returns
        -------
        x_nm, y_nm : numpy.ndarray
            Stage coordinates, in nanometres.
        """
        x0, y0 = self.origin_nm
        return (
            x0 + np.asarray(col, dtype=float) * self.pixel_size_nm,
            y0 + np.asarray(row, dtype=float) * self.pixel_size_nm,
        )

    def stage_to_pixel(self, x_nm: Any, y_nm: Any) -> tuple[np.ndarray, np.ndarray]:
        """Fractional pixel coordinates ``(row, col)`` of stage positions.

        Parameters
        ----------
        x_nm, y_nm : array_like
            Stage coordinates, in nanometres.

        Returns
        -------
        row, col : numpy.ndarray
            Fractional pixel coordinates.
        """
        x0, y0 = self.origin_nm
        return (
            (np.asarray(y_nm, dtype=float) - y0) / self.pixel_size_nm,
            (np.asarray(x_nm, dtype=float) - x0) / self.pixel_size_nm,
        )


def require_finite(image: np.ndarray, source: str) -> None:
    """Reject an image with NaN or infinite pixels.

    Parameters
    ----------
    image : numpy.ndarray
        The image to check.
    source : str
        Where the image came from (file name, dataset key), used in the message.

    Raises
    ------
    InvalidImageError
        If any pixel is NaN or infinite; the message gives the count.
    """
    bad = int(np.count_nonzero(~np.isfinite(image)))
    if bad:
        raise InvalidImageError(
            f"{source}: {bad} of {image.size} pixels are NaN or infinite; "
            "fix or mask them before using this image"
        )


class DoseMap:
    """Accumulated electron dose over the stage, on a grid of square cells.

    A scan adds its dose to every cell it covers, weighted by the covered
    fraction of the cell, so repeated exposure of an area shows up and can be
    limited before it happens.

    Parameters
    ----------
    stage_x_nm, stage_y_nm : tuple of float
        Stage range ``(min, max)`` the map covers, nanometres.
    cell_nm : float
        Cell edge, nanometres.

    Examples
    --------
    >>> dose = DoseMap((0.0, 10.0), (0.0, 10.0), cell_nm=1.0)
    >>> dose.add((0.0, 2.0, 0.0, 1.0), 100.0)
    >>> float(dose.map_e_per_a2[0, :3].sum())
    200.0
    """

    def __init__(
        self, stage_x_nm: tuple[float, float], stage_y_nm: tuple[float, float], cell_nm: float
    ) -> None:
        if cell_nm <= 0:
            raise ValueError(f"dose-map cell must be positive, got {cell_nm} nm")
        self.stage_x_nm = stage_x_nm
        self.stage_y_nm = stage_y_nm
        self.cell_nm = cell_nm
        cols = max(math.ceil((stage_x_nm[1] - stage_x_nm[0]) / cell_nm), 1)
        rows = max(math.ceil((stage_y_nm[1] - stage_y_nm[0]) / cell_nm), 1)
        self.map_e_per_a2 = np.zeros((rows, cols), dtype=np.float64)

    @staticmethod
    def _coverage(low: float, high: float, origin: float, cell: float, count: int) -> np.ndarray:
        edges = origin + cell * np.arange(count + 1)
        overlap = np.minimum(edges[1:], high) - np.maximum(edges[:-1], low)
        return np.clip(overlap, 0.0, None) / cell

    def exposure(self, extent_nm: tuple[float, float, float, float], dose: float) -> np.ndarray:
        """Dose each cell would receive from one scan of ``extent_nm``, in e-/Å².

        Parameters
        ----------
        extent_nm : tuple of float
            ``(x_min, x_max, y_min, y_max)`` of the scan, nanometres.
        dose : float
            Dose of the scan, e-/Å².

        Returns
        -------
        numpy.ndarray
            Array shaped like :attr:`map_e_per_a2`.
        """
        rows, cols = self.map_e_per_a2.shape
        fx = self._coverage(extent_nm[0], extent_nm[1], self.stage_x_nm[0], self.cell_nm, cols)
        fy = self._coverage(extent_nm[2], extent_nm[3], self.stage_y_nm[0], self.cell_nm, rows)
        return dose * np.outer(fy, fx)

    def check(self, extent_nm: tuple[float, float, float, float], dose: float, limit: float) -> None:
        """Raise :class:`~agent.errors.DoseLimitError` if the scan would exceed ``limit`` anywhere.

        Parameters
        ----------
        extent_nm : tuple of float
            ``(x_min, x_max, y_min, y_max)`` of the scan, nanometres.
        dose : float
            Dose of the scan, e-/Å².
        limit : float
            Largest dose any cell may accumulate, e-/Å².
        """
        after = self.map_e_per_a2 + self.exposure(extent_nm, dose)
        worst = np.unravel_index(int(np.argmax(after)), after.shape)
        if after[worst] > limit * (1 + 1e-9):
            x = self.stage_x_nm[0] + (worst[1] + 0.5) * self.cell_nm
            y = self.stage_y_nm[0] + (worst[0] + 0.5) * self.cell_nm
            raise DoseLimitError(
                f"this scan ({dose:.6g} e-/A^2) would bring the area near x = {x:.1f} nm, "
                f"y = {y:.1f} nm to {after[worst]:.6g} e-/A^2, above the per-area limit of "
                f"{limit:.6g} e-/A^2 (already {self.map_e_per_a2[worst]:.6g}); scan elsewhere, "
                "or lower the dwell or enlarge the pixel"
            )

    def add(self, extent_nm: tuple[float, float, float, float], dose: float) -> None:
        """Record one scan of ``extent_nm`` delivering ``dose`` e-/Å²."""
        self.map_e_per_a2 += self.exposure(extent_nm, dose)

    def dose_at(self, x_nm: float, y_nm: float) -> float:
        """Accumulated dose of the cell holding stage position ``(x, y)``, e-/Å²."""
        rows, cols = self.map_e_per_a2.shape
        col = min(max(int((x_nm - self.stage_x_nm[0]) // self.cell_nm), 0), cols - 1)
        row = min(max(int((y_nm - self.stage_y_nm[0]) // self.cell_nm), 0), rows - 1)
        return float(self.map_e_per_a2[row, col])


class MicroscopeDriver(ABC):
    """A microscope as the agent sees it: describe, acquire, abort, close.

    Subclasses implement :meth:`describe` and :meth:`_acquire`. :meth:`acquire`
    validates every request against the description first, so an impossible
    request raises before anything is exposed, serialises acquisitions, keeps
    the exposure count and total dose, and answers a retried request id with the
    tile it already made, so a retry never exposes the specimen twice. Drivers are context managers::

        with SimulatedMicroscope(config) as microscope:
            tile = microscope.acquire(request)
    """

    recent_tiles: int = 8
    """How many recent tiles are kept for answering retried request ids."""

    def __init__(self) -> None:
        self._closed = False
        self._abort = threading.Event()
        self._lock = threading.RLock()
        self._recent: OrderedDict[str, Tile] = OrderedDict()
        self._spent: dict[str, ScanRequest] = {}  # ids aborted mid-scan: never exposed again
        self._exposures = 0
        self._total_dose = 0.0

    @abstractmethod
    def describe(self) -> InstrumentDescription:
        """Return the instrument's limits and capabilities."""

    @abstractmethod
    def _acquire(self, request: ScanRequest) -> Tile:
        """Expose and read out one validated request."""

    def check(self, request: ScanRequest) -> None:
        """Raise a :class:`~agent.errors.ScanRequestError` if ``request`` cannot be executed.

        The base implementation checks the instrument description; drivers with
        further limits (dose per area, for example) extend it.
        """
        self.describe().check(request)

    def acquire(self, request: ScanRequest, *, abort: threading.Event | None = None) -> Tile:
        """Acquire one tile; a retried request id returns the same tile without exposing again.

        Parameters
        ----------
        request : ScanRequest
            What to scan.
        abort : threading.Event, optional
            This acquisition's own stop flag, for a caller that may stop it from another thread
            before it is known whether it has started (the instrument server): set the event,
            then call :meth:`abort`. Unlike :meth:`abort` alone, an event set before the
            acquisition starts is not forgotten.

        Returns
        -------
        Tile
            The image with its stage placement and dose.

        Raises
        ------
        DriverClosedError
            If the driver was closed.
        ScanRequestError
            If the request is outside the instrument limits (nothing is exposed), or its id
            was already used for a different scan.
        AcquisitionAborted
            If :meth:`abort` was called during the acquisition. When the scan had started
            (:attr:`~agent.errors.AcquisitionAborted.exposed`), its partial exposure is counted and
            the id is spent.
        ExposureInterruptedError
            If this id was aborted after its scan started, earlier in this process: it is never
            exposed again.
        """
        if self._closed:
            raise DriverClosedError(f"{type(self).__name__} is closed; open a new driver to acquire")
        with self._lock:
            cached = self._recent.get(request.request_id)
            if cached is not None:
                if cached.request != request:
                    raise ScanRequestError(
                        f"request id {request.request_id} was already used for a different scan; "
                        "give every new scan a new id"
                    )
                return cached
            spent = self._spent.get(request.request_id)
            if spent is not None:
                if spent != request:
                    raise ScanRequestError(
                        f"request id {request.request_id} was already used for a different scan; "
                        "give every new scan a new id"
                    )
                raise ExposureInterruptedError(
                    f"request {request.request_id} was aborted after its scan had started, so part of the "
                    "field received dose; it is not exposed again under this id; send a new request if "
                    "the area must be scanned again"
                )
            self.check(request)
            # Forget an abort meant for an earlier acquisition, but not one meant for this one.
            self._abort.clear()
            if abort is not None and abort.is_set():
                self._abort.set()
            try:
                tile = self._acquire(request)
            except AcquisitionAborted as stopped:
                if stopped.exposed:
                    self._exposures += 1
                    self._total_dose += stopped.dose_e_per_a2
                    self._spent[request.request_id] = request
                raise
            self._exposures += 1
            self._total_dose += tile.dose_e_per_a2
            self._recent[request.request_id] = tile
            while len(self._recent) > self.recent_tiles:
                self._recent.popitem(last=False)
            return tile

    @property
    def exposures(self) -> int:
        """Number of exposures made, aborted ones that had started included (cached retries are not)."""
        return self._exposures

    @property
    def total_dose_e_per_a2(self) -> float:
        """Dose summed over all exposures (each counted once, whatever its area), e-/Å².

        An aborted exposure adds its dose averaged over the requested field (per-area dose times
        the fraction of lines scanned, :class:`~agent.errors.AcquisitionAborted`).
        """
        return self._total_dose

    def resume_after(self, requests: Sequence[ScanRequest], t_end: float | None) -> None:
        """Bring the instrument's physical state up to date after the agent restarted.

        The requests already executed, in order, and the instrument time the last one
        ended. Exposes nothing. A real instrument kept its state, so the default does
        nothing; a simulated one that restarted with the agent replays its stage moves
        and drift.

        Parameters
        ----------
        requests : sequence of ScanRequest
            The requests already executed, in order.
        t_end : float or None
            Instrument time the last one ended, seconds since the epoch; None when unknown.
        """
        del requests, t_end

    def abort(self) -> None:
        """Ask the acquisition in progress (if any) to stop as soon as possible."""
        self._abort.set()

    @property
    def abort_requested(self) -> bool:
        """True once :meth:`abort` was called for the acquisition in progress; for subclasses that poll."""
        return self._abort.is_set()

    def _raise_if_aborted(self, request: ScanRequest) -> None:
        """Raise :class:`AcquisitionAborted` if :meth:`abort` was called; for subclasses."""
        if self._abort.is_set():
            raise AcquisitionAborted(f"acquisition {request.request_id} was aborted")

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has been called."""
        return self._closed

    def close(self) -> None:
        """Release the instrument; later :meth:`acquire` calls raise."""
        self._closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
