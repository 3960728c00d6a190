"""A microscope that serves crops of a recorded image.

:class:`ReplayMicroscope` places a recorded image (for example a 4000 px
Sm-BFO HAADF frame) on a virtual stage and answers scan requests with the
part of it they cover, resampled to the requested pixel size and degraded to
the requested dose. It lets the agent run on real data offline.

Stage frame: the centre of recorded pixel ``(row, col)`` lies at stage
``x = (col + 0.5) * p``, ``y = (row + 0.5) * p`` nanometres, ``p`` the recorded
pixel size, so the image covers ``[0, W p] x [0, H p]``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError
from scipy import ndimage

from agent.driver import InstrumentDescription, MicroscopeDriver, ScanRequest, Tile
from agent.errors import ConfigError
from simulator.dataset import RecordedImage, UnitCellParameters, load_image

MAX_PIXEL_SIZE_FACTOR = 64.0
"""Largest pixel size offered, as a multiple of the recorded pixel size."""
DEFAULT_BEAM_CURRENT_PA = 50.0
"""Probe current assumed for a recording that does not state one, pA (it scales the dose only)."""
COUNTING_UNITS = frozenset({"counts", "detected electrons", "electrons"})
"""Values of a recording's ``units`` attribute that mean one unit is one detected electron."""

_FRAME_STREAM = 2**31  # spawn-key prefix of expose_frame noise, apart from exposure counts
_PIXEL_SIZE_RTOL = 1e-6
_ALIGNMENT_TOL_PX = 1e-3


def recorded_dose(
    recorded: RecordedImage, dwell_us: float | None = None, counts_per_unit: float | None = None
) -> tuple[float, float]:
    """The dwell and detector gain a recording was made with, from the caller or the file.

    Parameters
    ----------
    recorded : RecordedImage
        The recording; its ``dwell_us``, ``counts_per_unit`` and ``units`` attributes are read.
    dwell_us : float, optional
        Dwell per pixel of the recording, microseconds; overrides the file.
    counts_per_unit : float, optional
        Detected electrons per unit of recorded signal; overrides the file.

    Returns
    -------
    dwell_us, counts_per_unit : float
        Both positive and finite.

    Raises
    ------
    ConfigError
        If either is neither given nor stated by the file, or is not a positive number. The
        message names the command-line options that supply them.
    """
    attrs = recorded.attrs
    if dwell_us is None and "dwell_us" in attrs:
        dwell_us = _number(attrs["dwell_us"])
    if counts_per_unit is None:
        if "counts_per_unit" in attrs:
            counts_per_unit = _number(attrs["counts_per_unit"])
        elif str(attrs.get("units", "")).strip().lower() in COUNTING_UNITS:
            counts_per_unit = 1.0
    wanted = {
        "the dwell it was recorded with (--replay-dwell US)": dwell_us,
        "the detected electrons per unit of its signal (--replay-counts-per-unit C; 1 for counts)": (
            counts_per_unit
        ),
    }
    missing = [what for what, value in wanted.items() if value is None]
    if missing:
        raise ConfigError(
            f"{recorded.source}: the recording does not state its dose; give {' and '.join(missing)}, "
            "so that lower-dose tiles get the right shot noise and the dose reported is the dose delivered"
        )
    assert dwell_us is not None and counts_per_unit is not None
    for name, value in (("recorded dwell", dwell_us), ("counts per unit", counts_per_unit)):
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{recorded.source}: the {name} must be a positive number, got {value}")
    return float(dwell_us), float(counts_per_unit)


def _number(value: Any) -> float:
    try:
        return float(np.asarray(value).reshape(()))
    except (TypeError, ValueError):
        return math.nan  # reported as "not a positive number" with the other checks


@dataclass(frozen=True, eq=False)
class StageUnitCells:
    """Ground-truth unit cells inside a stage rectangle.

    Parameters
    ----------
    cells : UnitCellParameters
        The selected cells, positions still in recorded-image pixels.
    x_nm, y_nm : numpy.ndarray
        Cell centres on the stage, in nanometres, shape ``(N,)``.
    """

    cells: UnitCellParameters
    x_nm: np.ndarray
    y_nm: np.ndarray

    def __len__(self) -> int:
        return int(self.x_nm.shape[0])


class ReplayMicroscope(MicroscopeDriver):
    """Serve tiles cut from a recorded image as if it were a microscope.

    Parameters
    ----------
    recorded : RecordedImage
        The recorded image (see :func:`simulator.dataset.load_image`).
    pixel_size_nm : float, optional
        Recorded pixel size in nanometres; overrides the one in ``recorded``. Required if
        the file carries none.
    beam_current_pa : float, optional
        Probe current the recording was made with, in picoamperes; by default the file's
        ``beam_current_pa`` attribute, else 50 pA.
    recorded_dwell_us : float, optional
        Dwell time per pixel of the recording, in microseconds; by default the file's
        ``dwell_us`` attribute. Required when the file does not state it: requests may not
        dwell longer than the recording (that dose was never recorded).
    counts_per_unit : float, optional
        Detected electrons per unit of recorded signal at ``recorded_dwell_us``; sets the
        shot noise of lower-dose requests. By default the file's ``counts_per_unit``
        attribute, else 1 when its ``units`` attribute says the image is in counts
        (:data:`COUNTING_UNITS`). Required otherwise: a guess makes a normalised image
        collapse to a few grey levels at low dose.
    seed : int
        Seed of the shot noise; the same sequence of requests gives the same tiles.
    max_tile_shape : tuple of int
        Largest tile ``(rows, cols)``, in pixels.
    dwell_range_us : tuple of float
        Shortest and longest dwell per pixel accepted, in microseconds.

    Notes
    -----
    Signal model: the expected signal of a requested pixel is the recorded signal at
    that stage position (low-passed to the requested pixel size), scaled by
    ``dwell / recorded_dwell_us`` in detected electrons. The electrons a pixel receives
    depend on dwell only, not on the pixel area, so a larger pixel is not brighter. For a
    dwell shorter than the recording, detected counts are drawn from a Poisson law with
    mean ``signal * counts_per_unit * dwell / recorded_dwell_us`` and divided back to the
    recorded units, so the tile has the recorded mean and a variance of
    ``signal * recorded_dwell_us / (dwell * counts_per_unit)``. Pixels with a negative
    recorded signal (background-subtracted data) keep their value without shot noise. A
    dwell equal to the recording returns the resampled recorded signal, and a longer one is
    refused (:meth:`describe` offers dwells up to the recorded one): a replay cannot add
    information, or dose, that was never recorded.

    Raises
    ------
    ConfigError
        If the recording does not state (and the caller does not give) its pixel size, dwell
        or counts per unit, or one of them is not a positive number.
    """

    def __init__(
        self,
        recorded: RecordedImage,
        *,
        pixel_size_nm: float | None = None,
        beam_current_pa: float | None = None,
        recorded_dwell_us: float | None = None,
        counts_per_unit: float | None = None,
        seed: int = 0,
        max_tile_shape: tuple[int, int] = (4096, 4096),
        dwell_range_us: tuple[float, float] = (0.1, 100.0),
    ) -> None:
        super().__init__()
        if beam_current_pa is None:
            beam_current_pa = float(recorded.attrs.get("beam_current_pa", DEFAULT_BEAM_CURRENT_PA))
        pixel = pixel_size_nm if pixel_size_nm is not None else recorded.pixel_size_nm
        if pixel is None:
            raise ConfigError(
                f"{recorded.source}: the pixel size of this image is unknown; "
                "pass pixel_size_nm (nanometres per pixel) to replay it"
            )
        recorded_dwell_us, counts_per_unit = recorded_dose(recorded, recorded_dwell_us, counts_per_unit)
        if not (math.isfinite(pixel) and pixel > 0):
            raise ConfigError(
                f"{recorded.source}: the pixel size must be a positive number of nm, got {pixel}"
            )
        self._recorded = recorded
        self._pixel_size_nm = float(pixel)
        self._recorded_dwell_us = float(recorded_dwell_us)
        self._counts_per_unit = float(counts_per_unit)
        self._seed = int(seed)
        rows, cols = recorded.image.shape
        try:
            self._description = InstrumentDescription(
                name=f"replay of {recorded.source.name}",
                stage_x_nm=(0.0, cols * self._pixel_size_nm),
                stage_y_nm=(0.0, rows * self._pixel_size_nm),
                pixel_size_nm=(self._pixel_size_nm, MAX_PIXEL_SIZE_FACTOR * self._pixel_size_nm),
                max_tile_shape=max_tile_shape,
                detectors=("HAADF",),
                beam_current_pa=beam_current_pa,
                # Longer dwells would report dose the recording never received.
                dwell_us=(dwell_range_us[0], min(dwell_range_us[1], self._recorded_dwell_us)),
            )
        except ValidationError as error:
            raise ConfigError(f"invalid replay settings: {error}") from None
        self._clock = time.time()
        self._frames = 0

    @classmethod
    def from_path(cls, path: str | Path, **kwargs: Any) -> ReplayMicroscope:
        """Open a recorded image file and replay it.

        Parameters
        ----------
        path : str or pathlib.Path
            Anything :func:`simulator.dataset.load_image` reads.
        **kwargs
            Keyword arguments of :class:`ReplayMicroscope`; ``pixel_size_nm`` also overrides
            the file's pixel size.

        Returns
        -------
        ReplayMicroscope
            The driver.
        """
        return cls(load_image(path, kwargs.get("pixel_size_nm")), **kwargs)

    # ------------------------------------------------------------------------- state

    @property
    def recorded(self) -> RecordedImage:
        """The recorded image being replayed."""
        return self._recorded

    @property
    def pixel_size_nm(self) -> float:
        """Recorded pixel size, in nanometres."""
        return self._pixel_size_nm

    @property
    def ground_truth(self) -> UnitCellParameters | None:
        """Unit cells of the recording, in recorded pixels; for evaluation only."""
        return self._recorded.uc_parameters

    def uc_parameters_in(self, extent_nm: tuple[float, float, float, float]) -> StageUnitCells | None:
        """Ground-truth unit cells whose centre lies in a stage rectangle.

        Parameters
        ----------
        extent_nm : tuple of float
            ``(x_min, x_max, y_min, y_max)`` in nanometres, e.g. :attr:`Tile.extent_nm`; the
            lower edges are included and the upper ones excluded, so adjacent tiles share no
            cell.

        Returns
        -------
        StageUnitCells or None
            The cells with their centres in stage nanometres; None if the recording has no
            unit-cell parameters.
        """
        cells = self._recorded.uc_parameters
        if cells is None:
            return None
        x_min, x_max, y_min, y_max = extent_nm
        x_nm = (cells.x_px + 0.5) * self._pixel_size_nm
        y_nm = (cells.y_px + 0.5) * self._pixel_size_nm
        inside = (x_nm >= x_min) & (x_nm < x_max) & (y_nm >= y_min) & (y_nm < y_max)
        return StageUnitCells(cells=cells.select(inside), x_nm=x_nm[inside], y_nm=y_nm[inside])

    # ------------------------------------------------------------------------- driver

    def describe(self) -> InstrumentDescription:
        """Return the stage, pixel-size, dwell and tile limits of the replay.

        Returns
        -------
        InstrumentDescription
            Stage ``[0, W p] x [0, H p]`` nm, pixel sizes from the recorded ``p`` to
            64 ``p``, detector ``"HAADF"``.
        """
        return self._description

    def _acquire(self, request: ScanRequest) -> Tile:
        self._raise_if_aborted(request)
        signal, resampled = self._signal(request)
        image, shot_noise = self._expose(signal, request.dwell_us, self.exposures)
        frame_s = request.shape[0] * request.shape[1] * request.dwell_us * 1e-6
        # Virtual instrument clock: scans never overlap and nobody sleeps through them.
        t_start = max(self._clock, time.time())
        t_end = t_start + frame_s
        dose = self._description.dose_of(request)
        tile = Tile(
            image=image,
            request=request,
            origin_nm=request.origin_nm,
            pixel_size_nm=request.pixel_size_nm,
            dose_e_per_a2=dose,
            t_start=t_start,
            t_end=t_end,
            metadata={
                "source": self._recorded.source.name,
                "recorded_pixel_size_nm": self._pixel_size_nm,
                "resampled": resampled,
                "shot_noise": shot_noise,
                "beam_current_pa": self._description.beam_current_pa,
                "recorded_dwell_us": self._recorded_dwell_us,
                "counts_per_unit": self._counts_per_unit,
                "exposure": self.exposures,
                "detector": request.detector,
            },
        )
        self._clock = t_end
        return tile

    def expose_frame(
        self,
        centre_nm: tuple[float, float],
        shape: tuple[int, int],
        pixel_size_nm: float,
        rotation_rad: float,
        dwell_us: float,
    ) -> np.ndarray:
        """A frame of the recording as a scan device turned on the stage would record it.

        For instrument simulators whose scan may be rotated (the Nion Swift usim adapter): the
        same resampling and dose model as :meth:`acquire`, without its limits, dose map or
        request bookkeeping. The frame's column axis points along ``(cos r, sin r)`` in stage
        ``(x, y)``; outside the recording the nearest recorded pixel is repeated.

        Parameters
        ----------
        centre_nm : tuple of float
            Stage position ``(x, y)`` of the frame centre, nanometres.
        shape : tuple of int
            ``(rows, cols)`` in pixels.
        pixel_size_nm : float
            Pixel size, nanometres.
        rotation_rad : float
            Angle of the frame's column axis from the stage x axis, radians.
        dwell_us : float
            Dwell per pixel, microseconds (sets the shot noise).

        Returns
        -------
        numpy.ndarray
            float32 ``(rows, cols)`` in recorded units.
        """
        with self._lock:  # the driver's lock: frames and acquisitions never interleave
            self._frames += 1
            frame = self._frames
        rows, cols = shape
        origin = (
            centre_nm[0] - 0.5 * (cols - 1) * pixel_size_nm,
            centre_nm[1] - 0.5 * (rows - 1) * pixel_size_nm,
        )
        signal, _ = self._signal_at(origin, shape, pixel_size_nm, rotation_rad)
        # Frames get their own noise streams, apart from acquire()'s (keyed by exposure count).
        image, _ = self._expose(signal, dwell_us, (_FRAME_STREAM, frame))
        return image

    def _signal(self, request: ScanRequest) -> tuple[np.ndarray, bool]:
        """Noise-free recorded signal at the requested pixel centres; True if resampled."""
        return self._signal_at(request.origin_nm, request.shape, request.pixel_size_nm, 0.0)

    def _signal_at(
        self,
        origin_nm: tuple[float, float],
        shape: tuple[int, int],
        pixel_size_nm: float,
        rotation_rad: float,
    ) -> tuple[np.ndarray, bool]:
        """Noise-free signal of a frame whose pixel (0, 0) centre would lie at ``origin_nm`` unrotated.

        A rotated frame turns about its centre; ``origin_nm`` is where pixel (0, 0) would be
        without the rotation, so the aligned case is exactly :meth:`_signal`'s request.
        """
        source = self._recorded.image
        height, width = source.shape
        rows, cols = shape
        step = pixel_size_nm / self._pixel_size_nm
        if rotation_rad != 0.0:
            return self._rotated_signal(origin_nm, shape, step, rotation_rad), True
        x0, y0 = origin_nm
        row0 = y0 / self._pixel_size_nm - 0.5
        col0 = x0 / self._pixel_size_nm - 0.5
        r0, c0 = round(row0), round(col0)
        aligned = (
            abs(step - 1.0) <= _PIXEL_SIZE_RTOL
            and abs(row0 - r0) <= _ALIGNMENT_TOL_PX
            and abs(col0 - c0) <= _ALIGNMENT_TOL_PX
            and r0 >= 0
            and r0 + rows <= height
            and c0 >= 0
            and c0 + cols <= width
        )
        if aligned:
            return np.array(source[r0 : r0 + rows, c0 : c0 + cols], dtype=np.float32), False
        # Same second moment as averaging over the coarse pixel, less what the recorded pixel
        # already averaged: removes what the coarse grid would alias without over-blurring.
        sigma = math.sqrt(max(step * step - 1.0, 0.0) / 12.0)
        margin = math.ceil(4.0 * sigma) + 2
        r_lo = max(0, math.floor(row0) - margin)
        r_hi = min(height, math.ceil(row0 + step * (rows - 1)) + margin + 1)
        c_lo = max(0, math.floor(col0) - margin)
        c_hi = min(width, math.ceil(col0 + step * (cols - 1)) + margin + 1)
        window = source[r_lo:r_hi, c_lo:c_hi].astype(np.float64)
        if sigma > 0:
            window = ndimage.gaussian_filter(window, sigma, mode="nearest")
        # A uniform axis-aligned grid is an affine map; this is map_coordinates at the
        # requested pixel centres without materialising a (2, rows, cols) coordinate array.
        signal = ndimage.affine_transform(
            window,
            matrix=np.array([step, step]),
            offset=(row0 - r_lo, col0 - c_lo),
            output_shape=(rows, cols),
            order=1,
            mode="nearest",
        )
        return signal.astype(np.float32), True

    def _rotated_signal(
        self, origin_nm: tuple[float, float], shape: tuple[int, int], step: float, rotation_rad: float
    ) -> np.ndarray:
        """Bilinear samples of the (low-passed) recording on a frame turned about its centre."""
        source = self._recorded.image
        height, width = source.shape
        rows, cols = shape
        p = self._pixel_size_nm
        cos_r, sin_r = math.cos(rotation_rad), math.sin(rotation_rad)
        # Frame centre in recorded pixels; offsets from it turn with the frame.
        centre_row = (origin_nm[1] / p - 0.5) + 0.5 * (rows - 1) * step
        centre_col = (origin_nm[0] / p - 0.5) + 0.5 * (cols - 1) * step
        sigma = math.sqrt(max(step * step - 1.0, 0.0) / 12.0)
        reach = 0.5 * step * math.hypot(rows, cols) + math.ceil(4.0 * sigma) + 2
        r_lo = max(0, math.floor(centre_row - reach))
        r_hi = min(height, math.ceil(centre_row + reach) + 1)
        c_lo = max(0, math.floor(centre_col - reach))
        c_hi = min(width, math.ceil(centre_col + reach) + 1)
        if r_lo >= r_hi or c_lo >= c_hi:  # wholly outside the recording: its nearest edge
            r_lo, r_hi = (height - 1, height) if centre_row >= height else (0, 1)
            c_lo, c_hi = (width - 1, width) if centre_col >= width else (0, 1)
        window = source[r_lo:r_hi, c_lo:c_hi].astype(np.float64)
        if sigma > 0:
            window = ndimage.gaussian_filter(window, sigma, mode="nearest")
        # Output (row, col) -> recorded (row, col): columns step along (cos r, sin r) in (x, y).
        matrix = step * np.array([[cos_r, sin_r], [-sin_r, cos_r]])
        half = np.array([0.5 * (rows - 1), 0.5 * (cols - 1)])
        offset = np.array([centre_row - r_lo, centre_col - c_lo]) - matrix @ half
        signal = ndimage.affine_transform(
            window, matrix=matrix, offset=offset, output_shape=(rows, cols), order=1, mode="nearest"
        )
        return signal.astype(np.float32)

    def _expose(
        self, signal: np.ndarray, dwell_us: float, exposure: int | tuple[int, ...]
    ) -> tuple[np.ndarray, bool]:
        """Apply the shot noise of ``dwell_us``; returns the image and whether noise was added."""
        dose_ratio = dwell_us / self._recorded_dwell_us
        if dose_ratio >= 1.0:
            return signal, False
        key = exposure if isinstance(exposure, tuple) else (exposure,)
        rng = np.random.default_rng(np.random.SeedSequence(self._seed, spawn_key=key))
        scale = self._counts_per_unit * dose_ratio
        expected = signal.astype(np.float64) * scale
        counts = rng.poisson(np.clip(expected, 0.0, None))
        noisy = np.where(expected > 0, counts, expected) / scale
        return noisy.astype(np.float32), True
