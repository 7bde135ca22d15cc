"""Cluster-wide maintenance flags (WIRE.md 3.7), kept in ``queen.system_state``.

- ``maintenance_mode``: pushes go to the file buffer instead of PostgreSQL; switching it off
  lets the replay drain the buffer.
- ``pop_maintenance_mode``: every pop answers 204 at once.

PostgreSQL is the source of truth, so every instance sees a change: each reads the flags once
it can reach PostgreSQL and again every ``QUEEN_CACHE_REFRESH_INTERVAL_MS``; the instance that
changes a flag applies it at once. Until the first read succeeds both flags count as off
and ``/health`` answers 503 (the server is not ready: it does not know the flags yet).
"""

from typing import Any, Dict, Optional

from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from queen_tw.db.pool import Database

log = Logger()

MAINTENANCE = "maintenance_mode"
POP_MAINTENANCE = "pop_maintenance_mode"


class SystemState:
    """The local copy of the cluster-wide flags.

    :param db: the pool (``system_state_get`` / ``system_state_set`` in sql/030).
    :param clock: time source for :meth:`reread`'s bound.
    """

    def __init__(self, db: Database, clock: IReactorTime):
        self._db = db
        self._clock = clock
        self.flags: Dict[str, bool] = {MAINTENANCE: False, POP_MAINTENANCE: False}
        self.loaded = False

    @property
    def maintenance_mode(self) -> bool:
        return self.flags[MAINTENANCE]

    @property
    def pop_maintenance_mode(self) -> bool:
        return self.flags[POP_MAINTENANCE]

    async def refresh(self) -> Dict[str, bool]:
        """Re-reads the flags from PostgreSQL; raises ``DatabaseUnavailable`` when it cannot."""
        stored = await self._db.call("system_state_get")
        for key in self.flags:
            enabled = _enabled(stored.get(key))
            if enabled != self.flags[key]:
                log.info("{flag} is now {state}", flag=key, state="on" if enabled else "off")
            self.flags[key] = enabled
        self.loaded = True
        return dict(self.flags)

    async def reread(self, timeout: float = 2.0) -> None:
        """:meth:`refresh` for a request that wants the stored flags: when PostgreSQL does not
        answer within ``timeout`` seconds the flags known here stay."""
        reading = defer.ensureDeferred(self.refresh())
        reading.addTimeout(timeout, self._clock)
        try:
            await reading
        except Exception as err:
            log.debug("maintenance flags not re-read: {error}", error=err)

    async def set(self, key: str, enabled: bool) -> None:
        """Stores a flag for the whole cluster and applies it here at once."""
        await self._db.call("system_state_set", key, {"enabled": enabled})
        if self.flags[key] != enabled:
            log.info("{flag} switched {state}", flag=key, state="on" if enabled else "off")
        self.flags[key] = enabled


class SystemStateService(service.Service):
    """Reads the flags every ``interval`` seconds (every 0.1 s until the first read succeeds,
    so a fresh instance learns them right after PostgreSQL answers)."""

    def __init__(self, state: SystemState, clock: IReactorTime, interval: float):
        self._state = state
        self._clock = clock
        self._interval = interval
        self._call: Optional[Any] = None
        self._reading: Optional[defer.Deferred] = None

    def startService(self):
        super().startService()
        self._schedule(0)

    def _schedule(self, delay: float) -> None:
        if self.running:
            self._call = self._clock.callLater(delay, self._read)

    def _read(self) -> None:
        self._reading = defer.ensureDeferred(self._state.refresh())
        self._reading.addErrback(self._failed)
        self._reading.addBoth(lambda _: self._schedule(
            self._interval if self._state.loaded else min(self._interval, 0.1)))

    def _failed(self, failure) -> None:
        log.debug("cannot read maintenance flags yet: {error}", error=failure.value)

    def stopService(self):
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()


def _enabled(value: Any) -> bool:
    if isinstance(value, dict):
        value = value.get("enabled")
    return value is True or value == "true"
