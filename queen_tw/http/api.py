"""The HTTP routes of WIRE.md sections 2 and 3: parse, validate, call the engine, answer JSON.

Errors are raised as domain exceptions and turned into ``{"error": …}`` answers in one place
(:meth:`QueenAPI.domain_error`); anything unexpected is logged and answered 500 without a
traceback.
"""

import dataclasses
from typing import Any, Dict, Optional
from urllib.parse import unquote

from klein import Klein
from twisted.logger import Logger
from werkzeug.exceptions import MethodNotAllowed, NotFound as RouteNotFound

from queen_tw import __version__, jsoncodec
from queen_tw.engine.admin import AdminEngines
from queen_tw.engine.queue_engine import QUEUE_MODE, PopRequest, QueueEngine
from queen_tw.errors import InvalidRequest, NotFound, QueenError
from queen_tw.http import parsing
from queen_tw.system_state import MAINTENANCE, POP_MAINTENANCE

log = Logger()

MAX_POP_BATCH = 10_000


def json_answer(request, code: int, body: Any) -> bytes:
    data = jsoncodec.dumps(body)
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Content-Length", b"%d" % len(data))  # no chunked framing needed
    return data


def no_content(request) -> bytes:
    request.setResponseCode(204)
    return b""


class QueenAPI:
    """Routes bound to one engine (a second instance in a test needs no globals).

    :param engine: the message path.
    :param worker_id: reported by ``/health``.
    :param defaults: server defaults of pop parameters (``default_batch_size``,
        ``default_timeout_ms``, ``default_subscription_mode``).
    :param admin: consumer-group, resource, message, statistics and wake-up engines; their
        routes answer 404 without it.
    """

    app = Klein()

    def __init__(self, engine: QueueEngine, worker_id: str, default_batch_size: int,
                 default_timeout_ms: int, default_subscription_mode: str,
                 admin: Optional[AdminEngines] = None):
        self._engine = engine
        self._admin = admin
        self._worker_id = worker_id
        self._default_batch = default_batch_size
        self._default_timeout_ms = default_timeout_ms
        self._default_subscription_mode = default_subscription_mode

    # -- errors -------------------------------------------------------------------------

    @app.handle_errors(QueenError)
    def domain_error(self, request, failure):
        if failure.value.status == 503:
            request.setHeader(b"Retry-After", b"1")  # overload or outage: retry shortly
        return json_answer(request, failure.value.status, {"error": failure.value.message})

    @app.handle_errors(RouteNotFound)
    def unknown_route(self, request, failure):
        return json_answer(request, 404, {"error": "Not found"})

    @app.handle_errors(MethodNotAllowed)
    def wrong_method(self, request, failure):
        return json_answer(request, 405, {"error": "Method not allowed"})

    @app.handle_errors(Exception)
    def unexpected_error(self, request, failure):
        log.failure("unexpected error on {method} {path}", failure,
                    method=request.method.decode(), path=request.path.decode(errors="replace"))
        return json_answer(request, 500, {"error": "Internal server error"})

    # -- health -------------------------------------------------------------------------

    @app.route("/health", methods=["GET"])
    async def health(self, request):
        connected = await self._engine.database_healthy()  # SELECT 1, answered within 2 s
        state = getattr(self._engine.failover, "state", None)
        healthy = connected and (state is None or state.loaded)  # flags known: ready
        body = {
            "status": "healthy" if healthy else "unhealthy",
            "database": "connected" if connected else "disconnected",
            "server": "queen-tw", "worker_id": self._worker_id, "version": __version__,
            "shared_state": {"enabled": False},
            "queen": {"worker_id": self._worker_id, "status": "active"},
        }
        buffer = getattr(self._engine.failover, "file_buffer", None)
        if buffer is not None:
            body["file_buffer"] = {"pending": buffer.pending, "failed": buffer.failed,
                                   "healthy": buffer.healthy}
        return json_answer(request, 200 if healthy else 503, body)

    # -- queues -------------------------------------------------------------------------

    @app.route("/api/v1/configure", methods=["POST"])
    async def configure(self, request):
        body = parsing.read_json_object(request)
        queue = body.get("queue")
        if not isinstance(queue, str) or not queue:
            raise InvalidRequest("queue is required")
        if len(queue) > parsing.MAX_NAME_LENGTH:
            raise InvalidRequest(f"queue is longer than {parsing.MAX_NAME_LENGTH} characters")
        answer = await self._engine.configure(
            queue,
            parsing.optional_text(body, "namespace") or "",
            parsing.optional_text(body, "task") or "",
            parsing.queue_options(body.get("options")))
        return json_answer(request, 200, answer)

    @app.route("/api/v1/resources/queues", methods=["GET"])
    async def list_queues(self, request):
        return json_answer(request, 200, await self._engine.queue_list())

    @app.route("/api/v1/resources/queues/<queue>", methods=["GET"])
    async def queue_detail(self, request, queue):
        return json_answer(request, 200, await self._engine.queue_detail(unquote(queue)))

    @app.route("/api/v1/resources/queues/<queue>", methods=["DELETE"])
    async def delete_queue(self, request, queue):
        return json_answer(request, 200, await self._engine.delete_queue(unquote(queue)))

    # -- push / pop / ack ---------------------------------------------------------------

    @app.route("/api/v1/push", methods=["POST"])
    async def push(self, request):
        items = parsing.push_items(parsing.read_json_object(request))
        return json_answer(request, 201, await self._engine.push(items))

    @app.route("/api/v1/pop/queue/<queue>", methods=["GET"])
    def pop_any_partition(self, request, queue):
        return self._pop(request, unquote(queue), None)

    @app.route("/api/v1/pop/queue/<queue>/partition/<partition>", methods=["GET"])
    def pop_one_partition(self, request, queue, partition):
        return self._pop(request, unquote(queue), unquote(partition))

    async def _pop(self, request, queue: str, partition: Optional[str]):
        wanted = self._pop_request(request, queue, partition)
        gone = request.notifyFinish()
        gone.addErrback(lambda _: None)  # a client that left is not an error
        delivery = await self._engine.pop(wanted, gone)
        if delivery is None:
            return no_content(request)
        return json_answer(request, 200, delivery)

    def _pop_request(self, request, queue: str, partition: Optional[str]) -> PopRequest:
        group = parsing.query_text(request, "consumerGroup") or QUEUE_MODE
        if len(group) > parsing.MAX_NAME_LENGTH:
            raise InvalidRequest(f"consumerGroup is longer than {parsing.MAX_NAME_LENGTH} characters")
        mode = parsing.query_text(request, "subscriptionMode") or self._default_subscription_mode
        batch = parsing.query_int(request, "batch", self._default_batch)
        return PopRequest(
            queue=queue, partition=partition, consumer_group=group,
            batch=min(max(batch, 1), MAX_POP_BATCH),
            partitions=max(parsing.query_int(request, "partitions", 1), 1) if partition is None else 1,
            auto_ack=parsing.query_bool(request, "autoAck"),
            wait=parsing.query_bool(request, "wait"),
            timeout_ms=parsing.query_int(request, "timeout", self._default_timeout_ms),
            subscription_mode=mode,
            subscription_from=parsing.query_text(request, "subscriptionFrom"))

    @app.route("/api/v1/ack", methods=["POST"])
    async def ack(self, request):
        body = parsing.read_json_object(request)
        item = parsing.ack_item(body, None, 0)
        return json_answer(request, 200, await self._engine.ack([item]))

    @app.route("/api/v1/ack/batch", methods=["POST"])
    async def ack_batch(self, request):
        body = parsing.read_json_object(request)
        acks = body.get("acknowledgments")
        if not isinstance(acks, list):
            raise InvalidRequest("acknowledgments array is required")
        group = parsing.optional_text(body, "consumerGroup")
        items = [parsing.ack_item(item, group, index) for index, item in enumerate(acks)]
        if not items:
            return json_answer(request, 200, [])
        return json_answer(request, 200, await self._engine.ack(items))

    @app.route("/api/v1/transaction", methods=["POST"])
    async def transaction(self, request):
        body = parsing.read_json_object(request)
        operations = body.get("operations")
        if not isinstance(operations, list):
            raise InvalidRequest("operations array required")
        if not operations:
            raise InvalidRequest("operations array cannot be empty")
        leases = body.get("requiredLeases") or []
        if not isinstance(leases, list) or not all(
                lease == "" or parsing.is_uuid(lease) for lease in leases):
            raise InvalidRequest("requiredLeases must be an array of lease ids")
        ops = [parsing.transaction_op(op, index) for index, op in enumerate(operations)]
        unknown = next((op for op in ops if op["type"] not in ("push", "ack")), None)
        if unknown is not None:
            # WIRE.md 2.5: an unknown operation fails the transaction (200, success false).
            return json_answer(request, 200, {
                "transactionId": None, "success": False, "results": [],
                "error": f"Unknown operation type: {unknown['type']}"})
        return json_answer(request, 200, await self._engine.transaction(ops, leases))

    @app.route("/api/v1/lease/<lease_id>/extend", methods=["POST"])
    async def extend_lease(self, request, lease_id):
        lease_id = parsing.require_uuid(unquote(lease_id), "leaseId")
        body = parsing.read_json_object(request)
        seconds = body.get("seconds")
        if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, int)
                                    or not 0 < seconds <= 2**31 - 1):
            raise InvalidRequest("seconds must be a positive integer")
        expires = await self._engine.extend_lease(lease_id, seconds)
        return json_answer(request, 200, {
            "leaseId": lease_id, "success": True, "leaseExpiresAt": expires,
            "newExpiresAt": expires, "expiresAt": expires})

    # -- dead letters and traces --------------------------------------------------------

    @app.route("/api/v1/dlq", methods=["GET"])
    async def dead_letters(self, request):
        query: Dict[str, Any] = {
            "queue": parsing.query_text(request, "queue"),
            "consumerGroup": parsing.query_text(request, "consumerGroup"),
            "partition": parsing.query_text(request, "partition"),
            "from": parsing.timestamp(parsing.query_text(request, "from"), "from"),
            "to": parsing.timestamp(parsing.query_text(request, "to"), "to"),
            "limit": min(max(parsing.query_int(request, "limit", 100), 1), 1000),
            "offset": max(parsing.query_int(request, "offset", 0), 0),
        }
        return json_answer(request, 200, await self._engine.dead_letters(
            {key: value for key, value in query.items() if value is not None}))

    @app.route("/api/v1/traces", methods=["POST"])
    async def add_trace(self, request):
        body = parsing.read_json_object(request)
        if not body.get("transactionId") or not body.get("partitionId"):
            raise InvalidRequest("transactionId and partitionId are required")
        if not isinstance(body["transactionId"], str):
            raise InvalidRequest("transactionId must be a string")
        parsing.require_uuid(body["partitionId"], "partitionId")
        if body.get("data") is None:
            raise InvalidRequest("data is required")
        names = body.get("traceNames")
        if isinstance(names, str):
            names = [names]
        if names is not None and not (isinstance(names, list)
                                      and all(isinstance(n, str) for n in names)):
            raise InvalidRequest("traceNames must be a string or an array of strings")
        trace_id = await self._engine.add_trace({
            "transactionId": body["transactionId"], "partitionId": body["partitionId"],
            "consumerGroup": parsing.optional_text(body, "consumerGroup") or QUEUE_MODE,
            "traceNames": names or [],
            "eventType": parsing.optional_text(body, "eventType") or "info",
            "data": body["data"]})
        return json_answer(request, 201, {"success": True, "traceId": trace_id})

    @app.route("/api/v1/traces/<partition_id>/<transaction_id>", methods=["GET"])
    async def list_traces(self, request, partition_id, transaction_id):
        partition_id = parsing.require_uuid(unquote(partition_id), "partitionId")
        return json_answer(request, 200,
                           await self._engine.traces(partition_id, unquote(transaction_id)))

    # -- namespace pops, consumer groups, resources, messages, internal (issue #4) -------

    @app.route("/api/v1/pop", methods=["GET"])
    async def pop_by_namespace(self, request):
        namespace = parsing.query_text(request, "namespace")
        task = parsing.query_text(request, "task")
        if not namespace and not task:
            raise InvalidRequest("namespace or task is required")
        wanted = dataclasses.replace(self._pop_request(request, None, None),
                                     namespace=namespace or None, task=task or None)
        gone = request.notifyFinish()
        gone.addErrback(lambda _: None)
        delivery = await self._engine.pop(wanted, gone)
        if delivery is None:
            return no_content(request)
        return json_answer(request, 200, delivery)

    def _admin_engines(self) -> AdminEngines:
        if self._admin is None:
            raise NotFound("Not found")
        return self._admin

    @app.route("/api/v1/consumer-groups", methods=["GET"])
    async def list_consumer_groups(self, request):
        return json_answer(request, 200, await self._admin_engines().groups.list())

    @app.route("/api/v1/consumer-groups/lagging", methods=["GET"])
    async def lagging_consumer_groups(self, request):
        seconds = max(parsing.query_int(request, "minLagSeconds", 3600), 0)
        return json_answer(request, 200, await self._admin_engines().groups.lagging(seconds))

    @app.route("/api/v1/consumer-groups/<group>", methods=["GET"])
    async def consumer_group_detail(self, request, group):
        return json_answer(request, 200,
                           await self._admin_engines().groups.detail(unquote(group)))

    @app.route("/api/v1/consumer-groups/<group>", methods=["DELETE"])
    async def delete_consumer_group(self, request, group):
        return json_answer(request, 200, await self._admin_engines().groups.delete(
            unquote(group), None, parsing.query_bool(request, "deleteMetadata", True)))

    @app.route("/api/v1/consumer-groups/<group>/queues/<queue>", methods=["DELETE"])
    async def delete_consumer_group_for_queue(self, request, group, queue):
        return json_answer(request, 200, await self._admin_engines().groups.delete(
            unquote(group), unquote(queue), parsing.query_bool(request, "deleteMetadata", True)))

    @app.route("/api/v1/consumer-groups/<group>/subscription", methods=["POST"])
    async def update_subscription(self, request, group):
        body = parsing.read_json_object(request)
        if not body.get("subscriptionTimestamp"):
            raise InvalidRequest("Missing subscriptionTimestamp in request body")
        timestamp = parsing.timestamp(parsing.optional_text(body, "subscriptionTimestamp"),
                                      "subscriptionTimestamp")
        return json_answer(request, 200, await self._admin_engines().groups
                           .set_subscription_timestamp(unquote(group), timestamp))

    @app.route("/api/v1/consumer-groups/<group>/queues/<queue>/seek", methods=["POST"])
    async def seek_consumer_group(self, request, group, queue):
        body = parsing.read_json_object(request)
        to_end = body.get("toEnd") is True
        stamp = body.get("timestamp")
        if not to_end and not stamp:
            raise InvalidRequest("Must specify either 'toEnd': true or 'timestamp'")
        timestamp = None if to_end else parsing.timestamp(
            parsing.optional_text(body, "timestamp"), "timestamp")
        return json_answer(request, 200, await self._admin_engines().groups.seek(
            unquote(group), unquote(queue), to_end, timestamp))

    @app.route("/api/v1/consumer-groups/<group>/queues/<queue>/partitions/<partition>/seek",
               methods=["POST"])
    async def seek_consumer_group_partition(self, request, group, queue, partition):
        return json_answer(request, 200, await self._admin_engines().groups.seek_partition(
            unquote(group), unquote(queue), unquote(partition)))

    @app.route("/api/v1/stats/refresh", methods=["POST"])
    async def refresh_stats(self, request):
        return json_answer(request, 200, await self._admin_engines().stats.refresh())

    @app.route("/api/v1/resources/overview", methods=["GET"])
    async def resources_overview(self, request):
        return json_answer(request, 200, await self._admin_engines().browser.overview())

    @app.route("/api/v1/resources/namespaces", methods=["GET"])
    async def resources_namespaces(self, request):
        return json_answer(request, 200, await self._admin_engines().browser.namespaces())

    @app.route("/api/v1/resources/tasks", methods=["GET"])
    async def resources_tasks(self, request):
        return json_answer(request, 200, await self._admin_engines().browser.tasks())

    @app.route("/api/v1/resources/partitions", methods=["GET"])
    async def resources_partitions(self, request):
        query = {"queue": parsing.query_text(request, "queue"),
                 "limit": min(max(parsing.query_int(request, "limit", 100), 1), 1000),
                 "offset": max(parsing.query_int(request, "offset", 0), 0)}
        return json_answer(request, 200, await self._admin_engines().browser.partitions(
            {key: value for key, value in query.items() if value is not None}))

    @app.route("/api/v1/messages", methods=["GET"])
    async def list_messages(self, request):
        return json_answer(request, 200, await self._admin_engines().browser.messages(
            parsing.message_query(request)))

    @app.route("/api/v1/messages/<partition_id>/<transaction_id>", methods=["GET"])
    async def message_detail(self, request, partition_id, transaction_id):
        partition_id = parsing.require_uuid(unquote(partition_id), "partitionId")
        return json_answer(request, 200, await self._admin_engines().browser.message(
            partition_id, unquote(transaction_id)))

    @app.route("/api/v1/messages/<partition_id>/<transaction_id>", methods=["DELETE"])
    async def delete_message(self, request, partition_id, transaction_id):
        partition_id = parsing.require_uuid(unquote(partition_id), "partitionId")
        return json_answer(request, 200, await self._admin_engines().browser.delete_message(
            partition_id, unquote(transaction_id)))

    @app.route("/api/v1/messages/<partition_id>/<transaction_id>/retry", methods=["POST"])
    async def retry_message(self, request, partition_id, transaction_id):
        partition_id = parsing.require_uuid(unquote(partition_id), "partitionId")
        return json_answer(request, 200, await self._admin_engines().browser.retry_message(
            partition_id, unquote(transaction_id)))

    @app.route("/api/v1/messages/<partition_id>/<transaction_id>/dlq", methods=["POST"])
    async def dead_letter_message(self, request, partition_id, transaction_id):
        partition_id = parsing.require_uuid(unquote(partition_id), "partitionId")
        body = parsing.read_json_object(request)
        group = parsing.optional_text(body, "consumerGroup") or QUEUE_MODE
        error = parsing.optional_text(body, "error", max_length=10_000)
        return json_answer(request, 200, await self._admin_engines().browser
                           .dead_letter_message(partition_id, unquote(transaction_id), group, error))

    @app.route("/api/v1/queues/<queue>/clear", methods=["DELETE"])
    async def clear_queue(self, request, queue):
        partition = parsing.query_text(request, "partition") or None
        return json_answer(request, 200, await self._admin_engines().browser.clear_queue(
            unquote(queue), partition))

    @app.route("/internal/api/notify", methods=["POST"])
    def internal_notify(self, request):
        body = parsing.read_json_object(request)
        queue = parsing.optional_text(body, "queue")
        if not queue:
            raise InvalidRequest("queue is required")
        partition = parsing.optional_text(body, "partition") or None
        self._admin_engines().notify(queue, partition)
        return json_answer(request, 200, {"status": "ok"})

    # -- system: maintenance modes and the file buffer (WIRE.md 3.7) ----------------------

    def _failover(self):
        failover = self._engine.failover
        if failover is None or not hasattr(failover, "state"):
            raise NotFound("Not found")
        return failover

    @app.route("/api/v1/system/maintenance", methods=["GET"])
    async def maintenance_status(self, request):
        failover = self._failover()
        await failover.state.reread()
        buffer = failover.file_buffer
        stats = buffer.stats()
        return json_answer(request, 200, {
            "maintenanceMode": failover.state.maintenance_mode,
            "popMaintenanceMode": failover.state.pop_maintenance_mode,
            "bufferedMessages": buffer.pending, "bufferHealthy": buffer.healthy,
            "bufferStats": {"pendingCount": stats["pendingCount"],
                            "failedCount": stats["failedCount"],
                            "dbHealthy": await self._engine.database_healthy(),
                            "failedFiles": stats["failedFiles"]}})

    @app.route("/api/v1/system/maintenance", methods=["POST"])
    async def set_maintenance(self, request):
        failover = self._failover()
        enabled = _enabled_flag(parsing.read_json_object(request))
        await failover.state.set(MAINTENANCE, enabled)
        buffer = failover.file_buffer
        return json_answer(request, 200, {
            "maintenanceMode": enabled, "bufferedMessages": buffer.pending,
            "bufferHealthy": buffer.healthy,
            "message": "Maintenance mode enabled: pushes are written to the file buffer"
                       if enabled else
                       "Maintenance mode disabled: the file buffer drains into PostgreSQL"})

    @app.route("/api/v1/system/maintenance/pop", methods=["GET"])
    async def pop_maintenance_status(self, request):
        failover = self._failover()
        await failover.state.reread()
        enabled = failover.state.pop_maintenance_mode
        return json_answer(request, 200, {"popMaintenanceMode": enabled,
                                          "message": _pop_message(enabled)})

    @app.route("/api/v1/system/maintenance/pop", methods=["POST"])
    async def set_pop_maintenance(self, request):
        failover = self._failover()
        enabled = _enabled_flag(parsing.read_json_object(request))
        await failover.state.set(POP_MAINTENANCE, enabled)
        return json_answer(request, 200, {"popMaintenanceMode": enabled,
                                          "message": _pop_message(enabled)})

    @app.route("/api/v1/status/buffers", methods=["GET"])
    async def buffer_status(self, request):
        buffer = self._failover().file_buffer
        return json_answer(request, 200, {
            "pending": buffer.pending, "failed": buffer.failed, "healthy": buffer.healthy,
            "fsyncs": buffer.fsyncs,
            "dbHealthy": await self._engine.database_healthy(), "worker": self._worker_id})

    # -- everything else ----------------------------------------------------------------

    @app.route("/", branch=True)
    def anything_else(self, request):
        return json_answer(request, 404, {"error": "Not found"})


def _enabled_flag(body: Dict[str, Any]) -> bool:
    enabled = body.get("enabled")
    if not isinstance(enabled, bool):
        raise InvalidRequest("enabled (boolean) is required")
    return enabled


def _pop_message(enabled: bool) -> str:
    return ("Pop maintenance enabled: every pop answers 204" if enabled
            else "Pop maintenance disabled: pops deliver again")
