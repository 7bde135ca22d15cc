"""The on-disk form of buffered pushes: JSON lines, each guarded by a CRC-32.

One record per line::

    <crc32 of the JSON, 8 hex digits> <compact JSON object>\\n

Compact JSON never contains a raw newline, so a line is a record. A line that is cut short
(no newline) at the end of a segment is *torn*: that is what a crash in the middle of a write
leaves, and it was never acknowledged (the answer waits for fsync), so readers skip it. Any
other line that does not decode is corruption, reported as such (its bytes are kept).
"""

import errno
import json
import os
import re
import stat
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import orjson

RECORD_FIELDS = ("queue", "partition", "payload", "payloadText", "transactionId", "traceId",
                 "producerSub", "id", "bufferSealed")
"""What a buffered push keeps: everything ``push_messages_core`` reads from an item (``id``:
the message id a compressed push's client minted, WIRE2.md 9.2, kept through the buffer),
and whether the buffer sealed its payload (``sealing``). ``payload`` stays absent when the
request had none (it is stored as ``{}`` then). A binary push's payload, passed through as
JSON text (``orjson.Fragment``), is kept as that text in ``payloadText``: read back as a
value, its numbers beyond a double would lose digits (see :func:`item_of`)."""

DEFAULT_PARTITION = "Default"

SEGMENT_NAME = "segment-{:012d}.jsonl"
"""Segment files; the number gives their order within one directory."""
FAILED_DIR = "failed"
"""Where records the replay gave up on are kept, with their error."""
_SEGMENT_RE = re.compile(r"^segment-(\d{12})\.jsonl$")


def segment_files(directory: Path) -> List[Tuple[int, Path]]:
    """(number, path) of every segment file directly in ``directory``, oldest first
    (blocking; raises ``OSError`` when the directory cannot be listed)."""
    found = []
    for path in directory.iterdir():
        match = _SEGMENT_RE.match(path.name)
        if match is not None:
            found.append((int(match.group(1)), path))
    return sorted(found)


def partition_key(item: Dict[str, Any]) -> Tuple[str, str]:
    """(queue, partition) of a push item, with the partition defaulted as PostgreSQL does."""
    return item["queue"], item.get("partition") or DEFAULT_PARTITION


def encode(item: Dict[str, Any]) -> bytes:
    """One record line for a validated push item."""
    record = {key: item[key] for key in RECORD_FIELDS if key in item}
    if isinstance(record.get("payload"), orjson.Fragment):
        record["payloadText"] = orjson.dumps(record.pop("payload")).decode()
    body = json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode()
    return encode_line(body)


def item_of(record: Dict[str, Any]) -> Dict[str, Any]:
    """The push item of a decoded record: ``payloadText`` goes back to the store as the JSON
    text it was (``orjson.Fragment``)."""
    if "payloadText" not in record:
        return record
    item = dict(record)
    item["payload"] = orjson.Fragment(item.pop("payloadText").encode())
    return item


def encode_line(body: bytes) -> bytes:
    """A checksummed line around compact JSON ``body`` (which has no raw newline)."""
    return b"%08x %s\n" % (zlib.crc32(body), body)


def decode(line: bytes) -> Optional[Dict[str, Any]]:
    """The item of a complete line (with its newline), or None when it is torn or corrupt."""
    item = _checked(line)
    return item if isinstance(item, dict) and isinstance(item.get("queue"), str) else None


def failed_record(line: bytes) -> Optional[Dict[str, Any]]:
    """The record of a ``failed/`` line ({error, failedAt, segment, record}), or None when
    it holds none (the raw bytes of a corrupt line, ``rawBase64``) or is damaged."""
    entry = _checked(line)
    record = entry.get("record") if isinstance(entry, dict) else None
    return record if isinstance(record, dict) and isinstance(record.get("queue"), str) else None


def _checked(line: bytes) -> Any:
    """The JSON of a complete line whose checksum matches, else None."""
    if len(line) < 11 or not line.endswith(b"\n") or line[8:9] != b" ":
        return None
    body = line[9:-1]
    try:
        if int(line[:8], 16) != zlib.crc32(body):
            return None
        return json.loads(body)
    except ValueError:
        return None


@dataclass
class SegmentContents:
    """What a reader finds in one segment file."""

    records: List[Dict[str, Any]] = field(default_factory=list)
    corrupt: List[bytes] = field(default_factory=list)
    """Lines that do not decode, except a torn last one: never written that way by the
    buffer (its bytes are kept in ``failed/``)."""
    torn_tail: bool = False
    """The last line was cut short, without its newline (a crash mid-write)."""


def read_segment(path: Path) -> SegmentContents:
    """Every record of a segment file, in file order (blocking; raises ``OSError`` when it
    cannot be read, :class:`NotARegularFile` when it is no file, see :func:`read_file`)."""
    contents = SegmentContents()
    lines = read_file(path).splitlines(keepends=True)
    for number, line in enumerate(lines):
        item = decode(line)
        if item is not None:
            contents.records.append(item)
        elif number == len(lines) - 1 and not line.endswith(b"\n"):
            contents.torn_tail = True
        else:
            contents.corrupt.append(line)
    return contents


class NotARegularFile(OSError):
    """An entry named like a buffer file is something else: a directory, a symbolic link, a
    FIFO or a device. It can never be read as one, so readers set it aside (:func:`set_aside`)
    rather than fail on it again and again."""


def read_file(path: Path) -> bytes:
    """The bytes of a regular file (blocking). Anything else by that name raises
    :class:`NotARegularFile` instead of being followed or waited on (a FIFO's read would block
    the buffer's I/O, and with it every push, until a writer came); other failures raise
    ``OSError`` as usual."""
    if not stat.S_ISREG(os.lstat(path).st_mode):
        raise NotARegularFile(errno.EINVAL, "not a regular file", str(path))
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced since the lstat
            raise NotARegularFile(errno.EINVAL, "not a regular file", str(path))
        return file.read()


UNUSABLE_SUFFIX = ".unusable"


def set_aside(path: Path) -> Path:
    """Renames an entry that cannot be read as a buffer file out of the way (its name
    ``+ .unusable``, numbered if taken), so that readers pass it by; returns the new path.
    Nothing is deleted: an operator decides what it was (blocking; raises ``OSError``)."""
    target = path.with_name(path.name + UNUSABLE_SUFFIX)
    number = 1
    while os.path.lexists(target):
        number += 1
        target = path.with_name(f"{path.name}{UNUSABLE_SUFFIX}-{number}")
    os.rename(path, target)
    fsync_directory(path.parent)
    return target


def set_aside_and_say(path: Path, err: NotARegularFile) -> str:
    """Blocking: :func:`set_aside` if it can be; what to log about the entry either way."""
    why = f"{path} ({err.strerror or err})"
    try:
        return f"{why}: set aside as {set_aside(path).name}"
    except OSError as rename_err:
        return f"{why}: left in place ({rename_err.strerror or rename_err})"


def fsync_directory(directory: Path) -> None:
    """Makes the directory's entries (a created, renamed or removed file) survive a crash."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
