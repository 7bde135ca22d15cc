"""A service that runs one piece of background work every N milliseconds.

The shape of Twisted's ``TimerService`` with the things our jobs need on top: the clock is
injected (``task.Clock`` in unit tests), a run never overlaps the previous one, a failing run
is logged and the schedule goes on, and ``stopService`` waits for a run in progress so the
pool is not closed under it.
"""

from typing import Any, Awaitable, Callable, Optional

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from queen_tw.errors import Unavailable

log = Logger()


class PeriodicService(service.Service):
    """Calls ``work()`` every ``interval_ms``, the first time one interval after start.

    :param name: for logs.
    :param interval_ms: period; a run that takes longer delays the next (no overlap).
    :param work: the coroutine function doing one run.
    :param clock: time source.
    """

    def __init__(self, name: str, interval_ms: int, work: Callable[[], Awaitable[Any]],
                 clock: IReactorTime):
        self.name = name
        self._interval = interval_ms / 1000.0
        self._work = work
        self._clock = clock
        self._loop: Optional[task.LoopingCall] = None
        self._current: Optional[defer.Deferred] = None
        self.runs = 0
        self.failures = 0

    def startService(self) -> None:
        super().startService()
        self._loop = task.LoopingCall(self._run_once)
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=False)

    def stopService(self) -> defer.Deferred:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._current is not None and not self._current.called:
            waiting: defer.Deferred = defer.Deferred()
            self._current.addBoth(lambda _: waiting.callback(None))
            return waiting
        return defer.succeed(None)

    def _run_once(self) -> defer.Deferred:
        self._current = defer.ensureDeferred(self._work())
        self._current.addCallbacks(self._succeeded, self._failed)
        return self._current

    def _succeeded(self, result: Any) -> None:
        self.runs += 1

    def _failed(self, failure) -> None:
        self.runs += 1
        self.failures += 1
        if failure.check(Unavailable):
            log.warn("{name} skipped: {error}", name=self.name, error=failure.value)
            return
        log.failure("{name} run failed; next run as scheduled", failure, name=self.name)
