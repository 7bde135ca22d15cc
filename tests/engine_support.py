"""A QueueEngine running inside the test process on the session's real PostgreSQL.

For tests that must look inside the server while the database stays real: how many calls a
Batcher made, whether a long-poll pop is parked right now. The engine runs on the reactor
pytest-twisted drives, so only ``@pytest_twisted.ensureDeferred`` tests can use it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import pytest_twisted
from twisted.internet import defer, reactor

from queen_tw.config import Config
from queen_tw.db.pool import Database
from queen_tw.db.schema import install_schema
from queen_tw.engine.batcher import BatchLimits
from queen_tw.engine.queue_engine import EngineLimits, PollTiming, QueueEngine
from queen_tw.engine.waiters import WaiterRegistry
from queen_tw.paths import sql_dir

ONE_CALL_AT_A_TIME = EngineLimits(push=BatchLimits(max_concurrent=1, max_hold_ms=5),
                                  pop=BatchLimits(max_concurrent=1),
                                  ack=BatchLimits(max_concurrent=1),
                                  transaction=BatchLimits(max_concurrent=1, max_batch_size=10),
                                  renew_lease=BatchLimits(max_concurrent=1))
"""Every Batcher with one slot: concurrent requests are fused, so tests can count calls."""


@contextmanager
def in_process_engine(pg_env: Mapping[str, str], waiters: WaiterRegistry,
                      poll_timing: PollTiming | None = None,
                      limits: EngineLimits = ONE_CALL_AT_A_TIME,
                      worker_id: str = "in-process-test") -> Iterator[QueueEngine]:
    """An engine on its own 4-connection pool; ``waiters`` is the registry it wakes."""
    config = Config.from_sources(dict(pg_env), {})
    install_schema(config.dsn, sql_dir())
    db = Database(config.dsn, 4, reactor)
    pytest_twisted.blockon(defer.ensureDeferred(db.connect()))
    try:
        yield QueueEngine(db, waiters, reactor, None, worker_id, poll_timing or PollTiming(),
                          limits)
    finally:
        db.close()
