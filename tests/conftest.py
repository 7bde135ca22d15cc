"""Fixtures for the whole suite: a real PostgreSQL, the real server, clients for both.

PostgreSQL: ``QUEEN_TEST_PG_DSN`` names an existing database, otherwise the session starts a
private embedded PostgreSQL in a fresh temporary directory and stops it at the end.

pytest-twisted (loaded as a plugin) runs the default reactor for ``@pytest_twisted``-style
tests; the fixtures here are plain blocking code and do not touch the reactor.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import httpx
import psycopg2
import pytest
from twisted.logger import formatEvent, globalLogPublisher

from queen_tw.config import Config
from queen_tw.db.embedded import EmbeddedPostgres

from support import TEST_ENCRYPTION_KEY, ServerProcess, pg_env_from_dsn, running_server

EXTERNAL_DSN_VARIABLE = "QUEEN_TEST_PG_DSN"


def _private_tempdir(prefix: str) -> Path:
    """A fresh directory directly under the system temp dir.

    Not under pytest's basetemp: another pytest session resets that tree to mode 0700,
    which would lock out the unprivileged user the embedded PostgreSQL runs as under root.
    """
    return Path(tempfile.mkdtemp(prefix=prefix))


@pytest.fixture(scope="session")
def pg_server() -> Iterator[EmbeddedPostgres | None]:
    """The session's embedded PostgreSQL (None when ``QUEEN_TEST_PG_DSN`` is used).

    Fault tests may ``freeze()``/``thaw()`` or ``stop()``/``start()`` it, and must leave it
    running when they finish.
    """
    if os.environ.get(EXTERNAL_DSN_VARIABLE):
        yield None
        return
    root = _private_tempdir("queen-tw-pg-")
    server = EmbeddedPostgres(root / "data")
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_env(pg_server: EmbeddedPostgres | None) -> dict[str, str]:
    """PG_* environment variables that point queen-tw at the test database."""
    external = os.environ.get(EXTERNAL_DSN_VARIABLE)
    if external:
        return pg_env_from_dsn(external)
    assert pg_server is not None
    return pg_server.pg_env()


@pytest.fixture(scope="session")
def pg_dsn(pg_env: dict[str, str]) -> str:
    """libpq DSN of the test database, exactly as the server builds it from ``pg_env``."""
    external = os.environ.get(EXTERNAL_DSN_VARIABLE)
    if external:
        return external
    return Config.from_sources(pg_env, {}).dsn


@pytest.fixture
def db(pg_dsn: str) -> Iterator[psycopg2.extensions.connection]:
    """An autocommit psycopg2 connection to the test database, for checking rows directly."""
    connection = psycopg2.connect(pg_dsn)
    connection.autocommit = True
    try:
        yield connection
    finally:
        connection.close()


@pytest.fixture
def holder(pg_dsn: str) -> Iterator[psycopg2.extensions.connection]:
    """A connection whose open transaction holds the rows a test locks with ``FOR UPDATE``
    (what a long transaction or a stuck admin session does); rolled back at the end."""
    connection = psycopg2.connect(pg_dsn)
    try:
        yield connection
    finally:
        connection.rollback()
        connection.close()


@pytest.fixture(scope="session")
def server(pg_env: dict[str, str]) -> Iterator[ServerProcess]:
    """One queen-tw server shared by most tests (do not stop or reconfigure it)."""
    # A key, as production servers of encrypted queues have: an encryptionEnabled queue is
    # refused by a server without one.
    with running_server(pg_env, QUEEN_ENCRYPTION_KEY=TEST_ENCRYPTION_KEY) as process:
        yield process


@pytest.fixture
def make_server(pg_env: dict[str, str]) -> Iterator[Callable[..., ServerProcess]]:
    """Factory for extra servers: ``make_server(RETENTION_INTERVAL="2000")``.

    Keyword arguments are environment overrides; pass ``start=False`` to get the process
    object unstarted.  Every server made here is stopped when the test ends.
    """
    made: list[ServerProcess] = []
    workdirs: list[Path] = []

    def factory(start: bool = True, **env_overrides: str) -> ServerProcess:
        workdir = _private_tempdir("queen-tw-server-")
        workdirs.append(workdir)
        process = ServerProcess(pg_env, workdir, env_overrides)
        made.append(process)
        return process.start() if start else process

    factory.made = made  # type: ignore[attr-defined]  # read by the failure-report hook
    try:
        yield factory
    finally:
        for process in made:
            process.stop()
        for workdir in workdirs:
            shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    """An HTTP client for the shared server (long-poll friendly timeout)."""
    with httpx.Client(base_url=server.url, timeout=40) as client:
        yield client


def _servers_of(item: pytest.Item) -> list[tuple[str, ServerProcess]]:
    """The server processes a test used, by fixture name."""
    funcargs = getattr(item, "funcargs", {})
    found: list[tuple[str, ServerProcess]] = []
    if isinstance(funcargs.get("server"), ServerProcess):
        found.append(("server", funcargs["server"]))
    for index, process in enumerate(getattr(funcargs.get("make_server"), "made", [])):
        found.append((f"make_server[{index}]", process))
    return found


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the end of each server log to a failed test, before teardown deletes it."""
    report = yield
    if report.when == "call" and report.failed:
        for name, process in _servers_of(item):
            report.sections.append((f"queen-tw log ({name})", process.log_tail(60)))
    return report


@pytest.fixture
def lines() -> Iterator[list[str]]:
    """Every log line of the server's modules emitted during the test, formatted."""
    seen: list[str] = []

    def observe(event: dict) -> None:
        if event.get("log_namespace", "").startswith("queen_tw"):
            seen.append(formatEvent(event))
    globalLogPublisher.addObserver(observe)
    try:
        yield seen
    finally:
        globalLogPublisher.removeObserver(observe)
