"""The timer sweeper: fires due timers as messages (WIRE2.md 3.4). Every instance may run one.

A sweep is one SQL call that takes up to ``batch`` due timers (``FOR UPDATE SKIP LOCKED``, so
sweepers of several instances share the work without waiting on each other) and fires them
in one transaction; a full batch is followed at once by the next. Then the sweeper sleeps
until the next timer is due (the database says how long), never longer than ``interval_ms``
(which bounds how late a timer scheduled on another instance fires) and, when timers are due
but held by another sweeper, a short ``retry_ms`` (a quarter second when their partition is
held by another transaction: those timers wait, and the sweep fires the others meanwhile). A
timer scheduled here that is due before the planned wake-up moves it earlier
(:meth:`TimerSweeper.nudge`).

While pushes go to the file buffer (push maintenance mode) or wait in it for the replay
(``paused``: ``Durability.timers_paused``) nothing fires: a fired timer must not overtake the
buffered pushes of its partition; the timers wait, checked every ``interval_ms``. Failures
are logged (an unreachable PostgreSQL once per outage) and the next sweep comes after
``interval_ms``; a sweep interrupted by a crash rolls back, and its timers
are due again. ``stopService`` waits for the sweep in progress.
"""

from typing import Callable, Optional

from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from queen_tw.engine.timers import SweepOutcome, TimersEngine
from queen_tw.errors import Unavailable
from queen_tw.services.periodic import cancel_and_wait
from queen_tw.services.retry import OutageLog, describe_error

log = Logger()

MAX_BUG_DELAY_S = 30.0
"""Longest wait after repeated unexpected sweep failures."""

HELD_RETRY_S = 0.25
"""Wait before sweeping again when a sweep left due timers because another transaction held
their partition (each such sweep has already waited up to ``queen.timers_lock_budget``)."""


class TimerSweeper(service.Service):
    """Fires due timers, sleeping until the next one is due.

    :param timers: the engine whose :meth:`~TimersEngine.sweep` fires them; its
        ``on_scheduled`` is pointed at :meth:`nudge`.
    :param clock: time source.
    :param interval_ms: longest sleep (``QUEEN_TIMERS_SWEEP_INTERVAL_MS``).
    :param batch: timers fired per SQL call.
    :param lease_ms: how long a claimed timer (one the server must encrypt) stays claimed.
    :param retry_ms: sleep while due timers are held by another sweeper.
    :param paused: True while nothing may fire (pushes go to, or wait in, the file buffer).
    """

    name = "timer sweeper"

    def __init__(self, timers: TimersEngine, clock: IReactorTime, interval_ms: int,
                 batch: int = 500, lease_ms: int = 30_000, retry_ms: int = 20,
                 paused: Callable[[], bool] = lambda: False):
        self._timers = timers
        self._clock = clock
        self._interval = interval_ms / 1000.0
        self._batch = batch
        self._lease_ms = lease_ms
        self._retry = retry_ms / 1000.0
        self._paused = paused
        self._outage = OutageLog(self.name, clock, quiet_start=True)
        self._call: Optional[IDelayedCall] = None
        self._current: Optional[defer.Deferred] = None
        self._nudged_at: Optional[float] = None  # a nudge that came during a sweep
        self._bugs_in_a_row = 0  # unexpected failures since the last success: backs off
        self.sweeps = 0
        self.fired = 0
        timers.on_scheduled = self.nudge

    def startService(self) -> None:
        super().startService()
        self._wake_in(0)

    def stopService(self) -> defer.Deferred:
        super().stopService()
        finished = cancel_and_wait(self._call, self._current)
        self._call = None
        return finished

    def nudge(self, delay_ms: float) -> None:
        """A timer due in ``delay_ms`` was scheduled: wake up by then if not planned sooner."""
        if not self.running:
            return
        at = self._clock.seconds() + max(delay_ms, 0) / 1000.0
        if self._current is not None:  # sweeping: plan it when the sweep ends
            self._nudged_at = at if self._nudged_at is None else min(self._nudged_at, at)
            return
        if self._call is not None and self._call.active() and self._call.getTime() <= at:
            return
        self._wake_in(at - self._clock.seconds())

    def _wake_in(self, delay: float) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = self._clock.callLater(max(delay, 0.0), self._sweep)

    def _sweep(self) -> None:
        self._call = None
        if self._paused():
            self._wake_in(self._interval)
            return
        self._current = defer.ensureDeferred(self._sweep_due())
        self._current.addCallbacks(self._swept, self._failed)

    async def _sweep_due(self) -> SweepOutcome:
        """Sweeps until a sweep takes less than a full batch (or the service stops)."""
        while True:
            outcome = await self._timers.sweep(self._batch, self._lease_ms)
            self.sweeps += 1
            self.fired += outcome.fired
            if outcome.taken < self._batch or not self.running:
                return outcome

    def _swept(self, outcome: SweepOutcome) -> None:
        self._outage.succeeded()
        self._bugs_in_a_row = 0
        delay = self._interval
        if outcome.next_due_ms is not None:
            due_in = outcome.next_due_ms / 1000.0
            retry = self._retry if not outcome.deferred else max(self._retry, HELD_RETRY_S)
            delay = min(delay, due_in if due_in > 0 else retry)
        self._plan(delay)

    def _failed(self, failure: Failure) -> None:
        """An outage is retried every interval (timers fire as soon as PostgreSQL is back);
        anything else is a bug, logged with its traceback, and retried after a doubling
        delay (up to :data:`MAX_BUG_DELAY_S`) so that it does not fill the log."""
        delay = self._interval
        if failure.check(Unavailable):
            self._outage.failed(describe_error(failure.value))  # type: ignore[arg-type]
        else:
            self._bugs_in_a_row += 1
            delay = min(self._interval * 2 ** (self._bugs_in_a_row - 1),
                        max(MAX_BUG_DELAY_S, self._interval))
            log.failure("timer sweep failed; next sweep in {s:g}s", failure, s=delay)
        self._plan(delay)

    def _plan(self, delay: float) -> None:
        self._current = None
        nudged, self._nudged_at = self._nudged_at, None
        if not self.running:
            return
        if nudged is not None:
            delay = min(delay, nudged - self._clock.seconds())
        self._wake_in(delay)
