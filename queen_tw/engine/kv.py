"""The KV and lock engine (WIRE2.md 2, 4): each call is one ``SELECT`` of a function of
``sql/functions/060_kv.sql`` / ``061_locks.sql``, so one call is one database transaction
and one round trip. Ops arrive validated (:mod:`queen_tw.http.kv_input`)."""

from typing import Any, Dict, List

from queen_tw.db.pool import Database


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
        return await self._db.call("kv_call", ops)

    async def locks(self, ops: List[Dict[str, Any]]) -> Dict[str, Any]:
        """``{results}``, one element per lock op."""
        if not ops:
            return {"results": []}
        return await self._db.call("locks_apply", ops)

    async def sweep(self, limit: int = 10_000) -> int:
        """Deletes up to ``limit`` expired rows (already absent to every read)."""
        return await self._db.call("kv_sweep", limit)
