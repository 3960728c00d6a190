"""A one-page preview of a synthetic specimen: survey, ground truth, polarization, one tile.

It lives in :mod:`analysis` (not :mod:`simulator`) because it is a figure: it shares the
colour-bar, colour-wheel and unit conventions of :mod:`analysis.figures`.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D

from agent.driver import electrons_per_pixel
from analysis.figures import colour_wheel_key, labelled_colorbar, pixel_size_label, vector_rgb
from simulator.config import SimulatorConfig
from simulator.export import render_specimen_image
from simulator.imaging import add_detector_noise, render_expected_counts
from simulator.specimen import LABEL_CODE, LABELS, SITE_A, SITE_B, Specimen

LABEL_COLOURS: dict[str, str] = {
    "vacancy": "#e41a1c",
    "substitution": "#ff7f00",
    "dislocation_core": "#ffff33",
    "domain_wall": "#4daf4a",
    "strained": "#984ea3",
    "amorphous": "#a65628",
    "phase": "#377eb8",
}
"""Colour of each ground-truth label in figures (``normal`` is not drawn)."""


def polarization_grid(specimen: Specimen, cell_nm: float) -> tuple[np.ndarray, np.ndarray]:
    """True B-column displacement of the unit cells, averaged on a square grid.

    Parameters
    ----------
    specimen : Specimen
        The specimen (its ground-truth unit cells).
    cell_nm : float
        Grid cell edge, nanometres.

    Returns
    -------
    dx_pm, dy_pm : numpy.ndarray
        ``(rows, cols)`` mean displacement, picometres (0 where a cell holds no unit cell).
    """
    cells = specimen.unit_cells()
    width, height = specimen.size_nm
    cols, rows = int(np.ceil(width / cell_nm)), int(np.ceil(height / cell_nm))
    col = np.clip((cells.center_nm[0] // cell_nm).astype(int), 0, cols - 1)
    row = np.clip((cells.center_nm[1] // cell_nm).astype(int), 0, rows - 1)
    flat = row * cols + col
    count = np.maximum(np.bincount(flat, minlength=rows * cols), 1)
    dx = np.bincount(flat, cells.displacement_nm[0], rows * cols) / count
    dy = np.bincount(flat, cells.displacement_nm[1], rows * cols) / count
    return (1000 * dx).reshape(rows, cols), (1000 * dy).reshape(rows, cols)


def preview_figure(
    specimen: Specimen,
    config: SimulatorConfig,
    *,
    survey_pixel_nm: float = 0.25,
    survey_dwell_us: float = 20.0,
    tile_pixel_nm: float = 0.02,
    tile_px: int = 256,
) -> Path:
    """A 2x2 figure: survey, ground-truth overlay, polarization map, one atomic-resolution tile.

    Parameters
    ----------
    specimen : Specimen
        The specimen.
    config : SimulatorConfig
        Imaging and instrument parameters.
    survey_pixel_nm : float
        Pixel size of the survey panels, nanometres.
    survey_dwell_us : float
        Dwell per survey pixel, microseconds.
    tile_pixel_nm : float
        Pixel size of the high-resolution tile, nanometres.
    tile_px : int
        Edge of the high-resolution tile, pixels.

    Returns
    -------
    matplotlib.figure.Figure
        The figure (close it with ``plt.close`` when done).
    """
    width, height = specimen.size_nm
    extent = (0.0, width, height, 0.0)
    rng = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(3,)))
    survey = render_specimen_image(specimen, config, survey_pixel_nm, survey_dwell_us, rng)

    figure, axes = plt.subplots(2, 2, figsize=(12, 12), constrained_layout=True)
    ax = axes[0, 0]
    shown = ax.imshow(survey, cmap="gray", extent=extent)
    labelled_colorbar(figure, shown, ax, "HAADF intensity", "counts")
    ax.set_title(f"Survey, {pixel_size_label(survey_pixel_nm)}, {survey_dwell_us:g} µs dwell")

    ax = axes[0, 1]
    ax.imshow(survey, cmap="gray", extent=extent, alpha=0.6)
    handles = []
    for name, colour in LABEL_COLOURS.items():
        mask = specimen.label == LABEL_CODE[name]
        ax.scatter(specimen.x_nm[mask], specimen.y_nm[mask], s=0.3, c=colour, linewidths=0, rasterized=True)
        handles.append(Line2D([], [], marker="o", ls="", color=colour, label=f"{name} ({int(mask.sum())})"))
    vacancies = specimen.vacancies
    ax.scatter(vacancies["x_nm"], vacancies["y_nm"], s=12, marker="x", c="white", linewidths=0.8)
    handles.append(
        Line2D([], [], marker="x", ls="", color="black", label=f"vacant site ({vacancies['x_nm'].size})")
    )
    cores = np.array([f.center_nm for f in specimen.features if f.kind == "dislocation_core"]).reshape(-1, 2)
    ax.scatter(
        cores[:, 0],
        cores[:, 1],
        s=90,
        marker="*",
        c=LABEL_COLOURS["dislocation_core"],
        edgecolors="black",
        linewidths=0.6,
    )
    handles.append(
        Line2D(
            [],
            [],
            marker="*",
            ls="",
            color=LABEL_COLOURS["dislocation_core"],
            markeredgecolor="black",
            label=f"dislocation core ({len(cores)})",
        )
    )
    ax.legend(handles=handles, loc="lower right", fontsize=8, framealpha=0.8)
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_title("Ground truth: labelled columns")

    ax = axes[1, 0]
    dx_pm, dy_pm = polarization_grid(specimen, 0.8)
    rim_pm = 1000 * specimen.config.polar_displacement_nm
    ax.imshow(vector_rgb(dx_pm, dy_pm, rim_pm), extent=extent, interpolation="nearest")
    colour_wheel_key(ax, rim_pm, "pm")
    ax.set_title("Polarization: true B-column shift (hue = direction)")

    # The tile shows the dislocation core least cluttered by walls and amorphous material.
    half = 0.5 * tile_px * tile_pixel_nm
    centre = (0.5 * width, 0.5 * height)
    best = np.inf
    for feature in specimen.features:
        if feature.kind != "dislocation_core":
            continue
        x, y = feature.center_nm
        around = specimen.columns_in(x - half, x + half, y - half, y + half)
        clutter = np.count_nonzero(
            np.isin(specimen.label[around], [LABEL_CODE["amorphous"], LABEL_CODE["domain_wall"]])
        )
        if clutter < best:
            best, centre = clutter, feature.center_nm
    centre = (min(max(centre[0], half), width - half), min(max(centre[1], half), height - half))
    origin = (centre[0] - half + 0.5 * tile_pixel_nm, centre[1] - half + 0.5 * tile_pixel_nm)
    per_pixel = electrons_per_pixel(config.instrument.beam_current_pa, 4.0)
    rng = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(4,)))
    tile = add_detector_noise(
        render_expected_counts(
            specimen, origin, (tile_px, tile_px), tile_pixel_nm, per_pixel, config.imaging
        ),
        config.imaging,
        rng,
    )
    ax = axes[1, 1]
    tile_extent = (centre[0] - half, centre[0] + half, centre[1] + half, centre[1] - half)
    shown = ax.imshow(tile, cmap="gray", extent=tile_extent)
    labelled_colorbar(figure, shown, ax, "HAADF intensity", "counts")
    inside = specimen.columns_in(centre[0] - half, centre[0] + half, centre[1] - half, centre[1] + half)
    for site, colour, name in ((SITE_A, "#ff4040", "A (Bi/Sm)"), (SITE_B, "#40a0ff", "B (Fe)")):
        chosen = inside[specimen.site[inside] == site]
        ax.scatter(specimen.x_nm[chosen], specimen.y_nm[chosen], s=6, c=colour, label=name)
    flagged = inside[specimen.label[inside] != LABEL_CODE["normal"]]
    ax.scatter(
        specimen.x_nm[flagged],
        specimen.y_nm[flagged],
        s=40,
        facecolors="none",
        edgecolors="yellow",
        linewidths=0.8,
        label="labelled: " + ", ".join(sorted({LABELS[code] for code in specimen.label[flagged]}))
        if flagged.size
        else "labelled",
    )
    if best < np.inf:
        ax.scatter(
            [centre[0]],
            [centre[1]],
            s=200,
            marker="*",
            c=LABEL_COLOURS["dislocation_core"],
            edgecolors="black",
            linewidths=0.6,
            label="dislocation core",
        )
    ax.legend(loc="lower right", fontsize=8, framealpha=0.8)
    ax.set_title(f"Tile {tile_px}×{tile_px} px at {pixel_size_label(tile_pixel_nm)} with true columns")

    for ax in axes.flat:
        ax.set_xlabel("x (nm)")
        ax.set_ylabel("y (nm)")
    figure.suptitle(
        f"Synthetic Sm-BFO specimen, seed {specimen.seed}: {len(specimen):,} columns, "
        f"{len(specimen.features)} planted features"
    )
    return figure


def write_preview(specimen: Specimen, config: SimulatorConfig, path: str | Path) -> Path:
    """Write :func:`preview_figure` as a PNG.

    Parameters
    ----------
    specimen : Specimen
        The specimen.
    config : SimulatorConfig
        Imaging and instrument parameters.
    path : str or pathlib.Path
        PNG to write.

    Returns
    -------
    pathlib.Path
        The PNG written.
    """
    path = Path(path)
    figure = preview_figure(specimen, config)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path
