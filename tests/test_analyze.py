"""micrography analyze: outputs written and read back, numbers against ground truth, clear errors."""

from __future__ import annotations

import base64
import json
import re
import sys
from pathlib import Path

import h5py
import matplotlib.image
import numpy as np
import pytest

from agent.anomaly import cluster_embeddings
from agent.cli import main
from agent.columns import SPECIES_A, SPECIES_B
from agent.errors import DataFileError
from agent.graph import GraphConfig, MoleculeGraph, b_site_displacement, nn_distances_by_species
from analysis.analyze import (
    DOMAIN_NAMES,
    AnalysisOutputs,
    AnalyzeConfig,
    classify_domains,
    polarization_agreement,
    run_analysis,
)
from simulator.config import SimulatorConfig
from simulator.dataset import load_image
from simulator.export import export_specimen, read_ground_truth
from simulator.specimen import SITE_A, SITE_B, Specimen
from tests.conftest import specimen_with

PIXEL_NM = 0.02
FAST = AnalyzeConfig(gae_steps=40, vae_steps=150, cluster_sample=3000)
"""Bounded training so the suite stays fast; the stages and outputs are the same as the defaults'."""


@pytest.fixture(scope="module")
def dataset(
    tmp_path_factory: pytest.TempPathFactory, small_specimen: Specimen, small_config: SimulatorConfig
) -> Path:
    out = tmp_path_factory.mktemp("sm-bfo")
    export_specimen(small_specimen, small_config, out, pixel_size_nm=PIXEL_NM, dwell_us=4.0)
    return out


@pytest.fixture(scope="module")
def analysed(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> AnalysisOutputs:
    return run_analysis(dataset, tmp_path_factory.mktemp("analysis"), FAST)


# ----------------------------------------------------------------------------- outputs


def test_figure_html_and_json_are_written_and_read_back(analysed: AnalysisOutputs) -> None:
    figure = matplotlib.image.imread(analysed.figure)
    assert figure.ndim == 3 and figure.shape[0] > 800 and figure.shape[1] > 1000

    assert json.loads(analysed.json.read_text()) == json.loads(json.dumps(analysed.summary))
    summary = json.loads(analysed.json.read_text())
    for section in ("image", "columns", "nn_distances_pm", "knn_edge_distances_pm", "polarization",
                    "segmentation", "embedding", "anomaly", "timings_s", "peak_memory_mb"):  # fmt: skip
        assert section in summary
    assert set(summary["timings_s"]) >= {"load", "columns", "graph", "segmentation", "autoencoder", "report"}
    assert 0 < summary["peak_memory_mb"] < 4096

    page = analysed.html.read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 6  # the overview and one figure per analysis
    assert all(base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n" for data in images)
    assert not re.search(r'(src|href)="(?!data:)', page), "the report must not load external files"
    assert f"{summary['columns']['total']:,} columns" in page


def test_the_per_column_tables_agree_with_the_summary_and_read_back_from_csv_and_hdf5(
    analysed: AnalysisOutputs,
) -> None:
    import csv

    import h5py

    from agent.column_table import COLUMN_FIELDS, read_tables

    csv_path, vacancy_path, h5_path = analysed.tables
    columns, vacancies = read_tables(h5_path)
    summary = analysed.summary
    # One row per lattice (cation) column; the pure-O columns are counted but are no graph nodes.
    assert list(columns) == list(COLUMN_FIELDS) and len(columns["x_nm"]) == summary["columns"]["total"]
    counts = summary["columns"]["counts"]
    for site in "AB":
        assert int((columns["site"] == site).sum()) == counts[site]
    interior = columns["interior"]
    assert int(columns["anomalous"][interior].sum()) == summary["anomaly"]["anomalous_columns"]
    assert np.nanmax(columns["score"][interior]) == pytest.approx(summary["anomaly"]["max"])
    assert len(vacancies["x_nm"]) == sum(summary["columns"]["vacancy_sites"].values())
    with h5py.File(h5_path) as file:
        assert file["columns/x_nm"].attrs["unit"] == "nm"
        assert file["columns/lattice_rotation_deg"].attrs["unit"] == "degrees"
    with csv_path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(columns["x_nm"])
    for name in ("x_nm", "y_nm", "score", "polarization_pm"):
        np.testing.assert_array_equal([float(row[name]) for row in rows], columns[name])
    assert [row["site"] for row in rows] == list(columns["site"])
    assert vacancy_path.read_text().splitlines()[0] == "x_nm,y_nm,confidence"


def test_column_counts_and_species_fractions_match_the_ground_truth(
    analysed: AnalysisOutputs, dataset: Path
) -> None:
    truth = read_ground_truth(dataset / "ground_truth.h5")
    true_a = int(np.count_nonzero(truth.site == SITE_A))
    true_b = int(np.count_nonzero(truth.site == SITE_B))
    columns = json.loads(analysed.json.read_text())["columns"]
    assert columns["counts"]["A"] == pytest.approx(true_a, rel=0.03)
    # A few contaminant atoms of the amorphous patch are found as dim (B-like) columns.
    assert columns["counts"]["B"] == pytest.approx(true_b, rel=0.06)
    assert columns["fractions"]["A"] == pytest.approx(true_a / (true_a + true_b), abs=0.02)
    assert columns["total"] == columns["counts"]["A"] + columns["counts"]["B"]
    assert columns["lattice_spacing_nm"] == pytest.approx(truth.config.lattice_nm, rel=0.01)
    nn = json.loads(analysed.json.read_text())["nn_distances_pm"]
    assert nn["A-A"]["median"] == pytest.approx(1e3 * truth.config.lattice_nm, rel=0.02)
    assert nn["B-B"]["median"] == pytest.approx(1e3 * truth.config.lattice_nm, rel=0.03)
    assert nn["A-B"]["median"] == pytest.approx(1e3 * truth.config.lattice_nm / np.sqrt(2), rel=0.05)


def test_polarization_direction_per_domain_matches_the_ground_truth(
    analysed: AnalysisOutputs, dataset: Path
) -> None:
    truth = read_ground_truth(dataset / "ground_truth.h5")
    # Ground-truth domains: quadrant of the true polarization of B columns well inside a domain.
    polar = truth.polarization[truth.site == SITE_B]
    strong = np.all(np.abs(polar) > 0.5, axis=1)
    true_fraction = {}
    for name in DOMAIN_NAMES[:4]:
        sign_x, sign_y = (1 if name[0] == "+" else -1), (1 if name[2] == "+" else -1)
        true_fraction[name] = float(np.mean(strong & (np.sign(polar[:, 0]) == sign_x)
                                            & (np.sign(polar[:, 1]) == sign_y)))  # fmt: skip
    assert sum(f > 0.2 for f in true_fraction.values()) >= 2, "the test specimen must have two domains"

    domains = {row["domain"]: row for row in json.loads(analysed.json.read_text())["polarization"]["domains"]}
    for name, fraction in true_fraction.items():
        row = domains[name]
        assert row["fraction"] == pytest.approx(fraction, abs=0.07), name
        if fraction > 0.2:
            # The measured mean shift points into the domain's quadrant, with the planted magnitude.
            assert np.sign(row["mean_dx_pm"]) == (1 if name[0] == "+" else -1)
            assert np.sign(row["mean_dy_pm"]) == (1 if name[2] == "+" else -1)
            planted_pm = 1e3 * truth.config.polar_displacement_nm
            assert row["mean_magnitude_pm"] == pytest.approx(planted_pm, rel=0.25)


def test_polarization_agrees_with_the_datasets_pxy(analysed: AnalysisOutputs) -> None:
    dataset_pxy = json.loads(analysed.json.read_text())["polarization"]["dataset_pxy"]
    assert dataset_pxy["matched_cells"] > 0.9 * dataset_pxy["cells"]
    assert dataset_pxy["same_quadrant_fraction"] > 0.9
    assert dataset_pxy["median_angle_deg"] < 25


def test_segmentation_and_clusters_are_reported(analysed: AnalysisOutputs) -> None:
    summary = json.loads(analysed.json.read_text())
    segmentation = summary["segmentation"]
    for method in ("gmm", "vae"):
        fractions = [row["fraction"] for row in segmentation[method]]
        assert len(fractions) == 3 and sum(fractions) == pytest.approx(1.0)
        # Class 0 holds the brightest patch centres: the A columns.
        assert segmentation[method][0]["b_site_fraction"] < 0.1
    assert segmentation["agreement_ari"] > 0.5
    embedding = summary["embedding"]
    assert embedding["clusters"] >= 1
    assert sum(row["nodes"] for row in embedding["table"]) == summary["columns"]["total"]
    anomaly = summary["anomaly"]
    assert 0 < anomaly["anomalous_columns"] < summary["columns"]["total"]
    # Only columns above the threshold are circled, and the tables count what the map shows.
    assert 0 < len(anomaly["hotspots"]) <= 10
    assert all(spot["score"] > anomaly["threshold"] for spot in anomaly["hotspots"])
    table = embedding["table"]
    assert sum(row["interior_nodes"] for row in table) == anomaly["score"]["count"]
    assert sum(row["anomalous"] for row in table) == anomaly["anomalous_columns"]
    assert max(row["mean_score"] for row in table if row["interior_nodes"]) <= anomaly["max"]


def test_a_quiet_image_circles_no_hot_spots(dataset: Path) -> None:
    from analysis.analyze import analyze_image, summarise

    result = analyze_image(load_image(dataset), FAST)
    assert result.scores is not None and result.graph is not None
    quiet = float(result.scores[result.graph.interior].max()) + 1.0
    result.config = result.config.model_copy(update={"anomaly_threshold": quiet})
    anomaly = summarise(result, {})["anomaly"]
    assert anomaly["hotspots"] == [] and anomaly["anomalous_columns"] == 0


# ----------------------------------------------------------------------------- building blocks


def _perfect_lattice(cells: int, spacing: float, shift: tuple[float, float]) -> MoleculeGraph:
    i, j = np.meshgrid(np.arange(cells), np.arange(cells), indexing="ij")
    a_xy = np.stack([i.ravel(), j.ravel()], 1) * spacing
    b_xy = a_xy[(i.ravel() < cells - 1) & (j.ravel() < cells - 1)] + 0.5 * spacing + np.array(shift)
    from agent.columns import Columns

    xy = np.concatenate([a_xy, b_xy])
    count = len(xy)
    species = np.r_[np.full(len(a_xy), SPECIES_A), np.full(len(b_xy), SPECIES_B)].astype(np.int8)
    columns = Columns(
        x_nm=xy[:, 0], y_nm=xy[:, 1], row_px=xy[:, 1] / 0.02, col_px=xy[:, 0] / 0.02,
        intensity=np.where(species == SPECIES_A, 10.0, 2.0),
        scattering=np.where(species == SPECIES_A, 10.0, 2.0),
        peak_height=np.ones(count), background=np.zeros(count), width_px=np.full(count, 1.5),
        species=species, abnormal=np.zeros(count, dtype=bool), quality=np.ones(count), pixel_size_nm=0.02,
        lattice_spacing_nm=spacing,
    )  # fmt: skip
    graph = MoleculeGraph(GraphConfig(lattice_spacing_nm=spacing))
    graph.merge(columns, (-0.5 * spacing, cells * spacing, -0.5 * spacing, cells * spacing))
    return graph


def test_b_site_displacement_and_species_distances_on_a_perfect_lattice() -> None:
    spacing = 0.4
    graph = _perfect_lattice(12, spacing, shift=(0.02, -0.01))
    positions = np.stack([graph.x_nm, graph.y_nm], 1)
    displacement, valid = b_site_displacement(positions, graph.species, spacing)
    b_site = graph.species == SPECIES_B
    assert valid[b_site].all() and not valid[~b_site].any()
    np.testing.assert_allclose(displacement[b_site], np.tile([0.02, -0.01], (b_site.sum(), 1)), atol=1e-12)
    # The graph's own polarization proxy is the same function.
    np.testing.assert_allclose(graph.displacement_nm[b_site], displacement[b_site], atol=1e-12)

    distances = nn_distances_by_species(graph)
    assert np.median(distances["A-A"]) == pytest.approx(1e3 * spacing)
    assert np.median(distances["B-B"]) == pytest.approx(1e3 * spacing)
    # The shift splits the four A-B distances into pairs around spacing / sqrt(2).
    assert np.median(distances["A-B"]) == pytest.approx(1e3 * spacing / np.sqrt(2), rel=0.06)


def test_domains_follow_the_lattice_frame() -> None:
    shifts = np.array([[20.0, 20.0], [-20.0, 20.0], [-20.0, -20.0], [20.0, -20.0], [2.0, -1.0]])
    assert list(classify_domains(shifts, 0.0, 8.0)) == [0, 1, 2, 3, 4]
    # A lattice turned by 90 degrees relabels the quadrants one step on.
    assert list(classify_domains(shifts, 90.0, 8.0)) == [3, 0, 1, 2, 4]
    agreement = polarization_agreement(shifts[:4] + 1.0, shifts[:4] * 3)
    assert agreement["same_quadrant_fraction"] == 1.0
    assert agreement["corr_x"] == pytest.approx(1.0) and agreement["corr_y"] == pytest.approx(1.0)


def test_sampled_clustering_labels_every_node_like_its_blob() -> None:
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 5.0]])
    blob = np.repeat(np.arange(3), 3000)
    points = centres[blob] + rng.normal(0, 0.5, (blob.size, 3))
    for method in ("dbscan", "hdbscan"):
        labels = cluster_embeddings(points, method, max_points=900, min_samples=10)
        kept = labels >= 0
        # DBSCAN's default radius (median 10th-neighbour distance) leaves the sparse blob rims as noise.
        assert kept.mean() > 0.6, method
        assert np.unique(labels[kept]).size == 3, method
        assert adjusted_rand_score(blob[kept], labels[kept]) == pytest.approx(1.0), method


# ----------------------------------------------------------------------------- vendor files and errors


def _write_emd(path: Path, image: np.ndarray, scale: float, units: str) -> Path:
    from rsciio.emd import file_writer

    axes = [
        {"name": name, "size": size, "offset": 0.0, "scale": scale, "units": units, "navigate": False}
        for name, size in (("y", image.shape[0]), ("x", image.shape[1]))
    ]
    signal = {"data": image, "axes": axes, "metadata": {"General": {"title": "HAADF"}, "Signal": {}},
              "original_metadata": {}}  # fmt: skip
    file_writer(str(path), signal)
    return path


def test_vendor_emd_file_is_analysed_with_its_own_pixel_size(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("rsciio", reason="the optional 'vendor' extra (rosettasciio) is not installed")
    crop = load_image(dataset).image[:400, :400]
    path = _write_emd(tmp_path / "haadf.emd", crop, 10 * PIXEL_NM, "Å")
    recorded = load_image(path)
    assert recorded.pixel_size_nm == pytest.approx(PIXEL_NM)
    np.testing.assert_array_equal(recorded.image, crop)

    out = tmp_path / "out"
    status = main(
        ["analyze", str(path), "--out", str(out), "--gae-steps", "10", "--vae-steps", "20", "--quiet"]
    )
    assert status == 0
    printed = capsys.readouterr().out
    assert str(out / "report.html") in printed
    summary = json.loads((out / "analysis.json").read_text())
    assert summary["image"]["pixel_size_nm"] == pytest.approx(PIXEL_NM)
    assert summary["image"]["attrs"]["source_format"].startswith("EMD")
    assert summary["columns"]["total"] > 600  # 8 x 8 nm: about 800 columns
    assert "dataset_pxy" not in summary["polarization"]


def test_vendor_file_without_the_extra_names_the_remedy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "scan.dm4"
    path.write_bytes(b"\x00" * 64)
    # A None entry makes the import fail, as on a machine without rosettasciio.
    monkeypatch.setitem(sys.modules, "rsciio.digitalmicrograph", None)
    with pytest.raises(DataFileError, match=r"scan\.dm4: .*needs the optional 'vendor' extra.*pip install"):
        load_image(path)


def _garbage(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def _wrong_dataset(path: Path) -> Path:
    with h5py.File(path, "w") as file:
        file.create_dataset("Image", data=np.zeros((64, 64)))
    return path


@pytest.mark.parametrize(
    ("make", "extra", "message"),
    [
        (lambda d: d / "missing.npy", ["--pixel-size", "0.02"], r"missing\.npy: file not found"),
        (lambda d: d / "Sm_10_9_HAADF.h5", [], r"Sm_10_9_HAADF\.h5: no such file"),
        (lambda d: _garbage(d / "Sm_10_1_HAADF.h5", b"not hdf5" * 20), [],
         r"Sm_10_1_HAADF\.h5: cannot read as HDF5"),
        (lambda d: _wrong_dataset(d / "Sm_10_2_HAADF.h5"), [],
         r"Sm_10_2_HAADF\.h5: dataset 'MainImage' is missing; datasets present: Image"),
        (lambda d: _garbage(d / "image.npy", b"\x93NUMPY garbage"), ["--pixel-size", "0.02"],
         r"image\.npy: not a plain numeric \.npy array"),
        (lambda d: _garbage(d / "broken.emd", b"garbage" * 10), [], r"broken\.emd: cannot read as EMD"),
        (lambda d: _garbage(d / "image.jpg", b"\xff\xd8"), [],
         r"image\.jpg: unsupported image format '\.jpg'"),
    ],
)  # fmt: skip
def test_unreadable_files_give_one_line_naming_the_file_and_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make: object, extra: list[str], message: str
) -> None:
    path = make(tmp_path)  # type: ignore[operator]
    status = main(["analyze", str(path), "--out", str(tmp_path / "out"), "--quiet", *extra])
    error = capsys.readouterr().err
    assert status == 1
    assert error.startswith("micrography: error: ") and error.count("\n") == 1, error
    assert re.search(message, error), error
    assert "Traceback" not in error
    assert not (tmp_path / "out" / "analysis.json").exists()


def test_an_image_without_pixel_size_asks_for_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "frame.npy"
    np.save(path, np.zeros((64, 64), dtype=np.float32))
    assert main(["analyze", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 1
    assert re.search(
        r"frame\.npy: the file gives no pixel size; pass it with --pixel-size", capsys.readouterr().err
    )


def test_bench_analyze_checks_its_hot_spots_against_the_planted_features(tmp_path: Path) -> None:
    from analysis.bench_analyze import HOTSPOT_RADIUS_NM, benchmark_analyze, format_report
    from analysis.ground_truth import nearest_planted_feature

    # 20 nm at 0.04 nm/px with one of each extended feature: the bench's path in about 15 s.
    features = specimen_with(
        domain_walls=1, dislocations=1, strained_patches=1, vacancy_clusters=2, substitution_clusters=2,
        phase_patches=0, amorphous_patches=1, amorphous_patch_radius_nm=2.0, edge_margin_nm=3.0,
    )  # fmt: skip
    report = benchmark_analyze(
        size_px=512, pixel_size_nm=0.04, seeds=(3,), out_dir=tmp_path, specimen=features
    )
    (row,) = report["rows"]
    analysis = json.loads(Path(row["outputs"]["analysis.json"]).read_text())
    threshold = analysis["anomaly"]["threshold"]
    assert row["hotspots"] and all(spot["score"] > threshold for spot in row["hotspots"])
    # The distances are measured against the specimen written next to the image.
    specimen = read_ground_truth(tmp_path / "seed-3" / "data" / "ground_truth.h5")
    x, y = (np.array([spot[key] for spot in row["hotspots"]]) for key in ("x_nm", "y_nm"))
    distance, labels = nearest_planted_feature(x, y, specimen)
    np.testing.assert_allclose([spot["nearest_feature_nm"] for spot in row["hotspots"]], distance)
    assert [spot["nearest_feature"] for spot in row["hotspots"]] == labels
    assert row["hotspots_on_features"] == int(np.sum(distance <= HOTSPOT_RADIUS_NM))
    assert report["summary"]["hotspots_on_features_mean"] == row["hotspots_on_features"]
    text = format_report(report)
    assert f"{row['hotspots_on_features']} of {len(row['hotspots'])} within 2 nm" in text
    assert f"{row['image']['columns']:,} columns found" in text


def test_a_given_checkpoint_replaces_fitting_and_a_bad_one_is_a_clear_error(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent.anomaly import AnomalyConfig, AnomalyScorer

    scorer = AnomalyScorer(AnomalyConfig(device="cpu"))
    scorer.fit([_perfect_lattice(12, 0.396, shift=(0.015, 0.015)).to_pyg()], steps=3)
    checkpoint = scorer.save(tmp_path / "model.pt")
    image = tmp_path / "crop.npy"
    np.save(image, load_image(dataset).image[:400, :400])
    out = tmp_path / "out"
    arguments = ["analyze", str(image), "--pixel-size", str(PIXEL_NM), "--vae-steps", "20", "--quiet"]
    assert main([*arguments, "--out", str(out), "--model", str(checkpoint)]) == 0
    embedding = json.loads((out / "analysis.json").read_text())["embedding"]
    assert embedding["model"] == str(checkpoint) and embedding["gae_steps"] == 0

    broken = _garbage(tmp_path / "broken.pt", b"not a checkpoint")
    capsys.readouterr()
    assert main([*arguments, "--out", str(tmp_path / "out2"), "--model", str(broken)]) == 1
    assert re.search(r"broken\.pt: not a readable checkpoint", capsys.readouterr().err)
