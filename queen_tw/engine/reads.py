"""Reads by offset (WIRE2.md 6): records from partition offsets, and the partitions that changed.

Neither read leases, moves a cursor or writes anything. Each database attempt is one call of a
function in ``sql/functions/070_fetch.sql`` whose answer is the finished JSON text; it goes out
as it is, and is parsed only when it holds encrypted payloads to decrypt.

A fetch with ``maxWaitMs`` is a long poll: it returns at once when an entry has an error or
``minBytes`` payload bytes are there, and otherwise watches its partitions in the
:class:`WaiterRegistry`, the registry that wakes parked pops. A push to one of them (here, in
a sibling worker or on a peer) wakes it for one more attempt; nothing polls PostgreSQL on a
timer. The watch starts before the first attempt, so a push committed while an attempt runs
is never missed.
"""

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Set, Tuple

import orjson
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from queen_tw.db.pool import Database
from queen_tw.engine.sealed_answers import OpenPayload, open_fetch_records
from queen_tw.engine.waiters import WaiterRegistry

MAX_RECORDS_PER_ENTRY = 10_000
"""Records one fetch entry returns at most (upstream's bound)."""

SAFE_TIME_GUARD_SECONDS = 5
"""safeTime is at least this far behind the database's clock: a transaction that began just
now may not show in ``pg_stat_activity`` yet."""

SAFE_TIME_FLOOR_SECONDS = 30
"""safeTime's distance from now when other sessions are hidden from this database role (the
answer then says ``safeTimeDegraded``)."""


@dataclass(frozen=True)
class FetchEntry:
    """One partition to read from ``offset`` on, at most ``max_bytes`` of payload."""

    queue: str
    partition: str
    offset: int
    max_bytes: int

    def as_sql(self) -> Dict[str, Any]:
        return {"queue": self.queue, "partition": self.partition, "offset": self.offset,
                "maxBytes": self.max_bytes}


@dataclass(frozen=True)
class FetchRequest:
    """A validated ``POST /api/v1/fetch``: its entries, the whole call's payload budget, and
    the long poll (``max_wait_ms`` 0 answers at once)."""

    entries: Tuple[FetchEntry, ...]
    call_bytes: int
    max_wait_ms: int = 0
    min_bytes: int = 1


@dataclass(frozen=True)
class ChangedEntry:
    """One queue of a ``POST /api/v1/partitions/changed``: ``since`` None lists every
    partition by name, a timestamp those written since, by last write; ``after`` is the
    previous page's ``next``."""

    queue: str
    since: Optional[str]
    after: Optional[str]
    limit: int

    def as_sql(self) -> Dict[str, Any]:
        return {"queue": self.queue, "since": self.since, "after": self.after,
                "limit": self.limit}


class BadSince(ValueError):
    """A ``since`` PostgreSQL cannot read as a timestamp (the route answers 400)."""


@dataclass
class _Read:
    """One fetch attempt: the answer, and what the long poll decides on."""

    body: str
    payload_bytes: int
    any_error: bool


class OffsetReads:
    """The engine behind the two read routes.

    :param db: the pool.
    :param waiters: where a long-polling fetch watches its partitions.
    :param clock: long-poll deadlines.
    :param open_payload: an encrypted record's stored ``payload`` as plaintext JSON text.
    """

    def __init__(self, db: Database, waiters: WaiterRegistry, clock: IReactorTime,
                 open_payload: OpenPayload):
        self._db = db
        self._waiters = waiters
        self._clock = clock
        self._open_payload = open_payload

    async def fetch(self, request: FetchRequest) -> orjson.Fragment:
        """The WIRE2 6.2 answer: records of every entry, in request order."""
        if request.max_wait_ms <= 0 or not request.entries:
            return self._finished(await self._read(request))
        watch = _Watch(self._waiters, self._clock,
                       {(entry.queue, entry.partition) for entry in request.entries})
        deadline = self._clock.seconds() + request.max_wait_ms / 1000.0
        try:
            while True:
                wakes = watch.wakes
                read = await self._read(request)
                remaining = deadline - self._clock.seconds()
                if read.any_error or read.payload_bytes >= request.min_bytes or remaining <= 0:
                    return self._finished(read)
                if watch.wakes == wakes and not await watch.wait(remaining):
                    return self._finished(read)  # the deadline: nothing new came
        finally:
            watch.close()

    async def changed(self, entries: Sequence[ChangedEntry]) -> orjson.Fragment:
        """The WIRE2 6.3 answer: each queue's page of partitions, and the safeTime."""
        [(body, bad_since)] = await self._db.call_rows(
            "partitions_changed", [entry.as_sql() for entry in entries],
            SAFE_TIME_GUARD_SECONDS, SAFE_TIME_FLOOR_SECONDS)
        if bad_since is not None:
            raise BadSince(bad_since)
        return orjson.Fragment(body)

    async def _read(self, request: FetchRequest) -> _Read:
        [(body, payload_bytes, any_error, encrypted)] = await self._db.call_rows(
            "fetch_records", [entry.as_sql() for entry in request.entries],
            request.call_bytes, MAX_RECORDS_PER_ENTRY)
        if encrypted:
            body = open_fetch_records(body, self._open_payload)
        return _Read(body, payload_bytes, any_error)

    @staticmethod
    def _finished(read: _Read) -> orjson.Fragment:
        return orjson.Fragment(read.body)


class _Watch:
    """A long-polling fetch's watch on its (queue, partition)s: counts wake-ups, and lets the
    fetch wait for the next one. Reports no parked pops to the registry (``len`` 0)."""

    def __init__(self, waiters: WaiterRegistry, clock: IReactorTime,
                 keys: Set[Tuple[str, str]]):
        self._waiters = waiters
        self._clock = clock
        self._keys = sorted(keys)
        self._waiting: Optional[defer.Deferred] = None
        self._timer: Optional[IDelayedCall] = None
        self.wakes = 0
        for queue, partition in self._keys:
            waiters.watch(queue, partition, self)

    def __len__(self) -> int:
        return 0

    def wake(self, queue: str, partition: Optional[str]) -> int:
        self.wakes += 1
        self._settle(True)
        return 0

    def close(self) -> None:
        """Stops watching (also what the registry calls when the server stops: the fetch
        then answers what it has)."""
        for queue, partition in self._keys:
            self._waiters.unwatch(queue, partition, self)
        self._settle(False)

    def wait(self, timeout: float) -> defer.Deferred:
        """Fires True at the next wake-up, False after ``timeout`` seconds or on close."""
        self._waiting = defer.Deferred()
        self._timer = self._clock.callLater(max(timeout, 0), self._settle, False)
        return self._waiting

    def _settle(self, woken: bool) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        waiting, self._waiting = self._waiting, None
        if waiting is not None and not waiting.called:  # called: cancelled (client gone)
            waiting.callback(woken)

