"""Per-partition offsets (WIRE2.md 6.1, 8.2): every partition numbers its messages 0, 1, 2, …
densely in commit order; duplicates take no number, deletes never renumber; pops hand out each
message's ``offset`` and ``deliveryAttempt``. Also the upgrade of a database whose positions
were numbered before migration 6 (duplicates left holes then).
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg2
import psycopg2.extras
import pytest

from queen_tw.db.schema import install_schema
from queen_tw.paths import sql_dir

from tests.client26 import run26
from tests.http_helpers import configure, pop, push
from tests.scratch_databases import scratch_database
from tests.support import REPO_ROOT, pass_time, unique_name

BEFORE_OFFSETS = "18c7166"
"""The newest commit whose schema predates migration 6 (duplicates still numbered)."""


def _rows(db, sql: str, params: Any = None) -> list[tuple]:
    with db.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall()


def read_all(http: httpx.Client, queue: str, partition: str = "Default") -> dict[str, Any]:
    """The partition's fetch entry from offset logStartOffset (one call, small records)."""
    answer = http.post("/api/v1/fetch", json={"entries": [
        {"queue": queue, "partition": partition, "offset": 0}]})
    [entry] = answer.json()["entries"]
    if entry.get("error") == "OFFSET_OUT_OF_RANGE":
        answer = http.post("/api/v1/fetch", json={"entries": [
            {"queue": queue, "partition": partition, "offset": entry["logStartOffset"]}]})
        [entry] = answer.json()["entries"]
    assert "error" not in entry, entry
    return entry


def offsets_by_txid(entry: dict[str, Any]) -> dict[str, int]:
    return {r["transactionId"]: r["offset"] for r in entry["records"]}


def holes(db, queue: str) -> int:
    [(count,)] = _rows(db, """SELECT count(*) FROM queen.partition_holes h
                               JOIN queen.partitions p ON p.id = h.partition_id
                               JOIN queen.queues q ON q.id = p.queue_id WHERE q.name = %s""",
                       (queue,))
    return count


def test_duplicates_and_refusals_take_no_offset(http, db):
    queue = unique_name()
    configure(http, queue, maxSize=6)
    push(http, queue, ["a", "b"], prefix="x")  # x0 x1
    answer = http.post("/api/v1/push", json={"items": [
        {"queue": queue, "transactionId": txid, "payload": txid}
        for txid in ("x0", "n1", "n1", "x1", "n2")]})
    assert [r["status"] for r in answer.json()] == [
        "duplicate", "queued", "duplicate", "duplicate", "queued"]
    answer = http.post("/api/v1/push", json={"items": [
        {"queue": queue, "transactionId": f"m{n}", "payload": n} for n in range(4)]})
    assert [r["status"] for r in answer.json()] == ["queued", "queued", "failed", "failed"]

    entry = read_all(http, queue)
    assert offsets_by_txid(entry) == {"x0": 0, "x1": 1, "n1": 2, "n2": 3, "m0": 4, "m1": 5}
    assert entry["highWatermark"] == 6 and entry["logStartOffset"] == 0
    assert holes(db, queue) == 0


def test_concurrent_pushes_to_one_partition_number_densely_in_commit_order(http, server, db):
    queue = unique_name()
    push(http, queue, ["seed"], partition="p", prefix="seed")

    def pusher(worker: int) -> None:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            for round_ in range(10):
                client.post("/api/v1/push", json={"items": [
                    {"queue": queue, "partition": "p", "payload": [worker, round_, n],
                     # every worker also repeats ids the others push
                     "transactionId": f"w{worker}-{round_}-{n}" if n else f"shared-{round_}"}
                    for n in range(5)]}).raise_for_status()

    threads = [threading.Thread(target=pusher, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    entry = read_all(http, queue, "p")
    stored = 1 + 10 + 4 * 10 * 4  # the seed, one shared id per round, 4 own per push
    assert [r["offset"] for r in entry["records"]] == list(range(stored))
    assert entry["highWatermark"] == stored
    # offsets follow the messages' order keys (their commit order)
    in_order = [txid for (txid,) in _rows(db, """
        SELECT m.transaction_id FROM queen.messages m JOIN queen.partitions p
            ON p.id = m.partition_id JOIN queen.queues q ON q.id = p.queue_id
         WHERE q.name = %s AND p.name = 'p' ORDER BY m.created_at, m.id""", (queue,))]
    assert [r["transactionId"] for r in entry["records"]] == in_order


def test_deletes_and_clears_never_renumber(http, db):
    queue = unique_name()
    stored = push(http, queue, [f"m{n}" for n in range(5)])
    partition_id = stored[0]["partition_id"]
    assert http.delete(f"/api/v1/messages/{partition_id}/t2").status_code == 200
    entry = read_all(http, queue)
    assert [r["offset"] for r in entry["records"]] == [0, 1, 3, 4]
    assert entry["highWatermark"] == 5

    push(http, queue, ["m5"], prefix="late")
    assert offsets_by_txid(read_all(http, queue))["late0"] == 5

    assert http.delete(f"/api/v1/queues/{queue}/clear").status_code == 200
    cleared = http.post("/api/v1/fetch", json={"entries": [{"queue": queue, "offset": 6}]})
    [entry] = cleared.json()["entries"]
    assert (entry["logStartOffset"], entry["highWatermark"], entry["records"]) == (6, 6, [])
    push(http, queue, ["m6"], prefix="again")
    assert offsets_by_txid(read_all(http, queue)) == {"again0": 6}


def test_retention_moves_the_log_start_and_keeps_every_offset(http, db):
    queue = unique_name()
    push(http, queue, [f"old{n}" for n in range(4)], prefix="old")
    pass_time(db, queue, 7200)
    push(http, queue, [f"new{n}" for n in range(3)], prefix="new")
    configure(http, queue, retentionEnabled=True, retentionSeconds=3600)
    with db.cursor() as cursor:
        cursor.execute("SELECT queen.cleanup_cycle(1000, true, false)")

    entry = read_all(http, queue)
    assert offsets_by_txid(entry) == {"new0": 4, "new1": 5, "new2": 6}
    assert (entry["logStartOffset"], entry["highWatermark"]) == (4, 7)
    assert holes(db, queue) == 0


def test_pops_carry_offset_and_delivery_attempt(http):
    queue = unique_name()
    configure(http, queue, retryDelay=0, retryLimit=5)
    push(http, queue, ["a", "b", "c"], partition="p")
    first = pop(http, queue, batch=2)
    assert [(m["offset"], m["deliveryAttempt"]) for m in first["messages"]] == [(0, 1), (1, 1)]
    answer = http.post("/api/v1/ack/batch", json={"acknowledgments": [
        {"transactionId": m["transactionId"], "partitionId": m["partitionId"],
         "leaseId": m["leaseId"], "status": "failed"} for m in first["messages"]]})
    assert answer.status_code == 200, answer.text

    again = pop(http, queue, batch=3)
    assert [(m["offset"], m["deliveryAttempt"], m["retryCount"]) for m in again["messages"]][:2] \
        == [(0, 2, 1), (1, 2, 1)]
    auto = pop(http, queue, "p", batch=10, autoAck="true", consumerGroup="audit")
    assert [m["offset"] for m in auto["messages"]] == [0, 1, 2]
    assert {m["deliveryAttempt"] for m in auto["messages"]} == {1}


def test_transaction_pushes_take_offsets_too(http):
    queue = unique_name()
    push(http, queue, ["first"])
    answer = http.post("/api/v1/transaction", json={"operations": [
        {"type": "push", "items": [{"queue": queue, "payload": "in-tx", "transactionId": "tx"}]},
    ]})
    assert answer.status_code == 200, answer.text
    assert offsets_by_txid(read_all(http, queue)) == {"t0": 0, "tx": 1}


# -- the upgrade ------------------------------------------------------------------------------


def _schema_before_offsets(workdir: Path) -> Path:
    """The sql/ directory as it was before migration 6."""
    listing = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "ls-tree", "-r", "--name-only", BEFORE_OFFSETS, "sql"],
        capture_output=True, text=True)
    if listing.returncode != 0:
        pytest.skip(f"needs the git history at {BEFORE_OFFSETS}: {listing.stderr.strip()}")
    for path in listing.stdout.split():
        shown = subprocess.run(["git", "-C", str(REPO_ROOT), "show", f"{BEFORE_OFFSETS}:{path}"],
                               check=True, capture_output=True, text=True).stdout
        target = workdir / Path(path).relative_to("sql")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(shown)
    return workdir


@pytest.fixture
def old_database(pg_dsn: str, tmp_path: Path) -> Iterator[str]:
    with scratch_database(pg_dsn) as dsn:
        install_schema(dsn, _schema_before_offsets(tmp_path / "sql"))
        yield dsn


def _push(cursor, partition: str, txids: list[str]) -> None:
    cursor.execute("SELECT queen.push_messages_v2(%s::jsonb)", (psycopg2.extras.Json([
        {"queue": "upgraded", "partition": partition, "transactionId": txid, "payload": txid}
        for txid in txids]),))


def _fetch(cursor, partition: str, offset: int) -> dict[str, Any]:
    cursor.execute("SELECT body FROM queen.fetch_records(%s::jsonb, 1000000, 10000)",
                   (psycopg2.extras.Json([{"queue": "upgraded", "partition": partition,
                                           "offset": offset, "maxBytes": 1000000}]),))
    [(body,)] = cursor.fetchall()
    return psycopg2.extras.json.loads(body)["entries"][0]


def _counts(cursor) -> dict[str, tuple]:
    # (before the upgrade: partition_counts(uuid DEFAULT NULL), NULL for every partition)
    cursor.execute("SELECT to_regprocedure('queen.partition_counts(uuid[])') IS NOT NULL")
    every = "ARRAY(SELECT id FROM queen.partitions)" if cursor.fetchone()[0] else ""
    cursor.execute(f"""
        SELECT p.name, c.total, c.pending, c.processing, c.completed,
               queen.stored_through(p.id, p.first_seq, p.last_seq, pc.cursor_seq)
          FROM queen.partition_counts({every}) c
          JOIN queen.partitions p ON p.id = c.partition_id
          LEFT JOIN queen.partition_consumers pc
                 ON pc.partition_id = p.id AND pc.consumer_group = '__QUEUE_MODE__'""")
    return {name: rest for name, *rest in cursor.fetchall()}


def test_upgrade_renumbers_positions_with_holes_densely(old_database):
    connection = psycopg2.connect(old_database)
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            _push(cursor, "a", ["a0", "a1", "a2", "a3", "a4"])
            _push(cursor, "a", ["a1", "a5"])  # the old push numbered the duplicate: a hole
            _push(cursor, "a", ["a2"])
            cursor.execute("""DELETE FROM queen.messages WHERE transaction_id = 'a3'""")
            cursor.execute("SELECT queen.pop_specific_batch(%s::jsonb)", (psycopg2.extras.Json([
                {"idx": 0, "queue_name": "upgraded", "partition_name": "a",
                 "consumer_group": "__QUEUE_MODE__", "batch_size": 3, "worker_id": "w"}]),))
            [(popped,)] = cursor.fetchall()
            result = popped[0]["result"]
            cursor.execute("SELECT queen.ack_messages(%s::jsonb)", (psycopg2.extras.Json([
                {"transactionId": m["transactionId"], "partitionId": result["partitionId"],
                 "leaseId": result["leaseId"], "status": "completed"}
                for m in result["messages"][:2]]),))
            _push(cursor, "b", ["b0", "b1", "b2"])  # no holes: kept as numbered
            _push(cursor, "c", ["c0", "c1", "c2", "c3"])
            cursor.execute("DELETE FROM queen.messages WHERE transaction_id IN ('c0', 'c1')")
            _push(cursor, "c", ["c2", "c4"])
            before = _counts(cursor)
            cursor.execute("SELECT count(*) FROM queen.partition_holes")
            assert cursor.fetchone()[0] > 0

            applied = install_schema(old_database, sql_dir())

            assert "migrations/0006_offsets.sql" in applied
            assert _counts(cursor) == before
            cursor.execute("SELECT count(*) FROM queen.partition_holes")
            assert cursor.fetchone()[0] == 0
            a = _fetch(cursor, "a", 0)
            assert [(r["offset"], r["transactionId"]) for r in a["records"]] == [
                (0, "a0"), (1, "a1"), (2, "a2"), (3, "a4"), (4, "a5")]
            assert (a["logStartOffset"], a["highWatermark"]) == (0, 5)
            b = _fetch(cursor, "b", 0)
            assert [r["offset"] for r in b["records"]] == [0, 1, 2]
            c = _fetch(cursor, "c", 2)
            assert [(r["offset"], r["transactionId"]) for r in c["records"]] == [
                (2, "c2"), (3, "c3"), (4, "c4")]
            assert (c["logStartOffset"], c["highWatermark"]) == (2, 5)

            # after the upgrade: pushes go on densely, pops hand out the offsets
            _push(cursor, "a", ["a1", "a6"])
            cursor.execute("SELECT queen.pop_specific_batch(%s::jsonb)", (psycopg2.extras.Json([
                {"idx": 0, "queue_name": "upgraded", "partition_name": "b",
                 "consumer_group": "__QUEUE_MODE__", "batch_size": 5, "worker_id": "w"}]),))
            [(popped,)] = cursor.fetchall()
            assert [m["offset"] for m in popped[0]["result"]["messages"]] == [0, 1, 2]
            assert [r["offset"] for r in _fetch(cursor, "a", 4)["records"]] == [4, 5]
            cursor.execute("""SELECT count(*) FROM queen.partitions
                               WHERE last_write_at IS DISTINCT FROM last_message_at
                                 AND name <> 'a'""")
            assert cursor.fetchone()[0] == 0
    finally:
        connection.close()


CLIENT_POP = """
async def scenario(client, args):
    messages = await client.queue(args["queue"]).batch(3).wait(False).pop()
    return [[m.get("offset"), m.get("deliveryAttempt")] for m in messages]
"""


def test_the_2_6_client_pops_offsets_and_delivery_attempts(http, server):
    queue = unique_name()
    push(http, queue, ["a", "b", "c", "d"])
    assert run26(server.url, CLIENT_POP, queue=queue) == [[0, 1], [1, 1], [2, 1]]
