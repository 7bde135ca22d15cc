"""The durability parts of one server process, built together for ``make_service``.

- a :class:`FileBuffer` in ``FILE_BUFFER_DIR`` (a sub-directory per worker when
  ``NUM_WORKERS`` > 1, so workers never share a segment), locked for this process as soon as
  the service is built (a second live process given the same directory is refused), opened
  at start — taking over what an earlier process left — and flushed and closed at stop;
- the adoption of buffer directories whose process no longer runs, at open and every
  :data:`ADOPTION_INTERVAL_MS` (``adoption``);
- the :class:`~queen_tw.maintenance.Maintenance` flags and buffer status, and their refresh;
- the :class:`FileFailover` handed to ``QueueEngine``;
- the replay of the buffer into PostgreSQL;
- with ``QUEEN_ENCRYPTION_KEY``, the seal on buffered payloads of encrypted queues, put on
  by the failover and taken off by the replay (``sealing``).

When each of these stops is said by :data:`queen_tw.lifecycle.STOP_ORDER`.
"""

from pathlib import Path

from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from queen_tw.config import Config
from queen_tw.crypto import make_cipher
from queen_tw.db.pool import Database
from queen_tw.failover.adoption import DirectoryInUse
from queen_tw.failover.buffer import FileBuffer
from queen_tw.failover.policy import FileFailover
from queen_tw.failover.replay import Replayer, ReplayService, Store
from queen_tw.failover.sealing import BufferSeal
from queen_tw.maintenance import Maintenance
from queen_tw.services.periodic import PeriodicService
from queen_tw.startup import refuse_to_start

log = Logger()

WORKER_REFRESH_MS = 1000
"""Flag re-read period of each of ``NUM_WORKERS`` processes (when the option asks for more)."""

ADOPTION_INTERVAL_MS = 30_000
"""How often a process looks for buffer directories left by processes that no longer run
(it also looks when its buffer opens)."""


class Durability:
    """File buffer, maintenance flags and replay of one process.

    :param config: ``FILE_BUFFER_*`` and ``QUEEN_CACHE_REFRESH_INTERVAL_MS``.
    :param db: the pool (flags live in PostgreSQL).
    :param clock: clock for the timers.
    :param worker: this process is one of ``NUM_WORKERS``: its buffer is
        ``FILE_BUFFER_DIR/<WORKER_ID>`` and it re-reads the flags at least every second.
    """

    def __init__(self, config: Config, db: Database, clock: IReactorTime, worker: bool = False):
        directory = Path(config.file_buffer_dir)
        if worker:
            directory = directory / config.worker_id
        self._config = config
        self._clock = clock
        self._worker = worker
        self.buffer = FileBuffer(str(directory), config.file_buffer_events_per_file,
                                 scan_root=config.file_buffer_dir)
        try:
            self.buffer.claim()
        except DirectoryInUse as err:
            refuse_to_start(str(err))
        except OSError:
            pass  # an unusable directory: open() logs it and reports the buffer unhealthy
        self.maintenance = Maintenance(db, self.buffer, clock)
        self._seal = BufferSeal(make_cipher(config.encryption_key))
        self.failover = FileFailover(self.buffer, self.maintenance, self._seal)

    def buffer_service(self) -> service.Service:
        """Opens the buffer at start, closes it at stop (stage ``buffer``)."""
        return _BufferService(self.buffer)

    def refresh_service(self) -> PeriodicService:
        """Re-reads the maintenance flags (stage ``jobs``)."""
        refresh_ms = self._config.cache_refresh_interval_ms
        if self._worker:
            # a flag switched through one worker reaches its siblings by this re-read only
            refresh_ms = min(refresh_ms, WORKER_REFRESH_MS)
        return self.maintenance.refresh_service(refresh_ms)

    def adoption_service(self) -> PeriodicService:
        """Adopts buffer directories whose process stopped running (stage ``jobs``)."""
        return PeriodicService("orphaned buffer adoption", ADOPTION_INTERVAL_MS,
                               self.buffer.adopt_orphans, self._clock)

    def replay_service(self, store: Store) -> ReplayService:
        """Replays the buffer through ``store`` (``QueueEngine.store``; stage ``replay``),
        unsealing sealed payloads first."""
        retry_ms = self._config.file_buffer_failed_retry_ms
        replayer = Replayer(self.buffer, self._seal.unsealing(store),
                            self._config.file_buffer_max_batch,
                            paused=self._replay_paused,
                            retry_failed_s=retry_ms / 1000.0 if retry_ms else None)
        return ReplayService(replayer, self._clock, self._config.file_buffer_flush_ms)

    def timers_paused(self) -> bool:
        """No timer fires while this process's buffer holds pushes, or may (not opened yet,
        push maintenance, flags unknown): a fired timer is a push, and it must not overtake
        the buffered pushes of its partition (the replay has them in file order)."""
        return (not self.maintenance.loaded or self.maintenance.maintenance_mode
                or self.buffer.may_hold_records)

    def _replay_paused(self) -> bool:
        """No replay in push maintenance, nor before the flags are known (it may be on)."""
        return not self.maintenance.loaded or self.maintenance.maintenance_mode


class _BufferService(service.Service):
    """Opens the buffer at start (off the reactor thread; pushes meanwhile queue behind what
    it holds) and closes it at stop, after every queued record is on disk."""

    def __init__(self, buffer: FileBuffer):
        self._buffer = buffer

    def startService(self):
        super().startService()
        opening = defer.ensureDeferred(self._buffer.open())  # close() waits for it
        opening.addErrback(lambda failure: log.failure("opening the file buffer failed",
                                                       failure))

    def stopService(self):
        super().stopService()
        return defer.ensureDeferred(self._buffer.close())
