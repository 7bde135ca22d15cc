"""The replay: moves buffered pushes into PostgreSQL, in file order, once it takes them again.

Every ``FILE_BUFFER_FLUSH_MS`` the :class:`ReplayService` looks at the buffer; when there is
work, push maintenance is off and no replay is running, it starts :meth:`Replayer.drain`:

1. take the oldest segment and read it;
2. store its records in batches of ``FILE_BUFFER_MAX_BATCH`` through ``QueueEngine.store``
   (the same path as a live push: encryption, dedupe, wake-ups). The transactionId of every
   record was fixed before it was first tried, so a record that reached PostgreSQL already
   (a call that timed out but committed, or a replay cut short by a crash) answers
   ``duplicate``: each message is stored exactly once;
3. tell the buffer which records are stored, so their partitions stop being diverted;
4. delete the segment once all its records are stored.

PostgreSQL still unreachable: stop and try again later, with backoff up to 2 s. A batch with
items that fail for another reason (a full queue, a bad record) is tried again as a whole —
the stored ones answer ``duplicate`` — up to ``max_attempts`` times with backoff; then its
failing records go to ``failed/`` with their error, are counted and logged, and the replay
moves on. Nothing is dropped silently.
"""

from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Dict, List, Optional, Tuple

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from queen_tw.errors import Unavailable
from queen_tw.failover.buffer import FileBuffer, Segment

log = Logger()

Store = Callable[[List[Dict[str, Any]]], Awaitable[List[Dict[str, Any]]]]

STORED = ("queued", "duplicate")
MAX_BACKOFF_S = 2.0


@dataclass
class _Progress:
    """How far the replay got in the segment it is working on."""

    segment: Segment
    records: List[Dict[str, Any]]
    corrupt: List[bytes]
    next: int = 0
    attempts: int = 0
    failures: List[Tuple[Any, str]] = field(default_factory=list)


class Replayer:
    """Drains a :class:`FileBuffer` into PostgreSQL (see the module docstring).

    :param buffer: the file buffer.
    :param store: ``QueueEngine.store``: writes items, returns per-item results.
    :param clock: time source for backoff.
    :param max_batch: records per store call (``FILE_BUFFER_MAX_BATCH``).
    :param interval: seconds between looks at the buffer (``FILE_BUFFER_FLUSH_MS``).
    :param paused: True while push maintenance is on (the buffer must keep filling).
    :param max_attempts: tries of a failing batch before its failures go to ``failed/``.
    """

    def __init__(self, buffer: FileBuffer, store: Store, clock: IReactorTime, max_batch: int,
                 interval: float, paused: Callable[[], bool] = lambda: False,
                 max_attempts: int = 5):
        self._buffer = buffer
        self._store = store
        self._clock = clock
        self._max_batch = max_batch
        self._interval = interval
        self._paused = paused
        self._max_attempts = max_attempts
        self._progress: Optional[_Progress] = None
        self._not_before = 0.0
        self._backoff = interval
        self._running: Optional[defer.Deferred] = None
        self.stopping = False
        self.replayed = 0

    def tick(self) -> None:
        """Starts a drain when there is work and nothing stands in the way."""
        if (self._running is not None or self.stopping or self._paused()
                or not self._buffer.has_work or self._clock.seconds() < self._not_before):
            return
        self._running = defer.ensureDeferred(self.drain())
        self._running.addErrback(lambda failure: log.failure("file buffer replay failed",
                                                             failure))
        self._running.addBoth(self._finished)

    def _finished(self, _: Any) -> None:
        self._running = None

    def idle(self) -> defer.Deferred:
        """Fires when no drain is running (soon after :attr:`stopping` is set). Cancelling
        it only stops the waiting, never the drain."""
        done: defer.Deferred = defer.Deferred()
        if self._running is None:
            done.callback(None)
        else:
            self._running.addBoth(lambda result: (None if done.called else done.callback(None),
                                                  result)[1])
        return done

    async def drain(self) -> None:
        """Replays segment after segment until the buffer is empty or something stops it."""
        while not self.stopping and not self._paused():
            progress = await self._current()
            if progress is None:
                return
            if not await self._replay(progress):
                return
            try:
                await self._buffer.remove(progress.segment)
            except OSError as err:
                log.error("cannot delete replayed buffer segment {path}: {error}",
                          path=str(progress.segment.path), error=err)
                self._retry_later()
                return
            self._progress = None
            self._ok()

    async def _current(self) -> Optional[_Progress]:
        segment = await self._buffer.oldest()
        if segment is None:
            return None
        if self._progress is None or self._progress.segment is not segment:
            contents = await self._buffer.read(segment)
            self._progress = _Progress(segment, contents.records, contents.corrupt)
            if contents.torn_tail:
                log.warn("buffer segment {path} ends in a torn record (a crash mid-write, never "
                         "acknowledged): skipped", path=str(segment.path))
        return self._progress

    async def _replay(self, progress: _Progress) -> bool:
        """Stores the rest of one segment; False when it has to stop for now."""
        if progress.corrupt:
            if not await self._give_up(progress, [(line, "corrupt record (checksum mismatch)")
                                                  for line in progress.corrupt]):
                return False
            progress.corrupt = []
        while progress.next < len(progress.records):
            if self.stopping or self._paused():
                return False
            batch = progress.records[progress.next:progress.next + self._max_batch]
            try:
                failures = await self._store_batch(batch)
            except Unavailable as err:
                log.info("file buffer replay waits for PostgreSQL ({error})", error=err.message)
                self._retry_later()
                return False
            if failures:
                progress.attempts += 1
                if progress.attempts < self._max_attempts:
                    log.warn("{n} buffered records failed (attempt {a} of {m}): {error}",
                             n=len(failures), a=progress.attempts, m=self._max_attempts,
                             error=failures[0][1])
                    self._retry_later()
                    return False
                if not await self._give_up(progress, failures):
                    return False
            self._buffer.forget(batch)
            self.replayed += len(batch) - len(failures)
            progress.next += len(batch)
            progress.attempts = 0
            self._ok()
        return True

    async def _store_batch(self, batch: List[Dict[str, Any]]) -> List[Tuple[Any, str]]:
        """Stores a batch; returns the (record, error) of every record that did not make it.

        Raises ``Unavailable`` when PostgreSQL cannot be reached. A batch that fails as a
        whole for another reason is stored record by record to find the culprits.
        """
        try:
            results = await self._store(batch)
        except Unavailable:
            raise
        except Exception as err:
            if len(batch) == 1:
                return [(batch[0], f"{err.__class__.__name__}: {err}")]
            failures: List[Tuple[Any, str]] = []
            for item in batch:
                failures.extend(await self._store_batch([item]))
            return failures
        return [(item, result.get("error") or f"status {result.get('status')}")
                for item, result in zip(batch, results) if result.get("status") not in STORED]

    async def _give_up(self, progress: _Progress, failures: List[Tuple[Any, str]]) -> bool:
        try:
            await self._buffer.fail(progress.segment, failures)
        except OSError as err:
            log.error("cannot write failed buffer records to {dir}: {error}",
                      dir=str(self._buffer.directory), error=err)
            self._retry_later()
            return False
        for record, error in failures:
            log.error("buffered record moved to failed/ after {m} attempts: {record} ({error})",
                      m=self._max_attempts, record=_describe(record), error=error)
        return True

    def _retry_later(self) -> None:
        self._not_before = self._clock.seconds() + self._backoff
        self._backoff = min(self._backoff * 2, MAX_BACKOFF_S)

    def _ok(self) -> None:
        self._backoff = self._interval
        self._not_before = 0.0


class ReplayService(service.Service):
    """Runs :meth:`Replayer.tick` every ``interval`` seconds; stopping waits for the batch
    in flight (bounded by ``stop_timeout``)."""

    def __init__(self, replayer: Replayer, clock: IReactorTime, interval: float,
                 stop_timeout: float = 5.0):
        self._replayer = replayer
        self._clock = clock
        self._interval = interval
        self._stop_timeout = stop_timeout
        self._loop: Optional[task.LoopingCall] = None

    def startService(self):
        super().startService()
        self._replayer.stopping = False
        self._loop = task.LoopingCall(self._replayer.tick)
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=True)

    def stopService(self):
        super().stopService()
        self._replayer.stopping = True
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        idle = self._replayer.idle()
        idle.addTimeout(self._stop_timeout, self._clock)
        idle.addErrback(lambda failure: log.warn("replay still busy at shutdown: {error}",
                                                 error=failure.value))
        return idle


def _describe(record: Any) -> str:
    if isinstance(record, bytes):
        return f"<{len(record)} corrupt bytes>"
    return (f"queue={record.get('queue')} partition={record.get('partition', 'Default')} "
            f"transactionId={record.get('transactionId')}")
