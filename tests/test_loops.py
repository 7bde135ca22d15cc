"""The loop primitives (PeriodicService, retry_with_backoff, OutageLog, Backoff) and the
stop order, driven by ``task.Clock``: exact, no sleeps.

The outage tests count log lines: an outage of a minute must be a handful of lines (one
when it starts, reminders, one when it ends), not one per attempt.
"""

from __future__ import annotations

import signal
from typing import Any

import pytest
from twisted.application import service as service_module
from twisted.internet import defer
from twisted.internet.error import ProcessTerminated
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent
from twisted.python.failure import Failure

from queen_tw.cluster.workers import WorkerSupervisor
from queen_tw.config import Config
from queen_tw.db.pool import Database
from queen_tw.errors import DatabaseUnavailable
from queen_tw.failover.buffer import FileBuffer
from queen_tw.lifecycle import (
    STOP_BUDGET_S,
    STOP_ORDER,
    WORKER_KILL_AFTER_S,
    WORKER_STOP_BUDGET_S,
    ServerTree,
)
from queen_tw.maintenance import Maintenance
from queen_tw.services.periodic import PeriodicService
from queen_tw.services.retry import Backoff, OutageLog, describe_error, retry_with_backoff


def fired(d: defer.Deferred) -> list[Any]:
    seen: list[Any] = []
    d.addBoth(seen.append)
    return seen


# -- Backoff and OutageLog ------------------------------------------------------------------

def test_backoff_multiplies_up_to_its_cap_and_starts_over_after_a_reset() -> None:
    backoff = Backoff(0.5, multiplier=2.0, maximum=3.0)

    delays = [backoff.next_delay() for _ in range(5)]
    backoff.reset()

    assert delays == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert backoff.next_delay() == 0.5


def test_an_error_of_a_deferred_list_is_described_by_the_error_inside() -> None:
    """A FirstError's own text is its failure's repr ("Failure instance: Traceback: …"): the
    pool's reconnection logged it, a line the log read as a traceback."""
    inner = Failure(ValueError("server closed the connection unexpectedly\nmore"))

    assert describe_error(defer.FirstError(inner, 0)) == \
        "server closed the connection unexpectedly"


def test_an_outage_is_one_line_when_it_starts_reminders_and_one_line_when_it_ends() -> None:
    clock, seen = Clock(), []
    outage = OutageLog("PostgreSQL connection", clock, reminder=30,
                       logger=Logger(observer=lambda event: seen.append(formatEvent(event))))

    for _ in range(700):  # ten failures a second for 70 s
        outage.failed("connection refused")
        clock.advance(0.1)
    outage.succeeded()
    outage.succeeded()

    assert seen == [
        "PostgreSQL connection failing: connection refused; retrying",
        "PostgreSQL connection still failing after 30s (301 attempts): connection refused",
        "PostgreSQL connection still failing after 60s (601 attempts): connection refused",
        "PostgreSQL connection working again after 70s",
    ]


def test_a_quiet_start_says_nothing_about_failures_shorter_than_a_reminder() -> None:
    clock, seen = Clock(), []
    outage = OutageLog("flags", clock, reminder=30, quiet_start=True,
                       logger=Logger(observer=lambda event: seen.append(formatEvent(event))))

    for _ in range(20):
        outage.failed("Database unavailable")
        clock.advance(1)
    outage.succeeded()
    assert seen == []

    outage.failed("Database unavailable")  # after the first success, a failure is news
    assert seen == ["flags failing: Database unavailable; retrying"]


# -- retry_with_backoff -------------------------------------------------------------------

class Flaky:
    """Fails ``failures`` times (at the clock times it records), then answers ``"ready"``."""

    def __init__(self, clock: Clock, failures: int, error: Exception | None = None):
        self.clock = clock
        self.failures = failures
        self.error = error or DatabaseUnavailable("Database unavailable")
        self.attempts: list[float] = []

    async def __call__(self) -> str:
        self.attempts.append(self.clock.seconds())
        if len(self.attempts) <= self.failures:
            raise self.error
        return "ready"


def test_retry_with_backoff_waits_longer_after_each_failure_until_it_works(lines) -> None:
    clock = Clock()
    attempt = Flaky(clock, failures=3)

    result = fired(defer.ensureDeferred(retry_with_backoff(
        attempt, clock, Backoff(0.5, maximum=10), OutageLog("db", clock))))
    clock.pump([0.5, 1.0, 2.0])

    assert result == ["ready"]
    assert attempt.attempts == [0.0, 0.5, 1.5, 3.5]
    assert lines == ["db failing: Database unavailable; retrying", "db working again after 4s"]


def test_retry_with_backoff_raises_at_once_what_retrying_cannot_fix() -> None:
    clock = Clock()
    attempt = Flaky(clock, failures=1, error=ValueError("upgrade failed: bad function"))

    result = fired(defer.ensureDeferred(retry_with_backoff(
        attempt, clock, Backoff(0.5), OutageLog("db", clock), give_up_on=(ValueError,))))

    assert isinstance(result[0], Failure) and result[0].check(ValueError)
    assert attempt.attempts == [0.0] and clock.getDelayedCalls() == []


def test_retry_with_backoff_stops_when_its_owner_stops() -> None:
    clock, running = Clock(), [True]
    attempt = Flaky(clock, failures=100)

    result = fired(defer.ensureDeferred(retry_with_backoff(
        attempt, clock, Backoff(0.5), OutageLog("db", clock), keep_trying=lambda: running[0])))
    clock.advance(0.5)
    running[0] = False
    clock.advance(1.0)

    assert result[0].check(defer.CancelledError)
    assert attempt.attempts == [0.0, 0.5] and clock.getDelayedCalls() == []


# -- PeriodicService ----------------------------------------------------------------------

def test_a_periodic_job_backs_off_while_it_fails_and_logs_the_outage_once(lines) -> None:
    clock = Clock()
    attempt = Flaky(clock, failures=4)
    job = PeriodicService("replay", 250, attempt, clock, now=True,
                          retry=Backoff(0.25, maximum=1.0))

    job.startService()
    clock.pump([0.25] * 12)
    job.stopService()

    assert attempt.attempts[:6] == [0.0, 0.25, 0.75, 1.75, 2.75, 3.0]
    assert lines == ["replay failing: Database unavailable; retrying",
                     "replay working again after 3s"]


def test_an_unexpected_error_is_logged_with_its_traceback_every_time(lines) -> None:
    clock = Clock()
    attempt = Flaky(clock, failures=2, error=KeyError("bug"))
    job = PeriodicService("statistics", 100, attempt, clock)

    job.startService()
    clock.pump([0.1] * 3)
    job.stopService()

    assert lines == ["statistics run failed; next run as scheduled"] * 2
    assert len(attempt.attempts) == 3


def test_a_stop_bounded_by_stop_timeout_does_not_wait_for_a_hung_run(lines) -> None:
    clock, hung = Clock(), defer.Deferred()

    async def work() -> None:
        await hung
    job = PeriodicService("replay", 100, work, clock, now=True, stop_timeout=5)
    job.startService()

    stopped = fired(job.stopService())
    clock.advance(4.9)
    assert stopped == []
    clock.advance(0.1)

    assert stopped == [None]
    assert lines == ["replay still running 5s after the stop; going on"]


def test_unreadable_maintenance_flags_are_a_few_lines_not_ten_a_second(lines) -> None:
    # a pool that never connected answers every call with DatabaseUnavailable, at once
    clock = Clock()
    unreachable = Database("", 1, clock)
    maintenance = Maintenance(unreachable, FileBuffer("/nonexistent", 10), clock)
    refresh = maintenance.refresh_service(60_000)

    refresh.startService()
    clock.pump([0.1] * 1200)  # two minutes of an outage at startup
    refresh.stopService()

    assert refresh.failures > 100  # it kept trying (every second at most)
    assert maintenance.loaded is False
    assert len(lines) == 3  # quiet at first (PostgreSQL may still be starting), then reminders
    assert all(line.startswith("maintenance flags refresh still failing after")
               and line.endswith(": Database unavailable") for line in lines)


# -- stop order and budgets ---------------------------------------------------------------

class _Recorded(service_module.Service):
    def __init__(self, name: str, log: list[str]):
        self.setName(name)
        self.log = log

    def startService(self) -> None:
        super().startService()
        self.log.append(f"start {self.name}")

    def stopService(self) -> None:
        super().stopService()
        self.log.append(f"stop {self.name}")


def test_a_server_tree_stops_by_stage_whatever_the_order_services_were_added() -> None:
    log: list[str] = []
    tree = ServerTree(Clock())
    for stage, name in [("database", "pool"), ("gate", "gate"), ("buffer", "buffer"),
                        ("jobs", "retention"), ("listener", "http"), ("jobs", "stats"),
                        ("postgres", "embedded"), ("drain", "drain")]:
        tree.add(stage, _Recorded(name, log))

    tree.startService()
    started, log[:] = list(log), []
    stopping = fired(tree.stopService())

    assert stopping == [None]
    assert log == ["stop gate", "stop http", "stop drain", "stop stats", "stop retention",
                   "stop pool", "stop buffer", "stop embedded"]
    assert started == ["start " + entry[len("stop "):] for entry in reversed(log)]
    with pytest.raises(ValueError, match="unknown stop stage"):
        tree.add("later", _Recorded("x", log))
    assert [stage for stage, _ in STOP_ORDER][0] == "gate"


def test_the_stop_budgets_nest_so_the_worker_escalation_fires_in_time() -> None:
    assert WORKER_STOP_BUDGET_S < WORKER_KILL_AFTER_S < STOP_BUDGET_S


class _Process:
    def __init__(self) -> None:
        self.signals: list[int] = []

    def signalProcess(self, signum: int) -> None:
        self.signals.append(signum)


class _ProcessClock(Clock):
    """A clock that also "spawns" processes (records them, runs nothing) and records the
    shutdown triggers ``startup.fatal`` adds (it stops nothing: ``running`` is False)."""

    running = False

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, _Process]] = []
        self.triggers: list[tuple[str, str]] = []

    def addSystemEventTrigger(self, phase: str, event: str, callable, *args) -> None:
        self.triggers.append((phase, event))

    def spawnProcess(self, protocol, executable, args, env, childFDs):
        process = _Process()
        self.spawned.append((protocol, process))
        return process


def test_the_supervisor_kills_a_worker_that_ignores_sigterm_within_the_budget() -> None:
    reactor = _ProcessClock()
    config = Config.from_sources({"NUM_WORKERS": "2", "PORT": "0", "HOST": "127.0.0.1"}, {})
    supervisor = WorkerSupervisor(config, reactor, {})
    supervisor.startService()
    (polite, polite_process), (stubborn, stubborn_process) = reactor.spawned

    stopped = fired(supervisor.stopService())
    assert polite_process.signals == [signal.SIGTERM] == stubborn_process.signals
    polite.processEnded(Failure(Exception("exit 0")))  # stops as asked
    reactor.advance(WORKER_KILL_AFTER_S - 0.1)
    assert stubborn_process.signals == [signal.SIGTERM] and stopped == []
    reactor.advance(0.1)

    assert stubborn_process.signals == [signal.SIGTERM, signal.SIGKILL]
    assert polite_process.signals == [signal.SIGTERM]
    stubborn.processEnded(Failure(Exception("killed")))
    assert stopped != [] and reactor.getDelayedCalls() == []


def test_a_worker_that_keeps_dying_is_restarted_ever_more_slowly() -> None:
    reactor = _ProcessClock()
    config = Config.from_sources({"NUM_WORKERS": "2", "PORT": "0", "HOST": "127.0.0.1"}, {})
    supervisor = WorkerSupervisor(config, reactor, {})
    supervisor.startService()
    restarts: list[float] = []

    def crash_latest_of_worker_1() -> None:
        worker, _ = [entry for entry in reactor.spawned if entry[0].index == 0][-1]
        spawned = len(reactor.spawned)
        worker.processEnded(Failure(Exception("exit 1")))
        started = reactor.seconds()
        while len(reactor.spawned) == spawned:
            reactor.advance(0.5)
        restarts.append(reactor.seconds() - started)

    for _ in range(3):  # dies at once, again and again
        crash_latest_of_worker_1()
    reactor.advance(60)  # then runs for a minute before dying
    crash_latest_of_worker_1()

    assert restarts == [1.0, 2.0, 4.0, 1.0]
    supervisor.stopService()


def test_a_worker_that_refused_to_start_ends_the_server_instead_of_restarting(lines) -> None:
    reactor = _ProcessClock()
    config = Config.from_sources({"NUM_WORKERS": "2", "PORT": "0", "HOST": "127.0.0.1"}, {})
    supervisor = WorkerSupervisor(config, reactor, {})
    supervisor.startService()
    (refusing, _), _ = reactor.spawned

    refusing.processEnded(Failure(ProcessTerminated(exitCode=1)))
    reactor.advance(60)

    assert len(reactor.spawned) == 2  # not restarted
    assert reactor.triggers == [("after", "shutdown")]  # fatal: exit 1 once stopped
    assert lines[-1] == "fatal: worker 1 refused to start; stopping"
    assert not any("restarting" in line for line in lines)
    supervisor.stopService()
