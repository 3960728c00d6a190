"""Scoring discovery against ground truth: feature membership without label overwrites, the strict
rule (half of a feature 1 nm inside tiles, where they truly landed) beside the lenient one."""

from __future__ import annotations

import numpy as np

from agent.driver import ScanRequest
from agent.session import StepRecord
from agent.survey import CandidateGrid
from analysis.guidance import STRICT_MARGIN_NM, DiscoveryTracker
from simulator.config import SimulatorConfig
from simulator.drivers import SimulatedMicroscope
from simulator.specimen import Specimen, generate_specimen
from tests.conftest import SMALL_SPECIMEN, specimen_with

TILE = ((256, 256), 0.02)
"""Tile shape and pixel size of these tests: 5.12 nm tiles."""


def _grid(config: SimulatorConfig, specimen: Specimen) -> CandidateGrid:
    with SimulatedMicroscope(config, specimen) as microscope:
        return CandidateGrid.tiling(microscope.describe(), *TILE)


def _step(x_nm: float, y_nm: float, index: int = 0) -> StepRecord:
    request = ScanRequest(x_nm=x_nm, y_nm=y_nm, shape=TILE[0], pixel_size_nm=TILE[1], dwell_us=4.0)
    return StepRecord(index, "guided", request, None, None, 1.0, [], {})


def test_members_keep_every_feature_a_column_belongs_to() -> None:
    # Clusters are placed near walls, so some of their columns lie on a wall too.
    config = specimen_with(size_nm=(40.0, 40.0), domain_walls=2, vacancy_clusters=4, substitution_clusters=4)
    specimen = generate_specimen(config, 5)
    members = specimen.members
    assert members is not None
    pairs = set(
        zip(np.round(members["x_nm"], 6), np.round(members["y_nm"], 6), members["feature_id"], strict=True)
    )
    assert len(pairs) == members["x_nm"].size, "each (point, feature) pair is listed once"
    # Every column keeps its labelled feature among its memberships.
    labelled = specimen.feature_id >= 0
    for x, y, fid in zip(
        specimen.x_nm[labelled], specimen.y_nm[labelled], specimen.feature_id[labelled], strict=True
    ):
        assert (round(x, 6), round(y, 6), fid) in pairs
    # And at least one substitution column on a wall belongs to both, where the label kept only one.
    by_point: dict[tuple[float, float], set[int]] = {}
    for x, y, fid in pairs:
        by_point.setdefault((x, y), set()).add(int(fid))
    kinds = {f.feature_id: f.kind for f in specimen.features}
    shared = [ids for ids in by_point.values() if {kinds[i] for i in ids} >= {"domain_wall", "substitution"}]
    assert shared, "no column of a substitution cluster lies on a wall in this layout"
    # Vacant sites are members of their cluster.
    vacancy_ids = {f.feature_id for f in specimen.features if f.kind == "vacancy"}
    assert vacancy_ids <= set(members["feature_id"].tolist())
    # The same seed gives the same memberships.
    again = generate_specimen(config, 5).members
    assert again is not None and all(np.array_equal(members[k], again[k]) for k in members)


def test_a_specimen_without_members_falls_back_on_its_single_labels(small_specimen: Specimen) -> None:
    from dataclasses import replace

    bare = replace(small_specimen, members=None)
    members = bare.feature_members()
    planted = small_specimen.feature_id >= 0
    assert members["x_nm"].size == planted.sum() + small_specimen.vacancies["x_nm"].size
    assert set(members["feature_id"].tolist()) <= {f.feature_id for f in small_specimen.features}


def test_strict_scoring_needs_half_a_feature_a_margin_inside_the_tile_where_it_landed(
    small_config: SimulatorConfig, small_specimen: Specimen
) -> None:
    grid = _grid(small_config, small_specimen)
    members = small_specimen.feature_members()
    cluster = next(f for f in small_specimen.features if f.kind == "substitution")
    mine = members["feature_id"] == cluster.feature_id
    x, y = members["x_nm"][mine], members["y_nm"][mine]
    cx, cy = float(np.median(x)), float(np.median(y))

    # A tile centred on the cluster images it by both rules.
    centred = DiscoveryTracker(small_specimen, grid)
    centred(_step(cx, cy))
    assert cluster.feature_id in centred.strict_imaged
    assert centred.curve[-1]["strict_imaged_fraction"] == len(centred.strict_imaged) / centred.strict_total

    # The same request, but the tile truly landed a tile width away: not strictly imaged.
    width = TILE[0][0] * TILE[1]
    shifted = DiscoveryTracker(small_specimen, grid, lambda request: (width, 0.0))
    shifted(_step(cx, cy))
    assert cluster.feature_id not in shifted.strict_imaged

    # A tile whose edge runs through the cluster's middle holds under half of it a margin inside.
    edge = DiscoveryTracker(small_specimen, grid)
    edge(_step(cx + 0.5 * width, cy))
    inside = (x >= cx + STRICT_MARGIN_NM) & (x <= cx + width - STRICT_MARGIN_NM)
    assert inside.mean() < 0.5
    assert cluster.feature_id not in edge.strict_imaged


def test_a_feature_without_columns_is_not_planted_in_strict_scoring(small_config: SimulatorConfig) -> None:
    specimen = generate_specimen(SMALL_SPECIMEN, small_config.seed)
    grid = _grid(small_config, specimen)
    assert specimen.members is not None
    keep = specimen.members["feature_id"] != 0
    emptied = {k: v[keep] for k, v in specimen.members.items()}
    from dataclasses import replace

    tracker = DiscoveryTracker(replace(specimen, members=emptied), grid)
    assert tracker.total == len(specimen.features)
    assert tracker.strict_total == len(specimen.features) - 1
