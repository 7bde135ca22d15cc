"""The official queen-mq 2.6.0 client with ``binary_push`` and ``push_compression`` (WIRE2.md
9.1-9.3) against the real server.

Each scenario also records what the client put on the wire (it wraps the client's request
function), so a test that passes because the client fell back to JSON cannot pass here.
"""

from __future__ import annotations

from typing import Any, Dict

from tests.client26 import run26
from tests.http_helpers import configure
from tests.support import count_messages, unique_name

COMPRESSED = {"binary_push": True, "push_compression": True}

# Shared by the scenarios: records each request's method, path and body kind ("QPB1", "QTB1"
# with its flags, or "json"), and can lose the answer of the first push (the client then
# retries with the same bytes, as after a network error).
PRELUDE = """
import httpx

def record_wire(client, lose_first_push_answer=False):
    http = client._http_client
    original = http._execute_request
    wire = []

    async def execute(url, method, body, timeout):
        kind = "json"
        if isinstance(body, (bytes, bytearray)):
            kind = bytes(body[:4]).decode() + "/" + str(body[4])
        wire.append([method, url.split("/api/v1/")[-1], kind])
        answer = await original(url, method, body, timeout)
        if lose_first_push_answer and url.endswith("/push") and len(wire) == 1:
            raise httpx.ConnectError("the answer was lost")
        return answer

    http._execute_request = execute
    return wire
"""

PAYLOADS = [{"text": "héllo ✓", "n": 1, "nested": {"list": [1, 2.5, None, True]}},
            "a string", 42, None, [1, "two"], {"big": 123456789012345678901234567890}]


def scenario26(url: str, body: str, **args: Any) -> Any:
    return run26(url, PRELUDE + body, **args)


ROUND_TRIP = """
async def scenario(client, args):
    wire = record_wire(client)
    queue = client.queue(args["queue"]).partition("p")
    pushed = await queue.push([{"data": p} for p in args["payloads"]])
    popped = await client.queue(args["queue"]).batch(100).wait(False).pop()
    for message in popped:
        await client.ack(message, True)
    return {"wire": wire, "pushed": pushed,
            "popped": [[m["id"], m["transactionId"], m["data"]] for m in popped]}
"""


def test_compressed_push_round_trips_payloads_and_client_ids(server, db):
    queue = unique_name()
    seen = scenario26(server.url, ROUND_TRIP, queue=queue, payloads=PAYLOADS,
                      client_options=COMPRESSED)
    assert ["POST", "push", "QPB1/8"] in seen["wire"], seen
    assert [r["status"] for r in seen["pushed"]] == ["queued"] * len(PAYLOADS)
    assert [m[2] for m in seen["popped"]] == PAYLOADS
    assert [m[0] for m in seen["popped"]] == [r["message_id"] for r in seen["pushed"]]
    assert [m[1] for m in seen["popped"]] == [r["transaction_id"] for r in seen["pushed"]]
    with db.cursor() as cursor:  # stored under the ids the answer named
        cursor.execute("SELECT count(*) FROM queen.messages WHERE id = ANY(%s::uuid[])",
                       ([r["message_id"] for r in seen["pushed"]],))
        assert cursor.fetchone()[0] == len(PAYLOADS)


def test_binary_push_without_compression_round_trips(server):
    queue = unique_name()
    seen = scenario26(server.url, ROUND_TRIP, queue=queue, payloads=PAYLOADS,
                      client_options={"binary_push": True})
    assert ["POST", "push", "QPB1/4"] in seen["wire"], seen
    assert [m[2] for m in seen["popped"]] == PAYLOADS


RETRIED = """
async def scenario(client, args):
    wire = record_wire(client, lose_first_push_answer=True)
    pushed = await client.queue(args["queue"]).partition("p").push(
        [{"data": {"n": n}} for n in range(5)])
    return {"wire": wire, "pushed": pushed}
"""


def test_a_retried_compressed_push_sends_the_same_ids_and_stores_once(server, db):
    queue = unique_name()
    seen = scenario26(server.url, RETRIED, queue=queue, client_options=COMPRESSED)
    assert [w[2] for w in seen["wire"]] == ["QPB1/8", "QPB1/8"], seen
    assert [r["status"] for r in seen["pushed"]] == ["duplicate"] * 5
    assert count_messages(db, queue) == 5
    with db.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM queen.messages WHERE id = ANY(%s::uuid[])",
                       ([r["message_id"] for r in seen["pushed"]],))
        assert cursor.fetchone()[0] == 5


MIXED = """
import uuid

async def scenario(client, args):
    wire = record_wire(client)
    queue = client.queue(args["queue"]).partition("p")
    for n in range(3):
        await queue.push([{"data": f"binary {n}"}])
        # a trace id keeps a push JSON (WIRE2.md 9.4)
        await queue.push([{"data": f"json {n}", "traceId": str(uuid.uuid4())}])
    popped = await client.queue(args["queue"]).batch(100).wait(False).pop()
    return {"wire": wire, "data": [m["data"] for m in popped]}
"""


def test_binary_and_json_pushes_on_one_partition_keep_their_order(server):
    seen = scenario26(server.url, MIXED, queue=unique_name(), client_options=COMPRESSED)
    assert [w[2] for w in seen["wire"] if w[1] == "push"] == ["QPB1/8", "json"] * 3
    assert seen["data"] == [f"{kind} {n}" for n in range(3) for kind in ("binary", "json")]


CAPPED = """
async def scenario(client, args):
    failed = []

    async def on_error(items, error):
        failed.extend(str(item.get("error")) for item in items)

    pushed = await client.queue(args["queue"]).push(
        [{"data": n} for n in range(3)]).on_error(on_error)
    return {"statuses": [r["status"] for r in pushed], "failed": failed}
"""


def test_max_size_refuses_over_capacity_items_of_a_compressed_push(server, http):
    queue = unique_name()
    configure(http, queue, maxSize=2)
    seen = scenario26(server.url, CAPPED, queue=queue, client_options=COMPRESSED)
    assert seen["statuses"] == ["queued", "queued", "failed"], seen
    assert "max capacity" in seen["failed"][0]


def test_compressed_push_to_an_encrypted_queue_is_stored_encrypted(server, http, db):
    queue = unique_name()
    configure(http, queue, encryptionEnabled=True)
    seen = scenario26(server.url, ROUND_TRIP, queue=queue, payloads=PAYLOADS[:3],
                      client_options=COMPRESSED)
    assert [m[2] for m in seen["popped"]] == PAYLOADS[:3]
    with db.cursor() as cursor:
        cursor.execute("SELECT bool_and(is_encrypted) FROM queen.messages "
                       "WHERE id = ANY(%s::uuid[])", ([m[0] for m in seen["popped"]],))
        assert cursor.fetchone()[0] is True


TRANSACTION = """
async def scenario(client, args):
    await client.queue(args["origin"]).push([{"data": {"step": n}} for n in range(2)])
    wire = record_wire(client)
    popped = await client.queue(args["origin"]).batch(2).wait(False).pop()
    result = await (client.transaction()
                    .queue(args["target"]).partition("out").push([{"data": "first"}])
                    .ack(popped)
                    .queue(args["target"]).partition("out").push([{"data": "second"}])
                    .commit())
    after = await client.queue(args["origin"]).batch(10).wait(False).pop()
    moved = await client.queue(args["target"]).batch(10).wait(False).pop()
    return {"wire": wire, "result": result, "left": len(after),
            "moved": [m["data"] for m in moved]}
"""


def test_binary_transaction_pushes_and_acks_and_the_client_gets_its_own_order(server):
    seen = scenario26(server.url, TRANSACTION, origin=unique_name(), target=unique_name(),
                      client_options=COMPRESSED)
    assert ["POST", "transaction", "QTB1/0"] in seen["wire"], seen
    result: Dict[str, Any] = seen["result"]
    assert result["success"] is True, result
    # the client put the server's order (acks first) back into its own
    assert [(r["index"], r["type"]) for r in result["results"]] == [
        (0, "push"), (1, "ack"), (2, "ack"), (3, "push")]
    assert seen["left"] == 0
    assert seen["moved"] == ["first", "second"]


RIDER = """
async def scenario(client, args):
    wire = record_wire(client)
    await client.queue(args["origin"]).push([{"data": "in"}])
    popped = await client.queue(args["origin"]).batch(1).wait(False).pop()
    tx = client.transaction().ack(popped)
    tx.kv.put(args["ns"], "seen", {"n": 1}, forever=True)
    result = await tx.queue(args["target"]).push([{"data": "out"}]).commit()
    stored = await client.kv.get(args["ns"], "seen")
    moved = await client.queue(args["target"]).batch(10).wait(False).pop()
    return {"wire": wire, "result": result, "kv": dict(stored),
            "moved": [m["data"] for m in moved]}
"""


def test_binary_transaction_carries_its_kv_rider_in_the_head(server):
    seen = scenario26(server.url, RIDER, origin=unique_name(), target=unique_name(),
                      ns=unique_name("ns-"), client_options=COMPRESSED)
    assert "wire" in seen, seen
    assert ["POST", "transaction", "QTB1/0"] in seen["wire"], seen
    result = seen["result"]
    assert result["success"] is True, result
    assert [r["type"] for r in result["results"]] == ["ack", "push", "kv"]
    assert seen["kv"]["found"] is True and seen["kv"]["value"] == {"n": 1}
    assert seen["moved"] == ["out"]
