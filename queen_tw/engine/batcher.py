"""Fuses concurrent requests of one operation type into one database call (DESIGN.md).

Each request is a *job*: a list of items. Jobs queue up; a flush sends the items of several
jobs in one call and hands every job the slice of results that belongs to it. The policy:

- nothing in flight: flush on the next reactor turn (a lone request pays no hold time);
- calls in flight but a slot free: flush once ``preferred_size`` items wait, or after
  ``max_hold_ms``;
- all ``max_concurrent`` slots busy: jobs accumulate, and the next free slot takes up to
  ``max_batch_size`` items at once — the busier the database, the bigger the batches;
- more than ``max_pending`` items waiting: new jobs are refused with ``Unavailable`` (503 and
  ``Retry-After``) instead of growing an unbounded queue.

A failing call fails only its own jobs. When several jobs were fused and PostgreSQL raised
an error (so the call's transaction rolled back and applied nothing), each job is run again
alone, so one bad job cannot fail its neighbours. Any other error may come after the commit
(the answer could not be read): running the jobs again would apply them twice (an ack would
then fail on the lease it released itself), so every job of the call fails with it.
"""

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Deque, List, Optional

from psycopg2 import Error as DatabaseError
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from queen_tw.errors import DatabaseBusy, RefusedByDatabase, Unavailable

log = Logger()

Job = List[Any]
RunBatch = Callable[[List[Job]], Awaitable[List[List[Any]]]]


@dataclass(frozen=True)
class BatchLimits:
    """The knobs of one batcher (``QUEEN_<TYPE>_*`` in WIRE.md section 5)."""

    preferred_size: int = 50
    max_hold_ms: int = 20
    max_batch_size: int = 500
    max_concurrent: int = 8
    max_pending: int = 20_000


@dataclass
class _Pending:
    items: Job
    done: defer.Deferred = field(default_factory=defer.Deferred)


class Batcher:
    """One queue of jobs for one operation, flushed through ``run_batch``.

    :param name: operation name, for logs and gauges.
    :param run_batch: takes a list of jobs, returns one result list per job (same order).
    :param clock: time source (``task.Clock`` in tests).
    :param limits: sizes, hold time and concurrency.
    """

    def __init__(self, name: str, run_batch: RunBatch, clock: IReactorTime,
                 limits: BatchLimits):
        self.name = name
        self._run_batch = run_batch
        self._clock = clock
        self._limits = limits
        # A deque: under overload thousands of jobs wait and every flush takes from the
        # front, which a list would pay for by moving everything behind it.
        self._queue: Deque[_Pending] = deque()
        self._queued_items = 0
        self._in_flight = 0
        self._timer: Optional[IDelayedCall] = None
        self.calls = 0
        self.jobs_done = 0

    @property
    def queued_items(self) -> int:
        return self._queued_items

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def submit(self, items: Job) -> defer.Deferred:
        """Queues one job; the Deferred fires with its results (one per item)."""
        if self._queued_items + len(items) > self._limits.max_pending and self._queue:
            return defer.fail(Unavailable(f"Server busy: too many {self.name} requests waiting"))
        job = _Pending(items)
        self._queue.append(job)
        self._queued_items += len(items)
        self._schedule()
        return job.done

    def _schedule(self) -> None:
        if not self._queue or self._in_flight >= self._limits.max_concurrent:
            return
        if self._in_flight == 0 or self._queued_items >= self._limits.preferred_size:
            delay = 0.0
        else:
            delay = self._limits.max_hold_ms / 1000.0
        if self._timer is not None and self._timer.active():
            if delay > 0:
                return
            self._timer.cancel()
        self._timer = self._clock.callLater(delay, self._flush)

    def _flush(self) -> None:
        self._timer = None
        if not self._queue or self._in_flight >= self._limits.max_concurrent:
            return
        jobs = self._take()
        self._in_flight += 1
        self.calls += 1
        d = defer.ensureDeferred(self._run(jobs))
        d.addBoth(self._finished)
        self._schedule()

    def _take(self) -> List[_Pending]:
        jobs: List[_Pending] = []
        size = 0
        while self._queue:
            nxt = len(self._queue[0].items)
            if jobs and size + nxt > self._limits.max_batch_size:
                break
            jobs.append(self._queue.popleft())
            size += nxt
        self._queued_items -= size
        return jobs

    async def _run(self, jobs: List[_Pending]) -> None:
        try:
            results = await self._run_batch([job.items for job in jobs])
        except Unavailable as err:
            if not isinstance(err, DatabaseBusy) or len(jobs) == 1:
                for job in jobs:
                    job.done.errback(err)
                return
            # PostgreSQL kept undoing the fused call: each job on its own holds fewer locks
            await self._run_one_by_one(jobs, err)
            return
        except (DatabaseError, RefusedByDatabase) as err:
            if len(jobs) == 1:
                jobs[0].done.errback()
                return
            await self._run_one_by_one(jobs, err)
            return
        except Exception:
            log.failure("fused {name} call of {n} jobs failed", name=self.name, n=len(jobs))
            failure = Failure()
            for job in jobs:
                job.done.errback(failure)
            return
        for job, result in zip(jobs, results, strict=True):
            self.jobs_done += 1
            job.done.callback(result)

    async def _run_one_by_one(self, jobs: List[_Pending], err: Exception) -> None:
        """A fused call failed as a whole: each job alone finds its own fault (or succeeds)."""
        log.warn("fused {name} call of {n} jobs failed ({error}); retrying them one by one",
                 name=self.name, n=len(jobs), error=str(err).strip())
        for job in jobs:
            await self._run([job])

    def _finished(self, result: Any) -> None:
        self._in_flight -= 1
        if isinstance(result, Failure):
            log.failure("batcher {name} crashed", result, name=self.name)
        self._schedule()
