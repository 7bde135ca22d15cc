"""Declared ephemeral queues in PostgreSQL (``queen.ephemeral_queues``, functions in
``sql/functions/063_ephemeral.sql``): the only part of an ephemeral queue that outlives the
process. PostgreSQL is written first and RAM second, so a configure that cannot be stored
changes nothing (503), and a stored one that the process did not live to apply is applied at
the next start.
"""

from typing import Any, Dict, List

from twisted.logger import Logger

from queen_tw.db.pool import Database
from queen_tw.ephemeral.engine import EphemeralEngine
from queen_tw.ephemeral.errors import BadRequest
from queen_tw.ephemeral.options import parse_options
from queen_tw.errors import Unavailable

log = Logger()


class Declarations:
    """Stores declarations and applies them to the engine.

    :param db: the pool.
    :param engine: the RAM side.
    """

    def __init__(self, db: Database, engine: EphemeralEngine):
        self._db = db
        self._engine = engine
        self.loaded = False

    async def ready(self) -> None:
        """Loads the declarations if no load has succeeded yet (the first requests after a
        start may come before the first periodic load); with PostgreSQL away the queues
        stay as they are (implicit, defaults) and the request goes on."""
        if not self.loaded:
            try:
                await self.load()
            except Unavailable:
                pass

    async def configure(self, name: str, options: Dict[str, Any]) -> Dict[str, Any]:
        """Stores ``options`` (checked) for ``name``, then applies them; returns the stored
        declaration ``{queue, options}``. PostgreSQL errors propagate, nothing applied."""
        stored = await self._db.call("ephemeral_declare", name, options)
        self._engine.declare(name, options)
        return stored

    async def delete(self, name: str) -> Dict[str, Any]:
        """Removes the declaration, then the queue's rings; ``{queue, deleted, declared}``."""
        declared = bool(await self._db.call("ephemeral_forget", name))
        removed = self._engine.remove(name)
        return {"queue": name, "deleted": removed or declared, "declared": declared}

    async def load(self) -> int:
        """Applies every stored declaration (at start, then now and then, so a configure
        or delete made on another instance reaches this one); a queue declared here whose
        row is gone becomes implicit. Returns how many declarations there are."""
        rows: List[Dict[str, Any]] = await self._db.call("ephemeral_declarations")
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
