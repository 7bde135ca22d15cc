"""Statistics: the snapshot behind the overview and per-queue counts (WIRE.md 3.1, 3.5).

``refresh_stats`` (sql/functions/022_stats_resources.sql) never counts messages: every
message has a position in its partition, cursors record theirs, and deletes keep the oldest
position and the holes (migration 4), so a queue's total, pending, processing, completed and
dead-letter counts are arithmetic plus a few index probes per partition. A refresh costs the
same with ten thousand or two million stored messages (bench/stats_refresh.py); its cost
follows the partitions and the lagging (group, partition) pairs. It runs on a schedule
(``STATS_INTERVAL_MS``) and on demand (``POST /api/v1/stats/refresh``), and may race queue
deletes: a queue being deleted is left out of that refresh.
"""

from typing import Any, Dict

from twisted.internet.interfaces import IReactorTime

from queen_tw.db.pool import Database
from queen_tw.services.periodic import PeriodicService


class StatsRefresher:
    """Recomputes the statistics snapshot (``refresh_stats``)."""

    def __init__(self, db: Database):
        self._db = db

    async def refresh(self) -> Dict[str, Any]:
        """Recomputes now; returns a summary (queues counted, duration)."""
        return await self._db.call("refresh_stats")


def stats_service(refresher: StatsRefresher, interval_ms: int,
                  clock: IReactorTime) -> PeriodicService:
    """The service refreshing statistics every ``interval_ms``."""
    return PeriodicService("statistics", interval_ms, refresher.refresh, clock)
