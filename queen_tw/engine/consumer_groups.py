"""Consumer-group administration (WIRE.md 3.5): read lag, delete, move cursors.

Each operation is one call of a function in ``sql/functions/021_consumer_groups.sql``.
Operations that end leases or move cursors back wake the pops parked on the queues they
touched, since those pops may now have something to take.
"""

from typing import Any, Dict, Iterable, List, Optional

from queen_tw.db.pool import Database
from queen_tw.engine.waiters import Wake
from queen_tw.errors import NotFound


class ConsumerGroups:
    """The consumer-group routes' engine.

    :param db: the pool.
    :param wake: wakes the pops parked on the queues whose cursors or leases changed, here,
        in the sibling workers and on the peers (``QueueEngine.wake_everywhere``).
    """

    def __init__(self, db: Database, wake: Wake):
        self._db = db
        self._wake_pops = wake

    async def list(self) -> List[Dict[str, Any]]:
        """One row per (group, queue), queue mode included."""
        return await self._db.call("consumer_groups_list")

    async def lagging(self, min_lag_seconds: int) -> List[Dict[str, Any]]:
        """Partitions whose oldest unconsumed message is at least that old, worst first."""
        return await self._db.call("consumer_groups_lagging", min_lag_seconds)

    async def detail(self, group: str) -> Dict[str, Any]:
        """The group's partitions per queue; ``{}`` for an unknown group."""
        return await self._db.call("consumer_group_detail", group)

    async def delete(self, group: str, queue: Optional[str], delete_metadata: bool
                     ) -> Dict[str, Any]:
        """Drops the group's cursors and leases (on ``queue`` or everywhere); with
        ``delete_metadata`` also its subscription records, so its next pop is a first
        contact again."""
        answer = await self._db.call("delete_consumer_group", group, queue, delete_metadata)
        self._wake(answer.pop("queues", ()))
        return answer

    async def set_subscription_timestamp(self, group: str, timestamp: str) -> Dict[str, Any]:
        """Moves the group's starting point for partitions it has no cursor in."""
        answer = await self._db.call("set_subscription_timestamp", group, timestamp)
        self._wake(answer.pop("queues", ()))
        return answer

    async def seek(self, group: str, queue: str, to_end: bool, timestamp: Optional[str]
                   ) -> Dict[str, Any]:
        """Moves every cursor of the group on ``queue`` to the end or to ``timestamp``."""
        answer = await self._db.call("seek_consumer_group", group, queue, to_end, timestamp)
        if answer.get("notFound"):
            raise NotFound("Queue not found")
        self._wake([queue])
        return answer

    async def seek_partition(self, group: str, queue: str, partition: str) -> Dict[str, Any]:
        """Moves the group's cursor on one partition to its newest message."""
        answer = await self._db.call("seek_consumer_group_partition", group, queue, partition)
        if answer.get("notFound"):
            raise NotFound("Partition not found")
        self._wake_pops([(queue, partition)])
        return answer

    def _wake(self, queues: Iterable[str]) -> None:
        self._wake_pops((queue, None) for queue in queues)
