"""Candidate grid, survey planning and features, and the acquisition policies."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.domains import WallSegment
from agent.driver import DoseMap, InstrumentDescription, ScanRequest, Tile
from agent.errors import OutOfRangeError, OutsideStageError
from agent.policy import (
    POLICY_NAMES,
    GuidedPolicy,
    ImageGPPolicy,
    OraclePolicy,
    PeakDoseLedger,
    PolicyConfig,
    PolicyError,
    RandomPolicy,
    RasterPolicy,
    SurveyContrastPolicy,
    make_policy,
    nearest_neighbour_tour,
    tour_length_nm,
)
from agent.surrogate import GPSurrogate, SurrogateConfig
from agent.survey import (
    SURVEY_FEATURES,
    CandidateGrid,
    lattice_disorder,
    survey_features,
    survey_request,
)

STEM = InstrumentDescription(
    name="test STEM",
    stage_x_nm=(0.0, 150.0),
    stage_y_nm=(0.0, 150.0),
    pixel_size_nm=(0.01, 1.0),
    max_tile_shape=(1024, 1024),
    beam_current_pa=20.0,
    dwell_us=(0.5, 50.0),
)
SMALL_STEM = STEM.model_copy(update={"stage_x_nm": (0.0, 60.0), "stage_y_nm": (5.0, 57.0)})
"""A small stage whose height is not a multiple of the tile: the last row is clamped."""
FAST_GP = SurrogateConfig(fit_steps_initial=5, fit_steps_update=2)


@pytest.fixture(scope="module")
def grid() -> CandidateGrid:
    return CandidateGrid.tiling(STEM, (500, 500), 0.02)  # 10 nm tiles, 15 x 15


@pytest.fixture(scope="module")
def small_grid() -> CandidateGrid:
    return CandidateGrid.tiling(SMALL_STEM, (250, 250), 0.04)  # 10 nm tiles, 6 x 6


def index_of(grid: CandidateGrid, request: ScanRequest) -> int:
    index = grid.match(request)
    assert index >= 0, f"{request} is not a candidate"
    return index


# ----------------------------------------------------------------------------- grid and survey


def test_tiling_covers_the_stage_with_tiles_inside_it(small_grid: CandidateGrid) -> None:
    assert small_grid.grid_shape == (6, 6) and len(small_grid) == 36
    e = small_grid.extents
    assert e[:, 0].min() == pytest.approx(0.0) and e[:, 1].max() == pytest.approx(60.0)
    assert e[:, 2].min() == pytest.approx(5.0) and e[:, 3].max() == pytest.approx(57.0)
    for index in range(len(small_grid)):
        SMALL_STEM.check(small_grid.request(index, 1.0))
    # The last row is clamped inside the stage and overlaps the one before.
    ys = np.unique(small_grid.centres[:, 1])
    np.testing.assert_allclose(ys, [10, 20, 30, 40, 50, 52])
    # Row-major: rows along y.
    assert small_grid.grid_position(7) == (1, 1)
    np.testing.assert_allclose(small_grid.centres[7], [15.0, 20.0])
    with pytest.raises(OutsideStageError, match="does not fit the stage"):
        CandidateGrid.tiling(SMALL_STEM, (1000, 1000), 0.1)
    with pytest.raises(OutOfRangeError, match="pixel size"):
        CandidateGrid.tiling(SMALL_STEM, (100, 100), 5.0)
    with pytest.raises(OutOfRangeError, match="largest tile"):
        CandidateGrid.tiling(SMALL_STEM, (2000, 100), 0.01)


def test_overlapping_tiling_and_lookups(small_grid: CandidateGrid) -> None:
    overlapped = CandidateGrid.tiling(SMALL_STEM, (250, 250), 0.04, overlap_fraction=0.5)
    assert overlapped.grid_shape == (10, 11)
    assert small_grid.index_of(15.0, 21.0) == 7
    assert small_grid.index_of(-1.0, 21.0) == -1
    assert overlapped.index_of(8.0, 10.0) == 1  # the nearest of the overlapping 0, 1 and 2
    request = small_grid.request(7, 2.0, request_id="r-1")
    assert request.request_id == "r-1" and request.shape == (250, 250)
    assert small_grid.match(request) == 7
    assert small_grid.match(request.model_copy(update={"x_nm": 15.5})) == -1
    assert small_grid.match(request.model_copy(update={"pixel_size_nm": 0.05})) == -1
    assert sorted(small_grid.neighbours(0).tolist()) == [1, 6, 7]
    assert len(small_grid.neighbours(7)) == 8
    with pytest.raises(ValueError, match="read-only"):
        small_grid.centres[0, 0] = 1.0


def test_survey_request_covers_the_stage_with_few_tiles() -> None:
    single = survey_request(STEM, 0.25, 1.0)
    assert len(single) == 1 and single[0].shape == (600, 600) and single[0].request_id == "survey-00000"
    tiles = survey_request(STEM, 0.25, 1.0, max_tile_shape=(256, 256))
    assert len(tiles) == 9  # 600 px per axis in tiles of at most 256 px
    for request in tiles:
        STEM.check(request)
        assert max(request.shape) <= 256
    x_min = min(r.extent_nm[0] for r in tiles)
    x_max = max(r.extent_nm[1] for r in tiles)
    assert x_min == pytest.approx(0.0) and x_max == pytest.approx(150.0)
    with pytest.raises(OutOfRangeError):
        survey_request(STEM, 0.25, 100.0)  # dwell outside the instrument range


def synthetic_survey(grid: CandidateGrid, bright: tuple[float, float], textured: tuple[float, float]) -> Tile:
    """A 0.25 nm/px survey of the stage: flat noisy background, a bright patch, a textured patch."""
    request = survey_request(STEM, 0.25, 1.0)[0]
    rows, cols = request.shape
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:rows, 0:cols]
    x_nm, y_nm = request.origin_nm[0] + xx * 0.25, request.origin_nm[1] + yy * 0.25
    image = 100.0 + 2.0 * rng.standard_normal((rows, cols))
    image += 40.0 * (np.hypot(x_nm - bright[0], y_nm - bright[1]) < 6.0)
    textured_patch = np.hypot(x_nm - textured[0], y_nm - textured[1]) < 6.0
    image += np.where(textured_patch, 30.0 * ((xx + yy) % 2 - 0.5), 0.0)  # finest-scale checkerboard
    return Tile(
        image=image.astype(np.float32),
        request=request,
        origin_nm=request.origin_nm,
        pixel_size_nm=0.25,
        dose_e_per_a2=1.0,
        t_start=0.0,
        t_end=1.0,
    )


def test_survey_features_find_bright_and_textured_regions(grid: CandidateGrid) -> None:
    survey = synthetic_survey(grid, bright=(45.0, 45.0), textured=(105.0, 125.0))
    features = survey_features(survey, grid)
    assert features.shape == (len(grid), len(SURVEY_FEATURES))
    bright, textured = grid.index_of(45.0, 45.0), grid.index_of(105.0, 125.0)
    assert int(np.argmax(features[:, 0])) == bright
    assert int(np.argmax(features[:, 2])) == bright
    assert int(np.argmax(features[:, 3])) == textured
    np.testing.assert_allclose(features.mean(axis=0), 0.0, atol=1e-9)
    # A survey of part of the stage leaves the other candidates at zero.
    half = CandidateGrid.tiling(STEM.model_copy(update={"stage_x_nm": (0.0, 300.0)}), (500, 500), 0.02)
    partial = survey_features(survey, half)
    assert np.all(partial[half.centres[:, 0] > 155.0] == 0.0)
    assert np.any(partial[half.centres[:, 0] < 145.0] != 0.0)
    # The survey-contrast baseline goes to the standout regions first.
    policy = SurveyContrastPolicy(grid, STEM, PolicyConfig(name="survey"), features)
    first = {index_of(grid, r) for r in policy.suggest(2)}
    assert first == {bright, textured}


def test_lattice_disorder_separates_order_from_noise() -> None:
    yy, xx = np.mgrid[0:128, 0:128]
    lattice = np.cos(2 * np.pi * xx / 8) + np.cos(2 * np.pi * yy / 8)
    noise = np.random.default_rng(0).standard_normal((128, 128))
    assert lattice_disorder(lattice) < 0.1
    assert lattice_disorder(noise) > 0.9
    assert lattice_disorder(np.zeros((16, 16))) == 0.0


# ----------------------------------------------------------------------------- interface


def test_suggest_ingest_round_trip_and_report(small_grid: CandidateGrid) -> None:
    policy = RasterPolicy(small_grid, SMALL_STEM, PolicyConfig(name="raster", dwell_us=1.0))
    requests = policy.suggest(3)
    assert [r.request_id for r in requests] == ["raster-00000", "raster-00001", "raster-00002"]
    assert [index_of(small_grid, r) for r in requests] == [0, 1, 2]
    assert policy.report()["pending"] == 3
    # Pending candidates are not suggested again.
    assert [index_of(small_grid, r) for r in policy.suggest(1)] == [3]
    policy.ingest(requests, [1.0, 2.5, float("nan")])
    report = policy.report()
    json.dumps(report)  # JSON-serialisable
    assert report["acquired"] == 3 and report["pending"] == 1
    assert report["best_regions"][0]["score"] == 2.5
    assert report["dose"]["total_e_per_a2"] == pytest.approx(4 * policy.dose_per_scan_e_per_a2)
    with pytest.raises(PolicyError, match="already ingested"):
        policy.ingest(requests[:1], [1.0])
    with pytest.raises(PolicyError, match="one score per request"):
        policy.ingest(requests[:1], [1.0, 2.0])
    with pytest.raises(PolicyError, match="n >= 0"):
        policy.suggest(-1)
    assert policy.suggest(0) == []


def test_ask_tell_aliases_drive_a_guided_policy(small_grid: CandidateGrid) -> None:
    surrogate = GPSurrogate(FAST_GP, stage_x_nm=SMALL_STEM.stage_x_nm, stage_y_nm=SMALL_STEM.stage_y_nm)
    policy = GuidedPolicy(small_grid, SMALL_STEM, surrogate, PolicyConfig(name="g"))
    for step in range(4):
        requests = policy.ask(2)
        assert len(requests) == 2
        policy.tell(requests, [float(step), float("nan")])
    assert surrogate.summary()["n_points"] == 8
    # NaN (no lattice) is learned as the lowest score seen so far.
    assert np.isfinite(surrogate.observed_values).all()
    assert surrogate.observed_values[1] == 0.0
    report = policy.report()
    json.dumps(report)
    assert report["surrogate"]["n_points"] == 8 and report["acquired"] == 8
    assert GuidedPolicy.score_source == "graph" and ImageGPPolicy.score_source == "image"


def test_request_ids_and_choices_replay_identically(small_grid: CandidateGrid) -> None:
    def session(name: str) -> list[tuple[str, float, float]]:
        policy = make_policy(
            name,
            small_grid,
            SMALL_STEM,
            PolicyConfig(name=name, acquisition="thompson", seed=3),
            surrogate_config=FAST_GP,
        )
        rng = np.random.default_rng(0)
        seen = []
        for _ in range(5):
            requests = policy.suggest(2)
            policy.ingest(requests, rng.random(len(requests)))
            seen += [(r.request_id, r.x_nm, r.y_nm) for r in requests]
        return seen

    for name in ("guided", "random"):
        first = session(name)
        assert first == session(name)
        assert first[0][0] == f"{name}-00000"


def test_never_repeats_and_returns_empty_when_exhausted(small_grid: CandidateGrid) -> None:
    for name in ("raster", "random"):
        policy = make_policy(name, small_grid, SMALL_STEM)
        seen: list[int] = []
        while requests := policy.suggest(5):
            seen += [index_of(small_grid, r) for r in requests]
            policy.ingest(requests, np.zeros(len(requests)))
        assert sorted(seen) == list(range(len(small_grid)))
        assert policy.suggest(3) == []


def test_serpentine_raster_order(small_grid: CandidateGrid) -> None:
    policy = RasterPolicy(small_grid, SMALL_STEM)
    order = [index_of(small_grid, r) for r in policy.suggest(8)]
    # Nearest-neighbour ordering from the first tile keeps the serpentine order.
    assert order == [0, 1, 2, 3, 4, 5, 11, 10]


def test_mark_exposed_release_and_dose_limits(small_grid: CandidateGrid) -> None:
    dose = RasterPolicy(small_grid, SMALL_STEM).dose_per_scan_e_per_a2
    config = PolicyConfig(name="raster", max_dose_e_per_a2=1.5 * dose)
    policy = RasterPolicy(small_grid, SMALL_STEM, config)
    # A start tile the session took itself: acquired, never suggested.
    start = small_grid.request(0, config.dwell_us, request_id="start-0")
    policy.mark_exposed(start)
    assert policy.acquired[0]
    # A larger exposure over candidates 1, 2, 7 and 8 uses up their dose; 3, 6 and 9 only touch it.
    manual = ScanRequest(x_nm=20.0, y_nm=15.0, shape=(500, 500), pixel_size_nm=0.04, dwell_us=config.dwell_us)
    policy.mark_exposed(manual)
    policy.mark_exposed(manual)  # the same request id counts once
    allowed = policy.admissible()
    assert not allowed[[0, 1, 2, 7, 8]].any() and allowed[[3, 6, 9]].all()
    first = policy.suggest(1)
    assert index_of(small_grid, first[0]) == 3
    policy.release(first)
    assert policy.admissible()[3]
    assert policy.total_dose_e_per_a2 == pytest.approx(dose + SMALL_STEM.dose_of(manual))
    # An instrument limit below one scan leaves nothing to suggest.
    strict = SMALL_STEM.model_copy(update={"max_dose_e_per_a2": 0.5 * dose})
    assert RasterPolicy(small_grid, strict).suggest(4) == []
    # A total budget of 2.5 scans allows two.
    budget = PolicyConfig(name="raster", total_dose_budget_e_per_a2=2.5 * dose)
    assert len(RasterPolicy(small_grid, SMALL_STEM, budget).suggest(10)) == 2


def test_a_failing_choice_leaves_no_booked_dose(small_grid: CandidateGrid) -> None:
    class Faulty(RasterPolicy):
        def _choose(self, admissible: np.ndarray, chosen: list[int]) -> int | None:
            if chosen:
                raise RuntimeError("model failure")
            return super()._choose(admissible, chosen)

    policy = Faulty(small_grid, SMALL_STEM)
    with pytest.raises(RuntimeError, match="model failure"):
        policy.suggest(3)
    assert policy.total_dose_e_per_a2 == 0.0 and policy.admissible().all()
    assert policy.report()["dose"]["peak_e_per_a2"] == 0.0


def test_peak_dose_ledger_is_exact() -> None:
    rng = np.random.default_rng(0)
    ledger = PeakDoseLedger([0.0, 20.0], [0.0, 20.0])
    fine = np.zeros((400, 400))  # 0.05 nm cells, aligned with the 0.5 nm rectangle edges
    for _ in range(30):
        x0, y0 = rng.integers(0, 30, 2) * 0.5
        w, h = rng.integers(1, 20, 2) * 0.5
        dose = float(rng.uniform(0.5, 2.0))
        ledger.add((x0, x0 + w, y0, y0 + h), dose)
        fine[int(y0 / 0.05) : int((y0 + h) / 0.05), int(x0 / 0.05) : int((x0 + w) / 0.05)] += dose
    for _ in range(30):
        x0, y0 = rng.integers(0, 30, 2) * 0.5
        w, h = rng.integers(1, 20, 2) * 0.5
        window = fine[int(y0 / 0.05) : int((y0 + h) / 0.05), int(x0 / 0.05) : int((x0 + w) / 0.05)]
        assert ledger.peak((x0, x0 + w, y0, y0 + h)) == pytest.approx(window.max())
    assert ledger.max_dose == pytest.approx(fine.max())
    # Touching rectangles do not count as overlapping.
    assert ledger.peak((40.0, 41.0, 40.0, 41.0)) == 0.0


POLICY_STEM = SMALL_STEM.model_copy(update={"stage_y_nm": (0.0, 43.0)})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(POLICY_NAMES),
    acquisition=st.sampled_from(["ucb", "ei", "thompson", "uncertainty"]),
    steps=st.integers(1, 10),
    batch=st.integers(1, 4),
    dwell_us=st.floats(0.5, 5.0),
    overlap=st.sampled_from([0.0, 0.3, 0.5]),
    policy_limit=st.one_of(st.none(), st.floats(0.5, 4.0)),
    instrument_limit=st.one_of(st.none(), st.floats(0.5, 4.0)),
    budget=st.one_of(st.none(), st.floats(0.5, 30.0)),
    survey=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_dose_and_stage_limits_are_never_exceeded(
    name: str,
    acquisition: str,
    steps: int,
    batch: int,
    dwell_us: float,
    overlap: float,
    policy_limit: float | None,
    instrument_limit: float | None,
    budget: float | None,
    survey: bool,
    seed: int,
) -> None:
    grid = CandidateGrid.tiling(POLICY_STEM, (250, 250), 0.04, overlap_fraction=overlap)
    scan_dose = POLICY_STEM.dose_of(grid.request(0, dwell_us))
    description = POLICY_STEM.model_copy(
        update={"max_dose_e_per_a2": None if instrument_limit is None else instrument_limit * scan_dose}
    )
    config = PolicyConfig(
        name=name,
        acquisition=acquisition,
        dwell_us=dwell_us,
        max_dose_e_per_a2=None if policy_limit is None else policy_limit * scan_dose,
        total_dose_budget_e_per_a2=None if budget is None else budget * scan_dose,
        seed=seed,
    )
    rng = np.random.default_rng(seed)
    policy = make_policy(
        name,
        grid,
        description,
        config,
        survey_features=rng.standard_normal((len(grid), 4)),
        surrogate_config=FAST_GP,
        truth=rng.integers(0, 4, len(grid)),
    )
    limits = [v * scan_dose for v in (policy_limit, instrument_limit) if v is not None]
    limit = min(limits) if limits else None
    # An independent dose map with cells that do not line up with the tiles.
    dose_map = DoseMap(description.stage_x_nm, description.stage_y_nm, cell_nm=0.7)
    total = 0.0
    if survey:
        for request in survey_request(description, 0.25, 0.5):
            policy.mark_exposed(request)
            dose_map.add(request.extent_nm, description.dose_of(request))
            total += description.dose_of(request)
    seen: set[int] = set()
    for _ in range(steps):
        requests = policy.suggest(batch)
        assert len(requests) <= batch
        if limit is None and budget is None:
            assert len(requests) == min(batch, len(grid) - len(seen))
        for request in requests:
            description.check(request)  # stage limits, dwell, shape, pixel size
            index = index_of(grid, request)
            assert index not in seen
            seen.add(index)
            dose = description.dose_of(request)
            dose_map.add(request.extent_nm, dose)
            total += dose
            if limit is not None:
                assert dose_map.map_e_per_a2.max() <= limit * (1 + 1e-9)
            if budget is not None:
                assert total <= budget * scan_dose * (1 + 1e-9)
        scores = rng.normal(size=len(requests))
        scores[rng.random(len(requests)) < 0.2] = np.nan
        policy.ingest(requests, scores)
        if not requests:
            break
    assert policy.report()["acquired"] == len(seen)


# ----------------------------------------------------------------------------- ordering and guidance


def test_nearest_neighbour_tour() -> None:
    points = np.array([[100.0, 0.0], [10.0, 0.0], [50.0, 0.0], [0.0, 0.0]])
    order = nearest_neighbour_tour(points, (0.0, 0.0))
    assert order == [3, 1, 2, 0]
    assert tour_length_nm(points[order], (0.0, 0.0)) == pytest.approx(100.0)
    assert nearest_neighbour_tour(np.zeros((0, 2))) == []


def test_batch_ordering_shortens_stage_travel(grid: CandidateGrid) -> None:
    # A random policy draws the same candidates one by one or as a batch; only the batch is
    # reordered, so the draw order is the unordered batch.
    ratios = []
    for seed in range(10):
        one_by_one = RandomPolicy(grid, STEM, PolicyConfig(name="random", seed=seed))
        drawn = [r for _ in range(10) for r in one_by_one.suggest(1)]
        batched = RandomPolicy(grid, STEM, PolicyConfig(name="random", seed=seed)).suggest(10)
        assert {(r.x_nm, r.y_nm) for r in drawn} == {(r.x_nm, r.y_nm) for r in batched}
        unordered = tour_length_nm(np.array([[r.x_nm, r.y_nm] for r in drawn]))
        ordered = tour_length_nm(np.array([[r.x_nm, r.y_nm] for r in batched]))
        assert ordered < unordered
        ratios.append(ordered / unordered)
    assert np.mean(ratios) < 0.75
    # A guided batch is spread out by the kriging believer, then ordered from the stage.
    policy = GuidedPolicy(
        grid,
        STEM,
        GPSurrogate(FAST_GP, stage_x_nm=STEM.stage_x_nm, stage_y_nm=STEM.stage_y_nm),
        PolicyConfig(name="g", acquisition="uncertainty", travel_cost_per_um=0.0),
    )
    start = grid.request(112, 2.0, request_id="start")
    policy.ingest([start], [1.0])
    batch = policy.suggest(6)
    centres = np.array([[r.x_nm, r.y_nm] for r in batch])
    assert len({(x, y) for x, y in centres}) == 6
    gaps = np.hypot(*(centres[:, None, :] - centres[None, :, :]).transpose(2, 0, 1))
    assert gaps[~np.eye(6, dtype=bool)].min() >= 30.0  # spread, not six neighbours
    assert tour_length_nm(centres, (start.x_nm, start.y_nm)) <= min(
        tour_length_nm(centres[perm], (start.x_nm, start.y_nm))
        for perm in (np.roll(np.arange(6), k) for k in range(1, 6))
    )


def interest(points: np.ndarray) -> np.ndarray:
    """A smooth interest field with one peak far from where a raster starts."""
    bump = np.exp(-((points[:, 0] - 115.0) ** 2 + (points[:, 1] - 105.0) ** 2) / (2 * 20.0**2))
    return 1.0 + 2.0 * bump + 0.002 * points[:, 0]


def steps_to_find_the_peak(policy_name: str, grid: CandidateGrid, limit: int) -> int:
    policy = make_policy(
        policy_name,
        grid,
        STEM,
        PolicyConfig(name=policy_name),
        surrogate_config=SurrogateConfig(fit_steps_initial=30, fit_steps_update=5),
    )
    target = int(np.argmax(interest(grid.centres)))
    for step in range(1, limit + 1):
        request = policy.suggest(1)[0]
        policy.ingest([request], interest(np.array([[request.x_nm, request.y_nm]])))
        if index_of(grid, request) == target:
            return step
    return limit + 1


def test_guided_policy_finds_the_peak_before_raster(grid: CandidateGrid) -> None:
    raster = steps_to_find_the_peak("raster", grid, 225)
    guided = steps_to_find_the_peak("guided", grid, 60)
    assert raster > 150
    assert guided <= 40


def test_oracle_takes_the_most_features_first(small_grid: CandidateGrid) -> None:
    counts = np.zeros(len(small_grid), dtype=int)
    counts[[20, 3, 9]] = [7, 5, 2]
    oracle = OraclePolicy(small_grid, SMALL_STEM, None, counts)
    assert [index_of(small_grid, oracle.suggest(1)[0]) for _ in range(3)] == [20, 3, 9]
    # Overlapping candidates share feature ids: after 0 is imaged, 1 has nothing new.
    sets: list[set[str]] = [set() for _ in range(len(small_grid))]
    sets[0], sets[1], sets[30] = {"wall", "core", "vacancy"}, {"wall", "core", "vacancy"}, {"patch", "loop"}
    oracle = make_policy("oracle", small_grid, SMALL_STEM, truth=sets)
    assert [index_of(small_grid, r) for r in oracle.suggest(1)] == [0]
    assert [index_of(small_grid, r) for r in oracle.suggest(1)] == [30]
    assert oracle.imaged_features == 5  # type: ignore[attr-defined]
    # Released suggestions give their features back.
    fresh = OraclePolicy(small_grid, SMALL_STEM, None, sets)
    fresh.release(fresh.suggest(1))
    assert index_of(small_grid, fresh.suggest(1)[0]) == 0


def test_make_policy_names_and_errors(small_grid: CandidateGrid) -> None:
    features = np.zeros((len(small_grid), 4))
    kinds = {
        name: type(
            make_policy(
                name, small_grid, SMALL_STEM, survey_features=features, truth=np.ones(len(small_grid))
            )
        ).__name__
        for name in POLICY_NAMES
    }
    assert kinds == {
        "guided": "GuidedPolicy",
        "raster": "RasterPolicy",
        "random": "RandomPolicy",
        "survey": "SurveyContrastPolicy",
        "image_gp": "ImageGPPolicy",
        "oracle": "OraclePolicy",
    }
    with pytest.raises(PolicyError, match="unknown policy 'greedy'; choose one of guided, raster"):
        make_policy("greedy", small_grid, SMALL_STEM)
    with pytest.raises(PolicyError, match="survey features"):
        make_policy("survey", small_grid, SMALL_STEM)
    with pytest.raises(PolicyError, match="ground truth"):
        make_policy("oracle", small_grid, SMALL_STEM)
    with pytest.raises(PolicyError, match="one row per candidate"):
        make_policy("guided", small_grid, SMALL_STEM, survey_features=np.zeros((3, 4)))
    guided = make_policy("guided", small_grid, SMALL_STEM, survey_features=features)
    assert guided.surrogate.feature_dim == 4  # type: ignore[attr-defined]
    image = make_policy(
        "image_gp",
        small_grid,
        SMALL_STEM,
        survey_features=features,
        surrogate_config=SurrogateConfig(use_survey_features=True),
    )
    assert image.surrogate.feature_dim == 0  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="name"):
        PolicyConfig(name="has space")


def test_saturation_steers_away_from_imaged_hot_regions(grid: CandidateGrid) -> None:
    """With a hot region already imaged, saturation sends the next tile further from it."""

    def next_after_hot_tile(saturation: float) -> float:
        surrogate = GPSurrogate(FAST_GP, stage_x_nm=STEM.stage_x_nm, stage_y_nm=STEM.stage_y_nm)
        config = PolicyConfig(name="g", beta=1.0, travel_cost_per_um=0.0, saturation=saturation)
        policy = GuidedPolicy(grid, STEM, surrogate, config)
        hot = int(np.argmin(np.hypot(*(grid.centres - grid.centres.mean(axis=0)).T)))
        scans = [grid.request(index, 2.0, request_id=f"seen-{index}") for index in (hot, 0, len(grid) - 1)]
        policy.ingest(scans, [10.0, 0.0, 0.0])
        (chosen,) = policy.suggest(1)
        return float(np.hypot(chosen.x_nm - grid.centres[hot, 0], chosen.y_nm - grid.centres[hot, 1]))

    assert next_after_hot_tile(3.0) > next_after_hot_tile(0.0)


def horizontal_wall(y_nm: float, x_nm: float = 75.0, half_length_nm: float = 5.0) -> WallSegment:
    """A wall segment along stage x through (x_nm, y_nm), as a tile of 10 nm would show it."""
    return WallSegment(
        point_nm=(x_nm, y_nm),
        direction=(1.0, 0.0),
        half_length_nm=half_length_nm,
        residual_nm=0.2,
        separation_pm=35.0,
        contrast=8.0,
        polarization_pm=((17.7, 17.7), (17.7, -17.7)),
    )


def test_wall_interest_runs_along_the_wall_and_fades_with_distance(grid: CandidateGrid) -> None:
    policy = GuidedPolicy(grid, STEM, None, PolicyConfig(name="g", wall_follow=2.0, wall_reach_tiles=3.0))
    assert not policy.wall_interest().any()
    policy.ingest_walls([horizontal_wall(75.0)])
    interest = policy.wall_interest()
    centres = grid.centres
    on_row = np.isclose(centres[:, 1], 75.0)
    # Candidates the wall crosses score; the ones beside it (10 nm away) barely do near the
    # segment, and further along the band widens with the direction's uncertainty.
    assert interest[on_row].min() > 0.05
    near = np.abs(centres[:, 0] - 75.0) <= 10.0
    assert interest[~on_row & near].max() < 0.03
    for x in np.unique(centres[:, 0]):
        column = np.isclose(centres[:, 0], x)
        assert interest[column & on_row].min() > interest[column & ~on_row].max()
    # Along the wall, interest falls with the distance beyond the segment: exp(-d / 30 nm).
    row = np.flatnonzero(on_row)
    along = np.abs(centres[row, 0] - 75.0)
    order = np.argsort(along)
    assert np.all(np.diff(interest[row][order]) <= 1e-12)
    far = row[np.argmax(along)]
    assert interest[far] == pytest.approx(np.exp(-(70.0 - 5.0) / 30.0), rel=1e-6)


def test_wall_interest_follows_an_oblique_wall_across_oblong_tiles() -> None:
    """A 30° wall on 10 x 20 nm tiles: whether the line crosses a tile is judged from its corners."""
    oblong = CandidateGrid.tiling(STEM, (250, 500), 0.04)  # rows x columns in pixels: 20 nm wide, 10 nm high
    width, height = oblong.tile_size_nm
    assert (width, height) == pytest.approx((20.0, 10.0))
    config = PolicyConfig(name="g", wall_follow=1.0, wall_reach_tiles=2.0)
    policy = GuidedPolicy(oblong, STEM, None, config)
    angle = np.radians(30.0)
    wall = WallSegment((70.0, 80.0), (np.cos(angle), np.sin(angle)), 4.0, 0.2, 35.0, 8.0, ((0, 0), (0, 0)))
    policy.ingest_walls([wall])
    # Independent geometry: signed distances of each tile's four corners from the line.
    normal = np.array([-np.sin(angle), np.cos(angle)])
    corners = oblong.centres[:, None, :] + 0.5 * np.array([[-width, -height], [-width, height],
                                                            [width, -height], [width, height]])  # fmt: skip
    distance = (corners - np.array([70.0, 80.0])) @ normal
    crossed = (distance.min(axis=1) <= 0) & (distance.max(axis=1) >= 0)
    miss = np.where(crossed, 0.0, np.abs(distance).min(axis=1))
    along = (oblong.centres - np.array([70.0, 80.0])) @ np.array([np.cos(angle), np.sin(angle)])
    tolerance = 1.0 + np.tan(np.radians(5.0)) * np.abs(along)
    beyond = np.maximum(np.abs(along) - 4.0, 0.0)
    expected = np.exp(-beyond / (2.0 * 20.0) - 0.5 * (miss / tolerance) ** 2)
    np.testing.assert_allclose(policy.wall_interest(), expected, rtol=1e-9, atol=1e-12)
    assert crossed.sum() >= 8


def test_a_wall_bends_the_next_suggestion_onto_its_continuation(grid: CandidateGrid) -> None:
    def next_after_wall_tile(wall_follow: float) -> int:
        config = PolicyConfig(name="g", beta=1.0, travel_cost_per_um=0.0, wall_follow=wall_follow)
        surrogate = GPSurrogate(FAST_GP, stage_x_nm=STEM.stage_x_nm, stage_y_nm=STEM.stage_y_nm)
        policy = GuidedPolicy(grid, STEM, surrogate, config)
        seen = int(np.argmin(np.hypot(grid.centres[:, 0] - 75.0, grid.centres[:, 1] - 75.0)))
        scans = [grid.request(index, 2.0, request_id=f"seen-{index}") for index in (seen, 0, len(grid) - 1)]
        policy.ingest(scans, [1.0, 0.0, 0.0])
        policy.ingest_walls([horizontal_wall(float(grid.centres[seen, 1]), float(grid.centres[seen, 0]))])
        return index_of(grid, policy.suggest(1)[0])

    chosen = next_after_wall_tile(5.0)
    assert grid.centres[chosen, 1] == pytest.approx(75.0)
    assert abs(grid.centres[chosen, 0] - 75.0) == pytest.approx(10.0)  # the next tile along the wall
    assert next_after_wall_tile(0.0) != chosen


def test_ingest_walls_checks_its_input_and_reports(small_grid: CandidateGrid) -> None:
    guided = GuidedPolicy(small_grid, SMALL_STEM, None, PolicyConfig(name="g", wall_follow=1.0))
    with pytest.raises(PolicyError, match="ingest_walls takes WallSegment objects, got dict"):
        guided.ingest_walls([{"point_nm": (1.0, 2.0)}])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="needs a finite point"):
        horizontal_wall(float("nan"))
    with pytest.raises(ValueError, match="non-zero direction"):
        WallSegment((1.0, 1.0), (0.0, 0.0), 1.0, 0.1, 30.0, 5.0, ((0.0, 0.0), (0.0, 0.0)))
    assert WallSegment((1.0, 1.0), (3.0, 4.0), 1.0, 0.1, 30.0, 5.0, ((0.0, 0.0), (0.0, 0.0))).direction == (
        pytest.approx(0.6),
        pytest.approx(0.8),
    )
    guided.ingest_walls([horizontal_wall(30.0), horizontal_wall(40.0)])
    assert guided.report()["walls"] == 2 and len(guided.walls) == 2
    # The image-based anchor and the baselines keep walls but never follow them.
    assert GuidedPolicy.follows_walls and not ImageGPPolicy.follows_walls
    baselines = (RasterPolicy, RandomPolicy, SurveyContrastPolicy, OraclePolicy)
    assert not any(policy.follows_walls for policy in baselines)


def test_without_the_surrogate_the_fixed_terms_decide_and_nothing_is_learned(grid: CandidateGrid) -> None:
    survey = np.zeros((len(grid), len(SURVEY_FEATURES)))
    bright = 37
    survey[bright, SURVEY_FEATURES.index("fringe_distortion")] = 5.0  # the survey prior points here
    config = PolicyConfig(name="g", use_surrogate=False, survey_prior=1.0, travel_cost_per_um=0.0)
    surrogate = GPSurrogate(FAST_GP, stage_x_nm=STEM.stage_x_nm, stage_y_nm=STEM.stage_y_nm)
    policy = GuidedPolicy(grid, STEM, surrogate, config, survey_features=survey)
    # A very interesting tile elsewhere teaches an ablated policy nothing.
    seen = grid.request(200, 2.0, request_id="seen")
    policy.ingest([seen], [50.0])
    assert len(policy.surrogate) == 0
    (chosen,) = policy.suggest(1)
    assert index_of(grid, chosen) == bright
    assert policy.calibration()["tiles"] == 0


def test_calibration_compares_each_new_tile_with_the_prediction_made_before_it(grid: CandidateGrid) -> None:
    surrogate = GPSurrogate(FAST_GP, stage_x_nm=STEM.stage_x_nm, stage_y_nm=STEM.stage_y_nm)
    policy = GuidedPolicy(grid, STEM, surrogate, PolicyConfig(name="g"))
    rng = np.random.default_rng(3)
    picks = rng.choice(len(grid), size=20, replace=False)
    for k, index in enumerate(picks):
        request = grid.request(int(index), 2.0, request_id=f"t{k}")
        policy.ingest([request], interest(grid.centres[[index]]) + rng.normal(0, 0.05, 1))
    calibration = policy.calibration()
    # The first fit_min_points tiles meet an unfitted model and are not judged.
    assert calibration["tiles"] == 20 - FAST_GP.fit_min_points
    assert len(calibration["predictions"]) == calibration["tiles"]
    assert 0.0 <= calibration["within_68"] <= calibration["within_95"] <= 1.0
    measured, mean, spread = np.array(calibration["predictions"]).T
    z = np.abs(measured - mean) / spread
    assert calibration["within_68"] == pytest.approx(np.mean(z <= 1.0))
    assert np.all(spread > 0)


def test_learned_weights_start_from_the_survey_prior_and_replace_the_bonuses(grid: CandidateGrid) -> None:
    survey = np.zeros((len(grid), len(SURVEY_FEATURES)))
    bright = 37
    survey[bright, SURVEY_FEATURES.index("fringe_distortion")] = 5.0
    config = PolicyConfig(
        name="g", learn_weights=True, survey_prior=1.0, wall_follow=4.0, travel_cost_per_um=0.0
    )
    policy = make_policy("guided", grid, STEM, config, survey_features=survey, surrogate_config=FAST_GP)
    assert isinstance(policy, GuidedPolicy) and policy.learned
    assert policy.surrogate.config.feature_kernel == "linear" and policy.surrogate.feature_dim == 2
    assert policy._prior_bonus() == 0.0  # the prior is in the model now, not added beside it
    (first,) = policy.suggest(1)
    assert index_of(grid, first) == bright
    # A wall seen in a tile makes its continuation an input of every later prediction.
    policy.ingest([first], [1.0])
    policy.ingest_walls([horizontal_wall(75.0)])
    assert policy._candidate_inputs()[:, 1].max() == pytest.approx(1.0)
    mismatched = GPSurrogate(FAST_GP, stage_x_nm=STEM.stage_x_nm, stage_y_nm=STEM.stage_y_nm)
    with pytest.raises(PolicyError, match="learn_weights needs a surrogate with a linear kernel"):
        GuidedPolicy(grid, STEM, mismatched, config, survey_features=survey)
