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

Species come from the lattice, not from brightness (:mod:`agent.lattice`): the local
lattice of the tile is fitted from its Bragg phases, every column is put on the
nearest site of the :class:`~agent.materials.Material` (for a perovskite [001]: A,
B or pure-O), and its intensity is a measurement. ``abnormal`` is a robust z-score
of intensity against the other columns of the same site (a plane in x and y takes
out a thickness gradient), on both cation sublattices. Expected A and B sites that
no peak occupies are tested once more at that place with a lower threshold (a dim
column at low dose is found there, a pure-O column can never be taken for B), and
what stays empty is reported as a vacancy site with a confidence
(:class:`VacancySites`).
"""

from __future__ import annotations

import dataclasses
import functools
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
from agent.lattice import (
    LatticeFit,
    assign_sites,
    central_power_spectrum,
    diagonal_says_oxygen,
    empty_sites,
    fit_lattice,
)
from agent.materials import DEFAULT_MATERIAL, Material, resolve_material

SPECIES_A, SPECIES_B, SPECIES_O = 0, 1, 2
"""Species codes in :attr:`Columns.species`: A site (bright cation), B site (second cation), pure-O site."""

SPECIES_NAMES: tuple[str, ...] = ("A", "B", "O")

Method = Literal["peaks", "seed"]
Device = Literal["auto", "cpu", "cuda"]

_NOISE_KERNEL = np.array([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]])
# The kernel's response to white noise of unit variance has standard deviation 6.
_NOISE_KERNEL_GAIN = 6.0
_MAD_TO_SIGMA = 1.4826
# The matched smoothing is cut at 3 sigma: 99.7 % of the kernel, three quarters of the cost of 4.
_SMOOTHING_TRUNCATE = 3.0
_MIN_RELATIVE_SPREAD = 0.02


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
    estimate_width: bool = Field(
        True,
        description="measure the column width from the image's bright columns and refine again with "
        "it (column_sigma_fraction is then only the starting guess)",
    )
    border_fraction: float = Field(
        0.15, ge=0, description="columns closer to the tile edge than this (x spacing) are dropped"
    )
    abnormal_sigma: float = Field(
        3.5,
        gt=0,
        description="A or B columns this many robust sigmas off their site's intensity are abnormal",
    )
    material: str | Material = Field(
        DEFAULT_MATERIAL, description="built-in material name or a description (see agent.materials)"
    )
    site_threshold_sigma: float = Field(
        3.0,
        gt=0,
        description="a local maximum whose matched-filter height is below this many noise levels is "
        "noise, not a column",
    )
    vacancy_prior: float = Field(
        0.02,
        gt=0,
        lt=0.5,
        description="share of A and B sites expected empty: the prior of the vacancy test at each "
        "expected site (a dim column there is found, an empty one reported)",
    )
    vacancy_min_confidence: float = Field(
        0.5, ge=0, le=1, description="sites at least this likely to be vacant are reported"
    )
    saturation_level: float | None = Field(
        None, description="detector counts at or above which a pixel is masked as saturated"
    )
    device: Device = Field("auto", description="'cuda' runs filtering and refinement in torch")


@dataclass(frozen=True)
class VacancySites:
    """Expected A or B lattice sites with no column, or with a column far too dim for the site.

    Parameters
    ----------
    x_nm, y_nm : numpy.ndarray
        Stage position of the site, nanometres.
    row_px, col_px : numpy.ndarray
        Position in the tile, pixels.
    species : numpy.ndarray
        Site role, :data:`SPECIES_A` or :data:`SPECIES_B` (int8).
    confidence : numpy.ndarray
        Probability that the site holds less than half its typical column, given the
        measured height and the noise, in [0, 1].
    relative_height : numpy.ndarray
        Measured peak height there over the site's typical height (about 0 for an empty site).
    occupied : numpy.ndarray
        True where a (too dim) column was found on the site.
    """

    x_nm: np.ndarray
    y_nm: np.ndarray
    row_px: np.ndarray
    col_px: np.ndarray
    species: np.ndarray
    confidence: np.ndarray
    relative_height: np.ndarray
    occupied: np.ndarray

    FIELDS = ("x_nm", "y_nm", "row_px", "col_px", "species", "confidence", "relative_height", "occupied")

    def __len__(self) -> int:
        return int(self.x_nm.size)

    @classmethod
    def empty(cls) -> VacancySites:
        """No vacancy sites."""
        values = {name: np.zeros(0) for name in cls.FIELDS}
        values["species"] = np.zeros(0, dtype=np.int8)
        values["occupied"] = np.zeros(0, dtype=bool)
        return cls(**values)

    def select(self, mask: np.ndarray) -> VacancySites:
        """The sites where ``mask`` is true."""
        return VacancySites(**{name: getattr(self, name)[mask] for name in self.FIELDS})

    def shifted(self, dx_nm: np.ndarray | float, dy_nm: np.ndarray | float) -> VacancySites:
        """The same sites moved on the stage by ``(dx, dy)`` nanometres."""
        values = {name: getattr(self, name) for name in self.FIELDS}
        return VacancySites(**{**values, "x_nm": self.x_nm + dx_nm, "y_nm": self.y_nm + dy_nm})

    def to_record(self) -> dict[str, list[float]]:
        """JSON-ready lists (for the session journal)."""
        return {name: getattr(self, name).tolist() for name in self.FIELDS}

    @classmethod
    def from_record(cls, record: dict[str, list[float]] | None) -> VacancySites:
        """Inverse of :meth:`to_record` (an empty table for None)."""
        if not record:
            return cls.empty()
        values = {name: np.asarray(record[name], dtype=np.float64) for name in cls.FIELDS}
        values["species"] = values["species"].astype(np.int8)
        values["occupied"] = values["occupied"].astype(bool)
        return cls(**values)


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
        Role of the column's lattice site: :data:`SPECIES_A`, :data:`SPECIES_B` or
        :data:`SPECIES_O` (int8).
    abnormal : numpy.ndarray
        True for A or B columns whose intensity departs from their site's by more than
        ``abnormal_sigma`` robust sigmas (substitution, partial vacancy, heavy interstitial).
    quality : numpy.ndarray
        Correlation of the column with a Gaussian of its fitted width, in [-1, 1].
    intensity_z : numpy.ndarray
        Robust z-score of ``intensity`` among the columns of the same site (NaN for O
        columns and when no lattice was fitted).
    pixel_size_nm : float
        Pixel size of the source image, nanometres.
    lattice_spacing_nm : float or None
        A-A lattice spacing used, nanometres (None when no lattice was found).
    reason : str
        Why no column was found (empty when some were).
    tile_id : str
        Request id of the source tile ("" for a plain image).
    masked_pixels : int
        NaN, infinite or saturated pixels replaced before the search.
    vacancies : VacancySites
        Empty (or far too dim) A and B sites of the lattice.
    material : str
        Name of the material whose sites were assigned.
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
    intensity_z: np.ndarray | None = None
    vacancies: VacancySites = field(default_factory=VacancySites.empty)
    material: str = DEFAULT_MATERIAL

    ARRAY_FIELDS = (
        "x_nm", "y_nm", "row_px", "col_px", "intensity", "scattering", "peak_height",
        "background", "width_px", "species", "abnormal", "quality", "intensity_z",
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.intensity_z is None:
            # Tables built before sites existed (old journals, hand-made tables) have no z-scores.
            object.__setattr__(self, "intensity_z", np.full(self.x_nm.size, np.nan))

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
        """Number of columns of each site role, abnormal A and B columns, and vacancy sites."""
        confident = self.vacancies.confidence >= 0.5
        return {
            "A": int(np.count_nonzero(self.species == SPECIES_A)),
            "B": int(np.count_nonzero(self.species == SPECIES_B)),
            "O": int(np.count_nonzero(self.species == SPECIES_O)),
            "A_abnormal": int(np.count_nonzero(self.abnormal & (self.species == SPECIES_A))),
            "B_abnormal": int(np.count_nonzero(self.abnormal & (self.species == SPECIES_B))),
            "A_vacancy": int(np.count_nonzero(confident & (self.vacancies.species == SPECIES_A))),
            "B_vacancy": int(np.count_nonzero(confident & (self.vacancies.species == SPECIES_B))),
        }


# ----------------------------------------------------------------------------- lattice spacing


def estimate_lattice_spacing(
    image: np.ndarray,
    min_px: float = 4.0,
    expected_px: float | None = None,
    *,
    central_power: np.ndarray | None = None,
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
    central_power : numpy.ndarray, optional
        :func:`~agent.lattice.central_power_spectrum` of the image, when already computed.

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
    powers = [central_power if central_power is not None else central_power_spectrum(image)]
    powers += [central_power_spectrum(image[r0 : r0 + side, c0 : c0 + side]) for r0, c0 in starts[1:]]
    found = [
        spacing for power in powers if (spacing := _ring_spacing(power, min_px, expected_px)) is not None
    ]
    return float(np.median(found)) if found else None


@functools.lru_cache(maxsize=8)
def _radial_bins(side: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer radius of every bin of a half-plane spectrum (``central_power_spectrum``), bins per radius."""
    rows, cols = np.indices((side, side // 2 + 1))
    radius = np.rint(np.hypot(rows - side // 2, cols)).astype(np.int64).ravel()
    return radius, np.maximum(np.bincount(radius), 1)


def _ring_spacing(spectrum: np.ndarray, min_px: float, expected_px: float | None = None) -> float | None:
    """:func:`estimate_lattice_spacing` of one crop's power spectrum, pixels (None: no clear ring)."""
    side = spectrum.shape[0]
    radius, counts = _radial_bins(side)
    profile = np.bincount(radius, spectrum.ravel()) / counts
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


def estimate_pixel_size(image: np.ndarray, material: str | Material | None = None) -> float:
    """Pixel size of an image of a known material, from its lattice, nanometres per pixel.

    The fundamental ring of the power spectrum is the material's ``a`` (or, for a
    perovskite whose cation sublattices scatter alike, the (1, 1) ring at ``a / sqrt 2``):
    the largest spacing whose two reflections stand out is taken as ``a``.

    Parameters
    ----------
    image : numpy.ndarray
        2-D image of the crystal, at least 32 x 32 pixels.
    material : str or Material, optional
        The material (default BiFeO3 [001]).

    Returns
    -------
    float
        Pixel size, nm.

    Raises
    ------
    InvalidImageError
        If the image shows no lattice.

    Examples
    --------
    >>> rows, cols = np.mgrid[:256, :256]
    >>> image = np.cos(2 * np.pi * cols / 16.0) + np.cos(2 * np.pi * rows / 16.0) + 3
    >>> round(estimate_pixel_size(image, "SrTiO3-001"), 4)
    0.0243
    """
    material = resolve_material(material)
    prepared, _ = _prepare_image(image, None, "image")
    power = central_power_spectrum(prepared)
    fundamental = estimate_lattice_spacing(prepared, central_power=power)
    if fundamental is None:
        raise InvalidImageError(
            "no lattice periodicity found, so the pixel size cannot be estimated; give it with --pixel-size"
        )
    return material.a_nm / _cell_spacing(prepared, power, fundamental, material)


def _cell_spacing(prepared: np.ndarray, power: np.ndarray, fundamental: float, material: Material) -> float:
    """The cell's ``a`` in pixels from the image's fundamental ring: the ring itself, or sqrt 2 x it.

    The strongest ring may be the (1, 1) one: a lattice at sqrt 2 x the spacing whose two
    reflections carry real power (a few % of the fundamental's, as the (1, 0) reflections
    of SrTiO3 do, not leakage into an empty annulus) is the real cell.
    """
    wider = fundamental * math.sqrt(2)
    if min(prepared.shape) < 3 * wider:
        return fundamental
    inner = fit_lattice(prepared, fundamental, material, power=power)
    outer = fit_lattice(prepared, wider, material, power=power)
    if outer is not None and (inner is None or outer.peak_power >= 0.02 * inner.peak_power):
        return estimate_lattice_spacing(prepared, expected_px=wider, central_power=power) or wider
    return fundamental


def check_pixel_size(
    image: np.ndarray, pixel_size_nm: float, material: str | Material | None = None, source: str = "image"
) -> float | None:
    """Check a pixel size against the image's lattice and the material, before any work is done.

    Parameters
    ----------
    image : numpy.ndarray
        2-D image.
    pixel_size_nm : float
        The pixel size to check, nm.
    material : str or Material, optional
        The material (default BiFeO3 [001]).
    source : str
        Name of the image in messages.

    Returns
    -------
    float or None
        The lattice spacing measured near the material's, pixels (None when the image shows no
        clear lattice: nothing to check against).

    Raises
    ------
    InvalidImageError
        If at this pixel size the cell would be unresolved (under 4 px: an Angstrom value given
        as nm?), larger than a third of the image (a picometre value given as nm?), or if the
        image's lattice is more than 20 % off the material's (the message gives the pixel size
        the lattice implies).
    """
    material = resolve_material(material)
    expected_px = material.a_nm / pixel_size_nm
    rows, cols = image.shape
    if expected_px < 4.0:
        raise InvalidImageError(
            f"{source}: at {pixel_size_nm:g} nm/px the {material.name} cell ({material.a_nm:g} nm) spans "
            f"{expected_px:.2f} px, too few to resolve columns; is the pixel size in Angstrom rather than nm "
            f"(then give {pixel_size_nm / 10:g})?"
        )
    if expected_px > min(rows, cols) / 3:
        raise InvalidImageError(
            f"{source}: at {pixel_size_nm:g} nm/px the {material.name} cell spans {expected_px:.0f} px, more "
            f"than a third of the {rows}x{cols} image; is the pixel size in pm or Angstrom rather than nm?"
        )
    prepared, _ = _prepare_image(image, None, source)
    power = central_power_spectrum(prepared)
    blind = estimate_lattice_spacing(prepared, central_power=power)
    if blind is None:
        return None
    # The cell as the image shows it, whatever the pixel size says; a ring that merely lies near
    # the expected spacing can be the (1, 1) ring of a cell sqrt 2 larger, or clutter.
    cell = _cell_spacing(prepared, power, blind, material)
    if abs(cell / expected_px - 1) <= 0.2:
        return estimate_lattice_spacing(prepared, expected_px=cell, central_power=power) or cell
    raise InvalidImageError(
        f"{source}: the image's lattice spacing is {cell:.1f} px = {cell * pixel_size_nm:.3f} nm at "
        f"{pixel_size_nm:g} nm/px, but {material.name} has a = {material.a_nm:g} nm "
        f"({100 * (cell / expected_px - 1):+.0f} %); check the pixel size (the lattice implies "
        f"{material.a_nm / cell:.4g} nm/px, or use --pixel-size auto) or the material"
    )


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
    # The kernel is the outer product of two second differences: two slicing passes.
    along_rows = crop[:-2] - 2 * crop[1:-1] + crop[2:]
    # Every second pixel in each direction: a quarter of the medians' cost, the same estimate
    # within a percent (the kernel response decorrelates within two pixels).
    response = (along_rows[::2, :-2] - 2 * along_rows[::2, 1:-1] + along_rows[::2, 2:])[:, ::2]
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


def _contrast_threshold(
    image: np.ndarray, scales: PeakScales, threshold_sigma: float, noise: float | None = None
) -> float:
    """Smallest smoothed contrast above the floor that counts as a column, image units."""
    noise = noise_sigma(image) if noise is None else noise
    # White noise of sigma s comes out of a Gaussian filter of width w as s / (2 sqrt(pi) w).
    return threshold_sigma * noise / (2 * math.sqrt(math.pi) * scales.sigma_px)


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
    smoothed = ndimage.gaussian_filter(image, scales.sigma_px, mode="nearest", truncate=_SMOOTHING_TRUNCATE)
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
    image: np.ndarray, scales: PeakScales, threshold_sigma: float, noise: float | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integer column positions and the floor under each (numpy path)."""
    smoothed = ndimage.gaussian_filter(image, scales.sigma_px, mode="nearest", truncate=_SMOOTHING_TRUNCATE)
    rows, cols = _local_maxima_3x3(smoothed, scales.border_px)
    floor_grid = _floor_grid(smoothed, scales.floor_block)
    floor = _floor_at(floor_grid, scales.floor_block, rows, cols)
    contrast = smoothed[rows, cols] - floor
    strong = contrast > _contrast_threshold(image, scales, threshold_sigma, noise)
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
    start_shift: tuple[Any, Any] | None = None,
) -> PeakFit:
    """Gaussian-weighted centroid refinement of all peaks at once.

    Written against the operations numpy arrays and torch tensors share, so the
    CUDA path (:mod:`agent.columns_torch`) runs the very same arithmetic on the GPU.
    ``rows`` and ``cols`` are the integer patch centres; ``start_shift`` (row, col offsets
    from them, pixels) starts the iteration from known sub-pixel positions.
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
    if start_shift is not None:
        shift_row = shift_row + like(np.asarray(start_shift[0], dtype=np.float32))
        shift_col = shift_col + like(np.asarray(start_shift[1], dtype=np.float32))
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


def detect_peaks(
    image: np.ndarray, spacing_px: float, config: ColumnFinderConfig | None = None, noise: float | None = None
) -> PeakFit:
    """Find and refine columns in an image with a known lattice spacing (numpy path).

    Parameters
    ----------
    image : numpy.ndarray
        2-D float image without NaN.
    spacing_px : float
        A-A lattice spacing, pixels.
    config : ColumnFinderConfig, optional
        Threshold, scales and iterations.
    noise : float, optional
        Pixel noise standard deviation, when already known (:func:`noise_sigma`).

    Returns
    -------
    PeakFit
        One entry per column, pixel units.
    """
    config = config or ColumnFinderConfig()
    scales = PeakScales.from_spacing(spacing_px, config)
    image = np.asarray(image, dtype=np.float32)
    rows, cols, background = _candidate_peaks(image, scales, config.threshold_sigma, noise)
    return refine_peaks(image, background, rows, cols, scales, config.refine_iterations)


def measured_column_width(fit: PeakFit) -> float | None:
    """Gaussian sigma of the image's bright columns, pixels: the median fitted width of the brighter half.

    The bright (A) columns give the probe's width with the least noise; the dim ones are
    imaged by the same probe. None with fewer than 8 columns.
    """
    if fit.row.size < 8:
        return None
    bright = fit.height >= np.median(fit.height)
    widths = fit.width[bright & np.isfinite(fit.width) & (fit.quality > 0.5)]
    return float(np.median(widths)) if widths.size >= 4 else None


def refine_with_measured_width(
    image: np.ndarray, fit: PeakFit, spacing_px: float, config: ColumnFinderConfig, rounds: int = 2
) -> tuple[PeakFit, ColumnFinderConfig]:
    """Refine again with the column width measured from the image, until it settles.

    A weighted centroid whose weight is narrower than the column is unbiased but noisy, and
    its patch cuts the column's tails; with the measured width it reaches the precision of a
    2-D Gaussian fit. The width estimate itself is made with the current weight, so a second
    round corrects what the first (too narrow) weight truncated.

    Parameters
    ----------
    image : numpy.ndarray
        The prepared image.
    fit : PeakFit
        Columns refined with ``config.column_sigma_fraction``.
    spacing_px : float
        A-A spacing, pixels.
    config : ColumnFinderConfig
        The finder's configuration.
    rounds : int
        Most re-refinements.

    Returns
    -------
    fit : PeakFit
        The columns refined with the measured width.
    config : ColumnFinderConfig
        ``config`` with ``column_sigma_fraction`` set to the measured width (for the heights).
    """
    for _ in range(rounds):
        width = measured_column_width(fit)
        current = PeakScales.from_spacing(spacing_px, config).sigma_px
        if width is None or abs(width / current - 1) < 0.05:
            break
        # Stay within what a column can be: neither a point nor wider than a third of A-B.
        fraction = float(np.clip(width / spacing_px, 0.03, 0.24))
        config = config.model_copy(update={"column_sigma_fraction": fraction})
        scales = PeakScales.from_spacing(spacing_px, config)
        centre_row, centre_col = np.rint(fit.row), np.rint(fit.col)
        # Started from the positions refined so far, a few iterations settle the new weight.
        fit = refine_peaks(
            image,
            fit.background.astype(np.float32),
            centre_row.astype(np.int64),
            centre_col.astype(np.int64),
            scales,
            # The wider weight moves the estimate by a fraction of a pixel: 1.5 x the iterations.
            (3 * config.refine_iterations + 1) // 2,
            start_shift=(fit.row - centre_row, fit.col - centre_col),
        )
    return fit, config


_WIDTH_CROP_PX = 512


def _measured_width_config(
    image: np.ndarray, spacing_px: float, config: ColumnFinderConfig, noise: float
) -> ColumnFinderConfig:
    """``config`` with the column width measured on the image's central crop (and twice the iterations)."""
    rows, cols = image.shape
    side = min(rows, cols, _WIDTH_CROP_PX)
    r0, c0 = (rows - side) // 2, (cols - side) // 2
    crop = image[r0 : r0 + side, c0 : c0 + side]
    fit = detect_peaks(crop, spacing_px, config, noise)
    _, measured = refine_with_measured_width(crop, fit, spacing_px, config)
    if measured.column_sigma_fraction == config.column_sigma_fraction:
        return config
    # The wider weight converges more slowly from the integer seed: twice the iterations.
    return measured.model_copy(update={"refine_iterations": min(2 * config.refine_iterations, 50)})


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


def robust_trend(
    x: np.ndarray,
    y: np.ndarray,
    values: np.ndarray,
    at: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, float]:
    """A plane in ``(x, y)`` fitted to ``values`` with outliers left out, and the residual spread.

    Thickness and defocus change a column's intensity slowly across a tile; a plane
    takes that out, and two reweighting passes keep substituted or empty columns from
    pulling it.

    Parameters
    ----------
    x, y : numpy.ndarray
        Positions (any unit).
    values : numpy.ndarray
        One value per position.
    at : tuple of numpy.ndarray, optional
        Other positions ``(x, y)`` to evaluate the plane at (default: the fitted ones).

    Returns
    -------
    trend : numpy.ndarray
        The plane at every position (of ``at`` when given).
    spread : float
        Robust standard deviation (1.4826 x MAD) of the residuals; 0 with fewer than 4 values.

    Examples
    --------
    >>> x = np.arange(20.0)
    >>> values = 2.0 + 0.1 * x
    >>> values[5] = 9.0
    >>> trend, spread = robust_trend(x, np.zeros(20), values)
    >>> round(float(trend[5]), 2), round(spread, 3)
    (2.5, 0.0)
    """
    values = np.asarray(values, dtype=np.float64)
    at_x, at_y = (x, y) if at is None else at
    if values.size < 4:
        centre = float(np.median(values)) if values.size else 0.0
        return np.full(np.size(at_x), centre), 0.0
    x_mean, y_mean = float(np.mean(x)), float(np.mean(y))
    design = np.stack([np.ones(values.size), x - x_mean, y - y_mean], axis=1)
    # A plane needs a few columns spread across the tile; otherwise a mean level is steadier.
    used = np.array([True, values.size >= 12 and np.ptp(x) > 0, values.size >= 12 and np.ptp(y) > 0])
    design = design[:, used]
    inlier = np.ones(values.size, dtype=bool)
    coefficients = np.zeros(design.shape[1])
    spread = 0.0
    for _ in range(3):
        # Normal equations: a small solve instead of an SVD of the whole (N x 3) design.
        chosen = design[inlier]
        try:
            coefficients = np.linalg.solve(chosen.T @ chosen, chosen.T @ values[inlier])
        except np.linalg.LinAlgError:
            coefficients = np.linalg.lstsq(chosen, values[inlier], rcond=None)[0]
        residual = values - design @ coefficients
        kept = residual[inlier]
        spread = _MAD_TO_SIGMA * float(np.median(np.abs(kept - np.median(kept))))
        if spread == 0:
            break
        inlier = np.abs(residual) <= 3.0 * spread
        if np.count_nonzero(inlier) < design.shape[1] + 2:
            break
    full = np.zeros(3)
    full[used] = coefficients
    trend = full[0] + full[1] * (np.asarray(at_x) - x_mean) + full[2] * (np.asarray(at_y) - y_mean)
    return np.broadcast_to(trend, (np.size(at_x),)).astype(np.float64), spread


def _heights_at(
    image: np.ndarray, rows: np.ndarray, cols: np.ndarray, background: np.ndarray, scales: PeakScales
) -> np.ndarray:
    """Matched-filter height of a Gaussian column of the expected width at sub-pixel positions."""
    half = scales.half_patch
    offsets = np.arange(-half, half + 1)
    centre_row, centre_col = np.rint(rows).astype(np.int64), np.rint(cols).astype(np.int64)
    patch_rows = np.clip(centre_row[:, None] + offsets[None, :], 0, image.shape[0] - 1)
    patch_cols = np.clip(centre_col[:, None] + offsets[None, :], 0, image.shape[1] - 1)
    patches = image[patch_rows[:, :, None], patch_cols[:, None, :]] - background[:, None, None]
    sigma = scales.sigma_px
    row_weight = np.exp(-((patch_rows - rows[:, None]) ** 2) / (2 * sigma**2))
    col_weight = np.exp(-((patch_cols - cols[:, None]) ** 2) / (2 * sigma**2))
    template = row_weight[:, :, None] * col_weight[:, None, :]
    return (template * patches).sum(axis=(1, 2)) / (template**2).sum(axis=(1, 2))


def vacancy_probability(
    height: np.ndarray, typical: np.ndarray, noise: float, prior: float = 0.02
) -> np.ndarray:
    """Probability that a lattice site is empty, from the matched-filter height measured there.

    Two hypotheses with Gaussian measurement noise: the site holds a column of its typical
    height, or none (height 0); ``prior`` is the share of empty sites expected. At high dose
    this is a clean cut at about half the typical height; at low dose the prior keeps noise
    from turning ordinary dim columns into vacancies.

    Parameters
    ----------
    height : numpy.ndarray
        Measured heights above the local floor, image units.
    typical : numpy.ndarray
        Typical height of a column on that site, image units.
    noise : float
        Standard deviation of a height measurement, image units.
    prior : float
        Prior probability of an empty site.

    Returns
    -------
    numpy.ndarray
        Posterior probability of an empty site, in [0, 1].

    Examples
    --------
    >>> vacancy_probability(np.array([0.0, 5.0, 10.0]), np.array([10.0, 10.0, 10.0]), 1.0).round(3).tolist()
    [1.0, 0.02, 0.0]
    """
    typical = np.maximum(np.asarray(typical, dtype=np.float64), 0.0)
    # log of L(present) / L(empty) for N(typical, noise) against N(0, noise).
    log_ratio = (2.0 * np.asarray(height, dtype=np.float64) * typical - typical**2) / (2.0 * noise**2)
    log_odds_empty = math.log(prior / (1.0 - prior)) - np.clip(log_ratio, -700.0, 700.0)
    return 1.0 / (1.0 + np.exp(-log_odds_empty))


@dataclass(frozen=True)
class SiteResult:
    """Species, flags and vacancy sites of one image's columns (pixel units).

    Parameters
    ----------
    fit : PeakFit
        The refined columns, with the dim columns found at empty sites appended.
    species : numpy.ndarray
        Site role of every column (int8).
    abnormal : numpy.ndarray
        Intensity outliers within their site.
    intensity_z : numpy.ndarray
        Robust z-score of intensity within the site (NaN for O columns).
    vacancies : VacancySites
        Empty or too-dim sites (``x_nm``, ``y_nm`` hold pixels until the caller places them).
    lattice : LatticeFit or None
        The fitted lattice (None when none was found and species fell back to intensity).
    """

    fit: PeakFit
    species: np.ndarray
    abnormal: np.ndarray
    intensity_z: np.ndarray
    vacancies: VacancySites
    lattice: LatticeFit | None


def _concatenate_fits(first: PeakFit, second: PeakFit) -> PeakFit:
    return PeakFit(
        **{
            name: np.concatenate([getattr(first, name), getattr(second, name)])
            for name in PeakFit.__annotations__
        }
    )


def _site_outliers(
    fit: PeakFit, species: np.ndarray, abnormal_sigma: float, reference: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Robust z-score of intensity within each cation site and the abnormal flags.

    ``reference`` marks the columns the site's trend and spread are measured on (columns on
    their lattice site); the z-score is then given to every column of the site.
    """
    z = np.full(species.size, np.nan)
    reference = np.ones(species.size, dtype=bool) if reference is None else reference
    for code in (SPECIES_A, SPECIES_B):
        members = np.flatnonzero(species == code)
        basis = members[reference[members]]
        if basis.size < 4:
            continue
        # The matched-filter height is the least-squares amplitude of the column: the least noisy
        # intensity measure (a flat patch sum weighs the noisy tails as much as the peak).
        trend, spread = robust_trend(
            fit.col[basis], fit.row[basis], fit.height[basis], at=(fit.col[members], fit.row[members])
        )
        if spread <= 0:
            continue
        # At very high dose the spread falls to the finder's own systematic error (a truncated
        # patch, pixel phase); below 2 % of the height, scatter is calibration, not chemistry.
        spread = max(spread, _MIN_RELATIVE_SPREAD * float(np.median(np.abs(trend))))
        z[members] = (fit.height[members] - trend) / spread
    return z, np.abs(np.nan_to_num(z)) > abnormal_sigma


def _intensity_species(fit: PeakFit) -> np.ndarray:
    """A/B by an Otsu split of log intensity: the fallback when no lattice could be fitted."""
    from skimage.filters import threshold_otsu

    species = np.zeros(fit.intensity.size, dtype=np.int8)
    if fit.intensity.size < 4:
        return species
    log_intensity = np.log(np.maximum(fit.intensity, 1e-6 * max(float(fit.intensity.max()), 1e-12)))
    if np.ptp(log_intensity) > 0:
        species[log_intensity < threshold_otsu(log_intensity)] = SPECIES_B
    return species


def _light_columns_as_oxygen(
    species: np.ndarray, height: np.ndarray, typical: np.ndarray, material: Material, noise: float
) -> np.ndarray:
    """B-site columns as dim as a pure-O column are O columns.

    A B column that lost its cation (a B vacancy with the column's O left) is an O column,
    and so is an O column that a broken lattice phase (a dislocation core) put on a B site.
    The cut is the geometric mean of the O and B contrasts the material predicts, and a
    column must also lie three noise levels below its site's height, so that at low dose
    the noise of an ordinary B column does not make it O.
    """
    b_site, o_site = material.site("B"), material.site("O")
    if b_site is None or o_site is None:
        return species
    ratio = o_site.scattering / b_site.scattering
    if ratio >= 0.5:
        return species
    cut = np.minimum(math.sqrt(ratio) * typical, typical - 3.0 * noise)
    light = (species == SPECIES_B) & (height < cut)
    return np.where(light, SPECIES_O, species).astype(np.int8)


def _strong_typical_heights(
    species: np.ndarray, fit: PeakFit, strong: np.ndarray
) -> tuple[float, float] | None:
    """Median heights of the A and B columns where the lattice is strong, or None with under 4 of either."""
    typical = []
    for code in (SPECIES_A, SPECIES_B):
        members = strong & (species == code)
        if np.count_nonzero(members) < 4:
            return None
        typical.append(float(np.median(fit.height[members])))
    return typical[0], typical[1]


def _diagonal_class(
    image: np.ndarray,
    species: np.ndarray,
    fit: PeakFit,
    strength: np.ndarray,
    lattice: LatticeFit,
    material: Material,
    weak: float = 0.5,
) -> np.ndarray:
    """Cation or O from the diagonal reflections, where the primitive ones are too weak to say.

    See :func:`agent.lattice.diagonal_says_oxygen`: inside a vacancy cluster (1, 0) fades and
    can put an O column on a B site or a B column on an O site; (1, 1) and (1, -1) still tell
    the two classes apart. A cation it moves to O becomes O; an O column it moves to the
    cations becomes B, and :func:`_weak_lattice_by_height` then decides A or B. ``strength``
    is the lattice strength at every column.
    """
    suspect = np.flatnonzero(strength < weak)
    if suspect.size == 0:
        return species
    says_o = diagonal_says_oxygen(image, lattice, material, fit.col[suspect], fit.row[suspect])
    if says_o is None:
        return species
    species = species.copy()
    current_o = species[suspect] == SPECIES_O
    # Near the image edge the window is cut and its phase less sure: a column as bright as the
    # A columns stays a cation whatever the diagonal says.
    typical = _strong_typical_heights(species, fit, strength >= weak)
    if typical is not None:
        says_o &= fit.height[suspect] < math.sqrt(typical[0] * max(typical[1], 0.0))
    species[suspect[says_o & ~current_o]] = SPECIES_O
    species[suspect[~says_o & current_o]] = SPECIES_B
    return species


def _weak_lattice_by_height(
    species: np.ndarray, fit: PeakFit, strength: np.ndarray, min_strength: float = 0.5
) -> np.ndarray:
    """Where the local lattice is too weak to trust its phase, A or B follows the height.

    Inside a vacancy cluster or at an amorphous rim the (1, 0) reflection fades and its
    phase can put a B column on an A site. There a cation column takes the cation role whose
    typical height (measured where the lattice is strong) it is nearest to on a log scale.
    ``strength`` is the lattice strength at every column.
    """
    # Only cations change: cation or O was decided before (by :func:`_diagonal_class`).
    weak = np.flatnonzero((strength < min_strength) & np.isin(species, (SPECIES_A, SPECIES_B)))
    typical = _strong_typical_heights(species, fit, strength >= min_strength)
    if weak.size == 0 or typical is None or typical[1] <= 0 or typical[0] <= typical[1]:
        return species
    species = species.copy()
    a_cut = math.sqrt(typical[0] * typical[1])
    species[weak] = np.where(fit.height[weak] >= a_cut, SPECIES_A, SPECIES_B).astype(np.int8)
    return species


def assign_species(
    image: np.ndarray,
    fit: PeakFit,
    spacing_px: float,
    config: ColumnFinderConfig,
    material: Material | None = None,
    noise: float | None = None,
    power: np.ndarray | None = None,
) -> SiteResult:
    """Sites, species, intensity outliers and vacancy sites of refined columns.

    Parameters
    ----------
    image : numpy.ndarray
        The prepared 2-D image (float32, no NaN).
    fit : PeakFit
        Refined columns from :func:`detect_peaks` (or the seed method).
    spacing_px : float
        A-A lattice spacing, pixels.
    config : ColumnFinderConfig
        Thresholds (``abnormal_sigma``, ``site_threshold_sigma``, ``vacancy_min_confidence``).
    material : Material, optional
        The sites; ``config.material`` when not given.
    noise : float, optional
        Pixel noise standard deviation (:func:`noise_sigma` of the image when not given).
    power : numpy.ndarray, optional
        :func:`~agent.lattice.central_power_spectrum` of the image, when already computed.

    Returns
    -------
    SiteResult
        Columns (with dim columns found at empty sites), species, flags and vacancy sites.
    """
    material = material or resolve_material(config.material)
    scales = PeakScales.from_spacing(spacing_px, config)
    lattice = fit_lattice(image, spacing_px, material, power=power) if fit.row.size >= 8 else None
    if lattice is None:
        species = _intensity_species(fit)
        z, abnormal = _site_outliers(fit, species, config.abnormal_sigma)
        return SiteResult(fit, species, abnormal, z, VacancySites.empty(), None)
    noise = noise_sigma(image) if noise is None else noise
    # Matched-filter heights carry white noise of sigma / (sqrt(pi) w) for a template of width w.
    height_noise = max(noise / (math.sqrt(math.pi) * scales.sigma_px), 1e-12)
    # A maximum that is no significant column under the matched filter is noise (vacuum, the
    # floor between columns at low dose): it is dropped before it can claim a site.
    significant = fit.height >= config.site_threshold_sigma * height_noise
    if not np.all(significant):
        fit = PeakFit(**{name: getattr(fit, name)[significant] for name in PeakFit.__annotations__})
    assignment = assign_sites(lattice, material, fit.col, fit.row)
    species = assignment.role.copy()
    # Only columns of about their site's height propose neighbours: at a crystal edge the
    # faint maxima in the vacuum beyond would otherwise make a row of vacancies.
    proposers = np.zeros(species.size, dtype=bool)
    for code in (SPECIES_A, SPECIES_B):
        members = np.flatnonzero(species == code)
        trend, _ = robust_trend(fit.col[members], fit.row[members], fit.height[members])
        proposers[members] = fit.height[members] >= 0.5 * trend
    empty = empty_sites(
        lattice, material, assignment, image.shape, border_px=scales.border_px, proposers=proposers
    )
    if len(empty):
        from scipy.spatial import cKDTree

        cations = np.flatnonzero(np.isin(species, (SPECIES_A, SPECIES_B)))
        tree = cKDTree(np.stack([fit.col[cations], fit.row[cations]], 1))
        _, nearest = tree.query(np.stack([empty.x_px, empty.y_px], 1), k=min(4, cations.size))
        nearest = nearest.reshape(len(empty), -1)
        background = np.median(fit.background[cations][nearest], axis=1)
        heights = _heights_at(image, empty.y_px, empty.x_px, background, scales)
    else:
        background = heights = np.zeros(0)
    # The typical height of a site comes from every expected site, found or not: at low dose
    # the found B columns alone are the bright tail.
    typical_found = np.zeros(species.size)
    typical_empty = np.zeros(len(empty))
    for code in (SPECIES_A, SPECIES_B):
        found_members = np.flatnonzero(species == code)
        empty_members = np.flatnonzero(empty.role == code)
        x = np.concatenate([fit.col[found_members], empty.x_px[empty_members]])
        y = np.concatenate([fit.row[found_members], empty.y_px[empty_members]])
        trend, _ = robust_trend(x, y, np.concatenate([fit.height[found_members], heights[empty_members]]))
        typical_found[found_members] = trend[: found_members.size]
        typical_empty[empty_members] = trend[found_members.size :]
    empty_probability = vacancy_probability(heights, typical_empty, height_noise, config.vacancy_prior)
    dim = empty_probability < 0.5
    if np.any(dim):
        added = refine_peaks(
            image,
            background[dim].astype(np.float32),
            np.rint(empty.y_px[dim]).astype(np.int64),
            np.rint(empty.x_px[dim]).astype(np.int64),
            scales,
            config.refine_iterations,
        )
        fit = _concatenate_fits(fit, added)
        species = np.concatenate([species, empty.role[dim]]).astype(np.int8)
        typical_found = np.concatenate([typical_found, typical_empty[dim]])
    # The columns are final from here on: their lattice strength is sampled once.
    strength = lattice.strength(fit.col, fit.row)
    species = _light_columns_as_oxygen(species, fit.height, typical_found, material, height_noise)
    species = _diagonal_class(image, species, fit, strength, lattice, material)
    species = _weak_lattice_by_height(species, fit, strength)
    # Empty sites, and columns far too dim for their site (a B column that lost its cation):
    # the probability that the site is empty, given the measured height, its noise and the prior.
    # Only columns inside the crystal can be too dim for a site (not atoms of an amorphous patch).
    cation = np.isin(species, (SPECIES_A, SPECIES_B)) & (strength >= 0.6)
    found_confidence = np.where(
        cation, vacancy_probability(fit.height, typical_found, height_noise, config.vacancy_prior), 0.0
    )
    empty_confidence = empty_probability[~dim]
    relative_found = fit.height / np.where(typical_found > 0, typical_found, np.inf)
    relative_empty = heights[~dim] / np.where(typical_empty[~dim] > 0, typical_empty[~dim], np.inf)
    vacancies = VacancySites(
        x_nm=np.concatenate([fit.col, empty.x_px[~dim]]),
        y_nm=np.concatenate([fit.row, empty.y_px[~dim]]),
        row_px=np.concatenate([fit.row, empty.y_px[~dim]]),
        col_px=np.concatenate([fit.col, empty.x_px[~dim]]),
        species=np.concatenate([species, empty.role[~dim]]).astype(np.int8),
        confidence=np.concatenate([found_confidence, empty_confidence]),
        relative_height=np.concatenate([relative_found, relative_empty]),
        occupied=np.concatenate([np.ones(species.size, bool), np.zeros(int(np.count_nonzero(~dim)), bool)]),
    )
    vacancies = vacancies.select(vacancies.confidence >= max(config.vacancy_min_confidence, 1e-9))
    # The sites' intensity references come from columns on their site inside the crystal, not
    # from the atoms of an amorphous patch that the nearest site claims.
    offset = np.concatenate([assignment.offset_px, np.zeros(fit.row.size - assignment.offset_px.size)])
    on_site = (offset <= 0.15 * spacing_px) & (strength >= 0.5)
    z, abnormal = _site_outliers(fit, species, config.abnormal_sigma, on_site)
    return SiteResult(fit, species, abnormal, z, vacancies, lattice)


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
    material = resolve_material(config.material)
    # One spectrum of the central crop serves the spacing estimate and the lattice fit.
    power = central_power_spectrum(prepared)
    if config.lattice_spacing_nm is not None:
        spacing_px = config.lattice_spacing_nm / pixel_size_nm
    else:
        expected_nm = config.expected_spacing_nm or material.a_nm
        estimate = estimate_lattice_spacing(
            prepared, expected_px=expected_nm / pixel_size_nm, central_power=power
        )
        blind = estimate_lattice_spacing(prepared, central_power=power)
        # A longer period than the ring near the material's spacing: that ring is the (1, 1) one
        # of a larger cell (a pixel size off by about sqrt 2), not the material's cell.
        if estimate is not None and blind is not None and blind > 1.2 * estimate:
            estimate = None
        if estimate is None:
            return Columns.empty(
                _no_lattice_reason(blind, pixel_size_nm, expected_nm, material),
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
    noise = noise_sigma(prepared)
    if config.estimate_width and config.method == "peaks" and prepared.size > _WIDTH_CROP_PX**2:
        # A large image: the width is measured on its central crop and the whole image refined
        # once with it, instead of refining every column of the image two or three times.
        config = _measured_width_config(prepared, spacing_px, config, noise)
    if config.method == "seed":
        fit = detect_regions_seed(prepared, spacing_px)
    elif _use_cuda(config.device):
        from agent.columns_torch import detect_peaks_torch

        fit = detect_peaks_torch(prepared, spacing_px, config, device="cuda")
    else:
        fit = detect_peaks(prepared, spacing_px, config, noise)
    if fit.row.size == 0:
        return Columns.empty(
            f"no column stands {config.threshold_sigma:g} noise levels above the background",
            pixel_size_nm,
            tile_id,
            masked,
        )
    if config.estimate_width and config.method == "peaks" and prepared.size <= _WIDTH_CROP_PX**2:
        fit, config = refine_with_measured_width(prepared, fit, spacing_px, config)
    sites = assign_species(prepared, fit, spacing_px, config, material, noise, power)
    fit = sites.fit
    scattering = fit.intensity / electrons_per_pixel if electrons_per_pixel else fit.intensity
    vacancies = dataclasses.replace(
        sites.vacancies,
        x_nm=origin_nm[0] + sites.vacancies.col_px * pixel_size_nm,
        y_nm=origin_nm[1] + sites.vacancies.row_px * pixel_size_nm,
    )
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
        species=sites.species,
        abnormal=sites.abnormal,
        quality=fit.quality,
        pixel_size_nm=pixel_size_nm,
        lattice_spacing_nm=spacing_px * pixel_size_nm,
        tile_id=tile_id,
        masked_pixels=masked,
        intensity_z=sites.intensity_z,
        vacancies=vacancies,
        material=material.name,
    )


def _no_lattice_reason(
    blind: float | None, pixel_size_nm: float, expected_nm: float, material: Material
) -> str:
    """Why no lattice ring was found near the material's spacing: none at all, or one elsewhere.

    ``blind`` is the spacing the image shows without a material to look for, pixels (or None).
    """
    if blind is not None:
        found_nm = blind * pixel_size_nm
        return (
            f"the lattice spacing is {found_nm:.3f} nm but {material.name} has {expected_nm:.3f} nm "
            f"({100 * (found_nm / expected_nm - 1):+.0f} %): check the pixel size ({pixel_size_nm:g} nm/px) "
            "and the material"
        )
    return (
        "no lattice periodicity found (vacuum, amorphous or featureless tile); "
        "give lattice_spacing_nm to search anyway"
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


LATTICE_DENSITY_SHARE = 0.5
"""A strip of a tile holds lattice when it holds at least this share of the tile's median count of
columns per strip (:func:`lattice_extent`)."""


def lattice_extent(
    x_nm: np.ndarray,
    y_nm: np.ndarray,
    extent_nm: tuple[float, float, float, float],
    lattice_spacing_nm: float,
) -> tuple[float, float, float, float]:
    """The part of a tile's area where it found lattice, as a rectangle, nm.

    A tile that runs past the edge of the film (or lands past it, off by the stage's
    placement error and drift) has a strip along one side without lattice: vacuum or the
    support film, which in HAADF still gives a background (and a few noise peaks) but no
    lattice. The columns along the film's edge there lack neighbours on one side and would
    score as anomalies although they lie inside the scanned area; taking the lattice's extent
    as the scanned area makes them the rim of the scan instead. Columns are counted in strips
    one lattice spacing wide along x and along y; from each side, strips holding under
    :data:`LATTICE_DENSITY_SHARE` of the tile's median strip count are cut off when they are
    at least two spacings wide together, the lattice being where two dense strips lie side by
    side (a vacancy cluster, a dark defect or vacuum in a corner never cuts).

    Parameters
    ----------
    x_nm, y_nm : numpy.ndarray
        Positions of the tile's columns, stage nanometres.
    extent_nm : tuple of float
        ``(x_min, x_max, y_min, y_max)`` of the tile, stage nanometres.
    lattice_spacing_nm : float
        Lattice spacing, nm.

    Returns
    -------
    tuple of float
        The lattice's ``(x_min, x_max, y_min, y_max)``, nm: ``extent_nm`` itself when the
        lattice reaches every side, or when the tile holds no columns.

    Examples
    --------
    >>> x, y = np.meshgrid(np.arange(0.2, 6.9, 0.4), np.arange(0.2, 10.0, 0.4))  # lattice ends at 6.6
    >>> [round(v, 3) for v in lattice_extent(x.ravel(), y.ravel(), (0.0, 10.0, 0.0, 10.0), 0.4)]
    [0.0, 6.8, 0.0, 10.0]
    """
    x = np.asarray(x_nm, dtype=np.float64)
    y = np.asarray(y_nm, dtype=np.float64)
    if x.size == 0:
        return extent_nm
    bounds = list(extent_nm)
    for values, (low, high) in ((x, (0, 1)), (y, (2, 3))):
        start, stop = bounds[low], bounds[high]
        strips = max(1, round((stop - start) / lattice_spacing_nm))
        width = (stop - start) / strips
        counts = np.bincount(
            np.clip(((values - start) // width).astype(np.int64), 0, strips - 1), minlength=strips
        )
        quarter = strips // 4
        level = float(np.median(counts[quarter : max(quarter + 1, strips - quarter)]))
        dense = counts >= LATTICE_DENSITY_SHARE * level
        # Lattice is two dense strips side by side: a lone one is a line of noise peaks (the column
        # finder's false peaks gather along the image border).
        paired = np.flatnonzero(dense[:-1] & dense[1:])
        if level <= 0 or paired.size == 0:
            continue
        first, last = int(paired[0]), int(paired[-1]) + 1
        if first >= 2:
            bounds[low] = start + first * width
        if strips - 1 - last >= 2:
            bounds[high] = start + (last + 1) * width
    return (bounds[0], bounds[1], bounds[2], bounds[3])
