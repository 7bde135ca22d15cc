"""Timers (WIRE2.md 3) over raw HTTP and through the official 2.6.0 client: schedule,
reschedule and cancel in one batch, the cancel route, peek and list, every refusal in the
{error, reason, detail} envelope, and firing: the message carries the id and transactionId
promised at schedule time, arrives not before deliverAt, wakes a parked long-poll, dedupes on
its txn, follows the queue's encryption, re-creates a deleted queue, and a fire the queue
refuses counts attempts and ends in queen.timer_dead_letters.

The shared server sweeps with the default settings; the waits are ceilings, never timings.
"""

from __future__ import annotations

import base64
import decimal
import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any, Dict, List, Optional
from urllib.parse import quote

import httpx
import jwt
import pytest
import pytest_twisted
import zstandard

from queen_tw.engine.timers import TimersEngine
from queen_tw.engine.waiters import WaiterRegistry

from tests.client26 import run26
from tests.engine_support import in_process_engine
from tests.http_helpers import configure, pop, push
from tests.support import running_server, unique_name, wait_until

ISO6 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


def b64(value: Any) -> str:
    return base64.b64encode(json.dumps(value).encode()).decode()


def schedule_op(queue: str, key: str, payload: Any = None, delay_ms: float = 0,
                **extra: Any) -> Dict[str, Any]:
    return {"op": "schedule", "queue": queue, "timerKey": key,
            "payload": b64({"key": key} if payload is None else payload),
            "delayMs": delay_ms, "txn": extra.pop("txn", f"txn-{key}"), **extra}


def batch(http: httpx.Client, *ops: Dict[str, Any]) -> List[Dict[str, Any]]:
    answer = http.post("/api/v1/timers", json={"operations": list(ops)})
    assert answer.status_code == 200, answer.text
    return answer.json()["results"]


def refused(http: httpx.Client, body: Any, status: int = 400, **kwargs: Any) -> Dict[str, Any]:
    answer = http.post("/api/v1/timers", json=body, **kwargs) if "content" not in kwargs \
        else http.post("/api/v1/timers", **kwargs)
    assert answer.status_code == status, answer.text
    envelope = answer.json()
    assert set(envelope) == {"error", "reason", "detail"}, envelope
    return envelope


def peek(http: httpx.Client, queue: str, key: str) -> Dict[str, Any]:
    answer = http.get(f"/api/v1/timers/{queue}/{key}")
    assert answer.status_code == 200, answer.text
    return answer.json()


def delivered(http: httpx.Client, queue: str, within: float = 30.0) -> Dict[str, Any]:
    """The next message of ``queue`` (auto-acked), waiting for the sweeper to fire it."""
    def one() -> Optional[Dict[str, Any]]:
        body = pop(http, queue, autoAck="true")
        return body["messages"][0] if body else None
    return wait_until(one, within, message=f"a fired timer in {queue}")


def stored_messages(db: Any, queue: str) -> List[tuple]:
    with db.cursor() as cursor:
        cursor.execute(
            "SELECT m.id::text, m.transaction_id, m.payload, m.is_encrypted, m.created_at"
            "  FROM queen.messages m JOIN queen.partitions p ON p.id = m.partition_id"
            "  JOIN queen.queues q ON q.id = p.queue_id WHERE q.name = %s ORDER BY m.seq",
            (queue,))
        return cursor.fetchall()


def timer_row(db: Any, queue: str, key: str) -> Optional[tuple]:
    with db.cursor() as cursor:
        cursor.execute("SELECT attempts, last_error FROM queen.timers"
                       " WHERE queue = %s AND timer_key = %s", (queue, key))
        return cursor.fetchone()


# -- schedule, reschedule, cancel ---------------------------------------------------------

def test_schedule_promises_the_id_and_txn_the_fired_message_carries(http, db):
    queue = unique_name()
    [result] = batch(http, schedule_op(queue, "order-9", {"orderId": 9}, 200,
                                       partition="p1", txn="fire-order-9"))
    assert result["ok"] is True and result["status"] == "scheduled"
    assert (result["queue"], result["timerKey"], result["txn"]) == (queue, "order-9",
                                                                      "fire-order-9")
    assert uuid.UUID(result["messageId"]).version == 7
    assert ISO6.fullmatch(result["deliverAt"])
    message = delivered(http, queue)
    assert message["id"] == result["messageId"]
    assert message["transactionId"] == "fire-order-9"
    assert message["partition"] == "p1"
    assert message["data"] == {"orderId": 9}
    [(_, _, _, _, created_at)] = stored_messages(db, queue)
    promised = datetime.fromisoformat(result["deliverAt"].replace("Z", "+00:00"))
    assert created_at >= promised  # "not before", never early
    assert peek(http, queue, "order-9") == {"found": False, "queue": queue,
                                            "timerKey": "order-9"}


def test_reschedule_replaces_payload_txn_and_id_and_only_it_fires(http, db):
    queue = unique_name()
    [first] = batch(http, schedule_op(queue, "k", {"v": 1}, 60_000))
    [second] = batch(http, dict(schedule_op(queue, "k", {"v": 2}, 100, txn="second"),
                                op="reschedule"))
    assert second["status"] == "rescheduled" and second["ok"] is True
    assert second["messageId"] != first["messageId"] and second["txn"] == "second"
    message = delivered(http, queue)
    assert (message["id"], message["data"]) == (second["messageId"], {"v": 2})
    assert len(stored_messages(db, queue)) == 1


def test_a_reschedule_after_failed_fires_starts_its_attempts_again(http, db):
    queue = unique_name()
    with db.cursor() as cursor:
        batch(http, schedule_op(queue, "k", {"v": 1}, 60_000))
        cursor.execute("UPDATE queen.timers SET attempts = 3, last_error = 'boom'"
                       " WHERE queue = %s", (queue,))
    batch(http, schedule_op(queue, "k", {"v": 1}, 60_000))
    assert timer_row(db, queue, "k") == (0, None)


def test_cancel_route_answers_cancelled_then_absent_with_the_callers_txn(http):
    queue = unique_name()
    batch(http, schedule_op(queue, "a/b/c", delay_ms=60_000, txn="t-abc"))
    answer = http.delete(f"/api/v1/timers/{queue}/a/b/c")
    assert answer.status_code == 200
    assert answer.json() == {"ok": True, "status": "cancelled", "queue": queue,
                             "timerKey": "a/b/c", "txn": "t-abc"}
    again = http.delete(f"/api/v1/timers/{queue}/a/b/c", params={"txn": "t-abc"})
    assert again.json() == {"ok": False, "status": "absent", "queue": queue,
                            "timerKey": "a/b/c", "txn": "t-abc"}
    bare = http.delete(f"/api/v1/timers/{queue}/a/b/c").json()
    assert bare["status"] == "absent" and bare["txn"] is None


def test_keys_with_odd_characters_are_reachable_by_their_paths(http):
    queue = unique_name()
    keys = ["a/", "a//b", "%", "%2F", "é/ü", "?x", "#h", "a b", "+", "line\nbreak", "tab\t"]
    batch(http, *[schedule_op(queue, key, delay_ms=60_000) for key in keys])
    for key in keys:  # encoded as the 2.6.0 client does: '/' kept
        path = f"/api/v1/timers/{quote(queue, safe='')}/{quote(key, safe='/')}"
        assert http.get(path).json()["timerKey"] == key
        assert http.delete(path).json()["status"] == "cancelled", key


def test_batch_mixes_schedule_and_cancel_index_aligned(http):
    queue = unique_name()
    batch(http, schedule_op(queue, "old", delay_ms=60_000))
    results = batch(http, schedule_op(queue, "new", delay_ms=60_000),
                    {"op": "cancel", "queue": queue, "timerKey": "old"},
                    {"op": "cancel", "queue": queue, "timerKey": "never", "txn": "x"})
    assert [r["status"] for r in results] == ["scheduled", "cancelled", "absent"]
    assert results[2]["txn"] == "x"
    assert peek(http, queue, "old")["found"] is False
    assert peek(http, queue, "new")["found"] is True


def test_concurrent_calls_naming_new_keys_in_other_orders_never_deadlock(server):
    queue = unique_name()
    keys = [f"k{n:03d}" for n in range(250)]
    statuses: List[int] = []

    def call(seed: int) -> None:
        order = keys[seed % 2::2] + keys[1 - seed % 2::2]  # two interleaved orders
        order = order if seed % 4 < 2 else order[::-1]
        with httpx.Client(base_url=server.url, timeout=40) as client:
            for round_ in range(10):
                answer = client.post("/api/v1/timers", json={"operations": [
                    schedule_op(queue, f"r{round_}-{key}", delay_ms=60_000) for key in order]})
                statuses.append(answer.status_code)

    threads = [threading.Thread(target=call, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert statuses == [200] * 80


def test_a_claimed_timer_is_too_late_to_reschedule_or_cancel(http, db):
    queue = unique_name()
    batch(http, schedule_op(queue, "k", delay_ms=60_000))
    with db.cursor() as cursor:  # as a sweeper holding it mid-fire
        cursor.execute("UPDATE queen.timers SET claim_token = gen_random_uuid(),"
                       " claimed_until = now() + interval '1 hour',"
                       " visible_at = now() + interval '1 hour' WHERE queue = %s", (queue,))
    assert peek(http, queue, "k")["claimed"] is True
    [again] = batch(http, schedule_op(queue, "k", delay_ms=5))
    assert again == {"ok": False, "status": "too_late", "queue": queue, "timerKey": "k"}
    cancel = http.delete(f"/api/v1/timers/{queue}/k").json()
    assert cancel["status"] == "too_late" and cancel["ok"] is False
    assert peek(http, queue, "k")["found"] is True


# -- reads ----------------------------------------------------------------------------------

def test_peek_shows_the_row_and_its_payload_as_sent(http):
    queue = unique_name()
    payload = b64({"hello": "world"})
    [result] = batch(http, dict(schedule_op(queue, "k1", delay_ms=60_000), payload=payload,
                                partition="px"))
    seen = peek(http, queue, "k1")
    assert seen["found"] is True and seen["payload"] == payload
    assert {k: seen[k] for k in ("queue", "timerKey", "partition", "txn", "messageId",
                                 "deliverAt", "payloadZstd", "encrypted", "producerSub",
                                 "attempts", "lastError", "claimed")} == {
        "queue": queue, "timerKey": "k1", "partition": "px", "txn": "txn-k1",
        "messageId": result["messageId"], "deliverAt": result["deliverAt"],
        "payloadZstd": False, "encrypted": False, "producerSub": None, "attempts": 0,
        "lastError": None, "claimed": False}
    assert ISO6.fullmatch(seen["createdAt"]) and ISO6.fullmatch(seen["updatedAt"])
    assert peek(http, queue, "missing") == {"found": False, "queue": queue,
                                            "timerKey": "missing"}


def test_list_pages_by_key_byte_order_after_exclusive(http):
    queue = unique_name()
    keys = ["b", "a", "B", "a/1", "é", "c"]
    batch(http, *[schedule_op(queue, key, delay_ms=60_000) for key in keys])
    first = http.get(f"/api/v1/timers/{queue}", params={"limit": 4}).json()
    ordered = sorted(keys, key=lambda k: k.encode())
    assert [row["timerKey"] for row in first["rows"]] == ordered[:4]
    assert first["truncated"] is True and first["nextAfter"] == ordered[3]
    assert "payload" not in first["rows"][0]
    rest = http.get(f"/api/v1/timers/{queue}",
                    params={"after": first["nextAfter"], "limit": 4}).json()
    assert [row["timerKey"] for row in rest["rows"]] == ordered[4:]
    assert rest["truncated"] is False and rest["nextAfter"] is None


@pytest.mark.parametrize("limit,rows", [("0", 1), ("-5", 1), ("abc", 3), ("99999", 3)])
def test_list_limit_is_clamped_never_refused(http, limit, rows):
    queue = unique_name()
    batch(http, *[schedule_op(queue, f"k{n}", delay_ms=60_000) for n in range(3)])
    answer = http.get(f"/api/v1/timers/{queue}", params={"limit": limit})
    assert answer.status_code == 200
    assert len(answer.json()["rows"]) == rows


# -- refusals -------------------------------------------------------------------------------

BAD_OPS = [
    ({"op": "fire"}, "timers_bad_op"),
    ({"producerSub": "me"}, "timers_server_owned_field"),
    ({"messageId": str(uuid.uuid4())}, "timers_server_owned_field"),
    ({"deliverAt": "2030-01-01T00:00:00Z"}, "timers_server_owned_field"),
    ({"_internal": 1}, "timers_server_owned_field"),
    ({"tenantName": "acme"}, "timers_server_owned_field"),
    ({"tenant_key": "acme"}, "timers_server_owned_field"),
    ({"attempts": 0}, "timers_server_owned_field"),
    ({"delayMs": None}, "timers_delay_required"),
    ({"delayMs": "100"}, "timers_bad_delay"),
    ({"delayMs": True}, "timers_bad_delay"),
    ({"txn": None}, "timers_txn_required"),
    ({"txn": 5}, "timers_bad_txn"),
    ({"txn": "x" * 256}, "timers_bad_txn"),
    ({"queue": ""}, "timers_queue_required"),
    ({"queue": "a/b"}, "timers_bad_queue"),
    ({"queue": 7}, "timers_bad_queue"),
    ({"timerKey": ""}, "timers_key_required"),
    ({"timerKey": "k" * 1025}, "timers_bad_key"),
    ({"timerKey": "/a"}, "timers_bad_key"),
    ({"timerKey": "a/../b"}, "timers_bad_key"),
    ({"timerKey": "."}, "timers_bad_key"),
    ({"partition": ""}, "timers_bad_partition"),
    ({"payload": None}, "timers_payload_required"),
    ({"payload": "not base64!"}, "timers_bad_payload"),
    ({"payload": base64.b64encode(b"{not json").decode()}, "timers_payload_not_json"),
    ({"payload": base64.b64encode(b'{"a": "\\u0000"}').decode()}, "timers_payload_not_json"),
    # JSON Python's parser reads but PostgreSQL, firing the timer, would not: never fired
    ({"payload": base64.b64encode(b'\xef\xbb\xbf{"a": 1}').decode()}, "timers_payload_not_json"),
    ({"payload": base64.b64encode('{"a": 1}'.encode("utf-16")).decode()},
     "timers_payload_not_json"),
    ({"payloadZstd": "yes"}, "timers_bad_payload_zstd"),
    ({"payloadZstd": True}, "timers_bad_zstd"),
]


@pytest.mark.parametrize("change,reason", BAD_OPS, ids=[r + "-" + str(n) for n, (_, r)
                                                        in enumerate(BAD_OPS)])
def test_a_bad_op_refuses_the_whole_call_and_applies_nothing(http, change, reason):
    queue = unique_name()
    good = schedule_op(queue, "good", delay_ms=60_000)
    bad = {**schedule_op(queue, "bad", delay_ms=60_000), **change}
    envelope = refused(http, {"operations": [good, bad]})
    assert envelope["error"] == "timers_bad_request" and envelope["reason"] == reason
    assert "operations[1]" in envelope["detail"]
    assert peek(http, queue, "good")["found"] is False


@pytest.mark.parametrize("body,reason", [
    ({}, "timers_operations_required"),
    ({"operations": {"op": "schedule"}}, "timers_operations_required"),
    ({"operations": ["schedule"]}, "timers_bad_op"),
])
def test_a_bad_operations_array_is_refused(http, body, reason):
    assert refused(http, body)["reason"] == reason


def test_a_body_that_is_not_json_is_refused_in_the_envelope(http):
    envelope = refused(http, None, content=b"{oops", headers={"Content-Type":
                                                              "application/json"})
    assert envelope["error"] == "timers_bad_request" and "Invalid JSON" in envelope["detail"]


def test_a_key_twice_in_one_call_is_refused(http):
    queue = unique_name()
    envelope = refused(http, {"operations": [
        schedule_op(queue, "k", delay_ms=1), {"op": "cancel", "queue": queue, "timerKey": "k"}]})
    assert envelope["reason"] == "timers_duplicate_key_in_call"


def test_more_than_256_ops_are_refused(http):
    queue = unique_name()
    envelope = refused(http, {"operations": [schedule_op(queue, f"k{n}", delay_ms=1)
                                             for n in range(257)]})
    assert envelope["reason"] == "timers_too_many_operations"


def test_beyond_the_horizon_is_403_and_a_large_payload_413(http):
    queue = unique_name()
    far = refused(http, {"operations": [schedule_op(queue, "k", delay_ms=91 * 86_400_000)]},
                  status=403)
    assert far["error"] == "timer_horizon_exceeded"
    big = base64.b64encode(json.dumps("x" * (1024 * 1024)).encode()).decode()
    large = refused(http, {"operations": [dict(schedule_op(queue, "k"), payload=big)]},
                    status=413)
    assert large["error"] == "payload_too_large"
    assert peek(http, queue, "k")["found"] is False


def test_empty_operations_answer_no_results(http):
    assert batch(http) == []


def test_cancel_route_refuses_a_bad_queue_name_in_the_envelope(http):
    answer = http.delete("/api/v1/timers/" + "q" * 300 + "/k")
    assert answer.status_code == 400
    assert answer.json()["reason"] == "timers_bad_queue"


# -- firing ---------------------------------------------------------------------------------

def test_a_zstd_payload_fires_decompressed_and_peeks_as_sent(http):
    queue = unique_name()
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(
        json.dumps({"big": "z" * 1000}).encode())
    sent = base64.b64encode(frame).decode()
    batch(http, dict(schedule_op(queue, "z", delay_ms=60_000), payload=sent, payloadZstd=True))
    seen = peek(http, queue, "z")
    assert seen["payload"] == sent and seen["payloadZstd"] is True
    batch(http, dict(schedule_op(queue, "z", delay_ms=0), payload=sent, payloadZstd=True))
    assert delivered(http, queue)["data"] == {"big": "z" * 1000}


def test_a_parked_long_poll_gets_the_fired_message(http, server):
    queue = unique_name()
    configure(http, queue)
    answers: List[httpx.Response] = []

    def long_poll() -> None:
        with httpx.Client(base_url=server.url, timeout=40) as client:
            answers.append(client.get(f"/api/v1/pop/queue/{queue}",
                                      params={"wait": "true", "timeout": 20_000}))

    poller = threading.Thread(target=long_poll)
    poller.start()
    [result] = batch(http, schedule_op(queue, "wake", {"w": 1}, 300))
    poller.join(30)
    assert answers and answers[0].status_code == 200
    assert answers[0].json()["messages"][0]["id"] == result["messageId"]


def test_a_txn_already_in_the_partition_fires_nothing_and_the_timer_ends(http, db):
    queue = unique_name()
    push(http, queue, [{"first": True}], prefix="dup-")  # transactionId dup-0
    batch(http, schedule_op(queue, "k", {"second": True}, 0, txn="dup-0"))
    wait_until(lambda: not peek(http, queue, "k")["found"], 30, message="the timer to end")
    [(_, txn, payload, _, _)] = stored_messages(db, queue)
    assert (txn, payload) == ("dup-0", {"first": True})


def test_a_fired_timer_recreates_its_deleted_queue(http, db):
    queue = unique_name()
    configure(http, queue, leaseTime=10)
    batch(http, schedule_op(queue, "k", {"back": True}, 60_000))
    assert http.delete(f"/api/v1/resources/queues/{queue}").status_code == 200
    assert peek(http, queue, "k")["found"] is True  # timers survive their queue
    batch(http, schedule_op(queue, "k", {"back": True}, 0))
    assert delivered(http, queue)["data"] == {"back": True}


def test_an_encrypted_queue_keeps_the_envelope_and_delivers_plain(http, db):
    queue = unique_name()
    configure(http, queue, encryptionEnabled=True)
    batch(http, schedule_op(queue, "secret", {"card": "4111"}, 60_000))
    seen = peek(http, queue, "secret")
    assert seen["encrypted"] is True
    stored = json.loads(base64.b64decode(seen["payload"]))
    assert set(stored) == {"encrypted", "iv", "authTag"} and "4111" not in seen["payload"]
    batch(http, schedule_op(queue, "secret", {"card": "4111"}, 0))
    assert delivered(http, queue)["data"] == {"card": "4111"}
    [(_, _, payload, is_encrypted, _)] = stored_messages(db, queue)
    assert is_encrypted is True and "4111" not in json.dumps(payload)


def test_a_server_without_the_key_refuses_timers_of_an_encrypted_queue(http, make_server):
    queue = unique_name()
    configure(http, queue, encryptionEnabled=True)  # through the shared server, which has it
    keyless = make_server()
    answer = httpx.post(f"{keyless.url}/api/v1/timers", timeout=40,
                        json={"operations": [schedule_op(queue, "k", {"card": 1}, 60_000)]})
    assert answer.status_code == 503 and answer.headers["Retry-After"] == "1"
    assert answer.json()["error"] == "timers_unavailable"
    assert "QUEEN_ENCRYPTION_KEY" in answer.json()["detail"]
    assert peek(http, queue, "k")["found"] is False


def test_a_queue_that_starts_encrypting_after_schedule_gets_an_encrypted_message(http, db):
    queue = unique_name()
    configure(http, queue)
    [result] = batch(http, schedule_op(queue, "k", {"pin": "1234"}, 1500))
    assert peek(http, queue, "k")["encrypted"] is False
    configure(http, queue, encryptionEnabled=True)
    message = delivered(http, queue)
    assert (message["id"], message["data"]) == (result["messageId"], {"pin": "1234"})
    [(_, _, payload, is_encrypted, _)] = stored_messages(db, queue)
    assert is_encrypted is True and "1234" not in json.dumps(payload)


def test_a_claim_its_sweeper_never_fires_is_taken_over_when_it_expires(http, db):
    queue = unique_name()
    configure(http, queue)
    [result] = batch(http, schedule_op(queue, "k", {"pin": "0000"}, 60_000))
    configure(http, queue, encryptionEnabled=True)  # a plain timer now needs the server
    with db.cursor() as cursor:  # a sweeper that claims it, then dies without firing it
        cursor.execute("BEGIN")
        cursor.execute("UPDATE queen.timers SET visible_at = now() WHERE queue = %s", (queue,))
        cursor.execute("SELECT queen.timers_sweep(1000, 1500)")
        claimed = cursor.fetchone()[0]["claimed"]
        cursor.execute("COMMIT")
    assert {"queue": queue, "timerKey": "k"} in [
        {key: row[key] for key in ("queue", "timerKey")} for row in claimed["rows"]]
    assert peek(http, queue, "k")["claimed"] is True
    message = delivered(http, queue)
    assert (message["id"], message["data"]) == (result["messageId"], {"pin": "0000"})
    [(_, _, _, is_encrypted, _)] = stored_messages(db, queue)
    assert is_encrypted is True


@pytest.fixture
def keyless_engine(pg_env, server):
    """The message path of a server started without QUEEN_ENCRYPTION_KEY, in this process."""
    with in_process_engine(pg_env, WaiterRegistry()) as engine:
        yield engine


@pytest_twisted.ensureDeferred
async def test_a_server_without_the_key_gives_a_claimed_timer_back_unspent(http, db,
                                                                          keyless_engine):
    """An instance started without the key among keyed ones used to fail the timers of
    encrypted queues it claimed, one attempt each sweep, until they were dead letters."""
    queue = unique_name()
    configure(http, queue)
    [result] = batch(http, schedule_op(queue, "k", {"pin": "4242"}, 60_000))
    configure(http, queue, encryptionEnabled=True)  # a plain timer now needs the server
    with db.cursor() as cursor:  # claimed as any sweeper would, and handed to a keyless one
        cursor.execute("BEGIN")
        cursor.execute("UPDATE queen.timers SET visible_at = now() WHERE queue = %s", (queue,))
        cursor.execute("SELECT queen.timers_sweep(1000, 60000)")
        claimed = cursor.fetchone()[0]["claimed"]
        cursor.execute("COMMIT")
    claimed["rows"] = [row for row in claimed["rows"] if row["queue"] == queue]
    fired = await TimersEngine(keyless_engine.database, keyless_engine).fire_claimed(claimed)

    assert fired == (0, 0)
    seen = peek(http, queue, "k")
    assert seen["attempts"] == 0 and seen["claimed"] is False
    assert "QUEEN_ENCRYPTION_KEY" in seen["lastError"]
    message = delivered(http, queue)  # by the keyed server, a few seconds on
    assert (message["id"], message["data"]) == (result["messageId"], {"pin": "4242"})
    [(_, _, _, is_encrypted, _)] = stored_messages(db, queue)
    assert is_encrypted is True


@pytest.mark.parametrize("compressed", [False, True], ids=["json", "zstd"])
def test_a_sweep_claims_rows_to_encrypt_within_a_byte_budget_and_all_fire(http, db,
                                                                          compressed):
    """The rows a sweep claims for the server to encrypt go to it in one answer: a batch of
    500 timers of 1 MiB made a jsonb value over PostgreSQL's 256 MiB limit and every sweep
    failed, so none fired. Past 64 MiB of bodies the rest waits for the next sweep. (Placed
    before the tests of the module's keyless auth_server, whose sweeper would claim rows it
    cannot encrypt and give them back 5 s later each time.) A zstd payload counts as the body
    it expands to, which is what the answer carries, not as its few stored bytes."""
    queue = unique_name()
    configure(http, queue)
    text = "x" * 1_000_000

    def op(n: int) -> Dict[str, Any]:
        scheduled = schedule_op(queue, f"k{n:02}", {"n": n, "text": text}, 60_000)
        if not compressed:
            return scheduled
        frame = zstandard.ZstdCompressor(write_content_size=True).compress(
            json.dumps({"n": n, "text": text}).encode())
        return dict(scheduled, payload=base64.b64encode(frame).decode(), payloadZstd=True)

    for start in range(0, 70, 10):
        batch(http, *[op(n) for n in range(start, start + 10)])
    configure(http, queue, encryptionEnabled=True)  # a plain timer now needs the server
    with db.cursor() as cursor:  # one sweep, looked at and undone
        cursor.execute("BEGIN")
        cursor.execute("UPDATE queen.timers SET visible_at = now() WHERE queue = %s", (queue,))
        cursor.execute("SELECT queen.timers_sweep(1000, 60000)")
        answer = cursor.fetchone()[0]
        cursor.execute("ROLLBACK")
    claimed = [row["timerKey"] for row in answer["claimed"]["rows"] if row["queue"] == queue]
    # (other tests' due rows may be claimed too, before these: they are small; each body
    # goes twice, as body and as bodyText: about 34 fit)
    assert claimed == [f"k{n:02}" for n in range(len(claimed))] and 25 < len(claimed) < 40
    assert answer["nextDueMs"] <= 0  # the rest is due at once

    with db.cursor() as cursor:
        cursor.execute("UPDATE queen.timers SET visible_at = now() WHERE queue = %s", (queue,))
    wait_until(lambda: len(stored_messages(db, queue)) == 70, 60, message="every timer fired")
    assert all(row[3] is True for row in stored_messages(db, queue))  # encrypted


EXACT_NUMBERS = b'{"price": 12345678901234.123456789, "ratio": 0.10000000000000000555, "z": 1.50}'


@pytest.mark.parametrize("how", ["encrypted", "zstd", "zstd encrypted", "encrypted later"])
def test_a_timers_message_keeps_every_digit_its_scheduler_sent(http, db, how):
    """The payload was parsed into Python floats and sealed (an encrypting queue) or stored
    (a zstd one) from that value: digits beyond a double's were lost, which a plain timer's
    message keeps. "encrypted later": scheduled plain, sealed by the sweep once its queue
    encrypts. (Placed before the module's keyless server starts: see the test above.)"""
    queue = unique_name()
    configure(http, queue, encryptionEnabled=how == "encrypted" or how == "zstd encrypted")
    payload = EXACT_NUMBERS
    if "zstd" in how:
        payload = zstandard.ZstdCompressor(write_content_size=True).compress(payload)
    batch(http, dict(schedule_op(queue, "k", delay_ms=600_000 if how == "encrypted later" else 0),
                     payload=base64.b64encode(payload).decode(), payloadZstd="zstd" in how))
    if how == "encrypted later":
        configure(http, queue, encryptionEnabled=True)
        with db.cursor() as cursor:  # due now, scheduled plain
            cursor.execute("UPDATE queen.timers SET visible_at = now() WHERE queue = %s",
                           (queue,))

    answer = wait_until(lambda: (lambda a: a if a.status_code == 200 else None)(http.get(
        f"/api/v1/pop/queue/{queue}", params={"wait": "false"})), 30, message="the fire")

    [message] = json.loads(answer.text, parse_float=decimal.Decimal)["messages"]
    assert message["data"] == json.loads(EXACT_NUMBERS, parse_float=decimal.Decimal)
    with db.cursor() as cursor:
        cursor.execute("""SELECT bool_and(m.is_encrypted) FROM queen.messages m
                            JOIN queen.partitions p ON p.id = m.partition_id
                            JOIN queen.queues q ON q.id = p.queue_id WHERE q.name = %s""",
                       (queue,))
        assert cursor.fetchone()[0] is ("encrypted" in how)


def test_a_full_queue_counts_a_failed_attempt_and_backs_off(http, db):
    queue = unique_name()
    configure(http, queue, maxSize=1)
    push(http, queue, [{"fills": "it"}])
    batch(http, schedule_op(queue, "k", {"late": True}, 0))
    row = wait_until(lambda: (timer_row(db, queue, "k") or (0,))[0] >= 1 and
                     timer_row(db, queue, "k"), 30, message="a failed fire")
    assert row[0] == 1 and "max capacity" in row[1]
    seen = peek(http, queue, "k")
    assert seen["attempts"] == 1 and seen["claimed"] is False
    assert len(stored_messages(db, queue)) == 1


def test_a_row_that_cannot_be_pushed_fails_alone_and_the_others_fire(http, db):
    queue = unique_name()
    batch(http, *[schedule_op(queue, key, {"key": key}, 60_000) for key in ("a", "b", "c")])
    with db.cursor() as cursor:  # a corrupted row: its bytes are no JSON document
        cursor.execute("UPDATE queen.timers SET payload = convert_to('{broken', 'UTF8')"
                       " WHERE queue = %s AND timer_key = 'b'", (queue,))
        cursor.execute("UPDATE queen.timers SET visible_at = now() WHERE queue = %s",
                       (queue,))
    wait_until(lambda: len(stored_messages(db, queue)) == 2, 30, message="a and c fired")
    assert sorted(row[2]["key"] for row in stored_messages(db, queue)) == ["a", "c"]
    attempts, error = wait_until(lambda: timer_row(db, queue, "b"), 30)
    assert attempts == 1 and "json" in error.lower()


def test_the_fifth_failed_fire_moves_the_timer_to_the_dead_letters(http, db):
    queue = unique_name()
    [result] = batch(http, schedule_op(queue, "k", {"dead": 1}, 60_000))
    with db.cursor() as cursor:
        for attempt in range(1, 6):
            cursor.execute("SELECT queen.timers_failed(ARRAY[%s], ARRAY['k'], ARRAY[%s])",
                           (queue, f"failure {attempt}"))
            assert cursor.fetchone()[0] == (1 if attempt == 5 else 0)
        cursor.execute("SELECT attempts, last_error, message_id::text, txn"
                       "  FROM queen.timer_dead_letters WHERE queue = %s", (queue,))
        assert cursor.fetchall() == [(5, "failure 5", result["messageId"], "txn-k")]
    assert peek(http, queue, "k")["found"] is False


def test_each_failed_attempt_hides_the_timer_for_a_growing_backoff(db, http):
    queue = unique_name()
    batch(http, schedule_op(queue, "k", delay_ms=60_000))
    waits = []
    with db.cursor() as cursor:
        for _ in range(4):
            cursor.execute("SELECT queen.timers_failed(ARRAY[%s], ARRAY['k'], ARRAY['x'])",
                           (queue,))
            cursor.execute("SELECT extract(epoch FROM visible_at - clock_timestamp())"
                           "  FROM queen.timers WHERE queue = %s", (queue,))
            waits.append(round(float(cursor.fetchone()[0])))
    assert waits == [1, 2, 4, 8]


# -- auth on: producerSub and levels --------------------------------------------------------

SECRET = "timers-secret-long-enough-for-hs256"


def bearer(sub: str, role: str) -> Dict[str, str]:
    now = int(time.time())
    token = jwt.encode({"sub": sub, "role": role, "iat": now, "exp": now + 3600}, SECRET,
                       algorithm="HS256")
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def auth_server(pg_env: dict[str, str]) -> Iterator[Any]:
    with running_server(pg_env, prefix="queen-tw-timers-auth-", JWT_ENABLED="true",
                        JWT_SECRET=SECRET) as process:
        yield process


def test_the_schedulers_sub_is_the_fired_messages_producer_sub(auth_server, db):
    queue = unique_name()
    with httpx.Client(base_url=auth_server.url, timeout=40,
                      headers=bearer("svc-billing", "read-write")) as client:
        batch(client, schedule_op(queue, "k", {"bill": 1}, 60_000))
        assert peek(client, queue, "k")["producerSub"] == "svc-billing"
        [result] = batch(client, schedule_op(queue, "k", {"bill": 1}, 0))
        wait_until(lambda: stored_messages(db, queue), 30, message="the fire")
    with db.cursor() as cursor:
        cursor.execute("SELECT producer_sub FROM queen.messages WHERE id = %s",
                       (result["messageId"],))
        assert cursor.fetchall() == [("svc-billing",)]


def test_a_read_only_token_reads_timers_but_cannot_change_them(auth_server):
    queue = unique_name()
    with httpx.Client(base_url=auth_server.url, timeout=40,
                      headers=bearer("dashboard", "read-only")) as reader:
        assert reader.get(f"/api/v1/timers/{queue}").status_code == 200
        assert reader.get(f"/api/v1/timers/{queue}/k").status_code == 200
        assert reader.delete(f"/api/v1/timers/{queue}/k").status_code == 403
        assert reader.post("/api/v1/timers", json={"operations": []}).status_code == 403


# -- the official 2.6.0 client ------------------------------------------------------------

SCENARIO_LIFECYCLE = """
import datetime

async def scenario(client, args):
    q = args["queue"]
    timers = client.timers
    first = await timers.schedule(q, "order/1/expire", {"orderId": 1}, delay_ms=60_000)
    moved = await client.timer(q).key("order/1/expire").payload({"orderId": 1, "v": 2}) \\
        .after(datetime.timedelta(milliseconds=200)).txn("fixed-txn").reschedule()
    other = await timers.schedule(q, "other", {"x": 1}, delay_ms=60_000, partition="p2")
    listed = await timers.list_all(q, limit=1)
    peeked = await timers.peek(q, "other")
    cancelled = await timers.cancel(q, "other", txn=other["txn"])
    absent = await timers.cancel(q, "other", txn=other["txn"])
    messages = []
    for _ in range(60):
        messages = await client.queue(q).batch(5).wait(True).timeout_millis(1000).pop()
        if messages:
            break
    return {"first": dict(first), "moved": dict(moved), "listed": listed,
            "peeked": dict(peeked), "cancelled": dict(cancelled), "absent": dict(absent),
            "absent_truthy": bool(absent), "messages": messages}
"""


def test_official_client_schedules_lists_peeks_cancels_and_receives(server):
    queue = unique_name()
    seen = run26(server.url, SCENARIO_LIFECYCLE, queue=queue)
    assert "raised" not in seen, seen
    assert seen["first"]["status"] == "scheduled"
    moved = seen["moved"]
    assert (moved["status"], moved["txn"]) == ("rescheduled", "fixed-txn")
    assert [row["timerKey"] for row in seen["listed"]] == ["order/1/expire", "other"]
    assert seen["peeked"]["found"] is True and seen["peeked"]["partition"] == "p2"
    assert seen["cancelled"]["status"] == "cancelled"
    assert seen["absent"]["status"] == "absent" and seen["absent_truthy"] is False
    [message] = seen["messages"]
    assert message["id"] == moved["messageId"]
    assert message["transactionId"] == "fixed-txn"
    assert message["data"] == {"orderId": 1, "v": 2}


SCENARIO_ZSTD = """
import json
from queen.http import zstd

async def scenario(client, args):
    q = args["queue"]
    compress, _ = zstd.require()
    body = {"report": "x" * 5000, "rows": list(range(100))}
    frame = compress(json.dumps(body).encode())
    scheduled = await client.timer(q).key("zipped").payload(frame, zstd=True).after_ms(100) \
        .schedule()
    messages = []
    for _ in range(60):
        messages = await client.queue(q).batch(1).wait(True).timeout_millis(1000).pop()
        if messages:
            break
    return {"scheduled": dict(scheduled), "data": messages[0]["data"] if messages else None,
            "id": messages[0]["id"] if messages else None, "sent": len(frame)}
"""


def test_official_client_payload_zstd_fires_the_decompressed_body(server):
    seen = run26(server.url, SCENARIO_ZSTD, queue=unique_name())
    assert "raised" not in seen, seen
    assert seen["data"] == {"report": "x" * 5000, "rows": list(range(100))}
    assert seen["id"] == seen["scheduled"]["messageId"] and seen["sent"] < 1000


SCENARIO_CODES = """
async def scenario(client, args):
    q = args["queue"]
    seen = {}
    for name, op in [
        ("horizon", {"op": "schedule", "queue": q, "timerKey": "k", "delayMs": 100 * 86_400_000,
                     "payload": "e30=", "txn": "t"}),
        ("bad", {"op": "schedule", "queue": q, "timerKey": "k", "delayMs": 1,
                 "payload": "%%%", "txn": "t"})]:
        try:
            await client.timers.batch([op])
        except Exception as error:
            seen[name] = [type(error).__name__, getattr(error, "code", None),
                          getattr(error, "reason", None)]
    return seen
"""


def test_official_client_sees_the_code_and_reason_of_each_refusal(server):
    seen = run26(server.url, SCENARIO_CODES, queue=unique_name())
    assert seen["horizon"] == ["TimerError", "timer_horizon_exceeded", "timer_horizon_exceeded"]
    assert seen["bad"] == ["TimerError", "timers_bad_request", "timers_bad_payload"]
