"""The connection pool against the real PostgreSQL: what a call meets when only some of the
pool's connections are alive, as right after PostgreSQL restarts, and that a finished call
keeps nothing alive."""

import gc
import weakref

import pytest
import pytest_twisted
from psycopg2.extensions import AsIs, register_adapter
from twisted.internet import defer, reactor

from queen_tw.config import Config
from queen_tw.db import pool
from queen_tw.db.pool import Database
from queen_tw.db.schema import install_schema
from queen_tw.errors import DatabaseBusy, DatabaseUnavailable, RefusedByDatabase
from queen_tw.paths import sql_dir

from tests.pg_faults import queen_function
from tests.support import wait_until_reactor


@pytest.fixture
def database(pg_env):
    dsn = Config.from_sources(pg_env, {}).dsn
    install_schema(dsn, sql_dir())  # (the calls below go to its functions)
    db = Database(dsn, 3, reactor)
    pytest_twisted.blockon(defer.ensureDeferred(db.connect()))
    yield db
    db.close()


def _believe_dead(connections) -> None:
    """What the dead-connection detector records when a connection's socket breaks; nothing
    reconnects them during the test."""
    for connection in connections:
        connection.detector.connectionIsDead = True


def _pool_connections(db: Database):
    return sorted(db._pool.connections | db._pool.busy, key=id)


def _backend_pids(db: Database):
    """The PostgreSQL backends of the pool's connections: they change when one reconnects."""
    return sorted(c._connection.get_backend_pid() for c in _pool_connections(db))


@pytest_twisted.ensureDeferred
async def test_a_call_waits_for_the_live_connection_instead_of_failing_on_a_dead_one(database):
    _believe_dead(_pool_connections(database)[1:])
    assert database.alive_connections() == 1
    busy = defer.ensureDeferred(database._pool.run_query_within(10, "SELECT pg_sleep(0.3)", ()))

    rows = await database._pool.run_query_within(10, "SELECT 42", ())

    assert rows == [(42,)]
    assert busy.called  # it queued behind the busy live connection, not on a dead one
    await busy


@pytest_twisted.ensureDeferred
async def test_a_call_fails_at_once_when_no_connection_is_alive(database):
    _believe_dead(_pool_connections(database))

    call = defer.ensureDeferred(database.call("format_ts3", "2026-01-01T00:00:00Z"))

    assert call.called  # failed before the reactor ran again: it waited for nothing
    with pytest.raises(DatabaseUnavailable):
        await call


class _Parameter:
    """A query parameter that can be watched with a weak reference (str cannot)."""


register_adapter(_Parameter, lambda _: AsIs("1"))


@pytest_twisted.ensureDeferred
async def test_a_finished_call_lets_go_of_its_parameters_without_the_cycle_collector(database):
    # The server collects cycles rarely (tune_garbage_collector): parameters kept alive by a
    # cycle (a fused push's JSON, hundreds of kB) piled up past the 150 MB RSS target.
    parameter = _Parameter()
    watched = weakref.ref(parameter)
    gc.disable()
    try:
        rows = await database._pool.run_query_within(10, "SELECT %s", (parameter,))
        del parameter
        assert rows == [(1,)]
        assert watched() is None
    finally:
        gc.enable()


@pytest_twisted.ensureDeferred
async def test_calls_that_deadlock_are_retried_in_place_on_live_connections(database, pg_env):
    """PostgreSQL ends one of two deadlocked calls with 40P01 after undoing all of it: the pool
    runs that call again (the connection is fine), instead of reporting the database down —
    which sent a push that raced a queue delete to the file buffer."""
    import psycopg2

    setup = psycopg2.connect(Config.from_sources(pg_env, {}).dsn)
    setup.autocommit = True
    with setup.cursor() as cursor:
        cursor.execute("SELECT to_regnamespace('queen') IS NULL")
        [(schema_is_ours,)] = cursor.fetchall()
        cursor.execute("""
            CREATE SCHEMA IF NOT EXISTS queen;
            CREATE TABLE IF NOT EXISTS queen.test_deadlock_rows (id int PRIMARY KEY, n int);
            INSERT INTO queen.test_deadlock_rows VALUES (1, 0), (2, 0) ON CONFLICT DO NOTHING;
            CREATE OR REPLACE FUNCTION queen.test_deadlock_pair(first int, second int)
            RETURNS int LANGUAGE plpgsql AS $$
            BEGIN
                UPDATE queen.test_deadlock_rows SET n = n + 1 WHERE id = first;
                PERFORM pg_sleep(0.3);
                UPDATE queen.test_deadlock_rows SET n = n + 1 WHERE id = second;
                RETURN first;
            END $$;""")
    try:
        retries_before = database.rolled_back_retries
        one = defer.ensureDeferred(database.call("test_deadlock_pair", 1, 2))
        other = defer.ensureDeferred(database.call("test_deadlock_pair", 2, 1))
        assert sorted(await defer.gatherResults([one, other])) == [1, 2]
        # At least once: on a loaded machine the loser's second try can take row 2 before the
        # winner's backend wakes to take it, and the pair deadlocks again (also retried).
        assert database.rolled_back_retries >= retries_before + 1
        assert database.alive_connections() == 3  # nobody was dropped for the deadlock
        with setup.cursor() as cursor:
            cursor.execute("SELECT sum(n) FROM queen.test_deadlock_rows")
            assert cursor.fetchone() == (4,)  # each call applied once: the loser's first try undone
    finally:
        with setup.cursor() as cursor:
            cursor.execute("DROP FUNCTION queen.test_deadlock_pair(int, int);"
                           "DROP TABLE queen.test_deadlock_rows")
            if schema_is_ours:
                cursor.execute("DROP SCHEMA queen")
        setup.close()


@pytest_twisted.ensureDeferred
async def test_a_call_undone_at_every_retry_fails_as_busy_not_as_a_bug_or_an_outage(
        database, db):
    """A call PostgreSQL undoes every time (here a serialization failure on each run) is
    given up after the retries as DatabaseBusy: a 503 for the client, not a 500 and not an
    outage that would divert pushes to the file buffer. No connection is dropped for it."""
    with queen_function(db, "test_always_conflicts()", """RETURNS int LANGUAGE plpgsql AS $$
            BEGIN
                RAISE EXCEPTION 'could not serialize access' USING ERRCODE = '40001';
            END $$"""):
        retries_before = database.rolled_back_retries
        with pytest.raises(DatabaseBusy) as raised:
            await database.call("test_always_conflicts")
        assert raised.value.status == 503
        assert database.rolled_back_retries == retries_before + 3  # four runs in all
        assert database.alive_connections() == 3
        assert await database.ping()


@pytest_twisted.ensureDeferred
async def test_a_statement_cancelled_by_statement_timeout_keeps_its_connection(pg_env, db):
    """PostgreSQL cancels a statement that runs past DB_STATEMENT_TIMEOUT on a connection that
    is fine: the call fails as DatabaseUnavailable naming the timeout (a push would go to the
    file buffer), and the connection is neither dropped nor reconnected."""
    slow = Database(Config.from_sources({**pg_env, "DB_STATEMENT_TIMEOUT": "100"}, {}).dsn,
                    1, reactor)
    await slow.connect()
    try:
        with queen_function(db, "test_sleeps()",
                            "RETURNS int LANGUAGE sql AS $$ SELECT 1 FROM pg_sleep(1) $$"):
            backends = _backend_pids(slow)
            with pytest.raises(DatabaseUnavailable) as raised:
                await slow.call("test_sleeps")
            assert "statement_timeout" in raised.value.message
            assert slow.alive_connections() == 1
            assert await slow.ping()
            assert _backend_pids(slow) == backends
    finally:
        slow.close()


@pytest_twisted.ensureDeferred
async def test_a_call_beyond_postgresql_limits_is_refused_as_bad_input_not_an_outage(
        database, db):
    """A value too long for an index (SQLSTATE class 54) is the request's fault: the call
    fails as RefusedByDatabase (400), not as an outage (503, connection dropped)."""
    with queen_function(db, "test_beyond_limits()", """RETURNS int LANGUAGE plpgsql AS $$
            BEGIN
                RAISE EXCEPTION 'index row size 3016 exceeds btree maximum 2704'
                      USING ERRCODE = 'program_limit_exceeded';
            END $$"""):
        backends = _backend_pids(database)
        with pytest.raises(RefusedByDatabase) as raised:
            await database.call("test_beyond_limits")
        assert raised.value.status == 400
        assert "index row size" in raised.value.message
        assert database.alive_connections() == 3
        assert await database.ping()
        assert _backend_pids(database) == backends


@pytest_twisted.ensureDeferred
async def test_a_call_too_large_for_one_statement_is_refused_unsent(database, monkeypatch):
    """Over 1 GiB, PostgreSQL closed the connection: an outage to the server, whose file
    buffer replay then sent the same statement again and again. The bound is lowered here so
    that the test sends a kilobyte, not a gigabyte."""
    monkeypatch.setattr(pool, "MAX_STATEMENT_BYTES", 1000)
    backends = _backend_pids(database)

    # 900 characters: under the bound, though 4 bytes each could pass it
    assert await database.call("namespace_of", "a.b" + "x" * 897) == "a"
    with pytest.raises(RefusedByDatabase) as raised:  # 501 characters, 1002 bytes quoted
        await database.call("namespace_of", "é" * 500 + "'")

    assert raised.value.status == 400
    assert "1002 bytes of data are more than one database call takes" in raised.value.message
    assert database.failed_calls == 0 and _backend_pids(database) == backends
    assert await database.ping()


@pytest_twisted.ensureDeferred
async def test_an_all_or_nothing_call_answering_after_the_resend_safe_window_is_rolled_back(
        database, db):
    """A client gives up after 30 s and resends, so an all-or-nothing call must not commit
    past its window even inside the (longer) call deadline; here the window is 1 s."""
    database._pool.resend_safe_s = 1.0
    with db.cursor() as cursor:
        cursor.execute("CREATE TABLE IF NOT EXISTS public.test_or_nothing (n int)")
        cursor.execute("TRUNCATE public.test_or_nothing")
    try:
        with queen_function(db, "test_writes_slowly()", """RETURNS int LANGUAGE sql AS $$
                INSERT INTO public.test_or_nothing VALUES (1);
                SELECT 1 FROM pg_sleep(1.5) $$"""):
            with pytest.raises(DatabaseUnavailable) as raised:
                await database.call_or_nothing("test_writes_slowly")
            assert "did not answer within 1s" in raised.value.message
            await wait_until_reactor(lambda: database.alive_connections() == 3
                                     and not database._pool.busy, message="the call ended")
        with db.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM public.test_or_nothing")
            assert cursor.fetchone()[0] == 0  # rolled back once PostgreSQL answered
    finally:
        with db.cursor() as cursor:
            cursor.execute("DROP TABLE public.test_or_nothing")


@pytest_twisted.ensureDeferred
async def test_the_resend_safe_window_covers_every_run_of_a_call_not_each(database, db):
    """A run PostgreSQL undid (a serialization failure) is run again, but within what is
    left of the window: here the first run fails at 1.5 s of a 2 s window, and the second,
    which would write and answer at 3 s, must be rolled back."""
    database._pool.resend_safe_s = 2.0
    with db.cursor() as cursor:
        cursor.execute("CREATE SEQUENCE IF NOT EXISTS public.test_runs;"
                       "CREATE TABLE IF NOT EXISTS public.test_window (n int)")
    try:
        with queen_function(db, "test_conflicts_then_writes()", """RETURNS int
                LANGUAGE plpgsql AS $$
                BEGIN
                    IF nextval('public.test_runs') = 1 THEN
                        PERFORM pg_sleep(1.5);
                        RAISE EXCEPTION 'conflict' USING ERRCODE = 'serialization_failure';
                    END IF;
                    INSERT INTO public.test_window VALUES (1);
                    PERFORM pg_sleep(1.5);
                    RETURN 1;
                END $$"""):
            with pytest.raises(DatabaseUnavailable):
                await database.call_or_nothing("test_conflicts_then_writes")
            await wait_until_reactor(lambda: not database._pool.busy, message="the call ended")
        with db.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM public.test_window")
            assert cursor.fetchone()[0] == 0
    finally:
        with db.cursor() as cursor:
            cursor.execute("DROP TABLE public.test_window; DROP SEQUENCE public.test_runs")
