"""A one-page preview of a synthetic specimen: survey, ground truth, polarization, one tile."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.colors as mcolors
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D

from agent.driver import electrons_per_pixel
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


def _polarization_rgb(specimen: Specimen, cell_nm: float) -> np.ndarray:
    """Hue = direction, brightness = magnitude of the B-column displacement, on a grid."""
    cells = specimen.unit_cells()
    width, height = specimen.size_nm
    cols, rows = int(np.ceil(width / cell_nm)), int(np.ceil(height / cell_nm))
    col = np.clip((cells.center_nm[0] // cell_nm).astype(int), 0, cols - 1)
    row = np.clip((cells.center_nm[1] // cell_nm).astype(int), 0, rows - 1)
    flat = row * cols + col
    count = np.bincount(flat, minlength=rows * cols)
    dx = np.bincount(flat, cells.displacement_nm[0], rows * cols) / np.maximum(count, 1)
    dy = np.bincount(flat, cells.displacement_nm[1], rows * cols) / np.maximum(count, 1)
    hue = (np.arctan2(dy, dx) / (2 * np.pi)) % 1.0
    magnitude = np.hypot(dx, dy)
    value = np.clip(magnitude / max(specimen.config.polar_displacement_nm, 1e-9), 0, 1)
    hsv = np.stack([hue, np.full_like(hue, 0.85), value], axis=1).reshape(rows, cols, 3)
    return mcolors.hsv_to_rgb(hsv)


def write_preview(
    specimen: Specimen,
    config: SimulatorConfig,
    path: str | Path,
    *,
    survey_pixel_nm: float = 0.25,
    survey_dwell_us: float = 20.0,
    tile_pixel_nm: float = 0.02,
    tile_px: int = 256,
) -> Path:
    """Write a 2x2 PNG: survey, ground-truth overlay, polarization map, one atomic-resolution tile.

    Parameters
    ----------
    specimen : Specimen
        The specimen.
    config : SimulatorConfig
        Imaging and instrument parameters.
    path : str or pathlib.Path
        PNG to write.
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
    pathlib.Path
        The PNG written.
    """
    path = Path(path)
    width, height = specimen.size_nm
    extent = (0.0, width, height, 0.0)
    rng = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(3,)))
    survey = render_specimen_image(specimen, config, survey_pixel_nm, survey_dwell_us, rng)

    figure, axes = plt.subplots(2, 2, figsize=(12, 12), constrained_layout=True)
    ax = axes[0, 0]
    ax.imshow(survey, cmap="gray", extent=extent)
    ax.set_title(f"Survey, {survey_pixel_nm * 10:g} Å/px, {survey_dwell_us:g} µs dwell (HAADF counts)")

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
    ax.imshow(_polarization_rgb(specimen, 0.8), extent=extent, interpolation="nearest")
    ax.set_title("Polarization: B-column shift (hue = direction, brightness = size)")

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
    ax.imshow(tile, cmap="gray", extent=tile_extent)
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
    ax.set_title(f"Tile {tile_px}x{tile_px} px at {tile_pixel_nm * 10:g} Å/px with true columns")

    for ax in axes.flat:
        ax.set_xlabel("x (nm)")
        ax.set_ylabel("y (nm)")
    figure.suptitle(
        f"Synthetic Sm-BFO specimen, seed {specimen.seed}: {len(specimen):,} columns, "
        f"{len(specimen.features)} planted features"
    )
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path
