"""Retention, eviction and partition cleanup (WIRE.md 2.1, 9.6; 7.1 row 23).

Each run deletes in bounded steps: one ``cleanup_cycle`` call removes at most
``RETENTION_BATCH_SIZE`` messages in its own transaction under the cluster-wide advisory lock
(so only one instance cleans, and a lock held elsewhere just skips this turn). A run goes on
while steps come back full, up to ``max_steps``, and leaves the rest to the next run. A step
never waits for a partition a pop, ack or push is using: it leaves it, and the run tries a few
steps more (BUSY_TRIES) before it leaves it to the next run. The
retention run also evicts (``maxWaitTimeSeconds``), so eviction works at the retention
interval even when ``EVICTION_INTERVAL`` is long.
"""

from dataclasses import dataclass, field
from typing import Dict

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from queen_tw.db.pool import Database
from queen_tw.services.periodic import PeriodicService

log = Logger()

BUSY_TRIES = 10
"""Steps a run takes at most while partitions it must clean are in use."""


@dataclass
class CleanupTotals:
    """What one run removed."""

    retention: int = 0
    completed: int = 0
    evicted: int = 0
    partitions: int = 0
    busy: int = 0  # partitions a pop, ack or push was using at the last step: left over
    skipped: bool = False

    def add(self, step: Dict[str, int]) -> None:
        self.retention += step.get("retention", 0)
        self.completed += step.get("completed", 0)
        self.evicted += step.get("evicted", 0)

    @property
    def messages(self) -> int:
        return self.retention + self.completed + self.evicted


@dataclass
class Cleaner:
    """Runs the cleanup SQL in bounded steps.

    :param db: the pool.
    :param batch_size: messages per step (``RETENTION_BATCH_SIZE`` / ``EVICTION_BATCH_SIZE``).
    :param partition_cleanup_days: drop empty partitions idle this long (0 = never).
    :param max_steps: steps per run at most, so one run cannot hog a connection.
    """

    db: Database
    batch_size: int
    partition_cleanup_days: int = 30
    max_steps: int = 100
    totals: CleanupTotals = field(default_factory=CleanupTotals)

    async def retention_run(self) -> CleanupTotals:
        """Retention, completed-retention and eviction, then empty idle partitions."""
        run = await self._steps(retention=True, eviction=True)
        if not run.skipped:
            run.partitions = await self.db.call("cleanup_partitions",
                                                self.partition_cleanup_days, self.batch_size)
        self._report("retention", run)
        return run

    async def eviction_run(self) -> CleanupTotals:
        """Eviction only (``maxWaitTimeSeconds``)."""
        run = await self._steps(retention=False, eviction=True)
        self._report("eviction", run)
        return run

    async def _steps(self, retention: bool, eviction: bool) -> CleanupTotals:
        run = CleanupTotals()
        busy_tries = 0
        for _ in range(self.max_steps):
            step = await self.db.call("cleanup_cycle", self.batch_size, retention, eviction)
            if not step["locked"]:
                run.skipped = True
                break
            run.add(step)
            run.busy = step.get("busy", 0)
            # A partition in use is used for milliseconds at a time: a few steps more catch
            # a hot one free, where waiting for the next run could leave it growing.
            busy_tries += 1 if run.busy else 0
            if not step["more"] and not (run.busy and busy_tries < BUSY_TRIES):
                break
        return run

    def _report(self, what: str, run: CleanupTotals) -> None:
        self.totals.add({"retention": run.retention, "completed": run.completed,
                         "evicted": run.evicted})
        self.totals.partitions += run.partitions
        if run.messages or run.partitions or run.busy:
            log.info("{what}: deleted {retention} expired, {completed} completed, "
                     "evicted {evicted} messages, dropped {partitions} partitions; {busy} "
                     "partitions in use left to the next run", what=what,
                     retention=run.retention, completed=run.completed, evicted=run.evicted,
                     partitions=run.partitions, busy=run.busy)


def retention_service(cleaner: Cleaner, interval_ms: int, clock: IReactorTime) -> PeriodicService:
    """Retention (with eviction and partition cleanup) every ``RETENTION_INTERVAL``."""
    return PeriodicService("retention", interval_ms, cleaner.retention_run, clock)


def eviction_service(cleaner: Cleaner, interval_ms: int, clock: IReactorTime) -> PeriodicService:
    """Eviction every ``EVICTION_INTERVAL``."""
    return PeriodicService("eviction", interval_ms, cleaner.eviction_run, clock)
