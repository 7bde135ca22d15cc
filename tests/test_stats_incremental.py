"""Statistics without recounts (issue 18 point 4): message positions keep every count exact.

The counts (``queen.partition_counts``, the ``queue_stats`` snapshot of ``POST
/api/v1/stats/refresh``, the overview's lag) are read from positions and maintained counters
(migration 4). Each test drives a real server, then checks them against ``RECOUNT``: the full
recount the statistics used before, kept here as the reference.
"""

from __future__ import annotations

import random
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg2
import psycopg2.extras
import pytest

from queen_tw.db.schema import install_schema
from queen_tw.paths import sql_dir

from tests.http_helpers import ack, configure, pop, push
from tests.scratch_databases import scratch_database
from tests.support import REPO_ROOT, pass_time, unique_name

# The pre-change partition_stats: every message of the partition looked at (dead letters as
# queen.partition_counts defines them: distinct messages; completed less queue mode's own).
RECOUNT = """
    WITH pc AS (
        SELECT cursor_created_at, cursor_id, lease_id, lease_expires_at, lease_last_created_at,
               lease_last_id
          FROM queen.partition_consumers
         WHERE partition_id = %(p)s AND consumer_group = '__QUEUE_MODE__'
    ), counted AS (
        SELECT count(*) AS total,
               count(*) FILTER (WHERE pc.cursor_created_at IS NULL
                   OR (m.created_at, m.id) > (pc.cursor_created_at, pc.cursor_id)) AS after_cursor,
               count(*) FILTER (WHERE pc.lease_id IS NOT NULL AND pc.lease_expires_at > now()
                   AND (m.created_at, m.id) > (pc.cursor_created_at, pc.cursor_id)
                   AND (m.created_at, m.id) <= (pc.lease_last_created_at, pc.lease_last_id))
                   AS processing,
               (SELECT count(DISTINCT d.message_id) FROM queen.dead_letter_queue d
                 WHERE d.partition_id = %(p)s) AS dead_letter,
               (SELECT count(DISTINCT d.message_id) FROM queen.dead_letter_queue d
                  JOIN queen.messages dm ON dm.id = d.message_id
                  LEFT JOIN pc ON true
                 WHERE d.partition_id = %(p)s AND d.consumer_group = '__QUEUE_MODE__'
                   AND (dm.created_at, dm.id) <= (pc.cursor_created_at, pc.cursor_id))
                   AS own_dead_letter
          FROM queen.messages m LEFT JOIN pc ON true
         WHERE m.partition_id = %(p)s
    )
    SELECT total, after_cursor - processing, processing, total - after_cursor - own_dead_letter,
           dead_letter
      FROM counted
"""

COUNTS = """SELECT total, pending, processing, completed, dead_letter
              FROM queen.partition_counts(ARRAY[%(p)s::uuid])"""

KEYS = ("total", "pending", "processing", "completed", "deadLetter")

# The commit whose functions predate message positions (migration 3 is the newest there).
BEFORE_POSITIONS = "a4990fe"


def _rows(db, sql: str, params: Any = None) -> list[tuple]:
    with db.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall()


def _partitions(db, queue: str) -> dict[str, str]:
    """Partition name -> id of ``queue``."""
    return dict(_rows(db, """SELECT p.name, p.id::text FROM queen.partitions p
                               JOIN queen.queues q ON q.id = p.queue_id WHERE q.name = %s""",
                      (queue,)))


def recounted(db, partition_id: str) -> dict[str, int]:
    """The reference: every message of the partition counted."""
    return dict(zip(KEYS, _rows(db, RECOUNT, {"p": partition_id})[0], strict=True))


def counted(db, partition_id: str) -> dict[str, int]:
    """What the statistics report now, from positions."""
    return dict(zip(KEYS, _rows(db, COUNTS, {"p": partition_id})[0], strict=True))


def assert_exact(db, queue: str) -> dict[str, dict[str, int]]:
    """Every partition's counts equal the recount, and every cursor's position (any group)
    counts exactly the messages at or before it. Returns the counts by partition name."""
    found = {}
    for name, partition_id in _partitions(db, queue).items():
        reference = recounted(db, partition_id)
        assert counted(db, partition_id) == reference, (name, reference)
        found[name] = reference
    cursors = _rows(db, """
        SELECT pc.consumer_group, p.name,
               queen.stored_through(p.id, p.first_seq, p.last_seq, pc.cursor_seq),
               (SELECT count(*) FROM queen.messages m WHERE m.partition_id = p.id
                   AND (m.created_at, m.id) <= (pc.cursor_created_at, pc.cursor_id)),
               p.message_count, (SELECT count(*) FROM queen.messages m WHERE m.partition_id = p.id)
          FROM queen.partition_consumers pc
          JOIN queen.partitions p ON p.id = pc.partition_id
          JOIN queen.queues q ON q.id = p.queue_id
         WHERE q.name = %s""", (queue,))
    for group, name, from_positions, reference, kept, stored in cursors:
        assert from_positions == reference, (group, name)
        assert kept == stored, name
    return found


def refresh(http: httpx.Client) -> dict[str, Any]:
    answer = http.post("/api/v1/stats/refresh")
    assert answer.status_code == 200, answer.text
    return answer.json()


def queue_snapshot(db, queue: str) -> dict[str, int] | None:
    """The queue's row of the statistics snapshot (None when it has none)."""
    rows = _rows(db, """SELECT s.total, s.pending, s.processing, s.completed, s.dead_letter
                          FROM queen.queue_stats s JOIN queen.queues q ON q.id = s.queue_id
                         WHERE q.name = %s""", (queue,))
    return dict(zip(KEYS, rows[0], strict=True)) if rows else None


def summed(by_partition: dict[str, dict[str, int]]) -> dict[str, int]:
    return {key: sum(counts[key] for counts in by_partition.values()) for key in KEYS}


def pop_batch(http: httpx.Client, queue: str, batch: int, **params: Any) -> list[dict]:
    body = pop(http, queue, batch=batch, **params)
    return body["messages"] if body else []


def ack_all(http: httpx.Client, messages: list[dict], status: str = "completed") -> None:
    answer = http.post("/api/v1/ack/batch", json={"acknowledgments": [
        {"transactionId": m["transactionId"], "partitionId": m["partitionId"],
         "leaseId": m["leaseId"] or None, "consumerGroup": m["consumerGroup"],
         "status": status} for m in messages]})
    assert answer.status_code == 200, answer.text


# -- the operations, one by one --------------------------------------------------------------


def test_counts_follow_pushes_leases_acks_and_a_failed_ack(http, db):
    queue = unique_name()
    configure(http, queue, retryLimit=3, retryDelay=0)
    push(http, queue, list(range(10)))
    leased = pop_batch(http, queue, 4)

    assert assert_exact(db, queue)["Default"] == {
        "total": 10, "pending": 6, "processing": 4, "completed": 0, "deadLetter": 0}

    ack_all(http, leased[:2])
    assert assert_exact(db, queue)["Default"] == {
        "total": 10, "pending": 6, "processing": 2, "completed": 2, "deadLetter": 0}

    ack(http, leased[2], status="failed", error="boom")  # the delivery ends, retried later
    assert assert_exact(db, queue)["Default"] == {
        "total": 10, "pending": 8, "processing": 0, "completed": 2, "deadLetter": 0}

    refresh(http)
    assert queue_snapshot(db, queue) == {
        "total": 10, "pending": 8, "processing": 0, "completed": 2, "deadLetter": 0}


def test_a_dead_letter_move_counts_once(http, db):
    queue = unique_name()
    configure(http, queue, retryLimit=0, retryDelay=0)
    push(http, queue, ["a", "b", "c"])
    [first] = pop_batch(http, queue, 1)

    ack(http, first, status="failed", error="poison")

    assert assert_exact(db, queue)["Default"] == {
        "total": 3, "pending": 2, "processing": 0, "completed": 0, "deadLetter": 1}
    refresh(http)
    overview = http.get("/api/v1/resources/overview").json()
    assert overview["messages"]["deadLetter"] >= 1
    detail = http.get(f"/api/v1/resources/queues/{queue}").json()
    assert {key: detail["totals"][key] for key in KEYS} == {
        "total": 3, "pending": 2, "processing": 0, "completed": 0, "deadLetter": 1}


def test_duplicates_leave_holes_that_are_not_counted(http, db):
    queue = unique_name()
    push(http, queue, ["a", "b"], prefix="x")
    answer = http.post("/api/v1/push", json={"items": [
        {"queue": queue, "transactionId": txid, "payload": txid}
        for txid in ("x0", "n1", "n1", "x1", "n2")]})
    assert [r["status"] for r in answer.json()] == [
        "duplicate", "queued", "duplicate", "duplicate", "queued"]
    ack_all(http, pop_batch(http, queue, 3))

    assert assert_exact(db, queue)["Default"] == {
        "total": 4, "pending": 1, "processing": 0, "completed": 3, "deadLetter": 0}


def test_retention_and_eviction_deletes_keep_counts_exact(http, db):
    queue = unique_name()
    configure(http, queue, retentionEnabled=True, maxWaitTimeSeconds=3600)
    push(http, queue, list(range(10)), prefix="old")
    ack_all(http, pop_batch(http, queue, 3))
    pass_time(db, queue, 7200)
    push(http, queue, list(range(5)), prefix="new")

    # eviction: the unconsumed old messages (after the cursor) go, the consumed ones stay
    _clean(db)
    assert assert_exact(db, queue)["Default"] == {
        "total": 8, "pending": 5, "processing": 0, "completed": 3, "deadLetter": 0}
    assert _rows(db, """SELECT count(*) FROM queen.partition_holes h
                         WHERE h.partition_id = %s""", (_partitions(db, queue)["Default"],)) \
        == [(1,)]

    ack_all(http, pop_batch(http, queue, 2))
    assert assert_exact(db, queue)["Default"]["completed"] == 5

    # completed retention: the consumed messages go from the front
    configure(http, queue, retentionEnabled=True, completedRetentionSeconds=1)
    pass_time(db, queue, 10)
    _clean(db)
    assert assert_exact(db, queue)["Default"] == {
        "total": 3, "pending": 3, "processing": 0, "completed": 0, "deadLetter": 0}
    ack_all(http, pop_batch(http, queue, 10))
    assert assert_exact(db, queue)["Default"]["completed"] == 3


def _clean(db) -> None:
    """Runs retention and eviction until a cycle got the cleaning lock and found no more."""
    for _ in range(200):
        [(answer,)] = _rows(db, "SELECT queen.cleanup_cycle(1000, true, true)")
        if answer["locked"] and not answer["more"]:
            return
        time.sleep(0.05)
    raise AssertionError("the cleaning lock stayed busy")


def test_single_deletes_and_clears_keep_counts_exact(http, db):
    queue = unique_name()
    push(http, queue, list(range(8)))
    partition_id = _partitions(db, queue)["Default"]
    ack_all(http, pop_batch(http, queue, 2))

    for txid in ("t1", "t5"):  # one behind the cursor, one ahead of it
        answer = http.delete(f"/api/v1/messages/{partition_id}/{txid}")
        assert answer.status_code == 200, answer.text
    assert assert_exact(db, queue)["Default"] == {
        "total": 6, "pending": 5, "processing": 0, "completed": 1, "deadLetter": 0}

    answer = http.delete(f"/api/v1/queues/{queue}/clear")
    assert answer.status_code == 200, answer.text
    assert assert_exact(db, queue)["Default"]["total"] == 0
    push(http, queue, ["again", "and again"], prefix="z")
    ack_all(http, pop_batch(http, queue, 1))
    assert assert_exact(db, queue)["Default"] == {
        "total": 2, "pending": 1, "processing": 0, "completed": 1, "deadLetter": 0}


def test_partition_and_queue_deletes_leave_the_snapshot_consistent(http, db):
    queue = unique_name()
    push(http, queue, [1, 2, 3], partition="a")
    push(http, queue, [4, 5], partition="b")
    refresh(http)
    assert (queue_snapshot(db, queue) or {}).get("total") == 5

    with db.cursor() as cursor:
        cursor.execute("DELETE FROM queen.partitions WHERE id = %s", (_partitions(db, queue)["a"],))
    refresh(http)
    assert queue_snapshot(db, queue) == summed(assert_exact(db, queue)) == {
        "total": 2, "pending": 2, "processing": 0, "completed": 0, "deadLetter": 0}

    assert http.delete(f"/api/v1/resources/queues/{queue}").status_code == 200
    refresh(http)
    assert queue_snapshot(db, queue) is None


def test_seeks_and_named_groups_have_exact_positions(http, db):
    queue = unique_name()
    push(http, queue, list(range(6)))
    ack_all(http, pop_batch(http, queue, 6, consumerGroup="g1"))
    answer = http.post(f"/api/v1/consumer-groups/g1/queues/{queue}/seek",
                       json={"timestamp": "2000-01-01T00:00:00Z"})
    assert answer.status_code == 200, answer.text
    ack_all(http, pop_batch(http, queue, 2, consumerGroup="g1"))
    answer = http.post(f"/api/v1/consumer-groups/g2/queues/{queue}/partitions/Default/seek")
    assert answer.status_code == 200, answer.text

    assert_exact(db, queue)
    lags = dict(_rows(db, """SELECT l.consumer_group, l.offset_lag FROM queen.lag_counts() l
                               JOIN queen.partitions p ON p.id = l.partition_id
                               JOIN queen.queues q ON q.id = p.queue_id WHERE q.name = %s""",
                      (queue,)))
    assert lags == {"g1": 4}


# -- a random workload against the recount ---------------------------------------------------


def test_random_workload_counts_equal_the_recount(http, db):
    rng = random.Random(18_4)
    queue = unique_name()
    configure(http, queue, retryLimit=1, retryDelay=0)
    partitions = ["p0", "p1", "p2"]
    txids = 0
    held: list[dict] = []
    for step in range(120):
        action = rng.choice(["push", "push", "pop", "ack", "fail", "group", "delete", "dlq"])
        if action == "push":
            items = []
            for _ in range(rng.randint(1, 6)):
                txid = f"m{rng.randint(0, txids)}" if rng.random() < 0.2 else f"m{txids + 1}"
                txids += 1
                items.append({"queue": queue, "partition": rng.choice(partitions),
                              "transactionId": txid, "payload": step})
            assert http.post("/api/v1/push", json={"items": items}).status_code == 201
        elif action == "pop":
            held += pop_batch(http, queue, rng.randint(1, 4), partition=rng.choice(partitions))
        elif action in ("ack", "fail") and held:
            done = held[:rng.randint(1, len(held))]
            held = held[len(done):]
            ack_all(http, done, status="completed" if action == "ack" else "failed")
        elif action == "group":
            group = rng.choice(["g1", "g2"])
            pop_batch(http, queue, rng.randint(1, 5), consumerGroup=group, autoAck="true")
        elif action in ("delete", "dlq"):
            rows = _rows(db, """SELECT m.partition_id::text, m.transaction_id FROM queen.messages m
                                  JOIN queen.partitions p ON p.id = m.partition_id
                                  JOIN queen.queues q ON q.id = p.queue_id
                                 WHERE q.name = %s ORDER BY m.created_at""", (queue,))
            if rows:
                partition_id, txid = rng.choice(rows)
                path = f"/api/v1/messages/{partition_id}/{txid}"
                answer = (http.delete(path) if action == "delete"
                          else http.post(f"{path}/dlq", json={}))
                assert answer.status_code == 200, answer.text
        if step % 10 == 9:
            assert_exact(db, queue)

    by_partition = assert_exact(db, queue)
    refresh(http)
    assert queue_snapshot(db, queue) == summed(by_partition)
    lag_rows = _rows(db, """
        SELECT l.offset_lag,
               (SELECT count(*) FROM queen.messages m
                 LEFT JOIN queen.partition_consumers pc
                        ON pc.partition_id = l.partition_id AND pc.consumer_group = l.consumer_group
                 LEFT JOIN queen.consumer_subscriptions s
                        ON s.queue_id = p.queue_id AND s.consumer_group = l.consumer_group
                 WHERE m.partition_id = l.partition_id
                   AND (m.created_at, m.id) > (coalesce(pc.cursor_created_at, s.subscription_from),
                       coalesce(pc.cursor_id, queen.start_cursor_id(s.subscription_from))))
          FROM queen.lag_counts() l JOIN queen.partitions p ON p.id = l.partition_id
          JOIN queen.queues q ON q.id = p.queue_id WHERE q.name = %s""", (queue,))
    assert lag_rows and all(lag == reference for lag, reference in lag_rows)


# -- the upgrade ------------------------------------------------------------------------------


def _git_show(path: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO_ROOT), "show", f"{BEFORE_POSITIONS}:{path}"],
                              check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"needs the git history at {BEFORE_POSITIONS}: {err}")


def _schema_before_positions(workdir: Path) -> Path:
    """Migrations 1-3 and the function files as they were before migration 4."""
    listing = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "ls-tree", "-r", "--name-only", BEFORE_POSITIONS, "sql"],
        capture_output=True, text=True)
    if listing.returncode != 0:
        pytest.skip(f"needs the git history at {BEFORE_POSITIONS}: {listing.stderr.strip()}")
    for path in listing.stdout.split():
        target = workdir / Path(path).relative_to("sql")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(_git_show(path))
    return workdir


@pytest.fixture
def old_database(pg_dsn: str, tmp_path: Path) -> Iterator[str]:
    with scratch_database(pg_dsn) as dsn:
        install_schema(dsn, _schema_before_positions(tmp_path / "sql"))
        yield dsn


def test_upgrade_backfills_positions_of_stored_messages(old_database):
    connection = psycopg2.connect(old_database)
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            for name in ("a", "b"):
                cursor.execute("SELECT queen.push_messages_v2(%s::jsonb)", (psycopg2.extras.Json([
                    {"queue": "upgraded", "partition": name, "transactionId": f"{name}{n}",
                     "payload": n} for n in range(7)]),))
            cursor.execute("SELECT queen.pop_specific_batch(%s::jsonb)", (psycopg2.extras.Json([
                {"idx": 0, "queue_name": "upgraded", "partition_name": "a",
                 "consumer_group": "__QUEUE_MODE__", "batch_size": 3, "worker_id": "w"}]),))
            [(popped,)] = cursor.fetchall()
            messages = popped[0]["result"]["messages"]
            lease = popped[0]["result"]["leaseId"]
            partition_a = popped[0]["result"]["partitionId"]
            cursor.execute("SELECT queen.ack_messages(%s::jsonb)", (psycopg2.extras.Json([
                {"transactionId": m["transactionId"], "partitionId": partition_a,
                 "leaseId": lease, "status": "completed"} for m in messages[:2]]),))
            cursor.execute("""DELETE FROM queen.messages m USING queen.partitions p
                               WHERE p.id = m.partition_id AND p.name = 'b'
                                 AND m.transaction_id = 'b3'""")
            cursor.execute("SELECT id::text, name FROM queen.partitions")
            ids = {name: partition_id for partition_id, name in cursor.fetchall()}
        before = {name: recounted(connection, ids[name]) for name in ids}
        assert before["a"] == {"total": 7, "pending": 4, "processing": 1, "completed": 2,
                               "deadLetter": 0}

        applied = install_schema(old_database, sql_dir())

        assert "migrations/0004_stats_counters.sql" in applied
        assert {name: counted(connection, ids[name]) for name in ids} == before
        assert {name: recounted(connection, ids[name]) for name in ids} == before
    finally:
        connection.close()


# -- the refresh racing queue deletes --------------------------------------------------------


def test_refresh_racing_queue_deletes_never_fails(make_server):
    # Refreshes that overlap one another all the time, each made longer by a few hundred
    # standing queues: row share locks on the queues starved the deletes here (30 s, 500).
    server = make_server(STATS_INTERVAL_MS="50")
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for _ in range(300):
            push(client, unique_name(), [1])
    done = threading.Event()
    failures: list[str] = []

    def churn() -> None:
        try:
            with httpx.Client(base_url=server.url, timeout=30) as client:
                for _ in range(40):
                    queue = unique_name()
                    push(client, queue, list(range(5)))
                    push(client, queue, [1], partition="other")
                    answer = client.delete(f"/api/v1/resources/queues/{queue}")
                    if answer.status_code != 200:
                        failures.append(f"delete {answer.status_code} {answer.text}")
        finally:
            done.set()

    def refresher() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            while not done.is_set():
                answer = client.post("/api/v1/stats/refresh")
                if answer.status_code != 200:
                    failures.append(f"refresh {answer.status_code} {answer.text}")

    threads = [threading.Thread(target=churn)] + [threading.Thread(target=refresher)
                                                 for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)

    assert not any(thread.is_alive() for thread in threads)
    assert failures == []
    log = server.log_text()
    for sign in ("foreign key", "violates", "Traceback"):
        assert sign not in log, log[-3000:]
