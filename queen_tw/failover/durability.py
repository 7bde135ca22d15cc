"""The durability parts of one server process, built together for ``make_service``.

- a :class:`FileBuffer` in ``FILE_BUFFER_DIR`` (a sub-directory per worker when
  ``NUM_WORKERS`` > 1, so workers never share a segment), opened at start — taking over what
  an earlier process left — and flushed and closed last at stop;
- the cluster-wide maintenance flags (:class:`SystemState`) and their refresh;
- the :class:`FileFailover` handed to ``QueueEngine`` and the ``pop_paused`` test of its Popper;
- the replay and the graceful-shutdown helpers.

Order in ``make_service`` (start order; stop is the reverse)::

    buffer_service()            before DatabaseService: closed after the pool
    DatabaseService
    services(engine)            flag refresh, replay, in-flight drain
    HTTP listener, WaitersService
    gate                        last: the first thing a stop does
"""

from pathlib import Path
from typing import List, Optional

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from queen_tw.config import Config
from queen_tw.db.pool import Database
from queen_tw.failover.buffer import FileBuffer
from queen_tw.failover.policy import FileFailover
from queen_tw.failover.replay import Replayer, ReplayService
from queen_tw.lifecycle import InFlightDrain, ShutdownGate
from queen_tw.system_state import SystemState, SystemStateService

log = Logger()

WORKER_REFRESH_MS = 1000
"""Flag re-read period of each of ``NUM_WORKERS`` processes (when the option asks for more)."""


class Durability:
    """File buffer, maintenance flags, replay and shutdown gate of one process.

    :param config: ``FILE_BUFFER_*`` and ``QUEEN_CACHE_REFRESH_INTERVAL_MS``.
    :param db: the pool (flags live in PostgreSQL).
    :param reactor: clock for the timers.
    :param worker: this process is one of ``NUM_WORKERS``: its buffer is
        ``FILE_BUFFER_DIR/<WORKER_ID>`` and it re-reads the flags at least every second.
    """

    def __init__(self, config: Config, db: Database, reactor, worker: bool = False):
        directory = Path(config.file_buffer_dir)
        if worker:
            directory = directory / config.worker_id
        self._config = config
        self._reactor = reactor
        self._worker = worker
        self.buffer = FileBuffer(str(directory), config.file_buffer_events_per_file)
        self.state = SystemState(db, reactor)
        self.failover = FileFailover(self.buffer, self.state)
        self.gate = ShutdownGate()
        self.replayer: Optional[Replayer] = None

    def pop_paused(self) -> bool:
        """Pops answer 204 at once: pop maintenance, or the server is stopping."""
        return self.state.pop_maintenance_mode or self.gate.stopping

    def _replay_paused(self) -> bool:
        """No replay in push maintenance, nor before the flags are known (it may be on)."""
        return not self.state.loaded or self.state.maintenance_mode

    def buffer_service(self) -> service.Service:
        return _BufferService(self.buffer)

    def services(self, engine) -> List[service.Service]:
        """Flag refresh, replay into ``engine.store`` and the drain of ``engine``'s batchers."""
        interval = self._config.file_buffer_flush_ms / 1000.0
        self.replayer = Replayer(self.buffer, engine.store, self._reactor,
                                 self._config.file_buffer_max_batch, interval,
                                 paused=self._replay_paused)

        def busy() -> bool:
            return any(b.queued_items or b.in_flight for b in engine.batchers.values())

        refresh_ms = self._config.cache_refresh_interval_ms
        if self._worker:
            # a flag switched through one worker reaches its siblings by this re-read only
            refresh_ms = min(refresh_ms, WORKER_REFRESH_MS)
        return [SystemStateService(self.state, self._reactor, refresh_ms / 1000.0),
                ReplayService(self.replayer, self._reactor, interval),
                InFlightDrain(busy, self._reactor)]


class _BufferService(service.Service):
    """Opens the buffer at start (blocking: it must be read before the first push) and
    closes it at stop, after every queued record is on disk."""

    def __init__(self, buffer: FileBuffer):
        self._buffer = buffer

    def startService(self):
        super().startService()
        self._buffer.open()

    def stopService(self):
        super().stopService()
        return defer.ensureDeferred(self._buffer.close())
