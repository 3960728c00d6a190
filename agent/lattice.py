"""The crystal lattice of a tile: local basis, lattice sites of columns, and empty sites.

A column's species is a question of *where* it sits in the unit cell, not of how
bright it is. :func:`fit_lattice` finds the two primitive reciprocal vectors of
the tile from its power spectrum (any scan rotation) and, for each, the local
phase of the Bragg-filtered image, as in geometric phase analysis (Hytch et al.,
Ultramicroscopy 74, 1998): the image is demodulated by the reflection, averaged
in blocks and smoothed over about a cell. The phase at a column, less the phase
the material's structure factor puts at the cell origin, is the column's
fractional coordinate in its *local* cell, so strain, rotation and slow scan
distortion are followed without unwrapping lattice indices.

:func:`assign_sites` maps fractional coordinates to the nearest site of the
:class:`~agent.materials.Material`. :func:`expected_sites` proposes, from every
assigned column, the A and B sites of its neighbouring cells; the sites no
column occupies are candidates for a vacancy (or for a column too dim for the
peak threshold, which the finder then tests at that one place).

Why not atomap's sublattice construction or a global lattice fit: a global
affine lattice leaves a strained patch or a dislocation half a cell off within
a few nanometres; a nearest-neighbour walk breaks on every vacancy. The phase
is local, linear in the pixels and does not care about missing columns.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import numpy as np
from scipy import fft as scipy_fft
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from agent.materials import ROLE_CODES, Material

_PEAK_SEARCH = (0.85, 1.18)  # the reflection lies within this factor of the expected radius
_MIN_PEAK_CONTRAST = 8.0  # a reflection must stand this far above the median power of its annulus


@dataclass(frozen=True)
class LatticeFit:
    """The lattice of one image: global reciprocal basis and the local Bragg phases.

    Parameters
    ----------
    g_px : numpy.ndarray
        ``(2, 2)``; rows are the reciprocal vectors of the cell's ``a`` and ``b`` axes,
        ``(g_x, g_y)`` in cycles per pixel (x along columns, y along rows).
    basis_px : numpy.ndarray
        ``(2, 2)``; rows are the real-space cell vectors ``a`` and ``b``, ``(x, y)`` pixels.
    fields : numpy.ndarray
        ``(2, R, C)`` complex64: the demodulated, smoothed Bragg components on a block grid.
    block_px : int
        Block size of the field grid, pixels.
    reference_phase : numpy.ndarray
        ``(2,)`` phase of the structure factor at each reflection (the cell origin's phase), radians.
    peak_contrast : float
        The weaker reflection's power over the median of its annulus (how clear the lattice is).
    peak_power : float
        The weaker reflection's power (windowed spectrum units).
    """

    g_px: np.ndarray
    basis_px: np.ndarray
    fields: np.ndarray
    block_px: int
    reference_phase: np.ndarray
    peak_contrast: float
    peak_power: float

    @property
    def spacing_px(self) -> float:
        """Length of the ``a`` cell vector, pixels."""
        return float(np.hypot(*self.basis_px[0]))

    @property
    def rotation_deg(self) -> float:
        """Angle of the ``a`` cell vector from the +x (column) axis, degrees in [0, 90) for a square cell."""
        return float(np.degrees(np.arctan2(self.basis_px[0, 1], self.basis_px[0, 0])))

    def _sample(self, x_px: np.ndarray, y_px: np.ndarray) -> np.ndarray:
        """The two complex fields at pixel positions, ``(2, N)`` complex."""
        half = 0.5 * (self.block_px - 1)
        coords = np.stack(
            [(np.asarray(y_px, dtype=np.float64) - half) / self.block_px,
             (np.asarray(x_px, dtype=np.float64) - half) / self.block_px]
        )  # fmt: skip
        return np.stack(
            [
                ndimage.map_coordinates(field.real, coords, order=1, mode="nearest")
                + 1j * ndimage.map_coordinates(field.imag, coords, order=1, mode="nearest")
                for field in self.fields
            ]
        )

    def strength(self, x_px: np.ndarray, y_px: np.ndarray) -> np.ndarray:
        """Local lattice strength at pixel positions: the weaker reflection's amplitude over its median.

        About 1 in the crystal, falling towards 0 in an amorphous patch or vacuum.
        """
        amplitude = np.abs(self._sample(x_px, y_px))
        return (amplitude / np.maximum(self._median_amplitude, 1e-30)[:, None]).min(axis=0)

    @functools.cached_property
    def _median_amplitude(self) -> np.ndarray:
        """Median amplitude of each reflection's field over the image (the crystal's level)."""
        return np.median(np.abs(self.fields).reshape(2, -1), axis=1)

    def fractional(self, x_px: np.ndarray, y_px: np.ndarray) -> np.ndarray:
        """Fractional coordinates ``(u, v)`` in the local cell at pixel positions, each in [0, 1).

        Parameters
        ----------
        x_px, y_px : numpy.ndarray
            Positions, pixels (x along columns, y along rows; integers are pixel centres).

        Returns
        -------
        numpy.ndarray
            ``(N, 2)`` fractional coordinates relative to the cell origin (the A site).
        """
        x_px = np.asarray(x_px, dtype=np.float64)
        y_px = np.asarray(y_px, dtype=np.float64)
        phase = np.angle(self._sample(x_px, y_px))
        cycles = self.g_px @ np.stack([x_px, y_px])
        return np.mod(cycles + (phase - self.reference_phase[:, None]) / (2 * math.pi), 1.0).T


def central_power_spectrum(image: np.ndarray, max_side: int = 512) -> np.ndarray:
    """Power spectrum of the central square crop of an image: the half plane of non-negative k_x.

    A crop of at most ``max_side`` pixels holds dozens of lattice periods; more only costs
    time. A Hann window keeps the crop's edges from smearing the reflections. The image is
    real, so half the plane holds everything (``P(-k) = P(k)``).

    Parameters
    ----------
    image : numpy.ndarray
        2-D image.
    max_side : int
        Largest crop side, pixels.

    Returns
    -------
    numpy.ndarray
        ``(side, side // 2 + 1)`` float64 power; row ``side // 2 + k_y`` and column ``k_x``
        hold frequency ``(k_x, k_y) / side`` cycles per pixel (side = min(rows, cols, max_side)).
    """
    side = min(*image.shape, max_side)
    r0, c0 = (image.shape[0] - side) // 2, (image.shape[1] - side) // 2
    crop = np.asarray(image[r0 : r0 + side, c0 : c0 + side], dtype=np.float32)
    window = np.hanning(side).astype(np.float32)
    crop = (crop - crop.mean(dtype=np.float64)) * window[:, None] * window[None, :]
    spectrum = np.fft.fftshift(scipy_fft.rfft2(crop, workers=1), axes=0)
    # |F|^2 in float64: the ring test compares powers over four decades.
    return np.square(np.abs(spectrum), dtype=np.float64)


def _centred_box(half_power: np.ndarray, reach: int) -> np.ndarray:
    """The full-plane spectrum for ``|k_x|, |k_y| <= reach``, zero frequency at the box centre."""
    centre = half_power.shape[0] // 2
    k = np.arange(-reach, reach + 1)
    k_y, k_x = k[:, None], k[None, :]
    return half_power[np.where(k_x >= 0, k_y, -k_y) + centre, np.abs(k_x)]


def _reflection(
    half_power: np.ndarray, radius: float, exclude_direction: np.ndarray | None, angle_deg: float | None
) -> tuple[np.ndarray, float, float] | None:
    """Strongest spectrum peak near ``radius`` bins (at ``angle_deg`` from a direction, if given).

    Returns the sub-bin position ``(k_x, k_y)``, its contrast over the annulus median and its
    power, or None when the annulus holds no clear peak.
    """
    side = half_power.shape[0]
    # Only the box around the ring is searched: a few thousand bins instead of the whole spectrum.
    reach = math.ceil(_PEAK_SEARCH[1] * radius) + 1
    if reach + 1 >= side // 2:
        return None
    box = _centred_box(half_power, reach + 1)
    k_y, k_x = np.indices(box.shape) - (reach + 1)
    k = np.hypot(k_x, k_y)
    annulus = (k >= _PEAK_SEARCH[0] * radius) & (k <= _PEAK_SEARCH[1] * radius)
    # +g and -g carry the same power: keep one half plane so the choice is deterministic.
    annulus &= (k_y > 0) | ((k_y == 0) & (k_x > 0))
    if not annulus.any():
        return None
    # The floor is the whole half annulus: a narrow wedge around a peak is mostly the peak.
    floor = float(np.median(box[annulus]))
    if exclude_direction is not None and angle_deg is not None:
        cosine = (k_x * exclude_direction[0] + k_y * exclude_direction[1]) / np.maximum(k, 1e-9)
        angle = np.degrees(np.arccos(np.clip(np.abs(cosine), 0, 1)))
        target = min(angle_deg, 180 - angle_deg)
        annulus &= np.abs(angle - target) < 15.0
    if not annulus.any():
        return None
    values = np.where(annulus, box, -np.inf)
    row, col = np.unravel_index(int(np.argmax(values)), box.shape)
    contrast = float(box[row, col]) / max(floor, 1e-30)
    window = box[row - 1 : row + 2, col - 1 : col + 2]
    weights = window / window.sum()
    d_row = float((weights.sum(axis=1) * np.array([-1.0, 0.0, 1.0])).sum())
    d_col = float((weights.sum(axis=0) * np.array([-1.0, 0.0, 1.0])).sum())
    return np.array([k_x[row, col] + d_col, k_y[row, col] + d_row]), contrast, float(box[row, col])


def _reflections(
    power: np.ndarray, spacing_px: float, material: Material
) -> tuple[np.ndarray, float, float] | None:
    """The two primitive reciprocal vectors (cycles per pixel), and the weaker one's contrast and power."""
    side = power.shape[0]
    gamma = math.radians(material.gamma_deg)
    b_px = spacing_px * material.cell_b_nm / material.a_nm
    # Reciprocal vector lengths of an oblique cell: 1 / (a sin gamma), 1 / (b sin gamma).
    first = _reflection(power, side / (spacing_px * math.sin(gamma)), None, None)
    if first is None:
        return None
    direction = first[0] / np.hypot(*first[0])
    second = _reflection(power, side / (b_px * math.sin(gamma)), direction, 180.0 - material.gamma_deg)
    if second is None:
        return None
    g = np.stack([first[0], second[0]]) / side
    return g, min(first[1], second[1]), min(first[2], second[2])


def fit_lattice(
    image: np.ndarray,
    spacing_px: float,
    material: Material,
    smoothing_cells: float = 1.0,
    *,
    power: np.ndarray | None = None,
) -> LatticeFit | None:
    """Fit the local lattice of an image (any scan rotation).

    Parameters
    ----------
    image : numpy.ndarray
        2-D image without NaN, at least three cells across.
    spacing_px : float
        Length of the material's ``a`` cell vector in the image, pixels (estimated or given).
    material : Material
        The cell shape and the site contents (for the phase of the cell origin).
    smoothing_cells : float
        Width (Gaussian sigma) over which the local phase is averaged, in cells: smaller
        follows strain more closely, larger is steadier near defects.
    power : numpy.ndarray, optional
        :func:`central_power_spectrum` of the image, when already computed.

    Returns
    -------
    LatticeFit or None
        None when the power spectrum shows no two clear reflections (no crystal, or the
        spacing is not the material's).

    Examples
    --------
    >>> from agent.materials import material_named
    >>> rows, cols = np.mgrid[:128, :128]
    >>> image = np.cos(2 * np.pi * cols / 16.0) + np.cos(2 * np.pi * rows / 16.0)
    >>> fit = fit_lattice(image, 16.0, material_named("SrTiO3-001"))
    >>> fractional = fit.fractional(np.array([32.0, 40.0]), np.array([48.0, 40.0]))
    >>> round(fit.spacing_px, 1), np.abs(((fractional + 0.5) % 1) - 0.5).round(2).tolist()
    (16.0, [[0.0, 0.0], [0.5, 0.5]])
    """
    found = _reflections(central_power_spectrum(image) if power is None else power, spacing_px, material)
    if found is None:
        return None
    g, contrast, peak_power = found
    if contrast < _MIN_PEAK_CONTRAST:
        return None
    basis = np.linalg.inv(g).T  # rows a, b with a . g_a = 1, a . g_b = 0
    # Blocks of about half a cell: the demodulated field varies over cells, not pixels. With
    # many pixels per cell every ``stride``-th pixel of each block row and column is enough:
    # at six samples per cell the reflections' harmonics still alias far from the fundamental.
    block = max(int(spacing_px // 2), 1)
    stride = max(1, min(int(spacing_px // 6), block))
    while block % stride:
        stride -= 1
    rows, cols = (image.shape[0] // block) * block, (image.shape[1] // block) * block
    data = np.asarray(image[:rows:stride, :cols:stride], dtype=np.float32)
    data = data - data.mean(dtype=np.float64)
    fields = np.empty((2, rows // block, cols // block), dtype=np.complex64)
    y = np.arange(0, rows, stride, dtype=np.float64)
    x = np.arange(0, cols, stride, dtype=np.float64)
    per_block = block // stride
    sigma_blocks = smoothing_cells * spacing_px / block
    for axis in range(2):
        # Demodulating by exp(-2 pi i g.r) factorises into a row and a column phase ramp; the row
        # ramp goes in before the block sum over rows, the column ramp only on the row-summed data.
        along_x = np.exp(-2j * math.pi * g[axis, 0] * x).astype(np.complex64)
        along_y = np.exp(-2j * math.pi * g[axis, 1] * y).astype(np.complex64)
        summed_rows = (data * along_y[:, None]).reshape(rows // block, per_block, x.size).sum(axis=1)
        coarse = (summed_rows * along_x[None, :]).reshape(rows // block, cols // block, per_block).sum(axis=2)
        fields[axis] = ndimage.gaussian_filter(coarse.real, sigma_blocks, mode="nearest") + 1j * (
            ndimage.gaussian_filter(coarse.imag, sigma_blocks, mode="nearest")
        )
    reference = np.array([material.structure_phase(1, 0), material.structure_phase(0, 1)])
    return LatticeFit(
        g_px=g,
        basis_px=basis,
        fields=fields,
        block_px=block,
        reference_phase=reference,
        peak_contrast=contrast,
        peak_power=peak_power,
    )


@dataclass(frozen=True)
class SiteAssignment:
    """The lattice site of every column.

    Parameters
    ----------
    site : numpy.ndarray
        Index into ``material.sites`` (int8).
    role : numpy.ndarray
        Species code of the site's role (:data:`agent.materials.ROLE_CODES`, int8).
    offset_px : numpy.ndarray
        Distance of the column from its ideal site in the local cell, pixels.
    ideal_x_px, ideal_y_px : numpy.ndarray
        The ideal site position (the column moved by minus its offset), pixels.
    """

    site: np.ndarray
    role: np.ndarray
    offset_px: np.ndarray
    ideal_x_px: np.ndarray
    ideal_y_px: np.ndarray


def _wrapped(delta: np.ndarray) -> np.ndarray:
    """Fractional differences wrapped into [-0.5, 0.5)."""
    return np.mod(delta + 0.5, 1.0) - 0.5


def assign_sites(
    fit: LatticeFit,
    material: Material,
    x_px: np.ndarray,
    y_px: np.ndarray,
    roles: tuple[str, ...] | None = None,
) -> SiteAssignment:
    """Put every column on the nearest site of the material's cell.

    Parameters
    ----------
    fit : LatticeFit
        The image's lattice.
    material : Material
        The cell and its sites.
    x_px, y_px : numpy.ndarray
        Column positions, pixels.
    roles : tuple of str, optional
        Only sites of these roles are candidates (default: every site).

    Returns
    -------
    SiteAssignment
    """
    fractional = fit.fractional(x_px, y_px)
    positions = np.array([site.position for site in material.sites])  # (S, 2)
    allowed = np.array([roles is None or site.role in roles for site in material.sites])
    delta = _wrapped(fractional[:, None, :] - positions[None, :, :])  # (N, S, 2)
    # Distances in pixels, so an oblique or rectangular cell weighs both axes right.
    real = delta @ fit.basis_px  # (N, S, 2)
    distance = np.where(allowed[None, :], np.hypot(real[..., 0], real[..., 1]), np.inf)
    site = np.argmin(distance, axis=1) if len(material.sites) else np.zeros(0, dtype=np.int64)
    chosen = np.arange(site.size)
    offset = real[chosen, site]
    roles = np.array([ROLE_CODES[s.role] for s in material.sites], dtype=np.int8)
    return SiteAssignment(
        site=site.astype(np.int8),
        role=roles[site],
        offset_px=distance[chosen, site],
        ideal_x_px=np.asarray(x_px, dtype=np.float64) - offset[:, 0],
        ideal_y_px=np.asarray(y_px, dtype=np.float64) - offset[:, 1],
    )


@dataclass(frozen=True)
class EmptySites:
    """Lattice sites next to found columns that no found column occupies.

    Parameters
    ----------
    x_px, y_px : numpy.ndarray
        Expected site positions (mean over the columns that propose them), pixels.
    site : numpy.ndarray
        Index into ``material.sites`` (int8).
    role : numpy.ndarray
        Species code of the site (int8).
    support : numpy.ndarray
        How many neighbouring columns expect a column there.
    """

    x_px: np.ndarray
    y_px: np.ndarray
    site: np.ndarray
    role: np.ndarray
    support: np.ndarray

    def __len__(self) -> int:
        return int(self.x_px.size)


def _occupied(
    column_x: np.ndarray,
    column_y: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    cell_px: float,
    shape: tuple[int, int],
) -> np.ndarray:
    """Whether a column lies within about two grid cells (``cell_px`` each) of each query point."""
    rows, cols = int(shape[0] / cell_px) + 2, int(shape[1] / cell_px) + 2
    grid = np.zeros((rows, cols), dtype=bool)
    row = np.clip((column_y / cell_px).astype(np.int64), 0, rows - 1)
    col = np.clip((column_x / cell_px).astype(np.int64), 0, cols - 1)
    grid[row, col] = True
    grid = ndimage.binary_dilation(grid, np.ones((3, 3), dtype=bool))
    query_row = np.clip((y / cell_px).astype(np.int64), 0, rows - 1)
    query_col = np.clip((x / cell_px).astype(np.int64), 0, cols - 1)
    return grid[query_row, query_col]


def empty_sites(
    fit: LatticeFit,
    material: Material,
    assignment: SiteAssignment,
    shape: tuple[int, int],
    *,
    border_px: float,
    roles: tuple[str, ...] = ("A", "B"),
    tolerance: float = 0.3,
    min_support: int = 4,
    min_strength: float = 0.3,
    proposers: np.ndarray | None = None,
) -> EmptySites:
    """Sites of the first neighbour shell of the found columns that hold no column.

    Every A or B column proposes the sites of the given roles within one cell length of
    its ideal position (for a perovskite [001]: four A and four B neighbours). A proposal
    with no column within ``tolerance`` x the cell length is an empty site; proposals of
    one site are merged, and a site needs ``min_support`` proposers, so the edge of the
    crystal (a vacuum or amorphous boundary, with one to three proposers) is not a row of
    vacancies.

    Parameters
    ----------
    fit : LatticeFit
        The lattice.
    material : Material
        The sites.
    assignment : SiteAssignment
        Sites of the found columns.
    shape : tuple of int
        Image ``(rows, cols)``.
    border_px : float
        Sites closer than this to the image edge are left out (their columns would be too).
    roles : tuple of str
        Which site roles to look for.
    tolerance : float
        Matching radius over the cell length.
    min_support : int
        Proposers a site needs.
    min_strength : float
        Local lattice strength (:meth:`LatticeFit.strength`) a site needs.
    proposers : numpy.ndarray, optional
        Boolean mask of the columns that may propose sites (default: every A and B column);
        the finder leaves out columns too faint to be sure of.

    Returns
    -------
    EmptySites
    """
    spacing = fit.spacing_px
    sites = material.sites
    wanted = [index for index, site in enumerate(sites) if site.role in roles]
    allowed = np.isin(assignment.role, (ROLE_CODES["A"], ROLE_CODES["B"]))
    if proposers is not None:
        allowed &= proposers
    proposer = np.flatnonzero(allowed)
    empty = EmptySites(
        x_px=np.zeros(0),
        y_px=np.zeros(0),
        site=np.zeros(0, np.int8),
        role=np.zeros(0, np.int8),
        support=np.zeros(0, np.int64),
    )
    if proposer.size == 0 or not wanted:
        return empty
    proposals_x, proposals_y, proposals_site, proposals_from = [], [], [], []
    for source in np.unique(assignment.site[proposer]):
        members = proposer[assignment.site[proposer] == source]
        origin = np.array(sites[int(source)].position)
        # Every target site in the 3 x 3 cells around the source, kept within one cell length.
        for target, i, j in itertools.product(wanted, (-1, 0, 1), (-1, 0, 1)):
            du, dv = np.array(sites[target].position) - origin + (i, j)
            shift = du * fit.basis_px[0] + dv * fit.basis_px[1]
            length = float(np.hypot(*shift))
            if length < 0.1 * spacing or length > 1.05 * spacing:
                continue
            proposals_x.append(assignment.ideal_x_px[members] + shift[0])
            proposals_y.append(assignment.ideal_y_px[members] + shift[1])
            proposals_site.append(np.full(members.size, target, dtype=np.int8))
            proposals_from.append(members)
    if not proposals_x:
        return empty
    px, py = np.concatenate(proposals_x), np.concatenate(proposals_y)
    p_site, p_from = np.concatenate(proposals_site), np.concatenate(proposals_from)
    rows, cols = shape
    inside = (
        (px >= border_px) & (px <= cols - 1 - border_px) & (py >= border_px) & (py <= rows - 1 - border_px)
    )
    px, py, p_site, p_from = px[inside], py[inside], p_site[inside], p_from[inside]
    radius = tolerance * spacing
    # Any found column near the proposal occupies it: a column of another role there is a
    # lattice irregularity (antiphase boundary, core), not a vacancy. Occupancy is looked up in
    # a grid of cells of half the tolerance, dilated by one cell: O(1) per proposal.
    free = ~_occupied(assignment.ideal_x_px, assignment.ideal_y_px, px, py, 0.5 * radius, shape)
    px, py, p_site, p_from = px[free], py[free], p_site[free], p_from[free]
    # Where the lattice fades (an amorphous patch, vacuum) an unoccupied site is no vacancy.
    crystal = fit.strength(px, py) >= min_strength
    px, py, p_site, p_from = px[crystal], py[crystal], p_site[crystal], p_from[crystal]
    if px.size == 0:
        return empty
    # Proposals of one site lie within a fraction of a cell of each other: merge them.
    pairs = cKDTree(np.stack([px, py], 1)).query_pairs(radius, output_type="ndarray")
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(px.size, px.size))
    count, label = connected_components(graph, directed=False)
    # Support: distinct proposers per merged site, from the unique (site, proposer) pairs.
    stride = int(p_from.max()) + 1
    keys = np.unique(label.astype(np.int64) * stride + p_from)
    support = np.bincount(keys // stride, minlength=count)
    mean_x = np.bincount(label, px, count) / np.bincount(label, minlength=count)
    mean_y = np.bincount(label, py, count) / np.bincount(label, minlength=count)
    site = np.zeros(count, dtype=np.int8)
    site[label] = p_site
    keep = support >= min_support
    roles_code = np.array([ROLE_CODES[s.role] for s in sites], dtype=np.int8)
    return EmptySites(
        x_px=mean_x[keep],
        y_px=mean_y[keep],
        site=site[keep],
        role=roles_code[site[keep]],
        support=support[keep],
    )


def diagonal_says_oxygen(
    image: np.ndarray,
    fit: LatticeFit,
    material: Material,
    x_px: np.ndarray,
    y_px: np.ndarray,
    smoothing_cells: float = 1.0,
) -> np.ndarray | None:
    """Whether the diagonal reflections put each column on an O site rather than a cation site.

    In a perovskite [001] the (1, 1) and (1, -1) reflections put A and B at the origin of their
    frame and O at (1/2, 1/2), and their structure factor f_A + f_B - 2 f_O stays large where a
    cluster of A vacancies weakens (1, 0) (f_A - f_B) and its phase can no longer tell an O site
    from a B site. The local phase is computed here only at the given columns, as a Gaussian-
    weighted Fourier coefficient of the image around each (the same smoothing as the fields).

    Parameters
    ----------
    image : numpy.ndarray
        The image the lattice was fitted on.
    fit : LatticeFit
        Its lattice.
    material : Material
        The sites (the check applies when its O sites and cation sites separate in the frame).
    x_px, y_px : numpy.ndarray
        Columns to check, pixels.
    smoothing_cells : float
        Gaussian width of the window, in cells.

    Returns
    -------
    numpy.ndarray or None
        Boolean per column (True: an O site), or None when the material's diagonal frame does
        not separate O from the cations.
    """
    sites = material.sites
    is_o = np.array([s.role == "O" for s in sites])
    if not is_o.any() or is_o.all() or np.size(x_px) == 0:
        return None
    frame = np.array(
        [((s.position[0] + s.position[1]) % 1, (s.position[0] - s.position[1]) % 1) for s in sites]
    )
    if np.hypot(*_wrapped(frame[is_o][:, None, :] - frame[~is_o][None, :, :]).T).min() < 0.25:
        return None
    g = np.stack([fit.g_px[0] + fit.g_px[1], fit.g_px[0] - fit.g_px[1]])
    reference = np.array([material.structure_phase(1, 1), material.structure_phase(1, -1)])
    sigma = smoothing_cells * fit.spacing_px
    # 1.5 sigma holds 87 % of the Gaussian window's weight in each direction, at half the cost of 2.
    reach = math.ceil(1.5 * sigma)
    offsets = np.arange(-reach, reach + 1)
    data = np.asarray(image, dtype=np.float32)
    data = data - float(data.mean())
    rows = np.rint(np.asarray(y_px)).astype(np.int64)[:, None] + offsets[None, :]
    cols = np.rint(np.asarray(x_px)).astype(np.int64)[:, None] + offsets[None, :]
    inside_r = (rows >= 0) & (rows < data.shape[0])
    inside_c = (cols >= 0) & (cols < data.shape[1])
    patch = data[
        np.clip(rows, 0, data.shape[0] - 1)[:, :, None], np.clip(cols, 0, data.shape[1] - 1)[:, None, :]
    ]
    weight_r = np.exp(-((rows - np.asarray(y_px)[:, None]) ** 2) / (2 * sigma**2)) * inside_r
    weight_c = np.exp(-((cols - np.asarray(x_px)[:, None]) ** 2) / (2 * sigma**2)) * inside_c
    coordinates = np.empty((np.size(x_px), 2))
    for axis in range(2):
        wave_r = weight_r * np.exp(-2j * math.pi * g[axis, 1] * rows)
        wave_c = weight_c * np.exp(-2j * math.pi * g[axis, 0] * cols)
        coefficient = np.einsum("nrc,nr,nc->n", patch, wave_r, wave_c)
        cycles = g[axis, 0] * np.asarray(x_px) + g[axis, 1] * np.asarray(y_px)
        coordinates[:, axis] = np.mod(cycles + (np.angle(coefficient) - reference[axis]) / (2 * math.pi), 1.0)
    to_site = np.hypot(*_wrapped(coordinates[:, None, :] - frame[None, :, :]).transpose(2, 0, 1))
    return to_site[:, is_o].min(axis=1) < to_site[:, ~is_o].min(axis=1)
