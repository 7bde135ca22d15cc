"""Fault injection under load, then count every message (issue #6).

Each test starts producers (threads pushing to their own partitions with recorded
transactionIds, retrying unacknowledged pushes as the clients do), injects one fault, heals it,
stops the producers, reads every partition back and checks: every push answered ``queued``,
``duplicate`` or ``buffered`` was delivered, exactly once, in send order within its partition.

The faults are real: PostgreSQL (a private one, started for this module) is frozen with
SIGSTOP or stopped; the server is SIGKILLed; the buffer directory is filled up (a small tmpfs
mounted on it) or made immutable (``chattr +i``; root ignores permission bits, so chmod would
prove nothing). Each test prints its counts.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from queen_tw.db.embedded import EmbeddedPostgres

from faultkit import (
    Count,
    Fleet,
    Producers,
    buffer_status,
    count,
    drain,
    health_code,
    private_postgres,
    report,
    set_maintenance,
    wait_until,
)
from support import ServerProcess, unique_name

pytestmark = pytest.mark.fault

SERVER_ENV = {
    "LIBQUEEN_INFLIGHT_DEADLINE_MS": "2000",  # a frozen database counts as an outage after 2 s
    "QUEEN_CACHE_REFRESH_INTERVAL_MS": "200",
    "FILE_BUFFER_EVENTS_PER_FILE": "50",  # many segments: rotation is part of every test
}


@pytest.fixture(scope="module")
def postgres() -> Iterator[EmbeddedPostgres]:
    with private_postgres() as server:
        yield server


@pytest.fixture
def fleet(postgres: EmbeddedPostgres) -> Iterator[Fleet]:
    servers = Fleet(postgres.pg_env())
    try:
        yield servers
    finally:
        postgres.thaw()
        if not postgres.is_running():
            postgres.start()
        for process in servers.servers:
            if process.running:
                with contextlib.suppress(Exception):
                    set_maintenance(process.url, False)
        servers.close()


def finish(name: str, server: ServerProcess, producers: Producers) -> Count:
    """Stop the producers, read everything back, count, check."""
    ledger = producers.stop()
    assert not producers.errors, producers.errors
    result = count(ledger, drain(server.url, ledger.queue, ledger.partitions()))
    report(name, result)
    result.assert_nothing_lost()
    assert result.acknowledged == result.sent
    return result


def buffered_answers(producers: Producers) -> int:
    return producers.ledger.answers.get("buffered", 0)


def test_frozen_postgres(fleet: Fleet, postgres: EmbeddedPostgres) -> None:
    server = fleet.server(**SERVER_ENV)
    producers = Producers(server.url, unique_name()).start()
    wait_until(lambda: producers.sent_count() >= 80, 20, message="load before the fault")

    postgres.freeze()
    try:
        # /health pings with a timeout: a frozen database gives 503, not a hang
        wait_until(lambda: health_code(server.url) == 503, 10, message="/health 503")
        time.sleep(4)
    finally:
        postgres.thaw()
    wait_until(lambda: health_code(server.url) == 200, 15, message="/health 200 again")
    time.sleep(1)

    result = finish("frozen postgres", server, producers)
    assert result.buffered > 0  # pushes during the freeze went to the buffer


def test_postgres_stopped_and_restarted(fleet: Fleet, postgres: EmbeddedPostgres) -> None:
    server = fleet.server(**SERVER_ENV)
    producers = Producers(server.url, unique_name()).start()
    wait_until(lambda: producers.sent_count() >= 80, 20, message="load before the fault")

    postgres.stop()
    wait_until(lambda: health_code(server.url) == 503, 10, message="/health 503")
    time.sleep(3)
    postgres.start()
    # the pool reconnects by itself: no server restart
    wait_until(lambda: health_code(server.url) == 200, 15, message="/health 200 again")
    time.sleep(1)

    result = finish("postgres stopped and restarted", server, producers)
    assert result.buffered > 0
    # the outage is a line per thing that noticed it, not one per connection or request
    warnings = [line for line in server.log_text().splitlines() if "#warn]" in line]
    assert 1 <= len(warnings) <= 8, "\n".join(warnings)


def test_server_killed_while_buffering(fleet: Fleet, postgres: EmbeddedPostgres) -> None:
    server = fleet.server(**SERVER_ENV)
    producers = Producers(server.url, unique_name()).start()
    wait_until(lambda: producers.sent_count() >= 80, 20, message="load before the fault")
    postgres.stop()
    wait_until(lambda: buffered_answers(producers) >= 60, 20, message="pushes buffered")

    server.kill()  # SIGKILL in the middle of buffered pushes
    postgres.start()
    server.start()  # same port, same buffer directory
    time.sleep(1)

    result = finish("server killed while buffering", server, producers)
    assert result.buffered >= 60


def test_server_killed_during_replay(fleet: Fleet) -> None:
    server = fleet.server(FILE_BUFFER_MAX_BATCH="5", **SERVER_ENV)
    producers = Producers(server.url, unique_name(), batch=10, pause=0.0).start()
    set_maintenance(server.url, True)
    wait_until(lambda: buffered_answers(producers) >= 600, 30, message="a full buffer")

    set_maintenance(server.url, False)
    waiting = buffer_status(server.url)["pending"]
    wait_until(lambda: (buffer_status(server.url) or {}).get("pending", waiting) < waiting * 0.8,
               20, 0.02, message="replay under way")
    server.kill()  # SIGKILL in the middle of the replay (and of the producers' pushes)
    left = sum(1 for _ in server.buffer_dir.glob("segment-*"))
    server.start()
    time.sleep(1)

    result = finish("server killed during replay", server, producers)
    assert left > 0 and result.buffered >= 600


@contextlib.contextmanager
def small_tmpfs(directory: Path, size: str = "1m") -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                              str(directory)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(directory)], capture_output=True)


def fill_up(directory: Path) -> Path:
    """Writes a filler file until the file system is full (ENOSPC)."""
    filler = directory / "filler"
    with contextlib.suppress(OSError), open(filler, "wb", buffering=0) as out:
        while True:
            out.write(b"\0" * 65536)
    return filler


def set_immutable(directory: Path, on: bool) -> None:
    flag = "+i" if on else "-i"
    paths = [directory, *directory.iterdir()] if on else [*directory.iterdir(), directory]
    for path in paths:
        done = subprocess.run(["chattr", flag, str(path)], capture_output=True, text=True)
        if done.returncode != 0 and on:
            pytest.skip(f"chattr {flag} does not work here: {done.stderr.strip()}")


@pytest.mark.parametrize("how", ["disk_full", "immutable"])
def test_unwritable_buffer(fleet: Fleet, how: str) -> None:
    server = fleet.server(start=False, **SERVER_ENV)
    with contextlib.ExitStack() as cleanup:
        if how == "disk_full":
            cleanup.enter_context(small_tmpfs(server.buffer_dir))
        server.start()
        set_maintenance(server.url, True)  # every push needs the buffer
        producers = Producers(server.url, unique_name()).start()
        wait_until(lambda: buffered_answers(producers) >= 80, 20, message="pushes buffered")

        if how == "disk_full":
            filler = fill_up(server.buffer_dir)
        else:
            set_immutable(server.buffer_dir, True)
            cleanup.callback(set_immutable, server.buffer_dir, False)
        try:
            wait_until(lambda: producers.ledger.answers.get("503", 0) >= 5, 20,
                       message="503 answers while the buffer cannot be written")
            assert buffer_status(server.url)["healthy"] is False
            time.sleep(1)
        finally:
            if how == "disk_full":
                os.unlink(filler)
            else:
                set_immutable(server.buffer_dir, False)
        before = buffered_answers(producers)
        wait_until(lambda: buffered_answers(producers) > before + 20, 20,
                   message="buffering again")
        set_maintenance(server.url, False)

        result = finish(f"unwritable buffer ({how})", server, producers)
        assert result.answers.get("503", 0) >= 5


def test_sigterm_while_postgres_is_frozen(fleet: Fleet, postgres: EmbeddedPostgres) -> None:
    # the default 35 s call deadline: pushes in flight hang until the shutdown gives up on them
    server = fleet.server(**{**SERVER_ENV, "LIBQUEEN_INFLIGHT_DEADLINE_MS": "0"})
    producers = Producers(server.url, unique_name()).start()
    wait_until(lambda: producers.sent_count() >= 80, 20, message="load before the fault")
    postgres.freeze()
    try:
        time.sleep(1)
        started = time.monotonic()
        exit_code = server.stop(timeout=45)
        stopped_in = time.monotonic() - started
    finally:
        postgres.thaw()
    server.start()
    time.sleep(1)

    finish("SIGTERM while PostgreSQL is frozen, then restart", server, producers)
    print(f"[fault] stopped in {stopped_in:.1f}s with exit code {exit_code}")
    assert exit_code in (0, -15) and stopped_in < 40


def test_during_an_outage_pops_answer_204_and_acks_503(fleet: Fleet,
                                                       postgres: EmbeddedPostgres) -> None:
    server = fleet.server(**SERVER_ENV)
    queue = unique_name()
    with httpx.Client(base_url=server.url, timeout=20) as http:
        http.post("/api/v1/push", json={"items": [{"queue": queue, "payload": n}
                                                  for n in range(2)]})
        delivery = http.get(f"/api/v1/pop/queue/{queue}").json()
        [message] = delivery["messages"]
        ack = {"transactionId": message["transactionId"], "partitionId": message["partitionId"],
               "leaseId": delivery["leaseId"], "status": "completed"}

        postgres.stop()
        try:
            wait_until(lambda: health_code(server.url) == 503, 10, message="/health 503")
            quick = http.get(f"/api/v1/pop/queue/{queue}", params={"wait": "false"})
            started = time.monotonic()
            parked = http.get(f"/api/v1/pop/queue/{queue}",
                              params={"wait": "true", "timeout": 1500})
            waited = time.monotonic() - started
            refused = http.post("/api/v1/ack", json=ack)
        finally:
            postgres.start()

        assert quick.status_code == 204 and parked.status_code == 204 and waited >= 1.4
        assert refused.status_code == 503 and refused.json()["error"]
        wait_until(lambda: health_code(server.url) == 200, 15, message="/health 200 again")
        again = http.post("/api/v1/ack", json=ack)
        assert again.status_code == 200, again.text
        assert again.json()[0]["success"] is True
        second = http.get(f"/api/v1/pop/queue/{queue}").json()["messages"]
        assert [m["data"] for m in second] == [1]


def test_a_503_from_a_frozen_postgres_means_the_kv_write_was_not_applied(
        fleet: Fleet, postgres: EmbeddedPostgres) -> None:
    """The client resends on 5xx: a call answered 503 at the deadline and committed once
    PostgreSQL woke up would count a KV increment, a lock, a transaction twice."""
    server = fleet.server(**SERVER_ENV)
    ns, queue = unique_name(), unique_name()
    incr = {"operations": [{"op": "incr", "ns": ns, "key": "hits", "forever": True}]}
    transaction = {"operations": [{"type": "push", "items": [{"queue": queue, "payload": 1}]}],
                   "kv": [{"op": "incr", "ns": ns, "key": "tx", "forever": True}]}
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert http.post("/api/v1/kv", json=incr).status_code == 200

        postgres.freeze()
        try:
            frozen_incr = http.post("/api/v1/kv", json=incr)
            frozen_transaction = http.post("/api/v1/transaction", json=transaction)
        finally:
            postgres.thaw()

        assert frozen_incr.status_code == 503 and frozen_transaction.status_code == 503
        wait_until(lambda: health_code(server.url) == 200, 15, message="/health 200 again")
        time.sleep(1)  # the abandoned calls reach PostgreSQL now, and are rolled back
        read = http.post("/api/v1/kv", json={"operations": [
            {"op": "get", "ns": ns, "key": "hits"}, {"op": "get", "ns": ns, "key": "tx"}]})
        values = [result.get("value") for result in read.json()["results"]]
        assert values == [1, None], read.text
        assert http.get(f"/api/v1/pop/queue/{queue}", params={"wait": "false"}).status_code == 204


def test_a_commit_not_confirmed_in_time_answers_503_and_blocks_nothing(
        fleet: Fleet, postgres: EmbeddedPostgres) -> None:
    """A KV write whose COMMIT outlasts the deadline: its outcome is unknown (503 saying so),
    and the server keeps serving meanwhile (cancelling the commit would have blocked the
    reactor until PostgreSQL answered)."""
    import psycopg2

    server = fleet.server(**SERVER_ENV)
    ns = unique_name()
    incr = {"operations": [{"op": "incr", "ns": ns, "key": "k", "forever": True}]}
    db = psycopg2.connect(postgres.dsn)
    db.autocommit = True
    with db.cursor() as cursor:
        cursor.execute("""
            CREATE FUNCTION queen.zz_slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN PERFORM pg_sleep(5); RETURN NULL; END $$;
            CREATE CONSTRAINT TRIGGER zz_slow_commit AFTER INSERT OR UPDATE ON queen.kv
                DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
                EXECUTE FUNCTION queen.zz_slow_commit()""")
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http, \
                concurrent.futures.ThreadPoolExecutor(1) as pool:
            started = time.monotonic()
            writing = pool.submit(http.post, "/api/v1/kv", json=incr)
            time.sleep(0.5)
            while not writing.done():  # served all along, each within a second
                assert httpx.get(f"{server.url}/api/v1/openapi.json", timeout=1).status_code \
                    == 200
                time.sleep(0.2)
            answer = writing.result()
            waited = time.monotonic() - started
    finally:
        with db.cursor() as cursor:
            cursor.execute("DROP TRIGGER zz_slow_commit ON queen.kv;"
                           "DROP FUNCTION queen.zz_slow_commit()")
        db.close()

    assert answer.status_code == 503 and "did not confirm the commit" in answer.text
    assert waited < 4.5  # the commit timeout (the call deadline), not the 5 s commit
    read = {"operations": [{"op": "get", "ns": ns, "key": "k"}]}
    wait_until(lambda: httpx.post(f"{server.url}/api/v1/kv", json=read, timeout=10).json()
               ["results"][0].get("value") == 1, 15, message="the commit, applied after all")
    assert "Traceback" not in server.log_text()


def test_a_commit_whose_connection_is_lost_answers_that_its_outcome_is_unknown(
        fleet: Fleet, postgres: EmbeddedPostgres) -> None:
    """The COMMIT of a KV write is out and PostgreSQL has made it durable locally, waiting
    for a synchronous standby (one that never connects), when its backend is terminated.
    The server answered the plain 503 that means "not applied", and a client resending
    counted the increment twice (an audit). It is the unknown outcome, and says so."""
    import psycopg2

    def admin(sql: str, *args: object) -> list:
        connection = psycopg2.connect(postgres.dsn)
        connection.autocommit = True
        try:
            with connection.cursor() as cursor:
                cursor.execute("SET synchronous_commit = local")
                cursor.execute(sql, args)
                return cursor.fetchall() if cursor.description else []
        finally:
            connection.close()

    def standby_required(name: str) -> None:
        admin("ALTER SYSTEM SET synchronous_standby_names = %s", name)
        admin("SELECT pg_reload_conf()")

    server = fleet.server(**SERVER_ENV)
    ns = unique_name()
    incr = {"operations": [{"op": "incr", "ns": ns, "key": "k", "forever": True}]}
    standby_required("nobody_connects")
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http, \
                concurrent.futures.ThreadPoolExecutor(1) as pool:
            writing = pool.submit(http.post, "/api/v1/kv", json=incr)
            waiting = wait_until(lambda: admin("SELECT pid FROM pg_stat_activity "
                                               "WHERE wait_event = 'SyncRep'"), 10,
                                 message="the commit waiting for the standby")
            for (pid,) in waiting:
                admin("SELECT pg_terminate_backend(%s)", pid)
            answer = writing.result()
    finally:
        standby_required("")

    assert answer.status_code == 503 and "did not confirm the commit" in answer.text, \
        answer.text
    read = {"operations": [{"op": "get", "ns": ns, "key": "k"}]}
    wait_until(lambda: httpx.post(f"{server.url}/api/v1/kv", json=read, timeout=10).json()
               ["results"][0].get("value") == 1, 15, message="the commit, durable after all")


def test_workers_ride_postgresql_restarts_without_a_traceback(
        fleet: Fleet, postgres: EmbeddedPostgres) -> None:
    """With NUM_WORKERS > 1 each worker's wake-up listener (a LISTEN connection of its own)
    let the broken socket's error reach the reactor: a traceback per worker per restart."""
    server = fleet.server(NUM_WORKERS="2", **SERVER_ENV)
    queue = unique_name()
    with httpx.Client(base_url=server.url, timeout=20) as http:
        for round_ in range(2):
            answer = http.post("/api/v1/push", json={"items": [
                {"queue": queue, "payload": {"round": round_}}]})
            assert answer.status_code == 201, answer.text
            postgres.stop()
            wait_until(lambda: health_code(server.url) == 503, 15, message="/health 503")
            postgres.start()
            wait_until(lambda: health_code(server.url) == 200, 30, message="/health 200")
        time.sleep(1.5)  # the listeners' next checks find their connections gone, and renew

    log = server.log_text()
    assert "Traceback" not in log, log[log.index("Traceback") - 300:][:2000]
