"""Scheduling options of a queue (WIRE.md 2.0, 2.1, 2.3.3; 7.1 rows 8-9; 8 row 2).

delayedProcessing hides a message until it is old enough; windowBuffer holds a partition back
while its newest message is younger than the window, then hands out the whole burst;
retryDelay keeps a failed delivery back for a cool-down.

Delays and windows are a minute long, so "not yet" holds however slow the machine is, and
time passes with ``pass_time`` (the queue's stored times move into the past on PostgreSQL's
clock) instead of sleeping.
"""

from __future__ import annotations

from tests.http_helpers import ack, configure, pop, pop_answer, push
from tests.support import pass_time, unique_name

MINUTE = 60


def test_delayed_message_is_invisible_at_once_and_visible_after_the_delay(http, db):
    queue = unique_name()
    configure(http, queue, delayedProcessing=MINUTE)
    push(http, queue, ["later"])

    immediately = pop_answer(http, queue)
    pass_time(db, queue, MINUTE + 1)
    after = pop(http, queue)

    assert immediately.status_code == 204
    assert after["messages"][0]["data"] == "later"


def test_delayed_messages_become_due_one_by_one_in_order(http, db):
    queue = unique_name()
    configure(http, queue, delayedProcessing=MINUTE)
    push(http, queue, ["first"], prefix="a")
    pass_time(db, queue, MINUTE / 2)
    push(http, queue, ["second"], prefix="b")
    pass_time(db, queue, MINUTE / 2 + 1)  # first: due; second: half way

    early = pop(http, queue, batch=10)
    ack(http, early["messages"][0])
    pass_time(db, queue, MINUTE / 2)
    late = pop(http, queue, batch=10)

    assert [m["data"] for m in early["messages"]] == ["first"]
    assert [m["data"] for m in late["messages"]] == ["second"]


def test_delayed_message_is_invisible_on_the_partition_route_too(http, db):
    queue = unique_name()
    configure(http, queue, delayedProcessing=MINUTE)
    push(http, queue, ["later"], partition="p")

    assert pop_answer(http, queue, "p").status_code == 204
    pass_time(db, queue, MINUTE + 1)
    assert pop(http, queue, "p", batch=1)["messages"][0]["data"] == "later"


def test_window_buffer_holds_a_burst_back_then_hands_it_out_in_one_pop(http, db):
    queue = unique_name()
    configure(http, queue, windowBuffer=MINUTE)
    push(http, queue, ["a"], prefix="a")
    push(http, queue, ["b"], prefix="b")
    push(http, queue, ["c"], prefix="c")

    immediately = pop_answer(http, queue, batch=10)
    pass_time(db, queue, MINUTE + 1)
    after = pop(http, queue, batch=10)

    assert immediately.status_code == 204
    assert [m["data"] for m in after["messages"]] == ["a", "b", "c"]


def test_window_stays_closed_while_messages_keep_arriving(http, db):
    queue = unique_name()
    configure(http, queue, windowBuffer=MINUTE)
    for n in range(4):
        push(http, queue, [n], prefix=f"m{n}-")
        pass_time(db, queue, MINUTE * 2 / 3)  # the burst is older than the window by now
        assert pop_answer(http, queue, batch=10).status_code == 204

    pass_time(db, queue, MINUTE / 3 + 1)
    assert [m["data"] for m in pop(http, queue, batch=10)["messages"]] == [0, 1, 2, 3]


def test_window_is_per_partition(http, db):
    queue = unique_name()
    configure(http, queue, windowBuffer=MINUTE)
    push(http, queue, ["settled"], partition="quiet", prefix="q")
    pass_time(db, queue, MINUTE + 1)
    push(http, queue, ["fresh"], partition="busy", prefix="b")

    delivery = pop(http, queue, batch=10, partitions=2)

    assert [m["data"] for m in delivery["messages"]] == ["settled"]


def test_retry_delay_keeps_a_failed_delivery_back_then_redelivers_it(http, db):
    queue = unique_name()
    configure(http, queue, retryDelay=MINUTE * 1000)
    push(http, queue, ["flaky"])
    ack(http, pop(http, queue)["messages"][0], "failed")

    during = pop_answer(http, queue)
    pass_time(db, queue, MINUTE + 1)
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

    with db.cursor() as cursor:  # measured from the delivery itself, not from "now"
        cursor.execute("""SELECT extract(epoch FROM lease_expires_at - last_served_at)
                            FROM queen.partition_consumers WHERE partition_id = %s
                             AND consumer_group = '__QUEUE_MODE__'""",
                       (delivery["partitionId"],))
        lease_time = cursor.fetchone()[0]
    assert 30 < lease_time <= 60  # not 0, not the 300 s default; slack for a slow pop
