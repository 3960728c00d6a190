"""Full-frame analysis of one large image: ``micrography analyze IMAGE``.

The research write-up's analyses, productised, on a whole recorded image (the Sm-BFO
dataset layout, ``.npy``, ``.tif`` or a vendor file through the optional ``vendor``
extra):

1. preprocessing stages of the column finder (on a window, for the figure);
2. atomic columns with their species (:func:`agent.columns.find_columns_in_image`);
3. the molecule graph and nearest-neighbour distances per species pair;
4. polarization from the B-column shift (:func:`agent.graph.b_site_displacement`),
   smoothed over a few cells and sorted into domains by direction in the lattice
   frame; for the Sm-BFO layout compared cell by cell with the dataset's own ``Pxy``;
5. GMM versus VAE segmentation of column-centred patches (:mod:`analysis.segmentation`);
6. graph-autoencoder scores and embeddings (fitted on the image's own graph, without
   labels, unless a checkpoint is given), PCA or t-SNE projections and DBSCAN/HDBSCAN
   clusters of the embeddings;
7. the anomaly map and its hot spots.

Positions are in nanometres measured from the image's top-left corner (pixel
``(row, col)`` is centred on ``((col + 0.5) p, (row + 0.5) p)`` for pixel size ``p``,
the frame of ``micrography simulate``'s output). :func:`run_analysis` writes the
figure, the HTML report and the JSON (:mod:`analysis.analyze_report`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field
from scipy.spatial import cKDTree

from agent.benchmarking import peak_memory_mb
from agent.column_table import column_table, vacancy_table, write_tables
from agent.columns import (
    SPECIES_A,
    SPECIES_B,
    ColumnFinderConfig,
    Columns,
    PreprocessingStages,
    check_pixel_size,
    estimate_pixel_size,
    find_columns_in_image,
    preprocessing_stages,
)
from agent.config import StrictModel
from agent.domains import smooth_displacement
from agent.errors import ConfigError, InvalidImageError
from agent.graph import (
    GraphConfig,
    MoleculeGraph,
    b_site_displacement,
    nn_distances_by_pair,
    nn_distances_by_species,
)
from agent.materials import DEFAULT_MATERIAL, Material, resolve_material
from analysis.segmentation import Segmentation, column_patches, segment_patches
from simulator.dataset import RecordedImage, UnitCellParameters, load_image

DOMAIN_NAMES: tuple[str, ...] = ("+x+y", "-x+y", "-x-y", "+x-y", "non-polar")
"""Domain classes: the quadrant of the smoothed B shift in the lattice frame (x along the
lattice's first axis, y along its second, image rows pointing down), or non-polar."""
NON_POLAR = len(DOMAIN_NAMES) - 1

STAGES: tuple[str, ...] = (
    "load",
    "preprocessing",
    "columns",
    "graph",
    "polarization",
    "segmentation",
    "autoencoder",
    "embedding",
    "report",
)
"""The timed stages of an analysis, in order."""


class AnalyzeConfig(StrictModel):
    """Options of a full-frame analysis; lengths relative to the A-A spacing unless named in nm/px/pm."""

    pixel_size_nm: float | Literal["auto"] | None = Field(
        None,
        description="overrides the file's pixel size, nm; 'auto' estimates it from the material's lattice",
    )
    material: str | Material = Field(
        DEFAULT_MATERIAL,
        description="what the image shows: a built-in name or a description (agent.materials)",
    )
    lattice_spacing_nm: float | None = Field(
        None, gt=0, description="A-A spacing; estimated from the image when not given"
    )
    threshold_sigma: float | None = Field(
        None,
        gt=0,
        description="column finder threshold in noise levels (default 5; lower finds dim B columns)",
    )
    model: str | None = Field(None, description="GAE checkpoint; default: fit on this image's own graph")
    gae_steps: int = Field(200, ge=0, le=100000, description="GAE gradient steps when fitting on the image")
    vae_steps: int = Field(600, ge=1, le=100000, description="VAE gradient steps (batches of 256 patches)")
    segment_classes: int = Field(3, ge=2, le=12, description="classes of the GMM and VAE segmentations")
    embedding: Literal["pca", "tsne"] = Field("pca", description="2-D projection of the GAE embeddings")
    tsne_sample: int = Field(4000, ge=100, description="nodes projected by t-SNE (it is quadratic)")
    clustering: Literal["dbscan", "hdbscan"] = Field("dbscan", description="clusters of the embeddings")
    cluster_sample: int = Field(
        10000, ge=100, description="nodes clustered; the rest take the nearest's label"
    )
    domain_radius: float = Field(2.0, gt=0, description="polarization smoothing radius over the spacing")
    nonpolar_pm: float = Field(8.0, ge=0, description="smoothed B shift below this is non-polar, pm")
    anomaly_threshold: float = Field(3.0, gt=0, description="node score above which a column is anomalous")
    seed: int = Field(0, description="seeds the GAE, the VAE, the mixtures and the samples")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where the GAE and the VAE run")
    torch_threads: int = Field(
        1,
        ge=1,
        le=256,
        description="CPU threads of torch and BLAS (GAE, VAE, mixtures, PCA: too small to share)",
    )


class StageClock:
    """Wall time of each analysis stage, with an optional rich progress bar per stage.

    Parameters
    ----------
    progress : rich.progress.Progress, optional
        Where the bars go; None times silently.
    """

    def __init__(self, progress: Any = None) -> None:
        self.progress = progress
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str, total: int = 1) -> Iterator[Callable[[int], None]]:
        """Time one stage; the yielded callable reports how many of ``total`` steps are done."""
        task = self.progress.add_task(name, total=total) if self.progress is not None else None

        def advance(done: int) -> None:
            if task is not None:
                self.progress.update(task, completed=done)

        start = time.perf_counter()
        yield advance
        elapsed = time.perf_counter() - start
        self.seconds[name] = self.seconds.get(name, 0.0) + elapsed
        if task is not None:
            self.progress.update(task, completed=total, description=f"{name} ({elapsed:.1f} s)")


@dataclass(frozen=True)
class PolarizationResult:
    """Polarization proxy of the columns, its smoothed field and the domains.

    Parameters
    ----------
    displacement_pm : numpy.ndarray
        ``(N, 2)`` B-column shift ``(dx, dy)`` from its A-cell centre, picometres (0 where invalid).
    valid : numpy.ndarray
        True for B columns with a complete cell.
    smoothed_pm : numpy.ndarray
        ``(N, 2)`` shift averaged over valid B columns within ``domain_radius`` spacings.
    domain : numpy.ndarray
        Index into :data:`DOMAIN_NAMES` for valid B columns, -1 elsewhere.
    lattice_orientation_deg : float
        Angle of the lattice's first axis from the image x axis, degrees (modulo 90).
    dataset : dict or None
        Comparison with the dataset's ``Pxy`` (matched cells and their two vectors), or None.
    """

    displacement_pm: np.ndarray
    valid: np.ndarray
    smoothed_pm: np.ndarray
    domain: np.ndarray
    lattice_orientation_deg: float
    dataset: dict[str, Any] | None = None


@dataclass
class FullFrameAnalysis:
    """Everything a full-frame analysis computed (arrays for figures; :attr:`summary` for JSON).

    Parameters
    ----------
    recorded : RecordedImage
        The image and what is known about it.
    pixel_size_nm : float
        Pixel size used, nanometres.
    config : AnalyzeConfig
        The options.
    """

    recorded: RecordedImage
    pixel_size_nm: float
    config: AnalyzeConfig
    stages: PreprocessingStages | None = None
    window_origin_px: tuple[int, int] = (0, 0)
    columns: Columns | None = None
    graph: MoleculeGraph | None = None
    nn_distances_pm: dict[str, np.ndarray] = field(default_factory=dict)
    knn_distances_pm: dict[str, np.ndarray] = field(default_factory=dict)
    polarization: PolarizationResult | None = None
    segmentation: Segmentation | None = None
    scores: np.ndarray | None = None
    feature_z: np.ndarray | None = None
    embeddings: np.ndarray | None = None
    projection: np.ndarray | None = None
    projection_nodes: np.ndarray | None = None
    clusters: np.ndarray | None = None
    gae_loss: list[float] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- polarization


def lattice_orientation_deg(graph: MoleculeGraph) -> float:
    """Orientation of the square lattice from the x axis, degrees in (-45, 45].

    The circular mean of four times each node's local orientation: a square lattice looks
    the same every 90 degrees.
    """
    angles = np.radians(graph.lattice_orientation_deg)
    use = graph.interior if graph.interior.any() else np.ones(len(graph), dtype=bool)
    use = use & np.isfinite(angles)
    if not use.any():
        return 0.0
    return float(np.degrees(np.angle(np.exp(4j * angles[use]).mean()) / 4))


def classify_domains(smoothed_pm: np.ndarray, orientation_deg: float, nonpolar_pm: float) -> np.ndarray:
    """Domain class (index into :data:`DOMAIN_NAMES`) of smoothed B shifts.

    Parameters
    ----------
    smoothed_pm : numpy.ndarray
        ``(N, 2)`` smoothed shifts in the image frame, picometres.
    orientation_deg : float
        Lattice orientation from :func:`lattice_orientation_deg`.
    nonpolar_pm : float
        Shifts shorter than this are non-polar.

    Returns
    -------
    numpy.ndarray
        int64 class per row.
    """
    theta = math.radians(orientation_deg)
    cos, sin = math.cos(theta), math.sin(theta)
    u = cos * smoothed_pm[:, 0] + sin * smoothed_pm[:, 1]
    v = -sin * smoothed_pm[:, 0] + cos * smoothed_pm[:, 1]
    quadrant = (np.floor((np.arctan2(v, u) % (2 * math.pi)) / (math.pi / 2)).astype(np.int64)) % 4
    return np.where(np.hypot(u, v) < nonpolar_pm, NON_POLAR, quadrant)


def compare_with_dataset(
    positions_nm: np.ndarray,
    displacement_pm: np.ndarray,
    uc: UnitCellParameters,
    pixel_size_nm: float,
    spacing_nm: float,
) -> dict[str, Any]:
    """Match measured B shifts to the dataset's unit cells and compare them with its ``Pxy``.

    Each cell's B column is expected at ``xy_COM + Pxy`` (in image pixels); the nearest
    measured valid B column within 0.3 spacings is its match.

    Parameters
    ----------
    positions_nm : numpy.ndarray
        ``(M, 2)`` positions of valid B columns, nanometres from the image corner.
    displacement_pm : numpy.ndarray
        ``(M, 2)`` their measured shifts, picometres.
    uc : UnitCellParameters
        The dataset's cells (positions and ``Pxy`` in image pixels).
    pixel_size_nm : float
        Pixel size, nanometres.
    spacing_nm : float
        A-A spacing, nanometres.

    Returns
    -------
    dict
        ``cell_x_nm``, ``cell_y_nm``, ``dataset_pxy`` (file units) and ``measured_pm`` of the matched
        cells, and the figures of :func:`polarization_agreement`.
    """
    cell_x = (uc.x_px + 0.5) * pixel_size_nm
    cell_y = (uc.y_px + 0.5) * pixel_size_nm
    expected = np.stack([cell_x + uc.pxy[0] * pixel_size_nm, cell_y + uc.pxy[1] * pixel_size_nm], 1)
    result: dict[str, Any] = {
        "cells": len(uc),
        "cell_x_nm": cell_x,
        "cell_y_nm": cell_y,
        "dataset_pxy_all": uc.pxy.T,
    }
    if positions_nm.shape[0] == 0 or len(uc) == 0:
        result.update(matched=0, measured_pm=np.zeros((0, 2)), dataset_pxy=np.zeros((0, 2)))
        return result
    distance, nearest = cKDTree(positions_nm).query(expected, distance_upper_bound=0.3 * spacing_nm)
    matched = np.isfinite(distance)
    result.update(
        matched=int(matched.sum()),
        matched_cells=np.flatnonzero(matched),
        measured_pm=displacement_pm[nearest[matched]],
        dataset_pxy=uc.pxy.T[matched],
    )
    return result


def polarization_agreement(measured: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Unit-free agreement of two vector fields on the same cells.

    Parameters
    ----------
    measured, reference : numpy.ndarray
        ``(M, 2)`` vectors, any units.

    Returns
    -------
    dict
        ``corr_x`` and ``corr_y`` (Pearson correlation of each component), ``median_angle_deg``
        (median angle between the vectors where both are longer than their median length)
        and ``same_quadrant_fraction``.
    """
    if measured.shape[0] < 3:
        nan = float("nan")
        return {"corr_x": nan, "corr_y": nan, "median_angle_deg": nan, "same_quadrant_fraction": nan}

    def corr(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")

    long = (np.hypot(*measured.T) >= np.median(np.hypot(*measured.T))) & (
        np.hypot(*reference.T) >= np.median(np.hypot(*reference.T))
    )
    angle = np.degrees(
        np.abs(
            np.angle(
                np.exp(
                    1j
                    * (
                        np.arctan2(measured[:, 1], measured[:, 0])
                        - np.arctan2(reference[:, 1], reference[:, 0])
                    )
                )
            )
        )
    )
    same = np.all(np.sign(measured) == np.sign(reference), axis=1)
    return {
        "corr_x": corr(measured[:, 0], reference[:, 0]),
        "corr_y": corr(measured[:, 1], reference[:, 1]),
        "median_angle_deg": float(np.median(angle[long])) if long.any() else float("nan"),
        "same_quadrant_fraction": float(same[long].mean()) if long.any() else float("nan"),
    }


def analyze_polarization(
    graph: MoleculeGraph, config: AnalyzeConfig, uc: UnitCellParameters | None, pixel_size_nm: float
) -> PolarizationResult:
    """B-column shifts, their smoothed field, the domains and (with unit cells) the dataset comparison.

    Parameters
    ----------
    graph : MoleculeGraph
        The image's graph.
    config : AnalyzeConfig
        Smoothing radius and non-polar threshold.
    uc : UnitCellParameters or None
        The dataset's unit cells, when the image came in the Sm-BFO layout.
    pixel_size_nm : float
        Pixel size, nanometres.

    Returns
    -------
    PolarizationResult
        Per-node shifts, smoothed shifts and domain classes.
    """
    spacing = graph.lattice_spacing_nm
    positions = np.stack([graph.x_nm, graph.y_nm], 1)
    displacement_nm, valid = b_site_displacement(positions, graph.species, spacing)
    displacement_pm = displacement_nm * 1e3
    smoothed = np.zeros_like(displacement_pm)
    smoothed[valid] = smooth_displacement(
        positions[valid], displacement_pm[valid], config.domain_radius * spacing
    )
    orientation = lattice_orientation_deg(graph)
    domain = np.full(len(graph), -1, dtype=np.int64)
    domain[valid] = classify_domains(smoothed[valid], orientation, config.nonpolar_pm)
    dataset = None
    if uc is not None:
        dataset = compare_with_dataset(positions[valid], displacement_pm[valid], uc, pixel_size_nm, spacing)
        dataset["agreement"] = polarization_agreement(dataset["measured_pm"], dataset["dataset_pxy"])
    return PolarizationResult(displacement_pm, valid, smoothed, domain, orientation, dataset)


# ----------------------------------------------------------------------------- the pipeline


def _window(shape: tuple[int, int], spacing_px: float) -> tuple[int, int, int]:
    """Top-left corner and edge of a central window about 12 spacings wide, for column-level figures."""
    side = int(min(shape[0], shape[1], max(96, round(12 * spacing_px))))
    return (shape[0] - side) // 2, (shape[1] - side) // 2, side


def resolve_pixel_size(recorded: RecordedImage, config: AnalyzeConfig) -> float:
    """The pixel size to analyse with, nm: given, estimated (``auto``) or the file's, checked.

    The check runs before any analysis: at this pixel size the material's cell must be
    resolved, smaller than a third of the image, and within 20 % of the lattice the image
    shows (see :func:`agent.columns.check_pixel_size`).

    Raises
    ------
    ConfigError
        If neither the file nor the options give a pixel size.
    InvalidImageError
        If the pixel size does not fit the image and the material (the message says why and
        what the lattice implies).
    """
    material = resolve_material(config.material)
    if config.pixel_size_nm == "auto":
        pixel_size = estimate_pixel_size(recorded.image, material)
    else:
        pixel_size = config.pixel_size_nm or recorded.pixel_size_nm
    if pixel_size is None:
        raise ConfigError(
            f"{recorded.source}: the file gives no pixel size; pass it with --pixel-size NM "
            "(for example 0.02 for 0.2 Å/px) or --pixel-size auto to estimate it from the lattice"
        )
    check_pixel_size(recorded.image, float(pixel_size), material, source=str(recorded.source))
    return float(pixel_size)


def analyze_image(
    recorded: RecordedImage, config: AnalyzeConfig | None = None, clock: StageClock | None = None
) -> FullFrameAnalysis:
    """Run every analysis stage on one image.

    Parameters
    ----------
    recorded : RecordedImage
        The image (from :func:`simulator.dataset.load_image`).
    config : AnalyzeConfig, optional
        Options.
    clock : StageClock, optional
        Times the stages (and drives their progress bars).

    Returns
    -------
    FullFrameAnalysis
        Arrays for the figures and the JSON summary (:attr:`FullFrameAnalysis.summary`).

    Raises
    ------
    ConfigError
        If neither the file nor the options give a pixel size.
    InvalidImageError
        If the image holds no resolvable lattice of columns.
    """
    import torch

    config = config or AnalyzeConfig()
    clock = clock or StageClock()
    pixel_size = resolve_pixel_size(recorded, config)
    # The GAE and VAE layers are a few dozen wide: a second thread only adds synchronisation, and
    # on a loaded machine a spinning second thread made training 7-25x slower (measured).
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(config.torch_threads)
    try:
        # The same holds for BLAS inside the mixtures and PCA (matrices of a few hundred columns).
        with threadpool_limits(limits=config.torch_threads, user_api="blas"):
            return _analyze(recorded, config, clock, pixel_size)
    finally:
        torch.set_num_threads(threads)


def _analyze(
    recorded: RecordedImage, config: AnalyzeConfig, clock: StageClock, pixel_size: float
) -> FullFrameAnalysis:
    from agent.anomaly import AnomalyConfig, AnomalyScorer, cluster_embeddings, resolve_device

    # A bad checkpoint should fail before minutes of work, not after.
    loaded = AnomalyScorer.load(config.model, device=config.device) if config.model else None
    image = recorded.image
    result = FullFrameAnalysis(recorded=recorded, pixel_size_nm=pixel_size, config=config)
    finder = ColumnFinderConfig(
        lattice_spacing_nm=config.lattice_spacing_nm,
        device=config.device,
        material=config.material,
        **({"threshold_sigma": config.threshold_sigma} if config.threshold_sigma else {}),
    )
    origin = (0.5 * pixel_size, 0.5 * pixel_size)

    with clock.stage("columns"):
        columns = find_columns_in_image(image, pixel_size, origin, finder, source=str(recorded.source))
    if len(columns) < 16 or columns.lattice_spacing_nm is None:
        raise InvalidImageError(
            f"{recorded.source}: found {len(columns)} atomic columns, too few to analyse"
            + (f" ({columns.reason})" if columns.reason else "")
            + "; check the pixel size or give --lattice-spacing"
        )
    result.columns = columns
    spacing_nm = columns.lattice_spacing_nm
    spacing_px = spacing_nm / pixel_size

    with clock.stage("preprocessing"):
        row0, col0, side = _window(image.shape, spacing_px)
        result.window_origin_px = (row0, col0)
        result.stages = preprocessing_stages(
            image[row0 : row0 + side, col0 : col0 + side], spacing_px, finder
        )

    with clock.stage("graph"):
        graph = MoleculeGraph(GraphConfig(lattice_spacing_nm=spacing_nm, cell_nm=max(1.0, 2.5 * spacing_nm)))
        rows, cols = image.shape
        graph.merge(columns, (0.0, cols * pixel_size, 0.0, rows * pixel_size))
        result.graph = graph
        result.nn_distances_pm = nn_distances_by_species(graph)
        result.knn_distances_pm = nn_distances_by_pair(graph)

    with clock.stage("polarization"):
        result.polarization = analyze_polarization(graph, config, recorded.uc_parameters, pixel_size)

    device = resolve_device(config.device)
    with clock.stage("segmentation", total=config.vae_steps) as advance:
        patches = column_patches(image, columns.row_px, columns.col_px, spacing_px)
        result.segmentation = segment_patches(
            patches,
            config.segment_classes,
            vae_steps=config.vae_steps,
            seed=config.seed,
            device=device,
            progress=advance,
        )
        del patches

    data = graph.to_pyg()
    steps = 0 if config.model else config.gae_steps
    with clock.stage("autoencoder", total=max(steps, 1)) as advance:
        if loaded is not None:
            scorer = loaded
        else:
            scorer = AnomalyScorer(AnomalyConfig(device=config.device, seed=config.seed))
            result.gae_loss = scorer.fit([data], steps=steps, progress=advance)
        node_scores = scorer.score(data)
        result.scores, result.feature_z = node_scores.score, node_scores.feature_z
        result.embeddings = scorer.embed(data)

    with clock.stage("embedding"):
        from sklearn.decomposition import PCA

        embeddings = result.embeddings
        if config.embedding == "tsne":
            from sklearn.manifold import TSNE

            rng = np.random.default_rng(config.seed)
            nodes = np.sort(rng.permutation(len(embeddings))[: config.tsne_sample])
            perplexity = float(min(30.0, max(5.0, (nodes.size - 1) / 4)))
            result.projection = TSNE(
                n_components=2, perplexity=perplexity, random_state=config.seed, init="pca"
            ).fit_transform(embeddings[nodes])
            result.projection_nodes = nodes
        else:
            result.projection = PCA(n_components=2, random_state=config.seed).fit_transform(embeddings)
            result.projection_nodes = np.arange(len(embeddings))
        result.clusters = cluster_embeddings(
            embeddings, config.clustering, max_points=config.cluster_sample, seed=config.seed
        )
    return result


# ----------------------------------------------------------------------------- the summary


def _stats(values: np.ndarray) -> dict[str, float | int]:
    if values.size == 0:
        return {"count": 0}
    return {
        "count": int(values.size),
        "mean": float(values.mean()),
        "median": float(np.median(values)),
        "std": float(values.std()),
        "p5": float(np.percentile(values, 5)),
        "p95": float(np.percentile(values, 95)),
    }


def _hotspots(
    x: np.ndarray, y: np.ndarray, scores: np.ndarray, separation_nm: float, count: int
) -> list[int]:
    """Highest-scoring nodes, each at least ``separation_nm`` from the ones before (distinct regions)."""
    chosen: list[int] = []
    # Candidates beyond the top few thousand only matter for images with fewer regions than count.
    for node in np.argsort(-scores)[:20000]:
        if not np.isfinite(scores[node]):
            break
        if not chosen or np.min(np.hypot(x[chosen] - x[node], y[chosen] - y[node])) >= separation_nm:
            chosen.append(int(node))
            if len(chosen) == count:
                break
    return chosen


def summarise(result: FullFrameAnalysis, seconds: dict[str, float]) -> dict[str, Any]:
    """Every number the figures and the report show, as JSON-ready values.

    Parameters
    ----------
    result : FullFrameAnalysis
        A finished analysis.
    seconds : dict
        Wall time per stage, seconds.

    Returns
    -------
    dict
        Image, columns, NN distances, polarization, segmentation, embedding, anomaly, timings
        and peak memory sections.
    """
    from sklearn.metrics import adjusted_rand_score

    from agent.graph import NODE_FEATURES

    columns, graph, polarization = result.columns, result.graph, result.polarization
    segmentation, scores = result.segmentation, result.scores
    assert columns is not None and graph is not None and polarization is not None
    assert segmentation is not None and scores is not None and result.clusters is not None
    recorded = result.recorded
    counts = columns.species_counts()
    material = resolve_material(result.config.material)
    # The lattice columns are the cations; pure-O columns are counted on their own.
    total = counts["A"] + counts["B"]
    summary: dict[str, Any] = {
        "material": {
            "name": material.name,
            "formula": material.formula,
            "zone_axis": material.zone_axis,
            "a_nm": material.a_nm,
            "polar": material.polar,
            "labels": {"A": material.label("A"), "B": material.label("B"), "O": material.label("O")},
        },
        "image": {
            "source": str(recorded.source),
            "shape_px": list(recorded.image.shape),
            "pixel_size_nm": result.pixel_size_nm,
            "field_of_view_nm": [
                recorded.image.shape[1] * result.pixel_size_nm,
                recorded.image.shape[0] * result.pixel_size_nm,
            ],
            "attrs": {
                key: value for key, value in recorded.attrs.items() if isinstance(value, int | float | str)
            },
        },
        "columns": {
            "total": total,
            "counts": {"A": counts["A"], "B": counts["B"], "O": counts["O"]},
            "fractions": {"A": counts["A"] / total, "B": counts["B"] / total},
            "abnormal_A": counts["A_abnormal"],
            "abnormal_B": counts["B_abnormal"],
            "vacancy_sites": {"A": counts["A_vacancy"], "B": counts["B_vacancy"]},
            "lattice_spacing_nm": columns.lattice_spacing_nm,
            "lattice_spacing_px": (columns.lattice_spacing_nm or 0.0) / result.pixel_size_nm,
            "columns_per_nm2": total / (recorded.image.size * result.pixel_size_nm**2),
            "masked_pixels": columns.masked_pixels,
        },
        "nn_distances_pm": {pair: _stats(values) for pair, values in result.nn_distances_pm.items()},
        "knn_edge_distances_pm": {pair: _stats(values) for pair, values in result.knn_distances_pm.items()},
    }
    if result.stages is not None:
        summary["preprocessing"] = {
            "window_origin_px": list(result.window_origin_px),
            "window_px": int(result.stages.image.shape[0]),
            "threshold": result.stages.threshold,
            "candidates_in_window": int(result.stages.rows.size),
        }

    valid = polarization.valid
    domains = []
    for code, name in enumerate(DOMAIN_NAMES):
        members = polarization.domain == code
        n = int(members.sum())
        entry: dict[str, Any] = {"domain": name, "b_columns": n, "fraction": n / max(int(valid.sum()), 1)}
        if n:
            mean = polarization.displacement_pm[members].mean(axis=0)
            entry.update(
                mean_dx_pm=float(mean[0]),
                mean_dy_pm=float(mean[1]),
                mean_magnitude_pm=float(np.hypot(*polarization.displacement_pm[members].T).mean()),
                direction_deg=float(np.degrees(np.arctan2(mean[1], mean[0]))),
            )
        domains.append(entry)
    magnitude = np.hypot(*polarization.displacement_pm[valid].T)
    if not material.polar:
        summary["polarization"] = {
            "skipped": f"{material.name} is not polar: no polarization or domains are reported",
        }
    else:
        summary["polarization"] = {
            "b_columns_with_cell": int(valid.sum()),
            "lattice_orientation_deg": polarization.lattice_orientation_deg,
            "smoothing_radius_nm": result.config.domain_radius * (columns.lattice_spacing_nm or 0.0),
            "nonpolar_threshold_pm": result.config.nonpolar_pm,
            "magnitude_pm": _stats(magnitude),
            "domains": domains,
        }
    if polarization.dataset is not None and material.polar:
        summary["polarization"]["dataset_pxy"] = {
            "cells": polarization.dataset["cells"],
            "matched_cells": polarization.dataset["matched"],
            **polarization.dataset["agreement"],
            "units_note": "Pxy in the file's units (image pixels for micrography simulate); "
            "correlations and angles do not depend on them",
        }

    b_site = columns.species == SPECIES_B

    def class_table(labels: np.ndarray) -> list[dict[str, Any]]:
        table = []
        for k in range(segmentation.classes):
            members = labels == k
            table.append(
                {
                    "class": k,
                    "columns": int(members.sum()),
                    "fraction": float(members.mean()),
                    "b_site_fraction": float(b_site[members].mean()) if members.any() else float("nan"),
                }
            )
        return table

    summary["segmentation"] = {
        "classes": segmentation.classes,
        "gmm": class_table(segmentation.gmm_class),
        "vae": class_table(segmentation.vae_class),
        "agreement_ari": float(adjusted_rand_score(segmentation.gmm_class, segmentation.vae_class)),
        "gmm_vs_species_ari": float(adjusted_rand_score(columns.species, segmentation.gmm_class)),
        "vae_vs_species_ari": float(adjusted_rand_score(columns.species, segmentation.vae_class)),
        "vae_steps": len(segmentation.vae_loss),
        "vae_final_loss": float(np.mean(segmentation.vae_loss[-20:])) if segmentation.vae_loss else None,
    }

    clusters = result.clusters
    node_b = graph.species == SPECIES_B
    interior = graph.interior
    threshold = result.config.anomaly_threshold
    cluster_rows = []
    for label in np.unique(clusters):
        members = clusters == label
        polar = members & polarization.valid
        # Scores of nodes at the frame edge measure the missing neighbours, not the specimen: the
        # table counts interior nodes only, as the anomaly map and its statistics do.
        scored = members & interior
        row: dict[str, Any] = {
            "cluster": int(label),
            "nodes": int(members.sum()),
            "fraction": float(members.mean()),
            "interior_nodes": int(scored.sum()),
            "mean_score": float(scores[scored].mean()) if scored.any() else float("nan"),
            "anomalous": int((scores[scored] > threshold).sum()),
            "b_site_fraction": float(node_b[members].mean()),
        }
        if polar.any():
            mean = polarization.displacement_pm[polar].mean(axis=0)
            row.update(mean_dx_pm=float(mean[0]), mean_dy_pm=float(mean[1]))
        cluster_rows.append(row)
    summary["embedding"] = {
        "projection": result.config.embedding,
        "projected_nodes": int(result.projection_nodes.size) if result.projection_nodes is not None else 0,
        "clustering": result.config.clustering,
        "clusters": int(np.unique(clusters[clusters >= 0]).size),
        "noise_fraction": float((clusters < 0).mean()),
        "table": cluster_rows,
        "model": result.config.model or "fitted on this image",
        "gae_steps": len(result.gae_loss),
        "gae_final_loss": float(np.mean(result.gae_loss[-20:])) if result.gae_loss else None,
    }

    reference = scores[interior] if interior.any() else scores
    # Only columns the detector calls anomalous are circled: a quiet image has fewer than ten hot spots.
    candidates = np.where((interior if interior.any() else True) & (scores > threshold), scores, -np.inf)
    hot = _hotspots(graph.x_nm, graph.y_nm, candidates, 10 * columns.lattice_spacing_nm, 10)
    assert result.feature_z is not None
    summary["anomaly"] = {
        "threshold": threshold,
        "score": _stats(reference),
        "max": float(reference.max()) if reference.size else float("nan"),
        "p99": float(np.percentile(reference, 99)) if reference.size else float("nan"),
        "anomalous_columns": int((reference > threshold).sum()),
        "anomalous_fraction": float((reference > threshold).mean()) if reference.size else float("nan"),
        "hotspots": [
            {
                "x_nm": float(graph.x_nm[node]),
                "y_nm": float(graph.y_nm[node]),
                "score": float(scores[node]),
                "species": material.label("A") if graph.species[node] == SPECIES_A else material.label("B"),
                "top_feature": NODE_FEATURES[int(np.argmax(result.feature_z[node]))],
            }
            for node in hot
        ],
    }
    summary["timings_s"] = {name: round(value, 3) for name, value in seconds.items()}
    summary["timings_s"]["total"] = round(sum(seconds.values()), 3)
    summary["peak_memory_mb"] = round(peak_memory_mb(), 1)
    return summary


# ----------------------------------------------------------------------------- entry point


@dataclass(frozen=True)
class AnalysisOutputs:
    """Files written by :func:`run_analysis` and the summary they hold.

    Parameters
    ----------
    figure, html, json : pathlib.Path
        The multi-panel PNG, the self-contained HTML report and the JSON of every number.
    summary : dict
        The JSON content.
    tables : tuple of pathlib.Path
        ``columns.csv``, ``vacancies.csv`` and ``columns.h5``: one row per column and per vacancy
        site (:mod:`agent.column_table`).
    """

    figure: Path
    html: Path
    json: Path
    summary: dict[str, Any]
    tables: tuple[Path, ...] = ()


def run_analysis(
    path: str | Path, out_dir: str | Path, config: AnalyzeConfig | None = None, *, show_progress: bool = False
) -> AnalysisOutputs:
    """Load an image, analyse it and write its figure, report, JSON and per-column tables.

    The files: ``analysis.png``, ``report.html``, ``analysis.json``, ``columns.csv``,
    ``vacancies.csv`` and ``columns.h5``.

    Parameters
    ----------
    path : str or pathlib.Path
        The image: a Sm-BFO dataset file or folder, ``.npy``, ``.tif`` or a vendor file.
    out_dir : str or pathlib.Path
        Output folder, created if needed.
    config : AnalyzeConfig, optional
        Options.
    show_progress : bool
        Draw a rich progress bar per stage on stderr.

    Returns
    -------
    AnalysisOutputs
        The paths written and the summary.

    Raises
    ------
    DataFileError
        If the file is missing or unreadable (the message names the file and the reason).
    ConfigError
        If no pixel size is known.
    """
    from analysis.analyze_report import write_outputs

    config = config or AnalyzeConfig()
    out_dir = Path(out_dir)
    progress = None
    if show_progress:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        progress = Progress(
            TextColumn("{task.description:<28}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
        )
    clock = StageClock(progress)
    resolve_material(config.material)  # an unknown material is refused before the first bar
    if progress is not None:
        progress.start()
    try:
        with clock.stage("load"):
            given = config.pixel_size_nm if isinstance(config.pixel_size_nm, float) else None
            recorded = load_image(path, given)
        result = analyze_image(recorded, config, clock)
        with clock.stage("report"):
            result.summary = summarise(result, clock.seconds)
            paths = write_outputs(result, out_dir)
            graph = result.graph if result.graph is not None else MoleculeGraph()
            scores = result.scores if result.scores is not None and len(result.scores) == len(graph) else None
            tables = write_tables(
                out_dir, column_table(graph, scores, config.anomaly_threshold), vacancy_table(graph)
            )
            # The report's own time and the final peak go into the JSON written last.
            result.summary["timings_s"]["report"] = round(clock.seconds.get("report", 0.0), 3)
    except BaseException:
        if progress is not None:
            # A refused image leaves its one-line error alone on the terminal, no half-drawn bars.
            progress.live.transient = True
        raise
    finally:
        if progress is not None:
            progress.stop()
    seconds = dict(clock.seconds)
    result.summary["timings_s"] = {name: round(value, 3) for name, value in seconds.items()}
    result.summary["timings_s"]["total"] = round(sum(seconds.values()), 3)
    result.summary["peak_memory_mb"] = round(peak_memory_mb(), 1)
    from analysis.analyze_report import write_json

    write_json(result.summary, paths[2])
    return AnalysisOutputs(
        figure=paths[0], html=paths[1], json=paths[2], summary=result.summary, tables=tables
    )
