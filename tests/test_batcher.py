"""The Batcher's fusion, fan-out, error isolation and back-pressure, on a fake clock."""

from typing import List

import psycopg2
import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from queen_tw.engine.batcher import Batcher, BatchLimits
from queen_tw.errors import RefusedByDatabase, Unavailable


class FakeDatabase:
    """Records each fused call; answers later, when the test says so."""

    def __init__(self):
        self.calls: List[List[list]] = []
        self.answers: List[defer.Deferred] = []

    def run_batch(self, jobs):
        self.calls.append(jobs)
        answer = defer.Deferred()
        self.answers.append(answer)
        return answer

    def answer_last(self, fail_with=None):
        jobs = self.calls[len(self.answers) - 1]
        answer = self.answers[-1]
        if fail_with is not None:
            answer.errback(fail_with)
        else:
            answer.callback([[item * 10 for item in job] for job in jobs])


def _results(d):
    seen = []
    d.addBoth(seen.append)
    return seen


def test_lone_job_is_sent_on_the_next_turn_without_hold_time():
    clock, db = Clock(), FakeDatabase()
    batcher = Batcher("push", db.run_batch, clock, BatchLimits(max_hold_ms=20))
    seen = _results(batcher.submit([1, 2]))
    clock.advance(0)
    db.answer_last()
    assert db.calls == [[[1, 2]]]
    assert seen == [[10, 20]]


def test_jobs_arriving_while_all_slots_are_busy_are_fused_into_one_call():
    clock, db = Clock(), FakeDatabase()
    batcher = Batcher("push", db.run_batch, clock, BatchLimits(max_concurrent=1))
    first = _results(batcher.submit([1]))
    clock.advance(0)
    later = [_results(batcher.submit([n])) for n in (2, 3, 4)]
    clock.advance(1)
    assert len(db.calls) == 1  # the only slot is busy: the three wait together

    db.answer_last()
    clock.advance(0)
    assert db.calls[1] == [[2], [3], [4]]
    db.answer_last()
    assert first == [[10]]
    assert later == [[[20]], [[30]], [[40]]]


def test_fused_call_respects_max_batch_size_in_items():
    clock, db = Clock(), FakeDatabase()
    batcher = Batcher("push", db.run_batch, clock, BatchLimits(max_concurrent=1, max_batch_size=3))
    batcher.submit([0])
    clock.advance(0)
    for n in range(1, 5):
        batcher.submit([n, n])
    db.answer_last()
    clock.advance(0)
    assert db.calls[1] == [[1, 1]]  # a second job would pass 3 items


@pytest.mark.parametrize("refusal", [
    psycopg2.DataError("bad item"),  # PostgreSQL refused it: nothing applied
    RefusedByDatabase("PostgreSQL refused the request: index row size exceeds maximum"),
], ids=["psycopg2 error", "beyond PostgreSQL's limits"])
def test_a_database_error_in_one_fused_job_fails_only_that_job(refusal):
    clock = Clock()
    calls = []

    async def run_batch(jobs):
        calls.append(jobs)
        if any("bad" in job for job in jobs):
            raise refusal
        return [[f"ok:{item}" for item in job] for job in jobs]

    batcher = Batcher("push", run_batch, clock, BatchLimits(max_concurrent=1, max_hold_ms=0))
    good = _results(batcher.submit(["a"]))
    bad = _results(batcher.submit(["bad"]))
    other = _results(batcher.submit(["b"]))
    clock.advance(0)
    clock.advance(0)

    assert calls == [[["a"], ["bad"], ["b"]], [["a"]], [["bad"]], [["b"]]]
    assert good == [["ok:a"]] and other == [["ok:b"]]
    assert len(bad) == 1 and bad[0].value is refusal
    bad[0].trap(type(refusal))


def test_an_error_after_the_database_answered_fails_every_job_without_running_them_again():
    clock = Clock()
    calls = []

    async def run_batch(jobs):
        calls.append(jobs)
        raise KeyError("reading the answer")  # the call itself may have committed

    batcher = Batcher("ack", run_batch, clock, BatchLimits(max_concurrent=1, max_hold_ms=0))
    seen = [_results(batcher.submit([n])) for n in (1, 2)]
    clock.advance(0)

    assert calls == [[[1], [2]]]
    for result in seen:
        assert len(result) == 1 and result[0].check(KeyError)
        result[0].trap(KeyError)


def test_lost_database_fails_every_fused_job_with_unavailable():
    clock, db = Clock(), FakeDatabase()
    batcher = Batcher("ack", db.run_batch, clock, BatchLimits(max_concurrent=1))
    batcher.submit([0])
    clock.advance(0)
    waiting = [_results(batcher.submit([n])) for n in (1, 2)]
    db.answer_last()
    clock.advance(0)
    db.answer_last(fail_with=Unavailable("Database unavailable"))
    for seen in waiting:
        assert seen[0].check(Unavailable)
        seen[0].trap(Unavailable)


def test_jobs_beyond_max_pending_are_refused_with_unavailable():
    clock, db = Clock(), FakeDatabase()
    batcher = Batcher("push", db.run_batch, clock, BatchLimits(max_concurrent=1, max_pending=4))
    batcher.submit([0])
    clock.advance(0)
    accepted = _results(batcher.submit([1, 2, 3]))
    refused = _results(batcher.submit([4, 5]))
    assert accepted == []
    assert refused[0].check(Unavailable)
    refused[0].trap(Unavailable)
    assert batcher.queued_items == 3


@pytest.mark.parametrize("queued, expected_delay", [(1, 0.02), (50, 0.0)])
def test_with_a_free_slot_jobs_wait_for_preferred_size_or_max_hold(queued, expected_delay):
    clock, db = Clock(), FakeDatabase()
    limits = BatchLimits(preferred_size=50, max_hold_ms=20, max_concurrent=2)
    batcher = Batcher("push", db.run_batch, clock, limits)
    batcher.submit([0])
    clock.advance(0)  # one call in flight, one slot free
    batcher.submit(list(range(queued)))
    clock.advance(expected_delay - 0.001 if expected_delay else 0)
    assert len(db.calls) == (2 if expected_delay == 0 else 1)
    clock.advance(0.002)
    assert len(db.calls) == 2


def test_a_large_backlog_drains_in_order_one_full_batch_per_call():
    """Overload: 10 000 jobs queue behind a busy slot. Each freed slot takes exactly
    ``max_batch_size`` of them from the front, in arrival order, and every job gets its own
    answer. (Taking from the front is O(1) per job: the queue is a deque.)"""
    clock, db = Clock(), FakeDatabase()
    limits = BatchLimits(max_concurrent=1, max_batch_size=500, max_pending=20_000)
    batcher = Batcher("push", db.run_batch, clock, limits)
    batcher.submit([-1])
    clock.advance(0)
    backlog = [_results(batcher.submit([n])) for n in range(10_000)]
    assert batcher.queued_items == 10_000

    for _ in range(21):  # the first call, then 20 calls of 500 jobs
        db.answer_last()
        clock.advance(0)

    assert [len(call) for call in db.calls[1:]] == [500] * 20
    assert [job for call in db.calls[1:] for job in call] == [[n] for n in range(10_000)]
    assert backlog == [[[n * 10]] for n in range(10_000)]
    assert batcher.queued_items == 0 and batcher.in_flight == 0
