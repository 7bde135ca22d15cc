"""Pop: one attempt through the pop Batcher, and long polling between attempts.

A pop with ``wait=true`` that found nothing parks in the :class:`WaiterRegistry` and tries
again when woken (a push, a lease release) or when its ``POP_WAIT_*`` fallback timer fires.
"""

from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Dict, List, Optional

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from queen_tw.db.pool import Database
from queen_tw.engine.batcher import Batcher, BatchLimits
from queen_tw.engine.waiters import Backoff, WaiterRegistry
from queen_tw.errors import Unavailable

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
class PollTiming:
    """The ``POP_WAIT_*`` fallback timer settings of parked pops."""

    initial_ms: int = 100
    threshold: int = 3
    multiplier: float = 2.0
    max_ms: int = 1000

    def backoff(self) -> Backoff:
        return Backoff(self.initial_ms, self.threshold, self.multiplier, self.max_ms)


class Popper:
    """Delivers messages to pop requests.

    :param db: the pool; pops are fused through a Batcher into ``pop_specific_batch``.
    :param waiters: where parked pops sleep.
    :param clock: time source for deadlines.
    :param worker_id: stamped on leases.
    :param poll_timing: fallback timer of parked pops.
    :param limits: pop Batcher limits.
    :param decrypt: turns a stored message's ``data`` back into plaintext, in place.
    :param give_back: releases the leases of a delivery nobody will receive.
    :param paused: True while pop maintenance is on (every pop answers "nothing" at once).
    """

    def __init__(self, db: Database, waiters: WaiterRegistry, clock: IReactorTime,
                 worker_id: str, poll_timing: PollTiming, limits: BatchLimits,
                 decrypt: Callable[[Dict[str, Any]], None],
                 give_back: Callable[[Dict[str, Any]], Awaitable[None]],
                 paused: Callable[[], bool] = lambda: False):
        self._db = db
        self._waiters = waiters
        self._clock = clock
        self._worker_id = worker_id
        self._poll_timing = poll_timing
        self._decrypt = decrypt
        self._give_back = give_back
        self._paused = paused
        self.batcher = Batcher("pop", self._pop_batch, clock, limits)

    async def pop(self, request: PopRequest, gone: Optional[defer.Deferred] = None
                  ) -> Optional[Dict[str, Any]]:
        """Delivers up to ``request.batch`` messages, or None when nothing came in time.

        ``gone`` fires when the client disconnected: the waiter is dropped at once and a
        delivery that can no longer be written is given back.
        """
        deadline = self._clock.seconds() + request.timeout_ms / 1000.0
        backoff = self._poll_timing.backoff()
        while True:
            if self._paused():
                return None
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
            [result] = await self.batcher.submit([request.as_sql(self._worker_id)])
        except Unavailable:
            return None
        if not result.get("success", False):
            log.warn("pop on {queue} failed: {error}", queue=request.queue,
                     error=result.get("error"))
            return None
        if not result["messages"]:
            return None
        for message in result["messages"]:
            self._decrypt(message)
        return result

    async def _pop_batch(self, jobs: List[List[Dict[str, Any]]]) -> List[List[Dict[str, Any]]]:
        """One ``pop_specific_batch`` call for several pop requests (one request per job)."""
        requests = [dict(job[0], idx=n) for n, job in enumerate(jobs)]
        answers = await self._db.call("pop_specific_batch", requests)
        by_idx = {answer["idx"]: answer["result"] for answer in answers}
        return [[by_idx[n]] for n in range(len(jobs))]
