"""The peer-sync counters of a NUM_WORKERS instance, readable from every worker.

Only worker 1 runs the peer sync (see :mod:`queen_tw.cluster.wiring`), but the kernel hands
an HTTP request to any worker, so ``GET /api/v1/system/shared-state`` must answer the same
from each. Worker 1 writes its counters every :data:`PUBLISH_MS` to a small JSON file in
``FILE_BUFFER_DIR``, the directory every worker of the instance shares (named after the
instance's identity, so instances that share a volume keep apart); the other workers read it
when asked and add their own queue config cache and maintenance flags. The counters a
sibling shows are at most a second old; when the file is older than :data:`STALE_S` (worker
1 gone or restarting), ``running`` is False.
"""

import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Dict

from twisted.internet import threads
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from queen_tw.clock import wall_seconds
from queen_tw.cluster.config_cache import QueueConfigCache
from queen_tw.maintenance import Maintenance
from queen_tw.services.periodic import PeriodicService

log = Logger()

STATS_FILE = ".peer-sync-stats-{identity}.json"
"""Hidden, so nothing that scans the buffer directory for segments takes it for one."""
PUBLISH_MS = 1000
STALE_S = 5.0


def stats_path(file_buffer_dir: str, identity: str) -> Path:
    """Where worker 1 of the instance ``identity`` (``<hostname>:<udp port>``) publishes and
    its siblings read."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", identity)
    return Path(file_buffer_dir) / STATS_FILE.format(identity=safe)


def publisher_service(path: Path, stats: Callable[[], Dict[str, Any]],
                      clock: IReactorTime) -> PeriodicService:
    """Worker 1: writes ``stats()`` to ``path`` every :data:`PUBLISH_MS` (off the reactor
    thread; written to a temporary name and renamed, so a reader never sees half a file)."""

    async def publish() -> None:
        # wall time: the file outlives the process (and a reboot), the reactor's clock not
        body = json.dumps({"written_at": wall_seconds(), "stats": stats()})
        await threads.deferToThread(_write_atomically, path, body)

    return PeriodicService("peer-sync stats for sibling workers", PUBLISH_MS, publish, clock,
                           now=True, expected=(OSError,))


def _write_atomically(path: Path, body: str) -> None:
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temporary.write_text(body)
    os.replace(temporary, path)


class PublishedSharedState:
    """The shared-state view of a worker other than 1 (``SharedStateView`` of the HTTP
    layer): worker 1's published counters plus this worker's cache and flags.

    :param path: the file worker 1 writes.
    :param cache: this worker's queue config cache.
    :param maintenance: this worker's flags.
    """

    def __init__(self, path: Path, cache: QueueConfigCache, maintenance: Maintenance):
        self._path = path
        self._cache = cache
        self._maintenance = maintenance

    def stats(self) -> Dict[str, Any]:
        body: Dict[str, Any] = {"enabled": True, "running": False}
        try:
            published = json.loads(self._path.read_text())  # a few hundred bytes, on request
            body.update(published["stats"])
            fresh = 0 <= wall_seconds() - float(published["written_at"]) <= STALE_S
            body["running"] = bool(body.get("running")) and fresh
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.debug("peer-sync stats of worker 1 not readable: {error}", error=err)
        body["queue_config_cache"] = self._cache.stats()
        body["maintenance_mode"] = self._maintenance.maintenance_mode
        body["pop_maintenance_mode"] = self._maintenance.pop_maintenance_mode
        return body
