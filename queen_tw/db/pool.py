"""The PostgreSQL connection pool behind every request.

Every database operation of the server is a call of one set-based function in schema
``queen`` (see ``sql/``) with JSON in and JSON out, so this module only needs ``call``.
Connections that die are replaced in the background with backoff; while none is usable,
calls fail at once with :class:`~queen_tw.errors.DatabaseUnavailable` instead of hanging.
"""

import json
from typing import Any, Dict, Optional, Tuple

import psycopg2
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from txpostgres import reconnection, retrying, txpostgres

from queen_tw.errors import DatabaseUnavailable

log = Logger()

_DEAD = (psycopg2.OperationalError, psycopg2.InterfaceError, reconnection.ConnectionDead,
         txpostgres.RollbackFailed)


def _reconnect_backoff():
    return retrying.simpleBackoffIterator(initialDelay=0.2, maxDelay=5.0, factor=2.0,
                                          maxRetries=0, now=False)


class _Connection(txpostgres.Connection):
    """A pooled connection that reconnects by itself after PostgreSQL comes back."""

    def __init__(self, reactor=None, cooperator=None):
        detector = reconnection.DeadConnectionDetector(
            reconnectionIterator=_reconnect_backoff, reactor=reactor)
        super().__init__(reactor, cooperator, detector=detector)

    @property
    def alive(self) -> bool:
        return self._connection is not None and not self.detector.connectionIsDead


class _Pool(txpostgres.ConnectionPool):
    connectionFactory = _Connection

    def __init__(self, reactor, *connargs, **connkw):
        self.reactor = reactor  # read by the base class while it builds the connections
        super().__init__(None, *connargs, **connkw)


class Database:
    """A fixed-size pool of reconnecting connections with JSON function calls.

    :param dsn: libpq connection string.
    :param size: number of connections.
    :param reactor: the reactor (its ``IReactorTime`` drives reconnect backoff).

    Session settings (statement and lock timeouts) travel in the DSN (``Config.dsn``).
    """

    def __init__(self, dsn: str, size: int, reactor: IReactorTime):
        self._dsn = dsn
        self._size = size
        self._reactor = reactor
        self._pool: Optional[_Pool] = None
        self._statements: Dict[Tuple[str, Tuple[bool, ...]], str] = {}

    @property
    def size(self) -> int:
        return self._size

    async def connect(self) -> None:
        """Opens every connection; raises if PostgreSQL cannot be reached now."""
        pool = _Pool(self._reactor, self._dsn, min=self._size)
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
        return self._pool is not None and any(c.alive for c in self._pool.connections)

    def alive_connections(self) -> int:
        return 0 if self._pool is None else sum(c.alive for c in self._pool.connections)

    async def call(self, function: str, *args: Any) -> Any:
        """Runs ``SELECT queen.<function>(args…)`` and returns its (JSON) value.

        dicts and lists are sent as jsonb. Connection failures become ``Unavailable``.
        """
        if self._pool is None:
            raise DatabaseUnavailable("Database unavailable")
        sql = self._statement(function, args)
        params = tuple(json.dumps(a, separators=(",", ":")) if isinstance(a, (dict, list)) else a
                       for a in args)
        try:
            rows = await self._pool.runQuery(sql, params)
        except _DEAD as err:
            log.warn("database call {function} failed: {error}", function=function, error=err)
            raise DatabaseUnavailable("Database unavailable") from err
        return rows[0][0]

    async def ping(self, timeout: float = 2.0) -> bool:
        """True when PostgreSQL answers ``SELECT 1`` within ``timeout`` seconds."""
        if not self.connected:
            return False
        d = defer.ensureDeferred(self._select_one())
        d.addTimeout(timeout, self._reactor)
        try:
            return await d
        except Exception:
            return False

    async def _select_one(self) -> bool:
        rows = await self._pool.runQuery("SELECT 1")
        return rows[0][0] == 1

    def _statement(self, function: str, args: Tuple[Any, ...]) -> str:
        shape = tuple(isinstance(a, (dict, list)) for a in args)
        key = (function, shape)
        sql = self._statements.get(key)
        if sql is None:
            placeholders = ", ".join("%s::jsonb" if is_json else "%s" for is_json in shape)
            sql = self._statements[key] = f"SELECT queen.{function}({placeholders})"
        return sql
