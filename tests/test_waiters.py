"""The long-poll registry (watch / unwatch / notify / wake_all) and the fallback backoff.

The registry is tested through the interface the Popper's parking lots use: a watcher is
told which change woke it and answers how many parked pops that concerned.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

from queen_tw.engine.waiters import Backoff, WaiterRegistry


class RecordingWatcher:
    """A watcher standing for ``parked`` parked pops; records every wake-up it gets."""

    def __init__(self, parked: int = 1):
        self.parked = parked
        self.woken: List[Tuple[str, Optional[str]]] = []
        self.closed = False

    def wake(self, queue: str, partition: Optional[str]) -> int:
        self.woken.append((queue, partition))
        return self.parked

    def close(self) -> None:
        self.closed = True
        self.parked = 0

    def __len__(self) -> int:
        return self.parked


def test_backoff_stays_at_initial_interval_until_threshold_then_grows_to_max():
    backoff = Backoff(initial_ms=100, threshold=3, multiplier=2.0, max_ms=1000)
    intervals = [backoff.next_interval() for _ in range(8)]
    assert intervals == [0.1, 0.1, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_backoff_reset_starts_over_at_initial_interval():
    backoff = Backoff(initial_ms=50, threshold=1, multiplier=3.0, max_ms=1000)
    backoff.next_interval(), backoff.next_interval()
    backoff.reset()
    assert backoff.next_interval() == 0.05


def test_push_to_a_partition_wakes_its_watchers_the_queues_wildcard_and_any_queue():
    registry = WaiterRegistry()
    on_partition, on_queue, anywhere = RecordingWatcher(2), RecordingWatcher(3), RecordingWatcher()
    other_partition, other_queue = RecordingWatcher(), RecordingWatcher()
    registry.watch("orders", "p1", on_partition)
    registry.watch("orders", None, on_queue)
    registry.watch(None, None, anywhere)
    registry.watch("orders", "p2", other_partition)
    registry.watch("invoices", None, other_queue)

    assert registry.notify("orders", "p1") == 6

    assert on_partition.woken == on_queue.woken == anywhere.woken == [("orders", "p1")]
    assert other_partition.woken == [] and other_queue.woken == []
    assert registry.notifications == 1


def test_a_change_anywhere_in_a_queue_wakes_every_partition_watcher_of_that_queue():
    """A lease release or peer notice without a partition concerns all of the queue."""
    registry = WaiterRegistry()
    p1, p2, wildcard, elsewhere = (RecordingWatcher() for _ in range(4))
    registry.watch("orders", "p1", p1)
    registry.watch("orders", "p2", p2)
    registry.watch("orders", None, wildcard)
    registry.watch("invoices", "p1", elsewhere)

    assert registry.notify("orders", None) == 3

    assert p1.woken == p2.woken == wildcard.woken == [("orders", None)]
    assert elsewhere.woken == []


def test_an_unwatched_watcher_is_not_woken_and_leaves_no_entry():
    registry = WaiterRegistry()
    watcher, staying = RecordingWatcher(), RecordingWatcher()
    registry.watch("orders", "p1", watcher)
    registry.watch("orders", "p1", staying)

    registry.unwatch("orders", "p1", watcher)
    registry.unwatch("orders", "p1", staying)
    registry.unwatch("orders", "never-watched", watcher)  # unknown key: nothing to do

    assert registry.notify("orders", "p1") == 0
    assert watcher.woken == [] and staying.woken == []
    assert len(registry) == 0


def test_len_counts_parked_pops_not_watchers():
    registry = WaiterRegistry()
    registry.watch("orders", None, RecordingWatcher(4))
    registry.watch("orders", "p1", RecordingWatcher(1))

    assert len(registry) == 5


def test_wake_all_closes_every_watcher():
    registry = WaiterRegistry()
    watchers = [RecordingWatcher() for _ in range(5)]
    for n, watcher in enumerate(watchers):
        registry.watch(f"q{n}", None if n % 2 else "p", watcher)

    registry.wake_all()

    assert [w.closed for w in watchers] == [True] * 5
    assert len(registry) == 0
