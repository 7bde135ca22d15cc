"""A PostgreSQL outage seen by the pool is a few log lines, not one per connection and per
failed call: a private PostgreSQL is stopped under a connected pool and started again."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg2
import pytest
import pytest_twisted
from twisted.internet import reactor, task, threads

from queen_tw.config import Config
from queen_tw.db.embedded import EmbeddedPostgres
from queen_tw.db.pool import Database
from queen_tw.errors import DatabaseUnavailable

from faultkit import private_postgres

RECOVERY_CEILING_S = 60.0


@pytest.fixture(scope="module")
def postgres() -> Iterator[EmbeddedPostgres]:
    with private_postgres() as server:
        yield server


@pytest.fixture
def dsn(postgres: EmbeddedPostgres) -> str:
    """The private database, with a function for ``Database.call`` to run."""
    dsn = Config.from_sources(postgres.pg_env(), {}).dsn
    connection = psycopg2.connect(dsn)
    try:
        with connection, connection.cursor() as cursor:
            cursor.execute("CREATE SCHEMA IF NOT EXISTS queen")
            cursor.execute("CREATE OR REPLACE FUNCTION queen.outage_probe() RETURNS int "
                           "LANGUAGE sql AS 'SELECT 1'")
    finally:
        connection.close()
    return dsn


@pytest_twisted.ensureDeferred
async def test_a_stopped_postgres_is_one_line_down_and_one_line_back(
        postgres: EmbeddedPostgres, dsn: str, lines: list[str]) -> None:
    db = Database(dsn, 3, reactor, call_deadline=5.0)
    await db.connect()
    try:
        assert await db.call("outage_probe") == 1
        await threads.deferToThread(postgres.stop)

        refused = 0
        for _ in range(30):
            try:
                await db.call("outage_probe")
            except DatabaseUnavailable:
                refused += 1
        await threads.deferToThread(postgres.start)
        waited = 0.0
        while True:
            try:
                assert await db.call("outage_probe") == 1
                break
            except DatabaseUnavailable:
                assert waited < RECOVERY_CEILING_S, lines
                await task.deferLater(reactor, 0.2, lambda: None)
                waited += 0.2
    finally:
        db.close()

    assert refused == 30
    assert len([line for line in lines if line.startswith("PostgreSQL failing")]) == 1, lines
    assert len([line for line in lines if line.startswith("PostgreSQL working again")]) == 1
    assert len(lines) <= 4, lines  # plus a reminder or two if the restart was slow
