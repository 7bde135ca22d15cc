"""Which pushes go to the file buffer, and the answer they get (WIRE.md 2.2).

A push is diverted to the buffer, without trying PostgreSQL, when push maintenance is on, or
when one of its partitions still has buffered records waiting for the replay. The second rule
keeps order within a partition through an outage: a message accepted after PostgreSQL came
back must not overtake one accepted while it was away, so it queues behind it in the buffer
until the replay has stored everything of that partition. Other partitions go straight to
PostgreSQL meanwhile. (The replay decrements the count only after the store committed.)
While the buffer is still reading what an earlier process left, it cannot tell which
partitions have records waiting, so every push is diverted until it knows.
"""

from typing import AbstractSet, Any, Dict, List, Optional

from queen_tw.failover.buffer import FileBuffer
from queen_tw.failover.records import DEFAULT_PARTITION, partition_key
from queen_tw.failover.sealing import BufferSeal
from queen_tw.maintenance import Maintenance


class FileFailover:
    """The ``PushFailover`` of ``QueueEngine``: a :class:`FileBuffer` plus the flags.

    :param buffer: where diverted pushes are written.
    :param maintenance: the cluster-wide maintenance flags.
    :param seal: seals the payloads of queues that encrypt, or may (None: seals nothing).
    """

    def __init__(self, buffer: FileBuffer, maintenance: Maintenance,
                 seal: Optional[BufferSeal] = None):
        self._buffer = buffer
        self._maintenance = maintenance
        self._seal = seal or BufferSeal(None)

    def must_buffer(self, items: List[Dict[str, Any]]) -> bool:
        return self._maintenance.maintenance_mode or self._buffer.holds_any(
            partition_key(item) for item in items)

    async def buffer(self, items: List[Dict[str, Any]],
                     plain_queues: AbstractSet[str] = frozenset()) -> List[Dict[str, Any]]:
        """Writes the items durably and answers ``buffered`` for each; raises Unavailable.

        With a key, payloads are sealed unless their queue is in ``plain_queues`` (known not
        to encrypt): see ``sealing``.
        """
        await self._buffer.append(self._seal.seal(items, plain_queues))
        return [{"index": index, "status": "buffered", "queue": item["queue"],
                 "partition": item.get("partition") or DEFAULT_PARTITION,
                 "transactionId": item["transactionId"],
                 "transaction_id": item["transactionId"]}
                for index, item in enumerate(items)]
