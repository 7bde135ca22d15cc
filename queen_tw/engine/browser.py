"""Resource and message browsing, and the operator's message actions (WIRE.md 3.1, 3.2).

Reads come from ``sql/functions/022_stats_resources.sql`` and
``sql/functions/023_messages.sql``; payloads are decrypted here, as on every read path.
Actions that put a message back in front of consumers (retry, clear, dead-letter) wake the
pops parked on its queue.
"""

from typing import Any, Dict, Optional

from twisted.logger import Logger

from queen_tw.crypto import PayloadCipher
from queen_tw.db.pool import Database
from queen_tw.engine.waiters import WaiterRegistry
from queen_tw.errors import NotFound

log = Logger()


class Browser:
    """The resource and message routes' engine.

    :param db: the pool.
    :param waiters: woken when an action makes messages deliverable.
    :param cipher: decrypts stored payloads; None when no key is configured.
    """

    def __init__(self, db: Database, waiters: WaiterRegistry, cipher: Optional[PayloadCipher]):
        self._db = db
        self._waiters = waiters
        self._cipher = cipher

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
        return self._found(await self._db.call("delete_message", partition_id, transaction_id))

    async def retry_message(self, partition_id: str, transaction_id: str) -> Dict[str, Any]:
        """Enqueues a copy at the partition's tail and forgets its dead letters."""
        answer = self._found(await self._db.call("retry_message", partition_id, transaction_id))
        self._waiters.notify(answer.pop("queue"), answer.pop("partition"))
        return answer

    async def dead_letter_message(self, partition_id: str, transaction_id: str, group: str,
                                  error: Optional[str]) -> Dict[str, Any]:
        answer = self._found(await self._db.call("dead_letter_message", partition_id,
                                                 transaction_id, group, error))
        self._waiters.notify(answer.pop("queue"), answer.pop("partition"))
        return answer

    async def clear_queue(self, queue: str, partition: Optional[str]) -> Dict[str, Any]:
        """Deletes the queue's (or one partition's) messages and ends their leases."""
        answer = await self._db.call("clear_queue", queue, partition)
        if answer.get("notFound"):
            raise NotFound("Queue not found")
        self._waiters.notify(queue, partition)
        return answer

    @staticmethod
    def _found(answer: Dict[str, Any]) -> Dict[str, Any]:
        if answer.get("notFound"):
            raise NotFound("Message not found")
        return answer
