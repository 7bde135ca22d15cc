"""A fixed-bucket histogram: one bisect and a few additions per observation.

Averages, maxima and percentiles of request latency and message age come from the bucket
counts (a percentile is interpolated inside its bucket and never above the observed
maximum), so observing costs the same whatever the traffic and memory stays bounded.
"""

from bisect import bisect_left
from typing import Dict, List, Sequence, Tuple

LATENCY_BOUNDS_S: Tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Upper bounds (seconds) of the request latency buckets; the last bucket is unbounded."""

AGE_BOUNDS_MS: Tuple[float, ...] = (
    1, 5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000, 300_000,
    900_000, 3_600_000, 21_600_000, 86_400_000)
"""Upper bounds (milliseconds) of the message age (pop lag) and event-loop lag buckets."""


class Histogram:
    """Counts of observations per bucket, with their count, sum and maximum.

    :param bounds: increasing upper bounds; a value equal to a bound falls in its bucket,
        values above the last bound in one more bucket.
    """

    __slots__ = ("bounds", "counts", "count", "total", "maximum")

    def __init__(self, bounds: Sequence[float]):
        self.bounds = tuple(bounds)
        self.counts: List[int] = [0] * (len(self.bounds) + 1)
        self.count = 0
        self.total = 0.0
        self.maximum = 0.0

    def observe(self, value: float) -> None:
        """Adds one observation."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.total += value
        if value > self.maximum:
            self.maximum = value

    def merge(self, other: "Histogram") -> None:
        """Adds ``other``'s observations (same bounds) to this one."""
        for index, count in enumerate(other.counts):
            self.counts[index] += count
        self.count += other.count
        self.total += other.total
        if other.maximum > self.maximum:
            self.maximum = other.maximum

    def copy(self) -> "Histogram":
        twin = Histogram(self.bounds)
        twin.merge(self)
        return twin

    def quantile(self, q: float) -> float:
        """The value below which a fraction ``q`` of the observations lie (0 when empty),
        interpolated linearly inside its bucket, capped by the maximum."""
        if not self.count:
            return 0.0
        rank = q * self.count
        seen = 0
        lower = 0.0
        for index, in_bucket in enumerate(self.counts):
            upper = self.bounds[index] if index < len(self.bounds) else self.maximum
            if in_bucket and seen + in_bucket >= rank:
                estimate = lower + (upper - lower) * (rank - seen) / in_bucket
                return min(estimate, self.maximum)
            seen += in_bucket
            lower = upper
        return self.maximum

    def cumulative(self) -> List[Tuple[float, int]]:
        """(upper bound, observations at or below it) per bucket, ``inf`` last: the
        Prometheus histogram form."""
        result, running = [], 0
        for index, in_bucket in enumerate(self.counts):
            running += in_bucket
            bound = self.bounds[index] if index < len(self.bounds) else float("inf")
            result.append((bound, running))
        return result

    def summary(self, scale: float = 1.0) -> Dict[str, float]:
        """``{count, avg, max, p50, p95, p99}`` with every value multiplied by ``scale``
        (1000 turns seconds into milliseconds)."""
        if not self.count:
            return {"count": 0, "avg": 0.0, "max": 0.0, "p50": 0.0, "p95": 0.0, "p99": 0.0}
        return {"count": self.count,
                "avg": round(self.total / self.count * scale, 3),
                "max": round(self.maximum * scale, 3),
                "p50": round(self.quantile(0.50) * scale, 3),
                "p95": round(self.quantile(0.95) * scale, 3),
                "p99": round(self.quantile(0.99) * scale, 3)}
