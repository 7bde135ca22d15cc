"""Queue depth (WIRE2 10): ``GET /api/v1/resources/queues/{queue}/depth[?group=]`` reports the
messages after a group's cursor per partition (or the worst of the queue's groups), with a
conflating group's work depth; raw HTTP and the 2.6.0 client's ``Admin.get_queue_depth``.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from tests.client26 import run26
from tests.http_helpers import ack, configure, pop, pop_answer, push
from tests.support import unique_name


def depth(http, queue: str, group: Optional[str] = None) -> Dict[str, Any]:
    params = {"group": group} if group else {}
    answer = http.get(f"/api/v1/resources/queues/{queue}/depth", params=params)
    assert answer.status_code == 200, answer.text
    return answer.json()


def pending_by_partition(report: Dict[str, Any]) -> Dict[str, int]:
    return {entry["partition"]: entry["pending"] for entry in report["partitions"]}


def test_a_group_s_depth_counts_the_messages_after_its_cursor(http):
    queue = unique_name()
    push(http, queue, list(range(4)), partition="a")
    push(http, queue, list(range(2)), partition="b")
    delivery = pop(http, queue, "a", consumerGroup="g", batch="3")
    for message in delivery["messages"][:2]:
        ack(http, message, consumerGroup="g")

    report = depth(http, queue, "g")

    assert pending_by_partition(report) == {"a": 2, "b": 2}
    assert report["pending"] == 4 and report["effectivePending"] == 4
    assert report["partitionsPending"] == 2
    assert report["queue"] == queue and report["group"] == "g"
    assert report["conflation"] is False


def test_without_a_group_each_partition_reports_its_worst_group(http):
    queue = unique_name()
    push(http, queue, list(range(3)), partition="a")
    push(http, queue, list(range(3)), partition="b")
    fast = pop(http, queue, "a", consumerGroup="fast", batch="3")
    for message in fast["messages"]:
        ack(http, message, consumerGroup="fast")
    slow = pop(http, queue, "b", consumerGroup="slow", batch="1")
    ack(http, slow["messages"][0], consumerGroup="slow")

    report = depth(http, queue)

    # a: fast consumed all, slow nothing; b: fast nothing, slow one
    assert pending_by_partition(report) == {"a": 3, "b": 3}
    assert report["group"] is None and report["conflation"] is False
    assert depth(http, queue, "fast")["pending"] == 3
    assert depth(http, queue, "slow")["pending"] == 5


def test_queue_mode_is_the_reader_of_a_queue_nobody_subscribed_to(http):
    queue = unique_name()
    push(http, queue, list(range(5)))

    assert depth(http, queue)["pending"] == 5


def test_a_group_that_started_now_owes_nothing_of_the_past(http):
    queue = unique_name()
    push(http, queue, ["old"], prefix="a")
    assert pop_answer(http, queue, consumerGroup="late",
                      subscriptionMode="new").status_code == 204
    push(http, queue, ["new"], prefix="b")

    assert depth(http, queue, "late")["pending"] == 1


def test_a_conflating_group_owes_one_run_per_pending_partition(http):
    queue = unique_name()
    for partition in ("a", "b", "c"):
        push(http, queue, list(range(10)), partition=partition)
    answer = pop_answer(http, queue, "c", consumerGroup="lv", conflation="true")
    assert answer.status_code == 200
    ack(http, answer.json()["messages"][0], consumerGroup="lv")

    report = depth(http, queue, "lv")

    assert report["conflation"] is True
    assert report["pending"] == 20
    assert report["partitionsPending"] == 2 and report["effectivePending"] == 2
    assert pending_by_partition(report) == {"a": 10, "b": 10, "c": 0}


def test_an_empty_queue_has_no_depth(http):
    queue = unique_name()
    configure(http, queue)

    report = depth(http, queue, "g")

    assert report["pending"] == 0 and report["partitionsPending"] == 0
    assert report["effectivePending"] == 0


def test_an_unknown_queue_is_a_404(http):
    answer = http.get(f"/api/v1/resources/queues/{unique_name()}/depth")

    assert answer.status_code == 404
    assert answer.json() == {"error": "Queue not found"}


def test_a_too_long_group_is_a_400(http):
    queue = unique_name()
    configure(http, queue)

    answer = http.get(f"/api/v1/resources/queues/{queue}/depth", params={"group": "g" * 300})

    assert answer.status_code == 400


ADMIN = """
async def scenario(client, args):
    name = args["queue"]
    await client.queue(name).partition("x").push([{"data": n} for n in range(3)])
    await client.queue(name).partition("y").push([{"data": n} for n in range(2)])
    whole = await client.admin.get_queue_depth(name)
    grouped = await client.admin.get_queue_depth(name, group="g")
    return {"whole": whole, "grouped": grouped}
"""


def test_client26_admin_reads_the_depth_with_and_without_a_group(server):
    seen = run26(server.url, ADMIN, queue=unique_name())

    assert seen["whole"]["pending"] == 5 and seen["whole"]["group"] is None
    assert seen["grouped"]["group"] == "g"
    assert pending_by_partition(seen["grouped"]) == {"x": 3, "y": 2}
