"""Queue administration, traces, encryption at rest, the SQL-level API and /health
(WIRE.md 2.1, 2.7, 2.8, 3.1, 3.3, 3.6, 7.2, 9.2)."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any, Dict, List, Optional

import httpx
import pytest

from tests.support import TEST_ENCRYPTION_KEY, unique_name

DEFAULT_OPTIONS: Dict[str, Any] = {
    "priority": 0, "leaseTime": 300, "retryLimit": 3, "retryDelay": 1000, "maxSize": 0,
    "ttl": 3600, "deadLetterQueue": False, "dlqAfterMaxRetries": False,
    "delayedProcessing": 0, "windowBuffer": 0, "retentionSeconds": 0,
    "completedRetentionSeconds": 0, "retentionEnabled": False, "encryptionEnabled": False,
    "maxWaitTimeSeconds": 0,
}

CUSTOM_OPTIONS: Dict[str, Any] = {
    "priority": 7, "leaseTime": 45, "retryLimit": 9, "retryDelay": 250, "maxSize": 1000,
    "ttl": 60, "deadLetterQueue": True, "dlqAfterMaxRetries": True,
    "delayedProcessing": 3, "windowBuffer": 4, "retentionSeconds": 600,
    "completedRetentionSeconds": 300, "retentionEnabled": True, "encryptionEnabled": True,
    "maxWaitTimeSeconds": 900,
}

ISO_3_DIGITS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


# -- helpers ----------------------------------------------------------------------------


def configure(http: httpx.Client, queue: str, options: Optional[Dict[str, Any]] = None,
              **fields: Any) -> Dict[str, Any]:
    body: Dict[str, Any] = {"queue": queue, **fields}
    if options is not None:
        body["options"] = options
    answer = http.post("/api/v1/configure", json=body)
    assert answer.status_code == 200, answer.text
    return answer.json()


def push(http: httpx.Client, queue: str, payloads: List[Any], partition: str = "Default"
         ) -> List[Dict[str, Any]]:
    answer = http.post("/api/v1/push", json={"items": [
        {"queue": queue, "partition": partition, "payload": p, "transactionId": f"t{n}"}
        for n, p in enumerate(payloads)]})
    assert answer.status_code == 201, answer.text
    return answer.json()


def pop(http: httpx.Client, queue: str, **params: Any) -> Optional[Dict[str, Any]]:
    answer = http.get(f"/api/v1/pop/queue/{queue}", params={"wait": "false", **params})
    assert answer.status_code in (200, 204), answer.text
    return answer.json() if answer.status_code == 200 else None


def scalar(db, sql: str, *args: Any) -> Any:
    with db.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchone()[0]


def populate(http: httpx.Client, queue: str) -> Dict[str, Any]:
    """A queue with messages, a cursor, a lease, a DLQ row and a trace; returns its ids."""
    answer = configure(http, queue)
    pushed = push(http, queue, ["m0", "m1", "m2"])
    first = pop(http, queue, consumerGroup="g")["messages"][0]
    http.post("/api/v1/ack", json={"transactionId": first["transactionId"],
                                   "partitionId": first["partitionId"], "status": "dlq",
                                   "consumerGroup": "g", "error": "x"})
    pop(http, queue)  # a live lease in queue mode
    http.post("/api/v1/traces", json={"transactionId": "t1",
                                      "partitionId": pushed[1]["partition_id"],
                                      "data": {"step": 1}})
    return {"queueId": answer["queueId"], "partitionId": pushed[0]["partition_id"]}


# -- configure --------------------------------------------------------------------------


def test_configure_without_options_echoes_all_fifteen_defaults(http):
    queue = unique_name()

    answer = configure(http, queue)

    assert answer["configured"] is True
    assert answer["queue"] == queue
    assert answer["namespace"] == "" and answer["task"] == ""
    assert answer["options"] == DEFAULT_OPTIONS
    assert [type(v) for v in answer["options"].values()] == \
        [type(DEFAULT_OPTIONS[k]) for k in answer["options"]]


def test_configure_echoes_every_option_given_with_its_json_type(http):
    queue = unique_name()

    answer = configure(http, queue, CUSTOM_OPTIONS)

    assert answer["options"] == CUSTOM_OPTIONS
    for name, value in answer["options"].items():
        assert type(value) is type(CUSTOM_OPTIONS[name]), name


def test_configure_fills_absent_options_with_defaults(http):
    queue = unique_name()

    answer = configure(http, queue, {"leaseTime": 10, "dlqAfterMaxRetries": True})

    assert answer["options"] == {**DEFAULT_OPTIONS, "leaseTime": 10, "dlqAfterMaxRetries": True}


def test_second_configure_replaces_every_option(http):
    queue = unique_name()
    configure(http, queue, CUSTOM_OPTIONS, namespace="ns", task="tk")

    answer = configure(http, queue)

    assert answer["options"] == DEFAULT_OPTIONS
    assert answer["namespace"] == "" and answer["task"] == ""


def test_second_configure_reset_is_what_the_queue_detail_shows(http):
    queue = unique_name()
    configure(http, queue, {"retryLimit": 9})
    configure(http, queue, {"leaseTime": 5})

    detail = http.get(f"/api/v1/resources/queues/{queue}").json()

    assert detail["options"]["retryLimit"] == 3
    assert detail["options"]["leaseTime"] == 5


def test_configure_accepts_string_forms_of_options(http):
    queue = unique_name()

    answer = configure(http, queue, {"leaseTime": "5", "retryLimit": " 2 ",
                                     "encryptionEnabled": "true", "deadLetterQueue": "false",
                                     "dlqAfterMaxRetries": "TRUE"})

    assert answer["options"]["leaseTime"] == 5
    assert answer["options"]["retryLimit"] == 2
    assert answer["options"]["encryptionEnabled"] is True
    assert answer["options"]["deadLetterQueue"] is False
    assert answer["options"]["dlqAfterMaxRetries"] is True


def test_configure_treats_null_options_as_absent(http):
    queue = unique_name()

    answer = configure(http, queue, {"leaseTime": None, "encryptionEnabled": None},
                       namespace=None, task=None)

    assert answer["options"] == DEFAULT_OPTIONS
    assert answer["namespace"] == "" and answer["task"] == ""


def test_configure_keeps_namespace_and_task(http):
    queue = unique_name()

    answer = configure(http, queue, namespace="billing", task="invoices")

    assert (answer["namespace"], answer["task"]) == ("billing", "invoices")


def test_configure_creates_the_default_partition(http, db):
    queue = unique_name()

    answer = configure(http, queue)

    uuid.UUID(answer["queueId"])
    assert scalar(db, "SELECT name FROM queen.partitions WHERE id = %s",
                  answer["partitionId"]) == "Default"
    assert scalar(db, "SELECT id::text FROM queen.queues WHERE name = %s",
                  queue) == answer["queueId"]


def test_reconfigure_keeps_messages_and_ids(http):
    queue = unique_name()
    first = configure(http, queue)
    push(http, queue, ["kept"])

    again = configure(http, queue, {"leaseTime": 20})

    assert (again["queueId"], again["partitionId"]) == (first["queueId"], first["partitionId"])
    assert pop(http, queue)["messages"][0]["data"] == "kept"


# -- resources --------------------------------------------------------------------------


def test_queue_detail_of_unknown_queue_answers_404(http):
    answer = http.get(f"/api/v1/resources/queues/{unique_name()}")

    assert answer.status_code == 404
    assert answer.json() == {"error": "Queue not found"}


def test_queue_detail_lists_partitions_and_totals(http):
    queue = unique_name()
    configure(http, queue, namespace="ns", task="tk")
    push(http, queue, ["a", "b"], partition="p1")
    push(http, queue, ["c"], partition="p2")

    detail = http.get(f"/api/v1/resources/queues/{queue}").json()

    assert detail["name"] == queue
    assert (detail["namespace"], detail["task"]) == ("ns", "tk")
    uuid.UUID(detail["id"])
    assert ISO_3_DIGITS.match(detail["createdAt"])
    partitions = {p["name"]: p for p in detail["partitions"]}
    assert set(partitions) == {"Default", "p1", "p2"}
    assert partitions["p1"]["stats"]["total"] == 2
    assert partitions["p2"]["stats"]["pending"] == 1
    assert detail["totals"]["total"] == 3
    assert detail["totals"]["pending"] == 3


def test_queue_detail_counts_processing_and_completed(http):
    queue = unique_name()
    push(http, queue, ["a", "b", "c"])
    delivery = pop(http, queue, batch=2)
    m = delivery["messages"][0]
    http.post("/api/v1/ack", json={"transactionId": m["transactionId"],
                                   "partitionId": m["partitionId"], "leaseId": m["leaseId"]})

    totals = http.get(f"/api/v1/resources/queues/{queue}").json()["totals"]

    assert (totals["total"], totals["completed"], totals["processing"], totals["pending"]) == \
        (3, 1, 1, 1)


def test_queue_list_includes_a_configured_queue(http):
    queue = unique_name()
    configure(http, queue)
    push(http, queue, ["a", "b"])

    listing = http.get("/api/v1/resources/queues")

    assert listing.status_code == 200
    [entry] = [q for q in listing.json()["queues"] if q["name"] == queue]
    assert entry["partitions"] == 1
    assert entry["messages"]["total"] == 2


# -- delete -----------------------------------------------------------------------------


def test_delete_queue_answers_deleted_and_existed(http):
    queue = unique_name()
    configure(http, queue)

    answer = http.delete(f"/api/v1/resources/queues/{queue}")

    assert answer.status_code == 200
    assert answer.json()["deleted"] is True
    assert answer.json()["existed"] is True
    assert answer.json()["queue"] == queue


def test_delete_of_unknown_queue_answers_existed_false(http):
    queue = unique_name()

    answer = http.delete(f"/api/v1/resources/queues/{queue}")

    assert answer.status_code == 200
    assert answer.json()["deleted"] is True
    assert answer.json()["existed"] is False


def test_second_delete_answers_existed_false(http):
    queue = unique_name()
    configure(http, queue)
    http.delete(f"/api/v1/resources/queues/{queue}")

    answer = http.delete(f"/api/v1/resources/queues/{queue}")

    assert answer.json() == {"deleted": True, "queue": queue, "existed": False}


def test_delete_queue_removes_every_row_under_it(http, db):
    queue = unique_name()
    ids = populate(http, queue)

    http.delete(f"/api/v1/resources/queues/{queue}")

    assert scalar(db, "SELECT count(*) FROM queen.queues WHERE name = %s", queue) == 0
    assert scalar(db, "SELECT count(*) FROM queen.partitions WHERE id = %s",
                  ids["partitionId"]) == 0
    assert scalar(db, "SELECT count(*) FROM queen.messages WHERE partition_id = %s",
                  ids["partitionId"]) == 0
    assert scalar(db, "SELECT count(*) FROM queen.partition_consumers WHERE partition_id = %s",
                  ids["partitionId"]) == 0
    assert scalar(db, "SELECT count(*) FROM queen.dead_letter_queue WHERE partition_id = %s",
                  ids["partitionId"]) == 0
    assert scalar(db, "SELECT count(*) FROM queen.message_traces WHERE partition_id = %s",
                  ids["partitionId"]) == 0


def test_deleted_queue_is_gone_from_the_api(http):
    queue = unique_name()
    push(http, queue, ["x"])
    http.delete(f"/api/v1/resources/queues/{queue}")

    assert http.get(f"/api/v1/resources/queues/{queue}").status_code == 404
    assert pop(http, queue) is None


def test_sql_delete_of_a_queue_cascades_to_everything_under_it(http, db):
    queue = unique_name()
    ids = populate(http, queue)
    before = {table: scalar(db, f"SELECT count(*) FROM queen.{table} WHERE partition_id = %s",
                            ids["partitionId"])
              for table in ("messages", "partition_consumers", "dead_letter_queue")}

    with db.cursor() as cur:
        cur.execute("DELETE FROM queen.queues WHERE name = %s", (queue,))

    assert all(count > 0 for count in before.values()), before
    for table in ("messages", "partition_consumers", "dead_letter_queue", "message_traces"):
        assert scalar(db, f"SELECT count(*) FROM queen.{table} WHERE partition_id = %s",
                      ids["partitionId"]) == 0, table
    assert scalar(db, "SELECT count(*) FROM queen.partitions WHERE queue_id = %s",
                  ids["queueId"]) == 0


def test_queue_recreated_after_sql_delete_starts_empty(http, db):
    queue = unique_name()
    push(http, queue, ["old"])
    with db.cursor() as cur:
        cur.execute("DELETE FROM queen.queues WHERE name = %s", (queue,))
    push(http, queue, ["new"])

    delivery = pop(http, queue, batch=10)

    assert [m["data"] for m in delivery["messages"]] == ["new"]


# -- traces -----------------------------------------------------------------------------


def test_trace_on_a_message_answers_201_with_trace_id(http):
    queue = unique_name()
    [pushed] = push(http, queue, ["x"])

    answer = http.post("/api/v1/traces", json={
        "transactionId": "t0", "partitionId": pushed["partition_id"],
        "traceNames": ["order-42"], "eventType": "processing", "data": {"step": 1}})

    assert answer.status_code == 201
    assert answer.json()["success"] is True
    uuid.UUID(answer.json()["traceId"])


def test_trace_on_unknown_message_answers_404(http):
    queue = unique_name()
    [pushed] = push(http, queue, ["x"])

    answer = http.post("/api/v1/traces", json={
        "transactionId": "never-pushed", "partitionId": pushed["partition_id"], "data": {}})

    assert answer.status_code == 404
    assert isinstance(answer.json()["error"], str)


def test_traces_are_listed_oldest_first_with_their_fields(http):
    queue = unique_name()
    [pushed] = push(http, queue, ["x"])
    partition_id = pushed["partition_id"]
    for step, names in ((1, ["a", "b"]), (2, "single"), (3, None)):
        answer = http.post("/api/v1/traces", json={
            "transactionId": "t0", "partitionId": partition_id, "consumerGroup": "workers",
            "traceNames": names, "eventType": f"step-{step}", "data": {"step": step}})
        assert answer.status_code == 201

    answer = http.get(f"/api/v1/traces/{partition_id}/t0")

    assert answer.status_code == 200
    traces = answer.json()["traces"]
    assert [t["data"] for t in traces] == [{"step": 1}, {"step": 2}, {"step": 3}]
    assert [t["event_type"] for t in traces] == ["step-1", "step-2", "step-3"]
    assert [t["trace_names"] for t in traces] == [["a", "b"], ["single"], []]
    assert {t["consumer_group"] for t in traces} == {"workers"}
    for trace in traces:
        uuid.UUID(trace["id"])
        assert re.match(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$", trace["created_at"])


def test_trace_names_count_events_and_messages_newest_use_first(http):
    queue = unique_name()
    pushed = push(http, queue, ["x", "y"])
    older, newer = f"{queue}-older", f"{queue}-newer"
    for transaction, names in (("t0", [older]), ("t1", [older]), ("t1", [older, newer])):
        answer = http.post("/api/v1/traces", json={
            "transactionId": transaction, "partitionId": pushed[0]["partition_id"],
            "traceNames": names, "data": {}})
        assert answer.status_code == 201

    answer = http.get("/api/v1/traces/names", params={"limit": 1000})

    assert answer.status_code == 200
    body = answer.json()
    rows = {row["trace_name"]: row for row in body["trace_names"]}
    assert (rows[older]["trace_count"], rows[older]["message_count"]) == (3, 2)
    assert (rows[newer]["trace_count"], rows[newer]["message_count"]) == (1, 1)
    names = [row["trace_name"] for row in body["trace_names"]]
    assert names.index(newer) < names.index(older)  # both last seen at the third event: name
    assert body["total"] >= 2 and body["pagination"] == {"limit": 1000, "offset": 0}


def test_a_trace_keeps_each_name_once_and_no_empty_name(http):
    """A repeated name counted the event several times in /traces/names, and "" was stored
    and listed there, where /traces/by-name/ could never reach it."""
    queue = unique_name()
    [pushed] = push(http, queue, ["x"])
    name = f"{queue}-twice"
    answer = http.post("/api/v1/traces", json={
        "transactionId": "t0", "partitionId": pushed["partition_id"],
        "traceNames": [name, "", name], "data": {}})
    assert answer.status_code == 201, answer.text

    [trace] = http.get(f"/api/v1/traces/{pushed['partition_id']}/t0").json()["traces"]
    rows = {row["trace_name"]: row for row in http.get(
        "/api/v1/traces/names", params={"limit": 1000}).json()["trace_names"]}

    assert trace["trace_names"] == [name]
    assert rows[name]["trace_count"] == 1 and "" not in rows


def test_trace_names_count_an_earlier_releases_repeated_names_once_and_skip_empty(http, db):
    """Rows an earlier release stored (names repeated, or empty, in one event)."""
    queue = unique_name()
    [pushed] = push(http, queue, ["x"])
    name = f"{queue}-old"
    with db.cursor() as cursor:
        cursor.execute("""INSERT INTO queen.message_traces (message_id, partition_id,
                                 transaction_id, consumer_group, event_type, data, trace_names)
                          SELECT id, partition_id, transaction_id, '__QUEUE_MODE__', 'info',
                                 '{}', ARRAY[%s, %s, '']
                            FROM queen.messages WHERE partition_id = %s""",
                       (name, name, pushed["partition_id"]))

    rows = {row["trace_name"]: row for row in http.get(
        "/api/v1/traces/names", params={"limit": 1000}).json()["trace_names"]}

    assert rows[name]["trace_count"] == 1 and "" not in rows


def test_traces_by_name_carry_their_message_decrypted_and_page(http):
    queue = unique_name()
    configure(http, queue, {"encryptionEnabled": True})
    pushed = push(http, queue, [{"order": 1}, {"order": 2}])
    name = f"{queue}-order"
    for step, message in enumerate(pushed):
        answer = http.post("/api/v1/traces", json={
            "transactionId": message["transaction_id"], "partitionId": message["partition_id"],
            "traceNames": [name], "eventType": f"step-{step}", "data": {"step": step}})
        assert answer.status_code == 201

    answer = http.get(f"/api/v1/traces/by-name/{name}")
    second_page = http.get(f"/api/v1/traces/by-name/{name}", params={"limit": 1, "offset": 1})

    assert answer.status_code == 200
    body = answer.json()
    assert body["total"] == 2
    assert [t["event_type"] for t in body["traces"]] == ["step-0", "step-1"]
    assert [t["message_payload"] for t in body["traces"]] == [{"order": 1}, {"order": 2}]
    assert {(t["queue_name"], t["partition_name"]) for t in body["traces"]} == {
        (queue, "Default")}
    assert [t["transaction_id"] for t in body["traces"]] == ["t0", "t1"]
    assert [t["data"] for t in second_page.json()["traces"]] == [{"step": 1}]
    assert http.get("/api/v1/traces/by-name/no-such-trace-name").json()["traces"] == []


def test_trace_listing_reads_an_unparsable_limit_as_its_default(http):
    """WIRE.md 1.2: unparsable integers take the default (it answered 400)."""
    answer = http.get("/api/v1/traces/names", params={"limit": "many"})

    assert answer.status_code == 200, answer.text


def test_trace_defaults_to_queue_mode_group_and_info_event(http):
    queue = unique_name()
    [pushed] = push(http, queue, ["x"])
    http.post("/api/v1/traces", json={"transactionId": "t0",
                                      "partitionId": pushed["partition_id"], "data": "hello"})

    [trace] = http.get(f"/api/v1/traces/{pushed['partition_id']}/t0").json()["traces"]

    assert trace["consumer_group"] == "__QUEUE_MODE__"
    assert trace["event_type"] == "info"
    assert trace["data"] == "hello"


def test_traces_of_a_message_without_any_is_empty(http):
    queue = unique_name()
    [pushed] = push(http, queue, ["x"])

    answer = http.get(f"/api/v1/traces/{pushed['partition_id']}/t0")

    assert answer.status_code == 200
    assert answer.json() == {"traces": []}


# -- encryption at rest -----------------------------------------------------------------


@pytest.fixture
def encrypting(make_server):
    """A client for a server with an encryption key."""
    process = make_server(QUEEN_ENCRYPTION_KEY=TEST_ENCRYPTION_KEY)  # the database's key
    with httpx.Client(base_url=process.url, timeout=20) as client:
        yield client


def test_encrypted_queue_stores_ciphertext(encrypting, db):
    queue = unique_name()
    configure(encrypting, queue, {"encryptionEnabled": True})

    [pushed] = push(encrypting, queue, [{"secret": "swordfish"}])

    stored = scalar(db, "SELECT payload FROM queen.messages WHERE id = %s", pushed["message_id"])
    assert set(stored) == {"encrypted", "iv", "authTag"}
    assert "swordfish" not in json.dumps(stored)


def test_encrypted_queue_pops_plaintext(encrypting):
    queue = unique_name()
    configure(encrypting, queue, {"encryptionEnabled": True})
    payload = {"secret": "swordfish", "nested": [1, None, {"k": "é"}]}
    push(encrypting, queue, [payload])

    delivery = pop(encrypting, queue)

    assert delivery["messages"][0]["data"] == payload


def test_a_batch_mixing_plaintext_and_encrypted_messages_pops_both_readable(encrypting):
    """Messages stored before a queue turned encryption on stay plaintext; one pop may hand
    out both kinds, and only the encrypted ones are decrypted."""
    queue = unique_name()
    configure(encrypting, queue, {})
    push(encrypting, queue, [{"n": "plain"}])
    configure(encrypting, queue, {"encryptionEnabled": True})
    answer = encrypting.post("/api/v1/push", json={"items": [
        {"queue": queue, "payload": {"n": "secret"}, "transactionId": "e0"}]})
    assert answer.status_code == 201, answer.text

    delivery = pop(encrypting, queue, batch=5)

    assert [m["data"] for m in delivery["messages"]] == [{"n": "plain"}, {"n": "secret"}]
    assert all("isEncrypted" not in m for m in delivery["messages"])


@pytest.mark.parametrize("payload", [None, {}, "text", 0])
def test_encrypted_queue_round_trips_edge_payloads(encrypting, payload):
    queue = unique_name()
    configure(encrypting, queue, {"encryptionEnabled": True})
    push(encrypting, queue, [payload])

    delivery = pop(encrypting, queue)

    assert delivery["messages"][0]["data"] == payload


def test_encrypted_queue_dlq_shows_plaintext(encrypting):
    queue = unique_name()
    configure(encrypting, queue, {"encryptionEnabled": True})
    push(encrypting, queue, [{"secret": "swordfish"}])
    m = pop(encrypting, queue)["messages"][0]
    encrypting.post("/api/v1/ack", json={"transactionId": m["transactionId"],
                                         "partitionId": m["partitionId"], "leaseId": m["leaseId"],
                                         "status": "dlq", "error": "poison"})

    dlq = encrypting.get("/api/v1/dlq", params={"queue": queue}).json()

    assert [e["data"] for e in dlq["messages"]] == [{"secret": "swordfish"}]


def test_unencrypted_queue_stores_plaintext_on_a_keyed_server(encrypting, db):
    queue = unique_name()
    configure(encrypting, queue)

    [pushed] = push(encrypting, queue, [{"open": True}])

    assert scalar(db, "SELECT payload FROM queen.messages WHERE id = %s",
                  pushed["message_id"]) == {"open": True}


# -- SQL-level API (WIRE.md 7.2, 9.2) ---------------------------------------------------


def sql_json(db, function: str, argument: Any) -> Any:
    """Calls ``queen.<function>(jsonb)`` and returns its result as Python data."""
    value = scalar(db, f"SELECT queen.{function}(%s::jsonb)", json.dumps(argument))
    return json.loads(value) if isinstance(value, str) else value


def producer_sub_of(db, message_id: str) -> Optional[str]:
    return scalar(db, "SELECT producer_sub FROM queen.messages WHERE id = %s", message_id)


def test_push_messages_v2_stores_producer_sub(db):
    queue = unique_name()

    [result] = sql_json(db, "push_messages_v2", [
        {"queue": queue, "partition": "p", "payload": {"a": 1}, "transactionId": "sql-1",
         "producerSub": "service-a"}])

    assert result["status"] == "queued"
    assert result["transaction_id"] == "sql-1"
    assert producer_sub_of(db, result["message_id"]) == "service-a"


@pytest.mark.parametrize("function", ["push_messages_v2", "push_messages_v3"])
@pytest.mark.parametrize("given", ["absent", "", None])
def test_sql_push_without_producer_sub_stores_null(db, function, given):
    queue = unique_name()
    item: Dict[str, Any] = {"queue": queue, "payload": 1, "transactionId": "sql-1"}
    if given != "absent":
        item["producerSub"] = given

    answer = sql_json(db, function, [item])

    result = answer[0] if function == "push_messages_v2" else answer["items"][0]
    assert producer_sub_of(db, result["message_id"]) is None


def test_push_messages_v3_returns_items_and_partition_updates(db):
    queue = unique_name()

    answer = sql_json(db, "push_messages_v3", [
        {"queue": queue, "partition": "p", "payload": 1, "producerSub": "svc"},
        {"queue": queue, "partition": "p", "payload": 2}])

    assert set(answer) >= {"items", "partition_updates"}
    assert [r["status"] for r in answer["items"]] == ["queued", "queued"]
    assert isinstance(answer["partition_updates"], list) and answer["partition_updates"]
    assert producer_sub_of(db, answer["items"][0]["message_id"]) == "svc"


def test_sql_push_dedupes_like_http(http, db):
    queue = unique_name()
    [pushed] = push(http, queue, ["x"])

    [again] = sql_json(db, "push_messages_v2", [
        {"queue": queue, "partition": "Default", "payload": "y", "transactionId": "t0"}])

    assert again["status"] == "duplicate"
    assert again["message_id"] == pushed["message_id"]


def test_sql_pushed_message_pops_over_http_with_its_producer_sub(http, db):
    queue = unique_name()
    sql_json(db, "push_messages_v2", [{"queue": queue, "payload": {"via": "sql"},
                                       "producerSub": "outbox"}])

    delivery = pop(http, queue)

    assert delivery["messages"][0]["data"] == {"via": "sql"}
    assert delivery["messages"][0]["producerSub"] == "outbox"


def test_pop_specific_batch_returns_messages_and_takes_a_real_lease(http, db):
    queue = unique_name()
    sql_json(db, "push_messages_v2", [
        {"queue": queue, "partition": "p", "payload": {"n": n}, "transactionId": f"s{n}",
         "producerSub": "svc" if n == 0 else None} for n in range(2)])

    [entry] = sql_json(db, "pop_specific_batch", [{
        "idx": 0, "queue_name": queue, "partition_name": "p", "consumer_group": "__QUEUE_MODE__",
        "lease_seconds": 60, "worker_id": "sql-worker", "batch_size": 1, "sub_mode": "",
        "sub_from": ""}])

    assert entry["idx"] == 0
    result = entry["result"]
    assert result["success"] is True
    assert result["queue"] == queue and result["partition"] == "p"
    uuid.UUID(result["leaseId"])
    [message] = result["messages"]
    assert message["transactionId"] == "s0"
    assert message["data"] == {"n": 0}
    assert message["producerSub"] == "svc"
    assert set(message) >= {"id", "transactionId", "traceId", "data", "producerSub", "createdAt"}
    http_pop = http.get(f"/api/v1/pop/queue/{queue}/partition/p", params={"wait": "false"})
    assert http_pop.status_code == 204


def test_pop_specific_batch_answers_each_request_by_idx(db):
    queue_a, queue_b = unique_name(), unique_name()
    sql_json(db, "push_messages_v2", [{"queue": queue_a, "payload": "a"}])

    answer = sql_json(db, "pop_specific_batch", [
        {"idx": 5, "queue_name": queue_a, "partition_name": "Default",
         "consumer_group": "__QUEUE_MODE__", "lease_seconds": 60, "worker_id": "w",
         "batch_size": 10},
        {"idx": 6, "queue_name": queue_b, "partition_name": "Default",
         "consumer_group": "__QUEUE_MODE__", "lease_seconds": 60, "worker_id": "w",
         "batch_size": 10}])

    assert [e["idx"] for e in answer] == [5, 6]
    assert [m["data"] for m in answer[0]["result"]["messages"]] == ["a"]
    assert answer[1]["result"]["messages"] == []


# -- health -----------------------------------------------------------------------------


def test_health_answers_healthy(http):
    answer = http.get("/health")

    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("application/json")
    body = answer.json()
    assert body["status"] == "healthy"
    assert body["database"] == "connected"
    assert body["queen"]["status"] == "active"


def test_a_transaction_id_and_a_trace_name_holding_a_slash_are_reachable_by_path(http):
    """Push takes any transactionId and /traces any name, '/' included: the routes naming
    them in the path (the dashboard's links, sent as %2F) must find them."""
    queue = unique_name()
    configure(http, queue, {"retryLimit": 0, "dlqAfterMaxRetries": True})
    answer = http.post("/api/v1/push", json={"items": [
        {"queue": queue, "payload": {"o": 1}, "transactionId": "order/42"},
        {"queue": queue, "payload": {"o": 2}, "transactionId": "order/43/retry"}]})
    assert answer.status_code == 201, answer.text
    partition = answer.json()[0]["partition_id"]
    name = f"{queue}/created"
    assert http.post("/api/v1/traces", json={
        "transactionId": "order/42", "partitionId": partition, "traceNames": [name],
        "data": {}}).status_code == 201

    detail = http.get(f"/api/v1/messages/{partition}/order%2F42")
    tricky = http.get(f"/api/v1/messages/{partition}/order%2F43%2Fretry")
    traced = http.get(f"/api/v1/traces/by-name/{name.replace('/', '%2F')}")
    traces = http.get(f"/api/v1/traces/{partition}/order%2F42")
    dead = http.post(f"/api/v1/messages/{partition}/order%2F42/dlq", json={})
    retried = http.post(f"/api/v1/messages/{partition}/order%2F42/retry")
    deleted = http.delete(f"/api/v1/messages/{partition}/order%2F43%2Fretry")

    assert detail.status_code == 200 and detail.json()["transactionId"] == "order/42", detail.text
    assert tricky.status_code == 200 and tricky.json()["transactionId"] == "order/43/retry"
    assert traced.status_code == 200 and traced.json()["total"] == 1, traced.text
    assert traces.status_code == 200 and len(traces.json()["traces"]) == 1, traces.text
    assert dead.status_code == 200 and dead.json()["success"] is True, dead.text
    assert retried.status_code == 200, retried.text
    assert deleted.status_code == 200, deleted.text
    assert http.get(f"/api/v1/messages/{partition}/order%2F43%2Fretry").status_code == 404


# -- listings of big payloads -------------------------------------------------------------

BIG = "y" * (40 * 1024 * 1024)  # 40 MiB: listed before the first two rows 0 and 40, the 3rd 80


def test_a_dead_letter_page_of_big_payloads_lists_them_within_its_budget(http):
    """Three 40 MiB dead letters made the page a jsonb value over PostgreSQL's 256 MiB limit:
    GET /api/v1/dlq answered 400 for every page holding them."""
    queue = unique_name()
    pushed = []
    for n in range(3):  # (one a request: three are over the 64 MiB body limit)
        answer = http.post("/api/v1/push", json={"items": [
            {"queue": queue, "payload": {"n": n, "text": BIG}, "transactionId": f"t{n}"}]},
            timeout=120)
        assert answer.status_code == 201, answer.text
        pushed.extend(answer.json())
    for item in pushed:
        moved = http.post(f"/api/v1/messages/{item['partition_id']}/{item['transaction_id']}/dlq",
                          json={}, timeout=120)
        assert moved.status_code == 200, moved.text

    answer = http.get("/api/v1/dlq", params={"queue": queue}, timeout=120)

    assert answer.status_code == 200, answer.text[:300]
    rows = answer.json()["messages"]  # newest failure first
    assert [r["transactionId"] for r in rows] == ["t2", "t1", "t0"]
    assert [r["data"]["n"] for r in rows[:2]] == [2, 1] and "dataOmitted" not in rows[0]
    assert rows[2]["data"] is None and rows[2]["dataOmitted"] is True
    assert answer.json()["total"] == 3


def test_traces_with_big_data_are_listed_within_the_budget(http):
    queue = unique_name()
    [pushed] = push(http, queue, ["x"])
    for step in range(3):
        answer = http.post("/api/v1/traces", json={
            "transactionId": "t0", "partitionId": pushed["partition_id"],
            "data": {"step": step, "text": BIG}}, timeout=120)
        assert answer.status_code == 201, answer.text

    answer = http.get(f"/api/v1/traces/{pushed['partition_id']}/t0", timeout=120)

    assert answer.status_code == 200, answer.text[:300]
    traces = answer.json()["traces"]
    assert [t["data"]["step"] for t in traces[:2]] == [0, 1]
    assert traces[2]["data"] is None and traces[2]["dataOmitted"] is True


def test_traces_by_name_of_a_big_message_list_its_payload_within_the_budget(http):
    """Each row repeats its message's payload: seven small traces of one 45 MiB message
    went over the limit."""
    queue, name = unique_name(), unique_name("trace-")
    [pushed] = push(http, queue, [{"text": BIG}])
    for step in range(3):
        answer = http.post("/api/v1/traces", json={
            "transactionId": "t0", "partitionId": pushed["partition_id"],
            "traceNames": [name], "data": {"step": step}}, timeout=120)
        assert answer.status_code == 201, answer.text

    answer = http.get(f"/api/v1/traces/by-name/{name}", timeout=120)

    assert answer.status_code == 200, answer.text[:300]
    traces = answer.json()["traces"]
    assert [t["data"] for t in traces[:2]] == [{"step": 0}, {"step": 1}]
    assert all(t["message_payload"] == {"text": BIG} for t in traces[:2])
    assert traces[2]["data"] is None and traces[2]["message_payload"] is None
    assert traces[2]["dataOmitted"] is True and answer.json()["total"] == 3
