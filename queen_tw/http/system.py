"""System routes (WIRE.md 2.8, 3.7): health, the maintenance modes, the file buffer's status,
the peer wake-up and the shared-state (peer sync) statistics.

Everything about maintenance and the buffer is read and changed through one injected
:class:`~queen_tw.maintenance.Maintenance`; without one (a server built without durability,
as in unit tests) the maintenance and buffer routes answer 404 and ``/health`` reports the
database alone. The peer sync is seen through one read-only :class:`SharedStateView`; without
one (sync off) the shared-state routes answer ``{enabled: false, reason: "not_initialized"}``.
"""

from typing import Any, Dict, Optional, Protocol

from queen_tw import __version__
from queen_tw.auth.levels import routed_klein
from queen_tw.engine.queue_engine import QueueEngine
from queen_tw.errors import InvalidRequest, NotFound
from queen_tw.http import parsing
from queen_tw.http.answers import answering_errors, json_answer
from queen_tw.maintenance import Maintenance

NOT_INITIALIZED = {"enabled": False, "reason": "not_initialized"}
"""The shared-state answer of a server without peer sync (WIRE 3.7)."""


class SharedStateView(Protocol):
    """What the shared-state routes read (``queen_tw.cluster.wiring.SharedState``)."""

    def stats(self) -> Dict[str, Any]:
        """Every field of the WIRE 3.7 shared-state answer."""


class SystemRoutes:
    """Routes about the server itself.

    :param engine: asked whether PostgreSQL answers; wakes pops for ``/internal/api/notify``.
    :param worker_id: reported by ``/health`` and the buffer status.
    :param maintenance: the flags and the file buffer; their routes answer 404 without it.
    :param shared_state: the peer-sync statistics; None when sync is off.
    """

    app = answering_errors(routed_klein())

    def __init__(self, engine: QueueEngine, worker_id: str,
                 maintenance: Optional[Maintenance] = None,
                 shared_state: Optional[SharedStateView] = None):
        self._engine = engine
        self._worker_id = worker_id
        self._maintenance = maintenance
        self._shared_state = shared_state

    def _required_maintenance(self) -> Maintenance:
        if self._maintenance is None:
            raise NotFound("Not found")
        return self._maintenance

    @app.route("/health", methods=["GET"])
    async def health(self, request):
        connected = await self._engine.database_healthy()  # SELECT 1, answered within 2 s
        maintenance = self._maintenance
        healthy = connected and (maintenance is None or maintenance.loaded)  # flags known
        body: Dict[str, Any] = {
            "status": "healthy" if healthy else "unhealthy",
            "database": "connected" if connected else "disconnected",
            "server": "queen-tw", "worker_id": self._worker_id, "version": __version__,
            "shared_state": {"enabled": self._shared_state is not None},
            "queen": {"worker_id": self._worker_id, "status": "active"},
        }
        if maintenance is not None:
            buffer = maintenance.buffer_status()
            body["file_buffer"] = {"pending": buffer.pending, "failed": buffer.failed,
                                   "healthy": buffer.healthy}
        return json_answer(request, 200 if healthy else 503, body)

    @app.route("/api/v1/system/maintenance", methods=["GET"])
    async def maintenance_status(self, request):
        maintenance = self._required_maintenance()
        await maintenance.reread()
        buffer = maintenance.buffer_status()
        return json_answer(request, 200, {
            "maintenanceMode": maintenance.maintenance_mode,
            "popMaintenanceMode": maintenance.pop_maintenance_mode,
            "bufferedMessages": buffer.pending, "bufferHealthy": buffer.healthy,
            "bufferStats": {"pendingCount": buffer.pending, "failedCount": buffer.failed,
                            "dbHealthy": await self._engine.database_healthy(),
                            "failedFiles": buffer.failed_files}})

    @app.route("/api/v1/system/maintenance", methods=["POST"])
    async def set_maintenance(self, request):
        maintenance = self._required_maintenance()
        enabled = _enabled_flag(parsing.read_json_object(request))
        await maintenance.set_maintenance(enabled)
        buffer = maintenance.buffer_status()
        return json_answer(request, 200, {
            "maintenanceMode": enabled, "bufferedMessages": buffer.pending,
            "bufferHealthy": buffer.healthy,
            "message": "Maintenance mode enabled: pushes are written to the file buffer"
                       if enabled else
                       "Maintenance mode disabled: the file buffer drains into PostgreSQL"})

    @app.route("/api/v1/system/maintenance/pop", methods=["GET"])
    async def pop_maintenance_status(self, request):
        maintenance = self._required_maintenance()
        await maintenance.reread()
        enabled = maintenance.pop_maintenance_mode
        return json_answer(request, 200, {"popMaintenanceMode": enabled,
                                          "message": _pop_message(enabled)})

    @app.route("/api/v1/system/maintenance/pop", methods=["POST"])
    async def set_pop_maintenance(self, request):
        maintenance = self._required_maintenance()
        enabled = _enabled_flag(parsing.read_json_object(request))
        await maintenance.set_pop_maintenance(enabled)
        return json_answer(request, 200, {"popMaintenanceMode": enabled,
                                          "message": _pop_message(enabled)})

    @app.route("/api/v1/status/buffers", methods=["GET"])
    async def buffer_status(self, request):
        buffer = self._required_maintenance().buffer_status()
        return json_answer(request, 200, {
            "pending": buffer.pending, "failed": buffer.failed, "healthy": buffer.healthy,
            "fsyncs": buffer.fsyncs,
            "dbHealthy": await self._engine.database_healthy(), "worker": self._worker_id})

    @app.route("/internal/api/notify", methods=["POST"])
    def internal_notify(self, request):
        body = parsing.read_json_object(request)
        queue = parsing.optional_text(body, "queue")
        if not queue:
            raise InvalidRequest("queue is required")
        partition = parsing.optional_text(body, "partition") or None
        self._engine.wake_everywhere([(parsing.check_name(queue, "queue"),
                                       partition and parsing.check_name(partition, "partition"))])
        return json_answer(request, 200, {"status": "ok"})

    @app.route("/api/v1/system/shared-state", methods=["GET"])
    @app.route("/internal/api/shared-state/stats", methods=["GET"])
    @app.route("/internal/api/inter-instance/stats", methods=["GET"])
    def shared_state(self, request):
        if self._shared_state is None:
            return json_answer(request, 200, NOT_INITIALIZED)
        return json_answer(request, 200, self._shared_state.stats())


def _enabled_flag(body: Dict[str, Any]) -> bool:
    enabled = body.get("enabled")
    if not isinstance(enabled, bool):
        raise InvalidRequest("enabled (boolean) is required")
    return enabled


def _pop_message(enabled: bool) -> str:
    return ("Pop maintenance enabled: every pop answers 204" if enabled
            else "Pop maintenance disabled: pops deliver again")
