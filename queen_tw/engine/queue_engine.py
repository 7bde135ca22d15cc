"""QueueEngine: push / pop / ack / lease and the reads around them.

Routes parse and validate, then call the engine; the engine never sees an HTTP request and
never builds SQL: each operation is one call of a set-based function in ``sql/``.
"""

import os
import re
import uuid
from collections import defaultdict
from dataclasses import dataclass
from time import perf_counter
from typing import (
    AbstractSet,
    Any,
    Callable,
    Dict,
    Iterable,
    List,
    Mapping,
    Optional,
    Protocol,
    Tuple,
)

import orjson
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from queen_tw import jsoncodec
from queen_tw.cluster.config_cache import QueueConfigCache, wire_config
from queen_tw.crypto import PayloadCipher
from queen_tw.db.pool import Database
from queen_tw.engine.batcher import Batcher, BatchLimits
from queen_tw.engine.popper import QUEUE_MODE, Delivery, PollTiming, Popper, PopRequest
from queen_tw.engine.waiters import WaiterRegistry
from queen_tw.errors import (
    DatabaseUnavailable,
    InvalidRequest,
    NoEncryptionKey,
    NotFound,
    QueueSettingsChanged,
    RefusedByDatabase,
    Unavailable,
)
from queen_tw.metrics.recorder import Recorder
from queen_tw.services.retry import OutageLog

log = Logger()

__all__ = ["QUEUE_MODE", "EngineLimits", "PeerNotices", "PollTiming", "PopRequest",
           "PushFailover", "QueueEngine"]


class PeerNotices(Protocol):
    """What the other instances of a cluster are told (UDP peer sync, WIRE 6.1)."""

    def announce_messages(self, keys: Iterable[Tuple[str, Optional[str]]]) -> None:
        """New messages were committed in these (queue, partition)s (None: any partition)."""

    def announce_available(self, keys: Iterable[Tuple[str, Optional[str]]]) -> None:
        """These (queue, partition)s may have something for parked pops for a reason no SQL
        function NOTIFYs (a cursor moved back, ``/internal/api/notify``): the peers and the
        sibling workers are told."""

    def announce_config_set(self, queue: str, config: Dict[str, Any]) -> None:
        """``queue`` was (re)configured; ``config`` has the WIRE 6.1 fields."""

    def announce_config_delete(self, queue: str) -> None:
        """``queue`` was deleted."""


class _NoPeers:
    """The notices of a server without peer sync: nobody to tell."""

    def announce_messages(self, keys: Iterable[Tuple[str, Optional[str]]]) -> None:
        pass

    def announce_available(self, keys: Iterable[Tuple[str, Optional[str]]]) -> None:
        pass

    def announce_config_set(self, queue: str, config: Dict[str, Any]) -> None:
        pass

    def announce_config_delete(self, queue: str) -> None:
        pass


class PushFailover(Protocol):
    """Where pushes go when PostgreSQL cannot take them (the file buffer, WIRE.md 2.2)."""

    def must_buffer(self, items: List[Dict[str, Any]]) -> bool:
        """True when these items must bypass the database (maintenance mode, or a partition
        that still has buffered records waiting, so order within it holds)."""

    async def buffer(self, items: List[Dict[str, Any]],
                     plain_queues: AbstractSet[str]) -> List[Dict[str, Any]]:
        """Durably stores the items (fsync'd) and returns ``buffered`` results, or raises
        ``Unavailable`` when that is impossible (disk full, unwritable directory).
        ``plain_queues`` are known not to encrypt: with a key, every other queue's payloads
        are sealed on disk (see ``queen_tw.failover.sealing``)."""


@dataclass(frozen=True)
class EngineLimits:
    """Batcher limits per fused operation type; the defaults live in the option table
    (``QUEEN_<TYPE>_*`` in queen_tw/config.py, see service.engine_limits)."""

    push: BatchLimits
    pop: BatchLimits
    ack: BatchLimits
    transaction: BatchLimits
    renew_lease: BatchLimits


def _with_transaction_ids(items: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Gives every item without one a transactionId (in place: the items are the request's
    own parsed dicts), fixed before the first attempt so a retried or replayed push dedupes
    instead of storing the message twice."""
    missing = [item for item in items if not item.get("transactionId")]
    for item, transaction_id in zip(missing, random_uuid4s(len(missing)), strict=True):
        item["transactionId"] = transaction_id
    return items


_VERSION_4 = bytes((b & 0x0F) | 0x40 for b in range(256))
_RFC_4122_VARIANT = bytes((b & 0x3F) | 0x80 for b in range(256))


def random_uuid4s(count: int) -> List[str]:
    """``count`` random (version 4) UUIDs as text, from one read of the OS random source
    (``str(uuid.uuid4())`` per item was ~10 % of a push's server time); the version and
    variant bits are set by table lookups, not a Python loop."""
    raw = bytearray(os.urandom(16 * count))
    raw[6::16] = raw[6::16].translate(_VERSION_4)
    raw[8::16] = raw[8::16].translate(_RFC_4122_VARIANT)
    text = raw.hex()
    return [f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
            for h in (text[n:n + 32] for n in range(0, 32 * count, 32))]


def _partition_key(item: Dict[str, Any]) -> Tuple[str, str]:
    return item["queue"], item.get("partition", "Default")


def _smaller_calls(items: List[Dict[str, Any]], jobs_of: List[int]
                   ) -> Optional[List[List[int]]]:
    """The positions of ``items`` split per partition, or, when they are all of one, per
    request (``jobs_of``); None for one request's items of one partition."""
    for key in (lambda p: _partition_key(items[p]), jobs_of.__getitem__):
        groups: Dict[Any, List[int]] = {}
        for position in range(len(items)):
            groups.setdefault(key(position), []).append(position)
        if len(groups) > 1:
            return list(groups.values())
    return None


def _refused(item: Dict[str, Any], error: str) -> Dict[str, Any]:
    """The answer of an item PostgreSQL refused to store (nothing of its call was)."""
    return {"index": 0, "status": "failed", "queue": item["queue"],
            "partition": item.get("partition", "Default"),
            "transaction_id": item.get("transactionId"), "error": error}


STORE_ROUNDS = 4
"""Calls a push's items may take when shards of fused calls fail while others commit."""


@dataclass(frozen=True)
class _Unstored:
    """The answer of an item whose shard of a fused push failed while other shards committed
    (see QueueEngine._push_batch): nothing of it is stored; :meth:`QueueEngine.store` sends
    it again and never hands this to a caller."""

    error: Exception


class QueueEngine:
    """The message path. All methods are coroutines returning JSON-ready values.

    :param db: the pool (``Database.call`` runs one SQL function).
    :param waiters: parked long-polls; pushes and lease releases wake them.
    :param clock: time source for long-poll deadlines.
    :param cipher: payload cipher, or None when no key is configured.
    :param worker_id: stamped on leases (``WORKER_ID``).
    :param poll_timing: fallback timer of parked pops.
    :param limits: how concurrent pushes, pops and acks are fused (see ``Batcher``).
    :param failover: where pushes go while PostgreSQL cannot take them; None = answer 503.
    :param push_shards: concurrent database calls one fused push is split into, by partition
        (2 measured 7-9 % faster than 4 at push batch 100 once a call's own cost fell to
        0.35 ms: fewer, larger calls; 1 serialises calls on the partition locks).
    :param pop_paused: True while pops must answer 204 at once (pop maintenance, shutdown).
    :param config_cache: queues' encryption flags (None: read PostgreSQL on every push).
    :param peers: told about committed pushes and queue changes (None: no peer sync).
    :param recorder: counts every push, pop, ack and transaction (metrics; None: counted
        where nobody reads it).
    """

    def __init__(self, db: Database, waiters: WaiterRegistry, clock: IReactorTime,
                 cipher: Optional[PayloadCipher], worker_id: str, poll_timing: PollTiming,
                 limits: EngineLimits,
                 failover: Optional[PushFailover] = None, push_shards: int = 2,
                 pop_paused: Callable[[], bool] = lambda: False,
                 config_cache: Optional[QueueConfigCache] = None,
                 peers: Optional[PeerNotices] = None, recorder: Optional[Recorder] = None):
        self._db = db
        self._config_cache = config_cache or QueueConfigCache(clock, ttl=0)
        self._peers: PeerNotices = peers or _NoPeers()
        self._waiters = waiters
        self._clock = clock
        self._diverted = OutageLog("pushes to PostgreSQL", clock,
                                   meanwhile="writing them to the file buffer")
        self._cipher = cipher
        self._worker_id = worker_id
        self._failover = failover
        self._push_shards = push_shards
        self.recorder = recorder or Recorder()
        self.timer_scheduled: Callable[[float], None] = lambda delay_ms: None
        """Told the delay (ms) of the nearest timer a committed call scheduled: the timer
        sweeper's wake-up once it is wired (``TimersEngine.on_scheduled``)."""
        self.popper = Popper(db, waiters, clock, worker_id, poll_timing, limits.pop,
                             open_payload=self.open_payload,
                             give_back=self._give_back, paused=pop_paused,
                             settings_changes=lambda: self._config_cache.changes,
                             freed=self.announce_released)
        self.batchers = {
            "push": Batcher("push", self._push_batch, clock, limits.push),
            "pop": self.popper.batcher,
            "ack": Batcher("ack", self._ack_batch, clock, limits.ack),
            "transaction": Batcher("transaction", self._transaction_batch, clock,
                                   limits.transaction),
            "renew_lease": Batcher("renew_lease", self._renew_batch, clock, limits.renew_lease),
        }

    def busy(self) -> bool:
        """True while a batcher holds accepted work (queued or running): a graceful stop
        waits for it before closing the pool."""
        return any(b.queued_items or b.in_flight for b in self.batchers.values())

    # -- push ---------------------------------------------------------------------------

    async def push(self, items: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        """Stores validated items (see ``push_messages_core``); returns per-item results.

        Every item gets its transactionId here, before any attempt, so a push that reached
        PostgreSQL but lost its answer dedupes when the buffer replays it.
        """
        started = perf_counter()
        try:
            results = await self._push(items)
        except Exception:
            self.recorder.failed("push", perf_counter() - started)
            raise
        if items:
            self.recorder.pushed(items, results, perf_counter() - started)
        return results

    async def _push(self, items: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        if not items:
            return []
        items = _with_transaction_ids(items)
        if self._failover is not None and self._failover.must_buffer(items):
            return await self._buffer(self._failover, items)
        try:
            stored = await self.store(items)
        except DatabaseUnavailable as err:
            if self._failover is None:
                raise
            self._diverted.failed(err.message)
            return await self._buffer(self._failover, items)
        self._diverted.succeeded()
        return stored

    async def _buffer(self, failover: PushFailover, items: List[Dict[str, Any]]
                      ) -> List[Dict[str, Any]]:
        """Hands items to the file buffer, telling it which queues are known not to encrypt
        (from the cache only: PostgreSQL may be what is down). Without a key, a queue known
        to encrypt is refused here as on the way to PostgreSQL. A binary push's payload text
        goes to the buffer as that text, sealed or not.

        Items that PostgreSQL would refuse at replay are refused now instead (answered
        ``failed``, not ``buffered``, which would promise a message the replay could never
        store): those of a queue whose name holds a percent-escape and that the cache does
        not know, i.e. that may not exist (see queen.refuse_unreachable_queue_name), and
        binary payloads with a number PostgreSQL's numeric cannot hold."""
        known = self._config_cache.encrypted(sorted({item["queue"] for item in items}))
        plain_queues = frozenset(queue for queue, encrypted in known.items() if not encrypted)
        if self._cipher is None:
            _refuse_unkeyed([queue for queue, encrypted in known.items() if encrypted])
        refusals: Dict[int, str] = {}
        for position, item in enumerate(items):
            reason = _unbufferable(item, known)
            if reason is not None:
                refusals[position] = reason
        if not refusals:
            return await failover.buffer(items, plain_queues)
        kept = [item for position, item in enumerate(items) if position not in refusals]
        buffered = iter(await failover.buffer(kept, plain_queues) if kept else [])
        return [dict(_refused(item, refusals[position]) if position in refusals
                     else next(buffered), index=position)
                for position, item in enumerate(items)]

    async def store(self, items: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        """Writes items to PostgreSQL (encrypting where the queue asks); no failover.

        The file-buffer replay calls this too (with the buffer's seal taken off), so replayed
        items are stored the same way.
        """
        answers = await self._store_once(items)
        # Part of the request may be stored while the rest is not (_push_batch): answering
        # an error would say none of it is, and a resend of items without transactionIds
        # would store them twice. The rest goes again (the flags read again if they were
        # the fault), each round storing some, for STORE_ROUNDS calls in all.
        rounds = 1
        while True:
            unstored = [position for position, answer in enumerate(answers)
                        if isinstance(answer, _Unstored)]
            if not unstored:
                return answers
            if rounds == STORE_ROUNDS:
                raise answers[unstored[0]].error
            rounds += 1
            if any(isinstance(answers[p].error, QueueSettingsChanged) for p in unstored):
                self._config_cache.forget_all()
            again = await self._store_once([items[position] for position in unstored])
            for position, answer in zip(unstored, again, strict=True):
                answers[position] = answer if isinstance(answer, _Unstored) \
                    else dict(answer, index=position)

    async def _store_once(self, items: List[Dict[str, Any]]) -> List[Any]:
        try:
            return await self.batchers["push"].submit(await self._encrypt(items))
        except QueueSettingsChanged:
            # a queue began encrypting after its flag was read here (another worker or
            # instance configured it): PostgreSQL stored nothing; read the flags again
            self._config_cache.forget_all()
            return await self.batchers["push"].submit(await self._encrypt(items))

    async def _push_batch(self, jobs: List[List[Dict[str, Any]]]) -> List[List[Dict[str, Any]]]:
        """Stores the items of several requests; results split back per job.

        Pushes hold their partitions' row locks until commit (that is what keeps order), so
        one call for every partition would serialise all pushes. The items are split into
        ``push_shards`` groups by partition, stored by concurrent calls, and put back in
        order: items of one partition always share a call, so their array order holds.

        Each call commits on its own. When every call fails, the error is the batch's (the
        batcher decides); when only some do, their items answer :class:`_Unstored` and the
        others what they got, since they are stored.
        """
        flat = [item for job in jobs for item in job]
        job_of = [number for number, job in enumerate(jobs) for _ in job]
        shards: Dict[int, List[int]] = defaultdict(list)
        for position, item in enumerate(flat):
            shards[hash(_partition_key(item)) % self._push_shards].append(position)
        outcomes: List[Tuple[bool, Any]] = await defer.DeferredList(
            [defer.ensureDeferred(self._push_shard([flat[p] for p in positions],
                                                   [job_of[p] for p in positions]))
             for positions in shards.values()], consumeErrors=True)
        if not any(succeeded for succeeded, _ in outcomes):
            outcomes[0][1].raiseException()
        answers: List[Any] = [None] * len(flat)
        for positions, (succeeded, outcome) in zip(shards.values(), outcomes, strict=True):
            if succeeded:
                for position, answer in zip(positions, outcome, strict=True):
                    answers[position] = answer
                continue
            log.warn("{n} items of a fused push were not stored ({error}) while the rest "
                     "was: they go again", n=len(positions), error=outcome.value)
            for position in positions:
                answers[position] = _Unstored(outcome.value)
        results, start = [], 0
        for job in jobs:
            mine = answers[start:start + len(job)]
            for local_index, result in enumerate(mine):
                if isinstance(result, dict):
                    result["index"] = local_index
            results.append(mine)
            start += len(job)
        return results

    async def _push_shard(self, items: List[Dict[str, Any]], jobs_of: List[int]
                          ) -> List[Dict[str, Any]]:
        """One ``push_store`` call. When PostgreSQL refuses data in it (a binary push's
        payload it cannot store as sent: RefusedByDatabase), nothing of it was stored; the
        items go again in smaller calls, one after the other (per partition, then per request
        within one partition, so order holds), and only the items of the request and
        partition holding the refused data answer ``failed``."""
        try:
            return await self._push_call(items)
        except RefusedByDatabase as err:
            parts = _smaller_calls(items, jobs_of)
            if parts is None:
                return [_refused(item, str(err)) for item in items]
            answers: List[Dict[str, Any]] = [{}] * len(items)
            for positions in parts:
                stored = await self._push_shard([items[p] for p in positions],
                                                [jobs_of[p] for p in positions])
                for position, answer in zip(positions, stored, strict=True):
                    answers[position] = answer
            return answers

    async def _push_call(self, items: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        answer = await self._db.call("push_store", items)
        names = {partition_id: (queue, name) for partition_id, queue, name in answer["partitions"]}
        updated = [names[partition_id] for partition_id in answer["updated"]]
        self.announce_pushed(updated)
        return expand_push_answer(items, answer)

    @property
    def database(self) -> Database:
        """The pool this engine calls; the Streams engine, whose cycles include pushes and
        acks, calls the same one."""
        return self._db

    @property
    def waiters(self) -> WaiterRegistry:
        """Who is parked on which partitions; reads by offset long-poll here as pops do."""
        return self._waiters

    @property
    def clock(self) -> IReactorTime:
        """The time source of long-poll deadlines."""
        return self._clock

    def open_payload(self, stored: Any) -> Optional[str]:
        """A stored encrypted payload's plaintext JSON text; None (logged) when it does not
        open (a tampered row): the caller hands out what is stored. Without a key, raises
        :class:`NoEncryptionKey`: the message is left for a server that has one."""
        if self._cipher is None:
            raise NoEncryptionKey()
        try:
            return self._cipher.decrypt_text(stored)
        except Exception as err:  # wrong key or tampered row
            log.error("cannot decrypt a stored payload: {error}", error=err)
            return None

    def announce_pushed(self, updated: List[Tuple[str, str]]) -> None:
        """Committed pushes to these (queue, partition)s: wakes the pops parked on them here
        and tells the peers (one notice per partition, not per message). Pushes that another
        SQL function stored (the streams cycle's sink pushes) are announced here too."""
        for queue, partition in updated:
            self._waiters.notify(queue, partition)
        if updated:
            self._peers.announce_messages(updated)

    def announce_released(self, released: Iterable[Tuple[str, str]]) -> None:
        """Leases on these (queue, partition)s ended: the pops parked on them, here and on
        the peers, may take them now (as after an ack that ends a delivery). Workers of one
        instance hear it from the ack's NOTIFY, and worker 1 tells the peers the same."""
        ended = sorted(set(released))
        for queue, partition in ended:
            self._waiters.notify(queue, partition)
        if ended:
            self._peers.announce_messages(ended)

    async def prepare_push(self, items: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        """Validated push items made ready for a SQL function that stores them inside its
        own transaction (the streams cycle): each gets its transactionId and the payloads of
        encrypted queues are encrypted, as in :meth:`push`. Such a push cannot go to the file
        buffer, so while its partitions' pushes must (maintenance, outage backlog) this
        raises ``Unavailable`` rather than overtake them."""
        if not items:
            return items
        if self._failover is not None and self._failover.must_buffer(items):
            raise Unavailable("Pushes to these partitions are waiting in the file buffer "
                              "(maintenance or outage); retry shortly")
        return await self._encrypt(_with_transaction_ids(items))

    async def call_storing_pushes(self, function: str, *args: Any) -> Any:
        """An all-or-nothing call of a SQL function that stores pushes :meth:`prepare_push`
        made (transactions, stream cycles): its 503 means nothing was applied. When a queue
        began encrypting after its flag was read here (QueueSettingsChanged), the flags are
        forgotten, so the client's retry encrypts with fresh ones."""
        try:
            return await self._db.call_or_nothing(function, *args)
        except QueueSettingsChanged:
            self._config_cache.forget_all()
            raise

    async def seal(self, items: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        """Items (``queue``, ``payload``) with the payloads of encrypted queues encrypted
        (``isEncrypted`` set), as a push stores them; for payloads kept elsewhere until they
        become messages (timers). Raises ``Unavailable`` as a push does without a key."""
        return await self._encrypt(items)

    async def _encryption_flags(self, queues: List[str]) -> Dict[str, bool]:
        """Whether each of ``queues`` encrypts: from the cache, else read (and remembered)."""
        encrypted = self._config_cache.encrypted(queues)
        unknown = [queue for queue in queues if queue not in encrypted]
        if unknown:
            changes_before = self._config_cache.changes
            flags = await self._db.call("queue_flags", unknown)
            read = {queue: bool(flags.get(queue, {}).get("encryptionEnabled"))
                    for queue in unknown}  # a queue that does not exist yet is created plain
            self._config_cache.remember_read(read, changes_before)
            encrypted.update(read)
        return encrypted

    async def _encrypts(self, queue: str) -> bool:
        """Whether ``queue`` encrypts, for a pop; False when the flag cannot be read (an
        outage: the pop then answers as any pop does in one, with nothing)."""
        try:
            return (await self._encryption_flags([queue]))[queue]
        except Unavailable:
            return False

    async def _encrypt(self, items: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        """Items with the payloads of encrypted queues encrypted; raises ``Unavailable``
        when one of their queues encrypts and this server has no key (storing plaintext
        would break the queue's promise; the flags are read without a key too, for that)."""
        queues = sorted({item["queue"] for item in items})
        encrypted = await self._encryption_flags(queues)
        cipher = self._cipher
        if cipher is None:
            _refuse_unkeyed([queue for queue in queues if encrypted[queue]])
            return items
        sealed = []
        for item in items:
            if encrypted[item["queue"]]:  # (a binary push's payload text sealed as it came)
                item = dict(item, payload=cipher.encrypt(item.get("payload", {})),
                            isEncrypted=True)
            sealed.append(item)
        return sealed

    # -- pop ----------------------------------------------------------------------------

    async def pop(self, request: PopRequest, gone: Optional[defer.Deferred] = None
                  ) -> Optional[Delivery]:
        """See :meth:`Popper.pop`. Latency is recorded for pops that do not wait (a long
        poll's time is mostly the wait)."""
        started = perf_counter()
        try:
            if self._cipher is None and request.queue is not None \
                    and await self._encrypts(request.queue):
                # Refused before anything is taken: a delivery given back can fail to be
                # undone (autoAck, when another pop read past it meanwhile). Payloads sealed
                # before their queue stopped encrypting still meet Popper's give-back.
                raise NoEncryptionKey()
            delivery = await self.popper.pop(request, gone)
        except Exception:
            self.recorder.failed("pop", perf_counter() - started)
            raise
        self.recorder.popped(request.queue, delivery,
                             None if request.wait else perf_counter() - started)
        return delivery

    async def _give_back(self, delivery: Delivery) -> None:
        """Releases the leases of a delivery nobody will receive (counter untouched; not an
        ack of any client's, so the metrics do not count it); an autoAck delivery, which
        holds no lease, is undone instead."""
        if not delivery.get("leaseId"):
            await self._undo_auto_ack(delivery)
            return
        await self.batchers["ack"].submit([
            {"transactionId": m["transactionId"], "partitionId": m["partitionId"],
             "status": "retry", "consumerGroup": m["consumerGroup"], "leaseId": m["leaseId"]}
            for m in delivery.message_list()])

    async def _undo_auto_ack(self, delivery: Delivery) -> None:
        """Moves back the cursors an autoAck delivery committed, nobody having received it
        (its client left before the answer was written; this server had no key to open it),
        unless another pop read past it meanwhile (see queen.undo_auto_ack)."""
        spans: Dict[Tuple[str, str], Dict[str, Any]] = {}
        for message in delivery.message_list():
            span = spans.setdefault((message["partitionId"], message["consumerGroup"]), {
                "partitionId": message["partitionId"], "consumerGroup": message["consumerGroup"],
                "firstAt": message["createdAt"], "firstId": message["id"], "count": 0,
                "queue": message["queue"], "partition": message["partition"]})
            span.update(lastAt=message["createdAt"], lastId=message["id"],
                        count=span["count"] + 1)
        try:
            undone = set(await self._db.call("undo_auto_ack", list(spans.values())))
        except Exception as err:
            log.warn("autoAck delivery of {n} message(s) nobody received could not be "
                     "undone; they count as consumed ({error})",
                     n=sum(s["count"] for s in spans.values()), error=err)
            return
        kept = sum(s["count"] for s in spans.values() if s["partitionId"] not in undone)
        (log.warn if kept else log.info)(
            "autoAck delivery nobody received: {back} message(s) deliverable again{kept}",
            back=sum(s["count"] for s in spans.values()) - kept,
            kept=f", {kept} not (read past meanwhile: they count as consumed)" if kept else "")
        # no SQL NOTIFY tells the sibling workers: wake_everywhere does
        self.wake_everywhere((s["queue"], s["partition"]) for s in spans.values()
                             if s["partitionId"] in undone)

    def _decrypt_in_place(self, row: Dict[str, Any], field: str) -> None:
        """Opens ``row[field]`` when the row is marked ``isEncrypted``, and drops the mark;
        a payload this server cannot open (no key, a tampered row) keeps it, so nobody
        takes the stored envelope for the message."""
        if not row.get("isEncrypted"):
            row.pop("isEncrypted", None)
            return
        if self._cipher is None:
            return
        try:
            row[field] = self._cipher.decrypt(row[field])
        except Exception as err:  # wrong key or tampered row: shown as stored, marked
            log.error("cannot decrypt message {id}: {error}", id=row.get("id"), error=err)
            return
        del row["isEncrypted"]

    # -- ack and leases -----------------------------------------------------------------

    async def ack(self, items: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        """Applies validated acks; returns one result per item in request order."""
        started = perf_counter()
        try:
            results = await self.batchers["ack"].submit(items)
        except Exception:
            self.recorder.failed("ack", perf_counter() - started)
            raise
        self.recorder.acked(items, results, perf_counter() - started)
        return results

    async def _ack_batch(self, jobs: List[List[Dict[str, Any]]]) -> List[List[Dict[str, Any]]]:
        """One ``ack_core`` call; each request keeps its own semantics (``req``)."""
        flat = [dict(item, req=n) for n, job in enumerate(jobs) for item in job]
        results = expand_ack_answer(flat, await self._db.call("ack_core", flat))
        self._wake_released(results)
        split, start = [], 0
        for job in jobs:
            split.append(results[start:start + len(job)])
            start += len(job)
        return split

    def _wake_released(self, results: Iterable[Dict[str, Any]]) -> None:
        self.announce_released((r["queueName"], r["partitionName"]) for r in results
                               if r.get("leaseReleased") and r.get("queueName"))

    async def extend_lease(self, lease_id: str, seconds: Optional[int]) -> str:
        """Extends every live partition lease of ``lease_id``; returns the earliest expiry."""
        return (await self.renew_lease(lease_id, seconds))["expiresAt"]

    async def renew_lease(self, lease_id: str, seconds: Optional[int]) -> Dict[str, Any]:
        """As :meth:`extend_lease`, answering ``{expiresAt, renewed}``: the earliest new
        expiry and how many partitions' leases were extended (WIRE2.md 10)."""
        [outcome] = await self.batchers["renew_lease"].submit(
            [{"leaseId": lease_id, "seconds": seconds}])
        if outcome.get("expiresAt"):
            return {"expiresAt": outcome["expiresAt"], "renewed": outcome.get("renewed", 1)}
        raise NotFound("Lease expired" if outcome["found"] else "Lease not found")

    async def _renew_batch(self, jobs: List[List[Dict[str, Any]]]) -> List[List[Dict[str, Any]]]:
        """One ``extend_leases`` call for several renewals (one per job)."""
        outcomes = await self._db.call("extend_leases", [item for job in jobs for item in job])
        return [[outcome] for outcome in outcomes]

    # -- transactions -------------------------------------------------------------------

    async def transaction(self, operations: List[Dict[str, Any]],
                          required_leases: List[str],
                          riders: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Runs validated push and ack operations atomically (``run_transaction``), with the
        validated ``riders`` (``{"kv": [...]}``, WIRE2.md 5) in the same transaction.

        Push items get transactionIds and encryption as in :meth:`push`; waiters of the
        pushed partitions wake once the transaction committed.
        """
        started = perf_counter()
        try:
            outcome = await self._transaction(operations, required_leases, riders or {})
        except Exception:
            self.recorder.failed("transaction", perf_counter() - started)
            raise
        self.recorder.transacted(operations, outcome, perf_counter() - started)
        return outcome

    async def _transaction(self, operations: List[Dict[str, Any]],
                           required_leases: List[str],
                           riders: Dict[str, Any]) -> Dict[str, Any]:
        pushed = [item for op in operations if op["type"] == "push" for item in op["items"]]
        if pushed and self._failover is not None and self._failover.must_buffer(pushed):
            # cannot be buffered (it is atomic with its acks) nor overtake buffered pushes
            raise Unavailable("Pushes to these partitions are waiting in the file buffer "
                              "(maintenance or outage); retry shortly")
        prepared = []
        for op in operations:
            if op["type"] == "push":
                items = await self._encrypt(_with_transaction_ids(op["items"]))
                op = dict(op, items=items)
            prepared.append(op)
        [outcome] = await self.batchers["transaction"].submit(
            [dict(riders, operations=prepared, requiredLeases=required_leases,
                  **await self._prepared_timers(riders))])
        scheduled = [op["delayMs"] for op in riders.get("timers") or ()
                     if op["op"] != "cancel"]
        if scheduled and outcome.get("success"):
            self.timer_scheduled(min(scheduled))  # the sweeper wakes if it is due sooner
        return outcome

    async def _prepared_timers(self, riders: Dict[str, Any]) -> Dict[str, Any]:
        """The ``timers`` rider made ready for ``queen.timers_schedule`` as the timers route
        makes it (payloads of encrypted queues encrypted), or nothing without one."""
        if not riders.get("timers"):
            return {}
        from queen_tw.engine.timers import TimersEngine  # it imports this module
        return {"timers": await TimersEngine(self._db, self).prepare(riders["timers"])}

    async def _transaction_batch(self, jobs: List[List[Dict[str, Any]]]
                                 ) -> List[List[Dict[str, Any]]]:
        """One ``run_transactions`` call; each transaction commits or rolls back on its own."""
        outcomes = await self.call_storing_pushes(
            "run_transactions", [item for job in jobs for item in job])
        updated: List[Tuple[str, Optional[str]]] = []
        for outcome in outcomes:
            for update in outcome.pop("partitionUpdates", None) or ():
                updated.append((update["queue"], update["partition"]))
        for queue, partition in updated:
            self._waiters.notify(queue, partition)
        if updated:
            self._peers.announce_messages(updated)  # dedupes the repeats of this batch
        return [[outcome] for outcome in outcomes]

    # -- queues -------------------------------------------------------------------------

    async def configure(self, queue: str, namespace: str, task: str,
                        options: Dict[str, Any]) -> Dict[str, Any]:
        """Creates or replaces ``queue``'s settings; this process and its peers see the new
        encryption flag at once. ``encryptionEnabled`` without a key is refused (400, nothing
        changed): the queue would promise encryption the server cannot give."""
        if options.get("encryptionEnabled") and self._cipher is None:
            raise InvalidRequest("encryptionEnabled needs QUEEN_ENCRYPTION_KEY, and this server "
                                 "has none: set the key (64 hex characters) and restart, or "
                                 "configure the queue without encryption; nothing was changed")
        answer = await self._db.call("configure_queue", {
            "queue": queue, "namespace": namespace, "task": task, "options": options})
        self._config_cache.store(
            {queue: bool((answer.get("options") or {}).get("encryptionEnabled"))})
        self._peers.announce_config_set(queue, wire_config(answer))
        return answer

    async def delete_queue(self, queue: str) -> Dict[str, Any]:
        outcome = await self._db.call("delete_queue", queue)
        self._config_cache.forget(queue)
        self._peers.announce_config_delete(queue)
        self._waiters.notify(queue, None)
        return outcome

    def wake_everywhere(self, keys: Iterable[Tuple[str, Optional[str]]]) -> int:
        """Wakes the pops parked on these (queue, partition)s (None: any partition of the
        queue) here, in the sibling workers and on the peers, for changes no SQL function
        announces (an admin action moved a cursor back, ended a lease, queued a copy;
        ``POST /internal/api/notify``).
        Returns how many local pops that concerned."""
        keys = list(dict.fromkeys(keys))
        woken = sum(self._waiters.notify(queue, partition) for queue, partition in keys)
        if keys:
            self._peers.announce_available(keys)
        return woken

    async def queue_detail(self, queue: str) -> Dict[str, Any]:
        detail = await self._db.call("queue_detail", queue)
        if detail is None:
            raise NotFound("Queue not found")
        return detail

    async def queue_list(self) -> Dict[str, Any]:
        return await self._db.call("queue_list")

    # -- dead letters and traces --------------------------------------------------------

    async def dead_letters(self, query: Dict[str, Any]) -> Dict[str, Any]:
        page = await self._db.call("dlq_list", query)
        for row in page["messages"]:
            self._decrypt_in_place(row, "data")
        return page

    async def add_trace(self, trace: Dict[str, Any]) -> str:
        outcome = await self._db.call("add_trace", dict(trace, workerId=self._worker_id))
        if outcome.get("notFound"):
            raise NotFound("Message not found")
        return outcome["traceId"]

    async def traces(self, partition_id: str, transaction_id: str) -> Dict[str, Any]:
        return await self._db.call("list_traces", partition_id, transaction_id)

    async def trace_names(self, limit: int, offset: int) -> Dict[str, Any]:
        return await self._db.call("trace_names", limit, offset)

    async def traces_by_name(self, name: str, limit: int, offset: int) -> Dict[str, Any]:
        page = await self._db.call("traces_by_name", name, limit, offset)
        for row in page["traces"]:
            self._decrypt_in_place(row, "message_payload")
        return page

    # -- health -------------------------------------------------------------------------

    async def database_healthy(self) -> bool:
        return await self._db.ping()


_PERCENT_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")


def _unbufferable(item: Dict[str, Any], known: Mapping[str, bool]) -> Optional[str]:
    """Why ``item`` may not be buffered (its replay could never store it), or None."""
    reason = _unbufferable_queue(item["queue"], known)
    payload = item.get("payload")
    if reason is None and isinstance(payload, orjson.Fragment):  # a binary push's, as sent
        try:
            jsoncodec.refuse_unstorable_numbers(orjson.dumps(payload))
        except jsoncodec.UnstorableJSON as err:
            reason = (f"PostgreSQL could not store this payload ({err}): refused rather "
                      "than buffered")
    return reason


def _unbufferable_queue(queue: str, known: Mapping[str, bool]) -> Optional[str]:
    """Why a push to ``queue`` may not be buffered, or None: a name holding a percent-escape
    is refused by PostgreSQL for a queue it does not have yet, and whether it has this one
    is known only from the cache (``known``) while pushes go to the buffer."""
    escape = _PERCENT_ESCAPE.search(queue)
    if escape is None or queue in known:
        return None
    return (f"Queue name {queue} holds a percent-escape ({escape.group()}): clients put queue "
            "names into pop paths unencoded and the server decodes them, so a queue created "
            "under it could not be popped. Pushes go to the file buffer now, and this server "
            "cannot tell whether the queue exists already: refused rather than buffered")


def _refuse_unkeyed(queues: List[str]) -> None:
    """Raises ``Unavailable`` (503) naming the first of ``queues`` (encrypted queues met by a
    server without a key), if any."""
    if queues:
        raise Unavailable(f"Queue {queues[0]} has encryptionEnabled but this server has no "
                          "QUEEN_ENCRYPTION_KEY: its messages are refused rather than stored "
                          "in plaintext; restart the server with the key")


def expand_push_answer(items: List[Dict[str, Any]], answer: Dict[str, Any]
                       ) -> List[Dict[str, Any]]:
    """One result per pushed item (WIRE.md 2.2), in order, from ``queen.push_store``'s compact
    answer, which names items by index (every item carries its transactionId already)."""
    partition_ids = {(queue, name): partition_id
                     for partition_id, queue, name in answer["partitions"]}
    duplicates = dict(zip(answer["duplicates"], answer["duplicateIds"], strict=True))
    stored = dict(zip(answer["stored"], answer["ids"], strict=True))
    results = []
    for index, item in enumerate(items):
        queue = item["queue"]
        message_id = stored.get(index)
        if message_id is not None:
            trace_id = item.get("traceId")
            results.append({
                "index": index, "status": "queued", "transaction_id": item["transactionId"],
                "message_id": message_id,
                "partition_id": partition_ids[(queue, item.get("partition", "Default"))],
                "trace_id": canonical_uuid(trace_id) if trace_id else None, "queueName": queue})
        elif index in duplicates:
            results.append({
                "index": index, "status": "duplicate", "transaction_id": item["transactionId"],
                "message_id": duplicates[index], "queueName": queue})
        else:
            results.append({
                "index": index, "status": "failed", "queue": queue,
                "partition": item.get("partition", "Default"),
                "transaction_id": item["transactionId"],
                "error": f"Queue {queue} has reached its max capacity "
                         f"({(answer.get('maxSize') or {}).get(queue)} messages)"})
    return results


def expand_ack_answer(items: List[Dict[str, Any]], answer: Dict[str, Any]
                      ) -> List[Dict[str, Any]]:
    """One result per ack item, in order, from ``queen.ack_core``'s answer: items of a key it
    settled as a whole all succeeded; every other item has its own result."""
    own = {entry["pos"]: entry["result"] for entry in answer["results"]}
    settled = {(key["req"], key["partitionId"], key["consumerGroup"]): key
               for key in answer["settled"]}
    results = []
    for pos, item in enumerate(items):
        result = own.get(pos)
        if result is None:
            key = settled[(item.get("req", 0), canonical_uuid(item["partitionId"]),
                           item.get("consumerGroup") or QUEUE_MODE)]
            index = item.get("index")
            result = {"index": pos if index is None else index,
                      "transactionId": item["transactionId"], "success": True, "error": None,
                      "queueName": key["queueName"], "partitionName": key["partitionName"],
                      "dlq": False, "leaseReleased": key["leaseReleased"]}
        results.append(result)
    return results


def canonical_uuid(text: str) -> str:
    """The lowercase hyphenated form PostgreSQL prints for a uuid."""
    if len(text) == 36 and text == text.lower():
        return text
    return str(uuid.UUID(text))
