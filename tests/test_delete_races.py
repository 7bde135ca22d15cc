"""Requests that meet a delete still under way: a queue deleted (its partitions, cursors and
messages already gone, not yet committed) or one message deleted, while an ack, a seek, a
trace, a dead-letter move or a retry names them. Each request waits for the delete and then
finds nothing (404, or "Message not found" in its result); none answers 500, and none brings
the deleted queue back. Real server and PostgreSQL; a statement trigger makes the deletion of
the test's messages take a while, so the second request lands inside it."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.support import unique_name, wait_until


@pytest.fixture
def slow_prefix(http: httpx.Client, db: Any) -> Iterator[str]:
    """A transactionId prefix: while the test runs, a statement that deletes a message whose
    id starts with it sleeps two seconds after the rows are gone (uncommitted)."""
    prefix = f"slowdel-{uuid.uuid4().hex[:8]}-"
    with db.cursor() as cursor:
        cursor.execute(f"""
            CREATE FUNCTION queen.test_slow_delete() RETURNS trigger
            LANGUAGE plpgsql AS $$
            BEGIN
                IF EXISTS (SELECT 1 FROM gone WHERE transaction_id LIKE '{prefix}%') THEN
                    PERFORM pg_sleep(2);
                END IF;
                RETURN NULL;
            END $$;
            CREATE TRIGGER test_slow_delete AFTER DELETE ON queen.messages
                REFERENCING OLD TABLE AS gone FOR EACH STATEMENT
                EXECUTE FUNCTION queen.test_slow_delete();""")
    try:
        yield prefix
    finally:
        with db.cursor() as cursor:
            cursor.execute("DROP TRIGGER test_slow_delete ON queen.messages;"
                           "DROP FUNCTION queen.test_slow_delete()")


def leased(http: httpx.Client, queue: str, transaction_id: str) -> dict[str, Any]:
    """Pushes one message and pops it (under a lease)."""
    http.post("/api/v1/push", json={"items": [
        {"queue": queue, "partition": "p", "payload": 1,
         "transactionId": transaction_id}]}).raise_for_status()
    answer = http.get(f"/api/v1/pop/queue/{queue}", params={"wait": "false"})
    return answer.json()["messages"][0]


def during(db: Any, delete: Callable[[], httpx.Response],
           request: Callable[[], httpx.Response]) -> tuple[httpx.Response, httpx.Response]:
    """Sends ``delete``, waits until PostgreSQL is inside it, sends ``request``."""
    def deleting() -> bool:
        with db.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'"
                           " AND pid <> pg_backend_pid()")
            return bool(cursor.fetchone()[0])

    with ThreadPoolExecutor(2) as pool:
        deleted = pool.submit(delete)
        wait_until(deleting, message="the delete inside PostgreSQL")
        answered = pool.submit(request)
        return deleted.result(), answered.result()


def queue_exists(db: Any, queue: str) -> bool:
    with db.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM queen.queues WHERE name = %s", (queue,))
        return bool(cursor.fetchone()[0])


def delete_queue(http: httpx.Client, queue: str) -> Callable[[], httpx.Response]:
    return lambda: http.delete(f"/api/v1/resources/queues/{queue}")


def delete_message(http: httpx.Client, message: dict[str, Any]) -> Callable[[], httpx.Response]:
    return lambda: http.delete(
        f"/api/v1/messages/{message['partitionId']}/{message['transactionId']}")


@pytest.mark.parametrize("status", ["completed", "failed", "dlq"])
def test_an_ack_meeting_its_queue_delete_finds_no_message(
        http: httpx.Client, db: Any, slow_prefix: str, status: str) -> None:
    queue = unique_name()
    message = leased(http, queue, f"{slow_prefix}a")
    ack = {"transactionId": message["transactionId"], "partitionId": message["partitionId"],
           "leaseId": message["leaseId"], "status": status}

    deleted, acked = during(db, delete_queue(http, queue),
                            lambda: http.post("/api/v1/ack", json=ack))
    assert deleted.status_code == 200, deleted.text
    assert acked.status_code == 200, acked.text
    [result] = acked.json()
    assert result["success"] is False and result["error"] == "Message not found", result
    assert not queue_exists(db, queue)


def test_a_dlq_ack_meeting_the_delete_of_its_message_finds_no_message(
        http: httpx.Client, db: Any, slow_prefix: str) -> None:
    queue = unique_name()
    message = leased(http, queue, f"{slow_prefix}a")
    ack = {"transactionId": message["transactionId"], "partitionId": message["partitionId"],
           "leaseId": message["leaseId"], "status": "dlq"}

    deleted, acked = during(db, delete_message(http, message),
                            lambda: http.post("/api/v1/ack", json=ack))
    assert deleted.status_code == 200, deleted.text
    assert acked.status_code == 200, acked.text
    [result] = acked.json()
    assert result["success"] is False and result["error"] == "Message not found", result
    with db.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM queen.dead_letter_queue WHERE partition_id = %s",
                       (message["partitionId"],))
        assert cursor.fetchone()[0] == 0


SEEKS = {
    "partition": lambda http, queue: http.post(
        f"/api/v1/consumer-groups/g/queues/{queue}/partitions/p/seek"),
    "queue to a time": lambda http, queue: http.post(
        f"/api/v1/consumer-groups/g/queues/{queue}/seek",
        json={"timestamp": "2000-01-01T00:00:00Z"}),
}


@pytest.mark.parametrize("seek", SEEKS)
def test_a_seek_meeting_its_queue_delete_is_404(
        http: httpx.Client, db: Any, slow_prefix: str, seek: str) -> None:
    queue = unique_name()
    leased(http, queue, f"{slow_prefix}a")
    deleted, sought = during(db, delete_queue(http, queue), lambda: SEEKS[seek](http, queue))
    assert deleted.status_code == 200, deleted.text
    assert sought.status_code == 404, sought.text
    assert not queue_exists(db, queue)


def test_a_trace_meeting_its_queue_delete_is_404(
        http: httpx.Client, db: Any, slow_prefix: str) -> None:
    queue = unique_name()
    message = leased(http, queue, f"{slow_prefix}a")
    trace = {"transactionId": message["transactionId"], "partitionId": message["partitionId"],
             "data": {"step": 1}}

    deleted, traced = during(db, delete_queue(http, queue),
                             lambda: http.post("/api/v1/traces", json=trace))
    assert deleted.status_code == 200, deleted.text
    assert traced.status_code == 404, traced.text


def test_a_dead_letter_move_meeting_the_delete_of_its_message_is_404(
        http: httpx.Client, db: Any, slow_prefix: str) -> None:
    queue = unique_name()
    message = leased(http, queue, f"{slow_prefix}a")
    path = f"/api/v1/messages/{message['partitionId']}/{message['transactionId']}/dlq"

    deleted, moved = during(db, delete_message(http, message),
                            lambda: http.post(path, json={"consumerGroup": "ops"}))
    assert deleted.status_code == 200, deleted.text
    assert moved.status_code == 404, moved.text


def test_a_retry_meeting_its_queue_delete_is_404_and_does_not_revive_the_queue(
        http: httpx.Client, db: Any, slow_prefix: str) -> None:
    queue = unique_name()
    message = leased(http, queue, f"{slow_prefix}a")
    path = f"/api/v1/messages/{message['partitionId']}/{message['transactionId']}/retry"

    deleted, retried = during(db, delete_queue(http, queue), lambda: http.post(path))
    assert deleted.status_code == 200, deleted.text
    assert retried.status_code == 404, retried.text
    assert not queue_exists(db, queue)
