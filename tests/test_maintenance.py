"""Push and pop maintenance modes (WIRE.md 2.2, 3.7) over HTTP, on a PostgreSQL of their own.

The flags live in ``queen.system_state`` and every server of a database obeys them, so these
tests never touch the session's shared PostgreSQL: a server there would start buffering
every push of the other tests.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing

import httpx
import psycopg2
import pytest

from queen_tw.config import Config

from faultkit import Fleet, private_fleet, set_maintenance, wait_until
from support import unique_name
from tests.pg_faults import Trigger, asleep

FAST_FLAGS = {"QUEEN_CACHE_REFRESH_INTERVAL_MS": "200"}


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    """Servers on a PostgreSQL private to this module (the flags are cluster-wide)."""
    with private_fleet() as servers:
        yield servers


@pytest.fixture(scope="module")
def server(fleet: Fleet):
    return fleet.server(**FAST_FLAGS)


@pytest.fixture
def http(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=20) as client:
        yield client
        # every test leaves both modes off, whatever happened
        client.post("/api/v1/system/maintenance", json={"enabled": False})
        client.post("/api/v1/system/maintenance/pop", json={"enabled": False})


def push(http: httpx.Client, queue: str, partition: str, seqs: range) -> list[dict]:
    answer = http.post("/api/v1/push", json={"items": [
        {"queue": queue, "partition": partition, "payload": {"seq": n}} for n in seqs]})
    assert answer.status_code == 201, answer.text
    return answer.json()


def pop_all(http: httpx.Client, queue: str) -> list[dict]:
    messages = []
    while True:
        answer = http.get(f"/api/v1/pop/queue/{queue}",
                          params={"batch": 1000, "autoAck": "true", "wait": "false"})
        if answer.status_code == 204:
            return messages
        assert answer.status_code == 200, answer.text
        messages.extend(answer.json()["messages"])


def maintenance(http: httpx.Client) -> dict:
    answer = http.get("/api/v1/system/maintenance")
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_maintenance_status_reports_flags_and_buffer(http: httpx.Client) -> None:
    status = maintenance(http)

    assert status["maintenanceMode"] is False and status["popMaintenanceMode"] is False
    assert status["bufferedMessages"] == 0 and status["bufferHealthy"] is True
    stats = status["bufferStats"]
    assert {"pendingCount", "failedCount", "dbHealthy", "failedFiles"} <= set(stats)
    assert stats["dbHealthy"] is True
    assert {"count", "totalBytes", "totalMB", "failoverCount", "qos0Count"} <= set(
        stats["failedFiles"])


@pytest.mark.parametrize("path", ["/api/v1/system/maintenance",
                                  "/api/v1/system/maintenance/pop"])
@pytest.mark.parametrize("body", [{}, {"enabled": "true"}, {"enabled": 1}, {"enabled": None}])
def test_switching_a_mode_requires_a_boolean(http: httpx.Client, path: str, body: dict) -> None:
    answer = http.post(path, json=body)

    assert answer.status_code == 400
    assert answer.json() == {"error": "enabled (boolean) is required"}


def test_push_maintenance_buffers_then_delivers_each_message_once_in_order(
        http: httpx.Client) -> None:
    queue = unique_name()
    push(http, queue, "a", range(0, 3))  # stored before the maintenance window
    switched = set_maintenance(http.base_url, True)
    assert switched["maintenanceMode"] is True and switched["message"]

    answers = push(http, queue, "a", range(3, 43)) + push(http, queue, "b", range(0, 10))

    assert [a["status"] for a in answers] == ["buffered"] * 50
    assert [a["index"] for a in answers] == list(range(40)) + list(range(10))
    assert all(a["queue"] == queue and a["transactionId"] for a in answers)
    assert {a["partition"] for a in answers} == {"a", "b"}
    assert maintenance(http)["bufferedMessages"] == 50
    assert len(pop_all(http, queue)) == 3  # consumers see nothing new meanwhile

    set_maintenance(http.base_url, False)

    wait_until(lambda: maintenance(http)["bufferedMessages"] == 0, 20, 0.1,
               "bufferedMessages back to 0")
    delivered = pop_all(http, queue)
    by_partition = {p: [m["data"]["seq"] for m in delivered if m["partition"] == p]
                    for p in ("a", "b")}
    assert by_partition == {"a": list(range(3, 43)), "b": list(range(10))}
    assert {m["transactionId"] for m in delivered} == {a["transactionId"] for a in answers}


def test_a_push_the_replay_could_not_store_is_refused_instead_of_buffered(
        http: httpx.Client) -> None:
    """PostgreSQL refuses to create a queue whose name holds a percent-escape (``%41``). A
    push to such a queue during maintenance was answered ``buffered``, and its replay went
    to failed/: a message promised and never stored (an upgrade audit found it). It is
    refused now; the request's other items, a percent-escaped partition name included (those
    are allowed), are buffered and stored."""
    queue, escaped = unique_name(), f"{unique_name()}%41x"
    set_maintenance(http.base_url, True)
    answer = http.post("/api/v1/push", json={"items": [
        {"queue": queue, "partition": "p%41", "payload": {"seq": 0}},
        {"queue": escaped, "payload": {"seq": 1}},
        {"queue": queue, "partition": "p%41", "payload": {"seq": 2}}]})
    assert answer.status_code == 201, answer.text
    answers = answer.json()
    assert [a["status"] for a in answers] == ["buffered", "failed", "buffered"], answers
    assert [a["index"] for a in answers] == [0, 1, 2]
    assert "percent-escape (%41)" in answers[1]["error"]
    assert maintenance(http)["bufferedMessages"] == 2

    set_maintenance(http.base_url, False)

    wait_until(lambda: maintenance(http)["bufferedMessages"] == 0, 20, 0.1,
               "bufferedMessages back to 0")
    assert maintenance(http)["bufferStats"]["failedCount"] == 0
    assert [m["data"]["seq"] for m in pop_all(http, queue)] == [0, 2]
    assert http.get(f"/api/v1/resources/queues/{escaped}").status_code == 404


def test_pop_maintenance_answers_204_at_once_even_to_long_polls(http: httpx.Client) -> None:
    queue = unique_name()
    push(http, queue, "Default", range(1))
    switched = set_maintenance(http.base_url, True, pop=True)
    assert switched["popMaintenanceMode"] is True and switched["message"]

    started = time.monotonic()
    paused = http.get(f"/api/v1/pop/queue/{queue}",
                      params={"wait": "true", "timeout": 15000}, timeout=10)
    assert paused.status_code == 204 and time.monotonic() - started < 10
    assert http.get("/api/v1/system/maintenance/pop").json()["popMaintenanceMode"] is True

    set_maintenance(http.base_url, False, pop=True)

    delivered = pop_all(http, queue)
    assert [m["data"]["seq"] for m in delivered] == [0]


def test_pop_maintenance_answers_the_long_polls_already_parked_at_once(
        http: httpx.Client) -> None:
    """They used to stay parked and take the next message pushed meanwhile."""
    queue = unique_name()
    with ThreadPoolExecutor(2) as pool:
        parked = [pool.submit(http.get, f"/api/v1/pop/queue/{queue}",
                              params={"wait": "true", "timeout": 20000}, timeout=30)
                  for _ in range(2)]
        time.sleep(0.5)  # a documented minimum for the pops to park, not a bound
        started = time.monotonic()
        set_maintenance(http.base_url, True, pop=True)
        try:
            push(http, queue, "Default", range(1))
            answers = [p.result() for p in parked]
        finally:
            set_maintenance(http.base_url, False, pop=True)
    assert [a.status_code for a in answers] == [204, 204]
    assert time.monotonic() - started < 10
    assert [m["data"]["seq"] for m in pop_all(http, queue)] == [0]  # nobody took it


def test_a_long_poll_whose_attempt_runs_when_pop_maintenance_comes_on_answers_at_once(
        fleet: Fleet, http: httpx.Client) -> None:
    """The switch answers the pops parked at that moment; one still in PostgreSQL then (here a
    group's first contact, held by a trigger) must not park afterwards for its whole wait."""
    queue = unique_name()
    assert http.post("/api/v1/configure", json={"queue": queue}).status_code == 200
    with closing(psycopg2.connect(Config.from_sources(fleet.pg_env, {}).dsn)) as db, \
            ThreadPoolExecutor(1) as pool:
        db.autocommit = True
        with Trigger(db, "queen.consumer_subscriptions", "BEFORE INSERT",
                     "PERFORM pg_sleep(2);"):
            pending = pool.submit(http.get, f"/api/v1/pop/queue/{queue}", timeout=60,
                                  params={"wait": "true", "timeout": 40000,
                                          "consumerGroup": "latecomer"})
            wait_until(lambda: asleep(db), 10, 0.02, "the pop's first contact in PostgreSQL")
            set_maintenance(http.base_url, True, pop=True)
            answer = pending.result(timeout=20)  # not after its 40 s
    set_maintenance(http.base_url, False, pop=True)
    assert answer.status_code == 204


def test_every_server_of_the_database_follows_the_flags(fleet: Fleet, http: httpx.Client
                                                        ) -> None:
    other = fleet.server(**FAST_FLAGS)
    queue = unique_name()
    set_maintenance(http.base_url, True)

    def other_buffers() -> bool:
        answer = httpx.post(f"{other.url}/api/v1/push", json={"items": [
            {"queue": queue, "payload": {"seq": 0}, "transactionId": "probe"}]}, timeout=10)
        return answer.json()[0]["status"] == "buffered"
    wait_until(other_buffers, 10, 0.1, "the other server buffering")
    set_maintenance(http.base_url, False)

    wait_until(lambda: httpx.get(f"{other.url}/api/v1/system/maintenance",
                                 timeout=10).json()["bufferedMessages"] == 0,
               20, 0.1, "the other server's buffer drained")
    assert [m["transactionId"] for m in pop_all(http, queue)] == ["probe"]


def test_a_server_started_in_maintenance_mode_buffers_from_the_start(
        fleet: Fleet, http: httpx.Client) -> None:
    set_maintenance(http.base_url, True)
    late = fleet.server(**FAST_FLAGS)
    queue = unique_name()

    answer = httpx.post(f"{late.url}/api/v1/push",
                        json={"items": [{"queue": queue, "payload": 1}]}, timeout=10)

    assert answer.json()[0]["status"] == "buffered"
    set_maintenance(http.base_url, False)
    wait_until(lambda: pop_all(http, queue), 20, 0.1, "the buffered message delivered")
