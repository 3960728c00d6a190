"""atomap's 2-D Gaussian refinement of atomic-column positions, as a reference for our own.

A thin wrapper around `atomap <https://atomap.org>`_ (an optional dependency, imported only
when called) so that ``micrography bench columns`` can put atomap's refined positions beside
ours. It depends on nothing of the project but numpy, so it also runs in a separate
environment that holds atomap.

Coordinates follow the project's convention, which is also atomap's (checked against images
with a known column position): ``x`` runs along the columns (second array axis), ``y`` along
the rows (first axis), and integer values are pixel centres, so ``image[round(y), round(x)]``
is the pixel a column sits on.

atomap refines one sublattice at a time: its mask radius comes from the distance to the
nearest neighbour *in the same sublattice*. The caller therefore refines the A and B
sublattices of a perovskite in separate calls. atomap's tutorial fits the bright A
sublattice first and fits B on the image with the fitted A columns subtracted; passing
the raw image for B leaves A's tails inside B's mask.
"""

from __future__ import annotations

import importlib.util
import warnings
from types import ModuleType

import numpy as np

__all__ = ["atomap_available", "refine_positions_atomap"]

_INSTALL_HINT = "atomap is not installed: pip install atomap (or pip install 'micrography[atomap]')"
_COM_PERCENT_TO_NN = 0.25
"""atomap's default centre-of-mass mask radius, as a fraction of the nearest-neighbour distance."""


def atomap_available() -> bool:
    """Whether atomap and HyperSpy can be found in this environment.

    Looks the packages up without importing them (``import atomap.api`` takes seconds).

    Returns
    -------
    bool
        True where both ``atomap`` and ``hyperspy`` are installed.

    Examples
    --------
    >>> isinstance(atomap_available(), bool)
    True
    """
    return all(importlib.util.find_spec(name) is not None for name in ("atomap", "hyperspy"))


def _import_atomap() -> ModuleType:
    """``atomap.api``, imported with HyperSpy's import-time deprecation warnings silenced."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import atomap.api as am
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    return am


def refine_positions_atomap(
    image: np.ndarray,
    x_px: np.ndarray,
    y_px: np.ndarray,
    *,
    sigma_px: float | None = None,
    percent_to_nn: float = 0.40,
    mask_radius_px: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Refine the columns of one sublattice with atomap: centre of mass, then a 2-D Gaussian fit.

    Builds one ``atomap.api.Sublattice`` from the initial positions, finds each column's
    nearest neighbours in it, and runs ``refine_atom_positions_using_center_of_mass``
    followed by ``refine_atom_positions_using_2d_gaussian``, as atomap's tutorial does.
    Each column is fitted on its own (an elliptical, rotatable Gaussian on a masked,
    background-subtracted crop); where atomap's fit fails ten times with a shrinking mask
    it keeps a centre-of-mass position, and the sigma returned for that column is NaN.

    Refine the A and B sublattices in separate calls, as atomap does: the masks are sized
    from the nearest neighbour in the same sublattice, so mixing both sublattices in one
    call shrinks every mask. atomap's tutorial fits B on the image with the fitted A
    columns subtracted.

    Parameters
    ----------
    image : numpy.ndarray
        2-D image, shape (rows, columns), intensity in any units (converted to float64).
        atomap expects non-negative data with bright columns.
    x_px : numpy.ndarray
        Initial positions along the columns (second axis), pixels; integer = pixel centre.
    y_px : numpy.ndarray
        Initial positions along the rows (first axis), pixels; integer = pixel centre.
    sigma_px : float or None, optional
        Starting Gaussian sigma of every column, pixels. None keeps atomap's start of 1 px.
    percent_to_nn : float, optional
        Radius of the Gaussian-fit mask as a fraction of the distance to the nearest column
        of the same sublattice (atomap's default, 0.40). The centre-of-mass step uses
        atomap's own default of 0.25. Ignored where ``mask_radius_px`` is given.
    mask_radius_px : float or None, optional
        Fixed mask radius, pixels, for both steps instead of ``percent_to_nn``.

    Returns
    -------
    x_px : numpy.ndarray
        Refined positions along the columns, pixels, float64, in the order given.
    y_px : numpy.ndarray
        Refined positions along the rows, pixels, float64.
    sigma_px : numpy.ndarray
        Fitted Gaussian sigma per column, the mean of the two principal axes, pixels;
        NaN where the Gaussian fit failed and atomap kept the centre of mass. Biased low
        where the mask cuts the column's tails (see the example).

    Raises
    ------
    ImportError
        If atomap is not installed.
    ValueError
        If the image is not 2-D, the positions differ in shape, or a mask needs nearest
        neighbours and there is only one column.

    Examples
    --------
    >>> import numpy as np
    >>> import pytest
    >>> _ = pytest.importorskip("atomap")
    >>> rows, cols = np.mgrid[0:48, 0:48]
    >>> x0, y0 = np.meshgrid([12.0, 24.0, 36.0], [12.0, 24.0, 36.0])
    >>> image = 0.1 + sum(
    ...     np.exp(-((cols - x - 0.3) ** 2 + (rows - y + 0.2) ** 2) / (2 * 2.0**2))
    ...     for x, y in zip(x0.ravel(), y0.ravel())
    ... )
    >>> x, y, s = refine_positions_atomap(image, x0.ravel(), y0.ravel(), sigma_px=1.5)
    >>> print(round(x[4] - 24, 2), round(y[4] - 24, 2), round(s[4], 1))
    0.3 -0.2 1.8

    The centre is exact; the sigma (true 2.0 px) comes out low because atomap subtracts the
    lowest value inside the mask before fitting a Gaussian without an offset.
    """
    data = np.asarray(image, dtype=np.float64)
    if data.ndim != 2:
        raise ValueError(f"image must be 2-D, got shape {data.shape}")
    x = np.asarray(x_px, dtype=np.float64).ravel()
    y = np.asarray(y_px, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x_px and y_px differ in length: {x.size} and {y.size}")
    if x.size == 0:
        empty = np.empty(0, dtype=np.float64)
        return empty, empty.copy(), empty.copy()
    if mask_radius_px is None and x.size < 2:
        raise ValueError("one column has no nearest neighbour to size its mask: give mask_radius_px")

    am = _import_atomap()
    sublattice = am.Sublattice(np.column_stack([x, y]), image=data)
    if sigma_px is not None:
        for atom in sublattice.atom_list:
            atom.sigma_x = atom.sigma_y = float(sigma_px)
    if mask_radius_px is None:
        sublattice.find_nearest_neighbors(nearest_neighbors=min(9, x.size))
        com_kwargs = {"percent_to_nn": _COM_PERCENT_TO_NN}
        fit_kwargs = {"percent_to_nn": float(percent_to_nn)}
    else:
        com_kwargs = fit_kwargs = {"mask_radius": float(mask_radius_px)}
    sublattice.refine_atom_positions_using_center_of_mass(show_progressbar=False, **com_kwargs)
    sublattice.refine_atom_positions_using_2d_gaussian(show_progressbar=False, **fit_kwargs)

    fitted = np.array([atom._gaussian_fitted for atom in sublattice.atom_list], dtype=bool)
    sigma = np.where(fitted, np.asarray(sublattice.sigma_average, dtype=np.float64), np.nan)
    return (
        np.asarray(sublattice.x_position, dtype=np.float64),
        np.asarray(sublattice.y_position, dtype=np.float64),
        sigma,
    )
