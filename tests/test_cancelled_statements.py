"""A statement PostgreSQL cancels is no outage: one that waited past DB_LOCK_TIMEOUT (a row
it needs is held by another transaction) or ran past DB_STATEMENT_TIMEOUT. The request answers
503 naming the cancellation (a push goes to the file buffer and is delivered in order later),
the pool keeps its connections, and transactions answer 503 rather than a verdict. Real
server, real PostgreSQL; the "other transaction" is this test's own connection holding a row
lock, the slow statement a trigger that sleeps."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.pg_faults import Trigger
from tests.support import ServerProcess, unique_name, wait_until

LOCK_TIMEOUT_MS = "400"
STATEMENT_TIMEOUT_MS = "1500"


@pytest.fixture
def server(make_server: Any) -> ServerProcess:
    """A server of its own: its connections are told apart by their application_name."""
    return make_server(DB_LOCK_TIMEOUT=LOCK_TIMEOUT_MS, DB_STATEMENT_TIMEOUT=STATEMENT_TIMEOUT_MS,
                       WORKER_ID=f"lock-timeouts-{uuid.uuid4().hex[:8]}")


def backends(db: Any, worker_id: str) -> set[int]:
    with db.cursor() as cursor:
        cursor.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s",
                       (worker_id,))
        return {row[0] for row in cursor.fetchall()}


def leased(url: str, queue: str) -> dict[str, Any]:
    httpx.post(f"{url}/api/v1/push", json={"items": [
        {"queue": queue, "partition": "p", "payload": "in"}]}).raise_for_status()
    answer = httpx.get(f"{url}/api/v1/pop/queue/{queue}", params={"wait": "false"})
    return answer.json()["messages"][0]


def hold_consumer_row(holder: Any, message: dict[str, Any]) -> None:
    with holder.cursor() as cursor:
        cursor.execute("SELECT 1 FROM queen.partition_consumers WHERE partition_id = %s"
                       " FOR UPDATE", (message["partitionId"],))


def worker_id(server: ServerProcess) -> str:
    return server.env["WORKER_ID"]


def test_an_ack_waiting_past_lock_timeout_is_a_503_and_keeps_the_connections(
        server: ServerProcess, db: Any, holder: Any) -> None:
    message = leased(server.url, unique_name())
    pool = backends(db, worker_id(server))
    assert pool, "the server's connections are visible by application_name"
    hold_consumer_row(holder, message)
    ack = {"transactionId": message["transactionId"], "partitionId": message["partitionId"],
           "leaseId": message["leaseId"], "status": "completed"}

    answer = httpx.post(f"{server.url}/api/v1/ack", json=ack, timeout=30)
    assert answer.status_code == 503, answer.text
    assert "lock timeout" in answer.json()["error"]
    assert answer.headers["Retry-After"] == "1"
    assert backends(db, worker_id(server)) == pool  # no connection was dropped
    log = server.log_path.read_text()
    assert "PostgreSQL statements failing: ack_core: canceling statement due to lock timeout" in log
    assert "] PostgreSQL failing" not in log  # not taken for an outage

    holder.rollback()  # the other transaction is over: the client's retry goes through
    retried = httpx.post(f"{server.url}/api/v1/ack", json=ack, timeout=30)
    assert retried.status_code == 200, retried.text
    [result] = retried.json()
    assert result["success"] is True and result["leaseReleased"] is True, retried.text


def test_a_transaction_waiting_past_lock_timeout_is_a_503_with_nothing_applied(
        server: ServerProcess, db: Any, holder: Any) -> None:
    source, target = unique_name(), unique_name()
    message = leased(server.url, source)
    hold_consumer_row(holder, message)
    bundle = {"operations": [
        {"type": "push", "items": [{"queue": target, "partition": "p", "payload": "out"}]},
        {"type": "ack", "transactionId": message["transactionId"],
         "partitionId": message["partitionId"], "leaseId": message["leaseId"]}]}

    answer = httpx.post(f"{server.url}/api/v1/transaction", json=bundle, timeout=30)
    assert answer.status_code == 503, answer.text  # was 200 {success: false}: no verdict
    assert "lock timeout" in answer.json()["error"]
    with db.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM queen.messages m"
                       "  JOIN queen.partitions p ON p.id = m.partition_id"
                       "  JOIN queen.queues q ON q.id = p.queue_id WHERE q.name = %s",
                       (target,))
        assert cursor.fetchone()[0] == 0

    holder.rollback()
    retried = httpx.post(f"{server.url}/api/v1/transaction", json=bundle, timeout=30)
    assert retried.status_code == 200, retried.text
    assert retried.json()["success"] is True, retried.text


def test_a_push_waiting_past_lock_timeout_is_buffered_and_delivered_in_order(
        server: ServerProcess, db: Any, holder: Any) -> None:
    queue = unique_name()
    url = server.url
    pool = backends(db, worker_id(server))

    def push(n: int) -> dict[str, Any]:
        answer = httpx.post(f"{url}/api/v1/push", timeout=30, json={"items": [
            {"queue": queue, "partition": "p", "payload": n}]})
        assert answer.status_code == 201, answer.text
        return answer.json()[0]

    assert push(0)["status"] == "queued"
    with holder.cursor() as cursor:
        cursor.execute("SELECT 1 FROM queen.partitions p JOIN queen.queues q"
                       " ON q.id = p.queue_id WHERE q.name = %s FOR UPDATE OF p", (queue,))
    assert [push(n)["status"] for n in (1, 2)] == ["buffered", "buffered"]
    assert backends(db, worker_id(server)) == pool
    assert "] PostgreSQL failing" not in server.log_path.read_text()  # no outage

    holder.rollback()

    def buffer_drained() -> bool:
        maintenance = httpx.get(f"{url}/api/v1/system/maintenance").json()
        return maintenance["bufferedMessages"] == 0

    wait_until(buffer_drained, message="the buffered pushes replayed")
    answer = httpx.get(f"{url}/api/v1/pop/queue/{queue}", params={"wait": "false", "batch": 10})
    assert [m["data"] for m in answer.json()["messages"]] == [0, 1, 2]


@pytest.fixture
def slow_insert(server: ServerProcess, db: Any) -> Iterator[tuple[str, Trigger]]:
    """A transactionId whose message takes longer than DB_STATEMENT_TIMEOUT to store, until
    the test drops the trigger (the server above installed the schema it goes on)."""
    transaction_id = f"slow-{uuid.uuid4().hex[:8]}"
    with Trigger(db, "queen.messages", "BEFORE INSERT", f"""
            IF NEW.transaction_id = '{transaction_id}' THEN
                PERFORM pg_sleep(3);
            END IF;""") as installed:
        yield transaction_id, installed


def test_a_push_cancelled_by_statement_timeout_is_buffered_not_a_500(
        server: ServerProcess, db: Any, slow_insert: tuple[str, Trigger]) -> None:
    """txpostgres reports a statement_timeout as a bare CancelledError, which reached the
    client as a 500: the push is now buffered like any push PostgreSQL could not take."""
    slow_transaction_id, slowness = slow_insert
    queue = unique_name()
    url = server.url
    pool = backends(db, worker_id(server))
    answer = httpx.post(f"{url}/api/v1/push", timeout=30, json={"items": [
        {"queue": queue, "partition": "p", "payload": "slow",
         "transactionId": slow_transaction_id}]})
    assert answer.status_code == 201, answer.text
    assert answer.json()[0]["status"] == "buffered"
    assert backends(db, worker_id(server)) == pool
    log = server.log_path.read_text()
    assert "PostgreSQL statements failing: push_store: canceling statement" in log
    assert "] PostgreSQL failing" not in log

    slowness.drop()  # PostgreSQL is quick again: the buffer delivers the push once

    def buffer_drained() -> bool:
        maintenance = httpx.get(f"{url}/api/v1/system/maintenance").json()
        return maintenance["bufferedMessages"] == 0

    wait_until(buffer_drained, message="the buffered push replayed")
    popped = httpx.get(f"{url}/api/v1/pop/queue/{queue}", params={"wait": "false"}).json()
    assert [(m["transactionId"], m["data"]) for m in popped["messages"]] == [
        (slow_transaction_id, "slow")]
