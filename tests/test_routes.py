"""The composed routes (queen_tw/http/routes.py): 405 for a known path asked with the wrong
method, 404 for unknown paths, the transaction guard against riders it would ignore, and the
system routes without a Maintenance.
"""

from __future__ import annotations

import json

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor

from queen_tw.http.messaging import PopDefaults
from queen_tw.http.routes import http_root
from queen_tw.http.site import make_site

from tests.error_answers import assert_json_error
from tests.support import count_messages, unique_name

# -- 405 and 404 ------------------------------------------------------------------------


@pytest.mark.parametrize("method,path,allow", [
    ("GET", "/api/v1/push", "POST"),            # hot-route shortcut paths
    ("PUT", "/api/v1/push", "POST"),
    ("GET", "/api/v1/ack", "POST"),
    ("DELETE", "/api/v1/ack/batch", "POST"),
    ("POST", "/api/v1/pop/queue/somewhere", "GET"),
    ("POST", "/api/v1/pop/queue/q/partition/p", "GET"),
    ("PUT", "/api/v1/configure", "POST"),
    ("GET", "/api/v1/transaction", "POST"),
    ("PUT", "/api/v1/resources/queues/q", "DELETE, GET, HEAD"),
    ("DELETE", "/health", "GET, HEAD"),
    ("PUT", "/api/v1/system/maintenance", "GET, HEAD, POST"),
    ("GET", "/internal/api/notify", "POST"),
])
def test_wrong_method_on_a_known_route_answers_405_with_allow(http, method, path, allow):
    answer = http.request(method, path)

    assert_json_error(answer, 405, "Method not allowed")
    assert answer.headers["allow"] == allow
    assert answer.headers["access-control-allow-origin"] == "*"


@pytest.mark.parametrize("method,path", [
    ("GET", "/api/v1/no-such-route"), ("DELETE", "/api/v1/push/extra"),
    ("GET", "/nothing-here"), ("POST", "/internal/api/nothing"),
])
def test_unknown_paths_still_answer_404(http, method, path):
    assert_json_error(http.request(method, path), 404, "Not found")


def test_path_that_is_not_utf8_answers_400_json(http):
    assert_json_error(http.get("/api/v1/resources/queues/%ff"), 400)


# -- transaction riders -----------------------------------------------------------------


def _leased_message(http, queue: str) -> dict:
    http.post("/api/v1/push", json={"items": [{"queue": queue, "payload": "in"}]})
    answer = http.get(f"/api/v1/pop/queue/{queue}", params={"wait": "false"})
    assert answer.status_code == 200, answer.text
    return answer.json()["messages"][0]


def _bundle(message: dict, target: str, **extra) -> dict:
    return {"operations": [
        {"type": "ack", "transactionId": message["transactionId"],
         "partitionId": message["partitionId"], "leaseId": message["leaseId"]},
        {"type": "push", "items": [{"queue": target, "payload": "out"}]}],
        "requiredLeases": [message["leaseId"]], **extra}


def _still_leased(db, message: dict) -> bool:
    with db.cursor() as cursor:
        cursor.execute("""SELECT count(*) FROM queen.partition_consumers
                           WHERE partition_id = %s AND lease_id = %s
                             AND lease_expires_at > now()""",
                       (message["partitionId"], message["leaseId"]))
        return cursor.fetchone()[0] == 1


GUARDED = {
    "kv-once-without-expiry": {"kv": [{"op": "putIfAbsent", "ns": "dedupe", "key": "m1",
                                       "value": True, "required": True}]},
    "timers": {"timers": [{"op": "schedule", "queue": "later", "timerKey": "k",
                           "delayMs": 1000}]},
    "kv-not-an-array": {"kv": {"op": "check"}},
    "unknown-field": {"onlyIf": {"absent": "key"}},
}


@pytest.mark.parametrize("case", sorted(GUARDED))
def test_transaction_with_a_rider_or_unknown_field_answers_400_and_applies_nothing(
        http, db, case):
    source, target = unique_name(), unique_name()
    message = _leased_message(http, source)

    answer = http.post("/api/v1/transaction", json=_bundle(message, target, **GUARDED[case]))

    error = assert_json_error(answer, 400)
    assert "nothing was applied" in error
    assert next(iter(GUARDED[case])) in error
    assert count_messages(db, target) == 0
    assert _still_leased(db, message)


def test_rider_only_transaction_answers_400_about_the_rider(http):
    answer = http.post("/api/v1/transaction", json={
        "operations": [], "requiredLeases": [],
        "kv": [{"op": "set", "ns": "n", "key": "k", "value": 1}]})

    assert "'kv'" in assert_json_error(answer, 400)


@pytest.mark.parametrize("riders", [{}, {"kv": [], "timers": []}, {"kv": None, "timers": None}])
def test_transaction_without_riders_commits(http, db, riders):
    source, target = unique_name(), unique_name()
    message = _leased_message(http, source)

    answer = http.post("/api/v1/transaction", json=_bundle(message, target, **riders))

    assert answer.status_code == 200, answer.text
    assert answer.json()["success"] is True, answer.text
    assert count_messages(db, target) == 1
    assert not _still_leased(db, message)


# -- the system routes without a Maintenance --------------------------------------------


class _ConnectedEngine:
    """The one engine call the system routes make, answering as a connected database."""

    async def database_healthy(self) -> bool:
        return True


@pytest_twisted.ensureDeferred
async def test_without_maintenance_the_maintenance_routes_answer_404_and_health_200():
    root = http_root(_ConnectedEngine(), "test-worker", PopDefaults(1, 30_000, ""))
    port = reactor.listenTCP(0, make_site(root, 1 << 20), interface="127.0.0.1")
    base = f"http://127.0.0.1:{port.getHost().port}"
    try:
        answers = {}
        for path in ("/api/v1/system/maintenance", "/api/v1/system/maintenance/pop",
                     "/api/v1/status/buffers", "/health"):
            answer = await treq.get(base + path)
            answers[path] = (answer.code, json.loads(await answer.text()))
    finally:
        await defer.maybeDeferred(port.stopListening)

    health_code, health = answers.pop("/health")
    assert health_code == 200 and health["status"] == "healthy"
    assert "file_buffer" not in health
    assert answers == {path: (404, {"error": "Not found"}) for path in answers}
