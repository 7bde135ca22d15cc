"""When the timer sweeper sweeps (queen_tw/services/timer_sweeper.py), on a ``task.Clock``:
at start, again at once after a full batch, when the next timer is due (never later than the
interval, a short retry while due timers are held by another sweeper, a longer one while
their partition is held by another transaction), earlier when a nearer timer is
scheduled here, after the interval when a sweep fails; and it stops after the sweep in
progress. The sweeps themselves are the SQL's, tested against PostgreSQL in test_timers.py;
here a scripted engine answers them, so the schedule is checked to the millisecond.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import pytest
from twisted.internet import defer, task

from queen_tw.engine.timers import SweepOutcome
from queen_tw.errors import DatabaseUnavailable
from queen_tw.services.timer_sweeper import HELD_RETRY_S, TimerSweeper

BATCH = 10


class ScriptedTimers:
    """Answers each sweep with a Deferred the test fires; records when each sweep began."""

    def __init__(self, clock: task.Clock):
        self.clock = clock
        self.on_scheduled: Any = None
        self.calls: List[Tuple[float, defer.Deferred]] = []

    async def sweep(self, limit: int, lease_ms: int) -> SweepOutcome:
        assert limit == BATCH
        pending: defer.Deferred = defer.Deferred()
        self.calls.append((self.clock.seconds(), pending))
        return await pending

    def answer(self, taken: int = 0, next_due_ms: Optional[float] = None,
               deferred: int = 0) -> None:
        self.calls[-1][1].callback(SweepOutcome(taken, taken, deferred, next_due_ms))

    def fail(self, error: Exception) -> None:
        self.calls[-1][1].errback(error)

    def starts(self) -> List[float]:
        return [round(at, 3) for at, _ in self.calls]


@pytest.fixture
def clock() -> task.Clock:
    return task.Clock()


@pytest.fixture
def timers(clock: task.Clock) -> ScriptedTimers:
    return ScriptedTimers(clock)


@pytest.fixture
def sweeper(timers: ScriptedTimers, clock: task.Clock):
    service = TimerSweeper(timers, clock, interval_ms=1000, batch=BATCH)  # type: ignore[arg-type]
    service.startService()
    clock.advance(0)
    yield service
    if service.running:
        service.stopService()


def test_sweeps_at_start_and_sleeps_until_the_next_timer_is_due(sweeper, timers, clock):
    assert timers.starts() == [0]
    timers.answer(taken=3, next_due_ms=250)
    clock.advance(0.249)
    assert len(timers.calls) == 1
    clock.advance(0.001)
    assert timers.starts() == [0, 0.25]


def test_never_sleeps_longer_than_the_interval(sweeper, timers, clock):
    timers.answer(next_due_ms=60_000)
    clock.advance(0.999)
    assert len(timers.calls) == 1
    clock.advance(0.001)
    assert timers.starts() == [0, 1.0]
    timers.answer(next_due_ms=None)  # no timers at all
    clock.advance(1.0)
    assert timers.starts() == [0, 1.0, 2.0]


def test_a_full_batch_is_followed_at_once_by_the_next(sweeper, timers, clock):
    timers.answer(taken=BATCH, next_due_ms=-5)
    assert timers.starts() == [0, 0]
    timers.answer(taken=4, next_due_ms=-5)  # due rows left are held by another sweeper
    assert len(timers.calls) == 2
    clock.advance(0.02)
    assert timers.starts() == [0, 0, 0.02]


def test_timers_left_for_a_held_partition_are_retried_after_a_quarter_second(
        sweeper, timers, clock):
    timers.answer(taken=3, next_due_ms=-5, deferred=2)
    clock.advance(HELD_RETRY_S - 0.001)
    assert len(timers.calls) == 1
    clock.advance(0.001)
    assert timers.starts() == [0, HELD_RETRY_S]
    timers.answer(taken=BATCH, next_due_ms=-5, deferred=2)  # a full batch still goes on
    assert timers.starts() == [0, HELD_RETRY_S, HELD_RETRY_S]


def test_a_nearer_schedule_moves_the_wake_up_earlier_never_later(sweeper, timers, clock):
    timers.answer(next_due_ms=900)
    timers.on_scheduled(5000)  # later than planned: no change
    timers.on_scheduled(100)
    clock.advance(0.1)
    assert timers.starts() == [0, 0.1]


def test_a_schedule_during_a_sweep_is_honoured_when_it_ends(sweeper, timers, clock):
    clock.advance(0.05)
    timers.on_scheduled(100)  # due at 0.15, while the first sweep still runs
    timers.answer(next_due_ms=900)
    clock.advance(0.1)
    assert timers.starts() == [0, 0.15]


def test_an_outage_is_retried_every_interval_a_bug_ever_later(sweeper, timers, clock):
    for _ in range(3):
        timers.fail(DatabaseUnavailable("Database unavailable"))
        clock.advance(1.0)
    assert timers.starts() == [0, 1.0, 2.0, 3.0]
    waits = []
    for _ in range(7):
        timers.fail(RuntimeError("a bug"))
        waits.append(until_next_sweep(timers, clock))
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    timers.answer(next_due_ms=None)  # works again: the next bug waits one interval
    until_next_sweep(timers, clock)
    timers.fail(RuntimeError("a bug"))
    assert until_next_sweep(timers, clock) == 1.0


def until_next_sweep(timers: ScriptedTimers, clock: task.Clock) -> float:
    """Advances the clock in 0.5 s steps until the next sweep starts; returns the wait."""
    started, calls = clock.seconds(), len(timers.calls)
    while len(timers.calls) == calls:
        clock.advance(0.5)
    return clock.seconds() - started


def test_stop_waits_for_the_sweep_in_progress_and_plans_no_more(sweeper, timers, clock):
    stopped = sweeper.stopService()
    assert not stopped.called
    timers.answer(taken=BATCH, next_due_ms=0)  # a full batch: it would go on if running
    assert stopped.called
    clock.advance(5)
    assert len(timers.calls) == 1


def test_nothing_fires_while_paused_and_the_pause_is_rechecked(timers, clock):
    paused = [True]
    service = TimerSweeper(timers, clock, interval_ms=1000, batch=BATCH,  # type: ignore[arg-type]
                           paused=lambda: paused[0])
    service.startService()
    clock.advance(0)
    clock.advance(1.0)
    assert timers.calls == []
    paused[0] = False
    clock.advance(0.999)
    assert timers.calls == []
    clock.advance(0.001)
    assert timers.starts() == [2.0]
    timers.answer()
    service.stopService()
