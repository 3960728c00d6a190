"""A minimal instrument server for the Micrography link: adapt ``ScanEngine`` to your scan API.

This file is the starting point for an instrument-software developer. It speaks
protocol version 1 (``docs/protocol.md``) with nothing but pyzmq, numpy and the
protocol module of Micrography (``agent.protocol``: the header models and the
framing). Replace the three methods of :class:`ScanEngine` with calls into your
control software, and the agent drives your microscope with ``ZmqMicroscope``
exactly as it drives the simulator.

Run it (it listens on the loopback interface only)::

    python docs/examples/minimal_server.py --bind tcp://127.0.0.1:5555

and drive it from Python in another terminal::

    from agent.protocol.client import ZmqMicroscope

    with ZmqMicroscope("tcp://127.0.0.1:5555") as microscope:
        print(microscope.describe())

What this example leaves out, and ``simulator/server.py`` shows:

* Scans run in the command loop, so ``abort`` is answered only after the scan ends and
  ``status`` waits too. Run scans in a worker thread to make them abortable.
* Recent replies are kept in memory only: a restart of this process forgets which request
  ids were exposed (while it runs, every exposed id is remembered and an id whose tile was
  dropped is answered ``reply_expired``, never exposed again). A server that must never expose
  twice across restarts writes a journal before and after each exposure
  (``simulator/exposure_journal.py``).
* No CurveZMQ: keep it on 127.0.0.1, or add keys as in ``agent/protocol/security.py``.
* No dose bookkeeping beyond a running total.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
from collections import OrderedDict
from typing import Any

import numpy as np
import zmq

from agent.protocol.framing import decode, encode, require_libzmq, split_envelope
from agent.protocol.messages import (
    COMMANDS,
    AbortCommand,
    AbortReply,
    AcquireCommand,
    AcquireReply,
    ByeCommand,
    ByeReply,
    DescribeCommand,
    DescribeReply,
    ErrorCode,
    ErrorReply,
    HeartbeatEvent,
    HelloCommand,
    HelloReply,
    InstrumentDescription,
    ScanRequest,
    StatusCommand,
    StatusReply,
    TileInfo,
    error_reply,
    is_valid_id,
)

log = logging.getLogger("minimal-server")

MAX_COMMAND_BYTES = 1024 * 1024  # commands carry no arrays; a megabyte is generous
KEEP_REPLIES = 8  # recent tiles kept for answering retried request ids


class ScanEngine:
    """Your microscope. Replace the bodies of these methods with calls to your scan API.

    The stand-in below "scans" a smooth synthetic pattern so that the example runs anywhere.
    """

    def describe(self) -> InstrumentDescription:
        """The limits the agent plans within: stage (nm), pixel sizes (nm), dwell (µs), detectors."""
        return InstrumentDescription(
            name="Example STEM (minimal server)",
            stage_x_nm=(0.0, 1000.0),
            stage_y_nm=(0.0, 1000.0),
            pixel_size_nm=(0.01, 2.0),
            max_tile_shape=(2048, 2048),
            detectors=("HAADF",),
            beam_current_pa=20.0,
            dwell_us=(0.5, 50.0),
        )

    def scan(self, request: ScanRequest) -> np.ndarray:
        """Move the stage, scan, read the detector; return float32 ``[rows, cols]``.

        ``request.origin_nm`` is the stage position of pixel (0, 0)'s centre; pixel (row, col)
        lies at ``origin + (col, row) * pixel_size_nm``.
        """
        rows, cols = request.shape
        x0, y0 = request.origin_nm
        x = x0 + request.pixel_size_nm * np.arange(cols)
        y = y0 + request.pixel_size_nm * np.arange(rows)
        image = np.cos(2 * np.pi * x / 0.396)[None, :] * np.cos(2 * np.pi * y / 0.396)[:, None]
        return (100.0 * request.dwell_us * (1.0 + image)).astype(np.float32)

    def stop(self) -> None:
        """Blank the beam / stop the scan in progress (called on ``abort``)."""


class MinimalServer:
    """ROUTER for commands, PUB for heartbeats; one scan at a time.

    Parameters
    ----------
    engine : ScanEngine
        The microscope.
    bind : str
        Command endpoint, e.g. ``tcp://127.0.0.1:5555`` (``:*`` takes a free port).
    events_bind : str
        Event endpoint, e.g. ``tcp://127.0.0.1:5556``.
    heartbeat_s : float
        Heartbeat interval, seconds.
    """

    def __init__(self, engine: ScanEngine, bind: str, events_bind: str, heartbeat_s: float = 1.0) -> None:
        require_libzmq()  # 4.3.5 or later: older releases drop messages under load
        self.engine = engine
        self.description = engine.describe()
        self.heartbeat_s = heartbeat_s
        self.context = zmq.Context()
        self.router = self.context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 1000)
        self.router.setsockopt(zmq.MAXMSGSIZE, 16 * MAX_COMMAND_BYTES)
        self.router.bind(bind)
        self.endpoint = self.router.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.pub = self.context.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.bind(events_bind)
        self.events_endpoint = self.pub.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.replies: OrderedDict[str, tuple[ScanRequest, np.ndarray, TileInfo]] = OrderedDict()
        # Every id ever exposed, with its scan: a retry is never exposed twice, even once its tile is gone.
        self.exposed: dict[str, ScanRequest] = {}
        self.exposures = 0
        self.total_dose = 0.0
        self.started = time.monotonic()
        self.stopping = threading.Event()
        self.state = "idle"
        # Heartbeats come from their own thread so that they keep coming during a long scan;
        # the PUB socket is used by that thread only (ZeroMQ sockets are not thread-safe).
        self.heartbeats = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        seq = 0
        while not self.stopping.wait(self.heartbeat_s if seq else 0.0):
            event = HeartbeatEvent(seq=seq, t_s=time.time(), state=self.state)  # type: ignore[arg-type]
            self.pub.send_multipart([b"heartbeat", *encode(event)])
            seq += 1

    def serve_forever(self) -> None:
        """Answer commands until :meth:`stop` is called."""
        self.heartbeats.start()
        log.info("serving %s on %s (events %s)", self.description.name, self.endpoint, self.events_endpoint)
        try:
            while not self.stopping.is_set():
                if not self.router.poll(100):
                    continue
                frames = self.router.recv_multipart(copy=False)
                envelope, body = split_envelope(frames)  # DEALER: [id]; REQ: [id, b""]
                reply_frames = self.handle(body)
                self.router.send_multipart([*envelope, *reply_frames], copy=False)
        finally:
            self.stopping.set()
            self.heartbeats.join()
            self.router.close()
            self.pub.close()
            self.context.term()

    def stop(self) -> None:
        """Ask :meth:`serve_forever` to return."""
        self.stopping.set()

    def handle(self, body: list[Any]) -> list[Any]:
        """One command in, the frames of its reply out; errors become ``error`` replies."""
        try:
            # decode checks, in this order: size, protocol and version, the header's fields with
            # strict JSON types (and message_id, arrays, scan.request_id present), then the frames.
            command = decode(body, COMMANDS, max_message_bytes=MAX_COMMAND_BYTES, what="command").header
        except Exception as error:  # malformed: answer and keep serving
            log.warning("refused a message: %r", str(error))  # repr: a header's text cannot forge log lines
            return encode(error_reply(error, reply_to=readable_message_id(body)))
        log.info("%s %s", command.type, getattr(getattr(command, "scan", None), "request_id", ""))
        try:
            if isinstance(command, HelloCommand):
                return encode(
                    HelloReply(
                        reply_to=command.message_id,
                        server="minimal example server",
                        instrument=self.description.name,
                        capabilities=("acquire", "status", "events", "heartbeat", "reply-cache"),
                        max_message_bytes=MAX_COMMAND_BYTES,
                        heartbeat_s=self.heartbeat_s,
                        events_endpoint=self.events_endpoint,
                    )
                )
            if isinstance(command, DescribeCommand):
                return encode(DescribeReply(reply_to=command.message_id, instrument=self.description))
            if isinstance(command, AcquireCommand):
                return self.acquire(command)
            if isinstance(command, AbortCommand):
                self.engine.stop()
                return encode(AbortReply(reply_to=command.message_id))
            if isinstance(command, StatusCommand):
                return encode(
                    StatusReply(
                        reply_to=command.message_id,
                        state="idle",
                        exposures=self.exposures,
                        total_dose_e_per_a2=self.total_dose,
                        uptime_s=time.monotonic() - self.started,
                    )
                )
            if isinstance(command, ByeCommand):
                return encode(ByeReply(reply_to=command.message_id))
        except Exception as error:  # the scan API failed, or the request is out of range
            log.warning("%s failed: %s", command.type, error)
            return encode(error_reply(error, reply_to=command.message_id))
        return encode(
            ErrorReply(code=ErrorCode.BAD_MESSAGE, message="unknown command", reply_to=command.message_id)
        )

    def acquire(self, command: AcquireCommand) -> list[Any]:
        """Expose once per request id; a retried id gets the same tile again."""
        scan = command.scan
        cached = self.replies.get(scan.request_id)
        replayed = cached is not None  # answered from the cache: true, and nothing is exposed
        earlier = self.exposed.get(scan.request_id)
        if cached is None and earlier is not None:
            same = earlier == scan
            return encode(
                ErrorReply(
                    code=ErrorCode.REPLY_EXPIRED if same else ErrorCode.SCAN_REQUEST,
                    message=(
                        f"request {scan.request_id} was exposed already and its tile is no longer kept; "
                        "it is not exposed again: send a new request id to scan the area again"
                        if same
                        else f"request id {scan.request_id} was already used for a different scan"
                    ),
                    reply_to=command.message_id,
                    request_id=scan.request_id,
                )
            )
        if cached is None:
            self.description.check(scan)  # raises OutOfRange/OutsideStage: nothing exposed
            self.state = "acquiring"
            t_start = time.time()
            try:
                image = np.ascontiguousarray(self.engine.scan(scan), dtype=np.float32)
            finally:
                self.state = "idle"
            dose = self.description.dose_of(scan)
            self.exposures += 1
            self.total_dose += dose
            info = TileInfo(
                request_id=scan.request_id,
                origin_nm=scan.origin_nm,
                pixel_size_nm=scan.pixel_size_nm,
                dose_e_per_a2=dose,
                t_start=t_start,
                t_end=time.time(),
            )
            cached = (scan, image, info)
            self.exposed[scan.request_id] = scan
            self.replies[scan.request_id] = cached
            while len(self.replies) > KEEP_REPLIES:
                self.replies.popitem(last=False)
        elif cached[0] != scan:
            return encode(
                ErrorReply(
                    code=ErrorCode.SCAN_REQUEST,
                    message=f"request id {scan.request_id} was already used for a different scan",
                    reply_to=command.message_id,
                    request_id=scan.request_id,
                )
            )
        _, image, info = cached
        # The image goes out as one raw frame, without a copy; the header says dtype and shape.
        reply = AcquireReply(reply_to=command.message_id, tile=info, replayed=replayed)
        return encode(reply, {"image": image})


def readable_message_id(body: list[Any]) -> str | None:
    """The ``message_id`` of a refused command, if its header is a JSON object with a valid one.

    An error reply names it in ``reply_to`` so the client can match it; anything unreadable gets
    ``reply_to: null`` (docs/protocol.md, section 5).
    """
    try:
        raw = json.loads(bytes(body[0])) if body and len(body[0]) <= 64 * 1024 else None
    except (ValueError, RecursionError):
        return None
    message_id = raw.get("message_id") if isinstance(raw, dict) else None
    return message_id if isinstance(message_id, str) and is_valid_id(message_id) else None


def main() -> None:
    """Command line: ``--bind`` and ``--events-bind``; Ctrl-C stops."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bind", default="tcp://127.0.0.1:5555")
    parser.add_argument("--events-bind", default="tcp://127.0.0.1:5556")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    server = MinimalServer(ScanEngine(), args.bind, args.events_bind)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
