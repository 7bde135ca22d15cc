"""Both official clients on one queue at once: queen-mq 0.15.0 (in this process) and 2.6.0 (in a
subprocess, tests/client26.py) push into the same partitions, 2.6.0 with compressed binary
frames and 0.15.0 with JSON, then consume them as one consumer group side by side.

What must hold, whichever generation took which delivery: every message is handed out once,
and each partition's messages come out in the order they were stored (their offsets), across
the leases of both clients.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Dict, List, Tuple

from tests.client26 import run26
from tests.client_helpers import connect, run_scenario
from tests.support import unique_name

MESSAGES_PER_PARTITION = 60
PARTITIONS = 4

PRODUCE_EVEN = """
async def scenario(client, args):
    for n in range(0, args["n"], 2):
        for p in range(args["partitions"]):
            await client.queue(args["queue"]).partition(f"p{p}").push([{"data": {"p": p, "n": n}}])
    return "pushed"
"""

CONSUME = """
import time

async def scenario(client, args):
    deliveries = []

    async def handler(messages):
        deliveries.append({"at": time.time(),
                           "items": [[m["data"]["p"], m["data"]["n"]] for m in messages]})

    await (client.queue(args["queue"]).group("shared").wait(True).idle_millis(4000)
           .limit(100000).consume(handler))
    return deliveries
"""

Delivery = Dict[str, Any]


def in_thread(target: Any) -> threading.Thread:
    thread = threading.Thread(target=target)
    thread.start()
    return thread


def stored_order(db: Any, queue: str, partition: str) -> List[int]:
    """The partition's messages' ``n`` in offset order."""
    with db.cursor() as cursor:
        cursor.execute("""
            SELECT (m.payload->>'n')::int FROM queen.messages m
              JOIN queen.partitions p ON p.id = m.partition_id
              JOIN queen.queues q ON q.id = p.queue_id
             WHERE q.name = %s AND p.name = %s ORDER BY m.seq""", (queue, partition))
        return [row[0] for row in cursor.fetchall()]


def push_from_both(server: Any, queue: str) -> None:
    """2.6.0 pushes the even ``n`` (compressed frames), 0.15.0 the odd ones, concurrently."""
    outcome: Dict[str, Any] = {}

    def push_even() -> None:
        outcome["even"] = run26(server.url, PRODUCE_EVEN, queue=queue,
                                n=MESSAGES_PER_PARTITION, partitions=PARTITIONS,
                                client_options={"binary_push": True, "push_compression": True})

    async def push_odd() -> None:
        async with connect(server.url) as client:
            for n in range(1, MESSAGES_PER_PARTITION, 2):
                for p in range(PARTITIONS):
                    await client.queue(queue).partition(f"p{p}").push([{"data": {"p": p, "n": n}}])

    thread = in_thread(push_even)
    run_scenario(push_odd())
    thread.join()
    assert outcome["even"] == "pushed", outcome


def consume_with_both(server: Any, queue: str) -> Tuple[List[Delivery], List[Delivery]]:
    """Both generations consume as group "shared" until neither finds more for 4 s."""
    outcome: Dict[str, Any] = {}
    old: List[Delivery] = []

    def consume_new() -> None:
        outcome["new"] = run26(server.url, CONSUME, queue=queue, timeout_s=120)

    async def consume_old() -> None:
        async with connect(server.url) as client:
            async def handler(messages: List[Dict[str, Any]]) -> None:
                old.append({"at": time.time(),
                            "items": [[m["data"]["p"], m["data"]["n"]] for m in messages]})

            await asyncio.wait_for(
                client.queue(queue).group("shared").batch(7).wait(True).idle_millis(4000)
                .limit(100000).consume(handler), 100)

    thread = in_thread(consume_new)
    run_scenario(consume_old(), timeout_s=120)
    thread.join()
    new = outcome["new"]
    assert isinstance(new, list), new  # {"raised": ...} when the 2.6.0 client failed
    return new, old


def test_both_generations_push_and_consume_one_group_in_order_exactly_once(server, http, db):
    queue = unique_name()
    assert http.post("/api/v1/configure",
                     json={"queue": queue, "options": {"leaseTime": 30}}).status_code == 200

    push_from_both(server, queue)
    new, old = consume_with_both(server, queue)

    deliveries = sorted(new + old, key=lambda delivery: delivery["at"])
    handed_out = [tuple(item) for delivery in deliveries for item in delivery["items"]]
    assert len(handed_out) == len(set(handed_out)) == MESSAGES_PER_PARTITION * PARTITIONS
    for p in range(PARTITIONS):
        in_delivery_order = [n for pp, n in handed_out if pp == p]
        assert in_delivery_order == stored_order(db, queue, f"p{p}")
    # the group's cursor passed everything, so nothing comes back
    after = http.get(f"/api/v1/pop/queue/{queue}", params={"consumerGroup": "shared"})
    assert after.status_code == 204
