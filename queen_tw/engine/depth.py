"""Queue depth (WIRE2 10): how much a queue still owes, per partition, to one consumer group
or to the worst of its groups. One call of ``queen.queue_depth`` (sql/functions/071_depth.sql),
which reads positions, never counts messages."""

from typing import Any, Dict, Optional

from queen_tw.db.pool import Database
from queen_tw.errors import NotFound


async def queue_depth(db: Database, queue: str, group: Optional[str]) -> Dict[str, Any]:
    """The depth report of ``queue`` (``group`` None: every group's worst per partition).

    Raises NotFound for an unknown queue.
    """
    report = await db.call("queue_depth", queue, group)
    if report is None:
        raise NotFound("Queue not found")
    return report
