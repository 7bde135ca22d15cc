"""A timer scheduled on an instance wakes that instance's sweeper when it is due before the
sweeper's next wake-up (WIRE2.md 3.4), whether it came through ``POST /api/v1/timers`` or the
``timers`` rider of ``POST /api/v1/transaction``.

The server sweeps every 10 minutes at most and runs on a database of its own (no other
instance's sweeper can fire these timers), so a timer fired within the test's 30 s ceiling
was fired because its schedule woke the sweeper.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from scratch_databases import scratch_database, server_env
from tests.support import running_server, unique_name, wait_until


@pytest.fixture(scope="module")
def slow_sweeper(pg_env: dict[str, str], pg_dsn: str) -> Iterator[httpx.Client]:
    with scratch_database(pg_dsn) as dsn, running_server(
            server_env(pg_env, dsn), prefix="queen-tw-timers-wakeup-",
            QUEEN_TIMERS_SWEEP_INTERVAL_MS="600000") as server, \
            httpx.Client(base_url=server.url, timeout=40) as client:
        yield client


def op(queue: str, key: str, delay_ms: int) -> dict[str, Any]:
    return {"op": "schedule", "queue": queue, "timerKey": key, "delayMs": delay_ms,
            "txn": f"txn-{key}", "payload": base64.b64encode(json.dumps({"k": key}).encode())
            .decode()}


def fired(client: httpx.Client, queue: str) -> Any:
    answer = client.get(f"/api/v1/pop/queue/{queue}", params={"autoAck": "true"})
    return answer.json()["messages"][0] if answer.status_code == 200 else None


def test_a_scheduled_timer_wakes_the_sleeping_sweeper(slow_sweeper):
    queue = unique_name()
    answer = slow_sweeper.post("/api/v1/timers", json={"operations": [op(queue, "a", 300)]})
    assert answer.status_code == 200, answer.text
    message = wait_until(lambda: fired(slow_sweeper, queue), 30, message="the fire")
    assert message["id"] == answer.json()["results"][0]["messageId"]


def test_a_timer_of_a_transaction_rider_wakes_the_sleeping_sweeper(slow_sweeper):
    queue = unique_name()
    answer = slow_sweeper.post("/api/v1/transaction", json={
        "operations": [], "timers": [op(queue, "b", 300)]})
    assert answer.status_code == 200 and answer.json()["success"] is True, answer.text
    message = wait_until(lambda: fired(slow_sweeper, queue), 30, message="the fire")
    assert message["transactionId"] == "txn-b"
