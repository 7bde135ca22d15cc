"""Three real ``twistd queen`` instances over one PostgreSQL, synced over UDP (issue #16).

Each test proves an effect of a datagram by making every other explanation too slow: the
long-poll fallback (``POP_WAIT_*``), the periodic re-read of maintenance flags
(``QUEEN_CACHE_REFRESH_INTERVAL_MS``) and the trust in a cached queue config
(``QUEEN_QUEUE_CONFIG_TTL_MS``) are set to 10 minutes, so what happens within a test's 30 s
ceiling was carried by the peer datagrams. No test measures elapsed time. A long-poll is
known to be parked once its instance's first pop attempt has finished in PostgreSQL
(``pg_stat_activity``, by the instance's ``application_name``; a group's first contact is
two pop calls around its subscription, see ``wait_parked``), so a push sent after that
cannot be found by the first attempt.

The datagram-loss test runs its own three instances in a network namespace whose loopback
drops 30 % of their UDP for real (nftables), with the fallback fast again: it shows that
loss costs latency, never a message. The client test drives the official Python client
with the three URLs while one instance is SIGKILLed and restarted.

The cluster runs on a PostgreSQL of this module's own: maintenance flags are cluster-wide
(``queen.system_state``) and would make every other server of a shared database buffer.
"""

from __future__ import annotations

import asyncio
import collections
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any

import httpx
import psycopg2
import pytest
from psycopg2.extensions import connection
from queen import Queen

from queen_tw.cluster import datagram as dg
from queen_tw.config import Config

from faultkit import private_postgres
from support import count_messages, lease_seconds_left, unique_name, wait_until
from tests.cluster_support import (
    DEAD_THRESHOLD_MS,
    HEARTBEAT_MS,
    SECRET,
    SLOW_FALLBACK_MS,
    Announcer,
    Cluster,
    ClusterNode,
    db_now,
    lossy_namespace,
    namespace_unavailable,
    pop_queries_since,
    store_silently,
    wait_parked,
)

pytestmark = pytest.mark.fault

SLOW = {"POP_WAIT_INITIAL_INTERVAL_MS": SLOW_FALLBACK_MS,
        "POP_WAIT_MAX_INTERVAL_MS": SLOW_FALLBACK_MS,
        "QUEEN_CACHE_REFRESH_INTERVAL_MS": SLOW_FALLBACK_MS,
        "QUEEN_QUEUE_CONFIG_TTL_MS": SLOW_FALLBACK_MS,
        "QUEEN_ENCRYPTION_KEY": "5eed" * 16}
LONG_POLL_MS = 25_000
"""A parked pop that nothing wakes answers 204 after this: the test then fails on it."""


@pytest.fixture(scope="module")
def pg_env() -> Iterator[dict[str, str]]:
    with private_postgres() as postgres:
        yield postgres.pg_env()


@pytest.fixture
def db(pg_env: dict[str, str]) -> Iterator[connection]:
    conn = psycopg2.connect(Config.from_sources(pg_env, {}).dsn)
    conn.autocommit = True
    try:
        yield conn
    finally:
        conn.close()


def show_logs_if_failed(request: pytest.FixtureRequest, failed_before: int,
                        nodes: Cluster) -> None:
    """The end of every instance's log on the terminal when a test failed meanwhile (the
    suite's report hook knows only the ``server`` fixtures, and ``stop`` deletes the logs)."""
    if request.session.testsfailed > failed_before:
        terminal = request.config.pluginmanager.get_plugin("terminalreporter")
        if terminal is not None:
            terminal.write_line(f"\nqueen-tw cluster logs:\n{nodes.log_tails()}")


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest, pg_env: dict[str, str]) -> Iterator[Cluster]:
    """A, B and C with the slow fallbacks; tests that kill B start it again."""
    nodes = Cluster(pg_env, SLOW)
    failed_before = request.session.testsfailed
    try:
        nodes.start()
        nodes.wait_all_alive()
        yield nodes
    finally:
        show_logs_if_failed(request, failed_before, nodes)
        nodes.stop()


@pytest.fixture
def long_polls() -> Iterator[ThreadPoolExecutor]:
    executor = ThreadPoolExecutor(8, thread_name_prefix="long-poll")
    yield executor
    executor.shutdown(wait=False, cancel_futures=True)


def configure(node: ClusterNode, queue: str, **options: Any) -> None:
    answer = node.post("/api/v1/configure", {"queue": queue, "options": options})
    assert answer.status_code == 200, answer.text


def push(node: ClusterNode, queue: str, transaction_id: str, partition: str = "Default",
         expect: str = "queued") -> None:
    answer = node.post("/api/v1/push", {"items": [
        {"queue": queue, "partition": partition, "transactionId": transaction_id,
         "payload": {"id": transaction_id}}]})
    assert answer.status_code == 201, answer.text
    assert answer.json()[0]["status"] == expect, answer.text


def long_poll(node: ClusterNode, queue: str, partition: str | None = None,
              **params: Any) -> httpx.Response:
    path = f"/api/v1/pop/queue/{queue}" + (f"/partition/{partition}" if partition else "")
    return node.get(path, wait="true", timeout=str(LONG_POLL_MS), **params)


def delivered(answer: httpx.Response) -> list[str]:
    assert answer.status_code in (200, 204), answer.text
    return [m["transactionId"] for m in answer.json()["messages"]] \
        if answer.status_code == 200 else []


# -- wake-ups --------------------------------------------------------------------------

def test_a_push_on_a_wakes_a_long_poll_parked_on_c(cluster: Cluster, db: connection,
                                                   long_polls: ThreadPoolExecutor) -> None:
    a, c = cluster["a"], cluster["c"]
    queue = unique_name()
    configure(a, queue)
    received_before = c.transport("messages_received")
    since = db_now(db)
    parked = long_polls.submit(long_poll, c, queue)
    wait_parked(db, c, since, [queue], parked)

    push(a, queue, "wake-1")

    # the fallback re-check comes after 10 minutes: an answer within the long poll's
    # 25 s can only come from A's MESSAGE_AVAILABLE
    assert delivered(parked.result(timeout=LONG_POLL_MS / 1000 + 10)) == ["wake-1"]
    assert c.transport("messages_received") > received_before


def test_one_push_batch_wakes_partition_and_wildcard_waiters_on_b_and_c(
        cluster: Cluster, db: connection, long_polls: ThreadPoolExecutor) -> None:
    """One push batch on A into two partitions of one queue and one of another: a pop
    parked on each partition (on B and on C) and a wildcard pop of the other queue (on C)
    each get their message (one announcement per distinct queue/partition of the batch)."""
    a, b, c = cluster["a"], cluster["b"], cluster["c"]
    queue, other = unique_name(), unique_name()
    configure(a, queue)
    configure(a, other)
    parked: dict[str, Future[httpx.Response]] = {}
    for key, node, name, partition in (("p1@b", b, queue, "p1"), ("p2@c", c, queue, "p2"),
                                       ("any@c", c, other, None)):
        since = db_now(db)
        parked[key] = long_polls.submit(long_poll, node, name, partition)
        wait_parked(db, node, since, [name], parked[key])

    answer = a.post("/api/v1/push", {"items": [
        {"queue": queue, "partition": "p1", "transactionId": "p1", "payload": {}},
        {"queue": queue, "partition": "p2", "transactionId": "p2", "payload": {}},
        {"queue": other, "partition": "x", "transactionId": "x", "payload": {}}]})
    assert answer.status_code == 201, answer.text

    got = {key: delivered(f.result(timeout=LONG_POLL_MS / 1000 + 10))
           for key, f in parked.items()}
    assert got == {"p1@b": ["p1"], "p2@c": ["p2"], "any@c": ["x"]}


def test_a_seek_back_on_a_wakes_the_groups_long_poll_parked_on_c(
        cluster: Cluster, db: connection, long_polls: ThreadPoolExecutor) -> None:
    """A cursor moved back through A's admin route makes a consumed message pending again:
    C's parked pop of that group gets it (announced, not stored: no push wakes anyone)."""
    a, c = cluster["a"], cluster["c"]
    queue, group = unique_name(), "rewinder"
    configure(a, queue)
    push(a, queue, "again")
    first = a.get(f"/api/v1/pop/queue/{queue}", consumerGroup=group, autoAck="true")
    assert delivered(first) == ["again"]
    since = db_now(db)
    parked = long_polls.submit(long_poll, c, queue, consumerGroup=group)
    wait_parked(db, c, since, [queue], parked, group=group)

    seek = a.post(f"/api/v1/consumer-groups/{group}/queues/{queue}/seek",
                  {"timestamp": "2000-01-01T00:00:00.000Z"})
    assert seek.status_code == 200, seek.text

    assert delivered(parked.result(timeout=LONG_POLL_MS / 1000 + 10)) == ["again"]


# -- liveness --------------------------------------------------------------------------

def test_a_killed_peer_is_reported_dead_and_its_restart_is_counted(cluster: Cluster) -> None:
    a, b, c = cluster["a"], cluster["b"], cluster["c"]
    cluster.wait_all_alive()
    restarts = {node.name: node.health("restarts_detected") for node in (a, c)}

    b.kill()
    # the "within": B stops sending at once, so after the dead threshold plus one
    # heartbeat period (the sweep) it is dead; the rest of the ceiling is slack
    ceiling = (DEAD_THRESHOLD_MS + HEARTBEAT_MS) / 1000 + 10
    for node in (a, c):
        wait_until(partial(node.sees_peers, alive=1, dead=1), timeout=ceiling,
                   message=f"{node.name} reporting B dead")

    b.start()
    for node in (a, c):
        wait_until(partial(node.sees_peers, alive=2, dead=0),
                   message=f"{node.name} seeing B alive again")
        assert node.health("restarts_detected") == restarts[node.name] + 1, node.shared_state()


# -- shared configuration and flags -----------------------------------------------------

def stored_encrypted(db: connection, queue: str, partition: str) -> list[bool]:
    with db.cursor() as cursor:
        cursor.execute("""SELECT m.is_encrypted FROM queen.messages m
                            JOIN queen.partitions p ON p.id = m.partition_id
                            JOIN queen.queues q ON q.id = p.queue_id
                           WHERE q.name = %s AND p.name = %s
                           ORDER BY m.created_at, m.id""", (queue, partition))
        return [row[0] for row in cursor.fetchall()]


def test_a_queue_reconfigured_on_a_is_honoured_by_c_at_once(cluster: Cluster,
                                                            db: connection) -> None:
    """leaseTime 30 -> 900 and encryption switched on, on A. PostgreSQL is the truth for the
    lease time (the pop function reads it in its own transaction), so C hands out 900 s at
    once; the encryption flag is the one setting C caches (for 10 minutes here), so C
    sealing pushes proves A's QUEUE_CONFIG_SET reached it."""
    a, c = cluster["a"], cluster["c"]
    queue = unique_name()
    configure(a, queue, leaseTime=30)
    push(c, queue, "before")  # C now caches "not encrypted" for this queue
    first = c.get(f"/api/v1/pop/queue/{queue}", wait="false")
    assert delivered(first) == ["before"]
    left = lease_seconds_left(db, first.json()["messages"][0]["leaseId"])
    assert left is not None and 0 < left <= 30
    assert stored_encrypted(db, queue, "Default") == [False]

    configure(a, queue, leaseTime=900, encryptionEnabled=True)
    pushed = iter(range(1000))

    def next_push_sealed() -> bool:
        push(c, queue, f"after-{next(pushed)}", partition="second")
        return stored_encrypted(db, queue, "second")[-1]

    wait_until(next_push_sealed, interval=0.05, message="C sealing the queue's pushes")

    second = c.get(f"/api/v1/pop/queue/{queue}/partition/second", wait="false")
    assert delivered(second) == ["after-0"]
    left = lease_seconds_left(db, second.json()["messages"][0]["leaseId"])
    assert left is not None and 30 < left <= 900, left


def test_maintenance_set_on_a_diverts_pushes_on_c_and_drains_when_cleared(
        cluster: Cluster, db: connection) -> None:
    a, b, c = cluster["a"], cluster["b"], cluster["c"]
    queue = unique_name()
    configure(a, queue)
    try:
        answer = a.post("/api/v1/system/maintenance", {"enabled": True})
        assert answer.status_code == 200, answer.text
        # C re-reads the flag every 10 minutes: seeing it now is A's datagram
        for node in (b, c):
            wait_until(partial(node.in_maintenance, True), message=f"{node.name} in maintenance")
        for n in range(20):
            push(c, queue, f"m{n}", expect="buffered")
        assert count_messages(db, queue) == 0
    finally:
        answer = a.post("/api/v1/system/maintenance", {"enabled": False})
        assert answer.status_code == 200, answer.text

    wait_until(partial(c.in_maintenance, False), message="C out of maintenance")
    wait_until(lambda: count_messages(db, queue) == 20, message="C's buffer drained")
    seen: list[str] = []
    while True:
        answer = b.get(f"/api/v1/pop/queue/{queue}", wait="false", batch="100",
                       autoAck="true")
        if answer.status_code == 204:
            break
        seen.extend(delivered(answer))
    assert sorted(seen) == sorted(f"m{n}" for n in range(20))


def test_a_maintenance_datagram_overtaken_by_a_later_change_settles_on_the_stored_flag(
        cluster: Cluster) -> None:
    """Two instances switching a flag at once send datagrams that may arrive in the other
    order than their commits: the stale one arriving last must not stand until the next
    periodic re-read (10 minutes here). An audit saw instances disagree with PostgreSQL in
    3 to 7 of 30 such races, for good."""
    a, b, c = cluster["a"], cluster["b"], cluster["c"]

    def pop_maintenance(node: ClusterNode) -> bool:
        return bool(node.shared_state()["pop_maintenance_mode"])

    late_applied = "pop_maintenance_mode is now off (announced by a peer)"
    answer = a.post("/api/v1/system/maintenance/pop", {"enabled": True})
    assert answer.status_code == 200, answer.text
    try:
        for node in (b, c):
            wait_until(partial(pop_maintenance, node), message=f"{node.name} in pop maintenance")
            assert late_applied not in node.log_text()  # (the module's first pop toggle)
        # an earlier "off" from another instance, delivered late (signed like any peer's)
        late = Announcer("cluster-late:1", secret=SECRET)
        try:
            late.maintenance(dg.POP_MAINTENANCE_MODE_SET, False, [b.udp_port, c.udp_port])
        finally:
            late.close()
        for node in (b, c):
            wait_until(lambda node=node: node.log_text().count(late_applied) == 1,
                       message=f"{node.name} applying the late datagram")
            wait_until(partial(pop_maintenance, node),
                       message=f"{node.name} back on the stored flag (on)")
            assert "pop_maintenance_mode is now on (read from PostgreSQL)" in node.log_text()
    finally:
        answer = a.post("/api/v1/system/maintenance/pop", {"enabled": False})
        assert answer.status_code == 200, answer.text
    for node in (b, c):
        wait_until(lambda node=node: not pop_maintenance(node),
                   message=f"{node.name} out of pop maintenance")


# -- a sender without the secret ------------------------------------------------------

def test_datagrams_with_the_wrong_secret_are_counted_and_wake_nobody(
        cluster: Cluster, db: connection, long_polls: ThreadPoolExecutor) -> None:
    a = cluster["a"]
    nodes = list(cluster.nodes.values())
    queue = unique_name()
    configure(a, queue)
    since = db_now(db)
    parked = long_polls.submit(long_poll, a, queue, "Default")
    wait_parked(db, a, since, [queue], parked)
    store_silently(db, queue, "Default", "silent-1", {"n": 1})  # no instance hears of it
    before = {node.name: node.transport("signature_failures") for node in nodes}
    after_store = db_now(db)

    intruder = Announcer("intruder:9", secret="not-the-" + SECRET)
    unsigned = Announcer("intruder:10", secret=None)
    try:
        for _ in range(5):
            intruder.message_available(queue, "Default", [n.udp_port for n in nodes])
        unsigned.message_available(queue, "Default", [n.udp_port for n in nodes])
    finally:
        intruder.close()
        unsigned.close()
    for node in nodes:
        wait_until(partial(node.counted, "signature_failures", before[node.name] + 6),
                   message=f"{node.name} rejecting 6 datagrams")

    assert not parked.done(), f"a forged datagram woke the pop: {parked.result()}"
    assert pop_queries_since(db, a, after_store) == [], "a forged datagram started a pop"

    # the control: the same announcement, signed with the cluster's secret, does wake it
    honest = Announcer("cluster-test:1", secret=SECRET)
    try:
        honest.message_available(queue, "Default", [a.udp_port])
    finally:
        honest.close()
    assert delivered(parked.result(timeout=LONG_POLL_MS / 1000 + 10)) == ["silent-1"]


# -- 30 % of the datagrams lost for real --------------------------------------------------

def test_with_30_percent_of_datagrams_lost_every_waiter_gets_its_message_once(
        request: pytest.FixtureRequest, pg_env: dict[str, str], db: connection) -> None:
    why_not = namespace_unavailable(pg_env)
    if why_not:
        pytest.skip(f"real packet loss needs a network namespace: {why_not}")
    partitions, rounds = 12, 4
    with lossy_namespace(threads=partitions + 4) as namespace:
        lossy = Cluster(pg_env, {"POP_WAIT_INITIAL_INTERVAL_MS": "100",
                                 "POP_WAIT_MAX_INTERVAL_MS": "400"}, spawn=namespace.call)
        try:
            namespace.drop([node.udp_port for node in lossy.nodes.values()], percent=30)
            lossy.start()
            a, b, c = lossy["a"], lossy["b"], lossy["c"]
            queue = unique_name()
            namespace.call(partial(configure, a, queue))
            received: dict[str, list[str]] = collections.defaultdict(list)
            for round_ in range(rounds):
                waiters = {}
                for n in range(partitions):
                    node, partition = (b, c)[n % 2], f"p{n}"
                    waiters[partition] = namespace.submit(
                        partial(long_poll, node, queue, partition, autoAck="true"))
                answer = namespace.call(partial(a.post, "/api/v1/push", {"items": [
                    {"queue": queue, "partition": f"p{n}", "transactionId": f"r{round_}-p{n}",
                     "payload": {}} for n in range(partitions)]}))
                assert answer.status_code == 201, answer.text
                for partition, waiter in waiters.items():
                    received[partition].extend(
                        delivered(waiter.result(timeout=LONG_POLL_MS / 1000 + 10)))
            dropped = namespace.dropped()
        except BaseException:
            show_logs_if_failed(request, -1, lossy)
            raise
        finally:
            lossy.stop()

    everything = [t for ids in received.values() for t in ids]
    duplicates = [t for t, k in collections.Counter(everything).items() if k > 1]
    assert not duplicates, f"delivered twice: {duplicates}"
    assert sorted(everything) == sorted(f"r{r}-p{n}" for r in range(rounds)
                                        for n in range(partitions))
    for partition, ids in received.items():
        assert all(t.endswith(f"-{partition}") for t in ids), (partition, ids)
    assert count_messages(db, queue) == partitions * rounds
    assert dropped > 0, "the loss rule dropped nothing: the test proved nothing"


# -- the official client with the three URLs ---------------------------------------------

def test_official_client_with_three_urls_survives_an_instance_killed_and_restarted(
        cluster: Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    a, b, c = cluster["a"], cluster["b"], cluster["c"]
    queue = unique_name()
    configure(a, queue, leaseTime=5)
    total = 150
    acknowledged: list[str] = []
    consumed: list[str] = []
    producer_done = threading.Event()

    async def produce(client: Queen) -> None:
        for n in range(total):
            transaction_id = f"fo-{n}"
            while True:  # as an application would: retry the same id until acknowledged
                try:
                    results = await client.queue(queue).push(
                        [{"transactionId": transaction_id, "data": {"n": n}}])
                except Exception:  # every instance failed this once: try again
                    await asyncio.sleep(0.2)
                    continue
                if results and results[0].get("status") in ("queued", "duplicate"):
                    acknowledged.append(transaction_id)
                    break
            if n == total // 3:
                await asyncio.to_thread(b.kill)
            if n == 2 * total // 3:
                await asyncio.to_thread(cluster.start, b)
        producer_done.set()

    async def consume(client: Queen) -> None:
        deadline = time.monotonic() + 80
        while time.monotonic() < deadline:
            if producer_done.is_set() and set(acknowledged) <= set(consumed):
                return
            try:
                messages = await (client.queue(queue).batch(10).wait(True)
                                  .timeout_millis(1000).pop())
            except Exception:
                await asyncio.sleep(0.2)
                continue
            for message in messages or []:
                try:
                    await client.ack(message, True)
                except Exception:
                    continue  # its lease runs out and it comes again
                consumed.append(message["transactionId"])

    async def scenario() -> None:
        saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        def client() -> Queen:
            return Queen(urls=[a.url, b.url, c.url], load_balancing_strategy="round-robin",
                         health_retry_after_millis=500, retry_attempts=2,
                         retry_delay_millis=100, timeout_millis=10_000)

        producer, consumer = client(), client()
        try:
            await asyncio.gather(produce(producer), consume(consumer))
        finally:
            await producer.close()
            await consumer.close()
            for sig, handler in saved.items():
                signal.signal(sig, handler)

    asyncio.run(asyncio.wait_for(scenario(), 100))  # within pytest-timeout's 120 s
    # the client prints each request that failed on one URL and went on to the next: the
    # run really lost B under both clients' feet
    assert f"Request failed for {b.url}" in capsys.readouterr().out
    assert b.running
    assert len(acknowledged) == total
    missing = set(acknowledged) - set(consumed)
    assert not missing, f"acknowledged but never consumed: {sorted(missing)}"
    assert set(consumed) <= set(acknowledged)
