"""The Nion Swift bridge end to end: headless Swift + usim + the plug-in, driven over ZeroMQ.

One Nion Swift application (TestUI, no display) runs for the module, with the usim specimen
device imaging the small synthetic specimen without noise, and the bridge serving it on a
free loopback port. Each test is bounded by a timeout; Swift is always shut down.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("nion.swift", reason="Nion Swift is not installed (pip install -e '.[nion]')")
pytest.importorskip("nion.usim_device", reason="nionswift-usim is not installed (pip install -e '.[nion]')")

from agent.columns import SPECIES_O, find_columns
from agent.driver import ScanRequest, Tile, electrons_per_pixel
from agent.errors import AcquisitionAborted, AuthenticationError, OutOfRangeError
from agent.journal import read_journal
from agent.protocol.client import ZmqMicroscope
from agent.protocol.security import CurveClientKeys, generate_keys
from agent.session import BudgetConfig, ScanSettings, Session, SessionConfig
from analysis.ground_truth import match_columns, true_columns_in
from nionswift_plugin.micrography_bridge.driver import NionScanDriver
from nionswift_plugin.micrography_bridge.geometry import wrap_angle
from nionswift_plugin.micrography_bridge.headless import HeadlessSwift
from nionswift_plugin.micrography_bridge.host import BridgeHost
from nionswift_plugin.micrography_bridge.usim_specimen import (
    ReplayScanGenerator,
    SpecimenScanGenerator,
    register_specimen_scan_device,
    unregister_specimen_scan_device,
)
from simulator.config import ImagingConfig, InstrumentConfig, SimulatorConfig
from simulator.imaging import render_expected_counts
from simulator.replay import ReplayMicroscope
from simulator.specimen import Specimen, generate_specimen
from tests.conftest import IDEAL_IMAGING, SMALL_SPECIMEN

pytestmark = pytest.mark.timeout(60)

SEED = 3
BEAM_CURRENT_PA = 35.0  # not usim's 200 pA: describe() must read it from the instrument


@dataclass
class Bridge:
    swift: HeadlessSwift
    host: BridgeHost
    endpoint: str

    def set_scan_rotation(self, degrees: float) -> None:
        """Turn the simulated scan against the specimen and calibrate the bridge to it."""
        self.host.generator.rotation_rad = math.radians(degrees)
        assert self.host.driver is not None
        self.host.driver.calibrate(degrees)


@pytest.fixture(scope="module")
def bridge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bridge]:
    folder = tmp_path_factory.mktemp("nion")
    simulator = SimulatorConfig(
        seed=SEED,
        specimen=SMALL_SPECIMEN,
        imaging=IDEAL_IMAGING,
        instrument=InstrumentConfig(beam_current_pa=BEAM_CURRENT_PA),
    )
    (folder / "simulator.yaml").write_text(
        yaml.safe_dump(simulator.model_dump(mode="json")), encoding="utf-8"
    )
    settings = {
        "bind": "tcp://127.0.0.1:*",
        "events_bind": "tcp://127.0.0.1:*",
        "heartbeat_s": 0.2,
        "journal": str(folder / "journal"),
        "hardware_source_id": "micrography_usim_scan",
        "instrument_id": "micrography_usim_scan_stem_controller",
        "detectors": {"HAADF": 0},
        "field_nm": [30.0, 30.0],
        "max_tile_shape": [512, 512],
        "usim_specimen": {"seed": SEED, "simulator_config": str(folder / "simulator.yaml")},
    }
    (folder / "bridge.yaml").write_text(yaml.safe_dump(settings), encoding="utf-8")
    swift = HeadlessSwift(folder / "bridge.yaml", workdir=folder / "swift")
    try:
        swift.start()
        host = swift.bridge()
        assert host is not None, "the bridge plug-in was not loaded by Nion Swift"
        assert swift.periodic_until(host.ready, timeout_s=30.0), "the bridge did not start in 30 s"
        assert host.error is None, host.error
        yield Bridge(swift, host, host.server.endpoint)
    finally:
        swift.close()


@pytest.fixture
def remote(bridge: Bridge) -> Iterator[ZmqMicroscope]:
    bridge.set_scan_rotation(0.0)
    with ZmqMicroscope(bridge.endpoint, timeout_s=10.0) as microscope:
        yield microscope


@pytest.fixture(scope="module")
def specimen() -> Specimen:
    return generate_specimen(SMALL_SPECIMEN, SEED)


def against_truth(tile: Tile, specimen: Specimen) -> tuple[float, float, float]:
    """Recall, precision and RMS error (pixels) of the columns found in ``tile``."""
    columns = find_columns(tile)
    # The truth is the cation lattice; the pure-O columns the finder also reports are not in it.
    columns = columns.select(columns.species != SPECIES_O)
    found = np.stack([columns.x_nm, columns.y_nm], 1)
    inside = true_columns_in(specimen, tile.extent_nm, inset_nm=0.3)
    everywhere = true_columns_in(specimen, tile.extent_nm)
    recall = match_columns(found, np.stack([specimen.x_nm[inside], specimen.y_nm[inside]], 1), 0.1).recall
    match = match_columns(found, np.stack([specimen.x_nm[everywhere], specimen.y_nm[everywhere]], 1), 0.1)
    rms_px = (
        float(np.sqrt(np.mean(match.distance**2))) / tile.pixel_size_nm if match.distance.size else math.inf
    )
    return recall, match.precision, rms_px


def test_describe_reads_the_field_and_the_instruments_beam_current(remote: ZmqMicroscope) -> None:
    description = remote.describe()
    assert description.name == "Nion Swift: micrography_usim_scan"
    assert description.stage_x_nm == (0.0, 30.0) and description.stage_y_nm == (0.0, 30.0)
    assert description.beam_current_pa == pytest.approx(BEAM_CURRENT_PA)
    assert description.detectors == ("HAADF",)


@pytest.mark.parametrize("rotation_deg", [0.0, 30.0, -90.0, 137.0])
def test_columns_land_on_ground_truth_at_every_scan_rotation(
    bridge: Bridge, remote: ZmqMicroscope, specimen: Specimen, rotation_deg: float
) -> None:
    bridge.set_scan_rotation(rotation_deg)
    for x, y, pixel in ((15.0, 15.0, 0.02), (8.0, 20.0, 0.03), (24.0, 22.0, 0.025)):
        tile = remote.acquire(
            ScanRequest(x_nm=x, y_nm=y, shape=(128, 128), pixel_size_nm=pixel, dwell_us=1.0)
        )
        # Nion executed the compensating rotation the bridge commanded.
        assert tile.metadata["nion_rotation_rad"] == pytest.approx(wrap_angle(-math.radians(rotation_deg)))
        recall, precision, rms_px = against_truth(tile, specimen)
        assert recall > 0.97 and precision > 0.97, (x, y, pixel, recall, precision)
        assert rms_px < 0.3, (x, y, pixel, rms_px)


def test_a_wrong_rotation_calibration_shows_in_the_ground_truth_check(
    bridge: Bridge, remote: ZmqMicroscope, specimen: Specimen
) -> None:
    # The scan is really turned by 30 degrees but the bridge believes 0: columns no longer match.
    bridge.host.generator.rotation_rad = math.radians(30.0)
    tile = remote.acquire(
        ScanRequest(x_nm=15.0, y_nm=15.0, shape=(128, 128), pixel_size_nm=0.02, dwell_us=1.0)
    )
    recall, _, _ = against_truth(tile, specimen)
    assert recall < 0.5


@pytest.mark.parametrize("rotation_deg", [0.0, 30.0])
def test_a_non_square_frame_is_the_simulators_image_of_the_same_stage_window(
    bridge: Bridge, remote: ZmqMicroscope, specimen: Specimen, rotation_deg: float
) -> None:
    bridge.set_scan_rotation(rotation_deg)
    request = ScanRequest(x_nm=11.0, y_nm=17.0, shape=(96, 160), pixel_size_nm=0.03, dwell_us=2.0)
    tile = remote.acquire(request)
    assert tile.origin_nm == pytest.approx(request.origin_nm, abs=1e-9)
    expected = render_expected_counts(
        specimen,
        tile.origin_nm,
        tile.shape,
        tile.pixel_size_nm,
        electrons_per_pixel(BEAM_CURRENT_PA, request.dwell_us),
        IDEAL_IMAGING,
    )
    np.testing.assert_allclose(tile.image, expected, rtol=1e-4, atol=1e-4)


def test_a_retried_request_id_is_exposed_once(bridge: Bridge, remote: ZmqMicroscope) -> None:
    request = ScanRequest(x_nm=15.0, y_nm=12.0, shape=(64, 64), pixel_size_nm=0.02, dwell_us=1.0)
    before_frames, before = bridge.host.generator.frames, remote.status().exposures
    first = remote.acquire(request)
    again = remote.acquire(request)
    np.testing.assert_array_equal(first.image, again.image)
    assert remote.status().exposures == before + 1
    assert bridge.host.generator.frames == before_frames + 1  # Nion scanned once


def test_abort_stops_the_nion_frame_and_the_next_scan_works(bridge: Bridge, remote: ZmqMicroscope) -> None:
    frames, exposures = bridge.host.generator.frames, remote.status().exposures

    def abort_once_scanning() -> None:
        deadline = time.monotonic() + 5.0
        while bridge.host.generator.frames == frames and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        remote.abort()

    threading.Thread(target=abort_once_scanning, daemon=True).start()
    started = time.monotonic()
    with pytest.raises(AcquisitionAborted, match="aborted"):
        # 256 x 256 px at 60 us: a 4 s frame in usim's real time.
        remote.acquire(ScanRequest(x_nm=15.0, y_nm=15.0, shape=(256, 256), pixel_size_nm=0.02, dwell_us=60.0))
    assert time.monotonic() - started < 3.0
    assert remote.status().exposures == exposures
    # Nion's record() refuses to start while the aborted one winds down; the bridge waits for it.
    tile = remote.acquire(ScanRequest(x_nm=15.0, y_nm=15.0, shape=(64, 64), pixel_size_nm=0.02, dwell_us=1.0))
    assert tile.shape == (64, 64) and remote.status().exposures == exposures + 1


def test_a_kept_operator_rotation_is_refused_before_exposing(bridge: Bridge) -> None:
    assert bridge.host.driver is not None
    config = bridge.host.config.model_copy(update={"compensate_rotation": False, "scan_rotation_deg": 30.0})
    frames = bridge.host.generator.frames
    with (
        NionScanDriver(bridge.host.driver.scan, config, BEAM_CURRENT_PA) as driver,
        pytest.raises(OutOfRangeError, match=r"rotated by 30 deg against the stage.*nothing was exposed"),
    ):
        driver.acquire(ScanRequest(x_nm=15.0, y_nm=15.0, shape=(64, 64), pixel_size_nm=0.02, dwell_us=1.0))
    assert bridge.host.generator.frames == frames


@pytest.mark.parametrize("lookahead", [0, 1], ids=["sequential", "pipelined"])
def test_a_short_guided_session_completes_through_nion(
    lookahead: int, bridge: Bridge, remote: ZmqMicroscope, tmp_path: Path
) -> None:
    bridge.set_scan_rotation(30.0)
    config = SessionConfig(
        budget=BudgetConfig(max_tiles=4),
        survey=ScanSettings(pixel_size_nm=0.25, dwell_us=1.0, shape=(512, 512)),
        tiles=ScanSettings(pixel_size_nm=0.02, dwell_us=1.0, shape=(128, 128)),
        start_tiles=2,
        warmup_steps=10,
        lookahead_tiles=lookahead,  # pipelined: the link is driven from the acquisition thread
    )
    session = Session(remote, config, tmp_path / "journal.h5")
    summary = session.run()
    assert summary["tiles"] == 4 and summary["stop_reason"] == "tile budget of 4 spent"
    contents = read_journal(tmp_path / "journal.h5")
    assert len(contents.steps) == 5 and not contents.problems
    assert contents.steps[0].record["kind"] == "survey"
    for step in session.steps:
        assert step.tile is None or step.tile.metadata["nion_hardware_source"] == "micrography_usim_scan"
    # The same registration placed every Nion tile (its calibrations give the nominal placement).
    placements = [step.record["placement"] for step in contents.steps[1:]]
    assert all(
        p is not None and p["method"] in ("overlap", "lattice", "survey", "predicted") for p in placements
    )
    assert all("register" in step.record["timings"] for step in contents.steps[1:])


def test_counts_follow_the_pixel_time_with_poisson_noise(specimen: Specimen) -> None:
    from nion.device_kit.ScanDevice import ScanFrameParameters

    imaging = ImagingConfig().without_scan_errors()  # counting and read noise on
    config = SimulatorConfig(seed=SEED, specimen=SMALL_SPECIMEN, imaging=imaging)
    generator = SpecimenScanGenerator(config, specimen)

    def frame(dwell_us: float) -> np.ndarray:
        parameters = ScanFrameParameters(
            size=(192, 192), fov_nm=192 * 0.02, pixel_time_us=dwell_us, center_nm=(0, 0)
        )
        return generator.generate_scan_data(None, parameters)

    short, long = frame(1.0), frame(4.0)
    assert long.mean() / short.mean() == pytest.approx(4.0, rel=0.03)
    origin = (15.0 - 0.5 * 191 * 0.02, 15.0 - 0.5 * 191 * 0.02)
    expected = render_expected_counts(
        specimen,
        origin,
        (192, 192),
        0.02,
        electrons_per_pixel(config.instrument.beam_current_pa, 4.0),
        imaging,
    )
    # Poisson counts plus 0.5-count read noise: the residual variance is the mean plus 0.25.
    variance = float(np.var(long - expected))
    assert variance / (expected.mean() + 0.25) == pytest.approx(1.0, rel=0.1)


def test_a_recording_is_replayed_through_nion_at_a_rotated_scan(
    bridge: Bridge, specimen: Specimen, tmp_path: Path
) -> None:
    # A recording of the specimen's corner: recorded pixel (r, c) at ((c + 0.5) p, (r + 0.5) p).
    pixel = 0.02
    recording = render_expected_counts(
        specimen, (0.5 * pixel, 0.5 * pixel), (600, 600), pixel, 100.0, IDEAL_IMAGING
    )
    np.save(tmp_path / "recording.npy", recording.astype(np.float32))
    replay = ReplayMicroscope.from_path(
        tmp_path / "recording.npy", pixel_size_nm=pixel, recorded_dwell_us=10.0, counts_per_unit=1.0
    )
    generator = ReplayScanGenerator(replay, rotation_deg=30.0)
    registered = register_specimen_scan_device(generator, "micrography_usim_replay")
    try:
        scan = bridge.swift.api.get_hardware_source_by_id("micrography_usim_replay", "~1.0")
        assert scan is not None
        config = bridge.host.config.model_copy(
            update={
                "hardware_source_id": "micrography_usim_replay",
                "field_nm": (12.0, 12.0),
                "scan_rotation_deg": 30.0,
            }
        )
        with NionScanDriver(scan, config, replay.describe().beam_current_pa) as driver:
            # At the recorded dwell the replay adds no shot noise: only the rotated resampling.
            tile = driver.acquire(
                ScanRequest(x_nm=6.0, y_nm=6.5, shape=(160, 160), pixel_size_nm=pixel, dwell_us=10.0)
            )
        recall, precision, rms_px = against_truth(tile, specimen)
        assert recall > 0.97 and precision > 0.97 and rms_px < 0.3, (recall, precision, rms_px)
        assert generator.frames == 1
    finally:
        unregister_specimen_scan_device(*registered)


def test_a_second_bridge_with_curve_admits_listed_agents_only(
    bridge: Bridge, specimen: Specimen, tmp_path: Path
) -> None:
    _, server_secret = generate_keys(tmp_path / "server", "instrument")
    _, client_secret = generate_keys(tmp_path / "clients", "agent")
    _, intruder_secret = generate_keys(tmp_path / "intruders", "intruder")
    server_public = tmp_path / "server" / "instrument.key"
    config = bridge.host.config.model_copy(
        update={
            "curve_secret_key": str(server_secret),
            "allowed_clients": str(tmp_path / "clients"),
            "journal": None,
            "usim_specimen": None,  # serve the device the first bridge registered
        }
    )
    host = BridgeHost(bridge.swift.api, config).start()
    try:
        assert host.ready.wait(10.0) and host.error is None, host.error
        with ZmqMicroscope(
            host.server.endpoint, curve=CurveClientKeys.from_files(client_secret, server_public)
        ) as agent:
            # The beam current comes from the instrument's BeamCurrent control, as in the first bridge.
            assert agent.describe().beam_current_pa == pytest.approx(BEAM_CURRENT_PA)
            tile = agent.acquire(
                ScanRequest(x_nm=15.0, y_nm=15.0, shape=(64, 64), pixel_size_nm=0.02, dwell_us=1.0)
            )
            assert tile.shape == (64, 64)
        with pytest.raises(AuthenticationError, match="refused this client's CURVE key"):
            ZmqMicroscope(
                host.server.endpoint, curve=CurveClientKeys.from_files(intruder_secret, server_public)
            )
        with pytest.raises(AuthenticationError, match="requires CURVE authentication"):
            ZmqMicroscope(host.server.endpoint)
        assert host.server.status().exposures == 1
    finally:
        host.close()
