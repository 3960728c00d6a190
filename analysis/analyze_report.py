"""Figures, HTML report and JSON of a full-frame analysis (:mod:`analysis.analyze`).

``analysis.png`` is one multi-panel overview; ``report.html`` embeds it and one figure
per analysis (base64 PNGs, no external files) with the tables of ``analysis.json``,
which holds every number the figures and tables show.

Whole-image maps are drawn as grids of cells about one or two lattice spacings wide
(mean, maximum or majority per cell), which keeps a 4k image with 100k columns
readable and fast to draw; column-level panels show a central window of about
twelve spacings.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.colors as mcolors
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from agent.columns import SPECIES_A, SPECIES_B, SPECIES_O
from agent.materials import resolve_material
from agent.protocol.messages import jsonable
from analysis.analyze import DOMAIN_NAMES, FullFrameAnalysis
from analysis.figures import (
    SCORE_UNIT,
    clipped_norm,
    colour_wheel_key,
    empty_panel,
    labelled_colorbar,
    pixel_size_label,
    vector_rgb,
)

FIGURE_FILE = "analysis.png"
HTML_FILE = "report.html"
JSON_FILE = "analysis.json"

DOMAIN_COLOURS = ("#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#bbbbbb")
CLASS_CMAP = "tab10"
_SCATTER_LIMIT = 20000


# ----------------------------------------------------------------------------- gridding


def _grid(
    result: FullFrameAnalysis, cell_nm: float
) -> tuple[int, int, float, tuple[float, float, float, float]]:
    rows, cols = result.recorded.image.shape
    width, height = cols * result.pixel_size_nm, rows * result.pixel_size_nm
    # At most 400 cells a side: finer than the figure can show.
    cell = max(cell_nm, max(width, height) / 400)
    return math.ceil(height / cell), math.ceil(width / cell), cell, (0.0, width, height, 0.0)


def _cells(x: np.ndarray, y: np.ndarray, shape: tuple[int, int], cell: float) -> np.ndarray:
    row = np.clip((y // cell).astype(np.int64), 0, shape[0] - 1)
    col = np.clip((x // cell).astype(np.int64), 0, shape[1] - 1)
    return row * shape[1] + col


def binned_mean(
    x: np.ndarray, y: np.ndarray, values: np.ndarray, shape: tuple[int, int], cell: float
) -> np.ndarray:
    """Mean of ``values`` per grid cell (NaN where empty); positions and ``cell`` in nm."""
    flat = _cells(x, y, shape, cell)
    size = shape[0] * shape[1]
    count = np.bincount(flat, minlength=size)
    total = np.bincount(flat, values, minlength=size)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan).reshape(shape)


def binned_max(
    x: np.ndarray, y: np.ndarray, values: np.ndarray, shape: tuple[int, int], cell: float
) -> np.ndarray:
    """Largest of ``values`` per grid cell (NaN where empty)."""
    out = np.full(shape[0] * shape[1], -np.inf)
    np.maximum.at(out, _cells(x, y, shape, cell), values)
    return np.where(np.isfinite(out), out, np.nan).reshape(shape)


def binned_majority(
    x: np.ndarray, y: np.ndarray, labels: np.ndarray, classes: int, shape: tuple[int, int], cell: float
) -> np.ndarray:
    """Most frequent label (0..classes-1) per grid cell, -1 where empty."""
    flat = _cells(x, y, shape, cell)
    size = shape[0] * shape[1]
    counts = np.bincount(flat * classes + labels, minlength=size * classes).reshape(size, classes)
    return np.where(counts.sum(axis=1) > 0, counts.argmax(axis=1), -1).reshape(shape)


# ----------------------------------------------------------------------------- panels


def _window(result: FullFrameAnalysis) -> tuple[np.ndarray, tuple[float, float, float, float], np.ndarray]:
    """The column-level window: its image, its extent in nm and the ids of the columns inside."""
    assert result.stages is not None and result.columns is not None
    row0, col0 = result.window_origin_px
    side = result.stages.image.shape[0]
    p = result.pixel_size_nm
    extent = (col0 * p, (col0 + side) * p, (row0 + side) * p, row0 * p)
    columns = result.columns
    inside = np.flatnonzero(
        (columns.x_nm >= extent[0])
        & (columns.x_nm <= extent[1])
        & (columns.y_nm >= extent[3])
        & (columns.y_nm <= extent[2])
    )
    return result.stages.image, extent, inside


def panel_image(ax: Axes, result: FullFrameAnalysis) -> None:
    """The whole image (display-downsampled) with the column-level window outlined."""
    image = result.recorded.image
    step = max(1, max(image.shape) // 1024)
    shown = image[::step, ::step]
    rows, cols = image.shape
    p = result.pixel_size_nm
    low, high = np.percentile(shown, [0.5, 99.5])
    image_shown = ax.imshow(shown, cmap="gray", vmin=low, vmax=high, extent=(0, cols * p, rows * p, 0))
    labelled_colorbar(ax.figure, image_shown, ax, "HAADF intensity", "as recorded", extend="both")
    _, extent, _ = _window(result)
    ax.add_patch(
        plt.Rectangle(
            (extent[0], extent[3]),
            extent[1] - extent[0],
            extent[2] - extent[3],
            fill=False,
            edgecolor="#ffb000",
            linewidth=1.0,
        )
    )
    ax.set_title(f"Image {rows}×{cols} px, {pixel_size_label(p)} (orange: column window)")
    ax.set_xlabel("x (nm)")
    ax.set_ylabel("y (nm)")


def panel_stage(ax: Axes, result: FullFrameAnalysis, name: str) -> None:
    """One preprocessing stage of the window: raw, smoothed, floor or contrast (with candidates)."""
    stages = result.stages
    assert stages is not None
    _, extent, _ = _window(result)
    values = getattr(stages, name)
    shown = ax.imshow(values, cmap="gray" if name != "contrast" else "magma", extent=extent)
    quantity = "contrast over the floor" if name == "contrast" else "HAADF intensity"
    labelled_colorbar(ax.figure, shown, ax, quantity, "as recorded")
    if name == "contrast":
        p = result.pixel_size_nm
        ax.plot((stages.cols + 0.5) * p + extent[0], (stages.rows + 0.5) * p + extent[3], "c+", markersize=3)
        ax.set_title(f"Contrast over the floor; {stages.rows.size} candidates")
    else:
        titles = {
            "image": "Window as recorded",
            "smoothed": "Matched Gaussian filter",
            "floor": "Local floor between columns",
        }
        ax.set_title(titles[name])
    ax.set_xlabel("x (nm)")
    ax.set_ylabel("y (nm)")


def panel_columns(ax: Axes, result: FullFrameAnalysis) -> None:
    """Window with the found columns by species."""
    image, extent, inside = _window(result)
    columns = result.columns
    assert columns is not None
    ax.imshow(image, cmap="gray", extent=extent)
    material = resolve_material(result.config.material)
    for code, colour, role in (
        (SPECIES_A, "#ff8c00", "A"),
        (SPECIES_B, "#00d0ff", "B"),
        (SPECIES_O, "#b0ff60", "O"),
    ):
        members = inside[columns.species[inside] == code]
        name = f"{role} ({material.label(role)})" if role != "O" else "O"
        ax.scatter(columns.x_nm[members], columns.y_nm[members], s=6, c=colour, label=name, linewidths=0)
    abnormal = inside[columns.abnormal[inside]]
    if abnormal.size:
        ax.scatter(
            columns.x_nm[abnormal],
            columns.y_nm[abnormal],
            s=30,
            facecolors="none",
            edgecolors="r",
            label="abnormal intensity",
        )
    vacancies = columns.vacancies
    x_min, x_max, y_min, y_max = extent[0], extent[1], min(extent[2:]), max(extent[2:])
    shown = (vacancies.x_nm >= x_min) & (vacancies.x_nm <= x_max)
    shown &= (vacancies.y_nm >= y_min) & (vacancies.y_nm <= y_max)
    if shown.any():
        ax.scatter(
            vacancies.x_nm[shown], vacancies.y_nm[shown], s=40, marker="s", facecolors="none",
            edgecolors="m", label="vacancy site",
        )  # fmt: skip
    counts = columns.species_counts()
    ax.legend(loc="upper right", fontsize=6, markerscale=1.5)
    ax.set_title(
        f"Columns: {counts['A']:,} {material.label('A')}, {counts['B']:,} {material.label('B')}, "
        f"{counts['O']:,} O; {counts['A_vacancy'] + counts['B_vacancy']} vacancy sites"
    )
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.set_xlabel("x (nm)")
    ax.set_ylabel("y (nm)")


def panel_nn(ax: Axes, result: FullFrameAnalysis) -> None:
    """Nearest-neighbour (kNN edge) distance distributions per species pair."""
    distances = result.nn_distances_pm
    everything = np.concatenate([v for v in distances.values() if v.size]) if distances else np.zeros(0)
    if everything.size == 0:
        empty_panel(ax, "Nearest-neighbour distances", "no interior edges: too few columns were found")
        return
    bins = np.linspace(*np.percentile(everything, [0.5, 99.5]), 80)
    for pair, values in distances.items():
        if values.size:
            ax.hist(
                values,
                bins=bins,
                histtype="step",
                label=f"{pair} ({values.size:,}, median {np.median(values):.0f} pm)",
            )
    ax.set_xlabel("distance (pm)")
    ax.set_ylabel("edges")
    ax.legend(fontsize=6)
    ax.set_title("Distances to the 4 nearest columns of each species")


def _polar_scale(values: np.ndarray) -> float:
    # The 95th percentile, so a few large shifts at walls do not dim every domain.
    finite = values[np.isfinite(values)]
    return float(np.percentile(finite, 95)) if finite.size else 1.0


def panel_polarization(ax: Axes, result: FullFrameAnalysis) -> None:
    """Measured B-column shift per cell as a colour wheel (hue direction, brightness length)."""
    graph, polar = result.graph, result.polarization
    assert graph is not None and polar is not None
    spacing = graph.lattice_spacing_nm
    rows, cols, cell, extent = _grid(result, spacing)
    v = polar.valid
    dx = binned_mean(graph.x_nm[v], graph.y_nm[v], polar.displacement_pm[v, 0], (rows, cols), cell)
    dy = binned_mean(graph.x_nm[v], graph.y_nm[v], polar.displacement_pm[v, 1], (rows, cols), cell)
    rim_pm = _polar_scale(np.hypot(dx, dy))
    ax.imshow(vector_rgb(dx, dy, rim_pm), extent=extent, interpolation="nearest")
    ax.set_title("Polarization: B shift from A-cell centre (measured)")
    colour_wheel_key(ax, rim_pm, "pm")
    ax.set_xlabel("x (nm)")
    ax.set_ylabel("y (nm)")


def panel_dataset_pxy(ax: Axes, result: FullFrameAnalysis) -> None:
    """The dataset's own Pxy per cell, same colour wheel."""
    polar = result.polarization
    assert polar is not None and polar.dataset is not None
    rows, cols, cell, extent = _grid(result, result.graph.lattice_spacing_nm if result.graph else 1.0)
    data = polar.dataset
    pxy = data["dataset_pxy_all"]
    dx = binned_mean(data["cell_x_nm"], data["cell_y_nm"], pxy[:, 0], (rows, cols), cell)
    dy = binned_mean(data["cell_x_nm"], data["cell_y_nm"], pxy[:, 1], (rows, cols), cell)
    rim = _polar_scale(np.hypot(dx, dy))
    ax.imshow(vector_rgb(dx, dy, rim), extent=extent, interpolation="nearest")
    agreement = data["agreement"]
    ax.set_title(
        f"Dataset Pxy ({data['matched']:,}/{data['cells']:,} cells matched; "
        f"r = {agreement['corr_x']:.2f}, {agreement['corr_y']:.2f})",
        fontsize=9,
    )
    # The dataset's Pxy has its own unit (not stated in the files), so the rim says only the value.
    colour_wheel_key(ax, rim, "")
    ax.set_xlabel("x (nm)")
    ax.set_ylabel("y (nm)")


def panel_domains(ax: Axes, result: FullFrameAnalysis) -> None:
    """Domain class per cell (majority of the smoothed B shifts)."""
    graph, polar = result.graph, result.polarization
    assert graph is not None and polar is not None
    rows, cols, cell, extent = _grid(result, 2 * graph.lattice_spacing_nm)
    v = polar.domain >= 0
    majority = binned_majority(
        graph.x_nm[v], graph.y_nm[v], polar.domain[v], len(DOMAIN_NAMES), (rows, cols), cell
    )
    colours = mcolors.ListedColormap(["white", *DOMAIN_COLOURS])
    ax.imshow(
        majority + 1, cmap=colours, vmin=0, vmax=len(DOMAIN_NAMES), extent=extent, interpolation="nearest"
    )
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in DOMAIN_COLOURS]
    ax.legend(handles, DOMAIN_NAMES, fontsize=6, loc="lower right", title="lattice frame", title_fontsize=6)
    ax.set_title(f"Domains (lattice at {polar.lattice_orientation_deg:.1f}°)")
    ax.set_xlabel("x (nm)")
    ax.set_ylabel("y (nm)")


def _class_legend(ax: Axes, classes: dict[int, str], title: str) -> None:
    """Legend of tab10 class colours: ``{class: text}``, in the order given."""
    cmap = plt.get_cmap(CLASS_CMAP)
    handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(code % 10)) for code in classes]
    ax.legend(
        handles, list(classes.values()), fontsize=7, loc="lower right", title=title, title_fontsize=7,
        framealpha=0.85,
    )  # fmt: skip


def panel_classes(ax: Axes, result: FullFrameAnalysis, which: str) -> None:
    """GMM or VAE class of each column in the window."""
    image, extent, inside = _window(result)
    segmentation, columns = result.segmentation, result.columns
    assert segmentation is not None and columns is not None
    labels = segmentation.gmm_class if which == "gmm" else segmentation.vae_class
    ax.imshow(image, cmap="gray", extent=extent)
    ax.scatter(
        columns.x_nm[inside],
        columns.y_nm[inside],
        c=labels[inside],
        cmap=CLASS_CMAP,
        vmin=0,
        vmax=9,
        s=10,
        linewidths=0,
    )
    fractions = np.bincount(labels, minlength=segmentation.classes) / labels.size
    _class_legend(
        ax, {code: f"class {code}: {f:.0%}" for code, f in enumerate(fractions)}, "share of all columns"
    )
    ax.set_title(f"{which.upper()} classes of the column patches ({segmentation.classes} classes)")
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.set_xlabel("x (nm)")
    ax.set_ylabel("y (nm)")


def _sample(count: int, limit: int = _SCATTER_LIMIT) -> np.ndarray:
    return np.sort(np.random.default_rng(0).permutation(count)[:limit]) if count > limit else np.arange(count)


def panel_latent(ax: Axes, result: FullFrameAnalysis) -> None:
    """VAE latent space of the column patches, coloured by VAE class."""
    segmentation = result.segmentation
    assert segmentation is not None
    pick = _sample(segmentation.vae_latent.shape[0])
    ax.scatter(
        *segmentation.vae_latent[pick].T,
        c=segmentation.vae_class[pick],
        cmap=CLASS_CMAP,
        vmin=0,
        vmax=9,
        s=2,
        linewidths=0,
        rasterized=True,
    )
    fractions = np.bincount(segmentation.vae_class, minlength=segmentation.classes)
    fractions = fractions / max(fractions.sum(), 1)
    _class_legend(ax, {code: f"class {code}: {f:.0%}" for code, f in enumerate(fractions)}, "VAE class")
    ax.set_xlabel("latent 1 (standard units)")
    ax.set_ylabel("latent 2 (standard units)")
    ax.set_title("VAE latent space of column patches")


def _cluster_shares(clusters: np.ndarray, largest: int = 8) -> dict[int, str]:
    """Legend text of the largest clusters: ``{cluster: 'cluster 3: 12%'}`` (noise is grey)."""
    labels, counts = np.unique(clusters[clusters >= 0], return_counts=True)
    order = np.argsort(counts)[::-1][:largest]
    return {int(labels[i]): f"cluster {int(labels[i])}: {counts[i] / clusters.size:.0%}" for i in order}


def panel_projection(ax: Axes, result: FullFrameAnalysis) -> None:
    """GAE embeddings projected to 2-D, coloured by cluster (grey: noise)."""
    assert (
        result.projection is not None and result.projection_nodes is not None and result.clusters is not None
    )
    pick = _sample(result.projection_nodes.size)
    labels = result.clusters[result.projection_nodes[pick]]
    noise = labels < 0
    ax.scatter(*result.projection[pick][noise].T, c="#cccccc", s=2, linewidths=0, rasterized=True)
    ax.scatter(
        *result.projection[pick][~noise].T,
        c=labels[~noise] % 10,
        cmap=CLASS_CMAP,
        vmin=0,
        vmax=9,
        s=2,
        linewidths=0,
        rasterized=True,
    )
    # A few strongly anomalous nodes sit far out; zoom on the bulk so the clusters are visible.
    low, high = np.percentile(result.projection[pick], [0.5, 99.5], axis=0)
    margin = 0.1 * (high - low)
    ax.set_xlim(low[0] - margin[0], high[0] + margin[0])
    ax.set_ylim(low[1] - margin[1], high[1] + margin[1])
    clusters = int(np.unique(result.clusters[result.clusters >= 0]).size)
    name = result.config.embedding.upper() if result.config.embedding == "pca" else "t-SNE"
    ax.set_xlabel(f"{name} component 1")
    ax.set_ylabel(f"{name} component 2")
    shares = _cluster_shares(result.clusters)
    _class_legend(ax, shares, "cluster: share of columns")
    ax.set_title(
        f"GAE embeddings ({name}); {clusters} {result.config.clustering.upper()} clusters", fontsize=9
    )


def panel_cluster_map(ax: Axes, result: FullFrameAnalysis) -> None:
    """Where the minor embedding clusters lie: majority minor cluster per cell.

    The largest cluster of each species is the bulk lattice; every cell holds both species, so
    a plain majority map would only flicker between them. Cells with bulk or noise nodes only
    stay white.
    """
    graph, clusters = result.graph, result.clusters
    assert graph is not None and clusters is not None
    rows, cols, cell, extent = _grid(result, 2 * graph.lattice_spacing_nm)
    bulk = set()
    for code in (SPECIES_A, SPECIES_B):
        labels, counts = np.unique(clusters[(graph.species == code) & (clusters >= 0)], return_counts=True)
        if labels.size:
            bulk.add(int(labels[np.argmax(counts)]))
    minor = (clusters >= 0) & ~np.isin(clusters, list(bulk))
    shown = np.full((rows, cols), np.nan)
    if minor.any():
        classes = int(clusters.max()) + 1
        majority = binned_majority(
            graph.x_nm[minor], graph.y_nm[minor], clusters[minor], classes, (rows, cols), cell
        )
        shown = np.where(majority >= 0, majority % 10, np.nan)
    ax.imshow(shown, cmap=CLASS_CMAP, vmin=0, vmax=9, extent=extent, interpolation="nearest")
    minor_shares = {code: text for code, text in _cluster_shares(clusters).items() if code not in bulk}
    if minor_shares:
        _class_legend(ax, minor_shares, "minor cluster: share")
    ax.set_xlabel("x (nm)")
    ax.set_ylabel("y (nm)")
    ax.set_title(
        f"Minor embedding clusters on the image ({int(minor.sum()):,} columns; "
        f"bulk A/B clusters {sorted(bulk)} and noise white)",
        fontsize=9,
    )


def panel_anomaly(ax: Axes, result: FullFrameAnalysis, figure: Figure) -> None:
    """Largest node anomaly score per cell, with the hot spots circled."""
    graph, scores = result.graph, result.scores
    assert graph is not None and scores is not None
    rows, cols, cell, extent = _grid(result, 2 * graph.lattice_spacing_nm)
    shown = np.where(graph.interior, scores, 0.0)
    grid = binned_max(graph.x_nm, graph.y_nm, shown, (rows, cols), cell)
    threshold = result.config.anomaly_threshold
    norm, clipped = clipped_norm(grid, percentile=99.5, at_least=threshold, at_most=3 * threshold)
    image = ax.imshow(grid, cmap="inferno", norm=norm, extent=extent, interpolation="nearest")
    bar = labelled_colorbar(
        figure, image, ax, "largest node anomaly score per cell", SCORE_UNIT, extend=clipped
    )
    bar.ax.axhline(threshold, color="#00c0ff", linewidth=1.5)
    for spot in result.summary.get("anomaly", {}).get("hotspots", []):
        ax.add_patch(
            plt.Circle(
                (spot["x_nm"], spot["y_nm"]),
                4 * graph.lattice_spacing_nm,
                fill=False,
                edgecolor="#00ff80",
                linewidth=0.8,
            )
        )
    anomaly = result.summary.get("anomaly", {})
    ax.set_title(
        f"Anomaly map: {anomaly.get('anomalous_columns', 0):,} columns above "
        f"{threshold:g} (blue line); {len(anomaly.get('hotspots', []))} hot spots circled",
        fontsize=9,
    )
    ax.set_xlabel("x (nm)")
    ax.set_ylabel("y (nm)")


# ----------------------------------------------------------------------------- figures


def _polar(result: FullFrameAnalysis) -> bool:
    return resolve_material(result.config.material).polar


def panel_not_polar(ax: Axes, result: FullFrameAnalysis) -> None:
    """Why a non-polar material has no polarization or domain maps."""
    material = resolve_material(result.config.material)
    empty_panel(
        ax,
        "Polarization",
        f"{material.formula} {material.zone_axis} is not polar: no polarization or domain maps",
    )


def panel_vacancies(ax: Axes, result: FullFrameAnalysis) -> None:
    """Vacancy sites over the whole image, coloured by site, sized by confidence."""
    columns = result.columns
    assert columns is not None
    vacancies = columns.vacancies
    rows, cols = result.recorded.image.shape
    p = result.pixel_size_nm
    ax.imshow(result.recorded.image, cmap="gray", extent=(0, cols * p, rows * p, 0))
    material = resolve_material(result.config.material)
    for code, colour, role in ((SPECIES_A, "#ff8c00", "A"), (SPECIES_B, "#00d0ff", "B")):
        members = vacancies.species == code
        ax.scatter(
            vacancies.x_nm[members], vacancies.y_nm[members], s=10 + 30 * vacancies.confidence[members],
            facecolors="none", edgecolors=colour, label=f"{material.label(role)} site",
        )  # fmt: skip
    ax.legend(loc="upper right", fontsize=6)
    ax.set_title(f"Vacancy sites ({len(vacancies)}; marker size: confidence)")
    ax.set_xlabel("x (nm)")
    ax.set_ylabel("y (nm)")


def overview_figure(result: FullFrameAnalysis) -> Figure:
    """The one-page overview (``analysis.png``): a 3 x 4 grid of every analysis.

    Parameters
    ----------
    result : FullFrameAnalysis
        A finished analysis with its :attr:`~FullFrameAnalysis.summary`.

    Returns
    -------
    matplotlib.figure.Figure
        The figure (close it with ``plt.close`` when done).
    """
    figure, axes = plt.subplots(3, 4, figsize=(22, 16), constrained_layout=True)
    panel_image(axes[0, 0], result)
    panel_stage(axes[0, 1], result, "contrast")
    panel_columns(axes[0, 2], result)
    panel_nn(axes[0, 3], result)
    assert result.polarization is not None
    if _polar(result):
        panel_polarization(axes[1, 0], result)
        if result.polarization.dataset is not None:
            panel_dataset_pxy(axes[1, 1], result)
        else:
            panel_cluster_map(axes[1, 1], result)
        panel_domains(axes[1, 2], result)
    else:
        panel_not_polar(axes[1, 0], result)
        panel_cluster_map(axes[1, 1], result)
        panel_vacancies(axes[1, 2], result)
    panel_classes(axes[1, 3], result, "gmm")
    panel_classes(axes[2, 0], result, "vae")
    panel_latent(axes[2, 1], result)
    panel_projection(axes[2, 2], result)
    panel_anomaly(axes[2, 3], result, figure)
    figure.suptitle(f"Full-frame analysis of {result.recorded.source.name}")
    return figure


def section_figures(result: FullFrameAnalysis) -> dict[str, Figure]:
    """One figure per section of ``report.html``, by section title.

    Parameters
    ----------
    result : FullFrameAnalysis
        A finished analysis with its :attr:`~FullFrameAnalysis.summary`.

    Returns
    -------
    dict of str to matplotlib.figure.Figure
        The figures (close them when done).
    """
    figures: dict[str, Figure] = {}
    figure, axes = plt.subplots(1, 4, figsize=(18, 4.8), constrained_layout=True)
    for ax, name in zip(axes, ("image", "smoothed", "floor", "contrast"), strict=True):
        panel_stage(ax, result, name)
    figures["Preprocessing stages"] = figure

    figure, axes = plt.subplots(1, 3, figsize=(16, 5), constrained_layout=True)
    panel_image(axes[0], result)
    panel_columns(axes[1], result)
    panel_nn(axes[2], result)
    figures["Columns and nearest-neighbour distances"] = figure

    assert result.polarization is not None
    if _polar(result):
        with_dataset = result.polarization.dataset is not None
        figure, axes = plt.subplots(
            1, 3 if with_dataset else 2, figsize=(17 if with_dataset else 11.5, 5.5), constrained_layout=True
        )
        panel_polarization(axes[0], result)
        if with_dataset:
            panel_dataset_pxy(axes[1], result)
        panel_domains(axes[-1], result)
        figures["Polarization and domains"] = figure

    figure, axes = plt.subplots(1, 3, figsize=(17, 5.2), constrained_layout=True)
    panel_classes(axes[0], result, "gmm")
    panel_classes(axes[1], result, "vae")
    panel_latent(axes[2], result)
    figures["GMM versus VAE segmentation"] = figure

    figure, axes = plt.subplots(1, 3, figsize=(17, 5.2), constrained_layout=True)
    panel_projection(axes[0], result)
    panel_cluster_map(axes[1], result)
    panel_anomaly(axes[2], result, figure)
    figures["Graph-autoencoder embeddings, clusters and anomaly map"] = figure
    return figures


def _png_bytes(figure: Figure, dpi: int = 80) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    plt.close(figure)
    return buffer.getvalue()


# ----------------------------------------------------------------------------- HTML and JSON


def write_json(summary: dict[str, Any], path: str | Path) -> Path:
    """Write the summary as indented JSON (NaN and infinities become null)."""
    path = Path(path)
    path.write_text(json.dumps(jsonable(summary), indent=2) + "\n", encoding="utf-8")
    return path


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p>none</p>"
    keys = list(dict.fromkeys(key for row in rows for key in row))

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return html.escape(str(value))

    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join(
        "<tr>" + "".join(f"<td>{cell(row.get(k, ''))}</td>" for k in keys) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _flat_rows(section: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"quantity": key, "value": value}
        for key, value in section.items()
        if not isinstance(value, dict | list)
    ]


def render_html(summary: dict[str, Any], overview_png: bytes, sections: dict[str, bytes]) -> str:
    """The self-contained HTML report: the figures as base64 PNGs and the tables of the summary."""

    def img(data: bytes, alt: str) -> str:
        return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'

    image = summary["image"]
    columns = summary["columns"]
    labels = summary["material"]["labels"]
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>Micrography analysis: {html.escape(Path(image['source']).name)}</title>",
        "<style>body{font-family:sans-serif;max-width:1500px;margin:auto;padding:1em}"
        "img{max-width:100%}table{border-collapse:collapse;margin:0.5em 0}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}</style></head><body>",
        f"<h1>Full-frame analysis of {html.escape(image['source'])}</h1>",
        f"<p>{html.escape(summary['material']['name'])}: {image['shape_px'][0]} x {image['shape_px'][1]} px "
        f"at {image['pixel_size_nm']:g} nm/px; {columns['total']:,} columns "
        f"({columns['counts']['A']:,} {html.escape(labels['A'])}, {columns['counts']['B']:,} "
        f"{html.escape(labels['B'])}; {columns['counts']['O']:,} O columns besides), "
        f"A-A spacing {columns['lattice_spacing_nm'] * 1e3:.1f} pm. Total time "
        f"{summary['timings_s'].get('total', float('nan')):.1f} s, "
        f"peak memory {summary['peak_memory_mb']:.0f} MB.</p>",
        "<h2>Overview</h2>",
        img(overview_png, "overview"),
        "<h2>Columns</h2>",
        _table(
            _flat_rows(columns)
            + [{"quantity": f"fraction {k}", "value": v} for k, v in columns["fractions"].items()]
        ),
        "<h2>Nearest-neighbour distances (pm)</h2>",
        _table([{"pair": pair, **stats} for pair, stats in summary["nn_distances_pm"].items()]),
        "<p>The write-up's statistic, lengths of the K = 4 nearest-neighbour edges of the graph:</p>",
        _table([{"pair": pair, **stats} for pair, stats in summary["knn_edge_distances_pm"].items()]),
    ]
    if "skipped" in summary["polarization"]:
        parts.append(f"<p>{html.escape(summary['polarization']['skipped'])}.</p>")
    tables = {
        "Polarization and domains": _table(_flat_rows(summary["polarization"]))
        + _table(summary["polarization"].get("domains", []))
        + (
            _table(_flat_rows(summary["polarization"]["dataset_pxy"]))
            if "dataset_pxy" in summary["polarization"]
            else ""
        ),
        "GMM versus VAE segmentation": _table(_flat_rows(summary["segmentation"]))
        + "<h3>GMM classes</h3>"
        + _table(summary["segmentation"]["gmm"])
        + "<h3>VAE classes</h3>"
        + _table(summary["segmentation"]["vae"]),
        "Graph-autoencoder embeddings, clusters and anomaly map": _table(_flat_rows(summary["embedding"]))
        + _table(summary["embedding"]["table"][:20])
        + "<h3>Anomaly</h3>"
        + _table(_flat_rows(summary["anomaly"]) + _flat_rows(summary["anomaly"]["score"]))
        + "<h3>Hot spots</h3>"
        + _table(summary["anomaly"]["hotspots"]),
    }
    for title, data in sections.items():
        parts += [f"<h2>{html.escape(title)}</h2>", img(data, title), tables.get(title, "")]
    parts += [
        "<h2>Timings (s) and memory</h2>",
        _table([{"stage": k, "seconds": v} for k, v in summary["timings_s"].items()]),
        f"<p>Peak resident memory: {summary['peak_memory_mb']:.0f} MB.</p></body></html>",
    ]
    return "\n".join(parts)


def write_outputs(result: FullFrameAnalysis, out_dir: str | Path) -> tuple[Path, Path, Path]:
    """Write ``analysis.png``, ``report.html`` and ``analysis.json`` into ``out_dir``.

    Parameters
    ----------
    result : FullFrameAnalysis
        A finished analysis with its :attr:`~FullFrameAnalysis.summary`.
    out_dir : str or pathlib.Path
        Output folder, created if needed.

    Returns
    -------
    tuple of pathlib.Path
        The PNG, HTML and JSON paths.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    overview = _png_bytes(overview_figure(result), dpi=80)
    figure_path = out_dir / FIGURE_FILE
    figure_path.write_bytes(overview)
    sections = {title: _png_bytes(figure) for title, figure in section_figures(result).items()}
    html_path = out_dir / HTML_FILE
    html_path.write_text(render_html(result.summary, overview, sections), encoding="utf-8")
    json_path = write_json(result.summary, out_dir / JSON_FILE)
    return figure_path, html_path, json_path
