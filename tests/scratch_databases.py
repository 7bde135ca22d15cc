"""Throwaway databases on the test PostgreSQL, for tests that need a schema of their own
(an old layout to upgrade, a failed or refused upgrade) without touching the shared one.

Import as ``from scratch_databases import scratch_database, server_env``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import psycopg2
import psycopg2.extensions


@contextmanager
def scratch_database(admin_dsn: str) -> Iterator[str]:
    """Creates an empty database next to ``admin_dsn``'s, yields its DSN, then drops it
    (``WITH (FORCE)``, so a server left connected to it does not keep it alive)."""
    name = f"queen_scratch_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(admin_dsn)
    admin.autocommit = True
    try:
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        try:
            yield psycopg2.extensions.make_dsn(admin_dsn, dbname=name)
        finally:
            with admin.cursor() as cursor:
                cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.close()


def server_env(pg_env: Mapping[str, str], dsn: str) -> dict[str, str]:
    """``pg_env`` pointed at the database of ``dsn``, for ``running_server``/``ServerProcess``."""
    return {**pg_env, "PG_DB": psycopg2.extensions.parse_dsn(dsn)["dbname"]}


def record_schema_version(dsn: str, version: int, name: str) -> None:
    """Records a migration as applied without running it: ``record_schema_version(dsn, 999,
    "0999_future.sql")`` makes the database newer than the code, so installing refuses."""
    connection = psycopg2.connect(dsn)
    try:
        with connection, connection.cursor() as cursor:
            cursor.execute("INSERT INTO queen.schema_migrations (version, name) VALUES (%s, %s)",
                           (version, name))
    finally:
        connection.close()
