from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from agent.anomaly import (
    AnomalyConfig,
    AnomalyScorer,
    CheckpointError,
    baseline_scores,
    cluster_embeddings,
    region_scores,
)
from agent.errors import MicrographyError
from agent.graph import NODE_FEATURES
from analysis.training import LabelledGraph, scan_specimen
from simulator.config import SimulatorConfig
from simulator.specimen import LABEL_CODE

FAST = AnomalyConfig(device="cpu", warmup_steps=80, batch_nodes=3000, seed=3)


@pytest.fixture(scope="module")
def labelled(small_config: SimulatorConfig) -> LabelledGraph:
    return scan_specimen(small_config.seed, small_config, tile_px=1024, dwell_us=32.0)


@pytest.fixture(scope="module")
def trained(labelled: LabelledGraph) -> AnomalyScorer:
    scorer = AnomalyScorer(FAST)
    scorer.fit([labelled.graph.to_pyg()])
    return scorer


def surrounding_contrast(labelled: LabelledGraph, scores: np.ndarray, kind: str) -> list[float]:
    """For each planted feature of a kind: AUROC of its nodes against normal nodes within 3 nm."""
    graph, labels = labelled.graph, labelled.label
    interior = graph.interior
    results = []
    for feature in labelled.specimen.features:
        if feature.kind != kind:
            continue
        members = np.flatnonzero((labels == LABEL_CODE[kind]) & interior)
        x, y = feature.center_nm
        if kind == "domain_wall":
            members = members[np.hypot(graph.x_nm[members] - 15, graph.y_nm[members] - 15) < 10]
        else:
            members = members[np.hypot(graph.x_nm[members] - x, graph.y_nm[members] - y) < 3]
        if members.size < 3:
            continue
        centre = (graph.x_nm[members].mean(), graph.y_nm[members].mean())
        around = graph.nodes_near(*centre, 4.0)
        around = around[(labels[around] == LABEL_CODE["normal"]) & interior[around]]
        truth = np.r_[np.ones(members.size), np.zeros(around.size)]
        results.append(roc_auc_score(truth, np.r_[scores[members], scores[around]]))
    return results


@pytest.mark.parametrize(
    ("kind", "minimum"), [("vacancy", 0.95), ("dislocation_core", 0.95), ("domain_wall", 0.8)]
)
def test_planted_defects_score_above_the_surrounding_lattice(
    labelled: LabelledGraph, trained: AnomalyScorer, kind: str, minimum: float
) -> None:
    scores = trained.score(labelled.graph.to_pyg()).score
    contrasts = surrounding_contrast(labelled, scores, kind)
    assert contrasts, f"no {kind} in the small specimen's scanned interior"
    assert min(contrasts) >= minimum


def test_scores_are_about_one_on_normal_lattice(labelled: LabelledGraph, trained: AnomalyScorer) -> None:
    result = trained.score(labelled.graph.to_pyg())
    normal = (labelled.label == LABEL_CODE["normal"]) & labelled.graph.interior
    assert 0.5 < np.median(result.score[normal]) < 2.0
    assert result.feature_z.shape == (len(labelled.graph), len(NODE_FEATURES))


def test_explain_names_the_feature_that_made_a_node_unusual(
    labelled: LabelledGraph, trained: AnomalyScorer
) -> None:
    data = labelled.graph.to_pyg()
    vacancy_nodes = np.flatnonzero((labelled.label == LABEL_CODE["vacancy"]) & labelled.graph.interior)
    scores = trained.score(data).score
    worst = int(vacancy_nodes[np.argmax(scores[vacancy_nodes])])
    explanation = trained.explain(data, worst)
    assert next(iter(explanation)) in {
        "coordination_deviation", "nn_distance_mean_pm", "nn_distance_std_pm", "nn_distance_min_pm",
        "lattice_distance_pm", "lattice_angle_deviation_deg", "polarization_pm", "polarization_x_pm",
        "polarization_y_pm", "polarization_contrast_pm", "lattice_rotation_deg",
    }  # fmt: skip
    assert "edge_geometry" in explanation
    values = list(explanation.values())
    assert values == sorted(values, reverse=True)


def test_training_is_deterministic_on_cpu(labelled: LabelledGraph) -> None:
    # Bitwise repeatable on one thread (sessions run so); several threads may sum in another order.
    data = labelled.graph.to_pyg()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = []
        for _ in range(2):
            scorer = AnomalyScorer(FAST.model_copy(update={"warmup_steps": 10}))
            losses = scorer.fit([data])
            runs.append((losses, scorer.score(data).score))
    finally:
        torch.set_num_threads(threads)
    assert runs[0][0] == runs[1][0]
    np.testing.assert_array_equal(runs[0][1], runs[1][1])


def test_checkpoint_round_trip(tmp_path: Path, labelled: LabelledGraph, trained: AnomalyScorer) -> None:
    data = labelled.graph.to_pyg()
    path = trained.save(tmp_path / "gae.pt")
    loaded = AnomalyScorer.load(path, device="cpu")
    np.testing.assert_allclose(loaded.score(data).score, trained.score(data).score, rtol=1e-6)
    assert loaded.steps_trained == trained.steps_trained
    assert loaded.config == trained.config


def test_recalibrate_rescales_errors_to_new_tiles_and_keeps_the_weights(
    labelled: LabelledGraph, trained: AnomalyScorer
) -> None:
    data = labelled.graph.to_pyg()
    noisier = data.clone()
    # Tiles at a quarter of the dose: every continuous feature twice as noisy about its value.
    generator = torch.Generator().manual_seed(0)
    continuous = [i for i, name in enumerate(NODE_FEATURES) if name != "is_b_site"]
    spread = trained.node_scaler.scale[continuous]  # type: ignore[union-attr]
    noise = torch.randn(noisier.x.shape[0], len(continuous), generator=generator) * spread
    noisier.x[:, continuous] += noise
    scorer = trained.copy()
    normal = (labelled.label == LABEL_CODE["normal"]) & labelled.graph.interior
    before = np.median(scorer.score(noisier).score[normal])
    weights = {key: value.clone() for key, value in scorer.model.state_dict().items()}
    scorer.recalibrate([noisier])
    after = np.median(scorer.score(noisier).score[normal])
    assert before > 1.5 and 0.5 < after < 2.0  # normal lattice back to about 1 at the new noise
    for key, value in scorer.model.state_dict().items():
        torch.testing.assert_close(value, weights[key], rtol=0, atol=0)
    with pytest.raises(MicrographyError, match="not trained yet"):
        AnomalyScorer(FAST).recalibrate([data])


def test_checkpoint_keeps_its_provenance(tmp_path: Path, trained: AnomalyScorer) -> None:
    scorer = trained.copy()
    scorer.provenance = {"specimen_seeds": [1001, 1002], "dwell_us": 8.0}
    assert AnomalyScorer.load(scorer.save(tmp_path / "gae.pt")).provenance == scorer.provenance


def test_the_shipped_model_is_small_current_and_made_by_the_documented_command() -> None:
    from agent.anomaly import SHIPPED_CHECKPOINT, resolve_checkpoint
    from analysis.training import SCAN_PIXEL_NM, SCAN_TILE_PX, TRAINING_SEEDS

    path = resolve_checkpoint("shipped")
    assert path == SHIPPED_CHECKPOINT and path.stat().st_size < 1_000_000
    # Loading checks the feature schema: a feature change without retraining fails here.
    scorer = AnomalyScorer.load(path, device="cpu")
    # README "A shipped anomaly model": the command and what it records.
    assert scorer.provenance == {
        "specimen_seeds": list(TRAINING_SEEDS), "tile_px": SCAN_TILE_PX, "pixel_size_nm": SCAN_PIXEL_NM,
        "dwell_us": 8.0, "steps": AnomalyConfig().warmup_steps, "seed": 0, "simulator": "default",
        "deterministic": True,
    }  # fmt: skip
    assert scorer.config == AnomalyConfig().model_copy(update={"device": "cpu"})
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert (
        "micrography train --out agent/models/gae-bfo-001.pt --dwell 8 --deterministic --overwrite" in readme
    )


def test_checkpoint_schema_and_format_errors(tmp_path: Path, trained: AnomalyScorer) -> None:
    path = trained.save(tmp_path / "gae.pt")
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["node_features"] = [*checkpoint["node_features"][:-1], "mystery_feature"]
    torch.save(checkpoint, tmp_path / "schema.pt")
    with pytest.raises(
        CheckpointError,
        match=r"node features differ.*missing \['vacant_neighbour_sites'\].*unexpected \['mystery_feature'\]",
    ):
        AnomalyScorer.load(tmp_path / "schema.pt")
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["version"] = 99
    torch.save(checkpoint, tmp_path / "version.pt")
    with pytest.raises(CheckpointError, match="checkpoint version 99"):
        AnomalyScorer.load(tmp_path / "version.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        AnomalyScorer.load(tmp_path / "garbage.pt")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        AnomalyScorer.load(tmp_path / "absent.pt")


def test_untrained_scorer_and_empty_graphs_are_clear_errors(labelled: LabelledGraph) -> None:
    scorer = AnomalyScorer(FAST)
    with pytest.raises(MicrographyError, match="not trained yet"):
        scorer.score(labelled.graph.to_pyg())
    with pytest.raises(MicrographyError, match="empty graphs"):
        scorer.fit([labelled.graph.to_pyg(np.zeros(0, dtype=np.int64))])


def test_online_update_follows_new_tiles(labelled: LabelledGraph, trained: AnomalyScorer) -> None:
    scorer = trained.copy()
    before = scorer.steps_trained
    nodes = labelled.graph.nodes_in(5, 12, 5, 12)
    losses = scorer.update(labelled.graph.to_pyg(nodes))
    assert len(losses) == scorer.config.online_steps
    assert scorer.steps_trained == before + scorer.config.online_steps
    assert trained.steps_trained == before  # the copy is independent


@pytest.mark.parametrize("architecture", ["gatv2", "gcn", "seed"])
def test_other_architectures_train_and_score(labelled: LabelledGraph, architecture: str) -> None:
    data = labelled.graph.to_pyg()
    scorer = AnomalyScorer(FAST.model_copy(update={"architecture": architecture, "warmup_steps": 5}))
    scorer.fit([data])
    assert np.all(np.isfinite(scorer.score(data).score))


def test_region_scores_average_the_top_share() -> None:
    scores = np.array([1.0, 2.0, 3.0, 10.0, 5.0, 0.5])
    region = np.array([0, 0, 0, 0, 1, -1])
    result = region_scores(scores, region, 3, top_fraction=0.5)
    np.testing.assert_allclose(result[:2], [6.5, 5.0])
    assert np.isnan(result[2])


def test_baselines_and_clusters(labelled: LabelledGraph, trained: AnomalyScorer) -> None:
    data = labelled.graph.to_pyg()
    baselines = baseline_scores(data)
    assert set(baselines) == {"nn_distance", "intensity", "polarization"}
    walls = labelled.label == LABEL_CODE["domain_wall"]
    assert np.median(baselines["polarization"][walls]) > np.median(baselines["polarization"][~walls])
    embedding = trained.embed(data)
    assert embedding.shape == (len(labelled.graph), FAST.latent)
    for method in ("dbscan", "hdbscan"):
        clusters = cluster_embeddings(embedding, method=method)
        assert clusters.shape == (len(labelled.graph),) and clusters.max() >= 0


def test_fit_decays_the_rate_averages_the_tail_and_hands_update_the_base_rate(
    labelled: LabelledGraph,
) -> None:
    data = labelled.graph.to_pyg()
    config = FAST.model_copy(update={"warmup_steps": 12, "average_fraction": 0.5})
    rates: list[float] = []
    scorer = AnomalyScorer(config)
    scorer.fit([data], progress=lambda _: rates.append(scorer.optimizer.param_groups[0]["lr"]))
    assert rates[0] == pytest.approx(config.learning_rate)
    assert rates[-1] == pytest.approx(config.learning_rate * config.final_lr_fraction)
    assert (np.diff(rates) <= 0).all()
    # update() follows the specimen at the base rate, not the end of the decay.
    assert scorer.optimizer.param_groups[0]["lr"] == pytest.approx(config.learning_rate)
    # The returned weights are the tail average: not the last iterate of the same run.
    last = AnomalyScorer(config.model_copy(update={"average_fraction": 0.0}))
    last.fit([data])
    averaged = torch.cat([p.detach().flatten() for p in scorer.model.parameters()])
    final = torch.cat([p.detach().flatten() for p in last.model.parameters()])
    assert not torch.equal(averaged, final)
    constant = AnomalyScorer(config.model_copy(update={"schedule": "constant"}))
    seen: list[float] = []
    constant.fit([data], progress=lambda _: seen.append(constant.optimizer.param_groups[0]["lr"]))
    assert set(seen) == {config.learning_rate}


def test_benchmark_nodes_leave_out_the_cut_edge_of_the_specimen(labelled: LabelledGraph) -> None:
    from analysis.training import SPECIMEN_EDGE_MARGIN_NM

    keep = labelled.evaluable
    width, height = labelled.specimen.size_nm
    x, y = labelled.graph.x_nm, labelled.graph.y_nm
    to_boundary = np.minimum.reduce([x, width - x, y, height - y])
    assert keep.any()
    assert not keep[to_boundary <= SPECIMEN_EDGE_MARGIN_NM].any()
    assert not keep[labelled.label < 0].any()
    assert not keep[~labelled.graph.interior].any()
    inner = labelled.graph.interior & (labelled.label >= 0) & (to_boundary > SPECIMEN_EDGE_MARGIN_NM)
    np.testing.assert_array_equal(keep, inner)


def test_top_precision_counts_defects_at_the_top_of_the_list() -> None:
    from analysis.bench_anomaly import top_precision

    truth = np.zeros(1000, dtype=bool)
    truth[:5] = True
    scores = np.linspace(1, 0, 1000)  # the five defects rank first
    assert top_precision(truth, scores, 0.001) == 1.0  # one node: a defect
    assert top_precision(truth, scores, 0.01) == 0.5  # ten nodes: five defects
    assert top_precision(truth, -scores, 0.01) == 0.0


def test_session_comparison_ranks_the_same_nodes_for_shipped_and_warmed_up_models() -> None:
    from agent.anomaly import SHIPPED_CHECKPOINT
    from analysis.bench_anomaly import format_session_model, session_model_comparison

    comparison = session_model_comparison(
        evaluation_seeds=(0,), warmup_seeds=(0, 1), warmup_steps=5, grid=2, start_cells=((0, 0), (1, 1))
    )
    assert comparison["checkpoint"] == str(SHIPPED_CHECKPOINT)
    assert comparison["provenance"] == AnomalyScorer.load(SHIPPED_CHECKPOINT).provenance
    assert comparison["scan"] == {
        "tile_px": 512,
        "pixel_size_nm": 0.02,
        "dwell_us": 8.0,
        "grid": 2,
        "start_tiles": 2,
    }
    rows = comparison["rows"]
    # Every scorer judged the same nodes: equal positives per class.
    for defect_class in ("all", "domain_wall"):
        counts = {
            (r["scorer"], r.get("warmup_seed")): r["positives"]
            for r in rows
            if r["defect_class"] == defect_class
        }
        assert set(counts) == {("shipped", None), ("shipped_as_trained", None), ("warmup", 0), ("warmup", 1)}
        assert len(set(counts.values())) == 1
    overall = {e["scorer"]: e for e in comparison["summary"] if e["defect_class"] == "all"}
    assert overall["warmup"]["seeds"] == 2 and overall["warmup"]["auroc_std"] is not None
    assert all(0.5 < overall[name]["auroc_mean"] <= 1.0 for name in ("shipped", "shipped_as_trained"))
    text = "\n".join(format_session_model(comparison))
    assert "2 x 2 tiles of 512 px" in text and f"{overall['shipped']['auroc_mean']:.3f}" in text


def test_deterministic_torch_restores_the_threads_and_the_flag() -> None:
    from agent.anomaly import deterministic_torch

    threads, flag = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    with deterministic_torch():
        assert torch.get_num_threads() == 1 and torch.are_deterministic_algorithms_enabled()
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (threads, flag)
