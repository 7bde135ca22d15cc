"""The Prometheus families of ``GET /metrics/prometheus`` (WIRE.md 3.8), as collectors.

Two custom collectors in one ``CollectorRegistry``, rendered by prometheus_client:

- :class:`ProcessCollector`: this worker process, live (uptime, CPU, memory, pool, file
  buffer, maintenance, peer sync and config cache, request latency histograms per op);
- :class:`PostgresCollector`: what PostgreSQL knows for the whole cluster, from one
  ``queen.metrics_snapshot`` read per scrape that the route hands over with
  :meth:`PostgresCollector.feed` right before rendering (the render is synchronous, on the
  reactor thread). Cluster totals add this process's counts not written yet, so a single
  process's counters are exact at once. Without a snapshot (PostgreSQL down) these
  families are left out and ``queen_file_buffer_db_healthy`` is 0.
"""

from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Protocol, Tuple

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from queen_tw.metrics.histogram import Histogram
from queen_tw.metrics.recorder import OPS, Counts, Recorder
from queen_tw.metrics.sampler import Sampler, cpu_seconds, memory_bytes

_CLUSTER_COUNTERS: Tuple[Tuple[str, str, str], ...] = (
    ("queen_cluster_push_requests", "push_requests", "Push requests, all workers"),
    ("queen_cluster_pop_requests", "pop_requests", "Pop requests, all workers"),
    ("queen_cluster_ack_requests", "ack_requests", "Ack requests, all workers"),
    ("queen_cluster_transactions", "transactions", "Transactions, all workers"),
    ("queen_cluster_push_messages", "push_messages", "Messages pushed, all workers"),
    ("queen_cluster_pop_messages", "pop_messages", "Messages delivered, all workers"),
    ("queen_cluster_ack_messages", "ack_messages", "Messages acknowledged, all workers"),
    ("queen_cluster_db_errors", "db_errors", "Failed database calls, all workers"),
    ("queen_cluster_dlq", "dlq", "Messages moved to the dead-letter queue, all workers"),
)

_QUEUE_GAUGES: Tuple[Tuple[str, str, str], ...] = (
    ("queen_queue_push_requests_per_minute", "pushRequestsPerMinute", "Push requests"),
    ("queen_queue_push_messages_per_minute", "pushMessagesPerMinute", "Messages pushed"),
    ("queen_queue_pop_messages_per_minute", "popMessagesPerMinute", "Messages delivered"),
    ("queen_queue_pop_empty_per_minute", "popEmptyPerMinute", "Pops that found nothing"),
    ("queen_queue_transactions_per_minute", "transactionsPerMinute", "Transactions"),
)

_WORKER_LABELS = ["hostname", "worker_id", "pid"]


class SharedStateView(Protocol):
    """The peer-sync statistics (``queen_tw.cluster.wiring.SharedState``)."""

    def stats(self) -> Dict[str, Any]:
        """The WIRE 3.7 shared-state fields."""


class CacheView(Protocol):
    """The queue config cache (``queen_tw.cluster.config_cache.QueueConfigCache``)."""

    def stats(self) -> Dict[str, Any]:
        """``size``, ``hits``, ``misses``."""


class ProcessCollector(Collector):
    """The families of this worker process.

    :param recorder: the counters and latency histograms.
    :param sampler: pool, buffer, maintenance and uptime.
    :param shared_state: peer sync (None: off).
    :param cache: the queue config cache (None: no figures).
    :param db_healthy: whether the last PostgreSQL read of this scrape worked.
    """

    def __init__(self, recorder: Recorder, sampler: Sampler,
                 shared_state: Optional[SharedStateView] = None,
                 cache: Optional[CacheView] = None,
                 db_healthy: Callable[[], bool] = lambda: False):
        self._recorder = recorder
        self._sampler = sampler
        self._shared_state = shared_state
        self._cache = cache
        self._db_healthy = db_healthy

    def collect(self) -> Iterator[Metric]:
        sample = self._sampler.latest
        yield _gauge("queen_uptime_seconds", "Seconds since this process started",
                     self._sampler.uptime())
        user, system = cpu_seconds()
        yield CounterMetricFamily("queen_cpu_user_microseconds",
                                  "CPU time in user mode of this process", user * 1e6)
        yield CounterMetricFamily("queen_cpu_system_microseconds",
                                  "CPU time in kernel mode of this process", system * 1e6)
        resident, virtual = memory_bytes()
        yield _gauge("queen_process_resident_memory_bytes", "Resident memory", resident)
        yield _gauge("queen_process_virtual_memory_bytes", "Virtual memory", virtual)
        pool = self._sampler.pool_figures()
        yield _gauge("queen_db_pool_size", "Connections of this process's pool", pool[0])
        yield _gauge("queen_db_pool_idle", "Free connections", pool[1])
        yield _gauge("queen_db_pool_active", "Connections running a call", pool[2])
        yield _gauge("queen_db_pool_waiting", "Calls waiting for a connection", pool[3])
        yield _gauge("queen_file_buffer_pending", "Pushes waiting in the file buffer",
                     sample.buffer_pending)
        yield _gauge("queen_file_buffer_failed", "File buffer records that failed",
                     sample.buffer_failed)
        yield _gauge("queen_file_buffer_db_healthy", "1 when PostgreSQL answered this scrape",
                     1 if self._db_healthy() else 0)
        yield _gauge("queen_maintenance_mode_enabled", "1 while pushes go to the file buffer",
                     1 if sample.maintenance else 0)
        yield from self._sync()
        yield from self._latency()

    def _sync(self) -> Iterator[Metric]:
        stats = self._shared_state.stats() if self._shared_state is not None else {}
        yield _gauge("queen_shared_state_enabled", "1 when peer sync is on",
                     1 if stats.get("enabled") else 0)
        cache = self._cache.stats() if self._cache is not None else {}
        yield _gauge("queen_qc_cache_size", "Queue configs cached", cache.get("size", 0))
        yield CounterMetricFamily("queen_qc_cache_hits", "Queue config cache hits",
                                  cache.get("hits", 0))
        yield CounterMetricFamily("queen_qc_cache_misses", "Queue config cache misses",
                                  cache.get("misses", 0))
        health = stats.get("server_health") or {}
        servers = GaugeMetricFamily("queen_servers", "Peer servers by state", labels=["state"])
        servers.add_metric(["alive"], health.get("servers_alive", 0))
        servers.add_metric(["dead"], health.get("servers_dead", 0))
        yield servers
        transport = stats.get("transport") or {}
        messages = CounterMetricFamily("queen_transport_messages",
                                       "Peer-sync datagrams", labels=["dir"])
        for direction in ("sent", "received", "dropped"):
            messages.add_metric([direction], transport.get(f"messages_{direction}", 0))
        yield messages

    def _latency(self) -> Iterator[Metric]:
        family = HistogramMetricFamily("queen_request_duration_seconds",
                                       "Request latency in this process", labels=["op"])
        for op in OPS:
            histogram = self._recorder.latency(op)
            family.add_metric([op], _buckets(histogram), histogram.total)
        yield family


class PostgresCollector(Collector):
    """The cluster-wide families, from the snapshot of the current scrape.

    :param recorder: its unwritten counts join the cluster totals; None (a NUM_WORKERS worker)
        shows the written totals alone: scrapes of one port go to either worker, and each
        adding its own unwritten counts made the counters go down from one to the next.
    """

    def __init__(self, recorder: Optional[Recorder]):
        self._recorder = recorder
        self._snapshot: Optional[Mapping[str, Any]] = None

    def feed(self, snapshot: Optional[Mapping[str, Any]]) -> None:
        """The ``queen.metrics_snapshot`` answer the next collect shows (None: none)."""
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snapshot = self._snapshot
        if snapshot is None:
            return
        unwritten = self._recorder.unwritten() if self._recorder is not None else Counts()
        yield from _cluster(snapshot.get("totals") or {}, unwritten)
        yield from _queues(snapshot.get("queues") or [], snapshot.get("depth") or {})
        yield from _workers(snapshot.get("workers") or [])
        depth = GaugeMetricFamily("queen_dlq_depth", "Messages in the dead-letter queue",
                                  labels=["scope"])
        depth.add_metric(["cluster"], snapshot.get("dlqDepth", 0))
        yield depth
        by_queue = GaugeMetricFamily("queen_dlq_depth_by_queue",
                                     "Messages in the dead-letter queue per queue",
                                     labels=["queue"])
        for queue, count in sorted((snapshot.get("dlqByQueue") or {}).items()):
            by_queue.add_metric([queue], count)
        yield by_queue


def make_registry(process: ProcessCollector, postgres: PostgresCollector) -> CollectorRegistry:
    """A registry holding the two collectors (and nothing else: no default collectors)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(process)
    registry.register(postgres)
    return registry


def _cluster(totals: Mapping[str, Any], unwritten: Counts) -> Iterator[Metric]:
    local = unwritten.as_dict()

    def total(counter: str) -> float:
        return float(totals.get(counter, 0)) + local[counter]

    for name, counter, text in _CLUSTER_COUNTERS:
        family = CounterMetricFamily(name, text, labels=["scope"])
        family.add_metric(["cluster"], total(counter))
        yield family
    acks = CounterMetricFamily("queen_cluster_ack", "Acks by result, all workers",
                               labels=["scope", "result"])
    acks.add_metric(["cluster", "success"], total("ack_success"))
    acks.add_metric(["cluster", "failed"], total("ack_failed"))
    yield acks


def _queues(queues: List[Mapping[str, Any]],
            depth: Mapping[str, Mapping[str, Any]]) -> Iterator[Metric]:
    for name, key, text in _QUEUE_GAUGES:
        family = GaugeMetricFamily(name, f"{text} during the last minute", labels=["queue"])
        for queue in queues:
            family.add_metric([queue["queue"]], queue.get(key, 0))
        yield family
    acks = GaugeMetricFamily("queen_queue_ack_per_minute", "Acks during the last minute",
                             labels=["queue", "result"])
    lag = GaugeMetricFamily("queen_queue_pop_lag_milliseconds",
                            "Age of the messages delivered during the last minute",
                            labels=["queue", "stat"])
    parked = GaugeMetricFamily("queen_queue_parked_consumers", "Long polls waiting",
                               labels=["queue"])
    age = GaugeMetricFamily("queen_queue_metrics_age_seconds",
                            "Seconds since the queue's last metrics row ended",
                            labels=["queue"])
    for queue in queues:
        name = queue["queue"]
        acks.add_metric([name, "success"], queue.get("ackSuccessPerMinute", 0))
        acks.add_metric([name, "failed"], queue.get("ackFailedPerMinute", 0))
        for stat in ("avg", "max", "p99"):
            lag.add_metric([name, stat], (queue.get("lag") or {}).get(stat, 0))
        parked.add_metric([name], queue.get("parked", 0))
        age.add_metric([name], queue.get("ageSeconds", 0))
    yield from (acks, lag, parked, age)
    pending = GaugeMetricFamily("queen_queue_pending_messages",
                                "Messages waiting (statistics snapshot)", labels=["queue"])
    processing = GaugeMetricFamily("queen_queue_processing_messages",
                                   "Messages leased (statistics snapshot)", labels=["queue"])
    for name, counts in sorted(depth.items()):
        pending.add_metric([name], counts.get("pending", 0))
        processing.add_metric([name], counts.get("processing", 0))
    yield from (pending, processing)


def _workers(workers: List[Mapping[str, Any]]) -> Iterator[Metric]:
    loop_lag = GaugeMetricFamily("queen_worker_event_loop_lag_milliseconds",
                                 "Event-loop lag in the worker's last interval",
                                 labels=_WORKER_LABELS + ["stat"])
    pop_lag = GaugeMetricFamily("queen_worker_lag_milliseconds",
                                "Age of the messages the worker delivered in its last interval",
                                labels=_WORKER_LABELS + ["stat"])
    connections = GaugeMetricFamily("queen_worker_db_connections", "The worker's pool size",
                                    labels=_WORKER_LABELS)
    age = GaugeMetricFamily("queen_worker_metrics_age_seconds",
                            "Seconds since the worker's last metrics row ended",
                            labels=_WORKER_LABELS)
    errors = GaugeMetricFamily("queen_worker_db_errors_per_minute",
                               "Failed database calls during the last minute",
                               labels=_WORKER_LABELS)
    dlq = GaugeMetricFamily("queen_worker_dlq_per_minute",
                            "Dead-lettered messages during the last minute",
                            labels=_WORKER_LABELS)
    requests = GaugeMetricFamily("queen_worker_requests_per_minute",
                                 "Requests during the last minute", labels=_WORKER_LABELS + ["op"])
    messages = GaugeMetricFamily("queen_worker_messages_per_minute",
                                 "Messages during the last minute", labels=_WORKER_LABELS + ["op"])
    acks = GaugeMetricFamily("queen_worker_ack_per_minute", "Acks during the last minute",
                             labels=_WORKER_LABELS + ["result"])
    for worker in workers:
        labels = [str(worker.get("hostname", "")), str(worker.get("workerId", "")),
                  str(worker.get("pid", ""))]
        for stat in ("avg", "max", "p99"):
            loop_lag.add_metric(labels + [stat], (worker.get("eventLoopLag") or {}).get(stat, 0))
            pop_lag.add_metric(labels + [stat], (worker.get("popLag") or {}).get(stat, 0))
        connections.add_metric(labels, worker.get("dbConnections", 0))
        age.add_metric(labels, worker.get("ageSeconds", 0))
        errors.add_metric(labels, worker.get("dbErrorsPerMinute", 0))
        dlq.add_metric(labels, worker.get("dlqPerMinute", 0))
        for op, key in (("push", "pushRequestsPerMinute"), ("pop", "popRequestsPerMinute"),
                        ("ack", "ackRequestsPerMinute"), ("transaction", "transactionsPerMinute")):
            requests.add_metric(labels + [op], worker.get(key, 0))
        for op, key in (("push", "pushMessagesPerMinute"), ("pop", "popMessagesPerMinute"),
                        ("ack", "ackMessagesPerMinute")):
            messages.add_metric(labels + [op], worker.get(key, 0))
        acks.add_metric(labels + ["success"], worker.get("ackSuccessPerMinute", 0))
        acks.add_metric(labels + ["failed"], worker.get("ackFailedPerMinute", 0))
    yield from (loop_lag, pop_lag, connections, age, errors, dlq, requests, messages, acks)


def _gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, text, value=value)


def _buckets(histogram: Histogram) -> List[Tuple[str, float]]:
    return [("+Inf" if bound == float("inf") else repr(float(bound)), float(count))
            for bound, count in histogram.cumulative()]
