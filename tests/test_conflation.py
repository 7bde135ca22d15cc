"""Conflation (WIRE2 8.4): a named group whose policy, fixed at its first contact, is
last-value delivery gets only the newest visible message of each partition, under a lease
covering everything since its cursor; the ack of that message retires the span. Raw HTTP and
the real 2.6.0 client.
"""

from __future__ import annotations

import threading
from typing import Any, Dict, List

from tests.client26 import run26
from tests.http_helpers import ack, configure, dead_letters, pop, pop_answer, push
from tests.support import count_messages, expire_leases, pass_time, unique_name

GROUP = "last-value"


def conflating_pop(http, queue: str, **params: Any) -> Dict[str, Any]:
    """A conflating pop's 200 body (a conflating pop never answers 204)."""
    answer = pop_answer(http, queue, consumerGroup=GROUP, conflation="true", **params)
    assert answer.status_code == 200, answer.text
    return answer.json()


def data_of(delivery: Dict[str, Any]) -> List[Any]:
    return [message["data"] for message in delivery["messages"]]


def test_only_the_newest_message_of_each_partition_is_delivered(http):
    queue = unique_name()
    push(http, queue, [{"p": "a", "n": n} for n in range(5)], partition="a")
    push(http, queue, [{"p": "b", "n": n} for n in range(3)], partition="b")

    delivery = conflating_pop(http, queue, batch="10")

    assert sorted(data_of(delivery), key=lambda d: d["p"]) == [{"p": "a", "n": 4},
                                                              {"p": "b", "n": 2}]
    assert delivery["conflation"] is True
    assert "conflationConflict" not in delivery
    assert delivery["partitionsClaimed"] == 2


def test_acking_the_newest_retires_everything_behind_it(http, db):
    queue = unique_name()
    push(http, queue, list(range(6)))
    [newest] = conflating_pop(http, queue)["messages"]

    result = ack(http, newest, consumerGroup=GROUP)

    assert result["success"] is True and result["leaseReleased"] is True
    assert conflating_pop(http, queue) == {"success": True, "messages": [],
                                           "conflation": True}
    assert count_messages(db, queue) == 6  # acks move the cursor, they delete nothing


def test_a_message_pushed_during_a_delivery_is_delivered_after_its_ack(http):
    queue = unique_name()
    push(http, queue, ["old", "older"], prefix="a")
    [first] = conflating_pop(http, queue)["messages"]
    push(http, queue, ["late"], prefix="b")
    assert conflating_pop(http, queue)["messages"] == []  # the partition is leased

    ack(http, first, consumerGroup=GROUP)

    assert data_of(conflating_pop(http, queue)) == ["late"]


def test_an_expired_delivery_comes_back_as_the_newest_message_then(http, db):
    queue = unique_name()
    push(http, queue, [1, 2], prefix="a")
    conflating_pop(http, queue)
    push(http, queue, [3], prefix="b")

    expire_leases(db, queue)

    assert data_of(conflating_pop(http, queue)) == [3]


def test_failures_use_the_retry_budget_then_the_newest_goes_to_the_dlq(http):
    queue = unique_name()
    configure(http, queue, retryLimit=1, retryDelay=0)
    push(http, queue, ["stale", "newest"])

    [first] = conflating_pop(http, queue)["messages"]
    assert ack(http, first, "failed", consumerGroup=GROUP, error="boom")["dlq"] is False
    [again] = conflating_pop(http, queue)["messages"]
    assert again["data"] == "newest" and again["retryCount"] == 1
    assert ack(http, again, "failed", consumerGroup=GROUP, error="boom")["dlq"] is True

    assert [entry["data"] for entry in dead_letters(http, queue)["messages"]] == ["newest"]
    assert conflating_pop(http, queue)["messages"] == []


def test_the_newest_visible_message_is_the_one_delayed_processing_lets_through(http, db):
    queue = unique_name()
    configure(http, queue, delayedProcessing=60)
    push(http, queue, ["a", "b"], prefix="old")
    pass_time(db, queue, 120)
    push(http, queue, ["c"], prefix="new")

    [visible] = conflating_pop(http, queue)["messages"]
    assert visible["data"] == "b"
    ack(http, visible, consumerGroup=GROUP)

    assert conflating_pop(http, queue)["messages"] == []  # "c" is not due yet


def test_a_namespace_pop_conflates_each_queue_of_a_conflating_group(http):
    namespace = unique_name("ns-")
    queues = [unique_name(), unique_name()]
    for queue in queues:
        answer = http.post("/api/v1/configure", json={"queue": queue, "namespace": namespace})
        assert answer.status_code == 200, answer.text
        push(http, queue, [f"{queue}-{n}" for n in range(3)])

    answer = http.get("/api/v1/pop", params={
        "namespace": namespace, "consumerGroup": GROUP, "conflation": "true",
        "batch": "10", "wait": "false"})

    assert answer.status_code == 200, answer.text
    assert sorted(data_of(answer.json())) == sorted(f"{queue}-2" for queue in queues)
    assert answer.json()["conflation"] is True


def test_a_long_poll_is_woken_by_a_push_and_delivers_the_newest(http):
    queue = unique_name()
    push(http, queue, ["first"], prefix="a")
    [first] = conflating_pop(http, queue)["messages"]
    ack(http, first, consumerGroup=GROUP)

    later = {"items": [{"queue": queue, "payload": n, "transactionId": f"b{n}"}
                       for n in range(3)]}
    timer = threading.Timer(0.5, lambda: http.post("/api/v1/push", json=later))
    timer.start()  # the push comes while the pop waits
    try:
        delivery = conflating_pop(http, queue, wait="true", timeout="20000")
    finally:
        timer.join()

    assert len(delivery["messages"]) == 1
    assert delivery["messages"][0]["data"] in (0, 1, 2)


def test_an_empty_long_poll_answers_200_with_the_policy_at_its_timeout(http):
    queue = unique_name()
    configure(http, queue)

    delivery = conflating_pop(http, queue, wait="true", timeout="300")

    assert delivery == {"success": True, "messages": [], "conflation": True}


def test_the_policy_is_fixed_at_first_contact_and_the_stored_one_wins(http):
    queue = unique_name()
    push(http, queue, ["a", "b", "c"])
    plain = pop(http, queue, consumerGroup=GROUP, batch="1")  # first contact: no conflation
    ack(http, plain["messages"][0], consumerGroup=GROUP)

    asked = conflating_pop(http, queue, batch="5")

    assert data_of(asked) == ["b", "c"]
    assert asked["conflationConflict"] is True and "conflation" not in asked


def test_a_conflating_group_conflates_requests_that_do_not_ask(http):
    queue = unique_name()
    push(http, queue, ["a"], prefix="x")
    [first] = conflating_pop(http, queue)["messages"]
    ack(http, first, consumerGroup=GROUP)
    push(http, queue, ["b", "c"], prefix="y")

    plain = pop(http, queue, consumerGroup=GROUP, batch="10")

    assert data_of(plain) == ["c"]
    assert plain["conflation"] is True and plain["conflationConflict"] is True


def test_plain_pops_of_other_groups_are_untouched(http):
    queue = unique_name()
    push(http, queue, ["a", "b"])
    conflating_pop(http, queue)

    delivery = pop(http, queue, consumerGroup="other", batch="10")

    assert data_of(delivery) == ["a", "b"]
    assert "conflation" not in delivery and "conflationConflict" not in delivery
    assert pop_answer(http, queue, consumerGroup="other").status_code == 204


def test_conflation_in_queue_mode_is_a_400(http):
    answer = pop_answer(http, unique_name(), conflation="true")

    assert answer.status_code == 400
    assert "consumerGroup" in answer.json()["error"]


def test_conflation_with_auto_ack_is_a_400(http):
    answer = pop_answer(http, unique_name(), conflation="true", consumerGroup=GROUP,
                        autoAck="true")

    assert answer.status_code == 400
    assert "autoAck" in answer.json()["error"]


def test_absent_partitions_default_to_the_batch_up_to_64(http):
    queue = unique_name()
    answer = http.post("/api/v1/push", json={"items": [
        {"queue": queue, "partition": f"p{p}", "payload": p} for p in range(70)]})
    assert answer.status_code == 201

    assert conflating_pop(http, queue, batch="3")["partitionsClaimed"] == 3
    assert conflating_pop(http, queue, batch="100")["partitionsClaimed"] == 64


def test_the_single_partition_route_conflates_too(http):
    queue = unique_name()
    push(http, queue, [1, 2, 3], partition="only")

    answer = http.get(f"/api/v1/pop/queue/{queue}/partition/only",
                      params={"wait": "false", "consumerGroup": GROUP, "conflation": "true",
                              "batch": "10"})

    assert answer.status_code == 200
    assert data_of(answer.json()) == [3]


# -- the official 2.6.0 client ----------------------------------------------------------

BURSTS = """
import asyncio
import time

async def scenario(client, args):
    name = args["queue"]
    await client.queue(name).create()
    runs = []
    last_push = {}

    async def handler(messages):
        for message in messages:
            runs.append({"partition": message["partition"], "n": message["data"]["n"],
                         "started": time.time()})
        await asyncio.sleep(0.05)

    async def producer():
        for n in range(40):
            for partition in ("a", "b"):
                await client.queue(name).partition(partition).push([{"data": {"n": n}}])
                last_push[partition] = time.time()
            await asyncio.sleep(0.01)

    consumer = asyncio.ensure_future(
        client.queue(name).group("lv").conflation().wait(True).timeout_millis(1000)
              .idle_millis(3000).consume(handler))
    await producer()
    await consumer
    return {"runs": runs, "last_push": last_push}
"""


def test_client26_consumer_under_bursts_sees_fewer_runs_and_always_the_last_message(server):
    seen = run26(server.url, BURSTS, queue=unique_name(), timeout_s=120)

    runs = seen["runs"]
    for partition in ("a", "b"):
        mine = [run for run in runs if run["partition"] == partition]
        assert mine[-1]["n"] == 39  # the last push is always handled
        assert any(run["started"] >= seen["last_push"][partition] for run in mine)
        ns = [run["n"] for run in mine]
        assert ns == sorted(set(ns))  # never an older value after a newer one
    assert len(runs) < 80  # conflated: not one run per message


EDGES = """
async def scenario(client, args):
    name = args["queue"]
    await client.queue(name).create()
    empty = await client.queue(name).group("lv").conflation().wait(False).pop()
    await client.queue(name).push([{"data": n} for n in range(4)])
    newest = await client.queue(name).group("lv").conflation().wait(False).pop()
    try:
        await client.queue(name).conflation().wait(False).pop()
        queue_mode = "no error"
    except Exception as error:
        queue_mode = {"status": getattr(getattr(error, "response", None), "status_code", None),
                      "message": str(error)}
    return {"empty": empty, "newest": [m["data"] for m in newest], "queue_mode": queue_mode}
"""


def test_client26_pop_reads_the_empty_answer_and_raises_on_the_queue_mode_400(server):
    seen = run26(server.url, EDGES, queue=unique_name())

    assert seen["empty"] == []
    assert seen["newest"] == [3]
    assert seen["queue_mode"]["status"] == 400
    assert "consumerGroup" in seen["queue_mode"]["message"]


def test_an_empty_pop_forgets_the_policy_of_a_deleted_queue(http):
    """The server remembers each group's stored policy from its pops, for empty answers. A
    pop on a deleted queue reads no policy, and its empty answer still claimed the old one
    (200, conflation: true) where a plain pop answers a bodiless 204 (WIRE2 8.2)."""
    queue = unique_name()
    push(http, queue, ["a"])
    assert conflating_pop(http, queue)["conflation"] is True
    assert http.delete(f"/api/v1/resources/queues/{queue}").status_code == 200

    assert pop_answer(http, queue, consumerGroup=GROUP).status_code == 204
