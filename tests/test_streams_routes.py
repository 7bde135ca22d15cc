"""The Streams API routes (WIRE.md 3.9) over a real socket and a real PostgreSQL: query
registration and its 409, the atomic cycle (state ops, sink pushes and the source ack commit
together or not at all), state reads, and every bad-input answer.

A "worker" here is this test: it pops the source queue with the stream's consumer group, as
the SDK does, and commits cycles with plain HTTP.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any, Dict, List, Optional

import httpx
import jwt
import psycopg2.extensions
import pytest

from queen_tw.http.streams import MAX_STATE_VALUE_BYTES

from tests.http_helpers import configure, pop, push
from tests.support import ServerProcess, expire_leases, running_server, unique_name, wait_until


def _register(http: httpx.Client, name: str, source: str, sink: Optional[str] = None,
              config_hash: str = "h1", reset: bool = False) -> httpx.Response:
    body: Dict[str, Any] = {"name": name, "source_queue": source, "config_hash": config_hash,
                            "reset": reset}
    if sink:
        body["sink_queue"] = sink
    return http.post("/streams/v1/queries", json=body)


def _cycle(http: httpx.Client, query_id: str, partition_id: str, group: str,
           **fields: Any) -> Dict[str, Any]:
    answer = http.post("/streams/v1/cycle", json={
        "query_id": query_id, "partition_id": partition_id, "consumer_group": group,
        "state_ops": [], "push_items": [], "ack": None, **fields})
    assert answer.status_code == 200, answer.text
    return answer.json()


def _state(http: httpx.Client, query_id: str, partition_id: str,
           **fields: Any) -> Dict[str, Any]:
    answer = http.post("/streams/v1/state/get", json={
        "query_id": query_id, "partition_id": partition_id, **fields})
    assert answer.status_code == 200, answer.text
    return {row["key"]: row["value"] for row in answer.json()["rows"]}


def _ack_of(messages: List[Dict[str, Any]], **extra: Any) -> Dict[str, Any]:
    last = messages[-1]
    return {"transactionId": last["transactionId"], "leaseId": last["leaseId"],
            "status": "completed", "count": len(messages), **extra}


def _sink_payloads(http: httpx.Client, sink: str) -> List[Any]:
    """Everything on the sink queue, read by a group of its own (nothing consumed)."""
    delivery = pop(http, sink, batch=100, consumerGroup=unique_name("reader-"))
    return [] if delivery is None else [m["data"] for m in delivery["messages"]]


def _group_row(db: psycopg2.extensions.connection, partition_id: str,
               group: str) -> Optional[tuple]:
    with db.cursor() as cursor:
        cursor.execute("""SELECT cursor_id::text, lease_id::text, total_consumed
                            FROM queen.partition_consumers
                           WHERE partition_id = %s AND consumer_group = %s""",
                       (partition_id, group))
        return cursor.fetchone()


class _Stream:
    """A source queue with messages, a sink queue, a registered query and its group."""

    def __init__(self, http: httpx.Client, messages: int = 3, **sink_options: Any):
        self.source = unique_name()
        self.sink = unique_name()
        configure(http, self.source, leaseTime=60)
        configure(http, self.sink, **sink_options)
        push(http, self.source, [{"n": n} for n in range(messages)])
        self.name = unique_name("test-q-")
        answer = _register(http, self.name, self.source, self.sink)
        assert answer.status_code == 200, answer.text
        self.query_id = answer.json()["query_id"]
        self.group = f"streams.{self.query_id}"

    def pop(self, http: httpx.Client, batch: int = 100) -> Optional[List[Dict[str, Any]]]:
        delivery = pop(http, self.source, batch=batch, consumerGroup=self.group)
        return None if delivery is None else delivery["messages"]


# -- registration ------------------------------------------------------------------------


def test_register_is_fresh_once_then_idempotent_for_the_same_hash(http: httpx.Client):
    name, source = unique_name("test-q-"), unique_name()
    first = _register(http, name, source, "sink-a")
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["success"] is True and body["fresh"] is True and body["reset"] is False
    assert body["name"] == name and body["config_hash"] == "h1"
    uuid.UUID(body["query_id"])
    again = _register(http, name, source, "sink-a")
    assert again.status_code == 200
    assert again.json()["query_id"] == body["query_id"]
    assert again.json()["fresh"] is False and again.json()["reset"] is False


def test_register_with_another_hash_is_refused_409_and_keeps_the_state(http: httpx.Client):
    stream = _Stream(http, messages=1)
    partition = stream.pop(http)[0]["partitionId"]
    _cycle(http, stream.query_id, partition, stream.group,
           state_ops=[{"type": "upsert", "key": "k", "value": {"acc": 1}}])
    registered = _register(http, stream.name, stream.source, stream.sink, config_hash="h2")
    assert registered.status_code == 409, registered.text
    body = registered.json()
    assert body["success"] is False and body["query_id"] == stream.query_id
    assert "config_hash" in body["error"] and body["name"] == stream.name
    assert _state(http, stream.query_id, partition) == {"k": {"acc": 1}}


def test_register_with_reset_wipes_the_state_and_takes_the_new_hash(http: httpx.Client):
    stream = _Stream(http, messages=1)
    partition = stream.pop(http)[0]["partitionId"]
    _cycle(http, stream.query_id, partition, stream.group,
           state_ops=[{"type": "upsert", "key": "k", "value": 1}])
    name = stream.name
    reset = _register(http, name, stream.source, stream.sink, config_hash="h2", reset=True)
    assert reset.status_code == 200, reset.text
    assert reset.json()["reset"] is True and reset.json()["query_id"] == stream.query_id
    assert _state(http, stream.query_id, partition) == {}
    assert _register(http, name, stream.source, stream.sink, config_hash="h2").status_code == 200


@pytest.mark.parametrize("missing", ["name", "source_queue", "config_hash"])
def test_register_without_a_required_field_is_400_naming_it(http: httpx.Client, missing: str):
    body = {"name": unique_name("test-q-"), "source_queue": unique_name(), "config_hash": "h"}
    del body[missing]
    answer = http.post("/streams/v1/queries", json=body)
    assert answer.status_code == 400
    assert answer.json() == {"error": f"{missing} is required"}


def test_register_with_a_wrongly_typed_field_is_400_naming_it(http: httpx.Client):
    answer = http.post("/streams/v1/queries", json={
        "name": unique_name("test-q-"), "source_queue": "q", "config_hash": "h",
        "reset": "yes"})
    assert answer.status_code == 400 and "reset" in answer.json()["error"]
    answer = http.post("/streams/v1/queries", json={
        "name": unique_name("test-q-"), "source_queue": 7, "config_hash": "h"})
    assert answer.status_code == 400 and "source_queue" in answer.json()["error"]


# -- the cycle -----------------------------------------------------------------------------


def test_cycle_commits_state_sink_pushes_and_ack_together(
        http: httpx.Client, db: psycopg2.extensions.connection):
    stream = _Stream(http, messages=3)
    messages = stream.pop(http)
    assert len(messages) == 3
    partition = messages[0]["partitionId"]
    answer = _cycle(http, stream.query_id, partition, stream.group,
                    state_ops=[{"type": "upsert", "key": "sum", "value": {"acc": 3}}],
                    push_items=[{"queue": stream.sink, "partition": "p", "payload": {"v": 1}},
                                {"queue": stream.sink, "partition": "p", "payload": {"v": 2}}],
                    ack=_ack_of(messages))
    assert answer["success"] is True, answer
    assert answer["query_id"] == stream.query_id and answer["partition_id"] == partition
    assert answer["state_ops_applied"] == 1
    assert answer["ack_result"] == {"success": True, "count": 3, "lease_released": True,
                                    "dlq": False}
    results = answer["push_results"]
    assert [r["status"] for r in results] == ["queued", "queued"]
    # time-ordered (UUIDv7) ids; the sink delivers them in item order (below)
    assert all(uuid.UUID(r["message_id"]).version == 7 for r in results)

    assert _state(http, stream.query_id, partition) == {"sum": {"acc": 3}}
    assert _sink_payloads(http, stream.sink) == [{"v": 1}, {"v": 2}]
    cursor, lease, consumed = _group_row(db, partition, stream.group)
    assert cursor == messages[-1]["id"] and lease is None and consumed == 3
    assert stream.pop(http) is None  # everything consumed, partition free


def test_state_get_reads_all_keys_given_keys_a_prefix_or_ripe_windows(http: httpx.Client):
    stream = _Stream(http, messages=1)
    partition = stream.pop(http)[0]["partitionId"]
    _cycle(http, stream.query_id, partition, stream.group, state_ops=[
        {"type": "upsert", "key": "tumb:1\x1fa", "value": {"acc": 1, "windowEnd": 1000}},
        {"type": "upsert", "key": "tumb:1\x1fb", "value": {"acc": 2, "windowEnd": 5000}},
        {"type": "upsert", "key": "other", "value": [1, 2]}])
    everything = _state(http, stream.query_id, partition, keys=[])
    assert set(everything) == {"tumb:1\x1fa", "tumb:1\x1fb", "other"}
    assert _state(http, stream.query_id, partition, keys=["other", "nope"]) == {
        "other": [1, 2]}
    assert set(_state(http, stream.query_id, partition, key_prefix="tumb:1\x1f")) == {
        "tumb:1\x1fa", "tumb:1\x1fb"}
    assert _state(http, stream.query_id, partition, key_prefix="tumb:1\x1f",
                  ripe_at_or_before=1000) == {"tumb:1\x1fa": {"acc": 1, "windowEnd": 1000}}
    rows = http.post("/streams/v1/state/get", json={
        "query_id": stream.query_id, "partition_id": partition}).json()["rows"]
    assert [row["key"] for row in rows] == sorted(everything)
    assert all(row["updated_at"].endswith("Z") for row in rows)
    # another partition has its own state
    assert _state(http, stream.query_id, str(uuid.uuid4())) == {}


def test_state_ops_delete_and_the_last_op_of_a_key_wins(http: httpx.Client):
    stream = _Stream(http, messages=1)
    partition = stream.pop(http)[0]["partitionId"]
    _cycle(http, stream.query_id, partition, stream.group, state_ops=[
        {"type": "upsert", "key": "a", "value": 1}, {"type": "upsert", "key": "b", "value": 1}])
    answer = _cycle(http, stream.query_id, partition, stream.group, state_ops=[
        {"type": "delete", "key": "a"}, {"type": "upsert", "key": "b", "value": 2},
        {"type": "delete", "key": "b"}, {"type": "upsert", "key": "c", "value": 3},
        {"type": "upsert", "key": "c", "value": 4}, {"type": "delete", "key": "never"}])
    assert answer["success"] is True and answer["state_ops_applied"] == 6
    assert _state(http, stream.query_id, partition) == {"c": 4}


def test_cycle_without_ack_leaves_the_source_untouched(
        http: httpx.Client, db: psycopg2.extensions.connection):
    stream = _Stream(http, messages=2)
    messages = stream.pop(http)
    partition = messages[0]["partitionId"]
    before = _group_row(db, partition, stream.group)
    answer = _cycle(http, stream.query_id, partition, stream.group,
                    push_items=[{"queue": stream.sink, "payload": {"flushed": True}}])
    assert answer["success"] is True and answer["ack_result"] is None
    assert _group_row(db, partition, stream.group) == before  # cursor and lease as they were
    assert _sink_payloads(http, stream.sink) == [{"flushed": True}]


def test_partial_ack_with_release_lease_false_keeps_the_lease_for_the_tail(
        http: httpx.Client, db: psycopg2.extensions.connection):
    stream = _Stream(http, messages=3)
    messages = stream.pop(http)
    partition = messages[0]["partitionId"]
    answer = _cycle(http, stream.query_id, partition, stream.group, release_lease=False,
                    ack=_ack_of(messages[:1]))
    assert answer["success"] is True
    assert answer["ack_result"]["lease_released"] is False
    cursor, lease, _ = _group_row(db, partition, stream.group)
    assert cursor == messages[0]["id"] and lease == messages[0]["leaseId"]
    assert stream.pop(http) is None  # the tail stays leased
    expire_leases(db, stream.source)
    tail = stream.pop(http)
    assert [m["id"] for m in tail] == [m["id"] for m in messages[1:]]  # in order


def test_partial_ack_releasing_the_lease_redelivers_the_tail_at_once(http: httpx.Client):
    stream = _Stream(http, messages=3)
    messages = stream.pop(http)
    answer = _cycle(http, stream.query_id, messages[0]["partitionId"], stream.group,
                    ack=_ack_of(messages[:2]))
    assert answer["ack_result"]["lease_released"] is True
    tail = stream.pop(http)
    assert [m["id"] for m in tail] == [messages[2]["id"]]


@pytest.mark.parametrize("status", ["failed", "dlq"])
def test_failed_or_dlq_ack_writes_a_dead_letter_and_moves_past(
        http: httpx.Client, db: psycopg2.extensions.connection, status: str):
    stream = _Stream(http, messages=2)
    messages = stream.pop(http)
    partition = messages[0]["partitionId"]
    answer = _cycle(http, stream.query_id, partition, stream.group,
                    ack=_ack_of(messages, status=status, error="operator blew up"))
    assert answer["success"] is True
    assert answer["ack_result"]["dlq"] is True and answer["ack_result"]["lease_released"]
    dlq = http.get("/api/v1/dlq", params={"queue": stream.source,
                                          "consumerGroup": stream.group}).json()
    assert [m["transactionId"] for m in dlq["messages"]] == [messages[-1]["transactionId"]]
    assert "operator blew up" in dlq["messages"][0]["errorMessage"]
    assert _group_row(db, partition, stream.group)[0] == messages[-1]["id"]
    assert stream.pop(http) is None


def test_encrypted_sink_queue_stores_ciphertext_and_delivers_plaintext(
        http: httpx.Client, db: psycopg2.extensions.connection):
    stream = _Stream(http, messages=1, encryptionEnabled=True)
    messages = stream.pop(http)
    answer = _cycle(http, stream.query_id, messages[0]["partitionId"], stream.group,
                    push_items=[{"queue": stream.sink, "payload": {"secret": "s3cr3t"}}],
                    ack=_ack_of(messages))
    assert answer["success"] is True, answer
    with db.cursor() as cursor:
        cursor.execute("SELECT is_encrypted, payload::text FROM queen.messages WHERE id = %s",
                       (answer["push_results"][0]["message_id"],))
        encrypted, stored = cursor.fetchone()
    assert encrypted is True and "s3cr3t" not in stored
    assert _sink_payloads(http, stream.sink) == [{"secret": "s3cr3t"}]


# -- all or nothing ------------------------------------------------------------------------


def _assert_nothing_applied(http: httpx.Client, db: psycopg2.extensions.connection,
                            stream: _Stream, partition: str, before: Any,
                            sink_before: List[Any]) -> None:
    assert _state(http, stream.query_id, partition) == {}
    assert _group_row(db, partition, stream.group) == before
    assert _sink_payloads(http, stream.sink) == sink_before


def test_a_refused_sink_push_rolls_back_state_cursor_and_sink(
        http: httpx.Client, db: psycopg2.extensions.connection):
    stream = _Stream(http, messages=2, maxSize=1)
    push(http, stream.sink, [{"already": "full"}])
    messages = stream.pop(http)
    partition = messages[0]["partitionId"]
    before = _group_row(db, partition, stream.group)
    answer = _cycle(http, stream.query_id, partition, stream.group,
                    state_ops=[{"type": "upsert", "key": "k", "value": 1}],
                    push_items=[{"queue": stream.sink, "payload": {"n": 1}}],
                    ack=_ack_of(messages))
    assert answer["success"] is False
    assert "max capacity" in answer["error"]
    assert answer["state_ops_applied"] == 0 and answer["push_results"] == []
    _assert_nothing_applied(http, db, stream, partition, before, [{"already": "full"}])


def test_a_cycle_whose_lease_was_taken_by_another_consumer_applies_nothing(
        http: httpx.Client, db: psycopg2.extensions.connection):
    stream = _Stream(http, messages=2)
    slow = stream.pop(http)  # the slow worker's delivery
    partition = slow[0]["partitionId"]
    expire_leases(db, stream.source)
    fast = stream.pop(http)  # another worker takes the partition over
    assert [m["id"] for m in fast] == [m["id"] for m in slow]
    before = _group_row(db, partition, stream.group)
    late = _cycle(http, stream.query_id, partition, stream.group,
                  state_ops=[{"type": "upsert", "key": "k", "value": "late"}],
                  push_items=[{"queue": stream.sink, "payload": {"late": True}}],
                  ack=_ack_of(slow))
    assert late["success"] is False
    assert "expired or is held by another consumer" in late["error"]
    _assert_nothing_applied(http, db, stream, partition, before, [])
    # the worker that holds the lease now commits once: no double counting
    ok = _cycle(http, stream.query_id, partition, stream.group,
                state_ops=[{"type": "upsert", "key": "k", "value": "fast"}],
                push_items=[{"queue": stream.sink, "payload": {"fast": True}}],
                ack=_ack_of(fast))
    assert ok["success"] is True
    assert _state(http, stream.query_id, partition) == {"k": "fast"}
    assert _sink_payloads(http, stream.sink) == [{"fast": True}]


def test_a_cycle_whose_lease_expired_applies_nothing(
        http: httpx.Client, db: psycopg2.extensions.connection):
    stream = _Stream(http, messages=1)
    messages = stream.pop(http)
    partition = messages[0]["partitionId"]
    expire_leases(db, stream.source)
    before = _group_row(db, partition, stream.group)
    answer = _cycle(http, stream.query_id, partition, stream.group,
                    state_ops=[{"type": "upsert", "key": "k", "value": 1}],
                    ack=_ack_of(messages))
    assert answer["success"] is False and "expired" in answer["error"]
    _assert_nothing_applied(http, db, stream, partition, before, [])


def test_an_ack_of_an_unknown_message_applies_nothing(
        http: httpx.Client, db: psycopg2.extensions.connection):
    stream = _Stream(http, messages=1)
    messages = stream.pop(http)
    partition = messages[0]["partitionId"]
    before = _group_row(db, partition, stream.group)
    answer = _cycle(http, stream.query_id, partition, stream.group,
                    state_ops=[{"type": "upsert", "key": "k", "value": 1}],
                    push_items=[{"queue": stream.sink, "payload": {}}],
                    ack={"transactionId": "no-such-message", "status": "completed"})
    assert answer["success"] is False and "Message not found" in answer["error"]
    _assert_nothing_applied(http, db, stream, partition, before, [])


# -- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize("release_lease, lease", [(False, True), (True, False)])
def test_a_cycle_sent_again_after_it_committed_applies_nothing(
        http: httpx.Client, db: psycopg2.extensions.connection, release_lease: bool,
        lease: bool):
    """The SDK resends a cycle whose answer it lost: the resend must not push or ack twice
    (with the lease kept, or without a leaseId to fence it)."""
    stream = _Stream(http, messages=3)
    messages = stream.pop(http)
    partition = messages[0]["partitionId"]
    ack = _ack_of(messages[:1])
    if not lease:
        del ack["leaseId"]
    body = dict(release_lease=release_lease, ack=ack,
                push_items=[{"queue": stream.sink, "payload": {"v": 1}}])
    assert _cycle(http, stream.query_id, partition, stream.group, **body)["success"] is True
    before = _group_row(db, partition, stream.group)

    again = _cycle(http, stream.query_id, partition, stream.group, **body)

    assert again["success"] is False and "acknowledged already" in again["error"]
    assert _sink_payloads(http, stream.sink) == [{"v": 1}]
    assert _group_row(db, partition, stream.group) == before


def test_a_cycle_acking_a_message_its_lease_did_not_deliver_applies_nothing(
        http: httpx.Client, db: psycopg2.extensions.connection):
    stream = _Stream(http, messages=5)
    messages = stream.pop(http, batch=2)
    partition = messages[0]["partitionId"]
    before = _group_row(db, partition, stream.group)
    answer = _cycle(http, stream.query_id, partition, stream.group, ack={
        "transactionId": "t4", "leaseId": messages[0]["leaseId"], "status": "completed",
        "count": 2})
    assert answer["success"] is False and "did not deliver" in answer["error"]
    assert _group_row(db, partition, stream.group) == before
    expire_leases(db, stream.source)
    assert [m["transactionId"] for m in stream.pop(http)] == ["t0", "t1", "t2", "t3", "t4"]


def test_total_consumed_counts_the_messages_the_cursor_moved_over(
        http: httpx.Client, db: psycopg2.extensions.connection):
    stream = _Stream(http, messages=3)
    messages = stream.pop(http)
    partition = messages[0]["partitionId"]
    answer = _cycle(http, stream.query_id, partition, stream.group,
                    ack=_ack_of(messages, count=1000))
    assert answer["success"] is True
    assert _group_row(db, partition, stream.group)[2] == 3


def test_total_consumed_counts_from_where_a_group_that_never_popped_starts(
        http: httpx.Client, db: psycopg2.extensions.connection):
    """A cycle acking for a group with no row in the partition yet: it counted one message,
    not the three the cursor moved over (the missing row's cursor read as NULL)."""
    stream = _Stream(http, messages=4)
    partition = pop(http, stream.source, consumerGroup=unique_name("other-"))["messages"][0][
        "partitionId"]
    answer = _cycle(http, stream.query_id, partition, stream.group,
                    ack={"transactionId": "t2", "status": "completed"})
    assert answer["success"] is True, answer
    assert _group_row(db, partition, stream.group)[2] == 3


def test_an_ack_counting_the_whole_delivery_settles_it_whichever_message_it_names(
        http: httpx.Client, db: psycopg2.extensions.connection):
    """The SDKs order a batch by (createdAt to the millisecond, id) and name its last
    message; ids a 2.6.0 client mints for one binary push share their millisecond, so that
    message may sit anywhere in the delivery. Naming the count of all of it settles all."""
    stream = _Stream(http, messages=4)
    messages = stream.pop(http)
    partition = messages[0]["partitionId"]
    answer = _cycle(http, stream.query_id, partition, stream.group,
                    ack={**_ack_of(messages), "transactionId": messages[1]["transactionId"]})
    assert answer["success"] is True and answer["ack_result"]["lease_released"] is True
    assert _group_row(db, partition, stream.group)[:2] == (messages[-1]["id"], None)
    assert stream.pop(http) is None  # nothing comes back
    partial = _Stream(http, messages=4)  # a count short of the delivery acks what it names
    got = partial.pop(http)
    _cycle(http, partial.query_id, got[0]["partitionId"], partial.group,
           ack={**_ack_of(got[:2]), "transactionId": got[1]["transactionId"]})
    assert [m["transactionId"] for m in partial.pop(http)] == ["t2", "t3"]


def test_unknown_query_id_is_404_for_cycle_and_state_get(http: httpx.Client):
    unknown, partition = str(uuid.uuid4()), str(uuid.uuid4())
    cycle = http.post("/streams/v1/cycle", json={
        "query_id": unknown, "partition_id": partition, "state_ops": [], "ack": None})
    assert cycle.status_code == 404 and unknown in cycle.json()["error"]
    state = http.post("/streams/v1/state/get", json={
        "query_id": unknown, "partition_id": partition, "keys": []})
    assert state.status_code == 404 and unknown in state.json()["error"]


_ABSENT = object()


@pytest.mark.parametrize(("body", "named"), [
    ({"query_id": _ABSENT}, "query_id is required"),
    ({"partition_id": _ABSENT}, "partition_id is required"),
    ({"partition_id": ""}, "partition_id is required"),
    ({"query_id": "not-a-uuid", "partition_id": str(uuid.uuid4())}, "query_id must be a UUID"),
    ({"state_ops": {}}, "state_ops must be an array"),
    ({"state_ops": [{"type": "merge", "key": "k"}]}, "state_ops[0].type"),
    ({"state_ops": [{"type": "upsert", "key": ""}]}, "state_ops[0].key is required"),
    # within 1024 characters but not what the state rows' index holds: failed every cycle
    ({"state_ops": [{"type": "upsert", "key": "\U0001F600" * 1024, "value": 1}]},
     "state_ops[0].key is longer than 2048 bytes"),
    ({"state_ops": [{"type": "delete", "key": "a"}, {"type": "upsert", "key": "k"}]},
     "state_ops[1].value is required"),
    ({"push_items": [{"payload": 1}]}, "push_items[0]: Queue must be a string"),
    ({"push_items": [{"queue": "q", "traceId": "nope"}]}, "push_items[0]: TraceId"),
    ({"ack": {"status": "completed"}}, "ack.transactionId is required"),
    ({"ack": {"transactionId": "t", "status": "retry"}}, "ack.status"),
    ({"ack": {"transactionId": "t", "leaseId": "x"}}, "ack.leaseId must be a UUID"),
    ({"ack": {"transactionId": "t", "count": -1}}, "ack.count"),
    ({"ack": 5}, "ack must be an object or null"),
    ({"release_lease": "no"}, "release_lease must be a boolean"),
])
def test_bad_cycle_fields_are_400_naming_the_field(http: httpx.Client, body: Dict[str, Any],
                                                   named: str):
    full = {"query_id": str(uuid.uuid4()), "partition_id": str(uuid.uuid4()), **body}
    answer = http.post("/streams/v1/cycle",
                       json={k: v for k, v in full.items() if v is not _ABSENT})
    assert answer.status_code == 400, answer.text
    assert named in answer.json()["error"]


@pytest.mark.parametrize(("body", "named"), [
    ({"query_id": _ABSENT}, "query_id is required"),
    ({"partition_id": _ABSENT}, "partition_id is required"),
    ({"keys": "all"}, "keys must be an array of strings"),
    ({"ripe_at_or_before": "soon"}, "ripe_at_or_before must be a number"),
    ({"ripe_at_or_before": 10 ** 400}, "ripe_at_or_before must be a number"),  # was 500
])
def test_bad_state_get_fields_are_400_naming_the_field(http: httpx.Client,
                                                       body: Dict[str, Any], named: str):
    full = {"query_id": str(uuid.uuid4()), "partition_id": str(uuid.uuid4()), **body}
    answer = http.post("/streams/v1/state/get",
                       json={k: v for k, v in full.items() if v is not _ABSENT})
    assert answer.status_code == 400, answer.text
    assert named in answer.json()["error"]


def test_an_oversized_state_value_is_413_and_nothing_is_applied(
        http: httpx.Client, db: psycopg2.extensions.connection):
    stream = _Stream(http, messages=1)
    messages = stream.pop(http)
    partition = messages[0]["partitionId"]
    before = _group_row(db, partition, stream.group)
    answer = http.post("/streams/v1/cycle", json={
        "query_id": stream.query_id, "partition_id": partition,
        "consumer_group": stream.group,
        "state_ops": [{"type": "upsert", "key": "small", "value": 1},
                      {"type": "upsert", "key": "big", "value": "x" * MAX_STATE_VALUE_BYTES}],
        "push_items": [{"queue": stream.sink, "payload": {}}], "ack": _ack_of(messages)})
    assert answer.status_code == 413, answer.text
    assert "state_ops[1].value" in answer.json()["error"]
    _assert_nothing_applied(http, db, stream, partition, before, [])


# -- wake-ups ------------------------------------------------------------------------------
#
# On this server a parked pop re-checks on its own only every 10 minutes and waits up to
# 30 s, so a pop answered with a message was answered by its first attempt or a wake-up.


PARKING_MOMENT_S = 0.3
"""A documented minimum, not a bound: time for a pop's first attempt to come back empty.
If a loaded machine needs longer, that attempt finds the message itself and the test still
passes without exercising the wake-up (the lease test below cannot pass that way)."""


@pytest.fixture(scope="module")
def slow_fallback_server(pg_env: Dict[str, str]) -> Iterator[ServerProcess]:
    """A server whose parked pops never re-check on their own within a test."""
    with running_server(pg_env, "queen-tw-streams-", POP_WAIT_INITIAL_INTERVAL_MS="600000",
                        POP_WAIT_MAX_INTERVAL_MS="600000") as process:
        yield process


class _LongPoll(threading.Thread):
    """One long-poll pop in the background; ``result()`` once it answered."""

    def __init__(self, base_url: str, queue: str, **params: Any):
        super().__init__(daemon=True)
        self._url, self._queue = base_url, queue
        self._params = {"wait": "true", "timeout": "30000", **params}
        self.answer: Optional[httpx.Response] = None
        self.start()

    def run(self) -> None:
        with httpx.Client(base_url=self._url, timeout=45) as client:
            self.answer = client.get(f"/api/v1/pop/queue/{self._queue}", params=self._params)

    def result(self) -> httpx.Response:
        self.join(45)
        assert self.answer is not None, "the long-poll did not answer"
        return self.answer


def test_sink_pushes_wake_a_pop_parked_on_the_sink(slow_fallback_server: ServerProcess):
    with httpx.Client(base_url=slow_fallback_server.url, timeout=45) as http:
        stream = _Stream(http, messages=1)
        messages = stream.pop(http)
        poll = _LongPoll(slow_fallback_server.url, stream.sink)
        time.sleep(PARKING_MOMENT_S)
        answer = _cycle(http, stream.query_id, messages[0]["partitionId"], stream.group,
                        push_items=[{"queue": stream.sink, "payload": {"woken": 1}}],
                        ack=_ack_of(messages))
        assert answer["success"] is True
        reply = poll.result()
    assert reply.status_code == 200, "the parked pop on the sink was not woken"
    assert [m["data"] for m in reply.json()["messages"]] == [{"woken": 1}]


def test_a_cycle_that_ends_the_lease_wakes_a_pop_parked_on_the_source(
        slow_fallback_server: ServerProcess):
    with httpx.Client(base_url=slow_fallback_server.url, timeout=45) as http:
        stream = _Stream(http, messages=2)
        messages = stream.pop(http, batch=2)
        # the partition is leased: this pop of the same group can only park
        poll = _LongPoll(slow_fallback_server.url, stream.source, consumerGroup=stream.group)
        time.sleep(PARKING_MOMENT_S)
        answer = _cycle(http, stream.query_id, messages[0]["partitionId"], stream.group,
                        ack=_ack_of(messages[:1]))
        assert answer["ack_result"]["lease_released"] is True
        reply = poll.result()
    assert reply.status_code == 200, "the parked pop on the source was not woken"
    assert [m["id"] for m in reply.json()["messages"]] == [messages[1]["id"]]


# -- pushes that cannot go to PostgreSQL now; who pushed -----------------------------------


def test_in_push_maintenance_a_cycle_with_sink_pushes_applies_nothing(
        http: httpx.Client, db: psycopg2.extensions.connection):
    stream = _Stream(http, messages=1)
    messages = stream.pop(http)
    partition = messages[0]["partitionId"]
    before = _group_row(db, partition, stream.group)
    assert http.post("/api/v1/system/maintenance", json={"enabled": True}).status_code == 200
    try:
        # a cycle cannot wait in the file buffer (it is atomic with its ack)
        answer = _cycle(http, stream.query_id, partition, stream.group,
                        state_ops=[{"type": "upsert", "key": "k", "value": 1}],
                        push_items=[{"queue": stream.sink, "payload": {}}],
                        ack=_ack_of(messages))
    finally:
        assert http.post("/api/v1/system/maintenance",
                         json={"enabled": False}).status_code == 200
    assert answer["success"] is False and "file buffer" in answer["error"]
    _assert_nothing_applied(http, db, stream, partition, before, [])


JWT_SECRET = "streams-test-secret-long-enough-for-hs256"


def _token(role: str, sub: str = "stream-worker") -> str:
    now = int(time.time())
    return jwt.encode({"sub": sub, "role": role, "iat": now, "exp": now + 3600}, JWT_SECRET,
                      algorithm="HS256")


def test_sink_pushes_carry_the_tokens_sub_and_levels_hold(
        make_server, db: psycopg2.extensions.connection):
    server = make_server(JWT_ENABLED="true", JWT_SECRET=JWT_SECRET)
    writer = {"Authorization": f"Bearer {_token('read-write', 'alice')}"}
    reader = {"Authorization": f"Bearer {_token('read-only')}"}
    with httpx.Client(base_url=server.url, timeout=30, headers=writer) as http:
        stream = _Stream(http, messages=1)
        messages = stream.pop(http)
        partition = messages[0]["partitionId"]
        cycle = {"query_id": stream.query_id, "partition_id": partition,
                 "consumer_group": stream.group,
                 "push_items": [{"queue": stream.sink, "payload": {"by": "cycle"},
                                 "producerSub": "mallory"}], "ack": _ack_of(messages)}
        refused = http.post("/streams/v1/cycle", json=cycle, headers=reader)
        assert refused.status_code == 403  # READ_WRITE route
        answer = http.post("/streams/v1/cycle", json=cycle)
        assert answer.status_code == 200 and answer.json()["success"] is True, answer.text
        state = http.post("/streams/v1/state/get", headers=reader, json={
            "query_id": stream.query_id, "partition_id": partition})
        assert state.status_code == 200  # READ_ONLY route
        assert http.post("/streams/v1/queries", headers=reader, json={
            "name": unique_name("test-q-"), "source_queue": "q",
            "config_hash": "h"}).status_code == 403
    with db.cursor() as cursor:
        cursor.execute("SELECT producer_sub FROM queen.messages WHERE id = %s",
                       (answer.json()["push_results"][0]["message_id"],))
        assert cursor.fetchone()[0] == "alice"  # the token's sub, never the body's


def test_a_cycle_carries_at_most_queen_max_push_items_sink_messages(make_server):
    """As a push or a transaction (QUEEN_MAX_PUSH_ITEMS): a cycle's push_items went to
    PostgreSQL whatever their number."""
    server = make_server(QUEEN_MAX_PUSH_ITEMS="5")
    answer = httpx.post(server.url + "/streams/v1/cycle", timeout=30, json={
        "query_id": str(uuid.uuid4()), "partition_id": str(uuid.uuid4()),
        "push_items": [{"queue": "sink", "payload": n} for n in range(6)]})
    assert answer.status_code == 413, answer.text
    assert "QUEEN_MAX_PUSH_ITEMS" in answer.json()["error"]


def _state_rows(db: psycopg2.extensions.connection, partition_id: str) -> int:
    with db.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM queen_streams.state WHERE partition_id = %s",
                       (partition_id,))
        return cursor.fetchone()[0]


def _one_cycle_of_state(http: httpx.Client, query_id: str, source: str, partition: str,
                        group: str) -> Dict[str, Any]:
    """Pushes one message to ``source``/``partition``, pops it for ``group`` and commits a
    state key with its ack; returns the message."""
    push(http, source, ["a"], partition=partition)
    [message] = pop(http, source, partition=partition, consumerGroup=group)["messages"]
    done = _cycle(http, query_id, message["partitionId"], group, ack=_ack_of([message]),
                  state_ops=[{"type": "upsert", "key": "window", "value": {"open": 1}}])
    assert done["success"] is True, done
    return message


def test_a_source_queue_delete_takes_its_partitions_stream_state(http: httpx.Client, db):
    """The state has no foreign key to the partition: it stayed, and nothing read it again."""
    source = unique_name()
    query_id = _register(http, unique_name(), source).json()["query_id"]
    partition_id = _one_cycle_of_state(http, query_id, source, "p", "streams.q")["partitionId"]
    assert _state_rows(db, partition_id) == 1

    assert http.delete(f"/api/v1/resources/queues/{source}").status_code == 200

    assert _state_rows(db, partition_id) == 0


def test_stream_state_follows_a_partition_that_idle_cleanup_dropped_and_a_push_made_again(
        make_server, db):
    """The state outlives the cleanup (migration 3) but was kept under the old partition's
    id, while the partition a push makes again has a new one: never found again."""
    server = make_server(RETENTION_INTERVAL="300", PARTITION_CLEANUP_DAYS="1")
    with httpx.Client(base_url=server.url, timeout=30) as http:
        source, group = unique_name(), "streams.cleanup"
        query_id = _register(http, unique_name(), source).json()["query_id"]
        cycled = _one_cycle_of_state(http, query_id, source, "idle", group)
        old_id = cycled["partitionId"]
        assert http.delete(f"/api/v1/messages/{old_id}/{cycled['transactionId']}"
                           ).status_code == 200  # empty now: idle cleanup may drop it
        with db.cursor() as cursor:
            cursor.execute("UPDATE queen.partitions SET last_activity = now() - interval "
                           "'2 days' WHERE id = %s", (old_id,))
        wait_until(lambda: _state_rows(db, old_id) == 1 and not _partition_exists(db, old_id),
                   15, message="the idle partition cleaned up")

        push(http, source, ["b"], partition="idle")
        new_id = pop(http, source, partition="idle", consumerGroup=group)["messages"][0][
            "partitionId"]

        assert new_id != old_id
        assert _state(http, query_id, new_id) == {"window": {"open": 1}}
        assert _state_rows(db, old_id) == 0


def _partition_exists(db: psycopg2.extensions.connection, partition_id: str) -> bool:
    with db.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM queen.partitions WHERE id = %s", (partition_id,))
        return bool(cursor.fetchone()[0])
