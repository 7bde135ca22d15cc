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

PostgreSQL still unreachable: stop and try again later (the :class:`ReplayService` backs off
up to 2 s, and logs the outage once when it starts and once when it ends). A batch with
items that fail for another reason (a full queue, a bad record) is tried again as a whole —
the stored ones answer ``duplicate`` — up to ``max_attempts`` times with backoff; then its
failing records go to ``failed/`` with their error, are counted and logged, and the replay
moves on. Nothing is dropped silently. The records that fail are tried one by one each time,
since PostgreSQL refusing one record's data fails its whole call: only the culprit is given
up, and the records behind it in its partition wait for it.

What is in ``failed/`` gets another round every ``FILE_BUFFER_FAILED_RETRY_MS`` (doubling
while records keep failing, up to an hour), since the reason may have passed (a queue at its
maxSize has room again): each record is stored straight away, or stays. A record stored so
is out of its partition's order: late, not lost. (These rounds run in drain before the
segments' replay, so fail() never appends to a failed/ file a round is rewriting.)
"""

import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Dict, List, Optional, Set, Tuple

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from queen_tw.errors import Unavailable
from queen_tw.failover.buffer import FileBuffer, Segment
from queen_tw.services.periodic import PeriodicService
from queen_tw.services.retry import Backoff

log = Logger()

Store = Callable[[List[Dict[str, Any]]], Awaitable[List[Dict[str, Any]]]]

STORED = ("queued", "duplicate")
MAX_BACKOFF_S = 2.0
MAX_FAILED_RETRY_S = 3600.0


@dataclass
class _Progress:
    """How far the replay got in the segment it is working on."""

    segment: Segment
    records: List[Dict[str, Any]]
    corrupt: List[bytes]
    next: int = 0
    attempts: int = 0


class ReplayHeld(Exception):
    """The replay stopped short of the end and must try again after a backoff."""


class Replayer:
    """Drains a :class:`FileBuffer` into PostgreSQL (see the module docstring).

    :param buffer: the file buffer.
    :param store: ``QueueEngine.store``: writes items, returns per-item results, raises
        ``Unavailable`` when PostgreSQL cannot be reached.
    :param max_batch: records per store call (``FILE_BUFFER_MAX_BATCH``).
    :param paused: True while push maintenance is on (the buffer must keep filling).
    :param max_attempts: tries of a failing batch before its failures go to ``failed/``.
    :param retry_failed_s: seconds before what is in ``failed/`` is tried again (doubling,
        see the module docstring); None never.
    :param now: a monotonic clock in seconds.
    """

    def __init__(self, buffer: FileBuffer, store: Store, max_batch: int,
                 paused: Callable[[], bool] = lambda: False, max_attempts: int = 5,
                 retry_failed_s: Optional[float] = None,
                 now: Callable[[], float] = time.monotonic):
        self._buffer = buffer
        self._store = store
        self._max_batch = max_batch
        self._paused = paused
        self._max_attempts = max_attempts
        self._retry_failed_s = retry_failed_s
        self._failed_wait = retry_failed_s or 0.0
        self._now = now
        self._retry_failed_at = now() + self._failed_wait
        self._progress: Optional[_Progress] = None
        self.stopping = False

    async def drain(self) -> None:
        """Replays segment after segment until the buffer is empty or something stops it.

        Returns when there is nothing (more) to do now: empty buffer, push maintenance, a
        stop. Raises ``Unavailable`` while PostgreSQL cannot be reached and
        :class:`ReplayHeld` when something else must be tried again later.
        """
        if not self.stopping and not self._paused():
            await self._retry_failed()
        while not self.stopping and not self._paused() and self._buffer.has_work:
            progress = await self._current()
            if progress is None:
                return
            if not await self._replay(progress):
                return
            try:
                await self._buffer.remove(progress.segment)
            except OSError as err:
                raise ReplayHeld(f"cannot delete replayed buffer segment "
                                 f"{progress.segment.path}: {err}") from err
            self._progress = None

    async def _retry_failed(self) -> None:
        """Tries the records of ``failed/`` again when their time has come (see the module
        docstring): straight through the store, outside the line of buffered records (they
        are out of order already, and in line they held new pushes to their partitions in
        the buffer until they failed again)."""
        if self._retry_failed_s is None:
            return
        if not self._buffer.failed:  # the wait starts when a record fails
            self._failed_wait = self._retry_failed_s
            self._retry_failed_at = self._now() + self._failed_wait
            return
        if self._now() < self._retry_failed_at:
            return
        self._failed_wait = min(self._failed_wait * 2, MAX_FAILED_RETRY_S)
        self._retry_failed_at = self._now() + self._failed_wait
        stored = 0
        try:
            for path, again in (await self._buffer.failed_records()).items():
                if self.stopping or self._paused():
                    break
                stored += await self._store_failed(path, again)
        except OSError as err:
            raise ReplayHeld(f"cannot read or rewrite {self._buffer.directory}/failed: "
                             f"{err}") from err
        if stored:
            log.info("file buffer: {n} records given up on before are stored now", n=stored)

    async def _store_failed(self, path: Any, again: List[Dict[str, Any]]) -> int:
        """Stores what it can of one ``failed/`` file's records, takes those out of it, and
        returns how many. Raises ``Unavailable`` while PostgreSQL cannot be reached (the
        records stay, and dedupe on transactionId makes a resend harmless)."""
        stored: Set[int] = set()
        try:
            for start in range(0, len(again), self._max_batch):
                if self.stopping or self._paused():  # (a stop lets the batch in flight end)
                    break
                batch = again[start:start + self._max_batch]
                failed = {id(record) for record, _ in
                          await self._store_batch(batch, last_attempt=True)}
                stored.update(start + n for n, record in enumerate(batch)
                              if id(record) not in failed)
        finally:  # what is stored leaves failed/ even when a later batch could not be tried
            await self._buffer.drop_failed(path, stored)
        return len(stored)

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
        """Stores the rest of one segment; False when it was told to stop for now."""
        if progress.corrupt:
            await self._give_up(progress, [(line, "corrupt record (checksum mismatch)")
                                           for line in progress.corrupt])
            progress.corrupt = []
        while progress.next < len(progress.records):
            if self.stopping or self._paused():
                return False
            batch = progress.records[progress.next:progress.next + self._max_batch]
            failures = await self._store_batch(
                batch, last_attempt=progress.attempts + 1 >= self._max_attempts)
            if failures:
                progress.attempts += 1
                if progress.attempts < self._max_attempts:
                    raise ReplayHeld(f"{len(failures)} buffered records failed (attempt "
                                     f"{progress.attempts} of {self._max_attempts}): "
                                     f"{failures[0][1]}")
                await self._give_up(progress, failures)
            self._buffer.forget(batch)
            progress.next += len(batch)
            progress.attempts = 0
        return True

    async def _store_batch(self, batch: List[Dict[str, Any]], last_attempt: bool
                           ) -> List[Tuple[Any, str]]:
        """Stores a batch; returns the (record, error) of every record that did not make it.

        Raises ``Unavailable`` when PostgreSQL cannot be reached. When records of a batch fail
        (the whole call raised, or PostgreSQL refused data and so failed every record of that
        partition's call, good ones included), those records are stored one by one to find
        the culprits. Until the ``last_attempt``, a partition's records stop at its first
        failure (it may be passing, like a full queue, and must not be overtaken); on the
        last one every other record goes on, since the failures go to ``failed/``.
        """
        try:
            results = await self._store(batch)
        except Unavailable:
            raise
        except Exception as err:
            if len(batch) == 1:
                return [(batch[0], f"{err.__class__.__name__}: {err}")]
            return await self._store_one_by_one(batch, last_attempt)
        unstored = [item for item, result in zip(batch, results, strict=True)
                    if result.get("status") not in STORED]
        if len(batch) > 1 and unstored:
            return await self._store_one_by_one(unstored, last_attempt)
        return [(item, result.get("error") or f"status {result.get('status')}")
                for item, result in zip(batch, results, strict=True)
                if result.get("status") not in STORED]

    async def _store_one_by_one(self, records: List[Dict[str, Any]], last_attempt: bool
                                ) -> List[Tuple[Any, str]]:
        failures: List[Tuple[Any, str]] = []
        stopped: set = set()  # partitions whose records wait behind a failed one
        for record in records:
            partition = _partition_of(record)
            if partition in stopped:
                failures.append((record, "waits behind an earlier record of its partition "
                                         "that failed"))
                continue
            failed = await self._store_batch([record], last_attempt)
            if failed:
                failures.extend(failed)
                if not last_attempt:
                    stopped.add(partition)
        return failures

    async def _give_up(self, progress: _Progress, failures: List[Tuple[Any, str]]) -> None:
        try:
            await self._buffer.fail(progress.segment, failures)
        except OSError as err:
            raise ReplayHeld(f"cannot write failed buffer records to "
                             f"{self._buffer.directory}: {err}") from err
        for record, error in failures:
            log.error("buffered record moved to failed/ after {m} attempts: {record} ({error})",
                      m=self._max_attempts, record=_describe(record), error=error)


class ReplayService(PeriodicService):
    """Runs :meth:`Replayer.drain` every ``interval_ms``, backing off up to 2 s while it
    cannot finish; stopping lets the batch in flight finish (at most ``stop_timeout``
    seconds) and starts no other."""

    def __init__(self, replayer: Replayer, clock: IReactorTime, interval_ms: int,
                 stop_timeout: float = 5.0):
        interval = interval_ms / 1000.0
        super().__init__("file buffer replay", interval_ms, replayer.drain, clock, now=True,
                         retry=Backoff(interval, maximum=max(interval, MAX_BACKOFF_S)),
                         expected=(Unavailable, ReplayHeld), stop_timeout=stop_timeout)
        self._replayer = replayer

    def startService(self) -> None:
        self._replayer.stopping = False
        super().startService()

    def stopService(self) -> defer.Deferred:
        self._replayer.stopping = True
        return super().stopService()


def _partition_of(record: Any) -> Tuple[Any, Any]:
    if not isinstance(record, dict):
        return (None, None)
    return (record.get("queue"), record.get("partition") or "Default")


def _describe(record: Any) -> str:
    if isinstance(record, bytes):
        return f"<{len(record)} corrupt bytes>"
    return (f"queue={record.get('queue')} partition={record.get('partition', 'Default')} "
            f"transactionId={record.get('transactionId')}")
