"""Timers through a PostgreSQL outage, on a PostgreSQL of the test's own that is stopped under
a running server: a schedule answers 503 in the WIRE2 1.2 envelope with Retry-After, the
sweeper logs the outage instead of a traceback per sweep and keeps its schedule, and once
PostgreSQL is back the timers that fell due meanwhile fire, each once, under their ids.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg2
import pytest

from queen_tw.config import Config
from queen_tw.db.embedded import EmbeddedPostgres

from faultkit import private_postgres
from support import ServerProcess, running_server, unique_name, wait_until


@pytest.fixture(scope="module")
def postgres() -> Iterator[EmbeddedPostgres]:
    with private_postgres() as server:
        yield server


@pytest.fixture
def server(postgres: EmbeddedPostgres) -> Iterator[ServerProcess]:
    with running_server(postgres.pg_env(), prefix="queen-tw-timers-outage-") as process:
        yield process


def schedule_body(queue: str, key: str, delay_ms: int) -> dict[str, Any]:
    return {"operations": [{
        "op": "schedule", "queue": queue, "timerKey": key, "delayMs": delay_ms,
        "txn": f"txn-{key}", "payload": base64.b64encode(json.dumps({"k": key}).encode())
        .decode()}]}


def fired(postgres: EmbeddedPostgres, queue: str) -> list[tuple]:
    connection = psycopg2.connect(Config.from_sources(postgres.pg_env(), {}).dsn)
    try:
        with connection, connection.cursor() as cursor:
            cursor.execute("SELECT m.id::text, m.transaction_id FROM queen.messages m"
                           "  JOIN queen.partitions p ON p.id = m.partition_id"
                           "  JOIN queen.queues q ON q.id = p.queue_id WHERE q.name = %s",
                           (queue,))
            return cursor.fetchall()
    finally:
        connection.close()


def test_timers_due_during_an_outage_fire_once_when_postgres_is_back(postgres, server):
    queue = unique_name()
    with httpx.Client(base_url=server.url, timeout=40) as client:
        warm_up = client.post("/api/v1/timers", json=schedule_body(queue, "warm-up", 0))
        assert warm_up.status_code == 200, warm_up.text
        wait_until(lambda: fired(postgres, queue), 30, message="a first sweep")
        answer = client.post("/api/v1/timers", json=schedule_body(queue, "before", 1500))
        assert answer.status_code == 200, answer.text
        promised = answer.json()["results"][0]["messageId"]
        postgres.stop()
        try:
            refused = client.post("/api/v1/timers", json=schedule_body(queue, "during", 0))
            assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
            assert refused.json()["error"] == "timers_unavailable"
            assert set(refused.json()) == {"error", "reason", "detail"}
            wait_until(lambda: "timer sweeper failing" in server.log_text(), 30,
                       message="the sweeper's outage line")
        finally:
            postgres.start()
        wait_until(lambda: len(fired(postgres, queue)) == 2, 60,
                   message="the timer due during the outage")
        assert (promised, "txn-before") in fired(postgres, queue)
    wait_until(lambda: "timer sweeper working again" in server.log_text(), 30,
               message="the sweeper's line when PostgreSQL is back")
    assert "Traceback" not in server.log_text(), server.log_tail(60)
