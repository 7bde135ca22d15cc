"""The metrics of one process put together: recorder, sampler, aggregator, exposition.

``make_service`` builds a :class:`Metrics` from the pool, the parked long polls, the file
buffer and the peer sync, adds :meth:`Metrics.services` to stage ``jobs``, and hands it to
the routes of :mod:`queen_tw.http.metrics_routes`.

Several workers (NUM_WORKERS) or instances answer one coherent view: the process families
describe the worker that answered the scrape; the ``pg`` families are read from PostgreSQL,
where every worker writes its own rows, so any worker answers the same for them. A lone
process adds the counts it has not written yet; a NUM_WORKERS worker does not (scrapes of the
port reach either worker, and each adding its own made counters go down between scrapes), so
there the cluster counters trail by up to one aggregate interval.
"""

from typing import Any, Dict, List, Optional

from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from queen_tw.db.pool import Database
from queen_tw.metrics.aggregator import Aggregator, AggregatorService, WorkerIdentity
from queen_tw.metrics.exposition import (
    CacheView,
    PostgresCollector,
    ProcessCollector,
    SharedStateView,
    make_registry,
)
from queen_tw.metrics.recorder import Recorder
from queen_tw.metrics.sampler import BufferView, Sampler, cpu_seconds, memory_bytes
from queen_tw.services.retry import OutageLog, describe_error

log = Logger()

PROMETHEUS_CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
"""What ``generate_latest`` writes: the text format 0.0.4 (WIRE.md 3.8)."""

SNAPSHOT_TIMEOUT_S = 3.0
"""The longest wait for PostgreSQL during a scrape; then the pg families are left out."""


class Metrics:
    """Everything metrics in one process.

    :param recorder: the counters the engine feeds (built before the engine).
    :param db: the pool (writes, the scrape's snapshot, pool figures).
    :param clock: time source.
    :param worker_id: ``WORKER_ID`` (with the hostname and pid, the key of this worker's rows).
    :param sample_interval_ms: METRICS_SAMPLE_INTERVAL_MS.
    :param aggregate_interval_s: METRICS_AGGREGATE_INTERVAL_S.
    :param retention_days: METRICS_RETENTION_DAYS.
    :param parked: parked long polls per queue.
    :param buffer: the file buffer and the maintenance flag.
    :param shared_state: peer sync (None: off).
    :param cache: the queue config cache.
    :param one_of_workers: this process is a NUM_WORKERS worker (see the module docstring).
    """

    def __init__(self, recorder: Recorder, db: Database, clock: IReactorTime, worker_id: str,
                 sample_interval_ms: int, aggregate_interval_s: int, retention_days: int,
                 parked=dict, buffer: Optional[BufferView] = None,
                 shared_state: Optional[SharedStateView] = None,
                 cache: Optional[CacheView] = None, one_of_workers: bool = False):
        self.recorder = recorder
        self._db = db
        self._clock = clock
        self._aggregate_interval_s = aggregate_interval_s
        self.sampler = Sampler(recorder, clock, sample_interval_ms / 1000.0, pool=db,
                               buffer=buffer, parked=parked)
        self.aggregator = Aggregator(recorder, self.sampler, db,
                                     WorkerIdentity.of_this_process(worker_id), retention_days)
        self._db_answered = False
        self._process = ProcessCollector(recorder, self.sampler, shared_state, cache,
                                         db_healthy=lambda: self._db_answered)
        self._postgres = PostgresCollector(None if one_of_workers else recorder)
        self._registry = make_registry(self._process, self._postgres)
        self._scrape_outage = OutageLog("metrics snapshot (PostgreSQL)", clock,
                                        meanwhile="scrapes answer the process families only")

    def services(self) -> List[service.Service]:
        """The sampler and the aggregator (stage ``jobs``)."""
        return [self.sampler.service(),
                AggregatorService(self.aggregator, self._clock, self._aggregate_interval_s)]

    async def prometheus_text(self) -> bytes:
        """The exposition of every family (the pg ones only when PostgreSQL answered). The
        written totals are read, and added to the unwritten counts, while no write of them
        is under way (``Recorder.writing``): the sum is then exact, never lower than the
        last scrape's."""
        await self.recorder.writing.acquire()
        try:
            snapshot = await self._snapshot()
            self._db_answered = snapshot is not None
            self._postgres.feed(snapshot)
            try:
                return generate_latest(self._registry)
            finally:
                self._postgres.feed(None)
        finally:
            self.recorder.writing.release()

    async def _snapshot(self) -> Optional[Dict[str, Any]]:
        stale = max(600, 3 * self._aggregate_interval_s)
        read = defer.ensureDeferred(self._db.call("metrics_snapshot", {"staleSeconds": stale}))
        read.addTimeout(SNAPSHOT_TIMEOUT_S, self._clock)
        try:
            snapshot = await read
        except Exception as err:
            self._scrape_outage.failed(describe_error(err))
            return None
        self._scrape_outage.succeeded()
        return snapshot

    def summary(self) -> Dict[str, Any]:
        """The ``GET /metrics`` body (WIRE.md 3.8) of this process. Python has no V8 heap:
        ``heapTotal``, ``heapUsed``, ``external`` and ``arrayBuffers`` are 0, and the
        virtual size is added as ``virtual``."""
        totals = self.recorder.totals()
        sample = self.sampler.latest
        size, idle, _, waiting = self.sampler.pool_figures()
        resident, virtual = memory_bytes()
        user, system = cpu_seconds()
        return {
            "uptime": round(self.sampler.uptime(), 3),
            "requests": {"total": totals.requests, "rate": sample.requests_rate},
            "messages": {"total": totals.messages, "rate": sample.messages_rate},
            "database": {"poolSize": size, "idleConnections": idle,
                         "waitingRequests": waiting},
            "memory": {"rss": resident, "heapTotal": 0, "heapUsed": 0, "external": 0,
                       "arrayBuffers": 0, "virtual": virtual},
            "cpu": {"user": int(user * 1e6), "system": int(system * 1e6)},
        }
