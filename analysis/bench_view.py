"""``micrography bench view``: what the live view costs a session, and how far behind it draws.

Guided sessions on the default synthetic specimen (the main job's configuration with a smaller
tile budget), each seed run twice: without the view, and with it served and a real headless
Chromium drawing the page (a plain WebSocket client where no browser is installed; the report
says which). The order alternates between seeds so a machine that slows down over the run does
not favour one side.

- **Step time.** The wall time between consecutive tiles being journaled, median per session
  (the first tile after the survey left out). Target: with the view within 5 % of without
  (judged on the mean over seeds of ``median_with / median_without - 1``). The feed's own cost
  per step (building the survey mosaic once, the tile PNG, the maps) is timed directly too.
- **Latency.** Seconds from a step being journaled to the page having drawn it (the page's own
  clock, the same machine). Target: every step within 0.5 s (judged on the maximum).

``--screenshot PATH`` also takes the README's picture of the page: a separate short session with
a "skip" and a "look here" mark made as from the page, captured as it ends.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.progress import Progress

from agent.benchmarking import machine_info, mean_spread
from agent.session import BudgetConfig, Session, SessionConfig
from agent.view import SessionFeed, ViewServer
from analysis.browser import BrowserMissing, headless_chromium
from simulator.config import SimulatorConfig, SpecimenConfig
from simulator.drivers import SimulatedMicroscope
from simulator.specimen import generate_specimen

TARGETS = {"step_time_overhead": 0.05, "max_latency_s": 0.5}
SEEDS: tuple[int, ...] = (20, 21, 22, 23, 24)
"""Specimen and session seeds (none tuned on)."""


class _Client:
    """A page for the benchmark: headless Chromium if there is one, else a WebSocket client."""

    def __init__(self, url: str, browser: bool, window_px: tuple[int, int] = (1500, 1300)) -> None:
        self.kind = "chromium"
        self.latencies: list[float] = []
        self._driver: Any = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        try:
            if not browser:
                raise BrowserMissing("asked for no browser")
            self._driver = headless_chromium(*window_px)
            self._driver.get(url)
            deadline = time.monotonic() + 10
            while (
                not self._driver.execute_script("return view.info !== null") and time.monotonic() < deadline
            ):
                time.sleep(0.05)
        except BrowserMissing:
            self.kind = "websocket"
            self._thread = threading.Thread(target=lambda: asyncio.run(self._listen(url)), daemon=True)
            self._thread.start()

    async def _listen(self, url: str) -> None:
        import websockets

        async with websockets.connect(url.replace("http", "ws", 1) + "ws", max_size=None) as socket:
            while not self._stop.is_set():
                try:
                    message = json.loads(await asyncio.wait_for(socket.recv(), 0.5))
                except TimeoutError:
                    continue
                if message["type"] == "step":
                    self.latencies.append(time.time() - message["step"]["journaled_unix_s"])

    def _browser_processes(self) -> list[Any]:
        import psutil

        if self._driver is None:
            return []
        return psutil.Process(self._driver.service.process.pid).children(recursive=True)

    def cpu_s(self) -> float:
        """CPU seconds the browser's processes have used so far (0 for the WebSocket client)."""
        import psutil

        total = 0.0
        for process in self._browser_processes():
            try:
                times = process.cpu_times()
            except psutil.Error:  # a renderer that has just exited used nothing more
                continue
            total += times.user + times.system
        return total

    def close(self) -> list[float]:
        """Stop; returns the latency of every step drawn (or received), s."""
        if self._driver is not None:
            time.sleep(0.5)  # the last step's message is on its way
            self.latencies = list(self._driver.execute_script("return view.drawn;"))
            self._driver.quit()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        return self.latencies


def view_session(
    seed: int,
    tiles: int,
    view: bool,
    browser: bool = True,
    on_step: Callable[[Session, Any], None] | None = None,
    screenshot: str | Path | None = None,
) -> dict[str, Any]:
    """One guided session on the default specimen, with or without the live view.

    Parameters
    ----------
    seed : int
        Specimen and session seed.
    tiles : int
        Tiles after the survey.
    view : bool
        Serve the view and connect a page to it.
    browser : bool
        The page is headless Chromium where installed (else a WebSocket client).
    on_step : callable, optional
        Also called with the session and each step (the screenshot's marks).
    screenshot : str or pathlib.Path, optional
        Save the page here as the session ends (needs Chromium).

    Returns
    -------
    dict
        ``median_step_s``, ``steps``, and with the view ``feed_ms`` (median cost of the feed per
        step), ``latencies_s`` and ``client``.
    """
    simulator = SimulatorConfig(seed=seed, specimen=SpecimenConfig())
    specimen = generate_specimen(simulator.specimen, seed)
    config = SessionConfig(seed=seed, budget=BudgetConfig(max_tiles=tiles))
    journaled: list[float] = []
    feed_s: list[float] = []
    with SimulatedMicroscope(simulator, specimen) as microscope:
        session = Session(microscope, config)
        feed = SessionFeed(session) if view else None

        def step(record: Any) -> None:
            if feed is not None:
                tick = time.perf_counter()
                feed.on_step(record)
                feed_s.append(time.perf_counter() - tick)
            if on_step is not None:
                on_step(session, record)
            if record.kind != "survey":
                journaled.append(time.perf_counter())

        session.on_step = step
        server = client = None
        if feed is not None:
            server = ViewServer(feed.hub, feed.state, session.operator, "127.0.0.1:0").start()
            # The README's picture shows the whole page, curves and timings included.
            client = _Client(server.url, browser, (1500, 2000) if screenshot is not None else (1500, 1300))
        cpu_before = client.cpu_s() if client is not None else 0.0
        try:
            session.run()
            cpu = (client.cpu_s() - cpu_before) if client is not None else 0.0
            if screenshot is not None and client is not None and client._driver is not None:
                time.sleep(1.0)
                Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
                client._driver.save_screenshot(str(screenshot))
            if feed is not None:
                feed.finished()
        finally:
            latencies = client.close() if client is not None else []
            if server is not None:
                server.close()
    intervals = [b - a for a, b in itertools.pairwise(journaled[1:])]
    result: dict[str, Any] = {"median_step_s": float(statistics.median(intervals)), "steps": len(intervals)}
    if view:
        result |= {
            "feed_ms": 1e3 * float(statistics.median(feed_s)),
            "latencies_s": [round(v, 4) for v in latencies],
            "client": client.kind if client is not None else None,
            "browser_cpu_s_per_step": cpu / max(len(journaled), 1),
        }
    return result


def take_screenshot(path: str | Path, seed: int = 0, tiles: int = 24) -> Path:
    """The README's picture: a short session with a skip and a look-here mark, saved as it ends."""

    def marks(session: Session, record: Any) -> None:
        if record.kind == "start" and not session.operator.received:
            (x0, x1), (y0, y1) = session.description.stage_x_nm, session.description.stage_y_nm
            w, h = x1 - x0, y1 - y0
            session.operator.submit(
                {"action": "skip", "region_nm": [x0, x0 + 0.3 * w, y0 + 0.6 * h, y1], "source": "page"}
            )
            session.operator.submit(
                {"action": "look", "region_nm": [x0 + 0.6 * w, x1 - 0.05 * w, y0 + 0.05 * h, y0 + 0.3 * h],
                 "source": "page"}
            )  # fmt: skip

    view_session(seed, tiles, True, on_step=marks, screenshot=path)
    return Path(path)


def benchmark_view(
    seeds: Sequence[int] = SEEDS, tiles: int = 30, browser: bool = True, screenshot: str | Path | None = None
) -> dict[str, Any]:
    """Both measurements over the seeds, with the targets judged (see the module notes).

    Returns
    -------
    dict
        ``rows`` (per seed: without, with), ``overhead`` and ``feed_ms`` (mean and spread over
        seeds), ``latency_s`` (median, p95, max over every step of every seed), ``client``,
        ``targets``, ``target_results``, ``machine``.
    """
    rows = []
    with Progress() as progress:
        task = progress.add_task("view bench sessions", total=3 * len(seeds) + (screenshot is not None))
        for k, seed in enumerate(seeds):
            runs: dict[str, dict[str, Any]] = {}
            cases = ["without", "with", "remote"]
            for case in cases if k % 2 == 0 else cases[::-1]:
                runs[case] = view_session(seed, tiles, case != "without", browser and case == "with")
                progress.advance(task)
            rows.append({"seed": seed, **runs})
        if screenshot is not None:
            take_screenshot(screenshot)
            progress.advance(task)
    overheads = [r["with"]["median_step_s"] / r["without"]["median_step_s"] - 1 for r in rows]
    remote = [r["remote"]["median_step_s"] / r["without"]["median_step_s"] - 1 for r in rows]
    latencies = sorted(v for r in rows for v in r["with"]["latencies_s"])
    latency = {
        "median": statistics.median(latencies) if latencies else None,
        "p95": latencies[int(0.95 * (len(latencies) - 1))] if latencies else None,
        "max": latencies[-1] if latencies else None,
        "steps": len(latencies),
    }
    results = {
        "step_time_overhead": {
            "value": statistics.fmean(overheads),
            "met": statistics.fmean(overheads) <= TARGETS["step_time_overhead"],
        },
        "max_latency_s": {
            "value": latency["max"],
            "met": latency["max"] is not None and latency["max"] <= TARGETS["max_latency_s"],
        },
    }
    return {
        "benchmark": "view",
        "seeds": list(seeds),
        "tiles": tiles,
        "client": rows[0]["with"]["client"],
        "rows": rows,
        "overhead": mean_spread(overheads),
        "overhead_remote": mean_spread(remote),
        "browser_cpu_s_per_step": mean_spread([r["with"]["browser_cpu_s_per_step"] for r in rows]),
        "feed_ms": mean_spread([r["with"]["feed_ms"] for r in rows]),
        "latency_s": latency,
        "screenshot": None if screenshot is None else str(screenshot),
        "targets": TARGETS,
        "target_results": results,
        "machine": machine_info(),
    }


def format_report(report: dict[str, Any]) -> str:
    """The view benchmark as a text table."""
    lines = [
        f"guided sessions of {report['tiles']} tiles on the default specimen, page: {report['client']}",
        "median step time, s: without the view; with it and the page in a browser on this machine; with",
        "it and the page elsewhere (a WebSocket client here); browser CPU s per step; max journaled->drawn",
        f"{'seed':>5} {'without':>8} {'browser':>8} {'overhead':>9} {'remote':>8} {'overhead':>9}"
        f" {'feed ms':>8} {'cpu s':>6} {'max lag s':>10}",
    ]
    for row in report["rows"]:
        without, with_, remote = row["without"], row["with"], row["remote"]
        lags = with_["latencies_s"]
        lines.append(
            f"{row['seed']:>5} {without['median_step_s']:>8.3f} {with_['median_step_s']:>8.3f}"
            f" {with_['median_step_s'] / without['median_step_s'] - 1:>9.1%} {remote['median_step_s']:>8.3f}"
            f" {remote['median_step_s'] / without['median_step_s'] - 1:>9.1%} {with_['feed_ms']:>8.1f}"
            f" {with_['browser_cpu_s_per_step']:>6.3f} {max(lags) if lags else float('nan'):>10.3f}"
        )
    overhead, latency = report["overhead"], report["latency_s"]
    lines += [
        f"step-time overhead, browser here: {overhead['mean']:.1%} +- {overhead['std']:.1%} (mean +- sd over "
        f"seeds); page elsewhere: {report['overhead_remote']['mean']:.1%}"
        f" +- {report['overhead_remote']['std']:.1%}",
        f"browser CPU per step: {report['browser_cpu_s_per_step']['mean']:.3f} s",
        f"feed cost per step: {report['feed_ms']['mean']:.1f} +- {report['feed_ms']['std']:.1f} ms",
        f"journaled -> drawn: median {latency['median']:.3f} s, p95 {latency['p95']:.3f} s, "
        f"max {latency['max']:.3f} s over {latency['steps']} steps",
        "",
    ]
    for key, result in report["target_results"].items():
        verdict = "met" if result["met"] else "MISSED"
        lines.append(f"target {key}: {result['value']:.3f} (target {TARGETS[key]}) {verdict}")
    if report.get("screenshot"):
        lines.append(f"screenshot: {report['screenshot']}")
    return "\n".join(lines)
