"""The official Python client (``queen-mq`` 0.15.0) with ``bearer_token`` against a server
with ``JWT_ENABLED=true`` (WIRE.md 4.1-4.3): push, pop, ack, transaction and consume work,
popped messages carry the token's ``sub`` as ``producerSub``, a token below the route's
level is refused with the WIRE texts, and ``producerSub`` survives the file buffer.

Real servers over real sockets; the buffer scenario switches maintenance mode, which is
cluster-wide, so it runs on a PostgreSQL of its own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any, Dict, List, Optional

import httpx
import jwt
import pytest

from tests.client_helpers import connect, pop_now, run_scenario
from tests.faultkit import Fleet, private_fleet
from tests.support import WAIT_CEILING_S, running_server, unique_name

SECRET = "interop-secret-long-enough-for-hs256"
JWT_ENV = {"JWT_ENABLED": "true", "JWT_SECRET": SECRET}
SUB = "billing-service"


def token(role: str = "read-write", sub: str = SUB) -> str:
    """What the official test helpers mint: HS256 ``{sub, username, role, iat, exp}``."""
    now = int(time.time())
    return jwt.encode({"sub": sub, "username": sub, "role": role, "iat": now,
                       "exp": now + 3600}, SECRET, algorithm="HS256")


@pytest.fixture(scope="module")
def auth_server(pg_env: dict[str, str]) -> Iterator[Any]:
    with running_server(pg_env, prefix="queen-tw-interop-auth-", **JWT_ENV) as process:
        yield process


def test_push_pop_ack_carry_the_token_sub(auth_server: Any) -> None:
    name = unique_name()

    async def scenario() -> Dict[str, Any]:
        async with connect(auth_server.url, token()) as client:
            await client.queue(name).create()
            pushed = await client.queue(name).push([{"data": {"invoice": 7}}])
            popped = await pop_now(client, name)
            acked = await client.ack(popped[0], True)
            again = await pop_now(client, name)
            return {"pushed": pushed, "popped": popped, "acked": acked, "again": again}

    outcome = run_scenario(scenario())

    assert outcome["pushed"][0]["status"] == "queued"
    [message] = outcome["popped"]
    assert message["data"] == {"invoice": 7}
    assert message["producerSub"] == SUB
    assert outcome["acked"]["success"] is True
    assert outcome["again"] == []


def test_transaction_acks_and_pushes_with_the_token_sub(auth_server: Any) -> None:
    source, target = unique_name(), unique_name()

    async def scenario() -> Dict[str, Any]:
        async with connect(auth_server.url, token()) as client:
            await client.queue(source).push([{"data": {"step": 1}}])
            [first] = await pop_now(client, source)
            committed = await (client.transaction().ack(first)
                               .queue(target).push([{"data": {"step": 2}}]).commit())
            return {"committed": committed, "moved": await pop_now(client, target),
                    "left": await pop_now(client, source)}

    outcome = run_scenario(scenario())

    assert outcome["committed"]["success"] is True, outcome["committed"]
    [moved] = outcome["moved"]
    assert moved["data"] == {"step": 2} and moved["producerSub"] == SUB
    assert outcome["left"] == []


def test_consumer_receives_messages_with_the_token_sub(auth_server: Any) -> None:
    name = unique_name()

    async def scenario() -> List[Dict[str, Any]]:
        received: List[Dict[str, Any]] = []

        async def handler(message: Dict[str, Any]) -> None:
            received.append(message)

        async with connect(auth_server.url, token()) as client:
            await client.queue(name).push([{"data": {"n": n}} for n in range(3)])
            await client.queue(name).batch(1).wait(False).limit(3).consume(handler)
        return received

    received = run_scenario(scenario())

    assert [m["data"] for m in received] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert {m["producerSub"] for m in received} == {SUB}


@pytest.mark.parametrize("bearer,error", [
    (None, "Authentication required"),
    (token("read-only"), "Insufficient permissions"),
])
def test_client_push_is_refused_without_a_token_or_with_a_read_only_one(
        auth_server: Any, bearer: Optional[str], error: str) -> None:
    name = unique_name()

    async def scenario() -> str:
        async with connect(auth_server.url, bearer) as client:
            try:
                await client.queue(name).push([{"data": 1}])
            except httpx.HTTPStatusError as refused:
                return str(refused)
        return "accepted"

    assert run_scenario(scenario()) == error


# -- producerSub through the file buffer ------------------------------------------------


@pytest.fixture(scope="module")
def buffering_server() -> Iterator[Any]:
    """A JWT server on a PostgreSQL of its own (maintenance mode is cluster-wide)."""
    fleet: Fleet
    with private_fleet() as fleet:
        yield fleet.server(**JWT_ENV)


def test_producer_sub_survives_the_file_buffer(buffering_server: Any) -> None:
    name = unique_name()
    url = buffering_server.url

    async def scenario() -> Dict[str, Any]:
        async with connect(url, token("admin", "ops")) as admin, \
                connect(url, token()) as client:
            await admin.admin.set_maintenance_mode(True)
            try:
                buffered = await client.queue(name).push([{"data": {"via": "client"}}])
                raw = httpx.post(f"{url}/api/v1/push", timeout=20,
                                 headers={"Authorization": f"Bearer {token()}"},
                                 json={"items": [{"queue": name, "payload": {"via": "http"},
                                                  "producerSub": "mallory"}]})
                while_on = await admin.admin.get_maintenance_mode()
            finally:
                await admin.admin.set_maintenance_mode(False)
            deadline = time.monotonic() + WAIT_CEILING_S
            while (await admin.admin.get_maintenance_mode())["bufferedMessages"]:
                assert time.monotonic() < deadline, "the buffer did not drain"
                await asyncio.sleep(0.05)
            return {"buffered": buffered, "raw": raw.json(), "while_on": while_on,
                    "popped": await pop_now(client, name)}

    outcome = run_scenario(scenario())

    assert outcome["buffered"][0]["status"] == "buffered"
    assert outcome["raw"][0]["status"] == "buffered"
    assert outcome["while_on"]["bufferedMessages"] == 2
    assert [(m["data"], m["producerSub"]) for m in outcome["popped"]] == [
        ({"via": "client"}, SUB), ({"via": "http"}, SUB)]
