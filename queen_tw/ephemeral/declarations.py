"""Declared ephemeral queues in PostgreSQL (``queen.ephemeral_queues``, functions in
``sql/functions/063_ephemeral.sql``): the only part of an ephemeral queue that outlives the
process. PostgreSQL is written first and RAM second, so a configure that cannot be stored
changes nothing (503), and a stored one that the process did not live to apply is applied at
the next start.
"""

from typing import Any, Awaitable, Callable, Dict, List, Optional

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from queen_tw.db.pool import Database
from queen_tw.ephemeral.engine import EphemeralEngine
from queen_tw.ephemeral.errors import BadRequest
from queen_tw.ephemeral.options import parse_options
from queen_tw.errors import Unavailable

log = Logger()

READY_WAIT_S = 2.0
"""Longest wait of a request for the first load of the declarations."""


class Declarations:
    """Stores declarations and applies them to the engine.

    :param db: the pool.
    :param engine: the RAM side.
    """

    def __init__(self, db: Database, engine: EphemeralEngine):
        self._db = db
        self._engine = engine
        self.loaded = False
        self._changes = 0  # configures and deletes made here: a load that saw fewer is stale
        self._loading: Optional[defer.Deferred] = None
        self._writing: Dict[str, defer.DeferredLock] = {}  # per queue, see _in_turn

    async def ready(self) -> None:
        """Loads the declarations if no load has succeeded yet (the first requests after a
        start may come before the first periodic load; they share one load); with
        PostgreSQL away or slow (over :data:`READY_WAIT_S`) the queues stay as they are
        (implicit, defaults) and the request goes on."""
        if self.loaded:
            return
        loading = self._loading
        if loading is None:
            loading = self._loading = defer.ensureDeferred(self.load())
            loading.addBoth(self._loaded)  # may run at once (no pool yet)
        waiting: defer.Deferred = defer.Deferred()

        def done(_: Any) -> None:
            if not waiting.called:
                waiting.callback(None)
        loading.addCallback(done)
        # a hung PostgreSQL must not hold pushes and pops: past this, they go on without it
        self._engine.clock.callLater(READY_WAIT_S, done, None)
        await waiting

    def _loaded(self, result: Any) -> None:
        """Ends a shared load; requests go on whatever it did."""
        self._loading = None
        if isinstance(result, Failure) and not result.check(Unavailable):
            log.failure("loading the ephemeral declarations failed", result)
        # Unavailable: PostgreSQL is away; the periodic load reports that and retries

    async def configure(self, name: str, options: Dict[str, Any]) -> Dict[str, Any]:
        """Stores ``options`` (checked) for ``name``, then applies them; returns the stored
        declaration ``{queue, options}``. PostgreSQL errors propagate, nothing applied."""
        async def store_then_apply() -> Dict[str, Any]:
            stored = await self._db.call("ephemeral_declare", name, options)
            self._changes += 1
            self._engine.declare(name, options)
            return stored
        return await self._in_turn(name, store_then_apply)

    async def delete(self, name: str) -> Dict[str, Any]:
        """Removes the declaration, then the queue's rings; ``{queue, deleted, declared}``."""
        async def forget_then_remove() -> Dict[str, Any]:
            declared = bool(await self._db.call("ephemeral_forget", name))
            self._changes += 1
            removed = self._engine.remove(name)
            return {"queue": name, "deleted": removed or declared, "declared": declared}
        return await self._in_turn(name, forget_then_remove)

    async def _in_turn(self, name: str, change: Callable[[], Awaitable[Dict[str, Any]]]
                       ) -> Dict[str, Any]:
        """Runs the changes of one queue one after the other: concurrent ones on different
        pool connections committed in one order and were applied in RAM in another, which
        left options in force that PostgreSQL does not hold (until the next load)."""
        lock = self._writing.setdefault(name, defer.DeferredLock())
        await lock.acquire()
        try:
            return await change()
        finally:
            lock.release()
            if not lock.locked and not lock.waiting:
                self._writing.pop(name, None)

    async def load(self) -> int:
        """Applies every stored declaration (at start, then now and then, so a configure
        or delete made on another instance reaches this one); a queue declared here whose
        row is gone becomes implicit. Returns how many declarations there are.

        A load that a configure or delete made here overtook applies nothing (it read the
        rows before that change, and would undo it): the next load brings it all."""
        changes = self._changes
        rows: List[Dict[str, Any]] = await self._db.call("ephemeral_declarations")
        if changes != self._changes:
            return len(rows)
        names = set()
        for row in rows:
            try:
                options = parse_options(row.get("options"))
            except BadRequest as err:  # written by a later version: keep what we know
                log.warn("ephemeral queue {queue}: stored options ignored ({reason})",
                         queue=row.get("queue"), reason=err.message)
                options = {}
            names.add(row["queue"])
            queue = self._engine.queues.get(row["queue"])
            if queue is None or not queue.declared or queue.options != options:
                self._engine.declare(row["queue"], options)
        for name, queue in list(self._engine.queues.items()):
            if queue.declared and name not in names:
                self._engine.undeclare(name)
        self.loaded = True
        return len(rows)
