"""The wire protocol without a server: framing, headers, error codes, keys, fuzzing."""

from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.driver import InstrumentDescription, ScanRequest
from agent.errors import (
    AcquisitionAborted,
    CalibrationError,
    ConfigError,
    DoseLimitError,
    FrameMismatchError,
    LinkError,
    MessageTooLargeError,
    OutOfRangeError,
    OutsideStageError,
    ProtocolError,
    ProtocolVersionError,
    RemoteInstrumentError,
    ReplyExpiredError,
    ScanRequestError,
)
from agent.protocol.framing import (
    MAX_HEADER_BYTES,
    decode,
    encode,
    require_libzmq,
    split_envelope,
)
from agent.protocol.messages import (
    COMMAND_TYPES,
    COMMANDS,
    ERROR_OF_CODE,
    EVENT_TYPES,
    EVENTS,
    PROTOCOL_NAME,
    PROTOCOL_VERSION,
    REPLIES,
    REPLY_TYPES,
    AbortCommand,
    AbortReply,
    AcquireCommand,
    AcquireReply,
    ByeCommand,
    ByeReply,
    DescribeCommand,
    DescribeReply,
    DoseWarningEvent,
    ErrorCode,
    HeartbeatEvent,
    HelloCommand,
    HelloReply,
    StateEvent,
    StatusCommand,
    StatusReply,
    TileInfo,
    TileReadyEvent,
    error_code_for,
    error_reply,
    jsonable,
    protocol_json_schema,
)
from agent.protocol.security import (
    CurveClientKeys,
    CurveServerKeys,
    generate_keys,
    load_allowed_clients,
    load_key_pair,
    load_public_key,
)

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[1]
LIMIT = 1 << 30
FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def scan(**overrides: object) -> ScanRequest:
    values: dict[str, object] = {
        "x_nm": 15.0,
        "y_nm": 15.0,
        "shape": (64, 64),
        "pixel_size_nm": 0.02,
        "dwell_us": 2.0,
        "request_id": "r-1",
    }
    values.update(overrides)
    return ScanRequest(**values)  # type: ignore[arg-type]


def tile_reply(image: np.ndarray) -> AcquireReply:
    info = TileInfo(
        request_id="r-1",
        origin_nm=(1.0, 2.0),
        pixel_size_nm=0.02,
        dose_e_per_a2=6241.5,
        t_start=1.0,
        t_end=2.0,
        metadata={"exposure": 0},
    )
    return AcquireReply(reply_to="m-1", tile=info)


def header(**fields: object) -> bytes:
    values: dict[str, object] = {
        "protocol": PROTOCOL_NAME,
        "version": PROTOCOL_VERSION,
        "message_id": "m-1",
        "arrays": [],
    }
    values.update(fields)
    return json.dumps(values).encode()


@pytest.fixture
def pair() -> object:
    """Two connected inproc sockets, so frames arrive as real zero-copy ``zmq.Frame`` objects."""
    context = zmq.Context()
    left, right = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
    left.bind("inproc://protocol-test")
    right.connect("inproc://protocol-test")
    try:
        yield left, right
    finally:
        left.close(linger=0)
        right.close(linger=0)
        context.term()


# --------------------------------------------------------------------------- framing


def test_tile_round_trip_is_bit_exact_and_zero_copy(pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    rng = np.random.default_rng(0)
    image = rng.random((33, 47), dtype=np.float32)
    # Values a text format would mangle: signed zero, infinities, a NaN payload, subnormals.
    image.view(np.uint32)[0, :6] = [0x80000000, 0x7F800000, 0xFF800000, 0x7FC01234, 0x00000001, 0x807FFFFF]
    reply = tile_reply(image)
    frames = encode(reply, {"image": image})
    assert frames[1] is image  # the frame refers to the array: nothing copied on the way out
    sender, receiver = pair
    sender.send_multipart(frames, copy=False)
    received = receiver.recv_multipart(copy=False)
    decoded = decode(received, REPLIES, max_message_bytes=LIMIT, what="reply")
    out = decoded.arrays["image"]
    np.testing.assert_array_equal(out.view(np.uint32), image.view(np.uint32))
    assert out.dtype == np.float32 and not out.flags.owndata  # a view of the received frame
    assert decoded.header == reply.model_copy(update={"arrays": decoded.header.arrays})
    spec = decoded.header.arrays[0]
    assert (spec.name, spec.dtype, spec.shape) == ("image", "<f4", (33, 47))


@pytest.mark.parametrize("dtype", ["<f4", ">f4", "<f8", "<f2", ">u2", "<i8", "|u1", "|i1", "|b1", "<c16"])
def test_every_wire_dtype_round_trips_with_its_byte_order(dtype: str) -> None:
    array = (np.arange(24).reshape(2, 3, 4) % 2 == 1) if dtype == "|b1" else np.arange(24).reshape(2, 3, 4)
    array = array.astype(dtype)
    frames = encode(tile_reply(array), {"image": array})
    decoded = decode([bytes(memoryview(frame)) for frame in frames], REPLIES, max_message_bytes=LIMIT)
    out = decoded.arrays["image"]
    assert out.dtype.str == dtype
    np.testing.assert_array_equal(out, array)


def test_non_contiguous_arrays_are_sent_contiguous() -> None:
    array = np.arange(100, dtype=np.float32).reshape(10, 10)[:, ::2]
    frames = encode(tile_reply(array), {"image": array})
    decoded = decode([bytes(memoryview(frame)) for frame in frames], REPLIES, max_message_bytes=LIMIT)
    np.testing.assert_array_equal(decoded.arrays["image"], array)


@pytest.mark.parametrize("array", [np.array([object()]), np.array(["abc"]), np.zeros(2, dtype="V4")])
def test_arrays_that_are_not_plain_numbers_cannot_be_sent(array: np.ndarray) -> None:
    with pytest.raises(ProtocolError, match="cannot be sent"):
        encode(tile_reply(np.zeros(1)), {"image": array})


def test_header_declaring_an_object_dtype_is_refused_before_any_frame_is_read() -> None:
    arrays = [{"name": "x", "dtype": "|O", "shape": [1]}]
    with pytest.raises(ProtocolError, match="dtype '\\|O' is not allowed on the wire"):
        decode([header(type="status", arrays=arrays), b"\0" * 8], COMMANDS, max_message_bytes=LIMIT)


def test_wrong_frame_count_is_a_frame_mismatch() -> None:
    with pytest.raises(
        FrameMismatchError, match="1 array frame\\(s\\) after the header, but its header declares 0"
    ):
        decode([header(type="status"), b"extra"], COMMANDS, max_message_bytes=LIMIT)
    arrays = [{"name": "x", "dtype": "<f4", "shape": [2]}]
    with pytest.raises(FrameMismatchError, match="0 array frame"):
        decode([header(type="status", arrays=arrays)], COMMANDS, max_message_bytes=LIMIT)


def test_wrong_byte_length_names_the_frame_and_the_expected_size() -> None:
    raw = json.loads(
        encode(tile_reply(np.zeros((4, 4), np.float32)), {"image": np.zeros((4, 4), np.float32)})[0]
    )
    with pytest.raises(FrameMismatchError, match=r"frame 1 \('image'\) .* has 63 bytes.*= 64 bytes"):
        decode([json.dumps(raw).encode(), b"\0" * 63], REPLIES, max_message_bytes=LIMIT)


@pytest.mark.parametrize("kind", ["status", "acquire_ok"])
def test_arrays_a_message_type_does_not_carry_are_a_frame_mismatch(kind: str) -> None:
    # Commands carry no arrays in version 1; acquire_ok carries only "image".
    raw = (
        json.loads(encode(tile_reply(np.zeros(1)))[0])
        if kind == "acquire_ok"
        else json.loads(header(type=kind))
    )
    raw["arrays"] = [{"name": "extra", "dtype": "<f4", "shape": [2]}]
    adapter = REPLIES if kind == "acquire_ok" else COMMANDS
    with pytest.raises(FrameMismatchError, match=f"a {kind} carries"):
        decode([json.dumps(raw).encode(), b"\0" * 8], adapter, max_message_bytes=LIMIT)


def test_version_mismatch_is_refused_with_both_versions_named() -> None:
    with pytest.raises(ProtocolVersionError, match="version 2, this side speaks version 1"):
        decode([header(type="hello", version=2, future_field=1)], COMMANDS, max_message_bytes=LIMIT)
    with pytest.raises(ProtocolError, match="must be an integer"):
        decode([header(type="status", version=True)], COMMANDS, max_message_bytes=LIMIT)


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (b"\xff\xfe not utf-8", "not UTF-8 JSON"),
        (b"{not json", "not UTF-8 JSON"),
        (b"[1, 2]", "JSON list, not an object"),
        (b'{"protocol": "other", "version": 1}', "not a micrography-link message"),
        (header(type="launch_missiles"), "type"),
        (header(type="acquire"), "scan"),
        (header(type="status", extra=1), "extra: unknown field"),
        (header(type="status", message_id="has space"), "message_id"),
        (b'{"protocol": "micrography-link", "version": 1, "type": "status", "x": NaN}', "not UTF-8 JSON"),
        (b"[" * 60_000, "not UTF-8 JSON"),  # deep nesting: RecursionError inside json
        (b"[" * 100_000, "header of the message is"),
    ],
)
def test_malformed_headers_raise_protocol_errors_a_person_can_act_on(frame: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        decode([frame], COMMANDS, max_message_bytes=LIMIT)


def test_size_limits() -> None:
    with pytest.raises(MessageTooLargeError, match="more than the 1,000 bytes accepted"):
        decode([header(type="status"), b"\0" * 2000], COMMANDS, max_message_bytes=1000)
    big_header = header(type="status", message_id="m", padding="x" * MAX_HEADER_BYTES)
    with pytest.raises(MessageTooLargeError, match="the header of"):
        decode([big_header], COMMANDS, max_message_bytes=LIMIT)
    with pytest.raises(ProtocolError, match="no frames"):
        decode([], COMMANDS, max_message_bytes=LIMIT)


def test_split_envelope_serves_dealer_and_req_clients() -> None:
    assert split_envelope([b"id", b"{}", b"array"]) == ([b"id"], [b"{}", b"array"])
    assert split_envelope([b"id", b"", b"{}"]) == ([b"id", b""], [b"{}"])


def test_old_libzmq_is_refused_with_a_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    assert require_libzmq() >= (4, 3, 5)
    monkeypatch.setattr(zmq, "zmq_version_info", lambda: (4, 3, 4))
    with pytest.raises(LinkError, match=r"libzmq 4\.3\.4 is too old.*4\.3\.5 or later.*pip install -U pyzmq"):
        require_libzmq()


# --------------------------------------------------------------------------- messages


def test_every_error_code_maps_to_an_exception_and_back() -> None:
    assert set(ERROR_OF_CODE) == set(ErrorCode)
    for error in (
        OutsideStageError("x"),
        OutOfRangeError("x"),
        DoseLimitError("x"),
        ScanRequestError("x"),
        AcquisitionAborted("x"),
        FrameMismatchError("x"),
        MessageTooLargeError("x"),
        ProtocolVersionError("x"),
        CalibrationError("x"),
        ReplyExpiredError("x"),
    ):
        assert type(error) is ERROR_OF_CODE[error_code_for(error)]
    assert error_code_for(CalibrationError("x")) is ErrorCode.CALIBRATION
    reply = error_reply(KeyError("oops"), reply_to="m-1")
    assert reply.code is ErrorCode.INTERNAL and "KeyError" in reply.message and "server log" in reply.message
    assert ERROR_OF_CODE[reply.code] is RemoteInstrumentError


def test_commands_replies_and_events_round_trip() -> None:
    for message, adapter in (
        (HelloCommand(client="agent", capabilities=("acquire",), max_message_bytes=1 << 20), COMMANDS),
        (AcquireCommand(scan=scan()), COMMANDS),
        (StatusCommand(), COMMANDS),
        (error_reply(DoseLimitError("too much"), reply_to="m-1", request_id="r-1"), REPLIES),
        (
            TileReadyEvent(seq=3, t_s=1.0, request_id="r-1", shape=(4, 4), dose_e_per_a2=1.0, t_end=2.0),
            EVENTS,
        ),
    ):
        assert decode(encode(message), adapter, max_message_bytes=LIMIT).header == message


def test_metadata_becomes_plain_json() -> None:
    converted = jsonable({"a": np.float32(1.5), "b": np.arange(3), "c": (1, float("nan")), 4: Path("x")})
    assert converted == {"a": 1.5, "b": [0, 1, 2], "c": [1, None], "4": "x"}
    json.dumps(converted)


def test_published_schema_matches_the_models() -> None:
    published = json.loads((REPO / "docs" / "protocol-schema.json").read_text(encoding="utf-8"))
    assert published == json.loads(json.dumps(protocol_json_schema())), (
        "docs/protocol-schema.json is stale; regenerate it with "
        "python -c 'import json; from agent.protocol.messages import protocol_json_schema; "
        "print(json.dumps(protocol_json_schema(), indent=2))' > docs/protocol-schema.json"
    )


# --------------------------------------------------------------------------- strict decoding (issue 14)


def acquire_frame(**scan_fields: object) -> bytes:
    raw = json.loads(encode(AcquireCommand(message_id="m-1", scan=scan()))[0])
    raw["scan"].update(scan_fields)
    return json.dumps(raw).encode()


@pytest.mark.parametrize(
    ("field", "value", "hint"),
    [
        ("dwell_us", "2", "not a string"),
        ("pixel_size_nm", "0.02", "not a string"),
        ("x_nm", "80", "not a string"),
        ("dwell_us", True, "true and false are not numbers"),
        ("shape", [512.0, 512], "512, not 512.0"),
        ("shape", [True, 512], "true and false are not numbers"),
        ("shape", [512, "512"], "not a string"),
        ("shape", [5.12e2, 512], "512, not 512.0"),
    ],
)
def test_decoding_is_strict_strings_booleans_and_floats_are_not_coerced(
    field: str, value: object, hint: str
) -> None:
    with pytest.raises(ProtocolError, match=f"scan\\.{field}.*{hint}") as refused:
        decode([acquire_frame(**{field: value})], COMMANDS, max_message_bytes=LIMIT)
    assert "\n" not in str(refused.value)  # one line for a person


def test_json_integers_are_accepted_for_number_fields() -> None:
    decoded = decode([acquire_frame(x_nm=15, dwell_us=2, pixel_size_nm=1)], COMMANDS, max_message_bytes=LIMIT)
    assert decoded.header.scan.x_nm == 15.0 and isinstance(decoded.header.scan.dwell_us, float)
    assert decoded.header.scan.shape == (64, 64)  # a JSON array for a tuple, as JSON mode allows


@pytest.mark.parametrize(
    "token",
    [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e999", b"1" * 400],
)
def test_numbers_beyond_float64_are_refused_even_as_integers(token: bytes) -> None:
    frame = acquire_frame(x_nm=12345.5).replace(b"12345.5", token)
    with pytest.raises(ProtocolError, match="not UTF-8 JSON"):
        decode([frame], COMMANDS, max_message_bytes=LIMIT)


def test_duplicate_keys_are_refused() -> None:
    frame = header(type="status").replace(b'"type"', b'"type": "bye", "type"')
    with pytest.raises(ProtocolError, match="'type' appears twice"):
        decode([frame], COMMANDS, max_message_bytes=LIMIT)


def test_the_version_is_checked_before_required_fields_and_types() -> None:
    raw = json.loads(acquire_frame(dwell_us="2"))
    raw.update(version=2, surprise=1)
    del raw["message_id"], raw["arrays"], raw["scan"]["request_id"]
    with pytest.raises(ProtocolVersionError, match="version 2"):
        decode([json.dumps(raw).encode()], COMMANDS, max_message_bytes=LIMIT)


@pytest.mark.parametrize("missing", ["message_id", "arrays"])
@pytest.mark.parametrize("adapter", [COMMANDS, REPLIES, EVENTS], ids=["command", "reply", "event"])
def test_message_id_and_arrays_are_required_on_the_wire(adapter: object, missing: str) -> None:
    message = {
        id(COMMANDS): StatusCommand(),
        id(REPLIES): ByeReply(reply_to="m-1"),
        id(EVENTS): HeartbeatEvent(seq=1, t_s=1.0, state="idle"),
    }[id(adapter)]
    raw = json.loads(encode(message)[0])
    del raw[missing]
    with pytest.raises(ProtocolError, match=f"missing field\\(s\\) {missing}"):
        decode([json.dumps(raw).encode()], adapter, max_message_bytes=LIMIT)  # type: ignore[arg-type]


def test_reply_to_is_required_in_replies_and_may_be_null() -> None:
    raw = json.loads(encode(ByeReply(reply_to=None))[0])
    assert decode([json.dumps(raw).encode()], REPLIES, max_message_bytes=LIMIT).header.reply_to is None
    del raw["reply_to"]
    with pytest.raises(ProtocolError, match="missing field\\(s\\) reply_to"):
        decode([json.dumps(raw).encode()], REPLIES, max_message_bytes=LIMIT)


def test_an_acquire_without_request_id_is_refused_not_given_a_made_up_one() -> None:
    raw = json.loads(acquire_frame())
    del raw["scan"]["request_id"]
    with pytest.raises(ProtocolError, match=r"scan\.request_id is missing"):
        decode([json.dumps(raw).encode()], COMMANDS, max_message_bytes=LIMIT)


@pytest.mark.parametrize("bad", ["", "a b", "x" * 129, "new\nline", "tab\t", "é", "\x7f", "\x00"])
def test_request_ids_have_the_limits_of_message_ids(bad: str) -> None:
    with pytest.raises(ProtocolError, match="request_id"):
        decode([acquire_frame(request_id=bad)], COMMANDS, max_message_bytes=LIMIT)
    with pytest.raises(ProtocolError, match="request_id"):
        decode([header(type="abort", request_id=bad)], COMMANDS, max_message_bytes=LIMIT)
    with pytest.raises(ProtocolError, match="message_id"):
        decode([header(type="status", message_id=bad)], COMMANDS, max_message_bytes=LIMIT)
    longest = "".join(chr(code) for code in range(0x21, 0x7F)) + "x" * 34
    assert len(longest) == 128
    assert decode(
        [acquire_frame(request_id=longest)], COMMANDS, max_message_bytes=LIMIT
    ).header.scan.request_id
    assert decode([header(type="abort", request_id=longest)], COMMANDS, max_message_bytes=LIMIT)


# --------------------------------------------------------------------------- the schema agrees with decoding

DESCRIPTION = InstrumentDescription(
    name="test",
    stage_x_nm=(0.0, 30.0),
    stage_y_nm=(0.0, 30.0),
    pixel_size_nm=(0.01, 1.0),
    max_tile_shape=(512, 512),
    beam_current_pa=20.0,
    dwell_us=(0.5, 10.0),
    max_dose_e_per_a2=1e4,
)


def every_message() -> list[tuple[object, dict[str, np.ndarray] | None]]:
    """One header of every type, with every optional field set, and the arrays it carries."""
    info = tile_reply(np.zeros(1)).tile
    return [
        (HelloCommand(client="agent", capabilities=("acquire",), max_message_bytes=1 << 20), None),
        (DescribeCommand(), None),
        (AcquireCommand(scan=scan()), None),
        (AbortCommand(request_id="r-1"), None),
        (StatusCommand(), None),
        (ByeCommand(), None),
        (
            HelloReply(
                reply_to="m-1",
                server="s",
                instrument="i",
                capabilities=("acquire",),
                max_message_bytes=1 << 20,
                heartbeat_s=1.0,
                events_endpoint="tcp://127.0.0.1:1",
            ),
            None,
        ),
        (DescribeReply(reply_to="m-1", instrument=DESCRIPTION), None),
        (AcquireReply(reply_to="m-1", tile=info, replayed=True), {"image": np.zeros((2, 3), np.float32)}),
        (AbortReply(reply_to="m-1", aborted=("r-1",)), None),
        (
            StatusReply(
                reply_to="m-1",
                state="acquiring",
                request_id="r-1",
                queued=1,
                exposures=2,
                interrupted_exposures=1,
                total_dose_e_per_a2=3.0,
                journal="/j",
                uptime_s=4.0,
            ),
            None,
        ),
        (ByeReply(reply_to="m-1"), None),
        (error_reply(DoseLimitError("too much dose here"), reply_to="m-1", request_id="r-1"), None),
        (HeartbeatEvent(seq=1, t_s=1.0, state="idle"), None),
        (StateEvent(seq=2, t_s=1.0, state="acquiring", request_id="r-1", exposures=1), None),
        (TileReadyEvent(seq=3, t_s=1.0, request_id="r-1", shape=(4, 4), dose_e_per_a2=1.0, t_end=2.0), None),
        (
            DoseWarningEvent(
                seq=4,
                t_s=1.0,
                message="m",
                max_dose_e_per_a2=1.0,
                limit_e_per_a2=2.0,
                x_nm=1.0,
                y_nm=2.0,
                request_id="r-1",
            ),
            None,
        ),
    ]


def family(kind: str) -> tuple[str, object]:
    if kind in COMMAND_TYPES:
        return "commands", COMMANDS
    return ("replies", REPLIES) if kind in REPLY_TYPES else ("events", EVENTS)


def test_every_message_type_is_sampled() -> None:
    assert {message.type for message, _ in every_message()} == COMMAND_TYPES | REPLY_TYPES | EVENT_TYPES  # type: ignore[attr-defined]


@pytest.mark.parametrize("sample", every_message(), ids=lambda sample: sample[0].type)  # type: ignore[index]
def test_schema_required_fields_are_exactly_what_decoding_requires(
    sample: tuple[object, dict[str, np.ndarray] | None],
) -> None:
    import jsonschema

    message, arrays = sample
    frames = encode(message, arrays)  # type: ignore[arg-type]
    raw = json.loads(frames[0])
    name, adapter = family(raw["type"])
    schema = protocol_json_schema()[name]
    validator = jsonschema.Draft202012Validator(schema)
    assert validator.is_valid(raw), list(validator.iter_errors(raw))
    payload = [bytes(memoryview(frame)) for frame in frames[1:]]
    definition = schema["$defs"][type(message).__name__]
    # Every field the project sends is in the schema, and the schema has no field it never sends.
    assert set(raw) == set(definition["properties"])
    nested = [("", raw, definition)]
    if "scan" in raw:
        nested.append(("scan", raw["scan"], schema["$defs"]["ScanRequest"]))
    for where, node, node_schema in nested:
        for key in list(node):
            value = node.pop(key)
            try:
                decode([json.dumps(raw).encode(), *payload], adapter, max_message_bytes=LIMIT)  # type: ignore[arg-type]
                accepted = True
            except ProtocolError:
                accepted = False
            finally:
                node[key] = value
            required = key in node_schema.get("required", [])
            assert accepted is not required, f"{raw['type']}: {where}.{key} required={required}"


def test_the_schema_lists_the_wire_required_fields_and_id_limits() -> None:
    schema = protocol_json_schema()
    for name, reply in (("commands", False), ("replies", True), ("events", False)):
        for definition in schema[name]["$defs"].values():
            if "protocol" in definition.get("properties", {}):
                expected = {"protocol", "version", "type", "message_id", "arrays"} | (
                    {"reply_to"} if reply else set()
                )
                assert expected <= set(definition["required"]), definition["title"]
    scan_schema = schema["commands"]["$defs"]["ScanRequest"]
    assert "request_id" in scan_schema["required"]
    assert scan_schema["properties"]["request_id"]["maxLength"] == 128
    abort_id = schema["commands"]["$defs"]["AbortCommand"]["properties"]["request_id"]["anyOf"][0]
    assert (
        abort_id["maxLength"] == 128
        and abort_id["pattern"] == scan_schema["properties"]["request_id"]["pattern"]
    )


def test_the_projects_encoder_always_sends_the_wire_fields() -> None:
    # ZmqMicroscope sends encode(model) for every command: the defaults must reach the wire.
    for message, arrays in every_message():
        raw = json.loads(encode(message, arrays)[0])  # type: ignore[arg-type]
        assert {"protocol", "version", "message_id", "arrays", "type"} <= set(raw)
        if raw["type"] in REPLY_TYPES:
            assert "reply_to" in raw
    without_id = ScanRequest(x_nm=1, y_nm=1, shape=(2, 2), pixel_size_nm=0.1, dwell_us=1.0)
    raw = json.loads(encode(AcquireCommand(scan=without_id))[0])
    assert raw["scan"]["request_id"]  # a made-up id in process is sent, so the resend carries the same one


# --------------------------------------------------------------------------- keys


def test_generated_keys_load_and_the_secret_is_owner_only(tmp_path: Path) -> None:
    public_file, secret_file = generate_keys(tmp_path / "keys", "agent")
    assert stat.S_IMODE(os.stat(secret_file).st_mode) == 0o600
    public, secret = load_key_pair(secret_file)
    assert load_public_key(public_file) == public and zmq.curve_public(secret) == public
    assert load_allowed_clients(tmp_path / "keys") == {public}
    assert load_allowed_clients(public_file) == {public}
    server_public, _ = generate_keys(tmp_path / "keys", "server")
    client = CurveClientKeys.from_files(secret_file, server_public)
    assert client.public == public and client.server_public == load_public_key(server_public)
    with pytest.raises(ConfigError, match="already exists"):
        generate_keys(tmp_path / "keys", "agent")


def test_key_file_mistakes_are_explained(tmp_path: Path) -> None:
    public_file, _ = generate_keys(tmp_path, "agent")
    with pytest.raises(ConfigError, match="holds a public key only"):
        load_key_pair(public_file)
    with pytest.raises(ConfigError, match="key file not found"):
        load_key_pair(tmp_path / "missing.key_secret")
    bad = tmp_path / "bad.key"
    bad.write_text('public-key = "tooshort"\n')
    with pytest.raises(ConfigError, match="not a 40-character Z85 CURVE key"):
        load_public_key(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no client public keys"):
        load_allowed_clients(tmp_path / "empty")
    with pytest.raises(ConfigError, match="plain file name"):
        generate_keys(tmp_path, "../escape")
    with pytest.raises(ConfigError, match="not found"):
        CurveServerKeys.from_files(tmp_path / "agent.key_secret", tmp_path / "nowhere")


# --------------------------------------------------------------------------- fuzzing

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=16,
)
field_names = st.sampled_from(
    ["type", "message_id", "arrays", "scan", "client", "capabilities", "max_message_bytes", "request_id"]
) | st.text(max_size=10)
message_types = st.sampled_from(["hello", "describe", "acquire", "abort", "status", "bye", "error", "?"])


@FUZZ
@given(st.binary(max_size=600))
def test_fuzz_arbitrary_bytes_only_ever_raise_protocol_errors(data: bytes) -> None:
    for adapter in (COMMANDS, REPLIES, EVENTS):
        with contextlib.suppress(ProtocolError):
            decode([data], adapter, max_message_bytes=LIMIT)


@FUZZ
@given(message_types, st.dictionaries(field_names, json_values, max_size=6), st.lists(st.binary(max_size=32)))
def test_fuzz_header_objects_are_valid_or_refused_cleanly(
    kind: str, fields: dict, frames: list[bytes]
) -> None:
    raw = {"protocol": PROTOCOL_NAME, "version": PROTOCOL_VERSION, "type": kind, **fields}
    try:
        decoded = decode([json.dumps(raw).encode(), *frames], COMMANDS, max_message_bytes=LIMIT)
    except ProtocolError:
        return
    # Whatever is accepted re-encodes to the same header.
    again = decode(encode(decoded.header, decoded.arrays), COMMANDS, max_message_bytes=LIMIT)
    assert again.header == decoded.header


finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)
positive = st.floats(min_value=1e-6, max_value=1e6, allow_nan=False)


@FUZZ
@given(
    finite,
    finite,
    st.tuples(st.integers(1, 8192), st.integers(1, 8192)),
    positive,
    positive,
    st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=64),
)
def test_fuzz_every_valid_acquire_round_trips_exactly(
    x: float, y: float, shape: tuple[int, int], pixel: float, dwell: float, request_id: str
) -> None:
    command = AcquireCommand(
        scan=ScanRequest(
            x_nm=x, y_nm=y, shape=shape, pixel_size_nm=pixel, dwell_us=dwell, request_id=request_id
        )
    )
    assert decode(encode(command), COMMANDS, max_message_bytes=LIMIT).header == command


@FUZZ
@given(st.data())
def test_fuzz_mutated_acquire_headers_are_valid_or_refused_cleanly(data: st.DataObject) -> None:
    raw = json.loads(encode(AcquireCommand(scan=scan()))[0])
    target = data.draw(st.sampled_from(["top", "scan"]))
    node = raw if target == "top" else raw["scan"]
    key = data.draw(st.sampled_from(sorted(node)))
    action = data.draw(st.sampled_from(["delete", "replace", "add"]))
    if action == "delete":
        del node[key]
    elif action == "replace":
        node[key] = data.draw(json_values)
    else:
        node[data.draw(st.text(max_size=8))] = data.draw(json_values)
    with contextlib.suppress(ProtocolError):
        decode([json.dumps(raw).encode()], COMMANDS, max_message_bytes=LIMIT)
