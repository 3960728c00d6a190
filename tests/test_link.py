"""The instrument link on real ZeroMQ sockets over 127.0.0.1: client, server, journal, faults."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from agent.driver import InstrumentDescription, MicroscopeDriver, ScanRequest, Tile
from agent.errors import (
    AcquisitionAborted,
    AuthenticationError,
    ConfigError,
    DoseLimitError,
    ExposureInterruptedError,
    LinkTimeoutError,
    MessageTooLargeError,
    OutsideStageError,
    ProtocolVersionError,
    ReplyExpiredError,
)
from agent.protocol.client import ZmqMicroscope
from agent.protocol.framing import decode, encode
from agent.protocol.messages import (
    COMMANDS,
    PROTOCOL_NAME,
    REPLIES,
    AcquireCommand,
    AcquireReply,
    DoseWarningEvent,
    ErrorCode,
    ErrorReply,
    HeartbeatEvent,
    HelloCommand,
    HelloReply,
    StatusCommand,
    TileReadyEvent,
)
from agent.protocol.security import CurveClientKeys, CurveServerKeys, generate_keys, load_public_key
from simulator.config import InstrumentConfig, SimulatorConfig
from simulator.drivers import SimulatedMicroscope
from simulator.exposure_journal import TILES_DIR, ExposureJournal, tile_file_name
from simulator.server import InstrumentServer
from simulator.specimen import Specimen

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[1]
ANY_PORT = "tcp://127.0.0.1:*"


def scan(request_id: str | None = None, **overrides: Any) -> ScanRequest:
    values: dict[str, Any] = {
        "x_nm": 15.0,
        "y_nm": 15.0,
        "shape": (96, 96),
        "pixel_size_nm": 0.02,
        "dwell_us": 2.0,
    }
    values.update(overrides)
    if request_id is not None:
        values["request_id"] = request_id
    return ScanRequest(**values)


@contextmanager
def serving(driver: MicroscopeDriver, **options: Any) -> Iterator[InstrumentServer]:
    options.setdefault("heartbeat_s", 0.2)
    options.setdefault("events_bind", ANY_PORT)
    server = InstrumentServer(driver, ANY_PORT, **options).start()
    try:
        yield server
    finally:
        server.stop(grace_s=2.0)


@contextmanager
def raw_dealer(endpoint: str) -> Iterator[zmq.Socket]:
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(endpoint)
    try:
        yield socket
    finally:
        socket.close(linger=0)
        context.term()


def ask(socket: zmq.Socket, frames: list[Any], timeout_s: float = 5.0) -> Any:
    socket.send_multipart(frames, copy=False)
    assert socket.poll(int(timeout_s * 1000)), "the server did not answer"
    return decode(socket.recv_multipart(copy=False), REPLIES, max_message_bytes=1 << 30)


@pytest.fixture
def microscope(small_config: SimulatorConfig, small_specimen: Specimen) -> Iterator[SimulatedMicroscope]:
    with SimulatedMicroscope(small_config, small_specimen) as driver:
        yield driver


class SlowMicroscope(SimulatedMicroscope):
    """Blocks in the exposure until released or aborted (at most 10 s)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.started = threading.Event()
        self.release = threading.Event()

    def _acquire(self, request: ScanRequest) -> Tile:
        self.started.set()
        deadline = time.monotonic() + 10.0
        while not self.release.is_set() and not self._abort.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        return super()._acquire(request)


class FixedImageMicroscope(MicroscopeDriver):
    """Answers every scan with one prepared image (any float32 bit pattern)."""

    def __init__(self, image: np.ndarray) -> None:
        super().__init__()
        self.image = image

    def describe(self) -> InstrumentDescription:
        return InstrumentDescription(
            name="fixed image",
            stage_x_nm=(0.0, 100.0),
            stage_y_nm=(0.0, 100.0),
            pixel_size_nm=(0.01, 1.0),
            max_tile_shape=(2048, 2048),
            beam_current_pa=20.0,
            dwell_us=(0.5, 10.0),
        )

    def _acquire(self, request: ScanRequest) -> Tile:
        return Tile(
            image=self.image,
            request=request,
            origin_nm=request.origin_nm,
            pixel_size_nm=request.pixel_size_nm,
            dose_e_per_a2=self.describe().dose_of(request),
            t_start=1.0,
            t_end=2.0,
            metadata={"numpy_scalar": np.float64(0.5), "nested": {"array": np.arange(3)}},
        )


# --------------------------------------------------------------------------- round trips


def test_session_over_the_wire_is_bit_identical_to_in_process(
    small_config: SimulatorConfig, small_specimen: Specimen
) -> None:
    requests = [
        scan("a"),
        scan("b", x_nm=10.0, shape=(64, 80)),
        scan("c", pixel_size_nm=0.1, shape=(100, 100)),
    ]
    with SimulatedMicroscope(small_config, small_specimen) as local:
        expected = [local.acquire(request) for request in requests]
        described = local.describe()
    with (
        SimulatedMicroscope(small_config, small_specimen) as served,
        serving(served) as server,
        ZmqMicroscope(server.endpoint) as remote,
    ):
        assert remote.describe() == described
        received = [remote.acquire(request) for request in requests]
        assert remote.status().exposures == 3
    for mine, theirs in zip(received, expected, strict=True):
        np.testing.assert_array_equal(mine.image.view(np.uint32), theirs.image.view(np.uint32))
        assert mine.request == theirs.request
        assert mine.origin_nm == theirs.origin_nm and mine.pixel_size_nm == theirs.pixel_size_nm
        assert mine.dose_e_per_a2 == theirs.dose_e_per_a2
        assert mine.t_end - mine.t_start == pytest.approx(theirs.t_end - theirs.t_start, abs=1e-6)
        assert mine.metadata == theirs.metadata


def test_every_float32_bit_pattern_arrives_unchanged() -> None:
    bits = np.random.default_rng(1).integers(0, 2**32, size=(256, 256), dtype=np.uint32)
    bits[0, :4] = [0x7FC01234, 0x80000000, 0x7F800000, 0x00000001]  # NaN payload, -0, inf, subnormal
    image = bits.view(np.float32)
    with (
        FixedImageMicroscope(image) as driver,
        serving(driver) as server,
        ZmqMicroscope(server.endpoint) as remote,
    ):
        tile = remote.acquire(scan(x_nm=50.0, y_nm=50.0, shape=(256, 256)))
    np.testing.assert_array_equal(tile.image.view(np.uint32), bits)
    assert tile.metadata == {"numpy_scalar": 0.5, "nested": {"array": [0, 1, 2]}}


def test_hello_negotiates_and_events_flow(microscope: SimulatedMicroscope) -> None:
    heard: list[Any] = []
    with serving(microscope) as server, ZmqMicroscope(server.endpoint, on_event=heard.append) as remote:
        hello = remote.server
        assert hello.version == 1 and "acquire" in hello.capabilities and hello.heartbeat_s == 0.2
        assert hello.events_endpoint == server.events_endpoint
        tile = remote.acquire(scan("e1"))
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and not (
            any(isinstance(event, TileReadyEvent) for event in heard)
            and any(isinstance(event, HeartbeatEvent) for event in heard)
        ):
            remote.poll_events(0.1)
    ready = [event for event in heard if isinstance(event, TileReadyEvent)]
    assert ready and ready[0].request_id == "e1" and ready[0].dose_e_per_a2 == tile.dose_e_per_a2
    assert any(isinstance(event, HeartbeatEvent) for event in heard)


def test_req_sockets_are_served_too(microscope: SimulatedMicroscope) -> None:
    with serving(microscope) as server:
        context = zmq.Context()
        socket = context.socket(zmq.REQ)
        try:
            socket.connect(server.endpoint)
            socket.send_multipart(encode(StatusCommand()))
            assert socket.poll(5000)
            reply = decode(socket.recv_multipart(), REPLIES, max_message_bytes=1 << 20).header
            assert reply.type == "status_ok" and reply.state == "idle"
        finally:
            socket.close(linger=0)
            context.term()


# --------------------------------------------------------------------------- refusals


def test_version_mismatch_is_refused_by_the_server(microscope: SimulatedMicroscope) -> None:
    hello = json.loads(encode(HelloCommand(max_message_bytes=1 << 20))[0])
    hello.update(version=2, message_id="v2-hello")
    with serving(microscope) as server, raw_dealer(server.endpoint) as socket:
        reply = ask(socket, [json.dumps(hello).encode()]).header
    assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.VERSION_MISMATCH
    assert reply.reply_to == "v2-hello"
    assert "version 2, this side speaks version 1" in reply.message


def fake_server(answer: Callable[[Any], list[Any]]) -> tuple[str, Callable[[], None]]:
    """A bare ROUTER thread that answers each command with ``answer(command)`` frames."""
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            if router.poll(50):
                identity, *body = router.recv_multipart()
                frames = answer(decode(body, COMMANDS, max_message_bytes=1 << 20).header)
                if frames:
                    router.send_multipart([identity, *frames])

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def close() -> None:
        stop.set()
        thread.join()
        router.close(linger=0)
        context.term()

    return f"tcp://127.0.0.1:{port}", close


def test_client_refuses_a_server_of_another_version() -> None:
    def answer(command: Any) -> list[Any]:
        reply = json.loads(
            encode(
                HelloReply(
                    reply_to=command.message_id, server="future", instrument="x", max_message_bytes=1 << 20
                )
            )[0]
        )
        reply["version"] = 2
        return [json.dumps(reply).encode()]

    endpoint, close = fake_server(answer)
    try:
        with pytest.raises(ProtocolVersionError, match="speaks micrography-link version 2"):
            ZmqMicroscope(endpoint, timeout_s=2.0, retries=0)
    finally:
        close()


def test_malformed_messages_get_error_replies_and_the_server_keeps_serving(
    microscope: SimulatedMicroscope,
) -> None:
    def raw(**fields: Any) -> bytes:
        return json.dumps({"protocol": PROTOCOL_NAME, "version": 1, "arrays": [], **fields}).encode()

    cases = [
        ([b"not json"], ErrorCode.BAD_MESSAGE, None),
        ([b"[1, 2, 3]"], ErrorCode.BAD_MESSAGE, None),
        ([raw(type="fly", message_id="m1")], ErrorCode.BAD_MESSAGE, "m1"),
        ([raw(type="acquire", message_id="m2", scan={"x_nm": 1})], ErrorCode.BAD_MESSAGE, "m2"),
        ([raw(type="status", message_id="m3"), b"surplus"], ErrorCode.BAD_FRAMES, "m3"),
        (
            [
                raw(type="status", message_id="m4", arrays=[{"name": "x", "dtype": "<f4", "shape": [8]}]),
                b"\0" * 31,
            ],
            ErrorCode.BAD_FRAMES,
            "m4",
        ),
        (
            [
                raw(type="status", message_id="m5", arrays=[{"name": "x", "dtype": "<f4", "shape": [2]}]),
                b"\0" * 8,
            ],
            ErrorCode.BAD_FRAMES,  # right length, but commands carry no arrays in version 1
            "m5",
        ),
    ]
    with serving(microscope) as server:
        with raw_dealer(server.endpoint) as socket:
            for frames, code, message_id in cases:
                reply = ask(socket, frames).header
                assert isinstance(reply, ErrorReply), frames
                assert reply.code is code, (frames, reply.message)
                assert reply.reply_to == message_id
                assert len(reply.message) > 20  # says what to do, not just "error"
        with ZmqMicroscope(server.endpoint) as remote:
            remote.acquire(scan("after-garbage"))
            assert remote.status().exposures == 1


def test_oversized_messages_are_refused(microscope: SimulatedMicroscope) -> None:
    with serving(microscope, max_message_bytes=64 * 1024) as server:
        with raw_dealer(server.endpoint) as socket:
            status = encode(StatusCommand())[0]
            # Every frame within the limit, their total over it: refused by the server, with a reply.
            reply = ask(socket, [status, b"\0" * 40_000, b"\0" * 40_000]).header
            assert reply.code is ErrorCode.MESSAGE_TOO_LARGE and "64,000" not in reply.message
            assert "more than the 65,536 bytes accepted" in reply.message
        with raw_dealer(server.endpoint) as socket:
            # One frame over the limit: libzmq itself drops the connection, no reply, no harm.
            socket.send_multipart([status, b"\0" * (64 * 1024 + 1)])
            assert not socket.poll(300)
        with ZmqMicroscope(server.endpoint, max_message_bytes=1 << 20) as remote:
            with pytest.raises(MessageTooLargeError, match="1024x1024 float32 tile"):
                remote.acquire(scan(shape=(1024, 1024)))
            remote.acquire(scan("still-serving"))
        assert server.status().exposures == 1


# --------------------------------------------------------------------------- exactly once


def test_a_retried_request_id_is_exposed_once(microscope: SimulatedMicroscope) -> None:
    command = AcquireCommand(scan=scan("once"))
    with serving(microscope) as server, raw_dealer(server.endpoint) as socket:
        first = ask(socket, encode(command))
        again = ask(socket, encode(command))
        assert isinstance(first.header, AcquireReply) and not first.header.replayed
        assert again.header.replayed
        np.testing.assert_array_equal(first.arrays["image"], again.arrays["image"])
        other = ask(socket, encode(AcquireCommand(scan=scan("once", x_nm=10.0)))).header
        assert other.code is ErrorCode.SCAN_REQUEST and "already used for a different scan" in other.message
        assert server.status().exposures == 1
    assert microscope.exposures == 1


def test_the_client_refuses_a_bad_request_id_before_sending(microscope: SimulatedMicroscope) -> None:
    with serving(microscope) as server, ZmqMicroscope(server.endpoint) as client:
        for bad in ("two words", "line\nbreak", "x" * 129):
            with pytest.raises(ConfigError, match=r"is not a valid request id: use 1-128 printable ASCII"):
                client.acquire(scan(bad))
        assert server.status().exposures == 0
    assert microscope.exposures == 0


def test_a_retry_during_the_exposure_joins_it(
    small_config: SimulatorConfig, small_specimen: Specimen
) -> None:
    with SlowMicroscope(small_config, small_specimen) as slow, serving(slow) as server:
        threading.Timer(0.8, slow.release.set).start()
        # Each attempt times out after 0.3 s; the retries find the exposure still running.
        with ZmqMicroscope(server.endpoint, timeout_s=0.3, retries=10, backoff_s=0.01) as remote:
            tile = remote.acquire(scan("slow"))
            assert remote.reconnects >= 1
            assert tile.shape == (96, 96)
        assert server.status().exposures == 1 and slow.exposures == 1


# --------------------------------------------------------------------------- driver behaviour over the wire


def test_instrument_refusals_keep_their_types_and_warn(
    small_config: SimulatorConfig, small_specimen: Specimen
) -> None:
    limited = small_config.model_copy(
        update={"instrument": InstrumentConfig(max_dose_e_per_a2=10_000.0, dose_map_cell_nm=0.5)}
    )
    with (
        SimulatedMicroscope(limited, small_specimen) as driver,
        serving(driver) as server,
        ZmqMicroscope(server.endpoint) as remote,
    ):
        with pytest.raises(OutsideStageError, match="outside the stage limits"):
            remote.acquire(scan(x_nm=29.5))  # refused by the client's own check: never sent
        remote.acquire(scan())
        with pytest.raises(DoseLimitError, match="above the per-area limit of 10000"):
            remote.acquire(scan())
        deadline = time.monotonic() + 2.0
        warnings: list[Any] = []
        while not warnings and time.monotonic() < deadline:
            warnings = [e for e in remote.poll_events(0.1) if isinstance(e, DoseWarningEvent)]
        assert warnings and warnings[0].limit_e_per_a2 == 10_000.0
        assert server.status().exposures == 1


def test_abort_stops_the_remote_exposure(small_config: SimulatorConfig, small_specimen: Specimen) -> None:
    with (
        SlowMicroscope(small_config, small_specimen) as slow,
        serving(slow) as server,
        ZmqMicroscope(server.endpoint, timeout_s=10.0) as remote,
    ):
        threading.Thread(target=lambda: (slow.started.wait(5.0), remote.abort()), daemon=True).start()
        started = time.monotonic()
        with pytest.raises(AcquisitionAborted, match="aborted"):
            remote.acquire(scan("to-abort"))
        assert time.monotonic() - started < 5.0
        assert server.status().exposures == 0
        slow.release.set()
        remote.acquire(scan("after-abort"))
        assert server.status().exposures == 1


# --------------------------------------------------------------------------- timeouts


def test_a_stalled_server_gives_a_timeout_after_the_configured_time() -> None:
    endpoint, close = fake_server(lambda command: [])  # receives, never answers
    try:
        started = time.monotonic()
        with pytest.raises(
            LinkTimeoutError, match=r"did not answer hello after 2 attempt\(s\): no reply within 0.3 s"
        ):
            ZmqMicroscope(endpoint, timeout_s=0.3, retries=1, backoff_s=0.05)
        elapsed = time.monotonic() - started
        assert 0.6 <= elapsed < 2.0
    finally:
        close()


def test_a_stalled_instrument_behind_a_live_server_times_out(
    small_config: SimulatorConfig, small_specimen: Specimen
) -> None:
    with SlowMicroscope(small_config, small_specimen) as slow, serving(slow) as server:
        try:
            with ZmqMicroscope(server.endpoint, timeout_s=0.5, retries=0) as remote:
                started = time.monotonic()
                with pytest.raises(LinkTimeoutError, match=r"no reply within 0\.5"):
                    remote.acquire(scan("stuck"))
                assert 0.5 <= time.monotonic() - started < 2.0  # heartbeats kept coming: no early retry
        finally:
            slow.release.set()


# --------------------------------------------------------------------------- CURVE


def test_curve_lets_in_listed_clients_only(microscope: SimulatorConfig, tmp_path: Path) -> None:
    _, server_secret = generate_keys(tmp_path / "server", "server")
    client_public, client_secret = generate_keys(tmp_path / "clients", "agent")
    _, intruder_secret = generate_keys(tmp_path / "intruders", "intruder")
    server_public = tmp_path / "server" / "server.key"
    keys = CurveServerKeys.from_files(server_secret, tmp_path / "clients")
    with serving(microscope, curve=keys) as server:
        with ZmqMicroscope(
            server.endpoint, curve=CurveClientKeys.from_files(client_secret, server_public)
        ) as ok:
            ok.acquire(scan("authorised"))
            assert ok.poll_events(1.0) or ok.poll_events(1.0)  # the event channel is encrypted too
        with pytest.raises(AuthenticationError, match="refused this client's CURVE key"):
            ZmqMicroscope(server.endpoint, curve=CurveClientKeys.from_files(intruder_secret, server_public))
        with pytest.raises(AuthenticationError, match="requires CURVE authentication"):
            ZmqMicroscope(server.endpoint)
        wrong_server = CurveClientKeys.from_files(client_secret, tmp_path / "clients" / "agent.key")
        with pytest.raises(AuthenticationError, match=r"server public key .* is probably not the key"):
            ZmqMicroscope(server.endpoint, curve=wrong_server, timeout_s=3.0, retries=0)
        with raw_dealer(server.endpoint) as socket:
            # The refused handshake may leave the DEALER without a peer, where a send blocks:
            # bounded, a send that cannot leave counts as refused too.
            socket.setsockopt(zmq.SNDTIMEO, 2000)
            with contextlib.suppress(zmq.Again):
                socket.send_multipart(encode(AcquireCommand(scan=scan("sneaky"))))
            assert not socket.poll(300)
        assert server.status().exposures == 1
    assert load_public_key(client_public) in keys.allowed_clients


def test_public_bind_without_curve_is_refused(microscope: SimulatedMicroscope) -> None:
    with pytest.raises(ConfigError, match="without CURVE would let anyone"):
        InstrumentServer(microscope, "tcp://0.0.0.0:5555")


# --------------------------------------------------------------------------- journal


def test_journal_answers_retries_after_a_restart_and_restores_the_dose_map(
    small_config: SimulatorConfig, small_specimen: Specimen, tmp_path: Path
) -> None:
    journal = tmp_path / "journal"
    request = scan("survives")
    with (
        SimulatedMicroscope(small_config, small_specimen) as first,
        serving(first, journal=journal) as server,
        ZmqMicroscope(server.endpoint) as remote,
    ):
        original = remote.acquire(request)
    with (
        SimulatedMicroscope(small_config, small_specimen) as second,
        serving(second, journal=journal) as server,
        raw_dealer(server.endpoint) as socket,
    ):
        replayed = ask(socket, encode(AcquireCommand(scan=request)))
        assert replayed.header.replayed
        np.testing.assert_array_equal(replayed.arrays["image"], original.image)
        assert second.exposures == 0
        assert server.status().exposures == 1
        assert second.dose_map.dose_at(15.0, 15.0) == pytest.approx(original.dose_e_per_a2)
    other = small_config.model_copy(update={"seed": 99})
    with (
        SimulatedMicroscope(other, small_specimen) as stranger,
        pytest.raises(ConfigError, match="another instrument"),
    ):
        InstrumentServer(stranger, ANY_PORT, journal=journal)


def test_journal_bookkeeping(tmp_path: Path) -> None:
    fingerprint = {"driver": "test"}
    image = np.arange(16, dtype=np.float32).reshape(4, 4)

    def tile_for(request: ScanRequest) -> Tile:
        return Tile(image, request, request.origin_nm, request.pixel_size_nm, 10.0, 1.0, 2.0, {"k": 1})

    hostile = scan("../../escape", shape=(4, 4))
    # A budget smaller than two tiles keeps only the newest one on disk (and in memory).
    one_tile = image.nbytes + 128
    journal = ExposureJournal(
        tmp_path, fingerprint, tile_budget_bytes=one_tile, memory_budget_bytes=image.nbytes
    )
    journal.begin(hostile, 10.0)
    journal.done(tile_for(hostile))
    assert (tmp_path / TILES_DIR / tile_file_name(hostile.request_id)).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["instrument.json", "journal.jsonl", "tiles"]
    assert len(list((tmp_path / TILES_DIR).iterdir())) == 1
    second = scan("second", shape=(4, 4))
    journal.begin(second, 10.0)
    journal.done(tile_for(second))
    cut_short = scan("cut-short", shape=(4, 4))
    journal.begin(cut_short, 10.0)  # ... and the process dies here
    refused = scan("refused", shape=(4, 4))
    journal.begin(refused, 10.0)
    journal.failed(refused, "DoseLimitError")
    journal.close()
    with (tmp_path / "journal.jsonl").open("a") as handle:
        handle.write('{"event": "do')  # killed while writing a line
    reopened = ExposureJournal(tmp_path, fingerprint, tile_budget_bytes=one_tile)
    assert reopened.exposures == 3 and reopened.interrupted_exposures == 1
    assert reopened.total_dose_e_per_a2 == 30.0
    np.testing.assert_array_equal(reopened.lookup(second).image, image)
    with pytest.raises(ReplyExpiredError, match="no longer kept"):
        reopened.lookup(hostile)
    with pytest.raises(ExposureInterruptedError, match="may have received its dose"):
        reopened.lookup(cut_short)
    assert reopened.lookup(refused) is None  # refused before exposure: the id may be used again
    reopened.close()
    lines = (tmp_path / "journal.jsonl").read_text().splitlines()
    lines.insert(1, "garbage")
    (tmp_path / "journal.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match="line 2 is not a valid journal record"):
        ExposureJournal(tmp_path, fingerprint)


# --------------------------------------------------------------------------- graceful stop


def test_graceful_stop_answers_the_exposure_in_progress(
    small_config: SimulatorConfig, small_specimen: Specimen
) -> None:
    with SlowMicroscope(small_config, small_specimen) as slow:
        server = InstrumentServer(slow, ANY_PORT, events_bind=None).start()
        try:
            with raw_dealer(server.endpoint) as socket:
                socket.send_multipart(encode(AcquireCommand(scan=scan("running"))))
                socket.send_multipart(encode(AcquireCommand(scan=scan("queued", x_nm=10.0))))
                assert slow.started.wait(5.0)
                threading.Timer(0.3, slow.release.set).start()
                server.stop(grace_s=5.0)
                replies = {}
                while socket.poll(500):
                    header = decode(
                        socket.recv_multipart(copy=False), REPLIES, max_message_bytes=1 << 30
                    ).header
                    replies[header.tile.request_id if header.type == "acquire_ok" else header.request_id] = (
                        header
                    )
            assert replies["running"].type == "acquire_ok"
            assert replies["queued"].code is ErrorCode.SHUTTING_DOWN
            assert "was not exposed" in replies["queued"].message
            assert slow.exposures == 1
        finally:
            server.stop()


# --------------------------------------------------------------------------- the documented example server


def test_the_example_server_conforms() -> None:
    spec = importlib.util.spec_from_file_location(
        "minimal_server", REPO / "docs" / "examples" / "minimal_server.py"
    )
    assert spec and spec.loader
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    server = example.MinimalServer(example.ScanEngine(), ANY_PORT, ANY_PORT, heartbeat_s=0.1)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with ZmqMicroscope(server.endpoint) as remote:
            request = ScanRequest(x_nm=500.0, y_nm=500.0, shape=(64, 48), pixel_size_nm=0.02, dwell_us=2.0)
            tile = remote.acquire(request)
            np.testing.assert_array_equal(tile.image, example.ScanEngine().scan(request))
            with raw_dealer(server.endpoint) as socket:
                assert ask(socket, encode(AcquireCommand(scan=request))).header.replayed is True
                assert ask(socket, [b"garbage"]).header.code is ErrorCode.BAD_MESSAGE
            assert remote.status().exposures == 1
    finally:
        server.stop()
        thread.join(timeout=5.0)


# --------------------------------------------------------------------------- killed and restarted


def start_server_process(tmp_path: Path, name: str, *args: str) -> tuple[subprocess.Popen, dict[str, str]]:
    endpoint_file = tmp_path / f"{name}.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.link_server", "--endpoint-file", str(endpoint_file), *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 30.0
    while not endpoint_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"server process did not start: {process.communicate()[1].decode()}")
        time.sleep(0.05)
    return process, json.loads(endpoint_file.read_text())


def wait_for(path: Path, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


@contextmanager
def killed_and_restarted(
    tmp_path: Path, fault: str, timeout_s: float
) -> Iterator[tuple[ZmqMicroscope, Callable[[], Any]]]:
    """A server process with ``fault``; yields a client and ``restart()``, which SIGKILLs it at the
    fault and starts a healthy one on the same port and journal."""
    journal, marker = tmp_path / "journal", tmp_path / "marker"
    first, endpoints = start_server_process(tmp_path, "first", "--journal", str(journal), "--fault", fault,
                                            "--marker", str(marker))  # fmt: skip
    processes = [first]
    remote = ZmqMicroscope(endpoints["endpoint"], timeout_s=timeout_s, retries=30, backoff_s=0.05)

    restarting, restarted = threading.Event(), threading.Event()

    def restart() -> None:
        wait_for(marker)
        restarting.set()
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
        try:
            second, _ = start_server_process(
                tmp_path, "second", "--journal", str(journal), "--bind", endpoints["endpoint"]
            )
            processes.append(second)
        finally:
            restarted.set()

    try:
        yield remote, restart
    finally:
        remote.close()
        # The client may finish on the new server before the restart thread has recorded it:
        # wait for that, or the second server outlives the test.
        if restarting.is_set():
            restarted.wait(30)
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            if process.stderr:
                process.stderr.close()


def test_server_killed_after_exposing_before_replying(tmp_path: Path) -> None:
    # A hung loop may swallow the first hello after reconnecting, before it is killed: the
    # attempt timeout bounds that wait.
    with killed_and_restarted(tmp_path, "hang-before-reply", timeout_s=3.0) as (remote, restart):
        threading.Thread(target=restart, daemon=True).start()
        started = time.monotonic()
        tile = remote.acquire(scan("lost-reply"))
        assert time.monotonic() - started < 25.0
        assert remote.reconnects >= 1
        recorded = np.load(tmp_path / "journal" / TILES_DIR / tile_file_name("lost-reply"))
        np.testing.assert_array_equal(tile.image, recorded)  # the tile exposed before the kill
        status = remote.status()
        assert status.exposures == 1 and status.interrupted_exposures == 0
        assert status.total_dose_e_per_a2 == pytest.approx(tile.dose_e_per_a2)
        remote.acquire(scan("next"))
        assert remote.status().exposures == 2


def test_server_killed_during_the_exposure(tmp_path: Path) -> None:
    # Heartbeats go on during the hung exposure and stop with the kill; with a 30 s timeout only the
    # heartbeat liveness can make the client notice so soon.
    with killed_and_restarted(tmp_path, "hang-in-exposure", timeout_s=30.0) as (remote, restart):
        threading.Thread(target=restart, daemon=True).start()
        started = time.monotonic()
        with pytest.raises(ExposureInterruptedError, match="not exposed again under this id"):
            remote.acquire(scan("cut-short"))
        assert time.monotonic() - started < 20.0
        status = remote.status()
        # The cut-short exposure may have dosed the area: counted once, never repeated.
        assert status.exposures == 1 and status.interrupted_exposures == 1
        remote.acquire(scan("fresh-id"))
        assert remote.status().exposures == 2
