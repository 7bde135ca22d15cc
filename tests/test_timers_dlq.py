"""Timers whose fire fails for good are dead letters (WIRE2.md 3.4, WIRE.md 3.3).

``GET /api/v1/dlq`` lists them under the consumer group ``__timer__`` with the message they
promised, paged together with the messages' dead letters; the message routes that retry or
delete a dead letter by (partitionId, transactionId) reach them too. Real server, real
PostgreSQL; the sweeper does the failing where it matters, ``queen.timers_failed`` (the
function the sweeper calls) where only the dead letter's listing is the point.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Dict, List

import httpx
import zstandard

from tests.client26 import run26
from tests.http_helpers import ack, configure, dead_letters, pop, push
from tests.support import unique_name, wait_until
from tests.test_timers import batch, delivered, peek, schedule_op, stored_messages, timer_row

TIMER_GROUP = "__timer__"


def listing(http: httpx.Client, **params: Any) -> Dict[str, Any]:
    answer = http.get("/api/v1/dlq", params=params)
    assert answer.status_code == 200, answer.text
    return answer.json()


def kill_timer(db: Any, queue: str, key: str, error: str = "it never fits") -> None:
    """Five failed fires, as the sweeper records them: the fifth moves the timer to the
    dead letters."""
    with db.cursor() as cursor:
        for attempt in range(1, 6):
            cursor.execute("SELECT queen.timers_failed(ARRAY[%s], ARRAY[%s], ARRAY[%s])",
                           (queue, key, f"{error} ({attempt})"))
            assert cursor.fetchone()[0] == (1 if attempt == 5 else 0)


def dead_timer(http: httpx.Client, db: Any, queue: str, key: str, payload: Any,
               **extra: Any) -> Dict[str, Any]:
    """Schedules a timer far ahead and kills it; returns its schedule result."""
    [result] = batch(http, schedule_op(queue, key, payload, 60_000, **extra))
    kill_timer(db, queue, key)
    return result


def rush_failed_fires(db: Any, queue: str) -> None:
    """Makes ``queue``'s timers due again now (skips their 1, 2, 4, 8 s backoff), so the
    sweeper's next pass fires (and fails) them again."""
    with db.cursor() as cursor:
        cursor.execute("UPDATE queen.timers SET visible_at = now()"
                       " WHERE queue = %s AND claim_token IS NULL", (queue,))


def full_queue(http: httpx.Client, queue: str) -> str:
    """A queue at its maxSize (1); returns its Default partition's id."""
    configure(http, queue, maxSize=1)
    [pushed] = push(http, queue, [{"fills": "it"}], prefix="filler-")
    return pushed["partition_id"]


def operator_dead_letter(http: httpx.Client, queue: str, prefix: str) -> Dict[str, Any]:
    """A message's dead letter (the operator's dlq action on a fresh message)."""
    [pushed] = push(http, queue, [{"message": prefix}], prefix=prefix)
    answer = http.post(f"/api/v1/messages/{pushed['partition_id']}/{prefix}0/dlq",
                       json={"error": f"{prefix} failed"})
    assert answer.status_code == 200, answer.text
    return pushed


# -- the listing ------------------------------------------------------------------------------

def test_a_timer_its_full_queue_refuses_five_times_is_listed_under_the_timer_group(http, db):
    queue = unique_name()
    partition_id = full_queue(http, queue)
    [scheduled] = batch(http, schedule_op(queue, "expire", {"orderId": 7}, 0, txn="order-7"))

    def listed() -> Any:
        rush_failed_fires(db, queue)
        return listing(http, queue=queue, consumerGroup=TIMER_GROUP)["messages"]
    [row] = wait_until(listed, 60, message="the timer's dead letter")

    assert row["consumerGroup"] == TIMER_GROUP
    assert (row["id"], row["transactionId"]) == (scheduled["messageId"], "order-7")
    assert (row["queue"], row["partition"], row["partitionId"]) == (queue, "Default",
                                                                    partition_id)
    assert row["data"] == {"orderId": 7} and row["timerKey"] == "expire"
    assert row["retryCount"] == 5 and "max capacity" in row["errorMessage"]
    assert row["createdAt"] <= row["failedAt"] and "isEncrypted" not in row
    assert peek(http, queue, "expire")["found"] is False
    assert len(stored_messages(db, queue)) == 1  # nothing but the filler was delivered


def test_the_official_client_reads_a_dead_timers_payload(http, db, server):
    queue = unique_name()
    scheduled = dead_timer(http, db, queue, "k", {"invoice": 42})
    seen = run26(server.url, """
async def scenario(client, args):
    return await client.queue(args["queue"]).dlq("__timer__").limit(10).get()
""", queue=queue)
    assert seen["total"] == 1, seen
    [row] = seen["messages"]
    assert (row["id"], row["data"]) == (scheduled["messageId"], {"invoice": 42})


def test_message_dead_letters_list_as_before_and_the_group_filters_keep_kinds_apart(http, db):
    queue = unique_name()
    configure(http, queue)
    push(http, queue, [{"n": 1}], prefix="m")
    message = pop(http, queue)["messages"][0]
    ack(http, message, "dlq", error="bad payload")
    dead_timer(http, db, queue, "k", {"timer": True})

    mine = listing(http, queue=queue, consumerGroup="__QUEUE_MODE__")
    [row] = mine["messages"]
    assert mine["total"] == 1
    assert {key: row[key] for key in ("transactionId", "consumerGroup", "data")} == {
        "transactionId": "m0", "consumerGroup": "__QUEUE_MODE__", "data": {"n": 1}}
    assert "bad payload" in row["errorMessage"] and "timerKey" not in row
    assert row["partitionId"] == message["partitionId"]
    timers_only = listing(http, queue=queue, consumerGroup=TIMER_GROUP)
    assert [r["consumerGroup"] for r in timers_only["messages"]] == [TIMER_GROUP]
    assert listing(http, queue=queue, consumerGroup="other")["total"] == 0
    both = dead_letters(http, queue)
    assert both["total"] == 2
    assert [r["consumerGroup"] for r in both["messages"]] == [TIMER_GROUP, "__QUEUE_MODE__"]


def test_pages_interleave_both_kinds_newest_failure_first(http, db):
    queue = unique_name()
    configure(http, queue)
    for n in range(3):  # failures alternate between the kinds, each in its own transaction
        operator_dead_letter(http, queue, f"msg{n}-")
        dead_timer(http, db, queue, f"timer{n}", {"n": n})
    everything = listing(http, queue=queue, limit=100)
    names = [r.get("timerKey") or r["transactionId"] for r in everything["messages"]]
    assert names == ["timer2", "msg2-0", "timer1", "msg1-0", "timer0", "msg0-0"]
    assert [r["failedAt"] for r in everything["messages"]] == sorted(
        (r["failedAt"] for r in everything["messages"]), reverse=True)

    paged: List[str] = []
    for offset in range(0, 7, 2):
        page = listing(http, queue=queue, limit=2, offset=offset)
        assert (page["total"], page["limit"], page["offset"]) == (6, 2, offset)
        assert page["pagination"] == {"limit": 2, "offset": offset}
        paged += [r.get("timerKey") or r["transactionId"] for r in page["messages"]]
    assert paged == names


def test_partition_and_time_filters_apply_to_dead_timers(http, db):
    queue = unique_name()
    dead_timer(http, db, queue, "a", {"p": "x"}, partition="px")
    dead_timer(http, db, queue, "b", {"p": "y"}, partition="py")
    only_y = listing(http, queue=queue, partition="py")
    assert [r["timerKey"] for r in only_y["messages"]] == ["b"] and only_y["total"] == 1
    [newest, oldest] = listing(http, queue=queue)["messages"]
    since = listing(http, queue=queue, **{"from": newest["failedAt"]})
    assert [r["timerKey"] for r in since["messages"]] == ["b"]
    # failedAt is shown to the millisecond: "to" the older one's millisecond + 1 keeps it
    until = listing(http, queue=queue, to=oldest["failedAt"].replace("Z", "999Z"))
    assert "a" in [r["timerKey"] for r in until["messages"]]
    assert listing(http, queue=unique_name())["total"] == 0


def test_a_dead_timer_without_a_queue_lists_with_no_partition_id(http, db):
    queue = unique_name()  # never configured, never pushed to: no queue row at all
    scheduled = dead_timer(http, db, queue, "orphan", {"lost": True})
    [row] = listing(http, queue=queue)["messages"]
    assert row["partitionId"] is None and row["id"] == scheduled["messageId"]
    assert row["data"] == {"lost": True}


def test_an_encrypted_queues_dead_timer_lists_decrypted(http, db):
    queue = unique_name()
    configure(http, queue, encryptionEnabled=True)
    dead_timer(http, db, queue, "secret", {"card": "4111"})
    with db.cursor() as cursor:
        cursor.execute("SELECT encrypted, payload FROM queen.timer_dead_letters"
                       " WHERE queue = %s", (queue,))
        [(encrypted, stored)] = cursor.fetchall()
    assert encrypted is True and b"4111" not in bytes(stored)
    [row] = listing(http, queue=queue)["messages"]
    assert row["data"] == {"card": "4111"} and "isEncrypted" not in row


def test_a_zstd_timer_lists_its_decompressed_body(http, db):
    queue = unique_name()
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(
        json.dumps({"big": "z" * 500}).encode())
    [scheduled] = batch(http, dict(schedule_op(queue, "z", delay_ms=60_000),
                                   payload=base64.b64encode(frame).decode(), payloadZstd=True))
    kill_timer(db, queue, "z")
    [row] = listing(http, queue=queue)["messages"]
    assert (row["id"], row["data"]) == (scheduled["messageId"], {"big": "z" * 500})


def test_a_dead_timer_whose_payload_is_no_json_lists_its_bytes_in_base64(http, db):
    queue = unique_name()
    batch(http, schedule_op(queue, "bad", {"fine": 1}, 60_000))
    with db.cursor() as cursor:  # the corrupted row the sweeper cannot push, then kills
        cursor.execute("UPDATE queen.timers SET payload = '\\xff7b6272'::bytea"
                       " WHERE queue = %s", (queue,))
    kill_timer(db, queue, "bad")
    [row] = listing(http, queue=queue)["messages"]
    assert base64.b64decode(row["data"]) == b"\xff{br"


# -- the message routes on a dead timer ----------------------------------------------------

def test_retrying_a_dead_timer_schedules_it_due_now_and_it_fires_its_promised_message(
        http, db):
    queue = unique_name()
    partition_id = full_queue(http, queue)
    scheduled = dead_timer(http, db, queue, "k", {"again": True}, txn="promise-1")
    ack(http, pop(http, queue)["messages"][0])  # the filler is consumed
    configure(http, queue)  # and the operator lifts the limit

    answer = http.post(f"/api/v1/messages/{partition_id}/promise-1/retry")
    assert answer.status_code == 200, answer.text
    retried = answer.json()
    assert retried["success"] is True and retried["timerKey"] == "k"
    assert (retried["messageId"], retried["transactionId"]) == (scheduled["messageId"],
                                                                "promise-1")
    assert listing(http, queue=queue)["total"] == 0
    message = delivered(http, queue)
    assert (message["id"], message["transactionId"], message["data"]) == (
        scheduled["messageId"], "promise-1", {"again": True})
    assert timer_row(db, queue, "k") is None


def test_retrying_a_dead_timer_whose_key_is_scheduled_again_is_409_and_keeps_it(http, db):
    queue = unique_name()
    configure(http, queue)
    [pushed] = push(http, queue, [{"x": 1}])
    dead_timer(http, db, queue, "k", {"old": True}, txn="old-txn")
    batch(http, schedule_op(queue, "k", {"new": True}, 60_000, txn="new-txn"))
    answer = http.post(f"/api/v1/messages/{pushed['partition_id']}/old-txn/retry")
    assert answer.status_code == 409, answer.text
    assert "scheduled again" in answer.json()["error"]
    assert listing(http, queue=queue)["total"] == 1
    assert peek(http, queue, "k")["txn"] == "new-txn"


def test_deleting_a_dead_timer_forgets_it_and_a_second_delete_is_404(http, db):
    queue = unique_name()
    configure(http, queue)
    [pushed] = push(http, queue, [{"x": 1}])
    dead_timer(http, db, queue, "k", {"bye": True}, txn="gone")
    path = f"/api/v1/messages/{pushed['partition_id']}/gone"
    answer = http.delete(path)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"success": True, "partitionId": pushed["partition_id"],
                             "transactionId": "gone", "message": "Timer dead letter deleted"}
    assert listing(http, queue=queue)["total"] == 0
    assert http.delete(path).status_code == 404
    assert http.post(f"{path}/retry").status_code == 404


def test_no_route_answers_500_while_a_dead_timer_exists(http, db):
    queue = unique_name()
    configure(http, queue)
    [pushed] = push(http, queue, [{"x": 1}])
    dead_timer(http, db, queue, "k", {"still": "here"}, txn="dead")
    message_path = f"/api/v1/messages/{pushed['partition_id']}/dead"
    assert http.get(message_path).status_code == 404  # no message was ever stored
    assert http.post(f"{message_path}/dlq").status_code == 404
    for path in ("/api/v1/dlq", f"/api/v1/dlq?queue={queue}&consumerGroup={TIMER_GROUP}",
                 "/api/v1/status", "/api/v1/resources/overview",
                 f"/api/v1/resources/queues/{queue}", f"/api/v1/messages?queue={queue}",
                 "/metrics", "/api/v1/analytics/system-metrics"):
        answer = http.get(path)
        assert answer.status_code == 200, (path, answer.text)


def test_a_queue_delete_takes_its_timer_dead_letters_with_it(http, db):
    """They are keyed by the queue's name, past the delete's cascade: a queue made again
    under the name listed the old queue's dead timer as its own (and could retry it)."""
    queue = unique_name()
    configure(http, queue)
    dead_timer(http, db, queue, "k", {"x": 1}, txn="dead-1")
    assert [r["transactionId"] for r in listing(http, queue=queue)["messages"]] == ["dead-1"]

    assert http.delete(f"/api/v1/resources/queues/{queue}").status_code == 200
    push(http, queue, ["fresh"])

    assert listing(http, queue=queue)["messages"] == []
    with db.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM queen.timer_dead_letters WHERE queue = %s",
                       (queue,))
        assert cursor.fetchone()[0] == 0
