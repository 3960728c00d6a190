"""Conformance of ``InstrumentServer`` to docs/protocol.md, written the way an outside developer would.

The client side is raw pyzmq DEALER / REQ / SUB sockets and ``json`` (``tests/conformance_wire.py``),
never the project's ``ZmqMicroscope`` or its framing code, so a bug shared by both halves of the
project cannot hide here. The server is the real one, in-process on ``tcp://127.0.0.1:*``, with the
simulated microscope on the small specimen of ``tests/conftest.py`` and small tiles.

Sections follow the document: 3.1 frames and envelopes, 3.2 the header (version first, strict
types, required fields, ids), 3.3 array frames, 4 commands and replies, 5 error codes, 6 events,
7.2 request ids, 9 the complete exchange; then a bounded, seeded fuzz.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from agent.driver import InstrumentDescription, ScanRequest, Tile
from agent.errors import CalibrationError
from simulator.config import InstrumentConfig, SimulatorConfig
from simulator.drivers import SimulatedMicroscope
from simulator.server import InstrumentServer
from simulator.specimen import Specimen
from tests.conformance_fuzz import Fuzzer, ends_in_newline, has_integral_float
from tests.conformance_wire import (
    ERROR_CODES,
    ID_PATTERN,
    OK_TYPE,
    PROTOCOL,
    REPLY_KEYS,
    Link,
    Reply,
    check_reply_envelope,
    encode,
    header,
    new_id,
    scan,
    strict_json,
)

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[1]
ANY_PORT = "tcp://127.0.0.1:*"
ELEMENTARY_CHARGE_C = 1.602176634e-19  # section 1's dose formula, written out here on purpose
DESCRIPTION_30_NM = InstrumentDescription(
    name="example server, 30 nm stage",
    stage_x_nm=(0.0, 30.0),
    stage_y_nm=(0.0, 30.0),
    pixel_size_nm=(0.005, 2.0),
    max_tile_shape=(4096, 4096),
    beam_current_pa=20.0,
    dwell_us=(0.5, 100.0),
)


# --------------------------------------------------------------------------- set-up


@contextmanager
def serving(driver: Any, **options: Any) -> Iterator[InstrumentServer]:
    options.setdefault("heartbeat_s", 0.2)
    options.setdefault("events_bind", ANY_PORT)
    server = InstrumentServer(driver, ANY_PORT, **options).start()
    try:
        yield server
    finally:
        server.stop(grace_s=2.0)


class HeldMicroscope(SimulatedMicroscope):
    """Holds every exposure until ``release`` is set (at most 10 s): lets a test act during one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.started = threading.Event()
        self.release = threading.Event()

    def _acquire(self, request: ScanRequest) -> Tile:
        self.started.set()
        self.release.wait(10.0)
        return super()._acquire(request)


class FailingMicroscope(SimulatedMicroscope):
    """Fails every exposure: ``cal-*`` ids with a calibration error, the others unexpectedly."""

    def _acquire(self, request: ScanRequest) -> Tile:
        if request.request_id.startswith("cal-"):
            raise CalibrationError("the scan came out 3 % larger than commanded; recalibrate the scan")
        raise RuntimeError("the scan generator stopped responding")


@pytest.fixture(scope="module")
def context() -> Iterator[zmq.Context]:
    ctx = zmq.Context()
    yield ctx
    ctx.term()


@pytest.fixture(scope="module")
def server(small_config: SimulatorConfig, small_specimen: Specimen) -> Iterator[InstrumentServer]:
    with SimulatedMicroscope(small_config, small_specimen) as driver, serving(driver) as running:
        yield running


@pytest.fixture
def link(context: zmq.Context, server: InstrumentServer) -> Iterator[Link]:
    connection = Link(context, server.endpoint)
    yield connection
    connection.close()


@contextmanager
def linked(context: zmq.Context, endpoint: str, kind: int = zmq.DEALER) -> Iterator[Link]:
    connection = Link(context, endpoint, kind)
    try:
        yield connection
    finally:
        connection.close()


@contextmanager
def subscribed(context: zmq.Context, endpoint: str) -> Iterator[zmq.Socket]:
    """A SUB socket on the events endpoint, returned once the first event got through."""
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    try:
        assert sub.poll(5000), "no event within 5 s of subscribing (heartbeats every 0.2 s)"
        yield sub
    finally:
        sub.close(linger=0)


def events_until(sub: zmq.Socket, done: Any, timeout_s: float = 5.0) -> list[tuple[bytes, dict[str, Any]]]:
    """Events ``(topic, header)`` received until ``done(events)`` holds (fails after ``timeout_s``)."""
    events: list[tuple[bytes, dict[str, Any]]] = []
    deadline = time.monotonic() + timeout_s
    while not done(events):
        assert time.monotonic() < deadline, f"events so far: {[e[1]['type'] for e in events]}"
        if sub.poll(100):
            frames = sub.recv_multipart()
            assert len(frames) == 2, "an event is [topic, header]"
            events.append((frames[0], strict_json(frames[1])))
    return events


ENVELOPE = ("protocol", "version", "message_id", "arrays")


def busy_heartbeat(event: dict[str, Any]) -> bool:
    return event["type"] == "heartbeat" and event["state"] == "acquiring"


def ask_ok(link: Link, value: dict[str, Any]) -> Reply:
    reply = link.ask(value)
    check_reply_envelope(reply, value["message_id"])
    assert reply.type == OK_TYPE[value["type"]], reply.header
    return reply


def exposures(link: Link) -> int:
    return ask_ok(link, header("status")).header["exposures"]


def refused(link: Link, frames: list[bytes] | dict[str, Any], code: str, sent_id: str | None) -> Reply:
    """Send, expect the error ``code`` answering ``sent_id`` (None: ``reply_to`` must be null)."""
    reply = link.ask(frames)
    check_reply_envelope(reply, sent_id)
    assert reply.type == "error" and reply.code == code, reply.header
    assert reply.header["reply_to"] == sent_id
    return reply


def image_of(reply: Reply) -> np.ndarray:
    (spec,) = reply.header["arrays"]
    return np.frombuffer(reply.frames[0], dtype=np.dtype(spec["dtype"])).reshape(spec["shape"])


# --------------------------------------------------------------------------- 3.1 frames and envelopes


def test_dealer_and_req_clients_get_their_reply_in_their_own_envelope(
    context: zmq.Context, server: InstrumentServer
) -> None:
    with linked(context, server.endpoint, zmq.REQ) as req:
        # A REQ socket only delivers a reply that came back behind its empty delimiter.
        for _ in range(2):
            assert ask_ok(req, header("status")).header["state"] == "idle"
    with linked(context, server.endpoint) as dealer:
        command = header("status")
        dealer.send([b"", encode(command)])  # a DEALER may speak the REQ envelope by hand
        frames = dealer.socket.recv_multipart() if dealer.socket.poll(5000) else []
        assert frames[0] == b"" and strict_json(frames[1])["reply_to"] == command["message_id"]
        dealer.send([encode(command)])
        frames = dealer.socket.recv_multipart() if dealer.socket.poll(5000) else []
        assert frames and frames[0] != b"" and strict_json(frames[0])["reply_to"] == command["message_id"]


def test_a_command_needs_no_hello_and_one_command_gets_one_reply(link: Link) -> None:
    # The server keeps no session state: a fresh connection's first command is served.
    reply = ask_ok(link, header("describe"))
    assert reply.header["instrument"]["name"]
    assert link.silent(0.3), "a second reply to one command"


# --------------------------------------------------------------------------- 3.2 the header


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"type": "launch"},  # unknown type
        {"future_field": {"nested": [1, 2]}},
        {"arrays": "not a list"},
        {"scan": {"dwell_us": "2"}},  # field errors of any kind come after the version
    ],
)
def test_the_version_is_checked_before_anything_else(link: Link, extra: dict[str, Any]) -> None:
    value = header("acquire", scan=scan(new_id("v2")), version=2)
    value.update(extra)
    before = exposures(link)
    reply = refused(link, value, "version_mismatch", value["message_id"])
    assert "version 2" in reply.header["message"] and "version 1" in reply.header["message"]
    missing_id = header("status", version=7)
    del missing_id["message_id"]
    refused(link, missing_id, "version_mismatch", None)
    assert exposures(link) == before


@pytest.mark.parametrize(
    "changes",
    [
        {"protocol": "other-link"},
        {"protocol": None},
        {"version": "1"},
        {"version": 1.0},
        {"version": True},
        {"version": None},
        {"type": "launch_missiles"},
        {"type": "acquire_ok"},  # a reply type is not a command
        {"type": None},
        {"surplus": 1},
        {"scan": {"x_nm": 1}},  # a field of another command
    ],
)
def test_bad_protocol_version_type_or_unknown_fields_are_bad_message(
    link: Link, changes: dict[str, Any]
) -> None:
    value = header("status")
    value.update(changes)
    refused(link, value, "bad_message", value["message_id"])


def test_unknown_fields_inside_a_scan_are_refused_and_nothing_is_exposed(link: Link) -> None:
    before = exposures(link)
    value = header("acquire", scan=scan(new_id("r"), focus_nm=3.0))
    reply = refused(link, value, "bad_message", value["message_id"])
    assert "focus_nm" in reply.header["message"]
    assert exposures(link) == before


# The coercions issue 14 found accepted and exposed, as values that would be a valid scan if
# coerced (x = "15" on the 30 nm stage; "80" would fall outside it and prove nothing).
COERCIONS = [
    ("dwell_us", "2"),
    ("pixel_size_nm", "0.05"),
    ("x_nm", "15"),
    ("y_nm", "15.0"),
    ("dwell_us", True),
    ("pixel_size_nm", False),
    ("shape", [32.0, 32]),
    ("shape", [True, 32]),
    ("shape", ["32", 32]),
    ("shape", [32, 32.5]),
    ("shape", 32),
    ("shape", [32, 32, 1]),
    ("x_nm", None),
    ("x_nm", [15.0]),
    ("detector", 1),
    ("request_id", 7),
]


@pytest.mark.parametrize(("field", "value"), COERCIONS)
def test_strict_types_coercions_are_refused_and_not_exposed(link: Link, field: str, value: Any) -> None:
    request_id = new_id("strict")
    command = header("acquire", scan={**scan(request_id), field: value})
    before = exposures(link)
    reply = refused(link, command, "bad_message", command["message_id"])
    assert field in reply.header["message"], reply.header["message"]
    assert exposures(link) == before, f"{field} = {value!r} was exposed"
    # The refused attempt did not spend the id: the well-typed scan is exposed under it, once.
    good = ask_ok(link, header("acquire", scan=scan(request_id)))
    assert good.header["replayed"] is False and exposures(link) == before + 1


@pytest.mark.parametrize(
    ("kind", "fields"),
    [
        ("hello", {"client": "c", "capabilities": [], "max_message_bytes": "1048576"}),
        ("hello", {"client": "c", "capabilities": [], "max_message_bytes": 1048576.0}),
        ("hello", {"client": "c", "capabilities": [], "max_message_bytes": True}),
        ("hello", {"client": 5, "capabilities": [], "max_message_bytes": 1024}),
        ("hello", {"client": "c", "capabilities": "acquire", "max_message_bytes": 1024}),
        ("abort", {"request_id": 12}),
    ],
)
def test_strict_types_in_every_command(link: Link, kind: str, fields: dict[str, Any]) -> None:
    value = header(kind, **fields)
    refused(link, value, "bad_message", value["message_id"])


def test_json_integers_are_numbers(link: Link) -> None:
    value = header(
        "acquire", scan=scan(new_id("ints"), x_nm=15, y_nm=14, dwell_us=2, pixel_size_nm=1, shape=[16, 16])
    )
    tile = ask_ok(link, value).header["tile"]
    assert tile["pixel_size_nm"] == 1 and image_of(ask_ok(link, value)).shape == (16, 16)
    hello = header("hello", client="c", capabilities=[], max_message_bytes=1048576)
    assert ask_ok(link, hello).header["max_message_bytes"] > 0


@pytest.mark.parametrize(
    "text",
    [
        b'"x_nm": NaN',
        b'"x_nm": Infinity',
        b'"x_nm": -Infinity',
        b'"x_nm": 1e400',
        b'"x_nm": ' + b"1" * 400,
        b'"x_nm": 15.0, "x_nm": 15.0',  # duplicate keys: parsers disagree on which one wins
    ],
)
def test_non_json_numbers_and_duplicate_keys_are_bad_message(link: Link, text: bytes) -> None:
    body = encode(scan(new_id("nan"))).replace(b'"x_nm":15.0', text)
    assert text in body
    value = header("acquire", scan={})
    frame = encode(value).replace(b'"scan":{}', b'"scan":' + body)
    before = exposures(link)
    reply = link.ask([frame])
    check_reply_envelope(reply, value["message_id"], named=False)  # not strict JSON: the id or null
    assert reply.code == "bad_message" and exposures(link) == before


@pytest.mark.parametrize("missing", ["message_id", "arrays", "protocol", "version", "type"])
def test_every_header_field_is_required(link: Link, missing: str) -> None:
    value = header("acquire", scan=scan(new_id("req")))
    del value[missing]
    before = exposures(link)
    reply = link.ask(value)
    sent_id = value.get("message_id")
    check_reply_envelope(reply, sent_id)
    assert reply.code == "bad_message", reply.header
    assert exposures(link) == before
    if missing == "message_id":
        # A reply may never name an id the client did not send.
        assert reply.header["reply_to"] is None
    else:
        assert missing in reply.header["message"]


def test_an_acquire_without_request_id_is_refused_so_a_resend_cannot_expose_twice(link: Link) -> None:
    body = scan("unused")
    del body["request_id"]
    before = exposures(link)
    for _ in range(2):  # the resend a client makes after a lost reply
        value = header("acquire", scan=body)
        reply = refused(link, value, "bad_message", value["message_id"])
        assert "request_id" in reply.header["message"]
    assert exposures(link) == before


BAD_IDS = ["", " ", "a b", " lead", "trail ", "x" * 129, "tab\there", "new\nline", "é", "\x7f", "\x00"]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_request_id_and_message_id_limits(link: Link, bad: str) -> None:
    before = exposures(link)
    value = header("acquire", scan=scan(bad))
    reply = refused(link, value, "bad_message", value["message_id"])
    assert "request_id" in reply.header["message"]
    abort = header("abort", request_id=bad)
    refused(link, abort, "bad_message", abort["message_id"])
    status = header("status", message_id=bad)
    refused(link, status, "bad_message", None)  # an unreadable id is never echoed
    assert exposures(link) == before


def test_the_longest_and_widest_ids_are_accepted(link: Link) -> None:
    printable = "".join(chr(code) for code in range(0x21, 0x7F))  # every allowed character
    request_id = (printable + "x" * 128)[:128]
    message_id = request_id[::-1]
    before = exposures(link)
    reply = ask_ok(link, header("acquire", message_id=message_id, scan=scan(request_id)))
    assert reply.header["tile"]["request_id"] == request_id
    assert ask_ok(link, header("abort", request_id=request_id)).header["aborted"] == []
    assert exposures(link) == before + 1


# --------------------------------------------------------------------------- 3.3 array frames, 3.4 sizes


def test_frame_checks(link: Link) -> None:
    def declared(kind: str, dtype: str, shape: list[int], **fields: Any) -> dict[str, Any]:
        return header(kind, arrays=[{"name": "x", "dtype": dtype, "shape": shape}], **fields)

    before = exposures(link)
    cases: list[tuple[list[bytes], str, str]] = []
    for kind, fields in (("status", {}), ("acquire", {"scan": scan(new_id("frames"))})):
        plain = header(kind, **fields)
        cases += [
            ([encode(plain), b"surplus"], "bad_frames", plain["message_id"]),
            ([encode(plain), b""], "bad_frames", plain["message_id"]),
        ]
        for value, frames in (
            (declared(kind, "<f4", [2, 2], **fields), []),  # declared, not sent
            (declared(kind, "<f4", [2, 2], **fields), [b"\0" * 15]),  # one byte short
            (declared(kind, "<f4", [2, 2], **fields), [b"\0" * 16]),  # right size: commands carry none
            (declared(kind, "<f4", [2, 2], **fields), [b"\0" * 16, b"\0" * 16]),
        ):
            cases.append(([encode(value), *frames], "bad_frames", value["message_id"]))
        for dtype, shape in (("|O", [1]), ("<U4", [1]), ("<f4", [1] * 9), ("<f4", [-1]), ("<f4", [2.0])):
            value = declared(kind, dtype, shape, **fields)
            cases.append(([encode(value), b"\0" * 4], "bad_message", value["message_id"]))
    for frames, code, sent_id in cases:
        reply = refused(link, frames, code, sent_id)
        assert len(reply.header["message"]) > 20
    assert exposures(link) == before


def test_a_header_over_64_kib_is_message_too_large(link: Link) -> None:
    value = header("hello", client="x" * (64 * 1024), capabilities=[], max_message_bytes=1024)
    reply = link.ask(value)
    check_reply_envelope(reply, value["message_id"], named=False)  # too large to be read: maybe null
    assert reply.code == "message_too_large", reply.header
    ask_ok(link, header("status"))  # still serving


# --------------------------------------------------------------------------- 4 commands and replies


def test_replies_carry_exactly_the_documented_fields(link: Link, server: InstrumentServer) -> None:
    hello = ask_ok(link, header("hello", client="outside", capabilities=["acquire"], max_message_bytes=1024))
    fields = hello.header
    assert set(fields) == REPLY_KEYS | {
        "server", "instrument", "capabilities", "max_message_bytes", "heartbeat_s", "events_endpoint"
    }  # fmt: skip
    assert "acquire" in fields["capabilities"] and set(fields["capabilities"]) <= {
        "acquire", "abort", "status", "events", "heartbeat", "reply-cache"
    }  # fmt: skip
    assert type(fields["max_message_bytes"]) is int and fields["max_message_bytes"] > 0
    assert fields["heartbeat_s"] == 0.2 and fields["events_endpoint"] == server.events_endpoint

    instrument = ask_ok(link, header("describe")).header["instrument"]
    assert set(instrument) == {
        "name", "stage_x_nm", "stage_y_nm", "pixel_size_nm", "max_tile_shape", "detectors",
        "beam_current_pa", "dwell_us", "max_dose_e_per_a2",
    }  # fmt: skip
    for key in ("stage_x_nm", "stage_y_nm", "pixel_size_nm", "dwell_us"):
        low, high = instrument[key]
        assert low <= high
    assert all(type(n) is int for n in instrument["max_tile_shape"]) and instrument["beam_current_pa"] > 0

    status = ask_ok(link, header("status")).header
    assert set(status) == REPLY_KEYS | {
        "state", "request_id", "queued", "exposures", "interrupted_exposures", "total_dose_e_per_a2",
        "journal", "uptime_s",
    }  # fmt: skip
    assert status["state"] == "idle" and status["request_id"] is None and status["queued"] == 0
    assert type(status["exposures"]) is int and status["uptime_s"] >= 0

    assert set(ask_ok(link, header("abort", request_id=None)).header) == REPLY_KEYS | {"aborted"}
    assert set(ask_ok(link, header("bye")).header) == REPLY_KEYS


def test_optional_fields_may_be_left_out(link: Link) -> None:
    # Section 3.2 lists what may be omitted: hello's client and capabilities, abort's request_id
    # (null: everything), scan.detector ("HAADF").
    ask_ok(link, header("hello", max_message_bytes=1024))
    assert ask_ok(link, header("abort")).header["aborted"] == []
    body = scan(new_id("default-detector"))
    del body["detector"]
    ask_ok(link, header("acquire", scan=body))


def test_the_complete_exchange_of_section_9(
    context: zmq.Context, link: Link, server: InstrumentServer
) -> None:
    instrument = ask_ok(link, header("describe")).header["instrument"]
    rows, cols, pixel, dwell, x, y = 24, 40, 0.05, 2.0, 14.3, 15.7  # not square: rows and cols differ
    request_id = new_id("tile")
    command = header("acquire", scan=scan(request_id, x_nm=x, y_nm=y, shape=[rows, cols],
                                          pixel_size_nm=pixel, dwell_us=dwell))  # fmt: skip
    with subscribed(context, server.events_endpoint) as sub:
        reply = ask_ok(link, command)
        events = events_until(sub, lambda got: any(e[1]["type"] == "tile_ready" for e in got))
    fields = reply.header
    assert set(fields) == REPLY_KEYS | {"tile", "replayed"}
    assert fields["arrays"] == [{"name": "image", "dtype": "<f4", "shape": [rows, cols]}]
    assert len(reply.frames) == 1 and len(reply.frames[0]) == rows * cols * 4  # raw little-endian float32
    image = np.frombuffer(reply.frames[0], dtype="<f4").reshape(rows, cols)
    assert np.isfinite(image).all() and image.std() > 0
    tile = fields["tile"]
    assert set(tile) == {"request_id", "origin_nm", "pixel_size_nm", "dose_e_per_a2", "t_start", "t_end",
                         "metadata"}  # fmt: skip
    assert tile["request_id"] == request_id and fields["replayed"] is False
    # Section 1: pixel (0, 0) centred at (x - (cols - 1) / 2 * p, y - (rows - 1) / 2 * p).
    assert tile["origin_nm"] == pytest.approx([x - (cols - 1) / 2 * pixel, y - (rows - 1) / 2 * pixel])
    assert tile["pixel_size_nm"] == pixel
    dose = instrument["beam_current_pa"] * 1e-12 * dwell * 1e-6 / ELEMENTARY_CHARGE_C / (10 * pixel) ** 2
    assert tile["dose_e_per_a2"] == pytest.approx(dose, rel=1e-12)
    assert tile["t_start"] <= tile["t_end"] and isinstance(tile["metadata"], dict)
    ready = next(event for topic, event in events if event["type"] == "tile_ready")
    assert ready["request_id"] == request_id and ready["shape"] == [rows, cols]
    assert ready["dose_e_per_a2"] == tile["dose_e_per_a2"] and ready["t_end"] == tile["t_end"]


def test_a_retry_is_answered_bit_for_bit_and_never_exposed_again(
    context: zmq.Context, link: Link, server: InstrumentServer
) -> None:
    request_id = new_id("retry")
    command = header("acquire", scan=scan(request_id, x_nm=12.0))
    before = exposures(link)
    first = ask_ok(link, command)
    again = ask_ok(link, command)  # the very same frames, message id included
    with linked(context, server.endpoint) as reconnected:  # a new identity: another peer
        elsewhere = ask_ok(reconnected, header("acquire", scan=scan(request_id, x_nm=12.0)))
    assert first.header["replayed"] is False
    for retry in (again, elsewhere):
        assert retry.header["replayed"] is True
        assert retry.frames[0] == first.frames[0]  # bit for bit
        assert retry.header["tile"] == first.header["tile"]
        assert retry.header["arrays"] == first.header["arrays"]
    assert exposures(link) == before + 1
    other = header("acquire", scan=scan(request_id, x_nm=12.5))  # same id, different scan
    reply = refused(link, other, "scan_request", other["message_id"])
    assert reply.header["request_id"] == request_id and "different scan" in reply.header["message"]
    assert exposures(link) == before + 1


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"x_nm": 29.5}, "outside_stage"),
        ({"y_nm": -1.0}, "outside_stage"),
        ({"x_nm": 1e308}, "outside_stage"),
        ({"detector": "BF"}, "out_of_range"),
        ({"shape": [5000, 32]}, "out_of_range"),
        ({"pixel_size_nm": 5.0}, "out_of_range"),
        ({"dwell_us": 1000.0}, "out_of_range"),
    ],
)
def test_a_scan_refused_before_exposure_does_not_spend_its_id(
    link: Link, changes: dict[str, Any], code: str
) -> None:
    request_id = new_id("refused")
    before = exposures(link)
    value = header("acquire", scan=scan(request_id, **changes))
    reply = refused(link, value, code, value["message_id"])
    assert reply.header["request_id"] == request_id
    assert exposures(link) == before
    assert ask_ok(link, header("acquire", scan=scan(request_id))).header["replayed"] is False
    assert exposures(link) == before + 1


def test_shape_values_out_of_bounds_are_refused(link: Link) -> None:
    before = exposures(link)
    for shape, codes in (([0, 32], {"bad_message"}), ([32, -1], {"bad_message"}),
                         ([10**30, 32], {"bad_message", "out_of_range"})):  # fmt: skip
        value = header("acquire", scan=scan(new_id("shape"), shape=shape))
        reply = link.ask(value)
        check_reply_envelope(reply, value["message_id"])
        assert reply.code in codes, reply.header
    for field in ("pixel_size_nm", "dwell_us"):
        for number in (0, -0.05):
            value = header("acquire", scan=scan(new_id("range"), **{field: number}))
            refused(link, value, "bad_message", value["message_id"])
    assert exposures(link) == before


def test_during_an_exposure_the_server_answers_joins_retries_and_cancels_queued_work(
    context: zmq.Context, small_config: SimulatorConfig, small_specimen: Specimen
) -> None:
    with (
        HeldMicroscope(small_config, small_specimen) as held,
        serving(held) as server,
        linked(context, server.endpoint) as first,
        linked(context, server.endpoint) as second,
        subscribed(context, server.events_endpoint) as sub,
    ):
        running = header("acquire", scan=scan("held-1"))
        queued = header("acquire", scan=scan("held-2", x_nm=10.0))
        first.send([encode(running)])
        assert held.started.wait(5.0)
        first.send([encode(queued)])
        # hello, describe, status and abort are answered while the exposure runs (section 4).
        ask_ok(second, header("hello", client="c", capabilities=[], max_message_bytes=1024))
        ask_ok(second, header("describe"))
        status = ask_ok(second, header("status")).header
        assert status["state"] == "acquiring" and status["request_id"] == "held-1"
        assert status["queued"] == 1
        # Heartbeats go on during the exposure, saying so.
        events_until(sub, lambda got: sum(busy_heartbeat(event) for _, event in got) >= 2)
        retry = header("acquire", scan=scan("held-1"))
        second.send([encode(retry)])  # a retry of the running id joins it
        assert second.silent(0.3)
        aborted = ask_ok(second, header("abort", request_id="held-2")).header
        assert aborted["aborted"] == ["held-2"]
        held.release.set()
        # The cancelled one may be answered at once or when the worker reaches it: match by reply_to.
        answers = {reply.header["reply_to"]: reply for reply in (first.recv(), first.recv())}
        cancelled, original = answers[queued["message_id"]], answers[running["message_id"]]
        check_reply_envelope(cancelled, queued["message_id"])
        assert cancelled.code == "aborted" and cancelled.header["request_id"] == "held-2"
        joined = second.recv()
        check_reply_envelope(original, running["message_id"])
        check_reply_envelope(joined, retry["message_id"])
        assert original.type == joined.type == "acquire_ok"
        assert original.frames[0] == joined.frames[0]
        assert ask_ok(second, header("status")).header["exposures"] == 1
        assert first.silent(0.2) and second.silent(0.2)


# --------------------------------------------------------------------------- 5 error codes


def test_dose_limit_is_refused_before_exposure_and_warned(
    context: zmq.Context, small_config: SimulatorConfig, small_specimen: Specimen
) -> None:
    limited = small_config.model_copy(
        update={"instrument": InstrumentConfig(max_dose_e_per_a2=800.0, dose_map_cell_nm=0.5)}
    )
    with (
        SimulatedMicroscope(limited, small_specimen) as driver,
        serving(driver) as server,
        linked(context, server.endpoint) as link,
        subscribed(context, server.events_endpoint) as sub,
    ):
        assert ask_ok(link, header("describe")).header["instrument"]["max_dose_e_per_a2"] == 800.0
        ask_ok(link, header("acquire", scan=scan("dose-1")))  # 499 e-/A^2 of 800
        value = header("acquire", scan=scan("dose-2"))
        reply = refused(link, value, "dose_limit", value["message_id"])
        assert reply.header["request_id"] == "dose-2"
        assert exposures(link) == 1
        warnings = events_until(sub, lambda got: any(e[1]["type"] == "dose_warning" for e in got))
        warning = next(event for _, event in warnings if event["type"] == "dose_warning")
        assert set(warning) >= {"message", "max_dose_e_per_a2", "limit_e_per_a2", "x_nm", "y_nm",
                                "request_id", "seq", "t_s"}  # fmt: skip
        assert warning["limit_e_per_a2"] == 800.0
        # Refused before exposure: the id is not spent, elsewhere it is exposed.
        ask_ok(link, header("acquire", scan=scan("dose-2", x_nm=5.0, y_nm=5.0)))
        assert exposures(link) == 2


def test_driver_failures_are_internal_or_calibration_and_spend_the_id(
    context: zmq.Context, small_config: SimulatorConfig, small_specimen: Specimen
) -> None:
    with (
        FailingMicroscope(small_config, small_specimen) as driver,
        serving(driver) as server,
        linked(context, server.endpoint) as link,
    ):
        for request_id, code in (("boom-1", "internal"), ("cal-1", "calibration")):
            value = header("acquire", scan=scan(request_id))
            reply = refused(link, value, code, value["message_id"])
            assert reply.header["request_id"] == request_id
            # The exposure may have dosed the specimen: the id is spent, never exposed again.
            retry = header("acquire", scan=scan(request_id))
            again = refused(link, retry, "exposure_interrupted", retry["message_id"])
            assert again.header["request_id"] == request_id
        status = ask_ok(link, header("status")).header
        assert status["exposures"] == 2 and status["total_dose_e_per_a2"] > 0


def test_a_closed_driver_answers_closed(
    context: zmq.Context, small_config: SimulatorConfig, small_specimen: Specimen
) -> None:
    driver = SimulatedMicroscope(small_config, small_specimen)
    with serving(driver) as server, linked(context, server.endpoint) as link:
        driver.close()
        value = header("acquire", scan=scan("after-close"))
        reply = refused(link, value, "closed", value["message_id"])
        assert reply.header["request_id"] == "after-close"
        ask_ok(link, header("status"))


def test_a_closed_driver_exposes_nothing(
    context: zmq.Context, small_config: SimulatorConfig, small_specimen: Specimen
) -> None:
    driver = SimulatedMicroscope(small_config, small_specimen)
    with serving(driver) as server, linked(context, server.endpoint) as link:
        driver.close()
        refused(link, header("acquire", scan=scan("closed-1"), message_id="c-1"), "closed", "c-1")
        status = ask_ok(link, header("status")).header
        assert status["exposures"] == 0 and status["total_dose_e_per_a2"] == 0


def test_shutting_down_refuses_new_work_and_finishes_the_exposure_in_progress(
    context: zmq.Context, small_config: SimulatorConfig, small_specimen: Specimen
) -> None:
    held = HeldMicroscope(small_config, small_specimen)
    server = InstrumentServer(held, ANY_PORT, events_bind=ANY_PORT, heartbeat_s=0.2).start()
    stopper = threading.Thread(target=server.stop, kwargs={"grace_s": 10.0})
    try:
        with linked(context, server.endpoint) as first, linked(context, server.endpoint) as second:
            running = header("acquire", scan=scan("last-one"))
            first.send([encode(running)])
            assert held.started.wait(5.0)
            stopper.start()
            deadline = time.monotonic() + 5.0
            while True:  # until the server has noticed the stop
                status = header("status")
                reply = second.ask(status)
                check_reply_envelope(reply, status["message_id"])
                if reply.code == "shutting_down":
                    break
                assert time.monotonic() < deadline, "the stopping server never said shutting_down"
                time.sleep(0.02)
            late = header("acquire", scan=scan("too-late", x_nm=10.0))
            reply = refused(second, late, "shutting_down", late["message_id"])
            held.release.set()
            finished = first.recv()
            check_reply_envelope(finished, running["message_id"])
            assert finished.type == "acquire_ok"  # the exposure in progress is finished and answered
    finally:
        held.release.set()
        if stopper.is_alive() or not stopper.ident:
            if not stopper.ident:
                stopper.start()
            stopper.join(15.0)
        held.close()


def test_every_error_code_of_the_doc_is_one_of_section_5() -> None:
    text = (REPO / "docs" / "protocol.md").read_text(encoding="utf-8")
    table = text.split("## 5. Errors", 1)[1].split("## 6.", 1)[0]
    documented = {line.split("`")[1] for line in table.splitlines() if line.startswith("| `")}
    assert documented == ERROR_CODES


# --------------------------------------------------------------------------- 6 events


def test_events_are_topic_and_header_with_increasing_seq(
    context: zmq.Context, link: Link, server: InstrumentServer
) -> None:
    with subscribed(context, server.events_endpoint) as sub:
        ask_ok(link, header("acquire", scan=scan(new_id("evt"), x_nm=9.0)))
        events = events_until(
            sub,
            lambda got: (
                sum(e[1]["type"] == "heartbeat" for e in got) >= 3
                and any(e[1]["type"] == "state" and e[1]["state"] == "idle" for e in got)
            ),
        )
    seqs = [event["seq"] for _, event in events]
    assert seqs == sorted(set(seqs)) and all(type(seq) is int and seq >= 0 for seq in seqs)
    for topic, event in events:
        assert topic == event["type"].encode("ascii")
        assert event["protocol"] == PROTOCOL and event["version"] == 1 and event["arrays"] == []
        assert ID_PATTERN.fullmatch(event["message_id"]) and isinstance(event["t_s"], float)
        if event["type"] == "heartbeat":
            assert set(event) == {*ENVELOPE, "seq", "t_s", "type", "state"}
        if event["type"] == "state":
            assert set(event) >= {"state", "request_id", "exposures"}
    states = [event["state"] for _, event in events if event["type"] == "state"]
    assert "acquiring" in states and states[-1] == "idle"


# --------------------------------------------------------------------------- bounded fuzz


def fuzz(link: Link, seed: int, count: int) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Send ``count`` fuzz cases one at a time and check each reply.

    Returns the scans exposed (``acquire_ok`` with ``replayed: false``) by request id, in order, and
    the final status.
    """
    import jsonschema

    commands = json.loads((REPO / "docs" / "protocol-schema.json").read_text(encoding="utf-8"))["commands"]
    # One validator per branch of the schema's oneOf (the types are distinct constants, so a header
    # matches the oneOf exactly when it matches the branch of its type): several times faster.
    branches = {
        kind: jsonschema.Draft202012Validator({"$defs": commands["$defs"], "$ref": ref})
        for kind, ref in commands["discriminator"]["mapping"].items()
    }

    def schema_valid(value: dict[str, Any]) -> bool:
        kind = value.get("type")
        return isinstance(kind, str) and kind in branches and branches[kind].is_valid(value)

    fuzzer = Fuzzer(seed=seed)
    fresh_ok: dict[str, dict[str, Any]] = {}
    disagreements: list[str] = []
    for index in range(count):
        case = fuzzer.case()
        link.send(case.frames)
        reply = link.recv(timeout_s=10.0)
        where = f"case {index} ({case.note}): {case.frames[0][:200]!r} -> {reply.header}"
        check_reply_envelope(reply, case.sent_id, named=case.named)
        kind = case.header.get("type") if case.header else None
        if reply.type != "error":
            assert kind in OK_TYPE and reply.type == OK_TYPE[kind], where
        if reply.type == "acquire_ok":
            request_id = case.header["scan"]["request_id"]
            rows, cols = case.header["scan"]["shape"]
            assert len(reply.frames[0]) == rows * cols * 4, where
            if reply.header["replayed"] is False:
                assert request_id not in fresh_ok, f"exposed twice: {where}"
                fresh_ok[request_id] = case.header["scan"]
        # The schema and the server agree on every header that alone decides the reply,
        # except for the two rules a JSON Schema validator cannot apply (see the helpers).
        if (
            case.header_only
            and case.header.get("protocol") == PROTOCOL
            and case.header.get("version") == 1
            and type(case.header.get("version")) is int
            and not has_integral_float(case.header)
            and not ends_in_newline(case.header)
        ):
            accepted = reply.code not in ("bad_message", "bad_frames", "message_too_large")
            if accepted != schema_valid(case.header):
                disagreements.append(where)
    assert link.silent(0.5), "a reply nobody asked for"
    status = ask_ok(link, header("status")).header  # still serving
    assert not disagreements, "\n".join(disagreements[:5])
    return fresh_ok, status


def test_bounded_fuzz_every_message_gets_one_documented_reply(
    context: zmq.Context,
    small_config: SimulatorConfig,
    small_specimen: Specimen,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="micrography.server")  # thousands of refusals: not kept
    with (
        SimulatedMicroscope(small_config, small_specimen) as driver,
        serving(driver) as server,
        linked(context, server.endpoint) as link,
    ):
        fresh_ok, status = fuzz(link, seed=14, count=3000)
    assert status["exposures"] == len(fresh_ok) and status["interrupted_exposures"] == 0
    assert len(fresh_ok) > 50, "the fuzz should also expose"


def test_the_example_server_survives_the_fuzz_too(
    context: zmq.Context, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="minimal-server")
    spec = importlib.util.spec_from_file_location(
        "minimal_server", REPO / "docs" / "examples" / "minimal_server.py"
    )
    assert spec and spec.loader
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.ScanEngine.describe = lambda self: DESCRIPTION_30_NM  # the fuzz scans a 30 nm stage
    minimal = example.MinimalServer(example.ScanEngine(), ANY_PORT, ANY_PORT, heartbeat_s=0.2)
    thread = threading.Thread(target=minimal.serve_forever, daemon=True)
    thread.start()
    try:
        with linked(context, minimal.endpoint) as link:
            fresh_ok, status = fuzz(link, seed=15, count=800)
            # More ids than it keeps tiles for: an old id is answered reply_expired, never exposed again.
            its_scan = next(iter(fresh_ok.values()))
            reply = link.ask(header("acquire", scan=its_scan))
            assert reply.type == "acquire_ok" or reply.code == "reply_expired", reply.header
            assert ask_ok(link, header("status")).header["exposures"] == status["exposures"]
    finally:
        minimal.stop()
        thread.join(5.0)
    assert status["exposures"] == len(fresh_ok) > 10


# --------------------------------------------------------------------------- the reference client


def test_the_reference_client_sends_every_field_the_wire_requires(
    context: zmq.Context, server: InstrumentServer
) -> None:
    """``ZmqMicroscope`` (agent/protocol/client.py) through a recording relay: every header it sends
    carries message_id and arrays, every acquire a valid scan.request_id, and a resend the same id."""
    from agent.protocol.client import ZmqMicroscope  # only to watch what it sends

    frontend, backend = context.socket(zmq.ROUTER), context.socket(zmq.DEALER)
    for relay_socket in (frontend, backend):
        relay_socket.setsockopt(zmq.LINGER, 0)
    port = frontend.bind_to_random_port("tcp://127.0.0.1")
    backend.connect(server.endpoint)
    sent: list[list[bytes]] = []
    stop = threading.Event()

    def relay() -> None:  # one client at a time: replies go back to the latest identity
        identity = b""
        poller = zmq.Poller()
        poller.register(frontend, zmq.POLLIN)
        poller.register(backend, zmq.POLLIN)
        while not stop.is_set():
            ready = dict(poller.poll(50))
            if frontend in ready:
                identity, *body = frontend.recv_multipart()
                sent.append(body)
                backend.send_multipart(body)
            if backend in ready:
                frontend.send_multipart([identity, *backend.recv_multipart()])

    thread = threading.Thread(target=relay, daemon=True)
    thread.start()
    try:
        with ZmqMicroscope(f"tcp://127.0.0.1:{port}", timeout_s=5.0) as remote:
            request = ScanRequest(x_nm=15.0, y_nm=15.0, shape=(16, 16), pixel_size_nm=0.05, dwell_us=1.0)
            remote.acquire(request)  # no request id given: the in-process model makes one up
            remote.status()
        with ZmqMicroscope(f"tcp://127.0.0.1:{port}", timeout_s=5.0) as again:
            again.acquire(request)  # a resend of the same request
    finally:
        stop.set()
        thread.join(5.0)
        frontend.close(linger=0)
        backend.close(linger=0)
    headers = [strict_json(body[0]) for body in sent]
    assert {value["type"] for value in headers} >= {"hello", "describe", "acquire", "status", "bye"}
    for body, value in zip(sent, headers, strict=True):
        assert set(ENVELOPE) <= set(value) and value["arrays"] == [] and len(body) == 1, value
        assert ID_PATTERN.fullmatch(value["message_id"]), value
    acquires = [value["scan"]["request_id"] for value in headers if value["type"] == "acquire"]
    assert len(acquires) == 2 and acquires[0] == acquires[1] == request.request_id
    assert ID_PATTERN.fullmatch(acquires[0])
