"""Leases the server made in pops it never answered with, expired once PostgreSQL answers.

A pop call that fails on the server's side (its deadline passed, or the connection broke
after the statement was sent) answers "nothing" (204), but PostgreSQL may run the statement
to its end all the same, for instance once a frozen server thaws: the lease it commits is
held by nobody, and its messages stay hidden for the queue's leaseTime (300 s by default).
The same goes for a late delivery whose give-back failed. The server makes every pop's
lease id itself, so it knows which leases may exist; :class:`LeasesInDoubt` expires them
(``queen.expire_leases``) every :data:`ROUND_S` while such a statement might still commit,
for :data:`DOUBT_S`: by then the statement has hit its statement timeout, or the lease has
expired by itself (leaseTime's default). A round that fails (PostgreSQL still away) is
simply followed by the next; a lease never settled is forgotten after twice DOUBT_S, and at
most MOST_IN_DOUBT are kept. The set lives in memory: leases in doubt when the process
stops expire by leaseTime. An autoAck pop lost the same way has no lease: its messages
count as consumed.
"""

import os
from typing import Any, Awaitable, Callable, Dict, Iterable, List, Optional, Tuple

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from queen_tw.errors import Unavailable

log = Logger()

DOUBT_S = 300.0
ROUND_S = 2.0
MOST_IN_DOUBT = 10_000  # beyond it (a long outage, many pollers) a lease is left to leaseTime
CHUNK = 1000  # lease ids per expire_leases call

Call = Callable[..., Awaitable[Any]]


def new_lease_id() -> str:
    """A random (version 4) uuid as text for a pop's lease: unguessable, as it lets its
    holder ack and extend; about 4x cheaper than ``str(uuid.uuid4())``."""
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


class LeasesInDoubt:
    """Lease ids whose pop's outcome the server does not know (see the module docstring).

    :param call: ``Database.call``.
    :param clock: time source.
    :param freed: told the (queue, partition)s whose leases were expired (to wake pops).
    """

    def __init__(self, call: Call, clock: IReactorTime,
                 freed: Callable[[Iterable[Tuple[str, str]]], None]):
        self._call = call
        self._clock = clock
        self._freed = freed
        self._until: Dict[str, float] = {}
        self._timer: Optional[IDelayedCall] = None
        self._settling = False
        self.partitions_freed = 0  # by expired leases, so far

    def __len__(self) -> int:
        return len(self._until)

    def note(self, lease_id: str) -> None:
        """``lease_id`` may have been committed by a pop nobody received."""
        if len(self._until) >= MOST_IN_DOUBT:
            return
        self._until[lease_id] = self._clock.seconds() + DOUBT_S
        if self._timer is None:
            self._timer = self._clock.callLater(ROUND_S, self._tick)

    def _tick(self) -> None:
        """A round every ROUND_S while leases are in doubt (the pops that would have met
        them may have moved to another instance)."""
        self._timer = None
        now = self._clock.seconds()
        if not self._settling:
            self._settling = True
            defer.ensureDeferred(self._round(now))
        # past its doubt and still not settled (PostgreSQL away all along): its lease, if
        # any, has expired by itself by now (leaseTime's default), or does soon
        for lease in [lease for lease, until in self._until.items() if until + DOUBT_S < now]:
            del self._until[lease]
        if self._until:
            self._timer = self._clock.callLater(ROUND_S, self._tick)

    async def _round(self, started: float) -> None:
        leases: List[str] = list(self._until)
        freed: List[Any] = []
        try:
            for start in range(0, len(leases), CHUNK):
                freed += await self._call("expire_leases", leases[start:start + CHUNK])
        except Unavailable:  # PostgreSQL still away: the next round tries again
            return
        except Exception as err:
            log.warn("expiring the leases of pops nobody received failed: {error}", error=err)
            return
        finally:
            self._settling = False
        if freed:
            self.partitions_freed += len(freed)
            log.info("expired the leases of pops nobody received on {n} partition(s)",
                     n=len(freed))
            self._freed([(queue, partition) for queue, partition in freed])
        for lease in leases:  # past its doubt before this round began: settled for good
            if self._until.get(lease, started) < started:
                del self._until[lease]
