"""An instrument server in its own process, with optional injected faults, for the kill tests.

Run as ``python -m tests.link_server --endpoint-file F [--fault ...]`` from the repository root.
Faults:

``hang-in-exposure``
    The driver writes ``--marker`` and then never finishes the exposure (it is killed there).
``hang-before-reply``
    The exposure completes and is journaled; then the server writes ``--marker`` and its loop
    never sends the reply (nor another heartbeat): the process is killed there.
``hang-before-begin``
    The scan is validated; the server writes ``--marker`` before its ``begin`` record and hangs.
``hang-after-tile``
    The exposure completes and its tile file is written; the server writes ``--marker`` before
    the ``done`` record and hangs.
``slow-exposure``
    Every exposure first waits ``--delay`` seconds (a client may vanish meanwhile).

``--fsize BYTES`` limits the size of every file the process writes (``RLIMIT_FSIZE``): a full disk.
``--tile-budget BYTES`` sets the server's on-disk tile budget.
"""

from __future__ import annotations

import argparse
import json
import resource
import threading
import time
from pathlib import Path
from typing import Any

from agent.driver import ScanRequest, Tile
from simulator.config import SimulatorConfig
from simulator.drivers import SimulatedMicroscope
from simulator.server import InstrumentServer
from tests.conftest import SMALL_SPECIMEN


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bind", default="tcp://127.0.0.1:*")
    parser.add_argument("--events-bind", default="tcp://127.0.0.1:*")
    parser.add_argument("--journal", required=True)
    parser.add_argument("--endpoint-file", required=True)
    parser.add_argument(
        "--fault",
        choices=[
            "none",
            "hang-in-exposure",
            "hang-before-reply",
            "hang-before-begin",
            "hang-after-tile",
            "slow-exposure",
        ],
        default="none",
    )
    parser.add_argument("--marker")
    parser.add_argument("--heartbeat", type=float, default=0.1)
    parser.add_argument("--delay", type=float, default=1.0)
    parser.add_argument("--fsize", type=int)
    parser.add_argument("--tile-budget", type=int, default=8 << 30)
    args = parser.parse_args()
    marker = Path(args.marker) if args.marker else None
    if args.fsize:
        # Python ignores SIGXFSZ, so a write past the limit fails with EFBIG: a full disk.
        resource.setrlimit(resource.RLIMIT_FSIZE, (args.fsize, args.fsize))

    def hang_here(request_id: str) -> None:
        assert marker is not None
        marker.write_text(request_id)
        while True:  # the process is killed here
            time.sleep(1.0)

    class HangInExposure(SimulatedMicroscope):
        def _acquire(self, request: ScanRequest) -> Tile:
            assert marker is not None
            marker.write_text(request.request_id)
            threading.Event().wait()  # never returns: the process is killed mid-exposure
            raise AssertionError("unreachable")

    class HangBeforeReply(InstrumentServer):
        def _finish(self, scan: ScanRequest, outcome: Any) -> None:
            if isinstance(outcome, Tile):
                assert marker is not None
                marker.write_text(scan.request_id)
                while True:  # the loop stops here: no reply, no heartbeat
                    time.sleep(1.0)
            super()._finish(scan, outcome)

    class SlowExposure(SimulatedMicroscope):
        def _acquire(self, request: ScanRequest) -> Tile:
            time.sleep(args.delay)
            return super()._acquire(request)

    config = SimulatorConfig(seed=3, specimen=SMALL_SPECIMEN)
    driver_class = {"hang-in-exposure": HangInExposure, "slow-exposure": SlowExposure}.get(
        args.fault, SimulatedMicroscope
    )
    server_class = HangBeforeReply if args.fault == "hang-before-reply" else InstrumentServer
    with driver_class(config) as microscope:
        server = server_class(
            microscope,
            args.bind,
            events_bind=args.events_bind,
            journal=args.journal,
            heartbeat_s=args.heartbeat,
            tile_budget_bytes=args.tile_budget,
        )
        journal = server.journal
        if args.fault == "hang-before-begin":
            journal.begin = lambda scan, dose: hang_here(scan.request_id)  # type: ignore[method-assign]
        elif args.fault == "hang-after-tile":
            write_tile = journal._write_tile

            def write_then_hang(request_id: str, image: Any) -> int:
                write_tile(request_id, image)
                hang_here(request_id)
                raise AssertionError("unreachable")

            journal._write_tile = write_then_hang  # type: ignore[method-assign]
        server.start()
        endpoint_file = Path(args.endpoint_file)
        temporary = endpoint_file.with_suffix(".tmp")
        temporary.write_text(
            json.dumps({"endpoint": server.endpoint, "events_endpoint": server.events_endpoint})
        )
        temporary.replace(endpoint_file)  # the test never reads a half-written file
        server.wait()


if __name__ == "__main__":
    main()
