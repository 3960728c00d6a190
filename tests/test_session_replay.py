"""Offline replay and comparison of recorded sessions (analysis/replay.py, analysis/compare.py)."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py
import matplotlib.image
import numpy as np
import pytest
from scipy import stats

from agent.anomaly import AnomalyConfig, AnomalyScorer
from agent.cli import main
from agent.driver import ScanRequest
from agent.graph import MoleculeGraph
from agent.journal import JournalError, SessionJournal, read_journal
from agent.session import BudgetConfig, ScanSettings, Session, SessionConfig
from agent.survey import CandidateGrid
from analysis.compare import (
    CompareError,
    RunCurve,
    Series,
    format_table,
    fractions_table,
    load_bench_series,
    run_compare,
)
from analysis.guidance import DiscoveryTracker, detected_features, feature_candidates, recorded_ground_truth
from analysis.replay import (
    ReplayError,
    final_region_scores,
    format_replay,
    parse_steps,
    rank_change,
    replay_journal,
    rescore_tiles,
    run_replay,
    tile_region_scores,
)
from simulator.config import SimulatorConfig
from simulator.drivers import SimulatedMicroscope
from simulator.specimen import Specimen

TILES = 10


@dataclass
class Recorded:
    """A small session as it ran live (the numbers replay and compare must reproduce)."""

    journal: Path
    config: SessionConfig
    imaged: list[float]  # imaged fraction after each tile, from the live run's tracker
    detected: float  # detected fraction at the end of the live run
    final_scores: list[float | None]  # region score of each step as the live run ingested it
    grid_tiles: int


def _record(directory: Path, policy: str, simulator: SimulatorConfig, specimen: Specimen) -> Recorded:
    config = SessionConfig(
        policy=policy,
        seed=simulator.seed,
        budget=BudgetConfig(max_tiles=TILES),
        tiles=ScanSettings(pixel_size_nm=0.02, dwell_us=8.0, shape=(256, 256)),
        start_tiles=3,
        warmup_steps=20,
        simulator=simulator.model_dump(mode="json"),
    )
    journal = directory / f"{policy}" / "journal.h5"
    with SimulatedMicroscope(simulator, specimen) as microscope:
        grid = CandidateGrid.tiling(microscope.describe(), config.tiles.shape, config.tiles.pixel_size_nm)
        tracker = DiscoveryTracker(specimen, grid)
        session = Session(microscope, config, journal, on_step=tracker)
        session.run()
    return Recorded(
        journal=journal,
        config=config,
        imaged=[point["imaged_fraction"] for point in tracker.curve],
        detected=len(detected_features(session, specimen)) / tracker.total,
        final_scores=[None if not np.isfinite(step.score) else step.score for step in session.steps],
        grid_tiles=len(grid),
    )


@pytest.fixture(scope="module")
def guided(tmp_path_factory: pytest.TempPathFactory, small_config: SimulatorConfig, small_specimen: Specimen):
    return _record(tmp_path_factory.mktemp("guided"), "guided", small_config, small_specimen)


@pytest.fixture(scope="module")
def raster(tmp_path_factory: pytest.TempPathFactory, small_config: SimulatorConfig, small_specimen: Specimen):
    return _record(tmp_path_factory.mktemp("raster"), "raster", small_config, small_specimen)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- replay


def test_replay_reproduces_the_recorded_scores_and_writes_figures_and_json(
    guided: Recorded, small_specimen: Specimen, tmp_path: Path
) -> None:
    before = _digest(guided.journal)
    report = run_replay(guided.journal, tmp_path / "replay", every=4, steps="2,last", progress=False)
    assert _digest(guided.journal) == before, "a replay must never write to the journal"

    contents = read_journal(guided.journal)
    assert len(report["steps"]) == len(contents.steps) == TILES + 1
    # Region scores and graph sizes, step by step, against the numbers in the journal.
    for step, replayed in zip(contents.steps, report["steps"], strict=True):
        assert replayed["request_id"] == step.record["request"]["request_id"]
        assert replayed["replayed_nodes"] == step.record.get("nodes")
        if step.record["score"] is None:
            assert replayed["replayed_score"] is None
        else:
            assert replayed["replayed_score"] == pytest.approx(step.record["score"], abs=1e-9)
    guided_scores = [s for s in report["steps"] if s["kind"] == "guided"]
    scored = sum(s["replayed_score"] is not None for s in guided_scores)
    assert guided_scores and scored >= 0.5 * len(guided_scores)
    # A guided tile has no score only where it holds no lattice (an amorphous patch), and says so.
    for step, replayed in zip(contents.steps, report["steps"], strict=True):
        if replayed["kind"] == "guided" and replayed["replayed_score"] is None:
            assert step.columns is not None and len(step.columns) == 0 and step.columns.reason
    assert report["reproduction"]["scores_reproduced"] and report["reproduction"]["nodes_reproduced"]
    assert report["reproduction"]["max_abs_score_difference"] <= 1e-9
    # The final region score of the last tile is what the session ingested for it (same graph, same model).
    last = report["final_region_scores"][-1]
    assert last["final_score"] == pytest.approx(guided.final_scores[-1], abs=1e-9)
    assert len(report["final_region_scores"]) == TILES

    # Ground truth: what the live run's tracker saw.
    truth = report["ground_truth"]
    assert truth["available"] and truth["reason"] is None
    assert truth["imaged_features"] / truth["planted_features"] == pytest.approx(guided.imaged[-1])
    assert truth["detected_features"] / truth["planted_features"] == pytest.approx(guided.detected)
    assert [s["imaged_fraction"] for s in report["steps"][1:]] == pytest.approx(guided.imaged)

    # Timings: the recorded totals are the journal's sums; the replay timed every stage too.
    recorded_columns = sum(
        s.record["timings"]["columns"] for s in contents.steps if s.record["kind"] != "survey"
    )
    assert report["timings"]["recorded"]["columns"]["total_s"] == pytest.approx(recorded_columns)
    assert {"graph", "anomaly", "surrogate", "decision"} <= set(report["timings"]["replayed"])

    # Figures: the final one and one per chosen step (2, the last, and every 4th tile: steps 4 and 8).
    out = tmp_path / "replay"
    assert sorted(p.name for p in (out / "steps").iterdir()) == [
        "step-0002.png", "step-0004.png", "step-0008.png", "step-0010.png"
    ]  # fmt: skip
    assert matplotlib.image.imread(out / "replay.png").shape[2] in (3, 4)
    assert matplotlib.image.imread(out / "steps" / "step-0004.png").shape[0] > 200
    assert json.loads((out / "replay.json").read_text()) == json.loads(json.dumps(report))
    text = format_replay(report)
    assert "region scores   reproduced" in text and "anomaly" in text


def test_parse_steps_checks_against_the_journal() -> None:
    assert parse_steps("1,3-5,last", 8) == {1, 3, 4, 5, 7}
    assert parse_steps(None, 8) == set()
    with pytest.raises(ReplayError, match=r"'9' is outside the journal's steps 0-7"):
        parse_steps("9", 8)
    with pytest.raises(ReplayError, match=r"'x' is not a step number or range"):
        parse_steps("2,x", 8)


def test_rank_change_on_known_rankings() -> None:
    reversed_ = rank_change(np.array([3.0, 2.0, 1.0, 0.5]), np.array([0.5, 1.0, 2.0, 3.0]), top_k=2)
    assert reversed_["spearman"] == pytest.approx(-1.0) and reversed_["kendall"] == pytest.approx(-1.0)
    assert reversed_["old_rank"] == [1, 2, 3, 4] and reversed_["new_rank"] == [4, 3, 2, 1]
    assert reversed_["top_k_overlap"] == 0.0
    one_swap = rank_change(
        np.array([4.0, 3.0, 2.0, 1.0, np.nan]), np.array([4.0, 2.0, 3.0, 1.0, 5.0]), top_k=2
    )
    assert one_swap["tiles"] == 4 and one_swap["new_rank"][4] is None
    assert one_swap["top_k_overlap"] == 0.5
    assert one_swap["spearman"] == pytest.approx(0.8)


def test_rescoring_follows_the_session_and_changes_with_the_region_rule(guided: Recorded) -> None:
    result = replay_journal(guided.journal, progress=False)
    old = final_region_scores(result)
    session = result.session
    extents = session.graph.tile_extents  # registered, and moved where a later tile bridged parts

    # With the recorded configuration the re-scoring is the session itself, bit for bit.
    graph, scorer = rescore_tiles(session.steps, session.config, session.config, progress=False)
    assert len(graph) == len(session.graph)
    same = tile_region_scores(graph, scorer, extents, session.config.region_top_fraction)
    np.testing.assert_array_equal(same, old)

    # Region score = mean of all interior nodes instead of the top 2 %: check against the session's scorer.
    mean_rule = session.config.model_copy(update={"region_top_fraction": 1.0})
    graph, scorer = rescore_tiles(session.steps, mean_rule, session.config, progress=False)
    new = tile_region_scores(graph, scorer, extents, 1.0)
    expected = []
    for x_min, x_max, y_min, y_max in extents:
        nodes = session.graph.nodes_in(x_min, x_max, y_min, y_max)
        nodes = nodes[session.graph.interior[nodes]]
        scores = session.scorer.score(session.graph.to_pyg(nodes)).score if nodes.size else []
        expected.append(np.mean(scores) if nodes.size else np.nan)
    np.testing.assert_allclose(new, expected, rtol=1e-6)  # float32 scores, summed in another order
    scored = np.isfinite(old)  # a tile that landed on vacuum has no interior node, so no score
    assert scored.sum() >= len(old) - 2 and np.array_equal(scored, np.isfinite(new))
    assert np.all(new[scored] <= old[scored] + 1e-12), (
        "a mean of all nodes never exceeds the mean of the top ones"
    )
    change = rank_change(old, new)
    assert change["spearman"] == pytest.approx(stats.spearmanr(old[scored], new[scored]).statistic)


def test_replay_rescored_with_another_checkpoint_from_the_command_line(
    guided: Recorded, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A differently seeded, barely trained model of another size: it ranks the regions differently.
    start = read_journal(guided.journal).steps[1]
    graph = MoleculeGraph(guided.config.graph)
    graph.merge(start.columns, ScanRequest.model_validate(start.record["request"]).extent_nm)
    other = AnomalyScorer(AnomalyConfig(device="cpu", seed=77, hidden=8, latent=4, warmup_steps=3))
    other.fit([graph.to_pyg()])
    checkpoint = other.save(tmp_path / "other.pt")
    out = tmp_path / "rescored"
    assert (
        main(["replay", str(guided.journal), "--model", str(checkpoint), "--out", str(out), "--top-k", "3"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "re-scored" in printed and str(out / "rescore.png") in printed
    report = json.loads((out / "replay.json").read_text())
    rescore = report["rescore"]
    assert rescore["model"] == str(checkpoint) and rescore["top_k"] == 3
    old = np.array(rescore["old_scores"], dtype=float)  # None (a tile on vacuum) becomes NaN
    new = np.array(rescore["new_scores"], dtype=float)
    scored = np.isfinite(old) & np.isfinite(new)
    old, new = old[scored], new[scored]
    assert not np.allclose(old, new)
    assert rescore["spearman"] == pytest.approx(stats.spearmanr(old, new).statistic)
    assert rescore["kendall"] == pytest.approx(stats.kendalltau(old, new).statistic)
    new_rank = [r for r, ok in zip(rescore["new_rank"], scored, strict=True) if ok]
    assert new_rank == list(stats.rankdata(-new, method="ordinal").astype(int))
    # Both rankings follow their scores (with eight-odd tiles they may coincide: the scores differ).
    old_rank = [r for r, ok in zip(rescore["old_rank"], scored, strict=True) if ok]
    assert old_rank == list(stats.rankdata(-old, method="ordinal").astype(int))
    top_old = {i for i, r in enumerate(rescore["old_rank"]) if r is not None and r <= 3}
    top_new = {i for i, r in enumerate(rescore["new_rank"]) if r is not None and r <= 3}
    assert rescore["top_k_overlap"] == pytest.approx(len(top_old & top_new) / 3)
    assert matplotlib.image.imread(out / "rescore.png").ndim == 3


def test_rescoring_needs_a_model_that_exists(guided: Recorded, tmp_path: Path) -> None:
    with pytest.raises(ReplayError, match=r"missing\.pt: checkpoint not found"):
        run_replay(guided.journal, tmp_path / "r", checkpoint=tmp_path / "missing.pt", progress=False)


def test_interrupted_journal_replays_its_complete_steps_and_says_what_was_lost(
    guided: Recorded, tmp_path: Path
) -> None:
    cut = tmp_path / "interrupted.h5"
    shutil.copyfile(guided.journal, cut)
    with h5py.File(cut, "a") as file:  # the last step's index row never made it to disk
        file["record_index"].resize(TILES, axis=0)
    report = run_replay(cut, tmp_path / "out", progress=False)
    assert len(report["steps"]) == TILES
    assert report["problems"] == ["the last step was interrupted while being written and is lost"]
    assert report["reproduction"]["scores_reproduced"]
    assert "warning         the last step was interrupted" in format_replay(report)


def test_corrupt_truncated_or_empty_journals_give_clear_errors(
    guided: Recorded, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(guided.journal.read_bytes()[:4096])
    with pytest.raises(
        JournalError, match=r"truncated\.h5: the file is truncated \(4,096 of .* nothing could be"
    ):
        run_replay(truncated, tmp_path / "a", progress=False)
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not an HDF5 file at all")
    assert main(["replay", str(garbage), "--out", str(tmp_path / "b")]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("micrography: error: ") and "garbage.h5" in error and "\n" not in error
    empty = tmp_path / "empty.h5"
    SessionJournal(empty, config={}, instrument={}).close()
    with pytest.raises(JournalError, match=r"empty\.h5: no complete step could be recovered"):
        run_replay(empty, tmp_path / "c", progress=False)
    with pytest.raises(JournalError, match=r"nowhere\.h5: journal not found"):
        run_replay(tmp_path / "nowhere.h5", tmp_path / "d", progress=False)


# ----------------------------------------------------------------------------- compare


def _expected_imaged(recorded: Recorded, specimen: Specimen, tiles: int) -> float:
    """Imaged fraction after ``tiles`` tiles, from the journal's requests and the ground truth."""
    contents = read_journal(recorded.journal)
    with SimulatedMicroscope(
        SimulatorConfig.model_validate(recorded.config.simulator), specimen
    ) as microscope:
        grid = CandidateGrid.tiling(microscope.describe(), (256, 256), 0.02)
    candidates = feature_candidates(specimen, grid)
    imaged: set[int] = set()
    for step in [s for s in contents.steps if s.record["kind"] != "survey"][:tiles]:
        request = step.record["request"]
        imaged |= candidates[grid.index_of(request["x_nm"], request["y_nm"])]
    return len(imaged) / len(specimen.features)


def test_compare_two_journals_gives_the_fractions_at_fixed_budgets(
    guided: Recorded, raster: Recorded, small_specimen: Specimen, tmp_path: Path
) -> None:
    grid = guided.grid_tiles
    fractions = (0.1, 0.25, TILES / grid, 0.5)  # 4 tiles, 9 tiles, the last tile, not reached
    report = run_compare([guided.journal, raster.journal], tmp_path, fractions=fractions, progress=False)
    table = {(row["series"].split()[0], row["budget_fraction"]): row for row in report["table"]}
    for recorded in (guided, raster):
        policy = recorded.config.policy
        for fraction, tiles in ((0.1, 4), (0.25, 9), (TILES / grid, TILES)):
            row = table[(policy, fraction)]
            assert row["runs"] == 1 and row["tiles"] == tiles
            assert row["imaged_mean"] == pytest.approx(_expected_imaged(recorded, small_specimen, tiles))
            assert row["imaged_mean"] == pytest.approx(recorded.imaged[tiles - 1])
        assert table[(policy, TILES / grid)]["detected_mean"] == pytest.approx(recorded.detected)
        assert table[(policy, 0.5)]["runs"] == 0 and table[(policy, 0.5)]["note"] == "budget not reached"
    # The three files, read back.
    with (tmp_path / "compare.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 8 and rows[0]["series"].startswith("guided seed 3")
    assert float(rows[1]["imaged_mean"]) == pytest.approx(table[("guided", 0.25)]["imaged_mean"])
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert saved["table"] == json.loads(json.dumps(report["table"]))
    assert len(saved["series"][0]["runs"][0]["points"]) == TILES
    assert matplotlib.image.imread(tmp_path / "compare.png").shape[1] > 1000


def test_compare_a_journal_without_ground_truth_shows_tiles_dose_and_says_why(
    guided: Recorded, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other-specimen.h5"
    shutil.copyfile(guided.journal, other)
    with h5py.File(other, "a") as file:  # as if recorded on a specimen this Micrography cannot regenerate
        config = json.loads(file.attrs["config"])
        config["simulator"]["specimen"]["sm_fraction"] = 0.3
        file.attrs["config"] = json.dumps(config)
    specimen, reason = recorded_ground_truth(read_journal(other))
    assert specimen is None and "does not reproduce the recorded tiles" in reason
    assert main(["compare", str(other), "--out", str(tmp_path / "cmp"), "--budgets", "0.1"]) == 0
    printed = capsys.readouterr().out
    assert "no imaged/detected fractions: the regenerated specimen does not reproduce" in printed
    row = json.loads((tmp_path / "cmp" / "compare.json").read_text())["table"][0]
    assert row["imaged_mean"] is None and row["tiles"] == 4
    assert row["mean_dose_e_per_a2"] == pytest.approx(
        read_journal(other).steps[4].record["mean_dose_e_per_a2"]
    )


def _bench_rows() -> list[dict]:
    rows = []
    for policy, base in (("guided", 0.4), ("raster", 0.1)):
        for seed, shift in ((0, 0.0), (1, 0.2)):
            for fraction, tiles in ((0.1, 26), (0.25, 64), (0.5, 128)):
                rows.append({
                    "policy": policy, "layout": "default", "seed": seed, "budget_fraction": fraction,
                    "imaged_fraction": base + shift + fraction / 2, "detected_fraction": (base + shift) / 2,
                    "tiles": tiles, "mean_dose_e_per_a2": 100.0 * tiles,
                })  # fmt: skip
    return rows


def test_compare_bench_json_gives_mean_and_spread_over_seeds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = tmp_path / "bench-guidance.json"
    bench.write_text(json.dumps({"benchmark": "guidance", "rows": _bench_rows()}))
    assert main(["compare", str(bench), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "0.55±0.10/0.25 (n=2)" in printed  # guided at 10 %: (0.45 + 0.65) / 2, detected (0.2 + 0.3) / 2
    with (tmp_path / "out" / "compare.csv").open() as handle:
        rows = {(r["series"], float(r["budget_fraction"])): r for r in csv.DictReader(handle)}
    assert set(rows) == {(s, f) for s in ("guided (default)", "raster (default)") for f in (0.1, 0.25, 0.5)}
    raster = rows[("raster (default)", 0.25)]
    assert float(raster["imaged_mean"]) == pytest.approx(0.325) and float(
        raster["imaged_std"]
    ) == pytest.approx(0.1)
    assert float(raster["detected_mean"]) == pytest.approx(0.1) and float(raster["tiles"]) == 64
    assert float(raster["mean_dose_e_per_a2"]) == pytest.approx(6400.0) and raster["runs"] == "2"
    series = load_bench_series(bench)
    assert [s.label for s in series] == ["guided (default)", "raster (default)"]
    assert series[0].runs[1].grid_tiles == 256


def test_compare_draws_the_per_tile_curves_of_a_bench_json(tmp_path: Path) -> None:
    rows = _bench_rows()
    curves = [
        {
            "policy": policy, "layout": "default", "seed": seed, "grid_tiles": 256, "total_features": 30,
            "points": [
                {"tiles": t, "mean_dose_e_per_a2": 100.0 * t, "imaged_fraction": min(1.0, t / 200)}
                for t in range(1, 129)
            ],
        }
        for policy in ("guided", "raster") for seed in (0, 1)
    ]  # fmt: skip
    bench = tmp_path / "bench-guidance.json"
    bench.write_text(json.dumps({"rows": rows, "curves": curves}))
    series = load_bench_series(bench)
    run = series[0].runs[0]
    assert len(run.points) == 128 and run.grid_tiles == 256
    assert run.points[63]["imaged_fraction"] == pytest.approx(64 / 200)
    # Detected fractions exist where the rows measured them, and only there.
    measured = [p["tiles"] for p in run.points if p["detected_fraction"] is not None]
    assert measured == [26, 64, 128]
    table = run_compare([bench], tmp_path / "out", progress=False)["table"]
    assert (tmp_path / "out" / "compare.png").is_file()
    guided = next(r for r in table if r["series"] == "guided (default)" and r["budget_fraction"] == 0.25)
    assert guided["imaged_mean"] == pytest.approx(64 / 200)
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"rows": rows, "curves": [{**curves[0], "grid_tiles": 0}]}))
    with pytest.raises(CompareError, match=r"broken\.json: curve 0: grid_tiles is 0"):
        load_bench_series(broken)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", r"bad\.json: not valid JSON \(line 1, column 2"),
        (json.dumps({"benchmark": "guidance"}), r"bad\.json: no 'rows' list of results"),
        (json.dumps({"rows": [1]}), r"bad\.json: row 0 is int, not an object"),
        (json.dumps({"rows": [{k: v for k, v in _bench_rows()[0].items() if k != "detected_fraction"}]}),
         r"bad\.json: row 0 has no 'detected_fraction'"),
        (json.dumps({"rows": [*_bench_rows()[:1], {**_bench_rows()[1], "imaged_fraction": 1.5}]}),
         r"bad\.json: row 1: imaged_fraction is 1\.5; it must be a fraction between 0 and 1"),
    ],
)  # fmt: skip
def test_malformed_bench_json_is_refused_with_a_clear_message(
    tmp_path: Path, content: str, message: str
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    with pytest.raises(CompareError, match=message):
        run_compare([bad], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists(), "nothing is written for input that cannot be compared"


def test_compare_command_turns_bad_input_into_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["compare", str(tmp_path / "missing.json"), "--out", str(tmp_path)]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("micrography: error: ") and "\n" not in error
    assert f"{tmp_path / 'missing.json'}" in error and ("not found" in error or "no such file" in error)
    assert main(["compare", str(tmp_path / "x.json"), "--budgets", "0", "--out", str(tmp_path)]) == 1
    error = capsys.readouterr().err  # it names the budget and the value
    assert "budget" in error and ("0.0" in error or "got 0" in error)


def test_journals_of_one_policy_average_over_seeds_at_each_budget() -> None:
    def run(seed: int, imaged: list[float]) -> RunCurve:
        points = [
            {"tiles": t + 1, "tile_fraction": (t + 1) / 20, "mean_dose_e_per_a2": 10.0 * (t + 1),
             "imaged_fraction": value, "detected_fraction": value / 2 if t + 1 == 2 else None,
             "best_score": None}
            for t, value in enumerate(imaged)
        ]  # fmt: skip
        return RunCurve(seed=seed, grid_tiles=20, points=points, source=f"seed{seed}.h5")

    series = Series(label="guided", kind="journal", runs=[run(0, [0.1, 0.2, 0.3]), run(1, [0.3, 0.4])])
    rows = {row["budget_fraction"]: row for row in fractions_table([series], (0.1, 0.15, 0.5))}
    assert rows[0.1]["runs"] == 2 and rows[0.1]["tiles"] == 2
    assert rows[0.1]["imaged_mean"] == pytest.approx(0.3) and rows[0.1]["imaged_std"] == pytest.approx(0.1)
    assert rows[0.1]["detected_mean"] == pytest.approx(0.15) and rows[0.1]["mean_dose_e_per_a2"] == 20.0
    assert rows[0.15]["runs"] == 1 and rows[0.15]["imaged_mean"] == pytest.approx(0.3)
    assert rows[0.15]["detected_mean"] is None  # detection is counted at the budgets only
    assert rows[0.5]["runs"] == 0 and rows[0.5]["note"] == "budget not reached"
    text = format_table(list(rows.values()), (0.1, 0.15, 0.5))
    assert "0.30±0.10/0.15 (n=2)" in text and "not reached" in text
