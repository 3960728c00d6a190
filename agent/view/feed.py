"""What the live view shows, built from a running session or from a journal.

A :class:`ViewHub` holds the latest picture of a session (survey mosaic, every tile's place
and score, the newest tile with its columns, the surrogate's posterior, curves, timings,
budget, operator state) and hands every update to the page's subscribers. Two feeds fill it:

- :class:`SessionFeed` reads a running :class:`~agent.session.Session` through its public,
  read-only surface: the ``on_step`` hook, ``steps``, ``policy`` and ``operator``. It runs in the
  session's thread right after each step is journaled and costs a few milliseconds (a 256 px
  image and a few thousand numbers), never a model evaluation.
- :class:`JournalFeed` follows a journal file (finished, or still written by another process:
  the journal is SWMR HDF5) and shows what it records; the surrogate's posterior is not
  journaled, so that panel stays empty there.

Messages are JSON text: ``hello`` (everything so far, for a page that connects), ``step``
(one new step), ``state`` (operator state changed). Positions are stage nm, doses e-/Å²,
times s; every step carries ``journaled_unix_s`` so a page can show how far behind it is.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["JournalFeed", "SessionFeed", "ViewHub", "grey_base64", "survey_mosaic"]

TILE_VIEW_PX = 256
"""The newest tile is sent at most this many pixels across (block-averaged)."""
SURVEY_VIEW_PX = 512
"""The survey mosaic is sent at most this many pixels across."""


def grey_base64(image: np.ndarray, clip_percent: float = 0.5) -> str:
    """An image as 8-bit grey levels, contrast clipped at the given percentiles, base64 text.

    Raw bytes rather than PNG: encoding a PNG costs a session milliseconds per tile, base64 of
    raw bytes a tenth of one, and the page turns either into canvas pixels.

    Parameters
    ----------
    image : numpy.ndarray
        2-D image, any units (NaN shows black).
    clip_percent : float
        Percent of pixels saturated at each end of the grey scale.

    Returns
    -------
    str
        ``rows * cols`` bytes, row-major, base64-encoded.

    Examples
    --------
    >>> grey_base64(np.array([[0.0, 1.0]]), clip_percent=0.0)
    'AP8='
    """
    values = np.asarray(image, dtype=np.float32)
    # Every third pixel sets a large image's grey scale as well as all of them, at a ninth of the cost.
    sample = values[::3, ::3] if values.ndim == 2 and values.size > 10_000 else values
    finite = sample[np.isfinite(sample)]
    low, high = np.percentile(finite, [clip_percent, 100 - clip_percent]) if finite.size else (0.0, 1.0)
    scale = 255.0 / (high - low) if high > low else 0.0
    grey = np.clip((np.nan_to_num(values, nan=low) - low) * scale, 0, 255).astype(np.uint8)
    return base64.b64encode(grey.tobytes()).decode("ascii")


def _b64(values: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(values).tobytes()).decode("ascii")


def _block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """Average ``factor`` x ``factor`` blocks (the edge rows and columns that do not fill one are dropped)."""
    if factor <= 1:
        return np.asarray(image, dtype=np.float32)
    rows, cols = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
    cropped = np.asarray(image[:rows, :cols], dtype=np.float32)
    # Summing strided views is ten times faster than a reshaped mean over two axes.
    total = np.zeros((rows // factor, cols // factor), dtype=np.float32)
    for i in range(factor):
        for j in range(factor):
            total += cropped[i::factor, j::factor]
    return total / (factor * factor)


def survey_mosaic(
    tiles: list[tuple[np.ndarray, tuple[float, float], float]],
    extent_nm: tuple[float, float, float, float],
    max_px: int = SURVEY_VIEW_PX,
) -> np.ndarray:
    """Place survey tiles on one low-resolution canvas covering the stage.

    Parameters
    ----------
    tiles : list of (image, (x0, y0) nm, pixel size nm)
        Each survey tile, its pixel (0, 0) at stage ``(x0, y0)``.
    extent_nm : tuple of float
        ``(x_min, x_max, y_min, y_max)`` of the canvas, stage nm.
    max_px : int
        Canvas size along its longer side, pixels.

    Returns
    -------
    numpy.ndarray
        The mosaic, rows along y; NaN where no tile reached.
    """
    x0, x1, y0, y1 = extent_nm
    step = max(x1 - x0, y1 - y0) / max_px
    canvas = np.full((max(math.ceil((y1 - y0) / step), 1), max(math.ceil((x1 - x0) / step), 1)), np.nan)
    for image, (tx, ty), pixel in tiles:
        factor = max(int(step / pixel), 1)
        small = _block_mean(image, factor)
        rows = np.clip(
            ((ty + (np.arange(small.shape[0]) + 0.5) * pixel * factor - y0) / step).astype(int),
            0,
            canvas.shape[0] - 1,
        )
        cols = np.clip(
            ((tx + (np.arange(small.shape[1]) + 0.5) * pixel * factor - x0) / step).astype(int),
            0,
            canvas.shape[1] - 1,
        )
        canvas[np.ix_(rows, cols)] = small
    return canvas


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def tile_payload(
    index: int,
    image: np.ndarray,
    columns: Any,
    extent_nm: tuple[float, float, float, float],
    pixel_size_nm: float,
) -> dict[str, Any]:
    """The newest tile for the page: a small image, its place, and its columns in image pixels.

    Parameters
    ----------
    index : int
        Step number.
    image : numpy.ndarray
        The tile.
    columns : agent.columns.Columns or None
        Columns found in it (``row_px``/``col_px`` in tile pixels, ``species``, ``abnormal``).
    extent_nm : tuple of float
        The tile's registered area, stage nm.
    pixel_size_nm : float
        Tile pixel size, nm.

    Returns
    -------
    dict
        ``index``, ``grey`` (:func:`grey_base64`), ``shape`` (rows, cols sent), ``extent_nm``,
        ``view_pixel_nm`` and ``columns``: ``count``, then base64 arrays ``xy`` (float32 pairs,
        sent pixels), ``site`` (uint8: 0 A, 1 B, 2 O) and ``abnormal`` (uint8 0/1).
    """
    factor = max(math.ceil(max(image.shape) / TILE_VIEW_PX), 1)
    small = _block_mean(image, factor)
    payload: dict[str, Any] = {
        "index": index,
        "grey": grey_base64(small),
        "shape": list(small.shape),
        "extent_nm": [float(v) for v in extent_nm],
        "view_pixel_nm": pixel_size_nm * factor,
        "columns": None,
    }
    if columns is not None and len(columns.col_px):
        xy = np.stack([np.asarray(columns.col_px), np.asarray(columns.row_px)], axis=1)
        payload["columns"] = {
            "count": len(columns.col_px),
            "xy": _b64(((xy + 0.5) / factor - 0.5).astype("<f4")),
            "site": _b64(np.asarray(columns.species, dtype=np.uint8)),
            "abnormal": _b64(np.asarray(columns.abnormal, dtype=np.uint8)),
        }
    return payload


def step_summary(
    index: int, record: dict[str, Any], extent_nm: tuple[float, float, float, float]
) -> dict[str, Any]:
    """One step as the page's tile path and curves need it (no image).

    Parameters
    ----------
    index : int
        Step number.
    record : dict
        The step's journal record (:meth:`agent.session.StepRecord.to_record`).
    extent_nm : tuple of float
        Its registered area, stage nm.
    """
    wall = record.get("wall")
    return {
        "index": index,
        "kind": record.get("kind"),
        "request_id": (record.get("request") or {}).get("request_id"),
        "extent_nm": [float(v) for v in extent_nm],
        "score": _finite(record.get("score")),
        "wall": None
        if not wall
        else {
            "point_nm": wall["point_nm"],
            "direction": wall["direction"],
            "half_length_nm": wall["half_length_nm"],
        },
        "mean_dose_e_per_a2": _finite(record.get("mean_dose_e_per_a2")),
        "instrument_time_s": _finite(record.get("instrument_time_s")),
        "dwell_us": (record.get("request") or {}).get("dwell_us"),
        "timings": {k: round(float(v), 5) for k, v in (record.get("timings") or {}).items()},
        "operator": [a.get("action") for a in record.get("operator", [])],
        "discovered": None,
        "journaled_unix_s": time.time(),
    }


class ViewHub:
    """The latest picture of one session, and the page connections waiting for updates (thread-safe).

    Parameters
    ----------
    info : dict
        What does not change: ``session_id``, ``policy``, ``seed``, ``stage_nm`` (x_min, x_max,
        y_min, y_max), ``grid_shape``, ``grid_extent_nm``, ``source`` (``"session"`` or
        ``"journal"``), ``controllable``.
    """

    def __init__(self, info: dict[str, Any]) -> None:
        self.info = dict(info)
        self._lock = threading.Lock()
        self.survey: dict[str, Any] | None = None
        self.steps: list[dict[str, Any]] = []
        self.tile: dict[str, Any] | None = None
        self.maps: dict[str, Any] | None = None
        self.state: dict[str, Any] = {"phase": "starting"}
        self._subscribers: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[str]]] = []
        self.published = 0
        """Messages published so far (a test waits on it)."""

    def hello(self) -> str:
        """Everything so far, as the first message to a page that connects (JSON text)."""
        with self._lock:
            return json.dumps(
                {
                    "type": "hello",
                    "info": self.info,
                    "survey": self.survey,
                    "steps": self.steps,
                    "tile": self.tile,
                    "maps": self.maps,
                    "state": self.state,
                    "sent_unix_s": time.time(),
                }
            )

    def subscribe(self, loop: asyncio.AbstractEventLoop) -> asyncio.Queue[str]:
        """A queue that receives every message published from now on (call from ``loop``)."""
        queue: asyncio.Queue[str] = asyncio.Queue()
        with self._lock:
            self._subscribers.append((loop, queue))
        return queue

    def unsubscribe(self, queue: asyncio.Queue[str]) -> None:
        """Stop sending to ``queue``."""
        with self._lock:
            self._subscribers = [(loop, q) for loop, q in self._subscribers if q is not queue]

    def _send(self, message: dict[str, Any]) -> None:
        message["sent_unix_s"] = time.time()
        text = json.dumps(message)
        with self._lock:
            subscribers = list(self._subscribers)
            self.published += 1
        for loop, inbox in subscribers:
            try:
                loop.call_soon_threadsafe(inbox.put_nowait, text)
            except RuntimeError:  # that page's server loop has closed
                self.unsubscribe(inbox)

    def set_survey(self, survey: dict[str, Any]) -> None:
        """The survey mosaic (``png``, ``extent_nm``), sent once."""
        with self._lock:
            self.survey = survey
        self._send({"type": "survey", "survey": survey})

    def add_step(
        self,
        summary: dict[str, Any],
        tile: dict[str, Any] | None,
        maps: dict[str, Any] | None,
        state: dict[str, Any],
    ) -> None:
        """A new step: its summary, the newest tile (None: keep the last), the maps, the state."""
        with self._lock:
            self.steps.append(summary)
            if tile is not None:
                self.tile = tile
            if maps is not None:
                self.maps = maps
            self.state = state
        self._send({"type": "step", "step": summary, "tile": tile, "maps": maps, "state": state})

    def set_state(self, state: dict[str, Any]) -> None:
        """The operator state changed (paused, marks, stop) or the session ended."""
        with self._lock:
            self.state = state
        self._send({"type": "state", "state": state})


def _stage_extent(instrument: dict[str, Any]) -> tuple[float, float, float, float]:
    (x0, x1), (y0, y1) = instrument["stage_x_nm"], instrument["stage_y_nm"]
    return (float(x0), float(x1), float(y0), float(y1))


def _survey_message(
    tiles: list[tuple[np.ndarray, tuple[float, float], float]], extent: tuple[float, float, float, float]
) -> dict[str, Any]:
    mosaic = survey_mosaic(tiles, extent)
    return {"grey": grey_base64(mosaic), "extent_nm": list(extent), "shape": list(mosaic.shape)}


def _budget_state(config: Any, tiles: int, instrument_time_s: float, dose: float) -> dict[str, Any]:
    budget = config.budget
    return {
        "tiles": tiles,
        "max_tiles": budget.max_tiles,
        "instrument_time_s": instrument_time_s,
        "max_time_s": budget.max_time_s,
        "mean_dose_e_per_a2": dose,
        "max_mean_dose_e_per_a2": budget.max_mean_dose_e_per_a2,
        "dwell_us": config.tiles.dwell_us,
    }


class SessionFeed:
    """Fills a :class:`ViewHub` from a running session, one step at a time.

    Pass :meth:`on_step` as (or call it from) the session's ``on_step`` hook, and call
    :meth:`finished` when the session ends. It reads the session, never changes it. It runs in
    the session's thread and costs a few milliseconds a step: images go as raw grey bytes and
    columns as packed arrays, not as images and number lists. (A thread of its own was tried and
    was slower: on two cores it contends with the session for the interpreter lock.)

    Parameters
    ----------
    session : agent.session.Session
        The session shown.
    discovered : callable, optional
        Returns ``(found, total)`` planted features imaged so far (a simulator's ground truth),
        for the discovery curve; None leaves that curve out.
    """

    def __init__(self, session: Any, discovered: Callable[[], tuple[int, int]] | None = None) -> None:
        self.session = session
        self.discovered = discovered
        grid = session.grid
        self.hub = ViewHub(
            {
                "source": "session",
                "controllable": True,
                "session_id": session.session_id,
                "policy": session.config.policy,
                "seed": session.config.seed,
                "lookahead_tiles": session.config.lookahead_tiles,
                "stage_nm": list(_stage_extent(session.description.model_dump(mode="json"))),
                "grid_shape": list(grid.grid_shape),
                "grid_extent_nm": _grid_extent(grid.extents),
                "tile_px": list(session.config.tiles.shape),
                "features_total": None if discovered is None else discovered()[1],
            }
        )
        self._survey_sent = False
        self._ended: str | None = None
        for step in session.steps:  # a resumed session shows what it did before the stop
            if step.kind != "survey":
                self.hub.steps.append(step_summary(step.index, step.to_record(), step.extent_nm))

    def state(self) -> dict[str, Any]:
        """Operator state and budget now (also called from the web server's thread)."""
        session = self.session
        steps = session.steps
        tiles = sum(step.kind != "survey" for step in steps)
        last = steps[-1].extra if steps else {}
        if self._ended is not None:
            phase = self._ended
        elif session.stop_requested:
            phase = "stopping"
        elif session.operator.paused:
            phase = "paused"
        elif not tiles:
            phase = "survey"
        else:
            phase = "running"
        policy = session.policy
        return {
            "phase": phase,
            "stop_reason": session.stop_reason,
            "steps": len(steps),
            "paused_s": round(session.operator.paused_s, 3),
            "marks": [] if policy is None else [{"kind": k, "region_nm": list(r)} for k, r in policy.marks],
            "queued": [a.describe() for a in session.operator.queued],
            "log": [
                {"t": a.received_unix_s, "what": a.describe(), "source": a.source}
                for a in session.operator.received[-20:]
            ],
            "budget": _budget_state(
                session.config,
                tiles,
                float(last.get("instrument_time_s", 0.0) or 0.0),
                float(last.get("mean_dose_e_per_a2", 0.0) or 0.0),
            ),
            "dead_time_fraction": session.dead_time()["fraction"],
        }

    def on_step(self, record: Any) -> None:
        """Publish the step just journaled (the session's ``on_step`` hook)."""
        session = self.session
        if record.kind == "survey":
            return
        if not self._survey_sent and session.survey_tiles:
            tiles = [(t.image, t.origin_nm, t.pixel_size_nm) for t in session.survey_tiles]
            self.hub.set_survey(_survey_message(tiles, tuple(self.hub.info["stage_nm"])))
            self._survey_sent = True
        summary = step_summary(record.index, record.to_record(), record.extent_nm)
        if self.discovered is not None:
            summary["discovered"] = self.discovered()[0]
        tile = None
        if record.tile is not None:
            tile = tile_payload(record.index, record.tile.image, record.columns, record.extent_nm,
                                record.tile.pixel_size_nm)  # fmt: skip
        self.hub.add_step(summary, tile, self._maps(), self.state())

    def finished(self) -> None:
        """Tell the page the session has ended (call after ``Session.run`` returns or raises)."""
        self._ended = "stopped" if self.session.interrupted else "finished"
        self.hub.set_state(self.state())

    def _maps(self) -> dict[str, Any] | None:
        policy = self.session.policy
        posterior = getattr(policy, "decision_posterior", None)
        if posterior is None:
            return None
        mean, variance = posterior
        return {  # float32 arrays in grid order, base64
            "surrogate_mean": _b64(mean.astype("<f4")),
            "surrogate_sd": _b64(np.sqrt(np.clip(variance, 0.0, None)).astype("<f4")),
            "grid_shape": list(policy.grid.grid_shape),
            "unit": getattr(policy, "model_unit", "RMS z"),
        }


def _grid_extent(extents: np.ndarray) -> list[float]:
    return [
        float(extents[:, 0].min()),
        float(extents[:, 1].max()),
        float(extents[:, 2].min()),
        float(extents[:, 3].max()),
    ]


class JournalFeed:
    """Fills a :class:`ViewHub` from a journal file, following it while another process writes it.

    Parameters
    ----------
    path : str or pathlib.Path
        The session journal.
    poll_s : float
        How often to look for new steps, seconds.

    Raises
    ------
    agent.journal.JournalError
        If the file is not a readable journal (checked here, before anything is served).
    """

    def __init__(self, path: str | Path, poll_s: float = 0.2) -> None:
        from agent.config import validate_config
        from agent.driver import InstrumentDescription
        from agent.journal import JournalTail
        from agent.session import SessionConfig
        from agent.survey import CandidateGrid

        self.path = Path(path)
        self.poll_s = poll_s
        self.tail = JournalTail(self.path)
        self.config = validate_config(
            self.tail.config, SessionConfig, f"{self.path} (recorded configuration)"
        )
        description = InstrumentDescription.model_validate(self.tail.instrument)
        grid = CandidateGrid.tiling(description, self.config.tiles.shape, self.config.tiles.pixel_size_nm,
                                    self.config.tile_overlap_fraction)  # fmt: skip
        self.hub = ViewHub(
            {
                "source": "journal",
                "controllable": False,
                "journal": str(self.path),
                "session_id": self.tail.session_id,
                "policy": self.config.policy,
                "seed": self.config.seed,
                "lookahead_tiles": self.config.lookahead_tiles,
                "stage_nm": list(_stage_extent(self.tail.instrument)),
                "grid_shape": list(grid.grid_shape),
                "grid_extent_nm": _grid_extent(grid.extents),
                "tile_px": list(self.config.tiles.shape),
                "features_total": None,
            }
        )
        self._survey: list[tuple[np.ndarray, tuple[float, float], float]] = []
        self._tiles = 0
        self._last: dict[str, Any] = {}
        self._marks: list[dict[str, Any]] = []
        self._log: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll(self) -> int:
        """Publish the steps journaled since the last poll; returns how many."""
        from agent.driver import ScanRequest
        from agent.registration import Placement
        from agent.session import tile_from_record

        steps = self.tail.poll()
        for step in steps:
            record = step.record
            request = ScanRequest.model_validate(record["request"])
            tile = tile_from_record(step, request) if step.image is not None else None
            if record.get("kind") == "survey":
                if tile is not None:
                    self._survey.append((tile.image, tile.origin_nm, tile.pixel_size_nm))
                continue
            if self._survey and self.hub.survey is None:
                self.hub.set_survey(_survey_message(self._survey, tuple(self.hub.info["stage_nm"])))
            extent = request.extent_nm
            if tile is not None and record.get("placement"):
                extent = Placement.from_record(record["placement"]).extent_nm(tile)
            self._tiles += 1
            self._last = record
            for action in record.get("operator", []):
                self._log.append({"t": action.get("received_unix_s"), "source": action.get("source"),
                                  "what": action.get("action"), "step": action.get("step")})  # fmt: skip
                if action.get("action") in ("skip", "look"):
                    self._marks.append({"kind": action["action"], "region_nm": action["region_nm"]})
                elif action.get("action") == "clear_marks":
                    self._marks = []
            payload = None
            if tile is not None:
                payload = tile_payload(step.index, tile.image, step.columns, extent, tile.pixel_size_nm)
            self.hub.add_step(step_summary(step.index, record, extent), payload, None, self.state())
        if self.tail.end is not None and self.hub.state.get("phase") != "finished":
            self.hub.set_state(self.state())
        return len(steps)

    def state(self) -> dict[str, Any]:
        """What the journal says about the session's state (no operator control from here)."""
        end = self.tail.end
        return {
            "phase": "finished" if end is not None else ("recording" if self._tiles else "survey"),
            "stop_reason": None if end is None else end.get("stop_reason"),
            "steps": self.tail.next_index,
            "marks": list(self._marks),
            "queued": [],
            "log": self._log[-20:],
            "budget": _budget_state(
                self.config,
                self._tiles,
                float(self._last.get("instrument_time_s", 0.0) or 0.0),
                float(self._last.get("mean_dose_e_per_a2", 0.0) or 0.0),
            ),
            "dead_time_fraction": None,
        }

    def start(self) -> None:
        """Follow the journal in a background thread until :meth:`close`."""
        self.poll()

        def follow() -> None:
            while not self._stop.wait(self.poll_s):
                try:
                    self.poll()
                except OSError:
                    continue  # the writer is between flushes: look again at the next poll

        self._thread = threading.Thread(target=follow, name="micrography-journal-feed", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop following the journal."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
