"""PostgreSQL-side faults for tests: triggers that slow down or refuse what the server writes,
test functions in schema ``queen``, and a probe for a statement asleep inside PostgreSQL.

With them a test puts a request exactly where it wants it (inside another's delete, behind
an insert that has not committed, against a conflict PostgreSQL keeps raising) instead of
hoping that timing puts it there.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class Trigger:
    """A trigger on ``table``, installed on entering the with-block and dropped on leaving it
    (or earlier, by :meth:`drop`: the fault is over and the test goes on without it).

    :param event: when it fires, e.g. ``"BEFORE INSERT"`` or ``"AFTER DELETE"``.
    :param body: the plpgsql statements of its function (``NEW`` for row triggers; a statement
        trigger on ``AFTER DELETE`` sees the deleted rows as table ``gone``). The function
        returns ``NEW`` (row) or ``NULL`` (statement) after them.
    """

    def __init__(self, db: Any, table: str, event: str, body: str, *,
                 for_each_statement: bool = False):
        self._db, self._table = db, table
        self._name = f"test_fault_{uuid.uuid4().hex[:8]}"
        level = ("REFERENCING OLD TABLE AS gone FOR EACH STATEMENT" if for_each_statement
                 else "FOR EACH ROW")
        self._create = f"""
            CREATE FUNCTION queen.{self._name}() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                {body}
                RETURN {"NULL" if for_each_statement else "NEW"};
            END $$;
            CREATE TRIGGER {self._name} {event} ON {table} {level}
                EXECUTE FUNCTION queen.{self._name}();"""

    def __enter__(self) -> Trigger:
        with self._db.cursor() as cursor:
            cursor.execute(self._create)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.drop()

    def drop(self) -> None:
        with self._db.cursor() as cursor:
            cursor.execute(f"DROP TRIGGER IF EXISTS {self._name} ON {self._table};"
                           f"DROP FUNCTION IF EXISTS queen.{self._name}()")


@contextmanager
def queen_function(db: Any, signature: str, definition: str) -> Iterator[None]:
    """``CREATE FUNCTION queen.<signature> <definition>`` for the with-block, creating schema
    ``queen`` if no server has yet (and dropping it again then)."""
    with db.cursor() as cursor:
        cursor.execute("SELECT to_regnamespace('queen') IS NULL")
        [(schema_is_ours,)] = cursor.fetchall()
        cursor.execute(f"CREATE SCHEMA IF NOT EXISTS queen;"
                       f"CREATE OR REPLACE FUNCTION queen.{signature} {definition}")
    try:
        yield
    finally:
        with db.cursor() as cursor:
            cursor.execute(f"DROP FUNCTION queen.{signature}")
            if schema_is_ours:
                cursor.execute("DROP SCHEMA queen")


def asleep(db: Any, query_like: str = "%") -> bool:
    """True while another backend sleeps in ``pg_sleep`` running a query like ``query_like``."""
    with db.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'"
                       " AND pid <> pg_backend_pid() AND query LIKE %s", (query_like,))
        return bool(cursor.fetchone()[0])
