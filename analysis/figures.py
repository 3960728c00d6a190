"""Conventions every figure of the project shares.

Labelled colour bars, clipped score scales, the polarization colour wheel with its magnitude,
legible tile numbers and panels that say why they are empty.

Units are written as a microscopist reads them (``Å``, ``e⁻/Å²``, ``pm``), never ``A^2``; the
constants below are the one spelling. Matplotlib is the plotting library (a dependency already);
these helpers only fix the conventions, so each figure module keeps its own panels.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.colors as mcolors
import matplotlib.patheffects as path_effects
import numpy as np
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colorbar import Colorbar
from matplotlib.figure import Figure
from matplotlib.text import Text

ANGSTROM = "Å"
DOSE_UNIT = "e⁻/Å²"
SCORE_UNIT = "RMS z"
"""A node's anomaly score: root mean square of its standardised reconstruction errors (about 1
on normal lattice), :mod:`agent.anomaly`."""


def pixel_size_label(pixel_size_nm: float) -> str:
    """A pixel size as microscopists write it: ``'0.2 Å/px'``.

    Parameters
    ----------
    pixel_size_nm : float
        Pixel size, nanometres.

    Examples
    --------
    >>> pixel_size_label(0.02)
    '0.2 Å/px'
    """
    return f"{pixel_size_nm * 10:.3g} {ANGSTROM}/px"


def labelled_colorbar(
    figure: Figure,
    mappable: ScalarMappable,
    ax: Axes,
    quantity: str,
    unit: str | None = None,
    *,
    extend: str = "neither",
) -> Colorbar:
    """A colour bar beside ``ax`` labelled with its quantity and unit.

    Parameters
    ----------
    figure : matplotlib.figure.Figure
        Figure holding ``ax``.
    mappable : matplotlib.cm.ScalarMappable
        What the bar explains (an image or a scatter).
    ax : matplotlib.axes.Axes
        Axes the bar sits beside.
    quantity : str
        What the colour measures, e.g. ``"HAADF intensity"``.
    unit : str, optional
        Its unit, e.g. ``"counts"``; None for a quantity that says its own scale.
    extend : {'neither', 'min', 'max', 'both'}
        Draw an arrow end where values beyond the scale were clipped.

    Returns
    -------
    matplotlib.colorbar.Colorbar
        The bar.
    """
    label = f"{quantity} ({unit})" if unit else quantity
    return figure.colorbar(mappable, ax=ax, label=label, extend=extend, fraction=0.046, pad=0.02)


def clipped_norm(
    values: np.ndarray,
    *,
    floor: float | None = 0.0,
    percentile: float = 99.0,
    at_least: float | None = None,
    at_most: float | None = None,
) -> tuple[mcolors.Normalize, str]:
    """A colour scale clipped at a high percentile, so one hot patch does not black out the rest.

    Parameters
    ----------
    values : numpy.ndarray
        The values the scale will show (NaN ignored).
    floor : float or None
        Bottom of the scale; None takes the 1st percentile.
    percentile : float
        Top of the scale, as a percentile of the finite values.
    at_least : float, optional
        The top is never below this (a detection threshold stays inside the scale).
    at_most : float, optional
        The top is never above this (normal values keep a visible colour when most of the
        values lie far out).

    Returns
    -------
    norm : matplotlib.colors.Normalize
        The scale.
    extend : str
        ``'max'`` when some values lie above the top (for :func:`labelled_colorbar`), else
        ``'neither'``.

    Examples
    --------
    >>> scores = np.r_[np.ones(999), 500.0]
    >>> norm, extend = clipped_norm(scores, at_least=3.0)
    >>> float(norm.vmax), extend
    (3.0, 'max')
    """
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return mcolors.Normalize(0.0, 1.0), "neither"
    low = float(np.percentile(finite, 1.0)) if floor is None else floor
    high = float(np.percentile(finite, percentile))
    if at_most is not None:
        high = min(high, at_most)
    if at_least is not None:
        high = max(high, at_least)
    if high <= low:
        high = low + 1.0
    return mcolors.Normalize(low, high), ("max" if finite.max() > high else "neither")


def vector_rgb(dx: np.ndarray, dy: np.ndarray, scale: float) -> np.ndarray:
    """Colour-wheel image of a vector field: hue = direction, brightness = length / ``scale``.

    Parameters
    ----------
    dx, dy : numpy.ndarray
        Vector components (any unit; NaN draws black).
    scale : float
        Length drawn at full brightness, same unit as ``dx``; longer vectors saturate.

    Returns
    -------
    numpy.ndarray
        ``(..., 3)`` RGB in [0, 1].
    """
    hue = (np.arctan2(dy, dx) / (2 * np.pi)) % 1.0
    value = np.clip(np.hypot(dx, dy) / max(scale, 1e-12), 0, 1)
    hsv = np.stack([np.nan_to_num(hue), np.full_like(hue, 0.85), np.nan_to_num(value)], axis=-1)
    return mcolors.hsv_to_rgb(hsv)


def colour_wheel_key(ax: Axes, scale: float, unit: str, *, y_down: bool = True) -> Axes:
    """The key of a :func:`vector_rgb` map, inset in the upper right: direction and magnitude.

    The rim of the wheel is ``scale`` (written under it with its unit); the centre is zero.

    Parameters
    ----------
    ax : matplotlib.axes.Axes
        The map's axes.
    scale : float
        Length at full brightness (the rim), in ``unit``.
    unit : str
        Unit of the vector length, e.g. ``"pm"``; empty for a field in its own units.
    y_down : bool
        The map's y axis points down (images); the wheel is drawn the same way so a hue points
        the way it does on the map.

    Returns
    -------
    matplotlib.axes.Axes
        The inset.
    """
    inset = ax.inset_axes((0.78, 0.74, 0.2, 0.2))
    yy, xx = np.mgrid[-1:1:96j, -1:1:96j]
    wheel = vector_rgb(xx, yy, 1.0)
    wheel[np.hypot(xx, yy) > 1] = 1.0
    inset.imshow(wheel, extent=(-1, 1, 1, -1) if y_down else (-1, 1, -1, 1), origin="upper")
    inset.set_axis_off()
    outline = [path_effects.withStroke(linewidth=2, foreground="white")]
    inset.text(
        0.5, -0.05, f"rim {scale:.3g} {unit}".rstrip(), transform=inset.transAxes, ha="center", va="top",
        fontsize=8, path_effects=outline,
    )  # fmt: skip
    return inset


def tile_numbers(
    ax: Axes, x_nm: Sequence[float], y_nm: Sequence[float], colours: Sequence[str], *, fontsize: float = 7
) -> list[Text]:
    """Number tiles 1, 2, ... at their centres, outlined in black so they read on any image.

    Parameters
    ----------
    ax : matplotlib.axes.Axes
        The map.
    x_nm, y_nm : sequence of float
        Tile centres, nanometres, in acquisition order.
    colours : sequence of str
        Colour of each number (e.g. start tiles in another colour).
    fontsize : float
        Font size, points.

    Returns
    -------
    list of matplotlib.text.Text
        The labels.
    """
    outline = [path_effects.withStroke(linewidth=1.8, foreground="black")]
    style = {"fontsize": fontsize, "ha": "center", "va": "center", "fontweight": "bold"}
    return [
        ax.text(x, y, str(number), color=colour, path_effects=outline, **style)
        for number, (x, y, colour) in enumerate(zip(x_nm, y_nm, colours, strict=True), start=1)
    ]


def empty_panel(ax: Axes, title: str, reason: str, *, width: int = 36) -> None:
    """A panel with nothing to show: its title, why it is empty, and no axes.

    Parameters
    ----------
    ax : matplotlib.axes.Axes
        The panel.
    title : str
        What the panel would show.
    reason : str
        Why it shows nothing, in a microscopist's words.
    width : int
        Characters per line of the wrapped reason.
    """
    ax.set_title(title)
    # Wrapped by hand: matplotlib's own wrap ignores the axes and runs into the next panel.
    text = textwrap.fill(reason, width=width)
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.3", fontsize=11)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_color("0.8")
