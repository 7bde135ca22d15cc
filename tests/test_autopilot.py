"""Pop autopilot (WIRE2 8.3): with ``autopilot=true`` the server chooses the knobs a pop leaves
out — batch 100, and a width from the ready partitions (at most 64) — never one the pop gave,
and echoes what it used. Raw HTTP, the real 2.6.0 client, and the controller on a fake clock.
"""

from __future__ import annotations

from typing import Any, Dict, List

from twisted.internet.task import Clock

from queen_tw.engine.autopilot import (
    AUTOPILOT_BATCH,
    DWELL_SECONDS,
    IDLE_SECONDS,
    MAX_WIDTH,
    TARGET_AGE_MS,
    Autopilot,
)

from tests.client26 import run26
from tests.http_helpers import pop, pop_answer
from tests.support import unique_name


def push_spread(http, queue: str, partitions: int, per_partition: int = 1) -> None:
    """``per_partition`` messages into each of ``partitions`` partitions p0, p1, …"""
    answer = http.post("/api/v1/push", json={"items": [
        {"queue": queue, "partition": f"p{p}", "payload": {"p": p, "n": n}}
        for p in range(partitions) for n in range(per_partition)]})
    assert answer.status_code == 201, answer.text


def partitions_of(delivery: Dict[str, Any]) -> List[str]:
    return sorted({message["partition"] for message in delivery["messages"]})


# -- raw HTTP ---------------------------------------------------------------------------


def test_a_delegated_width_takes_every_ready_partition_and_is_echoed(http):
    queue = unique_name()
    push_spread(http, queue, 5)

    delivery = pop(http, queue, autopilot="true")

    assert partitions_of(delivery) == [f"p{p}" for p in range(5)]
    assert delivery["partitionsClaimed"] == 5
    assert delivery["autopilot"] == {"partitions": 5, "batch": AUTOPILOT_BATCH, "waitMs": 0}


def test_a_delegated_batch_is_100(http):
    queue = unique_name()
    push_spread(http, queue, 1, per_partition=150)

    delivery = pop(http, queue, autopilot="true", partitions="1")

    assert len(delivery["messages"]) == AUTOPILOT_BATCH
    assert delivery["autopilot"] == {"partitions": 1, "batch": AUTOPILOT_BATCH, "waitMs": 0}


def test_the_width_never_passes_64(http):
    queue = unique_name()
    push_spread(http, queue, MAX_WIDTH + 6)

    delivery = pop(http, queue, autopilot="true")

    assert delivery["partitionsClaimed"] == MAX_WIDTH
    assert len(delivery["messages"]) == MAX_WIDTH
    assert delivery["autopilot"]["partitions"] == MAX_WIDTH


def test_the_width_never_passes_an_explicit_batch(http):
    queue = unique_name()
    push_spread(http, queue, 6)

    delivery = pop(http, queue, autopilot="true", batch="3")

    assert len(delivery["messages"]) == 3
    assert delivery["autopilot"] == {"partitions": 3, "batch": 3, "waitMs": 0}


def test_an_explicit_width_is_kept_even_when_more_partitions_are_ready(http):
    queue = unique_name()
    push_spread(http, queue, 4, per_partition=2)

    delivery = pop(http, queue, autopilot="true", partitions="1")

    assert len(partitions_of(delivery)) == 1
    assert len(delivery["messages"]) == 2
    assert delivery["autopilot"]["partitions"] == 1


def test_the_single_partition_route_has_nothing_to_widen(http):
    queue = unique_name()
    push_spread(http, queue, 2, per_partition=3)

    delivery = pop(http, queue, "p1", autopilot="true")

    assert partitions_of(delivery) == ["p1"]
    assert len(delivery["messages"]) == 3
    assert delivery["autopilot"] == {"partitions": 1, "batch": AUTOPILOT_BATCH, "waitMs": 0}


def test_a_conflating_groups_single_partition_route_echoes_width_one(http):
    queue = unique_name()
    push_spread(http, queue, 2, per_partition=3)

    delivery = pop(http, queue, "p1", autopilot="true", consumerGroup="latest",
                   conflation="true")

    assert delivery["partitionsClaimed"] == 1
    assert delivery["autopilot"] == {"partitions": 1, "batch": AUTOPILOT_BATCH, "waitMs": 0}
    empty = pop_answer(http, queue, "p1", autopilot="true", consumerGroup="latest",
                       conflation="true", wait="false")  # leased: the 200 empty answer
    assert empty.status_code == 200 and empty.json()["messages"] == [], empty.text
    assert empty.json()["autopilot"]["partitions"] == 1


def test_a_pop_without_autopilot_keeps_the_old_answer(http):
    queue = unique_name()
    push_spread(http, queue, 3)

    delivery = pop(http, queue)

    assert "autopilot" not in delivery
    assert len(delivery["messages"]) == 1  # batch 1, one partition: WIRE.md's defaults


def test_an_empty_autopilot_pop_is_still_a_bodiless_204(http):
    queue = unique_name()
    push_spread(http, queue, 1)
    pop(http, queue, autopilot="true")

    answer = pop_answer(http, queue, autopilot="true")

    assert answer.status_code == 204 and answer.content == b""


def test_an_odd_autopilot_value_is_off(http):
    """WIRE.md 1.2: a boolean is true only for true or 1 (it answered 400)."""
    queue = unique_name()
    http.post("/api/v1/push", json={"items": [{"queue": queue, "payload": n}
                                              for n in range(3)]}).raise_for_status()

    answer = pop_answer(http, queue, autopilot="maybe")

    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert "autopilot" not in body and [m["data"] for m in body["messages"]] == [0]


def test_a_named_group_on_a_namespace_is_sized_too(http):
    queue, namespace = unique_name(), unique_name("ns-")
    answer = http.post("/api/v1/configure", json={"queue": queue, "namespace": namespace})
    assert answer.status_code == 200, answer.text
    push_spread(http, queue, 3)

    answer = http.get("/api/v1/pop", params={"namespace": namespace, "wait": "false",
                                             "autopilot": "true", "consumerGroup": "g"})

    assert answer.status_code == 200, answer.text
    assert answer.json()["autopilot"] == {"partitions": 3, "batch": AUTOPILOT_BATCH,
                                          "waitMs": 0}


# -- the official 2.6.0 client ----------------------------------------------------------

POP_RESULT = """
async def scenario(client, args):
    queue = client.queue(args["queue"])
    await queue.create()
    await client.queue(args["queue"]).partition("a").push([{"data": {"n": 1}}])
    await client.queue(args["queue"]).partition("b").push([{"data": {"n": 2}}])
    await client.queue(args["queue"]).partition("c").push([{"data": {"n": 3}}])
    sized = await client.queue(args["queue"]).wait(False).pop_result()
    await client.queue(args["queue"]).partition("d").push([{"data": {"n": 4}}])
    manual = await client.queue(args["queue"]).autopilot(False).wait(False).pop_result()
    return {"messages": sorted(m["data"]["n"] for m in sized.messages),
            "autopilot": sized.autopilot,
            "manual": [m["data"]["n"] for m in manual.messages],
            "manual_autopilot": manual.autopilot}
"""


def test_client26_pop_result_reads_the_sizing_the_server_chose(server):
    seen = run26(server.url, POP_RESULT, queue=unique_name())

    assert seen["messages"] == [1, 2, 3]
    assert seen["autopilot"] == [3, AUTOPILOT_BATCH, 0]
    assert seen["manual"] == [4] and seen["manual_autopilot"] is None


CONSUME = """
async def scenario(client, args):
    await client.queue(args["queue"]).create()
    for p in range(4):
        await client.queue(args["queue"]).partition(f"p{p}").push(
            [{"data": {"p": p, "n": n}} for n in range(5)])
    calls = []

    async def handler(messages):
        calls.append(sorted((m["data"]["p"], m["data"]["n"]) for m in messages))

    await (client.queue(args["queue"]).group("workers").limit(20).wait(False)
           .idle_millis(3000).consume(handler))
    return calls
"""


def test_client26_consume_under_autopilot_gets_everything_in_partition_order(server):
    calls = run26(server.url, CONSUME, queue=unique_name())

    delivered = [tuple(pair) for call in calls for pair in call]
    assert sorted(delivered) == [(p, n) for p in range(4) for n in range(5)]
    assert len(calls) == 1  # one pop: every ready partition, all their messages
    for p in range(4):
        assert [n for q, n in delivered if q == p] == list(range(5))


# -- the controller ---------------------------------------------------------------------

LANE = ("q", None, None, "g")


def test_ready_partitions_are_split_among_the_lanes_live_pops():
    autopilot = Autopilot(Clock())
    for _ in range(4):
        autopilot.entered(LANE)

    assert autopilot.share(LANE) == 4
    autopilot.left(LANE)
    assert autopilot.share(LANE) == 3


def test_an_old_oldest_message_widens_and_a_young_one_narrows_back():
    clock = Clock()
    autopilot = Autopilot(clock)
    for _ in range(8):
        autopilot.entered(LANE)

    shares = []
    for _ in range(3):
        autopilot.learn(LANE, 1, TARGET_AGE_MS * 20)
        shares.append(autopilot.share(LANE))
        clock.advance(DWELL_SECONDS)
    assert shares == [4, 2, 1]
    for _ in range(30):  # the smoothed age must fall under a quarter of the target first
        autopilot.learn(LANE, 8, 0)
        clock.advance(DWELL_SECONDS)
    assert autopilot.share(LANE) == 8


def test_the_boost_changes_at_most_once_per_dwell_period():
    clock = Clock()
    autopilot = Autopilot(clock)
    for _ in range(8):
        autopilot.entered(LANE)

    autopilot.learn(LANE, 1, TARGET_AGE_MS * 20)
    autopilot.learn(LANE, 1, TARGET_AGE_MS * 20)

    assert autopilot.share(LANE) == 4


def test_an_idle_lane_starts_over():
    clock = Clock()
    autopilot = Autopilot(clock)
    for _ in range(2):
        autopilot.entered(LANE)
    autopilot.learn(LANE, 2, TARGET_AGE_MS * 20)
    assert autopilot.share(LANE) == 1

    clock.advance(IDLE_SECONDS + 0.5)

    assert autopilot.share(LANE) == 2


def test_the_share_never_asks_for_more_than_64_partitions_per_ready_one():
    clock = Clock()
    autopilot = Autopilot(clock)
    autopilot.entered(LANE)
    for _ in range(20):
        autopilot.learn(LANE, 1, TARGET_AGE_MS * 100)
        clock.advance(DWELL_SECONDS)

    assert autopilot.share(LANE) == 1 / MAX_WIDTH
    assert autopilot.last_width(LANE) == 1


def test_lanes_idle_for_a_minute_are_forgotten_once_the_table_is_large():
    clock = Clock()
    autopilot = Autopilot(clock)
    for n in range(1000):
        autopilot.entered(("q", None, None, f"g{n}"))
        autopilot.left(("q", None, None, f"g{n}"))
    autopilot.entered(LANE)  # still live: kept however old
    clock.advance(61)

    autopilot.entered(("q", None, None, "newcomer"))

    assert len(autopilot) == 2
