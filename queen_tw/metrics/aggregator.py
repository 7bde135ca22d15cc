"""Writes what this worker counted to PostgreSQL, one call per METRICS_AGGREGATE_INTERVAL_S.

Each write is one ``queen.metrics_write`` call (sql/functions/040_metrics.sql) with one
jsonb document: the worker's row of ``queen.worker_metrics``, a ``queen.queue_metrics`` row
per queue it served, the deltas to add to its running totals in ``queen.metrics_totals``,
and the retention after which old rows are deleted in the same call. Rows are keyed by
hostname, WORKER_ID and pid, so each of NUM_WORKERS processes writes its own.

While PostgreSQL is down the write fails, the outage is logged once (then reminders) and the
interval stays with the recorder, merged into the next one: the totals lose nothing. At
stop (stage ``jobs``, before the pool closes) one last write stores the last interval.
"""

import os
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Dict, Optional, Set

from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from queen_tw.db.pool import Database
from queen_tw.metrics.histogram import Histogram
from queen_tw.metrics.recorder import OPS, QUEUE_COUNTERS, WORKER_COUNTERS, Interval, Recorder
from queen_tw.metrics.sampler import Sample, Sampler, cpu_seconds
from queen_tw.services.periodic import PeriodicService
from queen_tw.services.retry import Backoff

log = Logger()

FINAL_WRITE_TIMEOUT_S = 5.0
"""The longest wait for the last write at stop."""


@dataclass(frozen=True)
class WorkerIdentity:
    """Who writes the rows: the host, ``WORKER_ID`` and the process id."""

    hostname: str
    worker_id: str
    pid: int

    @classmethod
    def of_this_process(cls, worker_id: str) -> "WorkerIdentity":
        return cls(socket.gethostname(), worker_id, os.getpid())


class Aggregator:
    """Turns the recorder's intervals into ``queen.metrics_write`` calls.

    :param recorder: the counters of this process.
    :param sampler: the latest process sample (pool, buffer, memory, parked pops).
    :param db: the pool.
    :param identity: the keys of this worker's rows.
    :param retention_days: rows older than this are deleted (METRICS_RETENTION_DAYS).
    """

    def __init__(self, recorder: Recorder, sampler: Sampler, db: Database,
                 identity: WorkerIdentity, retention_days: int):
        self._recorder = recorder
        self._sampler = sampler
        self._db = db
        self._identity = identity
        self._retention_days = retention_days
        self._cpu_base = cpu_seconds()
        self._parked_before: Set[str] = set()
        self.writes = 0

    async def write(self) -> None:
        """Stores everything counted since the last successful write (one SQL call)."""
        await self._recorder.writing.acquire()
        try:
            interval = self._recorder.take_interval()
            cpu = cpu_seconds()
            sample = self._sampler.latest
            clock = self._recorder.database_time
            sent = clock.local()
            answer = await self._db.call("metrics_write", self.document(interval, sample, cpu))
            if isinstance(answer, dict) and isinstance(answer.get("now"), (int, float)):
                self._recorder.follow_database_time(float(answer["now"]), sent, clock.local())
            self._recorder.written()
        finally:
            self._recorder.writing.release()
        self._cpu_base = cpu
        self._parked_before = {queue for queue, count in sample.parked.items() if count}
        self.writes += 1

    def document(self, interval: Interval, sample: Sample,
                 cpu: Optional[tuple] = None) -> Dict[str, Any]:
        """The ``queen.metrics_write`` argument for ``interval`` ending with ``sample``."""
        cpu_user, cpu_system = cpu if cpu is not None else cpu_seconds()
        pop_lag = interval.pop_lag()
        worker: Dict[str, Any] = interval.counts.as_dict()
        worker.update(
            latency={op: _latency(interval.latency[op]) for op in OPS},
            event_loop_lag_ms=_stats(interval.loop_lag),
            pop_lag_ms=_stats(pop_lag),
            rss_bytes=sample.rss_bytes,
            cpu_user_seconds=round(max(cpu_user - self._cpu_base[0], 0.0), 6),
            cpu_system_seconds=round(max(cpu_system - self._cpu_base[1], 0.0), 6),
            db_pool_size=sample.pool_size, db_pool_idle=sample.pool_idle,
            db_pool_waiting=sample.pool_waiting,
            buffer_pending=sample.buffer_pending, buffer_failed=sample.buffer_failed,
            db_healthy=sample.db_connected,
            parked_consumers=sum(sample.parked.values()))
        queues = []
        for name in sorted(set(interval.queues) | set(sample.parked) | self._parked_before):
            activity = interval.queues.get(name)
            row: Dict[str, Any] = (activity.as_dict() if activity is not None
                                   else dict.fromkeys(QUEUE_COUNTERS, 0))
            row.update(queue_name=name,
                       pop_lag_ms=_stats(activity.lag) if activity is not None else _stats(None),
                       parked_consumers=sample.parked.get(name, 0))
            queues.append(row)
        return {
            "hostname": self._identity.hostname,
            "workerId": self._identity.worker_id,
            "pid": self._identity.pid,
            "bucketStart": _iso(interval.started),
            "bucketSeconds": max(int(round(interval.ended - interval.started)), 1),
            "worker": worker,
            "queues": queues,
            "totals": {name: worker[name] for name in WORKER_COUNTERS},
            "retentionDays": self._retention_days,
        }


class AggregatorService(service.Service):
    """Runs :meth:`Aggregator.write` every ``interval_s`` and once more at stop.

    :param aggregator: the writer.
    :param clock: time source.
    :param interval_s: METRICS_AGGREGATE_INTERVAL_S.
    """

    name = "metrics aggregator"

    def __init__(self, aggregator: Aggregator, clock: IReactorTime, interval_s: float):
        self._aggregator = aggregator
        self._clock = clock
        self._periodic = PeriodicService(
            "metrics write", int(interval_s * 1000), aggregator.write, clock,
            retry=Backoff(min(interval_s, 5.0), maximum=max(interval_s, 5.0)),
            quiet_start=True, now=True)  # at once: it measures PostgreSQL's clock

    def startService(self) -> None:
        super().startService()
        self._periodic.startService()

    def stopService(self) -> defer.Deferred:
        super().stopService()
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        await self._periodic.stopService()
        last = defer.ensureDeferred(self._aggregator.write())
        last.addTimeout(FINAL_WRITE_TIMEOUT_S, self._clock)
        try:
            await last
        except Exception as err:
            log.warn("the last metrics write at stop failed: {error}", error=err)


def _stats(histogram: Optional[Histogram]) -> Dict[str, float]:
    """``{count, avg, max, p99}`` in the histogram's own unit."""
    if histogram is None or not histogram.count:
        return {"count": 0, "avg": 0.0, "max": 0.0, "p99": 0.0}
    summary = histogram.summary()
    return {"count": summary["count"], "avg": summary["avg"], "max": summary["max"],
            "p99": summary["p99"]}


def _latency(histogram: Histogram) -> Dict[str, float]:
    """``{count, avgMs, maxMs, p50Ms, p95Ms, p99Ms}`` of a latency histogram in seconds."""
    summary = histogram.summary(scale=1000.0)
    return {"count": summary["count"], "avgMs": summary["avg"], "maxMs": summary["max"],
            "p50Ms": summary["p50"], "p95Ms": summary["p95"], "p99Ms": summary["p99"]}


def _iso(unix_seconds: float) -> str:
    return datetime.fromtimestamp(unix_seconds, UTC).isoformat()
