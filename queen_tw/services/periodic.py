"""The one loop primitive of the server: a service that runs a piece of work on a schedule.

The shape of Twisted's ``TimerService`` with what our jobs need on top: the clock is
injected (``task.Clock`` in unit tests), a run never overlaps the previous one, a failing
run is logged and the schedule goes on, and ``stopService`` waits for a run in progress so
the pool is not closed under it.

Expected failures (PostgreSQL unreachable: ``Unavailable``) go through an
:class:`~queen_tw.services.retry.OutageLog` (one line when they start, reminders, one line
when the work succeeds again) and, with a ``retry`` backoff, the next run comes after the
backoff's delay instead of the interval. Anything else is a bug: logged with its traceback.
"""

from typing import Any, Callable, Coroutine, Optional, Tuple, Type

from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from queen_tw.errors import Unavailable
from queen_tw.services.retry import Backoff, OutageLog, describe_error

log = Logger()

Work = Callable[[], Coroutine[Any, Any, Any]]


class PeriodicService(service.Service):
    """Calls ``work()`` every ``interval_ms`` (from the end of one run to the next start).

    :param name: for logs.
    :param interval_ms: period; a run that takes longer delays the next (no overlap).
    :param work: the coroutine function doing one run.
    :param clock: time source.
    :param now: first run at start instead of one interval later.
    :param retry: after a failed run, wait this backoff's next delay instead of the
        interval (reset by a successful run).
    :param expected: failures that are part of life (logged as an outage, no traceback).
    :param quiet_start: failures before the first success are expected (see
        :class:`~queen_tw.services.retry.OutageLog`).
    :param stop_timeout: longest wait for the run in progress at stop (None: no bound
        here; the server's stop budget still bounds it).
    """

    def __init__(self, name: str, interval_ms: int, work: Work, clock: IReactorTime, *,
                 now: bool = False, retry: Optional[Backoff] = None,
                 expected: Tuple[Type[BaseException], ...] = (Unavailable,),
                 quiet_start: bool = False, stop_timeout: Optional[float] = None):
        self.name = name
        self._interval = interval_ms / 1000.0
        self._work = work
        self._clock = clock
        self._now = now
        self._retry = retry
        self._expected = expected
        self._stop_timeout = stop_timeout
        self._outage = OutageLog(name, clock, quiet_start=quiet_start)
        self._call: Optional[IDelayedCall] = None
        self._current: Optional[defer.Deferred] = None
        self.runs = 0
        self.failures = 0

    def startService(self) -> None:
        super().startService()
        if self._now:
            self._run_once()
        else:
            self._schedule(self._interval)

    def stopService(self) -> defer.Deferred:
        super().stopService()
        finished = cancel_and_wait(self._call, self._current)
        self._call = None
        if self._stop_timeout is not None and not finished.called:
            finished.addTimeout(self._stop_timeout, self._clock)
            finished.addErrback(self._still_running)
        return finished

    def _schedule(self, delay: float) -> None:
        if self.running:
            self._call = self._clock.callLater(delay, self._run_once)

    def _run_once(self) -> None:
        self._call = None
        self._current = defer.ensureDeferred(self._work())
        self._current.addCallbacks(self._succeeded, self._failed)

    def _succeeded(self, result: Any) -> None:
        self.runs += 1
        self._outage.succeeded()
        if self._retry is not None:
            self._retry.reset()
        self._schedule(self._interval)

    def _failed(self, failure: Failure) -> None:
        self.runs += 1
        self.failures += 1
        if failure.check(*self._expected):
            self._outage.failed(describe_error(failure.value))  # type: ignore[arg-type]
        else:
            log.failure("{name} run failed; next run as scheduled", failure, name=self.name)
        self._schedule(self._interval if self._retry is None else self._retry.next_delay())

    def _still_running(self, failure: Failure) -> None:
        failure.trap(defer.TimeoutError)
        log.warn("{name} still running {s}s after the stop; going on", name=self.name,
                 s=self._stop_timeout)


def cancel_and_wait(planned: Optional[IDelayedCall], current: Optional[defer.Deferred]
                    ) -> defer.Deferred:
    """A loop's stop: cancels its planned run and returns a Deferred that fires (with None)
    once the run in progress, if any, has ended, leaving that run's result to its own chain."""
    if planned is not None and planned.active():
        planned.cancel()
    if current is None or current.called:
        return defer.succeed(None)
    finished: defer.Deferred = defer.Deferred()
    current.addBoth(_fire, finished)
    return finished


def _fire(result: Any, waiting: defer.Deferred) -> Any:
    if not waiting.called:
        waiting.callback(None)
    return result

