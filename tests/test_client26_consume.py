"""The official queen-mq 2.6.0 client consuming from the real server (WIRE.md 2.3-2.6, WIRE2.md
8, 10, 11): ``consume()`` with a per-message handler that fails once on a multi-partition lease
and with a list handler under autopilot, ``renew()``, ``ack()`` of one message and of a batch,
``commit_on_delivery()`` pops, and a client given a dead URL before the live one.

Each test checks what the client reports and what PostgreSQL then holds (cursors, leases,
counters, stored rows), or that a message comes back, so a server that answered the client
plausibly while doing the wrong thing fails here.
"""

from __future__ import annotations

import uuid
from typing import Any, Dict, List

import httpx
import psycopg2.extensions

from tests.client26 import run26
from tests.http_helpers import configure, push
from tests.support import ServerProcess, count_messages, free_port, unique_name

LEASE_TIME_S = 30
"""leaseTime of the renew tests' queues: a renewed lease has (almost) this much left."""


# -- helpers ----------------------------------------------------------------------------


def group_state(db: psycopg2.extensions.connection, queue: str,
                group: str) -> Dict[str, Dict[str, Any]]:
    """Per partition of ``queue`` that holds messages: how many ``group`` has not consumed
    yet (``pending``), its lease, how many it acked (``consumed``) and its retry counter."""
    with db.cursor() as cursor:
        cursor.execute("""
            SELECT p.name,
                   (SELECT count(*) FROM queen.messages m
                     WHERE m.partition_id = p.id
                       AND (m.created_at, m.id) > (
                           coalesce(pc.cursor_created_at, '-infinity'),
                           coalesce(pc.cursor_id, '00000000-0000-0000-0000-000000000000'))),
                   pc.lease_id::text, coalesce(pc.total_consumed, 0),
                   coalesce(pc.retry_count, 0)
              FROM queen.partitions p JOIN queen.queues q ON q.id = p.queue_id
              LEFT JOIN queen.partition_consumers pc
                     ON pc.partition_id = p.id AND pc.consumer_group = %s
             WHERE q.name = %s
               AND EXISTS (SELECT 1 FROM queen.messages m WHERE m.partition_id = p.id)""",
                       (group, queue))
        return {name: {"pending": pending, "lease": lease, "consumed": consumed,
                       "retries": retries}
                for name, pending, lease, consumed, retries in cursor.fetchall()}


def all_consumed(counts: Dict[str, int]) -> Dict[str, Dict[str, Any]]:
    """The :func:`group_state` of a group that acked ``counts[partition]`` messages of each
    partition, nothing more, and holds no lease."""
    return {name: {"pending": 0, "lease": None, "consumed": n, "retries": 0}
            for name, n in counts.items()}


def lease_rows_end_in(db: psycopg2.extensions.connection, lease_id: str, seconds: float) -> None:
    """Make every partition leased under ``lease_id`` run out ``seconds`` from now, on
    PostgreSQL's clock (as if most of the lease time had gone by)."""
    with db.cursor() as cursor:
        cursor.execute("""UPDATE queen.partition_consumers
                             SET lease_expires_at = now() + %s * interval '1 second'
                           WHERE lease_id = %s""", (seconds, lease_id))
        assert cursor.rowcount > 0, f"no lease {lease_id}"


def lease_rows_seconds_left(db: psycopg2.extensions.connection, lease_id: str) -> List[float]:
    """Seconds left on each partition leased under ``lease_id``, on PostgreSQL's clock."""
    with db.cursor() as cursor:
        cursor.execute("""SELECT extract(epoch FROM lease_expires_at - now())
                            FROM queen.partition_consumers WHERE lease_id = %s""", (lease_id,))
        return sorted(float(row[0]) for row in cursor.fetchall())


def partition_id(db: psycopg2.extensions.connection, queue: str, partition: str) -> str:
    """The id of ``partition`` of ``queue``."""
    with db.cursor() as cursor:
        cursor.execute("""SELECT p.id::text FROM queen.partitions p
                            JOIN queen.queues q ON q.id = p.queue_id
                           WHERE q.name = %s AND p.name = %s""", (queue, partition))
        return cursor.fetchone()[0]


def dead_url() -> str:
    """A URL of this machine where nothing listens: connections to it are refused."""
    return f"http://127.0.0.1:{free_port()}"


# -- consume() --------------------------------------------------------------------------

EACH_FAILING_ONCE = """
async def scenario(client, args):
    for p in ("a", "b", "c"):
        await client.queue(args["queue"]).partition(p).push(
            [{"data": {"p": p, "n": n}} for n in range(2)])
    calls = []

    async def handler(message):
        key = [message["data"]["p"], message["data"]["n"]]
        calls.append(key + [message["leaseId"], message.get("deliveryAttempt")])
        if key == ["b", 0] and sum(1 for call in calls if call[:2] == key) == 1:
            raise RuntimeError("b/0 fails its first delivery")

    await (client.queue(args["queue"]).group("workers").each().wait(False)
           .limit(7).idle_millis(5000).consume(handler))
    return calls
"""


def test_a_failing_each_handler_retries_its_partition_and_acks_the_others_once(server, http,
                                                                               db):
    queue = unique_name()
    configure(http, queue, retryDelay=0)

    calls = run26(server.url, EACH_FAILING_ONCE, queue=queue)

    assert "raised" not in calls, calls
    assert sorted((p, n) for p, n, _, _ in calls) == [
        ("a", 0), ("a", 1), ("b", 0), ("b", 0), ("b", 1), ("c", 0), ("c", 1)]
    first = [call for call in calls if call[3] == 1]
    # one pop leased all three partitions; b/1 was left to the redelivery
    assert sorted((p, n) for p, n, _, _ in first) == [("a", 0), ("a", 1), ("b", 0),
                                                       ("c", 0), ("c", 1)]
    assert len({lease for _, _, lease, _ in first}) == 1
    redelivered = [call for call in calls if call[3] != 1]
    assert [(p, n, attempt) for p, n, _, attempt in redelivered] == [("b", 0, 2), ("b", 1, 2)]
    assert redelivered[0][2] != first[0][2]  # under a lease of its own
    assert group_state(db, queue, "workers") == all_consumed({"a": 2, "b": 2, "c": 2})


LIST_HANDLER = """
async def scenario(client, args):
    for p in range(3):
        await client.queue(args["queue"]).partition(f"p{p}").push(
            [{"data": [p, n]} for n in range(3)])
    calls = []

    async def handler(messages):
        calls.append([message["data"] for message in messages])

    await (client.queue(args["queue"]).group("workers").wait(False)
           .limit(9).idle_millis(5000).consume(handler))
    left = await client.queue(args["queue"]).group("workers").wait(False).pop()
    return {"calls": calls, "left": left}
"""


def test_a_list_handler_under_autopilot_acks_every_message_exactly_once(server, db):
    queue = unique_name()

    seen = run26(server.url, LIST_HANDLER, queue=queue)

    assert "raised" not in seen, seen
    delivered = sorted(tuple(data) for call in seen["calls"] for data in call)
    assert delivered == [(p, n) for p in range(3) for n in range(3)]
    assert seen["left"] == []
    assert group_state(db, queue, "workers") == all_consumed({"p0": 3, "p1": 3, "p2": 3})


# -- renew() ----------------------------------------------------------------------------

POP_TWO_PARTITIONS = """
async def scenario(client, args):
    for p in ("a", "b"):
        await client.queue(args["queue"]).partition(p).push([{"data": p}])
    return await client.queue(args["queue"]).batch(10).partitions(2).wait(False).pop()
"""

RENEW = """
async def scenario(client, args):
    return await client.renew(args["target"])
"""


def leased_pair(server: ServerProcess, http: httpx.Client,
                db: psycopg2.extensions.connection) -> List[Dict[str, Any]]:
    """Two messages of two partitions popped by 2.6.0 under one lease that ends in 5 s."""
    queue = unique_name()
    configure(http, queue, leaseTime=LEASE_TIME_S)
    popped = run26(server.url, POP_TWO_PARTITIONS, queue=queue)
    assert "raised" not in popped, popped
    assert sorted(message["partition"] for message in popped) == ["a", "b"]
    assert popped[0]["leaseId"] == popped[1]["leaseId"]
    lease_rows_end_in(db, popped[0]["leaseId"], 5)
    return popped


def test_renew_of_a_message_extends_every_partition_of_its_lease(server, http, db):
    popped = leased_pair(server, http, db)
    lease = popped[0]["leaseId"]

    renewed = run26(server.url, RENEW, target=popped[0])

    assert renewed["success"] is True, renewed
    assert renewed["leaseId"] == lease and renewed["newExpiresAt"]
    assert all(left > LEASE_TIME_S - 5 for left in lease_rows_seconds_left(db, lease))


def test_renew_of_a_message_list_renews_their_shared_lease_once(server, http, db):
    popped = leased_pair(server, http, db)
    lease = popped[0]["leaseId"]

    renewed = run26(server.url, RENEW, target=popped)

    assert isinstance(renewed, list) and len(renewed) == 1, renewed  # deduped by lease id
    assert renewed[0]["success"] is True and renewed[0]["leaseId"] == lease
    left = lease_rows_seconds_left(db, lease)
    assert len(left) == 2 and all(s > LEASE_TIME_S - 5 for s in left)


RENEW_GONE = """
import uuid

async def scenario(client, args):
    await client.queue(args["queue"]).push([{"data": 1}])
    popped = await client.queue(args["queue"]).wait(False).pop()
    await client.ack(popped[0], True)
    return {"lease": popped[0]["leaseId"],
            "unknown": await client.renew(args["unknown"]),
            "released": await client.renew(popped[0])}
"""


def test_renew_of_an_unknown_or_released_lease_reports_failure_without_raising(server):
    unknown = str(uuid.uuid4())

    seen = run26(server.url, RENEW_GONE, queue=unique_name(), unknown=unknown)

    assert "raised" not in seen, seen
    assert seen["unknown"]["success"] is False and seen["unknown"]["leaseId"] == unknown
    assert seen["unknown"]["error"]
    assert seen["released"]["success"] is False and seen["released"]["leaseId"] == seen["lease"]


# -- ack() ------------------------------------------------------------------------------

ACK_ONE = """
async def scenario(client, args):
    await client.queue(args["queue"]).push([{"data": "done"}])
    popped = await client.queue(args["queue"]).group("g").wait(False).pop()
    acked = await client.ack(popped[0], True, {"group": "g"})
    left = await client.queue(args["queue"]).group("g").wait(False).pop()
    return {"popped": popped, "acked": acked, "left": left}
"""


def test_ack_true_of_one_message_answers_its_item_and_consumes_it(server, db):
    queue = unique_name()

    seen = run26(server.url, ACK_ONE, queue=queue)

    message = seen["popped"][0]
    assert seen["acked"] == {
        "success": True, "index": 0, "transactionId": message["transactionId"],
        "error": None, "queueName": queue, "partitionName": "Default",
        "leaseReleased": True, "dlq": False}
    assert seen["left"] == []
    assert group_state(db, queue, "g") == all_consumed({"Default": 1})


NACK_ONE = """
async def scenario(client, args):
    await client.queue(args["queue"]).push([{"data": "again"}])
    first = await client.queue(args["queue"]).group("g").wait(False).pop()
    nacked = await client.ack(first[0], False, {"group": "g"})
    again = await client.queue(args["queue"]).group("g").wait(False).pop()
    return {"first": first, "nacked": nacked, "again": again}
"""


def test_ack_false_releases_the_lease_and_the_message_comes_back_as_attempt_2(server, http,
                                                                              db):
    queue = unique_name()
    configure(http, queue, retryDelay=0)

    seen = run26(server.url, NACK_ONE, queue=queue)

    first = seen["first"][0]
    assert seen["nacked"]["success"] is True, seen["nacked"]
    assert seen["nacked"]["leaseReleased"] is True and seen["nacked"]["dlq"] is False
    assert (first["deliveryAttempt"], first["retryCount"]) == (1, 0)
    [again] = seen["again"]
    assert again["transactionId"] == first["transactionId"]
    assert (again["deliveryAttempt"], again["retryCount"]) == (2, 1)
    assert again["leaseId"] and again["leaseId"] != first["leaseId"]
    assert group_state(db, queue, "g")["Default"] == {
        "pending": 1, "lease": again["leaseId"], "consumed": 0, "retries": 1}


ACK_BATCH = """
async def scenario(client, args):
    await client.queue(args["queue"]).partition("p").push([{"data": n} for n in range(3)])
    popped = await client.queue(args["queue"]).partition("p").batch(3).wait(False).pop()
    acked = await client.ack(popped, True)
    return {"popped": popped, "acked": acked}
"""


def test_a_batch_ack_answers_one_successful_item_per_message(server, db):
    queue = unique_name()

    seen = run26(server.url, ACK_BATCH, queue=queue)

    assert [m["data"] for m in seen["popped"]] == [0, 1, 2]
    acked = seen["acked"]
    assert acked["success"] is True and "error" not in acked, acked
    assert [(r["index"], r["transactionId"], r["success"], r["error"])
            for r in acked["results"]] == [
        (n, m["transactionId"], True, None) for n, m in enumerate(seen["popped"])]
    assert acked["results"][-1]["leaseReleased"] is True
    assert group_state(db, queue, "__QUEUE_MODE__") == all_consumed({"p": 3})


ACK_BATCH_WITH_STRANGER = """
async def scenario(client, args):
    popped = await client.queue(args["queue"]).partition("held").batch(1).wait(False).pop()
    stranger = {"transactionId": "idle0", "partitionId": args["idle_partition"],
                "leaseId": popped[0]["leaseId"]}
    return await client.ack([popped[0], stranger], True)
"""


def test_a_batch_ack_fails_only_the_item_of_a_message_never_leased(server, http, db):
    queue = unique_name()
    push(http, queue, ["held"], partition="held", prefix="held")
    push(http, queue, ["idle"], partition="idle", prefix="idle")

    acked = run26(server.url, ACK_BATCH_WITH_STRANGER, queue=queue,
                  idle_partition=partition_id(db, queue, "idle"))

    assert acked["success"] is False, acked
    assert acked["error"] == "Invalid or expired lease"
    assert [(r["index"], r["transactionId"], r["success"]) for r in acked["results"]] == [
        (0, "held0", True), (1, "idle0", False)]
    assert acked["results"][1]["error"] == "Invalid or expired lease"
    state = group_state(db, queue, "__QUEUE_MODE__")
    assert state["held"] == {"pending": 0, "lease": None, "consumed": 1, "retries": 0}
    assert state["idle"]["pending"] == 1 and state["idle"]["lease"] is None


# -- commit_on_delivery() ---------------------------------------------------------------

COMMIT_ON_DELIVERY = """
async def scenario(client, args):
    await client.queue(args["queue"]).push([{"data": n} for n in range(3)])
    delivered = await (client.queue(args["queue"]).group("first").batch(10)
                       .commit_on_delivery().wait(False).pop())
    again = await client.queue(args["queue"]).group("first").batch(10).wait(False).pop()
    other = await client.queue(args["queue"]).group("second").batch(10).wait(False).pop()
    return {"delivered": delivered, "again": again, "other": other}
"""


def test_commit_on_delivery_consumes_for_its_group_only(server, db):
    queue = unique_name()

    seen = run26(server.url, COMMIT_ON_DELIVERY, queue=queue)

    assert [(m["data"], m["leaseId"]) for m in seen["delivered"]] == [(0, ""), (1, ""), (2, "")]
    assert seen["again"] == []
    assert [m["data"] for m in seen["other"]] == [0, 1, 2]
    assert group_state(db, queue, "first") == all_consumed({"Default": 3})
    other_lease = seen["other"][0]["leaseId"]
    assert group_state(db, queue, "second")["Default"] == {
        "pending": 3, "lease": other_lease, "consumed": 0, "retries": 0}


# -- several URLs -----------------------------------------------------------------------

# Records the server each request went to; shared by the multi-URL scenarios.
RECORD_URLS = """
def record_urls(client):
    http = client._http_client
    original = http._execute_request
    tried = []

    async def execute(url, method, body, timeout):
        tried.append([url.split("/api/v1/")[0], url.split("/api/v1/")[1].split("?")[0]])
        return await original(url, method, body, timeout)

    http._execute_request = execute
    return tried
"""

FAILOVER = RECORD_URLS + """
async def scenario(client, args):
    queue = args["queue"]
    # a group whose pops the affinity ring sends to the dead URL first, so that URL is tried
    # even when the pushes' session key lands on the live one
    balancer = client._http_client.get_load_balancer()
    group = next(g for g in (f"g{n}" for n in range(1000))
                 if balancer.get_next_url(client.queue(queue).group(g)._get_affinity_key())
                 == args["dead"])
    tried = record_urls(client)
    pushed = []
    for n in range(4):
        pushed += await client.queue(queue).partition(f"p{n % 2}").push([{"data": n}])
    popped = await client.queue(queue).group(group).batch(10).partitions(2).wait(False).pop()
    acked = await client.ack(popped, True, {"group": group})
    return {"tried": tried, "pushed": pushed, "data": sorted(m["data"] for m in popped),
            "acked": acked["success"]}
"""


def test_a_client_with_a_dead_url_first_pushes_and_pops_through_the_live_one(server, db):
    queue, dead = unique_name(), dead_url()

    seen = run26(server.url, FAILOVER, queue=queue, dead=dead,
                 client_options={"urls": [dead, server.url]})

    assert "raised" not in seen, seen
    assert dead in {url for url, _ in seen["tried"]}
    assert [r["status"] for r in seen["pushed"]] == ["queued"] * 4
    assert seen["data"] == [0, 1, 2, 3] and seen["acked"] is True
    assert count_messages(db, queue) == 4


ROUND_ROBIN = RECORD_URLS + """
async def scenario(client, args):
    tried = record_urls(client)
    pushed = []
    for n in range(5):
        pushed += await client.queue(args["queue"]).push([{"data": n}])
    popped = await client.queue(args["queue"]).batch(10).wait(False).pop()
    acked = await client.ack(popped, True)
    return {"tried": tried, "pushed": pushed, "data": [m["data"] for m in popped],
            "acked": acked["success"]}
"""


def test_round_robin_over_a_dead_url_stores_each_push_once(server, db):
    queue, dead = unique_name(), dead_url()
    # the dead URL is retried at once, so every request goes to it first, then fails over
    options = {"urls": [dead, server.url], "load_balancing_strategy": "round-robin",
               "health_retry_after_millis": 0}

    seen = run26(server.url, ROUND_ROBIN, queue=queue, client_options=options)

    assert "raised" not in seen, seen
    assert seen["tried"][:2] == [[dead, "push"], [server.url, "push"]]
    assert [url for url, _ in seen["tried"]] == [dead, server.url] * 7  # 5 pushes, pop, ack
    assert [r["status"] for r in seen["pushed"]] == ["queued"] * 5
    assert seen["data"] == [0, 1, 2, 3, 4] and seen["acked"] is True
    assert count_messages(db, queue) == 5
    assert group_state(db, queue, "__QUEUE_MODE__") == all_consumed({"Default": 5})
