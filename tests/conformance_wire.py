"""The link as an outside instrument developer speaks it: raw pyzmq sockets and ``json``, nothing else.

Nothing here imports the project's client or framing: every frame is built and read from
``docs/protocol.md`` alone, so the conformance suite (``tests/test_conformance.py``) checks the
server against the document, not against the code that shares its bugs.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

import zmq

PROTOCOL = "micrography-link"
VERSION = 1
ID_PATTERN = re.compile(r"[\x21-\x7e]{1,128}")
"""Message ids and request ids (section 3.2): 1-128 printable ASCII characters without spaces."""

ERROR_CODES = frozenset(
    {
        "bad_message",
        "bad_frames",
        "message_too_large",
        "version_mismatch",
        "outside_stage",
        "out_of_range",
        "dose_limit",
        "scan_request",
        "aborted",
        "exposure_interrupted",
        "reply_expired",
        "shutting_down",
        "closed",
        "calibration",
        "internal",
    }
)
"""The codes of section 5."""

OK_TYPE = {
    "hello": "hello_ok",
    "describe": "describe_ok",
    "acquire": "acquire_ok",
    "abort": "abort_ok",
    "status": "status_ok",
    "bye": "bye_ok",
}
"""The reply type of each command (section 4)."""

ENVELOPE_KEYS = frozenset({"protocol", "version", "message_id", "arrays"})
REPLY_KEYS = ENVELOPE_KEYS | {"reply_to", "type"}


def new_id(prefix: str = "m") -> str:
    """A fresh id of the documented form."""
    return f"{prefix}-{uuid.uuid4().hex}"


def strict_json(data: bytes) -> Any:
    """Parse ``data`` as the strict JSON of section 3.2 (no NaN or Infinity, no duplicate keys)."""

    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result = dict(pairs)
        if len(result) != len(pairs):
            raise ValueError("duplicate key")
        return result

    def finite(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise ValueError("beyond float64")
        return value

    return json.loads(data.decode("utf-8"), parse_constant=no_constant, object_pairs_hook=unique,
                      parse_float=finite)  # fmt: skip


def header(kind: str, message_id: str | None = None, **fields: Any) -> dict[str, Any]:
    """A command header as a dict, with the envelope fields every header carries."""
    return {
        "protocol": PROTOCOL,
        "version": VERSION,
        "message_id": new_id() if message_id is None else message_id,
        "arrays": [],
        "type": kind,
        **fields,
    }


def scan(request_id: str, **overrides: Any) -> dict[str, Any]:
    """An acquire ``scan`` object: 32 x 32 px at the centre of the 30 x 30 nm test specimen."""
    values: dict[str, Any] = {
        "x_nm": 15.0,
        "y_nm": 15.0,
        "shape": [32, 32],
        "pixel_size_nm": 0.05,
        "dwell_us": 1.0,
        "detector": "HAADF",
        "request_id": request_id,
    }
    values.update(overrides)
    return values


def encode(value: dict[str, Any]) -> bytes:
    """A header frame: compact UTF-8 JSON."""
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode("utf-8")


@dataclass
class Reply:
    """One received reply: its header (strict JSON), the raw header bytes and the array frames."""

    header: dict[str, Any]
    raw: bytes
    frames: list[bytes] = field(default_factory=list)

    @property
    def type(self) -> str:
        """The reply's ``type``."""
        return self.header["type"]

    @property
    def code(self) -> str | None:
        """The error code, or None for a ``*_ok`` reply."""
        return self.header.get("code") if self.type == "error" else None


class Link:
    """A raw command connection: DEALER (the default) or REQ, speaking frames as section 3.1 says.

    Parameters
    ----------
    context : zmq.Context
        Context to make the socket in.
    endpoint : str
        The server's command endpoint.
    kind : int
        ``zmq.DEALER`` or ``zmq.REQ``.
    """

    def __init__(self, context: zmq.Context, endpoint: str, kind: int = zmq.DEALER) -> None:
        self.kind = kind
        self.socket = context.socket(kind)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)

    def send(self, frames: list[bytes]) -> None:
        """Send one multipart message (a DEALER sends exactly these frames)."""
        self.socket.send_multipart(frames)

    def recv(self, timeout_s: float = 10.0) -> Reply:
        """The next reply; fails the test if none comes within ``timeout_s``."""
        assert self.socket.poll(int(timeout_s * 1000)), f"no reply within {timeout_s} s"
        frames = self.socket.recv_multipart()
        if self.kind == zmq.DEALER and frames and frames[0] == b"":
            # A message sent with a REQ-style empty delimiter comes back behind one (section 3.1).
            frames = frames[1:]
        assert frames and frames[0], f"a reply without a header: {frames!r}"
        return Reply(header=strict_json(frames[0]), raw=frames[0], frames=frames[1:])

    def silent(self, timeout_s: float = 0.2) -> bool:
        """True if nothing more arrives within ``timeout_s`` (no second reply to one command)."""
        return not self.socket.poll(int(timeout_s * 1000))

    def ask(self, frames: list[bytes] | dict[str, Any], timeout_s: float = 10.0) -> Reply:
        """Send a command (a header dict or raw frames) and return its reply."""
        self.send([encode(frames)] if isinstance(frames, dict) else frames)
        return self.recv(timeout_s)

    def close(self) -> None:
        """Close the socket."""
        self.socket.close(linger=0)


def check_reply_envelope(reply: Reply, sent_id: str | None, *, named: bool = True) -> None:
    """What every reply must be (sections 3.2, 5): the envelope, ``reply_to``, a documented code.

    ``reply_to`` is ``sent_id`` or null, never anything else; with ``named`` (the command's header
    was readable and its id valid) it must be ``sent_id``.
    """
    header = reply.header
    assert header["protocol"] == PROTOCOL and header["version"] == VERSION, header
    assert type(header["version"]) is int
    assert isinstance(header["message_id"], str) and ID_PATTERN.fullmatch(header["message_id"]), header
    assert isinstance(header["arrays"], list), header
    assert len(reply.frames) == len(header["arrays"]), "frame count differs from the reply's arrays"
    assert "reply_to" in header, header
    assert header["reply_to"] in (sent_id, None), (header["reply_to"], sent_id)
    if named:
        assert header["reply_to"] == sent_id, (header, sent_id)
    if header["type"] == "error":
        assert header["code"] in ERROR_CODES, header
        assert isinstance(header["message"], str) and 20 < len(header["message"]) <= 4000, header
        assert "request_id" in header, header
        assert set(header) == REPLY_KEYS | {"code", "message", "request_id"}, sorted(header)
