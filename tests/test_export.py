"""The synthetic specimen written in the Sm-BFO dataset layout and read back by the replay driver."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.driver import ScanRequest
from agent.errors import DataFileError
from simulator.config import SimulatorConfig
from simulator.dataset import find_dataset_files, load_image
from simulator.export import export_specimen, read_ground_truth, unit_cell_parameters
from simulator.replay import ReplayMicroscope
from simulator.specimen import SITE_A, Specimen

PIXEL_NM = 0.04


@pytest.fixture(scope="module")
def exported(
    tmp_path_factory: pytest.TempPathFactory, small_config: SimulatorConfig, small_specimen: Specimen
) -> Path:
    out = tmp_path_factory.mktemp("specimen")
    export_specimen(small_specimen, small_config, out, pixel_size_nm=PIXEL_NM, dwell_us=4.0)
    return out


def test_files_follow_the_dataset_layout(exported: Path) -> None:
    names = sorted(path.name for path in exported.iterdir())
    assert names == ["Sm_10_3_HAADF.h5", "Sm_10_3_UCParameterization.h5", "ground_truth.h5", "simulator.yaml"]
    files = find_dataset_files(exported)
    assert files.composition_pct == 10.0 and files.index == 3


def test_image_and_unit_cells_round_trip(exported: Path, small_specimen: Specimen) -> None:
    recorded = load_image(exported)
    assert recorded.image.shape == (750, 750)
    assert recorded.pixel_size_nm == pytest.approx(PIXEL_NM)
    cells = recorded.uc_parameters
    expected = unit_cell_parameters(small_specimen, PIXEL_NM)
    assert cells is not None and cells.xy_order == "xy"
    np.testing.assert_allclose(cells.x_px, expected.x_px)
    np.testing.assert_allclose(cells.pxy, expected.pxy)
    np.testing.assert_array_equal(cells.ab, expected.ab)


def test_ground_truth_round_trips(exported: Path, small_specimen: Specimen) -> None:
    truth = read_ground_truth(exported / "ground_truth.h5")
    np.testing.assert_array_equal(truth.x_nm, small_specimen.x_nm)
    np.testing.assert_array_equal(truth.label, small_specimen.label)
    assert truth.features == small_specimen.features
    assert truth.config == small_specimen.config
    np.testing.assert_array_equal(truth.columns_in(3, 6, 3, 6), small_specimen.columns_in(3, 6, 3, 6))


def test_unreadable_ground_truth_is_reported(tmp_path: Path) -> None:
    with pytest.raises(DataFileError, match="ground-truth file not found"):
        read_ground_truth(tmp_path / "ground_truth.h5")
    corrupt = tmp_path / "ground_truth.h5"
    corrupt.write_bytes(b"not hdf5 at all")
    with pytest.raises(DataFileError, match="cannot read ground truth"):
        read_ground_truth(corrupt)


def test_replayed_tiles_share_stage_coordinates_with_the_specimen(
    exported: Path, small_specimen: Specimen
) -> None:
    with ReplayMicroscope.from_path(exported) as microscope:
        assert microscope.describe().stage_x_nm == pytest.approx((0.0, 30.0))
        request = ScanRequest(x_nm=12.0, y_nm=17.0, shape=(64, 64), pixel_size_nm=PIXEL_NM, dwell_us=4.0)
        tile = microscope.acquire(request)
    source = load_image(exported).image
    # The request is aligned on recorded pixels: the replayed tile is those pixels exactly.
    r0 = round(float(tile.origin_nm[1] / PIXEL_NM - 0.5))
    c0 = round(float(tile.origin_nm[0] / PIXEL_NM - 0.5))
    np.testing.assert_array_equal(tile.image, source[r0 : r0 + 64, c0 : c0 + 64])
    # Bright pixels of the tile lie on the true A columns.
    x0, x1, y0, y1 = tile.extent_nm
    a_columns = [
        c
        for c in small_specimen.columns_in(x0 + 0.1, x1 - 0.1, y0 + 0.1, y1 - 0.1)
        if small_specimen.site[c] == SITE_A
    ]
    rows, cols = tile.stage_to_pixel(small_specimen.x_nm[a_columns], small_specimen.y_nm[a_columns])
    on_columns = tile.image[np.rint(rows).astype(int), np.rint(cols).astype(int)].mean()
    assert on_columns > 2.5 * tile.image.mean()


def test_replay_reads_the_recording_settings_and_lowers_the_dose(exported: Path) -> None:
    with ReplayMicroscope.from_path(exported) as microscope:
        # The export recorded 4 us at the simulator's 20 pA; a 1 us request is a quarter dose.
        assert microscope.describe().beam_current_pa == 20.0
        full = ScanRequest(x_nm=15.0, y_nm=15.0, shape=(100, 100), pixel_size_nm=PIXEL_NM, dwell_us=4.0)
        quarter = full.model_copy(update={"dwell_us": 1.0, "request_id": "quarter"})
        recorded, low = microscope.acquire(full).image, microscope.acquire(quarter).image
    assert low.mean() == pytest.approx(recorded.mean(), rel=0.02)
    # Counts are detected electrons and the recording is taken as the expected signal S:
    # a quarter of the dwell draws Poisson(S / 4) and scales back by 4, variance 4 S.
    assert (low - recorded).var() == pytest.approx(4 * recorded.clip(0).mean(), rel=0.1)
