"""HAADF-STEM image formation for the synthetic specimen.

Each column images as a Gaussian blob (probe convolved with the column's
spread) whose height is proportional to its scattering weight, the sum of
Z**1.7 over its atoms. The signal of a pixel is the blob averaged over the
pixel's area, so the same code serves atomic-resolution tiles (0.01 nm/px)
and survey scans where columns blur into contrast (several Å/px). Counting
noise is Poisson in the number of electrons per pixel (beam current x dwell);
the detector adds Gaussian read noise; the scan adds line-to-line jitter,
slow drift and a lag of the beam at the start of each line (flyback settling).

Only the columns inside the window (plus a margin) are touched, so the cost
depends on the window, not on the specimen size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch

from simulator.config import ImagingConfig
from simulator.specimen import Specimen

_COLUMN_CHUNK = 8192  # columns summed together (fixes the rounding of every pixel: never change it)
_STEP_ELEMENTS = 1 << 19  # blob pixel values evaluated between two looks at an abort flag
_SQRT_2PI = math.sqrt(2 * math.pi)


def line_time_us(cols: int, dwell_us: float, imaging: ImagingConfig) -> float:
    """Time to scan one line, flyback included, in microseconds."""
    return cols * dwell_us + imaging.flyback_us


def frame_time_s(shape: tuple[int, int], dwell_us: float, imaging: ImagingConfig) -> float:
    """Time to scan a whole tile, in seconds.

    Parameters
    ----------
    shape : tuple of int
        ``(rows, cols)`` in pixels.
    dwell_us : float
        Dwell per pixel, microseconds.
    imaging : ImagingConfig
        Gives the flyback time.

    Returns
    -------
    float
        Frame time in seconds.
    """
    return shape[0] * line_time_us(shape[1], dwell_us, imaging) * 1e-6


def scan_offsets_px(
    shape: tuple[int, int],
    pixel_size_nm: float,
    dwell_us: float,
    imaging: ImagingConfig,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Where each scan line really was, relative to where it was meant to be.

    Drift accumulates from the start of the frame at the constant rate ``drift_nm_per_s``;
    jitter is drawn per line. (The simulated microscope integrates drift over its own clock
    instead, continuing from frame to frame; see :class:`simulator.drivers.SimulatedMicroscope`.)

    Parameters
    ----------
    shape : tuple of int
        ``(rows, cols)`` in pixels.
    pixel_size_nm : float
        Pixel size, nanometres.
    dwell_us : float
        Dwell per pixel, microseconds.
    imaging : ImagingConfig
        Drift, jitter and flyback.
    rng : numpy.random.Generator
        Source of the jitter.

    Returns
    -------
    dx_px, dy_px : numpy.ndarray
        Per-row offsets along x and y, in pixels.
    """
    rows = shape[0]
    t_row_s = np.arange(rows) * line_time_us(shape[1], dwell_us, imaging) * 1e-6
    dx_nm = imaging.drift_nm_per_s[0] * t_row_s
    dy_nm = imaging.drift_nm_per_s[1] * t_row_s
    if imaging.line_jitter_nm > 0:
        dx_nm = dx_nm + rng.normal(0.0, imaging.line_jitter_nm, rows)
    return dx_nm / pixel_size_nm, dy_nm / pixel_size_nm


def flyback_offsets_nm(cols: int, dwell_us: float, imaging: ImagingConfig) -> np.ndarray:
    """Line-start lag of the beam after flyback: the x offset of each column, in nanometres.

    The scan coils settle after each flyback, so the beam trails its nominal position at
    the start of a line: column ``c``, reached ``t = c * dwell`` after the line started, is
    offset by ``flyback_settle_nm * exp(-t / flyback_settle_us)``.

    Parameters
    ----------
    cols : int
        Pixels per line.
    dwell_us : float
        Dwell per pixel, microseconds.
    imaging : ImagingConfig
        Gives the lag amplitude and its decay time.

    Returns
    -------
    numpy.ndarray
        Offset of each column along x, nanometres, shape ``(cols,)``.

    Examples
    --------
    >>> lag = flyback_offsets_nm(4, 30.0, ImagingConfig(flyback_settle_nm=0.02, flyback_settle_us=30.0))
    >>> [round(float(value), 5) for value in lag]
    [0.02, 0.00736, 0.00271, 0.001]
    """
    t_us = np.arange(cols) * dwell_us
    return imaging.flyback_settle_nm * np.exp(-t_us / imaging.flyback_settle_us)


def _normal_cdf(z: np.ndarray) -> np.ndarray:
    """Standard normal CDF in float32; torch's vectorised erf is an order of magnitude faster than scipy's."""
    # Only erf runs in torch: the float32 scaling is the same IEEE operation in numpy, and each torch
    # call costs a thread-pool round trip, which a loaded machine makes expensive.
    values = np.ascontiguousarray(z, dtype=np.float32) * np.float32(1.0 / math.sqrt(2.0))
    erf = torch.from_numpy(values)
    torch.erf(erf, out=erf)
    values += np.float32(1.0)
    values *= np.float32(0.5)
    return values


def _pixel_averaged_gaussian(edges: np.ndarray, sigma_px: float) -> np.ndarray:
    """Mean of exp(-d²/2σ²) over consecutive pixel intervals whose edges are ``edges`` (last axis)."""
    cdf = _normal_cdf(edges / sigma_px)
    return (cdf[..., 1:] - cdf[..., :-1]) * np.float32(sigma_px * _SQRT_2PI)


def column_signal(
    x_px: np.ndarray,
    y_px: np.ndarray,
    weight: np.ndarray,
    shape: tuple[int, int],
    sigma_px: float,
    dx_px: np.ndarray | None = None,
    dy_px: np.ndarray | None = None,
    dx_col_px: np.ndarray | None = None,
) -> np.ndarray:
    """Sum of pixel-averaged Gaussian blobs, one per column.

    Parameters
    ----------
    x_px, y_px : numpy.ndarray
        Column positions in pixel coordinates (x along columns, y along rows; integers are pixel centres).
    weight : numpy.ndarray
        Peak height of each blob before pixel averaging.
    shape : tuple of int
        Output ``(rows, cols)``.
    sigma_px : float
        Blob width, pixels.
    dx_px, dy_px : numpy.ndarray, optional
        Per-row scan offsets (see :func:`scan_offsets_px`): row ``i`` images the
        specimen at ``(col + dx[i], i + dy[i])``.
    dx_col_px : numpy.ndarray, optional
        Per-column x offsets (see :func:`flyback_offsets_nm`), added to the per-row ones:
        pixel ``(i, j)`` images the specimen at ``(j + dx[i] + dx_col[j], i + dy[i])``,
        averaged over the pixel's width shifted by the same amount.

    Returns
    -------
    numpy.ndarray
        float64 image of shape ``shape``.

    Examples
    --------
    >>> image = column_signal(np.array([4.3]), np.array([5.0]), np.array([1.0]), (10, 10), 1.0)
    >>> int(image.argmax() // 10), int(image.argmax() % 10)
    (5, 4)
    """
    image = np.zeros(shape, dtype=np.float64)
    for _ in column_signal_steps(image, x_px, y_px, weight, sigma_px, dx_px, dy_px, dx_col_px):
        pass
    return image


def column_signal_steps(
    image: np.ndarray,
    x_px: np.ndarray,
    y_px: np.ndarray,
    weight: np.ndarray,
    sigma_px: float,
    dx_px: np.ndarray | None = None,
    dy_px: np.ndarray | None = None,
    dx_col_px: np.ndarray | None = None,
    *,
    step_elements: int | None = None,
) -> Iterator[int]:
    """Add the blobs of :func:`column_signal` to ``image`` in small steps, saying which rows are final.

    The work is done in the same order, with the same floating-point operations, as one call of
    :func:`column_signal`, so the finished image is bit-identical; the steps only let a caller
    (a scan that may be aborted) look at something between them. Columns are taken in the
    order given, which for :meth:`~simulator.specimen.Specimen.columns_in` runs along y, so the
    final rows grow from the top of the tile like a raster scan.

    Parameters
    ----------
    image : numpy.ndarray
        float64 array of shape ``(rows, cols)``, zeros, C-contiguous; filled in place.
    x_px, y_px, weight, sigma_px, dx_px, dy_px, dx_col_px
        As for :func:`column_signal`.
    step_elements : int, optional
        Pixel values evaluated per step (by default ``_STEP_ELEMENTS``, some 30 ms of work on one core).

    Yields
    ------
    int
        After each step: rows ``[0, n)`` of ``image`` are final (no later step changes them).
    """
    rows, cols = image.shape
    flat_image = image.reshape(-1)
    if x_px.size == 0:
        yield rows
        return
    distorted = dx_px is not None or dy_px is not None
    dx = np.zeros(rows) if dx_px is None else np.asarray(dx_px, dtype=float)
    dy = np.zeros(rows) if dy_px is None else np.asarray(dy_px, dtype=float)
    dx_col = None if dx_col_px is None else np.asarray(dx_col_px, dtype=float)
    line_y = np.arange(rows) + dy  # where each line really sampled the specimen
    reach = math.ceil(4.0 * sigma_px) + 1
    span = 2 * reach + 1
    offsets = np.arange(span)
    # Per-column offsets move the pixels that see a blob by up to their largest value.
    reach_x = reach + (0 if dx_col is None else math.ceil(float(np.abs(dx_col).max())))
    span_x = 2 * reach_x + 1
    offsets_x = np.arange(span_x)
    sqrt_2pi_sigma = np.float32(sigma_px * _SQRT_2PI)
    step_columns = max(1, (step_elements or _STEP_ELEMENTS) // (span * (span_x + 1)))
    # The first row each chunk of columns touches; rows above every later chunk's first row are final.
    first_row = np.clip(np.clip(np.searchsorted(line_y, y_px), 0, rows - 1) - reach, 0, rows)
    chunk_first = np.minimum.reduceat(first_row, np.arange(0, x_px.size, _COLUMN_CHUNK))
    final_after = np.append(np.minimum.accumulate(chunk_first[::-1])[::-1][1:], rows)

    for chunk, start in enumerate(range(0, x_px.size, _COLUMN_CHUNK)):
        stop = min(start + _COLUMN_CHUNK, x_px.size)
        kept_flat: list[np.ndarray] = []
        kept_values: list[np.ndarray] = []
        # A chunk is evaluated in steps of columns, then summed at once exactly as a whole chunk:
        # every value is elementwise, so splitting it changes no bit of the result.
        for part in range(start, stop, step_columns):
            end = min(part + step_columns, stop)
            u = x_px[part:end]
            v = y_px[part:end]
            w = weight[part:end]
            centre_row = np.clip(np.searchsorted(line_y, v), 0, rows - 1)
            row0 = centre_row - reach
            patch_rows = row0[:, None] + offsets[None, :]  # (k, span)
            valid_row = (patch_rows >= 0) & (patch_rows < rows)
            safe_rows = np.clip(patch_rows, 0, rows - 1)
            # The pixel height is averaged like its width, so survey pixels integrate the columns.
            line_to_column = line_y[safe_rows] - v[:, None]
            # Both edges in one call: each value is elementwise, and every call has a fixed cost.
            cdf = _normal_cdf(
                np.stack([(line_to_column + 0.5) / sigma_px, (line_to_column - 0.5) / sigma_px])
            )
            gy = (cdf[0] - cdf[1]) * (sigma_px * _SQRT_2PI) * valid_row
            col0 = np.rint(u - dx[centre_row]).astype(np.int64) - reach_x
            patch_cols = col0[:, None] + offsets_x[None, :]  # (k, span_x)
            if dx_col is not None:
                # Each pixel's interval is shifted by its line's and its column's offset: (k, span, span_x).
                left = (patch_cols - 0.5 + dx_col[np.clip(patch_cols, 0, cols - 1)] - u[:, None])[
                    :, None, :
                ] + dx[safe_rows][:, :, None]
                cdf = _normal_cdf(np.stack([(left + 1.0) / sigma_px, left / sigma_px]))
                gx = (cdf[0] - cdf[1]) * sqrt_2pi_sigma
                patch = gx * (gy * w[:, None])[:, :, None]
            elif distorted:
                # Each line has its own x offset: (k, span rows, span + 1 edges).
                edges = (
                    (col0[:, None] - 0.5 - u[:, None])[:, :, None]
                    + dx[safe_rows][:, :, None]
                    + np.arange(span_x + 1)[None, None, :]
                )
                gx = _pixel_averaged_gaussian(edges, sigma_px)
                patch = gx * (gy * w[:, None])[:, :, None]
            else:
                edges = col0[:, None] + np.arange(span_x + 1)[None, :] - 0.5 - u[:, None]
                gx = _pixel_averaged_gaussian(edges, sigma_px)
                patch = (gy * w[:, None])[:, :, None] * gx[:, None, :]
            valid_col = (patch_cols >= 0) & (patch_cols < cols)
            flat = safe_rows[:, :, None] * cols + np.clip(patch_cols, 0, cols - 1)[:, None, :]
            keep = valid_row[:, :, None] & valid_col[:, None, :]
            kept_flat.append(flat[keep])
            kept_values.append(patch[keep])
            if end < stop:
                yield int(final_after[chunk - 1]) if chunk else 0
        flat = kept_flat[0] if len(kept_flat) == 1 else np.concatenate(kept_flat)
        values = kept_values[0] if len(kept_values) == 1 else np.concatenate(kept_values)
        if flat.size:
            low = int(flat.min())
            flat_image[low : int(flat.max()) + 1] += np.bincount(flat - low, weights=values)
        yield int(final_after[chunk])


def _largest(*offsets: np.ndarray | None) -> float:
    """Sum of the largest magnitudes of the given offsets (None counts as zero)."""
    return sum(0.0 if offset is None else float(np.abs(offset).max()) for offset in offsets)


def _sampled_grid_px(
    shape: tuple[int, int],
    dx_px: np.ndarray | None,
    dy_px: np.ndarray | None,
    dx_col_px: np.ndarray | None,
    rows: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates ``(x, y)`` each pixel really sampled, broadcastable to ``shape``.

    With ``rows = (start, stop)`` only those rows, broadcastable to ``(stop - start, cols)``.
    """
    start, stop = (0, shape[0]) if rows is None else rows
    cols = shape[1]
    x = np.arange(cols, dtype=float)[None, :]
    y = np.arange(start, stop, dtype=float)[:, None]
    if dx_col_px is not None:
        x = x + np.asarray(dx_col_px, dtype=float)[None, :]
    if dx_px is not None:
        x = x + np.asarray(dx_px, dtype=float)[start:stop, None]
    if dy_px is not None:
        y = y + np.asarray(dy_px, dtype=float)[start:stop, None]
    return x, y


def render_expected_counts(
    specimen: Specimen,
    origin_nm: tuple[float, float],
    shape: tuple[int, int],
    pixel_size_nm: float,
    electrons_per_pixel: float,
    imaging: ImagingConfig,
    dx_px: np.ndarray | None = None,
    dy_px: np.ndarray | None = None,
    dx_col_px: np.ndarray | None = None,
) -> np.ndarray:
    """Noise-free HAADF signal of a window, in detected electrons per pixel.

    Parameters
    ----------
    specimen : Specimen
        The specimen to image.
    origin_nm : tuple of float
        Stage position ``(x, y)`` of pixel ``(0, 0)``'s centre, nanometres.
    shape : tuple of int
        ``(rows, cols)`` in pixels.
    pixel_size_nm : float
        Pixel size, nanometres.
    electrons_per_pixel : float
        Incident electrons per pixel (beam current x dwell).
    imaging : ImagingConfig
        Probe width, detector fractions.
    dx_px, dy_px : numpy.ndarray, optional
        Per-row scan offsets in pixels.
    dx_col_px : numpy.ndarray, optional
        Per-column x offsets in pixels (see :func:`column_signal`).

    Returns
    -------
    numpy.ndarray
        float64 expected counts, shape ``shape``.
    """
    out = np.zeros(shape, dtype=np.float64)
    for _ in render_expected_counts_steps(
        out, specimen, origin_nm, pixel_size_nm, electrons_per_pixel, imaging, dx_px, dy_px, dx_col_px
    ):
        pass
    return out


def render_expected_counts_steps(
    out: np.ndarray,
    specimen: Specimen,
    origin_nm: tuple[float, float],
    pixel_size_nm: float,
    electrons_per_pixel: float,
    imaging: ImagingConfig,
    dx_px: np.ndarray | None = None,
    dy_px: np.ndarray | None = None,
    dx_col_px: np.ndarray | None = None,
) -> Iterator[int]:
    """:func:`render_expected_counts` into ``out`` in small steps, rows becoming final from the top.

    Bit-identical to :func:`render_expected_counts`; between steps a caller may look at an abort
    flag or already add noise to the rows that are final, as a scan that reads out line by line.

    Parameters
    ----------
    out : numpy.ndarray
        float64 zeros of shape ``(rows, cols)``, C-contiguous; filled in place.
    specimen, origin_nm, pixel_size_nm, electrons_per_pixel, imaging, dx_px, dy_px, dx_col_px
        As for :func:`render_expected_counts`.

    Yields
    ------
    int
        After each step (some 30 ms of work): rows ``[0, n)`` of ``out`` hold their final
        expected counts; ``n`` never decreases and ends at ``rows``.
    """
    rows, cols = out.shape
    shape = (rows, cols)
    sigma_px = imaging.column_sigma_nm / pixel_size_nm
    shift_x = _largest(dx_px, dx_col_px)
    shift_y = _largest(dy_px)
    margin_x = (4 * sigma_px + 2 + shift_x) * pixel_size_nm
    margin_y = (4 * sigma_px + 2 + shift_y) * pixel_size_nm
    x0, y0 = origin_nm
    index = specimen.columns_in(
        x0 - margin_x,
        x0 + (cols - 1) * pixel_size_nm + margin_x,
        y0 - margin_y,
        y0 + (rows - 1) * pixel_size_nm + margin_y,
    )
    x_px = (specimen.x_nm[index] - x0) / pixel_size_nm
    y_px = (specimen.y_nm[index] - y0) / pixel_size_nm
    done = 0
    for final in column_signal_steps(
        out, x_px, y_px, specimen.weight[index].astype(np.float64), sigma_px, dx_px, dy_px, dx_col_px
    ):
        if final > done:
            # The diffuse background follows the thickness where each pixel really sampled the
            # specimen. Every operation is elementwise, so a band gets the bits the whole frame would.
            x_grid, y_grid = _sampled_grid_px(shape, dx_px, dy_px, dx_col_px, rows=(done, final))
            background = imaging.background_fraction * specimen.thickness_factor(
                x0 + x_grid * pixel_size_nm, y0 + y_grid * pixel_size_nm
            )
            band = out[done:final]
            band[...] = electrons_per_pixel * (background + imaging.haadf_peak_fraction * band)
            done = final
        yield done


def add_detector_noise(
    expected_counts: np.ndarray, imaging: ImagingConfig, rng: np.random.Generator
) -> np.ndarray:
    """Poisson counting noise plus Gaussian read noise.

    Parameters
    ----------
    expected_counts : numpy.ndarray
        Noise-free detected electrons per pixel.
    imaging : ImagingConfig
        Whether to add Poisson noise and the read-noise level.
    rng : numpy.random.Generator
        Noise source.

    Returns
    -------
    numpy.ndarray
        float32 noisy image in counts.
    """
    image = counting_noise(expected_counts, imaging, rng)
    add_read_noise(image, imaging, rng)
    return image


def counting_noise(
    expected_counts: np.ndarray, imaging: ImagingConfig, rng: np.random.Generator
) -> np.ndarray:
    """The counted electrons of :func:`add_detector_noise`, before read noise, as float32.

    Draws one value per pixel in C order, so consecutive bands of rows drawn one after the other
    take the same values from ``rng`` as the whole image at once.

    Parameters
    ----------
    expected_counts : numpy.ndarray
        Noise-free detected electrons per pixel.
    imaging : ImagingConfig
        Whether to add Poisson noise.
    rng : numpy.random.Generator
        Noise source.

    Returns
    -------
    numpy.ndarray
        float32 counts.
    """
    if imaging.poisson_noise:
        return rng.poisson(expected_counts).astype(np.float32)
    return expected_counts.astype(np.float32)


def add_read_noise(image: np.ndarray, imaging: ImagingConfig, rng: np.random.Generator) -> None:
    """Add the detector's Gaussian read noise to float32 ``image`` in place, in C order.

    Parameters
    ----------
    image : numpy.ndarray
        float32 counts; modified.
    imaging : ImagingConfig
        Read-noise level, counts.
    rng : numpy.random.Generator
        Noise source; draw it after the counting noise of the whole image.
    """
    if imaging.detector_noise_counts > 0:
        read_noise = rng.standard_normal(image.shape, dtype=np.float32)
        read_noise *= np.float32(imaging.detector_noise_counts)
        image += read_noise


def render_tile_image(
    specimen: Specimen,
    origin_nm: tuple[float, float],
    shape: tuple[int, int],
    pixel_size_nm: float,
    dwell_us: float,
    electrons_per_pixel: float,
    imaging: ImagingConfig,
    rng: np.random.Generator,
) -> np.ndarray:
    """A noisy HAADF tile with scan distortions, in detected electrons per pixel.

    Parameters
    ----------
    specimen : Specimen
        The specimen to image.
    origin_nm : tuple of float
        Stage position ``(x, y)`` of pixel ``(0, 0)``'s centre, nanometres.
    shape : tuple of int
        ``(rows, cols)`` in pixels.
    pixel_size_nm : float
        Pixel size, nanometres.
    dwell_us : float
        Dwell per pixel, microseconds (sets line time for drift).
    electrons_per_pixel : float
        Incident electrons per pixel.
    imaging : ImagingConfig
        Image formation parameters.
    rng : numpy.random.Generator
        Source of jitter and noise.

    Returns
    -------
    numpy.ndarray
        float32 image.
    """
    return _scanned_with_noise(
        lambda dx_px, dy_px, dx_col_px: render_expected_counts(
            specimen, origin_nm, shape, pixel_size_nm, electrons_per_pixel, imaging, dx_px, dy_px, dx_col_px
        ),
        shape,
        pixel_size_nm,
        dwell_us,
        imaging,
        rng,
    )


def _scanned_with_noise(
    expected_counts: Callable[[np.ndarray | None, np.ndarray | None, np.ndarray | None], np.ndarray],
    shape: tuple[int, int],
    pixel_size_nm: float,
    dwell_us: float,
    imaging: ImagingConfig,
    rng: np.random.Generator,
) -> np.ndarray:
    """Draw the scan distortions, form the expected counts with them, then add detector noise."""
    dx_px = dy_px = dx_col_px = None
    if imaging.distortions:
        dx_px, dy_px = scan_offsets_px(shape, pixel_size_nm, dwell_us, imaging, rng)
    if imaging.flyback_settle_nm > 0:
        dx_col_px = flyback_offsets_nm(shape[1], dwell_us, imaging) / pixel_size_nm
    return add_detector_noise(expected_counts(dx_px, dy_px, dx_col_px), imaging, rng)


def render_rotated_expected_counts(
    specimen: Specimen,
    centre_nm: tuple[float, float],
    shape: tuple[int, int],
    pixel_size_nm: float,
    rotation_rad: float,
    electrons_per_pixel: float,
    imaging: ImagingConfig,
    dx_px: np.ndarray | None = None,
    dy_px: np.ndarray | None = None,
    dx_col_px: np.ndarray | None = None,
) -> np.ndarray:
    """Noise-free HAADF signal of a scan frame rotated on the stage, in detected electrons per pixel.

    The frame's column axis points along ``(cos r, sin r)`` in stage ``(x, y)`` and its row
    axis along ``(-sin r, cos r)``; its centre (between the middle pixels for an even size)
    lies at ``centre_nm``. Columns are moved into the frame's pixel coordinates and imaged
    with :func:`column_signal`, so a rotated frame is formed exactly like an axis-aligned one
    (blobs are round, pixels square in the frame). With ``rotation_rad = 0`` it equals
    :func:`render_expected_counts` at ``origin = centre - (size - 1) / 2 * pixel``.

    Parameters
    ----------
    specimen : Specimen
        The specimen to image.
    centre_nm : tuple of float
        Stage position ``(x, y)`` of the frame centre, nanometres.
    shape : tuple of int
        ``(rows, cols)`` in pixels.
    pixel_size_nm : float
        Pixel size, nanometres.
    rotation_rad : float
        Angle of the frame's column axis from the stage x axis, radians (x towards y positive).
    electrons_per_pixel : float
        Incident electrons per pixel (beam current x dwell).
    imaging : ImagingConfig
        Probe width, detector fractions.
    dx_px, dy_px : numpy.ndarray, optional
        Per-row scan offsets in frame pixels (see :func:`scan_offsets_px`).
    dx_col_px : numpy.ndarray, optional
        Per-column x offsets in frame pixels (see :func:`column_signal`).

    Returns
    -------
    numpy.ndarray
        float64 expected counts, shape ``shape``.
    """
    rows, cols = shape
    cos_r, sin_r = math.cos(rotation_rad), math.sin(rotation_rad)
    sigma_px = imaging.column_sigma_nm / pixel_size_nm
    shift = max(_largest(dx_px, dx_col_px), _largest(dy_px))
    # A circle around the frame holds every column that can reach it, whatever the rotation.
    reach_nm = (0.5 * math.hypot(rows, cols) + 4 * sigma_px + 2 + shift) * pixel_size_nm
    cx, cy = centre_nm
    index = specimen.columns_in(cx - reach_nm, cx + reach_nm, cy - reach_nm, cy + reach_nm)
    ex, ey = specimen.x_nm[index] - cx, specimen.y_nm[index] - cy
    x_px = (cos_r * ex + sin_r * ey) / pixel_size_nm + 0.5 * (cols - 1)
    y_px = (-sin_r * ex + cos_r * ey) / pixel_size_nm + 0.5 * (rows - 1)
    columns = column_signal(
        x_px, y_px, specimen.weight[index].astype(np.float64), shape, sigma_px, dx_px, dy_px, dx_col_px
    )
    x_grid, y_grid = _sampled_grid_px(shape, dx_px, dy_px, dx_col_px)
    u = (x_grid - 0.5 * (cols - 1)) * pixel_size_nm
    v = (y_grid - 0.5 * (rows - 1)) * pixel_size_nm
    if abs(sin_r) < 1e-12 and cos_r > 0:
        # Aligned (a compensated scan rotation): lines of x and y, as the aligned renderer uses.
        x_stage, y_stage = cx + u, cy + v
    else:
        x_stage = cx + cos_r * u - sin_r * v
        y_stage = cy + sin_r * u + cos_r * v
    background = imaging.background_fraction * specimen.thickness_factor(x_stage, y_stage)
    return electrons_per_pixel * (background + imaging.haadf_peak_fraction * columns)


def render_rotated_tile_image(
    specimen: Specimen,
    centre_nm: tuple[float, float],
    shape: tuple[int, int],
    pixel_size_nm: float,
    rotation_rad: float,
    dwell_us: float,
    electrons_per_pixel: float,
    imaging: ImagingConfig,
    rng: np.random.Generator,
) -> np.ndarray:
    """A noisy HAADF frame, rotated on the stage, with scan distortions, in detected electrons.

    The rotated counterpart of :func:`render_tile_image` (same noise and distortion model);
    instrument simulators whose scan frame may be rotated (the Nion Swift usim adapter) use it.

    Parameters
    ----------
    specimen : Specimen
        The specimen to image.
    centre_nm : tuple of float
        Stage position ``(x, y)`` of the frame centre, nanometres.
    shape : tuple of int
        ``(rows, cols)`` in pixels.
    pixel_size_nm : float
        Pixel size, nanometres.
    rotation_rad : float
        Angle of the frame's column axis from the stage x axis, radians.
    dwell_us : float
        Dwell per pixel, microseconds (sets line time for drift).
    electrons_per_pixel : float
        Incident electrons per pixel.
    imaging : ImagingConfig
        Image formation parameters.
    rng : numpy.random.Generator
        Source of jitter and noise.

    Returns
    -------
    numpy.ndarray
        float32 image.
    """
    return _scanned_with_noise(
        lambda dx_px, dy_px, dx_col_px: render_rotated_expected_counts(
            specimen,
            centre_nm,
            shape,
            pixel_size_nm,
            rotation_rad,
            electrons_per_pixel,
            imaging,
            dx_px,
            dy_px,
            dx_col_px,
        ),
        shape,
        pixel_size_nm,
        dwell_us,
        imaging,
        rng,
    )
