"""Helpers shared by the tests: the real server as a subprocess, unique names, PG settings.

Import from tests as ``from tests.support import ServerProcess, unique_name``: the suite runs
as ``python -m pytest`` from the repository root, which puts the root on ``sys.path``.
(``from support import …`` also works, because pytest puts the ``tests`` directory there.)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import httpx
from psycopg2.extensions import connection, parse_dsn

REPO_ROOT = Path(__file__).resolve().parent.parent

T = TypeVar("T")

WAIT_CEILING_S = 30.0
"""How long an event-driven wait gives a loaded machine before the test fails."""

# Runs twistd from the interpreter running the tests (``python -m twisted`` is ``twist``,
# which has neither -n nor --pidfile).
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def unique_name(prefix: str = "test-") -> str:
    """A queue/group name no other test uses; the ``test-`` prefix is what the official
    harnesses clean up (``DELETE FROM queen.queues WHERE name LIKE 'test-%'``)."""
    return f"{prefix}{uuid.uuid4().hex[:12]}"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def wait_until(predicate: Callable[[], T | None], timeout: float = WAIT_CEILING_S,
               interval: float = 0.02, message: str = "the condition") -> T:
    """Call ``predicate`` every ``interval`` seconds until it returns something truthy; return it.

    Tests wait for events this way instead of sleeping a guessed time: the wait ends as soon
    as the event happens, and ``timeout`` is only a ceiling that turns a broken server into a
    failure (AssertionError naming ``message``) rather than a hang. Keep it generous.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{message} did not happen within {timeout} s")
        time.sleep(interval)


async def wait_until_reactor(predicate: Callable[[], T | None],
                             timeout: float = WAIT_CEILING_S, interval: float = 0.01,
                             message: str = "the condition") -> T:
    """:func:`wait_until` for code running on the reactor (pytest-twisted tests): the reactor
    keeps running between checks, so the server-side work being waited for can happen."""
    from twisted.internet import reactor, task  # the reactor pytest-twisted installed

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{message} did not happen within {timeout} s")
        await task.deferLater(reactor, interval, lambda: None)


def pg_env_from_dsn(dsn: str) -> dict[str, str]:
    """PG_* variables for queen-tw from a libpq DSN (keyword or URI form)."""
    parts = parse_dsn(dsn)
    env = {
        "PG_HOST": parts.get("host", "localhost"),
        "PG_PORT": parts.get("port", "5432"),
        "PG_USER": parts.get("user", "postgres"),
        "PG_PASSWORD": parts.get("password", ""),
        "PG_DB": parts.get("dbname", parts.get("user", "postgres")),
    }
    if parts.get("sslmode") in ("require", "verify-ca", "verify-full"):
        env["PG_USE_SSL"] = "true"
    return env


TEST_ENCRYPTION_KEY = "5a" * 32
"""QUEEN_ENCRYPTION_KEY of the shared server (64 hex characters). Every keyed server on the
shared database uses it: a server with another key refuses to start on a database holding
payloads encrypted with this one."""


class ServerProcess:
    """The real queen-tw server (``twistd -n queen``) in a subprocess on a loopback port.

    ``start()`` can be called again after ``stop()`` or ``kill()``: the same port, log and
    file-buffer directory are reused, which is what crash/restart tests need.
    """

    def __init__(
        self,
        pg_env: Mapping[str, str],
        workdir: os.PathLike[str] | str,
        env_overrides: Mapping[str, str] | None = None,
        port: int | None = None,
    ) -> None:
        """
        @param pg_env: PG_* variables of the test database.
        @param workdir: private directory for the log and the file buffer.
        @param env_overrides: extra or replaced environment variables (e.g. RETENTION_INTERVAL).
        @param port: HTTP port; a free one is picked when None.
        """
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port if port is not None else free_port()
        self.log_path = self.workdir / "server.log"
        self.buffer_dir = self.workdir / "buffers"
        self.env = {
            **os.environ,
            **pg_env,
            "FILE_BUFFER_DIR": str(self.buffer_dir),
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
            **(env_overrides or {}),
        }
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Base URL of the HTTP API."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """The server's pid while it runs."""
        if self.process is None or not self.running:
            return None
        return self.process.pid

    @property
    def running(self) -> bool:
        """True while the subprocess has not exited."""
        return self.process is not None and self.process.poll() is None

    def command(self) -> list[str]:
        """The command line that starts the server.

        It logs to stdout, which is appended to ``server.log``: one file that also holds
        anything printed before logging starts, and that twistd never rotates away.
        """
        return [*TWISTD, "-n", "--pidfile=", "--logfile=-", "queen",
                "--port", str(self.port), "--host", "127.0.0.1"]

    def start(self, timeout: float = 30.0) -> ServerProcess:
        """Launch the server and wait until ``GET /health`` answers 200.

        Raises RuntimeError with the end of the log if it exits or does not get healthy.
        """
        if self.running:
            raise RuntimeError("server already running")
        self.buffer_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as output:
            self.process = subprocess.Popen(
                self.command(), env=self.env, cwd=self.workdir, stdin=subprocess.DEVNULL,
                stdout=output, stderr=subprocess.STDOUT,
            )
        self._wait_healthy(timeout)
        return self

    def _wait_healthy(self, timeout: float) -> None:
        """Poll /health until 200, the process dies, or the timeout passes."""
        deadline = time.monotonic() + timeout
        last_error = "no answer"
        while time.monotonic() < deadline:
            exit_code = self.process.poll() if self.process is not None else None
            if exit_code is not None:
                raise RuntimeError(f"server exited with {exit_code}:\n{self.log_tail()}")
            try:
                answer = httpx.get(f"{self.url}/health", timeout=2)
                if answer.status_code == 200:
                    return
                last_error = f"HTTP {answer.status_code}: {answer.text[:200]}"
            except httpx.HTTPError as err:
                last_error = repr(err)
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(
            f"server not healthy after {timeout}s ({last_error}):\n{self.log_tail()}")

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (graceful shutdown), then SIGKILL after ``timeout``; returns the exit code."""
        if self.process is None:
            return None
        if self.running:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        return self.kill()

    def kill(self) -> int | None:
        """SIGKILL: a crash without any shutdown work; returns the exit code."""
        if self.process is None:
            return None
        if self.running:
            self.process.kill()
        return self.process.wait()

    def log_text(self) -> str:
        """Everything the server printed and logged, across restarts."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of :meth:`log_text`, for failure messages."""
        return "\n".join(self.log_text().splitlines()[-lines:])


def count_messages(db: connection, queue: str) -> int:
    """How many messages of ``queue`` are stored (``db``: a psycopg2 connection)."""
    with db.cursor() as cursor:
        cursor.execute("""SELECT count(*) FROM queen.messages m
                            JOIN queen.partitions p ON p.id = m.partition_id
                            JOIN queen.queues q ON q.id = p.queue_id
                           WHERE q.name = %s""", (queue,))
        return cursor.fetchone()[0]


def expire_leases(db: connection, queue: str) -> int:
    """End every lease on ``queue`` now, on PostgreSQL's clock; returns how many there were.

    Tests use it instead of sleeping past a lease time: what happens once a lease has run
    out is the same whether it ran out by waiting or by this.
    """
    with db.cursor() as cursor:
        cursor.execute("""UPDATE queen.partition_consumers pc
                             SET lease_expires_at = now() - interval '1 second'
                            FROM queen.partitions p JOIN queen.queues q ON q.id = p.queue_id
                           WHERE pc.partition_id = p.id AND q.name = %s
                             AND pc.lease_id IS NOT NULL""", (queue,))
        return cursor.rowcount


def pass_time(db: connection, queue: str, seconds: float) -> None:
    """Move everything ``queue`` remembers ``seconds`` into the past, on PostgreSQL's clock:
    to the server it is as if that much time had passed for this queue alone.

    Message times, the partitions' newest-message times, cursors, leases and retry
    cool-downs all move together, so their order stays as it was. Tests use it instead of
    sleeping until a delay, window or cool-down ends, and can then use delays long enough
    that "not yet" holds however slow the machine is.
    """
    shift = {"shift": f"{seconds} seconds"}
    with db.cursor() as cursor:
        cursor.execute("""
            WITH parts AS (SELECT p.id FROM queen.partitions p
                             JOIN queen.queues q ON q.id = p.queue_id WHERE q.name = %(queue)s),
                 messages AS (
                   UPDATE queen.messages SET created_at = created_at - %(shift)s::interval
                    WHERE partition_id IN (SELECT id FROM parts) RETURNING 1),
                 pending AS (
                   UPDATE queen.partition_pending
                      SET last_message_at = last_message_at - %(shift)s::interval
                    WHERE partition_id IN (SELECT id FROM parts) RETURNING 1),
                 consumers AS (
                   UPDATE queen.partition_consumers
                      SET cursor_created_at = cursor_created_at - %(shift)s::interval,
                          lease_expires_at = lease_expires_at - %(shift)s::interval,
                          lease_last_created_at = lease_last_created_at - %(shift)s::interval,
                          retry_after = retry_after - %(shift)s::interval
                    WHERE partition_id IN (SELECT id FROM parts) RETURNING 1)
            UPDATE queen.partitions
               SET last_message_at = last_message_at - %(shift)s::interval
             WHERE id IN (SELECT id FROM parts)""", {"queue": queue, **shift})


def db_clock_iso(db: connection, seconds_ago: float = 0.0) -> str:
    """PostgreSQL's clock ``seconds_ago`` in the past, as the ISO-8601 ``…Z`` text clients
    send; a cut between two pushes taken here needs no sleep to fall strictly between them
    (each push's time is its own transaction's ``now()``)."""
    with db.cursor() as cursor:
        cursor.execute("""SELECT to_char((clock_timestamp() - %s * interval '1 second')
                                         AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')""",
                       (seconds_ago,))
        return cursor.fetchone()[0]


def lease_ends_in(db: connection, lease_id: str, seconds: float) -> None:
    """Make ``lease_id`` run out ``seconds`` from now, on PostgreSQL's clock (as if most of
    its lease time had gone by)."""
    with db.cursor() as cursor:
        cursor.execute("""UPDATE queen.partition_consumers
                             SET lease_expires_at = now() + %s * interval '1 second'
                           WHERE lease_id = %s""", (seconds, lease_id))
        assert cursor.rowcount == 1, f"no lease {lease_id}"


def lease_seconds_left(db: connection, lease_id: str) -> float | None:
    """Seconds until ``lease_id`` runs out on PostgreSQL's clock (None: no such lease)."""
    with db.cursor() as cursor:
        cursor.execute("""SELECT extract(epoch FROM lease_expires_at - now())
                            FROM queen.partition_consumers WHERE lease_id = %s""", (lease_id,))
        row = cursor.fetchone()
        return None if row is None else float(row[0])


@contextmanager
def running_server(pg_env: Mapping[str, str], prefix: str = "queen-tw-server-",
                   **env_overrides: str) -> Iterator[ServerProcess]:
    """A started server in a fresh directory under the system temp dir (not pytest's
    basetemp: see conftest), stopped and removed on exit. For module or session fixtures."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    process = ServerProcess(dict(pg_env), workdir, env_overrides).start()
    try:
        yield process
    finally:
        process.stop()
        shutil.rmtree(workdir, ignore_errors=True)
