"""Timers whose partition another transaction holds (sql/functions/062_timers.sql,
``queen.timers_lock_targets``): they wait, in order, while every other due timer fires; a
capacity-limited queue held holds back all its partitions and nothing else; a partition's
later timers never overtake an earlier one another sweeper holds; a partition busy with
pushes still gets its timers; the encrypting (claimed) path gives its claim up instead of
waiting; and sweeps racing pushes to several partitions lose no message and fail no push
(a sweep holds partitions out of id order, so its waits must end before a deadlock check).

A sweep is called directly over SQL where the test must know what one sweep did. Those rows
are scheduled far ahead and made due inside the sweeping transaction itself, so the shared
server's sweeper cannot take them first (the pattern of test_timers' claim tests). The
sweeping connection has a lock_timeout: a sweep that waited on the held partition fails the
test instead of hanging it.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from typing import Any, Dict, List

import httpx
import psycopg2
import psycopg2.extras
import pytest

from tests.http_helpers import configure, push
from tests.support import unique_name, wait_until
from tests.test_timers import batch, schedule_op, stored_messages

FAR_MS = 600_000  # scheduled this far ahead, made due by the test's own transaction


@pytest.fixture
def sweeping(pg_dsn: str) -> Iterator[Any]:
    """A connection that sweeps by hand; a wait of 5 s on a lock fails its statement."""
    connection = psycopg2.connect(pg_dsn)
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute("SET lock_timeout = '5s'")
    try:
        yield connection
    finally:
        connection.close()


def hold_partition(holder: Any, queue: str, partition: str = "Default") -> None:
    with holder.cursor() as cursor:
        cursor.execute("SELECT 1 FROM queen.partitions p JOIN queen.queues q ON q.id = p.queue_id"
                       " WHERE q.name = %s AND p.name = %s FOR UPDATE OF p", (queue, partition))
        assert cursor.rowcount == 1


def sweep_now(sweeping: Any, queues: List[str], limit: int) -> Dict[str, Any]:
    """One sweep of ``limit`` rows in a transaction that first makes ``queues``' timers due,
    keeping their order."""
    with sweeping.cursor() as cursor:
        cursor.execute("BEGIN")
        cursor.execute("UPDATE queen.timers SET visible_at = deliver_at - interval '1 hour'"
                       " WHERE queue = ANY(%s)", (queues,))
        cursor.execute("SELECT queen.timers_sweep(%s, 30000)", (limit,))
        answer = cursor.fetchone()[0]
        cursor.execute("COMMIT")
    return answer


def timer_count(db: Any, queue: str) -> int:
    with db.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM queen.timers WHERE queue = %s", (queue,))
        return cursor.fetchone()[0]


def schedule_in_order(http: Any, queue: str, count: int, partition: str = "Default",
                      delay_ms: float = FAR_MS) -> List[str]:
    """``count`` timers due one millisecond apart; their keys in firing order."""
    keys = [f"k{n:03d}" for n in range(count)]
    batch(http, *[schedule_op(queue, key, {"n": n}, delay_ms + n, partition=partition)
                  for n, key in enumerate(keys)])
    return keys


def test_a_held_partition_defers_only_its_timers_which_fire_in_order_once_released(
        http, db, holder, sweeping):
    held, free = unique_name(), unique_name()
    push(http, held, [{"first": True}])  # the partition exists: the holder locks its row
    held_keys = schedule_in_order(http, held, 12)
    schedule_in_order(http, free, 3, delay_ms=FAR_MS + 1000)  # due after every held one
    hold_partition(holder, held)

    # A batch of 5 meets held rows first: the rows of the held partition are left, and the
    # sweep takes the free queue's in their place.
    answer = sweep_now(sweeping, [held, free], limit=5)
    assert answer["deferred"] >= 5 and answer["nextDueMs"] <= 0, answer
    assert [row[2] for row in stored_messages(db, free)] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert timer_count(db, held) == 12
    assert len(stored_messages(db, held)) == 1

    holder.rollback()  # released: the server's sweeper (or ours) fires them, in order
    sweep_now(sweeping, [held], limit=5)
    wait_until(lambda: timer_count(db, held) == 0, message="the held partition's timers")
    stored = stored_messages(db, held)
    assert [row[2] for row in stored] == [{"first": True}] + [{"n": n} for n in range(12)]
    assert [row[1] for row in stored[1:]] == [f"txn-{key}" for key in held_keys]


def test_a_missing_partition_is_created_and_fired_alongside_a_held_one(
        http, db, holder, sweeping):
    held, new = unique_name(), unique_name()
    push(http, held, [{"first": True}])
    schedule_in_order(http, held, 2)
    schedule_in_order(http, new, 2, partition="fresh")
    http.delete(f"/api/v1/resources/queues/{new}")  # the timers re-create it when they fire
    hold_partition(holder, held)

    answer = sweep_now(sweeping, [held, new], limit=10)
    assert answer["deferred"] >= 2, answer
    assert [row[2] for row in stored_messages(db, new)] == [{"n": 0}, {"n": 1}]
    assert timer_count(db, held) == 2
    holder.rollback()  # (due now: they must not take the next test's sweep)
    wait_until(lambda: timer_count(db, held) == 0, message="the released timers")


def test_a_held_capacity_limited_queue_defers_all_its_partitions_and_others_fire(
        http, db, holder, sweeping):
    capped, free = unique_name(), unique_name()
    configure(http, capped, maxSize=1000)
    partitions = [f"p{n}" for n in range(10)]  # more than a sweep's rounds
    for n, name in enumerate(partitions):
        push(http, capped, [{"warm": name}], partition=name, prefix=f"warm-{name}-")
        batch(http, schedule_op(capped, f"k-{name}", {"n": n}, FAR_MS + n, partition=name))
    schedule_in_order(http, free, 1, delay_ms=FAR_MS + 1000)
    with holder.cursor() as cursor:  # what every push to a capped queue takes, kept open
        cursor.execute("SELECT 1 FROM queen.queues WHERE name = %s FOR NO KEY UPDATE",
                       (capped,))

    # A batch of 1 meets the capped queue's rows first; the whole queue is left at once,
    # not one partition a round until the rounds run out.
    sweep_now(sweeping, [capped, free], limit=1)
    assert [row[2] for row in stored_messages(db, free)] == [{"n": 0}]
    assert len(stored_messages(db, capped)) == len(partitions)
    holder.rollback()
    wait_until(lambda: timer_count(db, capped) + timer_count(db, free) == 0,
               message="every timer once the queue is released")


def test_a_partitions_later_timers_wait_for_an_earlier_one_another_sweeper_holds(
        http, db, holder, sweeping, pg_dsn):
    queue = unique_name()
    push(http, queue, [{"first": True}])
    keys = schedule_in_order(http, queue, 5)
    hold_partition(holder, queue)  # so that no sweeper fires them while they become due
    with db.cursor() as cursor:
        cursor.execute("UPDATE queen.timers SET visible_at = deliver_at - interval '1 hour'"
                       " WHERE queue = %s", (queue,))
    other_sweeper = psycopg2.connect(pg_dsn)  # holds the first timer, as a sweep in progress
    try:
        with other_sweeper.cursor() as cursor:
            cursor.execute("SELECT 1 FROM queen.timers WHERE queue = %s AND timer_key = %s"
                           " FOR UPDATE", (queue, keys[0]))
        holder.rollback()  # the partition is free; its first timer is not
        with sweeping.cursor() as cursor:
            cursor.execute("SELECT queen.timers_sweep(100, 30000)")
        assert len(stored_messages(db, queue)) == 1  # k001.. did not overtake k000
        assert timer_count(db, queue) == 5
    finally:
        other_sweeper.rollback()
        other_sweeper.close()
    wait_until(lambda: timer_count(db, queue) == 0, message="the timers, in order")
    assert [row[1] for row in stored_messages(db, queue)[1:]] == [f"txn-{key}" for key in keys]


def keep_pushing(url: str, queue: str, partitions: List[str], tag: str,
                 stop: threading.Event, counts: List[int], errors: List[str]) -> None:
    """Pushes one message to each of ``partitions`` (in a random order) per request until
    ``stop``; counts what it pushed and keeps any refusal."""
    order = random.Random(tag)
    with httpx.Client(base_url=url, timeout=40) as client:
        while not stop.is_set():
            names = order.sample(partitions, len(partitions))
            answer = client.post("/api/v1/push", json={"items": [
                {"queue": queue, "partition": name, "payload": {"load": tag},
                 "transactionId": f"{tag}-{counts[0]}-{name}"} for name in names]})
            if answer.status_code != 201:
                errors.append(answer.text)
                return
            counts[0] += 1


def run_pushers(server: Any, queue: str, partitions: List[str], how_many: int) -> Any:
    """Starts ``how_many`` pushers; returns their stop event, threads, counts and the
    refusals they met (for :func:`stop_pushers` and the test's checks)."""
    stop = threading.Event()
    counts = [[0] for _ in range(how_many)]
    errors: List[str] = []
    threads = [threading.Thread(target=keep_pushing, args=(
        server.url, queue, partitions, f"pusher{n}", stop, counts[n], errors))
        for n in range(how_many)]
    for thread in threads:
        thread.start()
    return stop, threads, counts, errors


def stop_pushers(stop: threading.Event, threads: List[threading.Thread]) -> None:
    stop.set()
    for thread in threads:
        thread.join()


def test_timers_of_a_partition_busy_with_pushes_still_fire(http, db, server):
    # A guard, not a proof of the wait: the sweep must get a partition that pushes keep
    # taking, and fire its timers in order among them.
    queue = unique_name()
    push(http, queue, [{"warm": True}])
    stop, threads, counts, errors = run_pushers(server, queue, ["Default"], 3)
    try:
        schedule_in_order(http, queue, 20, delay_ms=0)
        wait_until(lambda: timer_count(db, queue) == 0, message="timers of a busy partition")
    finally:
        stop_pushers(stop, threads)
    assert errors == []
    fired = [row[2] for row in stored_messages(db, queue) if "n" in (row[2] or {})]
    assert fired == [{"n": n} for n in range(20)]
    assert len(stored_messages(db, queue)) == 1 + 20 + sum(count[0] for count in counts)


def test_a_claimed_fire_gives_its_claim_up_when_the_partition_is_held(
        http, db, holder, sweeping):
    queue = unique_name()
    configure(http, queue)
    push(http, queue, [{"first": True}])
    [result] = batch(http, schedule_op(queue, "k", {"pin": "4321"}, FAR_MS))
    configure(http, queue, encryptionEnabled=True)  # the plain timer now needs the server
    claimed = sweep_now(sweeping, [queue], limit=10)["claimed"]
    assert [row["timerKey"] for row in claimed["rows"]] == ["k"]

    hold_partition(holder, queue)
    rows = [{"queue": queue, "timerKey": "k", "payload": {"pin": "4321"}, "isEncrypted": False}]
    with sweeping.cursor() as cursor:  # (one transaction: no sweeper claims it meanwhile)
        cursor.execute("BEGIN")
        cursor.execute("SELECT queen.timers_fire_claimed(%s, %s::jsonb)",
                       (claimed["token"], psycopg2.extras.Json(rows)))
        answer = cursor.fetchone()[0]
        assert (answer["fired"], answer["deferred"]) == (0, 1), answer
        cursor.execute("SELECT claim_token IS NULL, visible_at <= clock_timestamp()"
                       " FROM queen.timers WHERE queue = %s", (queue,))
        assert cursor.fetchone() == (True, True)
        cursor.execute("COMMIT")

    holder.rollback()  # the server's sweeper claims it anew and fires it encrypted
    wait_until(lambda: timer_count(db, queue) == 0, message="the released claimed timer")
    [_, (message_id, _, payload, is_encrypted, _)] = stored_messages(db, queue)
    assert message_id == result["messageId"] and is_encrypted is True
    assert "4321" not in str(payload)


def test_sweeps_racing_multi_partition_pushes_lose_nothing_and_fail_no_push(
        http, db, server):
    queue = unique_name()
    partitions = [f"p{n}" for n in range(6)]
    for name in partitions:
        push(http, queue, [{"warm": name}], partition=name, prefix=f"warm-{name}-")
    stop, threads, counts, errors = run_pushers(server, queue, partitions, 4)
    try:
        for wave in range(5):  # due now, while the pushes go on
            batch(http, *[schedule_op(queue, f"w{wave}-{name}", {"wave": wave}, 0,
                                      partition=name) for name in partitions])
            wait_until(lambda: timer_count(db, queue) == 0, message=f"wave {wave} fired")
    finally:
        stop_pushers(stop, threads)
    assert errors == []
    stored = stored_messages(db, queue)
    pushed = sum(count[0] for count in counts) * len(partitions)
    assert len(stored) == len(partitions) + pushed + 5 * len(partitions)
    assert len({row[1] for row in stored}) == len(stored)


def test_a_row_to_claim_waits_with_the_others_of_its_held_partition(
        http, db, holder, sweeping):
    queue = unique_name()
    configure(http, queue)
    push(http, queue, [{"first": True}])
    batch(http, schedule_op(queue, "k0", {"plain": True}, FAR_MS))  # claimed once encrypting
    configure(http, queue, encryptionEnabled=True)
    batch(http, schedule_op(queue, "k1", {"sealed": True}, FAR_MS + 1))  # fired directly
    hold_partition(holder, queue)

    answer = sweep_now(sweeping, [queue], limit=10)
    claimed = (answer["claimed"] or {}).get("rows", [])
    assert [row for row in claimed if row["queue"] == queue] == [], answer
    assert timer_count(db, queue) == 2

    holder.rollback()  # both fire (a claimed row's place is not kept: see README, Timers)
    wait_until(lambda: timer_count(db, queue) == 0, message="both timers")
    assert sorted(row[1] for row in stored_messages(db, queue)[1:]) == ["txn-k0", "txn-k1"]
