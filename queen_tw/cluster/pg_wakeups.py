"""Long-poll wake-ups across the worker processes of one server, through PostgreSQL.

With NUM_WORKERS > 1 a push handled by one worker must wake pops parked in another. Every
worker's sessions set ``queen.wakeup=on``; the push and ack functions then send a NOTIFY on
channel ``queen_wakeup`` (delivered at commit) naming the queue, the partition and the
sending worker. Each worker LISTENs on one dedicated connection and wakes its own waiters;
its own notices are skipped (it woke them locally already).

With peer sync, worker 1 also sends such a notice (:meth:`PostgresWakeups.relay`) for each
wake-up a peer instance announced, so its siblings' pops wake too (see
:mod:`queen_tw.cluster.wiring`). The same connection carries the workers' config and
maintenance changes on channel ``queen_sync`` (JSON, :meth:`PostgresWakeups.publish`; see
:mod:`queen_tw.cluster.sibling_bus`).

Both channels are the whole database's: every instance's workers hear every notice. Each
worker acts only on its siblings' (same instance, by worker name). Acting on another
instance's too made two such instances echo each other without end: a notice heard by B's
worker 1 went to A by datagram, A's worker 1 relayed it on the channel, B's heard it again.
"""

import json
from typing import Any, Callable, Dict, Optional, Tuple

from twisted.internet import defer
from twisted.logger import Logger
from txpostgres import txpostgres

from queen_tw.cluster.worker_names import instance_of
from queen_tw.db.pool import QuietConnection
from queen_tw.services.periodic import PeriodicService
from queen_tw.services.retry import Backoff

log = Logger()

CHANNEL = "queen_wakeup"
SYNC_CHANNEL = "queen_sync"
SESSION_SETTING = {"queen__wakeup": "on"}
PING_MS = 5000
"""How often the LISTEN connection is checked (a lost one is noticed within this)."""
MAX_UNSENT = 10_000
"""Notices kept while there is no connection to send them on (the oldest go first)."""


class PostgresWakeups(PeriodicService):
    """LISTENs for peer workers' wake-up notices and hands them to ``wake(queue, partition)``.

    Each run connects and LISTENs when there is no connection, or checks the one there is;
    a failed run drops the connection and the next one comes after a backoff (0.5 s
    doubling to 10 s), so a lost connection is re-established. Waiters rely on their
    fallback timer meanwhile.
    """

    def __init__(self, dsn: str, worker_id: str, wake: Callable[[str, Optional[str]], object],
                 reactor, on_notice: Optional[Callable[[Dict[str, Any]], None]] = None):
        # any failure here is the connection's: logged as an outage, never a traceback
        super().__init__("wake-up listener", PING_MS, self._keep_listening, reactor, now=True,
                         retry=Backoff(0.5, maximum=10.0), expected=(Exception,),
                         stop_timeout=1.0)
        self._dsn = dsn
        self._worker_id = worker_id
        self._instance = instance_of(worker_id)
        self._wake = wake
        self._on_notice = on_notice
        self._reactor = reactor
        self._connection: Optional[txpostgres.Connection] = None
        # Notices given while there was no connection, sent once there is one (by
        # (channel, payload): the same wake-up twice is one). A restarted worker 1 reads the
        # datagrams that waited in its socket before its connection is up.
        self._unsent: Dict[Tuple[str, str], None] = {}

    async def _keep_listening(self) -> None:
        if self._connection is None:
            await self._listen()
            return
        try:
            await self._connection.runQuery("SELECT 1")
        except Exception:
            self._drop()
            raise

    async def _listen(self) -> None:
        # (quiet: a plain txpostgres connection logged a traceback each time PostgreSQL went
        # away; the failed check of the next run drops it and connects again)
        connection = QuietConnection(reactor=self._reactor)
        try:
            await connection.connect(self._dsn)
            connection.addNotifyObserver(self._on_notify)
            await connection.runOperation(f"LISTEN {CHANNEL}")
            if self._on_notice is not None:
                await connection.runOperation(f"LISTEN {SYNC_CHANNEL}")
        except Exception:
            _close(connection)
            raise
        if self.running:
            self._connection = connection
            unsent, self._unsent = list(self._unsent), {}
            for channel, payload in unsent:
                self._notify(channel, payload)
        else:
            _close(connection)  # stopped while connecting

    def relay(self, queue: str, partition: Optional[str]) -> None:
        """Wakes the sibling workers' pops on ``queue`` / ``partition`` (a peer instance's
        push). Without a connection right now it is sent once there is one (advisory like the
        datagram it comes from: the siblings' fallback timers cover a lost one)."""
        self._notify(CHANNEL, "\n".join([queue, partition or "", self._worker_id]))

    def publish(self, notice: Dict[str, Any]) -> None:
        """Sends ``notice`` (JSON) to the sibling workers on ``queen_sync``; without a
        connection right now, once there is one (their periodic re-reads cover a lost one)."""
        self._notify(SYNC_CHANNEL, json.dumps(dict(notice, sender=self._worker_id)))

    def _notify(self, channel: str, payload: str) -> None:
        if self._connection is None:
            if len(self._unsent) >= MAX_UNSENT:
                del self._unsent[next(iter(self._unsent))]
            self._unsent[(channel, payload)] = None
            log.debug("{channel} notice kept until the LISTEN connection is up",
                      channel=channel)
            return
        sent = self._connection.runOperation("SELECT pg_notify(%s, %s)", (channel, payload))
        sent.addErrback(lambda failure: log.debug("{channel} notice failed: {error}",
                                                  channel=channel,
                                                  error=failure.getErrorMessage()))

    def _on_notify(self, notify) -> None:
        if notify.channel == SYNC_CHANNEL:
            self._sync_notice(notify.payload)
            return
        queue, partition, sender = (notify.payload.split("\n") + [None, None])[:3]
        if self._from_sibling(sender) and queue:
            self._wake(queue, partition or None)

    def _sync_notice(self, payload: str) -> None:
        try:
            notice = json.loads(payload)
        except ValueError:
            log.debug("ignored a {channel} notice that is not JSON", channel=SYNC_CHANNEL)
            return
        if isinstance(notice, dict) and self._from_sibling(notice.get("sender")) \
                and self._on_notice is not None:
            self._on_notice(notice)

    def _from_sibling(self, sender: Any) -> bool:
        """Sent by another worker of this instance (this one's own notices: woken already)."""
        return (isinstance(sender, str) and sender != self._worker_id
                and instance_of(sender) == self._instance)

    def _drop(self) -> None:
        if self._connection is not None:
            _close(self._connection)
            self._connection = None

    def stopService(self) -> defer.Deferred:
        stopped = super().stopService()
        self._drop()
        return stopped


def _close(connection: txpostgres.Connection) -> None:
    try:
        connection.close()
    except Exception:
        pass
