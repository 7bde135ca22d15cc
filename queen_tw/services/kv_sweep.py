"""The KV sweeper (WIRE2.md 2.3): deletes KV rows (and lock permits) past their expiry.

Expired rows are already absent to every read (reads compare ``expires_at`` with the call's
instant), so the sweep only gives the space back; it runs at the retention interval, in
steps of :data:`STEP_ROWS` rows per transaction (``queen.kv_sweep`` skips rows another
transaction holds), and every instance may run it.
"""

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from queen_tw.db.pool import Database
from queen_tw.engine.kv import KvEngine
from queen_tw.services.periodic import PeriodicService

log = Logger()

STEP_ROWS = 5000
MAX_STEPS = 20


def kv_sweep_service(db: Database, interval_ms: int, clock: IReactorTime) -> PeriodicService:
    """Sweeps expired KV rows every ``interval_ms`` (``RETENTION_INTERVAL``); a failing run
    is logged by :class:`PeriodicService` and the schedule goes on."""
    engine = KvEngine(db)

    async def sweep() -> int:
        swept = 0
        for _ in range(MAX_STEPS):
            step = await engine.sweep(STEP_ROWS)
            swept += step
            if step < STEP_ROWS:
                break
        if swept:
            log.info("kv sweep: deleted {count} expired keys", count=swept)
        return swept

    return PeriodicService("kv-sweep", interval_ms, sweep, clock)
