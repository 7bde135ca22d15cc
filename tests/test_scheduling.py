"""Scheduling options of a queue (WIRE.md 2.0, 2.1, 2.3.3; 7.1 rows 8-9; 8 row 2).

delayedProcessing hides a message until it is old enough; windowBuffer holds a partition back
while its newest message is younger than the window, then hands out the whole burst;
retryDelay keeps a failed delivery back for a cool-down. Windows of 1 s keep the suite fast.
"""

from __future__ import annotations

import time

from tests.http_helpers import ack, configure, poll_pop, pop, pop_answer, push
from tests.support import unique_name


def test_delayed_message_is_invisible_at_once_and_visible_after_the_delay(http):
    queue = unique_name()
    configure(http, queue, delayedProcessing=1)
    push(http, queue, ["later"])

    immediately = pop_answer(http, queue)
    time.sleep(1.2)
    after = pop(http, queue)

    assert immediately.status_code == 204
    assert after["messages"][0]["data"] == "later"


def test_delayed_messages_become_due_one_by_one_in_order(http):
    queue = unique_name()
    configure(http, queue, delayedProcessing=1)
    push(http, queue, ["first"], prefix="a")
    time.sleep(0.6)
    push(http, queue, ["second"], prefix="b")
    time.sleep(0.6)

    early = pop(http, queue, batch=10)
    ack(http, early["messages"][0])
    time.sleep(0.6)
    late = pop(http, queue, batch=10)

    assert [m["data"] for m in early["messages"]] == ["first"]
    assert [m["data"] for m in late["messages"]] == ["second"]


def test_delayed_message_is_invisible_on_the_partition_route_too(http):
    queue = unique_name()
    configure(http, queue, delayedProcessing=1)
    push(http, queue, ["later"], partition="p")

    assert pop_answer(http, queue, "p").status_code == 204
    assert poll_pop(http, queue, within=3, batch=1) is not None


def test_window_buffer_holds_a_burst_back_then_hands_it_out_in_one_pop(http):
    queue = unique_name()
    configure(http, queue, windowBuffer=1)
    push(http, queue, ["a"], prefix="a")
    push(http, queue, ["b"], prefix="b")
    push(http, queue, ["c"], prefix="c")

    immediately = pop_answer(http, queue, batch=10)
    time.sleep(1.2)
    after = pop(http, queue, batch=10)

    assert immediately.status_code == 204
    assert [m["data"] for m in after["messages"]] == ["a", "b", "c"]


def test_window_stays_closed_while_messages_keep_arriving(http):
    queue = unique_name()
    configure(http, queue, windowBuffer=1)
    for n in range(4):
        push(http, queue, [n], prefix=f"m{n}-")
        time.sleep(0.4)
        assert pop_answer(http, queue, batch=10).status_code == 204

    time.sleep(1.1)
    assert [m["data"] for m in pop(http, queue, batch=10)["messages"]] == [0, 1, 2, 3]


def test_window_is_per_partition(http):
    queue = unique_name()
    configure(http, queue, windowBuffer=1)
    push(http, queue, ["settled"], partition="quiet", prefix="q")
    time.sleep(1.1)
    push(http, queue, ["fresh"], partition="busy", prefix="b")

    delivery = pop(http, queue, batch=10, partitions=2)

    assert [m["data"] for m in delivery["messages"]] == ["settled"]


def test_retry_delay_keeps_a_failed_delivery_back_then_redelivers_it(http):
    queue = unique_name()
    configure(http, queue, retryDelay=800)
    push(http, queue, ["flaky"])
    ack(http, pop(http, queue)["messages"][0], "failed")

    during = pop_answer(http, queue)
    time.sleep(0.9)
    after = pop(http, queue)

    assert during.status_code == 204
    assert after["messages"][0]["data"] == "flaky"
    assert after["messages"][0]["retryCount"] == 1


def test_retry_delay_of_one_partition_does_not_hold_back_the_others(http):
    queue = unique_name()
    configure(http, queue, retryDelay=5000)
    push(http, queue, ["flaky"], partition="a", prefix="a")
    push(http, queue, ["fine"], partition="b", prefix="b")
    first = pop(http, queue)["messages"][0]
    ack(http, first, "failed")

    other = pop(http, queue)

    assert other is not None
    assert other["messages"][0]["partition"] != first["partition"]


def test_zero_lease_time_means_sixty_seconds(http, db):
    queue = unique_name()
    configure(http, queue, leaseTime=0)
    push(http, queue, ["x"])
    delivery = pop(http, queue)

    with db.cursor() as cursor:
        cursor.execute("""SELECT extract(epoch FROM lease_expires_at - now())
                            FROM queen.partition_consumers WHERE partition_id = %s
                             AND consumer_group = '__QUEUE_MODE__'""",
                       (delivery["partitionId"],))
        remaining = cursor.fetchone()[0]
    assert 55 <= remaining <= 60
