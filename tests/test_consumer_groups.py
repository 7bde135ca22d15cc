"""The consumer-group routes (WIRE.md 3.5, 7.1 row 21, 7.2 consumer_watermarks).

List, lag, detail, delete (with and without metadata, everywhere or for one queue),
subscription timestamp, seeks, and the statistics refresh; plus the watermark rows the JS
harness reads and manipulates directly.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from urllib.parse import quote

import pytest

from tests.http_helpers import ack, configure, pop, pop_answer, push
from tests.support import db_clock_iso, pass_time, unique_name, wait_until


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _consume_all(http, queue: str, group: str) -> list:
    seen = []
    for _ in range(50):
        delivery = pop(http, queue, consumerGroup=group, batch=100)
        if delivery is None:
            return seen
        for message in delivery["messages"]:
            seen.append(message["data"])
            assert ack(http, message, consumerGroup=group)["success"]
    raise AssertionError("never ran dry")


def _watermarks(db, queue: str, group: str) -> int:
    with db.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM queen.consumer_watermarks "
                       "WHERE queue_name = %s AND consumer_group = %s", (queue, group))
        return cursor.fetchone()[0]


# -- reads ------------------------------------------------------------------------------


def test_list_has_one_row_per_group_and_queue_including_queue_mode(http):
    queue = unique_name()
    push(http, queue, ["x"])
    _consume_all(http, queue, "__QUEUE_MODE__")
    _consume_all(http, queue, "billing")

    answer = http.get("/api/v1/consumer-groups")

    assert answer.status_code == 200
    rows = {row["name"]: row for row in answer.json() if row["queueName"] == queue}
    assert set(rows) == {"__QUEUE_MODE__", "billing"}
    billing = rows["billing"]
    assert billing["topics"] == [queue]
    assert billing["state"] == "Stable"
    assert billing["partitionsWithLag"] == 0
    assert billing["totalLag"] is None
    assert billing["subscriptionMode"] == "all"
    assert billing["subscriptionTimestamp"] is None
    for key in ("members", "maxTimeLag", "subscriptionCreatedAt"):
        assert key in billing


def test_list_reports_partitions_with_lag_and_new_subscriptions(http):
    queue = unique_name()
    configure(http, queue)
    assert pop_answer(http, queue, consumerGroup="late", subscriptionMode="new").status_code == 204
    push(http, queue, ["a"], partition="p1", prefix="a")
    push(http, queue, ["b"], partition="p2", prefix="b")

    rows = [r for r in http.get("/api/v1/consumer-groups").json()
            if r["queueName"] == queue and r["name"] == "late"]

    assert len(rows) == 1
    assert rows[0]["partitionsWithLag"] == 2
    assert rows[0]["subscriptionMode"] == "new"
    assert rows[0]["subscriptionTimestamp"] is not None
    assert rows[0]["state"] == "Dead"  # never consumed


def test_lagging_lists_partitions_whose_oldest_message_is_old_enough(http, db):
    queue = unique_name()
    push(http, queue, ["old"])
    assert pop_answer(http, queue, consumerGroup="slow", subscriptionMode="all",
                      autoAck="false").status_code == 200
    pass_time(db, queue, 2)  # the message is 2 s old now, past minLagSeconds=1

    lagging = http.get("/api/v1/consumer-groups/lagging", params={"minLagSeconds": 1}).json()
    strict = http.get("/api/v1/consumer-groups/lagging", params={"minLagSeconds": 3600}).json()

    mine = [row for row in lagging
            if row["queue_name"] == queue and row["consumer_group"] == "slow"]
    assert len(mine) == 1
    assert mine[0]["partition_name"] == "Default"
    assert mine[0]["offset_lag"] == 1
    assert mine[0]["time_lag_seconds"] >= 1
    assert not [row for row in strict if row["queue_name"] == queue]


def test_detail_lists_the_groups_partitions_per_queue(http):
    queue = unique_name()
    push(http, queue, ["a", "b"], partition="p1")
    message = pop(http, queue, consumerGroup="detail-g")["messages"][0]
    ack(http, message, consumerGroup="detail-g")

    detail = http.get(f"/api/v1/consumer-groups/{quote('detail-g')}").json()

    [partition] = detail[queue]["partitions"]
    assert partition["partition"] == "p1"
    assert partition["totalConsumed"] == 1
    assert partition["offsetLag"] == 1
    assert partition["leaseActive"] is False
    assert partition["lastConsumedAt"] is not None


def test_detail_of_unknown_group_is_an_empty_object(http):
    assert http.get(f"/api/v1/consumer-groups/{unique_name()}").json() == {}


# -- delete -----------------------------------------------------------------------------


def test_deleted_group_consumes_again_from_its_subscription_point(http):
    queue = unique_name()
    push(http, queue, [1, 2])
    assert _consume_all(http, queue, "again") == [1, 2]

    answer = http.delete("/api/v1/consumer-groups/again", params={"deleteMetadata": "true"})

    assert answer.status_code == 200
    body = answer.json()
    assert body["success"] is True and body["consumerGroup"] == "again"
    assert body["deletedPartitions"] >= 1 and body["metadataDeleted"] is True
    assert _consume_all(http, queue, "again") == [1, 2]


def test_group_recreated_with_mode_new_starts_at_now_again(http):
    queue = unique_name()
    push(http, queue, ["h1"], prefix="h1-")
    assert pop_answer(http, queue, consumerGroup="renew", subscriptionMode="new").status_code == 204
    push(http, queue, ["between"], prefix="b")
    http.delete("/api/v1/consumer-groups/renew").raise_for_status()

    first = pop_answer(http, queue, consumerGroup="renew", subscriptionMode="new")
    push(http, queue, ["after"], prefix="a")

    assert first.status_code == 204
    assert _consume_all(http, queue, "renew") == ["after"]


def test_delete_keeping_metadata_restarts_at_the_recorded_subscription(http):
    queue = unique_name()
    push(http, queue, ["before"], prefix="b")
    assert pop_answer(http, queue, consumerGroup="keep", subscriptionMode="new").status_code == 204
    push(http, queue, ["after"], prefix="a")
    assert _consume_all(http, queue, "keep") == ["after"]

    http.delete("/api/v1/consumer-groups/keep",
                params={"deleteMetadata": "false"}).raise_for_status()

    assert _consume_all(http, queue, "keep", ) == ["after"]


def test_delete_for_one_queue_leaves_the_group_on_other_queues(http):
    queue, other = unique_name(), unique_name()
    for name in (queue, other):
        push(http, name, [name])
        assert _consume_all(http, name, "per-queue") == [name]

    answer = http.delete(f"/api/v1/consumer-groups/per-queue/queues/{queue}")

    assert answer.json()["queueName"] == queue
    assert _consume_all(http, queue, "per-queue") == [queue]
    assert _consume_all(http, other, "per-queue") == []


def test_delete_releases_the_groups_leases(http):
    queue = unique_name()
    push(http, queue, ["held"])
    assert pop(http, queue, consumerGroup="leaser") is not None
    assert pop_answer(http, queue, consumerGroup="leaser").status_code == 204

    http.delete("/api/v1/consumer-groups/leaser").raise_for_status()

    assert pop(http, queue, consumerGroup="leaser")["messages"][0]["data"] == "held"


def test_delete_removes_the_groups_watermark_rows(http, db):
    queue = unique_name()
    push(http, queue, ["x"])
    _consume_all(http, queue, "wm")
    assert _watermarks(db, queue, "wm") == 1

    http.delete("/api/v1/consumer-groups/wm").raise_for_status()

    assert _watermarks(db, queue, "wm") == 0


def test_a_future_watermark_row_never_hides_messages(http, db):
    queue = unique_name()
    push(http, queue, ["first"], prefix="f")
    _consume_all(http, queue, "wm2")
    with db.cursor() as cursor:
        cursor.execute("UPDATE queen.consumer_watermarks SET last_empty_scan_at = now() + "
                       "interval '10 minutes' WHERE queue_name = %s", (queue,))
    push(http, queue, ["second"], prefix="s")

    assert _consume_all(http, queue, "wm2") == ["second"]


# -- subscription timestamp -------------------------------------------------------------


def test_subscription_timestamp_update_moves_the_start_of_partitions_without_cursor(http, db):
    queue = unique_name()
    push(http, queue, ["old"], partition="p1", prefix="o")
    assert pop_answer(http, queue, consumerGroup="ts", subscriptionMode="new").status_code == 204
    _consume_all(http, queue, "wm-seed")  # another group, so a watermark exists somewhere
    cut = _iso(datetime.now(UTC) - timedelta(hours=1))

    answer = http.post("/api/v1/consumer-groups/ts/subscription",
                       json={"subscriptionTimestamp": cut})

    body = answer.json()
    assert answer.status_code == 200
    assert body["success"] is True and body["consumerGroup"] == "ts"
    assert body["rowsUpdated"] == 1
    assert body["newTimestamp"].startswith(cut[:19])
    assert _consume_all(http, queue, "ts") == ["old"]
    assert _watermarks(db, queue, "ts") == 1  # recreated by the empty pop after draining


@pytest.mark.parametrize("body", [{}, {"subscriptionTimestamp": ""}])
def test_subscription_update_without_timestamp_is_refused(http, body):
    answer = http.post("/api/v1/consumer-groups/g/subscription", json=body)

    assert answer.status_code == 400
    assert answer.json() == {"error": "Missing subscriptionTimestamp in request body"}


def test_subscription_update_with_a_bad_timestamp_is_refused(http):
    answer = http.post("/api/v1/consumer-groups/g/subscription",
                       json={"subscriptionTimestamp": "yesterday-ish"})

    assert answer.status_code == 400
    assert "error" in answer.json()


# -- seek -------------------------------------------------------------------------------


def test_seek_to_end_skips_everything_pending(http):
    queue = unique_name()
    push(http, queue, [1, 2, 3])
    assert pop(http, queue, consumerGroup="seeker") is not None  # a cursor and a lease exist

    answer = http.post(f"/api/v1/consumer-groups/seeker/queues/{queue}/seek", json={"toEnd": True})

    body = answer.json()
    assert body == {"success": True, "consumerGroup": "seeker", "queueName": queue,
                    "seekToEnd": True, "targetTimestamp": None, "partitionsUpdated": 1}
    assert pop_answer(http, queue, consumerGroup="seeker").status_code == 204
    push(http, queue, [4], prefix="later")
    assert _consume_all(http, queue, "seeker") == [4]


def test_seek_backwards_to_a_timestamp_allows_reconsumption(http, db):
    queue = unique_name()
    push(http, queue, ["a"], prefix="a")
    cut = db_clock_iso(db)  # after "a" was stored, before "b" and "c" are
    push(http, queue, ["b", "c"], prefix="b")
    assert _consume_all(http, queue, "rewind") == ["a", "b", "c"]
    assert _watermarks(db, queue, "rewind") == 1

    answer = http.post(f"/api/v1/consumer-groups/rewind/queues/{queue}/seek",
                       json={"timestamp": cut})

    assert answer.json()["partitionsUpdated"] == 1
    assert answer.json()["seekToEnd"] is False
    assert _watermarks(db, queue, "rewind") == 0
    assert _consume_all(http, queue, "rewind") == ["b", "c"]


def test_seek_to_a_time_before_every_message_starts_over(http):
    queue = unique_name()
    push(http, queue, [1, 2])
    _consume_all(http, queue, "start")

    http.post(f"/api/v1/consumer-groups/start/queues/{queue}/seek",
              json={"timestamp": "2000-01-01T00:00:00.000Z"}).raise_for_status()

    assert _consume_all(http, queue, "start") == [1, 2]


@pytest.mark.parametrize("body", [{}, {"toEnd": False}])
def test_seek_without_target_is_refused(http, body):
    answer = http.post("/api/v1/consumer-groups/g/queues/q/seek", json=body)

    assert answer.status_code == 400
    assert answer.json() == {"error": "Must specify either 'toEnd': true or 'timestamp'"}


def test_seek_on_unknown_queue_answers_404(http):
    answer = http.post(f"/api/v1/consumer-groups/g/queues/{unique_name()}/seek",
                       json={"toEnd": True})

    assert answer.status_code == 404
    assert answer.json() == {"error": "Queue not found"}


def test_partition_seek_moves_one_partition_to_its_newest_message(http):
    queue = unique_name()
    [_, last] = push(http, queue, [1, 2], partition="p1", prefix="p1-")
    push(http, queue, [3], partition="p2", prefix="p2-")

    answer = http.post(f"/api/v1/consumer-groups/ps/queues/{queue}/partitions/p1/seek")

    body = answer.json()
    assert answer.status_code == 200
    assert body["updated"] is True and body["partitionName"] == "p1"
    assert body["cursorMovedTo"] == last["message_id"]
    assert _consume_all(http, queue, "ps") == [3]


def test_partition_seek_on_unknown_partition_answers_404(http):
    queue = unique_name()
    push(http, queue, [1])

    answer = http.post(f"/api/v1/consumer-groups/g/queues/{queue}/partitions/nope/seek")

    assert answer.status_code == 404
    assert answer.json() == {"error": "Partition not found"}


# -- statistics -------------------------------------------------------------------------


def test_stats_refresh_without_body_answers_a_summary(http):
    answer = http.post("/api/v1/stats/refresh")

    assert answer.status_code == 200
    body = answer.json()
    assert body["success"] is True
    assert isinstance(body["queues"], int)


@pytest.mark.parametrize("first_contact", ["ack", "operator_dlq"])
def test_a_new_group_touching_a_partition_without_popping_it_skips_its_history(
        http, first_contact):
    """A `new` group's first row in a partition, made by an ack or by the operator's DLQ route
    rather than by a pop, starts at the group's subscription like a pop's would (2.3.6):
    it started at the beginning, so the group was handed the partition's history."""
    queue = unique_name()
    configure(http, queue)
    push(http, queue, ["h0", "h1", "h2"], partition="P", prefix="h")
    group = unique_name("g-")
    assert pop_answer(http, queue, consumerGroup=group, subscriptionMode="new").status_code == 204
    listing = http.get("/api/v1/messages", params={"queue": queue}).json()["messages"]
    partition_id = listing[0]["partitionId"]
    if first_contact == "ack":
        answer = http.post("/api/v1/ack", json={
            "transactionId": "h1", "partitionId": partition_id, "status": "failed",
            "consumerGroup": group})
    else:
        answer = http.post(f"/api/v1/messages/{partition_id}/h1/dlq",
                           json={"consumerGroup": group})
    assert answer.status_code == 200, answer.text
    push(http, queue, ["n0"], partition="P", prefix="n")
    assert _consume_all(http, queue, group) == ["n0"]


def test_an_ack_that_applies_nothing_leaves_no_trace_of_a_deleted_group(http, db):
    """A late ack under the lease of a group deleted meanwhile fails (WIRE.md 2.4: "changes
    nothing"). It used to leave a cursor row at the beginning: the group was listed again, and
    its next first contact as `new` was handed the partition's history."""
    queue = unique_name()
    group = unique_name("g-")
    configure(http, queue)
    push(http, queue, ["h0"])
    [held] = pop(http, queue, consumerGroup=group)["messages"]
    http.delete(f"/api/v1/consumer-groups/{group}",
                params={"deleteMetadata": "true"}).raise_for_status()

    late = ack(http, held, consumerGroup=group)
    unknown = http.post("/api/v1/ack", json={
        "transactionId": "no-such", "partitionId": held["partitionId"], "status": "failed",
        "consumerGroup": group}).json()[0]

    assert late["success"] is False and unknown["success"] is False
    with db.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM queen.partition_consumers "
                       "WHERE consumer_group = %s", (group,))
        assert cursor.fetchone()[0] == 0
    assert pop_answer(http, queue, consumerGroup=group, subscriptionMode="new").status_code == 204
    push(http, queue, ["n0"], prefix="n")
    assert _consume_all(http, queue, group) == ["n0"]


def _waiting_for_locks(db, kind: str) -> int:
    with db.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_locks WHERE NOT granted AND locktype = %s",
                       (kind,))
        return cursor.fetchone()[0]


def test_a_group_delete_waits_for_a_pop_claiming_a_partition_and_removes_its_lease(
        http, db, holder):
    """A pop making the group's first row in a partition, and a delete of the group running
    meanwhile: the delete did not see the uncommitted row, and the pop committed it with a
    lease, for a group deleted (WIRE.md 3.5: its cursors and leases are dropped). The first
    claim now holds the queue's lookup lock shared, so the delete waits for the pop."""
    from concurrent.futures import ThreadPoolExecutor

    queue, group = unique_name(), unique_name("g-")
    push(http, queue, ["a0"], partition="A", prefix="a")
    assert _consume_all(http, queue, group) == ["a0"]
    push(http, queue, ["b0"], partition="B", prefix="b")
    with holder.cursor() as cursor:  # the pop's insert of (B, group) waits on this row
        cursor.execute("SELECT p.id FROM queen.partitions p JOIN queen.queues q "
                       "ON q.id = p.queue_id WHERE q.name = %s AND p.name = 'B' "
                       "FOR UPDATE OF p", (queue,))
    with ThreadPoolExecutor(2) as pool:
        popped = pool.submit(pop_answer, http, queue, consumerGroup=group)
        wait_until(lambda: _waiting_for_locks(db, "transactionid"), message="the pop waiting")
        deleted = pool.submit(http.delete, f"/api/v1/consumer-groups/{group}",
                              params={"deleteMetadata": "true"})
        wait_until(lambda: deleted.done() or _waiting_for_locks(db, "advisory"),
                   message="the delete waiting or done")
        holder.rollback()
        assert popped.result(timeout=30).status_code == 200
        assert deleted.result(timeout=30).status_code == 200

    with db.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM queen.partition_consumers "
                       "WHERE consumer_group = %s", (group,))
        assert cursor.fetchone()[0] == 0
    assert pop_answer(http, queue, consumerGroup=group, subscriptionMode="new").status_code == 204
    push(http, queue, ["b1"], partition="B", prefix="c")
    assert _consume_all(http, queue, group) == ["b1"]


def test_a_change_of_another_group_does_not_make_a_first_claim_skip(http, holder):
    """The first claim of a partition only skips while a change of its own group (delete,
    seek) holds the group's claim lock; another group's change (which takes every queue's
    lookup lock when it names no queue) left a pop of this group answering 204."""
    queue, group = unique_name(), unique_name("g-")
    push(http, queue, ["a0"], partition="A", prefix="a")
    assert _consume_all(http, queue, group) == ["a0"]
    push(http, queue, ["b0"], partition="B", prefix="b")  # a partition it never popped
    with holder.cursor() as cursor:  # what another group's delete of every queue holds
        cursor.execute("SELECT queen.lock_lookups(ARRAY(SELECT id FROM queen.queues "
                       "WHERE name = %s)), queen.lock_group_claims(ARRAY(SELECT id FROM "
                       "queen.queues WHERE name = %s), 'another-group')", (queue, queue))

    delivery = pop(http, queue, consumerGroup=group)

    assert delivery is not None and [m["data"] for m in delivery["messages"]] == ["b0"]


def _group_lag_on_status_page(http, queue: str, group: str) -> dict:
    """offsetLag of ``group`` per partition on GET /api/v1/status/queues/{queue}."""
    page = http.get(f"/api/v1/status/queues/{quote(queue, safe='')}").json()
    return {p["name"]: g["offsetLag"] for p in page["partitions"]
            for g in p["consumerGroups"] if g["name"] == group}


def test_a_partition_the_group_has_not_popped_yet_shows_its_lag_per_group(http):
    """The per-group detail and the status page listed only partitions where the group had a
    cursor: messages a pop would hand it on a new partition showed no lag there."""
    queue = unique_name()
    push(http, queue, ["a"], partition="p1", prefix="a")
    for message in pop(http, queue, "p1", consumerGroup="g", subscriptionMode="all")["messages"]:
        ack(http, message, consumerGroup="g")
    push(http, queue, ["b", "c", "d"], partition="p2", prefix="b")

    detail = http.get("/api/v1/consumer-groups/g").json()[queue]["partitions"]
    on_status = _group_lag_on_status_page(http, queue, "g")
    delivered = pop(http, queue, consumerGroup="g", batch=100)["messages"]

    assert {p["partition"]: p["offsetLag"] for p in detail} == {"p1": 0, "p2": 3}
    p2 = next(p for p in detail if p["partition"] == "p2")
    assert p2["totalConsumed"] == 0 and p2["leaseActive"] is False and p2["workerId"] is None
    assert on_status == {"p1": 0, "p2": 3}
    assert len(delivered) == 3


def test_a_subscribed_group_that_never_popped_is_no_unknown_group(http):
    queue = unique_name()
    configure(http, queue)
    assert pop(http, queue, consumerGroup="fresh", subscriptionMode="new") is None
    push(http, queue, [1, 2, 3])

    detail = http.get("/api/v1/consumer-groups/fresh").json()

    assert [p["offsetLag"] for p in detail[queue]["partitions"]] == [3]
    assert _group_lag_on_status_page(http, queue, "fresh") == {"Default": 3}
