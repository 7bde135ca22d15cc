"""The embedded PostgreSQL used by `make run` and the tests: start, use, stop, restart."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest

from queen_tw.config import Config
from queen_tw.db.embedded import EmbeddedPostgres


@pytest.fixture
def cluster() -> Iterator[EmbeddedPostgres]:
    """A fresh cluster in its own temp dir (not pytest's tmp_path: see conftest)."""
    root = Path(tempfile.mkdtemp(prefix="queen-tw-pgtest-"))
    pg = EmbeddedPostgres(root / "data")
    try:
        yield pg
    finally:
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)


def query(dsn: str, sql: str) -> list[tuple]:
    """Run one statement on a new autocommit connection and return its rows."""
    connection = psycopg2.connect(dsn)
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql)
            return cursor.fetchall() if cursor.description else []
    finally:
        connection.close()


def test_started_cluster_answers_queries_over_its_unix_socket_only(
    cluster: EmbeddedPostgres,
) -> None:
    cluster.start()
    assert query(cluster.dsn, "SELECT 1") == [(1,)]
    assert query(cluster.dsn, "SHOW listen_addresses") == [("",)]
    assert int(query(cluster.dsn, "SHOW max_connections")[0][0]) >= 200
    assert cluster.pid is not None


def test_config_built_from_pg_env_connects(cluster: EmbeddedPostgres) -> None:
    cluster.start()
    config = Config.from_sources(cluster.pg_env(), {})
    assert query(config.dsn, "SELECT current_setting('application_name')") == [("queen-tw-1",)]


def test_start_is_idempotent(cluster: EmbeddedPostgres) -> None:
    cluster.start()
    pid = cluster.pid
    cluster.start()
    assert cluster.pid == pid


def test_data_survives_stop_and_start_on_the_same_dir(cluster: EmbeddedPostgres) -> None:
    cluster.start()
    query(cluster.dsn, "CREATE TABLE kept (value int); INSERT INTO kept VALUES (42)")
    cluster.stop()
    assert cluster.pid is None and not cluster.is_running()
    cluster.start()
    assert query(cluster.dsn, "SELECT value FROM kept") == [(42,)]


def test_a_second_handle_on_the_same_dir_reuses_the_running_cluster(
    cluster: EmbeddedPostgres,
) -> None:
    cluster.start()
    other = EmbeddedPostgres(cluster.data_dir)
    other.start()
    assert other.pid == cluster.pid


def test_stop_works_on_a_frozen_cluster(cluster: EmbeddedPostgres) -> None:
    cluster.start()
    cluster.freeze()
    cluster.stop()
    assert not cluster.is_running()
