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

from tests.pg_faults import Trigger, asleep
from tests.support import unique_name, wait_until


@pytest.fixture
def slow_prefix(http: httpx.Client, db: Any) -> Iterator[str]:
    """A transactionId prefix: while the test runs, a statement that deletes a message whose
    id starts with it sleeps two seconds after the rows are gone (uncommitted)."""
    prefix = f"slowdel-{uuid.uuid4().hex[:8]}-"
    with Trigger(db, "queen.messages", "AFTER DELETE", f"""
            IF EXISTS (SELECT 1 FROM gone WHERE transaction_id LIKE '{prefix}%') THEN
                PERFORM pg_sleep(2);
            END IF;""", for_each_statement=True):
        yield prefix


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
    with ThreadPoolExecutor(2) as pool:
        deleted = pool.submit(delete)
        wait_until(lambda: asleep(db), message="the delete inside PostgreSQL")
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


@pytest.mark.parametrize("status,deleted", [
    ("completed", "queue"), ("failed", "queue"), ("dlq", "queue"), ("dlq", "message")])
def test_an_ack_meeting_a_delete_finds_no_message_and_keeps_no_dead_letter(
        http: httpx.Client, db: Any, slow_prefix: str, status: str, deleted: str) -> None:
    queue = unique_name()
    message = leased(http, queue, f"{slow_prefix}a")
    ack = {"transactionId": message["transactionId"], "partitionId": message["partitionId"],
           "leaseId": message["leaseId"], "status": status}
    delete = delete_queue(http, queue) if deleted == "queue" else delete_message(http, message)

    gone, acked = during(db, delete, lambda: http.post("/api/v1/ack", json=ack))
    assert gone.status_code == 200, gone.text
    assert acked.status_code == 200, acked.text
    [result] = acked.json()
    assert result["success"] is False and result["error"] == "Message not found", result
    assert queue_exists(db, queue) is (deleted == "message")
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


def trace(http: httpx.Client, message: dict[str, Any]) -> httpx.Response:
    return http.post("/api/v1/traces", json={
        "transactionId": message["transactionId"], "partitionId": message["partitionId"],
        "data": {"step": 1}})


def move_to_dead_letters(http: httpx.Client, message: dict[str, Any]) -> httpx.Response:
    return http.post(f"/api/v1/messages/{message['partitionId']}/{message['transactionId']}"
                     "/dlq", json={"consumerGroup": "ops"})


def retry(http: httpx.Client, message: dict[str, Any]) -> httpx.Response:
    return http.post(
        f"/api/v1/messages/{message['partitionId']}/{message['transactionId']}/retry")


MESSAGE_ROUTES = {  # what is deleted meanwhile, and the request that names it
    "trace, queue deleted": (delete_queue, trace),
    "dead-letter move, message deleted": (delete_message, move_to_dead_letters),
    "retry, queue deleted": (delete_queue, retry),
}


@pytest.mark.parametrize("case", MESSAGE_ROUTES)
def test_a_message_route_meeting_a_delete_is_404_and_revives_nothing(
        http: httpx.Client, db: Any, slow_prefix: str, case: str) -> None:
    """(A retry used to answer 200 and bring the deleted queue back with its copy.)"""
    delete, request = MESSAGE_ROUTES[case]
    queue = unique_name()
    message = leased(http, queue, f"{slow_prefix}a")
    target = queue if delete is delete_queue else message

    deleted, answered = during(db, delete(http, target), lambda: request(http, message))
    assert deleted.status_code == 200, deleted.text
    assert answered.status_code == 404, answered.text
    assert queue_exists(db, queue) is (delete is delete_message)


@pytest.mark.parametrize("group", [None, "ns-group"])
def test_a_namespace_pop_meeting_a_queue_delete_gets_the_other_queues_message(
        http: httpx.Client, db: Any, slow_prefix: str, group: str | None) -> None:
    """The group's first contact recorded a subscription to the queue being deleted: a
    foreign-key failure that failed the whole pop (204, and a traceback logged critical),
    whatever the namespace's other queues held."""
    namespace = unique_name("ns-")
    doomed, other = unique_name(), unique_name()
    for queue in (doomed, other):
        assert http.post("/api/v1/configure", json={
            "queue": queue, "namespace": namespace, "options": {}}).status_code == 200
    http.post("/api/v1/push", json={"items": [
        {"queue": doomed, "payload": 1, "transactionId": f"{slow_prefix}a"},
        {"queue": other, "payload": "keep", "transactionId": "keep"}]}).raise_for_status()
    group_params = {"consumerGroup": group} if group else {}

    deleted, popped = during(db, delete_queue(http, doomed), lambda: http.get(
        "/api/v1/pop", params={"namespace": namespace, "wait": "false", **group_params}))

    assert deleted.status_code == 200, deleted.text
    assert popped.status_code == 200, (popped.status_code, popped.text)
    assert [m["transactionId"] for m in popped.json()["messages"]] == ["keep"]
    assert not queue_exists(db, doomed)
