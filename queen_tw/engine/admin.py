"""The engines behind the secondary routes, bundled so the HTTP layer takes one argument.

The message path (push/pop/ack) lives in :class:`~queen_tw.engine.queue_engine.QueueEngine`;
everything an operator or dashboard calls — consumer groups, resource and message browsing
and statistics — hangs off :class:`AdminEngines`.
"""

from dataclasses import dataclass
from typing import Optional

from queen_tw.engine.analytics import Analytics
from queen_tw.engine.browser import Browser
from queen_tw.engine.consumer_groups import ConsumerGroups
from queen_tw.services.stats import StatsRefresher


@dataclass(frozen=True)
class AdminEngines:
    """What the consumer-group, resource, message and stats routes call."""

    groups: ConsumerGroups
    browser: Browser
    stats: StatsRefresher
    analytics: Optional[Analytics] = None  # the status and analytics routes (404 without)
