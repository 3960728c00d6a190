"""Budgets, the instrument ledger, and the worker that keeps the instrument scanning.

A session spends three things: tiles, instrument time and dose. :class:`InstrumentLedger` adds
them up tile by tile, the same way for a live tile and for its replay from a journal, and says
when a :class:`BudgetConfig` is spent. The rule is checked before every exposure, never after.

:class:`AcquisitionWorker` runs the instrument's side of a pipelined session: it executes
scan requests in the order they were submitted, one at a time, in a background thread, so the
instrument scans tile k + 1 while the agent finds columns in tile k and chooses tile k + 2. It
keeps its own ledger, advanced as each tile comes back, and checks the budget (and a stop
request) before it starts each scan, with exactly what the sequential loop would know at that
moment: the tiles exposed so far. So a pipelined session exposes a tile only where the sequential
rules would, and stops at the same budget. Why a thread and not a process or an asyncio loop: the
driver call blocks in socket waits, in numpy and in sleeps, all of which release the GIL, and
the tile must come back to the agent's process anyway.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from pydantic import Field

from agent.config import StrictModel
from agent.driver import MicroscopeDriver, ScanRequest, Tile

SURVEY_KIND = "survey"
"""Kind of the overview tiles: no budget applies to them (they come before the first tile)."""


class BudgetConfig(StrictModel):
    """When a session stops: the first limit reached ends it."""

    max_tiles: int | None = Field(40, ge=1, description="high-resolution tiles after the survey")
    max_time_s: float | None = Field(None, gt=0, description="instrument time from the first exposure, s")
    max_mean_dose_e_per_a2: float | None = Field(
        None, gt=0, description="dose spent, averaged over the accessible stage area, e-/A^2"
    )


@dataclass
class InstrumentLedger:
    """Tiles, dose and instrument time spent so far, and the budget rule.

    Parameters
    ----------
    stage_area_a2 : float
        The accessible stage area, square angstroms: the mean dose is averaged over it.

    Notes
    -----
    Instrument time is summed tile by tile on the instrument's clock, from the end of the previous
    tile to the end of this one (so stage settling and any wait for the agent count); where the
    clock went back (a restarted instrument) only the tile's own frame time is known and counts.
    """

    stage_area_a2: float
    dose_area_e: float = 0.0
    """Sum over tiles of dose times tile area (electrons)."""
    instrument_time_s: float = 0.0
    t_last: float | None = None
    """End of the last tile on the instrument clock, s."""
    tiles: int = 0
    """Tiles after the survey."""

    def account(self, tile: Tile, kind: str) -> None:
        """Add one tile's dose, instrument time and count (``kind`` as in the journal)."""
        x_min, x_max, y_min, y_max = tile.extent_nm
        self.dose_area_e += tile.dose_e_per_a2 * (x_max - x_min) * (y_max - y_min) * 100.0
        if self.t_last is None:
            self.instrument_time_s += max(tile.t_end - tile.t_start, 0.0)
        elif tile.t_start >= self.t_last:
            self.instrument_time_s += tile.t_end - self.t_last
        else:
            self.instrument_time_s += max(tile.t_end - tile.t_start, 0.0)
        self.t_last = tile.t_end
        self.tiles += kind != SURVEY_KIND

    @property
    def mean_dose_e_per_a2(self) -> float:
        """Dose spent, averaged over the stage area, e-/A^2."""
        return self.dose_area_e / self.stage_area_a2

    def spent(self, budget: BudgetConfig) -> str | None:
        """Why no further tile may be exposed under ``budget``, or None while one may."""
        if budget.max_tiles is not None and self.tiles >= budget.max_tiles:
            return f"tile budget of {budget.max_tiles} spent"
        if budget.max_time_s is not None and self.instrument_time_s >= budget.max_time_s:
            return f"instrument-time budget of {budget.max_time_s:g} s spent"
        limit = budget.max_mean_dose_e_per_a2
        if limit is not None and self.mean_dose_e_per_a2 >= limit:
            return f"dose budget of {limit:g} e-/A^2 (stage mean) spent"
        return None


@dataclass
class Acquired:
    """What the worker did with one submitted request.

    Exactly one of ``tile``, ``refused`` and ``error`` is set.

    Parameters
    ----------
    request : ScanRequest
        The request, as submitted.
    kind : str
        Its kind, as submitted (``"survey"``, ``"start"`` or ``"guided"``).
    tile : Tile or None
        The tile, when it was exposed.
    wait_s : float or None
        Wall seconds the instrument stood idle before this scan, from the previous tile's return
        (None for the worker's first scan).
    acquire_s : float
        Wall seconds the driver call took.
    refused : str or None
        Why the scan was not started (a budget spent, a stop requested, an earlier error).
    error : BaseException or None
        What the driver (or the tile check) raised.
    collected_s : float
        Wall seconds the session waited for this result (set by the session, not the worker).
    paused_s : float
        Wall seconds the scan was held back by the operator's pause (not counted in ``wait_s``).
    """

    request: ScanRequest
    kind: str
    tile: Tile | None = None
    wait_s: float | None = None
    acquire_s: float = 0.0
    refused: str | None = None
    error: BaseException | None = None
    collected_s: float = 0.0
    paused_s: float = 0.0


STOP_REQUESTED = "stop requested"
"""The ``refused`` reason of requests not started because the session was asked to stop."""


class AcquisitionWorker:
    """Executes scan requests in submission order, in one background thread.

    Parameters
    ----------
    driver : MicroscopeDriver
        The instrument; only this worker calls its ``acquire`` while the worker runs.
    ledger : InstrumentLedger
        Spending so far (copied; the worker advances its copy as tiles come back).
    budget : BudgetConfig
        Checked before each scan after the survey.
    stop : threading.Event
        Once set, no further scan is started (the one in progress finishes).
    check_tile : callable, optional
        Called with each tile before the next scan starts; what it raises halts the worker and is
        handed back as that request's ``error`` (a tile the session must refuse).
    hold : callable, optional
        Called before each scan starts; blocks while the operator has the session paused and
        returns the seconds it held (:meth:`agent.operator.OperatorDesk.wait_while_paused`).

    Examples
    --------
    Two requests under a budget of one tile: the second is refused before it is exposed.

    >>> from simulator.config import SimulatorConfig, SpecimenConfig
    >>> from simulator.drivers import SimulatedMicroscope
    >>> config = SimulatorConfig(specimen=SpecimenConfig(size_nm=(20.0, 20.0)))
    >>> with SimulatedMicroscope(config) as microscope:
    ...     worker = AcquisitionWorker(microscope, InstrumentLedger(stage_area_a2=4e4),
    ...                                BudgetConfig(max_tiles=1), threading.Event())
    ...     for k in range(2):
    ...         worker.submit(ScanRequest(x_nm=8.0 + 4 * k, y_nm=10.0, shape=(64, 64),
    ...                                   pixel_size_nm=0.02, dwell_us=2.0), "guided")
    ...     first, second = worker.result(), worker.result()
    ...     worker.close()
    ...     print(first.tile.shape, second.refused, microscope.exposures)
    (64, 64) tile budget of 1 spent 1
    """

    def __init__(
        self,
        driver: MicroscopeDriver,
        ledger: InstrumentLedger,
        budget: BudgetConfig,
        stop: threading.Event,
        check_tile: Callable[[Tile], None] | None = None,
        hold: Callable[[], float] | None = None,
    ) -> None:
        self.driver = driver
        self.ledger = replace(ledger)
        self.budget = budget
        self._stop = stop
        self._check_tile = check_tile
        self._hold = hold
        self._requests: queue.SimpleQueue[tuple[ScanRequest, str] | None] = queue.SimpleQueue()
        self._results: queue.SimpleQueue[Acquired] = queue.SimpleQueue()
        self._abort = threading.Event()
        self._halted: str | None = None
        self._returned: float | None = None
        self._thread = threading.Thread(target=self._serve, name="micrography-acquisition", daemon=True)
        self._thread.start()

    def submit(self, request: ScanRequest, kind: str) -> None:
        """Queue a request; it is scanned after every request submitted before it."""
        self._requests.put((request, kind))

    def result(self, timeout_s: float | None = None) -> Acquired:
        """The outcome of the oldest submitted request not yet returned (blocks until it is known).

        Raises
        ------
        queue.Empty
            If ``timeout_s`` passes first.
        """
        return self._results.get(timeout=timeout_s)

    def close(self, abort: bool = False, timeout_s: float = 30.0) -> None:
        """Start nothing more, let the worker end, and wait for it (at most ``timeout_s``).

        Parameters
        ----------
        abort : bool
            Also abort the scan in progress (the session is failing: nobody will take its tile).
        timeout_s : float
            Seconds to wait for the thread.
        """
        self._halted = self._halted or "the session closed"
        if abort:
            self._abort.set()
            self.driver.abort()
        self._requests.put(None)
        self._thread.join(timeout_s)

    def _serve(self) -> None:
        while (item := self._requests.get()) is not None:
            request, kind = item
            paused = self._hold() if self._hold is not None and self._halted is None else 0.0
            if self._halted is None and self._stop.is_set():
                self._halted = STOP_REQUESTED
            if self._halted is None and kind != SURVEY_KIND:
                self._halted = self.ledger.spent(self.budget)
            if self._halted is not None:
                self._results.put(Acquired(request, kind, refused=self._halted, paused_s=paused))
                continue
            started = time.perf_counter()
            wait = None if self._returned is None else max(started - self._returned - paused, 0.0)
            try:
                tile = self.driver.acquire(request, abort=self._abort)
                self._returned = time.perf_counter()
                if self._check_tile is not None:
                    self._check_tile(tile)
            except BaseException as error:  # handed to the session, which raises it in order
                name = type(error).__name__
                self._halted = f"{request.request_id} failed ({name}): nothing after it is scanned"
                self._results.put(Acquired(request, kind, wait_s=wait, error=error))
                continue
            self.ledger.account(tile, kind)
            self._results.put(Acquired(request, kind, tile, wait, self._returned - started, paused_s=paused))
