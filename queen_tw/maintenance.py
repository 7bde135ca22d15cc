"""Maintenance: the cluster-wide flags of WIRE.md 3.7 and the file buffer's status, in one place.

- ``maintenance_mode``: pushes go to the file buffer instead of PostgreSQL; switching it off
  lets the replay drain the buffer.
- ``pop_maintenance_mode``: every pop answers 204 at once.

PostgreSQL (``queen.system_state``) is the source of truth, so every instance sees a change:
each reads the flags once it can reach PostgreSQL and again every
``QUEEN_CACHE_REFRESH_INTERVAL_MS``; the instance that changes a flag applies it at once.
Until the first read succeeds both flags count as off and ``loaded`` is False (``/health``
answers 503: the server does not know the flags yet); reads are retried quickly (backoff up
to a second) until then, so a fresh instance learns the flags right after PostgreSQL answers.
An outage is logged once when the reads start failing and once when they work again.

With peer sync (WIRE 6.1) a change is also announced to the other instances, which apply it
at once (:meth:`Maintenance.apply_from_peer`) and then read the flag back from PostgreSQL:
datagrams of changes made at the same moment through different instances may arrive in
either order, and only the stored value says which change committed last. The periodic
re-read stays the fallback for a lost datagram. This module knows nothing of the sync: the
announcing is a callback given to :meth:`Maintenance.announce_changes_to`.

The HTTP layer is given one :class:`Maintenance` and reads or changes everything through it;
it never reaches into the buffer or the failover policy.
"""

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from queen_tw.db.pool import Database
from queen_tw.failover.buffer import FileBuffer
from queen_tw.services.periodic import PeriodicService
from queen_tw.services.retry import Backoff

log = Logger()

FIRST_READ_RETRY_S = 0.1
"""First delay after a failed read; it doubles up to a second (or the interval if shorter)."""

MAINTENANCE = "maintenance_mode"
POP_MAINTENANCE = "pop_maintenance_mode"


@dataclass(frozen=True)
class BufferStatus:
    """A snapshot of the file buffer (``/health``, ``/api/v1/status/buffers``, maintenance)."""

    pending: int
    failed: int
    healthy: bool
    fsyncs: int
    failed_files: Dict[str, Any]
    """``count``, ``totalBytes``, ``totalMB``, ``failoverCount``, ``qos0Count`` of ``failed/``."""


class Maintenance:
    """The local copy of the cluster-wide flags, plus the buffer they divert pushes to.

    :param db: the pool (``system_state_get`` / ``system_state_set`` in sql/).
    :param buffer: the file buffer of this process.
    :param clock: time source for :meth:`reread`'s bound.
    """

    def __init__(self, db: Database, buffer: FileBuffer, clock: IReactorTime):
        self._db = db
        self._buffer = buffer
        self._clock = clock
        self._flags: Dict[str, bool] = {MAINTENANCE: False, POP_MAINTENANCE: False}
        self.loaded = False
        self._announce: Optional[Callable[[str, bool], None]] = None
        self._observers: List[Callable[[str, bool], None]] = []
        # per flag, how many changes (here or from a peer) were applied: a re-read begun
        # before one may have read the old row and must not undo it
        self._changes: Dict[str, int] = {MAINTENANCE: 0, POP_MAINTENANCE: 0}

    def announce_changes_to(self, announce: Callable[[str, bool], None]) -> None:
        """``announce(key, enabled)`` is called after each change made through this
        process (the peer sync tells the other instances)."""
        self._announce = announce

    def on_change(self, observer: Callable[[str, bool], None]) -> None:
        """``observer(key, enabled)`` is called whenever a flag changes here, however the
        change came (this process, a peer, a sibling worker, a re-read)."""
        self._observers.append(observer)

    def apply_from_peer(self, key: str, enabled: bool) -> Optional[defer.Deferred]:
        """A peer changed a flag (it is stored in PostgreSQL already): applied at once, then
        read back (the returned Deferred fires once that read is over, whatever it found).

        The read settles races: two instances switching a flag at the same moment send
        datagrams that may arrive in the other order than their commits, and each arrival
        would otherwise leave the flag as the later datagram says until the next periodic
        re-read. A read begun after the arrival sees the commit it announced and any
        later one; a read overtaken by a newer arrival is discarded (see :meth:`refresh`).

        Unknown keys and non-boolean values are ignored (logged at debug; None returned):
        they come from the network.
        """
        if key not in self._flags or not isinstance(enabled, bool):
            log.debug("ignored a peer's maintenance change {key}={enabled!r}", key=key,
                      enabled=enabled)
            return None
        self._changes[key] += 1
        self._apply(key, enabled, " (announced by a peer)")
        return defer.ensureDeferred(self.reread())

    @property
    def maintenance_mode(self) -> bool:
        return self._flags[MAINTENANCE]

    @property
    def pop_maintenance_mode(self) -> bool:
        return self._flags[POP_MAINTENANCE]

    def buffer_status(self) -> BufferStatus:
        stats = self._buffer.stats()
        return BufferStatus(pending=self._buffer.pending, failed=self._buffer.failed,
                            healthy=self._buffer.healthy, fsyncs=self._buffer.fsyncs,
                            failed_files=stats["failedFiles"])

    async def refresh(self) -> Dict[str, bool]:
        """Re-reads the flags from PostgreSQL; raises ``DatabaseUnavailable`` when it cannot."""
        changes_before = dict(self._changes)
        stored = await self._db.call("system_state_get")
        for key in self._flags:
            if self._changes[key] == changes_before[key]:
                self._apply(key, _enabled(stored.get(key)), " (read from PostgreSQL)")
            # else: read before a change was applied, so it may predate it: the change
            # stays until the next re-read
        self.loaded = True
        return dict(self._flags)

    def refresh_service(self, interval_ms: int) -> PeriodicService:
        """Reads the flags at start, then every ``interval_ms`` (sooner after a failure)."""
        interval = interval_ms / 1000.0
        retry = Backoff(min(FIRST_READ_RETRY_S, interval), maximum=min(1.0, interval))
        return PeriodicService("maintenance flags refresh", interval_ms, self.refresh,
                               self._clock, now=True, retry=retry, quiet_start=True)

    async def reread(self, timeout: float = 2.0) -> None:
        """:meth:`refresh` for a request that wants the stored flags: when PostgreSQL does not
        answer within ``timeout`` seconds the flags known here stay."""
        reading = defer.ensureDeferred(self.refresh())
        reading.addTimeout(timeout, self._clock)
        try:
            await reading
        except Exception as err:
            log.debug("maintenance flags not re-read: {error}", error=err)

    async def set_maintenance(self, enabled: bool) -> None:
        """Push maintenance for the whole cluster, applied here at once."""
        await self._set(MAINTENANCE, enabled)

    async def set_pop_maintenance(self, enabled: bool) -> None:
        """Pop maintenance for the whole cluster, applied here at once."""
        await self._set(POP_MAINTENANCE, enabled)

    async def _set(self, key: str, enabled: bool) -> None:
        await self._db.call("system_state_set", key, {"enabled": enabled})
        self._changes[key] += 1
        self._apply(key, enabled)
        if self._announce is not None:
            self._announce(key, enabled)

    def _apply(self, key: str, enabled: bool, source: str = "") -> None:
        if self._flags[key] == enabled:
            return
        log.info("{flag} is now {state}{source}", flag=key,
                 state="on" if enabled else "off", source=source)
        self._flags[key] = enabled
        for observer in self._observers:
            observer(key, enabled)


def _enabled(value: Any) -> bool:
    if isinstance(value, dict):
        value = value.get("enabled")
    return value is True or value == "true"
