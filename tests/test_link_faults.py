"""The link under faults: abort mid-scan, tile retention, log forging, size ceilings, a torn journal,
SIGKILL at every phase of an acquisition, a full disk and a vanishing client."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import simulator.drivers as drivers
import simulator.imaging as imaging
from agent.driver import ScanRequest, Tile
from agent.errors import (
    AcquisitionAborted,
    ExposureInterruptedError,
    RemoteInstrumentError,
)
from agent.protocol.client import ZmqMicroscope
from agent.protocol.framing import encode
from agent.protocol.messages import AbortCommand, AcquireCommand, ErrorCode, HelloCommand, StatusCommand
from simulator.config import SimulatorConfig
from simulator.drivers import SimulatedMicroscope
from simulator.exposure_journal import JOURNAL_FILE, TORN_FILE, ExposureJournal
from simulator.specimen import Specimen
from tests.test_link import (
    ask,
    killed_and_restarted,
    raw_dealer,
    scan,
    serving,
    start_server_process,
)

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def simulated(small_config: SimulatorConfig, small_specimen: Specimen) -> Iterator[SimulatedMicroscope]:
    with SimulatedMicroscope(small_config, small_specimen) as driver:
        yield driver


class PausingMicroscope(SimulatedMicroscope):
    """Holds its scan at the ``pause_at``-th look at the abort flag until an abort arrives."""

    def __init__(self, *args: Any, pause_at: int = 4, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pause_at = pause_at
        self.looks = 0
        self.paused = threading.Event()

    @property
    def abort_requested(self) -> bool:
        self.looks += 1
        if self.looks == self.pause_at:
            self.paused.set()
            self._abort.wait(10.0)
        return super().abort_requested


def _acquire_in_thread(remote: Any, request: ScanRequest) -> tuple[threading.Thread, list[Any]]:
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(remote.acquire(request))
        except Exception as error:  # the outcome is the assertion
            outcome.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


# --------------------------------------------------------------------------- banded scan and abort


def test_the_banded_scan_gives_the_bits_of_the_whole_frame(
    small_config: SimulatorConfig, small_specimen: Specimen, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tiny steps and bands: many looks at the abort flag within one 120 x 90 tile.
    monkeypatch.setattr(imaging, "_STEP_ELEMENTS", 20_000)
    monkeypatch.setattr(drivers, "_NOISE_BAND_PIXELS", 900)
    request = scan("bits", shape=(120, 90))
    with SimulatedMicroscope(small_config, small_specimen) as banded:
        tile = banded.acquire(request)
    with SimulatedMicroscope(small_config, small_specimen) as whole:
        frame = whole._advance(request)
        rng = whole._noise_stream()
        truth = whole._record(request, frame, rng)
        pixel = request.pixel_size_nm
        expected = imaging.render_expected_counts(
            small_specimen,
            request.origin_nm,
            request.shape,
            pixel,
            drivers.electrons_per_pixel(whole.describe().beam_current_pa, request.dwell_us),
            small_config.imaging,
            dx_px=truth.row_offset_nm[:, 0] / pixel,
            dy_px=truth.row_offset_nm[:, 1] / pixel,
            dx_col_px=truth.col_offset_nm / pixel,
        )
        reference = imaging.add_detector_noise(expected, small_config.imaging, rng)
    np.testing.assert_array_equal(tile.image.view(np.uint32), reference.view(np.uint32))
    steps = list(
        imaging.render_expected_counts_steps(
            np.zeros(request.shape), small_specimen, request.origin_nm, pixel, 10.0, small_config.imaging
        )
    )
    assert len(steps) >= 3 and steps == sorted(steps) and steps[-1] == request.shape[0]


def test_abort_stops_a_running_scan_counts_its_lines_and_spends_the_id(
    small_config: SimulatorConfig, small_specimen: Specimen, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(drivers, "_NOISE_BAND_PIXELS", 96 * 10)  # ten lines a band
    request = scan("stopped", shape=(96, 96))
    journal = tmp_path / "journal"
    with (
        PausingMicroscope(small_config, small_specimen) as slow,
        serving(slow, journal=journal) as server,
        ZmqMicroscope(server.endpoint, timeout_s=10.0) as remote,
    ):
        thread, outcome = _acquire_in_thread(remote, request)
        assert slow.paused.wait(10.0)  # three bands (30 lines) scanned, the fourth about to start
        with raw_dealer(server.endpoint) as socket:
            reply = ask(socket, encode(AbortCommand(request_id="stopped"))).header
        assert reply.type == "abort_ok" and reply.aborted == ("stopped",)
        thread.join(10.0)
        assert isinstance(outcome[0], AcquisitionAborted) and "after 30 of 96 lines" in str(outcome[0])
        full = slow.describe().dose_of(request)
        status = remote.status()
        assert status.exposures == 1 and status.interrupted_exposures == 1
        assert status.total_dose_e_per_a2 == pytest.approx(full * 30 / 96)
        band_sum = slow.dose_map.map_e_per_a2.sum()
        cell_a2 = (slow.dose_map.cell_nm * 10) ** 2
        assert band_sum * cell_a2 == pytest.approx(full * 96 * 0.2 * 30 * 0.2)  # 30 lines of 96 px, in A^2
        with pytest.raises(ExposureInterruptedError, match="not exposed again under this id"):
            remote.acquire(request)
        assert remote.status().exposures == 1 and slow.exposures == 1
    with (
        SimulatedMicroscope(small_config, small_specimen) as again,
        serving(again, journal=journal) as server,
        ZmqMicroscope(server.endpoint) as remote,
    ):
        with pytest.raises(ExposureInterruptedError):
            remote.acquire(request)
        assert remote.status().exposures == 1 and again.exposures == 0
        assert again.dose_map.map_e_per_a2.sum() == pytest.approx(band_sum)  # the band only, restored


def test_the_driver_never_reexposes_an_aborted_id(
    small_config: SimulatorConfig, small_specimen: Specimen
) -> None:
    with PausingMicroscope(small_config, small_specimen, pause_at=1) as driver:
        thread, outcome = _acquire_in_thread(driver, scan("once"))
        assert driver.paused.wait(10.0)
        driver.abort()
        thread.join(10.0)
        assert isinstance(outcome[0], AcquisitionAborted) and outcome[0].rows_scanned >= 1
        with pytest.raises(ExposureInterruptedError, match="aborted after its scan had started"):
            driver.acquire(scan("once"))
        assert driver.exposures == 1
        # An abort before a scan starts leaves nothing exposed and the id free.
        stop = threading.Event()
        stop.set()
        with pytest.raises(AcquisitionAborted) as not_started:
            driver.acquire(scan("queued", x_nm=10.0), abort=stop)
        assert not not_started.value.exposed
        driver.acquire(scan("queued", x_nm=10.0))
        assert driver.exposures == 2


# --------------------------------------------------------------------------- retention and reply_expired


def test_a_tile_beyond_the_budget_is_answered_reply_expired(
    small_config: SimulatorConfig, small_specimen: Specimen, tmp_path: Path
) -> None:
    one_tile = 96 * 96 * 4 + 200  # room for the newest tile only, on disk and in memory
    with (
        SimulatedMicroscope(small_config, small_specimen) as microscope,
        serving(
            microscope, journal=tmp_path, tile_budget_bytes=one_tile, memory_budget_bytes=one_tile
        ) as server,
        ZmqMicroscope(server.endpoint) as remote,
    ):
        for name in ("first", "second", "third"):
            remote.acquire(scan(name, x_nm=10.0 + len(name)))
        with raw_dealer(server.endpoint) as socket:
            reply = ask(socket, encode(AcquireCommand(scan=scan("first", x_nm=15.0)))).header
            assert reply.code is ErrorCode.REPLY_EXPIRED and reply.request_id == "first"
            assert ask(socket, encode(AcquireCommand(scan=scan("third", x_nm=15.0)))).header.replayed
        with pytest.raises(RemoteInstrumentError, match="no longer kept"):
            remote.acquire(scan("second", x_nm=16.0))
        assert remote.status().exposures == 3 and microscope.exposures == 3
        assert len(list((tmp_path / "tiles").iterdir())) == 1


# --------------------------------------------------------------------------- logs and sizes


def test_untrusted_strings_cannot_forge_log_lines(simulated: SimulatedMicroscope) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("test.forged")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    forged = "\nINFO acquire admin -> exposed"
    try:
        with serving(simulated, logger=logger) as server, raw_dealer(server.endpoint) as socket:
            assert (
                ask(
                    socket, encode(HelloCommand(client="agent" + forged, max_message_bytes=1 << 20))
                ).header.type
                == "hello_ok"
            )
            hostile = json.loads(encode(AcquireCommand(scan=scan("x")))[0])
            hostile["scan"]["request_id"] = "tile-1" + forged
            assert ask(socket, [json.dumps(hostile).encode()]).header.code is ErrorCode.BAD_MESSAGE
            server.log.warning("acquire %s -> %s", "tile-2" + forged, RuntimeError("boom" + forged))
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) >= 4
    assert not [line for line in lines if line.startswith("INFO acquire admin")]
    assert any("agent\\nINFO acquire admin" in line for line in lines)
    assert any("tile-2\\nINFO" in line and "boom\\nINFO" in line for line in lines)


def test_a_frame_over_the_limit_never_reaches_the_handler(simulated: SimulatedMicroscope) -> None:
    with serving(simulated, max_message_bytes=1 << 20) as server:
        handled: list[int] = []
        handle = server._handle
        server._handle = lambda frames: (handled.append(len(frames)), handle(frames))  # type: ignore[method-assign]
        with raw_dealer(server.endpoint) as socket:
            socket.send_multipart([b"{" + b" " * (2 << 20) + b"}"])  # one 2 MiB frame
            assert not socket.poll(500)
        assert handled == []  # libzmq dropped the peer before the frame was read into memory
        with raw_dealer(server.endpoint) as socket:
            assert ask(socket, encode(StatusCommand())).header.type == "status_ok"
        assert handled == [2]


# --------------------------------------------------------------------------- the journal's tail


def _tile_for(request: ScanRequest) -> Tile:
    image = np.full(request.shape, float(len(request.request_id)), dtype=np.float32)
    return Tile(image, request, request.origin_nm, request.pixel_size_nm, 10.0, 1.0, 2.0, {"k": 1})


def test_a_torn_last_record_at_every_byte_offset_is_repaired(tmp_path: Path) -> None:
    fingerprint = {"driver": "torn"}
    journal = ExposureJournal(tmp_path, fingerprint, durable=False)
    requests = [scan(name, shape=(4, 4)) for name in ("kept-1", "kept-2", "torn")]
    for request in requests:
        journal.begin(request, 10.0)
        journal.done(_tile_for(request))
    journal.close()
    path = tmp_path / JOURNAL_FILE
    data = path.read_bytes()
    last_start = data.rstrip(b"\n").rfind(b"\n") + 1  # the done record of "torn"
    assert data[last_start:].startswith(b'{"event":"done"')
    for cut in range(last_start, len(data)):
        (tmp_path / TORN_FILE).unlink(missing_ok=True)
        path.write_bytes(data[:cut])
        reopened = ExposureJournal(tmp_path, fingerprint, durable=False)  # never refused
        for request in requests[:2]:
            assert reopened.lookup(request).image[0, 0] == len(request.request_id)
        if cut == len(data) - 1:  # the whole record, only its newline missing: it counts
            assert reopened.lookup(requests[2]) is not None
        else:  # its begin is complete: interrupted, spent, never exposed again
            with pytest.raises(ExposureInterruptedError):
                reopened.lookup(requests[2])
            assert (tmp_path / TORN_FILE).exists() == (cut > last_start)
        assert reopened.exposures == 3
        following = scan(f"next-{cut}", shape=(4, 4))
        reopened.begin(following, 10.0)
        reopened.done(_tile_for(following))
        reopened.close()
        again = ExposureJournal(tmp_path, fingerprint, durable=False)
        assert again.lookup(following) is not None and again.exposures == 4
        again.close()


def test_a_record_glued_onto_an_old_fragment_is_recovered(tmp_path: Path) -> None:
    fingerprint = {"driver": "glued"}
    journal = ExposureJournal(tmp_path, fingerprint, durable=False)
    first, second = scan("first", shape=(4, 4)), scan("second", shape=(4, 4))
    journal.begin(first, 10.0)
    journal.done(_tile_for(first))
    journal.close()
    # What an older version left: a torn line, the next record appended onto it, more after it.
    lines = (tmp_path / JOURNAL_FILE).read_bytes().splitlines(keepends=True)
    begin_second = json.dumps(
        {"event": "begin", "request_id": "second", "scan": second.model_dump(mode="json"),
         "dose_e_per_a2": 10.0, "extent_nm": list(second.extent_nm), "t_s": 1.0},
        separators=(",", ":"),
    ).encode()  # fmt: skip
    glued = lines[0] + lines[1][:17] + begin_second + b"\n" + b'{"event":"do'
    (tmp_path / JOURNAL_FILE).write_bytes(glued)
    reopened = ExposureJournal(tmp_path, fingerprint, durable=False)
    with pytest.raises(ExposureInterruptedError):
        reopened.lookup(second)  # recovered from the glued line: begun, never finished
    assert reopened.exposures == 2  # first's done was the torn line: interrupted, still counted


# --------------------------------------------------------------------------- SIGKILL at every phase


def test_killed_before_begin_the_retry_exposes_once(tmp_path: Path) -> None:
    with killed_and_restarted(tmp_path, "hang-before-begin", timeout_s=3.0) as (remote, restart):
        threading.Thread(target=restart, daemon=True).start()
        tile = remote.acquire(scan("before-begin"))
        status = remote.status()
        assert status.exposures == 1 and status.interrupted_exposures == 0
        assert status.total_dose_e_per_a2 == pytest.approx(tile.dose_e_per_a2)


def test_killed_after_the_tile_file_before_done_the_id_is_spent(tmp_path: Path) -> None:
    with killed_and_restarted(tmp_path, "hang-after-tile", timeout_s=3.0) as (remote, restart):
        threading.Thread(target=restart, daemon=True).start()
        with pytest.raises(ExposureInterruptedError, match="not exposed again under this id"):
            remote.acquire(scan("after-tile"))
        status = remote.status()
        assert status.exposures == 1 and status.interrupted_exposures == 1
        remote.acquire(scan("fresh"))
        assert remote.status().exposures == 2


def _stop(process: Any) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(15)
    if process.stderr:
        process.stderr.close()


def test_a_full_disk_refuses_before_exposing_and_loses_nothing(tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    # Every file may grow to 12 kB: tiles (4 kB) fit, the journal fills after a few records.
    full, endpoints = start_server_process(tmp_path, "full", "--journal", str(journal), "--fsize", "12000")
    answered: dict[str, np.ndarray] = {}
    requests = [scan(f"disk-{index}", shape=(32, 32), x_nm=5.0 + index) for index in range(30)]
    refused = None
    try:
        with ZmqMicroscope(endpoints["endpoint"], timeout_s=5.0, retries=0) as remote:
            for request in requests:
                try:
                    answered[request.request_id] = remote.acquire(request).image.copy()
                except RemoteInstrumentError as error:
                    assert "cannot be written" in str(error) and "free disk space" in str(error)
                    refused = request
                    break
            assert refused is not None and len(answered) >= 2
            assert remote.status().exposures == len(answered)  # the refused scan exposed nothing
            again = remote.acquire(requests[0])  # still served, from memory
            np.testing.assert_array_equal(again.image, answered[requests[0].request_id])
    finally:
        _stop(full)
    roomy, endpoints = start_server_process(tmp_path, "roomy", "--journal", str(journal))
    try:
        with ZmqMicroscope(endpoints["endpoint"]) as remote:
            names = list(answered)
            for name in names:
                request = next(r for r in requests if r.request_id == name)
                try:
                    np.testing.assert_array_equal(remote.acquire(request).image, answered[name])
                except ExposureInterruptedError:
                    assert name == names[-1]  # only a last done record that hit the limit
            remote.acquire(refused)  # never exposed before: exposed now, once
            assert remote.status().exposures == len(answered) + 1
    finally:
        _stop(roomy)


def test_a_client_that_vanishes_mid_exposure_finds_its_tile_from_a_new_client(tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    process, endpoints = start_server_process(
        tmp_path, "slow", "--journal", str(journal), "--fault", "slow-exposure", "--delay", "1.0"
    )
    try:
        request = scan("orphan")
        with ZmqMicroscope(endpoints["endpoint"]) as watcher:
            with raw_dealer(endpoints["endpoint"]) as socket:
                socket.send_multipart(encode(AcquireCommand(scan=request)))
                deadline = time.monotonic() + 20.0
                while watcher.status().state != "acquiring":
                    assert time.monotonic() < deadline, "the acquire never arrived"
                    time.sleep(0.02)
            # The client is gone mid-exposure; the exposure goes on and is journaled.
            while watcher.status().exposures < 1:
                assert time.monotonic() < deadline, "the orphaned exposure never finished"
                time.sleep(0.05)
        with ZmqMicroscope(endpoints["endpoint"]) as fresh:
            tile = fresh.acquire(request)
            assert fresh.status().exposures == 1
        recorded = np.load(journal / "tiles" / os.listdir(journal / "tiles")[0])
        np.testing.assert_array_equal(tile.image, recorded)
    finally:
        _stop(process)


def test_a_restart_is_never_refused_after_two_kills(tmp_path: Path) -> None:
    # The sequence of issue 14: a torn line, one more record, one more kill; the journal still opens.
    fingerprint = {"driver": "twice"}
    ExposureJournal(tmp_path, fingerprint, durable=False).close()
    with (tmp_path / JOURNAL_FILE).open("ab") as handle:
        handle.write(b'{"event":"begin","request_id":"x"')  # killed mid-write
    first = ExposureJournal(tmp_path, fingerprint, durable=False)
    first.begin(scan("after-tear"), 1.0)  # ... and killed again while exposing it
    second = ExposureJournal(tmp_path, fingerprint, durable=False)
    with pytest.raises(ExposureInterruptedError):
        second.lookup(scan("after-tear"))
    aside = json.loads((tmp_path / TORN_FILE).read_text().splitlines()[0])
    assert second.exposures == 1 and aside["fragment"] == '{"event":"begin","request_id":"x"'

    first.close()
    second.close()
