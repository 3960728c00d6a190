"""Graphs of whole synthetic specimens with node labels, and reproducible scorer training.

``micrography train --out model.pt`` calls :func:`train_scorer`: it scans
training specimens (seeds that the benchmarks never evaluate on) tile by tile
with the simulated microscope, finds columns, stitches the molecule graph and
trains the graph autoencoder on it, without labels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from agent.anomaly import AnomalyConfig, AnomalyScorer
from agent.columns import find_columns
from agent.driver import ScanRequest
from agent.graph import MoleculeGraph
from analysis.ground_truth import match_columns
from simulator.config import SimulatorConfig
from simulator.drivers import SimulatedMicroscope
from simulator.specimen import LABEL_CODE, LABELS, Specimen, generate_specimen

TRAINING_SEEDS: tuple[int, ...] = (1001, 1002)
"""Specimen seeds used for training; benchmarks evaluate on other seeds."""

SCAN_PIXEL_NM = 0.02
SCAN_DWELL_US = 32.0
SCAN_TILE_PX = 4096
SPECIMEN_EDGE_MARGIN_NM = 1.2
"""Nodes this close to the simulated specimen's boundary are not judged (three lattice spacings:
the reach of the two-hop features, polarization contrast, from the partial columns at the cut)."""


@dataclass(frozen=True)
class LabelledGraph:
    """A stitched graph of a synthetic specimen with the ground-truth label of each node.

    Parameters
    ----------
    graph : MoleculeGraph
        The graph built from found columns.
    specimen : Specimen
        The ground truth.
    label : numpy.ndarray
        Per-node label code (index into :data:`simulator.specimen.LABELS`), -1 where a node
        matches no true column (a false detection).
    """

    graph: MoleculeGraph
    specimen: Specimen
    label: np.ndarray

    @property
    def evaluable(self) -> np.ndarray:
        """Nodes a benchmark may judge: interior, matched to a true column, and away from the cut.

        The simulated specimen is a lattice cut off at its boundary, which a real field of view
        never is; the finder's partial columns at the cut (nodes that match no true column) bend
        the features of the normal columns next to them, so nodes within
        :data:`SPECIMEN_EDGE_MARGIN_NM` of the boundary are left out of every score.
        """
        width, height = self.specimen.size_nm
        x, y = self.graph.x_nm, self.graph.y_nm
        to_boundary = np.minimum.reduce([x, width - x, y, height - y])
        return self.graph.interior & (self.label >= 0) & (to_boundary > SPECIMEN_EDGE_MARGIN_NM)

    def label_names(self) -> list[str]:
        """Names of the labels present."""
        return [LABELS[code] for code in np.unique(self.label) if code >= 0]


def tile_centres(extent: float, tile_nm: float) -> list[float]:
    """Centres of tiles of ``tile_nm`` that cover ``[0, extent]`` with the least overlap, nanometres."""
    count = max(1, int(np.ceil(extent / tile_nm)))
    if count == 1:
        return [extent / 2]
    return list(np.linspace(tile_nm / 2, extent - tile_nm / 2, count))


def scan_specimen(
    seed: int,
    config: SimulatorConfig | None = None,
    *,
    tile_px: int = SCAN_TILE_PX,
    pixel_size_nm: float = SCAN_PIXEL_NM,
    dwell_us: float = SCAN_DWELL_US,
    region_nm: tuple[float, float, float, float] | None = None,
    centres_nm: Sequence[tuple[float, float]] | None = None,
    progress: Callable[[], None] | None = None,
) -> LabelledGraph:
    """Scan a whole synthetic specimen at atomic resolution and label the graph's nodes.

    Tiles are rendered without drift and line jitter so that node positions can be
    matched to the ground truth.

    Parameters
    ----------
    seed : int
        Specimen seed.
    config : SimulatorConfig, optional
        Specimen and instrument (imaging distortions are switched off).
    tile_px : int
        Tile edge, pixels.
    pixel_size_nm : float
        Pixel size, nanometres.
    dwell_us : float
        Dwell per pixel, microseconds.
    region_nm : tuple of float, optional
        ``(x_min, x_max, y_min, y_max)`` of the stage to cover (default: the whole specimen),
        nanometres; tiles of ``tile_px`` cover it with the least overlap.
    centres_nm : sequence of (float, float), optional
        Scan exactly these tile centres instead (for example a session's spread-out start
        tiles), in this order, nanometres.
    progress : callable, optional
        Called after each tile.

    Returns
    -------
    LabelledGraph
        Graph, specimen and node labels.
    """
    # Labels come from ground-truth stage positions: the instrument must place every tile exactly.
    config = (config or SimulatorConfig()).model_copy(update={"seed": seed}).ideal_instrument()
    specimen = generate_specimen(config.specimen, seed)
    graph = MoleculeGraph()
    tile_nm = tile_px * pixel_size_nm
    x_min, x_max, y_min, y_max = region_nm or (0.0, specimen.size_nm[0], 0.0, specimen.size_nm[1])
    width, height = x_max - x_min, y_max - y_min
    shape = (min(tile_px, int(height / pixel_size_nm)), min(tile_px, int(width / pixel_size_nm)))
    if centres_nm is None:
        across, down = tile_centres(width, tile_nm), tile_centres(height, tile_nm)
        centres_nm = [(x_min + x, y_min + y) for y in down for x in across]
    else:
        shape = (tile_px, tile_px)
    with SimulatedMicroscope(config, specimen) as microscope:
        for x, y in centres_nm:
            tile = microscope.acquire(
                ScanRequest(x_nm=x, y_nm=y, shape=shape, pixel_size_nm=pixel_size_nm, dwell_us=dwell_us)
            )
            graph.merge(find_columns(tile), tile.extent_nm)
            if progress is not None:
                progress()
    return LabelledGraph(graph, specimen, node_labels(graph, specimen))


def node_labels(graph: MoleculeGraph, specimen: Specimen, tolerance_fraction: float = 0.25) -> np.ndarray:
    """Ground-truth label of each node, by matching it to the nearest true column.

    Parameters
    ----------
    graph : MoleculeGraph
        The graph.
    specimen : Specimen
        The ground truth.
    tolerance_fraction : float
        Largest match distance, as a fraction of the lattice spacing.

    Returns
    -------
    numpy.ndarray
        Label code per node, -1 for nodes that match no true column.
    """
    labels = np.full(len(graph), -1, dtype=np.int64)
    match = match_columns(
        np.stack([graph.x_nm, graph.y_nm], 1),
        np.stack([specimen.x_nm, specimen.y_nm], 1),
        tolerance_fraction * specimen.config.lattice_nm,
    )
    labels[match.found] = specimen.label[match.truth]
    return labels


def train_scorer(
    seeds: Sequence[int] = TRAINING_SEEDS,
    config: AnomalyConfig | None = None,
    simulator: SimulatorConfig | None = None,
    *,
    dwell_us: float = SCAN_DWELL_US,
    progress: Callable[[str, int, int], None] | None = None,
) -> AnomalyScorer:
    """Train a graph-autoencoder scorer reproducibly on synthetic specimens, without labels.

    Parameters
    ----------
    seeds : sequence of int
        Training specimen seeds.
    config : AnomalyConfig, optional
        Model and training parameters (its ``seed`` fixes initialisation and sampling).
    simulator : SimulatorConfig, optional
        Specimen and instrument parameters.
    dwell_us : float
        Dwell per pixel of the training tiles, microseconds: the dose, and so the noise, the
        scorer learns as normal (a session's tiles use 8 µs).
    progress : callable, optional
        ``progress(stage, done, total)`` for progress bars.

    Returns
    -------
    AnomalyScorer
        The trained scorer; its :attr:`~agent.anomaly.AnomalyScorer.provenance` records the
        specimens, tiles and steps.
    """
    graphs = []
    for index, seed in enumerate(seeds):
        graphs.append(scan_specimen(seed, simulator, dwell_us=dwell_us).graph.to_pyg())
        if progress is not None:
            progress("scanning training specimens", index + 1, len(seeds))
    scorer = AnomalyScorer(config)
    total = scorer.config.warmup_steps

    def step(done: int) -> None:
        if progress is not None:
            progress("training", done, total)

    scorer.fit(graphs, progress=step)
    scorer.provenance = {
        "specimen_seeds": [int(seed) for seed in seeds],
        "tile_px": SCAN_TILE_PX,
        "pixel_size_nm": SCAN_PIXEL_NM,
        "dwell_us": float(dwell_us),
        "steps": int(total),
        "seed": int(scorer.config.seed),
        "simulator": "default" if simulator is None or simulator == SimulatorConfig() else "custom",
        "deterministic": bool(torch.are_deterministic_algorithms_enabled() and torch.get_num_threads() == 1),
    }
    return scorer


def defect_mask(labels: np.ndarray, defect_class: str) -> np.ndarray:
    """Nodes of a benchmark defect class (``all`` is every planted label; amorphous/phase are one class)."""
    if defect_class == "all":
        return labels > LABEL_CODE["normal"]
    if defect_class == "amorphous_phase":
        return np.isin(labels, (LABEL_CODE["amorphous"], LABEL_CODE["phase"]))
    return labels == LABEL_CODE[defect_class]
