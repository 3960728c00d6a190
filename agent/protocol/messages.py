"""Message headers of the Micrography instrument link, validated by pydantic.

Every ZeroMQ message of the link is a JSON header followed by zero or more raw
array frames (see :mod:`agent.protocol.framing`). This module defines the
headers: the commands an agent sends, the replies an instrument server returns,
the events it publishes, the error codes and how they map onto the typed
exceptions of :mod:`agent.errors`. ``docs/protocol.md`` is the specification
for people writing a server in another language; ``docs/protocol-schema.json``
is generated from these models by :func:`protocol_json_schema`.

Units follow the rest of Micrography: nanometres, microseconds, e-/Å², seconds.
"""

from __future__ import annotations

import copy
import math
import re
import uuid
from enum import StrEnum
from typing import Annotated, Any, Literal, get_args

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

from agent.driver import InstrumentDescription, ScanRequest
from agent.errors import (
    AcquisitionAborted,
    CalibrationError,
    DoseLimitError,
    DriverClosedError,
    ExposureInterruptedError,
    FrameMismatchError,
    LinkError,
    MessageTooLargeError,
    MicrographyError,
    OutOfRangeError,
    OutsideStageError,
    ProtocolError,
    ProtocolVersionError,
    RemoteInstrumentError,
    ReplyExpiredError,
    ScanRequestError,
)

PROTOCOL_NAME = "micrography-link"
"""Value of the ``protocol`` field of every header; anything else is not a link message."""

PROTOCOL_VERSION = 1
"""Major version. Peers with different major versions refuse each other's messages."""

CAPABILITIES: tuple[str, ...] = ("acquire", "abort", "status", "events", "heartbeat", "reply-cache")
"""What this implementation offers; exchanged in ``hello`` (see ``docs/protocol.md``)."""

ARRAY_DTYPES: frozenset[str] = frozenset(
    {"|b1", "|i1", "|u1"}
    | {f"{order}{kind}{size}" for order in "<>" for kind in "iu" for size in (2, 4, 8)}
    | {f"{order}f{size}" for order in "<>" for size in (2, 4, 8)}
    | {f"{order}c{size}" for order in "<>" for size in (8, 16)}
)
"""Array element types allowed on the wire, as numpy dtype strings with byte order.

``<`` is little-endian, ``>`` big-endian, ``|`` a one-byte type. Object, string,
structured and date types are not allowed: an array frame is always plain numbers.
"""

MAX_ARRAY_DIMENSIONS = 8
"""Most dimensions an array frame may declare."""
MAX_ID_LENGTH = 128
"""Longest ``message_id`` or request id, in characters."""
_ID_PATTERN = r"^[\x21-\x7e]+$"  # printable ASCII without spaces: safe in logs and file names

WIRE_HEADER_FIELDS: tuple[str, ...] = ("protocol", "version", "message_id", "arrays")
"""Fields every header MUST carry on the wire.

The models give ``message_id`` and ``arrays`` defaults so that a header can be built in
process without them; :func:`wire_problems` (called by :func:`agent.protocol.framing.decode`)
refuses a received header that lacks them, and :func:`protocol_json_schema` lists them as
required.
"""
WIRE_REPLY_FIELDS: tuple[str, ...] = ("reply_to",)
"""Fields every reply MUST carry on the wire besides :data:`WIRE_HEADER_FIELDS` (``null`` allowed)."""


def new_message_id() -> str:
    """A fresh random message id (32 hexadecimal digits)."""
    return uuid.uuid4().hex


class ErrorCode(StrEnum):
    """Machine-readable reason of an ``error`` reply; the ``message`` says it for a person."""

    BAD_MESSAGE = "bad_message"
    """The header is not UTF-8 JSON, not an object, or fails validation (unknown type, field)."""
    BAD_FRAMES = "bad_frames"
    """The number of frames or the byte length of a frame differs from the header."""
    MESSAGE_TOO_LARGE = "message_too_large"
    """The message is larger than the receiver's ``max_message_bytes``."""
    VERSION_MISMATCH = "version_mismatch"
    """The header's ``version`` is not the receiver's major version."""
    OUTSIDE_STAGE = "outside_stage"
    """The field of view leaves the stage; nothing was exposed."""
    OUT_OF_RANGE = "out_of_range"
    """Pixel size, dwell, shape or detector outside the instrument range; nothing was exposed."""
    DOSE_LIMIT = "dose_limit"
    """The scan would exceed the per-area dose limit; nothing was exposed."""
    SCAN_REQUEST = "scan_request"
    """Any other refused scan (for example a request id reused for a different scan)."""
    ABORTED = "aborted"
    """The acquisition was stopped by an ``abort`` command."""
    EXPOSURE_INTERRUPTED = "exposure_interrupted"
    """The server restarted while exposing this request id; the id is spent, dose may be delivered."""
    REPLY_EXPIRED = "reply_expired"
    """The request id was exposed long ago and its tile is no longer kept; it is not exposed again."""
    SHUTTING_DOWN = "shutting_down"
    """The server is stopping; nothing was exposed; retry once it is back."""
    CLOSED = "closed"
    """The instrument driver behind the server is closed."""
    CALIBRATION = "calibration"
    """The instrument scanned other than commanded (scale, centre, rotation); tile withheld, dose given."""
    INTERNAL = "internal"
    """The server or the instrument failed in a way it did not anticipate."""


class ArraySpec(BaseModel):
    """Describes one raw array frame that follows the header.

    Parameters
    ----------
    name : str
        What the array is, for example ``"image"``; 1-64 characters, unique within a message.
    dtype : str
        Element type as a numpy dtype string with byte order, one of :data:`ARRAY_DTYPES`
        (``"<f4"``: little-endian float32).
    shape : tuple of int
        Array shape, C (row-major) order; ``[rows, cols]`` for an image. At most
        :data:`MAX_ARRAY_DIMENSIONS` dimensions, each 0 to 2**40.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64)
    dtype: str = Field(json_schema_extra={"enum": sorted(ARRAY_DTYPES)})
    shape: tuple[Annotated[int, Field(ge=0, le=2**40)], ...] = Field(max_length=MAX_ARRAY_DIMENSIONS)

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        if value not in ARRAY_DTYPES:
            raise ValueError(
                f"dtype {value!r} is not allowed on the wire; use a numpy dtype string with byte "
                "order such as '<f4' (little-endian float32); plain numbers only"
            )
        return value

    @property
    def nbytes(self) -> int:
        """Exact byte length the frame must have."""
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    @classmethod
    def of(cls, name: str, array: np.ndarray) -> ArraySpec:
        """The spec of ``array`` as it will be sent (its own byte order)."""
        return cls(name=name, dtype=array.dtype.str, shape=tuple(int(n) for n in array.shape))


class _Header(BaseModel):
    """Fields every header carries.

    ``message_id`` and ``arrays`` have defaults for building headers in process; on the wire
    they are required (:data:`WIRE_HEADER_FIELDS`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    protocol: Literal["micrography-link"] = PROTOCOL_NAME
    version: int = PROTOCOL_VERSION
    message_id: str = Field(
        default_factory=new_message_id, min_length=1, max_length=MAX_ID_LENGTH, pattern=_ID_PATTERN
    )
    arrays: tuple[ArraySpec, ...] = ()


# --------------------------------------------------------------------------- commands


class HelloCommand(_Header):
    """Open a conversation: announce the client and negotiate version, capabilities and limits.

    Parameters
    ----------
    client : str
        Free client name for the server log.
    capabilities : tuple of str
        What the client understands (see :data:`CAPABILITIES`).
    max_message_bytes : int
        Largest message the client accepts, in bytes; the server never needs to send more
        than the largest tile plus its header.
    """

    type: Literal["hello"] = "hello"
    client: str = Field("micrography", max_length=200)
    capabilities: tuple[str, ...] = ()
    max_message_bytes: int = Field(gt=0)


class DescribeCommand(_Header):
    """Ask for the instrument description (stage, pixel sizes, dwell range, detectors)."""

    type: Literal["describe"] = "describe"


class AcquireCommand(_Header):
    """Expose one scan. Idempotent: the same ``scan.request_id`` never exposes twice.

    Parameters
    ----------
    scan : ScanRequest
        The scan; its ``request_id`` is the idempotency key. On the wire ``scan.request_id``
        is required and must be a valid id (:func:`is_valid_id`); in process
        :class:`~agent.driver.ScanRequest` makes one up when it is not given.
    """

    type: Literal["acquire"] = "acquire"
    scan: ScanRequest


class AbortCommand(_Header):
    """Stop the acquisition in progress and cancel queued ones.

    Parameters
    ----------
    request_id : str or None
        Only stop this request (on the wire a valid id, :func:`is_valid_id`); None stops
        whatever is running or queued.
    """

    type: Literal["abort"] = "abort"
    request_id: str | None = None


class StatusCommand(_Header):
    """Ask for the server state and its dose accounting."""

    type: Literal["status"] = "status"


class ByeCommand(_Header):
    """The client is leaving (for the server log; the server keeps no session state)."""

    type: Literal["bye"] = "bye"


Command = Annotated[
    HelloCommand | DescribeCommand | AcquireCommand | AbortCommand | StatusCommand | ByeCommand,
    Field(discriminator="type"),
]
"""Any command header, told apart by ``type``."""

# --------------------------------------------------------------------------- replies


class _Reply(_Header):
    reply_to: str | None = Field(None, max_length=MAX_ID_LENGTH)
    """``message_id`` of the command answered; None only when that id could not be read.

    Required on the wire (:data:`WIRE_REPLY_FIELDS`), ``null`` allowed.
    """


class HelloReply(_Reply):
    """What the server speaks and where its events are published.

    Parameters
    ----------
    server : str
        Server software name and version.
    instrument : str
        Instrument name.
    capabilities : tuple of str
        What the server offers.
    max_message_bytes : int
        Largest message the server accepts, in bytes.
    heartbeat_s : float or None
        Interval of ``heartbeat`` events, in seconds; None if the server publishes none.
    events_endpoint : str or None
        ZeroMQ endpoint of the PUB socket; a wildcard host means "the host you connected to".
    """

    type: Literal["hello_ok"] = "hello_ok"
    server: str
    instrument: str
    capabilities: tuple[str, ...] = ()
    max_message_bytes: int = Field(gt=0)
    heartbeat_s: float | None = Field(None, gt=0)
    events_endpoint: str | None = None


class DescribeReply(_Reply):
    """The instrument description."""

    type: Literal["describe_ok"] = "describe_ok"
    instrument: InstrumentDescription


class TileInfo(BaseModel):
    """Everything of a :class:`~agent.driver.Tile` except its image and request.

    Parameters
    ----------
    request_id : str
        Id of the scan that produced the tile.
    origin_nm : tuple of float
        Stage position ``(x, y)`` of the centre of pixel ``(0, 0)``, nanometres.
    pixel_size_nm : float
        Pixel size, nanometres.
    dose_e_per_a2 : float
        Dose of the scan, e-/Å².
    t_start, t_end : float
        Scan start and end on the instrument clock, seconds since the epoch.
    metadata : dict
        Free instrument metadata, JSON values.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    request_id: str
    origin_nm: tuple[float, float]
    pixel_size_nm: float = Field(gt=0)
    dose_e_per_a2: float = Field(ge=0)
    t_start: float
    t_end: float
    metadata: dict[str, Any] = {}


class AcquireReply(_Reply):
    """One tile: the header carries its placement, the single array frame ``image`` its pixels.

    Parameters
    ----------
    tile : TileInfo
        Placement, dose, times and metadata.
    replayed : bool
        True if the reply was answered from the reply cache or journal without exposing.
    """

    type: Literal["acquire_ok"] = "acquire_ok"
    tile: TileInfo
    replayed: bool = False


class AbortReply(_Reply):
    """Which acquisitions were stopped or cancelled (empty if nothing was running)."""

    type: Literal["abort_ok"] = "abort_ok"
    aborted: tuple[str, ...] = ()


InstrumentState = Literal["idle", "acquiring", "closing"]


class StatusReply(_Reply):
    """Server state and its dose accounting.

    Parameters
    ----------
    state : {"idle", "acquiring", "closing"}
        What the server is doing.
    request_id : str or None
        Request being exposed, if any.
    queued : int
        Acquisitions waiting behind it.
    exposures : int
        Exposures executed by this server (with a journal: over all restarts), interrupted
        ones included.
    interrupted_exposures : int
        Exposures cut short by a restart (counted in ``exposures``, dose counted in full).
    total_dose_e_per_a2 : float
        Sum of the doses of those exposures, e-/Å² (each counted once, whatever its area).
    journal : str or None
        Where the exposure journal lives on the server; None if it keeps none.
    uptime_s : float
        Seconds since this server process started serving.
    """

    type: Literal["status_ok"] = "status_ok"
    state: InstrumentState
    request_id: str | None = None
    queued: int = Field(0, ge=0)
    exposures: int = Field(ge=0)
    interrupted_exposures: int = Field(0, ge=0)
    total_dose_e_per_a2: float = Field(ge=0)
    journal: str | None = None
    uptime_s: float = Field(ge=0)


class ByeReply(_Reply):
    """Acknowledges ``bye``."""

    type: Literal["bye_ok"] = "bye_ok"


class ErrorReply(_Reply):
    """A refused or failed command.

    Parameters
    ----------
    code : ErrorCode
        Machine-readable reason.
    message : str
        What went wrong, the offending value and what to do, for a person.
    request_id : str or None
        The scan concerned, for ``acquire``.
    """

    type: Literal["error"] = "error"
    code: ErrorCode
    message: str = Field(max_length=4000)
    request_id: str | None = None


Reply = Annotated[
    HelloReply | DescribeReply | AcquireReply | AbortReply | StatusReply | ByeReply | ErrorReply,
    Field(discriminator="type"),
]
"""Any reply header, told apart by ``type``."""

# --------------------------------------------------------------------------- events


class _Event(_Header):
    seq: int = Field(ge=0)
    """Per-server event counter; a gap means events were missed (PUB/SUB drops when slow)."""
    t_s: float
    """Server wall-clock time, seconds since the epoch."""


class HeartbeatEvent(_Event):
    """Published every ``heartbeat_s``: the server is alive."""

    type: Literal["heartbeat"] = "heartbeat"
    state: InstrumentState


class StateEvent(_Event):
    """The server changed state (started or finished an exposure, is closing)."""

    type: Literal["state"] = "state"
    state: InstrumentState
    request_id: str | None = None
    exposures: int = Field(ge=0)


class TileReadyEvent(_Event):
    """A tile was exposed; the pixels travel in the ``acquire_ok`` reply, not here."""

    type: Literal["tile_ready"] = "tile_ready"
    request_id: str
    shape: tuple[int, int]
    dose_e_per_a2: float = Field(ge=0)
    t_end: float


class DoseWarningEvent(_Event):
    """Part of the specimen is near (or would pass) the per-area dose limit.

    Parameters
    ----------
    message : str
        For a person.
    max_dose_e_per_a2 : float
        Highest accumulated dose on the dose map, e-/Å².
    limit_e_per_a2 : float
        The instrument's per-area limit, e-/Å².
    x_nm, y_nm : float
        Stage position of that highest dose, nanometres.
    request_id : str or None
        The scan that triggered the warning.
    """

    type: Literal["dose_warning"] = "dose_warning"
    message: str
    max_dose_e_per_a2: float
    limit_e_per_a2: float
    x_nm: float
    y_nm: float
    request_id: str | None = None


Event = Annotated[
    HeartbeatEvent | StateEvent | TileReadyEvent | DoseWarningEvent, Field(discriminator="type")
]
"""Any event header, told apart by ``type``."""

COMMANDS: TypeAdapter[Any] = TypeAdapter(Command)
"""Validates a command header (a ``dict`` parsed from JSON)."""
REPLIES: TypeAdapter[Any] = TypeAdapter(Reply)
"""Validates a reply header."""
EVENTS: TypeAdapter[Any] = TypeAdapter(Event)
"""Validates an event header."""


def _types_of(union: Any) -> frozenset[str]:
    members = get_args(get_args(union)[0])
    return frozenset(member.model_fields["type"].default for member in members)


COMMAND_TYPES: frozenset[str] = _types_of(Command)
"""The ``type`` of every command."""
REPLY_TYPES: frozenset[str] = _types_of(Reply)
"""The ``type`` of every reply."""
EVENT_TYPES: frozenset[str] = _types_of(Event)
"""The ``type`` of every event."""

ARRAYS_OF_TYPE: dict[str, frozenset[str]] = {"acquire_ok": frozenset({"image"})}
"""The array frames each message type may carry in this version; every other type carries none."""


def request_id_problem(where: str, value: Any) -> str | None:
    """Why ``value`` cannot be a request id, or None if it can (or is not a string).

    Parameters
    ----------
    where : str
        Where the value was found, for the message (``"scan.request_id"``).
    value : object
        The value.

    Returns
    -------
    str or None
        A one-line problem naming the limits (1-128 printable ASCII characters, no spaces).
    """
    if isinstance(value, str) and not is_valid_id(value):
        shown = value if len(value) <= 40 else value[:40] + "..."
        return (
            f"{where} {shown!r} ({len(value)} characters) is not a valid request id: use 1-{MAX_ID_LENGTH} "
            "printable ASCII characters without spaces"
        )
    return None  # a value that is not a string is reported by the model's own validation


def wire_problems(raw: dict[str, Any]) -> list[str]:
    """What a received header lacks that the wire requires beyond its model's field types.

    The models keep defaults for building headers in process (a fresh ``message_id``,
    ``arrays = []``, a made-up ``scan.request_id``); on the wire those fields are required,
    because a default made up by the receiver would let a reply name an id the sender never
    sent, or a resent acquire be exposed twice. Request ids (``scan.request_id``, and
    ``request_id`` of ``abort``) have the same limits as message ids.

    Parameters
    ----------
    raw : dict
        The parsed JSON header, protocol and version already checked.

    Returns
    -------
    list of str
        One sentence per problem, empty when there is none. Field types and unknown fields are
        left to the models' validation.
    """
    problems = []
    kind = raw.get("type")
    is_reply = isinstance(kind, str) and kind in REPLY_TYPES  # an unhashable "type" is the model's to refuse
    required = WIRE_HEADER_FIELDS + (WIRE_REPLY_FIELDS if is_reply else ())
    missing = [name for name in required if name not in raw]
    if missing:
        problems.append(
            f"missing field(s) {', '.join(missing)}: every header carries protocol, version, message_id "
            "and arrays ([] when no array frame follows), and every reply reply_to"
        )
    if kind == "acquire":
        scan = raw.get("scan")
        if isinstance(scan, dict):
            if "request_id" not in scan:
                problems.append(
                    "scan.request_id is missing: every acquire names its scan with a request id, so that a "
                    "resend is recognised and never exposed twice"
                )
            else:
                problems.append(request_id_problem("scan.request_id", scan["request_id"]) or "")
    elif kind == "abort":
        problems.append(request_id_problem("request_id", raw.get("request_id")) or "")
    return [problem for problem in problems if problem]


# --------------------------------------------------------------------------- errors

# Most specific first: the first matching class decides the code.
_CODE_OF_ERROR: tuple[tuple[type[BaseException], ErrorCode], ...] = (
    (OutsideStageError, ErrorCode.OUTSIDE_STAGE),
    (OutOfRangeError, ErrorCode.OUT_OF_RANGE),
    (DoseLimitError, ErrorCode.DOSE_LIMIT),
    (ScanRequestError, ErrorCode.SCAN_REQUEST),
    (AcquisitionAborted, ErrorCode.ABORTED),
    (DriverClosedError, ErrorCode.CLOSED),
    (CalibrationError, ErrorCode.CALIBRATION),
    (ExposureInterruptedError, ErrorCode.EXPOSURE_INTERRUPTED),
    (ReplyExpiredError, ErrorCode.REPLY_EXPIRED),
    (MessageTooLargeError, ErrorCode.MESSAGE_TOO_LARGE),
    (ProtocolVersionError, ErrorCode.VERSION_MISMATCH),
    (FrameMismatchError, ErrorCode.BAD_FRAMES),
    (ProtocolError, ErrorCode.BAD_MESSAGE),
)

ERROR_OF_CODE: dict[ErrorCode, type[MicrographyError]] = {
    ErrorCode.BAD_MESSAGE: ProtocolError,
    ErrorCode.BAD_FRAMES: FrameMismatchError,
    ErrorCode.MESSAGE_TOO_LARGE: MessageTooLargeError,
    ErrorCode.VERSION_MISMATCH: ProtocolVersionError,
    ErrorCode.OUTSIDE_STAGE: OutsideStageError,
    ErrorCode.OUT_OF_RANGE: OutOfRangeError,
    ErrorCode.DOSE_LIMIT: DoseLimitError,
    ErrorCode.SCAN_REQUEST: ScanRequestError,
    ErrorCode.ABORTED: AcquisitionAborted,
    ErrorCode.EXPOSURE_INTERRUPTED: ExposureInterruptedError,
    ErrorCode.REPLY_EXPIRED: ReplyExpiredError,
    ErrorCode.SHUTTING_DOWN: LinkError,
    ErrorCode.CLOSED: DriverClosedError,
    ErrorCode.CALIBRATION: CalibrationError,
    ErrorCode.INTERNAL: RemoteInstrumentError,
}
"""The exception a client raises for each error code; driver errors keep their in-process class."""


def error_code_for(error: BaseException) -> ErrorCode:
    """The error code that reports ``error`` on the wire.

    Parameters
    ----------
    error : BaseException
        An exception raised while serving a command.

    Returns
    -------
    ErrorCode
        The most specific matching code; :attr:`ErrorCode.INTERNAL` for anything unexpected.
    """
    for error_class, code in _CODE_OF_ERROR:
        if isinstance(error, error_class):
            return code
    return ErrorCode.INTERNAL


def error_reply(error: BaseException, reply_to: str | None, request_id: str | None = None) -> ErrorReply:
    """Build the ``error`` reply for an exception raised while serving a command.

    Parameters
    ----------
    error : BaseException
        What went wrong.
    reply_to : str or None
        ``message_id`` of the command, if it could be read.
    request_id : str or None
        The scan concerned, for ``acquire``.

    Returns
    -------
    ErrorReply
        With the code of :func:`error_code_for`; unexpected exceptions name their type so a
        person can search the server log.
    """
    code = error_code_for(error)
    message = str(error) or type(error).__name__
    if code is ErrorCode.INTERNAL:
        message = (
            f"the instrument server failed: {type(error).__name__}: {message}; "
            "see the server log, and report it if it persists"
        )
    return ErrorReply(code=code, message=message[:4000], reply_to=reply_to, request_id=request_id)


def jsonable(value: Any) -> Any:
    """Turn tile metadata into plain JSON values (numpy scalars and arrays become numbers and lists).

    Parameters
    ----------
    value : Any
        A metadata value; dicts, lists and tuples are converted recursively.

    Returns
    -------
    Any
        A value ``json.dumps`` accepts; anything unknown becomes its ``str``.
    """
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        # JSON has no NaN or infinity; null keeps the key and says "no number".
        return value if math.isfinite(value) else None
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, dict):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(item) for item in value]
    return str(value)


SCHEMA_COMMENT = (
    "Headers as received on the wire. Stricter than JSON Schema alone can say: a number field "
    "takes a JSON number only (never a string or a boolean); an integer field takes an integer "
    "token only (512, not 512.0 or 5.12e2, although JSON Schema counts 512.0 as an integer); "
    "NaN, Infinity, numbers beyond the float64 range and duplicate keys are refused; protocol "
    "and version are checked before anything else. See docs/protocol.md."
)
"""The ``$comment`` of :func:`protocol_json_schema`: the rules a JSON Schema validator does not apply."""

_ID_SCHEMA: dict[str, Any] = {"minLength": 1, "maxLength": MAX_ID_LENGTH, "pattern": _ID_PATTERN}


def _wire_schema(family: dict[str, Any], *, reply: bool) -> dict[str, Any]:
    """Make a family's generated schema say what decoding requires (fields the models default)."""
    family = copy.deepcopy(family)
    definitions = family.get("$defs", {})
    # ``type`` has a default in the models, but the discriminated union needs it on the wire.
    required = (*WIRE_HEADER_FIELDS[:2], "type", *WIRE_HEADER_FIELDS[2:])
    required += WIRE_REPLY_FIELDS if reply else ()
    for definition in definitions.values():
        properties = definition.get("properties", {})
        if "protocol" not in properties:
            continue  # not a header (ArraySpec, ScanRequest, TileInfo, ...)
        for name in required:
            properties[name].pop("default", None)
        properties["version"]["const"] = PROTOCOL_VERSION  # another one is version_mismatch
        allowed = sorted(ARRAYS_OF_TYPE.get(properties["type"]["const"], ()))
        properties["arrays"]["maxItems"] = len(allowed)  # decode answers others with bad_frames
        if allowed:
            properties["arrays"]["items"] = {
                "allOf": [{"$ref": "#/$defs/ArraySpec"}, {"properties": {"name": {"enum": allowed}}}]
            }
        others = [name for name in definition.get("required", []) if name not in required]
        definition["required"] = [*required, *others]
        if definition.get("title") == "AbortCommand":
            for branch in properties["request_id"]["anyOf"]:
                if branch.get("type") == "string":
                    branch.update(_ID_SCHEMA)
    scan = definitions.get("ScanRequest")
    if scan is not None:
        scan["properties"]["request_id"].pop("default", None)
        scan["properties"]["request_id"].update(_ID_SCHEMA)
        scan["required"] = [*scan.get("required", []), "request_id"]
        for item in scan["properties"]["shape"]["prefixItems"]:
            item["minimum"] = 1  # ScanRequest's own validator: at least 1 x 1 pixels
    return family


def protocol_json_schema() -> dict[str, Any]:
    """JSON Schema of every header, for implementers of the protocol in other languages.

    The schemas are those of the models, made to say what decoding from the wire requires:
    ``protocol``, ``version``, ``message_id`` and ``arrays`` in every header, ``reply_to`` in
    every reply, ``scan.request_id`` in ``acquire``, and the limits of request ids. The rules a
    JSON Schema cannot express (integers without a fraction, no duplicate keys) are stated in
    its ``$comment`` and in ``docs/protocol.md``.

    Returns
    -------
    dict
        ``{"$comment", "protocol", "version", "commands", "replies", "events"}``, each family a
        JSON Schema of its discriminated union. ``docs/protocol-schema.json`` is this, written
        with ``json.dumps(..., indent=2)`` and a final newline.
    """
    return {
        "$comment": SCHEMA_COMMENT,
        "protocol": PROTOCOL_NAME,
        "version": PROTOCOL_VERSION,
        "commands": _wire_schema(COMMANDS.json_schema(), reply=False),
        "replies": _wire_schema(REPLIES.json_schema(), reply=True),
        "events": _wire_schema(EVENTS.json_schema(), reply=False),
    }


def is_valid_id(value: str) -> bool:
    """True if ``value`` can be a message id or request id (1-128 printable ASCII characters, no spaces)."""
    return 0 < len(value) <= MAX_ID_LENGTH and re.fullmatch(_ID_PATTERN, value) is not None
