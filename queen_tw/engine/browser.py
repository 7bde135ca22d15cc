"""Resource and message browsing, and the operator's message actions (WIRE.md 3.1, 3.2).

Reads come from ``sql/functions/022_stats_resources.sql`` and
``sql/functions/023_messages.sql``; payloads are decrypted here, as on every read path.
Actions that put a message back in front of consumers (retry, clear, dead-letter) wake the
pops parked on its queue. A timer whose fire failed for good (WIRE2 3.4) is a dead letter of
the message it promised, which was never stored: retrying or deleting a message that does not
exist tries the timers' dead letters with the same (partition, transaction id) next
(``sql/functions/062_timers.sql``).
"""

from typing import Any, Callable, Dict, Optional

import orjson
from twisted.logger import Logger

from queen_tw.crypto import PayloadCipher
from queen_tw.db.pool import Database
from queen_tw.engine.waiters import Wake
from queen_tw.errors import NotFound, QueenError, Unavailable

log = Logger()


class RetryRefused(QueenError):
    """A message's copy was not enqueued (its queue is full): its dead letters are kept."""

    status = 409


class TimerKeyTaken(QueenError):
    """A dead timer cannot be retried: its key has been scheduled again since it died."""

    status = 409


class Browser:
    """The resource and message routes' engine.

    :param db: the pool.
    :param wake: wakes the pops parked where an action made messages deliverable, here, in
        the sibling workers and on the peers (``QueueEngine.wake_everywhere``).
    :param cipher: decrypts stored payloads; None when no key is configured.
    :param timer_scheduled: told the delay (ms) of a timer a retry scheduled again, so the
        timer sweeper wakes for it (``QueueEngine.timer_scheduled``).
    :param dead_lettered: told the queue of a message the DLQ action moved to the dead-letter
        queue (``Recorder.dead_lettered``: the metrics count it as acks' moves are).
    """

    def __init__(self, db: Database, wake: Wake, cipher: Optional[PayloadCipher],
                 timer_scheduled: Callable[[float], None] = lambda delay_ms: None,
                 dead_lettered: Callable[[str], None] = lambda queue: None):
        self._db = db
        self._wake_pops = wake
        self._cipher = cipher
        self._timer_scheduled = timer_scheduled
        self._dead_lettered = dead_lettered

    # -- resources ----------------------------------------------------------------------

    async def overview(self) -> Dict[str, Any]:
        """Cluster counts; the message breakdown comes from the statistics snapshot."""
        return await self._db.call("resources_overview")

    async def namespaces(self) -> Dict[str, Any]:
        return {"namespaces": await self._db.call("resources_grouped", "namespace")}

    async def tasks(self) -> Dict[str, Any]:
        return {"tasks": await self._db.call("resources_grouped", "task")}

    async def partitions(self, query: Dict[str, Any]) -> Dict[str, Any]:
        return await self._db.call("resources_partitions", query)

    # -- messages -----------------------------------------------------------------------

    async def messages(self, query: Dict[str, Any]) -> Dict[str, Any]:
        return await self._db.call("messages_list", query)

    async def message(self, partition_id: str, transaction_id: str) -> Dict[str, Any]:
        detail = await self._db.call("message_detail", partition_id, transaction_id)
        if detail is None:
            raise NotFound("Message not found")
        if detail.get("isEncrypted") and self._cipher is not None:
            try:
                detail["payload"] = self._cipher.decrypt(detail["payload"])
            except Exception as err:  # wrong key or tampered row: show what is stored
                log.error("cannot decrypt message {id}: {error}", id=detail["id"], error=err)
        return detail

    async def delete_message(self, partition_id: str, transaction_id: str) -> Dict[str, Any]:
        """Deletes the message, or else the dead letters of the timer that promised it."""
        answer = await self._db.call("delete_message", partition_id, transaction_id)
        if answer.get("notFound"):
            answer = await self._db.call("timer_dead_letter_delete", partition_id,
                                         transaction_id)
        return self._found(answer)

    async def retry_message(self, partition_id: str, transaction_id: str) -> Dict[str, Any]:
        """Enqueues a copy at the partition's tail and forgets its dead letters; a dead
        timer's message (never stored) is scheduled again instead, due now."""
        answer = await self._db.call("retry_message", partition_id, transaction_id, None)
        if "seal" in answer:  # stored in plaintext before its queue began to encrypt
            if self._cipher is None:
                raise Unavailable("The message's queue has encryptionEnabled but this server "
                                  "has no QUEEN_ENCRYPTION_KEY to seal its copy with; retry "
                                  "through a server that has the key")
            sealed = self._cipher.encrypt(orjson.Fragment(answer["seal"]))
            answer = await self._db.call("retry_message", partition_id, transaction_id, sealed)
        if answer.get("notFound"):
            return await self._retry_dead_timer(partition_id, transaction_id)
        if "refused" in answer:
            raise RetryRefused(answer["refused"])
        self._wake_pops([(answer.pop("queue"), answer.pop("partition"))])
        return answer

    async def _retry_dead_timer(self, partition_id: str, transaction_id: str
                                ) -> Dict[str, Any]:
        answer = self._found(await self._db.call("timer_dead_letter_retry", partition_id,
                                                 transaction_id))
        if answer.get("conflict"):
            raise TimerKeyTaken(f"Timer {answer['timerKey']} has been scheduled again since it "
                                "died; cancel that timer to retry this one")
        self._timer_scheduled(0)
        return answer

    async def dead_letter_message(self, partition_id: str, transaction_id: str, group: str,
                                  error: Optional[str]) -> Dict[str, Any]:
        answer = self._found(await self._db.call("dead_letter_message", partition_id,
                                                 transaction_id, group, error))
        queue = answer.pop("queue")
        self._wake_pops([(queue, answer.pop("partition"))])
        if answer.get("dlq"):
            self._dead_lettered(queue)
        return answer

    async def clear_queue(self, queue: str, partition: Optional[str]) -> Dict[str, Any]:
        """Deletes the queue's (or one partition's) messages and ends their leases."""
        answer = await self._db.call("clear_queue", queue, partition)
        if answer.get("notFound"):
            raise NotFound("Queue not found")
        self._wake_pops([(queue, partition)])
        return answer

    @staticmethod
    def _found(answer: Dict[str, Any]) -> Dict[str, Any]:
        if answer.get("notFound"):
            raise NotFound("Message not found")
        return answer
