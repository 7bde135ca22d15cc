"""Atomic transactions (WIRE.md 2.5, 9.4): over HTTP and through the official client."""

import json
import threading
import time
import uuid
from typing import Any, Dict, List

import pytest

from tests.client_helpers import connect, pop_now, run_scenario
from tests.support import count_messages, expire_leases, lease_ends_in, unique_name


def _push(http, queue: str, n: int = 1, partition: str = "Default") -> List[Dict[str, Any]]:
    items = [{"queue": queue, "partition": partition, "payload": {"n": i}} for i in range(n)]
    answer = http.post("/api/v1/push", json={"items": items})
    assert answer.status_code == 201
    return answer.json()


def _pop(http, queue: str, **params) -> Dict[str, Any]:
    answer = http.get(f"/api/v1/pop/queue/{queue}", params={"batch": 10, **params})
    return answer.json() if answer.status_code == 200 else {"messages": []}


@pytest.mark.parametrize("spelled", [str.upper, lambda lease: f"{{{lease}}}",
                                     lambda lease: lease.replace("-", "")])
def test_a_required_lease_spelled_otherwise_is_still_the_holders(http, spelled):
    """Lease ids were compared as text: the holder's own lease in capitals was "held under
    another lease". They are read into PostgreSQL's form first."""
    source = unique_name()
    _push(http, source)
    message = _pop(http, source)["messages"][0]

    body = http.post("/api/v1/transaction", json={
        "operations": [{"type": "ack", "transactionId": message["transactionId"],
                        "partitionId": message["partitionId"],
                        "leaseId": spelled(message["leaseId"])}],
        "requiredLeases": [spelled(message["leaseId"])]}).json()

    assert body["success"] is True, body
    assert http.get(f"/api/v1/pop/queue/{source}").status_code == 204


@pytest.mark.parametrize("where", ["requiredLeases", "leaseId"])
def test_a_lease_id_postgresql_cannot_read_answers_400(http, where):
    source = unique_name()
    _push(http, source)
    message = _pop(http, source)["messages"][0]
    urn = "urn:uuid:" + message["leaseId"]
    operation = {"type": "ack", "transactionId": message["transactionId"],
                 "partitionId": message["partitionId"]}
    body: Dict[str, Any] = {"operations": [operation]}
    if where == "leaseId":
        operation["leaseId"] = urn
    else:
        body["requiredLeases"] = [urn]

    answer = http.post("/api/v1/transaction", json=body)

    assert answer.status_code == 400, answer.text


def test_transaction_acks_and_pushes_together(http, db):
    source, sink = unique_name(), unique_name()
    _push(http, source)
    message = _pop(http, source)["messages"][0]

    answer = http.post("/api/v1/transaction", json={
        "operations": [
            {"type": "ack", "transactionId": message["transactionId"],
             "partitionId": message["partitionId"], "status": "completed"},
            {"type": "push", "items": [{"queue": sink, "payload": {"from": message["id"]}}]},
        ],
        "requiredLeases": [message["leaseId"]]})

    body = answer.json()
    assert answer.status_code == 200 and body["success"] is True, body
    assert [r["type"] for r in body["results"]] == ["ack", "push"]
    assert body["results"][1]["messageId"] and body["results"][1]["queueName"] == sink
    assert _pop(http, sink)["messages"][0]["data"] == {"from": message["id"]}
    assert http.get(f"/api/v1/pop/queue/{source}").status_code == 204  # acked: nothing left


def test_failing_operation_rolls_back_everything_and_answers_200_success_false(http, db):
    sink = unique_name()
    answer = http.post("/api/v1/transaction", json={"operations": [
        {"type": "push", "items": [{"queue": sink, "payload": 1}]},
        {"type": "ack", "transactionId": "no-such-message",
         "partitionId": "00000000-0000-0000-0000-000000000001"},
    ]})
    body = answer.json()
    assert answer.status_code == 200
    assert body["success"] is False and body["error"] == "Message not found"
    assert count_messages(db, sink) == 0


def test_expired_required_lease_fails_the_transaction(http, db):
    source, sink = unique_name(), unique_name()
    http.post("/api/v1/configure", json={"queue": source, "options": {"leaseTime": 1}})
    _push(http, source)
    message = _pop(http, source)["messages"][0]
    assert expire_leases(db, source) == 1  # instead of sleeping past the 1 s lease

    body = http.post("/api/v1/transaction", json={
        "operations": [{"type": "push", "items": [{"queue": sink, "payload": 1}]}],
        "requiredLeases": [message["leaseId"]]}).json()

    assert body["success"] is False and message["leaseId"] in body["error"]
    assert count_messages(db, sink) == 0


@pytest.mark.parametrize("second_consumer_acks", ["retry", "completed"])
def test_an_ack_without_lease_is_fenced_by_the_only_required_lease(http, db,
                                                                    second_consumer_acks):
    """A 0.15.0 client's ack op carries no leaseId: the transaction's single required lease
    fences it (WIRE2 5.1), also once the lease is no longer stored (expired, redelivered to
    another consumer, who settled it)."""
    source, sink = unique_name(), unique_name()
    _push(http, source)
    late = _pop(http, source, batch=1)["messages"][0]
    expire_leases(db, source)
    again = _pop(http, source, batch=1)["messages"][0]
    assert again["transactionId"] == late["transactionId"]
    settled = http.post("/api/v1/ack", json={
        "transactionId": again["transactionId"], "partitionId": again["partitionId"],
        "leaseId": again["leaseId"], "status": second_consumer_acks})
    assert settled.status_code == 200 and settled.json()[0]["success"] is True, settled.text

    body = http.post("/api/v1/transaction", json={
        "operations": [{"type": "ack", "transactionId": late["transactionId"],
                        "partitionId": late["partitionId"]},
                       {"type": "push", "items": [{"queue": sink, "payload": 1}]}],
        "requiredLeases": [late["leaseId"]]}).json()

    assert body["success"] is False and "lease" in body["error"].lower(), body
    assert count_messages(db, sink) == 0


def test_a_lease_taken_over_after_it_expired_fails_a_transaction_listing_two_leases(http, db):
    """With two leases listed, ack ops without leaseId are fenced by neither; the expired one
    must still fail the transaction after another consumer took its partition over and
    settled the message, or both consumers' results commit for one message."""
    source, sink = unique_name(), unique_name()
    _push(http, source, partition="p1")
    _push(http, source, partition="p2")
    first = _pop(http, source, batch=1)["messages"][0]
    second = _pop(http, source, batch=1)["messages"][0]
    assert first["partitionId"] != second["partitionId"]
    lease_ends_in(db, first["leaseId"], -1)
    again = http.get(f"/api/v1/pop/queue/{source}/partition/{first['partition']}",
                     params={"batch": 1}).json()["messages"][0]
    assert again["transactionId"] == first["transactionId"] and again["leaseId"] != \
        first["leaseId"]
    settled = http.post("/api/v1/ack", json={
        "transactionId": again["transactionId"], "partitionId": again["partitionId"],
        "leaseId": again["leaseId"], "status": "completed"})
    assert settled.json()[0]["success"] is True, settled.text

    body = http.post("/api/v1/transaction", json={
        "operations": [{"type": "ack", "transactionId": m["transactionId"],
                        "partitionId": m["partitionId"]} for m in (first, second)]
        + [{"type": "push", "items": [{"queue": sink, "payload": "late result"}]}],
        "requiredLeases": [first["leaseId"], second["leaseId"]]}).json()

    assert body["success"] is False and first["leaseId"] in body["error"], body
    assert count_messages(db, sink) == 0


def _assert_late_transaction_fenced(http, db, first, second, sink: str) -> None:
    """The holder of ``first`` and ``second`` (group g) acks both and pushes a result in one
    transaction listing both leases; ``first``'s lease ended, so nothing may commit."""
    body = http.post("/api/v1/transaction", json={
        "operations": [{"type": "ack", "transactionId": m["transactionId"],
                        "partitionId": m["partitionId"], "consumerGroup": "g"}
                       for m in (first, second)]
        + [{"type": "push", "items": [{"queue": sink, "payload": "late result"}]}],
        "requiredLeases": [first["leaseId"], second["leaseId"]]}).json()

    assert body["success"] is False and first["leaseId"] in body["error"], body
    assert count_messages(db, sink) == 0


def _operator_dead_letters(http, message):
    answer = http.post(f"/api/v1/messages/{message['partitionId']}/{message['transactionId']}/dlq",
                       json={"consumerGroup": "g"})
    assert answer.status_code == 200, answer.text


def _operator_seeks_group(http, message):
    answer = http.post(f"/api/v1/consumer-groups/g/queues/{message['queue']}/seek",
                       json={"toEnd": True})
    assert answer.status_code == 200, answer.text


def _operator_seeks_partition(http, message):
    answer = http.post(f"/api/v1/consumer-groups/g/queues/{message['queue']}/partitions/"
                       f"{message['partition']}/seek")
    assert answer.status_code == 200, answer.text


def _operator_clears(http, message):
    answer = http.delete(f"/api/v1/queues/{message['queue']}/clear",
                         params={"partition": message["partition"]})
    assert answer.status_code == 200, answer.text


def _operator_deletes_group(http, message):
    answer = http.delete(f"/api/v1/consumer-groups/g/queues/{message['queue']}")
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize("operator", [_operator_dead_letters, _operator_seeks_group,
                                      _operator_seeks_partition, _operator_clears,
                                      _operator_deletes_group])
def test_a_lease_an_operator_ended_fails_a_transaction_listing_two_leases(http, db, operator):
    """A dead letter by hand, a seek, a clear or a group delete ends the delivery under way:
    its holder's late transaction (two leases listed, so its ack ops carry no lease of their
    own) must fail, or a message the operator dead-lettered is settled and its result pushed
    as well."""
    source, sink = unique_name(), unique_name()
    _push(http, source, partition="p1")
    _push(http, source, partition="p2")
    first = _pop(http, source, batch=1, consumerGroup="g")["messages"][0]
    second = _pop(http, source, batch=1, consumerGroup="g")["messages"][0]
    assert first["partitionId"] != second["partitionId"]
    operator(http, first)

    _assert_late_transaction_fenced(http, db, first, second, sink)


def test_duplicate_push_in_a_transaction_is_reported_not_fatal(http, db):
    queue = unique_name()
    first = _push(http, queue)[0]
    body = http.post("/api/v1/transaction", json={"operations": [
        {"type": "push", "items": [{"queue": queue, "transactionId": first["transaction_id"]},
                                   {"queue": queue, "payload": "new"}]}]}).json()
    assert body["success"] is True
    assert body["results"][0]["status"] == "duplicate"
    assert body["results"][0]["messageId"] == first["message_id"]
    assert count_messages(db, queue) == 2


def test_group_ack_in_a_transaction_moves_only_that_group(http):
    queue = unique_name()
    _push(http, queue)
    for_a = _pop(http, queue, consumerGroup="a")["messages"][0]
    body = http.post("/api/v1/transaction", json={"operations": [
        {"type": "ack", "transactionId": for_a["transactionId"],
         "partitionId": for_a["partitionId"], "consumerGroup": "a"}]}).json()
    assert body["success"] is True
    assert http.get(f"/api/v1/pop/queue/{queue}", params={"consumerGroup": "a"}).status_code == 204
    assert len(_pop(http, queue, consumerGroup="b")["messages"]) == 1


def test_failed_ack_with_retry_limit_zero_sends_the_message_to_the_dlq(http):
    queue = unique_name()
    http.post("/api/v1/configure", json={"queue": queue, "options": {"retryLimit": 0}})
    _push(http, queue)
    message = _pop(http, queue)["messages"][0]
    body = http.post("/api/v1/transaction", json={"operations": [
        {"type": "ack", "transactionId": message["transactionId"],
         "partitionId": message["partitionId"], "status": "failed"}]}).json()
    assert body["success"] is True and body["results"][0]["dlq"] is True
    assert http.get(f"/api/v1/pop/queue/{queue}").status_code == 204
    assert http.get("/api/v1/dlq", params={"queue": queue}).json()["total"] == 1


@pytest.mark.parametrize("with_own_lease", [False, True])
def test_a_transaction_failing_a_whole_delivery_counts_once_and_commits(http, db,
                                                                       with_own_lease):
    """One ack op per message, all failed (as both clients build a failed batch): the acks
    apply as one request (WIRE.md 2.4), so the ops after the first are the no-ops of a
    released delivery. Each op was fenced alone before: the first released the lease, the
    second failed it ("Invalid or expired lease") and the whole transaction rolled back."""
    queue, sink = unique_name(), unique_name()
    http.post("/api/v1/configure", json={"queue": queue, "options": {"retryLimit": 3,
                                                                      "retryDelay": 0}})
    _push(http, queue, 3)
    delivery = _pop(http, queue)["messages"]
    own = (lambda m: {"leaseId": m["leaseId"]}) if with_own_lease else (lambda m: {})
    answer = http.post("/api/v1/transaction", json={
        "operations": [{"type": "ack", "transactionId": m["transactionId"],
                        "partitionId": m["partitionId"], "status": "failed", "error": "e",
                        **own(m)} for m in delivery]
        + [{"type": "push", "items": [{"queue": sink, "payload": "compensation"}]}],
        "requiredLeases": [delivery[0]["leaseId"]]})

    body = answer.json()
    assert body["success"] is True, body
    assert [r["success"] for r in body["results"]] == [True] * 4
    assert count_messages(db, sink) == 1
    again = _pop(http, queue)["messages"]
    assert [m["data"] for m in again] == [m["data"] for m in delivery]
    assert again[0]["retryCount"] == 1


def test_a_completion_after_a_failure_in_a_transaction_does_not_skip_the_failure(http):
    """Ops of one delivery: a fails, b completes. As in one /ack request, b's completion is
    ignored so a comes back; alone, b's completion moved the cursor past a."""
    queue = unique_name()
    http.post("/api/v1/configure", json={"queue": queue, "options": {"retryLimit": 3,
                                                                      "retryDelay": 0}})
    _push(http, queue, 2)
    a, b = _pop(http, queue)["messages"]
    body = http.post("/api/v1/transaction", json={
        "operations": [{"type": "ack", "transactionId": a["transactionId"],
                        "partitionId": a["partitionId"], "status": "failed"},
                       {"type": "ack", "transactionId": b["transactionId"],
                        "partitionId": b["partitionId"], "status": "completed"}]}).json()
    assert body["success"] is True, body
    again = _pop(http, queue)["messages"]
    assert [m["data"] for m in again] == [{"n": 0}, {"n": 1}]


@pytest.mark.parametrize("body, error", [
    ({}, "operations array required"),
    ({"operations": "x"}, "operations array required"),
    ({"operations": []}, "operations array cannot be empty"),
    ({"operations": [{"type": "push", "items": [{"payload": 1}]}]}, "Queue must be a string"),
    ({"operations": [{"type": "ack", "partitionId": "00000000-0000-0000-0000-000000000001"}]},
     "transactionId is required"),
    ({"operations": [{"type": "push", "items": [{"queue": "q"}]}], "requiredLeases": ["x"]},
     "requiredLeases must be an array of lease ids"),
    # falsy non-arrays were read as no leases, and the transaction committed unfenced
    *(({"operations": [{"type": "push", "items": [{"queue": "q"}]}], "requiredLeases": leases},
       "requiredLeases must be an array of lease ids") for leases in ({}, "", 0, False)),
])
def test_malformed_transaction_is_refused_with_400(http, body, error):
    answer = http.post("/api/v1/transaction", json=body)
    assert answer.status_code == 400
    assert answer.json() == {"error": error}


def test_unknown_operation_type_fails_the_transaction_without_applying_anything(http, db):
    queue = unique_name()
    body = http.post("/api/v1/transaction", json={"operations": [
        {"type": "push", "items": [{"queue": queue}]}, {"type": "teleport"}]}).json()
    assert body["success"] is False and "teleport" in body["error"]
    assert count_messages(db, queue) == 0
    uuid.UUID(body["transactionId"])  # an id like every other failed transaction's (was null)


def test_transactions_of_thousands_of_items_and_acks_commit(http, db):
    """Their results were gathered by copying the whole list at each item (and each ack's
    searched among all): 10,000 pushed items or 12,000 acks ran past the 20 s deadline and
    answered 503, holding the partition locks after it."""
    queue, sink = unique_name(), unique_name()
    pushed = http.post("/api/v1/push", json={"items": [
        {"queue": queue, "payload": n, "transactionId": f"a{n}"} for n in range(12_000)]},
        timeout=60)
    partition = pushed.json()[0]["partition_id"]

    acked = http.post("/api/v1/transaction", json={"operations": [
        {"type": "ack", "transactionId": f"a{n}", "partitionId": partition}
        for n in range(12_000)]}, timeout=60)
    stored = http.post("/api/v1/transaction", json={"operations": [{"type": "push", "items": [
        {"queue": sink, "payload": n} for n in range(10_000)]}]}, timeout=60)

    assert acked.status_code == 200 and acked.json()["success"] is True, acked.text[:300]
    assert [r["index"] for r in acked.json()["results"]] == list(range(12_000))
    assert stored.status_code == 200 and stored.json()["success"] is True, stored.text[:300]
    assert count_messages(db, sink) == 10_000
    assert http.get(f"/api/v1/pop/queue/{queue}", params={"wait": "false"}).status_code == 204


def test_official_client_transaction_commits_ack_and_push(server):
    source, sink = unique_name(), unique_name()

    async def scenario():
        async with connect(server.url) as client:
            await client.queue(source).push([{"data": {"step": 1}}])
            [message] = await pop_now(client, source, batch=1)
            result = await (client.transaction()
                            .ack(message)
                            .queue(sink).push([{"data": {"step": 2}}])
                            .commit())
            return result, await pop_now(client, sink), await pop_now(client, source)

    result, sink_messages, source_left = run_scenario(scenario())
    assert result["success"] is True
    assert [m["data"] for m in sink_messages] == [{"step": 2}]
    assert source_left == []


def test_official_client_transaction_rollback_raises_and_applies_nothing(server, db):
    sink = unique_name()
    fake = {"transactionId": "never-pushed", "partitionId": "00000000-0000-0000-0000-000000000002"}

    async def scenario():
        async with connect(server.url) as client:
            try:
                await client.transaction().queue(sink).push([{"data": 1}]).ack(fake).commit()
            except Exception as err:  # the client raises with the server's error text
                return str(err)
            return None

    error = run_scenario(scenario())
    assert error is not None and "Message not found" in error
    assert count_messages(db, sink) == 0


@pytest.mark.parametrize("partition_seek", [False, True])
def test_a_seek_that_waits_for_a_pop_committing_its_lease_fences_that_lease(
        http, db, holder, partition_seek):
    """The seek meets a pop's lease still uncommitted: it must wait for it and note the lease
    it ends, not skip the row it saw free (the late transaction would then commit)."""
    source, other, sink = unique_name(), unique_name(), unique_name()
    _push(http, source, partition="p1")
    done = _pop(http, source, consumerGroup="g")["messages"][0]
    http.post("/api/v1/ack", json={"transactionId": done["transactionId"],
                                   "partitionId": done["partitionId"], "consumerGroup": "g",
                                   "leaseId": done["leaseId"]}).raise_for_status()
    _push(http, source, partition="p1")
    _push(http, other, partition="p2")
    second = _pop(http, other, consumerGroup="g")["messages"][0]
    with holder.cursor() as cursor:  # a pop whose transaction has not committed yet
        cursor.execute("SELECT messages FROM queen.pop_batch(%s::jsonb)", (json.dumps([
            {"queue": source, "partition": "p1", "consumerGroup": "g", "batch": 1,
             "workerId": "w"}]),))
        (first,) = json.loads(cursor.fetchone()[0])
    path = (f"/api/v1/consumer-groups/g/queues/{source}/partitions/p1/seek" if partition_seek
            else f"/api/v1/consumer-groups/g/queues/{source}/seek")
    seek = threading.Thread(target=lambda: http.post(path, json={"toEnd": True}))
    seek.start()
    time.sleep(1.0)  # the seek is waiting for the pop's row
    holder.commit()
    seek.join(30)

    _assert_late_transaction_fenced(http, db, first, second, sink)
