"""The engines behind the secondary routes, bundled so the HTTP layer takes one argument.

The message path (push/pop/ack) lives in :class:`~queen_tw.engine.queue_engine.QueueEngine`;
everything an operator or dashboard calls — consumer groups, resource and message browsing,
statistics, and the peer wake-up seam — hangs off :class:`AdminEngines`.
"""

from dataclasses import dataclass
from typing import Optional

from queen_tw.engine.browser import Browser
from queen_tw.engine.consumer_groups import ConsumerGroups
from queen_tw.engine.waiters import WaiterRegistry
from queen_tw.services.stats import StatsRefresher


@dataclass(frozen=True)
class AdminEngines:
    """What the consumer-group, resource, message, stats and internal routes call."""

    groups: ConsumerGroups
    browser: Browser
    stats: StatsRefresher
    waiters: WaiterRegistry

    def notify(self, queue: str, partition: Optional[str]) -> int:
        """The peer wake-up seam (``POST /internal/api/notify``; later also the UDP sync):
        wakes the local pops parked on ``queue`` (``partition`` or all of its partitions)."""
        return self.waiters.notify(queue, partition)
