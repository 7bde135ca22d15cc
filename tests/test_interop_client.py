"""Interop tests: the official ``queen-mq`` Python client driving a running queen-tw.

Each test uses the client the way its README shows (fluent builders that are awaited), runs
its asyncio scenario with ``asyncio.run`` inside a plain synchronous pytest test, and bounds
every wait, so a broken server fails the test instead of hanging it.

The server behind the ``server`` fixture must run outside this process: a scenario blocks
the main thread until it finishes.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, Awaitable, Dict, List, Optional

import pytest
from queen import Queen

from tests.client_helpers import connect, pop_now, run_scenario
from tests.support import WAIT_CEILING_S, expire_leases, lease_ends_in, pass_time, unique_name

DEFAULT_OPTIONS: Dict[str, Any] = {
    "priority": 0,
    "leaseTime": 300,
    "retryLimit": 3,
    "retryDelay": 1000,
    "maxSize": 0,
    "ttl": 3600,
    "deadLetterQueue": False,
    "dlqAfterMaxRetries": False,
    "delayedProcessing": 0,
    "windowBuffer": 0,
    "retentionSeconds": 0,
    "completedRetentionSeconds": 0,
    "retentionEnabled": False,
    "encryptionEnabled": False,
    "maxWaitTimeSeconds": 0,
}
"""The fifteen queue options configure echoes, with their defaults (WIRE.md 2.1)."""

NOT_A_LONG_POLL_S = 20.0
"""Ceiling for pops that must not long-poll: well below the client's 30 s default wait."""

POP_CREATED_AT = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")


# --------------------------------------------------------------------------- helpers


async def within(seconds: float, awaitable: Awaitable[Any]) -> Any:
    """Await a client builder (a consume, typically) but give up after ``seconds``."""

    async def _await() -> Any:
        return await awaitable

    return await asyncio.wait_for(_await(), seconds)


async def poll_pop(client: Queen, queue: str, timeout_s: float = WAIT_CEILING_S
                   ) -> List[Dict[str, Any]]:
    """Pop without long-polling every 100 ms until something arrives or ``timeout_s`` (a
    ceiling for a broken server, not an expectation) passes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        messages = await pop_now(client, queue)
        if messages or loop.time() >= deadline:
            return messages
        await asyncio.sleep(0.1)


async def poll_dlq(client: Queen, queue: str, timeout_s: float = WAIT_CEILING_S
                   ) -> Dict[str, Any]:
    """Read the queue's DLQ through the client until it has an entry or ``timeout_s`` passes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        result = await client.queue(queue).dlq().limit(10).get()
        if result.get("messages") or loop.time() >= deadline:
            return result
        await asyncio.sleep(0.2)


def parse_timestamp(value: str) -> datetime:
    """Parse an ISO-8601 UTC timestamp as the server writes it (``…Z``)."""
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def assert_options(actual: Dict[str, Any], expected: Dict[str, Any]) -> None:
    """Check echoed options by value *and* JSON type (``1 == True`` in Python)."""
    assert actual == expected
    assert {key: type(value).__name__ for key, value in actual.items()} == {
        key: type(value).__name__ for key, value in expected.items()
    }


def queue_exists(db: Any, name: str) -> bool:
    """Whether ``queen.queues`` has a row for ``name``."""
    with db.cursor() as cur:
        cur.execute("SELECT 1 FROM queen.queues WHERE name = %s", (name,))
        return cur.fetchone() is not None


def count_queue_messages(db: Any, name: str, transaction_id: Optional[str] = None) -> int:
    """Count stored messages of a queue, optionally only those with one transaction id."""
    sql = (
        "SELECT count(*) FROM queen.messages m"
        " JOIN queen.partitions p ON p.id = m.partition_id"
        " JOIN queen.queues q ON q.id = p.queue_id"
        " WHERE q.name = %s"
    )
    params: List[Any] = [name]
    if transaction_id is not None:
        sql += " AND m.transaction_id = %s"
        params.append(transaction_id)
    with db.cursor() as cur:
        cur.execute(sql, params)
        return int(cur.fetchone()[0])


def count_messages_by_id(db: Any, message_ids: List[str]) -> int:
    """Count ``queen.messages`` rows whose id is one of ``message_ids``."""
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM queen.messages WHERE id::text = ANY(%s)", (message_ids,))
        return int(cur.fetchone()[0])


# --------------------------------------------------------------------------- queues


def test_create_queue_echoes_every_option_with_its_effective_value(server: Any, db: Any) -> None:
    name = unique_name()
    options = {
        "lease_time": 7,
        "retry_limit": 2,
        "retryDelay": 250,
        "dlq_after_max_retries": True,
        "priority": 4,
    }

    async def scenario() -> Dict[str, Any]:
        async with connect(server.url) as client:
            return await client.queue(name).config(options).create()

    result = run_scenario(scenario())

    assert result["configured"] is True
    assert result["queue"] == name
    uuid.UUID(result["queueId"])
    assert_options(
        result["options"],
        {
            **DEFAULT_OPTIONS,
            "leaseTime": 7,
            "retryLimit": 2,
            "retryDelay": 250,
            "dlqAfterMaxRetries": True,
            "priority": 4,
        },
    )
    assert queue_exists(db, name)


def test_create_queue_without_config_reports_the_default_options(server: Any) -> None:
    name = unique_name()

    async def scenario() -> Dict[str, Any]:
        async with connect(server.url) as client:
            return await client.queue(name).create()

    result = run_scenario(scenario())

    assert result["configured"] is True
    assert_options(result["options"], DEFAULT_OPTIONS)


def test_delete_queue_removes_it_with_its_messages(server: Any, db: Any) -> None:
    name = unique_name()

    async def scenario() -> Dict[str, Any]:
        async with connect(server.url) as client:
            await client.queue(name).create()
            pushed = await client.queue(name).push([{"data": {"n": n}} for n in range(3)])
            deleted = await client.queue(name).delete()
            deleted_again = await client.queue(name).delete()
            after = await pop_now(client, name)
            return {"pushed": pushed, "deleted": deleted, "again": deleted_again, "after": after}

    outcome = run_scenario(scenario())

    assert outcome["deleted"]["deleted"] is True
    assert outcome["deleted"]["existed"] is True
    assert outcome["again"]["deleted"] is True
    assert outcome["again"]["existed"] is False
    assert outcome["after"] == []
    assert not queue_exists(db, name)
    assert count_messages_by_id(db, [item["message_id"] for item in outcome["pushed"]]) == 0


# --------------------------------------------------------------------------- push


def test_push_single_message_is_queued_with_its_ids(server: Any, db: Any) -> None:
    name = unique_name()

    async def scenario() -> List[Dict[str, Any]]:
        async with connect(server.url) as client:
            await client.queue(name).create()
            return await client.queue(name).push([{"data": {"hello": "world"}}])

    results = run_scenario(scenario())

    assert len(results) == 1
    result = results[0]
    assert result["status"] == "queued"
    assert result["index"] == 0
    assert result["transaction_id"]
    uuid.UUID(result["message_id"])
    with db.cursor() as cur:
        cur.execute(
            "SELECT m.transaction_id, p.name, q.name FROM queen.messages m"
            " JOIN queen.partitions p ON p.id = m.partition_id"
            " JOIN queen.queues q ON q.id = p.queue_id"
            " WHERE m.id::text = %s",
            (result["message_id"],),
        )
        assert cur.fetchone() == (result["transaction_id"], "Default", name)


def test_push_batch_of_100_is_queued_and_popped_in_array_order(server: Any, db: Any) -> None:
    name = unique_name()
    items = [{"transactionId": f"batch-{n}", "data": {"seq": n}} for n in range(100)]

    async def scenario() -> Dict[str, Any]:
        async with connect(server.url) as client:
            await client.queue(name).create()
            results = await client.queue(name).push(items)
            popped = await pop_now(client, name, batch=100)
            return {"results": results, "popped": popped}

    outcome = run_scenario(scenario())

    results = outcome["results"]
    assert [result["index"] for result in results] == list(range(100))
    assert {result["status"] for result in results} == {"queued"}
    assert [result["transaction_id"] for result in results] == [f"batch-{n}" for n in range(100)]
    assert len({result["message_id"] for result in results}) == 100
    assert [message["data"]["seq"] for message in outcome["popped"]] == list(range(100))
    assert [message["transactionId"] for message in outcome["popped"]] == [
        f"batch-{n}" for n in range(100)
    ]
    assert count_queue_messages(db, name) == 100


def test_push_with_repeated_transaction_id_reports_duplicate_of_the_original(
    server: Any, db: Any
) -> None:
    name = unique_name()
    transaction_id = f"dup-{uuid.uuid4().hex}"

    async def scenario() -> Dict[str, Any]:
        async with connect(server.url) as client:
            await client.queue(name).create()
            first = await client.queue(name).push(
                [{"transactionId": transaction_id, "data": {"version": 1}}]
            )
            duplicates: List[Any] = []

            async def on_duplicate(items: List[Any], error: Exception) -> None:
                duplicates.extend(items)

            second = (
                await client.queue(name)
                .push([{"transactionId": transaction_id, "data": {"version": 2}}])
                .on_duplicate(on_duplicate)
            )
            popped = await pop_now(client, name)
            return {"first": first, "second": second, "duplicates": duplicates, "popped": popped}

    outcome = run_scenario(scenario())

    assert outcome["first"][0]["status"] == "queued"
    assert outcome["second"][0]["status"] == "duplicate"
    assert outcome["second"][0]["message_id"] == outcome["first"][0]["message_id"]
    assert len(outcome["duplicates"]) == 1
    assert [message["data"] for message in outcome["popped"]] == [{"version": 1}]
    assert count_queue_messages(db, name, transaction_id) == 1


def test_same_transaction_id_in_another_partition_is_a_new_message(server: Any) -> None:
    name = unique_name()
    transaction_id = f"shared-{uuid.uuid4().hex}"

    async def scenario() -> List[List[Dict[str, Any]]]:
        async with connect(server.url) as client:
            await client.queue(name).create()
            item = {"transactionId": transaction_id, "data": {"x": 1}}
            one = await client.queue(name).partition("lane-one").push([item])
            two = await client.queue(name).partition("lane-two").push([item])
            return [one, two]

    one, two = run_scenario(scenario())

    assert one[0]["status"] == "queued"
    assert two[0]["status"] == "queued"
    assert one[0]["message_id"] != two[0]["message_id"]


@pytest.mark.parametrize(
    "payload",
    [None, {}, "plain text", 0, [1, "two", {"three": 3}]],
    ids=["null", "empty-object", "string", "zero", "array"],
)
def test_payload_round_trips_unchanged(server: Any, payload: Any) -> None:
    name = unique_name()

    async def scenario() -> List[Dict[str, Any]]:
        async with connect(server.url) as client:
            await client.queue(name).create()
            await client.queue(name).push([{"data": payload}])
            return await pop_now(client, name, batch=1)

    popped = run_scenario(scenario())

    assert len(popped) == 1
    assert "data" in popped[0]
    assert popped[0]["data"] == payload
    assert type(popped[0]["data"]) is type(payload)


def test_large_payload_of_about_1_6_mb_round_trips_intact(server: Any) -> None:
    name = unique_name()
    payload = {
        "rows": [{"row": n, "token": f"{n:032x}", "filler": "x" * 90} for n in range(10000)],
        "meta": {"note": "large"},
    }
    size = len(json.dumps(payload, separators=(",", ":")))
    assert 1_500_000 < size < 1_800_000

    async def scenario() -> List[Dict[str, Any]]:
        async with connect(server.url) as client:
            await client.queue(name).create()
            results = await client.queue(name).push([{"data": payload}])
            assert results[0]["status"] == "queued"
            return await pop_now(client, name, batch=1)

    popped = run_scenario(scenario())

    assert len(popped) == 1
    assert popped[0]["data"] == payload


# --------------------------------------------------------------------------- pop and ack


def test_popped_message_carries_ack_fields_and_manual_ack_completes_it(
    server: Any, db: Any
) -> None:
    name = unique_name()

    async def scenario() -> Dict[str, Any]:
        async with connect(server.url) as client:
            await client.queue(name).create()
            pushed = await client.queue(name).push([{"data": {"job": 42}}])
            popped = await pop_now(client, name, batch=1)
            ack = await client.ack(popped[0], True) if popped else None
            expire_leases(db, name)  # had the ack not been recorded, the message comes back
            after = await pop_now(client, name)
            return {"pushed": pushed, "popped": popped, "ack": ack, "after": after}

    outcome = run_scenario(scenario())

    assert len(outcome["popped"]) == 1
    message = outcome["popped"][0]
    assert message["data"] == {"job": 42}
    assert message["transactionId"] == outcome["pushed"][0]["transaction_id"]
    assert message["id"] == outcome["pushed"][0]["message_id"]
    uuid.UUID(message["partitionId"])
    assert message["leaseId"]
    assert message["partition"] == "Default"
    assert message["queue"] == name
    assert message["consumerGroup"] == "__QUEUE_MODE__"
    assert POP_CREATED_AT.match(message["createdAt"]), message["createdAt"]
    assert outcome["ack"]["success"] is True, outcome["ack"]
    assert outcome["after"] == []


def test_unacked_message_is_redelivered_after_its_lease_expires(server: Any, db: Any) -> None:
    name = unique_name()

    async def scenario() -> Dict[str, Any]:
        async with connect(server.url) as client:
            await client.queue(name).config({"lease_time": 60}).create()
            await client.queue(name).push([{"data": {"attempt": "first"}}])
            first = await pop_now(client, name, batch=1)
            while_leased = await pop_now(client, name, batch=1)
            assert expire_leases(db, name) == 1  # the minute is over, on PostgreSQL's clock
            again = await pop_now(client, name, batch=1)
            ack = await client.ack(again[0], True) if again else None
            return {"first": first, "while_leased": while_leased, "again": again, "ack": ack}

    outcome = run_scenario(scenario())

    assert len(outcome["first"]) == 1
    assert outcome["while_leased"] == []
    assert [message["transactionId"] for message in outcome["again"]] == [
        outcome["first"][0]["transactionId"]
    ]
    assert outcome["ack"]["success"] is True, outcome["ack"]


def test_pop_on_empty_queue_returns_nothing_without_waiting(server: Any) -> None:
    name = unique_name()

    async def scenario() -> Dict[str, Any]:
        async with connect(server.url) as client:
            await client.queue(name).create()
            # A pop that long-polled would wait the 30 s default: the ceiling catches it.
            return await asyncio.wait_for(pop_now(client, name), NOT_A_LONG_POLL_S)

    assert run_scenario(scenario()) == []


def test_long_poll_on_empty_queue_ends_at_its_timeout(server: Any) -> None:
    name = unique_name()

    async def scenario() -> Dict[str, Any]:
        async with connect(server.url) as client:
            await client.queue(name).create()
            loop = asyncio.get_running_loop()
            started = loop.time()
            popped = await asyncio.wait_for(
                client.queue(name).batch(1).wait(True).timeout_millis(1000).pop(),
                NOT_A_LONG_POLL_S)  # it used the 1 s it asked for, not the 30 s default
            return {"popped": popped, "elapsed": loop.time() - started}

    outcome = run_scenario(scenario())

    assert outcome["popped"] == []
    assert outcome["elapsed"] >= 0.8  # a minimum: it waited instead of answering at once


def test_long_poll_pop_returns_as_soon_as_a_message_is_pushed(server: Any) -> None:
    name = unique_name()

    async def scenario() -> Dict[str, Any]:
        async with connect(server.url) as client:
            await client.queue(name).create()

            async def push_later() -> None:
                # A documented minimum: the push comes while the pop waits. Should a slow
                # machine start the pop later, it finds the message at once (still a pass).
                await asyncio.sleep(1.0)
                await client.queue(name).push([{"data": {"late": True}}])

            pusher = asyncio.create_task(push_later())
            popped = await client.queue(name).batch(1).wait(True).timeout_millis(30000).pop()
            await pusher
            return {"popped": popped}

    outcome = run_scenario(scenario())

    assert [message["data"] for message in outcome["popped"]] == [{"late": True}]


# --------------------------------------------------------------------------- consume


def test_consumer_handler_receives_message_and_its_ack_prevents_redelivery(
    server: Any, db: Any
) -> None:
    name = unique_name()

    async def scenario() -> Dict[str, Any]:
        async with connect(server.url) as client:
            await client.queue(name).create()
            pushed = await client.queue(name).push([{"data": {"greeting": "hello"}}])
            received: List[Any] = []

            async def handler(message: Dict[str, Any]) -> None:
                received.append(message)

            await within(45, client.queue(name).batch(1).wait(False).limit(1).consume(handler))
            expire_leases(db, name)  # had the ack not been recorded, the message comes back
            after = await pop_now(client, name)
            return {"pushed": pushed, "received": received, "after": after}

    outcome = run_scenario(scenario())

    assert len(outcome["received"]) == 1
    message = outcome["received"][0]
    assert isinstance(message, dict)
    assert message["data"] == {"greeting": "hello"}
    assert message["transactionId"] == outcome["pushed"][0]["transaction_id"]
    assert outcome["after"] == []


def test_batch_consumer_receives_all_available_messages_in_one_list(
    server: Any, db: Any
) -> None:
    name = unique_name()

    async def scenario() -> Dict[str, Any]:
        async with connect(server.url) as client:
            await client.queue(name).create()
            await client.queue(name).push([{"data": {"seq": n}} for n in range(5)])
            deliveries: List[Any] = []

            async def handler(messages: List[Dict[str, Any]]) -> None:
                deliveries.append(messages)

            await within(45, client.queue(name).batch(10).wait(False).limit(1).consume(handler))
            expire_leases(db, name)  # had the batch ack not been recorded, it comes back
            after = await pop_now(client, name)
            return {"deliveries": deliveries, "after": after}

    outcome = run_scenario(scenario())

    assert len(outcome["deliveries"]) == 1
    batch = outcome["deliveries"][0]
    assert isinstance(batch, list)
    assert [message["data"]["seq"] for message in batch] == list(range(5))
    assert outcome["after"] == []


def test_fifo_order_holds_per_partition_with_ten_concurrent_consumers(server: Any) -> None:
    name = unique_name()
    lanes = ["lane-a", "lane-b"]
    per_lane = 50

    async def scenario() -> Dict[str, Any]:
        async with connect(server.url) as client:
            await client.queue(name).create()
            for start in range(0, per_lane, 25):
                for lane in lanes:
                    await client.queue(name).partition(lane).push(
                        [{"data": {"lane": lane, "seq": seq}} for seq in range(start, start + 25)]
                    )
            seen: Dict[str, List[int]] = {lane: [] for lane in lanes}
            in_flight = {lane: 0 for lane in lanes}
            peak = {lane: 0 for lane in lanes}

            async def handler(message: Dict[str, Any]) -> None:
                lane = message["data"]["lane"]
                in_flight[lane] += 1
                peak[lane] = max(peak[lane], in_flight[lane])
                await asyncio.sleep(0.01)  # work that lets the other consumers overlap
                seen[lane].append(message["data"]["seq"])
                in_flight[lane] -= 1

            await within(
                50,
                client.queue(name)
                .concurrency(10)
                .batch(1)
                .wait(False)
                .idle_millis(2000)
                .each()
                .consume(handler),
            )
            return {"seen": seen, "peak": peak}

    outcome = run_scenario(scenario())

    for lane in lanes:
        assert outcome["seen"][lane] == list(range(per_lane)), lane
        assert outcome["peak"][lane] == 1, lane


# --------------------------------------------------------------------------- retries and DLQ


def test_failed_consumer_batch_is_redelivered_whole_until_it_succeeds(server: Any) -> None:
    name = unique_name()

    async def scenario() -> Dict[str, Any]:
        async with connect(server.url) as client:
            await client.queue(name).config({"retry_limit": 3, "retryDelay": 100}).create()
            await client.queue(name).push([{"data": {"seq": n}} for n in range(10)])
            deliveries: List[List[int]] = []

            async def handler(messages: List[Dict[str, Any]]) -> None:
                deliveries.append([message["data"]["seq"] for message in messages])
                if len(deliveries) < 3:
                    raise RuntimeError("not yet")

            await within(
                45,
                client.queue(name).batch(10).wait(False).limit(30).idle_millis(3000).consume(handler),
            )
            after = await pop_now(client, name)
            return {"deliveries": deliveries, "after": after}

    outcome = run_scenario(scenario())

    assert outcome["deliveries"] == [list(range(10))] * 3
    assert outcome["after"] == []


def test_failed_ack_moves_message_to_dlq_after_retry_limit(server: Any) -> None:
    name = unique_name()
    payload = {"order": 17, "note": "poison"}
    error_text = f"handler exploded {uuid.uuid4().hex[:8]}"

    async def scenario() -> Dict[str, Any]:
        async with connect(server.url) as client:
            await client.queue(name).config(
                {"retry_limit": 1, "retryDelay": 100, "dlq_after_max_retries": True}
            ).create()
            pushed = await client.queue(name).push([{"data": payload}])
            attempts: List[str] = []

            async def handler(message: Dict[str, Any]) -> None:
                attempts.append(message["transactionId"])
                raise RuntimeError(error_text)

            async def on_error(message: Dict[str, Any], error: Exception) -> None:
                await client.ack(message, False, {"error": str(error)})

            await within(
                45,
                client.queue(name)
                .batch(1)
                .wait(False)
                .idle_millis(1500)
                .each()
                .consume(handler)
                .on_error(on_error),
            )
            dlq = await poll_dlq(client, name)
            after = await pop_now(client, name)
            return {"pushed": pushed, "attempts": attempts, "dlq": dlq, "after": after}

    outcome = run_scenario(scenario())

    transaction_id = outcome["pushed"][0]["transaction_id"]
    assert outcome["attempts"] == [transaction_id, transaction_id]  # retryLimit + 1
    entries = outcome["dlq"]["messages"]
    assert len(entries) == 1, outcome["dlq"]
    assert entries[0]["data"] == payload
    assert error_text in entries[0]["errorMessage"]
    assert entries[0]["transactionId"] == transaction_id
    assert outcome["dlq"]["total"] == 1
    assert outcome["after"] == []


def test_failed_ack_redelivers_after_retry_delay_then_dead_letters_on_exhaustion(
    server: Any, db: Any
) -> None:
    name = unique_name()
    payload = {"invoice": "A-1"}
    error_text = f"still broken {uuid.uuid4().hex[:8]}"

    async def scenario() -> Dict[str, Any]:
        async with connect(server.url) as client:
            await client.queue(name).config({"retry_limit": 1, "retryDelay": 60_000}).create()
            await client.queue(name).push([{"data": payload}])
            first = await pop_now(client, name, batch=1)
            assert len(first) == 1, "the pushed message was not delivered"
            first_nack = await client.ack(first[0], False, {"error": "first failure"})
            during_delay = await pop_now(client, name, batch=1)
            pass_time(db, name, 61)  # the minute's cool-down is over, on PostgreSQL's clock
            second = await poll_pop(client, name)
            second_nack = (
                await client.ack(second[0], False, {"error": error_text}) if second else None
            )
            dlq = await poll_dlq(client, name)
            after = await pop_now(client, name)
            return {
                "first": first,
                "first_nack": first_nack,
                "during_delay": during_delay,
                "second": second,
                "second_nack": second_nack,
                "dlq": dlq,
                "after": after,
            }

    outcome = run_scenario(scenario())

    assert outcome["first_nack"]["success"] is True, outcome["first_nack"]
    assert outcome["during_delay"] == []
    assert [message["transactionId"] for message in outcome["second"]] == [
        outcome["first"][0]["transactionId"]
    ]
    assert outcome["second_nack"]["success"] is True, outcome["second_nack"]
    entries = outcome["dlq"]["messages"]
    assert len(entries) == 1, outcome["dlq"]
    assert entries[0]["data"] == payload
    assert error_text in entries[0]["errorMessage"]
    assert outcome["after"] == []


# --------------------------------------------------------------------------- leases


def test_renewed_lease_outlives_its_original_expiry(server: Any, db: Any) -> None:
    name = unique_name()
    lease_s = 60

    async def scenario() -> Dict[str, Any]:
        async with connect(server.url) as client:
            await client.queue(name).config({"lease_time": lease_s}).create()
            await client.queue(name).push([{"data": {"long": "job"}}])
            popped = await pop_now(client, name, batch=1)
            assert len(popped) == 1, "the pushed message was not delivered"
            lease_ends_in(db, popped[0]["leaseId"], 1)  # most of the minute has gone by
            renewed_at = datetime.now(UTC)
            renewal = await client.renew(popped[0])
            pass_time(db, name, 2)  # the original lease is over by now
            competing = await pop_now(client, name, batch=1)
            ack = await client.ack(popped[0], True)
            return {
                "popped": popped,
                "renewed_at": renewed_at,
                "renewal": renewal,
                "competing": competing,
                "ack": ack,
            }

    outcome = run_scenario(scenario())

    renewal = outcome["renewal"]
    assert renewal["success"] is True, renewal
    assert renewal["leaseId"] == outcome["popped"][0]["leaseId"]
    expires_at = parse_timestamp(renewal["newExpiresAt"])
    assert expires_at > outcome["renewed_at"] + timedelta(seconds=lease_s / 2)
    assert outcome["competing"] == []
    assert outcome["ack"]["success"] is True, outcome["ack"]


def test_consumer_auto_renewal_keeps_the_lease_while_the_handler_runs(
    server: Any, db: Any
) -> None:
    name = unique_name()

    async def scenario() -> Dict[str, Any]:
        async with connect(server.url) as client:
            await client.queue(name).config({"lease_time": 3}).create()
            pushed = await client.queue(name).push([{"data": {"task": "slow"}}])
            calls: List[str] = []
            competing: List[List[Dict[str, Any]]] = []

            async def handler(message: Dict[str, Any]) -> None:
                calls.append(message["transactionId"])
                # The scenario itself: the handler runs past the 3 s lease on PostgreSQL's
                # clock, while the client renews every 0.5 s.
                await asyncio.sleep(4.0)
                competing.append(await pop_now(client, name, batch=1))

            await within(
                45,
                client.queue(name)
                .batch(1)
                .wait(False)
                .limit(1)
                .each()
                .renew_lease(True, 500)
                .consume(handler),
            )
            expire_leases(db, name)  # past any renewed lease: a failed ack would redeliver
            after = await pop_now(client, name)
            return {"pushed": pushed, "calls": calls, "competing": competing, "after": after}

    outcome = run_scenario(scenario())

    assert outcome["calls"] == [outcome["pushed"][0]["transaction_id"]]
    assert outcome["competing"] == [[]]
    assert outcome["after"] == []
