"""Versioned schema migrations: the baseline matches the old schema, old databases upgrade
with their messages, each migration applies once, failures roll everything back.

Every test gets its own database (``CREATE DATABASE`` on the session's PostgreSQL, dropped
after). "The previous installer" is the real one: its ``queen_tw/db/schema.py`` and its
``sql/*.sql`` are read from git at ``LEGACY_COMMIT``, the last commit before migrations.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import time
import types
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import psycopg2
import pytest

from queen_tw.db.schema import (
    SchemaUpgradeError,
    function_files,
    install_schema,
    migration_files,
)
from queen_tw.paths import sql_dir

from scratch_databases import record_schema_version, scratch_database, server_env
from support import REPO_ROOT, running_server, unique_name

# The last commit whose installer re-ran sql/NNN_*.sql by hash (queen.schema_files).
LEGACY_COMMIT = "191c143cc07a29cb51d86153c8dbf79308ed359e"

BOOKKEEPING_TABLES = ("schema_files", "schema_migrations", "schema_functions",
                      "schema_definitions")

SHIPPED = [(m.version, m.path.name) for m in migration_files(sql_dir())]
"""(version, file name) of every migration shipped in sql/migrations/, in order."""

LATEST = SHIPPED[-1][0]
"""The newest shipped version; the tests' own migrations are numbered after it."""


def next_migration(name: str, after: int = 0) -> str:
    """The file name of a test's own migration ``name``: numbered ``after`` past the next
    free number (``next_migration("test.sql")`` is ``0005_test.sql`` when 0004 is shipped)."""
    return f"{LATEST + 1 + after:04d}_{name}"


# -- databases --------------------------------------------------------------------------


@pytest.fixture
def new_database(pg_dsn: str) -> Iterator[Callable[[], str]]:
    """Factory: creates an empty database and returns its DSN; all are dropped at the end."""
    with ExitStack() as stack:
        yield lambda: stack.enter_context(scratch_database(pg_dsn))


def _query(dsn: str, sql: str, params: Any = None) -> list[tuple]:
    """Runs one statement in its own committed transaction; returns its rows (if any)."""
    connection = psycopg2.connect(dsn)
    try:
        with connection, connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall() if cursor.description else []
    finally:
        connection.close()


def _git_show(path: str) -> str:
    """A file of the repository as it was at LEGACY_COMMIT."""
    try:
        return subprocess.run(["git", "-C", str(REPO_ROOT), "show", f"{LEGACY_COMMIT}:{path}"],
                              check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"needs the git history up to {LEGACY_COMMIT[:7]}: {err}")


def install_with_previous_installer(dsn: str, workdir: Path) -> list[str]:
    """Builds the schema exactly as the last release before migrations did: its own code
    (``schema.py`` at LEGACY_COMMIT) applying its own ``sql/NNN_*.sql`` files."""
    listing = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "ls-tree", "--name-only", f"{LEGACY_COMMIT}:sql"],
        capture_output=True, text=True)
    if listing.returncode != 0:
        pytest.skip(f"needs the git history up to {LEGACY_COMMIT[:7]}: {listing.stderr.strip()}")
    legacy_sql = workdir / "legacy-sql"
    legacy_sql.mkdir()
    for name in listing.stdout.split():
        (legacy_sql / name).write_text(_git_show(f"sql/{name}"))
    installer = types.ModuleType("legacy_schema")
    exec(compile(_git_show("queen_tw/db/schema.py"), "legacy_schema.py", "exec"),  # noqa: S102
         installer.__dict__)
    return installer.install_schema(dsn, legacy_sql)


# -- fingerprints -----------------------------------------------------------------------


def table_shape(dsn: str) -> dict[str, list]:
    """Tables, columns, indexes, constraints and sequences of schema queen, bookkeeping aside."""
    skip = BOOKKEEPING_TABLES
    return {
        "columns": _query(dsn, """
            SELECT table_name, ordinal_position, column_name, data_type, udt_name,
                   is_nullable, column_default, character_maximum_length, numeric_precision
              FROM information_schema.columns
             WHERE table_schema = 'queen' AND table_name <> ALL(%s)
             ORDER BY 1, 2""", (list(skip),)),
        "indexes": _query(dsn, """
            SELECT tablename, indexname, indexdef FROM pg_indexes
             WHERE schemaname = 'queen' AND tablename <> ALL(%s) ORDER BY 1, 2""", (list(skip),)),
        "constraints": _query(dsn, """
            SELECT c.conrelid::regclass::text, c.conname, c.contype, pg_get_constraintdef(c.oid)
              FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
             WHERE n.nspname = 'queen' AND c.conrelid::regclass::text
                   <> ALL(SELECT 'queen.' || unnest(%s::text[])) ORDER BY 1, 2""", (list(skip),)),
        "sequences": _query(dsn, """
            SELECT sequence_name, data_type, start_value, increment
              FROM information_schema.sequences
             WHERE sequence_schema = 'queen' ORDER BY 1"""),
    }


def routines(dsn: str) -> list[tuple]:
    """Every function (with its full definition) and trigger of schema queen."""
    return _query(dsn, """
        SELECT 'function', p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')',
               pg_get_functiondef(p.oid)
          FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname = 'queen'
        UNION ALL
        SELECT 'trigger', t.tgname, pg_get_triggerdef(t.oid)
          FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'queen' AND NOT t.tgisinternal
         ORDER BY 1, 2""")


def recorded_versions(dsn: str) -> list[tuple[int, str]]:
    """The rows of queen.schema_migrations."""
    return _query(dsn, "SELECT version, name FROM queen.schema_migrations ORDER BY version")


def every_file(directory: Path) -> list[str]:
    """What a complete install of ``directory`` applies, in order."""
    return ([m.label for m in migration_files(directory)]
            + [f"functions/{path.name}" for path in function_files(directory)])


def copy_of_sql(tmp_path: Path) -> Path:
    """A private copy of the shipped sql/ directory to add files to."""
    target = tmp_path / "sql"
    shutil.copytree(sql_dir(), target)
    return target


# -- the baseline is today's schema -------------------------------------------------------


def test_baseline_builds_exactly_the_schema_of_the_previous_installer(new_database, tmp_path):
    legacy, baseline, fresh = new_database(), new_database(), new_database()
    install_with_previous_installer(legacy, tmp_path)
    only_baseline = tmp_path / "baseline"
    (only_baseline / "functions").mkdir(parents=True)
    (only_baseline / "migrations").mkdir()
    shutil.copy(sql_dir() / "migrations" / "0001_baseline.sql", only_baseline / "migrations")
    assert install_schema(baseline, only_baseline) == ["migrations/0001_baseline.sql"]
    assert install_schema(fresh, sql_dir()) == every_file(sql_dir())

    # Migration 1 alone makes the previous installer's tables; later migrations only add.
    assert table_shape(baseline) == table_shape(legacy)
    assert len(table_shape(baseline)["columns"]) > 100  # a real schema, not two empty ones
    # Every function and trigger the previous installer made is still made, same signature.
    assert {name for _, name, _ in routines(legacy)} <= {name for _, name, _ in routines(fresh)}


def test_database_of_the_previous_installer_is_adopted_as_version_1(new_database, tmp_path):
    legacy, fresh = new_database(), new_database()
    install_with_previous_installer(legacy, tmp_path)
    install_schema(fresh, sql_dir())

    applied = install_schema(legacy, sql_dir())

    assert applied == every_file(sql_dir())
    assert recorded_versions(legacy)[0] == (1, "0001_baseline.sql")  # adopted, not re-run
    assert recorded_versions(legacy) == SHIPPED
    assert table_shape(legacy) == table_shape(fresh)
    assert routines(legacy) == routines(fresh)
    assert install_schema(legacy, sql_dir()) == []


# -- an old database with messages keeps every one ----------------------------------------


def _pop_and_ack_all(url: str, queue: str, group: str | None) -> list[tuple[str, Any]]:
    """Pops (and acks) ``queue`` until it answers 204; returns (partition, payload) pairs."""
    received: list[tuple[str, Any]] = []
    params: dict[str, Any] = {"batch": 3, "wait": "false"}
    if group is not None:
        params["consumerGroup"] = group
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        answer = httpx.get(f"{url}/api/v1/pop/queue/{queue}", params=params, timeout=20)
        if answer.status_code == 204:
            return received
        assert answer.status_code == 200, answer.text
        messages = answer.json()["messages"]
        received += [(m["partition"], m["data"]) for m in messages]
        acked = httpx.post(f"{url}/api/v1/ack/batch", timeout=20, json={
            "consumerGroup": group,
            "acknowledgments": [{"transactionId": m["transactionId"],
                                 "partitionId": m["partitionId"], "leaseId": m["leaseId"],
                                 "status": "completed"} for m in messages]})
        assert acked.status_code == 200 and all(r["success"] for r in acked.json()), acked.text
    raise AssertionError(f"{queue} still delivering after 60 s; got {len(received)}")


def test_old_database_with_messages_upgrades_and_delivers_each_once_in_order(
        new_database, pg_env, tmp_path):
    dsn = new_database()
    install_with_previous_installer(dsn, tmp_path)
    queue, group = unique_name(), "billing"
    partitions = ["p0", "p1", "p2"]
    # As the old release stored them: its SQL-level push, a named group subscribed from the
    # start, and that group's cursor in p0 after the second message.
    _query(dsn, "SELECT queen.configure_queue(%s::jsonb)",
           (f'{{"queue": "{queue}", "namespace": "", "task": "", "options": {{}}}}',))
    queue_id = _query(dsn, "SELECT id FROM queen.queues WHERE name = %s", (queue,))[0][0]
    _query(dsn, "INSERT INTO queen.consumer_subscriptions (queue_id, consumer_group) "
                "VALUES (%s, %s)", (queue_id, group))
    for n in range(5):
        for partition in partitions:
            _query(dsn, "SELECT queen.push_messages_v2(jsonb_build_array(jsonb_build_object("
                        "'queue', %s::text, 'partition', %s::text, 'payload', %s::text)))",
                   (queue, partition, f"{partition}-{n}"))
    _query(dsn, """
        INSERT INTO queen.partition_consumers (partition_id, consumer_group, cursor_created_at,
                                               cursor_id)
        SELECT m.partition_id, %s, m.created_at, m.id
          FROM queen.messages m JOIN queen.partitions p ON p.id = m.partition_id
         WHERE p.queue_id = %s AND p.name = 'p0' AND m.payload = '"p0-1"'""", (group, queue_id))

    applied = install_schema(dsn, sql_dir())

    assert applied[0] == "migrations/0001_baseline.sql"
    with running_server(server_env(pg_env, dsn)) as server:
        by_group = _pop_and_ack_all(server.url, queue, group)
        by_queue_mode = _pop_and_ack_all(server.url, queue, None)

    expected_all = {p: [f"{p}-{n}" for n in range(5)] for p in partitions}
    expected_group = {**expected_all, "p0": ["p0-2", "p0-3", "p0-4"]}
    for received, expected in ((by_group, expected_group), (by_queue_mode, expected_all)):
        assert len(received) == sum(len(v) for v in expected.values())  # no duplicates
        assert {p: [d for q, d in received if q == p] for p in partitions} == expected


# -- each migration exactly once -----------------------------------------------------------


def test_installing_again_applies_nothing(new_database):
    dsn = new_database()
    assert install_schema(dsn, sql_dir()) == every_file(sql_dir())
    before = routines(dsn)

    assert install_schema(dsn, sql_dir()) == []
    assert recorded_versions(dsn) == SHIPPED
    assert routines(dsn) == before


def test_a_new_migration_is_applied_once_and_recorded(new_database, tmp_path):
    dsn = new_database()
    install_schema(dsn, sql_dir())
    upgraded = copy_of_sql(tmp_path)
    (upgraded / "migrations" / next_migration("test.sql")).write_text(
        "ALTER TABLE queen.queues ADD COLUMN test_note text NOT NULL DEFAULT 'none';\n")

    first = install_schema(dsn, upgraded)
    second = install_schema(dsn, upgraded)

    # Every function file follows a migration, so one a migration broke fails the upgrade.
    assert first == [f"migrations/{next_migration('test.sql')}",
                     *[f"functions/{path.name}" for path in function_files(upgraded)]]
    assert second == []
    assert recorded_versions(dsn) == [*SHIPPED, (LATEST + 1, next_migration("test.sql"))]
    assert _query(dsn, "SELECT column_default FROM information_schema.columns "
                       "WHERE table_schema = 'queen' AND table_name = 'queues' "
                       "AND column_name = 'test_note'") == [("'none'::text",)]


def test_a_changed_function_file_alone_is_applied_again(new_database, tmp_path):
    dsn = new_database()
    install_schema(dsn, sql_dir())
    upgraded = copy_of_sql(tmp_path)
    state = upgraded / "functions" / "030_system_state.sql"
    state.write_text(state.read_text() + "\nCREATE OR REPLACE FUNCTION queen.test_marker() "
                                         "RETURNS integer LANGUAGE sql AS $$ SELECT 7 $$;\n")

    assert install_schema(dsn, upgraded) == ["functions/030_system_state.sql"]
    assert _query(dsn, "SELECT queen.test_marker()") == [(7,)]
    assert install_schema(dsn, upgraded) == []


def test_functions_replaced_by_another_installer_are_installed_again(new_database):
    """A release from before versioned migrations, restarting during a rolling upgrade,
    re-runs its own function files: the file hashes recorded here still match, and its old
    bodies stayed for good (an upgrade audit saw pops without offsets after it). The
    definitions no longer match their record, so every file is applied again."""
    dsn = new_database()
    install_schema(dsn, sql_dir())
    [(current,)] = _query(dsn, "SELECT queen.format_ts3('2026-01-02 03:04:05.678+00')")
    _query(dsn, "CREATE OR REPLACE FUNCTION queen.format_ts3(ts timestamptz) RETURNS text "
                "LANGUAGE sql STABLE AS $$ SELECT 'an old body' $$")

    assert install_schema(dsn, sql_dir()) == [
        f"functions/{path.name}" for path in function_files(sql_dir())]
    assert _query(dsn, "SELECT queen.format_ts3('2026-01-02 03:04:05.678+00')") == [(current,)]
    assert install_schema(dsn, sql_dir()) == []


# -- failures ---------------------------------------------------------------------------


def test_a_failed_upgrade_rolls_back_every_file_of_it(new_database, tmp_path):
    dsn = new_database()
    install_schema(dsn, sql_dir())
    before = (routines(dsn), table_shape(dsn), recorded_versions(dsn))
    upgraded = copy_of_sql(tmp_path)
    (upgraded / "migrations" / next_migration("good.sql")).write_text(
        "ALTER TABLE queen.queues ADD COLUMN test_note text;\n")
    (upgraded / "migrations" / next_migration("bad.sql", after=1)).write_text(
        "CREATE TABLE queen.half_done (id integer);\n"
        "ALTER TABLE queen.queues ADD COLUMN name text;\n")
    state = upgraded / "functions" / "030_system_state.sql"
    state.write_text(state.read_text() + "\nCREATE OR REPLACE FUNCTION queen.test_marker() "
                                         "RETURNS integer LANGUAGE sql AS $$ SELECT 7 $$;\n")

    with pytest.raises(SchemaUpgradeError) as failure:
        install_schema(dsn, upgraded)

    assert str(failure.value) == (
        f"schema upgrade failed in migrations/{next_migration('bad.sql', after=1)}: column "
        '"name" of relation "queues" already exists; nothing was changed')
    assert (routines(dsn), table_shape(dsn), recorded_versions(dsn)) == before
    assert _query(dsn, "SELECT to_regclass('queen.half_done')") == [(None,)]


def test_a_syntax_error_is_reported_with_its_file_and_line(new_database, tmp_path):
    dsn = new_database()
    install_schema(dsn, sql_dir())
    upgraded = copy_of_sql(tmp_path)
    typo = next_migration("typo.sql")
    (upgraded / "migrations" / typo).write_text(
        "-- adds a column\n\nALTER TABLE queen.queues ADD COLUMN test_note text;\n"
        "ALTER TABEL queen.queues ADD COLUMN other text;\n")

    with pytest.raises(SchemaUpgradeError, match=rf"^schema upgrade failed in "
                       rf"migrations/{re.escape(typo)} line 4: syntax error at or near "
                       r"\"TABEL\"; nothing was changed$"):
        install_schema(dsn, upgraded)
    assert recorded_versions(dsn) == SHIPPED


def test_a_failing_function_file_rolls_back_the_migrations_before_it(new_database, tmp_path):
    dsn = new_database()
    install_schema(dsn, sql_dir())
    before = (routines(dsn), table_shape(dsn))
    upgraded = copy_of_sql(tmp_path)
    (upgraded / "migrations" / next_migration("drop.sql")).write_text(
        "ALTER TABLE queen.system_state DROP COLUMN updated_at;\n")

    # system_state_set (an SQL function) names the dropped column: recreating it fails.
    with pytest.raises(SchemaUpgradeError, match=r"functions/030_system_state\.sql.*updated_at"):
        install_schema(dsn, upgraded)
    assert (routines(dsn), table_shape(dsn)) == before
    assert recorded_versions(dsn) == SHIPPED


def test_a_database_newer_than_the_code_is_refused(new_database):
    dsn = new_database()
    install_schema(dsn, sql_dir())
    future = next_migration("from_the_future.sql")
    record_schema_version(dsn, LATEST + 1, future)

    with pytest.raises(SchemaUpgradeError) as refusal:
        install_schema(dsn, sql_dir())
    assert str(refusal.value) == (
        f"the database schema is at version {LATEST + 1} ({future}) but this queen-tw "
        f"knows versions up to {LATEST} only; run a queen-tw at least as new as the one that "
        "upgraded it; nothing was changed")
    assert recorded_versions(dsn) == [*SHIPPED, (LATEST + 1, future)]


def test_a_migration_recorded_under_another_name_is_refused(new_database, tmp_path):
    dsn = new_database()
    install_schema(dsn, sql_dir())
    record_schema_version(dsn, LATEST + 1, next_migration("a.sql"))
    other = copy_of_sql(tmp_path)
    (other / "migrations" / next_migration("b.sql")).write_text("SELECT 1;\n")

    with pytest.raises(SchemaUpgradeError, match=f"migration {LATEST + 1} is recorded as "
                                                 f"{re.escape(next_migration('a.sql'))}"):
        install_schema(dsn, other)


@pytest.mark.parametrize(("name", "message"), [
    (next_migration("gap.sql", after=1),
     rf"migration number {LATEST + 2} comes after a gap "
     rf"\({re.escape(next_migration('gap.sql', after=1))}\)"),
    ("0001_twice.sql", r"migration number 1 is used twice \(0001_baseline\.sql, 0001_twice\.sql\)"),
    ("2_short.sql", r"migrations/2_short\.sql is not named NNNN_<name>\.sql"),
])
def test_migration_files_must_be_numbered_one_by_one(tmp_path, name, message):
    broken = copy_of_sql(tmp_path)
    (broken / "migrations" / name).write_text("SELECT 1;\n")

    with pytest.raises(SchemaUpgradeError, match=message):
        install_schema("host=/nonexistent", broken)  # refused before connecting


def test_an_unreachable_database_raises_the_retryable_connection_error(tmp_path):
    with pytest.raises(psycopg2.OperationalError):
        install_schema(f"host={tmp_path} dbname=nothing connect_timeout=5", sql_dir())


# -- the official clients' cleanup --------------------------------------------------------


def test_deleting_test_queues_by_sql_removes_everything_under_them(new_database):
    dsn = new_database()
    install_schema(dsn, sql_dir())
    queue = unique_name()
    _query(dsn, "SELECT queen.push_messages_v2(jsonb_build_array("
                "jsonb_build_object('queue', %s::text, 'partition', 'a', 'payload', 1),"
                "jsonb_build_object('queue', %s::text, 'partition', 'b', 'payload', 2)))",
           (queue, queue))
    assert _query(dsn, "SELECT count(*) FROM queen.messages") == [(2,)]

    _query(dsn, "DELETE FROM queen.queues WHERE name LIKE 'test-%'")

    assert _query(dsn, "SELECT (SELECT count(*) FROM queen.messages), "
                       "(SELECT count(*) FROM queen.partitions)") == [(0, 0)]


def test_every_shipped_file_is_recorded_by_its_hash(new_database):
    dsn = new_database()
    install_schema(dsn, sql_dir())

    assert _query(dsn, "SELECT name, sha256 FROM queen.schema_functions ORDER BY name") == [
        (f"functions/{path.name}", hashlib.sha256(path.read_bytes()).hexdigest())
        for path in function_files(sql_dir())]
