"""The stop order of a queen-tw process, in one place, and the services that carry it out.

A graceful stop (SIGTERM) must answer what it can and lose nothing: stop taking work, let
accepted work finish, close the pool only when nothing uses it, write the file buffer out
after the last push that may fall back to it, stop an embedded PostgreSQL last. Twisted's
``MultiService`` stops every child at once, so :class:`ServerTree` places each service in a
named stage of :data:`STOP_ORDER` and stops the stages in that order, one child at a time,
each bounded in time; ``make_service`` only says which stage each service belongs to.

The time budget is defined here too: a process stops within :data:`STOP_BUDGET_S`
(systemd's default stop timeout is 90 s; the official clients retry for less). With
NUM_WORKERS the parent's budget holds the workers' whole stop: it sends SIGTERM, each
worker stops within :data:`WORKER_STOP_BUDGET_S`, and whatever still runs after
:data:`WORKER_KILL_AFTER_S` gets SIGKILL, inside the parent's budget.
"""

from typing import Callable, Dict, Tuple, TypeVar

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

log = Logger()

STOP_BUDGET_S = 25.0
"""The longest orderly stop of one server process."""

KILL_MARGIN_S = 3.0
"""Room left after an escalation for the parent to reap the workers and stop the rest."""

WORKER_KILL_AFTER_S = STOP_BUDGET_S - KILL_MARGIN_S
"""The NUM_WORKERS parent sends SIGKILL to workers still running this long after SIGTERM."""

WORKER_STOP_BUDGET_S = WORKER_KILL_AFTER_S - KILL_MARGIN_S
"""The orderly stop budget of one worker process: ends before its parent escalates."""

STOP_ORDER: Tuple[Tuple[str, str], ...] = (
    ("gate", "marks the process as stopping: pops answer 204 and are not parked any more"),
    ("waiters", "answers every parked long-poll (204)"),
    ("listener", "stops accepting connections"),
    ("drain", "waits for the database work the batchers already accepted"),
    ("replay", "lets the replay batch in flight finish and starts no other"),
    ("jobs", "maintenance flags refresh, retention, eviction, statistics, wake-up listener, "
             "buffer adoption, peer sync (UDP, heartbeats; worker 1's stats publisher)"),
    ("database", "closes the pool (or ends the schema installation) once nothing uses it"),
    ("buffer", "writes the queued records and closes the segment: pushes may fall back to "
               "it until the pool is closed"),
    ("workers", "NUM_WORKERS parent: SIGTERM to every worker, SIGKILL to laggards"),
    ("postgres", "the embedded PostgreSQL, last: everything above may still need it"),
)
"""Stages in the order they stop (they start in the reverse order)."""

_STOP_RANK: Dict[str, int] = {stage: rank for rank, (stage, _) in enumerate(STOP_ORDER)}

S = TypeVar("S", bound=service.Service)


class OrderedMultiService(service.MultiService):
    """A ``MultiService`` that stops its children in reverse order, one at a time.

    :param clock: time source for the bounds.
    :param step_timeout: longest wait for one child's ``stopService`` Deferred.
    :param total_timeout: budget of the whole stop; once it is spent, the remaining children
        are still stopped (the file buffer must close, an embedded PostgreSQL must stop) but
        each is waited for at most ``last_grace`` seconds.
    """

    def __init__(self, clock: IReactorTime, step_timeout: float = STOP_BUDGET_S,
                 total_timeout: float = STOP_BUDGET_S, last_grace: float = 2.0):
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


class ServerTree(OrderedMultiService):
    """The root service of a process: children are placed in a stage of :data:`STOP_ORDER`.

    Stages stop in that order and start in the reverse one; within a stage, children start
    in the order they were added and stop in the reverse order.
    """

    def __init__(self, clock: IReactorTime, budget: float = STOP_BUDGET_S):
        super().__init__(clock, step_timeout=budget, total_timeout=budget)
        self._rank: Dict[int, int] = {}

    def add(self, stage: str, child: S) -> S:
        """Adds ``child`` to ``stage`` (one of :data:`STOP_ORDER`); returns it."""
        if stage not in _STOP_RANK:
            raise ValueError(f"unknown stop stage {stage!r}")
        self._rank[id(child)] = _STOP_RANK[stage]
        child.setServiceParent(self)
        self.services.sort(key=lambda each: -self._rank[id(each)])
        return child


class ShutdownGate(service.Service):
    """``stopping`` turns True when the server starts to stop (stage ``gate``: first)."""

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
    return child.name or child.__class__.__name__
