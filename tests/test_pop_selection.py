"""Which partitions a pop claims (WIRE.md 2.3.3, 2.3.4, 7.1 row 17, 7.2, 8 rows 1, 11, 12).

Wildcard pops take the least recently served eligible partition first and never answer 204
while one exists; ``partitions=N`` claims up to N under one lease with ``batch`` as a global
cap; namespace/task pops span queues by priority. The pending-partition lookup that makes this
cheap is checked through its table, and the SQL-level ``pop_specific_batch`` honours
``lease_seconds``.
"""

from __future__ import annotations

import json
import uuid

import pytest

from tests.http_helpers import ack, configure, pop, pop_answer, push
from tests.support import pass_time, unique_name


def _lookup_rows(db, queue: str, group: str = "__QUEUE_MODE__") -> int:
    with db.cursor() as cursor:
        cursor.execute("""SELECT count(*) FROM queen.partition_pending pp
                            JOIN queen.queues q ON q.id = pp.queue_id
                           WHERE q.name = %s AND pp.consumer_group = %s""", (queue, group))
        return cursor.fetchone()[0]


# -- wildcard order ---------------------------------------------------------------------


def test_wildcard_pop_serves_never_served_partitions_before_served_ones(http):
    queue = unique_name()
    for name in ("a", "b", "c"):
        push(http, queue, [f"{name}1", f"{name}2"], partition=name, prefix=name)

    order = []
    for _ in range(4):
        message = pop(http, queue)["messages"][0]
        order.append(message["partition"])
        ack(http, message)

    assert sorted(order[:3]) == ["a", "b", "c"]
    assert order[3] == order[0]  # then the least recently served


def test_wildcard_pop_skips_a_leased_partition_for_an_eligible_one(http):
    queue = unique_name()
    push(http, queue, ["a1", "a2"], partition="a", prefix="a")
    push(http, queue, ["b1"], partition="b", prefix="b")
    held = pop(http, queue)["messages"][0]["partition"]

    other = pop(http, queue)

    assert other is not None
    assert other["messages"][0]["partition"] != held


def test_pop_skips_partitions_with_only_messages_not_yet_due(http, db):
    queue = unique_name()
    configure(http, queue, delayedProcessing=60)
    push(http, queue, ["due"], partition="early", prefix="e")
    pass_time(db, queue, 61)  # "early" is due; "late", pushed next, is a minute away
    push(http, queue, ["not-due"], partition="late", prefix="l")

    delivery = pop(http, queue, partitions=1, batch=10)

    assert [m["data"] for m in delivery["messages"]] == ["due"]
    assert delivery["partitionsClaimed"] == 1


# -- several partitions per pop ---------------------------------------------------------


def test_pop_claims_one_partition_by_default(http):
    queue = unique_name()
    push(http, queue, ["a"], partition="a", prefix="a")
    push(http, queue, ["b"], partition="b", prefix="b")

    delivery = pop(http, queue, batch=10)

    assert delivery["partitionsClaimed"] == 1
    assert len(delivery["messages"]) == 1


def test_multi_partition_pop_shares_one_lease_and_caps_the_total_at_batch(http):
    queue = unique_name()
    for name in ("a", "b", "c"):
        push(http, queue, [f"{name}1", f"{name}2"], partition=name, prefix=name)

    delivery = pop(http, queue, partitions=3, batch=4)

    messages = delivery["messages"]
    assert len(messages) == 4
    assert {m["leaseId"] for m in messages} == {delivery["leaseId"]}
    assert delivery["partitionsClaimed"] == len({m["partitionId"] for m in messages}) == 2
    per_partition = {}
    for m in messages:
        per_partition.setdefault(m["partition"], []).append(m["data"])
    for name, data in per_partition.items():
        assert data == [f"{name}1", f"{name}2"]  # each partition in its own order


def test_multi_partition_pop_drains_n_partitions(http):
    queue = unique_name()
    for name in ("a", "b", "c"):
        push(http, queue, [name], partition=name, prefix=name)

    delivery = pop(http, queue, partitions=3, batch=10)

    assert sorted(m["data"] for m in delivery["messages"]) == ["a", "b", "c"]
    assert delivery["partitionsClaimed"] == 3


def test_cross_partition_batch_ack_of_a_multi_partition_pop_frees_every_partition(http):
    queue = unique_name()
    for name in ("a", "b"):
        push(http, queue, [name], partition=name, prefix=name)
    delivery = pop(http, queue, partitions=2, batch=10)
    for name in ("a", "b"):
        push(http, queue, [name + "2"], partition=name, prefix=name + "2-")

    answer = http.post("/api/v1/ack/batch", json={"acknowledgments": [
        {"transactionId": m["transactionId"], "partitionId": m["partitionId"],
         "leaseId": m["leaseId"], "status": "completed"} for m in delivery["messages"]]})

    assert answer.status_code == 200
    assert all(r["success"] for r in answer.json())
    again = pop(http, queue, partitions=2, batch=10)
    assert sorted(m["data"] for m in again["messages"]) == ["a2", "b2"]


# -- namespace / task pops --------------------------------------------------------------


def _configure_ns(http, queue: str, namespace: str, task: str, priority: int = 0) -> None:
    answer = http.post("/api/v1/configure", json={
        "queue": queue, "namespace": namespace, "task": task, "options": {"priority": priority}})
    assert answer.status_code == 200, answer.text


def test_namespace_pop_takes_the_highest_priority_queue_first(http):
    namespace = unique_name("ns-")
    low, high = unique_name(), unique_name()
    _configure_ns(http, low, namespace, "t", priority=1)
    _configure_ns(http, high, namespace, "t", priority=9)
    push(http, low, ["low"], prefix="l")
    push(http, high, ["high"], prefix="h")

    first = http.get("/api/v1/pop", params={"namespace": namespace, "wait": "false"}).json()
    second = http.get("/api/v1/pop", params={"namespace": namespace, "wait": "false"}).json()

    assert [m["data"] for m in first["messages"]] == ["high"]
    assert first["messages"][0]["queue"] == high
    assert second["messages"][0]["queue"] == low


def test_task_pop_only_sees_queues_of_that_task(http):
    namespace = unique_name("ns-")
    mine, other = unique_name(), unique_name()
    _configure_ns(http, mine, namespace, "resize")
    _configure_ns(http, other, namespace, "encode")
    push(http, other, ["other"], prefix="o")
    push(http, mine, ["mine"], prefix="m")

    first = http.get("/api/v1/pop", params={"task": "resize", "namespace": namespace})
    second = http.get("/api/v1/pop", params={"task": "resize", "namespace": namespace})

    assert [m["data"] for m in first.json()["messages"]] == ["mine"]
    assert second.status_code == 204


def test_namespace_multi_partition_pop_spans_queues(http):
    namespace = unique_name("ns-")
    one, two = unique_name(), unique_name()
    _configure_ns(http, one, namespace, "t")
    _configure_ns(http, two, namespace, "t")
    push(http, one, ["1"], prefix="a")
    push(http, two, ["2"], prefix="b")

    delivery = http.get("/api/v1/pop", params={"namespace": namespace, "partitions": 2,
                                               "batch": 10}).json()

    assert sorted(m["queue"] for m in delivery["messages"]) == sorted([one, two])
    assert len({m["leaseId"] for m in delivery["messages"]}) == 1
    for message in delivery["messages"]:
        assert ack(http, message)["success"]


def test_namespace_pop_sees_queues_created_after_its_first_pop(http):
    namespace = unique_name("ns-")
    assert http.get("/api/v1/pop", params={"namespace": namespace}).status_code == 204
    late = unique_name()
    _configure_ns(http, late, namespace, "")
    push(http, late, ["late"])

    delivery = http.get("/api/v1/pop", params={"namespace": namespace}).json()

    assert delivery["messages"][0]["queue"] == late


@pytest.mark.parametrize("params", [{}, {"namespace": ""}, {"task": ""}])
def test_namespace_pop_without_namespace_or_task_is_refused(http, params):
    answer = http.get("/api/v1/pop", params=params)

    assert answer.status_code == 400
    assert answer.json() == {"error": "namespace or task is required"}


# -- the pending-partition lookup -------------------------------------------------------


def test_lookup_holds_only_partitions_with_pending_work(http, db):
    queue = unique_name()
    http.post("/api/v1/push", json={"items": [
        {"queue": queue, "partition": f"p{n}", "payload": n, "transactionId": f"t{n}"}
        for n in range(300)]}).raise_for_status()
    assert pop_answer(http, queue, partitions=300, batch=300, autoAck="true").status_code == 200
    assert _lookup_rows(db, queue) == 0

    for n in (7, 70, 170):
        push(http, queue, [f"again{n}"], partition=f"p{n}", prefix=f"again{n}-")

    assert _lookup_rows(db, queue) == 3
    delivery = pop(http, queue, partitions=10, batch=10, autoAck="true")
    assert sorted(m["data"] for m in delivery["messages"]) == ["again170", "again7", "again70"]
    assert _lookup_rows(db, queue) == 0


def test_lookup_keeps_a_leased_partition_until_its_messages_are_acked(http, db):
    queue = unique_name()
    push(http, queue, ["x"])
    message = pop(http, queue)["messages"][0]
    assert _lookup_rows(db, queue) == 1

    ack(http, message)

    assert _lookup_rows(db, queue) == 0


def test_every_named_group_gets_its_own_lookup_rows(http, db):
    queue = unique_name()
    push(http, queue, ["x"])
    assert pop(http, queue, consumerGroup="g1", autoAck="true") is not None
    assert pop_answer(http, queue, consumerGroup="g2").status_code == 200

    push(http, queue, ["y"], prefix="y")

    assert _lookup_rows(db, queue, "g1") == 1
    assert _lookup_rows(db, queue, "g2") == 1


# -- SQL-level pop ----------------------------------------------------------------------


def test_sql_pop_specific_batch_sets_the_lease_length_from_lease_seconds(http, db):
    queue = unique_name()
    push(http, queue, ["x"])
    with db.cursor() as cursor:
        cursor.execute("SELECT queen.pop_specific_batch(%s::jsonb)", (json.dumps([{
            "idx": 0, "queue_name": queue, "partition_name": "Default",
            "consumer_group": "__QUEUE_MODE__", "lease_seconds": 7, "worker_id": "w",
            "batch_size": 1, "sub_mode": None, "sub_from": None}]),))
        [answer] = cursor.fetchone()[0]
        cursor.execute("""SELECT extract(epoch FROM lease_expires_at - now()), worker_id
                            FROM queen.partition_consumers
                           WHERE partition_id = %s AND consumer_group = '__QUEUE_MODE__'""",
                       (answer["result"]["partitionId"],))
        remaining, worker = cursor.fetchone()

    result = answer["result"]
    assert result["success"] is True
    assert [m["data"] for m in result["messages"]] == ["x"]
    uuid.UUID(result["leaseId"])
    assert 5 <= remaining <= 7
    assert worker == "w"



# -- concurrency ------------------------------------------------------------------------


def test_empty_scan_bookkeeping_never_waits_for_another_transaction(http, pg_dsn):
    """Fused pop batches note empty scans of many queues in request order; two batches in
    opposite orders must not wait on each other (the bench once found them deadlocking)."""
    import psycopg2

    first, second = unique_name(), unique_name()
    for queue in (first, second):
        configure(http, queue)
    a, b = psycopg2.connect(pg_dsn), psycopg2.connect(pg_dsn)
    try:
        with a.cursor() as ca, b.cursor() as cb:
            ca.execute("SET statement_timeout = '2s'")
            cb.execute("SET statement_timeout = '2s'")
            ca.execute("SELECT queen.note_empty_scan(%s, 'g')", (first,))
            cb.execute("SELECT queen.note_empty_scan(%s, 'g')", (second,))

            ca.execute("SELECT queen.note_empty_scan(%s, 'g')", (second,))  # must not block
            cb.execute("SELECT queen.note_empty_scan(%s, 'g')", (first,))
        a.commit()
        b.commit()
    finally:
        a.close()
        b.close()
