"""Background work racing requests, on a real server and PostgreSQL.

- Retention's cleanup of idle empty partitions: a request that lists the queue's partitions
  (a group's first pop, a subscription change, a seek to a time, a group reset) can still see
  one being deleted; writing a row for it then failed on the foreign key: 500 for the admin
  routes, an empty answer for the pop although other partitions held messages. A statement
  trigger makes the cleanup's delete take a while, so the request lands inside it.
- Eviction (maxWaitTimeSeconds) and retention leave a message out on a live lease alone until
  the lease ends: deleted under it, its ack found nothing and the lease held the partition
  until it expired.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.http_helpers import configure
from tests.pg_faults import Trigger, asleep
from tests.support import ServerProcess, unique_name, wait_until

IDLE_PREFIX = "idle-"


@pytest.fixture
def cleaning_server(make_server: Any, db: Any) -> Iterator[ServerProcess]:
    """A server whose retention runs every 0.3 s and drops partitions idle for a day; its
    delete of partitions named ``idle-…`` sleeps three seconds after the rows are gone."""
    server = make_server(RETENTION_INTERVAL="300", PARTITION_CLEANUP_DAYS="1")
    with Trigger(db, "queen.partitions", "AFTER DELETE", f"""
            IF EXISTS (SELECT 1 FROM gone WHERE name LIKE '{IDLE_PREFIX}%') THEN
                PERFORM pg_sleep(3);
            END IF;""", for_each_statement=True):
        yield server


def queue_with_a_message(http: httpx.Client) -> str:
    """A queue whose partition ``live`` holds one message."""
    queue = unique_name()
    http.post("/api/v1/push", json={"items": [
        {"queue": queue, "partition": "live", "payload": "live"}]}).raise_for_status()
    return queue


def add_idle_partition(http: httpx.Client, db: Any, queue: str) -> str:
    """An ``idle-…`` partition of ``queue``, empty (its one message deleted); its id."""
    idle = f"{IDLE_PREFIX}{uuid.uuid4().hex[:6]}"
    http.post("/api/v1/push", json={"items": [
        {"queue": queue, "partition": idle, "payload": "gone", "transactionId": "old"},
    ]}).raise_for_status()
    with db.cursor() as cursor:
        cursor.execute("SELECT p.id FROM queen.partitions p JOIN queen.queues q"
                       " ON q.id = p.queue_id WHERE q.name = %s AND p.name = %s", (queue, idle))
        [(partition_id,)] = cursor.fetchall()
    http.delete(f"/api/v1/messages/{partition_id}/old").raise_for_status()
    return partition_id


def during_cleanup(db: Any, partition_id: str,
                   request: Callable[[], httpx.Response]) -> httpx.Response:
    """Ages the partition, waits until the cleanup is inside its delete, sends ``request``."""
    with db.cursor() as cursor:
        cursor.execute("UPDATE queen.partitions SET last_activity = now() - interval '2 days'"
                       " WHERE id = %s", (partition_id,))

    wait_until(lambda: asleep(db, "%cleanup_partitions%"),
               message="the partition cleanup inside PostgreSQL")
    answer = request()
    with db.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM queen.partitions WHERE id = %s", (partition_id,))
        assert cursor.fetchone()[0] == 0, "the cleanup went through"
    return answer


def test_a_first_pop_during_a_partition_cleanup_gets_the_other_partitions_message(
        cleaning_server: ServerProcess, db: Any) -> None:
    http = httpx.Client(base_url=cleaning_server.url, timeout=30)
    queue = queue_with_a_message(http)
    idle = add_idle_partition(http, db, queue)
    popped = during_cleanup(db, idle, lambda: http.get(
        f"/api/v1/pop/queue/{queue}", params={"consumerGroup": "new", "wait": "false"}))
    assert popped.status_code == 200, popped.text
    assert [m["data"] for m in popped.json()["messages"]] == ["live"]
    assert "ForeignKeyViolation" not in cleaning_server.log_path.read_text()


GROUP_ROUTES = {
    "subscription": lambda http, group, queue: http.post(
        f"/api/v1/consumer-groups/{group}/subscription",
        json={"subscriptionTimestamp": "2000-01-01T00:00:00Z"}),
    "seek to a time": lambda http, group, queue: http.post(
        f"/api/v1/consumer-groups/{group}/queues/{queue}/seek",
        json={"timestamp": "2000-01-01T00:00:00Z"}),
    "reset keeping the subscription": lambda http, group, queue: http.delete(
        f"/api/v1/consumer-groups/{group}/queues/{queue}", params={"deleteMetadata": "false"}),
}


@pytest.mark.parametrize("route", GROUP_ROUTES)
def test_a_consumer_group_change_during_a_partition_cleanup_is_not_a_500(
        cleaning_server: ServerProcess, db: Any, route: str) -> None:
    http = httpx.Client(base_url=cleaning_server.url, timeout=30)
    queue = queue_with_a_message(http)
    group = unique_name("g-")
    first = http.get(f"/api/v1/pop/queue/{queue}",
                     params={"consumerGroup": group, "wait": "false", "autoAck": "true"})
    assert [m["data"] for m in first.json()["messages"]] == ["live"]
    idle = add_idle_partition(http, db, queue)  # the group has no cursor there

    answer = during_cleanup(db, idle, lambda: GROUP_ROUTES[route](http, group, queue))
    assert answer.status_code == 200, answer.text
    if route != "subscription":  # (which moves only where the group has no cursor yet)
        again = http.get(f"/api/v1/pop/queue/{queue}",
                         params={"consumerGroup": group, "wait": "false"})
        assert [m["data"] for m in again.json()["messages"]] == ["live"]  # from the start


def test_eviction_leaves_a_leased_message_until_its_ack(make_server: Any, db: Any) -> None:
    server = make_server(EVICTION_INTERVAL="200")
    http = httpx.Client(base_url=server.url, timeout=30)
    queue = unique_name()
    configure(http, queue, maxWaitTimeSeconds=1, leaseTime=300)
    http.post("/api/v1/push", json={"items": [
        {"queue": queue, "partition": "leased", "payload": "in hand"},
        {"queue": queue, "partition": "waiting", "payload": "too old"}]}).raise_for_status()
    popped = http.get(f"/api/v1/pop/queue/{queue}/partition/leased", params={"wait": "false"})
    [message] = popped.json()["messages"]

    def evicted() -> bool:  # the unleased one waited past maxWaitTimeSeconds: gone
        with db.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM queen.messages m"
                           "  JOIN queen.partitions p ON p.id = m.partition_id"
                           "  JOIN queen.queues q ON q.id = p.queue_id"
                           " WHERE q.name = %s AND p.name = 'waiting'", (queue,))
            return cursor.fetchone()[0] == 0

    wait_until(evicted, message="the eviction of the unleased message")
    acked = http.post("/api/v1/ack", json={
        "transactionId": message["transactionId"], "partitionId": message["partitionId"],
        "leaseId": message["leaseId"], "status": "completed"})
    [result] = acked.json()
    assert result["success"] is True and result["leaseReleased"] is True, result
    http.post("/api/v1/push", json={"items": [
        {"queue": queue, "partition": "leased", "payload": "next"}]}).raise_for_status()
    following = http.get(f"/api/v1/pop/queue/{queue}/partition/leased", params={"wait": "false"})
    assert [m["data"] for m in following.json()["messages"]] == ["next"]


def test_the_leased_message_goes_once_its_lease_ends(make_server: Any, db: Any) -> None:
    """Left alone only while leased: acked (consumed by the only group) or not, an evictable
    message is evicted at the next turn after its lease is over."""
    server = make_server(EVICTION_INTERVAL="200")
    http = httpx.Client(base_url=server.url, timeout=30)
    queue = unique_name()
    configure(http, queue, maxWaitTimeSeconds=1, leaseTime=300)
    http.post("/api/v1/push", json={"items": [
        {"queue": queue, "partition": "p", "payload": 1}]}).raise_for_status()
    popped = http.get(f"/api/v1/pop/queue/{queue}", params={"wait": "false"})
    [message] = popped.json()["messages"]
    with db.cursor() as cursor:  # the lease runs out
        cursor.execute("UPDATE queen.partition_consumers SET lease_expires_at = now()"
                       " WHERE lease_id = %s", (message["leaseId"],))

    def gone() -> bool:
        with db.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM queen.messages WHERE id = %s",
                           (message["id"],))
            return cursor.fetchone()[0] == 0

    wait_until(gone, message="the eviction once the lease is over")


def test_leased_messages_first_in_line_do_not_hold_back_retention_elsewhere(
        http: httpx.Client, db: Any) -> None:
    """Leased messages are passed over when retention picks its batch: picked and then left
    alone, a lease covering a batch's worth of old messages kept every later cycle from
    deleting anything anywhere."""
    leased_queues = [unique_name() for _ in range(4)]
    other = unique_name()
    for queue in [*leased_queues, other]:
        configure(http, queue, retentionSeconds=1, leaseTime=300)
        http.post("/api/v1/push", json={"items": [{"queue": queue, "payload": n}
                                                  for n in range(2)]}).raise_for_status()
    for queue in leased_queues:
        popped = http.get(f"/api/v1/pop/queue/{queue}", params={"wait": "false", "batch": 2})
        assert len(popped.json()["messages"]) == 2

    def stored(queue: str) -> int:
        with db.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM queen.messages m"
                           "  JOIN queen.partitions p ON p.id = m.partition_id"
                           "  JOIN queen.queues q ON q.id = p.queue_id WHERE q.name = %s",
                           (queue,))
            return cursor.fetchone()[0]

    def one_cycle_cleaned_other() -> bool:  # batches of two, as many as it takes
        with db.cursor() as cursor:
            cursor.execute("SELECT queen.cleanup_cycle(2, true, false)")
        return stored(other) == 0

    wait_until(one_cycle_cleaned_other, timeout=15, interval=0.2,
               message="retention reaching the unleased queue past the leased ones")
    assert [stored(queue) for queue in leased_queues] == [2] * 4
