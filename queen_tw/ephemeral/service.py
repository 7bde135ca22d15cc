"""The ephemeral engine as a service of the process tree (``queen_tw/service.py``).

At start it loads the stored declarations (retrying while PostgreSQL is not there yet; until
then every queue is implicit, with the defaults) and re-reads them every
``QUEEN_EPHEMERAL_REFRESH_MS``, so a configure or delete made on another instance reaches
this one. Once a second it applies the TTL of queues nobody touches and forgets implicit
queues left empty and unused for five minutes. At stop it answers every
parked pop with what it holds (an empty list, usually) before the listener closes.
"""

from dataclasses import dataclass
from typing import Optional

from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from queen_tw.config import Config
from queen_tw.db.pool import Database
from queen_tw.ephemeral.declarations import Declarations
from queen_tw.ephemeral.engine import EphemeralEngine
from queen_tw.ephemeral.options import Defaults
from queen_tw.ephemeral.placement import Placement, parse_members
from queen_tw.ephemeral.relay import Relay
from queen_tw.ephemeral.waiting import LongPolls
from queen_tw.services.periodic import PeriodicService
from queen_tw.services.retry import Backoff

TTL_SWEEP_MS = 1000
"""How often the TTL of every queue is applied (touched queues apply it at once)."""

IMPLICIT_IDLE_S = 300.0
"""An implicit queue that is empty and unused this long is forgotten (a declared one stays)."""


def defaults_of(config: Config) -> Defaults:
    """The QUEEN_EPHEMERAL_* options as the engine's defaults."""
    return Defaults(max_bytes=config.ephemeral_max_bytes,
                    queue_max_bytes=config.ephemeral_queue_max_bytes,
                    queue_max_length=config.ephemeral_queue_max_length,
                    lease_seconds=config.ephemeral_lease_s,
                    retry_limit=config.ephemeral_retry_limit)


def placement_of(config: Config) -> Placement:
    """QUEEN_EPHEMERAL_PEERS and QUEEN_EPHEMERAL_SELF (checked by the config already)."""
    return Placement(parse_members(config.ephemeral_peers), config.ephemeral_self)


@dataclass
class Ephemeral:
    """What the routes need: the engine, its long polls, the stored declarations, and
    which instance owns which queue (with the relay that reaches the others)."""

    engine: EphemeralEngine
    polls: LongPolls
    declarations: Declarations
    placement: Placement
    relay: Relay


class EphemeralService(service.MultiService):
    """Owns the ephemeral engine for the life of the process.

    :param db: the pool (declarations only).
    :param clock: the reactor.
    :param defaults: QUEEN_EPHEMERAL_* settings.
    :param refresh_ms: period of the declarations re-read.
    :param placement: the owners of queues among several instances (default: all here).
    """

    def __init__(self, db: Database, clock: IReactorTime, defaults: Defaults,
                 refresh_ms: int, placement: Optional[Placement] = None,
                 epoch: Optional[int] = None):
        super().__init__()
        engine = EphemeralEngine(clock, defaults, epoch)
        self.ephemeral = Ephemeral(engine, LongPolls(engine), Declarations(db, engine),
                                   placement or Placement(), Relay(clock))
        # a load only reads: at stop, one hung on PostgreSQL is left behind after 1 s
        PeriodicService("ephemeral declarations", refresh_ms, self._load, clock, now=True,
                        retry=Backoff(0.5, 2.0, 5.0), quiet_start=True,
                        stop_timeout=1.0).setServiceParent(self)
        PeriodicService("ephemeral ttl", TTL_SWEEP_MS, self._sweep, clock
                        ).setServiceParent(self)

    async def _load(self) -> None:
        await self.ephemeral.declarations.load()

    async def _sweep(self) -> None:
        engine = self.ephemeral.engine
        engine.sweep_ttl()
        engine.forget_idle(IMPLICIT_IDLE_S, self.ephemeral.polls.waited_on)

    def stopService(self) -> defer.Deferred:
        self.ephemeral.polls.stop()
        self.ephemeral.engine.stop()
        self.ephemeral.relay.close()
        return super().stopService()
