"""The state of this process, read every METRICS_SAMPLE_INTERVAL_MS.

Each sample notes how late it ran (the event loop was busy that long: the lag goes to the
recorder's interval histogram), the memory and CPU of the process, the pool's connections,
the file buffer and the parked long polls per queue. Reading them is cheap (a few counters
and one small /proc read) and the latest sample is what ``/metrics`` and the Prometheus
process families show, next to the recorder's counters.
"""

import os
import resource
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, Optional, Protocol, Tuple

from twisted.internet.interfaces import IReactorTime

from queen_tw.metrics.recorder import Recorder
from queen_tw.services.periodic import PeriodicService

RATE_WINDOW = 10
"""Samples over which the request and message rates of ``/metrics`` are computed."""

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class PoolView(Protocol):
    """What the sampler reads from the pool (:class:`queen_tw.db.pool.Database`)."""

    @property
    def size(self) -> int:
        """Connections the pool keeps."""

    @property
    def connected(self) -> bool:
        """At least one connection is alive."""

    def usage(self) -> Tuple[int, int, int]:
        """(idle, active, waiting) now."""


class BufferView(Protocol):
    """What the sampler reads from the file buffer (``Maintenance.buffer_status``)."""

    def buffer_status(self):
        """A ``BufferStatus`` (pending, failed, ...)."""

    @property
    def maintenance_mode(self) -> bool:
        """Pushes go to the file buffer."""


@dataclass
class Sample:
    """One reading of the process (all zero before the first)."""

    at: float = 0.0
    loop_lag_ms: float = 0.0
    rss_bytes: int = 0
    vsz_bytes: int = 0
    cpu_user_s: float = 0.0
    cpu_system_s: float = 0.0
    pool_size: int = 0
    pool_idle: int = 0
    pool_active: int = 0
    pool_waiting: int = 0
    db_connected: bool = False
    buffer_pending: int = 0
    buffer_failed: int = 0
    maintenance: bool = False
    parked: Dict[str, int] = field(default_factory=dict)
    requests_rate: float = 0.0
    messages_rate: float = 0.0


class Sampler:
    """Takes :class:`Sample` readings; the latest is :attr:`latest`.

    :param recorder: receives the event-loop lag; its totals give the rates.
    :param clock: time source of the schedule (the lag is measured on it).
    :param interval_s: the sampling period.
    :param pool: the database pool (None: no pool figures).
    :param buffer: the file buffer and maintenance flag (None: zeros).
    :param parked: parked long polls per queue (``WaiterRegistry.parked_by_queue``).
    """

    def __init__(self, recorder: Recorder, clock: IReactorTime, interval_s: float,
                 pool: Optional[PoolView] = None, buffer: Optional[BufferView] = None,
                 parked: Callable[[], Dict[str, int]] = dict):
        self._recorder = recorder
        self._clock = clock
        self._interval = interval_s
        self._pool = pool
        self._buffer = buffer
        self._parked = parked
        self._due: Optional[float] = None
        self._history: Deque[Tuple[float, int, int]] = deque(maxlen=RATE_WINDOW + 1)
        self.latest = Sample()
        self.started = clock.seconds()

    def service(self) -> PeriodicService:
        """The service sampling every interval (first sample at start)."""
        return PeriodicService("metrics sampler", int(self._interval * 1000), self._run,
                               self._clock, now=True)

    async def _run(self) -> None:
        self.sample()

    def sample(self) -> Sample:
        """Reads everything now; returns (and keeps) the sample."""
        now = self._clock.seconds()
        lag_ms = 0.0 if self._due is None else max(now - self._due, 0.0) * 1000.0
        self._due = now + self._interval
        self._recorder.loop_lag(lag_ms)
        sample = Sample(at=now, loop_lag_ms=lag_ms, parked=self._parked())
        sample.rss_bytes, sample.vsz_bytes = memory_bytes()
        sample.cpu_user_s, sample.cpu_system_s = cpu_seconds()
        if self._pool is not None:
            sample.pool_size = self._pool.size
            sample.pool_idle, sample.pool_active, sample.pool_waiting = self._pool.usage()
            sample.db_connected = self._pool.connected
        if self._buffer is not None:
            status = self._buffer.buffer_status()
            sample.buffer_pending, sample.buffer_failed = status.pending, status.failed
            sample.maintenance = self._buffer.maintenance_mode
        totals = self._recorder.totals()
        self._history.append((now, totals.requests, totals.messages))
        first_at, first_requests, first_messages = self._history[0]
        if now > first_at:
            sample.requests_rate = round((totals.requests - first_requests) / (now - first_at), 3)
            sample.messages_rate = round((totals.messages - first_messages) / (now - first_at), 3)
        self.latest = sample
        return sample

    def pool_figures(self) -> Tuple[int, int, int, int]:
        """(size, idle, active, waiting) of the pool now (zeros without one)."""
        if self._pool is None:
            return 0, 0, 0, 0
        idle, active, waiting = self._pool.usage()
        return self._pool.size, idle, active, waiting

    def uptime(self) -> float:
        """Seconds since the sampler was made (the server's start)."""
        return max(self._clock.seconds() - self.started, 0.0)


def memory_bytes() -> Tuple[int, int]:
    """(resident, virtual) bytes of this process: /proc/self/statm, else the peak resident
    size getrusage reports (and 0 for virtual)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            virtual, resident = statm.read().split()[:2]
        return int(resident) * _PAGE_SIZE, int(virtual) * _PAGE_SIZE
    except (OSError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak * 1024, 0


def cpu_seconds() -> Tuple[float, float]:
    """(user, system) CPU seconds this process used so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime

