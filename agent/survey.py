"""Candidate regions on the stage and cheap features of a survey image over them.

Guided acquisition chooses among a fixed set of *candidate regions*: the tiles of a
regular tiling of the accessible stage at the atomic-resolution pixel size. A
:class:`CandidateGrid` holds their centres and extents in stage nanometres and turns
a candidate into a :class:`~agent.driver.ScanRequest`.

Before the guided part of a session the microscope usually takes a coarse *survey*
(for example 0.25 nm/px, atomic columns not resolved) of the whole stage;
:func:`survey_request` plans it with as few tiles as the instrument allows and
:func:`survey_features` reduces it to a handful of standardised statistics per
candidate, which the surrogate can use as extra inputs and the survey-contrast
baseline ranks directly. :func:`lattice_disorder` is the scalar statistic of a
high-resolution tile that the image-based GP baseline learns instead of graph scores.

Units: stage positions and sizes in nm, dwell in µs. Arrays are ``[row, col]``,
positions ``(x, y)`` with x along columns.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from agent.driver import InstrumentDescription, ScanRequest, Tile
from agent.errors import OutOfRangeError, OutsideStageError

SURVEY_FEATURES: tuple[str, ...] = ("mean", "std", "contrast", "texture", "fringe_distortion", "fringe_loss")
"""Names of the columns :func:`survey_features` returns, in order."""

_SNAP_NM = 1e-9
"""Positions closer than this (nm) are the same position; absorbs rounding of centre arithmetic."""

_MIN_COVERAGE = 0.5
"""Share of a candidate's area a survey tile must cover for the candidate to get features."""


def _axis_centres(low: float, high: float, size: float, step: float, axis: str) -> np.ndarray:
    """Tile centres along one stage axis so that tiles of ``size`` cover ``[low, high]``.

    Centres sit on a regular grid of spacing ``step`` from the low edge; the last one is
    clamped so its tile ends exactly at ``high`` (it then overlaps its neighbour more).
    """
    span = high - low
    if size > span * (1.0 + 1e-12):
        raise OutsideStageError(
            f"a tile {size:.3f} nm wide does not fit the stage along {axis} "
            f"({low:.3f} to {high:.3f} nm, {span:.3f} nm); use fewer pixels or a smaller pixel size"
        )
    # The small tolerance keeps an exact fit from adding a redundant clamped tile.
    count = max(math.ceil((span - size) / step - 1e-9), 0) + 1
    centres = low + 0.5 * size + step * np.arange(count, dtype=np.float64)
    return np.minimum(centres, high - 0.5 * size)


@dataclass(frozen=True, eq=False)
class CandidateGrid:
    """Candidate regions: equal tiles on a regular grid covering the accessible stage.

    Candidates are numbered row-major: index ``row * grid_shape[1] + col``, rows along y
    and columns along x, so row 0 is the lowest y.

    Parameters
    ----------
    centres : numpy.ndarray
        Tile centres ``(x, y)``, shape ``(m, 2)``, in stage nanometres.
    extents : numpy.ndarray
        Covered areas ``(x_min, x_max, y_min, y_max)`` to the pixel edges, shape ``(m, 4)``, nm.
    tile_shape : tuple of int
        Tile shape ``(rows, cols)`` in pixels.
    pixel_size_nm : float
        Pixel size of the candidate tiles, in nanometres.
    grid_shape : tuple of int
        Number of candidate rows (along y) and columns (along x).

    See Also
    --------
    CandidateGrid.tiling : the usual way to build one.
    """

    centres: np.ndarray
    extents: np.ndarray
    tile_shape: tuple[int, int]
    pixel_size_nm: float
    grid_shape: tuple[int, int]

    def __post_init__(self) -> None:
        m = self.grid_shape[0] * self.grid_shape[1]
        if self.centres.shape != (m, 2) or self.extents.shape != (m, 4):
            raise ValueError(
                f"a {self.grid_shape[0]}x{self.grid_shape[1]} candidate grid needs centres (m, 2) and "
                f"extents (m, 4) with m = {m}, got {self.centres.shape} and {self.extents.shape}"
            )
        # Read-only arrays: the grid is shared by the policy, the surrogate and the session.
        for array in (self.centres, self.extents):
            array.setflags(write=False)

    @classmethod
    def tiling(
        cls,
        description: InstrumentDescription,
        tile_shape: tuple[int, int],
        pixel_size_nm: float,
        overlap_fraction: float = 0.0,
    ) -> CandidateGrid:
        """Tile the accessible stage with candidates that lie wholly inside the stage limits.

        Parameters
        ----------
        description : InstrumentDescription
            The instrument; its stage limits, pixel-size range and largest tile are honoured.
        tile_shape : tuple of int
            Candidate tile shape ``(rows, cols)`` in pixels.
        pixel_size_nm : float
            Pixel size of the candidate tiles, in nanometres.
        overlap_fraction : float
            Share of a tile's width (and height) shared with its neighbour, in ``[0, 1)``; the
            clamped last row and column may overlap more.

        Returns
        -------
        CandidateGrid
            Candidates covering the whole stage.

        Raises
        ------
        OutOfRangeError
            If the tile shape or pixel size is outside what the instrument can do, or the
            overlap fraction is outside ``[0, 1)``.
        OutsideStageError
            If one tile is larger than the stage.

        Examples
        --------
        >>> from agent.driver import InstrumentDescription
        >>> stem = InstrumentDescription(name="demo", stage_x_nm=(0, 100), stage_y_nm=(0, 50),
        ...     pixel_size_nm=(0.01, 1.0), max_tile_shape=(1024, 1024), beam_current_pa=20.0,
        ...     dwell_us=(0.5, 50.0))
        >>> grid = CandidateGrid.tiling(stem, (500, 500), 0.02)
        >>> len(grid), grid.grid_shape
        (50, (5, 10))
        """
        rows, cols = (int(tile_shape[0]), int(tile_shape[1]))
        if rows < 1 or cols < 1:
            raise OutOfRangeError(f"tile shape must be at least 1x1 pixels, got {tile_shape}")
        if rows > description.max_tile_shape[0] or cols > description.max_tile_shape[1]:
            raise OutOfRangeError(
                f"tile shape {rows}x{cols} px exceeds the largest tile "
                f"{description.max_tile_shape[0]}x{description.max_tile_shape[1]} px of {description.name}"
            )
        low, high = description.pixel_size_nm
        if not low <= pixel_size_nm <= high:
            raise OutOfRangeError(
                f"pixel size {pixel_size_nm:g} nm is outside the range {low:g}-{high:g} nm "
                f"of {description.name}"
            )
        if not 0.0 <= overlap_fraction < 1.0:
            raise OutOfRangeError(f"overlap fraction must be in [0, 1), got {overlap_fraction}")
        width, height = cols * pixel_size_nm, rows * pixel_size_nm
        xs = _axis_centres(*description.stage_x_nm, width, width * (1.0 - overlap_fraction), "x")
        ys = _axis_centres(*description.stage_y_nm, height, height * (1.0 - overlap_fraction), "y")
        grid_x, grid_y = np.meshgrid(xs, ys)  # row-major: y rows, x columns
        centres = np.column_stack([grid_x.ravel(), grid_y.ravel()])
        extents = np.column_stack(
            [
                centres[:, 0] - 0.5 * width,
                centres[:, 0] + 0.5 * width,
                centres[:, 1] - 0.5 * height,
                centres[:, 1] + 0.5 * height,
            ]
        )
        return cls(
            centres=centres,
            extents=extents,
            tile_shape=(rows, cols),
            pixel_size_nm=float(pixel_size_nm),
            grid_shape=(len(ys), len(xs)),
        )

    def __len__(self) -> int:
        return int(self.centres.shape[0])

    @property
    def tile_size_nm(self) -> tuple[float, float]:
        """Candidate field of view ``(width, height)`` along x and y, in nanometres."""
        return (self.tile_shape[1] * self.pixel_size_nm, self.tile_shape[0] * self.pixel_size_nm)

    def grid_position(self, index: int) -> tuple[int, int]:
        """Grid ``(row, col)`` of candidate ``index`` (row along y, column along x)."""
        return divmod(int(index), self.grid_shape[1])

    def index_of(self, x_nm: float, y_nm: float) -> int:
        """Candidate whose area contains a stage position.

        Parameters
        ----------
        x_nm, y_nm : float
            Stage position, in nanometres.

        Returns
        -------
        int
            Index of the containing candidate; where candidates overlap, the one whose centre
            is nearest; -1 if no candidate contains the point.
        """
        e = self.extents
        inside = (x_nm >= e[:, 0]) & (x_nm <= e[:, 1]) & (y_nm >= e[:, 2]) & (y_nm <= e[:, 3])
        hits = np.flatnonzero(inside)
        if hits.size == 0:
            return -1
        distance = np.hypot(self.centres[hits, 0] - x_nm, self.centres[hits, 1] - y_nm)
        return int(hits[int(np.argmin(distance))])

    def match(self, request: ScanRequest) -> int:
        """Candidate that ``request`` scans exactly (same centre, shape and pixel size), else -1.

        Parameters
        ----------
        request : ScanRequest
            A scan, typically one built by :meth:`request`.

        Returns
        -------
        int
            Candidate index, or -1 when the request is not one of the candidates.
        """
        if tuple(request.shape) != self.tile_shape:
            return -1
        if not math.isclose(request.pixel_size_nm, self.pixel_size_nm, rel_tol=1e-9):
            return -1
        index = self.index_of(request.x_nm, request.y_nm)
        if index < 0:
            return -1
        centre = self.centres[index]
        tolerance = max(_SNAP_NM, 1e-9 * float(np.abs(centre).max()))
        if abs(centre[0] - request.x_nm) <= tolerance and abs(centre[1] - request.y_nm) <= tolerance:
            return index
        return -1

    def request(
        self, index: int, dwell_us: float, detector: str = "HAADF", request_id: str | None = None
    ) -> ScanRequest:
        """The scan request that images candidate ``index``.

        Parameters
        ----------
        index : int
            Candidate index.
        dwell_us : float
            Dwell time per pixel, in microseconds.
        detector : str
            Detector to read.
        request_id : str or None
            Id of the request; None draws a random one (give one for reproducible sessions).

        Returns
        -------
        ScanRequest
            Request centred on the candidate at the grid's tile shape and pixel size.
        """
        if not 0 <= index < len(self):
            raise IndexError(f"candidate index {index} is outside 0..{len(self) - 1}")
        x_nm, y_nm = self.centres[index]
        values: dict[str, object] = {
            "x_nm": float(x_nm),
            "y_nm": float(y_nm),
            "shape": self.tile_shape,
            "pixel_size_nm": self.pixel_size_nm,
            "dwell_us": float(dwell_us),
            "detector": detector,
        }
        if request_id is not None:
            values["request_id"] = request_id
        return ScanRequest.model_validate(values)

    def neighbours(self, index: int) -> np.ndarray:
        """Indices of the up to eight grid neighbours of candidate ``index``."""
        row, col = self.grid_position(index)
        rows, cols = self.grid_shape
        found = [
            r * cols + c
            for r in range(max(row - 1, 0), min(row + 2, rows))
            for c in range(max(col - 1, 0), min(col + 2, cols))
            if (r, c) != (row, col)
        ]
        return np.asarray(found, dtype=np.int64)


def _window(tile: Tile, extent: np.ndarray) -> tuple[slice, slice, float]:
    """Pixel window of ``tile`` whose centres lie inside ``extent``, and the covered area share."""
    rows, cols = tile.shape
    row_low, col_low = tile.stage_to_pixel(extent[0], extent[2])
    row_high, col_high = tile.stage_to_pixel(extent[1], extent[3])
    c0, c1 = max(math.ceil(float(col_low) - 1e-9), 0), min(math.floor(float(col_high) + 1e-9), cols - 1)
    r0, r1 = max(math.ceil(float(row_low) - 1e-9), 0), min(math.floor(float(row_high) + 1e-9), rows - 1)
    if c1 < c0 or r1 < r0:
        return slice(0, 0), slice(0, 0), 0.0
    covered = (c1 - c0 + 1) * (r1 - r0 + 1) * tile.pixel_size_nm**2
    area = (extent[1] - extent[0]) * (extent[3] - extent[2])
    return slice(r0, r1 + 1), slice(c0, c1 + 1), min(covered / area, 1.0)


@dataclass(frozen=True)
class LatticeFringes:
    """Local analysis of the two strongest lattice fringes of an image (geometric phase analysis).

    A coarse survey does not resolve atomic columns, but the lattice still shows as
    fringes: directly when the pixel size is below half the lattice spacing, otherwise as
    the moiré the lattice forms with the scan grid (0.25 nm pixels on the 0.396 nm Sm-BFO
    lattice give fringes about 0.68 nm apart). Demodulating each fringe system around its
    Fourier peak gives a complex amplitude whose modulus is the local fringe strength and
    whose phase gradient is the local fringe vector; a moiré magnifies lattice rotation and
    strain by the ratio of its period to the lattice spacing. Dislocations show as phase
    singularities, rotated or strained patches as shifted phase gradients, amorphous
    patches and vacancy clusters as lost fringe strength.

    Attributes
    ----------
    distortion : numpy.ndarray
        Deviation of the local phase gradients of both fringe systems from their image-wide
        median, summed, radians per pixel; shape of the image.
    strength : numpy.ndarray
        Local fringe amplitude relative to its value over the surrounding ~15 pixels
        (about 1 in a perfect lattice, lower where fringes fade); shape of the image.
    fringe_vectors : numpy.ndarray
        The two fringe frequencies ``(rows, cols)`` in cycles per pixel, shape ``(2, 2)``.
    peak_to_background : float
        Power of the weaker fringe peak over the median spectral power (how clear the fringes are).
    """

    distortion: np.ndarray
    strength: np.ndarray
    fringe_vectors: np.ndarray
    peak_to_background: float


_FRINGE_RESOLUTION_NM = 1.0
"""Resolution of the survey's fringe maps, nm: about the size of a vacancy or substitution cluster."""

BORDER_WIDTHS = 3.0
"""Width of the border band of :func:`lattice_fringes` maps that takes typical values, in filter widths."""

_FRINGE_MIN_FREQUENCY = 0.05
"""Fringes slower than this (cycles per pixel) are thickness or background, not lattice."""

_FRINGE_MIN_PEAK_TO_BACKGROUND = 20.0
"""Weakest fringe peak, in units of the median spectral power, still taken for a lattice."""


def lattice_fringes(image: np.ndarray, sigma_px: float = 3.0) -> LatticeFringes | None:
    """Local strength and distortion of the lattice (or moiré) fringes of an image.

    Parameters
    ----------
    image : numpy.ndarray
        Image ``(rows, cols)``, detector counts; at least 32 pixels along each axis.
    sigma_px : float
        Gaussian low-pass of the demodulated fringes, in pixels: the spatial resolution of
        the maps (about one fringe-free cluster of columns at survey pixel sizes).

    Returns
    -------
    LatticeFringes or None
        The maps, or None when the image shows no clear pair of non-parallel fringe systems
        (too small, too noisy, no crystal in view, or pixels so coarse the lattice averages out).

    Examples
    --------
    >>> rows, cols = np.mgrid[0:128, 0:128]
    >>> lattice = 2 + np.cos(2 * np.pi * 0.3 * cols) + np.cos(2 * np.pi * 0.3 * rows)
    >>> fringes = lattice_fringes(lattice)
    >>> bool(fringes.distortion[12:-12, 12:-12].max() < 0.02)
    True
    >>> np.round(np.abs(fringes.fringe_vectors).max(axis=1), 3).tolist()
    [0.3, 0.3]
    """
    values = np.asarray(image, dtype=np.float64)
    if values.ndim != 2 or min(values.shape) < 32:
        return None
    n_rows, n_cols = values.shape
    power = np.abs(np.fft.fft2(values - values.mean())) ** 2
    f_rows = np.fft.fftfreq(n_rows)[:, None]
    f_cols = np.fft.fftfreq(n_cols)[None, :]
    power[np.hypot(f_rows, f_cols) < _FRINGE_MIN_FREQUENCY] = 0.0
    background = float(np.median(power))
    first = np.unravel_index(int(np.argmax(power)), power.shape)
    g1 = np.array([f_rows[first[0], 0], f_cols[0, first[1]]])
    # The second fringe system must cross the first (not its conjugate or a harmonic).
    cosine = (f_rows * g1[0] + f_cols * g1[1]) / (np.hypot(f_rows, f_cols) * np.hypot(*g1) + 1e-300)
    crossing = np.where(np.abs(cosine) < 0.5, power, 0.0)
    second = np.unravel_index(int(np.argmax(crossing)), power.shape)
    g2 = np.array([f_rows[second[0], 0], f_cols[0, second[1]]])
    peak_to_background = float(crossing[second] / background) if background > 0 else 0.0
    if not peak_to_background >= _FRINGE_MIN_PEAK_TO_BACKGROUND:
        return None
    rows = np.arange(n_rows, dtype=np.float64)[:, None]
    cols = np.arange(n_cols, dtype=np.float64)[None, :]

    def low_pass(signal: np.ndarray, sigma: float) -> np.ndarray:
        # Normalised convolution: zero padding divided by the filtered support, so pixels
        # near the border average fewer neighbours instead of mirrored (phase-flipped) ones.
        support = ndimage.gaussian_filter(np.ones(signal.shape), sigma, mode="constant")
        return ndimage.gaussian_filter(signal, sigma, mode="constant") / support

    distortion = np.zeros_like(values)
    amplitude = np.zeros_like(values)

    def demodulate(g: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        carrier = np.exp(-2j * np.pi * (g[0] * rows + g[1] * cols))
        demodulated = values * carrier
        fringe = low_pass(demodulated.real, sigma_px) + 1j * low_pass(demodulated.imag, sigma_px)
        # Wrapped phase differences between neighbours: the local fringe vector minus g.
        along_rows = np.angle(fringe[1:, :] * np.conj(fringe[:-1, :]))
        along_cols = np.angle(fringe[:, 1:] * np.conj(fringe[:, :-1]))
        along_rows = np.pad(along_rows, ((0, 1), (0, 0)), mode="edge")
        along_cols = np.pad(along_cols, ((0, 0), (0, 1)), mode="edge")
        return fringe, along_rows, along_cols

    fringe_vectors = []
    for peak in (g1, g2):
        fringe, along_rows, along_cols = demodulate(peak)
        # The Fourier peak sits on the frequency grid; the median phase gradient refines it, so
        # a lattice between grid frequencies does not leave a residual fringe to distort the edges.
        g = peak + np.array([np.median(along_rows), np.median(along_cols)]) / (2 * np.pi)
        fringe, along_rows, along_cols = demodulate(g)
        fringe_vectors.append(g)
        amplitude += np.abs(fringe)
        distortion += np.hypot(along_rows - np.median(along_rows), along_cols - np.median(along_cols))
    distortion = low_pass(distortion, 0.67 * sigma_px)
    strength = amplitude / np.maximum(low_pass(amplitude, 5 * sigma_px), 1e-12)
    # Near the border fewer pixels average the fringes, so both maps are noisier there; the
    # border band takes the typical values instead of reading as distorted or faded.
    band = max(1, math.ceil(BORDER_WIDTHS * sigma_px))
    if min(n_rows, n_cols) > 4 * band:
        for fringe_map in (distortion, strength):
            typical = float(np.median(fringe_map[band:-band, band:-band]))
            fringe_map[:band], fringe_map[-band:] = typical, typical
            fringe_map[:, :band], fringe_map[:, -band:] = typical, typical
    return LatticeFringes(distortion, strength, np.stack(fringe_vectors), peak_to_background)


def _standardise(column: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Z-score over the valid rows; invalid rows and constant columns become 0."""
    result = np.zeros_like(column)
    if valid.sum() < 2:
        return result
    values = column[valid]
    spread = float(values.std())
    if spread <= 1e-12 * max(1.0, float(np.abs(values).max())):
        return result
    result[valid] = (values - values.mean()) / spread
    return result


def survey_features(survey: Tile | Sequence[Tile], grid: CandidateGrid) -> np.ndarray:
    """Cheap per-candidate statistics of a coarse survey image.

    Each candidate takes its statistics from the survey tile covering the largest share of
    its area (at least half; otherwise it gets zeros). Every column is then standardised
    (z-score) over the covered candidates, so values are dimensionless and of order one,
    which the surrogate's feature kernel expects.

    Parameters
    ----------
    survey : Tile or sequence of Tile
        Survey tile(s), typically at 0.1-1 nm/px where atomic columns are not resolved.
    grid : CandidateGrid
        The candidate regions.

    Returns
    -------
    numpy.ndarray
        Shape ``(len(grid), 6)``, float64, columns as in :data:`SURVEY_FEATURES`:

        ``mean``
            Mean survey intensity in the candidate (thickness, composition: HAADF ~ Z^1.7).
        ``std``
            Standard deviation of the survey intensity in the candidate (inhomogeneity).
        ``contrast``
            Candidate mean minus the mean of its covered grid neighbours, in units of the
            spread of candidate means: where a region differs from its surroundings.
        ``texture``
            Fine-scale power (the image minus its 3x3 local mean, squared) per unit of mean
            intensity, a Fano factor of the finest scale: about constant where only shot noise
            varies at that scale, higher where unresolved lattice or disorder adds fine-scale
            signal (amorphous or secondary-phase patches change it).

        ``fringe_distortion``
            Highest local distortion of the lattice (or moiré) fringes in the candidate
            (:func:`lattice_fringes`): dislocations, rotated and strained patches.
        ``fringe_loss``
            Largest local loss of fringe strength in the candidate, ``1 - strength``:
            amorphous patches, vacancy and substitution clusters.

        Candidates not covered by the survey get zeros in every column, and every candidate
        gets zeros in the two fringe columns when the survey shows no lattice fringes.
    """
    tiles = [survey] if isinstance(survey, Tile) else list(survey)
    m = len(grid)
    raw = np.zeros((m, len(SURVEY_FEATURES)), dtype=np.float64)
    best_coverage = np.zeros(m, dtype=np.float64)
    for tile in tiles:
        image = tile.image.astype(np.float64)
        # Fine-scale residual and fringe maps computed once per tile; windows only reduce them.
        residual = image - ndimage.uniform_filter(image, size=3, mode="reflect")
        fringes = lattice_fringes(image, sigma_px=max(_FRINGE_RESOLUTION_NM / tile.pixel_size_nm, 1.0))
        for index in range(m):
            rows, cols, coverage = _window(tile, grid.extents[index])
            if coverage < _MIN_COVERAGE or coverage <= best_coverage[index]:
                continue
            patch = image[rows, cols]
            if patch.size < 4:
                continue
            mean = float(patch.mean())
            fine = float(np.mean(residual[rows, cols] ** 2))
            distortion = loss = 0.0
            if fringes is not None:
                distortion = float(fringes.distortion[rows, cols].max())
                loss = 1.0 - float(fringes.strength[rows, cols].min())
            # Shot-noise power grows with the counts; per count it is the same everywhere.
            raw[index] = (mean, float(patch.std()), 0.0, fine / max(abs(mean), 1e-12), distortion, loss)
            best_coverage[index] = coverage
    covered = best_coverage >= _MIN_COVERAGE
    # Local contrast needs every candidate's mean first.
    spread = float(raw[covered, 0].std()) if covered.sum() > 1 else 0.0
    for index in np.flatnonzero(covered):
        around = grid.neighbours(int(index))
        around = around[covered[around]]
        if around.size and spread > 0:
            raw[index, 2] = (raw[index, 0] - raw[around, 0].mean()) / spread
    features = np.column_stack(
        [_standardise(raw[:, column], covered) for column in range(len(SURVEY_FEATURES))]
    )
    return features


def survey_request(
    description: InstrumentDescription,
    pixel_size_nm: float,
    dwell_us: float,
    max_tile_shape: tuple[int, int] | None = None,
    *,
    detector: str = "HAADF",
    request_prefix: str = "survey",
) -> list[ScanRequest]:
    """Plan a survey of the whole accessible stage with as few tiles as fit the largest tile.

    Tiles have a whole number of pixels and must lie inside the stage, so the survey covers
    the stage up to less than one pixel at the high edges. Tiles abut on a regular grid;
    the last row and column are clamped inside the stage (they may overlap their neighbour).

    Parameters
    ----------
    description : InstrumentDescription
        The instrument.
    pixel_size_nm : float
        Survey pixel size, in nanometres (for example 0.25).
    dwell_us : float
        Dwell time per pixel, in microseconds.
    max_tile_shape : tuple of int or None
        Largest tile ``(rows, cols)`` to use; None (and never more than) the instrument's largest.
    detector : str
        Detector to read.
    request_prefix : str
        Request ids are ``f"{request_prefix}-{k:05d}"``, deterministic for replays.

    Returns
    -------
    list of ScanRequest
        Survey tiles in row-major order (rows along y).

    Raises
    ------
    ScanRequestError
        If the pixel size, dwell or detector is outside the instrument's range.
    """
    limit_rows, limit_cols = description.max_tile_shape
    if max_tile_shape is not None:
        limit_rows, limit_cols = min(limit_rows, max_tile_shape[0]), min(limit_cols, max_tile_shape[1])
    if limit_rows < 1 or limit_cols < 1:
        raise OutOfRangeError(f"the largest survey tile must be at least 1x1 pixels, got {max_tile_shape}")

    def axis(low: float, high: float, limit: int, name: str) -> tuple[int, np.ndarray]:
        pixels = math.floor((high - low) / pixel_size_nm + 1e-9)
        if pixels < 1:
            raise OutsideStageError(
                f"the stage is narrower along {name} ({high - low:.3f} nm) than one survey pixel "
                f"({pixel_size_nm:g} nm); choose a smaller survey pixel size"
            )
        tiles = math.ceil(pixels / limit)
        size = math.ceil(pixels / tiles)
        width = size * pixel_size_nm
        centres = low + width * (np.arange(tiles) + 0.5)
        return size, np.minimum(centres, high - 0.5 * width)

    cols, xs = axis(*description.stage_x_nm, limit_cols, "x")
    rows, ys = axis(*description.stage_y_nm, limit_rows, "y")
    requests = []
    for y_nm in ys:
        for x_nm in xs:
            request = ScanRequest(
                x_nm=float(x_nm),
                y_nm=float(y_nm),
                shape=(rows, cols),
                pixel_size_nm=pixel_size_nm,
                dwell_us=dwell_us,
                detector=detector,
                request_id=f"{request_prefix}-{len(requests):05d}",
            )
            description.check(request)
            requests.append(request)
    return requests


def lattice_disorder(image: np.ndarray, peaks: int = 32) -> float:
    """Share of an atomic-resolution tile's spectral power outside its strongest lattice peaks.

    A perfect lattice concentrates its (mean-removed) power in a few Bragg peaks; walls,
    dislocations, amorphous patches and noise spread it. This is the raw tile statistic the
    image-based GP baseline (:class:`agent.policy.ImageGPPolicy`) learns, in place of graph scores.

    Parameters
    ----------
    image : numpy.ndarray
        Tile image ``(rows, cols)``, detector counts.
    peaks : int
        Number of strongest Fourier coefficients counted as lattice peaks (a few per
        reciprocal-lattice vector and harmonic).

    Returns
    -------
    float
        Disorder in ``[0, 1]``: 0 for a perfect lattice, near 1 for pure noise; 0 for a flat image.
    """
    values = np.asarray(image, dtype=np.float64)
    if values.ndim != 2 or min(values.shape) < 2:
        raise ValueError(f"lattice_disorder needs a 2-D image of at least 2x2 pixels, got {values.shape}")
    # A Hann window keeps the tile edges from spreading power along the axes.
    window = np.outer(np.hanning(values.shape[0]), np.hanning(values.shape[1]))
    power = np.abs(np.fft.rfft2((values - values.mean()) * window)) ** 2
    total = float(power.sum())
    if total <= 0:
        return 0.0
    flat = power.ravel()
    count = min(peaks, flat.size)
    strongest = np.partition(flat, flat.size - count)[flat.size - count :]
    return float(1.0 - strongest.sum() / total)
