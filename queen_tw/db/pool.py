"""The PostgreSQL connection pool behind every request.

Every database operation of the server is a call of one set-based function in schema
``queen`` (see ``sql/``) with JSON in and JSON out, so this module only needs ``call``.

Faults, and what the pool does about them:

- A connection that breaks (PostgreSQL stopped or restarted, socket closed) is noticed by
  txpostgres' ``DeadConnectionDetector`` and reconnected in the background with backoff
  (0.2 s doubling to 2 s); while it is dead, calls fail at once with
  :class:`~queen_tw.errors.DatabaseUnavailable` instead of hanging. A call takes a live
  connection when there is one.
- A PostgreSQL that hangs (frozen, network black hole) is bounded by a deadline per call: the
  caller gets ``DatabaseUnavailable`` after ``call_deadline`` seconds. The query itself is
  never cancelled from here: psycopg2's cancel is a blocking round trip to the postmaster,
  which would freeze the reactor along with the database. The connection stays busy until
  PostgreSQL answers, so a query that was given up on may still commit later; pushes are safe
  because their transactionIds are fixed before any attempt and the buffer replay dedupes.
  Calls that are not safe to apply twice (a KV increment, a lock, a transaction) go through
  :meth:`Database.call_or_nothing` instead: the statement runs inside ``BEGIN`` and the
  commit is sent only if it answered before the deadline, so their 503 means "not applied";
  a query given up on is rolled back when PostgreSQL gets to it.

- A PostgreSQL that answers but refuses writes (SQLSTATE 25006 read_only_sql_transaction: a
  demoted primary, a standby behind the address, ``default_transaction_read_only``) is
  treated as lost too: the connection is closed and reconnected, and the call fails with
  ``DatabaseUnavailable`` (pushes go to the file buffer). With several hosts in the DSN and
  ``target_session_attrs=read-write`` (``Config.dsn``), libpq tries each host on reconnect
  and keeps the one that is writable now, which is how a promoted standby is found.

- A statement PostgreSQL cancels because it waited or ran too long (SQLSTATE 55P03
  ``lock_timeout``: a row it needs is held by another transaction; 57014 ``statement_timeout``)
  leaves its connection sound: the connection is kept, and the call fails with
  ``DatabaseUnavailable`` (pushes go to the file buffer, other requests answer 503). This is
  not an outage: one :class:`~queen_tw.services.retry.OutageLog` of its own says when
  statements start and stop being cancelled.

- A statement beyond one of PostgreSQL's limits (SQLSTATE class 54, e.g. a value too long
  for an index) or refused for its data (class 22, e.g. a number in a binary push's payload
  beyond what numeric holds) is the request's fault:
  :class:`~queen_tw.errors.RefusedByDatabase` (400), connection kept. The routes check
  their input first; this is the net for what they miss.

Either way the outage is logged through one :class:`~queen_tw.services.retry.OutageLog`:
a line when the first connection is lost or call fails, a reminder every 30 s, a line when
a connection or a call works again; not a line per connection and per failed call.
"""

from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import psycopg2
from twisted.internet import defer, error
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from txpostgres import reconnection, retrying, txpostgres

from queen_tw import jsoncodec
from queen_tw.errors import (
    DatabaseBusy,
    DatabaseUnavailable,
    QueueSettingsChanged,
    RefusedByDatabase,
)
from queen_tw.services.retry import OutageLog, describe_error

log = Logger()


_DEAD = (psycopg2.OperationalError, psycopg2.InterfaceError, reconnection.ConnectionDead,
         txpostgres.RollbackFailed, error.ConnectionClosed)
# A write refused by a server that is (now) read-only: this connection is no use for queen.
_READ_ONLY = psycopg2.errors.ReadOnlySqlTransaction
_UNAVAILABLE = _DEAD + (_READ_ONLY,)
# A deadlock or serialization failure (SQLSTATE class 40): PostgreSQL undid the whole call and
# the connection is fine, so the call is run again. psycopg2 files these under
# OperationalError, which txpostgres' detector would take for a broken connection.
_ROLLED_BACK = psycopg2.errors.TransactionRollbackError
_ROLLED_BACK_RETRIES = 3
# Unique keys a concurrent call can take between a function's check and its insert: a
# message id given to a push (a client-minted one) that another push, on a partition it
# holds no lock in common with, stored first. Run again, the check sees it (push_store then
# mints an id of ours), so such a violation is retried in place like a serialization failure.
_RACED_KEYS = frozenset({"messages_pkey"})


class StatementCancelled(Exception):
    """PostgreSQL cancelled a statement of ours (statement_timeout, or an administrator's
    pg_cancel_backend). txpostgres turns that error into a bare CancelledError, which would
    read as the caller's own cancellation, so the pool names it with this instead."""


# A statement beyond one of PostgreSQL's limits (class 54: a value too long for an index, a
# statement too complex): the request's data, not the connection; psycopg2 files it under
# OperationalError.
_BEYOND_LIMITS = "54"

MAX_STATEMENT_BYTES = 1024 * 1024 * 1024 - 16 * 1024 * 1024
"""Most bytes a call's text parameters may take in its statement. PostgreSQL closes the
connection on a protocol message over 1 GiB, which read as an outage: pushes went to the file
buffer and its replay sent the same statement again forever. A call over it is refused before
it is sent, as data too large (a fused push is then split)."""

# A push refused because a queue's encryption flag changed under it (sql/functions/002_push.sql).
_SETTINGS_CHANGED = "QE001"

# Statements PostgreSQL cancelled (lock_timeout, statement_timeout) on a sound connection.
# psycopg2 files them under OperationalError too.
_CANCELLED = (psycopg2.errors.LockNotAvailable, psycopg2.errors.QueryCanceled,
              StatementCancelled)
# How soon a query refused unsent by a dead connection is offered to the pool again.
_UNSENT_RETRY_DELAY = 0.02


def _statement_bytes(params: Tuple[Any, ...]) -> Optional[int]:
    """The bytes ``params`` take quoted in a statement when that is over
    :data:`MAX_STATEMENT_BYTES`; None otherwise. Counted only for a call whose characters could
    reach it (4 bytes of UTF-8 at most each): UTF-8 length plus the quotes and backslashes
    quoting doubles."""
    texts = [p for p in params if isinstance(p, str)]
    if sum(len(text) for text in texts) * 4 <= MAX_STATEMENT_BYTES:
        return None
    size = sum(len(text.encode()) + text.count("'") + text.count("\\") for text in texts)
    return size if size > MAX_STATEMENT_BYTES else None


class DeadlineExceeded(DatabaseUnavailable):
    """PostgreSQL did not answer a call in time (frozen, overloaded or unreachable)."""


class CommitUnconfirmed(DatabaseUnavailable):
    """An all-or-nothing call's commit was sent and not confirmed in time: its outcome is
    unknown (the one case :meth:`Database.call_or_nothing` cannot rule out)."""


def call_deadline(inflight_deadline_ms: int, statement_timeout_ms: int) -> float:
    """Seconds a call may take (``LIBQUEEN_INFLIGHT_DEADLINE_MS``; 0 = the statement timeout
    plus 5 s, or 35 s without one), never under 2 s."""
    milliseconds = inflight_deadline_ms or (statement_timeout_ms or 30000) + 5000
    return max(milliseconds, 2000) / 1000.0


def _is_dead(failure: Failure) -> bool:
    """The detector's test: txpostgres' own (broken connection), plus a read-only server."""
    if failure.check(_ROLLED_BACK, *_CANCELLED) or _beyond_limits(failure.value):
        return False
    return bool(reconnection.defaultDeathChecker(failure) or failure.check(_READ_ONLY))


def _beyond_limits(error: Optional[BaseException]) -> bool:
    return (getattr(error, "pgcode", None) or "").startswith(_BEYOND_LIMITS)


def _reconnect_backoff():
    return retrying.simpleBackoffIterator(initialDelay=0.2, maxDelay=2.0, factor=2.0,
                                          maxRetries=0, now=False)


class _Detector(reconnection.DeadConnectionDetector):
    """Reconnects a dead connection with backoff, unless its pool was closed meanwhile."""

    pool_closed = False
    outage: Optional[OutageLog] = None  # the pool's, set when the pool is built
    # Dropped for refusing a write: reconnecting proves nothing (a single host that is still
    # read-only takes the connection again), so only a call that works ends the outage.
    refused_writes = False

    def checkForDeadConnection(self, f):
        if f.check(_READ_ONLY):
            self.refused_writes = True
        return super().checkForDeadConnection(f)

    def reconnect(self):
        if self.pool_closed:
            return None  # "recovered": nothing to do, the connection stays closed
        return super().reconnect()

    def connectionRecovered(self):
        if not self.pool_closed and self.outage is not None and not self.refused_writes:
            self.outage.succeeded()
        self.refused_writes = False
        return super().connectionRecovered()


class QuietConnection(txpostgres.Connection):
    """A connection whose broken socket closes it quietly (the wake-up listener's; the pool's
    below, which also reconnects by itself)."""

    def doRead(self):
        """Reads NOTIFYs and results; a broken socket closes this connection quietly.

        txpostgres lets the error escape to the reactor, which logs a traceback per
        connection before calling ``connectionLost``; returning it does the same silently.
        """
        try:
            return super().doRead()
        except _DEAD as err:
            self.broke(err)
            return err
        except ValueError as err:
            if self.fileno() >= 0:
                raise
            # libpq dropped the socket of a broken connection it has not marked closed yet,
            # and watching it again failed: broken all the same (and reconnected as such)
            lost = psycopg2.OperationalError(f"connection lost: its socket is gone ({err})")
            self.broke(lost)
            return lost

    def broke(self, err: Exception) -> None:
        """The socket broke with ``err`` (the connection is being closed)."""


class _Connection(QuietConnection):
    """A pooled connection that reconnects by itself after PostgreSQL comes back."""

    def __init__(self, reactor=None, cooperator=None):
        super().__init__(reactor, cooperator,
                         detector=_Detector(deathChecker=_is_dead,
                                            reconnectionIterator=_reconnect_backoff,
                                            reactor=reactor))

    def broke(self, err: Exception) -> None:
        outage = self.detector.outage
        if outage is not None:
            outage.failed(f"connection lost: {describe_error(err)}")

    @property
    def alive(self) -> bool:
        return (self._connection is not None and not self._connection.closed
                and not self.detector.connectionIsDead)


class _Pool(txpostgres.ConnectionPool):
    connectionFactory = _Connection

    resend_safe_s = 20.0
    """An all-or-nothing call commits only if it answered within this (or the call deadline
    when shorter): the official clients give up on a request after 30 s and send it again,
    which must never find the first attempt committed after all."""
    commit_wait_s = 5.0
    """How long an all-or-nothing call waits for its commit before answering "unknown"."""

    def __init__(self, reactor, outage: OutageLog, call_deadline: float, *connargs, **connkw):
        self.reactor = reactor  # read by the base class while it builds the connections
        super().__init__(None, *connargs, **connkw)
        self.busy: Set[_Connection] = set()
        self._call_deadline = call_deadline  # bounds the commit wait too
        for connection in self.connections:
            connection.detector.outage = outage

    def close(self) -> None:
        """Closes every connection, busy ones included, and stops their reconnecting."""
        everything = self.connections | self.busy
        for connection in everything:
            connection.detector.pool_closed = True
        for connection in everything:
            if connection.pollable() is not None:
                connection.close()

    def run_query_within(self, timeout: float, sql: str, params: Tuple[Any, ...],
                         or_nothing: bool = False) -> defer.Deferred:
        """``runQuery`` on a free connection (a live one if any), answered within ``timeout``.

        Waiting for a free connection is given up at the deadline; a query already sent is
        left to finish on its own (see the module docstring) and its late result dropped.
        ``or_nothing``: the query runs in a transaction committed only when it answered in
        time, here at most :attr:`resend_safe_s` (rolled back otherwise); the commit itself
        gets at most :attr:`commit_wait_s` more, after which the outcome is unknown
        (:class:`CommitUnconfirmed`).
        A query refused unsent by a connection known dead is tried again on another while
        some connection is alive: right after PostgreSQL restarts, connections come back one
        by one (each on its own backoff), and /health is green as soon as the first is.
        """
        if or_nothing:
            timeout = min(timeout, self.resend_safe_s)
        outcome: defer.Deferred = defer.Deferred(lambda _: _give_up())
        slot: defer.Deferred = defer.succeed(None)
        timer = self.reactor.callLater(timeout, lambda: _give_up(DeadlineExceeded(
            f"Database did not answer within {timeout:.3g}s")))

        def _give_up(reason: Optional[Exception] = None) -> None:
            # (never cancels a query sent: psycopg2's cancel would block the reactor)
            forget()
            if not slot.called:
                slot.cancel()
            if timer.active():
                timer.cancel()
            if reason is not None and not outcome.called:
                outcome.errback(reason)

        acquire: Optional[Callable[[], None]] = None  # set below; forget() clears it

        def forget() -> None:
            # acquire -> run -> finished -> acquire is a reference cycle: left alone it would
            # keep the parameters (a whole push's JSON) alive until a full garbage collection,
            # which the server's tuned collector runs rarely (see tune_garbage_collector).
            nonlocal acquire, params
            acquire = None
            params = ()

        def committing() -> None:
            # From here the commit decides: "not applied" at the deadline would be a guess.
            # Its own timer answers "unknown"; the commit is left to finish on its own.
            nonlocal timer
            if timer.active():
                timer.cancel()
            wait = min(self._call_deadline, self.commit_wait_s)
            timer = self.reactor.callLater(wait, lambda: _give_up(
                CommitUnconfirmed(f"Database did not confirm the commit within {wait:g}s: "
                                  "the request may or may not have been applied")))

        def run(_):
            connection = self._take_connection()
            if or_nothing:
                query = defer.ensureDeferred(self._or_nothing(
                    connection, sql, params, lambda: outcome.called, committing))
            else:
                query = connection.runQuery(sql, params)
            query.addErrback(_cancelled_by_postgresql)
            query.addBoth(finished, connection)

        def finished(result, connection):
            self.busy.discard(connection)
            self.connections.add(connection)
            self._semaphore.release()
            if outcome.called:
                if isinstance(result, Failure):
                    log.debug("late failure of an abandoned query: {error}", error=result.value)
                return None
            if (isinstance(result, Failure) and result.check(reconnection.ConnectionDead)
                    and self.any_alive()):
                if acquire is not None:
                    self.reactor.callLater(_UNSENT_RETRY_DELAY, acquire)  # a live one frees up
                return None
            forget()
            if timer.active():
                timer.cancel()
            if isinstance(result, Failure):
                outcome.errback(result)
            else:
                outcome.callback(result)
            return None

        def acquire_slot() -> None:
            nonlocal slot
            if outcome.called:
                return
            slot = self._semaphore.acquire()
            slot.addCallbacks(run, lambda failure: failure.trap(defer.CancelledError))

        acquire = acquire_slot
        acquire_slot()
        return outcome

    @staticmethod
    async def _or_nothing(connection: "_Connection", sql: str, params: Tuple[Any, ...],
                          given_up: Callable[[], bool], committing: Callable[[], None]) -> Any:
        """``sql`` in a transaction, committed only if nobody gave up on it meanwhile;
        ``committing`` is told just before the commit is sent."""
        try:
            rows = await connection.runQuery("BEGIN; " + sql, params)
        except BaseException:
            await _quietly(connection.runOperation("ROLLBACK"))
            raise
        if given_up():
            await _quietly(connection.runOperation("ROLLBACK"))
            return rows  # dropped by the caller: it answered "not applied" already
        committing()
        try:
            await connection.runOperation("COMMIT")
        except _ROLLED_BACK:
            raise  # PostgreSQL undid it at commit: nothing applied, run again
        except (psycopg2.OperationalError, psycopg2.InterfaceError,
                error.ConnectionClosed) as err:
            # The connection went while the COMMIT was out: PostgreSQL may have made it
            # durable first (an audit terminated a backend waiting for a synchronous
            # standby after its local commit), so "not applied" would be a lie.
            raise CommitUnconfirmed("Database did not confirm the commit (the connection "
                                    "was lost): the request may or may not have been "
                                    "applied") from err
        return rows

    def any_alive(self) -> bool:
        return any(c.alive for c in self.connections | self.busy)

    def _take_connection(self) -> _Connection:
        connection = next((c for c in self.connections if c.alive), None)
        if connection is None:
            connection = next(iter(self.connections))
        self.connections.remove(connection)
        self.busy.add(connection)
        return connection


async def _quietly(operation: defer.Deferred) -> None:
    """Awaits a clean-up statement; its failure (a dead connection) changes nothing."""
    try:
        await operation
    except Exception as err:
        log.debug("clean-up statement failed: {error}", error=err)


def _cancelled_by_postgresql(failure: Failure) -> Failure:
    """A query's CancelledError: nothing here cancels a query once sent (see the module
    docstring), so PostgreSQL did."""
    failure.trap(defer.CancelledError)
    return Failure(StatementCancelled("canceling statement: statement_timeout or an "
                                      "administrator's cancel"))


class Database:
    """A fixed-size pool of reconnecting connections with JSON function calls.

    :param dsn: libpq connection string.
    :param size: number of connections.
    :param reactor: the reactor (its ``IReactorTime`` drives reconnect backoff and deadlines).
    :param call_deadline: seconds a call may take before it fails with ``DatabaseUnavailable``
        (``LIBQUEEN_INFLIGHT_DEADLINE_MS``; keep it above ``DB_STATEMENT_TIMEOUT``).

    Session settings (statement and lock timeouts) travel in the DSN (``Config.dsn``).
    """

    def __init__(self, dsn: str, size: int, reactor: IReactorTime, call_deadline: float = 35.0):
        self._dsn = dsn
        self._size = size
        self._reactor = reactor
        self._call_deadline = call_deadline
        self._pool: Optional[_Pool] = None
        self._statements: Dict[Tuple[str, Tuple[bool, ...], str], str] = {}
        self._outage = OutageLog("PostgreSQL", reactor)
        self._cancelled = OutageLog(
            "PostgreSQL statements", reactor,
            meanwhile="answered 503 (pushes go to the file buffer); connections kept")
        self.failed_calls = 0  # calls that raised (outage, deadline, SQL error): metrics
        self.rolled_back_retries = 0  # calls run again after a deadlock or serialization failure

    @property
    def size(self) -> int:
        return self._size

    def usage(self) -> Tuple[int, int, int]:
        """(idle, active, waiting) now: free connections, connections running a call, and
        calls waiting for a connection (read by the metrics sampler)."""
        if self._pool is None:
            return 0, 0, 0
        return (len(self._pool.connections), len(self._pool.busy),
                len(self._pool._semaphore.waiting))

    async def connect(self) -> None:
        """Opens every connection; raises if PostgreSQL cannot be reached now."""
        pool = _Pool(self._reactor, self._outage, self._call_deadline, self._dsn,
                     min=self._size)
        try:
            await pool.start()
        except Exception:
            pool.close()
            raise
        self._pool = pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    @property
    def connected(self) -> bool:
        """True when at least one connection is believed alive."""
        return self._pool is not None and self._pool.any_alive()

    def alive_connections(self) -> int:
        if self._pool is None:
            return 0
        return sum(c.alive for c in self._pool.connections | self._pool.busy)

    async def call(self, function: str, *args: Any) -> Any:
        """Runs ``SELECT queen.<function>(args…)`` and returns its (JSON) value.

        dicts and lists are sent as jsonb. A lost or hung database becomes
        ``DatabaseUnavailable``.
        """
        rows = await self._run(function, args, "SELECT queen.{}({})")
        return rows[0][0]

    async def call_or_nothing(self, function: str, *args: Any) -> Any:
        """:meth:`call` for a function not safe to apply twice (KV, locks, transactions): its
        ``DatabaseUnavailable`` means nothing was applied, a deadline included, so the
        client may resend (see the module docstring); only :class:`CommitUnconfirmed`
        leaves the outcome unknown."""
        rows = await self._run(function, args, "SELECT queen.{}({})", or_nothing=True)
        return rows[0][0]

    async def call_rows(self, function: str, *args: Any) -> List[Tuple[Any, ...]]:
        """Runs ``SELECT * FROM queen.<function>(args…)`` (a set-returning function) and
        returns its rows; otherwise as :meth:`call`."""
        return await self._run(function, args, "SELECT * FROM queen.{}({})")

    async def _run(self, function: str, args: Tuple[Any, ...], shape: str,
                   or_nothing: bool = False) -> List[Tuple[Any, ...]]:
        if self._pool is None:
            raise DatabaseUnavailable("Database unavailable")
        sql = self._statement(function, args, shape)
        params = tuple(jsoncodec.dumps_text(a) if isinstance(a, (dict, list)) else a
                       for a in args)
        size = _statement_bytes(params)
        if size is not None:
            raise RefusedByDatabase(
                f"{function}: {size} bytes of data are more than one database call takes "
                f"({MAX_STATEMENT_BYTES}); send less at once")
        try:
            rows = await self._run_again_if_rolled_back(sql, params, or_nothing)
        except DeadlineExceeded as err:
            self.failed_calls += 1
            self._outage.failed(f"{function}: {err}")
            raise
        except _ROLLED_BACK as err:
            self.failed_calls += 1
            log.warn("{function}: undone by PostgreSQL {n} times in a row ({error}); "
                     "answered as busy", function=function, n=_ROLLED_BACK_RETRIES + 1,
                     error=describe_error(err))
            raise DatabaseBusy("Database busy: conflicting transactions undid the request; "
                               "nothing was applied, retry") from err
        except _CANCELLED as err:
            self.failed_calls += 1
            self._cancelled.failed(f"{function}: {describe_error(err)}")
            raise DatabaseUnavailable(f"Database unavailable: {describe_error(err)}") from err
        except _UNAVAILABLE as err:
            self.failed_calls += 1
            if _beyond_limits(err):
                log.warn("{function}: refused by PostgreSQL ({error}); answered 400",
                         function=function, error=describe_error(err))
                raise RefusedByDatabase(
                    f"PostgreSQL refused the request: {describe_error(err)}") from err
            self._outage.failed(f"{function}: {describe_error(err)}")
            raise DatabaseUnavailable("Database unavailable") from err
        except psycopg2.DataError as err:  # class 22
            self.failed_calls += 1
            log.warn("{function}: refused by PostgreSQL ({error}); answered 400",
                     function=function, error=describe_error(err))
            raise RefusedByDatabase(
                f"PostgreSQL refused the request: {describe_error(err)}") from err
        except psycopg2.DatabaseError as err:
            self.failed_calls += 1
            if err.pgcode == _SETTINGS_CHANGED:
                raise QueueSettingsChanged(
                    "A queue's encryptionEnabled changed while the request was under way; "
                    "nothing was applied, retry") from err
            raise
        except Exception:
            self.failed_calls += 1
            raise
        self._outage.succeeded()
        self._cancelled.succeeded()
        return rows

    async def _run_again_if_rolled_back(self, sql: str, params: Tuple[Any, ...],
                                        or_nothing: bool = False) -> List[Tuple[Any, ...]]:
        """Every call is one statement in its own transaction, so one that PostgreSQL ended
        with a deadlock or serialization failure left nothing behind and can simply run again.
        An all-or-nothing call's window covers all its runs, not each."""
        pool = self._pool
        assert pool is not None  # _run checked it
        window = min(self._call_deadline, pool.resend_safe_s) if or_nothing else None
        ends = self._reactor.seconds() + window if window is not None else 0.0
        for retry in range(_ROLLED_BACK_RETRIES + 1):
            timeout = self._call_deadline
            if window is not None:
                timeout = ends - self._reactor.seconds()
                if timeout <= 0:
                    raise DeadlineExceeded(f"Database did not answer within {window:g}s")
            try:
                return await pool.run_query_within(timeout, sql, params, or_nothing)
            except _ROLLED_BACK:
                if retry == _ROLLED_BACK_RETRIES:
                    raise
                self.rolled_back_retries += 1
            except psycopg2.errors.UniqueViolation as err:
                if err.diag.constraint_name not in _RACED_KEYS or retry == _ROLLED_BACK_RETRIES:
                    raise  # (a repeat within the call itself: the batcher splits the call)
                self.rolled_back_retries += 1
        raise AssertionError("unreachable")

    async def ping(self, timeout: float = 2.0) -> bool:
        """True when PostgreSQL answers ``SELECT 1`` within ``timeout`` seconds."""
        if self._pool is None or not self.connected:
            return False
        try:
            rows = await self._pool.run_query_within(timeout, "SELECT 1", ())
        except Exception:
            return False
        return rows[0][0] == 1

    def _statement(self, function: str, args: Tuple[Any, ...], shape: str) -> str:
        kinds = tuple(isinstance(a, (dict, list)) for a in args)
        key = (function, kinds, shape)
        sql = self._statements.get(key)
        if sql is None:
            placeholders = ", ".join("%s::jsonb" if is_json else "%s" for is_json in kinds)
            sql = self._statements[key] = shape.format(function, placeholders)
        return sql
