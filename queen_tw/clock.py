"""The server keeps time on the monotonic clock; wall time only where a value leaves it.

Twisted's reactor times every ``callLater`` and every ``seconds()`` with ``time.time()``, so a
step of the host's wall clock (NTP stepping, an operator, a VM resumed) moved every timer of
the server by the step: a long poll answered at once or only after the step, an ephemeral
queue's lease ran out early and its message went to a second consumer, a call to PostgreSQL
was taken for an outage and its push buffered. The server's reactor keeps time with
``time.monotonic()`` instead; the few values compared with another host's clock or with a
token's ``exp`` use :func:`wall_seconds`.
"""

import time
from typing import Any, Callable


def keep_monotonic_time(reactor: Any) -> None:
    """Makes ``reactor`` schedule on ``time.monotonic()``. Called before anything is
    scheduled (the twistd plugin, before the service tree is made): a call already timed on
    the wall clock would fire decades late. (A cancelled one left in the reactor's heap is
    harmless: it sorts after every call timed from now on.)"""
    if getattr(reactor, "seconds", None) is time.monotonic:
        return
    if reactor.getDelayedCalls():
        raise RuntimeError("keep_monotonic_time: calls are already scheduled on the wall clock")
    reactor.seconds = time.monotonic


def wall_seconds() -> float:
    """Seconds since the epoch, for values another host or a token's claims are held to."""
    return time.time()


class DatabaseTime:
    """Wall time as PostgreSQL's clock reads it: ``wall()`` plus the offset last measured from
    a call that answered with PostgreSQL's time (the middle of its round trip taken as the
    moment PostgreSQL read it). Values this server stores for PostgreSQL to compare with its
    own ``now()`` (metrics buckets) or compares with times PostgreSQL made (a message's
    createdAt) stay right when the two hosts' clocks differ."""

    def __init__(self, wall: Callable[[], float] = wall_seconds):
        self._wall = wall
        self.offset = 0.0

    def __call__(self) -> float:
        return self._wall() + self.offset

    def local(self) -> float:
        """This host's wall time, to bracket a call with for :meth:`observe`."""
        return self._wall()

    def observe(self, database_now: float, sent: float, received: float) -> bool:
        """PostgreSQL read ``database_now`` (epoch seconds) during a call made between the
        local wall times ``sent`` and ``received``. The offset moves only when the reading
        tells it is wrong: by more than half the round trip (a connection waited for, a busy
        database), within which any offset fits. (On one host: it stays 0.) Returns whether
        it moved."""
        estimate = database_now - (sent + received) / 2.0
        if abs(estimate - self.offset) <= (received - sent) / 2.0:
            return False
        self.offset = estimate
        return True
