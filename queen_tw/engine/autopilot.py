"""Pop autopilot (WIRE2 8.3): the server sizes the pops that leave ``batch`` or ``partitions``
to it, per lane — one (queue, or namespace/task, and consumer group).

A delegated ``batch`` is :data:`AUTOPILOT_BATCH`. A delegated width is decided by the pop's own
SQL from what its candidate scan already counts: the ready partitions divided by the lane's
*share*, at most :data:`MAX_WIDTH` and ``batch`` (``queen.pop_request``, ``autoShare``). The
share comes from state this process keeps without asking PostgreSQL anything:

- the lane's live pops (waiting or running here): ready partitions are split among the
  consumers polling for them, so ten consumers meeting a burst on ten partitions take one
  each instead of the first one taking all ten;
- a boost driven by the age of the oldest ready message, which each delivering pop reports
  (``oldestMs``, one index probe in the same call): while it stays above
  :data:`TARGET_AGE_MS` the boost doubles (each pop takes a larger part of what is ready, up
  to all of it), and once it is well below (a quarter) it halves back. At most one change per
  :data:`DWELL_SECONDS`, and a lane idle for :data:`IDLE_SECONDS` starts over.

With one consumer the width is simply min(ready partitions, 64, batch).
"""

from dataclasses import dataclass
from typing import Dict, Hashable, Optional

from twisted.internet.interfaces import IReactorTime

AUTOPILOT_BATCH = 100
"""The batch of a pop that delegates it (upstream's default: what clients always sent)."""
MAX_WIDTH = 64
"""No pop claims more partitions than this on the autopilot's behalf."""
TARGET_AGE_MS = 50.0
"""Age of the oldest ready message the controller steers under."""
DWELL_SECONDS = 0.1
IDLE_SECONDS = 1.0
_SMOOTHING = 0.25  # weight of a new age sample
_FORGET_AFTER = 60.0  # idle lanes kept at most this long once the table is large
_LARGE_TABLE = 1000


@dataclass
class _Lane:
    live: int = 0
    boost: float = 1.0
    age_ms: Optional[float] = None
    last_seen: float = 0.0
    last_change: float = float("-inf")
    width: int = 1


class Autopilot:
    """The per-lane state of the pop autopilot.

    :param clock: time source (idle and dwell periods).
    :param target_age_ms: the oldest ready message's age the controller steers under.
    """

    def __init__(self, clock: IReactorTime, target_age_ms: float = TARGET_AGE_MS):
        self._clock = clock
        self._target = target_age_ms
        self._lanes: Dict[Hashable, _Lane] = {}
        self._next_sweep = 0.0

    def __len__(self) -> int:
        """Lanes whose state is kept."""
        return len(self._lanes)

    def entered(self, lane: Hashable) -> None:
        """A pop of ``lane`` started here (it counts among the live pops until it leaves)."""
        state = self._lanes.get(lane)
        if state is None:
            self._forget_idle()
            state = self._lanes[lane] = _Lane(last_seen=self._clock.seconds())
        state.live += 1

    def left(self, lane: Hashable) -> None:
        """A pop of ``lane`` answered."""
        state = self._lanes.get(lane)
        if state is not None:
            state.live = max(state.live - 1, 0)

    def share(self, lane: Hashable) -> float:
        """How many of the lane's pops the ready partitions are split among (the SQL's
        ``autoShare``): the live pops, divided by the age boost; at least 1/64."""
        state = self._lanes.get(lane)
        if state is None:
            return 1.0
        if self._clock.seconds() - state.last_seen > IDLE_SECONDS:
            state.boost, state.age_ms = 1.0, None
        return max(max(state.live, 1) / state.boost, 1.0 / MAX_WIDTH)

    def learn(self, lane: Hashable, width: Optional[int], oldest_ms: Optional[float]) -> None:
        """What a pop of ``lane`` used (``width``) and saw (``oldest_ms``: the age of the
        oldest message it delivered, None when it delivered nothing)."""
        state = self._lanes.get(lane)
        if state is None:
            return
        now = self._clock.seconds()
        state.last_seen = now
        if width is not None:
            state.width = width
        if oldest_ms is None:
            return
        state.age_ms = oldest_ms if state.age_ms is None else (
            (1 - _SMOOTHING) * state.age_ms + _SMOOTHING * oldest_ms)
        if now - state.last_change < DWELL_SECONDS:
            return
        if state.age_ms > self._target and state.boost < MAX_WIDTH:
            state.boost = min(state.boost * 2, MAX_WIDTH)
            state.last_change = now
        elif state.age_ms < self._target / 4 and state.boost > 1:
            state.boost = max(state.boost / 2, 1.0)
            state.last_change = now

    def last_width(self, lane: Hashable) -> int:
        """The width the lane's last pop used (1 before any)."""
        state = self._lanes.get(lane)
        return state.width if state is not None else 1

    def _forget_idle(self) -> None:
        """Keeps the table small: lanes nobody popped for a minute go (their state is
        rebuilt in a few pops)."""
        now = self._clock.seconds()
        if len(self._lanes) < _LARGE_TABLE or now < self._next_sweep:
            return
        self._next_sweep = now + _FORGET_AFTER / 4  # one pass per 15 s, whatever comes
        cutoff = now - _FORGET_AFTER
        for key in [key for key, state in self._lanes.items()
                    if state.live == 0 and state.last_seen < cutoff]:
            del self._lanes[key]


def echo(partitions: int, batch: int) -> Dict[str, int]:
    """The ``autopilot`` object of a pop answer: the values actually used; no wait advice."""
    return {"partitions": partitions, "batch": batch, "waitMs": 0}
