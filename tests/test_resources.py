"""Resource overviews and message browsing/actions (WIRE.md 3.1, 3.2, 8 rows 26, 28).

Counts that need every message come from the statistics snapshot, so tests that read them
call ``POST /api/v1/stats/refresh`` first.
"""

from __future__ import annotations

import uuid

import pytest

from tests.binary_bodies import framed_body, framed_group, id_text, v7_id
from tests.http_helpers import ack, configure, dead_letters, pop, pop_answer, push
from tests.support import unique_name


def _refresh(http) -> None:
    assert http.post("/api/v1/stats/refresh").status_code == 200


# -- resources --------------------------------------------------------------------------


def test_overview_counts_queues_messages_and_lag(http):
    queue = unique_name()
    push(http, queue, [1, 2, 3])
    ack(http, pop(http, queue)["messages"][0])
    _refresh(http)

    overview = http.get("/api/v1/resources/overview").json()

    assert overview["queues"] >= 1 and overview["partitions"] >= 1
    messages = overview["messages"]
    assert set(messages) == {"total", "pending", "processing", "completed", "failed", "deadLetter"}
    assert messages["total"] >= 3 and messages["completed"] >= 1 and messages["pending"] >= 2
    assert set(overview["lag"]["time"]) == {"avg", "median", "min", "max"}
    assert set(overview["lag"]["offset"]) == {"avg", "median", "min", "max"}
    assert set(overview["throughput"]) == {"ingestedPerSecond", "processedPerSecond"}
    assert overview["throughput"]["ingestedPerSecond"] > 0
    assert overview["statsAge"] is not None and overview["timestamp"].endswith("Z")


def test_namespaces_and_tasks_group_their_queues(http):
    namespace, task = unique_name("ns-"), unique_name("task-")
    for _ in range(2):
        queue = unique_name()
        http.post("/api/v1/configure", json={"queue": queue, "namespace": namespace,
                                             "task": task}).raise_for_status()
        push(http, queue, ["x"])

    namespaces = http.get("/api/v1/resources/namespaces").json()["namespaces"]
    tasks = http.get("/api/v1/resources/tasks").json()["tasks"]

    [mine] = [n for n in namespaces if n["namespace"] == namespace]
    assert mine["queues"] == 2 and mine["partitions"] == 2
    assert mine["messages"]["total"] == 2
    [by_task] = [t for t in tasks if t["task"] == task]
    assert by_task["queues"] == 2


def test_partitions_lists_a_queues_partitions_with_counts_and_paging(http):
    queue = unique_name()
    push(http, queue, [1, 2], partition="a", prefix="a")
    push(http, queue, [3], partition="b", prefix="b")
    ack(http, pop(http, queue, "a")["messages"][0])

    page = http.get("/api/v1/resources/partitions", params={"queue": queue}).json()
    first = http.get("/api/v1/resources/partitions", params={"queue": queue, "limit": 1}).json()

    by_name = {p["name"]: p for p in page["partitions"]}
    assert page["total"] == 2
    assert by_name["a"]["messages"] == {"total": 2, "pending": 1}
    assert by_name["b"]["messages"] == {"total": 1, "pending": 1}
    assert by_name["a"]["queue"] == queue and by_name["a"]["lastActivity"].endswith("Z")
    assert len(first["partitions"]) == 1 and first["total"] == 2


def test_queue_totals_stay_apart_when_a_named_group_dead_letters(http):
    """The totals are queue mode's view; a named group's dead letter is counted in
    deadLetter without being taken off queue mode's completed (which went negative)."""
    queue = unique_name()
    configure(http, queue, retryLimit=0)
    push(http, queue, ["a", "b"])
    [message] = pop(http, queue, consumerGroup="G")["messages"]
    assert ack(http, message, status="failed", consumerGroup="G")["dlq"] is True
    ack(http, pop(http, queue)["messages"][0])  # queue mode completes "a"

    totals = http.get(f"/api/v1/resources/queues/{queue}").json()["totals"]

    assert {key: totals[key] for key in ("total", "pending", "processing", "completed",
                                         "deadLetter")} == \
        {"total": 2, "pending": 1, "processing": 0, "completed": 1, "deadLetter": 1}


def test_queue_totals_stay_apart_when_queue_mode_dead_letters_a_message_ahead_of_it(http):
    queue = unique_name()
    push(http, queue, ["a", "b", "c"])
    [a] = pop(http, queue)["messages"]
    ack(http, a)  # queue mode consumed "a"; "b" and "c" are ahead of its cursor
    detail = http.get("/api/v1/messages", params={"queue": queue}).json()["messages"]
    c = next(m for m in detail if m["transactionId"] == "t2")
    moved = http.post(f"/api/v1/messages/{c['partitionId']}/t2/dlq", json={})
    assert moved.status_code == 200 and moved.json()["dlq"] is True, moved.text

    totals = http.get(f"/api/v1/resources/queues/{queue}").json()["totals"]

    assert (totals["total"], totals["completed"], totals["deadLetter"]) == (3, 1, 1), totals


# -- messages: reads --------------------------------------------------------------------


def test_message_list_is_newest_first_with_statuses(http):
    queue = unique_name()
    push(http, queue, ["a", "b", "c"])
    delivery = pop(http, queue, batch=2)
    ack(http, delivery["messages"][0])

    listed = http.get("/api/v1/messages", params={"queue": queue}).json()

    assert [m["transactionId"] for m in listed["messages"]] == ["t2", "t1", "t0"]
    assert [m["status"] for m in listed["messages"]] == ["pending", "processing", "completed"]
    first = listed["messages"][0]
    assert first["queuePath"] == f"{queue}/Default" and first["queue"] == queue
    assert listed["mode"]["hasQueueMode"] is True


def test_message_list_windows_on_created_at_not_on_the_ids_time(http):
    """A client-made id carries the client's clock (and a fired timer the time it was
    scheduled, WIRE2 3.1), while createdAt is the server's: the list windowed on the id's
    time as well and left such a message out of the default last hour."""
    queue = unique_name()
    hours_behind = v7_id(offset_ms=-2 * 3600 * 1000)
    answer = http.post("/api/v1/push", content=framed_body([framed_group(
        queue, "Default", [(hours_behind, "behind", b'"x"')])]),
        headers={"Content-Type": "application/x-queen-push"})
    assert answer.status_code == 201, answer.text
    assert answer.json()[0]["message_id"] == id_text(hours_behind)

    listed = http.get("/api/v1/messages", params={"queue": queue}).json()["messages"]

    assert [m["transactionId"] for m in listed] == ["behind"]


def test_message_list_from_before_1970_lists_everything_up_to_its_end(http):
    queue = unique_name()
    push(http, queue, ["a", "b"])

    for window in ({"from": "1969-12-31T23:59:59Z"},
                   {"from": "0001-01-01T00:00:00Z", "to": "2999-01-01T00:00:00Z"}):
        listed = http.get("/api/v1/messages", params={"queue": queue, **window}).json()
        assert [m["transactionId"] for m in listed["messages"]] == ["t1", "t0"], window


def test_a_hybrid_queues_message_is_pending_until_queue_mode_reads_its_partition(http):
    """Every bus group consumed it, but queue mode, which reads this queue, had not reached
    its partition: it was reported completed, and queue mode then delivered it."""
    queue = unique_name()
    [pushed] = push(http, queue, ["x"])
    ack(http, pop(http, queue, consumerGroup="g")["messages"][0], consumerGroup="g")
    push(http, queue, ["other"], partition="P2")
    assert pop(http, queue, partition="P2")["messages"][0]["data"] == "other"  # queue mode

    detail = http.get(f"/api/v1/messages/{pushed['partition_id']}/t0").json()
    listed = http.get("/api/v1/messages", params={"queue": queue}).json()

    assert detail["status"] == "pending", detail
    assert listed["mode"]["type"] == "hybrid"
    assert {m["partition"]: m["status"] for m in listed["messages"]} == {
        "Default": "pending", "P2": "processing"}
    assert pop(http, queue, partition="Default")["messages"][0]["transactionId"] == "t0"


def test_message_list_filters_by_status(http):
    queue = unique_name()
    push(http, queue, ["a", "b"])
    ack(http, pop(http, queue)["messages"][0], "dlq", error="bad")

    dead = http.get("/api/v1/messages", params={"queue": queue, "status": "dead_letter"}).json()
    pending = http.get("/api/v1/messages", params={"queue": queue, "status": "pending"}).json()

    assert [m["transactionId"] for m in dead["messages"]] == ["t0"]
    assert [m["transactionId"] for m in pending["messages"]] == ["t1"]


def test_message_list_refuses_an_unknown_status(http):
    answer = http.get("/api/v1/messages", params={"status": "lost"})

    assert answer.status_code == 400
    assert "error" in answer.json()


def test_message_detail_has_payload_status_and_groups(http):
    queue = unique_name()
    [pushed] = push(http, queue, [{"k": 1}])
    delivery = pop(http, queue, consumerGroup="g")
    ack(http, delivery["messages"][0], consumerGroup="g")

    detail = http.get(f"/api/v1/messages/{pushed['partition_id']}/t0").json()

    assert detail["id"] == pushed["message_id"]
    assert detail["payload"] == {"k": 1} and detail["isEncrypted"] is False
    assert detail["queuePath"] == f"{queue}/Default"
    assert detail["queueConfig"]["leaseTime"] == 300
    assert detail["consumerGroups"] == [{"name": "g", "consumed": True, "leaseExpiresAt": None}]
    assert detail["status"] == "completed"


def test_message_detail_of_unknown_message_answers_404(http):
    answer = http.get(f"/api/v1/messages/{uuid.uuid4()}/nope")

    assert answer.status_code == 404
    assert answer.json() == {"error": "Message not found"}


def test_message_routes_refuse_a_partition_id_that_is_not_a_uuid(http):
    answer = http.get("/api/v1/messages/not-a-uuid/t0")

    assert answer.status_code == 400
    assert answer.json() == {"error": "partitionId must be a UUID"}


# -- messages: actions ------------------------------------------------------------------


def test_delete_message_removes_it_and_unknown_answers_404(http):
    queue = unique_name()
    [pushed] = push(http, queue, ["x"])
    path = f"/api/v1/messages/{pushed['partition_id']}/t0"

    first = http.delete(path)
    second = http.delete(path)

    assert first.status_code == 200
    assert first.json()["success"] is True and first.json()["transactionId"] == "t0"
    assert second.status_code == 404
    assert pop_answer(http, queue).status_code == 204


def test_retry_requeues_a_dead_letter_at_the_tail(http):
    queue = unique_name()
    [pushed] = push(http, queue, ["x"])
    ack(http, pop(http, queue)["messages"][0], "dlq", error="bad")

    answer = http.post(f"/api/v1/messages/{pushed['partition_id']}/t0/retry")

    body = answer.json()
    assert answer.status_code == 200
    assert body["success"] is True and body["transactionId"] == "t0:retry:1"
    uuid.UUID(body["messageId"])
    assert dead_letters(http, queue)["total"] == 0
    again = pop(http, queue)["messages"][0]
    assert again["data"] == "x" and again["transactionId"] == "t0:retry:1"


def test_retry_of_a_dead_letter_stored_before_its_queue_encrypted_seals_the_copy(http, db):
    """The copy was pushed in plaintext as stored, which an encrypting queue refuses: every
    retry answered 503 "retry" for good."""
    queue = unique_name()
    [pushed] = push(http, queue, [{"secret": "plain"}])
    ack(http, pop(http, queue)["messages"][0], "dlq", error="bad")
    configure(http, queue, encryptionEnabled=True)

    answer = http.post(f"/api/v1/messages/{pushed['partition_id']}/t0/retry")

    assert answer.status_code == 200, answer.text
    with db.cursor() as cursor:
        cursor.execute("""SELECT is_encrypted, payload::text FROM queen.messages
                           WHERE partition_id = %s AND transaction_id = 't0:retry:1'""",
                       (pushed["partition_id"],))
        [(encrypted, stored)] = cursor.fetchall()
    assert encrypted is True and "plain" not in stored
    assert pop(http, queue)["messages"][0]["data"]["secret"] == "plain"
    assert dead_letters(http, queue)["total"] == 0


def test_retry_into_a_full_queue_answers_409_and_keeps_the_dead_letter(http):
    """The copy is a push: at maxSize it is refused (WIRE.md 9.5). The dead letter used to be
    dropped anyway and the call answered success with no message: the message was gone."""
    queue = unique_name()
    configure(http, queue, maxSize=2, retryLimit=0)
    [pushed, _] = push(http, queue, ["x", "y"])
    assert ack(http, pop(http, queue)["messages"][0], "failed", error="bad")["dlq"] is True

    answer = http.post(f"/api/v1/messages/{pushed['partition_id']}/t0/retry")

    assert answer.status_code == 409, answer.text
    assert "max capacity" in answer.json()["error"]
    assert dead_letters(http, queue)["total"] == 1
    assert [m["transactionId"] for m in http.get(
        "/api/v1/messages", params={"queue": queue}).json()["messages"]] == ["t1", "t0"]


def test_retry_of_a_255_character_transaction_id_keeps_the_copys_within_255(http):
    """The copy's id was "<orig>:retry:1", 263 characters, which push refuses (WIRE.md 1.4)
    and no ack of a streams cycle could name."""
    queue = unique_name()
    original = "x" * 255
    answer = http.post("/api/v1/push", json={"items": [
        {"queue": queue, "payload": "x", "transactionId": original}]})
    partition = answer.json()[0]["partition_id"]
    ack(http, pop(http, queue)["messages"][0], "dlq", error="bad")

    first = http.post(f"/api/v1/messages/{partition}/{original}/retry").json()
    ack(http, pop(http, queue)["messages"][0], "dlq", error="bad")
    second = http.post(f"/api/v1/messages/{partition}/{first['transactionId']}/retry").json()

    assert first["transactionId"] == "x" * 247 + ":retry:1"
    assert second["transactionId"] == "x" * 247 + ":retry:2"  # its own prefix cut: a clash
    assert pop(http, queue)["messages"][0]["transactionId"] == second["transactionId"]


def test_retry_of_unknown_message_answers_404(http):
    answer = http.post(f"/api/v1/messages/{uuid.uuid4()}/nope/retry")

    assert answer.status_code == 404


def test_dlq_action_dead_letters_the_next_pending_message_and_skips_it(http):
    queue = unique_name()
    [pushed, _] = push(http, queue, ["a", "b"])

    answer = http.post(f"/api/v1/messages/{pushed['partition_id']}/t0/dlq")

    assert answer.json() == {"success": True, "dlq": True}
    assert dead_letters(http, queue)["messages"][0]["errorMessage"]
    assert pop(http, queue)["messages"][0]["data"] == "b"


def test_dlq_action_takes_a_group_and_an_error(http):
    queue = unique_name()
    [pushed] = push(http, queue, ["a"])

    http.post(f"/api/v1/messages/{pushed['partition_id']}/t0/dlq",
              json={"consumerGroup": "g", "error": "by hand"}).raise_for_status()

    [entry] = dead_letters(http, queue)["messages"]
    assert entry["consumerGroup"] == "g" and entry["errorMessage"] == "by hand"
    assert pop(http, queue)["messages"][0]["data"] == "a"  # queue mode unaffected
    assert pop_answer(http, queue, consumerGroup="g").status_code == 204


def test_clear_deletes_a_partitions_messages_and_keeps_the_queue(http):
    queue = unique_name()
    configure(http, queue, leaseTime=30)
    push(http, queue, [1, 2], partition="a", prefix="a")
    push(http, queue, [3], partition="b", prefix="b")

    answer = http.delete(f"/api/v1/queues/{queue}/clear", params={"partition": "a"})

    assert answer.json() == {"success": True, "queue": queue, "partition": "a", "deleted": 2}
    assert pop(http, queue, batch=10)["messages"][0]["data"] == 3
    assert http.get(f"/api/v1/resources/queues/{queue}").json()["options"]["leaseTime"] == 30


def test_clear_of_a_whole_queue_ends_its_leases(http):
    queue = unique_name()
    push(http, queue, [1, 2])
    assert pop(http, queue) is not None

    answer = http.delete(f"/api/v1/queues/{queue}/clear")
    push(http, queue, [3], prefix="later")

    assert answer.json()["deleted"] == 2 and answer.json()["partition"] is None
    assert pop(http, queue)["messages"][0]["data"] == 3


def test_clear_of_unknown_queue_answers_404(http):
    answer = http.delete(f"/api/v1/queues/{unique_name()}/clear")

    assert answer.status_code == 404
    assert answer.json() == {"error": "Queue not found"}


@pytest.mark.parametrize("body", [{}, {"partition": "p"}, {"queue": 7}])
def test_internal_notify_needs_a_queue(http, body):
    answer = http.post("/internal/api/notify", json=body)

    assert answer.status_code == 400
    assert "error" in answer.json()


def test_the_dlq_action_sent_twice_leaves_one_dead_letter(http):
    """A resent request (a lost answer, a second click) listed and counted the message twice."""
    queue = unique_name()
    [pushed, _] = push(http, queue, ["a", "b"])

    for _ in range(2):
        answer = http.post(f"/api/v1/messages/{pushed['partition_id']}/t0/dlq", json={})
        assert answer.status_code == 200, answer.text

    listed = dead_letters(http, queue)
    assert listed["total"] == 1 and len(listed["messages"]) == 1
    assert pop(http, queue)["messages"][0]["data"] == "b"


def test_a_message_two_groups_dead_letter_counts_once_as_a_message(http):
    """messages.deadLetter of the overview and of /api/v1/status counted dead-letter rows
    (one per group) where every queue's totals count messages."""
    queue = unique_name()
    configure(http, queue, retryLimit=0)
    push(http, queue, ["a", "b"])
    overview_before = http.get("/api/v1/resources/overview").json()["messages"]["deadLetter"]

    for group in ("ga", "gb"):
        [message] = pop(http, queue, batch=1, consumerGroup=group,
                        subscriptionMode="all")["messages"]
        assert ack(http, message, status="failed", consumerGroup=group)["dlq"] is True

    overview = http.get("/api/v1/resources/overview").json()["messages"]["deadLetter"]
    status = http.get("/api/v1/status", params={"queue": queue}).json()
    totals = http.get(f"/api/v1/resources/queues/{queue}").json()["totals"]
    assert totals["deadLetter"] == 1
    assert status["messages"]["deadLetter"] == 1
    assert overview - overview_before == 1
    assert dead_letters(http, queue)["total"] == 2  # the listing: one entry per group
