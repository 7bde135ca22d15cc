"""Who to wake when something changes in a queue (WIRE.md 2.3.7).

Parked long-poll pops register here as *watchers* of a (queue, partition) — partition None
for wildcard pops, queue None for pops that span queues (namespace/task). A local push, a
peer's notice (``POST /internal/api/notify``), or a lease release calls :meth:`notify`,
which tells every watcher the change concerns. What a watcher does when told (one database
attempt for all the pops parked behind it) is the Popper's business, not the registry's.
"""

from collections import defaultdict
from typing import Callable, DefaultDict, Dict, Iterable, List, Optional, Protocol, Set, Tuple

WaiterKey = Tuple[Optional[str], Optional[str]]

# Wakes the pops parked on these (queue, partition)s, here and elsewhere
# (``QueueEngine.wake_everywhere``); the admin engines are given one.
Wake = Callable[[Iterable[Tuple[str, Optional[str]]]], object]


class Watcher(Protocol):
    """Something parked on a (queue, partition): told about changes, counted, closed."""

    def wake(self, queue: str, partition: Optional[str]) -> int:
        """A change in ``queue`` (``partition`` None: any partition); returns how many
        parked pops this wakes."""

    def close(self) -> None:
        """The server stops: answer every parked pop now."""

    def __len__(self) -> int:
        """Parked pops behind this watcher."""


class Backoff:
    """The fallback re-try interval of parked pops, in seconds.

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
    """Watchers by (queue, partition); ``notify`` wakes the ones a change concerns."""

    def __init__(self) -> None:
        self._watchers: DefaultDict[WaiterKey, Set[Watcher]] = defaultdict(set)
        self.notifications = 0

    def __len__(self) -> int:
        return sum(len(w) for watchers in self._watchers.values() for w in watchers)

    def parked_by_queue(self) -> Dict[str, int]:
        """Parked pops per queue name (``""`` for pops spanning queues), for metrics."""
        parked: Dict[str, int] = defaultdict(int)
        for (queue, _), watchers in self._watchers.items():
            count = sum(len(w) for w in watchers)
            if count:
                parked[queue or ""] += count
        return dict(parked)

    def watch(self, queue: Optional[str], partition: Optional[str], watcher: Watcher) -> None:
        """Registers ``watcher`` for changes of ``queue``/``partition`` (None = any)."""
        self._watchers[(queue, partition)].add(watcher)

    def unwatch(self, queue: Optional[str], partition: Optional[str], watcher: Watcher) -> None:
        key = (queue, partition)
        watchers = self._watchers.get(key)
        if watchers is not None:
            watchers.discard(watcher)
            if not watchers:
                del self._watchers[key]

    def notify(self, queue: str, partition: Optional[str]) -> int:
        """Something changed in ``queue`` (in ``partition``, or anywhere when None).

        Wakes the watchers of that partition, the queue's wildcard watchers and the watchers
        of every queue; returns how many parked pops that concerned.
        """
        self.notifications += 1
        keys: List[WaiterKey]
        if partition is not None:
            keys = [(queue, partition), (queue, None)]
        else:
            keys = [key for key in self._watchers if key[0] == queue]
        keys.append((None, None))
        woken = 0
        for key in keys:
            for watcher in list(self._watchers.get(key, ())):
                woken += watcher.wake(queue, partition)
        return woken

    def wake_all(self) -> None:
        """Answers everyone now (shutdown: parked pops end with 204)."""
        for watchers in list(self._watchers.values()):
            for watcher in list(watchers):
                watcher.close()
