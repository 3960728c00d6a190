"""Multipart framing of link messages: a JSON header, then raw array frames.

A message is a list of ZeroMQ frames::

    [header (UTF-8 JSON object), array_0, array_1, ...]

The header's ``arrays`` field lists, in order, the name, dtype (with byte order)
and shape of every array frame; each frame holds exactly ``prod(shape) *
itemsize`` bytes in C order. Nothing is pickled: a frame is plain numbers, and
the header is checked by the pydantic models of :mod:`agent.protocol.messages`
before any frame is interpreted. Headers are decoded strictly: a string or a boolean
is never taken for a number, nor ``512.0`` for an integer, and the fields the models
default for building headers in process (``message_id``, ``arrays``, ``reply_to``,
``scan.request_id``) must be present. Arrays are sent without copying (the frame
refers to the array's memory) and received without copying (the array is a view
of the received frame).

This module also holds the start-up checks of the link (libzmq version, CURVE
support) and the socket options both sides share.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq
from pydantic import BaseModel, TypeAdapter, ValidationError

from agent.errors import (
    FrameMismatchError,
    LinkError,
    MessageTooLargeError,
    ProtocolError,
    ProtocolVersionError,
)
from agent.protocol.messages import (
    ARRAYS_OF_TYPE,
    PROTOCOL_NAME,
    PROTOCOL_VERSION,
    ArraySpec,
    wire_problems,
)

MIN_LIBZMQ: tuple[int, int, int] = (4, 3, 5)
"""Oldest libzmq accepted; 4.3.5 fixed message-dropping bugs that hit other control systems."""

MAX_HEADER_BYTES = 64 * 1024
"""Largest JSON header accepted, in bytes (a tile header with metadata is about 1 kB)."""

DEFAULT_SERVER_MAX_MESSAGE_BYTES = 1024 * 1024
"""Largest message an instrument server accepts by default, in bytes: commands carry no arrays."""

DEFAULT_CLIENT_MAX_MESSAGE_BYTES = 1024 * 1024 * 1024
"""Largest message a client accepts by default, in bytes (a 4096x4096 float32 tile is 64 MiB)."""

Frame = bytes | bytearray | memoryview | zmq.Frame
"""What a frame may be when decoding: received ``zmq.Frame`` objects (zero-copy) or bytes."""


def _buffer(frame: Frame) -> memoryview:
    if isinstance(frame, zmq.Frame):
        return frame.buffer
    return memoryview(frame)


def message_bytes(frames: Sequence[Frame | np.ndarray]) -> int:
    """Total size of a multipart message, in bytes.

    Parameters
    ----------
    frames : sequence
        Frames as received (bytes, memoryview, ``zmq.Frame``) or as built by :func:`encode`.

    Returns
    -------
    int
        Sum of the frame lengths.
    """
    total = 0
    for frame in frames:
        total += frame.nbytes if isinstance(frame, np.ndarray) else _buffer(frame).nbytes
    return total


def check_size(size: int, limit: int, what: str) -> None:
    """Raise :class:`~agent.errors.MessageTooLargeError` if ``size`` exceeds ``limit``.

    Parameters
    ----------
    size : int
        Message size, bytes.
    limit : int
        Largest size accepted, bytes.
    what : str
        The message and its receiver, for the error text.
    """
    if size > limit:
        raise MessageTooLargeError(
            f"{what} is {size:,} bytes, more than the {limit:,} bytes accepted; "
            "send a smaller message (a smaller tile) or raise max_message_bytes on the receiving side"
        )


def encode(header: BaseModel, arrays: Mapping[str, np.ndarray] | None = None) -> list[Any]:
    """Build the frames of one message; arrays are not copied.

    Parameters
    ----------
    header : pydantic.BaseModel
        A header model of :mod:`agent.protocol.messages`; its ``arrays`` field is filled in.
    arrays : mapping of str to numpy.ndarray, optional
        Named arrays, sent in this order. Non-contiguous arrays are made contiguous (one copy);
        contiguous ones are referenced, so they must not change until the message is sent.

    Returns
    -------
    list
        ``[header_bytes, array, ...]`` for ``socket.send_multipart(frames, copy=False)``.

    Raises
    ------
    ProtocolError
        If an array has a dtype the protocol does not carry (object, strings, structured).
    """
    payload: list[np.ndarray] = []
    specs: list[ArraySpec] = []
    for name, array in (arrays or {}).items():
        array = np.ascontiguousarray(array)
        try:
            specs.append(ArraySpec.of(name, array))
        except ValidationError as error:
            raise ProtocolError(
                f"array {name!r} of dtype {array.dtype} cannot be sent: {error.errors()[0]['msg']}"
            ) from None
        payload.append(array)
    if specs or getattr(header, "arrays", ()):
        header = header.model_copy(update={"arrays": tuple(specs)})
    return [header.model_dump_json().encode("utf-8"), *payload]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        # 1e400 would silently become infinity: not a number this wire carries.
        raise ValueError(f"the number {text[:40]} is beyond the float64 range")
    return value


def _bounded_int(text: str) -> int:
    value = int(text)
    if len(text) > 300:
        try:
            float(value)  # a float field would take it as infinity
        except OverflowError:
            raise ValueError(f"the integer {text[:40]}... is beyond the float64 range") from None
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        # Parsers disagree on which of two equal keys wins; refuse rather than guess.
        keys = [key for key, _ in pairs]
        twice = next(key for index, key in enumerate(keys) if key in keys[:index])
        raise ValueError(f"the key {twice[:40]!r} appears twice in one object")
    return result


_STRICT_JSON = json.JSONDecoder(
    parse_constant=_reject_constant,
    parse_float=_finite_float,
    parse_int=_bounded_int,
    object_pairs_hook=_unique_keys,
)
# Built once: json.loads with hooks would build a decoder per call. Shared between threads like
# json's own default decoder (it keeps no state between calls).


def parse_header(data: bytes | memoryview, what: str = "message") -> dict[str, Any]:
    """Parse a header frame and check protocol name and major version, nothing else.

    The version is checked before the fields, so a peer of another version gets
    "version mismatch", not a list of fields it does not know.

    Parameters
    ----------
    data : bytes or memoryview
        The first frame.
    what : str
        The message, for error texts.

    Returns
    -------
    dict
        The JSON object.

    Raises
    ------
    MessageTooLargeError
        If the header exceeds :data:`MAX_HEADER_BYTES`.
    ProtocolVersionError
        If ``version`` is not :data:`~agent.protocol.messages.PROTOCOL_VERSION`.
    ProtocolError
        If the frame is not a UTF-8 JSON object of this protocol.
    """
    check_size(len(data), MAX_HEADER_BYTES, f"the header of the {what}")
    try:
        # Strict JSON: NaN, Infinity, numbers beyond float64 and duplicate keys are refused.
        raw = _STRICT_JSON.decode(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        detail = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise ProtocolError(
            f"the header of the {what} is not UTF-8 JSON ({detail}); the first frame of every "
            "message must be a JSON object (see docs/protocol.md)"
        ) from None
    if not isinstance(raw, dict):
        raise ProtocolError(
            f"the header of the {what} is a JSON {type(raw).__name__}, not an object; "
            "the first frame must be a JSON object (see docs/protocol.md)"
        )
    if raw.get("protocol") != PROTOCOL_NAME:
        got = str(raw.get("protocol"))[:80]
        raise ProtocolError(
            f"the {what} is not a {PROTOCOL_NAME} message (protocol = {got!r}); "
            f'set "protocol": "{PROTOCOL_NAME}" in every header'
        )
    version = raw.get("version")
    if type(version) is not int:
        raise ProtocolError(
            f"the header of the {what} has version {str(version)[:40]!r}; it must be an integer "
            f"(this side speaks version {PROTOCOL_VERSION})"
        )
    if version != PROTOCOL_VERSION:
        raise ProtocolVersionError(
            f"the {what} speaks {PROTOCOL_NAME} version {version}, this side speaks version "
            f"{PROTOCOL_VERSION}; install matching versions of the agent and the instrument server"
        )
    return raw


_NUMBER_ERRORS = frozenset({"int_type", "float_type", "int_parsing", "float_parsing", "int_from_float"})


def _describe_problem(problem: Any, kind: Any) -> str:
    """One validation problem as ``field.path: what is wrong (got value)``, with a hint for coercions."""
    location = list(problem["loc"])
    if location and location[0] == kind:
        location = location[1:]  # the discriminated union's tag: the type, already named
    key = ".".join(str(part) for part in location) or "header"
    if problem["type"] == "extra_forbidden":
        return f"{key}: unknown field (check the spelling against docs/protocol.md)"
    text = f"{key}: {problem['msg']}"
    if "input" in problem and problem["type"] != "missing":
        text += f" (got {str(json.dumps(problem['input'], default=str))[:60]})"
    if problem["type"] in _NUMBER_ERRORS:
        value = problem.get("input")
        if isinstance(value, bool):
            text += "; true and false are not numbers"
        elif isinstance(value, str):
            text += "; send a JSON number, not a string"
        elif isinstance(value, float) and problem["type"] == "int_type":
            text += "; an integer is written without a fraction or exponent (512, not 512.0)"
    return text


@dataclass(frozen=True)
class Decoded:
    """A received message: its validated header and its arrays (views of the received frames).

    Parameters
    ----------
    header : pydantic.BaseModel
        The validated header model.
    arrays : dict of str to numpy.ndarray
        Arrays by name, in the order of the header.
    """

    header: Any
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def decode(
    frames: Sequence[Frame], adapter: TypeAdapter[Any], *, max_message_bytes: int, what: str = "message"
) -> Decoded:
    """Check and decode one message; arrays are views of the frames, not copies.

    The order of the checks is the one ``docs/protocol.md`` (section 3.2) prescribes: sizes,
    then protocol and version, then the header's fields (strict JSON types; ``message_id``,
    ``arrays``, ``reply_to`` of replies and ``scan.request_id`` of ``acquire`` required; id
    limits), then the frames against ``arrays`` and the arrays each message type may carry.

    Parameters
    ----------
    frames : sequence
        The frames, without any ROUTER envelope (see :func:`split_envelope`).
    adapter : pydantic.TypeAdapter
        Which headers are acceptable (:data:`~agent.protocol.messages.COMMANDS`, ``REPLIES``,
        ``EVENTS``).
    max_message_bytes : int
        Largest message accepted, bytes.
    what : str
        The message and where it came from, for error texts.

    Returns
    -------
    Decoded
        Header and arrays.

    Raises
    ------
    MessageTooLargeError
        If the message or its header is too large.
    ProtocolVersionError
        If the header has another major version.
    FrameMismatchError
        If the frame count or a frame's byte length differs from the header.
    ProtocolError
        If the header is not valid JSON or fails validation.
    """
    if not frames:
        raise ProtocolError(f"the {what} has no frames; send at least a JSON header")
    check_size(message_bytes(frames), max_message_bytes, f"the {what}")
    data = bytes(_buffer(frames[0]))
    raw = parse_header(data, what)
    problems = wire_problems(raw)
    header: Any = None
    try:
        # Strict JSON validation: "2", true and 512.0 are not taken for numbers or integers. JSON
        # mode (unlike strict Python mode) takes JSON arrays for tuples and strings for enums.
        header = adapter.validate_json(data, strict=True)
    except ValidationError as error:
        problems.extend(_describe_problem(problem, raw.get("type")) for problem in error.errors())
    if problems:
        kind = str(raw.get("type"))[:40]
        text = "; ".join(problems)
        if len(text) > 1500:
            text = text[:1500] + " ..."
        raise ProtocolError(
            f"the header of the {what} (type {kind!r}) is refused: {text} "
            "(see docs/protocol.md for the fields of each message)"
        )
    specs: tuple[ArraySpec, ...] = header.arrays
    payload = frames[1:]
    if len(payload) != len(specs):
        raise FrameMismatchError(
            f"the {what} ({header.type}) has {len(payload)} array frame(s) after the header, but its "
            f"header declares {len(specs)}; send exactly one frame per entry of 'arrays'"
        )
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ProtocolError(f"the {what} ({header.type}) declares array names twice: {names}")
    allowed = ARRAYS_OF_TYPE.get(header.type, frozenset())
    if not set(names) <= allowed:
        carries = f"only {sorted(allowed)}" if allowed else "no array frames"
        raise FrameMismatchError(
            f"the {what} ({header.type}) declares array frame(s) {names}, but a {header.type} carries "
            f"{carries} in protocol version {PROTOCOL_VERSION}; send it without them"
        )
    arrays: dict[str, np.ndarray] = {}
    for index, (spec, frame) in enumerate(zip(specs, payload, strict=True), start=1):
        buffer = _buffer(frame)
        if buffer.nbytes != spec.nbytes:
            raise FrameMismatchError(
                f"frame {index} ({spec.name!r}) of the {what} has {buffer.nbytes:,} bytes, but its header "
                f"declares shape {list(spec.shape)} of {spec.dtype} = {spec.nbytes:,} bytes; "
                "send the array C-contiguous with the declared dtype and shape"
            )
        arrays[spec.name] = np.frombuffer(buffer, dtype=np.dtype(spec.dtype)).reshape(spec.shape)
    return Decoded(header=header, arrays=arrays)


def split_envelope(frames: Sequence[Frame]) -> tuple[list[Frame], list[Frame]]:
    """Split what a ROUTER socket received into the routing envelope and the message.

    A DEALER client's message arrives as ``[identity, header, ...]``; a REQ client adds an
    empty delimiter, ``[identity, b"", header, ...]``. A header is never empty, so the two
    are told apart without negotiation; replies go back with the same envelope.

    Parameters
    ----------
    frames : sequence
        Frames as received by the ROUTER socket.

    Returns
    -------
    envelope, message : list
        The identity (and delimiter, if any), and the message frames.
    """
    if len(frames) >= 2 and _buffer(frames[1]).nbytes == 0:
        return list(frames[:2]), list(frames[2:])
    return list(frames[:1]), list(frames[1:])


def require_libzmq(minimum: tuple[int, int, int] = MIN_LIBZMQ) -> tuple[int, int, int]:
    """Check that the libzmq under pyzmq is recent enough for the link.

    Parameters
    ----------
    minimum : tuple of int
        Oldest acceptable ``(major, minor, patch)``.

    Returns
    -------
    tuple of int
        The version found.

    Raises
    ------
    LinkError
        If libzmq is older; the message says how to get a newer one.
    """
    found = tuple(zmq.zmq_version_info())[:3]
    if found < minimum:
        raise LinkError(
            f"libzmq {'.'.join(map(str, found))} is too old for the instrument link; "
            f"{'.'.join(map(str, minimum))} or later is required (older releases drop messages "
            "under load). Upgrade pyzmq, whose wheels bundle a recent libzmq: "
            "python -m pip install -U pyzmq"
        )
    return found  # type: ignore[return-value]


def require_curve() -> None:
    """Raise :class:`~agent.errors.LinkError` if this libzmq was built without CURVE security."""
    if not zmq.has("curve"):
        raise LinkError(
            "this libzmq was built without CURVE (libsodium) support, so the link cannot be "
            "authenticated; install the pyzmq wheel from PyPI (python -m pip install -U pyzmq), "
            "which includes it"
        )


def configure_socket(
    socket: zmq.Socket[Any], *, max_message_bytes: int | None = None, heartbeat_s: float | None = None
) -> None:
    """Set the options both sides of the link use.

    Parameters
    ----------
    socket : zmq.Socket
        A new, not yet connected or bound socket.
    max_message_bytes : int, optional
        Per-frame ceiling enforced by libzmq itself (``ZMQ_MAXMSGSIZE``); a peer that sends more
        is disconnected without a reply, so set it above the limit checked by :func:`decode`.
    heartbeat_s : float, optional
        ZMTP PING interval (``ZMQ_HEARTBEAT_IVL``); a connection whose peer stays silent for
        three intervals is dropped and re-established by libzmq.
    """
    socket.setsockopt(zmq.LINGER, 0)
    if max_message_bytes is not None:
        socket.setsockopt(zmq.MAXMSGSIZE, int(max_message_bytes))
    if heartbeat_s is not None:
        interval_ms = max(1, math.ceil(heartbeat_s * 1000))
        socket.setsockopt(zmq.HEARTBEAT_IVL, interval_ms)
        socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * interval_ms)
        socket.setsockopt(zmq.HEARTBEAT_TTL, 3 * interval_ms)
