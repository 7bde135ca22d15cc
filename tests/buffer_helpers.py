"""Step-by-step drivers of FileBuffer and Replayer, shared by the buffer and adoption tests.

:class:`ManualThreads` stands in for the thread pool, so a test decides when each I/O job
runs; :class:`RecordingStore` stands in for ``QueueEngine.store``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet import defer

from queen_tw.errors import DatabaseUnavailable
from queen_tw.failover.buffer import FileBuffer
from queen_tw.failover.replay import Replayer


class ManualThreads:
    """Collects blocking jobs; the test runs them with :meth:`run_next`."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Any, tuple, defer.Deferred]] = []

    def __call__(self, function, *args) -> defer.Deferred:
        done: defer.Deferred = defer.Deferred()
        self.jobs.append((function, args, done))
        return done

    def run_next(self) -> None:
        function, args, done = self.jobs.pop(0)
        try:
            result = function(*args)
        except Exception as err:
            done.errback(err)
        else:
            done.callback(result)

    def run_all(self) -> None:
        while self.jobs:
            self.run_next()


def at_once(function, *args) -> defer.Deferred:
    return defer.maybeDeferred(function, *args)


def opened(buffer: FileBuffer) -> FileBuffer:
    """Opens ``buffer`` whose blocking jobs run at once (``at_once``); returns it."""
    assert fired(defer.ensureDeferred(buffer.open())) == [None]
    return buffer


def replay(replayer: Replayer) -> list[Any]:
    """One run of the replay (what ReplayService does every interval); what it fired with."""
    return fired(defer.ensureDeferred(replayer.drain()))


def item(partition: str, seq: int, queue: str = "q") -> dict[str, Any]:
    return {"queue": queue, "partition": partition, "transactionId": f"{partition}-{seq}",
            "payload": {"seq": seq}}


def fired(d: defer.Deferred) -> list[Any]:
    seen: list[Any] = []
    d.addBoth(seen.append)
    return seen


def segment_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("segment-*.jsonl"))


class RecordingStore:
    """Stands in for QueueEngine.store: remembers every item, answers per item."""

    def __init__(self) -> None:
        self.stored: list[dict[str, Any]] = []
        self.refuse: set[str] = set()
        self.poison: set[str] = set()  # as PostgreSQL refusing data: its partition's call fails
        self.unavailable = False

    def __call__(self, items: list[dict[str, Any]]) -> defer.Deferred:
        if self.unavailable:
            return defer.fail(DatabaseUnavailable("Database unavailable"))
        results = []
        poisoned = {entry["partition"] for entry in items if entry["transactionId"] in self.poison}
        for entry in items:
            if entry["partition"] in poisoned:
                results.append({"status": "failed", "error": "PostgreSQL refused the request"})
            elif entry["transactionId"] in self.refuse:
                results.append({"status": "failed", "error": "queue has reached its max capacity"})
            else:
                duplicate = any(s["transactionId"] == entry["transactionId"] for s in self.stored)
                if not duplicate:
                    self.stored.append(entry)
                results.append({"status": "duplicate" if duplicate else "queued"})
        return defer.succeed(results)
