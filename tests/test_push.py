"""POST /api/v1/push over the real socket (WIRE.md 2.0, 2.2).

Each test uses a fresh queue, pushes with plain HTTP the way the clients do, and checks what
the answer says and what a pop or the database shows afterwards.
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from typing import Any, Dict, List, Optional

import httpx
import pytest

from tests.support import unique_name, wait_until

QUEUED_KEYS = {"index", "status", "transaction_id", "message_id", "partition_id",
                       "trace_id", "queueName"}


def push(http: httpx.Client, items: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Pushes ``items``; asserts the 201 and returns the per-item results."""
    answer = http.post("/api/v1/push", json={"items": items})
    assert answer.status_code == 201, answer.text
    return answer.json()


def pop(http: httpx.Client, queue: str, **params: Any) -> Optional[Dict[str, Any]]:
    """One pop without waiting; the 200 body, or None for 204."""
    params = {"wait": "false", **params}
    answer = http.get(f"/api/v1/pop/queue/{queue}", params=params)
    assert answer.status_code in (200, 204), answer.text
    return answer.json() if answer.status_code == 200 else None


def configure(http: httpx.Client, queue: str, **options: Any) -> Dict[str, Any]:
    answer = http.post("/api/v1/configure", json={"queue": queue, "options": options})
    assert answer.status_code == 200, answer.text
    return answer.json()


def stored_count(db, queue: str) -> int:
    """How many messages the database holds for ``queue``."""
    with db.cursor() as cur:
        cur.execute("""SELECT count(*) FROM queen.messages m
                         JOIN queen.partitions p ON p.id = m.partition_id
                         JOIN queen.queues q ON q.id = p.queue_id
                        WHERE q.name = %s""", (queue,))
        return cur.fetchone()[0]


def uuid7_millis(text: str) -> int:
    """The Unix time in ms carried by the first 48 bits of a UUIDv7."""
    return uuid.UUID(text).int >> 80


# -- per-item answers -------------------------------------------------------------------


def test_push_answers_201_with_queued_item_fields(http):
    queue = unique_name()
    trace_id = str(uuid.uuid4())

    results = push(http, [{"queue": queue, "partition": "p1", "payload": {"n": 1},
                           "transactionId": "tx-1", "traceId": trace_id}])

    assert len(results) == 1
    item = results[0]
    assert set(item) >= QUEUED_KEYS
    assert item["index"] == 0
    assert item["status"] == "queued"
    assert item["transaction_id"] == "tx-1"
    assert item["queueName"] == queue
    assert item["trace_id"] == trace_id
    uuid.UUID(item["message_id"])
    uuid.UUID(item["partition_id"])


def test_queued_item_without_trace_id_answers_trace_id_null(http):
    queue = unique_name()

    [item] = push(http, [{"queue": queue, "payload": 1, "transactionId": "tx-1"}])

    assert item["status"] == "queued"
    assert "trace_id" in item and item["trace_id"] is None


def test_results_are_aligned_with_items_by_index(http):
    queue = unique_name()
    items = [{"queue": queue, "partition": f"p{i % 3}", "payload": i, "transactionId": f"t{i}"}
             for i in range(7)]

    results = push(http, items)

    assert [r["index"] for r in results] == list(range(7))
    assert [r["transaction_id"] for r in results] == [f"t{i}" for i in range(7)]


def test_message_id_is_the_stored_row_id(http, db):
    queue = unique_name()

    [item] = push(http, [{"queue": queue, "payload": {}, "transactionId": "tx-1"}])

    with db.cursor() as cur:
        cur.execute("SELECT transaction_id, partition_id::text FROM queen.messages WHERE id = %s",
                    (item["message_id"],))
        assert cur.fetchone() == ("tx-1", item["partition_id"])


# -- identifiers ------------------------------------------------------------------------


def test_message_ids_are_uuid_v7_carrying_the_push_time(http):
    queue = unique_name()
    before_ms = int(time.time() * 1000)

    results = push(http, [{"queue": queue, "payload": i} for i in range(5)])

    after_ms = int(time.time() * 1000)
    for item in results:
        message_id = uuid.UUID(item["message_id"])
        assert message_id.version == 7
        assert str(message_id) == item["message_id"]  # lowercase, hyphenated
        assert before_ms - 5000 <= uuid7_millis(item["message_id"]) <= after_ms + 5000


def test_message_ids_of_later_pushes_sort_after_earlier_ones(http):
    queue = unique_name()
    ids = []

    for i in range(5):
        [item] = push(http, [{"queue": queue, "payload": i}])
        ids.append(uuid.UUID(item["message_id"]))
        time.sleep(0.003)  # a minimum: the next push is in a later millisecond (UUIDv7)

    assert ids == sorted(ids, key=lambda u: u.int)


def test_items_without_transaction_id_get_distinct_server_ids(http, db):
    queue = unique_name()

    results = push(http, [{"queue": queue, "payload": {"i": i}} for i in range(100)])

    assert [r["status"] for r in results] == ["queued"] * 100
    assert len({r["transaction_id"] for r in results}) == 100
    assert all(r["transaction_id"] for r in results)
    assert len({r["message_id"] for r in results}) == 100
    assert stored_count(db, queue) == 100


def test_push_of_empty_items_answers_empty_array(http):
    answer = http.post("/api/v1/push", json={"items": []})

    assert answer.status_code == 201
    assert answer.json() == []


# -- dedupe (WIRE.md 2.2 point 2) -------------------------------------------------------


def test_repeat_push_of_a_transaction_id_is_duplicate_with_the_original_message_id(http, db):
    queue = unique_name()
    [first] = push(http, [{"queue": queue, "payload": "original", "transactionId": "same"}])

    [again] = push(http, [{"queue": queue, "payload": "second", "transactionId": "same"}])

    assert again["status"] == "duplicate"
    assert again["message_id"] == first["message_id"]
    assert again["transaction_id"] == "same"
    assert again["queueName"] == queue
    assert stored_count(db, queue) == 1


def test_duplicate_inside_one_request_first_occurrence_wins(http):
    queue = unique_name()
    items = [{"queue": queue, "payload": "first", "transactionId": "k"},
             {"queue": queue, "payload": "other", "transactionId": "x"},
             {"queue": queue, "payload": "second", "transactionId": "k"}]

    results = push(http, items)

    assert [r["status"] for r in results] == ["queued", "queued", "duplicate"]
    assert results[2]["message_id"] == results[0]["message_id"]
    delivery = pop(http, queue, batch=10)
    assert [m["data"] for m in delivery["messages"]] == ["first", "other"]


def test_concurrent_pushes_of_one_key_store_it_once(http, server, db):
    queue = unique_name()
    push(http, [{"queue": queue, "payload": "warm-up", "transactionId": "other"}])
    barrier = threading.Barrier(8, timeout=20)
    results: List[Dict[str, Any]] = []
    errors: List[BaseException] = []
    lock = threading.Lock()

    def one_push(n: int) -> None:
        try:
            with httpx.Client(base_url=server.url, timeout=30) as client:
                barrier.wait()
                answer = client.post("/api/v1/push", json={"items": [
                    {"queue": queue, "payload": n, "transactionId": "contended"}]})
            with lock:
                results.append({"code": answer.status_code, **answer.json()[0]})
        except BaseException as err:  # reported below, never lost in the thread
            with lock:
                errors.append(err)

    threads = [threading.Thread(target=one_push, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(40)

    assert not errors
    assert len(results) == 8
    assert {r["code"] for r in results} == {201}
    queued = [r for r in results if r["status"] == "queued"]
    duplicates = [r for r in results if r["status"] == "duplicate"]
    assert len(queued) == 1
    assert len(duplicates) == 7
    assert {d["message_id"] for d in duplicates} == {queued[0]["message_id"]}
    assert stored_count(db, queue) == 2


def test_concurrent_pushes_of_one_key_to_a_new_queue_store_it_once(server, db):
    queue = unique_name()
    barrier = threading.Barrier(8, timeout=20)
    statuses: List[str] = []
    ids: List[str] = []
    lock = threading.Lock()

    def one_push() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            barrier.wait()
            answer = client.post("/api/v1/push", json={"items": [
                {"queue": queue, "payload": 1, "transactionId": "contended"}]})
        with lock:
            statuses.append(answer.json()[0]["status"] if answer.status_code == 201
                            else f"HTTP {answer.status_code}")
            ids.append(answer.json()[0].get("message_id") if answer.status_code == 201 else None)

    threads = [threading.Thread(target=one_push) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(40)

    assert sorted(statuses) == ["duplicate"] * 7 + ["queued"]
    assert len(set(ids)) == 1
    assert stored_count(db, queue) == 1


def test_same_transaction_id_in_another_partition_is_a_new_message(http):
    queue = unique_name()
    [first] = push(http, [{"queue": queue, "partition": "a", "payload": 1, "transactionId": "t"}])

    [second] = push(http, [{"queue": queue, "partition": "b", "payload": 2, "transactionId": "t"}])

    assert second["status"] == "queued"
    assert second["message_id"] != first["message_id"]
    assert second["partition_id"] != first["partition_id"]


def test_same_transaction_id_in_another_queue_is_a_new_message(http):
    queue_a, queue_b = unique_name(), unique_name()
    [first] = push(http, [{"queue": queue_a, "payload": 1, "transactionId": "t"}])

    [second] = push(http, [{"queue": queue_b, "payload": 2, "transactionId": "t"}])

    assert second["status"] == "queued"
    assert second["message_id"] != first["message_id"]


# -- auto-creation ----------------------------------------------------------------------


def test_push_creates_unknown_queue_and_partition(http, db):
    queue = unique_name()

    [item] = push(http, [{"queue": queue, "partition": "new-partition", "payload": 1}])

    with db.cursor() as cur:
        cur.execute("""SELECT p.id::text, p.name FROM queen.partitions p
                         JOIN queen.queues q ON q.id = p.queue_id WHERE q.name = %s""", (queue,))
        assert cur.fetchall() == [(item["partition_id"], "new-partition")]


def test_push_without_partition_goes_to_default(http):
    queue = unique_name()
    push(http, [{"queue": queue, "payload": 1}])

    delivery = pop(http, queue)

    assert delivery["messages"][0]["partition"] == "Default"


def test_auto_created_queue_has_default_options(http):
    queue = unique_name()
    push(http, [{"queue": queue, "payload": 1}])

    answer = http.get(f"/api/v1/resources/queues/{queue}")

    assert answer.status_code == 200
    assert answer.json()["name"] == queue
    assert [p["name"] for p in answer.json()["partitions"]] == ["Default"]


# -- payloads ---------------------------------------------------------------------------


def _large_payload() -> Dict[str, Any]:
    """About 1.6 MB of JSON that is not one repeated character (truncation would show)."""
    chunks = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(25_000)]
    return {"kind": "large", "chunks": chunks, "unicode": "é€😀" * 100}


PAYLOADS = {
    "null": None,
    "empty-object": {},
    "nested": {"a": {"b": [1, 2.5, {"c": None, "d": [True, False]}]}, "s": "x\"y\\z\n",
               "n": -12345678901234, "u": "žluťoučký kůň"},
    "string": "plain text",
    "number": 42,
    "array": [1, "two", None],
    "large": _large_payload(),
}


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_payload_round_trips_through_pop_intact(http, name):
    queue = unique_name()
    push(http, [{"queue": queue, "payload": PAYLOADS[name], "transactionId": "p"}])

    delivery = pop(http, queue)

    assert delivery is not None
    assert delivery["messages"][0]["data"] == PAYLOADS[name]


def test_item_without_payload_key_is_popped_as_empty_object(http):
    queue = unique_name()
    push(http, [{"queue": queue, "transactionId": "p"}])

    delivery = pop(http, queue)

    assert delivery["messages"][0]["data"] == {}


def test_explicit_null_payload_is_stored_as_json_null(http, db):
    queue = unique_name()

    [item] = push(http, [{"queue": queue, "payload": None}])

    with db.cursor() as cur:
        cur.execute("SELECT payload IS NULL, payload::text FROM queen.messages WHERE id = %s",
                    (item["message_id"],))
        is_sql_null, text = cur.fetchone()
    assert is_sql_null or text == "null"


# -- maxSize (WIRE.md 9.5) --------------------------------------------------------------


def test_max_size_refuses_items_beyond_capacity(http, db):
    queue = unique_name()
    configure(http, queue, maxSize=3)

    results = push(http, [{"queue": queue, "payload": i, "transactionId": f"t{i}"}
                          for i in range(5)])

    assert [r["status"] for r in results] == ["queued"] * 3 + ["failed"] * 2
    for failed in results[3:]:
        assert "max capacity" in failed["error"]
        assert failed["queue"] == queue
        assert failed["index"] in (3, 4)
    assert stored_count(db, queue) == 3


def test_max_size_counts_messages_already_stored(http, db):
    queue = unique_name()
    configure(http, queue, maxSize=3)
    push(http, [{"queue": queue, "payload": i} for i in range(2)])

    results = push(http, [{"queue": queue, "payload": i} for i in range(2, 4)])

    assert [r["status"] for r in results] == ["queued", "failed"]
    assert stored_count(db, queue) == 3


def test_max_size_zero_means_unlimited(http, db):
    queue = unique_name()
    configure(http, queue, maxSize=0)

    results = push(http, [{"queue": queue, "payload": i} for i in range(20)])

    assert {r["status"] for r in results} == {"queued"}
    assert stored_count(db, queue) == 20


def test_max_size_refuses_a_later_repeat_of_a_refused_item_too(http, db):
    queue = unique_name()
    configure(http, queue, maxSize=1)

    results = push(http, [{"queue": queue, "payload": 0, "transactionId": "kept"},
                          {"queue": queue, "payload": 1, "transactionId": "late"},
                          {"queue": queue, "payload": 2, "transactionId": "late"}])

    assert [r["status"] for r in results] == ["queued", "failed", "failed"]
    assert stored_count(db, queue) == 1


def test_max_size_does_not_count_duplicates_against_the_room(http, db):
    queue = unique_name()
    configure(http, queue, maxSize=2)
    [first] = push(http, [{"queue": queue, "payload": 0, "transactionId": "t0"}])

    results = push(http, [{"queue": queue, "payload": 0, "transactionId": "t0"},
                          {"queue": queue, "payload": 1, "transactionId": "t1"},
                          {"queue": queue, "payload": 2, "transactionId": "t2"}])

    assert [r["status"] for r in results] == ["duplicate", "queued", "failed"]
    assert results[0]["message_id"] == first["message_id"]
    assert stored_count(db, queue) == 2


def test_a_full_queue_refuses_only_its_own_items_in_a_mixed_push(http, db):
    full, free = unique_name(), unique_name()
    configure(http, full, maxSize=1)

    results = push(http, [{"queue": full, "payload": 0}, {"queue": free, "payload": 0},
                          {"queue": full, "payload": 1}, {"queue": free, "payload": 1}])

    assert [r["status"] for r in results] == ["queued", "queued", "failed", "queued"]
    assert stored_count(db, full) == 1 and stored_count(db, free) == 2


# -- traceId and producerSub ------------------------------------------------------------


def test_non_uuid_trace_id_is_refused_and_nothing_is_stored(http, db):
    queue = unique_name()

    answer = http.post("/api/v1/push", json={"items": [
        {"queue": queue, "payload": 1, "traceId": "not-a-uuid"}]})

    assert answer.status_code == 400
    assert isinstance(answer.json()["error"], str)
    assert stored_count(db, queue) == 0


def test_trace_id_is_answered_in_canonical_form(http):
    trace_id = str(uuid.uuid4())

    [result] = push(http, [{"queue": unique_name(), "payload": 1, "traceId": trace_id.upper()}])

    assert result["trace_id"] == trace_id


def test_trace_id_is_delivered_with_the_message(http):
    queue = unique_name()
    trace_id = str(uuid.uuid4())
    push(http, [{"queue": queue, "payload": 1, "traceId": trace_id}])

    delivery = pop(http, queue)

    assert delivery["messages"][0]["traceId"] == trace_id


def test_producer_sub_in_the_body_is_ignored(http, db):
    queue = unique_name()

    [item] = push(http, [{"queue": queue, "payload": 1, "producerSub": "mallory"}])

    with db.cursor() as cur:
        cur.execute("SELECT producer_sub FROM queen.messages WHERE id = %s", (item["message_id"],))
        assert cur.fetchone() == (None,)
    assert pop(http, queue)["messages"][0]["producerSub"] is None


# -- order and read-your-writes ---------------------------------------------------------


def test_messages_pop_back_in_push_order_across_requests(http):
    queue = unique_name()
    for start in range(0, 50, 10):
        push(http, [{"queue": queue, "payload": {"seq": n}, "transactionId": f"t{n:02d}"}
                    for n in range(start, start + 10)])
    seen: List[int] = []

    for _ in range(20):  # bounded: 50 messages in batches of 7 need 8 pops
        delivery = pop(http, queue, batch=7, autoAck="true")
        if delivery is None:
            break
        seen.extend(m["data"]["seq"] for m in delivery["messages"])

    assert seen == list(range(50))


def test_one_request_keeps_array_order_per_partition(http):
    queue = unique_name()
    push(http, [{"queue": queue, "partition": "p", "payload": n} for n in range(30)])

    delivery = pop(http, queue, batch=30)

    assert [m["data"] for m in delivery["messages"]] == list(range(30))


def test_message_is_poppable_immediately_after_push_answered(http):
    queue = unique_name()
    pushed, popped = [], []

    for n in range(10):
        [item] = push(http, [{"queue": queue, "payload": n}])
        pushed.append(item["message_id"])
        delivery = pop(http, queue, autoAck="true")
        popped.append(delivery["messages"][0]["id"] if delivery else None)

    assert popped == pushed


def test_push_racing_a_queue_delete_answers_every_item(http, pg_dsn):
    """A queue deleted between the push's create and lock steps is created again: no item
    may vanish from the answer (each one queued, in a queue that exists afterwards)."""
    import psycopg2

    queue = unique_name()
    stop = threading.Event()
    deleter_errors: list = []
    deletions = [0]  # deletes that found the queue, i.e. raced a push

    def delete_repeatedly():
        connection = psycopg2.connect(pg_dsn)
        connection.autocommit = True
        try:
            with connection.cursor() as cursor:
                while not stop.is_set():
                    cursor.execute("DELETE FROM queen.queues WHERE name = %s", (queue,))
                    deletions[0] += cursor.rowcount
        except Exception as err:  # reported below
            deleter_errors.append(err)
        finally:
            connection.close()

    deleter = threading.Thread(target=delete_repeatedly)
    deleter.start()
    answers = []

    def raced_enough() -> bool:
        """Push once more; done once pushes and deletes have collided many times."""
        items = [{"queue": queue, "partition": f"p{n}", "payload": n} for n in range(5)]
        answers.append(http.post("/api/v1/push", json={"items": items}))
        return deleter_errors or (deletions[0] >= 20 and len(answers) >= 50)

    try:
        wait_until(raced_enough, interval=0, message="20 deletes racing 50 pushes")
    finally:
        stop.set()
        deleter.join(10)

    assert deleter_errors == []
    assert answers and all(a.status_code == 201 for a in answers), \
        [a.text for a in answers if a.status_code != 201][:3]
    for answer in answers:
        body = answer.json()
        assert [r["index"] for r in body] == list(range(5))
        assert all(r["status"] == "queued" for r in body), body
    # messages.partition_id has no foreign key: deleting partitions must take their messages
    connection = psycopg2.connect(pg_dsn)
    try:
        with connection.cursor() as cursor:
            cursor.execute("""SELECT count(*) FROM queen.messages m WHERE NOT EXISTS
                              (SELECT 1 FROM queen.partitions p WHERE p.id = m.partition_id)""")
            assert cursor.fetchone()[0] == 0
    finally:
        connection.close()


def test_payload_numbers_beyond_64_bits_and_unicode_round_trip_exactly(http):
    """The fast JSON codec refuses integers beyond 64 bits; such payloads must still be
    stored and handed out unchanged (jsonb keeps numbers of any size)."""
    queue = unique_name()
    payload = {"big": 123456789012345678901234567890, "neg": -(2**70), "text": "zé 漢字 🎉",
               "small": 1.5}
    answer = http.post("/api/v1/push", json={"items": [{"queue": queue, "payload": payload}]})
    assert answer.status_code == 201, answer.text

    delivery = http.get(f"/api/v1/pop/queue/{queue}", params={"wait": "false"})

    assert delivery.status_code == 200, delivery.text
    assert delivery.json()["messages"][0]["data"] == payload


def test_server_made_transaction_ids_are_distinct_version_4_uuids():
    from queen_tw.engine.queue_engine import random_uuid4s

    made = random_uuid4s(2000)

    assert len(set(made)) == 2000
    for text in made:
        parsed = uuid.UUID(text)
        assert (parsed.version, parsed.variant, str(parsed)) == (4, uuid.RFC_4122, text)
