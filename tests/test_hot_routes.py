"""Push, pop and ack bypass Klein (queen_tw/http/hot_routes.py): both ways must answer alike.

Plain paths take the bypass; escaped ones, odd shapes and every other route go to Klein. The
first tests drive the real server; the last serves the routes over an engine that fails, in
this process, to see an unexpected error answered as Klein would.
"""

from __future__ import annotations

import json

import httpx
import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor

from queen_tw.http.messaging import PopDefaults
from queen_tw.http.routes import http_root
from queen_tw.http.site import make_site

from tests.error_answers import assert_json_error
from tests.support import unique_name


def push_one(http: httpx.Client, queue: str, payload) -> None:
    answer = http.post("/api/v1/push", json={"items": [{"queue": queue, "payload": payload}]})
    assert answer.status_code == 201 and answer.json()[0]["status"] == "queued", answer.text


def test_escaped_pop_path_through_klein_and_plain_path_deliver_alike(http):
    queue = f"{unique_name()}.dotted"
    push_one(http, queue, "first")
    push_one(http, queue, "second")
    escaped = queue.replace(".", "%2E")  # the same name, spelled so that Klein routes it

    once = {"wait": "false", "autoAck": "true"}
    via_klein = http.get(f"/api/v1/pop/queue/{escaped}", params=once)
    via_bypass = http.get(f"/api/v1/pop/queue/{queue}", params=once)

    assert via_klein.status_code == via_bypass.status_code == 200
    assert [m["data"] for m in via_klein.json()["messages"]] == ["first"]
    assert [m["data"] for m in via_bypass.json()["messages"]] == ["second"]
    assert via_klein.headers["content-type"] == via_bypass.headers["content-type"]


def test_pop_of_one_partition_takes_the_bypass_and_keeps_partitions_apart(http):
    queue = unique_name()
    for partition in ("a", "b"):
        answer = http.post("/api/v1/push", json={"items": [
            {"queue": queue, "partition": partition, "payload": partition}]})
        assert answer.status_code == 201

    answer = http.get(f"/api/v1/pop/queue/{queue}/partition/b", params={"wait": "false"})

    assert answer.status_code == 200
    assert [m["data"] for m in answer.json()["messages"]] == ["b"]


@pytest.mark.parametrize("method,path", [
    ("POST", "/api/v1/push/"),
    ("POST", "/api/v1//push"),
    ("GET", "/api/v1/pop/queue/"),
    ("GET", "/api/v1/pop/queue/q/partition"),
    ("GET", "/api/v1/pop/queue/q/partition/"),
    ("GET", "/api/v1/pop/queue/q/other/p"),
    ("GET", "/api/v1/pop/queue/q/partition/p/more"),
])
def test_odd_shapes_of_hot_paths_answer_404_json_as_klein_does(http, method, path):
    answer = http.request(method, path)

    assert_json_error(answer, 404)


def test_ack_through_the_bypass_reports_per_item_results(http):
    answer = http.post("/api/v1/ack", json={"transactionId": "nope",
                                            "partitionId": "00000000-0000-0000-0000-000000000000"})

    assert answer.status_code == 200
    [result] = answer.json()
    assert result["success"] is False and result["error"]


class _FailingEngine:
    """An engine whose push breaks the way a bug would."""

    async def push(self, items):
        raise RuntimeError("a bug, not a domain error")


@pytest_twisted.ensureDeferred
async def test_unexpected_error_in_a_hot_route_answers_500_json_without_traceback():
    root = http_root(_FailingEngine(), "test-worker", PopDefaults(1, 30_000, ""))
    port = reactor.listenTCP(0, make_site(root, 1 << 20), interface="127.0.0.1")
    try:
        answer = await treq.post(
            f"http://127.0.0.1:{port.getHost().port}/api/v1/push",
            data=json.dumps({"items": [{"queue": "q", "payload": 1}]}).encode(),
            headers={"Content-Type": ["application/json"]})
        body = await answer.text()
    finally:
        await defer.maybeDeferred(port.stopListening)

    assert answer.code == 500
    assert json.loads(body) == {"error": "Internal server error"}
    assert "Traceback" not in body
