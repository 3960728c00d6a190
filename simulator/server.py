"""The instrument side of the link: :class:`InstrumentServer` serves any driver over ZeroMQ.

``micrography serve`` wraps the simulated or the replay microscope in an
:class:`InstrumentServer`; a vendor's control software can do the same with a
driver for its scan engine (or implement ``docs/protocol.md`` directly, see
``docs/examples/minimal_server.py``).

Threads and sockets: one loop thread owns every socket (a ROUTER for commands,
a PUB for events) and never blocks on the instrument; one worker thread runs the
driver's ``acquire``, so ``abort``, ``status`` and heartbeats are answered while
a scan is in progress. The worker hands results back through an in-process
ZeroMQ pipe. Acquisitions run one at a time, in arrival order.

Exactly-once exposure: a retried request id is answered from the
:class:`~simulator.exposure_journal.ExposureJournal` (and while it is still being exposed,
by attaching the retry to the exposure in progress); with a journal folder this
holds across restarts of the server process. See :mod:`simulator.exposure_journal`.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import logging
import numbers
import queue
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import numpy as np
import zmq
from pydantic import BaseModel

from agent import __version__
from agent.driver import DoseMap, MicroscopeDriver, ScanRequest, Tile
from agent.errors import (
    AcquisitionAborted,
    ConfigError,
    DoseLimitError,
    DriverClosedError,
    FrameMismatchError,
    LinkError,
    MicrographyError,
    ProtocolError,
    ReplyExpiredError,
    ScanRequestError,
)
from agent.protocol.framing import (
    DEFAULT_SERVER_MAX_MESSAGE_BYTES,
    MAX_HEADER_BYTES,
    configure_socket,
    decode,
    encode,
    require_curve,
    require_libzmq,
    split_envelope,
)
from agent.protocol.messages import (
    CAPABILITIES,
    COMMANDS,
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
    ErrorReply,
    HeartbeatEvent,
    HelloCommand,
    HelloReply,
    StateEvent,
    StatusCommand,
    StatusReply,
    TileInfo,
    TileReadyEvent,
    error_reply,
    is_valid_id,
    jsonable,
)
from agent.protocol.security import CurveServerKeys, start_authenticator
from simulator.exposure_journal import (
    DEFAULT_MEMORY_BUDGET_BYTES,
    DEFAULT_TILE_BUDGET_BYTES,
    ExposureJournal,
)

DEFAULT_BIND = "tcp://127.0.0.1:5555"
"""Loopback only: without CURVE nobody else on the network may reach the instrument."""

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_control(text: str) -> str:
    r"""``text`` with every control character (newline, carriage return, escape, ...) written as an escape.

    Parameters
    ----------
    text : str
        Any string, for example one a client sent.

    Returns
    -------
    str
        The same text on one line: the two characters ``\n`` for a newline; printable text is unchanged.
    """
    return _CONTROL.sub(lambda match: match.group().encode("unicode_escape").decode("ascii"), text)


class EscapingFilter(logging.Filter):
    """Escape control characters in the arguments of log records, so no client can forge a log line.

    Strings that came off the wire (client names, request ids, error texts quoting them) may hold
    newlines; ``%s`` would write them as they are. Each argument is turned into its text and
    escaped with :func:`escape_control` before formatting; the format string itself is the server's.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Escape the record's arguments in place; always lets the record through."""
        if isinstance(record.args, tuple):
            record.args = tuple(_escaped(argument) for argument in record.args)
        elif isinstance(record.args, dict):
            record.args = {key: _escaped(value) for key, value in record.args.items()}
        if isinstance(record.msg, str) and not record.args:
            record.msg = escape_control(record.msg)
        return True


def _escaped(argument: Any) -> Any:
    if isinstance(argument, numbers.Number | None):
        return argument  # keeps %d and %.2f working
    return escape_control(argument if isinstance(argument, str) else str(argument))


_POLL_CAP_S = 0.1  # longest the loop sleeps before it looks at the stop flag
_TCP = re.compile(r"^tcp://(?P<host>\[[^\]]*\]|[^:/]*):(?P<port>[^/]+)$")


def is_loopback(endpoint: str) -> bool:
    """True if ``endpoint`` is reachable from this machine only (loopback TCP, ipc, inproc).

    Parameters
    ----------
    endpoint : str
        A ZeroMQ bind endpoint.

    Returns
    -------
    bool
        False for wildcard, named-interface and non-loopback addresses.
    """
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    match = _TCP.match(endpoint)
    if not match:
        return False
    host = match.group("host").strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_safe_bind(bind: str, events_bind: str | None, curve: bool, allow_insecure: bool) -> None:
    """Refuse to listen beyond this machine without authentication.

    Parameters
    ----------
    bind, events_bind : str
        Command and event endpoints (``events_bind`` may be ``"auto"`` or None).
    curve : bool
        Whether CURVE authentication is on.
    allow_insecure : bool
        The operator's explicit permission (``--insecure``).

    Raises
    ------
    ConfigError
        If an endpoint is not loopback while CURVE is off and no permission was given.
    """
    if curve or allow_insecure:
        return
    for endpoint in (bind, events_bind):
        if endpoint not in (None, "auto") and not is_loopback(endpoint):
            raise ConfigError(
                f"binding {endpoint} without CURVE would let anyone who can reach this machine "
                "expose the specimen; give --curve-secret-key and --allowed-clients, bind "
                "tcp://127.0.0.1:PORT, or pass --insecure on an isolated instrument network"
            )


def instrument_fingerprint(driver: MicroscopeDriver) -> dict[str, Any]:
    """What identifies the instrument behind a journal: its description and configuration.

    The driver's class is left out on purpose: an upgraded driver for the same instrument
    and specimen must resume the journal, not start a blank one.

    Parameters
    ----------
    driver : MicroscopeDriver
        The driver served.

    Returns
    -------
    dict
        JSON values; a pydantic ``config`` attribute (the simulator's) is included, so a journal
        of seed 0 is not resumed by a server simulating seed 1.
    """
    fingerprint: dict[str, Any] = {"instrument": driver.describe().model_dump(mode="json")}
    config = getattr(driver, "config", None)
    if isinstance(config, BaseModel):
        fingerprint["config"] = config.model_dump(mode="json")
    return fingerprint


def instrument_digest(driver: MicroscopeDriver) -> str:
    """Short hash of :func:`instrument_fingerprint`, naming one journal folder per instrument and config.

    A restarted server of the same instrument finds its journal again; a differently
    configured one starts its own.

    Parameters
    ----------
    driver : MicroscopeDriver
        The driver served.

    Returns
    -------
    str
        12 hexadecimal digits.
    """
    encoded = json.dumps(instrument_fingerprint(driver), sort_keys=True).encode()
    return hashlib.sha256(encoded).hexdigest()[:12]


@dataclass
class _Pending:
    """An acquisition queued or running, and every (envelope, message id) waiting for it."""

    scan: ScanRequest
    waiters: list[tuple[list[Any], str]] = field(default_factory=list)
    cancelled: bool = False
    stop: threading.Event = field(default_factory=threading.Event)  # this acquisition's abort flag
    received_s: float = field(default_factory=time.perf_counter)


class InstrumentServer:
    """Serve a :class:`~agent.driver.MicroscopeDriver` over the Micrography link.

    Parameters
    ----------
    driver : MicroscopeDriver
        The instrument; the server does not close it.
    bind : str
        Command endpoint (ROUTER), ``tcp://127.0.0.1:5555`` by default; ``tcp://127.0.0.1:*``
        takes a free port (read it back from :attr:`endpoint`).
    events_bind : str or None
        Event endpoint (PUB). ``"auto"``: same host, command port + 1 (a free port when the
        command port is ``*``); None publishes no events and no heartbeats.
    curve : CurveServerKeys, optional
        Turn on CURVE: only clients with a listed public key get in, traffic is encrypted.
    journal : str or pathlib.Path, optional
        Folder of the exposure journal; with it, retried request ids are answered across
        restarts of the server. Without it, only within this process.
    tile_budget_bytes : int
        Bytes of tiles kept on disk in the journal folder for answering retries (8 GiB by
        default); the oldest are deleted beyond it, their ids stay known (``reply_expired``).
    memory_budget_bytes : int
        Bytes of recent tiles kept in memory (512 MiB by default); without a journal folder this
        is all the retention there is.
    heartbeat_s : float
        Interval of heartbeat events, seconds.
    max_message_bytes : int
        Largest command accepted, bytes; larger ones are answered ``message_too_large``.
    dose_warning_fraction : float
        Publish a dose warning when any area reaches this fraction of the per-area limit.
    allow_insecure : bool
        Permit a non-loopback bind without CURVE (an isolated instrument network only).
    logger : logging.Logger, optional
        Where every command is logged (``micrography.server`` by default).
    context : zmq.Context, optional
        ZeroMQ context; by default the server owns one.

    Raises
    ------
    ConfigError
        For a non-loopback bind without CURVE, or an unusable journal.
    LinkError
        If libzmq is too old or lacks CURVE when asked for it.

    Examples
    --------
    Not run as a test (it binds a TCP port)::

        from simulator.drivers import SimulatedMicroscope
        with SimulatedMicroscope() as microscope, InstrumentServer(microscope) as server:
            print(server.endpoint)
        # tcp://127.0.0.1:5555
    """

    def __init__(
        self,
        driver: MicroscopeDriver,
        bind: str = DEFAULT_BIND,
        *,
        events_bind: str | None = "auto",
        curve: CurveServerKeys | None = None,
        journal: str | Path | None = None,
        tile_budget_bytes: int = DEFAULT_TILE_BUDGET_BYTES,
        memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
        heartbeat_s: float = 1.0,
        max_message_bytes: int = DEFAULT_SERVER_MAX_MESSAGE_BYTES,
        dose_warning_fraction: float = 0.8,
        allow_insecure: bool = False,
        logger: logging.Logger | None = None,
        context: zmq.Context[Any] | None = None,
    ) -> None:
        require_libzmq()
        if curve is not None:
            require_curve()
        require_safe_bind(bind, events_bind, curve is not None, allow_insecure)
        if not heartbeat_s > 0:
            raise ConfigError(f"heartbeat must be a positive number of seconds, got {heartbeat_s}")
        if max_message_bytes < MAX_HEADER_BYTES:
            raise ConfigError(
                f"max_message_bytes must be at least {MAX_HEADER_BYTES} (one header), got {max_message_bytes}"
            )
        self.driver = driver
        self.bind = bind
        self.events_bind = events_bind
        self.curve = curve
        self.heartbeat_s = float(heartbeat_s)
        self.max_message_bytes = int(max_message_bytes)
        self.dose_warning_fraction = float(dose_warning_fraction)
        self.log = logger or logging.getLogger("micrography.server")
        if not any(isinstance(existing, EscapingFilter) for existing in self.log.filters):
            self.log.addFilter(EscapingFilter())
        self.journal = ExposureJournal(
            journal,
            instrument_fingerprint(driver),
            tile_budget_bytes=tile_budget_bytes,
            memory_budget_bytes=memory_budget_bytes,
            logger=self.log,
        )
        self._restore_dose_map()
        self._own_context = context is None
        self._context: zmq.Context[Any] = context if context is not None else zmq.Context()
        self.endpoint: str | None = None
        """The bound command endpoint (with the real port), once started."""
        self.events_endpoint: str | None = None
        """The bound event endpoint, once started; None without events."""
        self._thread: threading.Thread | None = None
        self._worker: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._startup_error: BaseException | None = None
        self._work: queue.SimpleQueue[ScanRequest | None] = queue.SimpleQueue()
        self._results: queue.SimpleQueue[tuple[ScanRequest, Tile | BaseException]] = queue.SimpleQueue()
        self._in_flight: dict[str, _Pending] = {}
        self._current: str | None = None
        # The worker wakes the loop through an OS socket pair, not a ZeroMQ socket, so a driver
        # that hangs in acquire can never keep the ZeroMQ context from terminating.
        self._wake_loop, self._wake_worker = socket.socketpair()
        self._wake_loop.setblocking(False)
        self._claim = threading.Lock()  # orders "worker starts a scan" against "loop cancels it"
        self._seq = 0
        self._started_s = time.monotonic()
        self._authenticator: Any = None
        self._router: zmq.Socket[Any] | None = None
        self._pub: zmq.Socket[Any] | None = None
        self._grace_s = 10.0

    # ------------------------------------------------------------------ life cycle

    def start(self) -> Self:
        """Bind and serve in a background thread; returns once the sockets are bound.

        Returns
        -------
        InstrumentServer
            ``self``, with :attr:`endpoint` and :attr:`events_endpoint` set.

        Raises
        ------
        LinkError
            If an endpoint cannot be bound (in use, bad address).
        """
        if self._thread is not None:
            raise LinkError("this instrument server was already started; make a new one")
        self._thread = threading.Thread(target=self._run, name="micrography-server", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            self._thread.join()
            raise self._startup_error
        return self

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop gracefully and wait until the sockets are closed.

        The exposure in progress is finished (or aborted after ``grace_s``) and answered;
        queued and new commands are refused with ``shutting_down``.

        Parameters
        ----------
        grace_s : float
            Seconds the exposure in progress may take before it is aborted.
        """
        if self._thread is None:
            self._close_context()
            self.journal.close()
            return
        self._grace_s = grace_s
        self._stopping.set()
        self._thread.join()
        self._close_context()
        self.journal.close()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until the server has stopped; True if it has."""
        return self._stopped.wait(timeout_s)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _close_context(self) -> None:
        if self._authenticator is not None:
            self._authenticator.stop()
            self._authenticator = None
        if self._own_context and not self._context.closed:
            self._context.term()

    # ------------------------------------------------------------------ set-up

    def _restore_dose_map(self) -> None:
        """After a restart, put the journal's exposures back on the driver's dose map, if it has one."""
        dose_map = getattr(self.driver, "dose_map", None)
        if self.journal.restored and isinstance(dose_map, DoseMap):
            if self.driver.exposures:
                # A driver that has exposed in this process already carries that dose.
                self.log.info("the driver has exposed before; its dose map is taken as it is")
                return
            for extent, dose in self.journal.restored:
                dose_map.add(extent, dose)
            self.log.info(
                "restored %d exposure(s), %.6g e-/A^2 in total, from the journal onto the dose map",
                len(self.journal.restored),
                sum(dose for _, dose in self.journal.restored),
            )

    def _events_address(self) -> str | None:
        if self.events_bind != "auto":
            return self.events_bind
        match = _TCP.match(self.bind)
        if match is None:
            return None if not self.bind.startswith("ipc://") else self.bind + ".events"
        port = match.group("port")
        next_port = str(int(port) + 1) if port.isdigit() else "*"
        return f"tcp://{match.group('host')}:{next_port}"

    def _bind(self, socket: zmq.Socket[Any], endpoint: str, what: str) -> str:
        try:
            socket.bind(endpoint)
        except zmq.ZMQError as error:
            raise LinkError(
                f"cannot bind the {what} socket to {endpoint}: {error.strerror}; another server may be "
                "running there: stop it or choose another port (tcp://127.0.0.1:* takes a free one)"
            ) from None
        return socket.getsockopt(zmq.LAST_ENDPOINT).decode()

    def _open_sockets(self) -> None:
        if self.curve is not None:
            self._authenticator = start_authenticator(self._context, self.curve, self.log)
        router = self._context.socket(zmq.ROUTER)
        self._router = router
        # libzmq checks each frame against ZMQ_MAXMSGSIZE before allocating it and drops the peer
        # (no reply) when one is larger: a command frame over the limit never reaches memory.
        # Several frames within it whose total is over are answered message_too_large by decode.
        configure_socket(router, max_message_bytes=self.max_message_bytes, heartbeat_s=1.0)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a reply to a vanished client is reported
        if self.curve is not None:
            self.curve.apply(router)
        self.endpoint = self._bind(router, self.bind, "command")
        events = self._events_address()
        if events is not None:
            pub = self._context.socket(zmq.PUB)
            self._pub = pub
            configure_socket(pub, max_message_bytes=MAX_HEADER_BYTES, heartbeat_s=1.0)
            if self.curve is not None:
                self.curve.apply(pub)
            self.events_endpoint = self._bind(pub, events, "event")

    # ------------------------------------------------------------------ loop

    def _run(self) -> None:
        try:
            self._open_sockets()
        except BaseException as error:
            self._startup_error = error
            self._close_sockets(linger_ms=0)
            self._ready.set()
            self._stopped.set()
            return
        self._worker = threading.Thread(target=self._work_loop, name="micrography-worker", daemon=True)
        self._worker.start()
        self.log.info(
            "serving %s on %s (events %s, CURVE %s, journal %s)",
            self.driver.describe().name,
            self.endpoint,
            self.events_endpoint or "off",
            "on" if self.curve else "off",
            self.journal.directory or "in memory",
        )
        self._ready.set()
        try:
            self._serve()
            self._shutdown()
        except BaseException:
            self.log.exception("the server loop failed; shutting down")
            raise
        finally:
            self._work.put(None)
            if self._worker is not None:
                self._worker.join(timeout=2.0)
            self._close_sockets(linger_ms=1000)
            self._wake_loop.close()
            self._wake_worker.close()
            self._stopped.set()

    def _serve(self, until: float | None = None) -> None:
        """Poll commands and worker results; publish heartbeats. Returns when asked to stop."""
        assert self._router is not None
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._wake_loop.fileno(), zmq.POLLIN)
        next_heartbeat = time.monotonic()
        while True:
            now = time.monotonic()
            if until is None and self._stopping.is_set():
                return
            if until is not None and (now >= until or not self._in_flight):
                return
            if now >= next_heartbeat:
                self._publish(HeartbeatEvent(seq=0, t_s=time.time(), state=self._state()))
                next_heartbeat = now + self.heartbeat_s
            wait_s = min(next_heartbeat - now, _POLL_CAP_S)
            ready = dict(poller.poll(max(0, int(wait_s * 1000))))
            if self._wake_loop.fileno() in ready:
                with contextlib.suppress(BlockingIOError):
                    self._wake_loop.recv(4096)
                while True:
                    try:
                        result = self._results.get_nowait()
                    except queue.Empty:
                        break
                    self._finish(*result)
            if self._router in ready:
                # A burst of commands is served before looking at the clock again.
                for _ in range(100):
                    try:
                        frames = self._router.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._handle(frames)

    def _shutdown(self) -> None:
        """Graceful stop: cancel queued work, let the running exposure finish, then abort it."""
        self.log.info("shutting down")
        self._publish(StateEvent(seq=0, t_s=time.time(), state="closing", exposures=self.journal.exposures))
        for request_id, pending in list(self._in_flight.items()):
            if self._cancel_if_queued(pending):
                # The worker skips it; its waiters hear shutting_down now.
                self._answer_error(
                    pending,
                    ErrorReply(
                        code=ErrorCode.SHUTTING_DOWN,
                        message=f"the instrument server is shutting down; request {request_id} was not "
                        "exposed; retry it when the server is back",
                        request_id=request_id,
                    ),
                )
                del self._in_flight[request_id]
        if self._in_flight:
            self.log.info("waiting up to %.1f s for the exposure in progress", self._grace_s)
            self._serve(until=time.monotonic() + self._grace_s)
        if self._in_flight:
            self.log.warning("aborting the exposure in progress (grace period over)")
            for pending in self._in_flight.values():
                pending.stop.set()
            self.driver.abort()
            self._serve(until=time.monotonic() + 2.0)
        if self._in_flight:
            self.log.error(
                "the exposure of %s did not stop; it will be reported as interrupted after a restart",
                ", ".join(self._in_flight),
            )

    def _close_sockets(self, linger_ms: int) -> None:
        for name in ("_router", "_pub"):
            socket = getattr(self, name)
            if socket is not None:
                socket.close(linger=linger_ms)
                setattr(self, name, None)

    # ------------------------------------------------------------------ worker

    def _work_loop(self) -> None:
        while True:
            scan = self._work.get()
            if scan is None:
                return
            outcome: Tile | BaseException
            try:
                outcome = self._expose(scan)
            except BaseException as error:  # reported to the client, never kills the worker
                outcome = error
            self._current = None
            self._results.put((scan, outcome))
            with contextlib.suppress(OSError):
                self._wake_worker.send(b"x")

    def _expose(self, scan: ScanRequest) -> Tile:
        """Validate, journal, expose, journal: the write-ahead order of :mod:`simulator.exposure_journal`."""
        with self._claim:
            pending = self._in_flight.get(scan.request_id)
            if pending is None or pending.cancelled:
                raise AcquisitionAborted(f"acquisition {scan.request_id} was aborted before it started")
            self._current = scan.request_id
            stop = pending.stop
        self.driver.check(scan)  # refused scans never reach the journal
        # Raises JournalWriteError (disk full) before anything is exposed: the id stays free.
        self.journal.begin(scan, self.driver.describe().dose_of(scan))
        try:
            tile = self.driver.acquire(scan, abort=stop)
        except AcquisitionAborted as error:
            if error.exposed:
                # Stopped mid-scan: the lines scanned were dosed, so the id is spent.
                self.journal.interrupted(
                    scan,
                    f"aborted after {error.rows_scanned} of {scan.shape[0]} lines",
                    dose_e_per_a2=error.dose_e_per_a2,
                    extent_nm=error.extent_nm,
                )
            else:
                self.journal.failed(scan, f"{type(error).__name__}: {error}")
            raise
        except (ScanRequestError, DriverClosedError) as error:
            # Refused by the driver before its beam was on (a closed driver exposes nothing).
            self.journal.failed(scan, f"{type(error).__name__}: {error}")
            raise
        except BaseException as error:
            # Unknown how far the exposure got: spend the id and count the dose.
            self.journal.interrupted(scan, f"{type(error).__name__}: {error}")
            raise
        self.journal.done(tile)
        return tile

    # ------------------------------------------------------------------ commands

    def _handle(self, frames: list[zmq.Frame]) -> None:
        started = time.perf_counter()
        envelope, body = split_envelope(frames)
        client = envelope[0].bytes.hex() if envelope else "?"
        try:
            decoded = decode(
                body, COMMANDS, max_message_bytes=self.max_message_bytes, what=f"command from client {client}"
            )
            if decoded.arrays:
                raise FrameMismatchError(
                    f"a {decoded.header.type} command carries no array frames in this protocol version, "
                    f"got {len(decoded.arrays)}"
                )
        except ProtocolError as error:
            reply = error_reply(error, reply_to=_message_id_of(body))
            self.log.warning("client %s: refused a message: %s: %s", client, reply.code, error)
            self._send(envelope, encode(reply), client)
            return
        except Exception as error:  # a decoder bug must not kill the loop thread
            self.log.exception("client %s: decoding a message failed", client)
            self._send(envelope, encode(error_reply(error, reply_to=_message_id_of(body))), client)
            return
        command = decoded.header
        if self._stopping.is_set() and not isinstance(command, AcquireCommand | ByeCommand):
            self._send(
                envelope,
                encode(
                    ErrorReply(
                        code=ErrorCode.SHUTTING_DOWN,
                        message="the instrument server is shutting down; retry when it is back",
                        reply_to=command.message_id,
                    )
                ),
                client,
            )
            return
        try:
            if isinstance(command, AcquireCommand):
                self._acquire(envelope, command, client)
                return
            reply = self._answer(command, client)
        except MicrographyError as error:
            request_id = command.scan.request_id if isinstance(command, AcquireCommand) else None
            reply = error_reply(error, reply_to=command.message_id, request_id=request_id)
        except Exception as error:  # a bug in a driver must not stop the server
            self.log.exception("client %s: %s failed", client, command.type)
            request_id = command.scan.request_id if isinstance(command, AcquireCommand) else None
            reply = error_reply(error, reply_to=command.message_id, request_id=request_id)
        self._send(envelope, encode(reply), client)
        outcome = reply.code if isinstance(reply, ErrorReply) else "ok"
        self.log.info(
            "client %s: %s -> %s (%.2f ms)",
            client,
            command.type,
            outcome,
            1e3 * (time.perf_counter() - started),
        )

    def _answer(self, command: Any, client: str) -> Any:
        """Reply to every command except acquire."""
        if isinstance(command, HelloCommand):
            self.log.info(
                "client %s: hello from %s, capabilities %s",
                client,
                command.client,
                list(command.capabilities),
            )
            return HelloReply(
                reply_to=command.message_id,
                server=f"micrography-serve {__version__}",
                instrument=self.driver.describe().name,
                capabilities=CAPABILITIES,
                max_message_bytes=self.max_message_bytes,
                heartbeat_s=self.heartbeat_s if self._pub is not None else None,
                events_endpoint=self.events_endpoint,
            )
        if isinstance(command, DescribeCommand):
            return DescribeReply(reply_to=command.message_id, instrument=self.driver.describe())
        if isinstance(command, StatusCommand):
            return self.status(reply_to=command.message_id)
        if isinstance(command, AbortCommand):
            return AbortReply(reply_to=command.message_id, aborted=tuple(self._abort(command.request_id)))
        if isinstance(command, ByeCommand):
            return ByeReply(reply_to=command.message_id)
        raise ProtocolError(f"no handler for {command.type}")  # the adapter admits no other type

    def _acquire(self, envelope: list[Any], command: AcquireCommand, client: str) -> None:
        scan = command.scan
        request_id = scan.request_id
        pending = self._in_flight.get(request_id)
        if pending is not None:
            if pending.scan != scan:
                raise ScanRequestError(
                    f"request id {request_id} was already used for a different scan; "
                    "give every new scan a new id"
                )
            # A retry while the first attempt is still exposing: answer both from one exposure.
            pending.waiters.append((envelope, command.message_id))
            self.log.info("client %s: acquire %s (retry, joins the exposure in progress)", client, request_id)
            return
        started = time.perf_counter()
        try:
            tile = self.journal.lookup(scan)
        except MicrographyError as error:
            reply = _error_reply(error, reply_to=command.message_id, request_id=request_id)
            self._send(envelope, encode(reply), client)
            self.log.info("client %s: acquire %s -> %s", client, request_id, reply.code)
            return
        if tile is not None:
            self._send_tile(envelope, command.message_id, tile, replayed=True, client=client)
            self.log.info(
                "client %s: acquire %s -> replayed from the journal, not exposed (%.2f ms)",
                client,
                request_id,
                1e3 * (time.perf_counter() - started),
            )
            return
        if self._stopping.is_set():
            self._send(
                envelope,
                encode(
                    ErrorReply(
                        code=ErrorCode.SHUTTING_DOWN,
                        message=f"the instrument server is shutting down; request {request_id} was not "
                        "exposed; retry it when the server is back",
                        reply_to=command.message_id,
                        request_id=request_id,
                    )
                ),
                client,
            )
            return
        self._in_flight[request_id] = _Pending(scan=scan, waiters=[(envelope, command.message_id)])
        if len(self._in_flight) == 1:
            self._publish(
                StateEvent(
                    seq=0,
                    t_s=time.time(),
                    state="acquiring",
                    request_id=request_id,
                    exposures=self.journal.exposures,
                )
            )
        self.log.info(
            "client %s: acquire %s queued: %dx%d px at (%.3f, %.3f) nm, %.4g nm/px, %.4g us",
            client,
            request_id,
            scan.shape[0],
            scan.shape[1],
            scan.x_nm,
            scan.y_nm,
            scan.pixel_size_nm,
            scan.dwell_us,
        )
        self._work.put(scan)

    def _finish(self, scan: ScanRequest, outcome: Tile | BaseException) -> None:
        """Deliver a worker result to everyone waiting for that request id."""
        pending = self._in_flight.pop(scan.request_id, None)
        elapsed_ms = 1e3 * (time.perf_counter() - pending.received_s) if pending else 0.0
        if isinstance(outcome, Tile):
            if pending is not None:
                for envelope, message_id in pending.waiters:
                    self._send_tile(
                        envelope, message_id, outcome, replayed=False, client=envelope[0].bytes.hex()
                    )
            self.log.info(
                "acquire %s -> exposed %dx%d px, %.6g e-/A^2 (%.1f ms)",
                scan.request_id,
                outcome.shape[0],
                outcome.shape[1],
                outcome.dose_e_per_a2,
                elapsed_ms,
            )
            self._publish(
                TileReadyEvent(
                    seq=0,
                    t_s=time.time(),
                    request_id=scan.request_id,
                    shape=outcome.shape,
                    dose_e_per_a2=outcome.dose_e_per_a2,
                    t_end=outcome.t_end,
                )
            )
            self._warn_dose(scan.request_id)
        else:
            if not isinstance(outcome, MicrographyError):
                self.log.error("acquire %s failed in the driver", scan.request_id, exc_info=outcome)
            if pending is not None:
                self._answer_error(pending, _error_reply(outcome, reply_to=None, request_id=scan.request_id))
            self.log.info("acquire %s -> %s: %s", scan.request_id, type(outcome).__name__, outcome)
            if isinstance(outcome, DoseLimitError):
                self._warn_dose(scan.request_id, refused=str(outcome))
        if not self._in_flight:
            self._publish(
                StateEvent(seq=0, t_s=time.time(), state=self._state(), exposures=self.journal.exposures)
            )

    def _answer_error(self, pending: _Pending, reply: ErrorReply) -> None:
        for envelope, message_id in pending.waiters:
            self._send(
                envelope, encode(reply.model_copy(update={"reply_to": message_id})), envelope[0].bytes.hex()
            )

    def _send_tile(
        self, envelope: list[Any], message_id: str, tile: Tile, *, replayed: bool, client: str
    ) -> None:
        info = TileInfo(
            request_id=tile.request.request_id,
            origin_nm=tile.origin_nm,
            pixel_size_nm=tile.pixel_size_nm,
            dose_e_per_a2=tile.dose_e_per_a2,
            t_start=tile.t_start,
            t_end=tile.t_end,
            metadata=jsonable(tile.metadata),
        )
        reply = AcquireReply(reply_to=message_id, tile=info, replayed=replayed)
        self._send(envelope, encode(reply, {"image": tile.image}), client)

    def _cancel_if_queued(self, pending: _Pending) -> bool:
        """Cancel ``pending`` if the worker has not started it; True if cancelled."""
        with self._claim:
            if pending.scan.request_id == self._current:
                return False
            pending.cancelled = True
            return True

    def _abort(self, request_id: str | None) -> list[str]:
        aborted = []
        for pending_id, pending in self._in_flight.items():
            if request_id is None or request_id == pending_id:
                aborted.append(pending_id)
                if not self._cancel_if_queued(pending):
                    pending.cancelled = True
                    # The event first: the driver keeps it even if its acquire has not begun yet.
                    pending.stop.set()
                    self.driver.abort()
        self.log.info("abort %s -> %s", request_id or "(all)", aborted or "nothing in progress")
        return aborted

    def write_endpoints(self, path: str | Path) -> None:
        """Write the bound command and event endpoints as JSON (for a launcher that bound port ``*``).

        Parameters
        ----------
        path : str or pathlib.Path
            File to write: ``{"endpoint": ..., "events_endpoint": ...}``.
        """
        document = {"endpoint": self.endpoint, "events_endpoint": self.events_endpoint}
        Path(path).write_text(json.dumps(document), encoding="utf-8")

    def status(self, reply_to: str | None = None) -> StatusReply:
        """The server state and its dose accounting.

        Parameters
        ----------
        reply_to : str, optional
            Message id of the ``status`` command being answered.

        Returns
        -------
        StatusReply
            State, request in progress, queue length, exposures, interrupted exposures, total dose,
            journal folder, uptime.
        """
        current = self._current
        return StatusReply(
            reply_to=reply_to,
            state=self._state(),
            request_id=current,
            queued=max(0, len(self._in_flight) - (1 if current in self._in_flight else 0)),
            exposures=self.journal.exposures,
            interrupted_exposures=self.journal.interrupted_exposures,
            total_dose_e_per_a2=self.journal.total_dose_e_per_a2,
            journal=str(self.journal.directory) if self.journal.directory else None,
            uptime_s=time.monotonic() - self._started_s,
        )

    def _state(self) -> Any:
        if self._stopping.is_set():
            return "closing"
        return "acquiring" if self._in_flight else "idle"

    # ------------------------------------------------------------------ output

    def _send(self, envelope: list[Any], frames: list[Any], client: str) -> None:
        assert self._router is not None
        try:
            self._router.send_multipart([*envelope, *frames], flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as error:
            if error.errno not in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                raise
            # The client reconnected or left; a retry of the same id is answered from the journal.
            self.log.warning("client %s: gone before its reply could be sent (%s)", client, error.strerror)

    def _publish(self, event: Any) -> None:
        if self._pub is None:
            return
        event = event.model_copy(update={"seq": self._seq})
        self._seq += 1
        with contextlib.suppress(zmq.Again):
            self._pub.send_multipart([event.type.encode(), *encode(event)], flags=zmq.NOBLOCK)

    def _warn_dose(self, request_id: str, refused: str | None = None) -> None:
        dose_map = getattr(self.driver, "dose_map", None)
        limit = self.driver.describe().max_dose_e_per_a2
        if not isinstance(dose_map, DoseMap) or limit is None:
            return
        worst = np.unravel_index(int(np.argmax(dose_map.map_e_per_a2)), dose_map.map_e_per_a2.shape)
        peak = float(dose_map.map_e_per_a2[worst])
        if refused is None and peak < self.dose_warning_fraction * limit:
            return
        x = dose_map.stage_x_nm[0] + (worst[1] + 0.5) * dose_map.cell_nm
        y = dose_map.stage_y_nm[0] + (worst[0] + 0.5) * dose_map.cell_nm
        message = refused or (
            f"the area near x = {x:.1f} nm, y = {y:.1f} nm has received {peak:.6g} e-/A^2, "
            f"{100 * peak / limit:.0f} % of the per-area limit {limit:.6g} e-/A^2; scan elsewhere"
        )
        self._publish(
            DoseWarningEvent(
                seq=0,
                t_s=time.time(),
                message=message,
                max_dose_e_per_a2=peak,
                limit_e_per_a2=limit,
                x_nm=x,
                y_nm=y,
                request_id=request_id,
            )
        )


def _error_reply(error: BaseException, reply_to: str | None, request_id: str | None = None) -> ErrorReply:
    """:func:`~agent.protocol.messages.error_reply`, with ``reply_expired`` for an expired tile."""
    if isinstance(error, ReplyExpiredError):
        return ErrorReply(
            code=ErrorCode.REPLY_EXPIRED, message=str(error)[:4000], reply_to=reply_to, request_id=request_id
        )
    return error_reply(error, reply_to=reply_to, request_id=request_id)


def _message_id_of(body: list[Any]) -> str | None:
    """The message id of an invalid command, when its header is readable JSON with one."""
    if not body:
        return None
    data = body[0].bytes if isinstance(body[0], zmq.Frame) else bytes(body[0])
    if len(data) > MAX_HEADER_BYTES:
        return None
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if not isinstance(raw, dict):
        return None
    message_id = raw.get("message_id")
    return message_id if isinstance(message_id, str) and is_valid_id(message_id) else None
