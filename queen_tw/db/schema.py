"""Installs the ``queen`` schema from the numbered files in ``sql/``.

Each file is applied once per content: the installer records every file's SHA-256 in
``queen.schema_files`` and re-applies a file only when it changed (function files are written
with CREATE OR REPLACE, table files with IF NOT EXISTS). All of it runs in one transaction under
a PostgreSQL advisory lock, so processes starting together neither race nor half-install.
"""

import hashlib
from pathlib import Path
from typing import List

import psycopg2

# Any fixed 64-bit number unique to this purpose.
SCHEMA_LOCK_ID = 737_000_001

_BOOKKEEPING = """
CREATE SCHEMA IF NOT EXISTS queen;
CREATE TABLE IF NOT EXISTS queen.schema_files (
    name       text PRIMARY KEY,
    sha256     text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
"""


def sql_files(sql_dir: Path) -> List[Path]:
    """The schema files in the order they apply (their numeric prefix)."""
    return sorted(sql_dir.glob("[0-9][0-9][0-9]_*.sql"))


def install_schema(dsn: str, sql_dir: Path) -> List[str]:
    """Applies new or changed files; returns their names (empty when nothing changed).

    Blocking: call it from a thread (``deferToThread``) or before the reactor runs.
    """
    applied = []
    connection = psycopg2.connect(dsn)
    try:
        with connection, connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_ID,))
            cursor.execute(_BOOKKEEPING)
            cursor.execute("SELECT name, sha256 FROM queen.schema_files")
            known = dict(cursor.fetchall())
            for path in sql_files(sql_dir):
                text = path.read_text()
                digest = hashlib.sha256(text.encode()).hexdigest()
                if known.get(path.name) == digest:
                    continue
                cursor.execute(text)
                cursor.execute(
                    "INSERT INTO queen.schema_files (name, sha256) VALUES (%s, %s) "
                    "ON CONFLICT (name) DO UPDATE SET sha256 = excluded.sha256, applied_at = now()",
                    (path.name, digest))
                applied.append(path.name)
    finally:
        connection.close()
    return applied
