"""Graph-autoencoder anomaly scores for the molecule graph.

A graph autoencoder learns what the normal lattice looks like, without labels,
and scores each column (node) by how badly it reconstructs it. The encoder
passes messages over the kNN edges with their attributes (length, direction,
species pair); the decoder reconstructs each node's features and the geometry
of each edge (a training objective that makes the embedding encode the local
geometry). Each feature's reconstruction error is standardised by its robust
spread on normal training nodes; a node's score is the root mean square of
these z-values, about 1 for normal lattice.

* :class:`AnomalyScorer` is the model object: ``fit`` (warm-up on the first
  graphs of a session or on training specimens), ``update`` (a bounded number
  of gradient steps on a replay buffer of recent subgraphs), ``score``,
  ``explain`` (which feature made a node unusual), ``embed`` (latent vectors for
  clustering), ``save``/``load`` (checkpoints carry a version and the feature schema).
* Architectures: ``edge_mpnn`` (default; messages built from neighbour features
  and edge attributes), ``gatv2`` (attention with edge attributes) and ``gcn``;
  ``seed`` is the write-up's GAE (GCN encoder, linear decoder, feature MSE),
  kept as a reference.
* Hand-crafted baselines: :func:`baseline_scores` (NN-distance, intensity and
  polarization-discontinuity z-scores).

All of it runs on CPU and CUDA (the ``device`` switch) with PyTorch Geometric's
own scatter, no torch-scatter, torch-cluster or pyg-lib.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch_geometric.data import Data
from torch_geometric.nn import GATv2Conv, GCNConv, MessagePassing

from agent.config import StrictModel
from agent.errors import MicrographyError
from agent.graph import EDGE_FEATURES, NODE_FEATURES

CHECKPOINT_FORMAT = "micrography-graph-autoencoder"
CHECKPOINT_VERSION = 1
SHIPPED_MODEL = "shipped"
"""The name that selects the checkpoint shipped with the package (sessions use it by default)."""
SHIPPED_CHECKPOINT = Path(__file__).resolve().parent / "models" / "gae-bfo-001.pt"
"""The shipped checkpoint; README "A shipped anomaly model" gives the command that reproduces it."""
NO_MODEL = "none"
"""The name that asks for no checkpoint: a session warms a new GAE up on its start tiles."""

Architecture = Literal["edge_mpnn", "gatv2", "gcn", "seed"]

_GEOMETRY_EDGE_FEATURES = ("distance_pm", "cos_angle", "sin_angle")
"""Edge attributes the decoder reconstructs (the local neighbour geometry)."""
_GEOMETRY_COLUMNS = [EDGE_FEATURES.index(name) for name in _GEOMETRY_EDGE_FEATURES]
_BINARY_NODE_FEATURES = ("is_b_site",)
_SPECIES_COLUMN = NODE_FEATURES.index("is_b_site")
_MAD_TO_SIGMA = 1.4826


class CheckpointError(MicrographyError, ValueError):
    """A checkpoint is unreadable, of another format or version, or of another feature schema."""


class AnomalyConfig(StrictModel):
    """Graph autoencoder, training and scoring parameters."""

    architecture: Architecture = Field("edge_mpnn", description="encoder type; 'seed' is the write-up's GAE")
    hidden: int = Field(32, ge=4, le=512, description="width of hidden layers")
    latent: int = Field(8, ge=2, le=256, description="width of the node embedding (the bottleneck)")
    layers: int = Field(2, ge=1, le=6, description="message-passing layers")
    learning_rate: float = Field(3e-3, gt=0, description="Adam rate: fit() starts at it, update() uses it")
    warmup_steps: int = Field(300, ge=0, description="gradient steps of fit()")
    schedule: Literal["constant", "cosine"] = Field(
        "cosine", description="learning rate of fit(): constant, or a cosine decay to final_lr_fraction"
    )
    final_lr_fraction: float = Field(0.02, gt=0, le=1, description="cosine schedule: last rate / first")
    average_fraction: float = Field(
        0.3, ge=0, lt=1, description="fit() returns the mean of the weights over this last share of its steps"
    )
    online_steps: int = Field(4, ge=0, description="gradient steps of each update()")
    batch_nodes: int = Field(6000, ge=100, description="nodes per training subgraph")
    replay_graphs: int = Field(16, ge=1, description="recent subgraphs kept for online updates")
    edge_loss_weight: float = Field(0.5, ge=0, description="weight of the edge-geometry loss")
    region_top_fraction: float = Field(0.1, gt=0, le=1, description="region score = mean of this top share")
    seed: int = Field(0, description="seeds initialisation and sampling")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where the model runs: auto takes CUDA when torch sees a GPU"
    )


@contextmanager
def single_thread_torch() -> Iterator[None]:
    """Run torch single-threaded inside the block: bitwise-repeatable reductions on the CPU.

    A resumed or replayed session matches the recorded one only if every GAE update and
    score reduces in the same order.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def deterministic_torch() -> Iterator[None]:
    """One thread and ``torch.use_deterministic_algorithms`` inside the block: bitwise reproducible.

    The deterministic mode of ``micrography train`` and ``micrography bench anomaly``: the same
    options give the same weights, bit for bit, on the same machine and library versions. On a
    GPU an operation without a deterministic implementation raises instead of running.

    Examples
    --------
    >>> with deterministic_torch():
    ...     torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    (1, True)
    """
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with single_thread_torch():
            yield
    finally:
        torch.use_deterministic_algorithms(previous)


def resolve_checkpoint(name: str | Path | None) -> Path | None:
    """The checkpoint file a setting names: the shipped model, none, or a path.

    Parameters
    ----------
    name : str, pathlib.Path or None
        :data:`SHIPPED_MODEL` (``"shipped"``), :data:`NO_MODEL` (``"none"``) or ``None`` for
        no checkpoint, or the path of a checkpoint written by ``micrography train``.

    Returns
    -------
    pathlib.Path or None
        The file to load, or None when the GAE is to be trained on the spot.

    Raises
    ------
    CheckpointError
        If the shipped model is asked for but missing from this installation.

    Examples
    --------
    >>> resolve_checkpoint("none") is None, resolve_checkpoint("runs/model.pt")
    (True, PosixPath('runs/model.pt'))
    >>> resolve_checkpoint("shipped").name
    'gae-bfo-001.pt'
    """
    if name is None or str(name).lower() == NO_MODEL:
        return None
    if str(name).lower() == SHIPPED_MODEL:
        if not SHIPPED_CHECKPOINT.is_file():
            raise CheckpointError(
                f"the shipped anomaly model {SHIPPED_CHECKPOINT} is missing from this installation; "
                "reinstall, or give --checkpoint none to train one on the start tiles"
            )
        return SHIPPED_CHECKPOINT
    return Path(name)


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise MicrographyError(
            "device 'cuda' was requested but torch sees no CUDA device; use 'auto' or 'cpu'"
        )
    return torch.device(device)


# ----------------------------------------------------------------------------- scaling


@dataclass
class RobustScaler:
    """Per-column centring and scaling by median and MAD (robust to the anomalies themselves).

    Parameters
    ----------
    center, scale : torch.Tensor
        Per-column median and robust spread.
    """

    center: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def fit(cls, values: torch.Tensor, passthrough: tuple[int, ...] = ()) -> RobustScaler:
        """Fit on ``values`` (rows are samples); ``passthrough`` columns stay unscaled."""
        center = values.median(dim=0).values
        spread = _MAD_TO_SIGMA * (values - center).abs().median(dim=0).values
        # A feature with a constant majority (coordination, for example) gets its std instead.
        fallback = values.std(dim=0)
        scale = torch.where(
            spread > 1e-6, spread, torch.where(fallback > 1e-6, fallback, torch.ones_like(spread))
        )
        for column in passthrough:
            center[column], scale[column] = 0.0, 1.0
        return cls(center=center, scale=scale)

    def transform(self, values: torch.Tensor) -> torch.Tensor:
        """Standardise ``values`` column by column."""
        return (values - self.center.to(values.device)) / self.scale.to(values.device)

    def state(self) -> dict[str, list[float]]:
        """JSON-friendly state for checkpoints."""
        return {"center": self.center.tolist(), "scale": self.scale.tolist()}

    @classmethod
    def from_state(cls, state: dict[str, list[float]]) -> RobustScaler:
        """Rebuild from :meth:`state`."""
        return cls(center=torch.tensor(state["center"]), scale=torch.tensor(state["scale"]))


# ----------------------------------------------------------------------------- models


class EdgeMessageLayer(MessagePassing):
    """Message passing whose messages see the neighbour's features and the edge attributes.

    ``h_i' = W_u [h_i, mean_j act(W_n h_j + W_e e_ij)]``. Splitting the message weight
    into a node part (applied once per node) and an edge part keeps the per-edge work small.

    Parameters
    ----------
    in_channels, out_channels : int
        Node feature widths in and out.
    edge_channels : int
        Width of the edge attributes.
    """

    def __init__(self, in_channels: int, out_channels: int, edge_channels: int) -> None:
        super().__init__(aggr="mean")
        self.node_part = nn.Linear(in_channels, out_channels)
        self.edge_part = nn.Linear(edge_channels, out_channels, bias=False)
        self.activation = nn.SiLU()
        self.update_net = nn.Linear(in_channels + out_channels, out_channels)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, edge_attr: torch.Tensor) -> torch.Tensor:
        """Node features after one round of messages."""
        aggregated = self.propagate(edge_index, projected=self.node_part(x), edge_attr=edge_attr)
        return self.update_net(torch.cat([x, aggregated], dim=-1))

    def message(self, projected_j: torch.Tensor, edge_attr: torch.Tensor) -> torch.Tensor:
        """Message from neighbour j along one edge."""
        return self.activation(projected_j + self.edge_part(edge_attr))


class GraphAutoencoder(nn.Module):
    """Encoder over (x, edge_index, edge_attr); decoders for node features and edge geometry.

    Parameters
    ----------
    node_channels, edge_channels : int
        Widths of node features and edge attributes.
    hidden, latent, layers : int
        Hidden width, embedding width and number of message-passing layers.
    architecture : str
        ``"edge_mpnn"``, ``"gatv2"`` or ``"gcn"`` (``"seed"`` uses :class:`SeedGraphAutoencoder`).
    """

    def __init__(
        self, node_channels: int, edge_channels: int, hidden: int, latent: int, layers: int, architecture: str
    ) -> None:
        super().__init__()
        self.architecture = architecture
        widths = [node_channels] + [hidden] * (layers - 1) + [latent]
        self.convs = nn.ModuleList()
        for width_in, width_out in itertools.pairwise(widths):
            if architecture == "edge_mpnn":
                self.convs.append(EdgeMessageLayer(width_in, width_out, edge_channels))
            elif architecture == "gatv2":
                self.convs.append(GATv2Conv(width_in, width_out, heads=1, edge_dim=edge_channels))
            elif architecture == "gcn":
                self.convs.append(GCNConv(width_in, width_out))
            else:
                raise ValueError(f"unknown architecture {architecture!r}")
        self.activation = nn.SiLU()
        self.node_decoder = nn.Sequential(
            nn.Linear(latent, hidden), nn.SiLU(), nn.Linear(hidden, node_channels)
        )
        self.edge_decoder = nn.Sequential(
            nn.Linear(2 * latent, hidden), nn.SiLU(), nn.Linear(hidden, len(_GEOMETRY_COLUMNS))
        )

    def encode(self, x: torch.Tensor, edge_index: torch.Tensor, edge_attr: torch.Tensor) -> torch.Tensor:
        """Node embeddings, shape ``(N, latent)``."""
        hidden = x
        for index, conv in enumerate(self.convs):
            hidden = (
                conv(hidden, edge_index)
                if self.architecture == "gcn"
                else conv(hidden, edge_index, edge_attr)
            )
            if index < len(self.convs) - 1:
                hidden = self.activation(hidden)
        return hidden

    def forward(
        self, x: torch.Tensor, edge_index: torch.Tensor, edge_attr: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Reconstructed node features, reconstructed edge geometry and the embeddings."""
        latent = self.encode(x, edge_index, edge_attr)
        source, target = edge_index
        edges = self.edge_decoder(torch.cat([latent[source], latent[target]], dim=-1))
        return self.node_decoder(latent), edges, latent


class SeedGraphAutoencoder(nn.Module):
    """The research write-up's GAE: two GCN layers, a linear decoder, feature MSE (a reference).

    Parameters
    ----------
    node_channels : int
        Width of node features.
    hidden, latent : int
        Hidden and embedding widths.
    """

    def __init__(self, node_channels: int, hidden: int, latent: int) -> None:
        super().__init__()
        self.first = GCNConv(node_channels, hidden)
        self.second = GCNConv(hidden, latent)
        self.decoder = nn.Linear(latent, node_channels)

    def forward(
        self, x: torch.Tensor, edge_index: torch.Tensor, edge_attr: torch.Tensor
    ) -> tuple[torch.Tensor, None, torch.Tensor]:
        """Reconstructed node features, no edge output, and the embeddings."""
        latent = self.second(torch.relu(self.first(x, edge_index)), edge_index)
        return self.decoder(latent), None, latent


# ----------------------------------------------------------------------------- the scorer


@dataclass(frozen=True)
class NodeScores:
    """Anomaly scores of the nodes of one graph.

    Parameters
    ----------
    score : numpy.ndarray
        Per-node anomaly score: root mean square of ``feature_z`` (about 1 for normal lattice);
        for the ``seed`` architecture the write-up's plain feature MSE.
    feature_z : numpy.ndarray
        ``(N, F)`` standardised reconstruction error per node feature.
    """

    score: np.ndarray
    feature_z: np.ndarray


class AnomalyScorer:
    """Unsupervised anomaly scores of molecule-graph nodes from a graph autoencoder.

    Parameters
    ----------
    config : AnomalyConfig, optional
        Architecture, training and device.

    Examples
    --------
    Not run as a test (it needs a MoleculeGraph ``graph`` of real columns)::

        scorer = AnomalyScorer(AnomalyConfig(device="cpu"))
        scorer.fit([graph.to_pyg()])
        scores = scorer.score(graph.to_pyg()).score
    """

    def __init__(self, config: AnomalyConfig | None = None) -> None:
        self.config = config or AnomalyConfig()
        self.device = resolve_device(self.config.device)
        torch.manual_seed(self.config.seed)
        self._rng = np.random.default_rng(self.config.seed)
        if self.config.architecture == "seed":
            self.model: nn.Module = SeedGraphAutoencoder(
                len(NODE_FEATURES), self.config.hidden, self.config.latent
            )
        else:
            self.model = GraphAutoencoder(
                len(NODE_FEATURES),
                len(EDGE_FEATURES),
                self.config.hidden,
                self.config.latent,
                self.config.layers,
                self.config.architecture,
            )
        self.model.to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.config.learning_rate)
        self.node_scaler: RobustScaler | None = None
        self.edge_scaler: RobustScaler | None = None
        self.error_scale: torch.Tensor | None = None
        self.edge_error_scale: float = 1.0
        self.replay: deque[Data] = deque(maxlen=self.config.replay_graphs)
        self.steps_trained = 0
        # What the weights were trained on (specimen seeds, dwell, command), kept in checkpoints.
        self.provenance: dict[str, Any] = {}

    # ------------------------------------------------------------------ data preparation

    @property
    def fitted(self) -> bool:
        """True once :meth:`fit` (or :meth:`load`) has set the scalers and error scales."""
        return self.node_scaler is not None

    def _prepare(self, data: Data) -> Data:
        """Standardised copy of a graph on the scorer's device."""
        if self.node_scaler is None or self.edge_scaler is None:
            raise MicrographyError("the anomaly scorer is not trained yet; call fit() or load a checkpoint")
        if data.x.shape[1] != len(NODE_FEATURES):
            raise CheckpointError(
                f"graph has {data.x.shape[1]} node features, the scorer expects {len(NODE_FEATURES)} "
                f"({', '.join(NODE_FEATURES)})"
            )
        prepared = Data(
            x=self.node_scaler.transform(data.x.float().to(self.device)),
            edge_index=data.edge_index.to(self.device),
            edge_attr=self.edge_scaler.transform(data.edge_attr.float().to(self.device)),
            interior=data.interior.to(self.device),
            pos=data.pos.to(self.device),
        )
        return prepared

    def _subgraph(self, data: Data, nodes: int) -> Data:
        """A random square window of about ``nodes`` nodes (training batches keep spatial context)."""
        if data.num_nodes <= nodes:
            return data
        position = data.pos.cpu().numpy()
        centre = position[self._rng.integers(data.num_nodes)]
        span = np.ptp(position, axis=0)
        side = float(np.sqrt(nodes / data.num_nodes * span[0] * span[1]))
        inside = np.all(np.abs(position - centre) <= side / 2, axis=1)
        if inside.sum() < 50:
            return data
        return data.subgraph(torch.from_numpy(inside).to(data.x.device))

    # ------------------------------------------------------------------ training

    def _loss(self, batch: Data) -> torch.Tensor:
        node_out, edge_out, _ = self.model(batch.x, batch.edge_index, batch.edge_attr)
        mask = batch.interior if bool(batch.interior.any()) else torch.ones_like(batch.interior)
        loss = nn.functional.huber_loss(node_out[mask], batch.x[mask])
        if edge_out is not None and batch.edge_index.shape[1] and self.config.edge_loss_weight > 0:
            target = batch.edge_attr[:, _GEOMETRY_COLUMNS]
            source_inside = mask[batch.edge_index[0]]
            if bool(source_inside.any()):
                loss = loss + self.config.edge_loss_weight * nn.functional.huber_loss(
                    edge_out[source_inside], target[source_inside]
                )
        return loss

    def _step(self, batch: Data) -> float:
        self.model.train()
        self.optimizer.zero_grad()
        loss = self._loss(batch)
        loss.backward()
        self.optimizer.step()
        self.steps_trained += 1
        return float(loss.detach())

    def _fit_learning_rate(self, step: int, total: int) -> float:
        """Learning rate of step ``step`` of ``total`` in :meth:`fit`."""
        base = self.config.learning_rate
        if self.config.schedule == "constant" or total <= 1:
            return base
        final = self.config.final_lr_fraction
        return base * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * step / (total - 1))))

    def _set_learning_rate(self, rate: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = rate

    def fit(self, graphs: list[Data], steps: int | None = None, progress: Any = None) -> list[float]:
        """Fit the scalers and train from scratch on unlabelled graphs.

        Parameters
        ----------
        graphs : list of torch_geometric.data.Data
            Graphs from :meth:`agent.graph.MoleculeGraph.to_pyg` (raw physical features).
        steps : int, optional
            Gradient steps (default ``config.warmup_steps``).
        progress : callable, optional
            Called with the step number after each step (for progress bars).

        Returns
        -------
        list of float
            Training loss per step.
        """
        if not graphs or all(g.num_nodes == 0 for g in graphs):
            raise MicrographyError("cannot train the anomaly scorer on empty graphs; scan some lattice first")
        interior_x = torch.cat([g.x[g.interior] if bool(g.interior.any()) else g.x for g in graphs]).float()
        edge_attr = torch.cat([g.edge_attr for g in graphs]).float()
        passthrough = tuple(NODE_FEATURES.index(name) for name in _BINARY_NODE_FEATURES)
        self.node_scaler = RobustScaler.fit(interior_x, passthrough)
        pair_columns = tuple(index for index, name in enumerate(EDGE_FEATURES) if name.startswith("pair_"))
        self.edge_scaler = RobustScaler.fit(edge_attr, pair_columns)
        prepared = [self._prepare(g) for g in graphs if g.num_nodes]
        total = self.config.warmup_steps if steps is None else steps
        # The weights after the last step depend on the last few random batches; averaging the
        # weights over the tail of a decaying schedule makes training seeds (and thread counts)
        # agree far more closely than any single iterate does.
        average_from = total - int(self.config.average_fraction * total)
        averaged = AveragedModel(self.model) if average_from < total else None
        losses = []
        for step in range(total):
            self._set_learning_rate(self._fit_learning_rate(step, total))
            graph = prepared[step % len(prepared)]
            losses.append(self._step(self._subgraph(graph, self.config.batch_nodes)))
            if averaged is not None and step >= average_from:
                averaged.update_parameters(self.model)
            if progress is not None:
                progress(step + 1)
        if averaged is not None:
            self.model.load_state_dict(averaged.module.state_dict())
        # Online updates follow the specimen at the base rate.
        self._set_learning_rate(self.config.learning_rate)
        self._calibrate(prepared)
        self.replay.extend(self._subgraph(g, self.config.batch_nodes) for g in prepared)
        return losses

    def recalibrate(self, graphs: list[Data]) -> None:
        """Re-measure the error scales on new graphs, keeping the weights and feature scalers.

        A checkpoint trained on one dose meets tiles of another: the reconstruction errors of
        normal lattice grow or shrink with the noise, and so would every score. The robust
        (median-based) error scales of :meth:`fit` are measured again on ``graphs`` (a session's
        start tiles), which also join the replay buffer of :meth:`update`.

        Parameters
        ----------
        graphs : list of torch_geometric.data.Data
            Graphs from :meth:`agent.graph.MoleculeGraph.to_pyg` (raw physical features).

        Raises
        ------
        MicrographyError
            If the scorer is not fitted or the graphs are empty.
        """
        if not self.fitted:
            raise MicrographyError("cannot recalibrate an anomaly scorer that is not trained yet")
        prepared = [self._prepare(g) for g in graphs if g.num_nodes]
        if not prepared:
            raise MicrographyError("cannot recalibrate the anomaly scorer on empty graphs")
        self._calibrate(prepared)
        self.replay.extend(self._subgraph(g, self.config.batch_nodes) for g in prepared)

    def update(self, data: Data, steps: int | None = None) -> list[float]:
        """Follow the specimen: a bounded number of gradient steps on recent subgraphs.

        Parameters
        ----------
        data : torch_geometric.data.Data
            The neighbourhood of the newest tile (raw features); it joins the replay buffer.
        steps : int, optional
            Gradient steps (default ``config.online_steps``).

        Returns
        -------
        list of float
            Loss per step.
        """
        if not self.fitted:
            return self.fit([data], steps)
        if data.num_nodes:
            self.replay.append(self._subgraph(self._prepare(data), self.config.batch_nodes))
        losses = []
        for _ in range(self.config.online_steps if steps is None else steps):
            # Half the steps on the newest tile, half on the replay buffer, so old structure is not forgotten.
            batch = (
                self.replay[-1]
                if self._rng.random() < 0.5
                else self.replay[self._rng.integers(len(self.replay))]
            )
            losses.append(self._step(batch))
        return losses

    @torch.no_grad()
    def _errors(
        self, prepared: Data, with_edges: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Absolute feature errors, optional per-node edge-geometry errors, and embeddings."""
        self.model.eval()
        if isinstance(self.model, GraphAutoencoder) and not with_edges:
            # Scoring needs no edge decoding: skip it, it costs as much as the encoder.
            latent = self.model.encode(prepared.x, prepared.edge_index, prepared.edge_attr)
            return (self.model.node_decoder(latent) - prepared.x).abs(), None, latent
        node_out, edge_out, latent = self.model(prepared.x, prepared.edge_index, prepared.edge_attr)
        feature_error = (node_out - prepared.x).abs()
        edge_error = torch.zeros(prepared.num_nodes, device=prepared.x.device)
        if edge_out is not None and prepared.edge_index.shape[1]:
            per_edge = (edge_out - prepared.edge_attr[:, _GEOMETRY_COLUMNS]).abs().mean(dim=1)
            source = prepared.edge_index[0]
            edge_error = edge_error.index_add(0, source, per_edge)
            counts = torch.zeros_like(edge_error).index_add(0, source, torch.ones_like(per_edge))
            edge_error = edge_error / counts.clamp(min=1)
        return feature_error, edge_error, latent

    def _calibrate(self, prepared: list[Data]) -> None:
        """Robust scale of the reconstruction errors on (interior) training nodes."""
        feature_errors, edge_errors = [], []
        for graph in prepared:
            feature_error, edge_error, _ = self._errors(graph, with_edges=True)
            mask = graph.interior if bool(graph.interior.any()) else torch.ones_like(graph.interior)
            feature_errors.append(feature_error[mask])
            assert edge_error is not None
            edge_errors.append(edge_error[mask])
        errors = torch.cat(feature_errors)
        species = torch.cat(
            [g.x[g.interior if bool(g.interior.any()) else slice(None), _SPECIES_COLUMN] for g in prepared]
        )
        # A and B columns are measured with different precision (B is dimmer): scale their errors apart.
        scales = []
        for code in (0, 1):
            rows = errors[species.round() == code]
            scales.append(_MAD_TO_SIGMA * (rows if rows.shape[0] else errors).median(dim=0).values)
        self.error_scale = torch.stack(scales).clamp(min=1e-3)
        edges = torch.cat(edge_errors)
        self.edge_error_scale = max(float(_MAD_TO_SIGMA * edges.median()), 1e-3)

    # ------------------------------------------------------------------ scoring

    def score(self, data: Data) -> NodeScores:
        """Anomaly score of every node of a graph.

        Parameters
        ----------
        data : torch_geometric.data.Data
            Graph with raw features (``MoleculeGraph.to_pyg``).

        Returns
        -------
        NodeScores
            Per-node score and its per-feature and edge components.
        """
        prepared = self._prepare(data)
        feature_error, _, _ = self._errors(prepared)
        assert self.error_scale is not None
        feature_z = feature_error / self._node_error_scale(prepared)
        if self.config.architecture == "seed":
            # The write-up scored nodes by the plain feature MSE of its GAE.
            score = feature_error.square().mean(dim=1)
        else:
            score = feature_z.square().mean(dim=1).sqrt()
        return NodeScores(score=score.cpu().numpy().astype(np.float64), feature_z=feature_z.cpu().numpy())

    def _node_error_scale(self, prepared: Data) -> torch.Tensor:
        """Per-node, per-feature error scale: the row of the node's species."""
        assert self.error_scale is not None
        species = prepared.x[:, _SPECIES_COLUMN].round().clamp(0, 1).long()
        return self.error_scale.to(prepared.x.device)[species]

    def explain(self, data: Data, node: int) -> dict[str, float]:
        """Which features made a node unusual: standardised error per feature, largest first.

        Parameters
        ----------
        data : torch_geometric.data.Data
            The graph.
        node : int
            Node index in ``data``.

        Returns
        -------
        dict
            Feature name (and ``"edge_geometry"``) to standardised error, sorted descending.
        """
        prepared = self._prepare(data)
        feature_error, edge_error, _ = self._errors(prepared, with_edges=True)
        assert self.error_scale is not None
        feature_z = (feature_error[node] / self._node_error_scale(prepared)[node]).cpu().numpy()
        contributions = {name: float(feature_z[i]) for i, name in enumerate(NODE_FEATURES)}
        if edge_error is not None:
            contributions["edge_geometry"] = float(edge_error[node]) / self.edge_error_scale
        return dict(sorted(contributions.items(), key=lambda item: -item[1]))

    @torch.no_grad()
    def embed(self, data: Data) -> np.ndarray:
        """Node embeddings ``(N, latent)`` for clustering and visualisation."""
        _, _, latent = self._errors(self._prepare(data))
        return latent.cpu().numpy()

    # ------------------------------------------------------------------ checkpoints

    def save(self, path: str | Path) -> Path:
        """Write a checkpoint: format, version, feature schema, config, scalers and weights."""
        if not self.fitted:
            raise MicrographyError("nothing to save: the anomaly scorer is not trained yet")
        assert self.node_scaler is not None and self.edge_scaler is not None and self.error_scale is not None
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {key: value.detach().cpu() for key, value in self.model.state_dict().items()}
        torch.save(
            {
                "format": CHECKPOINT_FORMAT,
                "version": CHECKPOINT_VERSION,
                "node_features": list(NODE_FEATURES),
                "edge_features": list(EDGE_FEATURES),
                "config": self.config.model_dump(mode="json"),
                "node_scaler": self.node_scaler.state(),
                "edge_scaler": self.edge_scaler.state(),
                "error_scale": self.error_scale.cpu().tolist(),
                "edge_error_scale": self.edge_error_scale,
                "steps_trained": self.steps_trained,
                "provenance": self.provenance,
                "state_dict": state,
            },
            path,
        )
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | None = None) -> AnomalyScorer:
        """Read a checkpoint written by :meth:`save`.

        Parameters
        ----------
        path : str or pathlib.Path
            The checkpoint file.
        device : str, optional
            Override the checkpoint's device setting (``auto``, ``cpu``, ``cuda``).

        Raises
        ------
        CheckpointError
            If the file is unreadable, of another format or version, or its feature schema
            differs from this version's.
        """
        path = Path(path)
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: checkpoint not found") from None
        except Exception as error:  # torch raises many types for a corrupt file
            # torch's own text spans many lines and suggests unsafe loading; its first line is enough.
            first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
            raise CheckpointError(
                f"{path}: not a readable checkpoint ({type(error).__name__}: {first[:200]})"
            ) from None
        if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path}: not a Micrography graph-autoencoder checkpoint")
        if checkpoint.get("version") != CHECKPOINT_VERSION:
            raise CheckpointError(
                f"{path}: checkpoint version {checkpoint.get('version')} but this Micrography reads "
                f"version {CHECKPOINT_VERSION}; retrain with `micrography train`"
            )
        for key, expected in (("node_features", NODE_FEATURES), ("edge_features", EDGE_FEATURES)):
            found = tuple(checkpoint.get(key, ()))
            if found != tuple(expected):
                missing = sorted(set(expected) - set(found))
                extra = sorted(set(found) - set(expected))
                raise CheckpointError(
                    f"{path}: {key.replace('_', ' ')} differ from this version's schema "
                    f"(missing {missing or 'none'}, unexpected {extra or 'none'}, order may differ); "
                    "retrain with `micrography train`"
                )
        config = AnomalyConfig.model_validate(checkpoint["config"])
        if device is not None:
            config = config.model_copy(update={"device": device})
        scorer = cls(config)
        scorer.model.load_state_dict(checkpoint["state_dict"])
        scorer.node_scaler = RobustScaler.from_state(checkpoint["node_scaler"])
        scorer.edge_scaler = RobustScaler.from_state(checkpoint["edge_scaler"])
        scorer.error_scale = torch.tensor(checkpoint["error_scale"], device=scorer.device)
        scorer.edge_error_scale = float(checkpoint["edge_error_scale"])
        scorer.steps_trained = int(checkpoint["steps_trained"])
        scorer.provenance = dict(checkpoint.get("provenance", {}))
        return scorer

    def copy(self) -> AnomalyScorer:
        """An independent copy (model, optimiser and scales), for what-if scoring."""
        return copy.deepcopy(self)


# ----------------------------------------------------------------------------- regions, baselines, clusters


def region_scores(
    node_scores: np.ndarray, region_of_node: np.ndarray, regions: int, top_fraction: float = 0.1
) -> np.ndarray:
    """Aggregate node scores per region: the mean of each region's top ``top_fraction`` scores.

    Parameters
    ----------
    node_scores : numpy.ndarray
        Per-node scores.
    region_of_node : numpy.ndarray
        Region index of each node (-1 for none).
    regions : int
        Number of regions.
    top_fraction : float
        Share of the highest node scores averaged (at least one node).

    Returns
    -------
    numpy.ndarray
        Score per region, NaN for regions without nodes.
    """
    result = np.full(regions, np.nan)
    valid = region_of_node >= 0
    order = np.lexsort((-node_scores[valid], region_of_node[valid]))
    sorted_regions = region_of_node[valid][order]
    sorted_scores = node_scores[valid][order]
    starts = np.searchsorted(sorted_regions, np.arange(regions))
    ends = np.searchsorted(sorted_regions, np.arange(regions), side="right")
    for region in np.flatnonzero(ends > starts):
        count = ends[region] - starts[region]
        take = max(1, math.ceil(top_fraction * count))
        result[region] = sorted_scores[starts[region] : starts[region] + take].mean()
    return result


def _robust_z(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    center = np.median(values[reference]) if reference.any() else np.median(values)
    spread = _MAD_TO_SIGMA * np.median(np.abs(values[reference] - center)) if reference.any() else 0.0
    if spread <= 1e-9:
        spread = float(np.std(values)) or 1.0
    return np.abs(values - center) / spread


def baseline_scores(data: Data) -> dict[str, np.ndarray]:
    """Hand-crafted anomaly scores from single node features (robust z-scores).

    Parameters
    ----------
    data : torch_geometric.data.Data
        Graph with raw features and an ``interior`` mask (the reference population).

    Returns
    -------
    dict
        ``nn_distance`` (mean distance to the K nearest columns), ``intensity`` (intensity
        relative to same-species neighbours or to the surrounding region, whichever departs
        more) and ``polarization`` (largest polarization change to a same-species neighbour),
        each a per-node score.
    """
    features = data.x.cpu().numpy().astype(np.float64)
    reference = data.interior.cpu().numpy().astype(bool)
    column = {name: features[:, index] for index, name in enumerate(NODE_FEATURES)}
    return {
        "nn_distance": _robust_z(column["nn_distance_mean_pm"], reference),
        # The stronger of the neighbour-relative and the regional intensity contrast.
        "intensity": np.maximum(
            _robust_z(column["relative_intensity"], reference),
            _robust_z(column["regional_intensity"], reference),
        ),
        "polarization": _robust_z(column["polarization_contrast_pm"], reference),
    }


def cluster_embeddings(
    embeddings: np.ndarray, method: Literal["dbscan", "hdbscan"] = "dbscan", eps: float | None = None,
    min_samples: int = 10, max_points: int | None = None, seed: int = 0,
) -> np.ndarray:  # fmt: skip
    """Cluster node embeddings as in the write-up (DBSCAN) or with HDBSCAN.

    Parameters
    ----------
    embeddings : numpy.ndarray
        ``(N, D)`` embeddings from :meth:`AnomalyScorer.embed`.
    method : str
        ``"dbscan"`` or ``"hdbscan"`` (scikit-learn's).
    eps : float, optional
        DBSCAN neighbourhood radius; by default the median 10th-neighbour distance.
    min_samples : int
        Core-point size.
    max_points : int, optional
        Cluster a random sample of this many nodes and give every other node the label of its
        nearest clustered sample (noise when that sample is noise or, for DBSCAN, farther than
        ``eps``). Both methods grow faster than linearly; on a whole 4k image (80k nodes) DBSCAN
        alone takes about 12 s on 2 cores, a 10k sample about a second.
    seed : int
        Seeds the sample.

    Returns
    -------
    numpy.ndarray
        Cluster label per node, -1 for noise.
    """
    from sklearn.cluster import DBSCAN, HDBSCAN
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(seed)
    sample_index = None
    points = embeddings
    if max_points is not None and len(embeddings) > max_points:
        sample_index = np.sort(rng.permutation(len(embeddings))[:max_points])
        points = embeddings[sample_index]
    if method == "hdbscan":
        labels = HDBSCAN(min_cluster_size=min_samples, copy=True).fit_predict(points)
    else:
        if eps is None:
            sample = points[np.random.default_rng(0).permutation(len(points))[:5000]]
            distance, _ = NearestNeighbors(n_neighbors=min(10, len(sample))).fit(sample).kneighbors(sample)
            eps = float(np.median(distance[:, -1])) or 1e-3
        labels = DBSCAN(eps=eps, min_samples=min_samples).fit_predict(points)
    if sample_index is None:
        return labels
    distance, nearest = NearestNeighbors(n_neighbors=1).fit(points).kneighbors(embeddings)
    result = labels[nearest[:, 0]]
    if method == "dbscan" and eps is not None:
        result = np.where(distance[:, 0] <= eps, result, -1)
    result[sample_index] = labels
    return result
