"""``micrography bench link``: latency and throughput of the instrument link over loopback TCP.

Three transports move the same float32 tiles, measured in the same run:

``micrography``
    The full protocol: a :class:`~agent.protocol.client.ZmqMicroscope` asks an
    :class:`~simulator.server.InstrumentServer` for a tile (fresh request id each time, header
    validation on both sides, reply cache, events and heartbeats running). The server's driver
    hands out a prepared tile, so the figures measure the link, not image formation; the server
    runs without a journal folder (the journal costs a disk write per tile, which is storage,
    not link, speed).
``raw_zmq``
    A bare pyzmq DEALER/ROUTER exchange: a few-byte request, the same tile bytes back as one
    zero-copy frame. The ceiling of the machine.
``json_list``
    The tile serialised as a JSON list of numbers, as some digital-twin microscope servers do.

Every server runs in its own process (the way an instrument server runs), each
configuration with and without CURVE encryption. Throughput is the tile's
payload (rows x cols x 4 bytes) divided by the median round trip.

Beside the round trips, ``abort`` is timed on a real exposure: a
:class:`~simulator.drivers.SimulatedMicroscope` (image formation included) behind an
:class:`~simulator.server.InstrumentServer` in its own process, a 4096x4096 scan aborted
about a second after it was asked for, timed from the client's ``abort()`` to the
``aborted`` reply of the acquisition.

Targets (2 CPU cores): the protocol keeps >= 80 % of ``raw_zmq`` throughput for 4096x4096
tiles without CURVE, is >= 100x faster than ``json_list``, a 512x512 round trip takes
<= 2 ms (median), and an abort ends a running 4096x4096 scan within 100 ms (median).
"""

from __future__ import annotations

import json
import multiprocessing
import re
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import zmq
from rich.progress import Progress

from agent.benchmarking import machine_info
from agent.driver import InstrumentDescription, MicroscopeDriver, ScanRequest, Tile
from agent.errors import AcquisitionAborted
from agent.protocol.client import ZmqMicroscope
from agent.protocol.security import CurveClientKeys, CurveServerKeys

TRANSPORTS: tuple[str, ...] = ("micrography", "raw_zmq", "json_list")
TILE_SIZES: tuple[int, ...] = (512, 4096)
PIXEL_SIZE_NM = 0.02
DWELL_US = 1.0
TARGET_FRACTION_OF_RAW = 0.8
TARGET_SPEEDUP_OVER_JSON = 100.0
TARGET_512_ROUNDTRIP_S = 0.002
TARGET_ABORT_S = 0.1
ABORT_AFTER_S = 1.0  # into the exposure: the server is rendering, well before the frame ends
_ABORT_SPECIMEN_NM = 90.0  # holds a 4096 px field at PIXEL_SIZE_NM (81.9 nm)

_Keys = tuple[bytes, bytes]


def bench_tile(tile_px: int) -> np.ndarray:
    """The tile every transport moves: seeded uniform float32 noise (incompressible, reproducible)."""
    return np.random.default_rng(tile_px).random((tile_px, tile_px), dtype=np.float32)


class PreparedMicroscope(MicroscopeDriver):
    """A driver that answers every scan with a tile prepared in advance (no image formation).

    Parameters
    ----------
    tile_sizes : sequence of int
        Square tile edges, pixels, to prepare with :func:`bench_tile`.
    """

    def __init__(self, tile_sizes: Sequence[int]) -> None:
        super().__init__()
        self._tiles = {n: bench_tile(n) for n in tile_sizes}
        largest = max(tile_sizes)
        self._description = InstrumentDescription(
            name="prepared tiles (link benchmark)",
            stage_x_nm=(0.0, 1000.0),
            stage_y_nm=(0.0, 1000.0),
            pixel_size_nm=(0.001, 1.0),
            max_tile_shape=(largest, largest),
            beam_current_pa=20.0,
            dwell_us=(0.1, 100.0),
        )

    def describe(self) -> InstrumentDescription:
        """A 1 x 1 µm stage that accepts the prepared tile sizes."""
        return self._description

    def _acquire(self, request: ScanRequest) -> Tile:
        return Tile(
            image=self._tiles[request.shape[0]],
            request=request,
            origin_nm=request.origin_nm,
            pixel_size_nm=request.pixel_size_nm,
            dose_e_per_a2=self._description.dose_of(request),
            t_start=time.time(),
            t_end=time.time(),
        )


# --------------------------------------------------------------------------- servers (child processes)


def _serve(
    transport: str,
    tile_sizes: Sequence[int],
    server_keys: _Keys | None,
    client_public: bytes | None,
    conn: Connection,
) -> None:
    """Child-process entry point: serve one transport until the parent says stop."""
    if transport == "micrography":
        from simulator.server import InstrumentServer

        curve = None
        if server_keys is not None and client_public is not None:
            curve = CurveServerKeys(server_keys[0], server_keys[1], frozenset({client_public}))
        with (
            PreparedMicroscope(tile_sizes) as driver,
            InstrumentServer(driver, "tcp://127.0.0.1:*", curve=curve) as server,
        ):
            conn.send(server.endpoint)
            conn.recv()
        return
    tiles = {n: bench_tile(n) for n in tile_sizes}
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    if server_keys is not None:
        router.curve_server = True
        router.curve_publickey, router.curve_secretkey = server_keys
    port = router.bind_to_random_port("tcp://127.0.0.1")
    conn.send(f"tcp://127.0.0.1:{port}")
    try:
        while not conn.poll():
            if not router.poll(100):
                continue
            identity, request = router.recv_multipart()
            tile_px = int(json.loads(request)["tile_px"])
            if transport == "raw_zmq":
                router.send_multipart([identity, b"tile", tiles[tile_px]], copy=False)
            else:
                body = json.dumps({"shape": [tile_px, tile_px], "image": tiles[tile_px].tolist()})
                router.send_multipart([identity, body.encode()])
    finally:
        router.close()
        context.term()


def _serve_simulated(conn: Connection) -> None:
    """Child-process entry point: a simulated microscope's server, until the parent says stop."""
    from simulator.config import SimulatorConfig, SpecimenConfig
    from simulator.drivers import SimulatedMicroscope
    from simulator.server import InstrumentServer
    from simulator.specimen import generate_specimen

    config = SimulatorConfig(seed=0, specimen=SpecimenConfig(size_nm=(_ABORT_SPECIMEN_NM,) * 2))
    specimen = generate_specimen(config.specimen, config.seed)
    with (
        SimulatedMicroscope(config, specimen) as driver,
        InstrumentServer(driver, "tcp://127.0.0.1:*") as server,
    ):
        conn.send(server.endpoint)
        conn.recv()


# --------------------------------------------------------------------------- clients


class _Client:
    """The client side of one transport: ``roundtrip(tile_px)`` returns the received tile."""

    def __init__(self, transport: str, endpoint: str, keys: dict[str, _Keys] | None) -> None:
        self.transport = transport
        self._context = zmq.Context()
        self._microscope: ZmqMicroscope | None = None
        self._socket: zmq.Socket[Any] | None = None
        if transport == "micrography":
            curve = None
            if keys is not None:
                curve = CurveClientKeys(keys["client"][0], keys["client"][1], keys["server"][0])
            self._microscope = ZmqMicroscope(endpoint, curve=curve, context=self._context, timeout_s=120.0)
        else:
            socket = self._context.socket(zmq.DEALER)
            socket.setsockopt(zmq.LINGER, 0)
            if keys is not None:
                socket.curve_serverkey = keys["server"][0]
                socket.curve_publickey, socket.curve_secretkey = keys["client"]
            socket.connect(endpoint)
            self._socket = socket

    def roundtrip(self, tile_px: int) -> np.ndarray:
        if self._microscope is not None:
            request = ScanRequest(
                x_nm=500.0,
                y_nm=500.0,
                shape=(tile_px, tile_px),
                pixel_size_nm=PIXEL_SIZE_NM,
                dwell_us=DWELL_US,
                request_id=uuid.uuid4().hex,  # a fresh id: a repeated one is answered from the cache
            )
            return self._microscope.acquire(request).image
        assert self._socket is not None
        self._socket.send(json.dumps({"tile_px": tile_px}).encode())
        if self.transport == "raw_zmq":
            frames = self._socket.recv_multipart(copy=False)
            return np.frombuffer(frames[1].buffer, dtype=np.float32).reshape(tile_px, tile_px)
        reply = json.loads(self._socket.recv())
        return np.asarray(reply["image"], dtype=np.float32)

    def close(self) -> None:
        if self._microscope is not None:
            self._microscope.close()
        if self._socket is not None:
            self._socket.close(linger=0)
        self._context.term()


def _round_trips(transport: str, tile_px: int, repeats: int) -> tuple[int, int]:
    """(warm-up, timed) round trips: fewer where one round trip takes many seconds."""
    if transport == "json_list":
        return (1, max(1, repeats)) if tile_px <= 1024 else (0, 1)
    return (3, max(20, 40 * repeats)) if tile_px <= 1024 else (1, max(1, 2 * repeats))


def _timed(client: _Client, tile_px: int, expected: np.ndarray, check: bool) -> float:
    start = time.perf_counter()
    image = client.roundtrip(tile_px)
    seconds = time.perf_counter() - start
    if check and not np.array_equal(image.view(np.uint32), expected.view(np.uint32)):
        raise RuntimeError(f"{client.transport} returned a tile that differs from the one sent")
    return seconds


def _measure(
    clients: dict[str, _Client], tile_px: int, curve: bool, repeats: int, tick: Callable[[], None]
) -> list[dict[str, Any]]:
    """Time every transport on one tile size; the binary transports take turns round by round."""
    expected = bench_tile(tile_px)
    seconds: dict[str, list[float]] = {name: [] for name in clients}
    binary = [name for name in clients if name != "json_list"]
    for name, client in clients.items():
        warmup, _ = _round_trips(name, tile_px, repeats)
        for index in range(warmup):
            _timed(client, tile_px, expected, check=index == 0)
    # Taking turns spreads the machine's slow moments (memory, scheduler) over all transports
    # alike, so their ratio is fair even when single figures wander.
    rounds = max((_round_trips(name, tile_px, repeats)[1] for name in binary), default=0)
    for index in range(rounds):
        for name in binary:
            seconds[name].append(_timed(clients[name], tile_px, expected, check=index == 0))
    if "json_list" in clients:
        _, timed = _round_trips("json_list", tile_px, repeats)
        for index in range(timed):
            seconds["json_list"].append(_timed(clients["json_list"], tile_px, expected, check=index == 0))
    rows = []
    for name in clients:
        median = statistics.median(seconds[name])
        rows.append(
            {
                "transport": name,
                "tile_px": tile_px,
                "curve": curve,
                "median_roundtrip_s": median,
                "min_roundtrip_s": min(seconds[name]),
                "throughput_mb_s": expected.nbytes / 1e6 / median,
                "payload_mb": expected.nbytes / 1e6,
                "round_trips": len(seconds[name]),
            }
        )
        tick()
    return rows


def measure_abort(repeats: int, tick: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Time ``abort`` on running 4096x4096 exposures of a simulated microscope over the link.

    Parameters
    ----------
    repeats : int
        Exposures aborted, each under a fresh request id.
    tick : callable
        Called after each one (progress).

    Returns
    -------
    dict
        ``median_s``, ``max_s`` and ``seconds`` (client ``abort()`` to the acquisition's
        ``aborted`` reply, s), ``rows_scanned`` of ``rows`` per exposure, ``abort_after_s``.
    """
    spawn = multiprocessing.get_context("spawn")
    parent, child = spawn.Pipe()
    process = spawn.Process(target=_serve_simulated, args=(child,), daemon=True)
    process.start()
    seconds: list[float] = []
    rows_scanned: list[int] = []
    rows = 4096
    try:
        if not parent.poll(60):
            raise RuntimeError("the simulated benchmark server did not start within 60 s")
        with ZmqMicroscope(parent.recv(), timeout_s=30.0) as client:
            for _ in range(repeats):
                request = ScanRequest(
                    x_nm=_ABORT_SPECIMEN_NM / 2,
                    y_nm=_ABORT_SPECIMEN_NM / 2,
                    shape=(rows, rows),
                    pixel_size_nm=PIXEL_SIZE_NM,
                    dwell_us=DWELL_US,
                    request_id=uuid.uuid4().hex,
                )
                outcome: list[tuple[BaseException | None, float]] = []
                worker = threading.Thread(target=_scan_timed, args=(client, request, outcome), daemon=True)
                worker.start()
                time.sleep(ABORT_AFTER_S)
                asked = time.perf_counter()
                client.abort()
                worker.join(60.0)
                error, ended = outcome[0] if outcome else (None, asked)
                if not isinstance(error, AcquisitionAborted):
                    raise RuntimeError(f"the aborted 4096x4096 exposure ended with {error!r}, not 'aborted'")
                seconds.append(ended - asked)
                rows_scanned.append(_rows_of(str(error)))
                tick()
    finally:
        parent.send("stop")
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
            process.join()
    return {
        "tile_px": rows,
        "abort_after_s": ABORT_AFTER_S,
        "median_s": statistics.median(seconds),
        "max_s": max(seconds),
        "seconds": seconds,
        "rows_scanned": rows_scanned,
        "rows": rows,
    }


def _scan_timed(
    client: ZmqMicroscope, request: ScanRequest, outcome: list[tuple[BaseException | None, float]]
) -> None:
    """Acquire ``request``; append (the error or None, the perf-counter time it ended)."""
    try:
        client.acquire(request)
        outcome.append((None, time.perf_counter()))
    except BaseException as error:  # handed to the measuring thread, which reports it
        outcome.append((error, time.perf_counter()))


def _rows_of(message: str) -> int:
    """Lines scanned, from the server's ``aborted after N of M lines`` (-1 if it does not say)."""
    found = re.search(r"after (\d+) of \d+ lines", message)
    return int(found.group(1)) if found else -1


def benchmark_link(
    *,
    tile_sizes: Sequence[int] = TILE_SIZES,
    transports: Sequence[str] = TRANSPORTS,
    curve_modes: Sequence[bool] = (False, True),
    repeats: int = 5,
    abort_repeats: int | None = None,
) -> dict[str, Any]:
    """Measure every transport, tile size and CURVE setting in one run.

    Parameters
    ----------
    tile_sizes : sequence of int
        Square tile edges, pixels.
    transports : sequence of str
        Any of :data:`TRANSPORTS`.
    curve_modes : sequence of bool
        Without and/or with CURVE encryption.
    repeats : int
        Sets the timed round trips: twice this for large tiles, 40 times this for small tiles
        (<= 1024 px), this for small JSON-list tiles. A 4096x4096 JSON-list round trip is timed
        once (it takes about 15 s).
    abort_repeats : int or None
        Running 4096x4096 exposures aborted (:func:`measure_abort`); None: ``repeats``; 0: none.

    Returns
    -------
    dict
        ``{"benchmark": "link", "rows": [...], "targets": [...], "machine": {...}, ...}``; each row
        has ``transport``, ``tile_px``, ``curve``, ``median_roundtrip_s``, ``throughput_mb_s``,
        ``min_roundtrip_s``, ``payload_mb`` and ``round_trips``; ``abort`` is
        :func:`measure_abort`'s result (None when not measured).
    """
    unknown = set(transports) - set(TRANSPORTS)
    if unknown:
        raise ValueError(f"unknown transports {sorted(unknown)}; choose from {list(TRANSPORTS)}")
    keys = {"server": zmq.curve_keypair(), "client": zmq.curve_keypair()}
    spawn = multiprocessing.get_context("spawn")
    rows: list[dict[str, Any]] = []
    aborts = repeats if abort_repeats is None else abort_repeats
    abort: dict[str, Any] | None = None
    with Progress(transient=True) as progress:
        task = progress.add_task(
            "link round trips", total=len(curve_modes) * len(tile_sizes) * len(transports) + aborts
        )
        for curve in curve_modes:
            servers: list[tuple[Any, Connection]] = []
            clients: dict[str, _Client] = {}
            try:
                for name in transports:
                    progress.update(task, description=f"starting {name}{' + CURVE' if curve else ''}")
                    parent, child = spawn.Pipe()
                    process = spawn.Process(
                        target=_serve,
                        args=(
                            name,
                            tuple(tile_sizes),
                            keys["server"] if curve else None,
                            keys["client"][0] if curve else None,
                            child,
                        ),
                        daemon=True,
                    )
                    process.start()
                    servers.append((process, parent))
                    if not parent.poll(60):
                        raise RuntimeError(f"the {name} benchmark server did not start within 60 s")
                    clients[name] = _Client(name, parent.recv(), keys if curve else None)
                for tile_px in tile_sizes:
                    progress.update(task, description=f"{tile_px}x{tile_px}{' + CURVE' if curve else ''}")
                    rows += _measure(clients, tile_px, curve, repeats, lambda: progress.advance(task))
            finally:
                for client in clients.values():
                    client.close()
                for process, parent in servers:
                    parent.send("stop")
                    process.join(timeout=30)
                    if process.is_alive():
                        process.kill()
                        process.join()
        if aborts > 0:
            progress.update(task, description="abort of a running 4096x4096 exposure")
            abort = measure_abort(aborts, lambda: progress.advance(task))
    rows.sort(key=lambda row: (TRANSPORTS.index(row["transport"]), row["curve"], row["tile_px"]))
    return {
        "benchmark": "link",
        "rows": rows,
        "abort": abort,
        "targets": _targets(rows, abort),
        "repeats": repeats,
        "libzmq": zmq.zmq_version(),
        "pyzmq": zmq.pyzmq_version(),
        "machine": machine_info(),
    }


def _row(
    rows: list[dict[str, Any]], transport: str, tile_px: int, curve: bool = False
) -> dict[str, Any] | None:
    for row in rows:
        if (row["transport"], row["tile_px"], row["curve"]) == (transport, tile_px, curve):
            return row
    return None


def _targets(rows: list[dict[str, Any]], abort: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    targets = []
    ours, raw, slow = (_row(rows, name, 4096) for name in TRANSPORTS)
    if ours and raw:
        fraction = ours["throughput_mb_s"] / raw["throughput_mb_s"]
        targets.append(
            {
                "name": "micrography / raw_zmq throughput, 4096x4096, no CURVE",
                "value": fraction,
                "target": f">= {TARGET_FRACTION_OF_RAW}",
                "met": fraction >= TARGET_FRACTION_OF_RAW,
            }
        )
    if ours and slow:
        speedup = ours["throughput_mb_s"] / slow["throughput_mb_s"]
        targets.append(
            {
                "name": "micrography / json_list throughput, 4096x4096, no CURVE",
                "value": speedup,
                "target": f">= {TARGET_SPEEDUP_OVER_JSON:g}",
                "met": speedup >= TARGET_SPEEDUP_OVER_JSON,
            }
        )
    small = _row(rows, "micrography", 512)
    if small:
        targets.append(
            {
                "name": "micrography 512x512 median round trip, no CURVE (s)",
                "value": small["median_roundtrip_s"],
                "target": f"<= {TARGET_512_ROUNDTRIP_S}",
                "met": small["median_roundtrip_s"] <= TARGET_512_ROUNDTRIP_S,
            }
        )
    if abort:
        targets.append(
            {
                "name": "abort to 'aborted' reply, running 4096x4096 exposure, median (s)",
                "value": abort["median_s"],
                "target": f"<= {TARGET_ABORT_S}",
                "met": abort["median_s"] <= TARGET_ABORT_S,
            }
        )
    return targets


def format_report(report: dict[str, Any]) -> str:
    """The link benchmark as a text table, then the targets."""
    lines = [
        f"loopback TCP, libzmq {report['libzmq']}, pyzmq {report['pyzmq']}",
        f"{'transport':<12} {'tile':>10} {'CURVE':>5} {'median ms':>10} {'MB/s':>9} {'trips':>6}",
    ]
    for row in report["rows"]:
        lines.append(
            f"{row['transport']:<12} {row['tile_px']:>5}x{row['tile_px']:<4} "
            f"{'yes' if row['curve'] else 'no':>5} "
            f"{1e3 * row['median_roundtrip_s']:>10.3f} {row['throughput_mb_s']:>9.1f} {row['round_trips']:>6}"
        )
    abort = report.get("abort")
    if abort:
        lines.append(
            f"abort {abort['abort_after_s']:g} s into a {abort['tile_px']}x{abort['tile_px']} exposure: "
            f"median {1e3 * abort['median_s']:.1f} ms, max {1e3 * abort['max_s']:.1f} ms to the reply; "
            f"lines scanned {', '.join(map(str, abort['rows_scanned']))} of {abort['rows']}"
        )
    for target in report["targets"]:
        lines.append(
            f"target: {target['name']}: {target['value']:.4g} ({target['target']}) "
            f"{'ok' if target['met'] else 'MISSED'}"
        )
    return "\n".join(lines)
