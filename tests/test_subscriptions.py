"""Consumer groups and where they start (WIRE.md 2.0, 2.3.6, 7.1 rows 13, 19, 26).

Bus mode (named groups each see every message) and queue mode (``__QUEUE_MODE__``, competing
consumers) on one queue at the same time; subscription modes all / new / new-only and
subscriptionFrom=now|timestamp, decided at a group's first contact with a queue and kept.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.http_helpers import ack, pop, pop_answer, push
from tests.support import db_clock_iso, unique_name


def _drain(http: httpx.Client, queue: str, **params) -> list:
    """Pops and acks until a pop comes back empty; returns the payloads in delivery order."""
    seen = []
    for _ in range(1000):
        delivery = pop(http, queue, batch=100, **params)
        if delivery is None:
            return seen
        for message in delivery["messages"]:
            seen.append(message["data"])
            assert ack(http, message, consumerGroup=message["consumerGroup"])["success"]
    raise AssertionError("queue never ran dry")


# -- bus mode and queue mode together ---------------------------------------------------


def test_every_named_group_gets_every_message(http):
    queue = unique_name()
    push(http, queue, [1, 2, 3])

    first = _drain(http, queue, consumerGroup="billing")
    second = _drain(http, queue, consumerGroup="audit")

    assert first == [1, 2, 3]
    assert second == [1, 2, 3]


def test_two_groups_each_receive_all_of_a_thousand_messages_in_partition_order(http):
    queue = unique_name()
    for start in range(0, 1000, 250):
        answer = http.post("/api/v1/push", json={"items": [
            {"queue": queue, "partition": f"p{n % 4}", "payload": n}
            for n in range(start, start + 250)]})
        assert answer.status_code == 201

    for group in ("billing", "audit"):
        received = _drain_batch_acked(http, queue, group)
        assert sorted(received) == list(range(1000))
        for partition in range(4):  # order within every partition holds
            mine = [n for n in received if n % 4 == partition]
            assert mine == sorted(mine)


def _drain_batch_acked(http: httpx.Client, queue: str, group: str) -> list:
    """Pops batches of 100 for ``group`` and acks each batch in one request."""
    received = []
    for _ in range(100):
        delivery = pop(http, queue, batch=100, consumerGroup=group)
        if delivery is None:
            return received
        received.extend(m["data"] for m in delivery["messages"])
        answer = http.post("/api/v1/ack/batch", json={"consumerGroup": group, "acknowledgments": [
            {"transactionId": m["transactionId"], "partitionId": m["partitionId"],
             "leaseId": m["leaseId"], "status": "completed"} for m in delivery["messages"]]})
        assert all(r["success"] for r in answer.json())
    raise AssertionError("queue never ran dry")


def test_queue_mode_and_named_groups_consume_the_same_queue_independently(http):
    queue = unique_name()
    push(http, queue, [1, 2])

    queue_mode = _drain(http, queue)
    named = _drain(http, queue, consumerGroup="analytics")

    assert queue_mode == [1, 2]
    assert named == [1, 2]
    assert pop_answer(http, queue).status_code == 204
    assert pop_answer(http, queue, consumerGroup="analytics").status_code == 204


def test_queue_mode_hands_each_message_to_one_consumer_only(http):
    queue = unique_name()
    push(http, queue, ["a"], partition="p1", prefix="a")
    push(http, queue, ["b"], partition="p2", prefix="b")

    first = pop(http, queue)
    second = pop(http, queue)

    assert {first["messages"][0]["data"], second["messages"][0]["data"]} == {"a", "b"}
    assert pop_answer(http, queue).status_code == 204


def test_a_groups_ack_does_not_move_another_groups_cursor(http):
    queue = unique_name()
    push(http, queue, ["x"])
    message = pop(http, queue, consumerGroup="g1")["messages"][0]
    ack(http, message, consumerGroup="g1")

    again = pop(http, queue, consumerGroup="g2")

    assert again["messages"][0]["data"] == "x"


# -- subscription modes -----------------------------------------------------------------


def test_new_mode_skips_history_then_gets_exactly_the_new_messages(http):
    queue = unique_name()
    push(http, queue, ["old1", "old2"], prefix="old")

    first = pop_answer(http, queue, consumerGroup="fresh", subscriptionMode="new")
    push(http, queue, ["n1", "n2", "n3"], prefix="new")
    later = _drain(http, queue, consumerGroup="fresh")  # later pops carry no mode

    assert first.status_code == 204
    assert later == ["n1", "n2", "n3"]


def test_new_only_is_an_alias_of_new(http):
    queue = unique_name()
    push(http, queue, ["old"], prefix="old")

    first = pop_answer(http, queue, consumerGroup="g", subscriptionMode="new-only")
    push(http, queue, ["n"], prefix="new")

    assert first.status_code == 204
    assert _drain(http, queue, consumerGroup="g") == ["n"]


def test_subscription_from_now_skips_history(http):
    queue = unique_name()
    push(http, queue, ["old"], prefix="old")

    first = pop_answer(http, queue, consumerGroup="g", subscriptionFrom="now")
    push(http, queue, ["n"], prefix="new")

    assert first.status_code == 204
    assert _drain(http, queue, consumerGroup="g") == ["n"]


def test_subscription_from_timestamp_starts_after_that_time(http, db):
    queue = unique_name()
    push(http, queue, ["before"], prefix="b")
    cut = db_clock_iso(db)  # after "before" was stored, before "after" is
    push(http, queue, ["after"], prefix="a")

    seen = _drain(http, queue, consumerGroup="g", subscriptionFrom=cut)

    assert seen == ["after"]


def test_unknown_mode_and_unparsable_from_mean_all(http):
    queue = unique_name()
    push(http, queue, ["h"])

    from_beginning = _drain(http, queue, consumerGroup="g1", subscriptionMode="from_beginning")
    garbage_from = _drain(http, queue, consumerGroup="g2", subscriptionFrom="not-a-time")

    assert from_beginning == ["h"]
    assert garbage_from == ["h"]


def test_an_infinite_subscription_from_is_no_point_in_time_and_means_all(http):
    """PostgreSQL parses 'infinity': taken as a time, the group would never see a message."""
    queue = unique_name()
    push(http, queue, ["h"])

    assert _drain(http, queue, consumerGroup="g1", subscriptionFrom="infinity") == ["h"]
    assert _drain(http, queue, consumerGroup="g2", subscriptionFrom="-infinity") == ["h"]
    groups = {g["name"]: g for g in http.get("/api/v1/consumer-groups").json()}
    assert groups["g1"]["subscriptionMode"] == "all"


def test_first_contact_decides_and_later_modes_are_ignored(http):
    queue = unique_name()
    push(http, queue, ["h1"], prefix="h1-")
    assert _drain(http, queue, consumerGroup="g") == ["h1"]  # first contact: all
    push(http, queue, ["h2"], prefix="h2-")

    later = _drain(http, queue, consumerGroup="g", subscriptionMode="new")

    assert later == ["h2"]


def test_new_mode_covers_partitions_created_after_the_subscription(http):
    queue = unique_name()
    push(http, queue, ["old"], partition="p-old", prefix="old")
    assert pop_answer(http, queue, consumerGroup="g", subscriptionMode="new").status_code == 204

    push(http, queue, ["n1", "n2"], partition="p-new", prefix="new")

    assert _drain(http, queue, consumerGroup="g") == ["n1", "n2"]


def test_new_mode_decided_on_the_wildcard_route_holds_on_the_partition_route(http):
    queue = unique_name()
    push(http, queue, ["old"], partition="p", prefix="old")
    assert pop_answer(http, queue, consumerGroup="g", subscriptionMode="new").status_code == 204

    answer = pop_answer(http, queue, "p", consumerGroup="g")

    assert answer.status_code == 204


def test_queue_mode_ignores_subscription_mode(http):
    queue = unique_name()
    push(http, queue, ["history"])

    seen = _drain(http, queue, subscriptionMode="new")

    assert seen == ["history"]


def test_server_default_subscription_mode_is_all(http):
    queue = unique_name()
    push(http, queue, ["history"])

    assert _drain(http, queue, consumerGroup="g") == ["history"]


def test_default_subscription_mode_new_skips_history_for_groups_without_a_mode(make_server):
    server = make_server(DEFAULT_SUBSCRIPTION_MODE="new")
    queue = unique_name()
    with httpx.Client(base_url=server.url, timeout=10) as client:
        push(client, queue, ["history"], prefix="h")
        first = pop_answer(client, queue, consumerGroup="g")
        push(client, queue, ["fresh"], prefix="f")
        later = _drain(client, queue, consumerGroup="g")
        explicit_all = _drain(client, queue, consumerGroup="g2", subscriptionMode="all")

    assert first.status_code == 204
    assert later == ["fresh"]
    assert explicit_all == ["history", "fresh"]


def test_first_new_pop_over_many_partitions_is_empty_then_sees_every_new_message(http):
    queue = unique_name()
    http.post("/api/v1/push", json={"items": [
        {"queue": queue, "partition": f"p{n}", "payload": n, "transactionId": f"old{n}"}
        for n in range(500)]}).raise_for_status()

    first = pop_answer(http, queue, consumerGroup="g", subscriptionMode="new")
    http.post("/api/v1/push", json={"items": [
        {"queue": queue, "partition": f"p{n}", "payload": 1000 + n, "transactionId": f"new{n}"}
        for n in range(500)]}).raise_for_status()
    seen = _drain(http, queue, consumerGroup="g", partitions=100)

    assert first.status_code == 204
    assert sorted(seen) == list(range(1000, 1500))


def test_ten_consumers_drain_a_thousand_new_partitions_without_an_early_empty_pop(http, server):
    """JS testCgBootstrapNew in small: after a `new` first contact, ten concurrent consumers
    of one group drain one new message per partition; none sees 204 while work remains."""
    import threading

    queue = unique_name()
    http.post("/api/v1/push", json={"items": [
        {"queue": queue, "partition": f"p{n}", "payload": -1, "transactionId": f"old{n}"}
        for n in range(1000)]}).raise_for_status()
    assert pop_answer(http, queue, consumerGroup="boot", subscriptionMode="new").status_code == 204
    http.post("/api/v1/push", json={"items": [
        {"queue": queue, "partition": f"p{n}", "payload": n, "transactionId": f"new{n}"}
        for n in range(1000)]}).raise_for_status()
    consumed, early_empties, lock = [], [], threading.Lock()

    def consumer():
        with httpx.Client(base_url=server.url, timeout=10) as client:
            while True:
                delivery = pop(client, queue, consumerGroup="boot")
                if delivery is None:
                    with lock:
                        if len(consumed) < 1000 - 10:  # others may hold the last few
                            early_empties.append(len(consumed))
                    return
                message = delivery["messages"][0]
                assert ack(client, message, consumerGroup="boot")["success"]
                with lock:
                    consumed.append(message["data"])

    threads = [threading.Thread(target=consumer) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert early_empties == []
    assert sorted(consumed) == list(range(1000))


def _long_poll_in_background(server, queue, timeout=20000, **params):
    """Starts a long-polling pop (wait=true, 20 s) in a thread; returns (thread, answers)."""
    answers: list = []

    def run():
        with httpx.Client(base_url=server.url, timeout=30) as client:
            answers.append(pop_answer(client, queue, wait="true", timeout=timeout, **params))

    thread = threading.Thread(target=run)
    thread.start()
    return thread, answers


@pytest.mark.parametrize("mode", [{"subscriptionMode": "new"}, {"subscriptionFrom": "now"}])
def test_new_mode_long_poll_on_a_queue_not_created_yet_gets_the_creating_message(
        http, server, mode):
    """A consumer waiting with mode new before the queue exists subscribed when it started
    waiting: the push that creates the queue is new to it, not history."""
    queue = unique_name()
    thread, answers = _long_poll_in_background(server, queue, consumerGroup="late", **mode)
    time.sleep(1.0)  # its first attempt finds no queue (a slower one makes the test fail)
    push(http, queue, ["first"])
    thread.join(30)

    assert answers and answers[0].status_code == 200, answers and answers[0].text
    assert [m["data"] for m in answers[0].json()["messages"]] == ["first"]
    # history before the wait still does not count: a second group subscribing now skips it
    assert pop_answer(http, queue, consumerGroup="other", subscriptionMode="new").status_code == 204


def test_new_mode_namespace_long_poll_before_any_queue_gets_the_creating_message(http, server):
    namespace = unique_name()
    queue = f"{namespace}.jobs"
    answers: list = []

    def run():
        with httpx.Client(base_url=server.url, timeout=30) as client:
            answers.append(client.get("/api/v1/pop", params={
                "namespace": namespace, "consumerGroup": "late", "subscriptionMode": "new",
                "wait": "true", "timeout": 20000}))

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(1.0)  # its first attempt finds no queue in the namespace
    push(http, queue, ["first"])
    thread.join(30)

    assert answers and answers[0].status_code == 200, answers and answers[0].text
    assert [m["data"] for m in answers[0].json()["messages"]] == ["first"]


@pytest.mark.parametrize("mode", [{"subscriptionMode": "new"}, {"subscriptionFrom": "now"}])
def test_new_mode_long_poll_gets_the_push_that_recreates_its_deleted_queue(http, server, db,
                                                                          mode):
    """A queue deleted while a group waits on it, then created again by a push: the delete
    took the group's subscription, and the waiting pop subscribes again when the push wakes
    it. The push came during the wait, so it is new to the group (an audit saw it skipped:
    the group started over at the moment of that attempt, after the push). The delete is
    made as another instance's would be, unheard here (a delete through this server wakes
    the pop, whose attempt may then find no queue before the push, hiding the fault)."""
    queue = unique_name()
    push(http, queue, ["old"])
    assert pop(http, queue, consumerGroup="grp", **mode) is None  # it starts after "old"
    thread, answers = _long_poll_in_background(server, queue, consumerGroup="grp", **mode)
    time.sleep(1.0)  # its first attempt finds nothing and it parks
    with db.cursor() as cursor:
        cursor.execute("SELECT queen.delete_queue(%s)", (queue,))
    push(http, queue, ["fresh"])
    thread.join(30)

    assert answers and answers[0].status_code == 200, answers and answers[0].text
    assert [m["data"] for m in answers[0].json()["messages"]] == ["fresh"]


def test_a_second_new_mode_waiter_that_joined_the_line_gets_the_creating_message(http, server):
    """A pop that joins a line of waiting pops of its group parks without an attempt of its
    own; when the first one has timed out, it is the one that meets the creating push."""
    queue = unique_name()
    first, _ = _long_poll_in_background(server, queue, consumerGroup="fleet",
                                        subscriptionMode="new", timeout=1500)
    time.sleep(0.5)
    second, answers = _long_poll_in_background(server, queue, consumerGroup="fleet",
                                               subscriptionMode="new")
    first.join(30)  # 204 after 1.5 s: the second pop is now first in line
    time.sleep(0.5)
    push(http, queue, ["first"])
    second.join(30)

    assert answers and answers[0].status_code == 200, answers and answers[0].text
    assert [m["data"] for m in answers[0].json()["messages"]] == ["first"]
