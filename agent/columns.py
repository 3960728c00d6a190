"""Atomic columns from an image tile.

:func:`find_columns` turns a :class:`~agent.driver.Tile` into a :class:`Columns`
table: positions in stage nanometres and tile pixels, integrated intensity,
peak height, local background, width, species (A or B site) and fit quality.

Two methods:

``"peaks"`` (default)
    Estimate the lattice spacing from the image (:func:`estimate_lattice_spacing`)
    unless given, smooth with a Gaussian matched to the column size, subtract the
    floor between columns, keep local maxima that stand ``threshold_sigma``
    noise levels above it (a maximum-filter test, linear in the pixels), then
    refine all columns at once by a Gaussian-weighted centroid iteration (the
    fixed point of the maximum-likelihood position of a Gaussian blob) and
    integrate their intensity. On CUDA the filtering, peak and refinement steps
    run in torch (:mod:`agent.columns_torch`); both paths agree within tolerance.
``"seed"``
    The research write-up's pipeline, kept as the reference the default must
    beat: local-threshold binarisation, erosion and dilation, connected
    components, size filtering and per-region centroid, size and spread.

Species come from a Gaussian mixture on intensity and size (scikit-learn): the
brighter component is the A site (Bi/Sm), the dimmer the B site (Fe); A columns
whose intensity departs strongly from the other A columns are flagged abnormal.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import numpy as np
from pydantic import Field
from scipy import ndimage

from agent.config import StrictModel
from agent.driver import Tile
from agent.errors import InvalidImageError

SPECIES_A, SPECIES_B = 0, 1
"""Species codes in :attr:`Columns.species`: perovskite A site (bright) and B site (dim)."""

SPECIES_NAMES: tuple[str, ...] = ("A", "B")

Method = Literal["peaks", "seed"]
Device = Literal["auto", "cpu", "cuda"]

_NOISE_KERNEL = np.array([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]])
# The kernel's response to white noise of unit variance has standard deviation 6.
_NOISE_KERNEL_GAIN = 6.0
_MAD_TO_SIGMA = 1.4826


class ColumnFinderConfig(StrictModel):
    """How columns are found; every length is relative to the lattice spacing unless named in nm or px."""

    method: Method = Field("peaks", description="'peaks' (default) or the write-up's 'seed' pipeline")
    lattice_spacing_nm: float | None = Field(
        None, gt=0, description="A-A spacing; estimated from each tile when not given"
    )
    expected_spacing_nm: float | None = Field(
        None,
        gt=0,
        description="the material's A-A spacing: the estimate looks only within 0.8-1.25 x of it",
    )
    column_sigma_fraction: float = Field(
        0.09, gt=0, lt=0.5, description="expected column width (Gaussian sigma) over the spacing"
    )
    threshold_sigma: float = Field(
        5.0, gt=0, description="a column must stand this many noise levels above the local floor"
    )
    min_separation_fraction: float = Field(
        0.25, gt=0, lt=1, description="closest two columns may be, over the spacing (a/sqrt 2 ~ 0.71)"
    )
    refine_iterations: int = Field(4, ge=0, le=50, description="weighted-centroid iterations")
    border_fraction: float = Field(
        0.15, ge=0, description="columns closer to the tile edge than this (x spacing) are dropped"
    )
    abnormal_sigma: float = Field(
        4.0, gt=0, description="A columns this many robust sigmas off the A intensity are abnormal"
    )
    saturation_level: float | None = Field(
        None, description="detector counts at or above which a pixel is masked as saturated"
    )
    device: Device = Field("auto", description="'cuda' runs filtering and refinement in torch")


@dataclass(frozen=True)
class Columns:
    """Atomic columns found in one tile or image (struct of arrays, one entry per column).

    Parameters
    ----------
    x_nm, y_nm : numpy.ndarray
        Stage position, nanometres.
    row_px, col_px : numpy.ndarray
        Sub-pixel position in the tile (integer values are pixel centres).
    intensity : numpy.ndarray
        Background-subtracted signal integrated over the column, image units x pixels.
    scattering : numpy.ndarray
        ``intensity`` per incident electron per pixel (comparable across dwell and
        current); equal to ``intensity`` when the dose is unknown.
    peak_height : numpy.ndarray
        Fitted peak height above the local background, image units.
    background : numpy.ndarray
        Local background under the column, image units.
    width_px : numpy.ndarray
        Gaussian sigma of the column image, pixels.
    species : numpy.ndarray
        :data:`SPECIES_A` or :data:`SPECIES_B` (int8).
    abnormal : numpy.ndarray
        True for A columns of unusual intensity (substitution, vacancy-bearing, thickness).
    quality : numpy.ndarray
        Correlation of the column with a Gaussian of its fitted width, in [-1, 1].
    pixel_size_nm : float
        Pixel size of the source image, nanometres.
    lattice_spacing_nm : float or None
        A-A lattice spacing used, nanometres (None when no lattice was found).
    reason : str
        Why no column was found (empty when some were).
    tile_id : str
        Request id of the source tile ("" for a plain image).
    """

    x_nm: np.ndarray
    y_nm: np.ndarray
    row_px: np.ndarray
    col_px: np.ndarray
    intensity: np.ndarray
    scattering: np.ndarray
    peak_height: np.ndarray
    background: np.ndarray
    width_px: np.ndarray
    species: np.ndarray
    abnormal: np.ndarray
    quality: np.ndarray
    pixel_size_nm: float = 1.0
    lattice_spacing_nm: float | None = None
    reason: str = ""
    tile_id: str = ""
    masked_pixels: int = field(default=0)

    ARRAY_FIELDS = (
        "x_nm", "y_nm", "row_px", "col_px", "intensity", "scattering", "peak_height",
        "background", "width_px", "species", "abnormal", "quality",
    )  # fmt: skip

    def __len__(self) -> int:
        return int(self.x_nm.size)

    def select(self, mask: np.ndarray) -> Columns:
        """The columns where ``mask`` is true (or at the given indices)."""
        arrays = {name: getattr(self, name)[mask] for name in self.ARRAY_FIELDS}
        scalars = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self.ARRAY_FIELDS}
        return Columns(**arrays, **scalars)

    @classmethod
    def empty(
        cls, reason: str, pixel_size_nm: float = 1.0, tile_id: str = "", masked_pixels: int = 0
    ) -> Columns:
        """A table with no columns and the reason why."""
        arrays = {name: np.zeros(0, dtype=np.float64) for name in cls.ARRAY_FIELDS}
        arrays["species"] = np.zeros(0, dtype=np.int8)
        arrays["abnormal"] = np.zeros(0, dtype=bool)
        return cls(
            **arrays, pixel_size_nm=pixel_size_nm, reason=reason, tile_id=tile_id, masked_pixels=masked_pixels
        )

    def species_counts(self) -> dict[str, int]:
        """Number of columns of each species, plus ``"A_abnormal"``."""
        return {
            "A": int(np.count_nonzero(self.species == SPECIES_A)),
            "B": int(np.count_nonzero(self.species == SPECIES_B)),
            "A_abnormal": int(np.count_nonzero(self.abnormal)),
        }


# ----------------------------------------------------------------------------- lattice spacing


def estimate_lattice_spacing(
    image: np.ndarray, min_px: float = 4.0, expected_px: float | None = None
) -> float | None:
    """Lattice spacing of a crystalline image from its power spectrum, in pixels.

    The radially averaged power spectrum of a square lattice peaks at ``n / a``
    and its harmonics; the lowest-frequency ring with at least 20 % of the
    strongest ring's power is taken as the fundamental, refined by a parabola.
    For a perovskite with dim B columns that is the A-A spacing.

    An amorphous patch or a vacuum edge in part of the tile puts power at low
    frequencies that can pass for a ring; when the material is known, give
    ``expected_px`` and only rings within 0.8-1.25 x of it count.

    Parameters
    ----------
    image : numpy.ndarray
        2-D image, at least 32 x 32 pixels.
    min_px : float
        Smallest spacing considered, pixels.
    expected_px : float, optional
        The material's spacing in pixels, when known.

    Returns
    -------
    float or None
        Spacing in pixels, or None when no lattice ring stands out (vacuum, amorphous).

    Examples
    --------
    >>> rows, cols = np.mgrid[:128, :128]
    >>> lattice = np.cos(2 * np.pi * cols / 8.0) + np.cos(2 * np.pi * rows / 8.0)
    >>> round(estimate_lattice_spacing(lattice), 1)
    8.0
    """
    # A crop of at most 512 px holds dozens of periods; more only costs time. A large image is
    # sampled at its centre and four quarter points, so an amorphous or vacuum area in the middle
    # does not hide the crystal around it.
    side = min(*image.shape, 512)
    if side < 32:
        return None
    rows, cols = image.shape
    starts = [((rows - side) // 2, (cols - side) // 2)]
    if min(rows, cols) >= 2 * side:
        quarters = [(r, c) for r in (rows // 4, 3 * rows // 4) for c in (cols // 4, 3 * cols // 4)]
        starts += [(r - side // 2, c - side // 2) for r, c in quarters]
    found = [
        spacing
        for r0, c0 in starts
        if (spacing := _crop_lattice_spacing(image[r0 : r0 + side, c0 : c0 + side], min_px, expected_px))
        is not None
    ]
    return float(np.median(found)) if found else None


def _crop_lattice_spacing(crop: np.ndarray, min_px: float, expected_px: float | None = None) -> float | None:
    """:func:`estimate_lattice_spacing` of one square crop, in pixels (None: no clear lattice ring)."""
    side = crop.shape[0]
    square = np.asarray(crop, dtype=np.float64)
    square = square - square.mean()
    window = np.hanning(side)
    spectrum = np.abs(np.fft.fftshift(np.fft.fft2(square * window[:, None] * window[None, :]))) ** 2
    rows, cols = np.indices(spectrum.shape)
    radius = np.rint(np.hypot(rows - side // 2, cols - side // 2)).astype(np.int64)
    profile = np.bincount(radius.ravel(), spectrum.ravel()) / np.maximum(np.bincount(radius.ravel()), 1)
    k_low, k_high = 3, min(int(side / min_px), profile.size - 2)
    if k_high <= k_low + 2:
        return None
    segment = profile[k_low:k_high]
    interior = segment[1:-1]
    is_peak = (interior > segment[:-2]) & (interior >= segment[2:])
    peaks = np.flatnonzero(is_peak) + 1
    if expected_px is not None:
        k = peaks + k_low
        peaks = peaks[(k >= side / (1.25 * expected_px)) & (k <= side / (0.8 * expected_px))]
    if peaks.size == 0:
        return None
    # A lattice ring must clearly stand above the spectrum around it, or this is noise. The
    # lower quartile is the floor: in a small tile (under ~150 px) the rings and their
    # harmonics fill half the searched band and would lift a median above the noise.
    floor = np.percentile(segment, 25)
    strongest = segment[peaks].max()
    if strongest < 20.0 * floor:
        return None
    if expected_px is not None:
        # Near the known spacing the fundamental is the strongest ring; other bumps are clutter.
        k = int(peaks[np.argmax(segment[peaks])]) + k_low
    else:
        k = int(peaks[segment[peaks] >= 0.2 * strongest][0]) + k_low
    below, at, above = np.log(profile[k - 1 : k + 2])
    curvature = below - 2 * at + above
    offset = 0.5 * (below - above) / curvature if curvature < 0 else 0.0
    return side / (k + offset)


# ----------------------------------------------------------------------------- image checks


def _prepare_image(image: np.ndarray, saturation_level: float | None, source: str) -> tuple[np.ndarray, int]:
    """Float image with NaN/inf (and saturated) pixels replaced by the median; the count masked."""
    if image.ndim != 2:
        raise InvalidImageError(f"{source}: expected a 2-D image, got shape {image.shape}")
    prepared = np.asarray(image, dtype=np.float32)
    bad = ~np.isfinite(prepared)
    if saturation_level is not None:
        bad |= prepared >= saturation_level
    masked = int(np.count_nonzero(bad))
    if masked:
        if masked == prepared.size:
            return prepared, masked
        prepared = prepared.copy()
        prepared[bad] = np.median(prepared[~bad])
        warnings.warn(
            f"{source}: masked {masked} NaN, infinite or saturated pixels of {prepared.size} "
            "(replaced by the median); columns there are unreliable",
            RuntimeWarning,
            stacklevel=3,
        )
    return prepared, masked


def noise_sigma(image: np.ndarray) -> float:
    """Robust standard deviation of pixel noise (Immerkær's Laplacian estimator with a MAD).

    Smooth structure cancels in the kernel, so the estimate follows the noise of
    the flat parts of the image.

    Parameters
    ----------
    image : numpy.ndarray
        2-D image.

    Returns
    -------
    float
        Noise standard deviation, image units.
    """
    rows, cols = image.shape
    # A central crop of a megapixel measures the noise as well as the whole image, faster.
    r0, c0 = max((rows - 1024) // 2, 0), max((cols - 1024) // 2, 0)
    crop = np.asarray(image[r0 : r0 + 1024, c0 : c0 + 1024], dtype=np.float32)
    response = ndimage.convolve(crop, _NOISE_KERNEL.astype(np.float32))
    response = response[1:-1, 1:-1]
    deviation = np.median(np.abs(response - np.median(response)))
    return float(_MAD_TO_SIGMA * deviation / _NOISE_KERNEL_GAIN)


# ----------------------------------------------------------------------------- the peaks method


@dataclass(frozen=True)
class PeakScales:
    """Pixel scales of the peaks method, derived once from the lattice spacing."""

    spacing_px: float
    sigma_px: float
    floor_block: int
    separation_px: float
    half_patch: int
    border_px: int

    @classmethod
    def from_spacing(cls, spacing_px: float, config: ColumnFinderConfig) -> PeakScales:
        """Scales for a lattice of A-A spacing ``spacing_px`` pixels."""
        nearest = spacing_px / math.sqrt(2)  # A-B distance in the [001] projection
        sigma = max(config.column_sigma_fraction * spacing_px, 0.5)
        separation = max(config.min_separation_fraction * spacing_px, 1.0)
        return cls(
            spacing_px=spacing_px,
            sigma_px=sigma,
            # Minima over 3 x 3 blocks span about one A-B distance: the floor between columns.
            floor_block=max(round(nearest / 2), 2),
            separation_px=separation,
            half_patch=max(math.ceil(2.0 * sigma), 2),
            border_px=max(round(config.border_fraction * spacing_px), math.ceil(sigma)),
        )


@dataclass(frozen=True)
class PeakFit:
    """Refined columns in pixel units, before species assignment.

    Parameters
    ----------
    row, col : numpy.ndarray
        Sub-pixel positions.
    height : numpy.ndarray
        Matched-filter peak height above the background.
    background : numpy.ndarray
        Local floor under each column.
    intensity : numpy.ndarray
        Background-subtracted signal integrated within the patch.
    width : numpy.ndarray
        Gaussian sigma, pixels.
    quality : numpy.ndarray
        Correlation with a Gaussian of the fitted width.
    """

    row: np.ndarray
    col: np.ndarray
    height: np.ndarray
    background: np.ndarray
    intensity: np.ndarray
    width: np.ndarray
    quality: np.ndarray


def _floor_grid(smoothed: np.ndarray, block: int) -> np.ndarray:
    """Local floor between columns: minimum over 3 x 3 blocks of ``block`` pixels, one value per block."""
    rows, cols = smoothed.shape
    full_rows, full_cols = rows // block, cols // block
    # Whole blocks by reshaping; a partial last block row or column (if any) is reduced on its own.
    grid = np.full((-(-rows // block), -(-cols // block)), np.inf, dtype=smoothed.dtype)
    grid[:full_rows, :full_cols] = (
        smoothed[: full_rows * block, : full_cols * block]
        .reshape(full_rows, block, full_cols, block)
        .min(axis=(1, 3))
    )
    if full_cols < grid.shape[1]:
        strip = smoothed[: full_rows * block, full_cols * block :]
        grid[:full_rows, -1] = strip.reshape(full_rows, block, -1).min(axis=(1, 2))
    if full_rows < grid.shape[0]:
        strip = smoothed[full_rows * block :]
        for index in range(grid.shape[1]):
            grid[-1, index] = strip[:, index * block : (index + 1) * block].min()
    return ndimage.minimum_filter(grid, size=3, mode="nearest")


def _floor_at(floor_grid: np.ndarray, block: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Bilinear value of the block floor grid at pixel positions (block centres carry the values)."""
    coords = np.stack([(rows + 0.5) / block - 0.5, (cols + 0.5) / block - 0.5])
    return ndimage.map_coordinates(floor_grid, coords, order=1, mode="nearest")


def _local_maxima_3x3(smoothed: np.ndarray, border: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixels at least as high as their eight neighbours, away from the border."""
    core = smoothed[1:-1, 1:-1]
    is_max = np.ones(core.shape, dtype=bool)
    rows, cols = smoothed.shape
    for d_row in (-1, 0, 1):
        for d_col in (-1, 0, 1):
            if d_row or d_col:
                is_max &= core >= smoothed[1 + d_row : rows - 1 + d_row, 1 + d_col : cols - 1 + d_col]
    margin = max(border - 1, 0)
    is_max[:margin] = is_max[is_max.shape[0] - margin :] = False
    is_max[:, :margin] = is_max[:, is_max.shape[1] - margin :] = False
    peak_rows, peak_cols = np.nonzero(is_max)
    return peak_rows + 1, peak_cols + 1


def suppress_close_peaks(
    rows: np.ndarray, cols: np.ndarray, heights: np.ndarray, separation: float
) -> np.ndarray:
    """Keep the higher of any two peaks closer than ``separation`` pixels.

    Parameters
    ----------
    rows, cols : numpy.ndarray
        Peak positions, pixels.
    heights : numpy.ndarray
        Peak heights; the higher peak of a close pair survives.
    separation : float
        Smallest allowed distance, pixels.

    Returns
    -------
    numpy.ndarray
        Boolean mask of the surviving peaks.
    """
    from scipy.spatial import cKDTree

    keep = np.ones(rows.size, dtype=bool)
    if rows.size < 2:
        return keep
    pairs = cKDTree(np.stack([rows, cols], axis=1)).query_pairs(separation, output_type="ndarray")
    if pairs.size == 0:
        return keep
    # Visit pairs from the highest peaks down so that a suppressed peak cannot suppress others.
    order = np.argsort(-np.maximum(heights[pairs[:, 0]], heights[pairs[:, 1]]), kind="stable")
    for first, second in pairs[order]:
        if keep[first] and keep[second]:
            keep[second if heights[second] < heights[first] else first] = False
    return keep


def _contrast_threshold(image: np.ndarray, scales: PeakScales, threshold_sigma: float) -> float:
    """Smallest smoothed contrast above the floor that counts as a column, image units."""
    # White noise of sigma s comes out of a Gaussian filter of width w as s / (2 sqrt(pi) w).
    return threshold_sigma * noise_sigma(image) / (2 * math.sqrt(math.pi) * scales.sigma_px)


@dataclass(frozen=True)
class PreprocessingStages:
    """The intermediate images of the peaks method, for figures (one window of an image).

    Parameters
    ----------
    image : numpy.ndarray
        The window as given, float32.
    smoothed : numpy.ndarray
        After the Gaussian matched to the column size.
    floor : numpy.ndarray
        The local floor between columns (block minima, interpolated), image units.
    contrast : numpy.ndarray
        ``smoothed - floor``: what the threshold is applied to.
    threshold : float
        Contrast a column must exceed, image units.
    rows, cols : numpy.ndarray
        Integer positions of the candidate columns that pass the threshold and the separation test.
    spacing_px : float
        A-A lattice spacing used, pixels.
    """

    image: np.ndarray
    smoothed: np.ndarray
    floor: np.ndarray
    contrast: np.ndarray
    threshold: float
    rows: np.ndarray
    cols: np.ndarray
    spacing_px: float


def preprocessing_stages(
    image: np.ndarray, spacing_px: float, config: ColumnFinderConfig | None = None
) -> PreprocessingStages:
    """Run the peaks method's filtering on an image and keep every intermediate image.

    Meant for a window of a few hundred pixels: the floor is interpolated at every pixel,
    which :func:`detect_peaks` never does.

    Parameters
    ----------
    image : numpy.ndarray
        2-D image window without NaN.
    spacing_px : float
        A-A lattice spacing, pixels.
    config : ColumnFinderConfig, optional
        Threshold and scales.

    Returns
    -------
    PreprocessingStages
        Smoothed image, floor, contrast, threshold and the candidate columns.
    """
    config = config or ColumnFinderConfig()
    scales = PeakScales.from_spacing(spacing_px, config)
    image = np.asarray(image, dtype=np.float32)
    smoothed = ndimage.gaussian_filter(image, scales.sigma_px, mode="nearest")
    grid_rows, grid_cols = np.indices(image.shape)
    floor = _floor_at(_floor_grid(smoothed, scales.floor_block), scales.floor_block, grid_rows, grid_cols)
    rows, cols, _ = _candidate_peaks(image, scales, config.threshold_sigma)
    return PreprocessingStages(
        image=image,
        smoothed=smoothed,
        floor=floor.reshape(image.shape),
        contrast=smoothed - floor.reshape(image.shape),
        threshold=_contrast_threshold(image, scales, config.threshold_sigma),
        rows=rows,
        cols=cols,
        spacing_px=spacing_px,
    )


def _candidate_peaks(
    image: np.ndarray, scales: PeakScales, threshold_sigma: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integer column positions and the floor under each (numpy path)."""
    smoothed = ndimage.gaussian_filter(image, scales.sigma_px, mode="nearest")
    rows, cols = _local_maxima_3x3(smoothed, scales.border_px)
    floor_grid = _floor_grid(smoothed, scales.floor_block)
    floor = _floor_at(floor_grid, scales.floor_block, rows, cols)
    contrast = smoothed[rows, cols] - floor
    strong = contrast > _contrast_threshold(image, scales, threshold_sigma)
    rows, cols, floor, contrast = rows[strong], cols[strong], floor[strong], contrast[strong]
    keep = suppress_close_peaks(rows, cols, contrast, scales.separation_px)
    return rows[keep], cols[keep], floor[keep].astype(np.float32)


def refine_peaks(
    image: Any,
    background: Any,
    rows: Any,
    cols: Any,
    scales: PeakScales,
    iterations: int,
) -> PeakFit:
    """Gaussian-weighted centroid refinement of all peaks at once.

    Written against the operations numpy arrays and torch tensors share, so the
    CUDA path (:mod:`agent.columns_torch`) runs the very same arithmetic on the GPU.
    """
    xp, like = _namespace(image)
    half = scales.half_patch
    offsets = np.arange(-half, half + 1)
    grid_row, grid_col = np.meshgrid(offsets, offsets, indexing="ij")
    d_row = like(grid_row.ravel().astype(np.float32))
    d_col = like(grid_col.ravel().astype(np.float32))
    patch_rows = (rows[:, None] + like(grid_row.ravel())[None, :]).clip(0, image.shape[0] - 1)
    patch_cols = (cols[:, None] + like(grid_col.ravel())[None, :]).clip(0, image.shape[1] - 1)
    patches = image[patch_rows, patch_cols] - background[:, None]
    sigma = float(scales.sigma_px)
    shift_row = xp.zeros(rows.shape, dtype=xp.float32, **_device_of(image))
    shift_col = xp.zeros(rows.shape, dtype=xp.float32, **_device_of(image))
    limit = float(half - 1)
    side = offsets.size
    line = like(offsets.astype(np.float32))
    for _ in range(iterations):
        # The Gaussian weight is separable: 2 x side exponentials per column instead of side^2.
        row_weight = xp.exp(-((line[None, :] - shift_row[:, None]) ** 2) / (2 * sigma**2))
        col_weight = xp.exp(-((line[None, :] - shift_col[:, None]) ** 2) / (2 * sigma**2))
        weights = (row_weight[:, :, None] * col_weight[:, None, :]).reshape(rows.shape[0], side * side)
        weighted = weights * patches
        total = weighted.sum(axis=1)
        positive = total > 0
        safe = xp.where(positive, total, xp.ones_like(total))
        shift_row = xp.where(positive, (weighted * d_row).sum(axis=1) / safe, shift_row).clip(-limit, limit)
        shift_col = xp.where(positive, (weighted * d_col).sum(axis=1) / safe, shift_col).clip(-limit, limit)

    r2 = (d_row[None, :] - shift_row[:, None]) ** 2 + (d_col[None, :] - shift_col[:, None]) ** 2
    template = xp.exp(-r2 / (2 * sigma**2))
    # Matched-filter amplitude of a Gaussian of the expected width.
    height = (template * patches).sum(axis=1) / (template**2).sum(axis=1)
    # Gaussian-weighted second moment m of a blob of width s under weight width w: s^2 = m w^2 / (w^2 - m).
    weighted = template * patches
    total = weighted.sum(axis=1)
    moment = (weighted * r2).sum(axis=1) / xp.where(total > 0, 2 * total, xp.ones_like(total))
    moment = moment.clip(1e-3, 0.95 * sigma**2)
    width = xp.sqrt(moment * sigma**2 / (sigma**2 - moment))
    centred_patch = patches - patches.mean(axis=1, keepdims=True)
    centred_template = template - template.mean(axis=1, keepdims=True)
    quality = (centred_patch * centred_template).sum(axis=1) / xp.sqrt(
        (centred_patch**2).sum(axis=1) * (centred_template**2).sum(axis=1) + 1e-12
    )
    values = {
        "row": rows + shift_row,
        "col": cols + shift_col,
        "height": height,
        "background": background,
        "intensity": patches.sum(axis=1),
        "width": width,
        "quality": quality,
    }
    return PeakFit(**{name: _to_numpy(value).astype(np.float64) for name, value in values.items()})


def _namespace(array: Any) -> tuple[Any, Any]:
    """The array module of ``array`` (numpy or torch) and a converter to arrays like it."""
    if isinstance(array, np.ndarray):
        return np, np.asarray
    import torch

    return torch, lambda values: torch.as_tensor(values, device=array.device)


def _device_of(array: Any) -> dict[str, Any]:
    return {} if isinstance(array, np.ndarray) else {"device": array.device}


def _to_numpy(array: Any) -> np.ndarray:
    return array if isinstance(array, np.ndarray) else array.detach().cpu().numpy()


def detect_peaks(image: np.ndarray, spacing_px: float, config: ColumnFinderConfig | None = None) -> PeakFit:
    """Find and refine columns in an image with a known lattice spacing (numpy path).

    Parameters
    ----------
    image : numpy.ndarray
        2-D float image without NaN.
    spacing_px : float
        A-A lattice spacing, pixels.
    config : ColumnFinderConfig, optional
        Threshold, scales and iterations.

    Returns
    -------
    PeakFit
        One entry per column, pixel units.
    """
    config = config or ColumnFinderConfig()
    scales = PeakScales.from_spacing(spacing_px, config)
    image = np.asarray(image, dtype=np.float32)
    rows, cols, background = _candidate_peaks(image, scales, config.threshold_sigma)
    return refine_peaks(image, background, rows, cols, scales, config.refine_iterations)


# ----------------------------------------------------------------------------- the seed method


def detect_regions_seed(image: np.ndarray, spacing_px: float) -> PeakFit:
    """The write-up's pipeline: local threshold, erosion/dilation, labelling, size filter, centroids.

    Parameters
    ----------
    image : numpy.ndarray
        2-D float image without NaN.
    spacing_px : float
        A-A lattice spacing, pixels (sets the threshold block and the size limits).

    Returns
    -------
    PeakFit
        Region centroids (intensity-free, as in the write-up), summed intensity, size as width.
    """
    from skimage import filters, measure, morphology

    block = int(2 * round(spacing_px) + 1)
    binary = image > filters.threshold_local(image, block_size=block, method="gaussian")
    footprint = morphology.disk(max(1, round(0.05 * spacing_px)))
    binary = ndimage.binary_dilation(ndimage.binary_erosion(binary, footprint), footprint)
    labels = measure.label(binary)
    table = measure.regionprops_table(
        labels,
        intensity_image=image,
        properties=("centroid", "area", "intensity_mean", "inertia_tensor_eigvals"),
    )
    area = table["area"].astype(np.float64)
    # Too small is noise, too large is merged columns or contrast patches.
    expected = math.pi * (0.15 * spacing_px) ** 2
    keep = (area >= 0.2 * expected) & (area <= 6.0 * expected)
    spread = np.sqrt(np.maximum(table["inertia_tensor_eigvals-0"], 0.0))
    local_floor = ndimage.minimum_filter(image, size=max(round(spacing_px / math.sqrt(2)), 3))
    row, col = table["centroid-0"][keep], table["centroid-1"][keep]
    background = local_floor[np.rint(row).astype(int), np.rint(col).astype(int)].astype(np.float64)
    intensity = (table["intensity_mean"][keep] - background) * area[keep]
    return PeakFit(
        row=row,
        col=col,
        height=table["intensity_mean"][keep] - background,
        background=background,
        intensity=intensity,
        width=spread[keep],
        quality=np.ones(row.size),
    )


# ----------------------------------------------------------------------------- species


def classify_species(
    intensity: np.ndarray, width: np.ndarray, abnormal_sigma: float = 4.0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A/B species from a two-component Gaussian mixture on intensity and size.

    Parameters
    ----------
    intensity : numpy.ndarray
        Integrated column intensity (any positive scale).
    width : numpy.ndarray
        Column width (size), pixels.
    abnormal_sigma : float
        A columns whose log intensity lies this many robust sigmas from the A median are abnormal.
    seed : int
        Seed of the mixture initialisation.

    Returns
    -------
    species : numpy.ndarray
        :data:`SPECIES_A` (brighter component) or :data:`SPECIES_B` (int8).
    abnormal : numpy.ndarray
        Boolean flags on A columns.
    """
    from sklearn.mixture import GaussianMixture

    count = intensity.size
    species = np.zeros(count, dtype=np.int8)
    abnormal = np.zeros(count, dtype=bool)
    if count < 4:
        return species, abnormal
    log_intensity = np.log(np.maximum(intensity, 1e-6 * max(float(np.max(intensity)), 1e-12)))
    features = np.stack([log_intensity, np.log(np.maximum(width, 1e-3))], axis=1)
    scale = features.std(axis=0)
    features = (features - features.mean(axis=0)) / np.where(scale > 0, scale, 1.0)
    mixture = GaussianMixture(n_components=2, random_state=seed, n_init=2).fit(features)
    labels = mixture.predict(features)
    bright = int(np.argmax(mixture.means_[:, 0]))
    species[labels != bright] = SPECIES_B
    a_columns = species == SPECIES_A
    if np.count_nonzero(a_columns) >= 4:
        a_log = log_intensity[a_columns]
        centre = np.median(a_log)
        spread = _MAD_TO_SIGMA * np.median(np.abs(a_log - centre))
        if spread > 0:
            abnormal[a_columns] = np.abs(a_log - centre) > abnormal_sigma * spread
    return species, abnormal


# ----------------------------------------------------------------------------- entry points


def _use_cuda(device: Device) -> bool:
    if device == "cpu":
        return False
    import torch

    available = torch.cuda.is_available()
    if device == "cuda" and not available:
        raise InvalidImageError(
            "device 'cuda' was requested but torch sees no CUDA device; use 'auto' or 'cpu'"
        )
    return available


def find_columns_in_image(
    image: np.ndarray,
    pixel_size_nm: float,
    origin_nm: tuple[float, float] = (0.0, 0.0),
    config: ColumnFinderConfig | None = None,
    *,
    electrons_per_pixel: float | None = None,
    tile_id: str = "",
    source: str = "image",
) -> Columns:
    """Find atomic columns in a plain image placed on the stage.

    Parameters
    ----------
    image : numpy.ndarray
        2-D image, ``[row, col]``.
    pixel_size_nm : float
        Pixel size, nanometres.
    origin_nm : tuple of float
        Stage position ``(x, y)`` of the centre of pixel ``(0, 0)``, nanometres.
    config : ColumnFinderConfig, optional
        Method and parameters.
    electrons_per_pixel : float, optional
        Incident electrons per pixel; sets :attr:`Columns.scattering`.
    tile_id : str
        Request id of the tile, carried into the result.
    source : str
        Name used in warnings and errors.

    Returns
    -------
    Columns
        The columns; empty with a ``reason`` for vacuum, amorphous or featureless images.

    Raises
    ------
    InvalidImageError
        If the image is not 2-D or is smaller than about three lattice spacings.

    Examples
    --------
    >>> rows, cols = np.mgrid[:96, :96]
    >>> image = sum(np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / 4.0)
    ...             for r in range(8, 96, 16) for c in range(8, 96, 16))
    >>> found = find_columns_in_image(image, 0.025, config=ColumnFinderConfig(lattice_spacing_nm=0.4))
    >>> len(found) > 20
    True
    """
    config = config or ColumnFinderConfig()
    prepared, masked = _prepare_image(image, config.saturation_level, source)
    if masked == prepared.size:
        return Columns.empty("every pixel is NaN, infinite or saturated", pixel_size_nm, tile_id, masked)
    if config.lattice_spacing_nm is not None:
        spacing_px = config.lattice_spacing_nm / pixel_size_nm
    else:
        expected = None if config.expected_spacing_nm is None else config.expected_spacing_nm / pixel_size_nm
        estimate = estimate_lattice_spacing(prepared, expected_px=expected)
        if estimate is None:
            return Columns.empty(
                "no lattice periodicity found (vacuum, amorphous or featureless tile); "
                "give lattice_spacing_nm to search anyway",
                pixel_size_nm,
                tile_id,
                masked,
            )
        spacing_px = estimate
    if min(prepared.shape) < 3 * spacing_px:
        raise InvalidImageError(
            f"{source}: a {prepared.shape[0]}x{prepared.shape[1]} px tile spans fewer than three lattice "
            f"spacings ({spacing_px:.1f} px each); acquire at least {math.ceil(3 * spacing_px)} px "
            "or a larger pixel size"
        )
    if spacing_px < 4.0:
        return Columns.empty(
            f"lattice spacing of {spacing_px:.1f} px is below 4 px: columns are not resolved at "
            f"{pixel_size_nm:g} nm/px; use a smaller pixel size",
            pixel_size_nm,
            tile_id,
            masked,
        )
    if config.method == "seed":
        fit = detect_regions_seed(prepared, spacing_px)
    elif _use_cuda(config.device):
        from agent.columns_torch import detect_peaks_torch

        fit = detect_peaks_torch(prepared, spacing_px, config, device="cuda")
    else:
        fit = detect_peaks(prepared, spacing_px, config)
    if fit.row.size == 0:
        return Columns.empty(
            f"no column stands {config.threshold_sigma:g} noise levels above the background",
            pixel_size_nm,
            tile_id,
            masked,
        )
    species, abnormal = classify_species(fit.intensity, fit.width, config.abnormal_sigma)
    scattering = fit.intensity / electrons_per_pixel if electrons_per_pixel else fit.intensity
    return Columns(
        x_nm=origin_nm[0] + fit.col * pixel_size_nm,
        y_nm=origin_nm[1] + fit.row * pixel_size_nm,
        row_px=fit.row,
        col_px=fit.col,
        intensity=fit.intensity,
        scattering=scattering,
        peak_height=fit.height,
        background=fit.background,
        width_px=fit.width,
        species=species,
        abnormal=abnormal,
        quality=fit.quality,
        pixel_size_nm=pixel_size_nm,
        lattice_spacing_nm=spacing_px * pixel_size_nm,
        tile_id=tile_id,
        masked_pixels=masked,
    )


def find_columns(tile: Tile, config: ColumnFinderConfig | None = None) -> Columns:
    """Find the atomic columns of a tile.

    Parameters
    ----------
    tile : Tile
        The acquired tile; its placement gives stage positions and its dose the scattering scale.
    config : ColumnFinderConfig, optional
        Method (``"peaks"`` by default, or ``"seed"``) and parameters.

    Returns
    -------
    Columns
        Columns in stage nanometres and tile pixels; empty with a ``reason`` when the
        tile holds no lattice.

    Raises
    ------
    InvalidImageError
        If the tile spans fewer than about three lattice spacings.
    """
    pixel_area_a2 = (tile.pixel_size_nm * 10.0) ** 2
    return find_columns_in_image(
        tile.image,
        tile.pixel_size_nm,
        tile.origin_nm,
        config,
        electrons_per_pixel=tile.dose_e_per_a2 * pixel_area_a2,
        tile_id=tile.request.request_id,
        source=f"tile {tile.request.request_id}",
    )
