"""Pop: one attempt through the pop Batcher, and long polling between attempts.

A pop with ``wait=true`` that found nothing parks in a :class:`ParkingLot`, one per
(queue or namespace/task, partition or any, consumer group). A lot is what the
:class:`WaiterRegistry` wakes, and it answers a wake-up with **one** database attempt on
behalf of its oldest pop, not one per parked pop: a thousand consumers parked on one queue
cost one attempt per push, and messages go to them in arrival order. Only when an attempt
delivers does the lot try again for the next pop in line. A waiting pop that arrives while
its lot already has a line joins the back of it without an attempt of its own: the line
proves the last attempt found nothing, and jumping it would cost a database attempt that
almost always comes back empty.

Between wake-ups a lot re-checks on its own timer: the ``POP_WAIT_*`` backoff, or sooner when
the database said when something falls due (a retry cool-down or a lease ends, a delayed
message or a window buffer matures).
"""

import json
import math
from collections import deque
from dataclasses import dataclass, replace
from typing import (
    Any,
    Awaitable,
    Callable,
    Deque,
    Dict,
    Iterable,
    List,
    Optional,
    Protocol,
    Set,
    Tuple,
)

import orjson
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from queen_tw.db.pool import Database, DeadlineExceeded
from queen_tw.engine import autopilot
from queen_tw.engine.batcher import Batcher, BatchLimits
from queen_tw.engine.leases_in_doubt import LeasesInDoubt, new_lease_id
from queen_tw.engine.sealed_answers import OpenPayload, open_pop_messages
from queen_tw.engine.waiters import Backoff, WaiterRegistry
from queen_tw.errors import DatabaseUnavailable, NoEncryptionKey, Unavailable

log = Logger()

QUEUE_MODE = "__QUEUE_MODE__"
# Attempts one lot runs at once, each answering its own wake-up. Acks release partitions one
# by one; one attempt at a time would make every other released partition wait a round trip.
MAX_ATTEMPTS_PER_LOT = 8
CALL_BYTE_BUDGET = 64 * 1024 * 1024
"""Payload bytes one fused pop call hands out before it defers its remaining requests to
calls of their own (``queen.pop_batch``): its answer is held in memory whole, and each of up
to QUEEN_POP_MAX_BATCH_SIZE requests may take 64 MiB and more (queen.pop_byte_budget)."""
NO_WAIT_ANSWER_BY_S = 25.0
"""A pop that does not wait answers "nothing" when PostgreSQL has not answered its attempt
within this (a held row; calls queued behind one): under the official clients' 30 s default
timeout, their patience for such a pop."""
WAITING_GRACE_S = 4.0
"""A waiting pop answers "nothing" when its attempt has not come back this long after its
timeout: the official clients wait 5 s more than the timeout they send. (Not at the timeout
itself: a long poll of a millisecond still gets its one attempt.)"""


class Delivery(dict):
    """A pop's answer body. Its ``messages`` are PostgreSQL's json text, put into the HTTP
    answer as they are (``orjson.Fragment``): parsing and re-encoding 100 messages was most
    of a pop's cost in the server. :meth:`message_list` parses them when something needs
    to look inside (giving a delivery back). Encrypted payloads are opened in the text
    itself (``sealed_answers``). A delivery made from a parsed list (no text) keeps it."""

    def __init__(self, fields: Dict[str, Any], messages: Any, text: Optional[str] = None,
                 unopened: Optional[NoEncryptionKey] = None):
        super().__init__(fields, messages=messages)
        self._text = text
        self.unopened = unopened  # encrypted payloads this server has no key for

    @property
    def raw_text(self) -> Optional[str]:
        """The messages as PostgreSQL's json text, or None when they are a parsed list."""
        return self._text

    def message_list(self) -> List[Dict[str, Any]]:
        if self._text is not None:
            return json.loads(self._text)
        return self["messages"]


LotKey = Tuple[Optional[str], Optional[str], Optional[str], Optional[str], str]
LaneKey = Tuple[Optional[str], Optional[str], Optional[str], str]


@dataclass(frozen=True)
class PopRequest:
    """One validated pop.

    ``queue`` with ``partition`` None means any partition of that queue; ``queue`` None
    means every queue matching ``namespace`` and/or ``task``. ``partitions`` None: not
    given (1, or batch up to 64 for a conflating group, or the autopilot's choice).
    ``autopilot``: the request carried ``autopilot=true`` (its answer echoes the sizing);
    ``conflation``: it asked for last-value delivery (WIRE2 8.3, 8.4). ``waiting_since``:
    the database time at which its first attempt found nothing (a pop that joined a lot's
    line without an attempt: the lot's latest such attempt). A group starting at "now" that
    meets the queue for the first time while waiting starts there, so a push made during the
    wait is not history to it: the push that creates the queue, or one that re-creates a
    queue deleted meanwhile (the delete took the group's subscription with it).
    """

    queue: Optional[str]
    partition: Optional[str]
    consumer_group: str = QUEUE_MODE
    batch: int = 1
    partitions: Optional[int] = None
    auto_ack: bool = False
    wait: bool = False
    timeout_ms: int = 30000
    subscription_mode: Optional[str] = None
    subscription_from: Optional[str] = None
    namespace: Optional[str] = None
    task: Optional[str] = None
    autopilot: bool = False
    conflation: bool = False
    waiting_since: Optional[str] = None

    @property
    def lot_key(self) -> LotKey:
        """Pops that may share one database attempt."""
        return (self.queue, self.partition, self.namespace, self.task, self.consumer_group)

    @property
    def lane(self) -> LaneKey:
        """The (queue or namespace/task, group) whose autopilot and policy this pop shares."""
        return (self.queue, self.namespace, self.task, self.consumer_group)

    @property
    def width_delegated(self) -> bool:
        """The autopilot chooses how many partitions this pop claims."""
        return self.autopilot and self.partitions is None and self.partition is None

    def as_sql(self, worker_id: str, share: Optional[float] = None) -> Dict[str, Any]:
        return {
            "queue": self.queue, "partition": self.partition,
            "namespace": self.namespace, "task": self.task,
            "consumerGroup": self.consumer_group, "batch": self.batch,
            "partitions": self.partitions, "autoShare": share, "conflation": self.conflation,
            "autoAck": self.auto_ack, "workerId": worker_id,
            "subscriptionMode": self.subscription_mode,
            "subscriptionFrom": self.subscription_from,
            "waitingSince": self.waiting_since,
            "deferSubscription": True,
        }


@dataclass(frozen=True)
class PollTiming:
    """The ``POP_WAIT_*`` fallback timer settings of parked pops."""

    initial_ms: int = 100
    threshold: int = 3
    multiplier: float = 2.0
    max_ms: int = 1000

    def backoff(self) -> Backoff:
        return Backoff(self.initial_ms, self.threshold, self.multiplier, self.max_ms)


@dataclass
class Attempt:
    """What one database attempt said: a delivery, or when to look again (seconds)."""

    delivery: Optional[Delivery] = None
    retry_in: Optional[float] = None
    queues: Optional[List[str]] = None
    more: bool = True  # after a delivery: may another pop find something right now?
    empty_at: Optional[str] = None  # found nothing at this database time


class LotOwner(Protocol):
    """What a :class:`ParkingLot` needs from whoever owns it (the Popper; a script in tests).

    The lot decides *when* to try and *who* gets a delivery; the owner runs the database
    attempt, takes back a delivery nobody can receive, and keeps the table of lots.
    """

    async def attempt(self, request: PopRequest) -> Attempt:
        """One database attempt on behalf of ``request``."""

    async def give_back(self, delivery: Delivery) -> None:
        """Release the leases of a delivery whose pop went away meanwhile."""

    def lot_idle(self, lot: "ParkingLot") -> None:
        """The lot's last attempt ended with nobody in line: forget it if no pop uses it."""


class Popper:
    """Delivers messages to pop requests.

    :param db: the pool; pops are fused through a Batcher into ``pop_batch``.
    :param waiters: where parked pops are woken from.
    :param clock: time source for deadlines and re-check timers.
    :param worker_id: stamped on leases.
    :param poll_timing: fallback timer of parked pops.
    :param limits: pop Batcher limits.
    :param open_payload: an encrypted message's stored ``data`` as plaintext JSON text.
    :param give_back: releases the leases of a delivery nobody will receive.
    :param paused: True while pop maintenance is on (every pop answers "nothing" at once).
    :param settings_changes: a count that grows with every queue configure or delete seen
        here (own, a peer's, a sibling's); see :class:`ParkingLot`.
    :param freed: told the (queue, partition)s whose leases in doubt were expired.
    """

    def __init__(self, db: Database, waiters: WaiterRegistry, clock: IReactorTime,
                 worker_id: str, poll_timing: PollTiming, limits: BatchLimits,
                 open_payload: OpenPayload,
                 give_back: Callable[[Delivery], Awaitable[None]],
                 paused: Callable[[], bool] = lambda: False,
                 settings_changes: Callable[[], int] = lambda: 0,
                 freed: Callable[[Iterable[Tuple[str, str]]], None] = lambda _: None):
        self._db = db
        self._waiters = waiters
        self._clock = clock
        self._worker_id = worker_id
        self._poll_timing = poll_timing
        self._open_payload = open_payload
        self._give_back = give_back
        self._paused = paused
        self._settings_changes = settings_changes
        self._lots: Dict[LotKey, ParkingLot] = {}
        self._conflating: Dict[LaneKey, bool] = {}  # stored policies the pops reported
        self.autopilot = autopilot.Autopilot(clock)
        self.batcher = Batcher("pop", self._pop_batch, clock, limits)
        self.leases_in_doubt = LeasesInDoubt(db.call, clock, freed)
        self.call_byte_budget = CALL_BYTE_BUDGET
        self.deferred = 0  # requests a full call deferred to calls of their own
        self.attempts = 0

    @property
    def parked(self) -> int:
        """Pops parked right now."""
        return sum(len(lot) for lot in self._lots.values())

    async def pop(self, request: PopRequest, gone: Optional[defer.Deferred] = None
                  ) -> Optional[Delivery]:
        """Delivers up to ``request.batch`` messages, or None when nothing came in time.

        ``gone`` fires when the client disconnected: the pop leaves its lot at once and a
        delivery that can no longer be written is given back.
        """
        if self._paused():
            return None
        self.autopilot.entered(request.lane)
        try:
            delivery = await self._pop(request, gone)
        finally:
            self.autopilot.left(request.lane)
        if delivery is not None and delivery.unopened is not None:
            await self.give_back(delivery)  # (an autoAck one is undone) for a keyed server
            raise delivery.unopened
        return delivery

    async def _pop(self, request: PopRequest, gone: Optional[defer.Deferred]
                   ) -> Optional[Delivery]:
        lot = self._lot(request) if request.wait and request.timeout_ms > 0 else None
        # (a timeout <= 0 answers after one attempt; a very negative one put the attempt's
        # own deadline in the past, and a ready message was answered 204)
        deadline = self._clock.seconds() + max(request.timeout_ms, 0) / 1000.0
        answer_by = (deadline + WAITING_GRACE_S if request.wait
                     else self._clock.seconds() + NO_WAIT_ANSWER_BY_S)
        outcome = Attempt()
        tried = False
        while lot is None or not len(lot):
            wakes_before = lot.wakes if lot is not None else 0
            tried = True
            outcome = await self._attempt_by(request, answer_by)
            if outcome.empty_at is not None and request.waiting_since is None:
                request = replace(request, waiting_since=outcome.empty_at)
            if outcome.delivery is not None:
                if gone is not None and gone.called:
                    await self.give_back(outcome.delivery)
                    self._leave(lot)
                    return None
                self._leave(lot)
                return outcome.delivery
            if lot is None or (gone is not None and gone.called) \
                    or self._clock.seconds() >= deadline:
                self._leave(lot)
                return None
            if lot.wakes == wakes_before:  # nothing changed while the attempt ran: park
                break
        if self._paused():  # pop maintenance came on during the attempt: nothing to wait for
            self._leave(lot)
            return None
        parked = lot.park(request, deadline - self._clock.seconds(), outcome, tried)
        if gone is not None:
            gone.addBoth(lambda _: lot.leave(parked))
        try:
            delivery = await parked.answer
        finally:
            self._leave(lot)
        if delivery is not None and gone is not None and gone.called:
            await self.give_back(delivery)
            return None
        return delivery

    async def _attempt_by(self, request: PopRequest, deadline: float) -> Attempt:
        """:meth:`attempt`, or nothing at ``deadline`` when PostgreSQL takes longer: a
        statement waiting for a held row runs until DB_LOCK_TIMEOUT, and calls queue behind
        such ones, so an audit saw pops answer 20 to 45 s late, past the clients' patience.
        A delivery that comes after the pop answered is given back."""
        answer: defer.Deferred[Attempt] = defer.Deferred()

        def expire() -> None:
            if not answer.called:
                answer.callback(Attempt())

        timer = self._clock.callLater(max(deadline - self._clock.seconds(), 0), expire)
        defer.ensureDeferred(self._run_attempt(request, answer))
        try:
            return await answer
        finally:
            if timer.active():
                timer.cancel()

    async def _run_attempt(self, request: PopRequest, answer: defer.Deferred[Attempt]) -> None:
        """Runs one attempt to its end and answers ``answer`` with it, unless ``answer`` was
        answered meanwhile: then a delivery is given back."""
        try:
            outcome = await self.attempt(request)
        except Exception:
            if not answer.called:
                answer.errback()
            else:
                log.failure("a pop attempt that ended after its pop answered failed")
            return
        if not answer.called:
            answer.callback(outcome)
            return
        if outcome.delivery is not None:
            await self.give_back(outcome.delivery)

    async def attempt(self, request: PopRequest) -> Attempt:
        """One try at the database. An outage counts as "nothing yet": consumers' loops exit
        on a pop error, so pops answer 204 and /health reports the outage (WIRE.md 2.3.8)."""
        if self._paused():  # pop maintenance came on while this pop was parked
            return Attempt()
        self.attempts += 1
        wanted = request.as_sql(self._worker_id, self.autopilot.share(request.lane)
                                if request.width_delegated else None)
        lease = None if request.auto_ack else new_lease_id()
        if lease is not None:  # ours, so a lease nobody received can be found (see below)
            wanted["leaseId"] = lease
        try:
            result = await self._pop_fused(wanted)
            if result.get("needsSubscription"):
                # First contact of the group: recorded in a transaction of its own
                # (see queen.subscribe_for), then the pop goes again.
                await self._db.call("subscribe_for", wanted)
                result = await self._pop_fused(wanted)
        except Exception as err:
            # PostgreSQL may still commit a call the server gave up on (leases_in_doubt):
            # one past its deadline, or whose connection broke (a cause); not one refused
            # before it was sent for want of a pool
            if lease is not None and (isinstance(err, DeadlineExceeded) or (
                    isinstance(err, DatabaseUnavailable) and err.__cause__ is not None)):
                self.leases_in_doubt.note(lease)
            if not isinstance(err, Unavailable):
                log.failure("pop on {queue} failed", queue=request.queue or request.namespace)
            return Attempt()
        if not result.get("success", False):
            log.warn("pop on {queue} failed: {error}", queue=request.queue or request.namespace,
                     error=result.get("error"))
            return Attempt()
        text = result.pop("messages", None)
        self._learn(request, result)
        if not text:
            retry_in = result.get("retryInMs")
            return Attempt(retry_in=max(retry_in, 1) / 1000.0 if retry_in is not None else None,
                           queues=result.get("queues"), empty_at=result.get("emptyAt"))
        more = result.pop("more", True)
        encrypted = result.pop("encryptedIds", None)
        if encrypted:
            try:
                text = open_pop_messages(text, encrypted, self._open_payload)
            except NoEncryptionKey as err:  # given back by pop(), whoever it goes to
                return Attempt(delivery=Delivery(result, orjson.Fragment(text), text, err))
        return Attempt(delivery=Delivery(result, orjson.Fragment(text), text), more=more)

    def _learn(self, request: PopRequest, result: Dict[str, Any]) -> None:
        """Takes the autopilot's and conflation's facts out of a pop result, feeds the
        autopilot, and adds the 2.x fields the answer carries (WIRE2 8.2)."""
        conflating = result.pop("conflation", None)
        width = result.pop("width", None)
        self.autopilot.learn(request.lane, width, result.pop("oldestMs", None))
        if request.autopilot:
            result["autopilot"] = autopilot.echo(width or 1, request.batch)
        if conflating is None:
            # no stored policy was read (the queue or partition is unknown, e.g. deleted):
            # the one learnt before is stale, and made empty answers claim conflation
            self._conflating.pop(request.lane, None)
            return
        if len(self._conflating) > 10_000:
            self._conflating.clear()
        self._conflating[request.lane] = conflating
        result.update(self._policy_fields(request, conflating))

    @staticmethod
    def _policy_fields(request: PopRequest, conflating: bool) -> Dict[str, Any]:
        """``conflation`` when the group's stored policy conflates, ``conflationConflict``
        when the request asked otherwise (the stored policy wins)."""
        fields: Dict[str, Any] = {}
        if conflating:
            fields["conflation"] = True
        if conflating != request.conflation:
            fields["conflationConflict"] = True
        return fields

    def empty_answer(self, request: PopRequest) -> Optional[Dict[str, Any]]:
        """The body of a pop that delivered nothing, or None for a bodiless 204.

        A pop that asked for conflation, or whose group conflates, answers 200 with an empty
        list (a 204 reads as "this broker ignores conflation" to the 2.x client); the policy
        is the one the group's last pop here reported, else the request's.
        """
        conflating = self._conflating.get(request.lane)
        if not request.conflation and not conflating:
            return None
        body: Dict[str, Any] = {"success": True, "messages": []}
        body.update(self._policy_fields(
            request, request.conflation if conflating is None else conflating))
        if request.autopilot:
            body["autopilot"] = autopilot.echo(self.autopilot.last_width(request.lane),
                                               request.batch)
        return body

    def close(self) -> None:
        """Answers every parked pop now (the server stops)."""
        for lot in list(self._lots.values()):
            lot.close()

    def _lot(self, request: PopRequest) -> "ParkingLot":
        lot = self._lots.get(request.lot_key)
        if lot is None:
            lot = self._lots[request.lot_key] = ParkingLot(
                request, self, self._clock, self._poll_timing.backoff(), self._settings_changes)
            self._waiters.watch(request.queue, request.partition, lot)
        lot.users += 1
        return lot

    def _leave(self, lot: Optional["ParkingLot"]) -> None:
        """A pop is done with ``lot`` (answered, timed out or gone)."""
        if lot is None:
            return
        lot.users -= 1
        self.lot_idle(lot)

    def lot_idle(self, lot: "ParkingLot") -> None:
        """Forgets ``lot`` (timer, registry entry, table row) once no pop uses it and no
        attempt of its runs; a later pop on the same key makes a fresh one."""
        if lot.users <= 0 and not lot.running:
            lot.stop_timer()
            self._waiters.unwatch(lot.queue, lot.partition, lot)
            if self._lots.get(lot.key) is lot:
                del self._lots[lot.key]

    async def give_back(self, delivery: Delivery) -> None:
        """Releases a delivery nobody will receive. Should that fail (PostgreSQL away), its
        lease is in doubt: expired once PostgreSQL answers again."""
        try:
            await self._give_back(delivery)
        except Exception as err:
            lease = delivery.get("leaseId")
            if lease:
                self.leases_in_doubt.note(lease)
            log.warn("a delivery nobody will receive could not be given back ({error}); its "
                     "lease is expired once PostgreSQL answers", error=err)

    async def _pop_fused(self, wanted: Dict[str, Any]) -> Dict[str, Any]:
        """``pop_batch``'s result for one request, fused with others by the Batcher; a
        request deferred because the call's answer was full goes again in a call of its own
        (where it runs first, so it is not deferred again)."""
        [result] = await self.batcher.submit([wanted])
        if result.get("deferred"):
            self.deferred += 1
            [[result]] = await self._pop_batch([[wanted]])
        return result

    async def _pop_batch(self, jobs: List[List[Dict[str, Any]]]) -> List[List[Dict[str, Any]]]:
        """One ``pop_batch`` call for several pop requests (one request per job); each
        result carries its messages as json text under ``messages``. The call's answer is
        bounded by :attr:`call_byte_budget`: the server holds it whole."""
        requests = [dict(job[0], idx=n) for n, job in enumerate(jobs)]
        rows = await self._db.call_rows("pop_batch", requests, self.call_byte_budget)
        by_idx = {idx: dict(result, messages=messages) for idx, result, messages in rows}
        return [[by_idx[n]] for n in range(len(jobs))]


class _Parked:
    """One parked pop: its request, its answer, its deadline."""

    def __init__(self, request: PopRequest):
        self.request = request
        self.answer: defer.Deferred = defer.Deferred()
        self.deadline: Optional[IDelayedCall] = None
        self.served = False  # an attempt on its behalf is running

    @property
    def waiting(self) -> bool:
        return not self.answer.called

    def settle(self, delivery: Optional[Delivery]) -> None:
        if self.deadline is not None and self.deadline.active():
            self.deadline.cancel()
        if not self.answer.called:
            self.answer.callback(delivery)


JOIN_LOOK_AGAIN_S = 0.05
"""How old a line's last look may be for a pop joining it to rely on it (ParkingLot.park):
the joiners of a busy line cost PostgreSQL at most 20 attempts a second."""


class ParkingLot:
    """The parked pops of one key, served in arrival order, one database attempt at a time.

    A wake-up while an attempt runs is remembered and answered by one more attempt after it
    (the change may have come after the attempt's snapshot), so no push goes unnoticed.
    """

    def __init__(self, request: PopRequest, popper: LotOwner, clock: IReactorTime,
                 backoff: Backoff, settings_changes: Callable[[], int] = lambda: 0):
        self.key = request.lot_key
        self.queue = request.queue
        self.partition = request.partition
        self._popper = popper
        self._clock = clock
        self._backoff = backoff
        self._line: Deque[_Parked] = deque()
        self._timer: Optional[IDelayedCall] = None
        self._dirty = False
        self._matching: Set[str] = set()      # namespace lots: queues known to match
        self._unrelated: Set[str] = set()     # namespace lots: queues known not to
        self._asked: Set[str] = set()
        # A configure can move a queue into this lot's namespace: what was learnt as
        # unrelated holds only while no configure or delete has been seen since.
        self._settings_changes = settings_changes
        self._unrelated_as_of = settings_changes()
        self._attempts = 0      # attempts running for this lot's pops
        self._retry_in: Optional[float] = None  # when the database said to look again
        self.users = 0          # pops in their first attempt or parked here
        self.wakes = 0
        self._empty_at: Optional[str] = None  # the latest attempt that found nothing
        self._looked_at = -math.inf  # when the latest attempt for the line started

    def __len__(self) -> int:
        return sum(1 for parked in self._line if parked.waiting)

    # -- the registry's side -------------------------------------------------------------

    def wake(self, queue: str, partition: Optional[str]) -> int:
        if self.queue is None:  # namespace/task lot: only queues that may match
            if self._settings_changes() != self._unrelated_as_of:
                self._unrelated.clear()
                self._unrelated_as_of = self._settings_changes()
            if queue in self._unrelated:
                return 0
            if queue not in self._matching:
                self._asked.add(queue)
        self.wakes += 1
        self._backoff.reset()
        if self._line:
            self._kick()
        return len(self)

    def close(self) -> None:
        for parked in list(self._line):
            parked.settle(None)
        self._line.clear()

    # -- the popper's side ---------------------------------------------------------------

    def park(self, request: PopRequest, timeout: float, last: Attempt,
             tried: bool = True) -> _Parked:
        """Queues a pop whose own attempt found nothing, or that found a line here and did not
        try (``tried`` false); it is answered by a later attempt, or with None after
        ``timeout`` seconds.

        A pop joining a line relies on the line's last look, which a change that wakes no one
        (a lease running out, a delay ending) may have outdated: when that look is older than
        :data:`JOIN_LOOK_AGAIN_S`, the line looks again now (WIRE.md 2.3.7, try at once), at
        most once per that time however many pops join."""
        if request.waiting_since is None and self._empty_at is not None:
            request = replace(request, waiting_since=self._empty_at)
        parked = _Parked(request)
        parked.deadline = self._clock.callLater(max(timeout, 0), self.leave, parked)
        self._line.append(parked)
        self._learn(last)
        if tried:  # its own attempt was a look for the line too
            self._looked_at = max(self._looked_at, self._clock.seconds())
        elif not self.running \
                and self._clock.seconds() - self._looked_at >= JOIN_LOOK_AGAIN_S:
            self._kick()
            return parked
        if not self.running and (self._timer is None or not self._timer.active()):
            self._schedule(last.retry_in)
        return parked

    def leave(self, parked: _Parked) -> None:
        """A pop's deadline passed or its client went away: it answers None and goes."""
        if parked.waiting:
            try:
                self._line.remove(parked)
            except ValueError:
                pass
            parked.settle(None)

    def stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    # -- attempts ------------------------------------------------------------------------

    def _kick(self) -> None:
        """Answers a wake-up: one more attempt, on behalf of the oldest pop nobody is trying
        for yet. Several wake-ups in a row (acks releasing several partitions) run up to
        ``MAX_ATTEMPTS_PER_LOT`` attempts at once, fused by the pop Batcher; past that, or
        when every parked pop already has an attempt, the wake-up is remembered (dirty) and
        answered by one more attempt when a running one comes back empty."""
        if self._attempts >= min(MAX_ATTEMPTS_PER_LOT, len(self)):
            self._dirty = True
            return
        self.stop_timer()
        self._attempts += 1
        d = defer.ensureDeferred(self._serve())
        d.addErrback(lambda failure: log.failure("parked pops of {key} failed", failure,
                                                 key=self.key))

    @property
    def running(self) -> bool:
        return self._attempts > 0

    async def _serve(self) -> None:
        try:
            while True:
                head = self._next_unserved()
                if head is None:
                    break  # a wake-up still pending stays dirty for the attempts running
                self._dirty = False  # this attempt starts after every wake-up so far
                self._looked_at = self._clock.seconds()
                head.served = True
                settings_before = self._settings_changes()
                try:
                    outcome = await self._popper.attempt(head.request)
                finally:
                    head.served = False
                if outcome.delivery is None:
                    self._learn(outcome, settings_before)
                    if outcome.retry_in is not None:  # the soonest hint of any attempt
                        self._retry_in = min(outcome.retry_in, math.inf if self._retry_in is None
                                             else self._retry_in)
                    if self._dirty:
                        continue
                    break
                if head.waiting:
                    self._line.remove(head)
                    head.settle(outcome.delivery)
                else:
                    await self._popper.give_back(outcome.delivery)  # wakes this lot again
                    continue
                if not outcome.more and not self._dirty:
                    break  # nothing else to hand out: the next pop in line waits
        finally:
            self._attempts -= 1
        if self._attempts:
            return  # the last attempt to finish decides what happens next
        self._discard_gone()
        retry_in, self._retry_in = self._retry_in, None
        if self._line:
            self._schedule(retry_in)
        else:
            self._popper.lot_idle(self)

    def _next_unserved(self) -> Optional[_Parked]:
        self._discard_gone()
        for parked in self._line:
            if parked.waiting and not parked.served:
                return parked
        return None

    def _discard_gone(self) -> None:
        while self._line and not self._line[0].waiting:
            self._line.popleft()

    def _schedule(self, retry_in: Optional[float]) -> None:
        self.stop_timer()
        delay = self._backoff.next_interval()
        if retry_in is not None:
            delay = min(delay, retry_in)
        self._timer = self._clock.callLater(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._line:
            self._kick()

    def _learn(self, outcome: Attempt, settings_before: Optional[int] = None) -> None:
        """Namespace lots remember which queues match, to ignore pushes elsewhere. An attempt
        that began before a configure or delete (``settings_before``: the count then) may
        have seen the old membership: it teaches nothing about unrelated queues.
        An attempt that found nothing dates the wait of every pop in line that has no date
        yet (see ``PopRequest.waiting_since``): those that joined without an attempt of
        their own."""
        if outcome.empty_at is not None:
            self._empty_at = outcome.empty_at
            for parked in self._line:
                if parked.request.waiting_since is None:
                    parked.request = replace(parked.request, waiting_since=self._empty_at)
        if self.queue is not None or outcome.queues is None:
            return
        self._matching = set(outcome.queues)
        if settings_before is None or settings_before == self._settings_changes():
            self._unrelated |= self._asked - self._matching
        self._unrelated -= self._matching
        self._asked.clear()
        if len(self._unrelated) > 10_000:
            self._unrelated.clear()
