"""The official ``queen-mq`` client against consumer groups, subscription modes, namespace
pops and the admin routes of issue #4 (WIRE.md 3.1, 3.2, 3.5, 7.1 rows 13, 17, 19-21)."""

from __future__ import annotations

import asyncio
from typing import Any, List

from tests.client_helpers import connect, pop_now, run_scenario
from tests.support import unique_name


async def _drain_group(client, queue: str, group: str, **modes: str) -> List[Any]:
    seen = []
    for _ in range(100):
        builder = client.queue(queue).group(group).batch(100).wait(False)
        if "mode" in modes:
            builder = builder.subscription_mode(modes["mode"])
        if "since" in modes:
            builder = builder.subscription_from(modes["since"])
        messages = await builder.pop()
        if not messages:
            return seen
        for message in messages:
            seen.append(message["data"])
        await client.ack(messages, True, {"group": group})
    raise AssertionError("never ran dry")


def test_named_groups_each_get_every_message_through_the_client(server: Any) -> None:
    queue = unique_name()

    async def scenario():
        async with connect(server.url) as client:
            await client.queue(queue).create()
            await client.queue(queue).push([{"data": {"n": n}} for n in range(3)])
            first = await _drain_group(client, queue, "bus-a")
            second = await _drain_group(client, queue, "bus-b")
            return first, second

    first, second = run_scenario(scenario())
    assert first == second == [{"n": 0}, {"n": 1}, {"n": 2}]


def test_subscription_mode_new_through_the_client_skips_history(server: Any) -> None:
    queue = unique_name()

    async def scenario():
        async with connect(server.url) as client:
            await client.queue(queue).create()
            await client.queue(queue).push([{"data": {"old": True}}])
            first = await _drain_group(client, queue, "fresh", mode="new")
            await client.queue(queue).push([{"data": {"n": n}} for n in range(3)])
            later = await _drain_group(client, queue, "fresh")
            return first, later

    first, later = run_scenario(scenario())
    assert first == []
    assert later == [{"n": 0}, {"n": 1}, {"n": 2}]


def test_multi_partition_pop_through_the_client_shares_one_lease(server: Any) -> None:
    queue = unique_name()

    async def scenario():
        async with connect(server.url) as client:
            await client.queue(queue).create()
            for name in ("a", "b", "c"):
                await client.queue(queue).partition(name).push([{"data": name}])
            messages = await client.queue(queue).partitions(3).batch(10).wait(False).pop()
            acked = await client.ack(messages, True)
            again = await pop_now(client, queue)
            return messages, acked, again

    messages, acked, again = run_scenario(scenario())
    assert sorted(m["data"] for m in messages) == ["a", "b", "c"]
    assert len({m["leaseId"] for m in messages}) == 1
    assert again == []


def test_namespace_pop_through_the_client(server: Any) -> None:
    namespace, queue = unique_name("ns-"), unique_name()

    async def scenario():
        async with connect(server.url) as client:
            await client.queue(queue).namespace(namespace).task("resize").create()
            await client.queue(queue).push([{"data": "by-namespace"}])
            return await client.queue().namespace(namespace).batch(5).wait(False).pop()

    [message] = run_scenario(scenario())
    assert message["data"] == "by-namespace"
    assert message["queue"] == queue


def test_consumer_group_admin_calls_through_the_client(server: Any) -> None:
    queue, group = unique_name(), unique_name("grp-")

    async def scenario():
        async with connect(server.url) as client:
            await client.queue(queue).create()
            await client.queue(queue).push([{"data": n} for n in range(2)])
            consumed = await _drain_group(client, queue, group)
            admin = client.admin
            listed = await admin.list_consumer_groups()
            detail = await admin.get_consumer_group(group)
            lagging = await admin.get_lagging_consumers(60)
            refreshed = await admin.refresh_consumer_stats()
            sought = await admin.seek_consumer_group(group, queue,
                                                     {"timestamp": "2000-01-01T00:00:00.000Z"})
            again = await _drain_group(client, queue, group)
            stamped = await client.update_consumer_group_timestamp(group, "2000-01-01T00:00:00Z")
            per_queue = await admin.delete_consumer_group_for_queue(group, queue, True)
            deleted = await client.delete_consumer_group(group, True)
            return (consumed, listed, detail, lagging, refreshed, sought, again, stamped,
                    per_queue, deleted)

    (consumed, listed, detail, lagging, refreshed, sought, again, stamped,
     per_queue, deleted) = run_scenario(scenario())
    assert consumed == again == [0, 1]
    assert any(row["name"] == group and row["queueName"] == queue for row in listed)
    assert detail[queue]["partitions"][0]["totalConsumed"] == 2
    assert isinstance(lagging, list)
    assert refreshed["success"] is True
    assert sought["success"] is True and sought["partitionsUpdated"] == 1
    assert stamped["success"] is True and stamped["rowsUpdated"] == 1
    assert per_queue["success"] is True and per_queue["queueName"] == queue
    assert deleted["success"] is True


def test_resource_and_message_admin_calls_through_the_client(server: Any) -> None:
    queue = unique_name()

    async def scenario():
        async with connect(server.url) as client:
            await client.queue(queue).create()
            await client.queue(queue).push([{"data": "x", "transactionId": "tx-admin"}])
            [message] = await pop_now(client, queue)
            admin = client.admin
            overview = await admin.get_overview()
            namespaces = await admin.get_namespaces()
            tasks = await admin.get_tasks()
            partitions = await admin.get_partitions(queue=queue)
            listed = await admin.list_messages(queue=queue)
            detail = await admin.get_message(message["partitionId"], "tx-admin")
            to_dlq = await admin.move_message_to_dlq(message["partitionId"], "tx-admin")
            retried = await admin.retry_message(message["partitionId"], "tx-admin")
            cleared = await admin.clear_queue(queue)
            return (overview, namespaces, tasks, partitions, listed, detail, to_dlq, retried,
                    cleared)

    (overview, namespaces, tasks, partitions, listed, detail, to_dlq, retried,
     cleared) = run_scenario(scenario())
    assert "messages" in overview and "namespaces" in namespaces and "tasks" in tasks
    assert partitions["partitions"][0]["queue"] == queue
    assert listed["messages"][0]["transactionId"] == "tx-admin"
    assert detail["payload"] == "x"
    assert to_dlq == {"success": True, "dlq": True}
    assert retried["success"] is True and retried["transactionId"] == "tx-admin:retry:1"
    assert cleared["success"] is True and cleared["deleted"] == 2


def test_long_poll_consumer_group_wakes_on_push_through_the_client(server: Any) -> None:
    queue = unique_name()

    async def scenario():
        async with connect(server.url) as client:
            await client.queue(queue).create()
            waiting = asyncio.ensure_future(
                client.queue(queue).group("lp").batch(1).wait(True).pop())
            # A documented minimum: the pop is waiting when the push comes. If a slow machine
            # starts it later, it finds the message at once and the test still passes.
            await asyncio.sleep(0.3)
            await client.queue(queue).push([{"data": "woken"}])
            return await asyncio.wait_for(waiting, 45)  # ceiling: the client waits 30 s

    [message] = run_scenario(scenario())
    assert message["data"] == "woken"
