"""A request PostgreSQL keeps undoing (deadlock or serialization failure at every retry) is
answered 503 with Retry-After and nothing applied: the client retries it, the server neither
reports a bug (500) nor takes the database for down (file buffer). Real server, real
PostgreSQL: a trigger makes every insert of the test's messages fail with SQLSTATE 40001."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.binary_bodies import framed_body, framed_group, id_text, v7_id
from tests.pg_faults import Trigger, asleep
from tests.support import unique_name, wait_until

CONFLICT_PREFIX = "conflicts-"


@dataclass
class Conflicts:
    """The test's transactionId prefix, and :meth:`end` to make PostgreSQL accept them."""

    prefix: str
    trigger: Trigger

    def end(self) -> None:
        self.trigger.drop()


@pytest.fixture
def conflicts(db: Any) -> Iterator[Conflicts]:
    """While the test runs (or until it drops the trigger), PostgreSQL refuses to insert a
    message whose transactionId starts with ``conflict`` after the test's prefix (a
    serialization failure) and takes half a second for one going on with ``slow``."""
    prefix = f"{CONFLICT_PREFIX}{uuid.uuid4().hex[:8]}-"
    with Trigger(db, "queen.messages", "BEFORE INSERT", f"""
            IF NEW.transaction_id LIKE '{prefix}conflict%' THEN
                RAISE EXCEPTION 'could not serialize access' USING ERRCODE = '40001';
            ELSIF NEW.transaction_id LIKE '{prefix}slow%' THEN
                PERFORM pg_sleep(0.5);
            END IF;""") as installed:
        yield Conflicts(prefix, installed)


def stored(db: Any, queue: str) -> list[str]:
    with db.cursor() as cursor:
        cursor.execute("SELECT m.transaction_id FROM queen.messages m"
                       "  JOIN queen.partitions p ON p.id = m.partition_id"
                       "  JOIN queen.queues q ON q.id = p.queue_id"
                       " WHERE q.name = %s ORDER BY m.seq", (queue,))
        return [row[0] for row in cursor.fetchall()]


def test_a_push_postgresql_keeps_undoing_is_a_503_with_nothing_stored_or_buffered(
        http: httpx.Client, db: Any, conflicts: Conflicts) -> None:
    queue = unique_name()
    items = [{"queue": queue, "partition": "p", "payload": {"n": n},
              "transactionId": f"{conflicts.prefix}conflict-{n}"} for n in range(3)]

    answer = http.post("/api/v1/push", json={"items": items})
    assert answer.status_code == 503, answer.text
    assert answer.headers["Retry-After"] == "1"
    assert "busy" in answer.json()["error"].lower()
    assert stored(db, queue) == []
    maintenance = http.get("/api/v1/system/maintenance").json()
    assert maintenance["bufferedMessages"] == 0  # not taken for an outage

    conflicts.end()  # the conflict is over: the client's retry goes through, once
    retried = http.post("/api/v1/push", json={"items": items})
    assert retried.status_code == 201, retried.text
    assert [r["status"] for r in retried.json()] == ["queued"] * 3
    assert stored(db, queue) == [item["transactionId"] for item in items]


def test_pushes_fused_with_one_postgresql_keeps_undoing_are_stored_all_the_same(
        make_server: Any, db: Any, conflicts: Conflicts) -> None:
    """Pushes that wait behind a call are fused into the next one: when PostgreSQL keeps
    undoing that call, its jobs are run one by one, so only the conflicting push is refused.
    One push call at a time, and a slow push first, make them all wait and fuse."""
    server = make_server(QUEEN_PUSH_MAX_CONCURRENT="1")
    queue = unique_name()

    def push(transaction_id: str) -> httpx.Response:
        return httpx.post(f"{server.url}/api/v1/push", timeout=30, json={"items": [
            {"queue": queue, "partition": "p", "transactionId": transaction_id,
             "payload": {}}]})

    clean = [f"clean-{n}" for n in range(6)]
    with ThreadPoolExecutor(len(clean) + 2) as pool:
        slow = pool.submit(push, f"{conflicts.prefix}slow")
        wait_until(lambda: asleep(db, f"%{conflicts.prefix}slow%"),
                   message="the slow push inside PostgreSQL")
        sent = [pool.submit(push, tid) for tid in clean[:3]]
        refused = pool.submit(push, f"{conflicts.prefix}conflict")
        sent += [pool.submit(push, tid) for tid in clean[3:]]
        answers = dict(zip(clean, (future.result() for future in sent), strict=True))
    assert slow.result().status_code == 201, slow.result().text
    assert refused.result().status_code == 503, refused.result().text
    assert {tid: a.status_code for tid, a in answers.items()} == {tid: 201 for tid in clean}
    assert sorted(stored(db, queue)) == sorted([f"{conflicts.prefix}slow", *clean])


def test_a_streams_cycle_postgresql_keeps_undoing_is_a_503_with_nothing_applied(
        http: httpx.Client, db: Any, conflicts: Conflicts) -> None:
    """The cycle's sink push conflicts at every retry: the whole cycle (state, ack, sinks)
    is undone and the worker is told to retry (503), not that its cycle failed for good."""
    source, sink = unique_name(), unique_name()
    http.post("/api/v1/push", json={"items": [{"queue": source, "partition": "p",
                                               "payload": {"n": 1}}]}).raise_for_status()
    registered = http.post("/streams/v1/queries", json={
        "name": unique_name("busy-q-"), "source_queue": source, "sink_queue": sink,
        "config_hash": "h1", "reset": False})
    query_id = registered.json()["query_id"]
    group = f"streams.{query_id}"
    popped = http.get(f"/api/v1/pop/queue/{source}", params={"consumerGroup": group})
    message = popped.json()["messages"][0]
    cycle = {"query_id": query_id, "partition_id": message["partitionId"],
             "consumer_group": group,
             "state_ops": [{"type": "upsert", "key": "sum", "value": 1}],
             "push_items": [{"queue": sink, "partition": "p", "payload": {"sum": 1},
                             "transactionId": f"{conflicts.prefix}conflict-sink"}],
             "ack": {"transactionId": message["transactionId"],
                     "leaseId": message["leaseId"], "status": "completed", "count": 1}}

    answer = http.post("/streams/v1/cycle", json=cycle)
    assert answer.status_code == 503, answer.text
    assert answer.headers["Retry-After"] == "1"
    state = http.post("/streams/v1/state/get", json={
        "query_id": query_id, "partition_id": message["partitionId"]})
    assert state.json()["rows"] == []
    assert stored(db, sink) == []
    with db.cursor() as cursor:
        cursor.execute("SELECT total_consumed FROM queen.partition_consumers"
                       " WHERE partition_id = %s AND consumer_group = %s",
                       (message["partitionId"], group))
        assert cursor.fetchone()[0] == 0

    conflicts.end()
    retried = http.post("/streams/v1/cycle", json=cycle)
    assert retried.status_code == 200, retried.text
    assert retried.json()["success"] is True, retried.text
    assert stored(db, sink) == [f"{conflicts.prefix}conflict-sink"]


def test_a_transaction_postgresql_keeps_undoing_is_a_503_with_nothing_applied(
        http: httpx.Client, db: Any, conflicts: Conflicts) -> None:
    """A conflict inside the transaction is not its verdict (200 success false): the
    client is told to retry (503), the ack is undone with the push, and the retry commits."""
    source, target = unique_name(), unique_name()
    http.post("/api/v1/push", json={"items": [{"queue": source, "partition": "p",
                                               "payload": "in"}]}).raise_for_status()
    message = http.get(f"/api/v1/pop/queue/{source}", params={"wait": "false"}).json()[
        "messages"][0]
    bundle = {"operations": [
        {"type": "ack", "transactionId": message["transactionId"],
         "partitionId": message["partitionId"], "leaseId": message["leaseId"]},
        {"type": "push", "items": [{"queue": target, "partition": "p", "payload": "out",
                                    "transactionId": f"{conflicts.prefix}conflict-tx"}]}],
        "requiredLeases": [message["leaseId"]]}

    answer = http.post("/api/v1/transaction", json=bundle)
    assert answer.status_code == 503, answer.text
    assert answer.headers["Retry-After"] == "1"
    assert stored(db, target) == []
    with db.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM queen.partition_consumers WHERE partition_id = %s"
                       " AND lease_id = %s", (message["partitionId"], message["leaseId"]))
        assert cursor.fetchone()[0] == 1  # the ack was undone with the push

    conflicts.end()
    retried = http.post("/api/v1/transaction", json=bundle)
    assert retried.status_code == 200, retried.text
    assert retried.json()["success"] is True, retried.text
    assert stored(db, target) == [f"{conflicts.prefix}conflict-tx"]


@pytest.fixture
def held_after_insert(db: Any) -> Iterator[str]:
    """A transactionId: while the test runs, a push that stores a message with this id waits
    a second after inserting it, before it commits (its row and index entries are in place)."""
    transaction_id = f"held-{uuid.uuid4().hex[:8]}"
    with Trigger(db, "queen.messages", "AFTER INSERT", f"""
            IF NEW.transaction_id = '{transaction_id}' THEN
                PERFORM pg_sleep(1);
            END IF;"""):
        yield transaction_id


def test_a_client_id_stored_meanwhile_by_a_concurrent_push_is_retried_not_a_500(
        http: httpx.Client, db: Any, held_after_insert: str) -> None:
    """Two compressed pushes carry the same client-minted id to two partitions (no lock in
    common). The second checks the id while the first has inserted it but not committed, then
    meets it on the primary key: that used to be a 500. Now the call runs again, sees the id
    and stores the message under an id of the server's, as when the id was taken earlier."""
    queue = unique_name()
    for partition in ("p1", "p2"):  # the queue and partitions exist: no lock in common
        http.post("/api/v1/push", json={"items": [{"queue": queue, "partition": partition,
                                                   "payload": 0}]}).raise_for_status()
    message_id = v7_id()

    def push(partition: str, transaction_id: str) -> httpx.Response:
        return http.post("/api/v1/push", headers={"Content-Type": "application/x-queen-push"},
                         content=framed_body([framed_group(queue, partition, [
                             (message_id, transaction_id, b"1")])]))

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(push, "p1", held_after_insert)
        wait_until(lambda: asleep(db, "%push_store%"),
                   message="the first push inside PostgreSQL")
        second = pool.submit(push, "p2", "second")
        first_answer, second_answer = first.result(), second.result()
    assert first_answer.status_code == 201, first_answer.text
    assert second_answer.status_code == 201, second_answer.text
    assert first_answer.json()[0]["message_id"] == id_text(message_id)
    [stored_second] = second_answer.json()
    assert stored_second["status"] == "queued"
    assert stored_second["message_id"] != id_text(message_id)
    with db.cursor() as cursor:
        cursor.execute("SELECT transaction_id FROM queen.messages WHERE id = %s",
                       (stored_second["message_id"],))
        assert cursor.fetchone() == ("second",)
