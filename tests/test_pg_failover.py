"""PostgreSQL primary failover (issue #22 points 1 and 2), with real PostgreSQL binaries.

A primary and a synchronous streaming standby (pg_basebackup -R, synchronous_standby_names,
synchronous_commit=on) serve one real ``twistd queen`` given both hosts in PG_HOST. Under
push load and pop+ack load the primary is SIGKILLed and the standby promoted: every push
answered queued/buffered is then delivered exactly once, in order within its partition, and
the outage the clients saw is printed. Smaller tests cover the host list and the read-only
detection of the pool.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg2
import pytest
import pytest_twisted
from psycopg2.extensions import parse_dsn
from queen import Queen
from twisted.internet import reactor, task

from queen_tw.config import Config, ConfigError
from queen_tw.db.embedded import EmbeddedPostgres, _pg_install_dir
from queen_tw.db.pool import Database
from queen_tw.errors import DatabaseUnavailable

from client_helpers import connect, run_scenario
from faultkit import Fleet, Ledger, Producers, Sent, count, drain, private_postgres, report
from support import wait_until

QUEUE = "failover-q"
WATCHERS = "watchers"  # the pop+ack load reads the queue as a consumer group of its own


# -- configuration ------------------------------------------------------------------------

def test_a_host_list_becomes_libpq_lists_that_want_a_writable_server() -> None:
    config = Config.from_sources({"PG_HOST": "pg-a, pg-b:5433,[::1]:6000", "PG_PORT": "5999"}, {})
    parts = parse_dsn(config.dsn)
    assert parts["host"] == "pg-a,pg-b,::1"
    assert parts["port"] == "5999,5433,6000"
    assert parts["target_session_attrs"] == "read-write"


def test_pg_port_may_list_one_port_per_host() -> None:
    parts = parse_dsn(Config.from_sources({"PG_HOST": "/run/a,/run/b,c:7",
                                           "PG_PORT": "5432, 5433,5434"}, {}).dsn)
    assert (parts["host"], parts["port"]) == ("/run/a,/run/b,c", "5432,5433,7")


def test_one_host_keeps_the_dsn_it_always_had() -> None:
    parts = parse_dsn(Config.from_sources({"PG_HOST": "/run/pg", "PG_PORT": "5433"}, {}).dsn)
    assert (parts["host"], parts["port"]) == ("/run/pg", "5433")
    assert "target_session_attrs" not in parts


def test_a_full_dsn_keeps_its_settings_and_gains_the_session_timeouts() -> None:
    config = Config.from_sources({"QUEEN_PG_DSN": "postgresql://u:secret@a:1,b:2/db"
                                  "?application_name=mine&options=-c%20work_mem%3D8MB"}, {})
    parts = parse_dsn(config.dsn)
    assert (parts["host"], parts["port"], parts["dbname"]) == ("a,b", "1,2", "db")
    assert parts["application_name"] == "mine"
    assert parts["options"] == ("-c work_mem=8MB -c statement_timeout=30000 "
                                "-c lock_timeout=10000 -c queen.worker=queen-tw-1")
    assert parts["target_session_attrs"] == "read-write"
    assert "secret" not in repr(config)


@pytest.mark.parametrize("env,message", [
    ({"QUEEN_PG_DSN": "not a dsn"}, "QUEEN_PG_DSN"),
    ({"PG_HOST": "a,,b"}, "PG_HOST: an entry"),
    ({"PG_HOST": "a:70000,b"}, "PG_HOST: expected a port"),
    ({"PG_HOST": "a,b,c", "PG_PORT": "1,2"}, "PG_PORT: 2 ports for the 3 hosts"),
    ({"PG_PORT": "5432,x"}, "PG_PORT: expected a port"),
    ({"PG_PORT": "0"}, "PG_PORT: expected a port"),
])
def test_a_bad_connection_setting_refuses_to_start(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config.from_sources(env, {})


# -- read-only detection in the pool --------------------------------------------------------

@pytest.fixture(scope="module")
def postgres() -> Iterator[EmbeddedPostgres]:
    with private_postgres() as server:
        yield server


def _execute(dsn: str, *statements: str) -> None:
    connection = psycopg2.connect(dsn)
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            for statement in statements:
                cursor.execute(statement)
    finally:
        connection.close()


@pytest_twisted.ensureDeferred
async def test_a_server_that_turned_read_only_is_an_outage_until_it_takes_writes(
        postgres: EmbeddedPostgres, lines: list[str]) -> None:
    dsn = Config.from_sources(postgres.pg_env(), {}).dsn
    _execute(dsn, "CREATE SCHEMA IF NOT EXISTS queen",
             "CREATE TABLE IF NOT EXISTS queen.ro_probe (n int)",
             "CREATE OR REPLACE FUNCTION queen.ro_write() RETURNS int LANGUAGE sql "
             "AS 'INSERT INTO queen.ro_probe VALUES (1) RETURNING n'")
    db = Database(dsn, 2, reactor, call_deadline=5.0)
    await db.connect()
    try:
        assert await db.call("ro_write") == 1
        _execute(dsn, "ALTER SYSTEM SET default_transaction_read_only = on",
                 "SELECT pg_reload_conf()")
        await _sleep(0.3)  # the backends read the reloaded file when signalled
        for _ in range(6):  # each refusal recycles a connection, which comes back read-only
            with pytest.raises(DatabaseUnavailable):
                await db.call("ro_write")
            await _sleep(0.3)
        _execute(dsn, "ALTER SYSTEM RESET default_transaction_read_only",
                 "SELECT pg_reload_conf()")
        written = None
        for _ in range(100):
            try:
                written = await db.call("ro_write")
                break
            except DatabaseUnavailable:
                await _sleep(0.1)
        assert written == 1
        assert len([line for line in lines if line.startswith("PostgreSQL failing")]) == 1, lines
        assert len([line for line in lines
                    if line.startswith("PostgreSQL working again")]) == 1, lines
    finally:
        db.close()
        _execute(dsn, "ALTER SYSTEM RESET default_transaction_read_only", "SELECT pg_reload_conf()")


async def _sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


# -- the failover itself ---------------------------------------------------------------------

class Pair:
    """A primary and a synchronous streaming standby made from it with pg_basebackup."""

    def __init__(self, root: Path):
        self.primary = EmbeddedPostgres(root / "primary", port=5432)
        self.standby = EmbeddedPostgres(root / "standby", port=5433)

    def start(self) -> None:
        self.primary.start()
        install = _pg_install_dir()
        self.standby._prepare_directories(install)
        self.standby._run(install / "bin" / "pg_basebackup", [
            "-h", str(self.primary.socket_dir), "-p", str(self.primary.port),
            "-U", self.primary.user, "-D", str(self.standby.data_dir),
            "-R", "-X", "stream", "--checkpoint=fast"], timeout=60)
        # The socket lives in the data directory, so the copy holds the primary's lock file.
        for lock in self.standby.data_dir.glob(".s.PGSQL.*.lock"):
            lock.unlink()
        self.standby.start()
        # Only the primary waits for a synchronous standby: set after the copy, so the
        # promoted standby does not wait for a standby it does not have.
        _execute(self.primary.dsn, "ALTER SYSTEM SET synchronous_standby_names = '*'",
                 "ALTER SYSTEM SET synchronous_commit = on", "SELECT pg_reload_conf()")
        wait_until(self._standby_is_synchronous, 30, interval=0.1,
                   message="the standby streaming synchronously")

    def _standby_is_synchronous(self) -> bool:
        connection = psycopg2.connect(self.primary.dsn)
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT sync_state FROM pg_stat_replication")
                return [row[0] for row in cursor.fetchall()] == ["sync"]
        finally:
            connection.close()

    def pg_env(self) -> dict[str, str]:
        return {**self.primary.pg_env(),
                "PG_HOST": f"{self.primary.socket_dir},{self.standby.socket_dir}",
                "PG_PORT": f"{self.primary.port},{self.standby.port}"}

    def kill_primary_and_promote(self) -> None:
        self.primary._kill_postmaster()
        _execute(self.standby.dsn, "SELECT pg_promote(true, 30)")

    def stop(self) -> None:
        self.primary.stop()
        self.standby.stop()


class Watchers:
    """Pop+ack load: a consumer group pops and acks the queue in a loop, noting when a cycle
    delivered and acked messages. A pop answers 204 during an outage (WIRE.md 2.3.8), so the
    longest gap between deliveries is the outage a consumer saw."""

    def __init__(self, url: str):
        self.url = url
        self.successes: list[float] = []
        self.failures = 0
        self.acked = 0
        self.answers: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Watchers:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while not self._stop.is_set():
                acked = self._cycle(client)
                if acked > 0:
                    self.successes.append(time.monotonic())
                elif acked < 0:
                    self.failures += 1
                time.sleep(0.02)

    def _cycle(self, client: httpx.Client) -> int:
        """Messages acked by one pop+ack, or -1 when either failed."""
        try:
            popped = client.get(f"/api/v1/pop/queue/{QUEUE}", params={
                "batch": 20, "wait": "false", "consumerGroup": WATCHERS})
            self._note(f"pop {popped.status_code}")
            if popped.status_code == 204:
                return 0
            if popped.status_code != 200:
                return -1
            acks = [{"transactionId": m["transactionId"], "partitionId": m["partitionId"],
                     "leaseId": m.get("leaseId"), "status": "completed"}
                    for m in popped.json()["messages"]]
            acked = client.post("/api/v1/ack/batch",
                                json={"acknowledgments": acks, "consumerGroup": WATCHERS})
            self._note(f"ack {acked.status_code}")
            if acked.status_code != 200:
                return -1
            self.acked += len(acks)
            return len(acks)
        except httpx.HTTPError as err:
            self._note(err.__class__.__name__)
            return -1

    def _note(self, what: str) -> None:
        self.answers[what] = self.answers.get(what, 0) + 1

    def longest_gap(self, since: float) -> float:
        times = [t for t in self.successes if t >= since - 5]
        return max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)


def _timed_notes(producers: Producers) -> list[tuple[float, str]]:
    """Records when each push answer came (the ledger only counts them)."""
    notes: list[tuple[float, str]] = []
    note = producers.ledger.note

    def timed(what: str) -> None:
        notes.append((time.monotonic(), what))
        note(what)

    producers.ledger.note = timed  # type: ignore[method-assign]
    return notes


async def _official_client_pushes(client: Queen, ledger: Ledger, stop: asyncio.Event) -> None:
    """The official 0.15.0 client pushing to partitions of its own (c0, c1) until ``stop``,
    each message sent again with its transactionId until it is acknowledged."""
    seqs = {"c0": 0, "c1": 0}
    while not stop.is_set():
        for partition, seq in seqs.items():
            sent = Sent(partition, seq, str(uuid.uuid4()))
            with ledger.lock:
                ledger.sent[sent.transaction_id] = sent
            item = {"transactionId": sent.transaction_id,
                    "data": {"partition": partition, "seq": seq}}
            while not sent.acknowledged:
                try:
                    [result] = await client.queue(QUEUE).partition(partition).push([item])
                    sent.statuses.append(result["status"])
                    ledger.note(f"client {result['status']}")
                except Exception as err:  # the client's own retries gave up: send it again
                    ledger.note(f"client {err.__class__.__name__}")
                    await asyncio.sleep(0.2)
            seqs[partition] += 1
        await asyncio.sleep(0.01)


async def _switch_under_load(url: str, pair: Pair, producers: Producers,
                             notes: list[tuple[float, str]]) -> dict[str, float]:
    """Runs the official client's pushes beside the raw producers and the pop+ack load,
    kills the primary, promotes the standby, and waits until pushes are stored again."""
    async with connect(url) as client:
        stop = asyncio.Event()
        pushing = asyncio.create_task(_official_client_pushes(client, producers.ledger, stop))
        await asyncio.to_thread(wait_until, lambda: producers.sent_count() > 150, 30,
                                message="load running")
        killed_at = time.monotonic()
        await asyncio.to_thread(pair.kill_primary_and_promote)
        promoted_at = time.monotonic()
        await asyncio.to_thread(
            wait_until, lambda: any(t > promoted_at and what == "queued"
                                    for t, what in notes[-50:]),
            30, interval=0.1, message="pushes stored in PostgreSQL again")
        await asyncio.sleep(2)  # load after the switch too
        stop.set()
        await pushing
    return {"killed": killed_at, "promoted": promoted_at}


@pytest.mark.fault
def test_acknowledged_pushes_survive_a_primary_killed_and_a_standby_promoted() -> None:
    root = Path(tempfile.mkdtemp(prefix="queen-tw-pgfailover-"))
    pair = Pair(root)
    fleet: Fleet | None = None
    try:
        pair.start()
        fleet = Fleet(pair.pg_env())
        server = fleet.server()
        producers = Producers(server.url, QUEUE, threads=3, partitions_each=2, limit=10_000,
                              pause=0.01)
        notes = _timed_notes(producers)
        producers.start()
        watchers = Watchers(server.url).start()
        times = run_scenario(_switch_under_load(server.url, pair, producers, notes))
        ledger = producers.stop()
        watchers.stop()

        delivered = drain(server.url, QUEUE, ledger.partitions())
        result = count(ledger, delivered)
        report("pg failover", result)
        killed_at, promoted_at = times["killed"], times["promoted"]
        back_at = next(t for t, what in notes if t > promoted_at and what == "queued")
        print(f"[fault] pg failover: promote took {promoted_at - killed_at:.2f}s, pushes "
              f"stored in PostgreSQL again {back_at - killed_at:.2f}s after the kill, "
              f"{result.buffered} pushes answered buffered meanwhile, push answers other "
              f"than 201 during the switch: "
              f"{sum(1 for t, w in notes if t >= killed_at and w.isdigit() and w != '201')}, "
              f"longest time without a pop+ack delivery {watchers.longest_gap(killed_at):.2f}s "
              f"({watchers.failures} failed pop+ack cycles, {watchers.acked} messages acked, "
              f"answers {watchers.answers})")
        assert not producers.errors, producers.errors
        result.assert_nothing_lost()
        assert result.acknowledged == result.sent
        assert {"c0", "c1"} <= set(ledger.partitions())  # the official client's pushes too
        assert watchers.acked > 0 and watchers.successes[-1] > promoted_at
    finally:
        if fleet is not None:
            fleet.close()
        pair.stop()
        shutil.rmtree(root, ignore_errors=True)
