"""A seeded generator of malformed and mutated link messages, for the bounded fuzz of the conformance suite.

Every case is a list of frames as a DEALER client would send them, made from a valid command
(``docs/protocol.md`` section 4) by one or two mutations: a field deleted, a value swapped for
junk of another type (strings for numbers, booleans, integral floats, huge numbers, unicode,
nested junk), an unknown field, another type or version, a bad id, a corrupted text (truncated,
NaN, duplicate keys, invalid UTF-8, deep nesting, an oversized header), or a wrong frame list
(surplus frames, declared arrays missing or of the wrong length, empty delimiters). About one
case in ten is left valid, a few of them retries of a recent request id, so that the server also
exposes and replays under the fuzz.
"""

from __future__ import annotations

import copy
import json
import random
from dataclasses import dataclass
from typing import Any

from tests.conformance_wire import ID_PATTERN, PROTOCOL, VERSION, encode, header, scan, strict_json

_DEEP: Any = 0
for _ in range(40):
    _DEEP = {"a": [_DEEP, None]}

JUNK: tuple[Any, ...] = (
    None,
    True,
    False,
    0,
    -1,
    1,
    2,
    512.0,
    0.5,
    -0.0,
    1e308,
    -1e308,
    2**53 + 1,
    10**30,
    -(10**30),
    "",
    "2",
    "80",
    "0.02",
    "true",
    "null",
    "x" * 300,
    "é☃🚀",
    "\u202e\u200b",
    "\x00",
    "line\nbreak",
    [],
    [1],
    [512, 512],
    [512.0, 512],
    [True, 512],
    ["512", 512],
    [0, 512],
    [1, 2, 3],
    ["a"],
    {},
    {"a": 1},
    _DEEP,
)
"""Values swapped in for fields: every JSON type, the coercions of issue 14, extremes, unicode."""

BAD_IDS: tuple[Any, ...] = ("", " ", "a b", "x" * 129, "tab\there", "new\nline", "é", "\x7f", 7, None, [])
"""Ids outside 1-128 printable ASCII characters without spaces (or not strings at all)."""

TYPES: tuple[str, ...] = ("hello", "describe", "acquire", "abort", "status", "bye")
OTHER_TYPES: tuple[Any, ...] = ("acquire_ok", "error", "heartbeat", "launch", "", "ACQUIRE", 1, None, [])


@dataclass
class Case:
    """One fuzz message.

    Parameters
    ----------
    frames : list of bytes
        What the DEALER sends.
    sent_id : str or None
        The valid message id the header carries, if a lenient JSON parse finds one: the reply's
        ``reply_to`` is this or null.
    named : bool
        True when the header is strict JSON with a valid id: ``reply_to`` must then be ``sent_id``.
    header : dict or None
        The header as sent, when it is a strict JSON object (for the schema comparison).
    header_only : bool
        True when the frames are exactly ``[header]`` and the header is under 64 KiB: the reply then
        depends on the header alone.
    note : str
        Which mutation made it, for failure messages.
    """

    frames: list[bytes]
    sent_id: str | None
    named: bool
    header: dict[str, Any] | None
    header_only: bool
    note: str


class Fuzzer:
    """Makes :class:`Case` objects from a seeded random stream.

    Parameters
    ----------
    seed : int
        Seed of the stream; the same seed makes the same cases.
    """

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.recent: list[dict[str, Any]] = []  # scans sent lately, for retries

    def new_id(self, prefix: str) -> str:
        """An id of the documented form from the seeded stream: the same seed, the same cases."""
        return f"{prefix}-{self.rng.getrandbits(96):024x}"

    def header(self, kind: str, **fields: Any) -> dict[str, Any]:
        """A valid header of ``kind`` with a seeded message id."""
        return header(kind, message_id=self.new_id("m"), **fields)

    # ------------------------------------------------------------------ valid commands

    def valid_scan(self) -> dict[str, Any]:
        """A scan inside the 30 x 30 nm stage and the instrument ranges, with a fresh id."""
        rng = self.rng
        return scan(
            self.new_id("fz"),
            x_nm=round(rng.uniform(4.0, 26.0), 3),
            y_nm=rng.choice([round(rng.uniform(4.0, 26.0), 3), rng.randint(4, 26)]),  # JSON ints too
            shape=[rng.choice([8, 16, 24]), rng.choice([8, 16, 32])],
            pixel_size_nm=rng.choice([0.02, 0.05, 0.1]),
            dwell_us=rng.choice([0.5, 1, 2.0]),
        )

    def valid_command(self) -> dict[str, Any]:
        """A valid command of any type; acquires are fresh scans or retries of a recent one."""
        rng = self.rng
        kind = rng.choice((*TYPES, "acquire"))  # a third of the valid commands expose or replay
        if kind == "acquire":
            if self.recent and rng.random() < 0.25:
                previous = copy.deepcopy(rng.choice(self.recent[-4:]))
                if rng.random() < 0.3:
                    previous["x_nm"] = round(previous["x_nm"] + 0.5, 3)  # same id, other scan
                return self.header("acquire", scan=previous)
            fresh = self.valid_scan()
            self.recent.append(copy.deepcopy(fresh))  # kept as sent, whatever the mutations do next
            return self.header("acquire", scan=fresh)
        if kind == "hello":
            return self.header("hello", client="fuzz", capabilities=["acquire"], max_message_bytes=1 << 30)
        if kind == "abort":
            return self.header("abort", request_id=rng.choice([None, self.new_id("nothing")]))
        return self.header(kind)

    # ------------------------------------------------------------------ mutations

    def _node(self, value: dict[str, Any]) -> dict[str, Any]:
        """The header itself or, for an acquire, sometimes its scan."""
        if isinstance(value.get("scan"), dict) and self.rng.random() < 0.6:
            return value["scan"]
        return value

    def _mutate_fields(self, value: dict[str, Any]) -> str:
        rng = self.rng
        node = self._node(value)
        action = rng.choice(["delete", "swap", "swap", "swap", "add", "type", "version", "id", "nested"])
        if action == "delete" and node:
            key = rng.choice(sorted(node))
            del node[key]
            return f"delete {key}"
        if action == "add":
            key = rng.choice(["extra", "Type", "messageId", "x_nm ", "é", "scan", "arrays2"])
            node[key] = rng.choice(JUNK)
            return f"add {key}"
        if action == "type":
            value["type"] = rng.choice(OTHER_TYPES + TYPES)
            return f"type {value['type']!r}"
        if action == "version":
            choice = rng.choice(["v2", "v0", "vstr", "vfloat", "vbool", "vnone", "vbig", "proto", "noproto"])
            if choice == "proto":
                value["protocol"] = rng.choice(["other", "", None, "MICROGRAPHY-LINK"])
            elif choice == "noproto":
                del value["protocol"]
            else:
                value["version"] = {"v2": 2, "v0": 0, "vstr": "1", "vfloat": 1.0, "vbool": True,
                                    "vnone": None, "vbig": 10**30}[choice]  # fmt: skip
            return choice
        if action == "id":
            if value.get("type") == "acquire" and isinstance(value.get("scan"), dict) and rng.random() < 0.5:
                value["scan"]["request_id"] = rng.choice(BAD_IDS)
                return "bad request_id"
            if value.get("type") == "abort" and rng.random() < 0.5:
                value["request_id"] = rng.choice(BAD_IDS)
                return "bad abort request_id"
            value["message_id"] = rng.choice(BAD_IDS)
            return "bad message_id"
        if action == "nested":
            key = rng.choice(["scan", "arrays", "capabilities", "client", "request_id"])
            value[key] = rng.choice(
                [
                    _DEEP,
                    [{"name": "x", "dtype": "|O", "shape": [1]}],
                    [{"name": "x", "dtype": "<f4", "shape": [2**41]}],
                    [{"name": "x", "dtype": "<f4", "shape": [1] * 9}],
                    [{"name": "", "dtype": "<f4", "shape": [1]}],
                    [[[]]],
                    {"x_nm": {"x_nm": [1, {"y": None}]}},
                ]
            )
            return f"nested {key}"
        if not node:
            return "empty node"
        key = rng.choice(sorted(node))
        node[key] = rng.choice(JUNK)
        return f"swap {key}"

    def _text(self, value: dict[str, Any]) -> tuple[bytes, str]:
        rng = self.rng
        text = encode(value)
        choice = rng.choice(["truncate", "nan", "inf", "bigexp", "bigint", "dup", "utf8", "bytes", "empty",
                             "array", "deep", "oversize", "comment", "trailing", "bom"])  # fmt: skip
        if choice == "truncate":
            return text[: rng.randrange(len(text))], choice
        if choice in ("nan", "inf", "bigexp", "bigint"):
            token = {"nan": b"NaN", "inf": b"-Infinity", "bigexp": b"1e400", "bigint": b"9" * 400}[choice]
            return text[:-1] + b',"x_nm":' + token + b"}", choice
        if choice == "dup":
            return text[:-1] + b',"type":"status"}', choice
        if choice == "utf8":
            return text[:-1] + b',"client":"\xff\xfe"}', choice
        if choice == "bytes":
            return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))), choice
        if choice == "empty":
            return b" ", choice
        if choice == "array":
            return json.dumps([value]).encode(), choice
        if choice == "deep":
            depth = rng.choice([500, 5000, 30000])
            return b'{"a":' * depth + b"1" + b"}" * depth, choice
        if choice == "oversize":
            value["client"] = "x" * (64 * 1024)
            return encode(value), choice
        if choice == "comment":
            return b"/* hi */" + text, choice
        if choice == "trailing":
            return text + b" {}", choice
        return b"\xef\xbb\xbf" + text, choice

    def _frames(self, frames: list[bytes]) -> tuple[list[bytes], str]:
        rng = self.rng
        choice = rng.choice(
            ["surplus", "many", "empty", "delimiter", "delimiters", "only-delimiter", "declared", "length"]
        )
        if choice == "only-delimiter":
            return [b""], choice
        if choice == "surplus":
            return [*frames, bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40)))], choice
        if choice == "many":
            return [*frames, *([b"\0" * 4] * rng.randrange(2, 20))], choice
        if choice == "empty":
            return [*frames, b""], choice
        if choice == "delimiter":
            return [b"", *frames], choice  # REQ-style envelope from a DEALER: a valid form
        if choice == "delimiters":
            return [b"", b"", *frames], choice
        declared = json.loads(frames[0]) if frames[0].startswith(b"{") else None
        if not isinstance(declared, dict):
            return [*frames, b"x"], "surplus"
        shape = [rng.randrange(1, 5), rng.randrange(1, 5)]
        declared["arrays"] = [{"name": "image", "dtype": "<f4", "shape": shape}]
        size = shape[0] * shape[1] * 4
        if choice == "declared":
            return [encode(declared), *([b"\0" * size] if rng.random() < 0.5 else [])], choice
        return [encode(declared), b"\0" * (size + rng.choice([-1, 1, 4]))], choice

    # ------------------------------------------------------------------ cases

    def case(self) -> Case:
        """The next case."""
        rng = self.rng
        value = self.valid_command()
        notes = []
        roll = rng.random()
        if roll < 0.12:
            notes.append("valid")
        elif roll < 0.72:
            notes.append(self._mutate_fields(value))
            if rng.random() < 0.2:
                notes.append(self._mutate_fields(value))
        frames = [encode(value)]
        if 0.72 <= roll < 0.86:
            text, note = self._text(value)
            frames, notes = [text], [note]
        if roll >= 0.86:
            if rng.random() < 0.5:
                notes.append(self._mutate_fields(value))
                frames = [encode(value)]
            frames, note = self._frames(frames)
            notes.append(note)
        return self._described(frames, notes)

    def _described(self, frames: list[bytes], notes: list[str]) -> Case:
        # After an empty first frame (a REQ-style delimiter) the server reads the next one as the header.
        body = frames[1:] if frames and frames[0] == b"" else frames
        parsed: Any = None
        lenient: Any = None
        if body and len(body[0]) <= 64 * 1024:
            try:
                parsed = strict_json(body[0])
            except (ValueError, RecursionError):
                parsed = None
            try:
                lenient = json.loads(body[0])  # NaN, 1e400, duplicates: the id may still be read
            except (ValueError, RecursionError):
                lenient = None
        readable = isinstance(parsed, dict)
        message_id = lenient.get("message_id") if isinstance(lenient, dict) else None
        valid_id = isinstance(message_id, str) and ID_PATTERN.fullmatch(message_id) is not None
        header_only = len(frames) == 1 and readable
        return Case(
            frames=frames,
            sent_id=message_id if valid_id else None,
            named=readable and valid_id,
            header=parsed if readable else None,
            header_only=header_only,
            note=" + ".join(notes),
        )


def has_integral_float(value: Any) -> bool:
    """True if ``value`` holds a float with no fraction, e.g. 512.0: a JSON Schema ``integer`` accepts it,
    the link refuses it for integer fields (the one rule the schema cannot state)."""
    if isinstance(value, float):
        return value.is_integer()
    if isinstance(value, list):
        return any(has_integral_float(item) for item in value)
    if isinstance(value, dict):
        return any(has_integral_float(item) for item in value.values())
    return False


def ends_in_newline(value: Any) -> bool:
    """True if a string in ``value`` ends in a newline: Python's ``re`` lets ``$`` match before it,
    unlike the ECMA-262 regular expressions JSON Schema specifies, so the Python validator errs."""
    if isinstance(value, str):
        return value.endswith("\n")
    if isinstance(value, list):
        return any(ends_in_newline(item) for item in value)
    if isinstance(value, dict):
        return any(ends_in_newline(item) for item in value.values())
    return False


__all__ = ["BAD_IDS", "JUNK", "PROTOCOL", "VERSION", "Case", "Fuzzer", "ends_in_newline",
           "has_integral_float"]  # fmt: skip
