"""Timers' engine (WIRE2.md 3): schedules, cancels and reads timers, and fires due ones.

Every operation is one call of a function in ``sql/functions/062_timers.sql``. A timer keeps
the bytes its scheduler sent; when its queue encrypts, the server encrypts the payload at
schedule time (as a push would) and keeps the envelope. A fire is one PostgreSQL transaction:
the timer row is deleted and its message pushed by the same ``push_store`` as any push, under
the message id promised at schedule time; once committed it wakes the pops parked on its
partition, here and on the peers, as :meth:`QueueEngine.announce_pushed` does for pushes.

The sweeper (:mod:`queen_tw.services.timer_sweeper`) calls :meth:`TimersEngine.sweep`; a
schedule that is due before the sweeper's next wake-up tells it through ``on_scheduled``.
"""

import base64
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import orjson
from twisted.logger import Logger

from queen_tw import jsoncodec
from queen_tw.db.pool import Database
from queen_tw.engine.queue_engine import QueueEngine
from queen_tw.errors import DatabaseBusy, DatabaseUnavailable, Unavailable

SCHEDULING_OPS = ("schedule", "reschedule")

NO_KEY_RETRY_MS = 5000
"""How long a timer this server could not encrypt (it has no key) waits before it is due
again, for a server with the key to take it."""

log = Logger()


@dataclass(frozen=True)
class SweepOutcome:
    """What one sweep did.

    :param taken: due rows it took (fired, failed, claimed, or left due past the claim's
        byte budget).
    :param fired: messages pushed.
    :param deferred: due rows left for a later sweep because another transaction holds
        their partition (``queen.timers_lock_targets``).
    :param next_due_ms: milliseconds until the next timer is due by the database's clock
        (<= 0: some are due now, held by another sweeper; None: no timers at all).
    """

    taken: int
    fired: int
    deferred: int
    next_due_ms: Optional[float]


class TimersEngine:
    """Timer operations of one server.

    :param db: the pool.
    :param messages: the message path: encryption of encrypted queues' payloads, and the
        wake-ups of fired messages.
    """

    def __init__(self, db: Database, messages: QueueEngine):
        self._db = db
        self._messages = messages

    @property
    def on_scheduled(self) -> Callable[[float], None]:
        """Told the delay (ms) of the nearest timer a committed call scheduled (the sweeper's
        :meth:`~queen_tw.services.timer_sweeper.TimerSweeper.nudge`). It is the message
        path's hook, so the ``timers`` rider of a transaction reaches the same sweeper."""
        return self._messages.timer_scheduled

    @on_scheduled.setter
    def on_scheduled(self, hook: Callable[[float], None]) -> None:
        self._messages.timer_scheduled = hook

    async def apply(self, ops: List[Dict[str, Any]], producer_sub: Optional[str]
                    ) -> List[Dict[str, Any]]:
        """Applies validated ops (:func:`queen_tw.http.timers.timer_operations`) in one
        transaction; returns their results, index-aligned (WIRE2 3.1)."""
        if not ops:
            return []
        results = await self._db.call("timers_schedule", await self.prepare(ops), producer_sub)
        delays = [op["delayMs"] for op, result in zip(ops, results, strict=True)
                  if op["op"] in SCHEDULING_OPS and result.get("ok")]
        if delays:
            self.on_scheduled(min(delays))
        return results

    async def prepare(self, ops: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        """Validated ops made ready for ``queen.timers_schedule`` (which the timers rider of
        a transaction calls too): the payloads of encrypted queues are encrypted, and the
        ``value`` (its JSON text) each scheduling op carries is dropped. Raises
        ``Unavailable`` when a queue encrypts and this server has no key (as a push does)."""
        scheduling = [op for op in ops if op["op"] in SCHEDULING_OPS]
        sealed = await self._messages.seal(
            [{"queue": op["queue"], "payload": op["value"]} for op in scheduling])
        prepared = []
        for op in ops:
            prepared.append({key: value for key, value in op.items() if key != "value"})
        scheduled = [op for op in prepared if op["op"] in SCHEDULING_OPS]
        for op, item in zip(scheduled, sealed, strict=True):
            if item.get("isEncrypted"):
                op.pop("body", None)
                op.update(payload=base64.b64encode(jsoncodec.dumps(item["payload"])).decode(),
                          payloadZstd=False, encrypted=True)
        return prepared

    async def cancel(self, queue: str, timer_key: str, txn: Optional[str]) -> Dict[str, Any]:
        """Cancels one timer (the DELETE route): ``cancelled``, ``absent`` or ``too_late``."""
        op: Dict[str, Any] = {"op": "cancel", "queue": queue, "timerKey": timer_key}
        if txn is not None:
            op["txn"] = txn
        [result] = await self._db.call("timers_schedule", [op], None)
        return result

    async def peek(self, queue: str, timer_key: str) -> Dict[str, Any]:
        """One timer with its payload as stored (base64), or ``found: false``."""
        return await self._db.call("timer_peek", queue, timer_key)

    async def list(self, queue: str, after: Optional[str], limit: int) -> Dict[str, Any]:
        """A page of ``queue``'s timers in key byte order after ``after`` (exclusive)."""
        return await self._db.call("timers_list", queue, after, limit)

    async def sweep(self, limit: int, lease_ms: int) -> SweepOutcome:
        """Fires up to ``limit`` due timers (one transaction), then the ones that needed
        encrypting here (claimed for ``lease_ms``); wakes the pops of their partitions."""
        answer = await self._db.call("timers_sweep", limit, lease_ms)
        self._announce(answer["updated"])
        fired, deferred, next_due_ms = answer["fired"], answer["deferred"], answer["nextDueMs"]
        if answer.get("claimed"):
            claimed_fired, claimed_deferred = await self.fire_claimed(answer["claimed"])
            fired += claimed_fired
            if claimed_deferred:  # their claims were given up: due again now
                deferred += claimed_deferred
                next_due_ms = min(next_due_ms if next_due_ms is not None else 0, 0)
        return SweepOutcome(answer["taken"], fired, deferred, next_due_ms)

    async def fire_claimed(self, claimed: Dict[str, Any]) -> Tuple[int, int]:
        """Encrypts the payloads of claimed rows (their queue encrypts; they were scheduled
        plain) and fires them; without a key they are given back, unspent, for a server with
        the key. Returns the messages fired and the rows deferred (their partition held)."""
        rows = claimed["rows"]
        keys = [{"queue": row["queue"], "timerKey": row["timerKey"]} for row in rows]
        try:
            sealed = await self._messages.seal(
                [{"queue": row["queue"], "payload": orjson.Fragment(row["bodyText"])}
                 for row in rows])
        except (DatabaseUnavailable, DatabaseBusy):
            raise  # the claims expire and the rows are swept again
        except Unavailable as err:  # no key here
            given_back = await self._db.call("timers_release_claimed", claimed["token"], keys,
                                             err.message, NO_KEY_RETRY_MS)
            log.warn("{n} timer(s) of encrypted queues given back for a server with the key "
                     "({error})", n=given_back, error=err.message)
            return 0, 0
        fires = [dict(key, payload=item["payload"], isEncrypted=bool(item.get("isEncrypted")))
                 for key, item in zip(keys, sealed, strict=True)]
        answer = await self._db.call("timers_fire_claimed", claimed["token"], fires)
        self._announce(answer["updated"])
        return answer["fired"], answer["deferred"]

    def _announce(self, updated: List[List[str]]) -> None:
        if updated:
            self._messages.announce_pushed([(queue, partition) for queue, partition in updated])
