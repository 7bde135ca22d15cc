"""Timers on a cluster (WIRE2.md 3.4): three real ``twistd queen`` instances on a PostgreSQL
of their own (no other server's sweeper takes part), each running its sweeper, synced over UDP.

- Thousands of timers scheduled through all three; one instance SIGKILLed while PostgreSQL
  shows it inside a sweep: every timer fires exactly once, as the message id and
  transactionId promised at schedule time, and none is lost.
- A fired timer wakes a long-poll parked on another instance as a push does (the fallback
  re-check is 10 minutes: only a local wake-up or a peer's datagram can answer it in time).
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List

import psycopg2
import pytest

from queen_tw.config import Config

from faultkit import private_postgres
from tests.cluster_support import SLOW_FALLBACK_MS, Cluster, ClusterNode, db_now, wait_parked
from tests.support import unique_name, wait_until

TIMERS = 3000
PARTITIONS = 12
SWEEP = {"QUEEN_TIMERS_SWEEP_BATCH": "100", "QUEEN_TIMERS_SWEEP_INTERVAL_MS": "1000",
         "POP_WAIT_INITIAL_INTERVAL_MS": SLOW_FALLBACK_MS,
         "POP_WAIT_MAX_INTERVAL_MS": SLOW_FALLBACK_MS}
PARKED_ON = "b"
"""The instance the wake-up test parks its long poll on. It sweeps only when a timer
scheduled on it comes due (see ``QUIET`` in cluster_support: a sweep every second would
hide the parked pop's attempt from ``wait_parked``); a and c sweep every second, so the
kill test still has a sweeper that looks on its own after the kill."""


@pytest.fixture(scope="module")
def pg_env() -> Iterator[dict[str, str]]:
    with private_postgres() as postgres:
        yield postgres.pg_env()


@pytest.fixture
def db(pg_env: dict[str, str]) -> Iterator[Any]:
    connection = psycopg2.connect(Config.from_sources(pg_env, {}).dsn)
    connection.autocommit = True
    try:
        yield connection
    finally:
        connection.close()


@pytest.fixture(scope="module")
def cluster(pg_env: dict[str, str]) -> Iterator[Cluster]:
    nodes = Cluster(pg_env, SWEEP, node_env={
        PARKED_ON: {"QUEEN_TIMERS_SWEEP_INTERVAL_MS": SLOW_FALLBACK_MS}})
    try:
        nodes.start()
        nodes.wait_all_alive()
        yield nodes
    finally:
        nodes.stop()


def schedule(node: ClusterNode, queue: str, keys: List[int], delay_ms: int
             ) -> List[Dict[str, Any]]:
    ops = [{"op": "schedule", "queue": queue, "timerKey": f"t{key:05d}",
            "partition": f"p{key % PARTITIONS}", "txn": f"txn-{key}", "delayMs": delay_ms,
            "payload": base64.b64encode(json.dumps({"key": key}).encode()).decode()}
           for key in keys]
    answer = node.post("/api/v1/timers", {"operations": ops})
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert {r["status"] for r in results} == {"scheduled"}, results[:3]
    return results


def sweeping(db: Any, node: ClusterNode) -> bool:
    """Whether ``node`` is inside a sweep right now (its connection runs timers_sweep)."""
    with db.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
                       " AND state <> 'idle' AND query ILIKE '%%timers_sweep%%'",
                       (node.worker_id,))
        return bool(cursor.fetchone()[0])


def fired(db: Any, queue: str) -> List[tuple]:
    with db.cursor() as cursor:
        cursor.execute(
            "SELECT m.id::text, m.transaction_id, m.payload->>'key', p.name"
            "  FROM queen.messages m JOIN queen.partitions p ON p.id = m.partition_id"
            "  JOIN queen.queues q ON q.id = p.queue_id WHERE q.name = %s", (queue,))
        return cursor.fetchall()


def pending(db: Any, queue: str) -> int:
    with db.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM queen.timers WHERE queue = %s", (queue,))
        return int(cursor.fetchone()[0])


def test_a_fired_timer_wakes_a_long_poll_parked_on_another_instance(cluster, db):
    queue = unique_name()
    parked_on = cluster[PARKED_ON]
    since = db_now(db)
    with ThreadPoolExecutor(1) as long_polls:
        parked = long_polls.submit(parked_on.get, f"/api/v1/pop/queue/{queue}", wait="true",
                                   timeout=25_000)
        wait_parked(db, parked_on, since, [queue], parked)  # it looked, found nothing, and waits
        [result] = schedule(cluster["a"], queue, [1], 300)
        answer = parked.result(40)
    assert answer.status_code == 200, answer.text
    assert answer.json()["messages"][0]["id"] == result["messageId"]


def test_every_timer_fires_exactly_once_when_a_sweeper_is_killed_mid_sweep(cluster, db):
    queue = unique_name()
    nodes = list(cluster.nodes.values())
    promised: Dict[str, Dict[str, Any]] = {}
    chunk = 250
    for start in range(0, TIMERS, chunk):  # all due together: every sweeper has work
        node = nodes[(start // chunk) % len(nodes)]
        for result in schedule(node, queue, list(range(start, start + chunk)), 1500):
            promised[result["txn"]] = result
    victim = cluster["a"]
    # killed inside a sweep, once some timers have fired (so sweeps were committing)
    wait_until(lambda: pending(db, queue) < TIMERS and sweeping(db, victim), 30,
               interval=0.002, message="instance a inside a sweep after the first fires")
    victim.kill()
    assert pending(db, queue) > 0, "everything had fired before the kill: nothing was tested"

    wait_until(lambda: pending(db, queue) == 0, 60, message="every timer fired")
    rows = fired(db, queue)
    by_txn = Counter(txn for _, txn, _, _ in rows)
    assert len(rows) == TIMERS, f"{len(rows)} messages for {TIMERS} timers"
    assert set(by_txn) == set(promised) and max(by_txn.values()) == 1
    for message_id, txn, key, partition in rows:
        assert message_id == promised[txn]["messageId"], txn
        assert txn == f"txn-{key}" and partition == f"p{int(key) % PARTITIONS}"
    with db.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM queen.timer_dead_letters WHERE queue = %s",
                       (queue,))
        assert cursor.fetchone()[0] == 0
