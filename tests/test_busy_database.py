"""A request PostgreSQL keeps undoing (deadlock or serialization failure at every retry) is
answered 503 with Retry-After and nothing applied: the client retries it, the server neither
reports a bug (500) nor takes the database for down (file buffer). Real server, real
PostgreSQL: a trigger makes every insert of the test's messages fail with SQLSTATE 40001."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.support import unique_name, wait_until


@pytest.fixture
def conflicting_prefix(db: Any) -> Iterator[str]:
    """A transactionId prefix: while the test runs, PostgreSQL refuses to insert a message
    whose id goes on with ``conflict`` (a serialization failure) and takes half a second for
    one that goes on with ``slow``."""
    prefix = f"conflicts-{uuid.uuid4().hex[:8]}-"
    with db.cursor() as cursor:
        cursor.execute(f"""
            CREATE FUNCTION queen.test_refuse_as_conflict() RETURNS trigger
            LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.transaction_id LIKE '{prefix}conflict%' THEN
                    RAISE EXCEPTION 'could not serialize access' USING ERRCODE = '40001';
                ELSIF NEW.transaction_id LIKE '{prefix}slow%' THEN
                    PERFORM pg_sleep(0.5);
                END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER test_refuse_as_conflict BEFORE INSERT ON queen.messages
               FOR EACH ROW EXECUTE FUNCTION queen.test_refuse_as_conflict();""")
    try:
        yield prefix
    finally:
        drop_conflicts(db)


def drop_conflicts(db: Any) -> None:
    with db.cursor() as cursor:
        cursor.execute("DROP TRIGGER IF EXISTS test_refuse_as_conflict ON queen.messages;"
                       "DROP FUNCTION IF EXISTS queen.test_refuse_as_conflict()")


def stored(db: Any, queue: str) -> list[str]:
    with db.cursor() as cursor:
        cursor.execute("SELECT m.transaction_id FROM queen.messages m"
                       "  JOIN queen.partitions p ON p.id = m.partition_id"
                       "  JOIN queen.queues q ON q.id = p.queue_id"
                       " WHERE q.name = %s ORDER BY m.seq", (queue,))
        return [row[0] for row in cursor.fetchall()]


def test_a_push_postgresql_keeps_undoing_is_a_503_with_nothing_stored_or_buffered(
        http: httpx.Client, db: Any, conflicting_prefix: str) -> None:
    queue = unique_name()
    items = [{"queue": queue, "partition": "p", "payload": {"n": n},
              "transactionId": f"{conflicting_prefix}conflict-{n}"} for n in range(3)]

    answer = http.post("/api/v1/push", json={"items": items})
    assert answer.status_code == 503, answer.text
    assert answer.headers["Retry-After"] == "1"
    assert "busy" in answer.json()["error"].lower()
    assert stored(db, queue) == []
    maintenance = http.get("/api/v1/system/maintenance").json()
    assert maintenance["bufferedMessages"] == 0  # not taken for an outage

    drop_conflicts(db)  # the conflict is over: the client's retry goes through, once
    retried = http.post("/api/v1/push", json={"items": items})
    assert retried.status_code == 201, retried.text
    assert [r["status"] for r in retried.json()] == ["queued"] * 3
    assert stored(db, queue) == [item["transactionId"] for item in items]


def test_pushes_fused_with_one_postgresql_keeps_undoing_are_stored_all_the_same(
        make_server: Any, db: Any, conflicting_prefix: str) -> None:
    """Pushes that wait behind a call are fused into the next one: when PostgreSQL keeps
    undoing that call, its jobs are run one by one, so only the conflicting push is refused.
    One push call at a time, and a slow push first, make them all wait and fuse."""
    server = make_server(QUEEN_PUSH_MAX_CONCURRENT="1")
    queue = unique_name()

    def push(transaction_id: str) -> httpx.Response:
        return httpx.post(f"{server.url}/api/v1/push", timeout=30, json={"items": [
            {"queue": queue, "partition": "p", "transactionId": transaction_id,
             "payload": {}}]})

    def slow_push_in_flight() -> bool:
        with db.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE state = 'active'"
                           " AND wait_event = 'PgSleep' AND query LIKE %s",
                           (f"%{conflicting_prefix}slow%",))
            return bool(cursor.fetchone()[0])

    clean = [f"clean-{n}" for n in range(6)]
    with ThreadPoolExecutor(len(clean) + 2) as pool:
        slow = pool.submit(push, f"{conflicting_prefix}slow")
        wait_until(slow_push_in_flight, message="the slow push inside PostgreSQL")
        sent = [pool.submit(push, tid) for tid in clean[:3]]
        refused = pool.submit(push, f"{conflicting_prefix}conflict")
        sent += [pool.submit(push, tid) for tid in clean[3:]]
        answers = dict(zip(clean, (future.result() for future in sent), strict=True))
    assert slow.result().status_code == 201, slow.result().text
    assert refused.result().status_code == 503, refused.result().text
    assert {tid: a.status_code for tid, a in answers.items()} == {tid: 201 for tid in clean}
    assert sorted(stored(db, queue)) == sorted([f"{conflicting_prefix}slow", *clean])
