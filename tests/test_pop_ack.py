"""Pop, ack and lease routes over the real socket (WIRE.md 2.0, 2.3, 2.4, 2.6, 3.3).

Every wait is bounded: polls loop against a deadline and long-polls carry a short timeout, so a
broken server fails a test instead of hanging it.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from typing import Any, Dict, List

import httpx
import psycopg2
import pytest

from queen_tw.engine.queue_engine import expand_ack_answer

from tests.http_helpers import ack, configure, dead_letters, poll_pop, pop, pop_answer, push
from tests.support import expire_leases, lease_seconds_left, unique_name

CREATED_AT_6_DIGITS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")
ISO_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")


# -- helpers ----------------------------------------------------------------------------


def exhaust(http: httpx.Client, queue: str, attempts: int, error: str) -> List[Dict[str, Any]]:
    """Pops and fails the head message ``attempts`` times; returns the ack results."""
    results = []
    for _ in range(attempts):
        delivery = poll_pop(http, queue)
        results.append(ack(http, delivery["messages"][0], "failed", error=error))
    return results


# -- empty and unknown ------------------------------------------------------------------


def test_pop_of_empty_queue_answers_204_without_body(http):
    queue = unique_name()
    configure(http, queue)

    answer = pop_answer(http, queue)

    assert answer.status_code == 204
    assert answer.content == b""


def test_pop_of_unknown_queue_answers_204(http):
    answer = pop_answer(http, unique_name())

    assert answer.status_code == 204
    assert answer.content == b""


def test_pop_of_unknown_partition_answers_204(http):
    queue = unique_name()
    push(http, queue, ["x"])

    answer = pop_answer(http, queue, "no-such-partition")

    assert answer.status_code == 204


# -- what a pop hands out ---------------------------------------------------------------


def test_pop_returns_batch_messages_when_more_are_available(http):
    queue = unique_name()
    push(http, queue, list(range(5)))

    delivery = pop(http, queue, batch=2)

    assert [m["data"] for m in delivery["messages"]] == [0, 1]


def test_pop_returns_what_is_available_when_batch_is_larger(http):
    queue = unique_name()
    push(http, queue, list(range(3)))

    delivery = pop(http, queue, batch=10)

    assert [m["data"] for m in delivery["messages"]] == [0, 1, 2]


def test_pop_takes_messages_from_one_partition(http):
    queue = unique_name()
    push(http, queue, ["a0", "a1", "a2"], partition="a", prefix="a")
    push(http, queue, ["b0", "b1", "b2"], partition="b", prefix="b")

    delivery = pop(http, queue, batch=10)

    assert len({m["partitionId"] for m in delivery["messages"]}) == 1
    assert len(delivery["messages"]) == 3


def test_popped_message_carries_every_field_clients_read(http):
    queue = unique_name()
    trace_id = str(uuid.uuid4())
    answer = http.post("/api/v1/push", json={"items": [
        {"queue": queue, "partition": "p1", "payload": {"k": "v"}, "transactionId": "tx-1",
         "traceId": trace_id}]})
    [pushed] = answer.json()

    delivery = pop(http, queue, consumerGroup="workers")

    [message] = delivery["messages"]
    assert message["id"] == pushed["message_id"]
    assert message["transactionId"] == "tx-1"
    assert message["partitionId"] == pushed["partition_id"]
    uuid.UUID(message["leaseId"])
    assert message["partition"] == "p1"
    assert message["consumerGroup"] == "workers"
    assert message["data"] == {"k": "v"}
    assert message["traceId"] == trace_id
    assert "producerSub" in message and message["producerSub"] is None
    assert CREATED_AT_6_DIGITS.match(message["createdAt"]), message["createdAt"]
    assert message["queue"] == queue
    assert message["retryCount"] == 0


def test_popped_names_and_payloads_with_awkward_characters_arrive_intact(http):
    queue = unique_name()
    partition = 'p "quoted" \\ back\nline é'
    group = 'group "with" \\ é'
    payloads = [{"text": 'say "hi"\n\t\\ \u2028 é'}, None, "plain", [1, {"a": None}]]
    answer = http.post("/api/v1/push", json={"items": [
        {"queue": queue, "partition": partition, "payload": payload,
         "transactionId": f'tx "{n}" \\'} for n, payload in enumerate(payloads)]})
    assert answer.status_code == 201, answer.text

    answer = http.get(f"/api/v1/pop/queue/{queue}",
                      params={"batch": 10, "wait": "false", "consumerGroup": group})

    assert answer.status_code == 200, answer.text
    messages = json.loads(answer.text)["messages"]
    assert [m["data"] for m in messages] == payloads
    assert [m["transactionId"] for m in messages] == [f'tx "{n}" \\' for n in range(4)]
    assert {m["partition"] for m in messages} == {partition}
    assert {m["consumerGroup"] for m in messages} == {group}


def test_pop_answer_describes_the_claimed_partition(http):
    queue = unique_name()
    [pushed] = push(http, queue, ["x"], partition="p1")

    delivery = pop(http, queue)

    assert delivery["success"] is True
    assert delivery["queue"] == queue
    assert delivery["partition"] == "p1"
    assert delivery["partitionId"] == pushed["partition_id"]
    assert delivery["leaseId"] == delivery["messages"][0]["leaseId"]
    assert delivery["consumerGroup"] == "__QUEUE_MODE__"
    assert delivery["partitionsClaimed"] == 1


def test_pop_without_trace_id_answers_trace_id_null(http):
    queue = unique_name()
    push(http, queue, ["x"])

    delivery = pop(http, queue)

    assert delivery["messages"][0]["traceId"] is None


# -- leases -----------------------------------------------------------------------------


def test_leased_partition_is_not_handed_to_a_second_pop(http):
    queue = unique_name()
    push(http, queue, ["first", "second"])
    pop(http, queue)

    answer = pop_answer(http, queue)

    assert answer.status_code == 204


def test_leased_partition_is_not_handed_out_on_the_partition_route(http):
    queue = unique_name()
    push(http, queue, ["first", "second"], partition="p")
    pop(http, queue, "p")

    answer = pop_answer(http, queue, "p")

    assert answer.status_code == 204


def test_lease_of_one_group_does_not_block_another_group(http):
    queue = unique_name()
    push(http, queue, ["only"])
    pop(http, queue, consumerGroup="g1")

    delivery = pop(http, queue, consumerGroup="g2")

    assert delivery["messages"][0]["data"] == "only"


def test_partial_ack_keeps_the_lease(http):
    queue = unique_name()
    push(http, queue, ["m0", "m1", "m2"])
    delivery = pop(http, queue, batch=2)
    ack(http, delivery["messages"][0])

    answer = pop_answer(http, queue)

    assert answer.status_code == 204


def test_last_ack_releases_the_lease_and_the_next_message_comes_at_once(http):
    queue = unique_name()
    push(http, queue, ["m0", "m1", "m2"])
    delivery = pop(http, queue, batch=2)
    ack(http, delivery["messages"][0])
    last = ack(http, delivery["messages"][1])

    following = pop(http, queue)

    assert last["success"] is True and last["leaseReleased"] is True
    assert [m["data"] for m in following["messages"]] == ["m2"]


def test_unacked_message_is_redelivered_after_lease_expiry(http, db):
    queue = unique_name()
    configure(http, queue, leaseTime=60)
    push(http, queue, ["x"])
    first = pop(http, queue)
    assert 30 < lease_seconds_left(db, first["leaseId"]) <= 60  # the queue's leaseTime
    assert pop_answer(http, queue).status_code == 204  # not while the lease holds

    assert expire_leases(db, queue) == 1  # instead of waiting out the 60 s
    again = pop(http, queue)

    assert again["messages"][0]["id"] == first["messages"][0]["id"]
    assert again["leaseId"] != first["leaseId"]


def test_auto_ack_pop_answers_empty_lease_and_frees_the_partition(http):
    queue = unique_name()
    push(http, queue, ["m0", "m1"])
    delivery = pop(http, queue, autoAck="true")

    following = pop(http, queue)

    assert delivery["leaseId"] == ""
    assert delivery["messages"][0]["leaseId"] == ""
    assert [m["data"] for m in following["messages"]] == ["m1"]


def test_auto_acked_message_is_not_redelivered(http, db):
    queue = unique_name()
    push(http, queue, ["x"])
    pop(http, queue, autoAck="true")
    expire_leases(db, queue)  # had the pop kept a lease, its message would now come back

    answer = pop_answer(http, queue)

    assert answer.status_code == 204


# -- failures, retries and the dead-letter queue ----------------------------------------


def test_failed_ack_redelivers_after_retry_delay_with_retry_count(http):
    queue = unique_name()
    configure(http, queue, retryDelay=200)
    push(http, queue, ["x"])
    first = pop(http, queue)["messages"][0]
    result = ack(http, first, "failed", error="boom")

    again = poll_pop(http, queue)  # once the 200 ms cool-down has passed

    assert result["success"] is True
    assert again["messages"][0]["id"] == first["id"]
    assert again["messages"][0]["retryCount"] == 1


def test_failed_ack_keeps_the_partition_back_during_retry_delay(http):
    queue = unique_name()
    configure(http, queue, retryDelay=5000)
    push(http, queue, ["x"])
    ack(http, pop(http, queue)["messages"][0], "failed")

    answer = pop_answer(http, queue)

    assert answer.status_code == 204


def test_failed_batch_ack_redelivers_the_whole_batch(http):
    queue = unique_name()
    configure(http, queue, retryDelay=0)
    push(http, queue, ["m0", "m1", "m2"])
    delivery = pop(http, queue, batch=3)

    results = batch_ack(http, delivery["messages"], status="failed")
    again = poll_pop(http, queue, batch=3)

    # The first failure ends the delivery; the request's other items are still its own.
    assert [(r["success"], r["error"], r["dlq"]) for r in results] == [(True, None, False)] * 3
    assert [m["data"] for m in again["messages"]] == ["m0", "m1", "m2"]


def test_exhausted_retries_move_the_message_to_the_dlq(http):
    queue = unique_name()
    configure(http, queue, retryLimit=1, retryDelay=0)
    push(http, queue, [{"order": 7}])
    error_text = f"handler exploded {uuid.uuid4().hex}"

    results = exhaust(http, queue, attempts=2, error=error_text)

    assert [r["dlq"] for r in results] == [False, True]
    dlq = dead_letters(http, queue)
    assert dlq["total"] == 1
    [entry] = dlq["messages"]
    assert entry["data"] == {"order": 7}
    assert error_text in entry["errorMessage"]
    assert entry["queue"] == queue
    assert entry["transactionId"] == "t0"


def test_message_in_dlq_is_not_delivered_again(http):
    queue = unique_name()
    configure(http, queue, retryLimit=0, retryDelay=0)
    push(http, queue, ["doomed", "next"])
    exhaust(http, queue, attempts=1, error="nope")

    following = pop(http, queue, batch=5)

    assert [m["data"] for m in following["messages"]] == ["next"]


def test_dlq_status_ack_moves_the_message_to_the_dlq_at_once(http):
    queue = unique_name()
    configure(http, queue, retryLimit=5)
    push(http, queue, ["poison", "fine"])
    message = pop(http, queue)["messages"][0]

    result = ack(http, message, "dlq", error="unparseable")

    assert result["success"] is True and result["dlq"] is True
    dlq = dead_letters(http, queue)
    assert [e["data"] for e in dlq["messages"]] == ["poison"]
    assert "unparseable" in dlq["messages"][0]["errorMessage"]
    assert [m["data"] for m in pop(http, queue)["messages"]] == ["fine"]


@pytest.mark.parametrize("first", ["failed", "retry"])
def test_a_dlq_ack_after_a_failure_in_one_request_never_skips_the_failed_message(http, first):
    queue = unique_name()
    configure(http, queue, retryLimit=3, retryDelay=0)
    push(http, queue, ["a", "b", "c"])
    m = pop(http, queue, batch=3)["messages"]
    answer = http.post("/api/v1/ack/batch", json={"acknowledgments": [
        {"transactionId": m[0]["transactionId"], "partitionId": m[0]["partitionId"],
         "leaseId": m[0]["leaseId"], "status": first, "error": "boom"},
        {"transactionId": m[1]["transactionId"], "partitionId": m[1]["partitionId"],
         "leaseId": m[1]["leaseId"], "status": "dlq", "error": "poison"}]})
    assert answer.status_code == 200, answer.text
    again = pop(http, queue, batch=10)
    assert [x["data"] for x in again["messages"]] == ["a", "b", "c"]  # all back, in order
    assert dead_letters(http, queue)["messages"] == []


def test_an_ack_of_a_message_its_lease_did_not_deliver_is_refused(http):
    queue = unique_name()
    push(http, queue, ["a", "b", "c", "d"])
    m = pop(http, queue, batch=2)["messages"]
    later = pop(http, queue, batch=10, consumerGroup="peek")["messages"][3]  # never leased
    answer = http.post("/api/v1/ack", json={
        "transactionId": later["transactionId"], "partitionId": later["partitionId"],
        "leaseId": m[0]["leaseId"], "status": "completed"})
    assert answer.json()[0]["success"] is False
    assert answer.json()[0]["error"] == "Message was not delivered under this lease"
    ack(http, m[1])
    assert [x["data"] for x in pop(http, queue, batch=10)["messages"]] == ["c", "d"]


def test_dlq_lists_only_the_asked_queue(http):
    queue, other = unique_name(), unique_name()
    for name in (queue, other):
        push(http, name, [name])
        ack(http, pop(http, name)["messages"][0], "dlq", error="x")

    dlq = dead_letters(http, queue)

    assert dlq["total"] == 1
    assert [e["data"] for e in dlq["messages"]] == [queue]


# -- ack errors -------------------------------------------------------------------------


def test_ack_with_wrong_lease_fails_and_changes_nothing(http):
    queue = unique_name()
    push(http, queue, ["x", "y"])
    message = pop(http, queue)["messages"][0]

    result = ack(http, message, leaseId=str(uuid.uuid4()))

    assert result["success"] is False
    assert result["error"] == "Invalid or expired lease"
    assert pop_answer(http, queue).status_code == 204  # lease still held
    assert ack(http, message)["success"] is True  # and still the real one's to ack


def test_ack_of_unknown_transaction_id_reports_message_not_found(http):
    queue = unique_name()
    [pushed] = push(http, queue, ["x"])

    answer = http.post("/api/v1/ack", json={"transactionId": "never-pushed",
                                            "partitionId": pushed["partition_id"]})

    assert answer.status_code == 200
    [result] = answer.json()
    assert result["success"] is False
    assert result["error"] == "Message not found"


def test_ack_of_unknown_partition_reports_message_not_found(http):
    answer = http.post("/api/v1/ack", json={"transactionId": "t",
                                            "partitionId": str(uuid.uuid4())})

    assert answer.status_code == 200
    assert answer.json()[0]["success"] is False
    assert answer.json()[0]["error"] == "Message not found"


def test_ack_with_invalid_status_reports_invalid_status(http):
    queue = unique_name()
    push(http, queue, ["x"])
    message = pop(http, queue)["messages"][0]

    result = ack(http, message, "maybe")

    assert result["success"] is False
    assert result["error"] == "Invalid status"


def test_single_ack_answers_one_item_with_its_fields(http):
    queue = unique_name()
    push(http, queue, ["x"], partition="p")
    message = pop(http, queue)["messages"][0]

    result = ack(http, message)

    assert result["index"] == 0
    assert result["transactionId"] == message["transactionId"]
    assert result["success"] is True
    assert result["error"] is None
    assert result["queueName"] == queue
    assert result["partitionName"] == "p"
    assert result["dlq"] is False


# -- batch ack and cursor ---------------------------------------------------------------


def test_batch_ack_across_two_partitions_frees_both(http):
    queue = unique_name()
    push(http, queue, ["a0", "a1"], partition="a", prefix="a")
    push(http, queue, ["b0", "b1"], partition="b", prefix="b")
    messages = [pop(http, queue, "a")["messages"][0], pop(http, queue, "b")["messages"][0]]

    answer = http.post("/api/v1/ack/batch", json={"consumerGroup": None, "acknowledgments": [
        {"transactionId": m["transactionId"], "partitionId": m["partitionId"],
         "leaseId": m["leaseId"], "status": "completed"} for m in messages]})

    assert answer.status_code == 200
    assert [(r["index"], r["success"]) for r in answer.json()] == [(0, True), (1, True)]
    assert [m["data"] for m in pop(http, queue, "a")["messages"]] == ["a1"]
    assert [m["data"] for m in pop(http, queue, "b")["messages"]] == ["b1"]


def test_batch_ack_of_a_multi_partition_pop(http):
    queue = unique_name()
    push(http, queue, ["a0"], partition="a", prefix="a")
    push(http, queue, ["b0"], partition="b", prefix="b")
    delivery = pop(http, queue, batch=10, partitions=2)

    answer = http.post("/api/v1/ack/batch", json={"acknowledgments": [
        {"transactionId": m["transactionId"], "partitionId": m["partitionId"],
         "leaseId": m["leaseId"]} for m in delivery["messages"]]})

    assert sorted(m["data"] for m in delivery["messages"]) == ["a0", "b0"]
    assert len({m["leaseId"] for m in delivery["messages"]}) == 1
    assert [r["success"] for r in answer.json()] == [True, True]
    assert all(r["leaseReleased"] for r in answer.json())


def test_acking_an_older_message_after_a_newer_one_does_not_move_the_cursor_back(http):
    queue = unique_name()
    push(http, queue, ["m0", "m1", "m2"])
    older, newer = pop(http, queue, batch=2)["messages"]
    ack(http, newer)
    ack(http, older)

    following = pop(http, queue, batch=5)

    assert [m["data"] for m in following["messages"]] == ["m2"]



def batch_ack(http: httpx.Client, messages: List[Dict[str, Any]],
              **overrides: Any) -> List[Dict[str, Any]]:
    answer = http.post("/api/v1/ack/batch", json={"acknowledgments": [
        {"transactionId": m["transactionId"], "partitionId": m["partitionId"],
         "leaseId": m["leaseId"], "status": "completed", **overrides} for m in messages]})
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_whole_delivery_acked_at_once_answers_every_item_and_releases(http):
    queue = unique_name()
    push(http, queue, [f"m{n}" for n in range(5)], partition="p")
    delivery = pop(http, queue, batch=5)

    results = batch_ack(http, delivery["messages"])

    assert [(r["index"], r["transactionId"], r["success"], r["error"], r["dlq"])
            for r in results] == [(n, f"t{n}", True, None, False) for n in range(5)]
    assert {(r["queueName"], r["partitionName"], r["leaseReleased"]) for r in results} \
        == {(queue, "p", True)}
    assert pop_answer(http, queue).status_code == 204  # all five consumed


def test_whole_delivery_acked_in_any_order_settles_whatever_its_ids_sort_like(http):
    # The whole-delivery check compares sorted ids; ids whose byte order differs from their
    # order in the partition (and from any locale's) must still match, duplicates included.
    queue = unique_name()
    ids = ["t9", "t10", "Zeta", "alpha", "é", "E", "_1"]
    answer = http.post("/api/v1/push", json={"items": [
        {"queue": queue, "partition": "p", "payload": n, "transactionId": tx}
        for n, tx in enumerate(ids)]})
    assert answer.status_code == 201, answer.text
    messages = pop(http, queue, batch=len(ids))["messages"]
    shuffled = [messages[n] for n in (3, 0, 6, 1, 5, 2, 4)] + [messages[0]]

    results = batch_ack(http, shuffled)

    assert [(r["transactionId"], r["success"], r["leaseReleased"]) for r in results] \
        == [(m["transactionId"], True, True) for m in shuffled]
    assert pop_answer(http, queue).status_code == 204


def test_acking_part_of_a_delivery_moves_the_cursor_and_keeps_the_lease(http):
    queue = unique_name()
    push(http, queue, ["m0", "m1", "m2", "m3"])
    delivery = pop(http, queue, batch=3)

    first = batch_ack(http, delivery["messages"][:2])
    rest = batch_ack(http, delivery["messages"][2:])

    assert [(r["success"], r["leaseReleased"]) for r in first] == [(True, False)] * 2
    assert [(r["success"], r["leaseReleased"]) for r in rest] == [(True, True)]
    assert [m["data"] for m in pop(http, queue, batch=5)["messages"]] == ["m3"]


def test_one_unknown_item_fails_alone_and_the_rest_of_the_batch_applies(http):
    queue = unique_name()
    push(http, queue, ["m0", "m1"])
    delivery = pop(http, queue, batch=2)
    stranger = dict(delivery["messages"][0], transactionId="never-pushed")

    results = batch_ack(http, [*delivery["messages"], stranger])

    assert [(r["success"], r["error"]) for r in results] \
        == [(True, None), (True, None), (False, "Message not found")]
    assert results[1]["leaseReleased"] is True
    assert pop_answer(http, queue).status_code == 204


def test_a_repeated_ack_of_a_consumed_batch_changes_nothing(http):
    queue = unique_name()
    push(http, queue, ["m0", "m1", "m2"])
    delivery = pop(http, queue, batch=2)
    batch_ack(http, delivery["messages"])

    again = batch_ack(http, delivery["messages"])  # its lease ended with the first ack
    without_lease = batch_ack(http, delivery["messages"], leaseId=None)

    assert [r["error"] for r in again] == ["Invalid or expired lease"] * 2
    assert [r["success"] for r in without_lease] == [True, True]  # already consumed
    assert [m["data"] for m in pop(http, queue)["messages"]] == ["m2"]


def test_ack_with_an_uppercase_partition_id_is_recognised(http):
    queue = unique_name()
    push(http, queue, ["m0", "m1"])
    delivery = pop(http, queue, batch=2)

    results = batch_ack(http, [dict(m, partitionId=m["partitionId"].upper())
                               for m in delivery["messages"]])

    assert [(r["success"], r["leaseReleased"]) for r in results] == [(True, True)] * 2


def test_fused_requests_on_one_partition_apply_in_request_order(http, db):
    """Two requests fused into one ack call (as the server's Batcher does): each request is
    applied on its own, so only the second one, which reaches the end, releases the lease."""
    queue = unique_name()
    push(http, queue, ["m0", "m1", "m2"])
    messages = pop(http, queue, batch=3)["messages"]
    items = [{"transactionId": m["transactionId"], "partitionId": m["partitionId"],
              "leaseId": m["leaseId"], "req": req, "index": 0}
             for req, m in [(0, messages[0]), (1, messages[1]), (1, messages[2])]]
    with db.cursor() as cursor:
        cursor.execute("SELECT queen.ack_messages(%s::jsonb)", (json.dumps(items),))
        [results] = cursor.fetchone()

    assert [(r["success"], r["leaseReleased"]) for r in results] \
        == [(True, False), (True, True), (True, True)]
    assert pop_answer(http, queue).status_code == 204


def test_a_fused_call_answers_each_item_after_a_key_settled_whole(http, db):
    """A key settled whole (no per-item results) before a key answered item by item: every
    item still gets its own result, by its position (the answer the server expands)."""
    queue = unique_name()
    push(http, queue, ["a0", "a1"], partition="A", prefix="a")
    push(http, queue, ["b0", "b1"], partition="B", prefix="b")
    settled = pop(http, queue, "A", batch=2)["messages"]
    given_back = pop(http, queue, "B", batch=2)["messages"]
    items = [{"transactionId": m["transactionId"], "partitionId": m["partitionId"],
              "leaseId": m["leaseId"], "status": status, "req": req}
             for req, status, delivery in [(0, "completed", settled), (1, "retry", given_back)]
             for m in delivery]
    with db.cursor() as cursor:
        cursor.execute("SELECT queen.ack_core(%s::jsonb)", (json.dumps(items),))
        [answer] = cursor.fetchone()

    results = expand_ack_answer(items, answer)

    assert [(r["transactionId"], r["success"], r["partitionName"]) for r in results] \
        == [("a0", True, "A"), ("a1", True, "A"), ("b0", True, "B"), ("b1", True, "B")]
    assert [m["data"] for m in pop(http, queue, "B", batch=2)["messages"]] == ["b0", "b1"]


# -- long polling -----------------------------------------------------------------------


def test_long_poll_with_nothing_answers_204_after_the_timeout(http):
    queue = unique_name()
    configure(http, queue)
    started = time.monotonic()

    answer = http.get(f"/api/v1/pop/queue/{queue}", params={"wait": "true", "timeout": 1000},
                      timeout=15)

    elapsed = time.monotonic() - started
    assert answer.status_code == 204
    assert answer.content == b""
    assert elapsed >= 0.8  # a minimum, never a flake under load: it waited, not answered at once


PUSH_WHILE_WAITING_S = 0.5
"""A documented minimum: the push comes after the long-poll started waiting. If a loaded
machine starts the pop later, the pop finds the message at once and the test still passes."""


def test_long_poll_returns_a_message_pushed_while_it_waits(http, server):
    queue = unique_name()
    configure(http, queue)

    def push_later() -> None:
        time.sleep(PUSH_WHILE_WAITING_S)
        with httpx.Client(base_url=server.url, timeout=10) as client:
            client.post("/api/v1/push", json={"items": [
                {"queue": queue, "payload": "late arrival", "transactionId": "late"}]})

    pusher = threading.Thread(target=push_later)
    pusher.start()
    try:
        answer = http.get(f"/api/v1/pop/queue/{queue}",
                          params={"wait": "true", "timeout": 30000}, timeout=45)
    finally:
        pusher.join(15)

    assert answer.status_code == 200
    assert [m["data"] for m in answer.json()["messages"]] == ["late arrival"]


def test_long_poll_on_a_partition_returns_a_message_pushed_while_it_waits(http, server):
    queue = unique_name()
    configure(http, queue)

    def push_later() -> None:
        time.sleep(PUSH_WHILE_WAITING_S)
        with httpx.Client(base_url=server.url, timeout=10) as client:
            client.post("/api/v1/push", json={"items": [
                {"queue": queue, "partition": "p", "payload": "late", "transactionId": "late"}]})

    pusher = threading.Thread(target=push_later)
    pusher.start()
    try:
        answer = http.get(f"/api/v1/pop/queue/{queue}/partition/p",
                          params={"wait": "true", "timeout": 30000}, timeout=45)
    finally:
        pusher.join(15)

    assert answer.status_code == 200
    assert [m["data"] for m in answer.json()["messages"]] == ["late"]


# -- lease extension --------------------------------------------------------------------


def test_lease_extend_without_body_answers_the_new_expiry(http):
    queue = unique_name()
    push(http, queue, ["x"])
    lease_id = pop(http, queue)["leaseId"]

    answer = http.post(f"/api/v1/lease/{lease_id}/extend")

    assert answer.status_code == 200
    body = answer.json()
    assert body["leaseId"] == lease_id
    assert body["success"] is True
    assert ISO_Z.match(body["leaseExpiresAt"]), body
    assert body["newExpiresAt"] == body["leaseExpiresAt"]
    assert body["expiresAt"] == body["leaseExpiresAt"]


def test_lease_extend_with_empty_object_body_succeeds(http):
    queue = unique_name()
    push(http, queue, ["x"])
    lease_id = pop(http, queue)["leaseId"]

    answer = http.post(f"/api/v1/lease/{lease_id}/extend", json={})

    assert answer.status_code == 200
    assert answer.json()["success"] is True


def test_extended_lease_outlives_its_lease_time(http, db):
    queue = unique_name()
    configure(http, queue, leaseTime=1)
    push(http, queue, ["x"])
    lease_id = pop(http, queue)["leaseId"]

    extended = http.post(f"/api/v1/lease/{lease_id}/extend", json={"seconds": 30})

    assert extended.status_code == 200, extended.text
    assert lease_seconds_left(db, lease_id) > 20  # on PostgreSQL's clock, not 1 s any more
    assert pop_answer(http, queue).status_code == 204


def test_lease_extend_of_unknown_lease_answers_404(http):
    answer = http.post(f"/api/v1/lease/{uuid.uuid4()}/extend")

    assert answer.status_code == 404
    assert answer.json() == {"error": "Lease not found"}


def test_lease_extend_of_non_uuid_lease_answers_400(http):
    answer = http.post("/api/v1/lease/not-a-uuid/extend")

    assert answer.status_code == 400
    assert isinstance(answer.json()["error"], str)


def test_first_ack_of_a_fresh_session_for_an_unknown_partition_is_message_not_found(server, db):
    """The first ack_messages call of a new database session, for a partition that does not
    exist, once failed with 'record "v_pc" is not assigned yet' instead of an answer."""
    items = [{"transactionId": "never-pushed", "partitionId": str(uuid.uuid4()), "req": 0}]
    with db.cursor() as cursor:
        cursor.execute("SELECT queen.ack_messages(%s::jsonb)", (json.dumps(items),))
        [results] = cursor.fetchone()

    assert [(r["success"], r["error"]) for r in results] == [(False, "Message not found")]


def _auto_ack_span(message: Dict[str, Any]) -> Dict[str, Any]:
    return {"partitionId": message["partitionId"], "consumerGroup": message["consumerGroup"],
            "firstAt": message["createdAt"], "firstId": message["id"],
            "lastAt": message["createdAt"], "lastId": message["id"], "count": 1}


def test_undoing_an_auto_ack_delivery_needs_the_cursor_where_it_left_it(http, db):
    """queen.undo_auto_ack (a client gone before its autoAck answer): only the delivery the
    cursor still stands at goes back, and then exactly to where its pop found the cursor."""
    queue = unique_name()
    push(http, queue, ["m1", "m2", "m3"])
    first = pop(http, queue, autoAck="true")["messages"][0]
    second = pop(http, queue, autoAck="true")["messages"][0]

    def undo(message):
        with db.cursor() as cursor:
            cursor.execute("SELECT queen.undo_auto_ack(%s::jsonb)",
                           (json.dumps([_auto_ack_span(message)]),))
            return cursor.fetchone()[0]

    assert undo(first) == []  # the second pop read past it: going back would repeat m2
    assert undo(second) == [second["partitionId"]]
    assert [m["data"] for m in pop(http, queue, batch=10)["messages"]] == ["m2", "m3"]


# -- the byte budget of one answer --------------------------------------------------------

BIG_TEXT = "x" * (30 * 1024 * 1024)  # 30 MiB: 0, 30, 60 MiB before the first three, 90 the 4th


def test_a_pop_of_big_messages_stops_at_the_byte_budget_and_loses_none(http):
    """40 such messages made a 1.2 GB answer, over PostgreSQL's string limit: the pop failed
    every time and answered 204, as if the queue were empty."""
    queue = unique_name()
    configure(http, queue)
    for n in range(4):
        push(http, queue, [{"n": n, "text": BIG_TEXT}], prefix=f"big{n}-")

    first = pop(http, queue, batch=4)
    assert first is not None
    assert [m["data"]["n"] for m in first["messages"]] == [0, 1, 2]
    for message in first["messages"]:
        assert ack(http, message)["success"] is True
    second = pop(http, queue, batch=4)
    assert second is not None
    assert [m["data"]["n"] for m in second["messages"]] == [3]


def test_a_pop_across_partitions_claims_none_past_the_byte_budget(http):
    queue = unique_name()
    configure(http, queue)
    for n in range(4):
        push(http, queue, [{"n": n, "text": BIG_TEXT}], partition=f"p{n}", prefix="big-")

    first = pop(http, queue, batch=10, partitions=10, consumerGroup="g")
    assert first is not None
    taken = {m["data"]["n"] for m in first["messages"]}
    assert len(taken) == 3
    second = pop(http, queue, batch=10, partitions=10, consumerGroup="g")
    assert second is not None
    assert {m["data"]["n"] for m in second["messages"]} == {0, 1, 2, 3} - taken


def test_a_fused_pop_call_ends_at_the_first_lock_timeout_not_one_per_request(http, db,
                                                                           holder):
    """Each request of a fused pop_batch call ran in a block that caught every error, the
    lock timeout included, so the next request waited out the lock timeout again: a call
    of 57 pops behind a held table took 30 s to end (an audit). A lock timeout now ends
    the call (the server answers its pops "nothing yet"); other errors stay per request."""
    queues = [unique_name() for _ in range(3)]
    for queue in queues:
        http.post("/api/v1/push", json={"items": [{"queue": queue, "payload": 1}]})
    with holder.cursor() as cursor:
        cursor.execute("LOCK TABLE queen.partition_consumers IN ACCESS EXCLUSIVE MODE")
    with db.cursor() as cursor:
        cursor.execute("SET lock_timeout = '300ms'")
        with pytest.raises(psycopg2.errors.LockNotAvailable):
            cursor.execute("SELECT * FROM queen.pop_batch(%s)", (json.dumps(
                [{"queue": queue, "batch": 1} for queue in queues]),))


@pytest.mark.parametrize("batch, deleted", [(1, 0), (3, 2)], ids=["alone", "last-of-three"])
def test_a_leased_message_deleted_meanwhile_does_not_hold_the_partition(http, batch, deleted):
    """A message deleted while leased (DELETE of it, or retention racing the pop that handed
    it out) can never be acked: the lease stayed until it expired and the partition's next
    message waited the whole lease time (an audit: 6 s of a 6 s lease; retention at 1 s
    refused 1.8 % of acks this way). Once the rest of the delivery is acked, nothing is left
    under the lease, which ends."""
    queue = unique_name()
    configure(http, queue, leaseTime=300)
    push(http, queue, list(range(batch + 1)))
    delivery = pop(http, queue, batch=batch)
    assert [m["data"] for m in delivery["messages"]] == list(range(batch))
    gone = delivery["messages"][deleted]
    assert http.delete(f"/api/v1/messages/{gone['partitionId']}/"
                       f"{gone['transactionId']}").status_code == 200

    results = [ack(http, message) for message in delivery["messages"]]

    assert [r["success"] for r in results] == [n != deleted for n in range(batch)]
    assert results[-1]["leaseReleased"] is True
    following = pop(http, queue)
    assert following is not None and [m["data"] for m in following["messages"]] == [batch]
