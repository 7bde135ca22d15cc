"""Installs and upgrades the ``queen`` schema: numbered migrations once each, then functions.

The SQL directory (:func:`queen_tw.paths.sql_dir`) holds two kinds of files:

``migrations/NNNN_<name>.sql``
    Tables, indexes, constraints and the data changes that go with them. Migration ``NNNN`` is
    applied exactly once per database, in number order, and recorded in
    ``queen.schema_migrations``. ``0001_baseline.sql`` is the schema as it stood before
    versioned migrations; it is written with ``IF NOT EXISTS``, so a database made by the
    earlier installer (which kept per-file hashes in ``queen.schema_files``) takes it as a
    no-op and is adopted as version 1 (the earlier release re-ran its files at every start,
    so any database it served has exactly this shape). ``queen.schema_files`` is left as it
    was and never read again: an instance of the earlier release restarting during a rolling
    upgrade finds its hashes unchanged and re-applies nothing. A new change to a table is
    the next number, in plain statements; an applied migration is never edited.

``functions/NNN_<name>.sql``
    Functions, triggers and views, written with ``CREATE OR REPLACE`` so they can run again
    (with a ``DROP FUNCTION IF EXISTS`` first only when a signature or result type changes).
    A file is applied when its SHA-256 differs from the one recorded in
    ``queen.schema_functions``, and every file is applied again after any migration ran.
    Not at every start: recreating the triggers locks the busiest tables and every recreated
    function drops the cached plans of every pooled connection, on each restart of each
    instance of a running cluster. All of them after a migration: PostgreSQL checks
    SQL-language functions against the tables when it creates them, so a migration that
    breaks one fails the upgrade (rolled back) instead of its first call. All of them, too,
    when the definitions installed are not those the last install left: an MD5 over every
    function, trigger and view of the schema (as PostgreSQL prints them) is kept in
    ``queen.schema_definitions``. An installer that keeps no such record (a release from
    before versioned migrations, restarting during a rolling upgrade and re-running its own
    files) would otherwise leave its old function bodies in place for good, since the file
    hashes here would still match.

Everything runs in one transaction under a PostgreSQL advisory lock: processes starting
together neither race nor half-install, and a failure anywhere leaves the database as it was.
"""

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import psycopg2
import psycopg2.extensions

# Any fixed 64-bit number unique to this purpose.
SCHEMA_LOCK_ID = 737_000_001

MIGRATIONS_DIR = "migrations"
FUNCTIONS_DIR = "functions"

_MIGRATION_NAME = re.compile(r"(\d{4})_\w+\.sql")

_BOOKKEEPING = """
CREATE SCHEMA IF NOT EXISTS queen;
CREATE TABLE IF NOT EXISTS queen.schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS queen.schema_functions (
    name       text PRIMARY KEY,
    sha256     text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS queen.schema_definitions (
    only_row    boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    md5         text NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
"""


class SchemaUpgradeError(Exception):
    """The schema cannot be installed or upgraded, and trying again will not change that.

    The message is one line naming the file and the reason (PostgreSQL's own message for a
    failed statement). Nothing was changed in the database. Connection failures are not this
    error: they stay ``psycopg2.OperationalError``, which a caller may retry.
    """


@dataclass(frozen=True)
class Migration:
    """One numbered file of ``migrations/``."""

    version: int
    path: Path

    @property
    def label(self) -> str:
        """How reports name it: ``migrations/0001_baseline.sql``."""
        return f"{MIGRATIONS_DIR}/{self.path.name}"


def migration_files(sql_dir: Path) -> List[Migration]:
    """The migrations of ``sql_dir`` in version order, checked to be numbered 1, 2, ... N.

    Raises SchemaUpgradeError for a file whose name is not ``NNNN_<name>.sql``, a number used
    twice, or a gap (a missing number would otherwise be skipped for good on every database
    that applied the numbers after it).
    """
    directory = sql_dir / MIGRATIONS_DIR
    migrations: List[Migration] = []
    for path in sorted(directory.glob("*.sql")):
        match = _MIGRATION_NAME.fullmatch(path.name)
        if match is None:
            raise SchemaUpgradeError(
                f"{MIGRATIONS_DIR}/{path.name} is not named NNNN_<name>.sql")
        migrations.append(Migration(int(match.group(1)), path))
    if not migrations:
        raise SchemaUpgradeError(f"no migrations found in {directory}")
    for expected, migration in enumerate(migrations, start=1):
        if migration.version != expected:
            names = ", ".join(m.path.name for m in migrations if m.version == migration.version)
            problem = "is used twice" if migration.version < expected else "comes after a gap"
            raise SchemaUpgradeError(
                f"migration number {migration.version} {problem} ({names}); "
                f"expected {expected:04d}_<name>.sql")
    return migrations


def function_files(sql_dir: Path) -> List[Path]:
    """The re-runnable files of ``functions/`` in the order they apply (by name)."""
    return sorted((sql_dir / FUNCTIONS_DIR).glob("*.sql"))


def install_schema(dsn: str, sql_dir: Path) -> List[str]:
    """Applies pending migrations, then new or changed function files, in one transaction.

    Returns what it applied, as paths relative to ``sql_dir`` (``migrations/0002_x.sql``,
    ``functions/002_push.sql``); empty when the database was up to date. Raises
    SchemaUpgradeError when the files are inconsistent, the database records a newer schema
    version than these files know, or a statement fails (all rolled back); connection
    failures raise psycopg2.OperationalError.

    Blocking: call it from a thread (``deferToThread``) or before the reactor runs.
    """
    migrations = migration_files(sql_dir)
    functions = function_files(sql_dir)
    connection = psycopg2.connect(dsn)
    try:
        with connection, connection.cursor() as cursor:
            # An upgrade may rewrite every message (migration 4): DB_STATEMENT_TIMEOUT bounds
            # requests, not this; cancelled at 30 s, a big database could never upgrade.
            cursor.execute("SET LOCAL statement_timeout = 0")
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_ID,))
            _execute(cursor, "the schema bookkeeping tables", _BOOKKEEPING)
            applied = _apply_migrations(cursor, migrations)
            applied += _apply_functions(cursor, sql_dir, functions, every_file=bool(applied))
    finally:
        connection.close()
    return applied


def _apply_migrations(cursor: psycopg2.extensions.cursor,
                      migrations: List[Migration]) -> List[str]:
    """Applies and records every migration the database has not recorded yet."""
    cursor.execute("SELECT version, name FROM queen.schema_migrations")
    recorded: Dict[int, str] = dict(cursor.fetchall())
    known = {migration.version: migration for migration in migrations}
    newest = max(recorded, default=0)
    if newest > len(migrations):
        raise SchemaUpgradeError(
            f"the database schema is at version {newest} ({recorded[newest]}) but this "
            f"queen-tw knows versions up to {len(migrations)} only; run a queen-tw at least as "
            "new as the one that upgraded it; nothing was changed")
    for version, name in sorted(recorded.items()):
        if known[version].path.name != name:
            raise SchemaUpgradeError(
                f"migration {version} is recorded as {name} in the database but is "
                f"{known[version].path.name} here; nothing was changed")
    applied = []
    for migration in migrations:
        if migration.version in recorded:
            continue
        _execute(cursor, migration.label, migration.path.read_text())
        cursor.execute("INSERT INTO queen.schema_migrations (version, name) VALUES (%s, %s)",
                       (migration.version, migration.path.name))
        applied.append(migration.label)
    return applied


_DEFINITIONS_MD5 = """
SELECT md5(coalesce(string_agg(definition, E'\n' ORDER BY definition), ''))
  FROM (SELECT pg_get_functiondef(p.oid) AS definition FROM pg_proc p
         WHERE p.pronamespace = 'queen'::regnamespace AND p.prokind IN ('f', 'p')
        UNION ALL
        SELECT pg_get_triggerdef(t.oid) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
         WHERE c.relnamespace = 'queen'::regnamespace AND NOT t.tgisinternal
        UNION ALL
        SELECT c.relname || ': ' || pg_get_viewdef(c.oid) FROM pg_class c
         WHERE c.relnamespace = 'queen'::regnamespace AND c.relkind IN ('v', 'm')) d
"""


def _definitions_md5(cursor: psycopg2.extensions.cursor) -> str:
    cursor.execute(_DEFINITIONS_MD5)
    [(digest,)] = cursor.fetchall()
    return str(digest)


def _apply_functions(cursor: psycopg2.extensions.cursor, sql_dir: Path,
                     functions: List[Path], every_file: bool) -> List[str]:
    """Applies the function files whose hash changed, or all of them when ``every_file`` or
    when the installed definitions are not those recorded (see the module docstring)."""
    cursor.execute("SELECT name, sha256 FROM queen.schema_functions")
    known: Dict[str, str] = dict(cursor.fetchall())
    cursor.execute("SELECT md5 FROM queen.schema_definitions")
    recorded = cursor.fetchone()
    every_file = every_file or recorded is None or recorded[0] != _definitions_md5(cursor)
    applied = []
    for path in functions:
        label = path.relative_to(sql_dir).as_posix()
        text = path.read_text()
        digest = hashlib.sha256(text.encode()).hexdigest()
        if not every_file and known.get(label) == digest:
            continue
        _execute(cursor, label, text)
        cursor.execute(
            "INSERT INTO queen.schema_functions (name, sha256) VALUES (%s, %s) "
            "ON CONFLICT (name) DO UPDATE SET sha256 = excluded.sha256, applied_at = now()",
            (label, digest))
        applied.append(label)
    if applied:
        cursor.execute(
            "INSERT INTO queen.schema_definitions (md5) VALUES (%s) ON CONFLICT (only_row) "
            "DO UPDATE SET md5 = excluded.md5, recorded_at = now()", (_definitions_md5(cursor),))
    return applied


def _execute(cursor: psycopg2.extensions.cursor, label: str, text: str) -> None:
    """Runs one file's statements; a failed statement becomes SchemaUpgradeError.

    OperationalError (connection lost, statement cancelled, out of disk) passes through
    unchanged: it says nothing about the file, and trying again may well succeed.
    """
    try:
        cursor.execute(text)
    except psycopg2.OperationalError:
        raise
    except psycopg2.DatabaseError as err:
        raise SchemaUpgradeError(
            f"schema upgrade failed in {label}{_line_of(err, text)}: {_reason(err)}; "
            "nothing was changed") from err


def _reason(err: psycopg2.DatabaseError) -> str:
    """PostgreSQL's one-line message for ``err``."""
    primary = err.diag.message_primary
    if primary:
        return str(primary)
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _line_of(err: psycopg2.DatabaseError, text: str) -> str:
    """`` line N`` when PostgreSQL says where in ``text`` the error is, else empty."""
    position = err.diag.statement_position
    if not position:
        return ""
    line = text[:int(position) - 1].count("\n") + 1
    return f" line {line}"
