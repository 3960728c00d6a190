"""Operator control of a running session: pause, resume, stop, region marks and live settings.

Actions come from any thread (the live view's web server, ``micrography control`` through it,
a script) to the session's :class:`OperatorDesk`. Pause, resume and stop act on the instrument
at once: while paused no new scan starts (the one in progress finishes and is worked on), and a
stop ends the session after the tile in progress. What changes the agent's decisions -- marks
("skip" a region, "look here") and settings -- waits for the next step boundary: the session
takes the queued actions just before it decides, journals them with that step (time received,
step applied after), and a replay or a resume applies the journaled ones at the same step, so
the decisions are reproduced exactly.

Marks are data for the policy (:meth:`agent.policy.AcquisitionPolicy.mark_region`): a skipped
candidate is never admissible again, and while a "look here" region has admissible candidates
the policy chooses among them, by its own ranking.

Only settings that cannot break an exposure in progress change live (:data:`LIVE_SETTINGS`):
the dwell of the next tiles and the budget.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Literal, Self

from pydantic import Field, model_validator

from agent.config import StrictModel
from agent.errors import MicrographyError

__all__ = [
    "ACTIONS",
    "LIVE_SETTINGS",
    "OperatorAction",
    "OperatorDesk",
    "OperatorError",
]

ActionName = Literal["pause", "resume", "stop", "skip", "look", "clear_marks", "set"]
ACTIONS: tuple[str, ...] = ("pause", "resume", "stop", "skip", "look", "clear_marks", "set")
"""Every operator action, in the order the page and ``micrography control`` offer them."""

LIVE_SETTINGS: dict[str, str] = {
    "dwell_us": "pixel dwell of the tiles chosen from now on, µs",
    "budget.max_tiles": "high-resolution tiles after the survey",
    "budget.max_time_s": "instrument time from the first exposure, s",
    "budget.max_mean_dose_e_per_a2": "mean dose over the stage, e-/Å²",
}
"""Settings an operator may change while a session runs, with their units."""


class OperatorError(MicrographyError, ValueError):
    """An operator action that cannot be taken (unknown, malformed, or refused by the session)."""


class OperatorAction(StrictModel):
    """One operator action, as received and as journaled.

    Parameters
    ----------
    action : str
        One of :data:`ACTIONS`.
    region_nm : tuple of float, optional
        ``(x_min, x_max, y_min, y_max)`` in stage nm, for ``skip`` and ``look``.
    setting : str, optional
        A key of :data:`LIVE_SETTINGS`, for ``set``.
    value : float, optional
        Its new value (None lifts a budget limit).
    source : str
        Who sent it (``"page"``, ``"cli"``, ``"api"``).
    received_unix_s : float
        When the desk received it (Unix time, s).
    step : int, optional
        The step after which the session applied it (None while queued).
    """

    action: ActionName
    region_nm: tuple[float, float, float, float] | None = None
    setting: str | None = None
    value: float | None = None
    source: str = Field("api", max_length=40)
    received_unix_s: float = 0.0
    step: int | None = None

    @model_validator(mode="after")
    def _complete(self) -> Self:
        if self.action in ("skip", "look"):
            if self.region_nm is None:
                raise ValueError(f"a {self.action!r} mark needs region_nm = [x_min, x_max, y_min, y_max], nm")
            x0, x1, y0, y1 = self.region_nm
            if not (x0 < x1 and y0 < y1):
                raise ValueError(
                    f"region_nm {list(self.region_nm)} is empty: it needs x_min < x_max and y_min < y_max"
                )
        if self.action == "set":
            if self.setting not in LIVE_SETTINGS:
                raise ValueError(
                    f"setting {self.setting!r} cannot change live; choose one of {', '.join(LIVE_SETTINGS)}"
                )
            if self.value is None and self.setting == "dwell_us":
                raise ValueError("dwell_us needs a value, µs")
            if self.value is not None and self.value <= 0:
                raise ValueError(f"{self.setting} must be positive, got {self.value:g}")
        return self

    def describe(self) -> str:
        """One line for a log or the page, e.g. ``skip x 10-20 nm, y 5-15 nm``."""
        if self.region_nm is not None:
            x0, x1, y0, y1 = self.region_nm
            return f"{self.action} x {x0:.1f}-{x1:.1f} nm, y {y0:.1f}-{y1:.1f} nm"
        if self.action == "set":
            return f"set {self.setting} = {'none' if self.value is None else f'{self.value:g}'}"
        return self.action


class OperatorDesk:
    """Where a running session takes operator actions (thread-safe).

    Parameters
    ----------
    check : callable, optional
        Called with each action before it is accepted; raises :class:`OperatorError` to refuse it
        (a session checks a new dwell against the instrument here).
    on_stop : callable, optional
        Called with a reason when a ``stop`` arrives (a session passes its ``request_stop``).

    Examples
    --------
    >>> desk = OperatorDesk()
    >>> _ = desk.submit({"action": "pause"})
    >>> desk.paused
    True
    >>> _ = desk.submit({"action": "skip", "region_nm": [0, 10, 0, 10], "source": "cli"})
    >>> [a.describe() for a in desk.take()]
    ['pause', 'skip x 0.0-10.0 nm, y 0.0-10.0 nm']
    """

    def __init__(
        self,
        check: Callable[[OperatorAction], None] | None = None,
        on_stop: Callable[[str], None] | None = None,
    ) -> None:
        self.check = check
        self.on_stop = on_stop
        self._lock = threading.Lock()
        self._queued: list[OperatorAction] = []
        self._received: list[OperatorAction] = []
        self._running = threading.Event()
        self._running.set()
        self.paused_s = 0.0
        """Seconds the instrument has stood still at the operator's pause so far."""

    @property
    def paused(self) -> bool:
        """True between a ``pause`` and the next ``resume`` (or ``stop``)."""
        return not self._running.is_set()

    @property
    def received(self) -> list[OperatorAction]:
        """Every action accepted so far, in order (a copy)."""
        with self._lock:
            return list(self._received)

    @property
    def queued(self) -> list[OperatorAction]:
        """The actions received and not yet taken by the session (a copy)."""
        with self._lock:
            return list(self._queued)

    def submit(self, action: OperatorAction | dict[str, Any]) -> OperatorAction:
        """Accept an action: pause, resume and stop act now; everything is queued for the journal.

        Parameters
        ----------
        action : OperatorAction or dict
            The action; a dict is validated into one.

        Returns
        -------
        OperatorAction
            The action as accepted, with ``received_unix_s`` set.

        Raises
        ------
        OperatorError
            For a malformed action or one the session refuses, with a one-line reason.
        """
        from pydantic import ValidationError

        from agent.config import describe_validation_error

        try:
            fields = action.model_dump() if isinstance(action, OperatorAction) else dict(action)
            fields["received_unix_s"] = time.time()
            fields["step"] = None
            accepted = OperatorAction.model_validate(fields)
        except ValidationError as error:
            lines = describe_validation_error(error, "operator action").replace(": <top level>", "")
            raise OperatorError(lines.replace("\n", "; ")) from None
        except (TypeError, ValueError) as error:
            raise OperatorError(f"operator action refused: {error}") from None
        if self.check is not None:
            self.check(accepted)
        with self._lock:
            self._queued.append(accepted)
            self._received.append(accepted)
        if accepted.action == "pause":
            self._running.clear()
        elif accepted.action in ("resume", "stop"):
            self._running.set()
        if accepted.action == "stop" and self.on_stop is not None:
            self.on_stop(f"stopped by the operator ({accepted.source})")
        return accepted

    def take(self) -> list[OperatorAction]:
        """The actions queued since the last call, oldest first (the session applies and journals them)."""
        with self._lock:
            taken, self._queued = self._queued, []
        return taken

    def wait_while_paused(self, stop: threading.Event, poll_s: float = 0.05) -> float:
        """Block while paused (returns early once ``stop`` is set); returns the seconds waited."""
        if self._running.is_set():
            return 0.0
        started = time.perf_counter()
        while not self._running.wait(poll_s):
            if stop.is_set():
                break
        waited = time.perf_counter() - started
        with self._lock:
            self.paused_s += waited
        return waited
