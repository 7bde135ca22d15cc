"""FileBuffer and Replayer on a real directory, driven step by step.

Blocking I/O normally runs on a worker thread; here a :class:`ManualThreads` stands in for the
thread pool so a test decides when each I/O job runs and can watch requests wait for their
fsync and share one. The replay's ``store`` is a recording stand-in for ``QueueEngine.store``
(the real path through PostgreSQL is covered by test_failover_http.py and test_faults.py).
"""

from __future__ import annotations

import base64
import json
import os
import zlib
from pathlib import Path

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from queen_tw.db.pool import Database
from queen_tw.errors import Unavailable
from queen_tw.failover import records
from queen_tw.failover.buffer import FAILED_DIR, FileBuffer, Segment
from queen_tw.failover.policy import FileFailover
from queen_tw.failover.replay import Replayer, ReplayHeld
from queen_tw.maintenance import Maintenance

from buffer_helpers import (
    ManualThreads,
    RecordingStore,
    at_once,
    fired,
    item,
    opened,
    replay,
    segment_files,
)

# -- writing ----------------------------------------------------------------------------

def test_an_append_is_answered_only_after_its_fsync(tmp_path: Path) -> None:
    threads = ManualThreads()
    buffer = FileBuffer(str(tmp_path), 100, run_blocking=threads)
    opening = fired(defer.ensureDeferred(buffer.open()))
    threads.run_next()
    assert opening == [None]

    answer = fired(buffer.append([item("a", 0)]))

    assert answer == [] and buffer.pending == 1
    threads.run_next()
    assert answer == [None] and buffer.fsyncs == 1
    [segment] = segment_files(tmp_path)
    assert records.decode(segment.read_bytes()) == item("a", 0)


def test_concurrent_appends_share_one_fsync_in_arrival_order(tmp_path: Path) -> None:
    threads = ManualThreads()
    buffer = FileBuffer(str(tmp_path), 100, run_blocking=threads)
    opening = fired(defer.ensureDeferred(buffer.open()))
    threads.run_next()
    assert opening == [None]

    first = fired(buffer.append([item("a", 0)]))
    later = [fired(buffer.append([item("a", n), item("b", n)])) for n in range(1, 6)]
    threads.run_all()

    assert first == [None] and all(answer == [None] for answer in later)
    assert buffer.fsyncs == 2  # the first request alone, then the five that waited together
    [segment] = segment_files(tmp_path)
    contents = records.read_segment(segment)
    assert [r["transactionId"] for r in contents.records] == ["a-0"] + [
        tid for n in range(1, 6) for tid in (f"a-{n}", f"b-{n}")]


def test_segments_rotate_after_events_per_file(tmp_path: Path) -> None:
    buffer = opened(FileBuffer(str(tmp_path), 3, run_blocking=at_once))

    for n in range(7):
        buffer.append([item("a", n)])

    files = segment_files(tmp_path)
    assert [len(records.read_segment(f).records) for f in files] == [3, 3, 1]


def test_a_refused_write_answers_unavailable_and_counts_nothing(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a regular file where the buffer's parent should be")
    buffer = opened(FileBuffer(str(blocker / "buffer"), 100, run_blocking=at_once))
    assert buffer.healthy is False

    answer = fired(buffer.append([item("a", 0)]))

    assert isinstance(answer[0].value, Unavailable)
    assert "File buffer unavailable" in answer[0].value.message
    assert buffer.pending == 0 and not buffer.holds_any([("q", "a")])
    blocker.unlink()
    blocker.mkdir()
    assert fired(buffer.append([item("a", 1)])) == [None] and buffer.healthy is True


def test_nothing_is_appended_to_a_segment_after_a_write_it_could_not_undo(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import queen_tw.failover.buffer as module
    buffer = opened(FileBuffer(str(tmp_path), 100, run_blocking=at_once))
    buffer.append([item("a", 0)])

    def torn_write(fd: int, data: bytes) -> None:  # half a record reaches the disk, then ENOSPC
        module.os.write(fd, data[:len(data) // 2])
        raise OSError(28, "No space left on device")

    def failing_truncate(fd: int, size: int) -> None:
        raise OSError(5, "Input/output error")

    with monkeypatch.context() as patched:
        patched.setattr(module, "_write_all", torn_write)
        patched.setattr(module.os, "ftruncate", failing_truncate)
        refused = fired(buffer.append([item("a", 1)]))
    accepted = fired(buffer.append([item("a", 2)]))

    assert isinstance(refused[0].value, Unavailable) and accepted == [None]
    damaged, fresh = segment_files(tmp_path)  # the damaged segment was closed for good
    contents = records.read_segment(damaged)
    assert [r["transactionId"] for r in contents.records] == ["a-0"] and contents.torn_tail
    assert [r["transactionId"] for r in records.read_segment(fresh).records] == ["a-2"]
    assert buffer.pending == 2


# -- reading back -------------------------------------------------------------------------

def test_a_new_process_takes_over_the_records_and_skips_a_torn_tail(tmp_path: Path) -> None:
    segment = tmp_path / "segment-000000000007.jsonl"
    whole = [records.encode(item("a", n)) for n in range(3)]
    segment.write_bytes(b"".join(whole) + records.encode(item("a", 3))[:-5])
    (tmp_path / "segment-000000000008.jsonl").write_bytes(b"")  # created, never written

    buffer = opened(FileBuffer(str(tmp_path), 100, run_blocking=at_once))

    assert buffer.pending == 3 and buffer.holds_any([("q", "a")])
    assert not (tmp_path / "segment-000000000008.jsonl").exists()
    buffer.append([item("a", 4)])
    assert [f.name for f in segment_files(tmp_path)] == [
        "segment-000000000007.jsonl", "segment-000000000009.jsonl"]

    store = RecordingStore()
    replayer = Replayer(buffer, store, max_batch=2)

    assert replay(replayer) == [None]
    assert [s["transactionId"] for s in store.stored] == ["a-0", "a-1", "a-2", "a-4"]
    assert buffer.pending == 0 and segment_files(tmp_path) == [] and buffer.failed == 0


def plant_unreadable(path: Path, kind: str) -> None:
    if kind == "directory":
        path.mkdir(parents=True)
    elif kind == "dangling symlink":
        path.symlink_to(path.parent / "nowhere")
    else:  # a FIFO: reading it would wait for a writer, and every push with it
        os.mkfifo(path)


@pytest.mark.parametrize("kind", ["directory", "dangling symlink", "fifo"])
def test_an_entry_named_like_a_segment_that_is_no_file_is_set_aside(tmp_path: Path,
                                                                     kind: str) -> None:
    for number, first in ((1, 0), (2, 5)):
        (tmp_path / f"segment-00000000000{number}.jsonl").write_bytes(
            b"".join(records.encode(item("a", n)) for n in range(first, first + 5)))
    bad = tmp_path / "segment-000000000003.jsonl"
    plant_unreadable(bad, kind)

    buffer = opened(FileBuffer(str(tmp_path), 100, run_blocking=at_once))

    assert buffer.healthy and buffer.pending == 10 and buffer.holds_any([("q", "a")])
    assert not os.path.lexists(bad) and os.path.lexists(f"{bad}.unusable")
    buffer.append([item("a", 10)])  # numbered after the entry set aside
    assert [f.name for f in segment_files(tmp_path)][-1] == "segment-000000000004.jsonl"
    store = RecordingStore()
    assert replay(Replayer(buffer, store, max_batch=4)) == [None]
    assert [s["transactionId"] for s in store.stored] == [f"a-{n}" for n in range(11)]


def test_an_entry_of_failed_that_is_no_file_is_passed_by(tmp_path: Path) -> None:
    (tmp_path / FAILED_DIR / "stuck").mkdir(parents=True)
    failed_line = records.encode_line(json.dumps({"record": item("a", 0)}).encode())
    (tmp_path / FAILED_DIR / "given-up").write_bytes(failed_line)
    (tmp_path / "segment-000000000001.jsonl").write_bytes(records.encode(item("a", 1)))

    buffer = opened(FileBuffer(str(tmp_path), 100, run_blocking=at_once))

    assert buffer.healthy and buffer.pending == 1 and buffer.failed == 1
    [(path, again)] = fired(buffer.failed_records())[0].items()
    assert path.name == "given-up" and [r["transactionId"] for r in again] == ["a-0"]


def test_a_number_taken_since_the_scan_is_passed_by_not_a_failed_write(tmp_path: Path) -> None:
    buffer = opened(FileBuffer(str(tmp_path), 100, run_blocking=at_once))
    (tmp_path / "segment-000000000001.jsonl").mkdir()  # not ours: never written over

    buffer.append([item("a", 0)])

    assert buffer.healthy and buffer.pending == 1
    assert (tmp_path / "segment-000000000002.jsonl").read_bytes() == records.encode(item("a", 0))


def test_a_complete_last_line_that_does_not_decode_is_kept_in_failed(tmp_path: Path) -> None:
    damaged = bytearray(records.encode(item("a", 2)))
    damaged[-4] ^= 1  # one bit of the JSON, its newline kept: corruption, not a torn write
    (tmp_path / "segment-000000000001.jsonl").write_bytes(
        records.encode(item("a", 0)) + records.encode(item("a", 1)) + bytes(damaged))
    foreign = json.dumps(item("b", 0)).encode() + b"\n"  # a whole line without a checksum
    (tmp_path / "segment-000000000002.jsonl").write_bytes(foreign)

    buffer = opened(FileBuffer(str(tmp_path), 100, run_blocking=at_once))
    assert (tmp_path / "segment-000000000002.jsonl").exists()  # not taken for empty
    store = RecordingStore()
    assert replay(Replayer(buffer, store, max_batch=10)) == [None]

    assert [s["transactionId"] for s in store.stored] == ["a-0", "a-1"]
    kept = [json.loads(line[9:]) for path in sorted((tmp_path / FAILED_DIR).iterdir())
            for line in path.read_bytes().splitlines()]
    assert sorted(base64.b64decode(entry["rawBase64"]) for entry in kept) == sorted(
        [bytes(damaged), foreign])


def test_a_push_during_open_is_diverted_and_lands_after_the_records_left_before(
        tmp_path: Path) -> None:
    (tmp_path / "segment-000000000003.jsonl").write_bytes(
        b"".join(records.encode(item("a", n)) for n in range(3)))  # left by an earlier run
    threads = ManualThreads()
    buffer = FileBuffer(str(tmp_path), 100, run_blocking=threads)
    failover = FileFailover(buffer, Maintenance(Database("", 1, Clock()), buffer, Clock()))

    opening = fired(defer.ensureDeferred(buffer.open()))
    assert len(threads.jobs) == 1  # reading the directory waits for a worker thread
    assert opening == [] and buffer.pending == 0
    assert failover.must_buffer([item("a", 3)]) and failover.must_buffer([item("z", 0)])
    answer = fired(defer.ensureDeferred(failover.buffer([item("a", 3)])))
    assert len(threads.jobs) == 1  # the write waits for the scan

    threads.run_all()

    assert opening == [None] and answer[0][0]["status"] == "buffered"
    assert failover.must_buffer([item("a", 4)]) and not failover.must_buffer([item("z", 0)])
    store = RecordingStore()
    drained = replay(Replayer(buffer, store, max_batch=10))
    threads.run_all()
    assert drained == [None]
    assert [s["transactionId"] for s in store.stored] == ["a-0", "a-1", "a-2", "a-3"]


def test_replay_waits_for_the_database_and_loses_nothing(tmp_path: Path) -> None:
    buffer = opened(FileBuffer(str(tmp_path), 2, run_blocking=at_once))
    for n in range(5):
        buffer.append([item("a", n)])
    store = RecordingStore()
    replayer = Replayer(buffer, store, max_batch=10)
    store.unavailable = True

    outcomes = [replay(replayer) for _ in range(10)]

    assert all(isinstance(outcome[0].value, Unavailable) for outcome in outcomes)
    assert store.stored == [] and buffer.pending == 5 and len(segment_files(tmp_path)) == 3
    store.unavailable = False
    assert replay(replayer) == [None]
    assert [s["transactionId"] for s in store.stored] == [f"a-{n}" for n in range(5)]
    assert buffer.pending == 0 and segment_files(tmp_path) == []


def test_a_partition_stays_diverted_until_its_last_record_is_stored(tmp_path: Path) -> None:
    buffer = opened(FileBuffer(str(tmp_path), 100, run_blocking=at_once))
    buffer.append([item("a", 0), item("b", 0)])
    store = RecordingStore()
    replayer = Replayer(buffer, store, max_batch=1, paused=lambda: len(store.stored) >= 1)

    assert replay(replayer) == [None]  # stores one record, then "maintenance" pauses it

    assert [s["transactionId"] for s in store.stored] == ["a-0"]
    assert not buffer.holds_any([("q", "a")]) and buffer.holds_any([("q", "b")])


def test_a_record_that_keeps_failing_moves_to_failed_with_its_error(tmp_path: Path) -> None:
    buffer = opened(FileBuffer(str(tmp_path), 100, run_blocking=at_once))
    buffer.append([item("a", 0), item("a", 1), item("a", 2)])
    store = RecordingStore()
    store.refuse.add("a-1")
    replayer = Replayer(buffer, store, max_batch=10, max_attempts=3)

    held = [replay(replayer)[0] for _ in range(2)]
    assert [failure.check(ReplayHeld) for failure in held] == [ReplayHeld, ReplayHeld]
    assert "attempt 2 of 3" in str(held[1].value) and buffer.failed == 0
    assert replay(replayer) == [None]  # the third attempt gives the record up

    assert [s["transactionId"] for s in store.stored] == ["a-0", "a-2"]
    assert buffer.pending == 0 and buffer.failed == 1 and segment_files(tmp_path) == []
    [failed] = list((tmp_path / FAILED_DIR).iterdir())
    line = failed.read_bytes()
    assert int(line[:8], 16) == zlib.crc32(line[9:-1])
    entry = json.loads(line[9:-1])
    assert entry["record"]["transactionId"] == "a-1"
    assert "max capacity" in entry["error"]
    assert buffer.stats()["failedFiles"]["count"] == 1

    assert fired(defer.ensureDeferred(buffer.close())) == [None]
    reopened = opened(FileBuffer(str(tmp_path), 100, run_blocking=at_once))
    assert reopened.failed == 1  # still counted and reported after a restart


def test_records_given_up_on_are_tried_again_at_doubling_intervals(tmp_path: Path) -> None:
    """A queue at its maxSize refused a record for good: failed/ was never looked at again
    (WIRE.md 5: failing files are retried). It now gets another round after retry_failed_s,
    then 2x, 4x ... later while it keeps failing; a corrupt line's bytes stay."""
    clock = Clock()
    buffer = opened(FileBuffer(str(tmp_path), 100, run_blocking=at_once))
    buffer.append([item("a", 0), item("a", 1)])
    store = RecordingStore()
    store.refuse.add("a-0")
    replayer = Replayer(buffer, store, max_batch=10, max_attempts=1, retry_failed_s=10,
                        now=clock.seconds)
    assert replay(replayer) == [None]
    assert segment_files(tmp_path) == [] and buffer.failed == 1
    fired(defer.ensureDeferred(buffer.fail(
        Segment(99, tmp_path / "segment-000000000099.jsonl"),
        [(b"garbage\n", "corrupt record (checksum mismatch)")])))
    assert buffer.failed == 2

    clock.advance(9)
    assert replay(replayer) == [None] and buffer.failed == 2  # not yet
    clock.advance(1)
    assert replay(replayer) == [None]  # a-0 tried again, and failed again
    assert [s["transactionId"] for s in store.stored] == ["a-1"] and buffer.failed == 2
    assert _failed_transaction_ids(tmp_path) == ["a-0"]  # once, not copied
    # tried outside the buffer's line: new pushes to its partition were never held for it
    assert buffer.pending == 0 and segment_files(tmp_path) == []

    store.refuse.clear()  # room again
    clock.advance(19)
    assert replay(replayer) == [None] and buffer.failed == 2  # the wait doubled: 20 s
    clock.advance(1)
    assert replay(replayer) == [None]

    assert [s["transactionId"] for s in store.stored] == ["a-1", "a-0"]
    assert buffer.pending == 0 and buffer.failed == 1
    assert _failed_transaction_ids(tmp_path) == []
    assert sorted(p.name for p in (tmp_path / FAILED_DIR).iterdir()) == [
        "segment-000000000099.jsonl"]  # the corrupt line's bytes only
    assert buffer.stats()["failedFiles"]["count"] == 1


class _AwayAfterOneCall(RecordingStore):
    """Answers one call once ``calls`` is reset to 0, then PostgreSQL is away."""

    calls = -1_000_000

    def __call__(self, items):
        self.calls += 1
        self.unavailable = self.calls > 1
        return super().__call__(items)


def test_records_of_failed_stored_before_an_outage_leave_it(tmp_path: Path) -> None:
    """A round stored a-0, then PostgreSQL went away: a-0 stayed in failed/, counted, and was
    sent again a round later (a duplicate once retention had deleted the first)."""
    clock = Clock()
    buffer = opened(FileBuffer(str(tmp_path), 100, run_blocking=at_once))
    buffer.append([item("a", 0), item("a", 1), item("a", 2)])
    store = _AwayAfterOneCall()
    store.refuse.update({"a-0", "a-1", "a-2"})
    replayer = Replayer(buffer, store, max_batch=1, max_attempts=1, retry_failed_s=10,
                        now=clock.seconds)
    assert replay(replayer) == [None] and buffer.failed == 3
    store.refuse.clear()
    store.calls = 0
    clock.advance(10)
    [held] = replay(replayer)

    assert held.check(Unavailable)
    assert [s["transactionId"] for s in store.stored] == ["a-0"]
    assert _failed_transaction_ids(tmp_path) == ["a-1", "a-2"] and buffer.failed == 2


def _failed_transaction_ids(directory: Path) -> list[str]:
    lines = [line for path in sorted((directory / FAILED_DIR).iterdir())
             for line in path.read_bytes().splitlines(keepends=True)]
    return [r["transactionId"] for r in map(records.failed_record, lines) if r is not None]


def test_a_refused_record_fails_alone_and_the_rest_of_its_partition_waits_behind_it(
        tmp_path: Path) -> None:
    """PostgreSQL refusing one record fails its partition's whole call: the records are
    tried one by one, and the ones after the culprit wait (it might still go through)
    until the last attempt gives it up."""
    buffer = opened(FileBuffer(str(tmp_path), 100, run_blocking=at_once))
    buffer.append([item("a", 0), item("a", 1), item("a", 2), item("b", 0), item("a", 3)])
    store = RecordingStore()
    store.poison.add("a-2")
    replayer = Replayer(buffer, store, max_batch=10, max_attempts=3)

    for _ in range(2):
        [held] = replay(replayer)
        assert held.check(ReplayHeld)
        assert [s["transactionId"] for s in store.stored] == ["b-0", "a-0", "a-1"]
    assert replay(replayer) == [None]

    assert [s["transactionId"] for s in store.stored] == ["b-0", "a-0", "a-1", "a-3"]
    assert buffer.pending == 0 and buffer.failed == 1


@pytest.mark.parametrize("line", [b"", b"00000000 {}\n", b"zzzzzzzz {\"queue\":\"q\"}\n",
                                  b"12345678 {\"queue\":\"q\"}\n", b"{\"queue\":\"q\"}\n"])
def test_damaged_lines_do_not_decode(line: bytes) -> None:
    assert records.decode(line) is None
