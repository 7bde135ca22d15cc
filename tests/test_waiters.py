"""The long-poll registry and its fallback backoff, driven by a fake clock."""

from twisted.internet import defer
from twisted.internet.task import Clock

from queen_tw.engine.waiters import Backoff, WaiterRegistry


def _outcome(d: defer.Deferred) -> list:
    seen: list = []
    d.addBoth(seen.append)
    return seen


def test_backoff_stays_at_initial_interval_until_threshold_then_grows_to_max():
    backoff = Backoff(initial_ms=100, threshold=3, multiplier=2.0, max_ms=1000)
    intervals = [backoff.next_interval() for _ in range(8)]
    assert intervals == [0.1, 0.1, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_backoff_reset_starts_over_at_initial_interval():
    backoff = Backoff(initial_ms=50, threshold=1, multiplier=3.0, max_ms=1000)
    backoff.next_interval(), backoff.next_interval()
    backoff.reset()
    assert backoff.next_interval() == 0.05


def test_push_to_partition_wakes_its_waiters_and_the_queues_wildcard_waiters():
    registry = WaiterRegistry(Clock())
    on_partition = _outcome(registry.wait("orders", "p1", 30))
    on_queue = _outcome(registry.wait("orders", None, 30))
    elsewhere = _outcome(registry.wait("orders", "p2", 30))
    other_queue = _outcome(registry.wait("invoices", None, 30))

    assert registry.notify("orders", "p1") == 2

    assert on_partition == [True] and on_queue == [True]
    assert elsewhere == [] and other_queue == []
    assert len(registry) == 2


def test_waiter_times_out_with_false_and_leaves_the_registry():
    clock = Clock()
    registry = WaiterRegistry(clock)
    seen = _outcome(registry.wait("orders", None, 5))
    clock.advance(4.9)
    assert seen == []
    clock.advance(0.2)
    assert seen == [False]
    assert len(registry) == 0


def test_cancelled_waiter_is_removed_at_once_and_its_timer_stops():
    clock = Clock()
    registry = WaiterRegistry(clock)
    waiter = registry.wait("orders", "p1", 30)
    waiter.addErrback(lambda f: f.trap(defer.CancelledError))
    waiter.cancel()
    assert len(registry) == 0
    assert clock.getDelayedCalls() == []
    assert registry.notify("orders", "p1") == 0


def test_wake_all_answers_every_parked_waiter():
    registry = WaiterRegistry(Clock())
    seen = [_outcome(registry.wait(f"q{i}", None, 30)) for i in range(5)]
    registry.wake_all()
    assert seen == [[True]] * 5
    assert len(registry) == 0
