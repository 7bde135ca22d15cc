"""A parking lot's attempts, driven by a scripted popper and a fake clock (no database).

Every wake-up must be answered by an attempt that starts after it, however the lot's
concurrent attempts interleave; otherwise a parked pop misses a message until its fallback
timer (tests/test_workers.py caught one such interleaving across worker processes).
"""

from typing import List

from twisted.internet import defer
from twisted.internet.task import Clock

from queen_tw.engine.popper import Attempt, ParkingLot, PopRequest
from queen_tw.engine.waiters import Backoff

SLOW_TIMER = Backoff(60_000, 3, 2.0, 60_000)  # no fallback re-check within a test


class ScriptedPopper:
    """Each ``attempt`` waits until the test answers it."""

    def __init__(self):
        self.calls: List[defer.Deferred] = []
        self.dropped = False

    def attempt(self, request: PopRequest) -> defer.Deferred:
        answer: defer.Deferred = defer.Deferred()
        self.calls.append(answer)
        return answer

    async def give_back(self, delivery) -> None:
        pass

    def _drop_if_idle(self, lot, leaving: bool = True) -> None:
        self.dropped = True


def parked_lot(pops: int):
    clock, popper = Clock(), ScriptedPopper()
    request = PopRequest(queue="q", partition=None, wait=True)
    lot = ParkingLot(request, popper, clock, SLOW_TIMER)
    parked = [lot.park(request, 30, Attempt()) for _ in range(pops)]
    return lot, popper, parked


def delivered(n: int, more: bool = False) -> Attempt:
    return Attempt(delivery={"messages": [n]}, more=more)


def test_a_wake_up_while_every_pop_has_an_attempt_gets_one_more_after_them():
    lot, popper, parked = parked_lot(2)
    lot.wake("q", "p1")
    lot.wake("q", "p2")
    assert len(popper.calls) == 2  # one attempt per wake-up, at once
    lot.wake("q", "p3")  # both pops are being tried for: remembered
    assert len(popper.calls) == 2

    popper.calls[0].callback(delivered(1))  # the first pop is served; nobody else is free
    popper.calls[1].callback(Attempt())  # the second attempt began before p3 arrived

    assert len(popper.calls) == 3  # so it is tried again, after the wake-up
    popper.calls[2].callback(delivered(3))
    assert [p.answer.result for p in parked] == [{"messages": [1]}, {"messages": [3]}]


def test_wake_ups_beyond_the_parked_pops_start_no_extra_attempts():
    lot, popper, parked = parked_lot(1)
    for n in range(5):
        lot.wake("q", f"p{n}")

    assert len(popper.calls) == 1
    popper.calls[0].callback(delivered(0))
    assert parked[0].answer.result == {"messages": [0]}
    assert len(popper.calls) == 1  # nobody left to try for


def test_an_empty_attempt_with_no_wake_up_since_leaves_the_pops_parked():
    lot, popper, parked = parked_lot(3)
    lot.wake("q", "p1")
    popper.calls[0].callback(Attempt())

    assert len(popper.calls) == 1
    assert not any(p.answer.called for p in parked)
    assert not lot.running


def test_a_delivery_with_more_to_hand_out_serves_the_next_pop_in_line():
    lot, popper, parked = parked_lot(2)
    lot.wake("q", "p1")
    popper.calls[0].callback(delivered(1, more=True))

    assert len(popper.calls) == 2
    popper.calls[1].callback(delivered(2))
    assert [p.answer.result for p in parked] == [{"messages": [1]}, {"messages": [2]}]


def test_the_soonest_retry_hint_of_any_attempt_sets_the_next_check():
    lot, popper, parked = parked_lot(3)
    lot.wake("q", "p1")
    lot.wake("q", "p2")
    popper.calls[0].callback(Attempt(retry_in=0.05))  # e.g. a retry cool-down ends soon
    popper.calls[1].callback(delivered(2))  # the last attempt to finish had no hint

    lot._clock.advance(0.049)
    assert len(popper.calls) == 2
    lot._clock.advance(0.002)
    assert len(popper.calls) == 3  # looked again when the database said, not in 60 s
