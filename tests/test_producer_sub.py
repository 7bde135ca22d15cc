"""``producerSub`` (WIRE.md 4.3): with auth on, the admitted token's ``sub`` is written on
every message a push or a transaction writes, whatever the body says, and read back by pop,
the message detail and list, and the DLQ. With auth off it stays null.

A server with ``JWT_ENABLED=true`` on the session's database, over a real socket; tokens are
HS256, minted with pyjwt. (The file-buffer round trip, which needs maintenance mode and so a
database of its own, is in tests/test_auth_interop.py with the official client.)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, Dict, Optional

import httpx
import jwt
import pytest

from tests.http_helpers import ack, configure, dead_letters, pop
from tests.support import running_server, unique_name

SECRET = "producer-sub-secret-long-enough-for-hs256"
JWT_ENV = {"JWT_ENABLED": "true", "JWT_SECRET": SECRET}


def bearer(sub: Optional[str], role: str = "read-write") -> Dict[str, str]:
    now = int(time.time())
    claims: Dict[str, Any] = {"role": role, "iat": now, "exp": now + 3600}
    if sub is not None:
        claims["sub"] = sub
    return {"Authorization": f"Bearer {jwt.encode(claims, SECRET, algorithm='HS256')}"}


@pytest.fixture(scope="module")
def auth_server(pg_env: dict[str, str]) -> Iterator[Any]:
    with running_server(pg_env, prefix="queen-tw-sub-", **JWT_ENV) as process:
        yield process


@pytest.fixture
def as_svc(auth_server: Any) -> Iterator[httpx.Client]:
    """A client whose token's ``sub`` is ``svc-orders`` (read-write)."""
    with httpx.Client(base_url=auth_server.url, timeout=40,
                      headers=bearer("svc-orders")) as client:
        yield client


@pytest.fixture
def as_reader(auth_server: Any) -> Iterator[httpx.Client]:
    """A read-only client (``sub`` ``dashboard``), for the listings."""
    with httpx.Client(base_url=auth_server.url, timeout=40,
                      headers=bearer("dashboard", "read-only")) as client:
        yield client


def push_one(client: httpx.Client, queue: str, **item: Any) -> Dict[str, Any]:
    answer = client.post("/api/v1/push", json={"items": [{"queue": queue, **item}]})
    assert answer.status_code == 201, answer.text
    [result] = answer.json()
    assert result["status"] == "queued", result
    return result


def stored_sub(db: Any, message_id: str) -> Optional[str]:
    with db.cursor() as cursor:
        cursor.execute("SELECT producer_sub FROM queen.messages WHERE id = %s", (message_id,))
        return cursor.fetchone()[0]


def test_push_stamps_the_token_sub_and_pop_returns_it(as_svc: httpx.Client, db: Any) -> None:
    queue = unique_name()

    pushed = push_one(as_svc, queue, payload={"n": 1})

    assert stored_sub(db, pushed["message_id"]) == "svc-orders"
    assert pop(as_svc, queue)["messages"][0]["producerSub"] == "svc-orders"


def test_body_producer_sub_is_ignored_with_auth_on(as_svc: httpx.Client, db: Any) -> None:
    queue = unique_name()

    pushed = push_one(as_svc, queue, payload=1, producerSub="mallory")

    assert stored_sub(db, pushed["message_id"]) == "svc-orders"


def test_token_without_sub_stores_null(auth_server: Any, db: Any) -> None:
    queue = unique_name()
    with httpx.Client(base_url=auth_server.url, timeout=40, headers=bearer(None)) as client:
        pushed = push_one(client, queue, payload=1, producerSub="mallory")

    assert stored_sub(db, pushed["message_id"]) is None


def test_transaction_push_stamps_the_token_sub(as_svc: httpx.Client, db: Any) -> None:
    queue = unique_name()

    answer = as_svc.post("/api/v1/transaction", json={"operations": [
        {"type": "push", "items": [{"queue": queue, "payload": {"in": "tx"},
                                    "producerSub": "mallory"}]}]})

    assert answer.status_code == 200 and answer.json()["success"] is True, answer.text
    [message] = pop(as_svc, queue)["messages"]
    assert message["producerSub"] == "svc-orders"
    assert stored_sub(db, message["id"]) == "svc-orders"


def test_message_detail_and_list_return_the_producer_sub(as_svc: httpx.Client,
                                                         as_reader: httpx.Client) -> None:
    queue = unique_name()
    push_one(as_svc, queue, payload=1, transactionId="detail-1")
    [message] = pop(as_svc, queue)["messages"]

    detail = as_reader.get(f"/api/v1/messages/{message['partitionId']}/detail-1")
    listing = as_reader.get("/api/v1/messages", params={"queue": queue})

    assert detail.status_code == 200 and detail.json()["producerSub"] == "svc-orders"
    assert listing.status_code == 200, listing.text
    assert [m["producerSub"] for m in listing.json()["messages"]] == ["svc-orders"]


def test_dead_letter_keeps_the_producer_sub(as_svc: httpx.Client,
                                            as_reader: httpx.Client) -> None:
    queue = unique_name()
    configure(as_svc, queue, retryLimit=0, retryDelay=0)
    push_one(as_svc, queue, payload=1)
    [message] = pop(as_svc, queue)["messages"]

    assert ack(as_svc, message, "failed", error="boom")["dlq"] is True
    [entry] = dead_letters(as_reader, queue)["messages"]
    assert entry["producerSub"] == "svc-orders"


def test_with_auth_off_a_transaction_body_producer_sub_is_ignored(http: httpx.Client,
                                                                  db: Any) -> None:
    queue = unique_name()

    answer = http.post("/api/v1/transaction", json={"operations": [
        {"type": "push", "items": [{"queue": queue, "payload": 1, "producerSub": "mallory"}]}]})

    assert answer.status_code == 200 and answer.json()["success"] is True, answer.text
    [message] = pop(http, queue)["messages"]
    assert message["producerSub"] is None
    assert stored_sub(db, message["id"]) is None
