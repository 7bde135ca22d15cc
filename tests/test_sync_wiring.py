"""The UDP peer sync wired into the server (issue #16, WIRE 3.7 and 6.1).

Two real ``twistd queen`` instances over the test session's PostgreSQL sync over loopback
UDP. Their fallbacks are set far out of reach (``POP_WAIT_*`` and the maintenance re-read at
10 minutes, the queue config cache trusted for 10 minutes), so within a test only a
datagram can explain what one instance learns of the other. Startup refusals run the real
``twistd`` as tests/test_startup.py does.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Dict, List, Optional

import httpx
import pytest
import pytest_twisted
from twisted.internet import task

from queen_tw.cluster.config_cache import QueueConfigCache, wire_config
from queen_tw.cluster.pg_wakeups import PostgresWakeups
from queen_tw.cluster.sibling_bus import SiblingBus
from queen_tw.cluster.worker_names import worker_name
from queen_tw.db.pool import Database
from queen_tw.failover.buffer import FileBuffer
from queen_tw.maintenance import Maintenance

from tests.http_helpers import configure, pop
from tests.process_helpers import assert_refused_with, run_queen
from tests.support import (
    TEST_ENCRYPTION_KEY,
    ServerProcess,
    count_messages,
    unique_name,
    wait_until,
    wait_until_reactor,
)

FAR_MS = "600000"
"""Ten minutes: no fallback timer fires within a test."""
PARKING_MOMENT_S = 0.5
"""A documented minimum, not a bound: time for a pop's first attempt to come back empty so it
parks. If a loaded machine needs longer, that attempt finds the message itself and the test
passes without exercising the datagram (the counters asserted alongside still must move)."""

SHARED_STATE_ROUTES = ("/api/v1/system/shared-state", "/internal/api/shared-state/stats",
                       "/internal/api/inter-instance/stats")


def free_udp_port() -> int:
    """A loopback UDP port nothing is bound to right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def sync_env(own_port: int, peer_port: int, worker_id: str, **extra: str) -> Dict[str, str]:
    """An instance syncing with the one on ``peer_port``, with every fallback out of reach."""
    return {"QUEEN_UDP_PEERS": f"http://127.0.0.1:{peer_port}/",
            "QUEEN_UDP_NOTIFY_PORT": str(own_port), "QUEEN_SYNC_SECRET": "wiring-test",
            "QUEEN_SYNC_HEARTBEAT_MS": "200", "QUEEN_SYNC_DEAD_THRESHOLD_MS": "3000",
            "POP_WAIT_INITIAL_INTERVAL_MS": FAR_MS, "POP_WAIT_MAX_INTERVAL_MS": FAR_MS,
            "QUEEN_CACHE_REFRESH_INTERVAL_MS": FAR_MS, "QUEEN_QUEUE_CONFIG_TTL_MS": FAR_MS,
            "QUEEN_ENCRYPTION_KEY": TEST_ENCRYPTION_KEY, "WORKER_ID": worker_id, **extra}


class Pair:
    """Two synced instances and a client for each."""

    def __init__(self, a: ServerProcess, b: ServerProcess):
        self.a, self.b = a, b
        self.to_a = httpx.Client(base_url=a.url, timeout=45)
        self.to_b = httpx.Client(base_url=b.url, timeout=45)

    def close(self) -> None:
        self.to_a.close()
        self.to_b.close()


def start_pair(pg_env: Dict[str, str], workdir: Path, a_extra: Optional[Dict[str, str]] = None,
               b_extra: Optional[Dict[str, str]] = None) -> Pair:
    udp_a, udp_b = free_udp_port(), free_udp_port()
    a = ServerProcess(pg_env, workdir / "a", sync_env(udp_a, udp_b, "sync-a", **(a_extra or {})))
    b = ServerProcess(pg_env, workdir / "b", sync_env(udp_b, udp_a, "sync-b", **(b_extra or {})))
    a.start(timeout=60)
    b.start(timeout=60)
    pair = Pair(a, b)
    wait_until(lambda: all(shared_state(c).get("server_health", {}).get("servers_alive") == 1
                           for c in (pair.to_a, pair.to_b)),
               message="each instance hearing the other's heartbeats")
    return pair


def running_pair(pg_env: Dict[str, str], prefix: str,
                 a_extra: Optional[Dict[str, str]] = None,
                 b_extra: Optional[Dict[str, str]] = None) -> Iterator[Pair]:
    """A started pair in a fresh directory, stopped and removed afterwards (for fixtures)."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    made = start_pair(pg_env, workdir, a_extra, b_extra)
    try:
        yield made
    finally:
        made.close()
        for server in (made.a, made.b):
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def pair(pg_env: Dict[str, str]) -> Iterator[Pair]:
    yield from running_pair(pg_env, "queen-tw-sync-")


def shared_state(client: httpx.Client) -> Dict[str, Any]:
    answer = client.get("/api/v1/system/shared-state")
    assert answer.status_code == 200, answer.text
    return answer.json()


class LongPoll(threading.Thread):
    """One long-poll pop in the background; ``answer`` once it is done."""

    def __init__(self, base_url: str, queue: str, timeout_ms: int = 20000, **params: str):
        super().__init__(daemon=True)
        self._url = base_url
        self._path = f"/api/v1/pop/queue/{queue}"
        self._params = {"wait": "true", "timeout": str(timeout_ms), **params}
        self.answer: Optional[httpx.Response] = None

    def run(self) -> None:
        with httpx.Client(base_url=self._url, timeout=60) as client:
            self.answer = client.get(self._path, params=self._params)

    def result(self) -> httpx.Response:
        self.join(60)
        assert self.answer is not None, "the long-poll did not answer"
        return self.answer


def parked(base_url: str, queue: str, count: int = 1) -> List[LongPoll]:
    polls = [LongPoll(base_url, queue) for _ in range(count)]
    for poll in polls:
        poll.start()
    time.sleep(PARKING_MOMENT_S)
    return polls


def push_items(client: httpx.Client, items: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    answer = client.post("/api/v1/push", json={"items": items})
    assert answer.status_code == 201, answer.text
    return answer.json()


# --- wake-ups -----------------------------------------------------------------------------


def test_a_push_on_one_instance_wakes_a_long_poll_parked_on_its_peer(pair: Pair) -> None:
    queue = unique_name()
    configure(pair.to_a, queue)
    sent_before = shared_state(pair.to_a)["transport"]["messages_sent"]
    [poll] = parked(pair.b.url, queue)

    push_items(pair.to_a, [{"queue": queue, "payload": "from-a"}])

    answer = poll.result()
    assert answer.status_code == 200, "the pop on B timed out: no MESSAGE_AVAILABLE arrived"
    assert answer.json()["messages"][0]["data"] == "from-a"
    assert shared_state(pair.to_a)["transport"]["messages_sent"] > sent_before


def test_a_batch_over_many_partitions_wakes_a_parked_pop_per_partition(pair: Pair) -> None:
    queue = unique_name()
    configure(pair.to_a, queue)
    polls = parked(pair.b.url, queue, count=3)

    push_items(pair.to_a, [{"queue": queue, "partition": f"p{n % 3}", "payload": n}
                           for n in range(30)])  # one request: 10 messages per partition

    answers = [poll.result() for poll in polls]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert sorted(a.json()["messages"][0]["partition"] for a in answers) == ["p0", "p1", "p2"]


def test_an_ack_ending_a_lease_on_one_instance_wakes_a_pop_parked_on_its_peer(
        pair: Pair) -> None:
    """The next consumer of a partition waits on B while A's consumer holds its lease: the
    ack on A that ends the delivery used to wake only A's pops."""
    queue = unique_name()
    configure(pair.to_a, queue)
    push_items(pair.to_a, [{"queue": queue, "payload": n} for n in ("first", "second")])
    held = pop(pair.to_a, queue, batch=1)["messages"][0]
    [poll] = parked(pair.b.url, queue)  # the partition is leased: nothing to take yet

    acked = pair.to_a.post("/api/v1/ack", json={
        "transactionId": held["transactionId"], "partitionId": held["partitionId"],
        "leaseId": held["leaseId"], "status": "completed"})
    assert acked.json()[0]["leaseReleased"] is True, acked.text

    answer = poll.result()
    assert answer.status_code == 200, "the pop on B timed out: no wake-up arrived"
    assert answer.json()["messages"][0]["data"] == "second"


def test_internal_notify_on_one_instance_wakes_pops_parked_on_its_peer(pair: Pair, db) -> None:
    queue = unique_name()
    configure(pair.to_a, queue)
    [poll] = parked(pair.b.url, queue)
    with db.cursor() as cursor:  # a push neither server hears about
        cursor.execute("SELECT queen.push_messages_v2(%s::jsonb)",
                       (f'[{{"queue": "{queue}", "payload": "outside"}}]',))

    assert pair.to_a.post("/internal/api/notify", json={"queue": queue}).json() == {
        "status": "ok"}

    answer = poll.result()
    assert answer.status_code == 200 and answer.json()["messages"][0]["data"] == "outside"


# --- queue configs ------------------------------------------------------------------------


def _stored_encrypted(db, queue: str) -> List[bool]:
    with db.cursor() as cursor:
        cursor.execute("""SELECT m.is_encrypted FROM queen.messages m
                            JOIN queen.partitions p ON p.id = m.partition_id
                            JOIN queen.queues q ON q.id = p.queue_id
                           WHERE q.name = %s ORDER BY m.created_at, m.id""", (queue,))
        return [row[0] for row in cursor.fetchall()]


def test_encryption_switched_on_on_one_instance_is_honoured_by_its_peer_at_once(
        pair: Pair, db) -> None:
    queue = unique_name()
    push_items(pair.to_b, [{"queue": queue, "payload": "plain"}])  # B caches "not encrypted"
    cache_before = shared_state(pair.to_b)["queue_config_cache"]

    configure(pair.to_a, queue, encryptionEnabled=True)

    # B trusts its cache for 10 minutes: only the peer's QUEUE_CONFIG_SET can change it
    def pushed_encrypted() -> bool:
        push_items(pair.to_b, [{"queue": queue, "payload": "secret"}])
        return _stored_encrypted(db, queue)[-1]

    wait_until(pushed_encrypted, interval=0.05, message="B storing the queue's pushes sealed")
    cache_after = shared_state(pair.to_b)["queue_config_cache"]
    assert cache_after["hits"] > cache_before["hits"]
    assert cache_after["misses"] == cache_before["misses"]  # never re-read from PostgreSQL
    assert _stored_encrypted(db, queue)[0] is False
    delivered = [m["data"] for m in pop(pair.to_a, queue, batch=100)["messages"]]
    assert delivered[0] == "plain" and set(delivered[1:]) == {"secret"}  # all readable


def test_a_queue_deleted_on_one_instance_is_dropped_from_its_peer_cache(pair: Pair) -> None:
    queue = unique_name()
    configure(pair.to_a, queue, encryptionEnabled=True)
    wait_until(lambda: shared_state(pair.to_b)["queue_config_cache"]["size"] > 0)
    push_items(pair.to_b, [{"queue": queue, "payload": 1}])
    size_with_queue = shared_state(pair.to_b)["queue_config_cache"]["size"]

    assert pair.to_a.delete(f"/api/v1/resources/queues/{queue}").status_code == 200

    wait_until(lambda: shared_state(pair.to_b)["queue_config_cache"]["size"] < size_with_queue,
               message="B forgetting the deleted queue")


# --- maintenance --------------------------------------------------------------------------


def test_maintenance_switched_on_one_instance_applies_on_its_peer_at_once(pair: Pair,
                                                                          db) -> None:
    queue = unique_name()
    configure(pair.to_b, queue)
    try:
        assert pair.to_a.post("/api/v1/system/maintenance",
                              json={"enabled": True}).status_code == 200
        wait_until(lambda: shared_state(pair.to_b)["maintenance_mode"],
                   message="B applying A's maintenance mode")

        [result] = push_items(pair.to_b, [{"queue": queue, "payload": "held"}])
        assert result["status"] == "buffered"
        [poll] = parked(pair.a.url, queue)  # woken only by B announcing its replay
    finally:
        pair.to_a.post("/api/v1/system/maintenance", json={"enabled": False})

    wait_until(lambda: not shared_state(pair.to_b)["maintenance_mode"],
               message="B leaving maintenance mode")
    wait_until(lambda: count_messages(db, queue) == 1, message="B's buffer draining")
    answer = poll.result()
    assert answer.status_code == 200 and answer.json()["messages"][0]["data"] == "held"


def test_pop_maintenance_switched_on_one_instance_applies_on_its_peer(pair: Pair) -> None:
    queue = unique_name()
    configure(pair.to_b, queue)
    push_items(pair.to_b, [{"queue": queue, "payload": "waiting"}])
    try:
        pair.to_a.post("/api/v1/system/maintenance/pop", json={"enabled": True})
        wait_until(lambda: shared_state(pair.to_b)["pop_maintenance_mode"])

        assert pair.to_b.get(f"/api/v1/pop/queue/{queue}").status_code == 204
    finally:
        pair.to_a.post("/api/v1/system/maintenance/pop", json={"enabled": False})
    wait_until(lambda: not shared_state(pair.to_b)["pop_maintenance_mode"])
    assert pop(pair.to_b, queue)["messages"][0]["data"] == "waiting"


def test_pop_maintenance_set_on_one_instance_answers_the_pops_parked_on_its_peer(
        pair: Pair) -> None:
    queue = unique_name()
    configure(pair.to_b, queue)
    polls = parked(pair.b.url, queue, count=2)
    try:
        started = time.monotonic()
        pair.to_a.post("/api/v1/system/maintenance/pop", json={"enabled": True})
        answers = [poll.result() for poll in polls]
        waited = time.monotonic() - started
        push_items(pair.to_a, [{"queue": queue, "payload": "after"}])
    finally:
        pair.to_a.post("/api/v1/system/maintenance/pop", json={"enabled": False})
    assert [a.status_code for a in answers] == [204, 204]
    assert waited < 10, f"answered after {waited:.1f} s: at their 20 s timeout, not at once"
    wait_until(lambda: not shared_state(pair.to_b)["pop_maintenance_mode"])
    assert pop(pair.to_b, queue)["messages"][0]["data"] == "after"


# --- shared state -------------------------------------------------------------------------


def test_shared_state_reports_every_field_from_live_counters(pair: Pair) -> None:
    queue = unique_name()
    push_items(pair.to_a, [{"queue": queue, "payload": "x"}])

    bodies = [pair.to_a.get(route).json() for route in SHARED_STATE_ROUTES]

    body = bodies[0]
    assert {"enabled", "running", "server_id", "transport", "queue_config_cache",
            "server_health", "maintenance_mode", "pop_maintenance_mode"} <= set(body)
    assert body["enabled"] is True and body["running"] is True
    assert body["server_id"] == f"{socket.gethostname()}:{pair.a.env['QUEEN_UDP_NOTIFY_PORT']}"
    transport = body["transport"]
    assert {"server_id", "session_id", "port", "peer_count", "peers",
            "learned_identities_count", "learned_identities", "messages_sent",
            "messages_received", "messages_dropped", "signature_failures",
            "sequence_rejections"} <= set(transport)
    assert transport["peer_count"] == 1
    assert transport["messages_sent"] > 0 and transport["messages_received"] > 0
    assert transport["learned_identities_count"] == 1
    assert set(body["queue_config_cache"]) == {"size", "hits", "misses", "hit_rate"}
    assert body["queue_config_cache"]["misses"] > 0  # the push read its queue's flag
    health = body["server_health"]
    assert health["servers_tracked"] == 1 and health["servers_alive"] == 1
    assert health["heartbeats_received"] > 0
    assert all(each["server_id"] == body["server_id"] for each in bodies[1:])
    assert pair.to_a.get("/health").json()["shared_state"] == {"enabled": True}


def test_garbage_datagrams_are_counted_as_dropped_and_the_server_keeps_serving(
        pair: Pair) -> None:
    dropped_before = shared_state(pair.to_b)["transport"]["messages_dropped"]
    port = int(pair.b.env["QUEEN_UDP_NOTIFY_PORT"])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        for garbage in (b"", b"QTW", b"\x00" * 100, b"QTW\x01" + b"\xff" * 60):
            sender.sendto(garbage, ("127.0.0.1", port))

    wait_until(lambda: shared_state(pair.to_b)["transport"]["messages_dropped"]
               >= dropped_before + 3, message="B counting the garbage")
    assert pair.to_b.get("/health").status_code == 200


def test_the_synced_instances_logged_no_traceback(pair: Pair) -> None:
    """Runs after the tests above used the pair: nothing they did raised anywhere."""
    for server in (pair.a, pair.b):
        log = server.log_text()
        assert "peer sync listening on UDP 127.0.0.1" in log
        assert "Traceback" not in log and "Unhandled" not in log, server.log_tail(80)


def test_without_peers_shared_state_is_not_initialized(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for route in SHARED_STATE_ROUTES:
            answer = client.get(route)
            assert answer.status_code == 200
            assert answer.json() == {"enabled": False, "reason": "not_initialized"}
        assert client.get("/health").json()["shared_state"] == {"enabled": False}


def test_sync_disabled_keeps_the_udp_port_closed_even_with_peers(make_server) -> None:
    udp = free_udp_port()
    server = make_server(QUEEN_UDP_PEERS="127.0.0.1:9", QUEEN_UDP_NOTIFY_PORT=str(udp),
                         QUEEN_SYNC_ENABLED="false")

    assert httpx.get(f"{server.url}/api/v1/system/shared-state").json() == {
        "enabled": False, "reason": "not_initialized"}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", udp))  # nobody holds it


# --- NUM_WORKERS --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair_with_workers(pg_env: Dict[str, str]) -> Iterator[Pair]:
    yield from running_pair(pg_env, "queen-tw-sync-workers-", a_extra={"NUM_WORKERS": "2"})


def test_with_workers_one_socket_carries_wake_ups_both_ways(pair_with_workers: Pair) -> None:
    pair = pair_with_workers
    queue = unique_name()
    configure(pair.to_b, queue)
    partitions = [f"p{n}" for n in range(6)]

    # pops parked on A's two workers (the kernel spreads the connections), pushes on B
    polls = parked(pair.a.url, queue, count=len(partitions))
    push_items(pair.to_b, [{"queue": queue, "partition": p, "payload": p} for p in partitions])
    answers = [poll.result() for poll in polls]
    assert [a.status_code for a in answers] == [200] * len(partitions)

    # pops parked on B, one push request per partition on A (either worker takes each)
    other = unique_name()  # the first queue's partitions stay leased by the pops above
    configure(pair.to_b, other)
    polls = parked(pair.b.url, other, count=len(partitions))
    for p in partitions:
        with httpx.Client(base_url=pair.a.url, timeout=10) as fresh:  # a new connection each
            push_items(fresh, [{"queue": other, "partition": p, "payload": p}])
    answers = [poll.result() for poll in polls]
    assert [a.status_code for a in answers] == [200] * len(partitions)

    # whichever worker answers, shared-state shows the instance's one socket
    for _ in range(6):
        with httpx.Client(base_url=pair.a.url, timeout=10) as fresh:
            body = shared_state(fresh)
        assert body["running"] is True and body["server_health"]["servers_alive"] == 1
        assert body["transport"]["port"] == int(pair.a.env["QUEEN_UDP_NOTIFY_PORT"])


def _fresh(url: str) -> httpx.Client:
    """A client on a new connection: the kernel may hand it to either worker."""
    return httpx.Client(base_url=url, timeout=10)


def test_with_workers_encryption_switched_on_by_a_peer_reaches_every_worker(
        pair_with_workers: Pair, db) -> None:
    pair = pair_with_workers
    queue = unique_name()
    for n in range(8):  # every worker of A caches the queue as plain, for ten minutes
        with _fresh(pair.a.url) as client:
            push_items(client, [{"queue": queue, "payload": f"plain-{n}"}])

    configure(pair.to_b, queue, encryptionEnabled=True)

    def next_pushes_sealed() -> bool:
        stored_before = len(_stored_encrypted(db, queue))
        for n in range(8):
            with _fresh(pair.a.url) as client:
                push_items(client, [{"queue": queue, "payload": f"secret-{n}"}])
        return all(_stored_encrypted(db, queue)[stored_before:])

    wait_until(next_pushes_sealed, message="A sealing the queue's pushes")
    # a lucky round may have met one worker only: from now on every round must be sealed
    assert all(next_pushes_sealed() for _ in range(4)), "a worker of A still stores plaintext"


def test_with_workers_changes_made_through_any_worker_reach_the_peer(
        pair_with_workers: Pair, db) -> None:
    pair = pair_with_workers
    queues = [unique_name() for _ in range(6)]
    push_items(pair.to_b, [{"queue": q, "payload": "plain"} for q in queues])  # B caches plain

    for queue in queues:  # each through whichever worker takes the connection
        with _fresh(pair.a.url) as client:
            configure(client, queue, encryptionEnabled=True)

    def b_seals_them_all() -> bool:
        push_items(pair.to_b, [{"queue": q, "payload": "secret"} for q in queues])
        return all(_stored_encrypted(db, q)[-1] for q in queues)

    wait_until(b_seals_them_all, message="B sealing the pushes of every queue configured on A")
    try:
        for enabled in (True, False, True, False):
            with _fresh(pair.a.url) as client:
                client.post("/api/v1/system/maintenance/pop", json={"enabled": enabled})
            wait_until(lambda on=enabled: shared_state(pair.to_b)["pop_maintenance_mode"] is on,
                       message=f"B applying pop maintenance {enabled} set on A")
    finally:
        pair.to_a.post("/api/v1/system/maintenance/pop", json={"enabled": False})


@pytest.fixture(scope="module")
def pair_both_with_workers(pg_env: Dict[str, str]) -> Iterator[Pair]:
    yield from running_pair(pg_env, "queen-tw-sync-both-workers-",
                            a_extra={"NUM_WORKERS": "2"}, b_extra={"NUM_WORKERS": "2"})


def datagrams_sent(pair: Pair) -> int:
    return sum(shared_state(c)["transport"]["messages_sent"] for c in (pair.to_a, pair.to_b))


def test_two_instances_with_workers_do_not_echo_each_others_notices(
        pair_both_with_workers: Pair) -> None:
    """Both instances' workers hear every NOTIFY of the database. Relaying the other
    instance's notices made A and B echo one push or one maintenance toggle without end
    (thousands of datagrams a second, the flags flipping on and off on every worker)."""
    pair = pair_both_with_workers
    push_items(pair.to_a, [{"queue": unique_name(), "payload": 1}])
    for enabled in (True, False):
        answer = pair.to_a.post("/api/v1/system/maintenance", json={"enabled": enabled})
        assert answer.status_code == 200, answer.text

    def off_on(url: str) -> bool:
        with _fresh(url) as client:  # a new connection: either worker may take it
            return shared_state(client)["maintenance_mode"] is False

    def settled() -> bool:  # every worker of both instances sees maintenance off
        return all(off_on(url) for url in (pair.a.url, pair.b.url) for _ in range(4))

    wait_until(settled, message="maintenance off on every worker")
    before, started = datagrams_sent(pair), time.monotonic()
    time.sleep(3)  # a window to measure a rate in, not a wait for an event
    rate = (datagrams_sent(pair) - before) / (time.monotonic() - started)
    assert rate < 100, f"{rate:.0f} datagrams/s: the instances echo each other"  # heartbeats: ~10
    queue = unique_name()
    statuses = set()
    for n, url in enumerate([pair.a.url, pair.b.url] * 4):
        with _fresh(url) as client:
            statuses.add(push_items(client, [{"queue": queue, "payload": n}])[0]["status"])
    assert statuses == {"queued"}


def test_the_instances_with_workers_logged_no_traceback(pair_with_workers: Pair) -> None:
    for server in (pair_with_workers.a, pair_with_workers.b):
        log = server.log_text()
        assert "Traceback" not in log and "Unhandled" not in log, server.log_tail(80)


# --- startup refusals ---------------------------------------------------------------------


def test_a_bad_peer_entry_refuses_to_start_naming_the_setting(tmp_path: Path) -> None:
    result = run_queen("--host", "127.0.0.1", "--port", "0",
                       env={"FILE_BUFFER_DIR": str(tmp_path / "b"),
                            "QUEEN_UDP_PEERS": "10.0.0.1:6633,bad host:1"})

    assert_refused_with(result, "QUEEN_UDP_PEERS: peer 'bad host:1': 'bad host' is not a host "
                                "name or IPv4 address")


def test_an_invalid_udp_port_refuses_to_start_naming_the_setting(tmp_path: Path) -> None:
    result = run_queen("--host", "127.0.0.1", "--port", "0",
                       env={"FILE_BUFFER_DIR": str(tmp_path / "b"),
                            "QUEEN_UDP_PEERS": "127.0.0.1", "QUEEN_UDP_NOTIFY_PORT": "70000"})

    assert_refused_with(result, "QUEEN_UDP_NOTIFY_PORT: must be between 0 and 65535, got 70000")


def test_a_dead_threshold_within_one_heartbeat_refuses_to_start(tmp_path: Path) -> None:
    result = run_queen("--host", "127.0.0.1", "--port", "0",
                       env={"FILE_BUFFER_DIR": str(tmp_path / "b"),
                            "QUEEN_SYNC_HEARTBEAT_MS": "1000",
                            "QUEEN_SYNC_DEAD_THRESHOLD_MS": "1000"})

    assert_refused_with(result, "QUEEN_SYNC_DEAD_THRESHOLD_MS: must be more than "
                                "QUEEN_SYNC_HEARTBEAT_MS (1000), got 1000")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_udp_port_in_use_refuses_to_start_with_one_line(tmp_path: Path, workers: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("127.0.0.1", 0))
        taken = holder.getsockname()[1]
        result = run_queen("--host", "127.0.0.1", "--port", "0", "--num-workers", workers,
                           env={"FILE_BUFFER_DIR": str(tmp_path / "b"),
                                "QUEEN_UDP_PEERS": "127.0.0.1:9",
                                "QUEEN_UDP_NOTIFY_PORT": str(taken)})

    assert_refused_with(result, f"cannot listen on UDP 127.0.0.1:{taken}: address already in "
                                "use (set QUEEN_UDP_NOTIFY_PORT)")


# --- maintenance flags from a peer, on their own --------------------------------------------


@pytest.fixture
def flags(tmp_path: Path) -> Maintenance:
    """A Maintenance whose database is never reached (peer changes need none)."""
    clock = task.Clock()
    return Maintenance(Database("host=/nonexistent", 1, clock),
                       FileBuffer(str(tmp_path / "buffer"), 10), clock)


def test_a_peer_flag_applies_at_once_and_is_not_announced_back(flags: Maintenance) -> None:
    announced: List[Any] = []
    flags.announce_changes_to(lambda key, enabled: announced.append((key, enabled)))

    flags.apply_from_peer("maintenance_mode", True)
    flags.apply_from_peer("pop_maintenance_mode", True)

    assert flags.maintenance_mode and flags.pop_maintenance_mode
    assert announced == []  # only changes made here are announced: no echo between peers


@pytest.mark.parametrize("key, enabled", [("maintenance_mode", "true"), ("other_flag", True),
                                          ("pop_maintenance_mode", 1)])
def test_a_malformed_peer_flag_is_ignored(flags: Maintenance, key: str, enabled: Any) -> None:
    flags.apply_from_peer(key, enabled)

    assert not flags.maintenance_mode and not flags.pop_maintenance_mode


class RecordingPeers:
    """Stands in for the UDP side of worker 1: records what would be announced."""

    def __init__(self) -> None:
        self.said: List[Any] = []

    def announce_config_set(self, queue: str, config: Dict[str, Any]) -> None:
        self.said.append(("config_set", queue))

    def announce_config_delete(self, queue: str) -> None:
        self.said.append(("config_delete", queue))

    def announce_maintenance(self, key: str, enabled: bool) -> None:
        self.said.append(("maintenance", key, enabled))


def test_worker_1_applies_and_forwards_a_sibling_change(flags: Maintenance) -> None:
    cache = QueueConfigCache(task.Clock(), ttl=60)
    bus, peers = SiblingBus(cache, flags), RecordingPeers()
    bus.forward_to(peers)

    bus.received({"kind": "config_set", "queue": "q", "config": {"encryption_enabled": True},
                  "sender": "w2"})
    bus.received({"kind": "maintenance", "key": "maintenance_mode", "enabled": True,
                  "sender": "w2"})

    assert cache.encrypted(["q"]) == {"q": True} and flags.maintenance_mode
    assert peers.said == [("config_set", "q"), ("maintenance", "maintenance_mode", True)]


@pytest.mark.parametrize("notice", [
    {"kind": "config_set", "queue": "q", "config": "x"},
    {"kind": "config_delete", "queue": 7},
    {"kind": "maintenance", "key": "other", "enabled": True},
    {"kind": "maintenance", "key": "maintenance_mode", "enabled": "on"},
    {"kind": "unknown"}, {},
])
def test_a_malformed_sibling_notice_changes_nothing(flags: Maintenance,
                                                    notice: Dict[str, Any]) -> None:
    cache = QueueConfigCache(task.Clock(), ttl=60)
    cache.store({"q": False})
    bus, peers = SiblingBus(cache, flags), RecordingPeers()
    bus.forward_to(peers)

    bus.received(notice)

    assert cache.encrypted(["q"]) == {"q": False} and not flags.maintenance_mode
    assert peers.said == []


# --- the cache on its own -----------------------------------------------------------------


def test_cache_entries_expire_after_the_ttl() -> None:
    clock = task.Clock()
    cache = QueueConfigCache(clock, ttl=5.0)
    cache.store({"q": True})

    clock.advance(4.9)
    assert cache.encrypted(["q"]) == {"q": True}
    clock.advance(0.2)
    assert cache.encrypted(["q"]) == {}
    assert cache.stats() == {"size": 1, "hits": 1, "misses": 1, "hit_rate": 0.5}


def test_cache_with_zero_ttl_never_answers() -> None:
    cache = QueueConfigCache(task.Clock(), ttl=0)
    cache.store({"q": True})

    assert cache.encrypted(["q"]) == {}
    assert cache.stats()["size"] == 0


def test_cache_keeps_at_most_max_entries_dropping_the_oldest() -> None:
    cache = QueueConfigCache(task.Clock(), ttl=60, max_entries=2)
    cache.store({"a": False})
    cache.store({"b": False})
    cache.store({"c": True})

    assert cache.encrypted(["a", "b", "c"]) == {"b": False, "c": True}


def test_a_read_overtaken_by_a_change_is_not_cached() -> None:
    cache = QueueConfigCache(task.Clock(), ttl=60)
    before = cache.changes  # a push starts reading the flag of "q" from PostgreSQL

    cache.apply_peer_config("q", {"encryption_enabled": True})  # a peer's configure lands
    cache.remember_read({"q": False}, before)  # the read returns the row it saw earlier

    assert cache.encrypted(["q"]) == {"q": True}


def test_a_read_with_no_change_meanwhile_is_cached() -> None:
    cache = QueueConfigCache(task.Clock(), ttl=60)

    cache.remember_read({"q": False}, cache.changes)

    assert cache.encrypted(["q"]) == {"q": False}


@pytest.mark.parametrize("config", [{"encryption_enabled": "yes"}, {}, ["x"], None])
def test_a_peer_config_without_a_boolean_flag_drops_the_entry(config: Any) -> None:
    cache = QueueConfigCache(task.Clock(), ttl=60)
    cache.store({"q": False})

    cache.apply_peer_config("q", config)

    assert cache.encrypted(["q"]) == {}  # the next push reads PostgreSQL


def test_wire_config_names_the_fields_of_wire_6_1() -> None:
    answer = {"queueId": "id-1", "namespace": "ns", "task": "t",
              "options": {"leaseTime": 60, "retryLimit": 3, "retryDelay": 1000,
                          "delayedProcessing": 0, "windowBuffer": 0, "encryptionEnabled": True,
                          "deadLetterQueue": False, "dlqAfterMaxRetries": True, "maxSize": 0,
                          "ttl": 3600, "priority": 2, "retentionSeconds": 0,
                          "completedRetentionSeconds": 0, "retentionEnabled": False,
                          "maxWaitTimeSeconds": 0}}

    config = wire_config(answer)

    assert set(config) == {"id", "lease_time", "retry_limit", "retry_delay",
                           "delayed_processing", "window_buffer", "encryption_enabled",
                           "dlq_enabled", "dlq_after_max_retries", "max_size", "ttl", "priority",
                           "namespace_name", "task", "retention_seconds",
                           "completed_retention_seconds", "retention_enabled",
                           "max_wait_time_seconds"}
    assert (config["lease_time"], config["encryption_enabled"], config["namespace_name"],
            config["dlq_after_max_retries"]) == (60, True, "ns", True)


# --- wake-ups between workers, through PostgreSQL ---------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_wake_up_relayed_before_the_listen_connection_reaches_the_siblings_after(
        pg_dsn: str) -> None:
    """A restarted worker 1 reads the datagrams that waited in its UDP socket before its
    LISTEN connection is up: their wake-ups were dropped, and a sibling's long poll waited
    for its fallback re-check (an audit: 25 s with the fallback set to 10 minutes). They
    are kept and sent once the connection is up."""
    from twisted.internet import reactor

    instance = f"relay-{uuid.uuid4().hex[:8]}"
    woken: List[Any] = []
    sibling = PostgresWakeups(pg_dsn, worker_name(instance, 1),
                              lambda queue, partition: woken.append((queue, partition)),
                              reactor)
    restarted = PostgresWakeups(pg_dsn, worker_name(instance, 0), lambda *_: None, reactor)
    sibling.startService()
    try:
        await wait_until_reactor(lambda: sibling._connection is not None,
                                 message="the sibling listening")
        restarted.relay("orders", "p1")  # before its own connection exists
        restarted.startService()

        await wait_until_reactor(lambda: woken, message="the sibling woken")
    finally:
        await restarted.stopService()
        await sibling.stopService()
    assert woken == [("orders", "p1")]
