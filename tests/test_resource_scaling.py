"""The resource and status views grow with what they show, not with queues times partitions.

Measured in PostgreSQL buffer reads (EXPLAIN ANALYZE, which counts the functions' inner
statements too), not in time: counting each partition used to read every partition, so four
times the queues cost sixteen times the reads. Each test runs on a database of its own, so
the counts are exactly its workload.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import psycopg2
import pytest

from tests.scratch_databases import scratch_database, server_env
from tests.support import running_server

# Linear growth reads about 4x for 4x the rows; the old listing read ~16x.
MOST_GROWTH = 7


@pytest.fixture
def own_db(pg_dsn: str, pg_env: dict[str, str]) -> Iterator[psycopg2.extensions.cursor]:
    with scratch_database(pg_dsn) as dsn:
        with running_server(server_env(pg_env, dsn)):  # installs the schema
            pass
        connection = psycopg2.connect(dsn)
        connection.autocommit = True
        try:
            yield connection.cursor()
        finally:
            connection.close()


def _push(cursor, items: list[dict]) -> None:
    cursor.execute("SELECT queen.push_store(%s::jsonb)", (json.dumps(items),))


def _reads(cursor, statement: str, *args) -> int:
    """Buffer reads of one run of ``statement``, after a first run warmed its plans."""
    for _ in range(2):
        cursor.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + statement, args)
        plan = cursor.fetchone()[0][0]["Plan"]
    return plan["Shared Hit Blocks"] + plan["Shared Read Blocks"]


def test_queue_listing_grows_with_the_queues(own_db):
    _push(own_db, [{"queue": f"q-{n}", "payload": n} for n in range(50)])
    fifty = _reads(own_db, "SELECT queen.queue_list()")
    _push(own_db, [{"queue": f"q-{n}", "payload": n} for n in range(50, 200)])
    two_hundred = _reads(own_db, "SELECT queen.queue_list()")

    assert two_hundred < MOST_GROWTH * fifty, (fifty, two_hundred)
    own_db.execute("SELECT queen.queue_list()")
    listed = own_db.fetchone()[0]["queues"]
    assert len(listed) == 200
    assert listed[0]["partitions"] == 1 and listed[0]["messages"]["total"] == 1


@pytest.mark.parametrize("statement", [
    "SELECT queen.queue_detail(%s)",
    "SELECT queen.status_queue(%s)",
    "SELECT queen.resources_partitions(jsonb_build_object('queue', %s::text, 'limit', 1000))",
])
def test_one_queues_views_grow_with_its_partitions(own_db, statement):
    _push(own_db, [{"queue": "wide", "partition": f"p-{n}", "payload": n} for n in range(50)])
    fifty = _reads(own_db, statement, "wide")
    _push(own_db, [{"queue": "wide", "partition": f"p-{n}", "payload": n}
                   for n in range(50, 200)])
    two_hundred = _reads(own_db, statement, "wide")

    assert two_hundred < MOST_GROWTH * fifty, (fifty, two_hundred)
