"""The KV and lock engine (WIRE2.md 2, 4): each call is one ``SELECT`` of a function of
``sql/functions/060_kv.sql`` / ``061_locks.sql``, so one call is one database transaction.
Ops arrive validated (:mod:`queen_tw.http.kv_input`). A batch that writes is an
all-or-nothing call (``Database.call_or_nothing``): its 503 means nothing was applied, so
the client's resend never increments a counter twice or takes a lock again."""

from typing import Any, Dict, List

from queen_tw.db.pool import Database

_KV_READS = frozenset({"get", "getMany", "getPrefix", "check"})


class KvEngine:
    """KV batches and lock ops against the shared pool.

    :param db: the pool of the message path.
    """

    def __init__(self, db: Database):
        self._db = db

    async def apply(self, ops: List[Dict[str, Any]]) -> Dict[str, Any]:
        """``{results}``, or ``{ok: false, reason: "kv_precondition", …}`` with nothing
        applied when a ``required`` op lost its precondition."""
        if not ops:
            return {"results": []}
        if all(op["op"] in _KV_READS for op in ops):
            return await self._db.call("kv_call", ops)
        return await self._db.call_or_nothing("kv_call", ops)

    async def locks(self, ops: List[Dict[str, Any]]) -> Dict[str, Any]:
        """``{results}``, one element per lock op."""
        if not ops:
            return {"results": []}
        if all(op["op"] == "get" for op in ops):
            return await self._db.call("locks_apply", ops)
        return await self._db.call_or_nothing("locks_apply", ops)

    async def sweep(self, limit: int = 10_000) -> int:
        """Deletes up to ``limit`` expired rows (already absent to every read)."""
        return await self._db.call("kv_sweep", limit)
