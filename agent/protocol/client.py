"""The agent side of the link: :class:`ZmqMicroscope`, a driver that talks to an instrument server.

``ZmqMicroscope`` is a complete :class:`~agent.driver.MicroscopeDriver`: the
agent uses it exactly like the simulated microscope, and the instrument server
(``micrography serve`` or the vendor's control software) does the exposing.

Reliability follows the "Lazy Pirate" pattern of the ZeroMQ guide: every command
waits a bounded time for its reply; when none comes, the client closes its
socket (dropping whatever was queued), opens a fresh one, says hello again and
resends the same command, up to ``retries`` times. Because the retried
``acquire`` carries the same request id, the server answers it from its reply
cache or journal and never exposes twice. While a reply is outstanding the
client also listens to the server's heartbeat events: when the server falls
silent for ``liveness`` heartbeat intervals it is treated as dead at once,
instead of after a long acquisition timeout.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from agent import __version__
from agent.driver import InstrumentDescription, MicroscopeDriver, ScanRequest, Tile
from agent.errors import (
    AuthenticationError,
    ConfigError,
    DriverClosedError,
    LinkError,
    LinkTimeoutError,
    ProtocolError,
)
from agent.protocol.framing import (
    DEFAULT_CLIENT_MAX_MESSAGE_BYTES,
    MAX_HEADER_BYTES,
    Decoded,
    check_size,
    configure_socket,
    decode,
    encode,
    message_bytes,
    require_curve,
    require_libzmq,
)
from agent.protocol.messages import (
    CAPABILITIES,
    ERROR_OF_CODE,
    EVENTS,
    REPLIES,
    AbortCommand,
    AcquireCommand,
    AcquireReply,
    ByeCommand,
    DescribeCommand,
    DescribeReply,
    ErrorCode,
    ErrorReply,
    HeartbeatEvent,
    HelloCommand,
    HelloReply,
    StatusCommand,
    StatusReply,
    request_id_problem,
)
from agent.protocol.security import CurveClientKeys

_log = logging.getLogger("micrography.link")

_ENDPOINT = re.compile(r"^(tcp|ipc|inproc)://.+$")
_TCP = re.compile(r"^tcp://(?P<host>\[[^\]]*\]|[^:/]*):(?P<port>[^/]+)$")
_WILDCARD_HOSTS = {"*", "0.0.0.0", "[::]", "::", ""}
_ABORT_POLL_S = 0.05  # how quickly an abort() from another thread reaches the server
_HANDSHAKE_FAILURES_BEFORE_GIVING_UP = 3


class _NoReply(Exception):
    """One attempt got no reply; the text says why (internal to the retry loop)."""


class ZmqMicroscope(MicroscopeDriver):
    """A microscope on the other end of a ZeroMQ link (the agent side of the protocol).

    Construction connects, says hello (version and capability negotiation) and fetches the
    instrument description, so a constructed driver is ready to acquire.

    Parameters
    ----------
    endpoint : str
        Command endpoint of the instrument server, ``tcp://HOST:PORT``.
    timeout_s : float
        Seconds to wait for one reply before retrying; an acquisition gets twice its scan time
        (pixels x dwell) on top.
    retries : int
        Resends after the first attempt (each on a fresh connection, same request id).
    liveness : int
        Heartbeat intervals of silence after which the server is taken for dead and the
        command is resent at once.
    curve : CurveClientKeys, optional
        Client keys and the server public key; required when the server runs CURVE.
    max_message_bytes : int
        Largest reply accepted, bytes; a tile that would be larger is refused before it is
        requested.
    client_name : str
        Name shown in the server log.
    on_event : callable, optional
        Called with every event header (heartbeat, state, tile_ready, dose_warning) received
        while the driver waits for a reply or in :meth:`poll_events`; runs in the caller's
        thread and must return quickly.
    backoff_s : float
        Pause before reconnecting; doubled on each further retry, at most 1 s.
    context : zmq.Context, optional
        ZeroMQ context to use; by default the driver owns one.

    Raises
    ------
    ConfigError
        If the endpoint or a setting is invalid.
    LinkTimeoutError
        If the server does not answer the hello after every retry.
    AuthenticationError
        If the server refuses the CURVE handshake.
    ProtocolVersionError
        If the server speaks another major version of the protocol.

    Notes
    -----
    Tiles arrive without copying: ``tile.image`` is a float32 view of the received frame. The
    driver is thread-safe in the way of :class:`~agent.driver.MicroscopeDriver`: commands are
    serialised, and :meth:`abort` may be called from any thread.

    Examples
    --------
    Not run as a test (it needs an instrument server listening)::

        from agent.driver import ScanRequest
        with ZmqMicroscope("tcp://127.0.0.1:5555") as microscope:
            tile = microscope.acquire(ScanRequest(x_nm=80, y_nm=80, shape=(512, 512),
                                                  pixel_size_nm=0.02, dwell_us=2.0))
    """

    recent_tiles = 1
    """Tiles kept client-side for retried ids: the server keeps the reply cache, and eight
    4096x4096 tiles would pin 512 MiB here (slowing every later allocation of a tile)."""

    def __init__(
        self,
        endpoint: str,
        *,
        timeout_s: float = 5.0,
        retries: int = 3,
        liveness: int = 3,
        curve: CurveClientKeys | None = None,
        max_message_bytes: int = DEFAULT_CLIENT_MAX_MESSAGE_BYTES,
        client_name: str = f"micrography-agent {__version__}",
        on_event: Callable[[Any], None] | None = None,
        backoff_s: float = 0.1,
        context: zmq.Context[Any] | None = None,
    ) -> None:
        super().__init__()
        if not _ENDPOINT.match(endpoint):
            raise ConfigError(
                f"instrument endpoint {endpoint!r} is not a ZeroMQ address; use tcp://HOST:PORT, "
                "for example tcp://127.0.0.1:5555"
            )
        if not timeout_s > 0 or not backoff_s >= 0:
            raise ConfigError(
                "timeout_s must be positive and backoff_s not negative (seconds); "
                f"got timeout_s={timeout_s}, backoff_s={backoff_s}"
            )
        if retries < 0 or liveness < 1 or max_message_bytes < MAX_HEADER_BYTES:
            raise ConfigError(
                f"need retries >= 0, liveness >= 1 and max_message_bytes >= {MAX_HEADER_BYTES}; got "
                f"retries={retries}, liveness={liveness}, max_message_bytes={max_message_bytes}"
            )
        require_libzmq()
        if curve is not None:
            require_curve()
        self.endpoint = endpoint
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.liveness = int(liveness)
        self.max_message_bytes = int(max_message_bytes)
        self.client_name = client_name
        self.on_event = on_event
        self.backoff_s = float(backoff_s)
        self._curve = curve
        self._own_context = context is None
        self._context: zmq.Context[Any] = context if context is not None else zmq.Context()
        self._dealer: zmq.Socket[Any] | None = None
        self._monitor: zmq.Socket[Any] | None = None
        self._sub: zmq.Socket[Any] | None = None
        self._hello: HelloReply | None = None
        self._description: InstrumentDescription | None = None
        self._events: deque[Any] = deque(maxlen=1000)
        self._last_heard = time.monotonic()
        self._handshake_failures = 0
        self._poller = zmq.Poller()
        self.reconnects = 0
        """How many times the link was re-established (Lazy Pirate retries)."""
        try:
            with self._lock:
                self._request(self._hello_command(), self.timeout_s, "hello")
                described = self._request(DescribeCommand(), self.timeout_s, "describe")
                self._description = self._expect(described, DescribeReply, "describe").instrument
        except BaseException:
            self._close_sockets()
            if self._own_context:
                self._context.term()
            raise

    # ------------------------------------------------------------------ driver contract

    def describe(self) -> InstrumentDescription:
        """The instrument description fetched from the server when the link was opened."""
        assert self._description is not None  # set in __init__ or __init__ raised
        return self._description

    def _acquire(self, request: ScanRequest) -> Tile:
        # Refuse before sending: the server would answer bad_request, and a caller that made up
        # ids is better told here, with nothing exposed and no round trip.
        problem = request_id_problem("request id", request.request_id)
        if problem is not None:
            raise ConfigError(problem)
        rows, cols = request.shape
        # Refuse before asking: a reply over our limit would make libzmq drop the connection.
        check_size(
            rows * cols * 4 + MAX_HEADER_BYTES,
            self.max_message_bytes,
            f"the reply to a {rows}x{cols} float32 tile",
        )
        scan_s = rows * cols * request.dwell_us * 1e-6
        reconnects = self.reconnects
        decoded = self._request(
            AcquireCommand(scan=request),
            self.timeout_s + 2.0 * scan_s,
            f"acquire (request id {request.request_id})",
            abortable=request.request_id,
        )
        header = self._expect(decoded, AcquireReply, "acquire")
        info = header.tile
        image = decoded.arrays.get("image")
        if (
            info.request_id != request.request_id
            or image is None
            or image.dtype.kind != "f"
            or image.dtype.itemsize != 4
            or tuple(image.shape) != tuple(request.shape)
        ):
            got = None if image is None else f"{image.dtype.str} {list(image.shape)}"
            raise ProtocolError(
                f"the instrument server at {self.endpoint} answered request {request.request_id} with "
                f"tile {info.request_id} and image {got}; expected a float32 image of shape "
                f"{list(request.shape)} for the same id (a bug in the server)"
            )
        if not image.dtype.isnative:
            image = image.astype(np.float32)  # a big-endian server: one copy, to native order
        metadata = dict(info.metadata)
        if header.replayed and self.reconnects == reconnects:
            # Answered from the server's cache at the first attempt: this id was exposed before this
            # call (another session, or before a restart); a retry of ours after a lost reply is not.
            metadata["replayed"] = True
        return Tile(
            image=image,
            request=request,
            origin_nm=info.origin_nm,
            pixel_size_nm=info.pixel_size_nm,
            dose_e_per_a2=info.dose_e_per_a2,
            t_start=info.t_start,
            t_end=info.t_end,
            metadata=metadata,
        )

    def abort(self) -> None:
        """Stop the acquisition in progress, on the instrument too; safe from any thread.

        The thread waiting in :meth:`acquire` notices within 50 ms, sends ``abort`` to the server
        and raises :class:`~agent.errors.AcquisitionAborted` when the server confirms.
        """
        super().abort()

    def close(self) -> None:
        """Say bye (best effort, at most 1 s), close the sockets and release the context."""
        if self.closed:
            return
        with self._lock:
            if self._dealer is not None:
                # Best effort: leaving anyway, and the server keeps no session state.
                with contextlib.suppress(_NoReply, LinkError):
                    self._exchange(ByeCommand(), min(self.timeout_s, 1.0))
            self._close_sockets()
            if self._own_context:
                self._context.term()
            super().close()

    # ------------------------------------------------------------------ extras

    def retry_window_s(self, request: ScanRequest | None = None) -> float:
        """Longest time from sending a command to the last resend of it, seconds (section 7.1).

        Each of the ``retries + 1`` attempts waits ``timeout_s`` (plus twice the scan time for an
        acquisition); each resend is preceded by a backoff (at most 1 s) and a fresh ``hello``
        (at most ``timeout_s``). A server must keep a finished tile at least this long for a lost
        reply to be recovered: ``micrography serve`` keeps 8 GiB of tiles on disk, far more than
        any instrument scans in this window.

        Parameters
        ----------
        request : ScanRequest, optional
            The acquisition; None for a command without a scan.

        Returns
        -------
        float
            Seconds; about 36 s plus 8 scan times with the defaults.
        """
        scan_s = 0.0 if request is None else request.shape[0] * request.shape[1] * request.dwell_us * 1e-6
        attempt_s = self.timeout_s + 2.0 * scan_s
        backoff_s = sum(
            min(self.backoff_s * 2 ** max(attempt - 1, 0), 1.0) for attempt in range(1, self.retries + 1)
        )
        return (self.retries + 1) * attempt_s + self.retries * self.timeout_s + backoff_s

    @property
    def server(self) -> HelloReply:
        """What the server announced in its hello: name, capabilities, limits, heartbeat, events."""
        assert self._hello is not None
        return self._hello

    def status(self) -> StatusReply:
        """The server's state and dose accounting (exposures, total dose, journal).

        Returns
        -------
        StatusReply
            See :class:`agent.protocol.messages.StatusReply`.
        """
        self._raise_if_closed()
        with self._lock:
            decoded = self._request(StatusCommand(), self.timeout_s, "status")
            return self._expect(decoded, StatusReply, "status")

    def poll_events(self, timeout_s: float = 0.0) -> list[Any]:
        """Events received since the last call, waiting up to ``timeout_s`` for a first one.

        Parameters
        ----------
        timeout_s : float
            Seconds to wait when none is pending.

        Returns
        -------
        list
            Event headers (``StateEvent``, ``TileReadyEvent``, ``DoseWarningEvent`` of
            :mod:`agent.protocol.messages`), oldest first; heartbeats only go to ``on_event``.
        """
        self._raise_if_closed()
        with self._lock:
            if self._sub is not None:
                if not self._events:
                    self._sub.poll(int(timeout_s * 1000))
                self._drain_events()
            pending = list(self._events)
            self._events.clear()
        events = (self._decode_event(item) if isinstance(item, list) else item for item in pending)
        return [event for event in events if event is not None]

    # ------------------------------------------------------------------ link internals

    def _raise_if_closed(self) -> None:
        if self.closed:
            raise DriverClosedError(f"the link to {self.endpoint} is closed; open a new ZmqMicroscope")

    def _hello_command(self) -> HelloCommand:
        return HelloCommand(
            client=self.client_name, capabilities=CAPABILITIES, max_message_bytes=self.max_message_bytes
        )

    def _connect(self) -> None:
        """Open a fresh DEALER (and its handshake monitor); events follow the hello."""
        dealer = self._context.socket(zmq.DEALER)
        configure_socket(dealer, max_message_bytes=self.max_message_bytes, heartbeat_s=1.0)
        if self._curve is not None:
            self._curve.apply(dealer)
        self._monitor = dealer.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
            | zmq.EVENT_HANDSHAKE_SUCCEEDED
        )
        self._dealer = dealer
        self._poller = zmq.Poller()
        self._poller.register(dealer, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        try:
            dealer.connect(self.endpoint)
        except zmq.ZMQError as error:
            self._close_sockets()
            raise ConfigError(f"cannot connect to {self.endpoint}: {error}; use tcp://HOST:PORT") from None
        self._last_heard = time.monotonic()

    def _connect_events(self, announced: str | None) -> None:
        if self._sub is not None:
            self._poller.unregister(self._sub)
            self._sub.close(linger=0)
            self._sub = None
        if not announced:
            return
        sub = self._context.socket(zmq.SUB)
        configure_socket(sub, max_message_bytes=MAX_HEADER_BYTES * 2, heartbeat_s=1.0)
        if self._curve is not None:
            self._curve.apply(sub)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        try:
            sub.connect(self._events_endpoint(announced))
        except zmq.ZMQError as error:
            sub.close(linger=0)
            raise ProtocolError(
                f"the instrument server at {self.endpoint} announced the events endpoint {announced!r}, "
                f"which cannot be connected ({error}); fix the server's events address"
            ) from None
        self._sub = sub
        self._poller.register(sub, zmq.POLLIN)
        self._last_heard = time.monotonic()

    def _events_endpoint(self, announced: str) -> str:
        """The announced PUB endpoint, with a wildcard host replaced by the host we connected to."""
        match, ours = _TCP.match(announced), _TCP.match(self.endpoint)
        if match and ours and match.group("host") in _WILDCARD_HOSTS:
            return f"tcp://{ours.group('host')}:{match.group('port')}"
        return announced

    def _close_sockets(self) -> None:
        if self._dealer is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._dealer.disable_monitor()
            self._dealer.close(linger=0)
            self._dealer = None
        if self._monitor is not None:
            self._monitor.close(linger=0)
            self._monitor = None
        if self._sub is not None:
            self._sub.close(linger=0)
            self._sub = None

    def _request(
        self, command: Any, attempt_timeout_s: float, what: str, abortable: str | None = None
    ) -> Decoded:
        """Send ``command`` and return its reply, Lazy Pirate style; raises on error replies."""
        frames = encode(command)
        if self._hello is not None:
            check_size(
                message_bytes(frames),
                self._hello.max_message_bytes,
                f"the {command.type} command to {self.endpoint}",
            )
        problems: list[str] = []
        for attempt in range(self.retries + 1):
            try:
                if self._dealer is None:
                    if attempt > 0 or self._hello is not None:
                        time.sleep(min(self.backoff_s * 2 ** max(attempt - 1, 0), 1.0))
                        self.reconnects += 1
                        _log.info(
                            "reconnecting to %s (attempt %d of %d)",
                            self.endpoint,
                            attempt + 1,
                            self.retries + 1,
                        )
                    self._connect()
                    if not isinstance(command, HelloCommand):
                        # The server may have restarted: renegotiate and find its events again.
                        self._accept_hello(self._exchange(self._hello_command(), self.timeout_s))
                decoded = self._exchange(command, attempt_timeout_s, frames=frames, abortable=abortable)
                if isinstance(command, HelloCommand):
                    self._accept_hello(decoded)
                header = decoded.header
                if isinstance(header, ErrorReply) and header.code is ErrorCode.SHUTTING_DOWN:
                    raise _NoReply(f"the server was shutting down ({header.message})")
                return decoded
            except _NoReply as problem:
                problems.append(str(problem))
                _log.warning("%s to %s: %s", what, self.endpoint, problem)
                self._close_sockets()  # a fresh socket drops the unanswered request (Lazy Pirate)
        raise LinkTimeoutError(
            f"the instrument server at {self.endpoint} did not answer {what} after "
            f"{self.retries + 1} attempt(s): {problems[-1]}; check that `micrography serve` (or the "
            "instrument software) is running and reachable at that address and read its log. "
            "Retrying the same request id never exposes twice."
        )

    def _accept_hello(self, decoded: Decoded) -> None:
        hello = self._expect(decoded, HelloReply, "hello")
        if "acquire" not in hello.capabilities:
            raise ProtocolError(
                f"the instrument server at {self.endpoint} ({hello.server}) does not offer 'acquire' "
                f"(capabilities {list(hello.capabilities)}); it cannot serve a session"
            )
        self._hello = hello
        self._connect_events(hello.events_endpoint)

    def _exchange(
        self, command: Any, timeout_s: float, *, frames: list[Any] | None = None, abortable: str | None = None
    ) -> Decoded:
        """One attempt: send once, wait for the matching reply; raises _NoReply on silence."""
        assert self._dealer is not None
        self._dealer.send_multipart(frames if frames is not None else encode(command), copy=False)
        start = time.monotonic()
        deadline = start + timeout_s
        # Silence is measured from the send: events left unread between commands must not
        # count as a dead server.
        self._last_heard = max(self._last_heard, start)
        heartbeat = self._hello.heartbeat_s if (self._hello and self._sub is not None) else None
        abort_sent = False
        poller = self._poller
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise _NoReply(f"no reply within {timeout_s:.3g} s")
            wait_s = deadline - now
            if heartbeat is not None:
                silent_s = now - self._last_heard
                if silent_s > self.liveness * heartbeat:
                    raise _NoReply(
                        f"no heartbeat for {silent_s:.1f} s (the server sends one every {heartbeat:g} s); "
                        "it is down or stalled"
                    )
                wait_s = min(wait_s, self.liveness * heartbeat - silent_s + 1e-3)
            if abortable is not None:
                if self._abort.is_set() and not abort_sent:
                    self._dealer.send_multipart(encode(AbortCommand(request_id=abortable)), copy=False)
                    abort_sent = True
                    _log.info("abort of %s sent to %s", abortable, self.endpoint)
                wait_s = min(wait_s, _ABORT_POLL_S)
            ready = dict(poller.poll(max(1, int(wait_s * 1000))))
            if self._monitor in ready:
                self._check_handshake()
            if self._sub is not None and self._sub in ready:
                self._drain_events()
            if self._dealer in ready:
                received = self._dealer.recv_multipart(copy=False)
                self._last_heard = time.monotonic()
                decoded = decode(
                    received,
                    REPLIES,
                    max_message_bytes=self.max_message_bytes,
                    what=f"reply from {self.endpoint}",
                )
                reply_to = decoded.header.reply_to
                if reply_to is not None and reply_to != command.message_id:
                    continue  # the answer to our abort, or a late answer to an earlier attempt
                return decoded

    def _check_handshake(self) -> None:
        assert self._monitor is not None
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)
            kind = event["event"]
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._handshake_failures = 0
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                raise AuthenticationError(
                    f"the instrument server at {self.endpoint} refused this client's CURVE key "
                    f"(ZAP status {event['value']}); ask its operator to add this client's public .key "
                    "file to the server's --allowed-clients"
                )
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                if self._curve is None:
                    raise AuthenticationError(
                        f"the instrument server at {self.endpoint} requires CURVE authentication; give "
                        "this client its key pair (.key_secret) and the server's public key (.key)"
                    )
                raise AuthenticationError(
                    f"the CURVE handshake with {self.endpoint} failed (protocol error {event['value']}); "
                    "the server may not use CURVE: drop the client keys or start the server with "
                    "--curve-secret-key"
                )
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and self._curve is not None:
                self._handshake_failures += 1
                if self._handshake_failures >= _HANDSHAKE_FAILURES_BEFORE_GIVING_UP:
                    raise AuthenticationError(
                        f"the CURVE handshake with {self.endpoint} failed {self._handshake_failures} times "
                        "without an answer; the server public key given to this client is probably not "
                        "the key of that server"
                    )

    def _drain_events(self) -> None:
        assert self._sub is not None
        while True:
            try:
                frames = self._sub.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._last_heard = time.monotonic()  # any event proves the server alive
            if self.on_event is None:
                # Decoded only when asked for (poll_events): keeps the acquisition path short.
                if frames[0].bytes != b"heartbeat":
                    self._events.append(frames)
                continue
            event = self._decode_event(frames)
            if event is None:
                continue
            if not isinstance(event, HeartbeatEvent):
                self._events.append(event)
            try:
                self.on_event(event)
            except Exception:  # a faulty callback must not break the link
                _log.exception("on_event callback failed on %s", event.type)

    def _decode_event(self, frames: list[Any]) -> Any:
        """The event header of ``[topic, header]``, or None (logged) if malformed."""
        try:
            return decode(
                frames[1:], EVENTS, max_message_bytes=MAX_HEADER_BYTES, what=f"event from {self.endpoint}"
            ).header
        except (ProtocolError, IndexError) as error:
            _log.warning("ignored a malformed event: %s", error)
            return None

    def _expect(self, decoded: Decoded, kind: type[Any], what: str) -> Any:
        """The reply header if it is ``kind``; the typed exception of an error reply otherwise."""
        header = decoded.header
        if isinstance(header, ErrorReply):
            error_class = ERROR_OF_CODE.get(header.code, LinkError)
            message = header.message
            if issubclass(error_class, LinkError):
                message = f"instrument server at {self.endpoint}: {message}"
            raise error_class(message)
        if not isinstance(header, kind):
            raise ProtocolError(
                f"the instrument server at {self.endpoint} answered {what} with a {header.type!r} "
                f"message; expected {kind.model_fields['type'].default!r} (a bug in the server)"
            )
        return header
