"""Parked long-poll pops and what wakes them (WIRE.md 2.3.7).

A pop with ``wait=true`` that found nothing parks here under (queue, partition-or-None) and
sleeps until a push (local or from a peer), a lease release, or its fallback timer wakes it.
Waiters never poll PostgreSQL on their own schedule beyond that timer, whose interval follows
the ``POP_WAIT_*`` backoff.
"""

from collections import defaultdict
from typing import DefaultDict, Optional, Set, Tuple

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

WaiterKey = Tuple[str, Optional[str]]


class Backoff:
    """The fallback re-try interval of one parked pop, in seconds.

    ``initial_ms`` for the first ``threshold`` empty tries, then multiplied by ``multiplier``
    per empty try up to ``max_ms``. A wake-up by a notification starts over.
    """

    def __init__(self, initial_ms: int, threshold: int, multiplier: float, max_ms: int):
        self._initial_ms = initial_ms
        self._threshold = threshold
        self._multiplier = multiplier
        self._max_ms = max_ms
        self._empty_tries = 0

    def next_interval(self) -> float:
        self._empty_tries += 1
        extra = max(self._empty_tries - self._threshold, 0)
        interval = min(self._initial_ms * (self._multiplier ** extra), self._max_ms)
        return max(interval, 1) / 1000.0

    def reset(self) -> None:
        self._empty_tries = 0


class WaiterRegistry:
    """Parked pops by (queue, partition); ``notify`` wakes the ones a change concerns."""

    def __init__(self, clock: IReactorTime):
        self._clock = clock
        self._waiters: DefaultDict[WaiterKey, Set[defer.Deferred]] = defaultdict(set)

    def __len__(self) -> int:
        return sum(len(waiters) for waiters in self._waiters.values())

    def wait(self, queue: str, partition: Optional[str], timeout: float) -> defer.Deferred:
        """A Deferred firing True when woken, False after ``timeout`` seconds.

        Cancelling it (the client went away) removes the waiter at once.
        """
        key = (queue, partition)
        timer = None

        def forget(_: object = None) -> None:
            waiters = self._waiters.get(key)
            if waiters is not None:
                waiters.discard(woken)
                if not waiters:
                    del self._waiters[key]
            if timer is not None and timer.active():
                timer.cancel()

        woken: defer.Deferred = defer.Deferred(canceller=forget)
        self._waiters[key].add(woken)
        timer = self._clock.callLater(timeout, self._fire, woken, False)
        woken.addBoth(self._after, forget)
        return woken

    def notify(self, queue: str, partition: Optional[str]) -> int:
        """Wakes waiters of that partition and the queue's wildcard waiters; returns how many."""
        keys = [(queue, partition), (queue, None)] if partition is not None else \
            [key for key in self._waiters if key[0] == queue]
        woken = 0
        for key in keys:
            for waiter in list(self._waiters.get(key, ())):
                self._fire(waiter, True)
                woken += 1
        return woken

    def wake_all(self) -> None:
        """Wakes everyone (shutdown: parked pops answer at once)."""
        for waiters in list(self._waiters.values()):
            for waiter in list(waiters):
                self._fire(waiter, True)

    @staticmethod
    def _fire(waiter: defer.Deferred, value: bool) -> None:
        if not waiter.called:
            waiter.callback(value)

    @staticmethod
    def _after(result, forget):
        forget()
        return result
