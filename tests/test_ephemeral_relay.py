"""Ephemeral queues on two instances (``QUEEN_EPHEMERAL_PEERS``): each queue has one owner
and the other instance relays its requests there, so any instance serves any request."""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any, Dict, List, Tuple

import httpx
import pytest

from queen_tw.ephemeral.placement import Placement

from tests.client26 import run26
from tests.support import ServerProcess, unique_name

EPH = "/api/v1/ephemeral"


def start_pair(make_server, **env: str) -> Tuple[ServerProcess, ServerProcess]:
    first, second = make_server(start=False, **env), make_server(start=False, **env)
    peers = f"{first.url},{second.url}"
    for server in (first, second):
        server.env.update(QUEEN_EPHEMERAL_PEERS=peers, QUEEN_EPHEMERAL_SELF=server.url)
        server.start()
    return first, second


@pytest.fixture
def pair(make_server) -> Tuple[ServerProcess, ServerProcess]:
    return start_pair(make_server)


def owned_by(pair: Tuple[ServerProcess, ServerProcess], index: int) -> str:
    """A fresh queue name whose owner is ``pair[index]``."""
    placement = Placement([server.url for server in pair], pair[0].url)
    owner = pair[index].url
    while True:
        name = unique_name()
        if (placement.owner(name) or pair[0].url) == owner:
            return name


def post(url: str, path: str, body: Dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.post(url + path, json=body, headers=headers, timeout=30)


def pop(url: str, queue: str, **params: Any) -> List[Dict[str, Any]]:
    answer = httpx.get(f"{url}{EPH}/pop", params={"queue": queue, **params}, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()["messages"]


def test_any_instance_serves_a_queue_owned_by_the_other(pair) -> None:
    first, second = pair
    queue = owned_by(pair, 1)
    answer = post(first.url, f"{EPH}/push", {"queue": queue, "messages": [
        {"payload": n} for n in range(4)]})
    assert answer.status_code == 201 and answer.json() == {"pushed": 4}
    got = pop(first.url, queue, batch=2) + pop(second.url, queue, batch=2)
    assert [m["payload"] for m in got] == [0, 1, 2, 3]  # one ring: competing, in order
    acked = post(first.url, f"{EPH}/ack", {"queue": queue, "acks": [
        {"id": m["id"]} for m in got]})
    assert [r["outcome"] for r in acked.json()["results"]] == ["acked"] * 4
    depths = [httpx.get(f"{s.url}{EPH}/queues/{queue}/depth").json() for s in pair]
    assert depths[0] == depths[1] and depths[0]["pending"] == 0


def test_a_relayed_long_poll_is_woken_by_a_push_on_the_owner(pair) -> None:
    first, second = pair
    queue = owned_by(pair, 1)
    pool = concurrent.futures.ThreadPoolExecutor(1)
    waiting = pool.submit(pop, first.url, queue, wait="true", timeout=20000)
    time.sleep(0.5)
    assert not waiting.done()
    post(second.url, f"{EPH}/push", {"queue": queue, "messages": [{"payload": "hi"}]})
    assert [m["payload"] for m in waiting.result(timeout=30)] == ["hi"]
    pool.shutdown()


def test_configure_through_a_non_owner_applies_at_the_owner_at_once(pair) -> None:
    first, second = pair
    queue = owned_by(pair, 1)
    answer = post(first.url, f"{EPH}/configure", {"queue": queue, "options": {"maxLength": 1}})
    assert answer.status_code == 201, answer.text
    assert post(second.url, f"{EPH}/push", {"queue": queue, "messages": [
        {"payload": 1}]}).status_code == 201
    full = post(first.url, f"{EPH}/push", {"queue": queue, "messages": [{"payload": 2}]})
    assert full.status_code == 429 and full.json()["code"] == "queue_full"
    assert full.headers.get("Retry-After")


def test_the_listing_shows_each_queue_once_from_any_instance(pair) -> None:
    first, second = pair
    mine, theirs = owned_by(pair, 0), owned_by(pair, 1)
    post(first.url, f"{EPH}/configure", {"queue": theirs})  # declared: loaded by both
    for queue in (mine, theirs):
        post(second.url, f"{EPH}/push", {"queue": queue, "messages": [{"payload": "abc"}]})
    listings = [httpx.get(f"{s.url}{EPH}/queues").json() for s in pair]
    for listing in listings:
        names = [row["queue"] for row in listing["queues"]]
        assert names.count(mine) == 1 and names.count(theirs) == 1
        assert listing["cellBytes"] == 10
    assert listings[0] == listings[1]


def test_the_listing_names_a_member_that_is_down_and_shows_the_rest(pair) -> None:
    first, second = pair
    mine, theirs = owned_by(pair, 0), owned_by(pair, 1)
    for queue in (mine, theirs):
        post(first.url, f"{EPH}/push", {"queue": queue, "messages": [{"payload": 1}]})
    second.kill()

    answer = httpx.get(f"{first.url}{EPH}/queues", timeout=30)

    assert answer.status_code == 200, answer.text
    listed = [row["queue"] for row in answer.json()["queues"]]  # (others' declared ones too)
    assert mine in listed and theirs not in listed
    assert answer.json()["unreachable"] == [second.url]
    assert "unreachable" not in httpx.get(f"{first.url}{EPH}/queues", timeout=30,
                                          headers={"x-queen-eph-fwd": "1"}).json()


def test_a_relayed_request_is_never_relayed_again(pair) -> None:
    first, _ = pair
    queue = owned_by(pair, 1)
    answer = post(first.url, f"{EPH}/push", {"queue": queue, "messages": [{"payload": 1}]},
                  **{"x-queen-eph-fwd": "1"})
    assert answer.status_code == 503 and answer.json()["code"] == "owner_moved"


def test_an_owner_that_is_down_answers_503_and_the_rest_keeps_working(pair) -> None:
    first, second = pair
    theirs, mine = owned_by(pair, 1), owned_by(pair, 0)
    second.stop()
    answer = post(first.url, f"{EPH}/push", {"queue": theirs, "messages": [{"payload": 1}]})
    assert answer.status_code == 503, answer.text
    assert answer.json()["code"] == "ephemeral_forward_failed"
    assert post(first.url, f"{EPH}/push", {"queue": mine, "messages": [
        {"payload": 1}]}).status_code == 201
    assert [m["payload"] for m in pop(first.url, mine)] == [1]


ROUND_ROBIN = """
async def scenario(client, args):
    eph, queue = client.ephemeral, args["queue"]
    for n in range(6):
        await eph.push(queue, [n])
    seen, outcomes = [], []
    for _ in range(6):
        got = await eph.pop(queue, group="workers")
        seen += [m["payload"] for m in got["messages"]]
        acks = await eph.ack(queue, got["messages"], group="workers")
        outcomes += [r["outcome"] for r in acks["results"]]
    return {"seen": seen, "outcomes": outcomes}
"""


def test_the_client_with_both_urls_round_robin(pair) -> None:
    first, second = pair
    out = run26(first.url, ROUND_ROBIN, queue=owned_by(pair, 0),
                client_options={"urls": [first.url, second.url],
                                "load_balancing_strategy": "round-robin"})
    assert out == {"seen": list(range(6)), "outcomes": ["acked"] * 6}
    # the queue lives on the first: the second saw these requests only from the client
    for verb in ("push", "ack"):  # its pops keep to one URL (affinity)
        assert f"/api/v1/ephemeral/{verb}" in second.log_text()


def test_every_member_computes_the_same_owners_and_each_gets_a_share() -> None:
    members = ["http://a:1", "http://b:2", "http://c:3"]
    views = [Placement(members, me) for me in members]
    owners = []
    for n in range(600):
        seen = {view.owner(f"q{n}") or view.me for view in views}
        assert len(seen) == 1
        owners.append(seen.pop())
    assert all(owners.count(member) > 120 for member in members)


def test_self_must_be_one_of_the_peers() -> None:
    from queen_tw.config import Config, ConfigError
    env = {"QUEEN_EPHEMERAL_PEERS": "http://a:1, http://b:2/"}
    assert Config.from_sources({**env, "QUEEN_EPHEMERAL_SELF": "http://b:2"}, {})
    with pytest.raises(ConfigError, match="QUEEN_EPHEMERAL_SELF"):
        Config.from_sources({**env, "QUEEN_EPHEMERAL_SELF": "http://c:3"}, {})
    with pytest.raises(ConfigError, match="QUEEN_EPHEMERAL_SELF"):
        Config.from_sources(env, {})


def test_the_relay_passes_the_callers_token_and_the_owner_checks_it(make_server) -> None:
    import jwt
    secret = "relay-secret-that-is-long-enough-for-hs256"
    pair = start_pair(make_server, JWT_ENABLED="true", JWT_SECRET=secret)
    first, second = pair
    queue = owned_by(pair, 1)
    body = {"queue": queue, "messages": [{"payload": 1}]}

    def bearer(role: str) -> str:
        now = int(time.time())
        token = jwt.encode({"sub": "t", "role": role, "iat": now, "exp": now + 600}, secret,
                           algorithm="HS256")
        return f"Bearer {token}"

    assert post(first.url, f"{EPH}/push", body).status_code == 401
    assert post(first.url, f"{EPH}/push", body,
                Authorization=bearer("read-only")).status_code == 403
    assert post(first.url, f"{EPH}/push", body,
                Authorization=bearer("read-write")).status_code == 201
    # the owner itself refuses a relayed-looking request without a token
    assert post(second.url, f"{EPH}/push", body, **{"x-queen-eph-fwd": "1"}).status_code == 401
    depth = httpx.get(f"{first.url}{EPH}/queues/{queue}/depth",
                      headers={"Authorization": bearer("read-only")})
    assert depth.status_code == 200 and depth.json()["pending"] == 1


def test_a_relayed_pop_whose_client_leaves_gives_its_messages_back(pair) -> None:
    first, second = pair
    queue = owned_by(pair, 1)
    post(first.url, f"{EPH}/configure", {"queue": queue, "options": {
        "windowBuffer": {"ms": 20000}}})
    pool = concurrent.futures.ThreadPoolExecutor(1)
    leaving = pool.submit(httpx.get, f"{first.url}{EPH}/pop", params={
        "queue": queue, "wait": "true", "timeout": 20000, "batch": 5}, timeout=1.0)
    time.sleep(0.3)
    post(second.url, f"{EPH}/push", {"queue": queue, "messages": [{"payload": "kept"}]})
    with pytest.raises(httpx.ReadTimeout):
        leaving.result(timeout=30)
    pool.shutdown()
    deadline = time.monotonic() + 10
    again: List[Dict[str, Any]] = []
    while not again and time.monotonic() < deadline:
        again = pop(second.url, queue)
        time.sleep(0.05)
    assert [(m["payload"], m["attempts"]) for m in again] == [("kept", 1)]
    for server in pair:
        assert "Traceback" not in server.log_text()


def test_an_owner_that_hangs_answers_503_after_the_relay_deadline(pair) -> None:
    import os
    import signal
    first, second = pair
    queue = owned_by(pair, 1)
    os.kill(second.pid, signal.SIGSTOP)  # accepts connections (backlog), answers nothing
    try:
        started = time.monotonic()
        answer = httpx.get(f"{first.url}{EPH}/pop", timeout=30, params={
            "queue": queue, "wait": "true", "timeout": 100})
        waited = time.monotonic() - started
    finally:
        os.kill(second.pid, signal.SIGCONT)
    assert answer.status_code == 503, answer.text
    assert answer.json()["code"] == "ephemeral_forward_failed"
    assert "did not answer within 5.1 s" in answer.json()["error"]
    assert waited < 20  # the long poll's 0.1 s + 5 s of slack, not the client's 30 s
