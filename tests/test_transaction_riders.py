"""Transaction riders (WIRE2.md 5): KV ops and lock guards in POST /api/v1/transaction commit
or roll back with its pushes and acks; results layout of 5.2; no deadlock between bundles
naming the same keys in opposite orders (5.3). Real server, PostgreSQL and 2.6.0 client."""

import base64
import json
import threading
import uuid
from typing import Any, Dict, List

import httpx
import psycopg2
from client26 import run26

from support import count_messages, expire_leases, unique_name, wait_until


def leased_message(http: httpx.Client, queue: str) -> Dict[str, Any]:
    http.post("/api/v1/push", json={"items": [{"queue": queue, "payload": "in"}]})
    answer = http.get(f"/api/v1/pop/queue/{queue}", params={"wait": "false"})
    assert answer.status_code == 200, answer.text
    return answer.json()["messages"][0]


def bundle(message: Dict[str, Any], target: str, kv: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Ack ``message``, push one message to ``target``, with the ``kv`` rider."""
    return {"operations": [
        {"type": "ack", "transactionId": message["transactionId"],
         "partitionId": message["partitionId"], "leaseId": message["leaseId"]},
        {"type": "push", "items": [{"queue": target, "payload": "out"},
                                   {"queue": target, "payload": "out2"}]}],
        "requiredLeases": [message["leaseId"]], "kv": kv}


def kv_get(http: httpx.Client, ns: str, key: str) -> Dict[str, Any]:
    return http.post("/api/v1/kv", json=[{"op": "get", "ns": ns, "key": key}]).json()[
        "results"][0]


def still_leased(db, message: Dict[str, Any]) -> bool:
    with db.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM queen.partition_consumers WHERE partition_id = %s"
                       " AND lease_id = %s AND lease_expires_at > now()",
                       (message["partitionId"], message["leaseId"]))
        return cursor.fetchone()[0] == 1


def test_kv_push_and_ack_commit_together_with_the_flat_result_layout(http, db):
    source, target, ns = unique_name(), unique_name(), unique_name("ns-").lower()
    message = leased_message(http, source)
    body = http.post("/api/v1/transaction", json=bundle(message, target, [
        {"op": "put", "ns": ns, "key": "state", "value": {"step": 2}, "ttlSeconds": 60},
        {"op": "incr", "ns": ns, "key": "count", "forever": True},
        {"op": "get", "ns": ns, "key": "state"}])).json()
    assert body["success"] is True, body
    kinds = [(r["index"], r["type"]) for r in body["results"]]
    assert kinds == [(0, "ack"), (1, "push"), (2, "push"), (3, "kv"), (4, "kv"), (5, "kv")]
    assert body["results"][3]["applied"] is True and body["results"][4]["value"] == 1
    assert body["results"][5]["found"] is True and body["results"][5]["value"] == {"step": 2}
    assert count_messages(db, target) == 2 and not still_leased(db, message)
    assert kv_get(http, ns, "state")["value"] == {"step": 2}


def test_a_failed_guard_leaves_no_trace(http, db):
    source, target, ns = unique_name(), unique_name(), unique_name("ns-").lower()
    message = leased_message(http, source)
    guard = {"op": "check", "ns": "queen-locks", "key": f"{ns}#0", "expect": 41,
             "required": True}
    write = {"op": "put", "ns": ns, "key": "effect", "value": 1, "forever": True}
    answer = http.post("/api/v1/transaction", json=bundle(message, target, [guard, write]))
    body = answer.json()
    assert answer.status_code == 200
    assert body["success"] is False and body["reason"] == "kv_precondition"
    assert body["failedIndex"] == 3  # flat: ack, two pushed items, then guard 0
    assert body["kvReason"] == "absent" and body["version"] == 0 and body["value"] is None
    assert count_messages(db, target) == 0 and still_leased(db, message)
    assert kv_get(http, ns, "effect")["found"] is False
    with db.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM queen.queues WHERE name = %s", (target,))
        assert cursor.fetchone()[0] == 0  # not even the queue the push would have made


def test_a_failing_ack_rolls_back_the_kv_writes(http, db):
    source, target, ns = unique_name(), unique_name(), unique_name("ns-").lower()
    message = leased_message(http, source)
    expire_leases(db, source)
    body = http.post("/api/v1/transaction", json=bundle(message, target, [
        {"op": "putIfAbsent", "ns": ns, "key": "once", "value": True, "ttlSeconds": 60,
         "required": True}])).json()
    assert body["success"] is False and "reason" not in body
    assert kv_get(http, ns, "once")["found"] is False
    assert count_messages(db, target) == 0


def test_a_guard_only_bundle_commits_its_kv_ops(http):
    ns = unique_name("ns-").lower()
    body = http.post("/api/v1/transaction", json={"operations": [], "requiredLeases": [], "kv": [
        {"op": "check", "ns": ns, "key": "k", "expect": 0, "required": True},
        {"op": "put", "ns": ns, "key": "k", "value": "v", "forever": True}]}).json()
    assert body["success"] is True
    assert [r["index"] for r in body["results"]] == [0, 1]
    assert kv_get(http, ns, "k")["value"] == "v"


def test_a_lost_precondition_without_required_is_a_verdict_and_the_bundle_commits(http, db):
    target, ns = unique_name(), unique_name("ns-").lower()
    http.post("/api/v1/kv", json=[{"op": "put", "ns": ns, "key": "k", "value": 1,
                                   "forever": True}])
    body = http.post("/api/v1/transaction", json={"operations": [
        {"type": "push", "items": [{"queue": target, "payload": 1}]}], "kv": [
        {"op": "putIfAbsent", "ns": ns, "key": "k", "value": 2, "forever": True}]}).json()
    assert body["success"] is True and body["results"][1]["applied"] is False
    assert body["results"][1]["reason"] == "exists"
    assert count_messages(db, target) == 1


def test_rider_rules_of_a_transaction_answer_400(http):
    ns = unique_name("ns-").lower()
    prefix = http.post("/api/v1/transaction", json={"operations": [], "kv": [
        {"op": "getPrefix", "ns": ns, "prefix": "a"}]})
    assert prefix.status_code == 400
    assert "kv_get_prefix_not_allowed_in_transaction" in prefix.json()["error"] or \
        "getPrefix" in prefix.json()["error"]
    many = http.post("/api/v1/transaction", json={"operations": [], "kv": [
        {"op": "get", "ns": ns, "key": f"k{n}"} for n in range(65)]})
    assert many.status_code == 400 and "nothing was applied" in many.json()["error"]


def test_concurrent_bundles_on_the_same_keys_in_opposite_orders_do_not_deadlock(
        make_server, db):
    # Fused transaction calls (several bundles per database call, several calls at once) and
    # KV batches at the same time: a call's bundles take their keys one bundle after the
    # other, so only a call that locks every bundle's keys first, in one global order, can
    # never wait in a cycle with another call.
    server = make_server(QUEEN_TRANSACTION_MAX_BATCH_SIZE="8",
                         QUEEN_TRANSACTION_PREFERRED_BATCH_SIZE="4",
                         QUEEN_TRANSACTION_MAX_HOLD_MS="5", QUEEN_TRANSACTION_MAX_CONCURRENT="4")
    target, ns = unique_name(), unique_name("ns-").lower()
    rounds, failures = 20, []

    def bundles(keys: List[str]) -> None:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            for _ in range(rounds):
                body = client.post("/api/v1/transaction", json={"operations": [
                    {"type": "push", "items": [{"queue": target, "payload": keys}]}], "kv": [
                    {"op": "incr", "ns": ns, "key": key, "forever": True} for key in keys]}
                ).json()
                if not body.get("success"):
                    failures.append(body)

    def batches() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            for _ in range(rounds):
                body = client.post("/api/v1/kv", json=[
                    {"op": "incr", "ns": ns, "key": f"other-{key}", "forever": True}
                    for key in "dcba"] + [{"op": "check", "ns": ns, "key": key, "expect": 0}
                                          for key in "dcba"]).json()
                if "results" not in body:
                    failures.append(body)

    orders = [[x, y] for x in "abcd" for y in "abcd" if x != y]  # both orders of each pair
    threads = [threading.Thread(target=bundles, args=(order,)) for order in orders]
    threads += [threading.Thread(target=batches) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    with httpx.Client(base_url=server.url) as client:
        for key in "abcd":  # each key is in 6 of the 12 orders
            assert kv_get(client, ns, key)["value"] == rounds * 6
    assert count_messages(db, target) == rounds * len(orders)


def timer_op(queue: str, key: str, delay_ms: int = 0) -> Dict[str, Any]:
    payload = base64.b64encode(json.dumps({"timer": key}).encode()).decode()
    return {"op": "schedule", "queue": queue, "timerKey": key, "txn": f"txn-{key}",
            "delayMs": delay_ms, "payload": payload}


def timers_of(db, queue: str) -> List[str]:
    with db.cursor() as cursor:
        cursor.execute("SELECT timer_key FROM queen.timers WHERE queue = %s ORDER BY 1",
                       (queue,))
        keys = [row[0] for row in cursor.fetchall()]
    db.commit()
    return keys


def test_timers_ride_after_kv_in_the_flat_layout_and_commit_with_the_bundle(http, db):
    target, later, ns = unique_name(), unique_name(), unique_name("ns-").lower()
    body = http.post("/api/v1/transaction", json={"operations": [
        {"type": "push", "items": [{"queue": target, "payload": 1}]}],
        "kv": [{"op": "put", "ns": ns, "key": "k", "value": 1, "forever": True}],
        "timers": [timer_op(later, "t1", 60_000), timer_op(later, "t2", 60_000)]}).json()
    assert body["success"] is True, body
    layout = [(r["index"], r["type"]) for r in body["results"]]
    assert layout == [(0, "push"), (1, "kv"), (2, "timer"), (3, "timer")]
    assert body["results"][2]["status"] == "scheduled" and body["results"][2]["ok"] is True
    assert timers_of(db, later) == ["t1", "t2"]


def test_a_failed_guard_rolls_back_the_timers_too(http, db):
    later, ns = unique_name(), unique_name("ns-").lower()
    body = http.post("/api/v1/transaction", json={"operations": [], "kv": [
        {"op": "check", "ns": ns, "key": "gate", "expect": 7, "required": True}],
        "timers": [timer_op(later, "t", 60_000)]}).json()
    assert body["success"] is False and body["reason"] == "kv_precondition"
    assert body["failedIndex"] == 0
    assert timers_of(db, later) == []


def test_a_timer_only_bundle_schedules_under_the_callers_promised_ids(http, db):
    later = unique_name()
    body = http.post("/api/v1/transaction", json={"operations": [],
                                                  "timers": [timer_op(later, "soon", 5)]}).json()
    assert body["success"] is True and body["results"][0]["type"] == "timer"
    with db.cursor() as cursor:
        cursor.execute("SELECT message_id::text, txn FROM queen.timers WHERE queue = %s",
                       (later,))
        assert cursor.fetchall() == [(body["results"][0]["messageId"], "txn-soon")]
    db.commit()


def test_a_bad_timer_rider_refuses_the_transaction(http, db):
    target = unique_name()
    answer = http.post("/api/v1/transaction", json={"operations": [
        {"type": "push", "items": [{"queue": target, "payload": 1}]}],
        "timers": [{"op": "schedule", "queue": target, "timerKey": "k", "delayMs": 5}]})
    assert answer.status_code == 400 and "nothing was applied" in answer.json()["error"]
    assert count_messages(db, target) == 0


CLIENT_ONCE = """
async def scenario(client, args):
    out = []
    for attempt in range(2):
        await client.queue(args["src"]).push([{"data": {"n": attempt}}])
        [message] = await client.queue(args["src"]).batch(1).wait(False).pop()
        tx = (client.transaction()
              .once(args["ns"], "order-1", ttl_seconds=60)
              .ack(message)
              .queue(args["target"]).push([{"data": {"from": attempt}}]))
        tx.kv.incr(args["ns"], "seen", forever=True)
        result = await tx.commit()
        out.append({k: result.get(k) for k in ("success", "reason", "failedIndex", "kvReason")})
    return out
"""


def test_the_2_6_client_once_gate_commits_once_and_returns_the_loss(server, db):
    source, target, ns = unique_name(), unique_name(), unique_name("ns-").lower()
    out = run26(server.url, CLIENT_ONCE, src=source, target=target, ns=ns)
    assert out[0] == {"success": True, "reason": None, "failedIndex": None, "kvReason": None}
    assert out[1] == {"success": False, "reason": "kv_precondition", "failedIndex": 2,
                      "kvReason": "exists"}
    assert count_messages(db, target) == 1
    with httpx.Client(base_url=server.url) as client:
        assert kv_get(client, ns, "seen")["value"] == 1


def test_a_binary_transaction_carries_its_riders_too(server, db):
    source, target, ns = unique_name(), unique_name(), unique_name("ns-").lower()
    out = run26(server.url, CLIENT_ONCE, src=source, target=target, ns=ns,
                client_options={"binary_push": True, "push_compression": True})
    assert out[0]["success"] is True
    assert out[1] == {"success": False, "reason": "kv_precondition", "failedIndex": 2,
                      "kvReason": "exists"}
    assert count_messages(db, target) == 1


def test_a_fused_call_takes_every_bundles_timer_keys_before_any_partition(http, db, holder,
                                                                          pg_dsn):
    """A fused call ran its bundles one after the other, each taking its timer keys itself:
    it held a partition row (an earlier bundle's push) while it waited for a later bundle's
    timer key, and deadlocked with a call holding that key and waiting for the partition (an
    audit counted 22 to 52 deadlocks in 300 fused bundles). The timer keys of every bundle
    are taken first, after the KV keys, as WIRE2 5.3 orders them: here the call waits for a
    key held elsewhere without holding the partition."""
    queue, later = unique_name(), unique_name()
    [stored] = http.post("/api/v1/push", json={"items": [{"queue": queue, "payload": 0}]}).json()
    with holder.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(queen.timers_lock_class(), hashtext(%s))",
                       (f"{later}/B",))

    def bundle(key: str) -> Dict[str, Any]:
        return {"operations": [{"type": "push", "items": [
            {"queue": queue, "partition": "Default", "transactionId": str(uuid.uuid4()),
             "payload": key}]}], "timers": [timer_op(later, key, 60_000)]}

    answers: List[Any] = []
    caller = psycopg2.connect(pg_dsn)
    call = threading.Thread(target=lambda: answers.append(_run_transactions(
        caller, [bundle("A"), bundle("B")])))
    call.start()
    try:
        wait_until(lambda: _waiting_for_an_advisory_lock(db), message="the call waiting")
        with db.cursor() as cursor:  # the partition is free meanwhile
            cursor.execute("SELECT 1 FROM queen.partitions WHERE id = %s "
                           "FOR NO KEY UPDATE NOWAIT", (stored["partition_id"],))
        db.rollback()
    finally:
        holder.rollback()
        call.join(30)
        caller.close()
    assert [bundle_answer["success"] for bundle_answer in answers[0]] == [True, True]
    assert timers_of(db, later) == ["A", "B"]


def _run_transactions(connection, bundles: List[Dict[str, Any]]) -> Any:
    with connection, connection.cursor() as cursor:
        cursor.execute("SELECT queen.run_transactions(%s::jsonb)", (json.dumps(bundles),))
        return cursor.fetchone()[0]


def _waiting_for_an_advisory_lock(db) -> bool:
    with db.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'advisory' "
                       "AND query LIKE '%run_transactions%'")
        waiting = bool(cursor.fetchone()[0])
    db.rollback()
    return waiting
