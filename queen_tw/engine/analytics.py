"""The status and analytics routes' engine (WIRE.md 3.4): dashboards' views of the server.

Every answer is one call of ``sql/functions/041_status.sql``. Time series are read from the
metrics tables the metrics service writes (``worker_metrics``, ``queue_metrics``, one row per
worker and per queue every ``METRICS_AGGREGATE_INTERVAL_S``), summed over workers and bucketed
over time by PostgreSQL; counts of what is stored come from the statistics snapshot. Filters
arrive validated (:mod:`queen_tw.http.status`); a filter that names an unknown queue is
:class:`~queen_tw.errors.NotFound`.
"""

from typing import Any, Dict

from queen_tw.db.pool import Database
from queen_tw.errors import NotFound

ALIVE_INTERVALS = 3
"""A worker is alive while its last metrics row ended less than this many aggregate
intervals ago: one late write is not a dead worker, three missed ones are."""

QUEUE_SERIES = ("lag", "ops", "parked")
"""The per-queue series of ``/api/v1/analytics/queue-*``."""


class Analytics:
    """Status, per-queue views and time series.

    :param db: the pool.
    :param aggregate_interval_s: ``METRICS_AGGREGATE_INTERVAL_S``, how often each worker
        writes its rows (a worker is alive within :data:`ALIVE_INTERVALS` of them).
    :param metrics_retention_days: ``METRICS_RETENTION_DAYS``, reported by the retention view.
    """

    def __init__(self, db: Database, aggregate_interval_s: int, metrics_retention_days: int):
        self._db = db
        self._alive_seconds = ALIVE_INTERVALS * aggregate_interval_s
        self._retention_days = metrics_retention_days

    async def status(self, filters: Dict[str, Any]) -> Dict[str, Any]:
        """``/api/v1/status``: throughput, queues, counts, leases, workers over a range.

        :param filters: ``from``, ``to`` (ISO-8601 UTC), ``queue``, ``namespace``, ``task``;
            each optional.
        """
        return _found(await self._db.call("status_overview", filters, self._alive_seconds))

    async def queues(self, filters: Dict[str, Any]) -> Dict[str, Any]:
        """``/api/v1/status/queues``: one page of queues with their counts.

        :param filters: ``namespace``, ``task``, ``to`` (optional), ``limit``, ``offset``.
        """
        return await self._db.call("status_queues", filters)

    async def queue(self, name: str) -> Dict[str, Any]:
        """``/api/v1/status/queues/{queue}``: a queue, its partitions and their groups."""
        return _found(await self._db.call("status_queue", name))

    async def queue_messages(self, name: str, limit: int, offset: int) -> Dict[str, Any]:
        """``/api/v1/status/queues/{queue}/messages``: a page of its messages, newest first."""
        return _found(await self._db.call("status_queue_messages", name, limit, offset))

    async def analytics(self, filters: Dict[str, Any]) -> Dict[str, Any]:
        """``/api/v1/status/analytics``: queue operations per minute, hour or day.

        :param filters: as :meth:`status`, plus ``interval``.
        """
        return _found(await self._db.call("status_analytics", filters))

    async def system_metrics(self, filters: Dict[str, Any]) -> Dict[str, Any]:
        """``/api/v1/analytics/system-metrics``: the workers' figures summed per bucket.

        :param filters: ``from``, ``to``, ``hostname``, ``workerId``; each optional.
        """
        return await self._db.call("analytics_system_metrics", filters)

    async def worker_metrics(self, filters: Dict[str, Any]) -> Dict[str, Any]:
        """``/api/v1/analytics/worker-metrics``: one series per worker (filters as above)."""
        return await self._db.call("analytics_worker_metrics", filters)

    async def postgres_stats(self) -> Dict[str, Any]:
        """``/api/v1/analytics/postgres-stats``: size, cache, connections, tables, indexes."""
        return await self._db.call("analytics_postgres_stats")

    async def queue_series(self, kind: str, filters: Dict[str, Any]) -> Dict[str, Any]:
        """``/api/v1/analytics/queue-lag|queue-ops|queue-parked-replicas``.

        :param kind: one of :data:`QUEUE_SERIES`.
        :param filters: ``from``, ``to``, ``queue``; each optional.
        """
        if kind not in QUEUE_SERIES:
            raise ValueError(f"unknown queue series {kind!r}")
        return _found(await self._db.call("analytics_queue_series", filters, kind))

    async def retention(self, filters: Dict[str, Any]) -> Dict[str, Any]:
        """``/api/v1/analytics/retention``: per pruned table, its rows and oldest row now.

        :param filters: ``queue`` (optional; ``from``/``to`` are echoed by the route).
        """
        return _found(await self._db.call("analytics_retention", filters, self._retention_days))


def _found(answer: Dict[str, Any]) -> Dict[str, Any]:
    if answer.get("notFound"):
        raise NotFound("Queue not found")
    return answer
