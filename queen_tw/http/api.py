"""The HTTP routes of WIRE.md sections 2 and 3: parse, validate, call the engine, answer JSON.

Errors are raised as domain exceptions and turned into ``{"error": …}`` answers in one place
(:meth:`QueenAPI.domain_error`); anything unexpected is logged and answered 500 without a
traceback.
"""

import dataclasses
import json
from typing import Any, Dict, Optional
from urllib.parse import unquote

from klein import Klein
from twisted.logger import Logger
from werkzeug.exceptions import MethodNotAllowed, NotFound as RouteNotFound

from queen_tw import __version__
from queen_tw.engine.queue_engine import QUEUE_MODE, PopRequest, QueueEngine
from queen_tw.errors import InvalidRequest, QueenError
from queen_tw.http import parsing

log = Logger()

MAX_POP_BATCH = 10_000


def json_answer(request, code: int, body: Any) -> bytes:
    data = json.dumps(body, separators=(",", ":")).encode()
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
    """

    app = Klein()

    def __init__(self, engine: QueueEngine, worker_id: str, default_batch_size: int,
                 default_timeout_ms: int, default_subscription_mode: str):
        self._engine = engine
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
        healthy = await self._engine.database_healthy()
        return json_answer(request, 200 if healthy else 503, {
            "status": "healthy" if healthy else "unhealthy",
            "database": "connected" if healthy else "disconnected",
            "server": "queen-tw", "worker_id": self._worker_id, "version": __version__,
            "shared_state": {"enabled": False},
            "queen": {"worker_id": self._worker_id, "status": "active"},
        })

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

    # -- everything else ----------------------------------------------------------------

    @app.route("/", branch=True)
    def anything_else(self, request):
        return json_answer(request, 404, {"error": "Not found"})
