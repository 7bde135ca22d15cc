"""Graceful shutdown: stop the server's services one after another, each bounded in time.

Twisted's ``MultiService`` stops all children at once, so the pool would close while requests
still use it. :class:`OrderedMultiService` stops them in reverse start order and waits for
each (at most ``step_timeout`` seconds), which lets ``make_service`` read as the shutdown
sequence too: the last service added is the first stopped.

:class:`ShutdownGate` (added last) marks the process as stopping, so long-polls answer 204 and
new pops are not parked; :class:`InFlightDrain` (added just before the HTTP listener) waits
for the database work already accepted to finish.
"""

from typing import Callable

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

log = Logger()


class OrderedMultiService(service.MultiService):
    """A ``MultiService`` that stops its children in reverse order, one at a time.

    :param clock: time source for the bounds.
    :param step_timeout: longest wait for one child's ``stopService`` Deferred.
    :param total_timeout: budget of the whole stop; once it is spent, the remaining children
        are still stopped (the file buffer must close, an embedded PostgreSQL must stop) but
        each is waited for at most ``last_grace`` seconds.
    """

    def __init__(self, clock: IReactorTime, step_timeout: float = 25.0,
                 total_timeout: float = 25.0, last_grace: float = 2.0):
        super().__init__()
        self._clock = clock
        self._step_timeout = step_timeout
        self._total_timeout = total_timeout
        self._last_grace = last_grace

    def stopService(self):
        service.Service.stopService(self)
        return defer.ensureDeferred(self._stop_children())

    async def _stop_children(self) -> None:
        deadline = self._clock.seconds() + self._total_timeout
        for child in reversed(list(self)):
            bound = min(self._step_timeout,
                        max(deadline - self._clock.seconds(), self._last_grace))
            step = defer.maybeDeferred(child.stopService)
            step.addTimeout(bound, self._clock)
            try:
                await step
            except defer.TimeoutError:
                log.warn("{child} did not stop within {s:.1f}s; going on", child=_name(child),
                         s=bound)
            except Exception as err:
                log.error("stopping {child} failed: {error}", child=_name(child), error=err)


class ShutdownGate(service.Service):
    """``stopping`` turns True when the server starts to stop (add this service last)."""

    stopping = False

    def startService(self):
        super().startService()
        self.stopping = False

    def stopService(self):
        super().stopService()
        self.stopping = True
        log.info("shutting down: long-polls answer 204, in-flight work finishes")


class InFlightDrain(service.Service):
    """On stop, waits until ``busy()`` is False (polled every 50 ms), at most ``timeout`` s."""

    def __init__(self, busy: Callable[[], bool], clock: IReactorTime, timeout: float = 5.0):
        self._busy = busy
        self._clock = clock
        self._timeout = timeout

    def stopService(self):
        super().stopService()
        return defer.ensureDeferred(self._wait())

    async def _wait(self) -> None:
        deadline = self._clock.seconds() + self._timeout
        while self._busy() and self._clock.seconds() < deadline:
            await task.deferLater(self._clock, 0.05, lambda: None)
        if self._busy():
            log.warn("in-flight work still running after {s}s; stopping anyway", s=self._timeout)


def _name(child: service.IService) -> str:
    return getattr(child, "name", None) or child.__class__.__name__
