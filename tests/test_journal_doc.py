"""docs/journal.md: its h5py example reads a real journal as the project's reader does."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from agent.journal import read_journal
from agent.session import BudgetConfig, ScanSettings, Session, SessionConfig
from simulator.config import SimulatorConfig
from simulator.drivers import SimulatedMicroscope
from simulator.specimen import Specimen

DOC = Path(__file__).resolve().parents[1] / "docs" / "journal.md"


def test_the_documented_h5py_reader_gets_what_read_journal_gets(
    tmp_path: Path, small_config: SimulatorConfig, small_specimen: Specimen
) -> None:
    config = SessionConfig(
        budget=BudgetConfig(max_tiles=3),
        survey=ScanSettings(pixel_size_nm=0.25, dwell_us=1.0, shape=(1024, 1024)),
        tiles=ScanSettings(pixel_size_nm=0.02, dwell_us=4.0, shape=(128, 128)),
        start_tiles=2,
        lookahead_tiles=1,
    )
    journal = tmp_path / "journal.h5"
    with SimulatedMicroscope(small_config, small_specimen) as microscope:
        Session(microscope, config, journal).run()
    (code,) = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    scope: dict = {"JOURNAL": str(journal)}
    exec(compile(code, str(DOC), "exec"), scope)  # the documentation's own example, as a reader runs it
    contents = read_journal(journal)
    assert contents.end is not None and scope["config"] == contents.config
    assert len(scope["steps"]) == len(contents.steps) == 4
    for (record, image, columns), step in zip(scope["steps"], contents.steps, strict=True):
        assert record == step.record
        np.testing.assert_array_equal(image, step.image)
        if step.columns is None:
            assert columns is None
        else:
            assert set(columns) >= {"x_nm", "y_nm", "species", "abnormal"}
            np.testing.assert_array_equal(columns["x_nm"], step.columns.x_nm)
            np.testing.assert_array_equal(columns["species"], step.columns.species)
    # Every key the page lists for a step's record is in the records.
    guided = scope["steps"][-1][0]
    documented = (
        "request", "tile", "placement", "score", "decision", "decided_after_step", "timings",
        "nodes", "columns_found", "mean_dose_e_per_a2", "surrogate", "wall", "columns_meta",
    )  # fmt: skip
    assert [key for key in documented if key not in guided] == []
