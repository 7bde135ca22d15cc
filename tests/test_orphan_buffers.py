"""Buffer directories left by processes that no longer run are adopted (issue #16 point 6).

The first tests drive the lock and the adoption on real directories in one process: a lock
"held by a live process" is a descriptor this test keeps open (``flock`` conflicts between two
open descriptions of a file even within a process), blocking I/O runs at once, the periodic
look is driven with ``task.Clock`` and the replay stores into a recording stand-in. The tests
marked ``fault`` run real servers on a PostgreSQL of their own (maintenance flags are
cluster-wide) and count every acknowledged message in it.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg2
import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from queen_tw.config import Config
from queen_tw.db.pool import Database
from queen_tw.failover import adoption, records
from queen_tw.failover.buffer import FAILED_DIR, FileBuffer
from queen_tw.failover.durability import ADOPTION_INTERVAL_MS, Durability
from queen_tw.failover.replay import Replayer
from queen_tw.services.periodic import PeriodicService

from buffer_helpers import RecordingStore, at_once, fired, item, opened, replay
from faultkit import Fleet, Ledger, Producers, count, drain, private_fleet, report, set_maintenance
from support import ServerProcess, count_messages, wait_until


def write_segment(directory: Path, seq: int, items: list[dict[str, Any]]) -> Path:
    """A segment as a buffer writes it (``records`` is the on-disk format)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / records.SEGMENT_NAME.format(seq)
    path.write_bytes(b"".join(records.encode(entry) for entry in items))
    return path


def dead_owner(directory: Path) -> None:
    """The lock file a process leaves: present, held by nobody."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / adoption.LOCK_NAME).touch()


def segments(directory: Path) -> list[str]:
    return [path.name for _, path in records.segment_files(directory)]


def stored_ids(store: RecordingStore) -> list[str]:
    return [entry["transactionId"] for entry in store.stored]


def worker_buffer(root: Path, number: int = 1) -> FileBuffer:
    return FileBuffer(str(root / f"queen-tw-1-{number}"), 100, run_blocking=at_once,
                      scan_root=str(root))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "buffers"


# -- the lock ---------------------------------------------------------------------------

def test_a_directory_is_claimed_by_one_process_at_a_time(tmp_path: Path) -> None:
    owner = adoption.claim(tmp_path / "own")
    with pytest.raises(adoption.DirectoryInUse, match="FILE_BUFFER_DIR .*own is in use"):
        adoption.claim(tmp_path / "own", attempts=2, pause=0)
    adoption.release(owner)
    adoption.release(adoption.claim(tmp_path / "own", attempts=1))


def test_a_buffer_that_cannot_lock_its_directory_is_unhealthy_and_writes_nothing(
        tmp_path: Path) -> None:
    owner = adoption.claim(tmp_path)
    buffer = opened(FileBuffer(str(tmp_path), 100, run_blocking=at_once))

    assert not buffer.healthy and "in use" in (buffer.last_error or "")
    assert fired(buffer.append([item("a", 0)]))[0].check(Exception)
    assert segments(tmp_path) == []
    adoption.release(owner)


def test_a_second_process_on_the_same_directory_refuses_to_start(tmp_path: Path) -> None:
    config = Config.defaults().with_changes(file_buffer_dir=str(tmp_path))
    Durability(config, Database("", 1, Clock()), Clock())  # holds the lock from here on

    with pytest.raises(SystemExit, match=f"FILE_BUFFER_DIR {tmp_path} is in use"):
        Durability(config, Database("", 1, Clock()), Clock())


# -- adoption -----------------------------------------------------------------------------

def test_a_dead_workers_records_are_adopted_counted_and_replayed_before_new_pushes(
        root: Path) -> None:
    write_segment(root / "queen-tw-1-1", 1, [item("a", 0), item("a", 1)])  # its own
    dead = root / "queen-tw-1-3"  # NUM_WORKERS went from 4 to 2
    dead_owner(dead)
    write_segment(dead, 1, [item("b", 0), item("b", 1)])
    write_segment(dead, 2, [item("c", 0)])
    (dead / FAILED_DIR).mkdir()
    (dead / FAILED_DIR / "segment-000000000009.jsonl").write_bytes(b"x\n")

    buffer = opened(worker_buffer(root))

    assert buffer.pending == 5 and buffer.holds_any([("q", "b")])
    assert segments(dead) == [] and (dead / FAILED_DIR).is_dir()  # the source stays
    assert buffer.stats()["adopted"] == {"directories": 1, "records": 3,
                                         "directoriesReplaying": 1}
    buffer.append([item("b", 2)])  # a new push to an adopted partition queues behind it
    store = RecordingStore()

    assert replay(Replayer(buffer, store, max_batch=10)) == [None]

    assert stored_ids(store) == ["a-0", "a-1", "b-0", "b-1", "c-0", "b-2"]
    assert buffer.pending == 0 and buffer.stats()["adopted"]["directoriesReplaying"] == 0
    assert [p.name for p in (root / "queen-tw-1-1").iterdir()
            if p.name.startswith(adoption.ADOPTED_PREFIX)] == []  # removed once replayed


def test_a_live_owners_directory_is_left_alone_and_adopted_after_it_dies(root: Path) -> None:
    alive = root / "queen-tw-1-2"
    owner = adoption.claim(alive)
    write_segment(alive, 1, [item("b", 0)])
    buffer = opened(worker_buffer(root))
    clock = Clock()
    looking = PeriodicService("adoption", ADOPTION_INTERVAL_MS, buffer.adopt_orphans, clock)
    looking.startService()

    clock.advance(ADOPTION_INTERVAL_MS / 1000)
    assert buffer.pending == 0 and segments(alive) == ["segment-000000000001.jsonl"]
    buffer.append([item("b", 1)])  # through this process, while the other one still runs

    adoption.release(owner)  # the process ends
    clock.advance(ADOPTION_INTERVAL_MS / 1000)

    assert looking.runs == 2 and looking.failures == 0
    assert buffer.pending == 2 and segments(alive) == []
    buffer.append([item("b", 2)])  # after the adoption: behind the adopted record
    store = RecordingStore()
    assert replay(Replayer(buffer, store, max_batch=10)) == [None]
    assert stored_ids(store) == ["b-1", "b-0", "b-2"]
    looking.stopService()


def test_two_adopters_never_take_the_same_file(root: Path) -> None:
    dead = root / "queen-tw-1-3"
    dead_owner(dead)
    write_segment(dead, 1, [item("b", 0)])
    first, second = opened(worker_buffer(root, 1)), opened(worker_buffer(root, 2))

    assert (first.pending, second.pending) == (1, 0)
    fired(defer.ensureDeferred(second.adopt_orphans()))
    assert second.pending == 0  # the adopted directory is locked by the first


def test_an_adoption_cut_short_by_a_crash_resumes_in_the_same_order(root: Path) -> None:
    own = root / "queen-tw-1-1"
    write_segment(own, 1, [item("a", 0)])
    adopted = own / "adopted-000000000002-queen-tw-1-3"  # adopted, then the process died
    write_segment(adopted, 1, [item("a", 1)])
    write_segment(own, 3, [item("a", 2)])  # pushed after the adoption

    buffer = opened(worker_buffer(root))
    buffer.append([item("a", 3)])
    store = RecordingStore()

    assert buffer.pending == 4
    assert replay(Replayer(buffer, store, max_batch=10)) == [None]
    assert stored_ids(store) == ["a-0", "a-1", "a-2", "a-3"]
    assert not adopted.exists()


def test_an_adopted_directory_emptied_just_before_a_crash_is_removed_and_keeps_its_number(
        root: Path) -> None:
    own = root / "queen-tw-1-1"
    dead_owner(own / "adopted-000000000004-queen-tw-1-3")

    buffer = opened(worker_buffer(root))
    buffer.append([item("a", 0)])

    assert sorted(p.name for p in own.iterdir()) == [adoption.LOCK_NAME,
                                                     "segment-000000000005.jsonl"]


def test_what_a_dead_adopter_was_adopting_is_handed_on_first(root: Path) -> None:
    dead = root / "queen-tw-1-3"
    dead_owner(dead)
    write_segment(dead, 2, [item("c", 0)])
    write_segment(dead / "adopted-000000000004-queen-tw-1-4", 1, [item("a", 0)])
    write_segment(dead, 5, [item("a", 1)])

    buffer = opened(worker_buffer(root))
    store = RecordingStore()

    assert replay(Replayer(buffer, store, max_batch=10)) == [None]
    assert stored_ids(store) == ["a-0", "c-0", "a-1"]
    assert [p.name for p in dead.iterdir()] == [adoption.LOCK_NAME]


def test_an_instance_adopts_a_dead_instance_on_a_shared_volume_and_nothing_foreign(
        tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    dead_owner(volume / "b")
    write_segment(volume / "b", 1, [item("b", 0)])
    write_segment(volume / "not-queen", 1, [item("x", 0)])  # no lock file: not a buffer dir
    write_segment(volume / "a" / "queen-tw-1-2", 1, [item("w", 0)])  # an earlier NUM_WORKERS

    buffer = opened(FileBuffer(str(volume / "a"), 100, run_blocking=at_once,
                               scan_root=str(volume / "a")))

    assert buffer.pending == 2 and buffer.holds_any([("q", "b")])
    assert buffer.holds_any([("q", "w")]) and not buffer.holds_any([("q", "x")])
    assert segments(volume / "not-queen") == ["segment-000000000001.jsonl"]


def test_a_worker_adopts_what_a_single_process_left_at_the_top(root: Path) -> None:
    write_segment(root, 1, [item("a", 0)])  # FILE_BUFFER_DIR of an earlier single process

    buffer = opened(worker_buffer(root))

    assert buffer.pending == 1 and segments(root) == []


def test_an_adopted_record_that_keeps_failing_goes_to_the_adopters_failed_dir(
        root: Path) -> None:
    dead = root / "queen-tw-1-3"
    dead_owner(dead)
    write_segment(dead, 1, [item("b", 0), item("b", 1)])
    buffer = opened(worker_buffer(root))
    store = RecordingStore()
    store.refuse.add("b-1")

    assert replay(Replayer(buffer, store, max_batch=10, max_attempts=1)) == [None]

    assert stored_ids(store) == ["b-0"] and buffer.failed == 1 and buffer.pending == 0
    assert [p.name for p in (root / "queen-tw-1-1" / FAILED_DIR).iterdir()] == [
        "adopted-000000000001-queen-tw-1-3-segment-000000000001.jsonl"]


# -- real servers -------------------------------------------------------------------------

SERVER_ENV = {"QUEEN_CACHE_REFRESH_INTERVAL_MS": "200", "FILE_BUFFER_EVENTS_PER_FILE": "20"}


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    with private_fleet() as servers:
        yield servers


def stored(fleet: Fleet, queue: str) -> int:
    env = fleet.pg_env
    db = psycopg2.connect(host=env["PG_HOST"], port=env["PG_PORT"], user=env["PG_USER"],
                          password=env["PG_PASSWORD"], dbname=env["PG_DB"])
    try:
        return count_messages(db, queue)
    finally:
        db.close()


def push_all(url: str, queue: str, threads: int, partitions_each: int, limit: int) -> Ledger:
    """``limit`` messages to each of ``threads * partitions_each`` partitions, each thread
    on one connection (so each partition on one process), every one acknowledged."""
    producers = Producers(url, queue, threads=threads, partitions_each=partitions_each,
                          batch=4, pause=0, limit=limit).start()
    total = threads * partitions_each * limit
    wait_until(lambda: len(producers.ledger.acknowledged) >= total, timeout=60, interval=0.05,
               message=f"{total} pushes acknowledged")
    ledger = producers.stop()
    assert not producers.errors, producers.errors
    return ledger


def health_pending(server: ServerProcess) -> int:
    return httpx.get(f"{server.url}/health", timeout=10).json()["file_buffer"]["pending"]


@pytest.mark.fault
def test_lowering_num_workers_loses_no_buffered_message(fleet: Fleet) -> None:
    server = fleet.server(NUM_WORKERS="4", **SERVER_ENV)
    set_maintenance(server.url, True)
    dropped = [server.buffer_dir / "queen-tw-1-3", server.buffer_dir / "queen-tw-1-4"]
    ledgers = []
    for round_number in range(20):  # connections land on workers as the kernel decides
        ledgers.append(push_all(server.url, f"orphans-workers-{round_number}", threads=6,
                                partitions_each=1, limit=20))
        if all(d.is_dir() and records.segment_files(d) for d in dropped):
            break
    assert all(records.segment_files(d) for d in dropped), "no pushes reached workers 3 and 4"
    # (a worker sees the flag set through another within a second: the first pushes may
    # have been stored at once; the count below covers them too)
    server.stop()  # SIGTERM: every worker writes its buffer out and ends
    assert not server.running

    server.env["NUM_WORKERS"] = "2"
    server.start()
    set_maintenance(server.url, False)

    total = sum(len(ledger.sent) for ledger in ledgers)
    wait_until(lambda: sum(stored(fleet, ledger.queue) for ledger in ledgers) >= total,
               timeout=90, interval=0.5, message=f"{total} messages stored")
    for ledger in ledgers:
        result = count(ledger, drain(server.url, ledger.queue, ledger.partitions()))
        report("NUM_WORKERS 4 -> 2", result)
        result.assert_nothing_lost()
        assert result.delivered == len(ledger.sent)
    assert all(records.segment_files(d) == [] for d in dropped)
    assert "left by a process that no longer runs" in server.log_text()


@pytest.mark.fault
def test_a_live_instance_adopts_a_killed_instances_directory_on_a_shared_volume(
        fleet: Fleet, tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    b = fleet.server(FILE_BUFFER_DIR=str(volume / "b"), **SERVER_ENV)
    set_maintenance(b.url, True)
    ledger = push_all(b.url, "orphans-volume", threads=2, partitions_each=2, limit=12)
    held = segments(volume / "b")
    dead_owner(volume / "c")  # a crashed instance (b looks again only 30 s after its start)
    write_segment(volume / "c", 1, [item("c", n, queue="orphans-volume") for n in range(3)])

    a = fleet.server(FILE_BUFFER_DIR=str(volume / "a"), **SERVER_ENV)
    wait_until(lambda: health_pending(a) == 3, message="the crashed instance's records adopted")
    assert segments(volume / "b") == held  # its owner is alive: not touched

    twin = fleet.server(start=False, FILE_BUFFER_DIR=str(volume / "b"), **SERVER_ENV)
    refused = subprocess.run(twin.command(), env=twin.env, cwd=twin.workdir, timeout=60,
                             capture_output=True, text=True, check=False)
    assert refused.returncode == 1
    assert f"FILE_BUFFER_DIR {volume / 'b'} is in use" in refused.stderr + refused.stdout

    b.kill()
    wait_until(lambda: health_pending(a) == 3 + 48, timeout=ADOPTION_INTERVAL_MS / 1000 + 60,
               interval=0.5, message="the killed instance's records adopted")
    set_maintenance(a.url, False)

    wait_until(lambda: stored(fleet, "orphans-volume") == 3 + 48, timeout=90, interval=0.2,
               message="every adopted record stored")
    result = count(ledger, drain(a.url, "orphans-volume", ledger.partitions()))
    report("shared volume", result)
    result.assert_nothing_lost()
    assert result.delivered == 48 and health_pending(a) == 0
    assert segments(volume / "b") == [] and segments(volume / "c") == []
    assert not [p for p in (volume / "a").iterdir() if p.name.startswith("adopted-")]
    log = a.log_text()
    assert "adopted 48 records" in log and f"from {volume / 'b'}" in log
    assert (volume / "b" / adoption.LOCK_NAME).exists()
