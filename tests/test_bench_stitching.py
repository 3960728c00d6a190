"""The stitching benchmark's figures on a small real session (simulated instrument, real registration)."""

from __future__ import annotations

import numpy as np

from agent.session import BudgetConfig, Session
from analysis.bench_stitching import SESSION, evaluate_session
from simulator.config import SimulatorConfig
from simulator.drivers import SimulatedMicroscope
from simulator.specimen import generate_specimen
from tests.conftest import specimen_with


def test_duplicates_are_counted_against_the_truth_and_survey_tiles_in_the_survey_frame() -> None:
    # An amorphous patch: its atoms are closer to each other than 0.4 a, in the truth as well.
    config = SimulatorConfig(
        seed=3,
        specimen=specimen_with(size_nm=(24.0, 24.0), amorphous_patches=1, amorphous_patch_radius_nm=3.0),
    )
    specimen = generate_specimen(config.specimen, 3)
    session_config = SESSION.model_copy(
        update={"budget": BudgetConfig(max_tiles=3), "start_tiles": 1, "policy": "raster", "seed": 3}
    )
    with SimulatedMicroscope(config, specimen) as microscope:
        session = Session(microscope, session_config)
        session.run()
        figures = evaluate_session(session, microscope, specimen)
    assert len(figures["tiles"]) == 3 and figures["nodes"] == len(session.graph)
    # Close pairs include real ones (amorphous atoms); duplicates are only pairs on one true column.
    assert figures["close_pair_fraction"] > 2 * figures["duplicate_fraction"]
    # The overlaps stitched: what duplicates remain are double detections inside one tile.
    assert figures["duplicate_fraction_between_tiles"] == 0.0
    assert [tile["method"] for tile in figures["tiles"]][1:] == ["lattice", "lattice"]
    for tile in figures["tiles"]:
        # The session had a survey: every tile is also measured in the survey's frame.
        assert tile["survey_frame_residual_nm"] is not None and np.isfinite(tile["survey_frame_residual_nm"])
        assert tile["residual_nm"] >= 0.0
    assert figures["stitched_rms_nm"] is not None and figures["single_tile_rms_nm"] < 0.05
