"""Statistics: the snapshot behind the overview and per-queue counts (WIRE.md 3.1, 3.5).

Counting pending and completed messages means looking at every message, so it is done on a
schedule (``STATS_INTERVAL_MS``) or on demand (``POST /api/v1/stats/refresh``), never per
request.
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
