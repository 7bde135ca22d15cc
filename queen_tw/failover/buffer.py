"""FileBuffer: the append-only, fsync'd log of pushes that PostgreSQL could not take.

Layout of ``FILE_BUFFER_DIR``::

    segment-000000000001.jsonl   records in arrival order (see ``records``), oldest file first
    segment-000000000002.jsonl   the one being appended to is the newest
    failed/segment-….jsonl       records the replay gave up on, each with its error
    .queen-buffer.lock           flock'd by the process while its buffer is open
    adopted-<n>-<name>/          segments taken over from a process that no longer runs

Writing: :meth:`FileBuffer.append` queues the records of one request; one I/O job at a time
writes everything queued so far with one ``write`` and one ``fsync`` (group commit across
concurrent requests) on a worker thread, and only then fires the requests' Deferreds. While a
job runs, new requests queue for the next one, so the busier the buffer, the more requests
share an fsync. A write that fails (disk full, read-only, removed directory) is rolled back by
truncating the segment to its previous size; if even that fails the segment is closed for good
and nothing is ever appended after the damage. Either way the waiting requests fail with
``Unavailable`` (503): an answer ``buffered`` always means "on disk".

Segments rotate after ``FILE_BUFFER_EVENTS_PER_FILE`` records (at a write boundary, so a busy
segment may hold a few more). A new process never appends to an old segment: it starts a new
one and treats every existing one as sealed, so a torn record from a crash stays the last
line of its file, where readers expect and skip it.

Reading is for the replay (``replay.py``): :meth:`oldest` gives the oldest sealed segment
(sealing the active one when nothing older is left), :meth:`forget` is told which records are
in PostgreSQL now, :meth:`remove` deletes a segment whose records are all stored,
:meth:`fail` moves records that keep failing to ``failed/``, from where the replay tries them
again (:meth:`failed_records`, :meth:`drop_failed`).

:meth:`holds_any` answers "does this partition still have records waiting?" — while it does,
new pushes to it are buffered behind them, which keeps order within a partition.

Given ``scan_root`` (``FILE_BUFFER_DIR``), the buffer also adopts the segments of processes
that no longer run, at open and on every :meth:`adopt_orphans` (``adoption``): they are
counted, replayed and ordered like its own.
"""

import base64
import bisect
import datetime
import errno
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from queen_tw.errors import Unavailable
from queen_tw.failover import adoption, records
from queen_tw.failover.records import FAILED_DIR, SEGMENT_NAME

log = Logger()

RunBlocking = Callable[..., defer.Deferred]


@dataclass(order=True)
class Segment:
    """A sealed segment file: nothing will be appended to it again.

    Segments replay in (``seq``, ``sub``) order: ``sub`` numbers the segments of an adopted
    directory, which all sort at the ``seq`` it was given.
    """

    seq: int
    path: Path = field(compare=False)
    count: int = field(compare=False, default=0)
    sub: int = 0


@dataclass
class _Active:
    """The segment being appended to. Only I/O jobs touch it, one at a time."""

    seq: int
    path: Path
    fd: int
    count: int = 0
    size: int = 0


@dataclass
class _Request:
    data: bytes
    keys: List[Tuple[str, str]]
    done: defer.Deferred = field(default_factory=defer.Deferred)


class _WriteFailed(Exception):
    """An I/O job failed; ``landed`` are records that reached a segment all the same."""

    def __init__(self, error: OSError, landed: List[Dict[str, Any]], sealed: List[Segment]):
        super().__init__(str(error))
        self.error = error
        self.landed = landed
        self.sealed = sealed


class FileBuffer:
    """Durable, ordered storage for pushes while PostgreSQL cannot take them.

    :param directory: ``FILE_BUFFER_DIR``; created when missing.
    :param events_per_file: ``FILE_BUFFER_EVENTS_PER_FILE``.
    :param run_blocking: runs a blocking callable off the reactor thread and returns a
        Deferred (``threads.deferToThread`` by default).
    :param scan_root: ``FILE_BUFFER_DIR``, where directories of processes that no longer
        run are looked for (see ``adoption``); None adopts nothing.
    """

    def __init__(self, directory: str, events_per_file: int,
                 run_blocking: RunBlocking = threads.deferToThread,
                 scan_root: Optional[str] = None):
        self.directory = Path(directory)
        self._scan_root = None if scan_root is None else Path(scan_root)
        self._lock: Optional[int] = None
        self._orphans: Dict[Path, adoption.Orphan] = {}
        self._orphan_left: Counter = Counter()
        self.adopted_directories = 0
        self.adopted_records = 0
        self._per_file = events_per_file
        self._run_blocking = run_blocking
        self._io = defer.DeferredLock()
        self._queue: List[_Request] = []
        self._writing = False
        self._closing = False
        self._idle: List[defer.Deferred] = []
        self._counts: Counter = Counter()
        self._sealed: List[Segment] = []
        self._active: Optional[_Active] = None
        self._next_seq = 1
        self._opened = False
        self.failed = 0
        self.failed_files: Dict[str, int] = {}
        self.healthy = True
        self.last_error: Optional[str] = None
        self.fsyncs = 0

    # -- what the rest of the server asks -----------------------------------------------

    @property
    def pending(self) -> int:
        """Records accepted (or being written) and not yet in PostgreSQL."""
        return sum(self._counts.values())

    @property
    def has_work(self) -> bool:
        """True while there is anything for the replay to do."""
        return bool(self._counts) or bool(self._sealed)

    @property
    def may_hold_records(self) -> bool:
        """True while records wait for the replay, or may (until :meth:`open` has read what
        an earlier process left)."""
        return not self._opened or self.has_work

    def holds_any(self, keys: Iterable[Tuple[str, str]]) -> bool:
        """True when one of these (queue, partition) still has records waiting, or may have:
        always True until :meth:`open` has read what an earlier process left."""
        if not self._opened:
            return True
        return bool(self._counts) and any(self._counts.get(key) for key in keys)

    def stats(self) -> Dict[str, Any]:
        failed_bytes = sum(self.failed_files.values())
        return {
            "pendingCount": self.pending, "failedCount": self.failed, "healthy": self.healthy,
            "lastError": self.last_error,
            "segments": len(self._sealed) + (self._active is not None),
            "adopted": {"directories": self.adopted_directories,
                        "records": self.adopted_records,
                        "directoriesReplaying": len(self._orphans)},
            "failedFiles": {"count": len(self.failed_files), "totalBytes": failed_bytes,
                            "totalMB": round(failed_bytes / (1024 * 1024), 3),
                            "failoverCount": self.failed, "qos0Count": 0},
        }

    # -- lifecycle ----------------------------------------------------------------------

    def claim(self) -> None:
        """Locks the directory for this process (blocking; before the reactor runs).

        Raises :class:`~queen_tw.failover.adoption.DirectoryInUse` when another live process
        holds it, ``OSError`` when the directory cannot be used (:meth:`open` reports that).
        """
        if self._lock is None:
            self._lock = adoption.claim(self.directory)

    async def open(self) -> None:
        """Takes over what an earlier process left in the directory.

        Every existing segment is sealed and counted; empty ones are deleted. The reading
        runs off the reactor thread; until it is done :meth:`holds_any` answers True for
        every partition (the buffer cannot yet tell which ones have records waiting, so
        every push queues behind whatever it may hold), and appends are written after it.
        A directory that cannot be used is logged and reported as unhealthy: the server
        still runs, pushes that need the buffer then get 503 until it works again.
        """
        await self._io.run(lambda: defer.ensureDeferred(self._take_over()))

    async def _take_over(self) -> None:
        """Runs under the I/O lock: no write starts before the scan's results are in, nor
        before the directories of processes that no longer run are adopted."""
        try:
            found = await self._run_blocking(self._claim_and_scan)
        except (OSError, adoption.DirectoryInUse) as err:
            self._opened = True
            self._unhealthy(err)
            return
        self._next_seq = max(self._next_seq, found.next_seq)
        self._add_sealed(found.sealed)
        self._counts.update(found.counts)
        self.failed_files.update(found.failed_files)
        self.failed += found.failed
        for entry in found.unusable:
            log.error("file buffer {dir}: cannot read {entry}", dir=str(self.directory),
                      entry=entry)
        if found.sealed:
            log.info("file buffer {dir}: {n} records in {files} segments left to replay",
                     dir=str(self.directory), n=sum(found.counts.values()),
                     files=len(found.sealed))
        try:
            await self._adopt()
        finally:
            self._opened = True

    def _claim_and_scan(self) -> "_Found":
        """I/O job: locks the directory unless :meth:`claim` did, then reads it."""
        if self._lock is None:
            self._lock = adoption.claim(self.directory, attempts=1)
        return _scan(self.directory)

    async def adopt_orphans(self) -> None:
        """Adopts the directories whose owner stopped running since the last look."""
        if self._opened and not self._closing and self.healthy:
            await self._io.run(lambda: defer.ensureDeferred(self._adopt()))

    async def _adopt(self) -> None:
        """Runs under the I/O lock (the active segment is sealed in the middle of it)."""
        if self._scan_root is None:
            return
        sealed: Optional[List[Segment]] = None

        def reserve() -> int:
            """I/O job: later appends must go to a segment numbered after the adoption."""
            nonlocal sealed
            if sealed is None:
                sealed = self._seal_active()
            seq = self._next_seq
            self._next_seq += 1
            return seq

        orphans = await self._run_blocking(adoption.take_orphans, self.directory,
                                           self._scan_root, set(self._orphans), reserve)
        self._add_sealed(sealed or [])
        for orphan in orphans:
            self._take(orphan)

    def _take(self, orphan: adoption.Orphan) -> None:
        if orphan.error is not None:
            log.error("file buffer {dir}: could not adopt every segment of {source}, left by a "
                      "process that no longer runs: {error}", dir=str(self.directory),
                      source=str(orphan.source), error=orphan.error)
        for entry in orphan.unusable:
            log.error("file buffer {dir}: cannot read {entry}", dir=str(self.directory),
                      entry=entry)
        if not orphan.segments:
            if orphan.lock is not None:
                defer.ensureDeferred(self._finish(orphan))
            return
        self._add_sealed([Segment(orphan.seq, path, count, sub=n)
                          for n, (path, count) in enumerate(orphan.segments, start=1)])
        self._counts.update(orphan.counts)
        self._orphans[orphan.directory] = orphan
        self._orphan_left[orphan.directory] = len(orphan.segments)
        self.adopted_directories += 1
        self.adopted_records += orphan.records
        log.info("file buffer {dir}: adopted {n} records in {files} segments from {source}, "
                 "left by a process that no longer runs", dir=str(self.directory),
                 n=orphan.records, files=len(orphan.segments), source=str(orphan.source))
        if orphan.source_failed:
            log.warn("file buffer {source}: {n} records its process had given up on stay in "
                     "its failed/", source=str(orphan.source), n=orphan.source_failed)

    async def _finish(self, orphan: adoption.Orphan) -> None:
        """The adopted directory's last segment is stored: removes it, drops its lock."""
        self._orphans.pop(orphan.directory, None)
        self._orphan_left.pop(orphan.directory, None)
        try:
            await self._run_blocking(adoption.finish, orphan)
        except OSError as err:
            log.warn("file buffer: adopted directory {dir} replayed but not removed: {error}",
                     dir=str(orphan.directory), error=_describe(err))
        if orphan.segments:
            log.info("file buffer {dir}: the {n} records adopted from {source} are replayed",
                     dir=str(self.directory), n=orphan.records, source=str(orphan.source))

    async def close(self) -> None:
        """Refuses new records, waits for queued ones to be written, closes the segment."""
        self._closing = True
        if self._writing or self._queue:
            idle: defer.Deferred = defer.Deferred()
            self._idle.append(idle)
            await idle
        await self._io.run(self._run_blocking, self._close_active)
        for orphan in self._orphans.values():  # what is left is adopted again next time
            if orphan.lock is not None:
                adoption.release(orphan.lock)
        self._orphans.clear()
        if self._lock is not None:
            adoption.release(self._lock)
            self._lock = None

    # -- writing ------------------------------------------------------------------------

    def append(self, items: List[Dict[str, Any]]) -> defer.Deferred:
        """Fires (None) once every item is written and fsync'd; fails with ``Unavailable``.

        The items count as waiting (:meth:`holds_any`) from this call on, so a later push
        to the same partition is buffered behind them even before they are on disk.
        """
        if self._closing:
            return defer.fail(Unavailable("File buffer is closed (server stopping)"))
        request = _Request(b"".join(records.encode(item) for item in items),
                           [records.partition_key(item) for item in items])
        self._counts.update(request.keys)
        self._queue.append(request)
        if not self._writing:
            self._write_queued()
        return request.done

    def _write_queued(self) -> None:
        batch, self._queue = self._queue, []
        self._writing = True
        d = self._io.run(self._run_blocking, self._write,
                         b"".join(r.data for r in batch), sum(len(r.keys) for r in batch))
        d.addBoth(self._written, batch)

    def _written(self, outcome: Any, batch: List[_Request]) -> None:
        self._writing = False
        if isinstance(outcome, Failure):
            error: BaseException = outcome.value  # type: ignore[assignment]  # always set
            if isinstance(error, _WriteFailed):
                self._add_sealed(error.sealed)
                self._counts.update(records.partition_key(r) for r in error.landed)
                error = error.error
            for request in batch:
                self._counts.subtract(request.keys)
            self._counts = +self._counts  # drop zero counts
            self._unhealthy(error)
            refusal = Unavailable(f"File buffer unavailable: {_describe(error)}")
            for request in batch:
                request.done.errback(refusal)
        else:
            self._add_sealed(outcome)
            self.healthy, self.last_error = True, None
            for request in batch:
                request.done.callback(None)
        if self._queue:
            self._write_queued()
        else:
            idle, self._idle = self._idle, []
            for waiter in idle:
                waiter.callback(None)

    def _write(self, data: bytes, count: int) -> List[Segment]:
        """I/O job: append ``data`` to the active segment and fsync it."""
        sealed: List[Segment] = []
        if self._active is not None and self._active.count >= self._per_file:
            sealed.extend(self._seal_active())
        try:
            if self._active is None:
                self._active = self._create_segment()
        except OSError as err:
            raise _WriteFailed(err, [], sealed) from err
        active = self._active
        try:
            _write_all(active.fd, data)
            os.fsync(active.fd)
            self.fsyncs += 1
        except OSError as err:
            landed = self._roll_back(active, sealed)
            raise _WriteFailed(err, landed, sealed) from err
        active.count += count
        active.size += len(data)
        return sealed

    def _create_segment(self) -> _Active:
        self.directory.mkdir(parents=True, exist_ok=True)
        if self._lock is None:  # the directory was unusable at open: never write unlocked
            try:
                self._lock = adoption.claim(self.directory, attempts=1)
            except adoption.DirectoryInUse as err:
                raise OSError(errno.EBUSY, str(err)) from err
        while True:  # a number some entry already has (not ours, or never scanned) is passed
            seq = self._next_seq
            self._next_seq += 1
            path = self.directory / SEGMENT_NAME.format(seq)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND
                             | os.O_CLOEXEC, 0o644)
                break
            except FileExistsError:
                continue
        try:
            records.fsync_directory(self.directory)  # the new name must survive a crash too
        except OSError:
            os.close(fd)
            _unlink_quietly(path)
            raise
        return _Active(seq, path, fd)

    def _roll_back(self, active: _Active, sealed: List[Segment]) -> List[Dict[str, Any]]:
        """After a failed write: truncate to the last good size, or give the segment up.

        Returns the records of the failed write that are in the file all the same (only
        when the segment had to be given up; they will be replayed although unacknowledged,
        which dedupe on transactionId makes harmless).
        """
        try:
            os.ftruncate(active.fd, active.size)
            os.fsync(active.fd)
            return []
        except OSError:
            pass
        try:
            os.close(active.fd)
        except OSError:
            pass
        self._active = None
        try:
            found = records.read_segment(active.path).records
        except OSError:
            found = []
        sealed.append(Segment(active.seq, active.path, max(len(found), active.count)))
        return found[active.count:]

    def _seal_active(self) -> List[Segment]:
        """I/O job: close the active segment (its records are fsync'd already)."""
        active, self._active = self._active, None
        if active is None:
            return []
        try:
            os.close(active.fd)
        except OSError:
            pass
        if active.count == 0:
            _unlink_quietly(active.path)
            return []
        return [Segment(active.seq, active.path, active.count)]

    def _close_active(self) -> None:
        self._seal_active()

    def _add_sealed(self, segments: List[Segment]) -> None:
        for segment in segments:
            bisect.insort(self._sealed, segment)

    def _unhealthy(self, error: BaseException) -> None:
        self.healthy, self.last_error = False, _describe(error)
        log.error("file buffer {dir} unusable: {error}", dir=str(self.directory),
                  error=self.last_error)

    # -- reading (the replay) -----------------------------------------------------------

    async def oldest(self) -> Optional[Segment]:
        """The oldest sealed segment; seals the active one when nothing older is left."""
        if not self._sealed:
            self._add_sealed(await self._io.run(self._run_blocking, self._seal_active))
        return self._sealed[0] if self._sealed else None

    def read(self, segment: Segment) -> defer.Deferred:
        """Fires with the segment's :class:`~queen_tw.failover.records.SegmentContents`."""
        return self._run_blocking(records.read_segment, segment.path)

    def forget(self, items: Iterable[Dict[str, Any]]) -> None:
        """These records are in PostgreSQL now (or in ``failed/``): stop counting them."""
        self._counts.subtract(records.partition_key(item) for item in items)
        self._counts = +self._counts

    async def remove(self, segment: Segment) -> None:
        """Deletes a segment whose every record is stored (or moved to ``failed/``)."""
        await self._run_blocking(_unlink_quietly, segment.path)
        if segment in self._sealed:
            self._sealed.remove(segment)
        orphan = self._orphans.get(segment.path.parent)
        if orphan is not None:
            self._orphan_left[orphan.directory] -= 1
            if self._orphan_left[orphan.directory] <= 0:
                await self._finish(orphan)

    async def fail(self, segment: Segment, failures: List[Tuple[Any, str]]) -> None:
        """Appends ``(record, error)`` pairs to ``failed/<segment name>`` and fsyncs.

        A record is an item, or the raw bytes of a corrupt line. Raises ``OSError`` when
        that cannot be written: the caller keeps the segment and tries again later.
        """
        now = datetime.datetime.now(datetime.UTC).isoformat()
        lines = []
        for record, error in failures:
            entry: Dict[str, Any] = {"error": error, "failedAt": now, "segment": segment.path.name}
            if isinstance(record, bytes):
                entry["rawBase64"] = base64.b64encode(record).decode()
            else:
                entry["record"] = record
            body = json.dumps(entry, separators=(",", ":"), ensure_ascii=False)
            lines.append(records.encode_line(body.encode()))
        name = segment.path.name
        if segment.path.parent != self.directory:  # adopted: names repeat across directories
            name = f"{segment.path.parent.name}-{name}"
        target = self.directory / FAILED_DIR / name
        size = await self._run_blocking(_append_durably, target, b"".join(lines))
        self.failed += len(failures)
        self.failed_files[target.name] = size

    def failed_records(self) -> defer.Deferred:
        """Fires with the records of every ``failed/`` file, by file (a corrupt line's bytes
        are no record), for the replay to try again (:meth:`drop_failed` once stored)."""
        return self._run_blocking(_failed_records, self.directory / FAILED_DIR)

    async def drop_failed(self, path: Path, stored: Set[int]) -> None:
        """Takes the records at positions ``stored`` (among the records of ``path``, as
        :meth:`failed_records` gave them) out of that ``failed/`` file."""
        if not stored:
            return
        size = await self._run_blocking(_drop_records, path, stored)
        self.failed -= len(stored)
        if size:
            self.failed_files[path.name] = size
        else:
            self.failed_files.pop(path.name, None)


def _failed_records(directory: Path) -> Dict[Path, List[Dict[str, Any]]]:
    """Blocking: the records of every ``failed/`` file (in name order), by file."""
    return {path: [r for r in map(records.failed_record, data.splitlines(keepends=True))
                   if r is not None]
            for path, data in _failed_files(directory)}


def _drop_records(path: Path, stored: Set[int]) -> int:
    """Blocking: rewrites a ``failed/`` file without the records at positions ``stored``
    (counting record lines only), or removes it when nothing is left; its new size."""
    kept, position = [], 0
    for line in path.read_bytes().splitlines(keepends=True):
        if records.failed_record(line) is not None:
            position += 1
            if position - 1 in stored:
                continue
        kept.append(line)
    data = b"".join(kept)
    if not data:
        _unlink_quietly(path)
    else:
        fresh = path.with_name(path.name + ".tmp")
        fresh.write_bytes(data)
        with open(fresh, "rb") as written:
            os.fsync(written.fileno())
        fresh.replace(path)
    records.fsync_directory(path.parent)
    return len(data)


@dataclass
class _Found:
    """What :func:`_scan` found in the directory an earlier process left."""

    sealed: List[Segment] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    next_seq: int = 1
    failed_files: Dict[str, int] = field(default_factory=dict)
    failed: int = 0
    unusable: List[str] = field(default_factory=list)
    """Entries that could not be read as files, for the log."""


def _scan(directory: Path) -> _Found:
    """Blocking: reads every segment (deleting empty ones) and sizes up ``failed/``. An entry
    named like a segment that is no file is set aside (:func:`records.set_aside`) and noted
    in ``unusable``; it holds up neither the segments around it nor the numbering. Any other
    read failure fails the scan, as before: a segment is never set aside for a failure that
    may pass (its records would wait for an operator)."""
    found = _Found()
    directory.mkdir(parents=True, exist_ok=True)
    for path in directory.iterdir():  # adopted directories hold numbers too
        seq = adoption.adopted_seq(path.name)
        if seq is not None:
            found.next_seq = max(found.next_seq, seq + 1)
    for seq, path in records.segment_files(directory):
        found.next_seq = max(found.next_seq, seq + 1)
        try:
            contents = records.read_segment(path)
        except records.NotARegularFile as err:
            found.unusable.append(records.set_aside_and_say(path, err))
            continue
        if not contents.records and not contents.corrupt:
            path.unlink()
            continue
        found.sealed.append(Segment(seq, path, len(contents.records)))
        found.counts.update(records.partition_key(r) for r in contents.records)
    for path, data in _failed_files(directory / FAILED_DIR, found.unusable):
        found.failed_files[path.name] = len(data)
        found.failed += data.count(b"\n")
    return found


def _failed_files(directory: Path, unusable: Optional[List[str]] = None
                  ) -> List[Tuple[Path, bytes]]:
    """Blocking: (path, bytes) of every ``failed/`` file, in name order. An entry that is no
    regular file is passed by (and noted in ``unusable`` when given)."""
    if not directory.is_dir():
        return []
    files = []
    for path in sorted(directory.iterdir()):
        try:
            files.append((path, records.read_file(path)))
        except records.NotARegularFile as err:
            if unusable is not None:
                unusable.append(f"{path} ({err.strerror or err}): passed by")
    return files


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _append_durably(path: Path, data: bytes) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    try:
        _write_all(fd, data)
        os.fsync(fd)
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    records.fsync_directory(path.parent)
    return size


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _describe(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        where = f" ({error.filename})" if error.filename else ""
        return f"{error.strerror}{where}"
    return str(error) or error.__class__.__name__
