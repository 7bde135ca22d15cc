"""The Streams API's engine (WIRE.md 3.9): what the official streaming SDKs call.

Each operation is one call of a function in ``sql/functions/050_streams.sql``. A cycle is
one PostgreSQL transaction (the source ack, the state ops and the sink pushes); its sink
pushes are prepared as any push's (transactionIds, encryption of encrypted queues), stored by
the same ``push_store`` and, once committed, answered and announced as any push's: results
by ``expand_push_answer``, wake-ups of the pops parked on the sink partitions (here and on
the peers) by :meth:`QueueEngine.announce_pushed`.
"""

from typing import Any, Dict, List, Optional

from queen_tw.db.pool import Database
from queen_tw.engine.queue_engine import QueueEngine, expand_push_answer
from queen_tw.errors import DatabaseBusy, DatabaseUnavailable, NotFound, Unavailable

UNKNOWN_QUERY = "Unknown query_id {}: register the query first (POST /streams/v1/queries)"


class ConfigHashConflict(Exception):
    """A query name registered with another operator chain, without ``reset`` (409).

    :param body: the WIRE answer ``{success: false, query_id, name, error}``.
    """

    def __init__(self, body: Dict[str, Any]):
        super().__init__(body["error"])
        self.body = body


class StreamsEngine:
    """Registration, cycles and state reads of streaming queries.

    :param db: the pool.
    :param messages: the message path: prepares sink pushes and announces them once committed.
    """

    def __init__(self, db: Database, messages: QueueEngine):
        self._db = db
        self._messages = messages

    async def register(self, name: str, source_queue: str, sink_queue: Optional[str],
                       config_hash: str, reset: bool) -> Dict[str, Any]:
        """Registers (or finds) the query ``name``; raises :class:`ConfigHashConflict` when it
        exists with another ``config_hash`` and ``reset`` is false. ``reset`` wipes the
        query's state."""
        answer = await self._db.call("streams_register", {
            "name": name, "source_queue": source_queue, "sink_queue": sink_queue,
            "config_hash": config_hash, "reset": reset})
        if answer.pop("conflict", False):
            raise ConfigHashConflict(answer)
        return answer

    async def cycle(self, query_id: str, partition_id: str, consumer_group: str,
                    release_lease: bool, state_ops: List[Dict[str, Any]],
                    push_items: List[Dict[str, Any]], ack: Optional[Dict[str, Any]]
                    ) -> Dict[str, Any]:
        """Applies one cycle atomically and returns the WIRE answer; a failure anywhere
        (lease lost, message not found, a sink item refused) is ``success: false`` with
        nothing applied. Raises NotFound for an unknown query."""
        try:
            prepared = await self._messages.prepare_push(push_items)
        except (DatabaseUnavailable, DatabaseBusy):
            raise  # the client retries the cycle (503), as when streams_cycle meets them
        except Unavailable as err:  # maintenance or no key: not storable now, nothing done
            return _failed(query_id, partition_id, err.message)
        answer = await self._messages.call_storing_pushes("streams_cycle", {
            "query_id": query_id, "partition_id": partition_id,
            "consumer_group": consumer_group, "release_lease": release_lease,
            "state_ops": state_ops, "push_items": prepared, "ack": ack})
        if not answer.pop("found"):
            raise NotFound(UNKNOWN_QUERY.format(query_id))
        pushed = answer.pop("pushed", None)
        source = answer.pop("source", None)
        answer["push_results"] = []
        if pushed is not None:  # committed: results and wake-ups as for POST /api/v1/push
            answer["push_results"] = expand_push_answer(prepared, pushed)
            names = {partition: (queue, name) for partition, queue, name in pushed["partitions"]}
            self._messages.announce_pushed([names[partition] for partition in pushed["updated"]])
        if source and source.get("leaseReleased") and source.get("queue"):
            self._messages.announce_released([(source["queue"], source["partition"])])
        return answer

    async def state(self, query_id: str, partition_id: str, keys: List[str],
                    key_prefix: Optional[str], ripe_at_or_before: Optional[float]
                    ) -> Dict[str, Any]:
        """The state rows of (query, partition): every key, or ``keys``, narrowed by
        ``key_prefix`` and by ``ripe_at_or_before`` (windows ended by then); raises NotFound
        for an unknown query."""
        request: Dict[str, Any] = {"query_id": query_id, "partition_id": partition_id,
                                   "keys": keys}
        if key_prefix:
            request["key_prefix"] = key_prefix
        if ripe_at_or_before is not None:
            request["ripe_at_or_before"] = ripe_at_or_before
        answer = await self._db.call("streams_state_get", request)
        if not answer["found"]:
            raise NotFound(UNKNOWN_QUERY.format(query_id))
        return {"success": True, "rows": answer["rows"]}


def _failed(query_id: str, partition_id: str, error: str) -> Dict[str, Any]:
    """A cycle refused before it reached PostgreSQL, in the shape of a rolled-back one."""
    return {"success": False, "error": error, "query_id": query_id,
            "partition_id": partition_id, "state_ops_applied": 0, "push_results": [],
            "ack_result": None}
