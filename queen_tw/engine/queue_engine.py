"""QueueEngine: push / pop / ack / lease and the reads around them.

Routes parse and validate, then call the engine; the engine never sees an HTTP request and
never builds SQL: each operation is one call of a set-based function in ``sql/``.
"""

from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from queen_tw.crypto import PayloadCipher
from queen_tw.db.pool import Database
from queen_tw.engine.batcher import Batcher, BatchLimits
from queen_tw.engine.waiters import Backoff, WaiterRegistry
from queen_tw.errors import NotFound, Unavailable

log = Logger()

QUEUE_MODE = "__QUEUE_MODE__"


@dataclass(frozen=True)
class PopRequest:
    """One validated pop: ``partition`` None means any partition of ``queue``."""

    queue: str
    partition: Optional[str]
    consumer_group: str = QUEUE_MODE
    batch: int = 1
    partitions: int = 1
    auto_ack: bool = False
    wait: bool = False
    timeout_ms: int = 30000
    subscription_mode: Optional[str] = None
    subscription_from: Optional[str] = None

    def as_sql(self, worker_id: str) -> Dict[str, Any]:
        return {
            "queue": self.queue, "partition": self.partition,
            "consumerGroup": self.consumer_group, "batch": self.batch,
            "partitions": self.partitions, "autoAck": self.auto_ack, "workerId": worker_id,
            "subscriptionMode": self.subscription_mode,
            "subscriptionFrom": self.subscription_from,
        }


@dataclass(frozen=True)
class EngineLimits:
    """Batcher limits per fused operation type."""

    push: BatchLimits = BatchLimits(preferred_size=50, max_hold_ms=20, max_batch_size=500,
                                    max_concurrent=8)
    pop: BatchLimits = BatchLimits(preferred_size=20, max_hold_ms=5, max_batch_size=100,
                                   max_concurrent=4)
    ack: BatchLimits = BatchLimits(preferred_size=50, max_hold_ms=20, max_batch_size=500,
                                   max_concurrent=4)


@dataclass(frozen=True)
class PollTiming:
    """The ``POP_WAIT_*`` fallback timer settings of parked pops."""

    initial_ms: int = 100
    threshold: int = 3
    multiplier: float = 2.0
    max_ms: int = 1000

    def backoff(self) -> Backoff:
        return Backoff(self.initial_ms, self.threshold, self.multiplier, self.max_ms)


class QueueEngine:
    """The message path. All methods are coroutines returning JSON-ready values.

    :param db: the pool (``Database.call`` runs one SQL function).
    :param waiters: parked long-polls; pushes and lease releases wake them.
    :param clock: time source for long-poll deadlines.
    :param cipher: payload cipher, or None when no key is configured.
    :param worker_id: stamped on leases (``WORKER_ID``).
    :param poll_timing: fallback timer of parked pops.
    :param limits: how concurrent pushes, pops and acks are fused (see ``Batcher``).
    """

    def __init__(self, db: Database, waiters: WaiterRegistry, clock: IReactorTime,
                 cipher: Optional[PayloadCipher], worker_id: str, poll_timing: PollTiming,
                 limits: EngineLimits = EngineLimits()):
        self._db = db
        self._waiters = waiters
        self._clock = clock
        self._cipher = cipher
        self._worker_id = worker_id
        self._poll_timing = poll_timing
        self.batchers = {
            "push": Batcher("push", self._push_batch, clock, limits.push),
            "pop": Batcher("pop", self._pop_batch, clock, limits.pop),
            "ack": Batcher("ack", self._ack_batch, clock, limits.ack),
        }

    # -- push ---------------------------------------------------------------------------

    async def push(self, items: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        """Stores validated items (see ``push_messages_core``); returns per-item results."""
        if not items:
            return []
        if self._cipher is not None:
            items = await self._encrypt(items)
        return await self.batchers["push"].submit(items)

    async def _push_batch(self, jobs: List[List[Dict[str, Any]]]) -> List[List[Dict[str, Any]]]:
        """One ``push_messages_core`` call for several requests; results split back per job."""
        outcome = await self._db.call("push_messages_core", [item for job in jobs for item in job])
        for update in outcome["partition_updates"]:
            self._waiters.notify(update["queue"], update["partition"])
        results, start = [], 0
        for job in jobs:
            mine = outcome["items"][start:start + len(job)]
            for local_index, result in enumerate(mine):
                result["index"] = local_index
            results.append(mine)
            start += len(job)
        return results

    async def _encrypt(self, items: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        flags = await self._db.call("queue_flags", sorted({item["queue"] for item in items}))
        sealed = []
        for item in items:
            if flags.get(item["queue"], {}).get("encryptionEnabled"):
                item = dict(item, payload=self._cipher.encrypt(item.get("payload", {})),
                            isEncrypted=True)
            sealed.append(item)
        return sealed

    # -- pop ----------------------------------------------------------------------------

    async def pop(self, request: PopRequest, gone: Optional[defer.Deferred] = None
                  ) -> Optional[Dict[str, Any]]:
        """Delivers up to ``request.batch`` messages, or None when nothing came in time.

        With ``wait`` the request parks between tries until a wake-up or its fallback timer.
        ``gone`` fires when the client disconnected: the waiter is dropped at once and a
        delivery that can no longer be written is given back.
        """
        deadline = self._clock.seconds() + request.timeout_ms / 1000.0
        backoff = self._poll_timing.backoff()
        while True:
            delivery = await self._pop_once(request)
            if delivery is not None:
                if gone is not None and gone.called:
                    await self._give_back(delivery)
                    return None
                return delivery
            remaining = deadline - self._clock.seconds()
            if not request.wait or remaining <= 0 or (gone is not None and gone.called):
                return None
            nap = self._waiters.wait(request.queue, request.partition,
                                     min(backoff.next_interval(), remaining))
            if gone is not None:
                gone.addBoth(lambda _: nap.cancel() if not nap.called else None)
            try:
                if await nap:
                    backoff.reset()
            except defer.CancelledError:
                return None

    async def _pop_once(self, request: PopRequest) -> Optional[Dict[str, Any]]:
        """One attempt. A database outage counts as "nothing yet": consumers' loops exit on a
        pop error, so pops answer 204 and /health reports the outage (WIRE.md 2.3.8)."""
        try:
            [result] = await self.batchers["pop"].submit([request.as_sql(self._worker_id)])
        except Unavailable:
            return None
        if not result.get("success", False):
            log.warn("pop on {queue} failed: {error}", queue=request.queue,
                     error=result.get("error"))
            return None
        if not result["messages"]:
            return None
        for message in result["messages"]:
            self._decrypt_in_place(message, "data")
        return result

    async def _pop_batch(self, jobs: List[List[Dict[str, Any]]]) -> List[List[Dict[str, Any]]]:
        """One ``pop_specific_batch`` call for several pop requests (one request per job)."""
        requests = [dict(job[0], idx=n) for n, job in enumerate(jobs)]
        answers = await self._db.call("pop_specific_batch", requests)
        by_idx = {answer["idx"]: answer["result"] for answer in answers}
        return [[by_idx[n]] for n in range(len(jobs))]

    async def _give_back(self, delivery: Dict[str, Any]) -> None:
        """Releases the leases of a delivery nobody will receive (counter untouched)."""
        if not delivery.get("leaseId"):
            return
        await self.ack([
            {"transactionId": m["transactionId"], "partitionId": m["partitionId"],
             "status": "retry", "consumerGroup": m["consumerGroup"], "leaseId": m["leaseId"]}
            for m in delivery["messages"]])

    def _decrypt_in_place(self, row: Dict[str, Any], field: str) -> None:
        if row.pop("isEncrypted", False) and self._cipher is not None:
            try:
                row[field] = self._cipher.decrypt(row[field])
            except Exception as err:  # wrong key or tampered row: hand out what is stored
                log.error("cannot decrypt message {id}: {error}", id=row.get("id"), error=err)

    # -- ack and leases -----------------------------------------------------------------

    async def ack(self, items: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        """Applies validated acks; returns one result per item in request order."""
        return await self.batchers["ack"].submit(items)

    async def _ack_batch(self, jobs: List[List[Dict[str, Any]]]) -> List[List[Dict[str, Any]]]:
        """One ``ack_messages`` call; each request keeps its own semantics (``req``)."""
        flat = [dict(item, req=n) for n, job in enumerate(jobs) for item in job]
        results = await self._db.call("ack_messages", flat)
        self._wake_released(results)
        split, start = [], 0
        for job in jobs:
            split.append(results[start:start + len(job)])
            start += len(job)
        return split

    def _wake_released(self, results: Iterable[Dict[str, Any]]) -> None:
        released = {(r["queueName"], r["partitionName"]) for r in results
                    if r.get("leaseReleased") and r.get("queueName")}
        for queue, partition in released:
            self._waiters.notify(queue, partition)

    async def extend_lease(self, lease_id: str, seconds: Optional[int]) -> str:
        """Extends every live partition lease of ``lease_id``; returns the earliest expiry."""
        outcome = await self._db.call("extend_lease", lease_id, seconds)
        if outcome.get("expiresAt"):
            return outcome["expiresAt"]
        raise NotFound("Lease expired" if outcome["found"] else "Lease not found")

    # -- queues -------------------------------------------------------------------------

    async def configure(self, queue: str, namespace: str, task: str,
                        options: Dict[str, Any]) -> Dict[str, Any]:
        return await self._db.call("configure_queue", {
            "queue": queue, "namespace": namespace, "task": task, "options": options})

    async def delete_queue(self, queue: str) -> Dict[str, Any]:
        outcome = await self._db.call("delete_queue", queue)
        self._waiters.notify(queue, None)
        return outcome

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

    # -- health -------------------------------------------------------------------------

    async def database_healthy(self) -> bool:
        return await self._db.ping()
