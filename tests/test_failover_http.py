"""The file buffer seen from outside: answers, replay after a restart, records that keep
failing, order within a partition, an unusable buffer directory. Real server, real
PostgreSQL of its own (maintenance mode is cluster-wide: the shared database stays clean).
"""

from __future__ import annotations

import base64
import json
import shutil
import time
from collections.abc import Iterator

import httpx
import pytest

from queen_tw.failover import records

from faultkit import Fleet, private_fleet, set_maintenance, wait_until
from support import ServerProcess, unique_name


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    """Servers on a PostgreSQL private to this module (the flags are cluster-wide)."""
    with private_fleet() as servers:
        yield servers


@pytest.fixture
def maintenance_off(fleet: Fleet) -> Iterator[None]:
    yield
    for process in fleet.servers:
        if process.running:
            httpx.post(f"{process.url}/api/v1/system/maintenance", json={"enabled": False},
                       timeout=10)
            return


def push(url: str, items: list[dict]) -> httpx.Response:
    return httpx.post(f"{url}/api/v1/push", json={"items": items}, timeout=20)


def pop_partition(url: str, queue: str, partition: str) -> list[dict]:
    messages = []
    while True:
        answer = httpx.get(f"{url}/api/v1/pop/queue/{queue}/partition/{partition}",
                           params={"batch": 1000, "autoAck": "true"}, timeout=20)
        if answer.status_code == 204:
            return messages
        assert answer.status_code == 200, answer.text
        messages.extend(answer.json()["messages"])


def status(url: str) -> dict:
    return httpx.get(f"{url}/api/v1/system/maintenance", timeout=10).json()


def test_buffered_answers_carry_what_the_clients_read(fleet: Fleet, maintenance_off) -> None:
    server = fleet.server()
    set_maintenance(server.url, True)
    queue = unique_name()

    answer = push(server.url, [{"queue": queue, "partition": "p", "transactionId": "t-1"},
                               {"queue": queue, "payload": None}])

    assert answer.status_code == 201
    first, second = answer.json()
    assert first == {"index": 0, "status": "buffered", "queue": queue, "partition": "p",
                     "transactionId": "t-1", "transaction_id": "t-1"}
    assert second["partition"] == "Default" and second["transactionId"]  # made by the server
    set_maintenance(server.url, False)
    wait_until(lambda: status(server.url)["bufferedMessages"] == 0, 20)
    delivered = pop_partition(server.url, queue, "Default")
    assert [m["data"] for m in delivered] == [None]  # an explicit null payload survives


def test_a_restarted_server_replays_what_the_killed_one_left(fleet: Fleet, maintenance_off
                                                            ) -> None:
    server = fleet.server()
    queue = unique_name()
    set_maintenance(server.url, True)
    sent = [f"m-{n}" for n in range(30)]
    for tid in sent:
        assert push(server.url, [{"queue": queue, "transactionId": tid,
                                  "payload": {"tid": tid}}]).json()[0]["status"] == "buffered"

    server.kill()
    server.start()
    assert status(server.url)["bufferedMessages"] == 30
    set_maintenance(server.url, False)

    wait_until(lambda: status(server.url)["bufferedMessages"] == 0, 20)
    assert [m["transactionId"] for m in pop_partition(server.url, queue, "Default")] == sent
    assert list(server.buffer_dir.glob("segment-*")) == []


def test_a_torn_record_left_by_a_crash_is_skipped(fleet: Fleet) -> None:
    server = fleet.server(start=False)
    queue = unique_name()
    items = [{"queue": queue, "transactionId": f"t-{n}", "payload": n} for n in range(3)]
    server.buffer_dir.mkdir(parents=True)
    (server.buffer_dir / "segment-000000000001.jsonl").write_bytes(
        records.encode(items[0]) + records.encode(items[1]) + records.encode(items[2])[:-7])

    server.start()

    wait_until(lambda: status(server.url)["bufferedMessages"] == 0, 20)
    assert [m["data"] for m in pop_partition(server.url, queue, "Default")] == [0, 1]
    assert status(server.url)["bufferStats"]["failedCount"] == 0


def test_a_record_postgresql_refuses_fails_alone_and_its_neighbours_are_stored(
        fleet: Fleet) -> None:
    """PostgreSQL refusing one record's data fails the whole call of its partition, good
    records included; the replay must find the one culprit, not fail them all."""
    server = fleet.server(start=False)
    queue = unique_name()
    items = [{"queue": queue, "partition": "p", "transactionId": f"t-{n}", "payload": n}
             for n in range(5)]
    items[2]["traceId"] = "not-a-uuid"  # nothing the HTTP routes would let through
    items.insert(3, {"queue": queue, "partition": "other", "transactionId": "o", "payload": 9})
    server.buffer_dir.mkdir(parents=True)
    (server.buffer_dir / "segment-000000000001.jsonl").write_bytes(
        b"".join(records.encode(entry) for entry in items))

    server.start()

    wait_until(lambda: status(server.url)["bufferedMessages"] == 0, 30, 0.1)
    assert [m["data"] for m in pop_partition(server.url, queue, "p")] == [0, 1, 3, 4]
    assert [m["data"] for m in pop_partition(server.url, queue, "other")] == [9]
    assert status(server.url)["bufferStats"]["failedCount"] == 1
    [failed_file] = list((server.buffer_dir / "failed").iterdir())
    [line] = failed_file.read_bytes().splitlines()
    entry = json.loads(line[9:])
    assert entry["record"]["transactionId"] == "t-2" and "refused" in entry["error"]


def test_a_record_that_keeps_failing_goes_to_failed_and_its_partition_keeps_order(
        fleet: Fleet, maintenance_off) -> None:
    server = fleet.server(FILE_BUFFER_MAX_BATCH="1")
    full, queue = unique_name(), unique_name()
    httpx.post(f"{server.url}/api/v1/configure",
               json={"queue": full, "options": {"maxSize": 1}}, timeout=10)
    assert push(server.url, [{"queue": full, "payload": "fills it"}]).json()[0]["status"] \
        == "queued"
    set_maintenance(server.url, True)
    push(server.url, [{"queue": full, "transactionId": "poison", "payload": "no room"}])
    push(server.url, [{"queue": queue, "partition": "x", "payload": 1}])

    set_maintenance(server.url, False)
    # The poison record is first in the buffer and is retried for a while: meanwhile
    # partition x still has a record waiting, so a new push to x queues behind it, while
    # another partition goes straight to PostgreSQL.
    behind = push(server.url, [{"queue": queue, "partition": "x", "payload": 2}]).json()
    beside = push(server.url, [{"queue": queue, "partition": "y", "payload": 3}]).json()

    assert behind[0]["status"] == "buffered" and beside[0]["status"] == "queued"
    wait_until(lambda: status(server.url)["bufferedMessages"] == 0, 30, 0.1)
    assert [m["data"] for m in pop_partition(server.url, queue, "x")] == [1, 2]
    assert [m["data"] for m in pop_partition(server.url, queue, "y")] == [3]
    stats = status(server.url)["bufferStats"]
    assert stats["failedCount"] == 1 and stats["failedFiles"]["count"] == 1
    [failed_file] = list((server.buffer_dir / "failed").iterdir())
    entry = json.loads(failed_file.read_bytes()[9:-1])
    assert entry["record"]["transactionId"] == "poison" and "max capacity" in entry["error"]


def test_a_record_given_up_on_is_stored_once_its_queue_has_room(
        fleet: Fleet, maintenance_off) -> None:
    """A queue full at replay time sent its buffered push to failed/ for good (answered
    "buffered", never delivered). failed/ now gets further rounds."""
    server = fleet.server(FILE_BUFFER_FAILED_RETRY_MS="500")
    full = unique_name()
    httpx.post(f"{server.url}/api/v1/configure",
               json={"queue": full, "options": {"maxSize": 1}}, timeout=10)
    assert push(server.url, [{"queue": full, "payload": "fills it"}]).json()[0]["status"] \
        == "queued"
    set_maintenance(server.url, True)
    assert push(server.url, [{"queue": full, "transactionId": "late", "payload": "no room"}]
                ).json()[0]["status"] == "buffered"
    set_maintenance(server.url, False)
    wait_until(lambda: status(server.url)["bufferStats"]["failedCount"] == 1, 30, 0.1)
    # Its rounds come while the queue is still full: a live push meanwhile is refused for
    # the capacity, not held in the buffer behind it.
    for n in range(6):
        answer = push(server.url, [{"queue": full, "transactionId": f"live-{n}", "payload": n}])
        assert answer.json()[0]["status"] == "failed", answer.text
        time.sleep(0.5)

    assert [m["data"] for m in pop_partition(server.url, full, "Default")] == ["fills it"]
    assert httpx.delete(f"{server.url}/api/v1/queues/{full}/clear", timeout=10
                        ).status_code == 200

    wait_until(lambda: status(server.url)["bufferStats"]["failedCount"] == 0, 30, 0.1)
    assert [m["data"] for m in pop_partition(server.url, full, "Default")] == ["no room"]
    assert list((server.buffer_dir / "failed").iterdir()) == []


def test_a_due_timer_fires_only_after_the_buffered_pushes_of_its_partition() -> None:
    """A fired timer is a push: it must not overtake what this instance's buffer holds for
    its partition. The replay is slowed down (one record a call, a backlog in front). The
    instance is alone on its PostgreSQL: another one's sweeper, knowing nothing of this
    buffer, may fire the timer first (README's caveat on buffers of several instances)."""
    with private_fleet() as own:
        _timer_waits_for_the_buffer(own.server(FILE_BUFFER_MAX_BATCH="1",
                                               QUEEN_TIMERS_SWEEP_INTERVAL_MS="50"))


def _timer_waits_for_the_buffer(server: ServerProcess) -> None:
    queue = unique_name()
    answer = httpx.post(f"{server.url}/api/v1/timers", timeout=10, json={"operations": [{
        "op": "schedule", "queue": queue, "partition": "p", "timerKey": "k",
        "payload": base64.b64encode(b'"timer"').decode(), "delayMs": 1500, "txn": "timer"}]})
    assert answer.status_code == 200, answer.text
    set_maintenance(server.url, True)
    for start in range(0, 300, 100):
        push(server.url, [{"queue": queue, "partition": "filler", "payload": n}
                          for n in range(start, start + 100)])
    assert push(server.url, [{"queue": queue, "partition": "p", "payload": "pushed"}]
                ).json()[0]["status"] == "buffered"
    time.sleep(2)  # the timer is due now; maintenance holds it

    set_maintenance(server.url, False)

    wait_until(lambda: status(server.url)["bufferedMessages"] == 0, 60, 0.1)
    wait_until(lambda: not httpx.get(f"{server.url}/api/v1/timers/{queue}/k", timeout=10
                                     ).json()["found"], 20, 0.1)  # fired
    assert [m["data"] for m in pop_partition(server.url, queue, "p")] == ["pushed", "timer"]


def test_a_buffer_directory_lost_while_serving_answers_503_never_buffered(
        fleet: Fleet, maintenance_off) -> None:
    # (one unusable at start stops the server instead: tests/test_startup.py)
    server = fleet.server()
    shutil.rmtree(server.buffer_dir)  # nothing buffered yet: only the directory's lock file
    server.buffer_dir.write_text("a regular file where the buffer directory was")
    queue = unique_name()
    set_maintenance(server.url, True)

    refused = push(server.url, [{"queue": queue, "payload": 1}])

    assert refused.status_code == 503
    assert refused.json()["error"].startswith("File buffer unavailable")
    assert status(server.url)["bufferHealthy"] is False
    set_maintenance(server.url, False)
    assert push(server.url, [{"queue": queue, "payload": 2}]).json()[0]["status"] == "queued"


def test_each_worker_process_has_its_own_buffer_directory(fleet: Fleet, maintenance_off
                                                          ) -> None:
    server = fleet.server(NUM_WORKERS="2", WORKER_ID="w")
    queue = unique_name()
    set_maintenance(server.url, True)
    # both workers learn the flag within their (one second) re-read
    wait_until(lambda: all(push(server.url, [{"queue": queue, "payload": "probe"}]).json()[0]
                           ["status"] == "buffered" for _ in range(6)), 10, 0.2,
               "every worker buffering")

    # The kernel decides which worker accepts a connection; push (each on a new
    # connection) until both have buffered something, within a bound.
    def worker_dirs():
        return sorted(p.name for p in server.buffer_dir.iterdir() if p.is_dir())

    # A worker that has not re-read the flags yet (1 s between siblings) still stores
    # directly: such an answer is "queued", and the message must be delivered all the same.
    time.sleep(1.5)
    statuses = []
    while len(statuses) < 40 or (worker_dirs() != ["w-1", "w-2"] and len(statuses) < 400):
        statuses.append(push(server.url, [{"queue": queue, "payload": len(statuses)}])
                        .json()[0]["status"])
    pushed = len(statuses)

    assert set(statuses) <= {"buffered", "queued"}
    assert worker_dirs() == ["w-1", "w-2"]
    set_maintenance(server.url, False)
    wait_until(lambda: not list(server.buffer_dir.glob("*/segment-*")), 20, 0.1,
               "both workers' buffers drained")
    delivered = pop_partition(server.url, queue, "Default")
    assert sorted(m["data"] for m in delivered if m["data"] != "probe") == list(range(pushed))


def test_a_transaction_pushing_to_a_buffered_partition_is_refused_until_it_drained(
        fleet: Fleet, maintenance_off) -> None:
    server = fleet.server()
    queue = unique_name()
    set_maintenance(server.url, True)
    assert push(server.url, [{"queue": queue, "payload": 1}]).json()[0]["status"] == "buffered"
    transaction = {"operations": [{"type": "push", "items": [{"queue": queue, "payload": 2}]}]}

    refused = httpx.post(f"{server.url}/api/v1/transaction", json=transaction, timeout=10)

    assert refused.status_code == 503 and "file buffer" in refused.json()["error"]
    set_maintenance(server.url, False)
    wait_until(lambda: status(server.url)["bufferedMessages"] == 0, 20)
    accepted = httpx.post(f"{server.url}/api/v1/transaction", json=transaction, timeout=10)
    assert accepted.status_code == 200 and accepted.json()["success"] is True
    assert [m["data"] for m in pop_partition(server.url, queue, "Default")] == [1, 2]
