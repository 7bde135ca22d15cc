"""Long polling (WIRE.md 2.3.7, 8 row 31, 3.7 internal notify).

The parking lot's coordination is specified on ``task.Clock`` with a scripted attempt
function standing in for the database round trip (what is tested is who gets asked when, not
SQL). Wake-ups are proven on an engine in this process, where a test can see that a pop is
parked before it changes anything; they are exercised again over the socket. In both, the
fallback re-check is slowed to 10 minutes, so a message that arrives was brought by a
wake-up, not by the timer, and no test asserts how long anything took.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import List, Optional

import httpx
import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.task import Clock

from queen_tw.engine.popper import (
    JOIN_LOOK_AGAIN_S,
    Attempt,
    ParkingLot,
    PollTiming,
    PopRequest,
)
from queen_tw.engine.waiters import Backoff, WaiterRegistry

from tests.engine_support import in_process_engine
from tests.http_helpers import ack, configure, pop, push
from tests.support import running_server, unique_name, wait_until, wait_until_reactor

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


def test_a_pop_joining_a_line_whose_last_look_is_stale_makes_it_look_now():
    """A pop finding a line parks without an attempt of its own, relying on the line's last
    look. A change that wakes no one (a lease running out) outdated it: the pop waited for
    the fallback re-check (up to POP_WAIT_MAX_INTERVAL_MS), past a short timeout, while
    messages were ready (WIRE.md 2.3.7: try at once). A stale look is now taken again."""
    clock, popper = Clock(), ScriptedPopper()
    lot = _lot(clock, popper, initial_ms=5000)
    first = lot.park(_request("w0"), 30, Attempt())  # parked after its own empty attempt
    clock.advance(JOIN_LOOK_AGAIN_S / 2)
    second = lot.park(_request("w1"), 30, Attempt(), tried=False)
    assert popper.asked == []  # a look that recent stands

    clock.advance(JOIN_LOOK_AGAIN_S)
    popper.script = [{"m": 1}, {"m": 2}]
    third = lot.park(_request("w2"), 30, Attempt(), tried=False)

    assert popper.asked == ["w0", "w1", "w2"]  # oldest first, while there is more
    assert first.answer.result == {"m": 1} and second.answer.result == {"m": 2}
    assert third.waiting


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


def test_namespace_lot_forgets_unrelated_queues_once_a_queue_is_reconfigured():
    clock, popper = Clock(), ScriptedPopper()
    changes = [0]
    request = PopRequest(queue=None, partition=None, namespace="ns", wait=True)
    lot = ParkingLot(request, popper, clock, Backoff(10_000, 3, 2.0, 10_000),
                     lambda: changes[0])
    popper.queues = ["ns-a"]
    lot.park(request, 30, Attempt(queues=["ns-a"]))
    lot.wake("moved", None)                     # learnt unrelated
    assert lot.wake("moved", None) == 0

    changes[0] += 1                             # a configure (it may have moved "moved")
    popper.queues = ["ns-a", "moved"]

    assert lot.wake("moved", None) == 1
    assert len(popper.asked) == 2


def test_an_attempt_overtaken_by_a_configure_teaches_no_unrelated_queue():
    """An attempt read the namespace's queues before a configure moved "moved" in, and a
    push to "moved" came during it: its old answer must not leave "moved" marked unrelated,
    or the lot would ignore pushes to it from then on."""
    clock, popper = Clock(), ScriptedPopper()
    changes = [0]
    request = PopRequest(queue=None, partition=None, namespace="ns", wait=True)
    lot = ParkingLot(request, popper, clock, Backoff(10_000, 3, 2.0, 10_000),
                     lambda: changes[0])
    lot.park(request, 30, Attempt(queues=["ns-a"]))
    popper.hold_each = True
    lot.wake("moved", None)                     # attempt 1 starts: "moved" not in ns yet
    changes[0] += 1                             # the configure lands meanwhile
    lot.wake("moved", None)                     # and a push to "moved": one more attempt owed
    popper.held[0].callback(Attempt(queues=["ns-a"]))           # attempt 1's old answer
    popper.held[1].callback(Attempt(queues=["ns-a", "moved"]))  # attempt 2's
    popper.hold_each = False

    assert lot.wake("moved", None) == 1         # still tried, not ignored
    assert len(popper.asked) == 3


def test_registry_wakes_partition_wildcard_and_any_queue_watchers():
    registry = WaiterRegistry()
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


# -- wake-ups on an engine in this process, against the real PostgreSQL -------------------
#
# The engine's fallback re-check comes only every 10 minutes and every pop waits 60 s, so a
# pop that was seen parked (its own attempt came back empty) and then gets a message was
# answered by a wake-up: there is no time window to assert.

NO_FALLBACK = PollTiming(initial_ms=600_000, max_ms=600_000)


@pytest.fixture
def waiters() -> WaiterRegistry:
    return WaiterRegistry()


@pytest.fixture
def engine(pg_env, server, waiters):
    with in_process_engine(pg_env, waiters, NO_FALLBACK) as queue_engine:
        yield queue_engine
        queue_engine.popper.close()  # answer whatever a failed test left parked


def _long_poll(engine, queue: str) -> defer.Deferred:
    request = PopRequest(queue=queue, partition=None, wait=True, timeout_ms=60_000)
    return defer.ensureDeferred(engine.pop(request))


async def _parked(engine, count: int) -> None:
    await wait_until_reactor(lambda: engine.popper.parked == count,
                             message=f"{count} pop(s) parked")


def _data(delivery) -> list:
    return [m["data"] for m in delivery.message_list()]


@pytest_twisted.ensureDeferred
async def test_a_push_wakes_the_parked_pops_in_arrival_order(engine):
    queue = unique_name()
    await engine.configure(queue, "", "", {})
    polls = []
    for n in range(3):  # one at a time, so the arrival order is known
        polls.append(_long_poll(engine, queue))
        await _parked(engine, n + 1)

    await engine.push([{"queue": queue, "partition": "a", "payload": "first"}])
    first = await polls[0]
    await engine.push([{"queue": queue, "partition": "b", "payload": "second"}])
    second = await polls[1]

    assert _data(first) == ["first"] and _data(second) == ["second"]
    assert not polls[2].called and engine.popper.parked == 1
    engine.popper.close()
    assert await polls[2] is None


@pytest_twisted.ensureDeferred
async def test_a_lease_release_wakes_a_parked_pop(engine):
    queue = unique_name()
    await engine.push([{"queue": queue, "payload": "one"}, {"queue": queue, "payload": "two"}])
    held = await engine.pop(PopRequest(queue=queue, partition=None))
    poll = _long_poll(engine, queue)
    await _parked(engine, 1)  # the only partition is leased: its attempt found nothing

    message = held.message_list()[0]
    await engine.ack([{"transactionId": message["transactionId"],
                       "partitionId": message["partitionId"], "leaseId": held["leaseId"],
                       "status": "completed", "consumerGroup": None, "error": None,
                       "index": 0}])

    assert _data(await poll) == ["two"]


@pytest_twisted.ensureDeferred
async def test_a_notification_wakes_pops_parked_on_that_queue(engine, waiters, db):
    """A push this process did not make (a peer's) is found once the registry is told,
    as ``POST /internal/api/notify`` or a PostgreSQL notice does."""
    queue = unique_name()
    await engine.configure(queue, "", "", {})
    poll = _long_poll(engine, queue)
    await _parked(engine, 1)
    with db.cursor() as cursor:
        cursor.execute("SELECT queen.push_messages_v2(%s::jsonb)",
                       (f'[{{"queue": "{queue}", "payload": "from-a-peer"}}]',))
    assert not poll.called  # nothing told the engine yet, and no fallback re-check comes

    assert waiters.notify(queue, None) == 1

    assert _data(await poll) == ["from-a-peer"]


@pytest_twisted.ensureDeferred
async def test_pops_parked_on_other_queues_are_not_woken(engine, waiters):
    watched, other = unique_name(), unique_name()
    await engine.configure(watched, "", "", {})
    poll = _long_poll(engine, watched)
    await _parked(engine, 1)
    attempts, notifications = engine.popper.attempts, waiters.notifications

    await engine.push([{"queue": other, "payload": "elsewhere"}])

    assert waiters.notifications > notifications  # the push did notify
    assert engine.popper.attempts == attempts  # but no attempt ran for the watched queue
    assert not poll.called and engine.popper.parked == 1


@pytest_twisted.ensureDeferred
async def test_a_queue_configured_into_a_namespace_wakes_that_namespace_s_parked_pop(engine):
    """The namespace lot learnt the queue as unrelated before the configure moved it in;
    with no fallback re-check, only a wake-up can answer the pop."""
    namespace, queue = unique_name(), unique_name()
    await engine.configure(f"{namespace}.anchor", "", "", {})
    poll = defer.ensureDeferred(engine.pop(PopRequest(
        queue=None, partition=None, namespace=namespace, wait=True, timeout_ms=8_000)))
    await _parked(engine, 1)
    attempts = engine.popper.attempts
    await engine.push([{"queue": queue, "payload": "before"}])  # not in the namespace yet
    await wait_until_reactor(lambda: engine.popper.attempts > attempts,
                             message="the attempt that learns the queue is unrelated")
    await wait_until_reactor(lambda: not any(lot.running for lot in engine.popper._lots.values()),
                             message="that attempt done")
    assert not poll.called

    await engine.configure(queue, namespace, "", {})
    await engine.push([{"queue": queue, "payload": "after"}])

    delivery = await poll
    assert delivery is not None and _data(delivery) == ["before"]


@pytest_twisted.ensureDeferred
async def test_a_delivery_given_back_is_not_counted_as_a_clients_ack(engine):
    """A pop whose client left gives its delivery back through the ack path; the metrics
    must not count that as an ack some client made."""
    queue = unique_name()
    await engine.push([{"queue": queue, "payload": "x"}])
    delivery = await engine.pop(PopRequest(queue=queue, partition=None))
    counts = engine.recorder.current.counts
    acks_before = (counts.ack_requests, counts.ack_messages)

    await engine._give_back(delivery)  # what a pop does when its client is gone

    counts = engine.recorder.current.counts
    assert (counts.ack_requests, counts.ack_messages) == acks_before
    again = await engine.pop(PopRequest(queue=queue, partition=None))
    assert _data(again) == ["x"]


# -- end to end, over the socket ----------------------------------------------------------
#
# The server's fallback re-check comes only every 10 minutes and a pop waits up to 30 s, so
# a message that arrives came from the pop's first attempt or a wake-up. Each test makes the
# message unavailable to the first attempt (a lease, a cool-down, a delay) or gives the pop a
# moment to park first; none asserts how long anything took.


@pytest.fixture(scope="module")
def slow_fallback(pg_env):
    """A server whose fallback re-check of parked pops comes only every 10 minutes."""
    with running_server(pg_env, "queen-tw-longpoll-", POP_WAIT_INITIAL_INTERVAL_MS="600000",
                        POP_WAIT_MAX_INTERVAL_MS="600000") as process:
        yield process


@pytest.fixture
def client(slow_fallback):
    with httpx.Client(base_url=slow_fallback.url, timeout=45) as c:
        yield c


class LongPoll(threading.Thread):
    """One long-poll pop in the background; ``answer`` once it is done."""

    def __init__(self, base_url: str, path: str, **params):
        super().__init__(daemon=True)
        self._url, self._path = base_url, path
        self._params = {"wait": "true", "timeout": "30000", **params}
        self.answer: Optional[httpx.Response] = None

    def run(self) -> None:
        with httpx.Client(base_url=self._url, timeout=45) as c:
            self.answer = c.get(self._path, params=self._params)

    def result(self) -> httpx.Response:
        """The answer; fails the test if the pop is still waiting after its own timeout."""
        self.join(45)
        assert self.answer is not None, "the long-poll did not answer"
        return self.answer


PARKING_MOMENT_S = 0.3
"""A documented minimum, not a bound: time for a pop's first attempt to come back empty.
If a loaded machine needs longer, that attempt finds the message itself and the test still
passes (without exercising the wake-up, which the in-process tests above prove)."""


def _long_poll_http(base_url: str, queue: str, **params) -> LongPoll:
    poll = LongPoll(base_url, f"/api/v1/pop/queue/{queue}", **params)
    poll.start()
    return poll


def test_a_push_reaches_a_long_poll_waiting_over_the_socket(client, slow_fallback):
    queue = unique_name()
    configure(client, queue)
    poll = _long_poll_http(slow_fallback.url, queue)
    time.sleep(PARKING_MOMENT_S)

    push(client, queue, ["first"])

    assert poll.result().json()["messages"][0]["data"] == "first"


def _ack_in_a_transaction(client, held) -> None:
    done = client.post("/api/v1/transaction", json={
        "operations": [{"type": "ack", "transactionId": held["transactionId"],
                        "partitionId": held["partitionId"], "leaseId": held["leaseId"]}],
        "requiredLeases": [held["leaseId"]]}).json()
    assert done["success"] is True, done


@pytest.mark.parametrize("end", [ack, _ack_in_a_transaction], ids=["ack", "transaction"])
def test_lease_release_wakes_a_parked_pop(client, slow_fallback, end):
    """(A transaction's ack woke nobody: its pop waited out its whole timeout.)"""
    queue = unique_name()
    push(client, queue, ["one", "two"])
    held = pop(client, queue)["messages"][0]
    poll = _long_poll_http(slow_fallback.url, queue)  # the partition is leased: it parks
    time.sleep(PARKING_MOMENT_S)

    end(client, held)

    assert poll.result().json()["messages"][0]["data"] == "two"


def test_end_of_retry_cool_down_wakes_a_parked_pop(client, slow_fallback):
    """The first attempt learns when the cool-down ends and the pop re-checks then."""
    queue = unique_name()
    configure(client, queue, retryDelay=600)
    push(client, queue, ["again"])
    ack(client, pop(client, queue)["messages"][0], "failed")

    message = _long_poll_http(slow_fallback.url, queue).result().json()["messages"][0]

    assert message["data"] == "again" and message["retryCount"] == 1


def test_lease_expiry_wakes_a_parked_pop(client, slow_fallback):
    queue = unique_name()
    configure(client, queue, leaseTime=1)
    push(client, queue, ["redelivered"])
    assert pop(client, queue) is not None  # never acked

    answer = _long_poll_http(slow_fallback.url, queue).result()

    assert answer.json()["messages"][0]["data"] == "redelivered"


def test_delayed_message_falling_due_wakes_a_parked_pop(client, slow_fallback):
    queue = unique_name()
    configure(client, queue, delayedProcessing=1)
    push(client, queue, ["later"])

    answer = _long_poll_http(slow_fallback.url, queue).result()

    assert answer.json()["messages"][0]["data"] == "later"


def test_internal_notify_wakes_pops_parked_on_that_queue(client, slow_fallback, db):
    queue = unique_name()
    configure(client, queue)
    poll = _long_poll_http(slow_fallback.url, queue)
    time.sleep(PARKING_MOMENT_S)
    with db.cursor() as cursor:  # a push this server does not hear about
        cursor.execute("SELECT queen.push_messages_v2(%s::jsonb)",
                       (f'[{{"queue": "{queue}", "payload": "from-a-peer"}}]',))

    answer = client.post("/internal/api/notify", json={"queue": queue})

    assert answer.json() == {"status": "ok"}
    assert poll.result().json()["messages"][0]["data"] == "from-a-peer"


def test_namespace_long_poll_wakes_on_a_push_to_a_matching_queue(client, slow_fallback):
    namespace = unique_name("ns-")
    queue = unique_name()
    client.post("/api/v1/configure",
                json={"queue": queue, "namespace": namespace}).raise_for_status()
    poll = LongPoll(slow_fallback.url, "/api/v1/pop", namespace=namespace)
    poll.start()
    time.sleep(PARKING_MOMENT_S)

    push(client, queue, ["ns-message"])

    assert poll.result().json()["messages"][0]["queue"] == queue


def test_a_client_that_disconnects_leaves_no_waiter_and_takes_no_lease(client, slow_fallback):
    queue = unique_name()
    configure(client, queue)
    with httpx.Client(base_url=slow_fallback.url, timeout=0.4) as impatient, \
            pytest.raises(httpx.TimeoutException):
        impatient.get(f"/api/v1/pop/queue/{queue}", params={"wait": "true", "timeout": "10000"})

    push(client, queue, ["for-whoever-is-here"])

    # The push's wake-up may still reach the departed pop's lot: whatever it does with the
    # message, it must end up free again (a lease taken for nobody would hold it 5 minutes).
    delivery = wait_until(lambda: pop(client, queue),
                          message="the message free for the next consumer")
    assert delivery["messages"][0]["data"] == "for-whoever-is-here"


def _pop_and_leave_while_the_sql_runs(port: int, target: str, db) -> None:
    """Sends a pop on a raw socket and closes it while the pop's SQL waits for a table lock
    this test holds; the SQL then completes for a client that is gone."""
    with db.cursor() as cursor:
        cursor.execute("BEGIN")
        cursor.execute("LOCK TABLE queen.messages IN ACCESS EXCLUSIVE MODE")
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            wait_until(lambda: asleep_on_lock(db), message="the pop waiting for the lock")
        time.sleep(0.3)  # the close reaches the server
        cursor.execute("ROLLBACK")


def asleep_on_lock(db) -> bool:
    with db.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                       " AND pid <> pg_backend_pid() AND query LIKE '%queen.%'")
        return bool(cursor.fetchone()[0])


@pytest.mark.parametrize("route", [
    "/api/v1/pop/queue/{q}?batch=10&wait=false",  # the hot shortcut
    "/api/v1/pop/queue/{q}/partition/%44efault?batch=10&wait=false",  # the composed routes
    "/api/v1/pop?namespace=ns-{q}&batch=10&wait=false",
])
def test_a_pop_whose_client_left_during_its_sql_gives_its_messages_back(server, http, db,
                                                                       route):
    queue = unique_name()
    http.post("/api/v1/configure", json={"queue": queue, "namespace": f"ns-{queue}"})
    push(http, queue, [0, 1, 2])
    with db.cursor() as cursor:  # the lock below must not wait for another test's session
        cursor.execute("SET lock_timeout = '5s'")

    _pop_and_leave_while_the_sql_runs(server.port, route.format(q=queue), db)

    delivery = wait_until(lambda: pop(http, queue, batch=10),
                          message="the messages free for the next consumer")
    assert [m["data"] for m in delivery["messages"]] == [0, 1, 2]


@pytest.mark.parametrize("route", [
    "/api/v1/pop/queue/{q}?batch=10&wait=false&autoAck=true",
    "/api/v1/pop/queue/{q}?batch=10&wait=false&autoAck=true&consumerGroup=g",
    "/api/v1/pop?namespace=ns-{q}&batch=10&wait=false&autoAck=true&partitions=2",
])
def test_an_auto_ack_pop_whose_client_left_during_its_sql_undoes_its_commit(server, http, db,
                                                                           route):
    """autoAck commits at delivery; when the client is known gone before its answer is
    written, the cursor goes back (nobody moved it since), so no message is lost."""
    queue = unique_name()
    http.post("/api/v1/configure", json={"queue": queue, "namespace": f"ns-{queue}"})
    http.post("/api/v1/push", json={"items": [
        {"queue": queue, "partition": f"p{n % 2}", "payload": n} for n in range(4)]})
    with db.cursor() as cursor:
        cursor.execute("SET lock_timeout = '5s'")

    _pop_and_leave_while_the_sql_runs(server.port, route.format(q=queue), db)

    group = {"consumerGroup": "g"} if "consumerGroup=g" in route else {}
    seen = []
    for _ in range(4):
        delivery = wait_until(lambda: pop(http, queue, batch=10, **group),
                              message="the messages free for the next consumer")
        seen += [m["data"] for m in delivery["messages"]]
        for message in delivery["messages"]:
            assert ack(http, message, **group)["success"]
        if len(seen) >= 4:
            break
    assert sorted(seen) == [0, 1, 2, 3]


def test_a_long_poll_whose_sql_waits_for_a_held_lock_answers_at_its_timeout(server, http, db):
    """A statement waiting for a row another session holds runs until DB_LOCK_TIMEOUT (10 s
    here); a long poll used to wait for it, and 60 of them behind a held table answered
    40 s after their 5 s timeout (an audit). It answers 204 at its timeout now, and the
    delivery its SQL makes once the lock is gone is given back, not left leased to nobody
    for the queue's five-minute lease. ("At its timeout": within the 4 s of grace a waiting
    pop's attempt has, under the 5 s the official clients wait beyond the timeout.)"""
    queue = unique_name()
    configure(http, queue, leaseTime=300)
    push(http, queue, ["held back"])
    with db.cursor() as cursor:
        cursor.execute("SET lock_timeout = '5s'")
        cursor.execute("BEGIN")
        cursor.execute("LOCK TABLE queen.messages IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        poll = _long_poll_http(server.url, queue, timeout="1500")
        wait_until(lambda: asleep_on_lock(db), message="the pop waiting for the lock")
        answer = poll.result()
        answered_after = time.monotonic() - started
        cursor.execute("ROLLBACK")

    assert answer.status_code == 204, answer.text
    assert answered_after < 9, answered_after  # before DB_LOCK_TIMEOUT (10 s) ended its SQL
    delivery = wait_until(lambda: pop(http, queue),
                          message="the message free for the next consumer")
    assert [m["data"] for m in delivery["messages"]] == ["held back"]
