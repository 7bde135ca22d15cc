"""Buffer directories are never orphaned: each has a lock, and a dead owner's is adopted.

Every process holds an exclusive ``flock`` on ``<its buffer directory>/.queen-buffer.lock``
for as long as its buffer is open (:func:`claim`; a second live process given the same
directory is refused). The kernel drops the lock when the process ends, however it ends, so a
lock that can be taken is proof that nobody works in that directory any more.

Which directories are looked at (:func:`candidates`), with ``root`` = ``FILE_BUFFER_DIR``
and ``own`` = the process's directory (``root`` itself, or ``root/<WORKER_ID>`` with
``NUM_WORKERS`` > 1):

- the sub-directories of ``own`` (``failed/`` aside): worker directories of an earlier
  ``NUM_WORKERS`` run when ``own`` is ``root``, and adoptions an earlier life of this process
  did not finish;
- with ``NUM_WORKERS`` > 1, ``root`` itself (segments an earlier single-process run left at
  its top level) and the other sub-directories of ``root`` (workers that no longer run, e.g.
  ``NUM_WORKERS`` lowered from 4 to 2);
- the sibling directories of ``root`` that carry a lock file: other instances' directories
  on a shared volume (``/vol/a`` next to ``/vol/b``). Siblings without a lock file are not
  queen-tw's and are never touched.

Only the segment files directly in a candidate count; a candidate with none is skipped
without creating anything in it. Adopting one (:func:`take_orphans`), with its lock held:
its segments — first those of the ``adopted-*`` directories it holds (a process that died in
the middle of an adoption), then its own, oldest first — are renamed into a new directory
``own/adopted-<n>-<name>`` (locked by the adopter), then the lock of the source is released.
The source directory stays, with its lock file and its ``failed/`` records (the operator's to
read); it is only empty of segments. ``<n>`` is a segment number of the adopter: its adopted
records replay after its own older segments and before anything pushed after the adoption,
which is what keeps new pushes to a partition behind adopted records of that partition, and
an adopter that restarts finds the same order again. The adopted directory is removed once
its last segment is stored.

A rename moves a file atomically, so a segment is always in exactly one directory and only
the process holding that directory's lock reads it: two live processes never replay the same
file. A process that dies in the middle of an adoption leaves every segment in a directory
whose lock died with it: the next process adopts it (a rename fails across filesystems:
sibling directories on different mounts are reported, not adopted).
"""

import fcntl
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Collection, List, Optional, Tuple

from queen_tw.failover import records

LOCK_NAME = ".queen-buffer.lock"
ADOPTED_PREFIX = "adopted-"
_ADOPTED_RE = re.compile(r"^adopted-(\d{12})-")

CLAIM_ATTEMPTS = 20
CLAIM_PAUSE_S = 0.1
"""An adopter holds a dead owner's lock for the few renames of an adoption; an owner that
restarts meanwhile (a worker restarted by its parent) waits that long before giving up."""


class DirectoryInUse(Exception):
    """Another live process holds the lock of this buffer directory."""


def adopted_seq(name: str) -> Optional[int]:
    """The adopter's segment number of an ``adopted-<n>-<name>`` directory, else None."""
    match = _ADOPTED_RE.match(name)
    return int(match.group(1)) if match else None


def try_lock(directory: Path) -> Optional[int]:
    """The descriptor holding ``directory``'s lock, or None when a live process holds it.

    Creates the lock file when missing; raises ``OSError`` when it cannot.
    """
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:
        os.close(fd)
        raise
    return fd


def claim(directory: Path, attempts: int = CLAIM_ATTEMPTS,
          pause: float = CLAIM_PAUSE_S) -> int:
    """Locks a process's own buffer directory (created when missing); blocking.

    Raises :class:`DirectoryInUse` when another process keeps the lock for ``attempts``
    tries ``pause`` seconds apart, ``OSError`` when the directory cannot be used.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for attempt in range(attempts):
        fd = try_lock(directory)
        if fd is not None:
            return fd
        if attempt + 1 < attempts:
            time.sleep(pause)
    raise DirectoryInUse(
        f"FILE_BUFFER_DIR {directory} is in use by another running queen-tw process (it "
        f"holds {directory / LOCK_NAME}): give every instance its own FILE_BUFFER_DIR")


def release(fd: int) -> None:
    """Gives a lock up (closing its descriptor)."""
    try:
        os.close(fd)
    except OSError:
        pass


def candidates(own: Path, root: Path) -> List[Path]:
    """Directories that may hold segments of a process that no longer runs (see above)."""
    found = _subdirectories(own)
    if root != own:
        found += [root] + [d for d in _subdirectories(root) if d != own]
    if root.parent != root:
        found += [d for d in _subdirectories(root.parent)
                  if d != root and (d / LOCK_NAME).exists()]
    unique: List[Path] = []
    for directory in found:
        if directory != own and directory not in unique:
            unique.append(directory)
    return unique


@dataclass
class Orphan:
    """An adopted directory in the adopter's own directory, locked by the adopter."""

    directory: Path
    seq: int
    """The adopter's segment number the adopted segments sort at."""
    lock: Optional[int]
    """None when the adoption failed before its directory was locked."""
    source: Path
    segments: List[Tuple[Path, int]] = field(default_factory=list)
    """(path, number of records) in replay order."""
    counts: Counter = field(default_factory=Counter)
    """Records per (queue, partition)."""
    source_failed: int = 0
    """Records the dead owner had given up on, left in the source's ``failed/``."""
    error: Optional[str] = None
    """Why not every segment could be moved (they stay in the source)."""
    unusable: List[str] = field(default_factory=list)
    """Entries named like segments that could not be read as files (set aside)."""

    @property
    def records(self) -> int:
        return sum(count for _, count in self.segments)


def take_orphans(own: Path, root: Path, held: Collection[Path],
                 reserve: Callable[[], int]) -> List[Orphan]:
    """Adopts every candidate whose owner is gone (blocking; see the module docstring).

    :param held: adopted directories this process holds already.
    :param reserve: hands out the adopter's next segment number (the caller seals the
        segment it appends to first, so later pushes sort after the adopted records).
    """
    orphans = []
    for directory in candidates(own, root):
        if directory in held:
            continue
        seq = adopted_seq(directory.name) if directory.parent == own else None
        try:
            if not _orphaned_segments(directory):
                if seq is not None:  # its last segment was stored just before a crash
                    _remove_unlocked(directory)
                continue
            lock = try_lock(directory)
        except OSError:
            continue  # not ours to read (another user's, removed meanwhile)
        if lock is None:
            continue  # its owner is alive
        if seq is not None:  # an adoption an earlier life of this process did not finish
            orphans.append(_read(Orphan(directory, seq, lock, directory)))
            continue
        orphans.append(_adopt(directory, lock, own, reserve()))
    return orphans


def _adopt(source: Path, source_lock: int, own: Path, seq: int) -> Orphan:
    target = own / f"{ADOPTED_PREFIX}{seq:012d}-{source.name}"
    orphan = Orphan(target, seq, None, source)
    try:
        target.mkdir()
        orphan.lock = try_lock(target)  # a new, empty directory: nobody else locks it
        for number, path in enumerate(_orphaned_segments(source), start=1):
            os.rename(path, target / records.SEGMENT_NAME.format(number))
        records.fsync_directory(target)
        for directory in [source] + _adopted_in(source):
            records.fsync_directory(directory)
        for directory in _adopted_in(source):
            _remove_adopted(directory)
        orphan.source_failed = _count_failed(source)
    except OSError as err:
        orphan.error = f"{err.strerror or err} ({err.filename or source})"
    finally:
        release(source_lock)
    if target.is_dir():
        _read(orphan)
    return orphan


def _read(orphan: Orphan) -> Orphan:
    """Counts the records of the adopted directory's segments; deletes empty ones."""
    try:
        for _, path in records.segment_files(orphan.directory):
            try:
                contents = records.read_segment(path)
            except records.NotARegularFile as err:  # out of the way, the others go on
                orphan.unusable.append(records.set_aside_and_say(path, err))
                continue
            if not contents.records and not contents.corrupt:
                path.unlink()
                continue
            orphan.segments.append((path, len(contents.records)))
            orphan.counts.update(records.partition_key(r) for r in contents.records)
    except OSError as err:  # the rest waits in the directory for the next adopter
        orphan.error = f"{err.strerror or err} ({err.filename or orphan.directory})"
    return orphan


def finish(orphan: Orphan) -> None:
    """Removes an adopted directory whose every segment is stored, then drops its lock."""
    try:
        _remove_adopted(orphan.directory)
    finally:
        if orphan.lock is not None:
            release(orphan.lock)


def _orphaned_segments(directory: Path) -> List[Path]:
    """The segment files an adopter of ``directory`` takes, in replay order."""
    paths = []
    for adopted in _adopted_in(directory) + [directory]:
        paths += [path for _, path in records.segment_files(adopted)]
    return paths


def _adopted_in(directory: Path) -> List[Path]:
    return sorted((d for d in _subdirectories(directory) if adopted_seq(d.name) is not None),
                  key=lambda d: d.name)


def _subdirectories(directory: Path) -> List[Path]:
    try:
        return sorted(d for d in directory.iterdir()
                      if d.is_dir() and not d.is_symlink() and d.name != records.FAILED_DIR)
    except OSError:
        return []


def _remove_unlocked(directory: Path) -> None:
    """Removes an empty adopted directory unless a live process holds it."""
    lock = try_lock(directory)
    if lock is not None:
        finish(Orphan(directory, 0, lock, directory))


def _remove_adopted(directory: Path) -> None:
    """Removes an adopted directory that holds nothing but its lock file."""
    if any(path.name != LOCK_NAME for path in directory.iterdir()):
        return
    (directory / LOCK_NAME).unlink(missing_ok=True)
    directory.rmdir()


def _count_failed(directory: Path) -> int:
    failed = directory / records.FAILED_DIR
    if not failed.is_dir():
        return 0
    count = 0
    for path in failed.iterdir():
        try:
            count += records.read_file(path).count(b"\n")
        except records.NotARegularFile:  # the replay passes it by too
            continue
    return count
