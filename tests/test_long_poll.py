"""Long polling (WIRE.md 2.3.7, 8 row 31, 3.7 internal notify).

The parking lot's coordination is specified on ``task.Clock`` with a scripted attempt
function standing in for the database round trip (what is tested is who gets asked when, not
SQL). Wake-ups are specified end to end against a server whose fallback timer is slowed to
5 s, so a pop answered well before that was woken, not polled.
"""

from __future__ import annotations

import threading
import time
from typing import List, Optional

import httpx
import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from queen_tw.engine.popper import Attempt, ParkingLot, PopRequest
from queen_tw.engine.waiters import Backoff, WaiterRegistry

from tests.http_helpers import ack, configure, pop, push
from tests.support import running_server, unique_name

# -- the parking lot on a fake clock ----------------------------------------------------


class ScriptedPopper:
    """Answers attempts from a script; records who asked and what was given back."""

    def __init__(self):
        self.asked: List[str] = []
        self.script: List[Optional[dict]] = []
        self.pending: Optional[defer.Deferred] = None
        self.hold = False
        self.hold_each = False  # every attempt waits on its own Deferred in ``held``
        self.held: List[defer.Deferred] = []
        self.given_back: List[dict] = []
        self.queues: Optional[List[str]] = None  # what a namespace attempt reports matching
        self.last_is_all = False  # the last scripted delivery says nothing else is left
        self.idle: List[ParkingLot] = []  # lots that reported "nobody left in line"

    async def attempt(self, request: PopRequest) -> Attempt:
        self.asked.append(request.consumer_group)
        if self.hold_each:
            self.held.append(defer.Deferred())
            return await self.held[-1]
        if self.hold:
            self.pending = defer.Deferred()
            return await self.pending
        if self.script:
            delivery = self.script.pop(0)
            return Attempt(delivery=delivery, more=not (self.last_is_all and not self.script))
        return Attempt(queues=self.queues)

    async def give_back(self, delivery: dict) -> None:
        self.given_back.append(delivery)

    def lot_idle(self, lot) -> None:
        self.idle.append(lot)


def _request(tag: str) -> PopRequest:
    # consumer_group doubles as a tag naming the parked pop in these tests
    return PopRequest(queue="q", partition=None, consumer_group=tag, wait=True, timeout_ms=30000)


def _lot(clock: Clock, popper: ScriptedPopper, initial_ms: int = 100) -> ParkingLot:
    return ParkingLot(_request("key"), popper, clock, Backoff(initial_ms, 3, 2.0, 1000))


def _answers(parked) -> list:
    seen: list = []
    parked.answer.addBoth(seen.append)
    return seen


def test_one_wake_up_costs_one_attempt_however_many_pops_are_parked():
    clock, popper = Clock(), ScriptedPopper()
    lot = _lot(clock, popper)
    parked = [lot.park(_request(f"w{n}"), 30, Attempt()) for n in range(1000)]

    woken = lot.wake("q", "p")

    assert woken == 1000
    assert popper.asked == ["w0"]  # one attempt, on behalf of the oldest pop
    assert all(p.waiting for p in parked)


def test_deliveries_go_to_parked_pops_in_arrival_order():
    clock, popper = Clock(), ScriptedPopper()
    lot = _lot(clock, popper)
    parked = [lot.park(_request(f"w{n}"), 30, Attempt()) for n in range(3)]
    seen = [_answers(p) for p in parked]
    popper.script = [{"m": 1}, {"m": 2}]

    lot.wake("q", None)

    assert popper.asked == ["w0", "w1", "w2"]  # delivered, delivered, then nothing: stop
    assert seen == [[{"m": 1}], [{"m": 2}], []]


def test_after_a_delivery_that_left_nothing_the_next_pop_is_not_asked_for():
    clock, popper = Clock(), ScriptedPopper()
    lot = _lot(clock, popper)
    parked = [lot.park(_request(f"w{n}"), 30, Attempt()) for n in range(3)]
    popper.last_is_all = True
    popper.script = [{"m": 1}]

    lot.wake("q", None)

    assert popper.asked == ["w0"]
    assert [len(_answers(p)) for p in parked] == [1, 0, 0]


def test_a_wake_up_during_an_attempt_is_answered_by_one_more_attempt():
    clock, popper = Clock(), ScriptedPopper()
    lot = _lot(clock, popper)
    parked = lot.park(_request("w0"), 30, Attempt())
    popper.hold = True
    lot.wake("q", None)
    lot.wake("q", None)
    lot.wake("q", None)
    assert popper.asked == ["w0"]

    popper.hold = False
    popper.script = [{"m": "late"}]
    popper.pending.callback(Attempt())

    assert popper.asked == ["w0", "w0"]
    assert _answers(parked) == [{"m": "late"}]


def test_wake_ups_in_a_row_run_one_attempt_each_for_different_pops():
    clock, popper = Clock(), ScriptedPopper()
    lot = _lot(clock, popper)
    parked = [lot.park(_request(f"w{n}"), 30, Attempt()) for n in range(3)]
    popper.hold_each = True
    lot.wake("q", "p1")
    lot.wake("q", "p2")
    assert popper.asked == ["w0", "w1"]  # at once, not one round trip after the other

    for n, attempt in enumerate(popper.held):
        attempt.callback(Attempt(delivery={"m": n}, more=False))

    assert [_answers(p) for p in parked] == [[{"m": 0}], [{"m": 1}], []]


def test_wake_ups_beyond_the_parked_pops_start_no_extra_attempts():
    clock, popper = Clock(), ScriptedPopper()
    lot = _lot(clock, popper)
    parked = lot.park(_request("w0"), 30, Attempt())
    popper.hold_each = True
    for n in range(5):
        lot.wake("q", f"p{n}")

    assert popper.asked == ["w0"]
    popper.held[0].callback(Attempt(delivery={"m": 0}, more=False))
    assert _answers(parked) == [{"m": 0}]
    assert popper.asked == ["w0"]  # nobody left to try for


def test_a_wake_up_while_every_pop_has_an_attempt_gets_one_more_after_them():
    """The attempt that delivers finds no pop free and stops; the wake-up it saw must stay
    pending for the other attempt, which began before it (caught by tests/test_workers.py
    across worker processes)."""
    clock, popper = Clock(), ScriptedPopper()
    lot = _lot(clock, popper, initial_ms=60_000)  # no fallback re-check within the test
    parked = [lot.park(_request(f"w{n}"), 30, Attempt()) for n in range(2)]
    popper.hold_each = True
    lot.wake("q", "p1")
    lot.wake("q", "p2")
    lot.wake("q", "p3")  # both pops are being tried for: remembered
    assert popper.asked == ["w0", "w1"]

    popper.held[0].callback(Attempt(delivery={"m": 1}, more=False))
    popper.held[1].callback(Attempt())  # began before p3 arrived

    assert popper.asked == ["w0", "w1", "w1"]  # so w1 is tried again
    popper.held[2].callback(Attempt(delivery={"m": 3}))
    assert [_answers(p) for p in parked] == [[{"m": 1}], [{"m": 3}]]


def test_the_soonest_hint_of_concurrent_attempts_sets_the_next_check():
    clock, popper = Clock(), ScriptedPopper()
    lot = _lot(clock, popper, initial_ms=60_000)
    for n in range(3):
        lot.park(_request(f"w{n}"), 30, Attempt())
    popper.hold_each = True
    lot.wake("q", "p1")
    lot.wake("q", "p2")
    popper.held[0].callback(Attempt(retry_in=0.05))  # e.g. a retry cool-down ends soon
    popper.held[1].callback(Attempt(delivery={"m": 2}, more=False))  # the last: no hint

    clock.advance(0.049)
    assert len(popper.asked) == 2
    clock.advance(0.002)
    assert len(popper.asked) == 3  # looked again when the database said, not in 60 s


def test_a_pop_that_left_is_dropped_and_a_delivery_meant_for_it_is_given_back():
    clock, popper = Clock(), ScriptedPopper()
    lot = _lot(clock, popper)
    leaving = lot.park(_request("w0"), 30, Attempt())
    staying = lot.park(_request("w1"), 30, Attempt())
    popper.hold = True
    lot.wake("q", None)

    lot.leave(leaving)  # client gone while its attempt runs
    popper.hold = False
    popper.script = [{"m": "again"}]
    popper.pending.callback(Attempt(delivery={"m": "orphan"}))

    assert _answers(leaving) == [None]
    assert popper.given_back == [{"m": "orphan"}]
    assert _answers(staying) == [{"m": "again"}]
    assert len(lot) == 0


def test_parked_pop_answers_none_at_its_deadline():
    clock, popper = Clock(), ScriptedPopper()
    lot = _lot(clock, popper, initial_ms=10_000)
    parked = lot.park(_request("w0"), 2.0, Attempt())
    seen = _answers(parked)

    clock.advance(1.9)
    assert seen == []
    clock.advance(0.2)

    assert seen == [None]
    assert len(lot) == 0


def test_fallback_timer_follows_the_backoff_and_a_known_due_time_comes_first():
    clock, popper = Clock(), ScriptedPopper()
    lot = _lot(clock, popper, initial_ms=1000)
    lot.park(_request("w0"), 30, Attempt(retry_in=0.25))

    clock.advance(0.24)
    assert popper.asked == []
    clock.advance(0.02)
    assert popper.asked == ["w0"]  # at the due time, not after the 1 s backoff
    clock.advance(0.99)
    assert popper.asked == ["w0"]
    clock.advance(0.02)
    assert popper.asked == ["w0", "w0"]


def test_a_lot_reports_to_its_owner_when_its_last_attempt_leaves_nobody_in_line():
    """The owner (the Popper) forgets idle lots; the lot says so through ``lot_idle``."""
    clock, popper = Clock(), ScriptedPopper()
    lot = _lot(clock, popper)
    first, second = (lot.park(_request(f"w{n}"), 30, Attempt()) for n in range(2))
    popper.script = [{"m": 1}]
    popper.last_is_all = True

    lot.wake("q", None)

    assert not first.waiting and second.waiting
    assert popper.idle == []  # the second pop still waits in line
    popper.script = [{"m": 2}]
    lot.wake("q", None)

    assert not second.waiting
    assert popper.idle == [lot]


def test_namespace_lot_ignores_pushes_to_queues_known_not_to_match():
    clock, popper = Clock(), ScriptedPopper()
    request = PopRequest(queue=None, partition=None, namespace="ns", wait=True)
    lot = ParkingLot(request, popper, clock, Backoff(10_000, 3, 2.0, 10_000))
    popper.queues = ["ns-a"]
    lot.park(request, 30, Attempt(queues=["ns-a"]))

    assert lot.wake("ns-a", None) == 1          # a matching queue: attempt
    assert lot.wake("elsewhere", None) == 1     # unknown yet: attempt, and learn
    assert lot.wake("elsewhere", None) == 0     # known unrelated: ignored
    assert len(popper.asked) == 2


def test_registry_wakes_partition_wildcard_and_any_queue_watchers():
    registry = WaiterRegistry(Clock())
    clock, popper = Clock(), ScriptedPopper()
    on_partition, on_queue, anywhere, elsewhere = (_lot(clock, popper) for _ in range(4))
    registry.watch("q", "p1", on_partition)
    registry.watch("q", None, on_queue)
    registry.watch(None, None, anywhere)
    registry.watch("q", "p2", elsewhere)
    for lot in (on_partition, on_queue, anywhere, elsewhere):
        lot.park(_request("w"), 30, Attempt())
    popper.asked.clear()

    registry.notify("q", "p1")

    assert len(popper.asked) == 3


# -- end to end -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_fallback(pg_env):
    """A server whose fallback re-check comes only every 5 s."""
    with running_server(pg_env, "queen-tw-longpoll-", POP_WAIT_INITIAL_INTERVAL_MS="5000",
                        POP_WAIT_MAX_INTERVAL_MS="5000") as process:
        yield process


@pytest.fixture
def client(slow_fallback):
    with httpx.Client(base_url=slow_fallback.url, timeout=15) as c:
        yield c


class LongPoll(threading.Thread):
    """One long-poll pop in the background; ``answer`` and ``elapsed`` when done."""

    def __init__(self, base_url: str, path: str, **params):
        super().__init__(daemon=True)
        self._url, self._path = base_url, path
        self._params = {"wait": "true", "timeout": "4000", **params}
        self.answer: Optional[httpx.Response] = None
        self.elapsed = 0.0

    def run(self) -> None:
        started = time.monotonic()
        with httpx.Client(base_url=self._url, timeout=15) as c:
            self.answer = c.get(self._path, params=self._params)
        self.elapsed = time.monotonic() - started


def _parked(base_url: str, queue: str, settle: float = 0.3, **params) -> LongPoll:
    poll = LongPoll(base_url, f"/api/v1/pop/queue/{queue}", **params)
    poll.start()
    time.sleep(settle)  # its first attempt found nothing and it parked
    return poll


def test_push_wakes_parked_pops_in_arrival_order(client, slow_fallback):
    queue = unique_name()
    configure(client, queue)
    polls = [_parked(slow_fallback.url, queue, settle=0.3) for _ in range(3)]

    push(client, queue, ["first"], partition="a", prefix="a")
    polls[0].join(3)
    push(client, queue, ["second"], partition="b", prefix="b")
    polls[1].join(3)

    assert polls[0].answer.json()["messages"][0]["data"] == "first"
    assert polls[1].answer.json()["messages"][0]["data"] == "second"
    assert polls[0].elapsed < 3.5 and polls[1].elapsed < 3.5  # well before the 5 s fallback
    polls[2].join(6)
    assert polls[2].answer.status_code == 204


def test_lease_release_wakes_a_parked_pop(client, slow_fallback):
    queue = unique_name()
    push(client, queue, ["one", "two"])
    held = pop(client, queue)["messages"][0]
    poll = _parked(slow_fallback.url, queue)

    started = time.monotonic()
    ack(client, held)
    poll.join(5)

    assert poll.answer.json()["messages"][0]["data"] == "two"
    assert time.monotonic() - started < 2


def test_end_of_retry_cool_down_wakes_a_parked_pop(client, slow_fallback):
    queue = unique_name()
    configure(client, queue, retryDelay=600)
    push(client, queue, ["again"])
    ack(client, pop(client, queue)["messages"][0], "failed")
    poll = _parked(slow_fallback.url, queue, settle=0.1)

    poll.join(5)

    message = poll.answer.json()["messages"][0]
    assert message["data"] == "again" and message["retryCount"] == 1
    assert 0.3 <= poll.elapsed < 2.5


def test_lease_expiry_wakes_a_parked_pop(client, slow_fallback):
    queue = unique_name()
    configure(client, queue, leaseTime=1)
    push(client, queue, ["redelivered"])
    assert pop(client, queue) is not None  # never acked
    poll = _parked(slow_fallback.url, queue, settle=0.1)

    poll.join(5)

    assert poll.answer.json()["messages"][0]["data"] == "redelivered"
    assert poll.elapsed < 2.5


def test_delayed_message_falling_due_wakes_a_parked_pop(client, slow_fallback):
    queue = unique_name()
    configure(client, queue, delayedProcessing=1)
    push(client, queue, ["later"])
    poll = _parked(slow_fallback.url, queue, settle=0.1)

    poll.join(5)

    assert poll.answer.json()["messages"][0]["data"] == "later"
    assert 0.6 <= poll.elapsed < 2.5


def test_internal_notify_wakes_pops_parked_on_that_queue(client, slow_fallback, db):
    queue = unique_name()
    configure(client, queue)
    poll = _parked(slow_fallback.url, queue)
    with db.cursor() as cursor:  # a push this server does not hear about
        cursor.execute("SELECT queen.push_messages_v2(%s::jsonb)",
                       (f'[{{"queue": "{queue}", "payload": "from-a-peer"}}]',))
    time.sleep(0.3)
    assert poll.is_alive()

    answer = client.post("/internal/api/notify", json={"queue": queue})
    poll.join(3)

    assert answer.json() == {"status": "ok"}
    assert poll.answer.json()["messages"][0]["data"] == "from-a-peer"
    assert poll.elapsed < 2


def test_namespace_long_poll_wakes_on_a_push_to_a_matching_queue(client, slow_fallback):
    namespace = unique_name("ns-")
    queue = unique_name()
    client.post("/api/v1/configure", json={"queue": queue, "namespace": namespace}).raise_for_status()
    poll = LongPoll(slow_fallback.url, "/api/v1/pop", namespace=namespace)
    poll.start()
    time.sleep(0.3)

    push(client, queue, ["ns-message"])
    poll.join(3)

    assert poll.answer.json()["messages"][0]["queue"] == queue
    assert poll.elapsed < 2


def test_a_client_that_disconnects_leaves_no_waiter_and_takes_no_lease(client, slow_fallback):
    queue = unique_name()
    configure(client, queue)
    with httpx.Client(base_url=slow_fallback.url, timeout=0.4) as impatient:
        with pytest.raises(httpx.TimeoutException):
            impatient.get(f"/api/v1/pop/queue/{queue}", params={"wait": "true", "timeout": "10000"})
    time.sleep(0.2)

    push(client, queue, ["for-whoever-is-here"])
    time.sleep(0.2)

    delivery = pop(client, queue)
    assert delivery is not None and delivery["messages"][0]["data"] == "for-whoever-is-here"
