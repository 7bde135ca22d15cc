"""Ephemeral queues through the official queen-mq 2.6.0 client (``client.ephemeral``):
its eight verbs, its two 404s, buffered pushes, long polls, groups and stale acks."""

from __future__ import annotations

from tests.client26 import run26
from tests.support import unique_name

EVERY_VERB = """
async def scenario(client, args):
    eph, queue = client.ephemeral, args["queue"]
    out = {}
    out["configure"] = await eph.configure(queue, max_length=100, policy="dropOldest",
                                           lease_seconds=5, window_buffer={"ms": 0})
    out["push"] = await eph.push(queue, [{"data": {"n": 1}}, {"payload": {"n": 2}}, 3],
                                 partition="p1")
    popped = await eph.pop(queue, batch=10, group="workers")
    out["popped"] = [(m["partition"], m["attempts"], m["payload"]) for m in popped["messages"]]
    acks = await eph.ack(queue, popped["messages"], group="workers")
    out["acks"] = [r["outcome"] for r in acks["results"]]
    out["empty"] = await eph.pop(queue, group="workers")
    listing = await eph.queues()
    out["listed"] = [row for row in listing["queues"] if row["queue"] == queue]
    out["depth"] = await eph.depth(queue)
    await eph.push(queue, [1, 2])
    out["reset"] = await eph.reset(queue)
    out["delete"] = await eph.delete(queue)
    return out
"""


def test_every_verb(server) -> None:
    queue = unique_name()
    out = run26(server.url, EVERY_VERB, queue=queue)
    assert "raised" not in out, out
    assert out["configure"] == {"queue": queue, "options": {
        "maxLength": 100, "policy": "dropOldest", "leaseSeconds": 5, "windowBuffer": {"ms": 0}}}
    assert out["push"] == {"pushed": 3}
    assert out["popped"] == [["p1", 1, {"n": 1}], ["p1", 1, {"n": 2}], ["p1", 1, 3]]
    assert out["acks"] == ["acked"] * 3
    assert out["empty"] == {"queue": queue, "messages": []}
    (row,) = out["listed"]
    assert row["tier"] == "declared" and row["options"]["maxLength"] == 100
    assert out["depth"]["queue"] == queue and out["depth"]["pending"] == 0
    assert out["reset"] == {"queue": queue, "dropped": 2}
    assert out["delete"] == {"queue": queue, "deleted": True, "declared": True}


ERRORS = """
from queen import EphemeralQueueNotFoundError, EPHEMERAL_QUEUE_NOT_FOUND

async def scenario(client, args):
    eph, out = client.ephemeral, {}
    try:
        await eph.depth(args["queue"])
    except EphemeralQueueNotFoundError as error:
        out["missing"] = [type(error).__name__, error.code == EPHEMERAL_QUEUE_NOT_FOUND]
    try:
        await eph.configure(args["queue"], policy="fifo")
    except Exception as error:
        out["bad"] = [type(error).__name__, getattr(error, "code", None),
                      getattr(error, "status", None) or getattr(error, "status_code", None)]
    return out
"""


def test_missing_queue_and_bad_option_errors(server) -> None:
    out = run26(server.url, ERRORS, queue=unique_name())
    assert out["missing"] == ["EphemeralQueueNotFoundError", True]
    assert out["bad"][0] == "EphemeralError" and out["bad"][1] != "ephemeral_unsupported"


LONG_POLL_AND_GROUPS = """
import asyncio

async def scenario(client, args):
    eph, queue, out = client.ephemeral, args["queue"], {}
    # two fan-out subscribers and a worker park before anything is pushed
    waiting = [asyncio.ensure_future(eph.pop(queue, wait=True, timeout=20000, group=group,
                                             batch=5))
               for group in ("tail-a", "tail-b", "workers")]
    await asyncio.sleep(0.5)
    await eph.push(queue, ["hello"])
    answers = await asyncio.gather(*waiting)
    out["woken"] = [[m["payload"] for m in answer["messages"]] for answer in answers]
    (held,) = answers[2]["messages"]
    out["retry"] = (await eph.ack(queue, [held], group="workers", status="retry"))["results"]
    again = await eph.pop(queue, group="workers")
    out["again"] = [(m["payload"], m["attempts"]) for m in again["messages"]]
    out["done"] = (await eph.ack(queue, again["messages"], group="workers",
                                 status=True))["results"]
    await eph.push(queue, ["once"])
    # a new group starts at the oldest message kept: "hello" is still leased by the tails
    first = await eph.pop(queue, group="fast", commit_on_delivery=True, batch=5)
    out["committed"] = [m["payload"] for m in first["messages"]]
    return out
"""


def test_long_poll_groups_and_retry(server) -> None:
    out = run26(server.url, LONG_POLL_AND_GROUPS, queue=unique_name())
    assert "raised" not in out, out
    assert out["woken"] == [["hello"], ["hello"], ["hello"]]
    assert [r["outcome"] for r in out["retry"]] == ["redelivered"]
    assert out["again"] == [["hello", 2]]
    assert [r["outcome"] for r in out["done"]] == ["acked"]
    assert out["committed"] == ["hello", "once"]


BUFFERED = """
async def scenario(client, args):
    eph, queue = client.ephemeral, args["queue"]
    answer = await eph.push(queue, [{"n": n} for n in range(5)],
                            buffered={"message_count": 100, "time_millis": 5000})
    await eph.flush(queue)
    popped = await eph.pop(queue, batch=10, commit_on_delivery=True)
    return {"buffered": answer, "payloads": [m["payload"] for m in popped["messages"]]}
"""


def test_buffered_push_reaches_the_queue(server) -> None:
    out = run26(server.url, BUFFERED, queue=unique_name())
    assert out["buffered"] == {"buffered": True, "count": 5}
    assert out["payloads"] == [{"n": n} for n in range(5)]


POP_ONLY = """
async def scenario(client, args):
    eph = client.ephemeral
    if args.get("push"):
        await eph.configure(args["queue"], max_length=10)
        await eph.push(args["queue"], ["before restart"])
        popped = await eph.pop(args["queue"])
        return popped["messages"]
    acks = await eph.ack(args["queue"], args["held"])
    return {"acks": acks, "depth": await eph.depth(args["queue"]),
            "pop": await eph.pop(args["queue"])}
"""


def test_acks_after_a_restart_are_stale(make_server) -> None:
    server = make_server()
    queue = unique_name()
    held = run26(server.url, POP_ONLY, queue=queue, push=True)
    assert [m["payload"] for m in held] == ["before restart"]
    server.stop()
    server.start()
    out = run26(server.url, POP_ONLY, queue=queue, held=held)
    assert [r["outcome"] for r in out["acks"]["results"]] == ["stale"]
    assert out["depth"]["tier"] == "declared" and out["depth"]["pending"] == 0
    assert out["pop"] == {"queue": queue, "messages": []}


UNSUPPORTED = """
from queen import EPHEMERAL_UNSUPPORTED

async def scenario(client, args):
    try:
        await client.ephemeral.push("q", [1])
    except Exception as error:
        return [type(error).__name__, error.code == EPHEMERAL_UNSUPPORTED]
    return "pushed"
"""


def test_workers_of_num_workers_do_not_serve_ephemeral(make_server) -> None:
    server = make_server(NUM_WORKERS="2", QUEEN_LISTEN="")
    assert run26(server.url, UNSUPPORTED) == ["EphemeralError", True]
