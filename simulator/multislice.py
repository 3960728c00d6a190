"""Offline multislice (PRISM, frozen-phonon) HAADF-STEM fixtures of BiFeO3 with exact ground truth.

The procedural specimen in :mod:`simulator.specimen` draws each column as a Gaussian whose
height grows as Z**1.7. That is fast but it is the model the column finder was designed
around, so it cannot tell us whether the finder works on images that obey real electron
scattering: channelling, probe tails reaching the neighbouring columns, the weak but
non-zero O columns, the thermal-diffuse background between columns. This module renders
small test images with the multislice method (abTEM's PRISM implementation, averaged over
frozen-phonon configurations) and writes them, with the exact projected position and
label of every column, as small ``.npz`` fixtures that the tests read with numpy only.

What is simulated
-----------------
Pseudo-cubic BiFeO3, a = 3.96 Å, viewed along [001], as a periodic 8 x 8 unit-cell
supercell (3.17 nm), a 4 x 4 one for the thick render, or, for the rotated fixture, a
commensurate square supercell rotated by atan(4/7) = 29.74 degrees (65 cells per layer).
In projection:

* A columns (Bi) at (0, 0) of each cell,
* B columns (Fe alternating with O along z) at (1/2, 1/2),
* pure O columns at (1/2, 0) and (0, 1/2).

Planted, whole-column defects (a [001] image sees columns, not atoms): A columns where a
stated fraction of the Bi is replaced by Sm, A-column vacancies (every Bi removed),
B-column vacancies (every Fe removed, the O of the column kept), and a pair of 180-degree
domain walls across which the B columns (Fe and their O) flip their displacement along y.

The scan covers exactly one period of the supercell, so every image is periodic and every
column of the supercell appears exactly once in the ground-truth table (``tile`` times
``tile`` times when the periodic image is tiled).

Each render is also checked against plain (non-PRISM) multislice at a handful of probe
positions, with the same frozen-phonon configurations; the result is in the fixture
metadata under ``checks.multislice_crosscheck``.

Conventions of the fixtures
---------------------------
Images are indexed ``[row, col]``; positions are ``(x, y)``, x along columns, y along
rows, in image pixels, and an integer value is a pixel centre: pixel ``(row r, col c)``
holds the probe placed at specimen position ``(x, y) = (c * s, r * s)`` Å, with s the
scan pixel size. A column at ``(X, Y)`` Å therefore has ``column_x_px = X / s`` and
``column_y_px = Y / s``.

Running
-------
Rendering needs abTEM and ASE, which are *not* dependencies of the project; install them
with ``pip install 'micrography[physics]'`` (or into a separate virtual environment) and
run ``python -m simulator.multislice --out tests/fixtures/multislice``. Reading a fixture
(:func:`load_fixture`) and building the atomic model (:func:`build_supercell`) need numpy
only. This module imports nothing else from the project, so it runs stand-alone in a
physics-only environment.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "A_LATTICE_A",
    "DEFAULT_RENDERS",
    "SITE_A",
    "SITE_B",
    "SITE_O",
    "DefectSpec",
    "FixtureError",
    "MultisliceFixture",
    "OpticsSettings",
    "PhysicsUnavailableError",
    "RenderSpec",
    "Supercell",
    "apply_source_blur",
    "build_supercell",
    "column_checks",
    "fixture_columns",
    "load_fixture",
    "main",
    "multislice_crosscheck",
    "poisson_counts",
    "render_fixture_set",
    "render_haadf",
    "write_fixture",
]

#: Pseudo-cubic lattice parameter of BiFeO3 [Å].
A_LATTICE_A = 3.96

#: Site codes used in ``column_site``.
SITE_A, SITE_B, SITE_O = 0, 1, 2

_INSTALL_HINT = "pip install 'micrography[physics]'"

# Thermal vibration amplitudes (standard deviation of the displacement along each
# Cartesian axis, Å) for the frozen-phonon configurations. These are typical room-
# temperature values for BiFeO3 (U_iso of about 0.008 Å^2 for Bi and O, 0.005 Å^2 for
# Fe); Sm is given the Bi value because it sits on the same site.
_PHONON_SIGMAS_A: dict[str, float] = {"Bi": 0.09, "Sm": 0.09, "Fe": 0.07, "O": 0.09}


class PhysicsUnavailableError(ImportError):
    """abTEM or ASE, needed only to *render* fixtures, is not installed."""


class FixtureError(ValueError):
    """A fixture file is missing, unreadable or lacks an expected array."""


# --------------------------------------------------------------------------------------
# Specifications
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DefectSpec:
    """One planted whole-column point defect.

    Parameters
    ----------
    kind : str
        ``"sm"`` (a fraction of the Bi of an A column replaced by Sm), ``"a_vacancy"``
        (every atom of an A column removed) or ``"b_vacancy"`` (every Fe of a B column
        removed; the O that shares the B column stays).
    target_frac : tuple of float
        Wanted position as fractions ``(fx, fy)`` of the simulated cell's width and
        height; the defect goes on the nearest column of the right site, so targets need
        not be exact lattice positions (which matters for the rotated supercell).
    sm_fraction : float
        Fraction of the column's Bi replaced by Sm, only for ``kind == "sm"``; rounded
        to a whole number of atoms (the recorded value is the exact one used).
    """

    kind: str
    target_frac: tuple[float, float]
    sm_fraction: float = 0.0


@dataclass(frozen=True)
class RenderSpec:
    """One multislice render and the fixtures written from it.

    Parameters
    ----------
    stem : str
        File name stem; each dose adds ``_dose<d>`` (e.g. ``bfo_defects_t4nm_dose1e5.npz``).
    n_layers : int
        Thickness in unit cells along [001] (thickness_nm = n_layers * 0.396).
    defects : tuple of DefectSpec
        Planted point defects.
    wall_stripe : tuple of int or None
        ``(i0, i1)``: B columns whose lattice index along x lies in ``i0..i1`` are
        displaced by ``+wall_shift_a`` along +y (polarization +1), all others by
        ``-wall_shift_a`` (polarization -1). Because the cell is periodic this gives two
        180-degree walls, at lattice x = i0 and x = i1 + 1 (lines through A columns),
        and none at the image border. ``None`` means no displacement anywhere.
    wall_shift_a : float
        B-column displacement magnitude [Å].
    rotation : tuple of int or None
        ``(m, n)`` to rotate the lattice by ``atan2(n, m)`` about z in a commensurate
        square supercell of side ``sqrt(m**2 + n**2) * a``; ``None`` for an unrotated
        ``cells`` x ``cells`` supercell.
    cells : int
        Unit cells per side of the unrotated supercell.
    scan_px : int
        Scan pixels per side of the simulated (periodic) cell; 12 per unit cell gives
        0.33 Å pixels.
    tile : int
        The simulated periodic image is repeated ``tile`` x ``tile`` times to make the
        fixture (exact, since the specimen is periodic), and so is the ground truth.
    interpolation : int or None
        PRISM interpolation factor for this render; None takes the optics default.
    offset_a : tuple of float
        Specimen offset [Å] added to every atom (then wrapped into the cell), so that
        columns sit at non-integer pixel positions, none on the image border, and a
        transposed x/y would show in the checks.
    min_border_cells : float
        Smallest allowed distance [unit cells] of any copy of a defect from the border
        of the fixture image.
    doses_e_per_a2 : tuple of float
        Electron doses of the Poisson-noisy versions; one fixture file per dose.
    seed : int
        Seed of the frozen-phonon displacements and of the Sm layer choice.
    description : str
        One line for the README and metadata.
    """

    stem: str
    n_layers: int
    defects: tuple[DefectSpec, ...] = ()
    wall_stripe: tuple[int, int] | None = None
    wall_shift_a: float = 0.2
    rotation: tuple[int, int] | None = None
    cells: int = 8
    scan_px: int = 96
    tile: int = 1
    interpolation: int | None = None
    offset_a: tuple[float, float] = (1.23, 0.87)
    min_border_cells: float = 1.5
    doses_e_per_a2: tuple[float, ...] = (1e5,)
    seed: int = 0
    description: str = ""


@dataclass(frozen=True)
class OpticsSettings:
    """Microscope and numerical settings of a render.

    Parameters
    ----------
    energy_kv : float
        Beam energy [kV].
    semiangle_mrad : float
        Probe convergence semi-angle [mrad] (aberration-free probe).
    detector_mrad : tuple of float
        Inner and outer HAADF collection semi-angles [mrad].
    phonon_configs : int
        Frozen-phonon configurations averaged per image.
    interpolation : int
        Default PRISM interpolation factor (a render may set its own). PRISM with factor
        f computes a periodic array of probe copies L/f apart and keeps one window of
        that size. In the 3.2 nm cell, f = 3 (10.6 Å window) matches plain multislice
        within a few per cent up to 4 nm thickness but gives a Bi column half its
        intensity at 8 nm, where the probe spreads beyond the window; f = 4 puts the
        copies 2 cells away and lights a vacancy at about 10 % of a Bi column at 4 nm,
        so it is for ``--quick`` only.
    source_sigma_a : float
        Standard deviation of the Gaussian effective source (incoherent blur) [Å].
    slices_per_cell : int
        Potential slices per unit cell along z; 2 puts each atomic plane (z = a/4,
        3a/4) in the middle of its own slice.
    crosscheck_points : bool
        Run plain multislice at a few probe positions to check the PRISM render.
    """

    energy_kv: float = 200.0
    semiangle_mrad: float = 20.0
    detector_mrad: tuple[float, float] = (60.0, 200.0)
    phonon_configs: int = 4
    interpolation: int = 3
    source_sigma_a: float = 0.35
    slices_per_cell: int = 2
    crosscheck_points: bool = True

    @property
    def wavelength_a(self) -> float:
        """Relativistic electron wavelength [Å]."""
        volts = self.energy_kv * 1e3
        return 12.2642598 / math.sqrt(volts * (1.0 + 0.978475e-6 * volts))

    def potential_gpts(self, extent_a: float, interpolation: int | None = None) -> int:
        """Potential grid points per side so the detector's outer angle is simulated.

        abTEM band-limits the wave to 2/3 of the Nyquist frequency to avoid aliasing,
        so the largest angle that exists is ``wavelength / (3 * sampling)``; a 200 mrad
        outer edge at 200 kV needs a sampling of 0.042 Å or finer (a 0.2-0.4 Å potential
        sampling would not reach the HAADF detector at all).

        Parameters
        ----------
        extent_a : float
            Side of the square supercell [Å].
        interpolation : int or None
            PRISM interpolation factor that must divide the result; None takes
            ``self.interpolation``.

        Returns
        -------
        int
            Smallest FFT-friendly (2^p 3^q 5^r) number of points, divisible by the
            interpolation factor, with the outer angle inside the band limit (0.5 %
            margin).
        """
        f = self.interpolation if interpolation is None else interpolation
        needed = 3.0 * extent_a * self.detector_mrad[1] * 1e-3 / self.wavelength_a * 1.005
        n = math.ceil(needed)
        while not (n % f == 0 and _is_smooth(n)):
            n += 1
        return n


def _is_smooth(n: int) -> bool:
    """True if n has no prime factor above 5 (fast FFT sizes)."""
    for p in (2, 3, 5):
        while n % p == 0:
            n //= p
    return n == 1


# The unrotated defect layout, in lattice cells of the 8 x 8 supercell before the
# specimen offset. A columns at integer (i, j), B columns at (i + 1/2, j + 1/2). The
# defects are at least 2 cells from each other and 1.5 cells from the image border, and
# each one has a different neighbourhood (an Sm column next to a vacancy, and so on).
_SQUARE_DEFECTS_CELLS: tuple[tuple[str, float, float, float], ...] = (
    ("sm", 2.0, 2.0, 1.0),
    ("a_vacancy", 2.0, 4.0, 0.0),
    ("sm", 2.0, 6.0, 0.8),
    ("b_vacancy", 4.5, 1.5, 0.0),
    ("b_vacancy", 4.5, 4.5, 0.0),
    ("sm", 6.0, 3.0, 0.6),
    ("a_vacancy", 6.0, 6.0, 0.0),
)
_SQUARE_OFFSET_A = (1.23, 0.87)

# The 8 nm render is a 4 x 4 cell without PRISM interpolation, tiled 2 x 2 (PRISM with a
# smaller window fails at that thickness, see OpticsSettings.interpolation, and plain
# multislice of the 8 x 8 cell would take hours on two cores). Two defects 2.8 cells
# apart fit with every periodic copy at least 2 cells from the others; the offset keeps
# every copy 0.9 cells or more from the border of the tiled image.
_THICK_DEFECTS_CELLS: tuple[tuple[str, float, float, float], ...] = (
    ("a_vacancy", 1.0, 1.0, 0.0),
    ("sm", 3.0, 3.0, 1.0),
)
_THICK_OFFSET_A = (0.21, -0.17)


def _lattice_defects(
    table: tuple[tuple[str, float, float, float], ...], cells: int, offset_a: tuple[float, float]
) -> tuple[DefectSpec, ...]:
    """Turn ``(kind, u, v, sm_fraction)`` rows in lattice cells into cell-fraction targets."""
    side = cells * A_LATTICE_A
    return tuple(
        DefectSpec(
            kind,
            (((u * A_LATTICE_A + offset_a[0]) / side) % 1.0, ((v * A_LATTICE_A + offset_a[1]) / side) % 1.0),
            f,
        )
        for kind, u, v, f in table
    )


_ROTATED_DEFECTS = (
    DefectSpec("sm", (0.30, 0.30), 1.0),
    DefectSpec("a_vacancy", (0.70, 0.32), 0.0),
    DefectSpec("b_vacancy", (0.32, 0.70), 0.0),
    DefectSpec("sm", (0.70, 0.70), 0.6),
)

#: The shipped fixture set: a thickness series with point defects (two doses at 4 nm),
#: a domain-wall image and a rotated image.
DEFAULT_RENDERS: tuple[RenderSpec, ...] = (
    RenderSpec(
        "bfo_defects_t2nm",
        5,
        _lattice_defects(_SQUARE_DEFECTS_CELLS, 8, _SQUARE_OFFSET_A),
        offset_a=_SQUARE_OFFSET_A,
        doses_e_per_a2=(1e5,),
        seed=11,
        description="2.0 nm thick, point defects (3 Sm-substituted A, 2 A vacancies, 2 B vacancies)",
    ),
    RenderSpec(
        "bfo_defects_t4nm",
        10,
        _lattice_defects(_SQUARE_DEFECTS_CELLS, 8, _SQUARE_OFFSET_A),
        offset_a=_SQUARE_OFFSET_A,
        doses_e_per_a2=(1e4, 1e5),
        seed=12,
        description="4.0 nm thick, same point defects, at two doses",
    ),
    RenderSpec(
        "bfo_defects_t8nm",
        20,
        _lattice_defects(_THICK_DEFECTS_CELLS, 4, _THICK_OFFSET_A),
        cells=4,
        scan_px=48,
        tile=2,
        interpolation=1,
        offset_a=_THICK_OFFSET_A,
        min_border_cells=0.9,
        doses_e_per_a2=(1e5,),
        seed=13,
        description="7.9 nm thick, 4 x 4 cell with an A vacancy and an all-Sm A column, simulated "
        "without PRISM interpolation and tiled 2 x 2 (each defect appears 4 times)",
    ),
    RenderSpec(
        "bfo_wall_t4nm",
        10,
        (),
        wall_stripe=(2, 5),
        wall_shift_a=0.2,
        offset_a=_SQUARE_OFFSET_A,
        doses_e_per_a2=(1e5,),
        seed=14,
        description="4.0 nm thick, B columns shifted +-0.2 A along y, two 180-degree walls, no point defects",
    ),
    RenderSpec(
        "bfo_rotated_t2nm",
        5,
        _ROTATED_DEFECTS,
        rotation=(7, 4),
        offset_a=_SQUARE_OFFSET_A,
        doses_e_per_a2=(1e5,),
        seed=15,
        description="2.0 nm thick, lattice rotated 29.74 deg in the scan frame, 2 Sm, 1 A and 1 B vacancy",
    ),
)


# --------------------------------------------------------------------------------------
# Atomic model (numpy only)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Supercell:
    """A periodic BiFeO3 supercell with its projected-column ground truth.

    Attributes
    ----------
    symbols : tuple of str
        Chemical symbol of every atom.
    positions_a : numpy.ndarray
        ``(n_atoms, 3)`` static (undisplaced by phonons) positions [Å], inside the cell.
    cell_a : tuple of float
        Orthogonal cell lengths ``(Lx, Ly, Lz)`` [Å]; Lx = Ly, periodic in x and y.
    column_x_a, column_y_a : numpy.ndarray
        ``(n_columns,)`` projected column positions [Å] (x along image columns, y along
        rows). Columns that are vacancies are listed at their lattice site.
    column_site : numpy.ndarray
        ``int8`` site code, 0 = A, 1 = B, 2 = pure O.
    column_vacant : numpy.ndarray
        ``bool``; True for an A column with every Bi removed or a B column with every Fe
        removed (its O stays).
    column_sm_fraction : numpy.ndarray
        ``float32`` fraction of the column's A-site atoms that are Sm (exact, whole atoms).
    column_polarization : numpy.ndarray
        ``int8`` +1 / -1 for B columns displaced along +y / -y, 0 for undisplaced ones.
    rotation_deg : float
        Angle of the lattice vector a1 from +x toward +y (image rows point down, so a
        positive angle looks clockwise on screen) [degrees].
    defects : list of dict
        One record per planted defect (kind, column index, position, atoms changed).
    walls : list of dict
        One record per domain wall (position, orientation, shift).
    """

    symbols: tuple[str, ...]
    positions_a: np.ndarray
    cell_a: tuple[float, float, float]
    column_x_a: np.ndarray
    column_y_a: np.ndarray
    column_site: np.ndarray
    column_vacant: np.ndarray
    column_sm_fraction: np.ndarray
    column_polarization: np.ndarray
    rotation_deg: float
    defects: list[dict[str, Any]] = field(default_factory=list)
    walls: list[dict[str, Any]] = field(default_factory=list)

    @property
    def extent_a(self) -> float:
        """Side of the square, periodic simulated cell [Å]."""
        return self.cell_a[0]


def _lattice_columns(
    rotation: tuple[int, int] | None, cells: int
) -> tuple[float, np.ndarray, np.ndarray, float]:
    """Projected column sites of one layer of the supercell.

    Parameters
    ----------
    rotation : tuple of int or None
        ``(m, n)`` commensurate rotation, or None for an unrotated cell.
    cells : int
        Unit cells per side of the unrotated cell.

    Returns
    -------
    side_a : float
        Side of the square cell [Å].
    xy_a : numpy.ndarray
        ``(n_columns, 2)`` positions [Å], before the specimen offset.
    kind : numpy.ndarray
        ``(n_columns,)`` column kinds: 0 = A, 1 = B, 2 = O at (1/2, 0), 3 = O at (0, 1/2).
    angle_deg : float
        Rotation of the lattice [degrees].
    """
    a = A_LATTICE_A
    basis = np.array([[0.0, 0.0], [0.5, 0.5], [0.5, 0.0], [0.0, 0.5]])
    if rotation is None:
        side = cells * a
        ij = np.stack(np.meshgrid(np.arange(cells), np.arange(cells), indexing="ij"), -1)
        ij = ij.reshape(-1, 2).astype(float)
        xy = np.concatenate([(ij + b) * a for b in basis])
        kind = np.repeat(np.arange(4), len(ij))
        return side, xy, kind, 0.0
    m, n = rotation
    # Rotating by atan2(n, m) maps the lattice vectors (m, -n) a and (n, m) a onto the
    # x and y axes, so a square cell of side sqrt(m^2 + n^2) a is exactly periodic.
    angle = math.atan2(n, m)
    side = math.hypot(m, n) * a
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    span = m + n + 1
    grid = np.stack(np.meshgrid(np.arange(-span, span + 1), np.arange(-span, span + 1), indexing="ij"), -1)
    grid = grid.reshape(-1, 2).astype(float)
    xy_all, kind_all = [], []
    for k, b in enumerate(basis):
        p = np.mod(((grid + b) * a) @ rot.T, side)
        # Wrapping maps many lattice points onto each site; keep one per site (rounded
        # to 1e-6 Å, and wrapping values within 1e-6 of the cell edge back to 0).
        key = np.round(p, 6) % round(side, 6)
        _, first = np.unique(key, axis=0, return_index=True)
        xy_all.append(p[np.sort(first)])
        kind_all.append(np.full(len(first), k))
    xy = np.concatenate(xy_all)
    kind = np.concatenate(kind_all)
    expected = m * m + n * n
    counts = np.bincount(kind, minlength=4)
    if not np.all(counts == expected):
        raise RuntimeError(f"rotated supercell has {counts.tolist()} columns per site, expected {expected}")
    return side, xy, kind, math.degrees(angle)


def build_supercell(spec: RenderSpec) -> Supercell:
    """Build the atoms and the column ground truth of one render.

    Needs numpy only, so the ground truth can be rebuilt and checked without abTEM.

    Parameters
    ----------
    spec : RenderSpec
        Thickness, defects, wall, rotation, cell size and offset.

    Returns
    -------
    Supercell
        Atoms (static positions, Å) and one ground-truth row per projected column of the
        simulated cell (before any tiling).

    Raises
    ------
    ValueError
        If two defects are closer than 2 cells (periodic distance), a copy of a defect is
        closer than ``spec.min_border_cells`` to the border of the fixture image, or two
        defects land on the same column.
    """
    a = A_LATTICE_A
    nz = spec.n_layers
    rng = np.random.default_rng(spec.seed)
    side, xy, kind, angle_deg = _lattice_columns(spec.rotation, spec.cells)
    n_col = len(xy)
    site = np.where(kind == 0, SITE_A, np.where(kind == 1, SITE_B, SITE_O)).astype(np.int8)
    vacant = np.zeros(n_col, dtype=bool)
    sm_fraction = np.zeros(n_col, dtype=np.float32)
    polarization = np.zeros(n_col, dtype=np.int8)
    offset = np.asarray(spec.offset_a, dtype=float)
    xy = np.mod(xy + offset, side)

    # Domain walls: the sign of each B column's shift follows its lattice x index, i.e.
    # the x of its undisplaced position before the offset.
    walls: list[dict[str, Any]] = []
    shift = np.zeros((n_col, 2))
    if spec.wall_stripe is not None:
        if spec.rotation is not None:
            raise ValueError("domain walls are only implemented for the unrotated supercell")
        i0, i1 = spec.wall_stripe
        lattice_x = np.mod(xy[:, 0] - offset[0], side) / a
        is_b = site == SITE_B
        inside = (lattice_x >= i0) & (lattice_x < i1 + 1)
        polarization[is_b] = np.where(inside[is_b], 1, -1).astype(np.int8)
        shift[is_b, 1] = polarization[is_b] * spec.wall_shift_a
        for x_cells in (i0, i1 + 1):
            walls.append(
                {
                    "kind": "180-degree domain wall",
                    "orientation": "vertical line (along y)",
                    "x_a": float((x_cells * a + offset[0]) % side),
                    "between_lattice_x_cells": [x_cells - 1, x_cells],
                    "b_shift_a": spec.wall_shift_a,
                    "shift_axis": "y (image rows); +1 = +y = down the image",
                    "what_moves": "whole B column (Fe and the O sharing its column); A and O columns fixed",
                }
            )
    col_xy = xy + shift

    # Point defects: snap each target to the nearest column of its site.
    defects: list[dict[str, Any]] = []
    sm_layers: dict[int, np.ndarray] = {}
    used: list[int] = []
    for d in spec.defects:
        if d.kind not in ("sm", "a_vacancy", "b_vacancy"):
            raise ValueError(f"unknown defect kind {d.kind!r}; use 'sm', 'a_vacancy' or 'b_vacancy'")
        want_site = SITE_B if d.kind == "b_vacancy" else SITE_A
        dvec = col_xy - np.asarray(d.target_frac) * side
        dvec -= side * np.round(dvec / side)
        dist = np.hypot(*dvec.T)
        dist[site != want_site] = np.inf
        idx = int(np.argmin(dist))
        if idx in used:
            raise ValueError(f"two defects land on column {idx}")
        used.append(idx)
        record: dict[str, Any] = {"kind": d.kind, "column": idx}
        if d.kind == "sm":
            k = round(d.sm_fraction * nz)
            layers = np.sort(rng.choice(nz, size=k, replace=False))
            sm_layers[idx] = layers
            sm_fraction[idx] = k / nz
            record.update(
                sm_fraction=k / nz,
                sm_layers=layers.tolist(),
                note=f"{k} of {nz} Bi replaced by Sm; layer 0 is the beam-entrance surface",
            )
        elif d.kind == "a_vacancy":
            vacant[idx] = True
            record["note"] = f"all {nz} Bi of the A column removed (the column is empty)"
        else:
            vacant[idx] = True
            record["note"] = f"all {nz} Fe of the B column removed; its {nz} O atoms kept (an O-only column)"
        defects.append(record)

    # Spacing rules: periodic (minimum-image) distance between defects, and the distance
    # of every copy in the tiled fixture image from its border.
    image_side = side * spec.tile
    for r, idx in zip(defects, used, strict=True):
        for kx in range(spec.tile):
            for ky in range(spec.tile):
                x, y = np.mod(col_xy[idx], side) + side * np.array([kx, ky])
                if min(x, y, image_side - x, image_side - y) < spec.min_border_cells * a - 1e-9:
                    raise ValueError(
                        f"defect {r['kind']} at ({x:.2f}, {y:.2f}) Å is within "
                        f"{spec.min_border_cells} cells of the image border"
                    )
    for p, i in enumerate(used):
        for j in used[p + 1 :]:
            dvec = col_xy[i] - col_xy[j]
            dvec -= side * np.round(dvec / side)
            if np.hypot(*dvec) < 2.0 * a - 1e-6:
                raise ValueError(f"defects on columns {i} and {j} are closer than 2 cells")

    # Atoms. Planes at z = a/4 (A and the O of the B column) and z = 3a/4 (Fe and the
    # pure-O columns): with two slices per cell each plane sits mid-slice, so phonon
    # displacements along z never move an atom across a slice boundary.
    symbols: list[str] = []
    positions: list[np.ndarray] = []
    z_a = (np.arange(nz) + 0.25) * a
    z_b = (np.arange(nz) + 0.75) * a
    col_xy = np.mod(col_xy, side)
    for c in range(n_col):
        x, y = col_xy[c]
        xs, ys = np.full(nz, x), np.full(nz, y)
        if site[c] == SITE_A:
            if vacant[c]:
                continue
            layers_sm = set(sm_layers.get(c, np.array([], dtype=int)).tolist())
            symbols += ["Sm" if k in layers_sm else "Bi" for k in range(nz)]
            positions.append(np.column_stack([xs, ys, z_a]))
        elif site[c] == SITE_B:
            if not vacant[c]:
                symbols += ["Fe"] * nz
                positions.append(np.column_stack([xs, ys, z_b]))
            symbols += ["O"] * nz
            positions.append(np.column_stack([xs, ys, z_a]))
        else:
            symbols += ["O"] * nz
            positions.append(np.column_stack([xs, ys, z_b]))

    for r in defects:
        r["x_a"], r["y_a"] = float(col_xy[r["column"], 0]), float(col_xy[r["column"], 1])
    return Supercell(
        symbols=tuple(symbols),
        positions_a=np.concatenate(positions),
        cell_a=(side, side, nz * a),
        column_x_a=col_xy[:, 0].copy(),
        column_y_a=col_xy[:, 1].copy(),
        column_site=site,
        column_vacant=vacant,
        column_sm_fraction=sm_fraction,
        column_polarization=polarization,
        rotation_deg=angle_deg if spec.rotation is not None else 0.0,
        defects=defects,
        walls=walls,
    )


def fixture_columns(cell: Supercell, pixel_size_a: float, tile: int = 1) -> dict[str, np.ndarray]:
    """Ground-truth arrays of a fixture image, in pixels, for a tiled periodic image.

    Parameters
    ----------
    cell : Supercell
        The simulated cell.
    pixel_size_a : float
        Scan pixel size [Å].
    tile : int
        The simulated image is repeated ``tile`` x ``tile`` times.

    Returns
    -------
    dict of numpy.ndarray
        ``column_x_px``, ``column_y_px`` (float64), ``column_site`` (int8),
        ``column_vacant`` (bool), ``column_sm_fraction`` (float32) and
        ``column_polarization`` (int8). Copy ``k = ky * tile + kx`` of simulated column
        ``c`` is fixture column ``k * n_columns + c``, so without tiling the indices are
        those of the simulated cell.
    """
    n = len(cell.column_x_a)
    kx, ky = np.meshgrid(np.arange(tile), np.arange(tile), indexing="xy")
    kx, ky = kx.ravel(), ky.ravel()
    side = cell.extent_a
    x = (cell.column_x_a[None, :] + side * kx[:, None]).ravel() / pixel_size_a
    y = (cell.column_y_a[None, :] + side * ky[:, None]).ravel() / pixel_size_a
    reps = tile * tile
    return {
        "column_x_px": x.astype(np.float64),
        "column_y_px": y.astype(np.float64),
        "column_site": np.tile(cell.column_site, reps).astype(np.int8),
        "column_vacant": np.tile(cell.column_vacant, reps).astype(bool),
        "column_sm_fraction": np.tile(cell.column_sm_fraction, reps).astype(np.float32),
        "column_polarization": np.tile(cell.column_polarization, reps).astype(np.int8),
        "_n_per_copy": np.array(n),
    }


# --------------------------------------------------------------------------------------
# Rendering (abTEM, imported lazily)
# --------------------------------------------------------------------------------------


def _import_physics() -> tuple[Any, Any]:
    """Import abTEM and ASE, or raise one clear line on how to get them."""
    try:
        # Optional dependencies, imported only to render (never at module import).
        import abtem
        import ase
    except ImportError as exc:
        raise PhysicsUnavailableError(
            f"rendering multislice fixtures needs abTEM and ASE ({exc.name} is missing): {_INSTALL_HINT}"
        ) from None
    abtem.config.set(
        {
            "device": "cpu",
            "precision": "float32",
            "diagnostics.progress_bar": False,
            "diagnostics.task_progress": False,
        }
    )
    return abtem, ase


def _potential(cell: Supercell, optics: OpticsSettings, seed: int, interpolation: int) -> Any:
    """The frozen-phonon abTEM potential of a cell (the same configurations for a given seed)."""
    abtem, ase = _import_physics()
    atoms = ase.Atoms(
        symbols=list(cell.symbols), positions=cell.positions_a, cell=list(cell.cell_a), pbc=True
    )
    present = set(cell.symbols)
    sigmas = {el: s for el, s in _PHONON_SIGMAS_A.items() if el in present}
    phonons = abtem.FrozenPhonons(atoms, num_configs=optics.phonon_configs, sigmas=sigmas, seed=seed)
    return abtem.Potential(
        phonons,
        gpts=optics.potential_gpts(cell.extent_a, interpolation),
        slice_thickness=A_LATTICE_A / optics.slices_per_cell,
        projection="infinite",
        parametrization="lobato",
    )


def render_haadf(
    cell: Supercell, optics: OpticsSettings, seed: int, scan_px: int, interpolation: int
) -> np.ndarray:
    """Simulate the noiseless HAADF image of one supercell (before the source blur).

    PRISM (abTEM's ``SMatrix``) with an aberration-free probe, averaged over
    ``optics.phonon_configs`` frozen-phonon configurations. The scan covers exactly one
    period of the cell with ``scan_px`` positions per side, starting at (0, 0), endpoint
    excluded.

    Parameters
    ----------
    cell : Supercell
        Atoms and cell.
    optics : OpticsSettings
        Beam, detector and numerical settings.
    seed : int
        Seed of the frozen-phonon displacements.
    scan_px : int
        Scan positions per side.
    interpolation : int
        PRISM interpolation factor (1 = no interpolation, exact).

    Returns
    -------
    numpy.ndarray
        ``float32 [rows, cols]`` HAADF intensity as a fraction of the incident beam
        (row = y, col = x, pixel (r, c) = probe at (c, r) * pixel size).

    Raises
    ------
    PhysicsUnavailableError
        If abTEM or ASE is not installed.
    """
    abtem, _ = _import_physics()
    potential = _potential(cell, optics, seed, interpolation)
    energy_ev = optics.energy_kv * 1e3
    s_matrix = abtem.SMatrix(
        potential=potential,
        energy=energy_ev,
        semiangle_cutoff=optics.semiangle_mrad,
        interpolation=interpolation,
    )
    detector = abtem.AnnularDetector(inner=optics.detector_mrad[0], outer=optics.detector_mrad[1])
    side = cell.extent_a
    scan = abtem.GridScan(start=(0.0, 0.0), end=(side, side), gpts=scan_px, endpoint=False)
    ctf = abtem.CTF(semiangle_cutoff=optics.semiangle_mrad, energy=energy_ev)
    measurement = s_matrix.scan(scan=scan, detectors=detector, ctf=ctf).compute()
    # abTEM's scan axes are (x, y); the project's images are [row = y, col = x].
    return np.ascontiguousarray(np.asarray(measurement.array, dtype=np.float32).T)


def multislice_crosscheck(
    cell: Supercell,
    optics: OpticsSettings,
    seed: int,
    raw: np.ndarray,
    pixels_rc: Sequence[tuple[int, int]],
    labels: Sequence[str],
    interpolation: int,
) -> dict[str, Any]:
    """Compare a PRISM render with plain multislice at a few probe positions.

    Plain multislice (one probe at a time over the whole cell) has no PRISM window, so it
    is the reference; the same frozen-phonon configurations are used (same seed), so the
    two agree to numerical precision where PRISM is exact.

    Parameters
    ----------
    cell : Supercell
        The simulated cell.
    optics : OpticsSettings
        Settings of the render.
    seed : int
        Frozen-phonon seed of the render.
    raw : numpy.ndarray
        The PRISM image before the source blur, ``[rows, cols]``.
    pixels_rc : sequence of (int, int)
        Pixels ``(row, col)`` of ``raw`` to check.
    labels : sequence of str
        What each pixel is (for the record).
    interpolation : int
        PRISM interpolation factor of the render (sets the same potential grid).

    Returns
    -------
    dict
        Per point: label, pixel, PRISM and multislice values; and the largest deviation
        relative to the median A-column value among the points
        (``max_abs_diff_over_a``) and relative to each point's own multislice value for
        points above 2 % of it (``max_rel_diff``).
    """
    abtem, _ = _import_physics()
    potential = _potential(cell, optics, seed, interpolation)
    pixel_a = cell.extent_a / raw.shape[1]
    positions = np.array([(c * pixel_a, r * pixel_a) for r, c in pixels_rc], dtype=float)
    probe = abtem.Probe(energy=optics.energy_kv * 1e3, semiangle_cutoff=optics.semiangle_mrad)
    detector = abtem.AnnularDetector(inner=optics.detector_mrad[0], outer=optics.detector_mrad[1])
    ms = np.asarray(
        probe.scan(potential, scan=abtem.CustomScan(positions), detectors=detector).compute().array,
        dtype=float,
    ).ravel()
    prism = np.array([float(raw[r, c]) for r, c in pixels_rc])
    a_ref = [m for m, lab in zip(ms, labels, strict=True) if lab == "A"]
    scale = float(np.median(a_ref)) if a_ref else float(ms.max())
    big = ms > 0.02 * scale
    return {
        "points": [
            {"label": lab, "pixel_rc": [int(r), int(c)], "prism": float(p), "multislice": float(m)}
            for lab, (r, c), p, m in zip(labels, pixels_rc, prism, ms, strict=True)
        ],
        "max_abs_diff_over_a": float(np.max(np.abs(prism - ms)) / scale),
        "max_rel_diff": float(np.max(np.abs(prism[big] - ms[big]) / ms[big])) if big.any() else None,
        "note": "same frozen-phonon configurations, values before the source blur",
    }


def _crosscheck_pixels(
    cell: Supercell, pixel_a: float, scan_px: int
) -> tuple[list[tuple[int, int]], list[str]]:
    """Pixels to cross-check: every defect column plus the normal A, B and O column farthest from defects."""
    xy = np.column_stack([cell.column_x_a, cell.column_y_a])
    defect_idx = [r["column"] for r in cell.defects]
    side = cell.extent_a
    if defect_idx:
        d = xy[:, None, :] - xy[None, defect_idx, :]
        d -= side * np.round(d / side)
        far = np.hypot(d[..., 0], d[..., 1]).min(axis=1)
    else:
        far = np.zeros(len(xy))
    normal = ~cell.column_vacant & (cell.column_sm_fraction == 0)
    picks: list[int] = []
    labels: list[str] = []
    for code, name in ((SITE_A, "A"), (SITE_B, "B"), (SITE_O, "O")):
        cand = np.where((cell.column_site == code) & normal)[0]
        picks.append(int(cand[np.argmax(far[cand])]))
        labels.append(name)
    for r in cell.defects:
        picks.append(r["column"])
        labels.append(f"{r['kind']}" + (f" {r['sm_fraction']:.1f}" if r["kind"] == "sm" else ""))
    pixels = [
        (round(cell.column_y_a[i] / pixel_a) % scan_px, round(cell.column_x_a[i] / pixel_a) % scan_px)
        for i in picks
    ]
    return pixels, labels


def apply_source_blur(image: np.ndarray, sigma_px: float) -> np.ndarray:
    """Convolve a periodic image with a Gaussian effective source.

    The finite source size makes the probe an incoherent sum of shifted probes, i.e. a
    Gaussian convolution of the image. The field of view is one period of the specimen,
    so the convolution is done exactly in Fourier space with periodic wrap.

    Parameters
    ----------
    image : numpy.ndarray
        ``[rows, cols]`` periodic image.
    sigma_px : float
        Gaussian standard deviation [pixels].

    Returns
    -------
    numpy.ndarray
        Blurred image, same shape, float32; the total intensity is unchanged.
    """
    ky = np.fft.fftfreq(image.shape[0])[:, None]
    kx = np.fft.fftfreq(image.shape[1])[None, :]
    transfer = np.exp(-2.0 * math.pi**2 * sigma_px**2 * (kx**2 + ky**2))
    return np.fft.ifft2(np.fft.fft2(image.astype(np.float64)) * transfer).real.astype(np.float32)


def poisson_counts(image: np.ndarray, dose_e_per_a2: float, pixel_size_a: float, seed: int) -> np.ndarray:
    """Draw detector counts for a HAADF image at a given dose.

    ``counts ~ Poisson(dose [e/Å^2] * pixel_area [Å^2] * image)``, where ``image`` is the
    fraction of the incident beam that reaches the detector.

    Parameters
    ----------
    image : numpy.ndarray
        Noiseless HAADF fraction, ``[rows, cols]``.
    dose_e_per_a2 : float
        Incident electron dose [electrons / Å^2].
    pixel_size_a : float
        Scan pixel size [Å].
    seed : int
        Seed of the noise.

    Returns
    -------
    numpy.ndarray
        ``float32`` counts, same shape.
    """
    rng = np.random.default_rng(seed)
    mean = dose_e_per_a2 * pixel_size_a**2 * np.clip(image.astype(np.float64), 0.0, None)
    return rng.poisson(mean).astype(np.float32)


def column_checks(
    image: np.ndarray,
    x_px: np.ndarray,
    y_px: np.ndarray,
    site: np.ndarray,
    vacant: np.ndarray,
    sm_fraction: np.ndarray,
    polarization: np.ndarray,
    pixel_size_a: float,
) -> dict[str, Any]:
    """Check the ground truth against the image and measure column intensity ratios.

    Per column: the intensity-weighted centroid within 0.8 Å of the true position (the
    window minimum subtracted; periodic wrap), the peak (bilinear value at the true
    position) and the integrated intensity within 0.8 Å. Used to verify the pixel
    convention of the fixtures and reported in their metadata.

    Parameters
    ----------
    image : numpy.ndarray
        Noiseless ``[rows, cols]`` periodic image.
    x_px, y_px : numpy.ndarray
        True column positions [pixels].
    site, vacant, sm_fraction, polarization : numpy.ndarray
        Ground-truth labels as stored in a fixture.
    pixel_size_a : float
        Pixel size [Å].

    Returns
    -------
    dict
        ``mean_abs_offset_a_px`` (mean |centroid - truth| of occupied, pure-Bi A columns
        [pixels]), ``median_offset_a_xy_px``, ratios of medians of peak and integrated
        intensity (``b_over_a``, ``o_over_a``, ``sm_over_a`` for fully substituted
        columns, ``a_vacancy_over_a``, ``b_vacancy_over_b``) and, if B columns are
        polarized, the mean y offset of the centroid from the (displaced) truth of the +1
        and of the -1 B columns (``b_polarization_centroid_dy_px``, near 0 if the image
        shows the recorded shift).
    """
    rows, cols = image.shape
    radius = 0.8 / pixel_size_a
    r = math.ceil(radius)
    oy, ox = np.mgrid[-r : r + 1, -r : r + 1]
    img = image.astype(np.float64)

    def bilinear(x: float, y: float) -> float:
        x0, y0 = math.floor(x), math.floor(y)
        fx, fy = x - x0, y - y0
        v = 0.0
        for dy, wy in ((0, 1 - fy), (1, fy)):
            for dx, wx in ((0, 1 - fx), (1, fx)):
                v += wy * wx * img[(y0 + dy) % rows, (x0 + dx) % cols]
        return v

    n = len(x_px)
    centroid = np.zeros((n, 2))
    peak = np.zeros(n)
    integ = np.zeros(n)
    for c in range(n):
        cx, cy = round(x_px[c]), round(y_px[c])
        gx, gy = cx + ox, cy + oy
        inside = (gx - x_px[c]) ** 2 + (gy - y_px[c]) ** 2 <= radius**2
        vals = img[gy % rows, gx % cols]
        integ[c] = vals[inside].sum()
        w = np.where(inside, vals - vals[inside].min(), 0.0)
        centroid[c] = ((w * gx).sum() / w.sum(), (w * gy).sum() / w.sum()) if w.sum() > 0 else (cx, cy)
        peak[c] = bilinear(float(x_px[c]), float(y_px[c]))
    offset = centroid - np.column_stack([x_px, y_px])

    normal_a = (site == SITE_A) & ~vacant & (sm_fraction == 0)
    normal_b = (site == SITE_B) & ~vacant
    pure_o = site == SITE_O
    full_sm = (site == SITE_A) & ~vacant & (sm_fraction >= 0.999)
    a_vac = (site == SITE_A) & vacant
    b_vac = (site == SITE_B) & vacant

    def ratio(values: np.ndarray, num: np.ndarray, den: np.ndarray) -> float | None:
        if not num.any() or not den.any():
            return None
        return float(np.median(values[num]) / np.median(values[den]))

    out: dict[str, Any] = {
        "centroid_radius_a": 0.8,
        "mean_abs_offset_a_px": float(np.mean(np.hypot(*offset[normal_a].T))),
        "median_offset_a_xy_px": [float(v) for v in np.median(offset[normal_a], axis=0)],
        "mean_abs_offset_b_px": float(np.mean(np.hypot(*offset[normal_b].T))),
        "peak_ratios": {
            "b_over_a": ratio(peak, normal_b, normal_a),
            "o_over_a": ratio(peak, pure_o, normal_a),
            "sm_over_a": ratio(peak, full_sm, normal_a),
            "a_vacancy_over_a": ratio(peak, a_vac, normal_a),
            "b_vacancy_over_b": ratio(peak, b_vac, normal_b),
        },
        "integrated_ratios": {
            "b_over_a": ratio(integ, normal_b, normal_a),
            "o_over_a": ratio(integ, pure_o, normal_a),
            "sm_over_a": ratio(integ, full_sm, normal_a),
            "a_vacancy_over_a": ratio(integ, a_vac, normal_a),
            "b_vacancy_over_b": ratio(integ, b_vac, normal_b),
        },
        "median_peak_a": float(np.median(peak[normal_a])),
        "background_min": float(img.min()),
    }
    pol = normal_b & (polarization != 0)
    if pol.any():
        # Offsets are relative to the *displaced* truth, so values near 0 (against a
        # shift of about 0.6 px) mean the image shows the recorded polarization; a
        # truth without the shift would give about -0.6 px for +1 and +0.6 px for -1.
        up, down = pol & (polarization > 0), pol & (polarization < 0)
        out["b_polarization_centroid_dy_px"] = {
            "plus": float(np.mean(offset[up, 1])),
            "minus": float(np.mean(offset[down, 1])),
        }
    return out


# --------------------------------------------------------------------------------------
# Fixture files
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class MultisliceFixture:
    """A multislice HAADF fixture with its ground truth, as read by :func:`load_fixture`.

    Attributes
    ----------
    image : numpy.ndarray
        ``float32 [rows, cols]`` noiseless HAADF intensity, fraction of the incident beam.
    noisy : numpy.ndarray or None
        ``float32`` Poisson counts at ``dose_e_per_a2``; None if the file has none.
    dose_e_per_a2 : float
        Dose of ``noisy`` [e/Å^2]; expected counts = dose * pixel_area [Å^2] * image.
    pixel_size_nm : float
        Scan pixel size [nm].
    column_x_px, column_y_px : numpy.ndarray
        ``float64 (N,)`` exact projected column positions [pixels], x along columns, y
        along rows, integers at pixel centres.
    column_site : numpy.ndarray
        ``int8 (N,)`` 0 = A, 1 = B, 2 = pure O.
    column_vacant : numpy.ndarray
        ``bool (N,)`` True for a vacancy column (still listed at its site).
    column_sm_fraction : numpy.ndarray
        ``float32 (N,)`` fraction of the column's A atoms that are Sm.
    column_polarization : numpy.ndarray
        ``int8 (N,)`` +1 / -1 for B columns displaced along +y / -y, 0 elsewhere.
    metadata : dict
        Parsed JSON metadata (optics, thickness, defects, versions, checks).
    """

    image: np.ndarray
    noisy: np.ndarray | None
    dose_e_per_a2: float
    pixel_size_nm: float
    column_x_px: np.ndarray
    column_y_px: np.ndarray
    column_site: np.ndarray
    column_vacant: np.ndarray
    column_sm_fraction: np.ndarray
    column_polarization: np.ndarray
    metadata: dict[str, Any]

    @property
    def pixel_size_a(self) -> float:
        """Scan pixel size [Å]."""
        return self.pixel_size_nm * 10.0

    @property
    def positions_px(self) -> np.ndarray:
        """``(N, 2)`` column positions ``(x, y)`` [pixels]."""
        return np.column_stack([self.column_x_px, self.column_y_px])

    @property
    def expected_counts(self) -> np.ndarray:
        """Noise-free mean counts per pixel at ``dose_e_per_a2`` (what ``noisy`` was drawn from)."""
        return (self.dose_e_per_a2 * self.pixel_size_a**2 * self.image).astype(np.float32)

    def defect_columns(self, kind: str | None = None) -> np.ndarray:
        """Indices of the planted point-defect columns (every copy in a tiled fixture).

        Parameters
        ----------
        kind : str or None
            ``"sm"``, ``"a_vacancy"`` or ``"b_vacancy"``; None for all.

        Returns
        -------
        numpy.ndarray
            ``int64`` indices into the ``column_*`` arrays, sorted.
        """
        out: list[int] = []
        for r in self.metadata.get("defects", []):
            if kind is None or r["kind"] == kind:
                out += r.get("copies", [r["column"]])
        return np.array(sorted(out), dtype=np.int64)


_REQUIRED = (
    "image",
    "pixel_size_nm",
    "column_x_px",
    "column_y_px",
    "column_site",
    "column_vacant",
    "column_sm_fraction",
    "column_polarization",
    "metadata",
)


def load_fixture(path: str | Path) -> MultisliceFixture:
    """Read a multislice fixture (numpy only).

    Parameters
    ----------
    path : str or pathlib.Path
        ``.npz`` file written by :func:`write_fixture`.

    Returns
    -------
    MultisliceFixture
        Arrays and parsed metadata.

    Raises
    ------
    FixtureError
        If the file is missing, not an ``.npz`` archive, or lacks a required array.
    """
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as z:
            missing = [k for k in _REQUIRED if k not in z.files]
            if missing:
                raise FixtureError(
                    f"fixture {p} lacks {', '.join(missing)}; regenerate it with simulator.multislice"
                )
            data = {k: z[k] for k in z.files}
    except FixtureError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise FixtureError(f"cannot read multislice fixture {p}: {exc}") from exc
    try:
        metadata = json.loads(str(data["metadata"]))
    except json.JSONDecodeError as exc:
        raise FixtureError(f"fixture {p} has unreadable metadata: {exc}") from exc
    return MultisliceFixture(
        image=data["image"].astype(np.float32, copy=False),
        noisy=data["noisy"].astype(np.float32, copy=False) if "noisy" in data else None,
        dose_e_per_a2=float(data["dose_e_per_a2"]) if "dose_e_per_a2" in data else float("nan"),
        pixel_size_nm=float(data["pixel_size_nm"]),
        column_x_px=data["column_x_px"].astype(np.float64, copy=False),
        column_y_px=data["column_y_px"].astype(np.float64, copy=False),
        column_site=data["column_site"].astype(np.int8, copy=False),
        column_vacant=data["column_vacant"].astype(bool, copy=False),
        column_sm_fraction=data["column_sm_fraction"].astype(np.float32, copy=False),
        column_polarization=data["column_polarization"].astype(np.int8, copy=False),
        metadata=metadata,
    )


def write_fixture(
    path: str | Path,
    image: np.ndarray,
    noisy: np.ndarray,
    dose_e_per_a2: float,
    pixel_size_a: float,
    columns: dict[str, np.ndarray],
    metadata: dict[str, Any],
) -> Path:
    """Write one fixture as a compressed ``.npz``.

    Parameters
    ----------
    path : str or pathlib.Path
        Output file.
    image : numpy.ndarray
        Noiseless (blurred) HAADF fraction, ``[rows, cols]``.
    noisy : numpy.ndarray
        Poisson counts at ``dose_e_per_a2``.
    dose_e_per_a2 : float
        Dose of ``noisy`` [e/Å^2].
    pixel_size_a : float
        Scan pixel size [Å].
    columns : dict of numpy.ndarray
        Ground truth from :func:`fixture_columns` (keys starting with ``_`` are skipped).
    metadata : dict
        JSON-serializable metadata.

    Returns
    -------
    pathlib.Path
        The file written.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        p,
        image=image.astype(np.float32),
        noisy=noisy.astype(np.float32),
        dose_e_per_a2=np.float64(dose_e_per_a2),
        pixel_size_nm=np.float64(pixel_size_a / 10.0),
        metadata=np.array(json.dumps(metadata, indent=1)),
        **{k: v for k, v in columns.items() if not k.startswith("_")},
    )
    return p


def _dose_tag(dose: float) -> str:
    """``1e5`` for 100000.0, for file names."""
    mantissa, exponent = f"{dose:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _versions() -> dict[str, str]:
    """Versions of the rendering libraries (``"missing"`` where not installed)."""
    out = {"numpy": np.__version__}
    for name in ("abtem", "ase"):
        try:
            module = __import__(name)
            out[name] = str(getattr(module, "__version__", "unknown"))
        except ImportError:
            out[name] = "missing"
    return out


def render_fixture_set(
    out_dir: str | Path,
    renders: Sequence[RenderSpec] = DEFAULT_RENDERS,
    optics: OpticsSettings | None = None,
    command: str = "",
    quick: bool = False,
) -> list[Path]:
    """Render each :class:`RenderSpec` and write one fixture per dose.

    Parameters
    ----------
    out_dir : str or pathlib.Path
        Output directory.
    renders : sequence of RenderSpec
        What to render.
    optics : OpticsSettings or None
        Settings; the default (or the ``--quick`` ones) if None.
    command : str
        The generating command, recorded in the metadata.
    quick : bool
        Recorded in the metadata (quick renders are for smoke tests, not for shipping).

    Returns
    -------
    list of pathlib.Path
        Files written.

    Raises
    ------
    PhysicsUnavailableError
        If abTEM or ASE is not installed.
    """
    optics = optics or (_QUICK_OPTICS if quick else OpticsSettings())
    _import_physics()
    versions = _versions()
    written: list[Path] = []
    for k, spec in enumerate(renders, start=1):
        cell = build_supercell(spec)
        interpolation = spec.interpolation if spec.interpolation is not None else optics.interpolation
        pixel_a = cell.extent_a / spec.scan_px
        t0 = time.perf_counter()
        raw = render_haadf(cell, optics, spec.seed, spec.scan_px, interpolation)
        seconds = time.perf_counter() - t0
        crosscheck: dict[str, Any] | None = None
        if optics.crosscheck_points:
            t1 = time.perf_counter()
            pixels, labels = _crosscheck_pixels(cell, pixel_a, spec.scan_px)
            crosscheck = multislice_crosscheck(cell, optics, spec.seed, raw, pixels, labels, interpolation)
            crosscheck["seconds"] = round(time.perf_counter() - t1, 1)
        # The source blur is applied to one period, then the period is tiled: both exact
        # because the specimen is periodic.
        image = np.tile(apply_source_blur(raw, optics.source_sigma_a / pixel_a), (spec.tile, spec.tile))
        columns = fixture_columns(cell, pixel_a, spec.tile)
        checks = column_checks(
            image,
            columns["column_x_px"],
            columns["column_y_px"],
            columns["column_site"],
            columns["column_vacant"],
            columns["column_sm_fraction"],
            columns["column_polarization"],
            pixel_a,
        )
        checks["multislice_crosscheck"] = crosscheck
        gpts = optics.potential_gpts(cell.extent_a, interpolation)
        n_per_copy = len(cell.column_x_a)
        defects = [
            {**r, "copies": [c * n_per_copy + r["column"] for c in range(spec.tile**2)]}
            if spec.tile > 1
            else r
            for r in cell.defects
        ]
        for dose in spec.doses_e_per_a2:
            name = f"{spec.stem}_dose{_dose_tag(dose)}"
            noise_seed = zlib.crc32(name.encode())
            noisy = poisson_counts(image, dose, pixel_a, seed=noise_seed)
            metadata = {
                "material": "BiFeO3 [001]",
                "structure": "pseudo-cubic perovskite; A (Bi/Sm) at (0,0,1/4), B column = Fe at (1/2,1/2,3/4)"
                " + O at (1/2,1/2,1/4), pure O columns at (1/2,0,3/4) and (0,1/2,3/4)",
                "name": name,
                "description": spec.description,
                "a_nm": A_LATTICE_A / 10.0,
                "thickness_nm": spec.n_layers * A_LATTICE_A / 10.0,
                "n_layers": spec.n_layers,
                "supercell_side_nm": cell.extent_a / 10.0,
                "supercell_cells": (
                    f"{spec.cells} x {spec.cells}"
                    if spec.rotation is None
                    else f"commensurate {spec.rotation[0]}^2+{spec.rotation[1]}^2 = "
                    f"{spec.rotation[0] ** 2 + spec.rotation[1] ** 2} cells per layer"
                ),
                "tile": spec.tile,
                "tile_note": "the simulated periodic image is repeated tile x tile times; fixture column "
                "k * n + c (k = ky * tile + kx) is copy k of simulated column c"
                if spec.tile > 1
                else "not tiled",
                "columns_per_copy": n_per_copy,
                "periodic_image": True,
                "specimen_offset_a": list(spec.offset_a),
                "rotation_deg": cell.rotation_deg,
                "rotation_convention": "lattice vector a1 at rotation_deg from +x toward +y (rows down: "
                "clockwise on screen); the atoms were rotated about z before building the potential",
                "a1_px": [
                    A_LATTICE_A / pixel_a * math.cos(math.radians(cell.rotation_deg)),
                    A_LATTICE_A / pixel_a * math.sin(math.radians(cell.rotation_deg)),
                ],
                "pixel_convention": "pixel (row r, col c) = probe at (x, y) = (c, r) * pixel_size; "
                "column_x_px = x / pixel_size, integer = pixel centre",
                "energy_kv": optics.energy_kv,
                "semiangle_mrad": optics.semiangle_mrad,
                "aberrations": "none (ideal aberration-corrected probe)",
                "detector_mrad": list(optics.detector_mrad),
                "method": f"PRISM (abTEM SMatrix), interpolation {interpolation}"
                + (" (= plain multislice, no PRISM window)" if interpolation == 1 else "")
                + ", infinite projection, Lobato parametrization",
                "prism_interpolation": interpolation,
                "phonon_configurations": optics.phonon_configs,
                "phonon_sigmas_a": {el: s for el, s in _PHONON_SIGMAS_A.items() if el in set(cell.symbols)},
                "phonon_seed": spec.seed,
                "potential_gpts": gpts,
                "potential_sampling_a": cell.extent_a / gpts,
                "slice_thickness_a": A_LATTICE_A / optics.slices_per_cell,
                "max_simulated_angle_mrad": optics.wavelength_a / (3.0 * cell.extent_a / gpts) * 1e3,
                "scan_px_simulated": spec.scan_px,
                "pixel_size_a": pixel_a,
                "source_blur": {
                    "kind": "Gaussian, periodic, applied to the noiseless image",
                    "sigma_a": optics.source_sigma_a,
                    "fwhm_a": optics.source_sigma_a * 2.0 * math.sqrt(2.0 * math.log(2.0)),
                },
                "image_units": "fraction of the incident beam reaching the detector",
                "noisy_units": "counts",
                "dose_e_per_a2": dose,
                "counts_formula": "noisy ~ Poisson(dose_e_per_a2 * pixel_size_a**2 * image)",
                "noise_seed": noise_seed,
                "defects": defects,
                "walls": cell.walls,
                "polarization_convention": "+1: B column (Fe and its O) displaced by +shift along +y "
                "(down the image) from the centre of its four A neighbours; -1: along -y; 0: not displaced",
                "checks": checks,
                "render_seconds": round(seconds, 1),
                "quick": quick,
                "versions": versions,
                "command": command,
            }
            path = write_fixture(
                Path(out_dir) / f"{name}.npz", image, noisy, dose, pixel_a, columns, metadata
            )
            written.append(path)
        xc = (
            f", PRISM vs multislice max |diff| {crosscheck['max_abs_diff_over_a']:.3f} of A"
            if crosscheck is not None
            else ""
        )
        print(
            f"[{k}/{len(renders)}] {spec.stem}: {seconds:.0f} s, A offset "
            f"{checks['mean_abs_offset_a_px']:.3f} px, peak B/A {checks['peak_ratios']['b_over_a']:.3f}, "
            f"O/A {checks['peak_ratios']['o_over_a']:.3f}{xc} -> "
            + ", ".join(p.name for p in written[-len(spec.doses_e_per_a2) :]),
            flush=True,
        )
    return written


# Cheap settings for a smoke test: one phonon configuration, PRISM interpolation 4 where
# a render does not set its own (probe copies 2 cells apart, so vacancies are not dark),
# a 150 mrad outer edge and no multislice cross-check.
_QUICK_OPTICS = OpticsSettings(
    phonon_configs=1, interpolation=4, detector_mrad=(60.0, 150.0), crosscheck_points=False
)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: render the fixture set.

    Parameters
    ----------
    argv : sequence of str or None
        Arguments (``sys.argv[1:]`` if None): ``--out DIR`` (required), ``--quick``
        (cheap smoke-test settings), ``--only STEM`` (repeatable, render a subset).

    Returns
    -------
    int
        Exit status: 0 on success, 2 if abTEM/ASE are missing or the arguments are wrong.
    """
    parser = argparse.ArgumentParser(
        prog="python -m simulator.multislice",
        description="Render multislice HAADF-STEM fixtures of BiFeO3 [001] with exact ground truth.",
    )
    parser.add_argument("--out", required=True, help="output directory for the .npz fixtures")
    parser.add_argument("--quick", action="store_true", help="1 phonon configuration, PRISM f=4 (smoke test)")
    parser.add_argument("--only", action="append", default=None, help="render only this stem (repeatable)")
    args = parser.parse_args(argv)
    renders = DEFAULT_RENDERS
    if args.only:
        unknown = sorted(set(args.only) - {r.stem for r in DEFAULT_RENDERS})
        if unknown:
            print(
                f"error: unknown fixture stem(s) {unknown}; choose from {[r.stem for r in DEFAULT_RENDERS]}",
                file=sys.stderr,
            )
            return 2
        renders = tuple(r for r in DEFAULT_RENDERS if r.stem in args.only)
    command = "python -m simulator.multislice " + " ".join(sys.argv[1:] if argv is None else argv)
    t0 = time.perf_counter()
    try:
        written = render_fixture_set(args.out, renders, command=command.strip(), quick=args.quick)
    except PhysicsUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} fixtures to {args.out} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
