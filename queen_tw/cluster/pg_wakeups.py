"""Long-poll wake-ups across the worker processes of one server, through PostgreSQL.

With NUM_WORKERS > 1 a push handled by one worker must wake pops parked in another. Every
worker's sessions set ``queen.wakeup=on``; the push and ack functions then send a NOTIFY on
channel ``queen_wakeup`` (delivered at commit) naming the queue, the partition and the
sending worker. Each worker LISTENs on one dedicated connection and wakes its own waiters;
its own notices are skipped (it woke them locally already).
"""

from typing import Callable, Optional

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger
from txpostgres import txpostgres

log = Logger()

CHANNEL = "queen_wakeup"
SESSION_SETTING = {"queen__wakeup": "on"}


class PostgresWakeups(service.Service):
    """LISTENs for peer workers' wake-up notices and hands them to ``wake(queue, partition)``.

    Reconnects with backoff when the connection drops (waiters then rely on their fallback
    timer until it is back).
    """

    def __init__(self, dsn: str, worker_id: str, wake: Callable[[str, Optional[str]], object],
                 reactor):
        self._dsn = dsn
        self._worker_id = worker_id
        self._wake = wake
        self._reactor = reactor
        self._connection: Optional[txpostgres.Connection] = None
        self._loop: Optional[defer.Deferred] = None

    def startService(self):
        super().startService()
        self._loop = defer.ensureDeferred(self._listen_forever())

    async def _listen_forever(self) -> None:
        delay = 0.5
        while self.running:
            connection = txpostgres.Connection(reactor=self._reactor)
            try:
                await connection.connect(self._dsn)
                connection.addNotifyObserver(self._on_notify)
                await connection.runOperation(f"LISTEN {CHANNEL}")
                self._connection = connection
                delay = 0.5
                await self._until_lost(connection)
            except Exception as err:
                log.warn("wake-up listener: {error}; retrying in {delay}s", error=err, delay=delay)
            self._close(connection)
            if self.running:
                await task.deferLater(self._reactor, delay, lambda: None)
                delay = min(delay * 2, 10.0)

    async def _until_lost(self, connection: txpostgres.Connection) -> None:
        """Pings every few seconds; returns when the connection stops answering."""
        while self.running:
            await task.deferLater(self._reactor, 5.0, lambda: None)
            if not self.running:
                return
            await connection.runQuery("SELECT 1")

    def _on_notify(self, notify) -> None:
        queue, partition, sender = (notify.payload.split("\n") + [None, None])[:3]
        if sender != self._worker_id and queue:
            self._wake(queue, partition or None)

    def _close(self, connection: txpostgres.Connection) -> None:
        try:
            connection.close()
        except Exception:
            pass

    def stopService(self):
        super().stopService()
        if self._loop is not None and not self._loop.called:
            self._loop.cancel()
        if self._connection is not None:
            self._close(self._connection)
