"""A schema upgrade that fails ends the server with one clear line and status 1, and
``--migrate-only`` installs the schema and exits: real ``twistd queen`` processes, each on a
throwaway database of the test PostgreSQL."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest

from scratch_databases import scratch_database, server_env
from support import ServerProcess

EXIT_CEILING_S = 90  # generous: the machine is shared; a healthy run takes a few seconds


@pytest.fixture
def fresh_dsn(pg_dsn: str) -> Iterator[str]:
    with scratch_database(pg_dsn) as dsn:
        yield dsn


@pytest.fixture
def unupgradable_dsn(fresh_dsn: str) -> str:
    """A database holding ``queen.uuid_v7(timestamptz)`` with another result type than the
    shipped one: ``CREATE OR REPLACE`` of it fails, whatever the installer does before."""
    connection = psycopg2.connect(fresh_dsn)
    try:
        with connection, connection.cursor() as cursor:
            cursor.execute("CREATE SCHEMA queen")
            cursor.execute("CREATE FUNCTION queen.uuid_v7(ts timestamptz) RETURNS text "
                           "LANGUAGE sql AS $$ SELECT 'not a uuid' $$")
    finally:
        connection.close()
    return fresh_dsn


def run_to_exit(pg_env: dict[str, str], dsn: str, workdir: Path, *flags: str,
                **env: str) -> tuple[int, str]:
    """Runs the server on ``dsn`` until it exits by itself; returns its status and output."""
    server = ServerProcess(server_env(pg_env, dsn), workdir, env)
    server.buffer_dir.mkdir(parents=True, exist_ok=True)
    with open(server.log_path, "ab") as output:
        process = subprocess.Popen([*server.command(), *flags], env=server.env, cwd=workdir,
                                   stdin=subprocess.DEVNULL, stdout=output,
                                   stderr=subprocess.STDOUT)
    try:
        status = process.wait(EXIT_CEILING_S)
    except subprocess.TimeoutExpired as late:
        process.kill()
        process.wait()
        raise AssertionError(f"still running after {EXIT_CEILING_S}s:\n{server.log_tail()}"
                             ) from late
    return status, server.log_text()


def relation_exists(dsn: str, name: str) -> bool:
    connection = psycopg2.connect(dsn)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT to_regclass(%s) IS NOT NULL", (name,))
            return bool(cursor.fetchone()[0])
    finally:
        connection.close()


@pytest.mark.parametrize(("flags", "workers"), [((), 1), (("--migrate-only",), 1), ((), 2)],
                         ids=["server", "migrate-only", "two-workers"])
def test_a_failed_schema_upgrade_ends_the_process_with_one_clear_line(
        pg_env, unupgradable_dsn: str, tmp_path: Path, flags: tuple[str, ...],
        workers: int) -> None:
    status, output = run_to_exit(pg_env, unupgradable_dsn, tmp_path, *flags,
                                 NUM_WORKERS=str(workers))

    assert status == 1, output
    reasons = [line for line in output.splitlines() if "schema upgrade failed" in line]
    assert 1 <= len(reasons) <= workers, output  # each worker tries, and says it once
    assert "uuid_v7" in reasons[0] or "return type" in reasons[0], reasons[0]
    assert "Traceback" not in output
    assert not relation_exists(unupgradable_dsn, "queen.messages")  # rolled back


def test_migrate_only_installs_the_schema_and_exits_0(pg_env, fresh_dsn: str,
                                                      tmp_path: Path) -> None:
    status, output = run_to_exit(pg_env, fresh_dsn, tmp_path, "--migrate-only")

    assert status == 0, output
    assert "schema files applied" in output and "Traceback" not in output
    assert relation_exists(fresh_dsn, "queen.messages")
    connection = psycopg2.connect(fresh_dsn)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM queen.schema_migrations")
            assert cursor.fetchone()[0] >= 1
            cursor.execute("SELECT to_regproc('queen.push_store') IS NOT NULL")
            assert cursor.fetchone()[0] is True
    finally:
        connection.close()

    again, output = run_to_exit(pg_env, fresh_dsn, tmp_path / "again", "--migrate-only")
    assert again == 0 and "schema is up to date" in output
