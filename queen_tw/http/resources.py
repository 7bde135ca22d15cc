"""Queues and what they hold, for operators and dashboards (WIRE.md 2.1, 2.7, 3.1-3.4, 3.6):
configure, queue listing and deletion, the resource browser, messages, dead letters, traces
and statistics.

The browser and statistics routes need the admin engines and answer 404 without them.
"""

from typing import Any, Dict, Optional

from queen_tw.auth.levels import routed_klein
from queen_tw.engine.admin import AdminEngines
from queen_tw.engine.queue_engine import QUEUE_MODE, QueueEngine
from queen_tw.errors import InvalidRequest, NotFound
from queen_tw.http import parsing, query
from queen_tw.http.answers import answering_errors, json_answer


class ResourceRoutes:
    """Routes over queues, partitions, messages, dead letters, traces and statistics.

    :param engine: configure, queue listing/deletion, dead letters, traces.
    :param admin: browser and statistics engines; their routes answer 404 without them.
    """

    app = answering_errors(routed_klein())

    def __init__(self, engine: QueueEngine, admin: Optional[AdminEngines] = None):
        self._engine = engine
        self._admin = admin

    def _admin_engines(self) -> AdminEngines:
        if self._admin is None:
            raise NotFound("Not found")
        return self._admin

    # -- queues -------------------------------------------------------------------------

    @app.route("/api/v1/configure", methods=["POST"])
    async def configure(self, request):
        body = parsing.read_json_object(request)
        queue = body.get("queue")
        if queue is None:
            raise InvalidRequest("queue is required")
        if not isinstance(queue, str):
            raise InvalidRequest("queue must be a string")
        answer = await self._engine.configure(
            parsing.check_name(queue, "queue"),
            parsing.optional_text(body, "namespace") or "",
            parsing.optional_text(body, "task") or "",
            parsing.queue_options(body.get("options")))
        return json_answer(request, 200, answer)

    @app.route("/api/v1/resources/queues", methods=["GET"])
    async def list_queues(self, request):
        return json_answer(request, 200, await self._engine.queue_list())

    @app.route("/api/v1/resources/queues/<queue>", methods=["GET"])
    async def queue_detail(self, request, queue):
        return json_answer(request, 200, await self._engine.queue_detail(
            parsing.check_name(queue, "queue")))

    @app.route("/api/v1/resources/queues/<queue>", methods=["DELETE"])
    async def delete_queue(self, request, queue):
        return json_answer(request, 200, await self._engine.delete_queue(
            parsing.check_name(queue, "queue")))

    @app.route("/api/v1/queues/<queue>/clear", methods=["DELETE"])
    async def clear_queue(self, request, queue):
        partition = parsing.optional_name(query.text(request, "partition"), "partition")
        return json_answer(request, 200, await self._admin_engines().browser.clear_queue(
            parsing.check_name(queue, "queue"), partition))

    # -- the resource browser -----------------------------------------------------------

    @app.route("/api/v1/resources/overview", methods=["GET"])
    async def overview(self, request):
        return json_answer(request, 200, await self._admin_engines().browser.overview())

    @app.route("/api/v1/resources/namespaces", methods=["GET"])
    async def namespaces(self, request):
        return json_answer(request, 200, await self._admin_engines().browser.namespaces())

    @app.route("/api/v1/resources/tasks", methods=["GET"])
    async def tasks(self, request):
        return json_answer(request, 200, await self._admin_engines().browser.tasks())

    @app.route("/api/v1/resources/partitions", methods=["GET"])
    async def partitions(self, request):
        filters: Dict[str, Any] = {
            "queue": parsing.optional_name(query.text(request, "queue"), "queue"),
            **query.page(request, 100)}
        return json_answer(request, 200, await self._admin_engines().browser.partitions(
            {key: value for key, value in filters.items() if value is not None}))

    @app.route("/api/v1/stats/refresh", methods=["POST"])
    async def refresh_stats(self, request):
        return json_answer(request, 200, await self._admin_engines().stats.refresh())

    # -- messages -----------------------------------------------------------------------

    @app.route("/api/v1/messages", methods=["GET"])
    async def list_messages(self, request):
        return json_answer(request, 200, await self._admin_engines().browser.messages(
            query.message_filters(request)))

    @app.route("/api/v1/messages/<partition_id>/<path:transaction_id>", methods=["GET"])
    async def message_detail(self, request, partition_id, transaction_id):
        return json_answer(request, 200, await self._admin_engines().browser.message(
            *_message_key(partition_id, transaction_id)))

    @app.route("/api/v1/messages/<partition_id>/<path:transaction_id>", methods=["DELETE"])
    async def delete_message(self, request, partition_id, transaction_id):
        return json_answer(request, 200, await self._admin_engines().browser.delete_message(
            *_message_key(partition_id, transaction_id)))

    @app.route("/api/v1/messages/<partition_id>/<path:transaction_id>/retry", methods=["POST"])
    async def retry_message(self, request, partition_id, transaction_id):
        return json_answer(request, 200, await self._admin_engines().browser.retry_message(
            *_message_key(partition_id, transaction_id)))

    @app.route("/api/v1/messages/<partition_id>/<path:transaction_id>/dlq", methods=["POST"])
    async def dead_letter_message(self, request, partition_id, transaction_id):
        key = _message_key(partition_id, transaction_id)
        body = parsing.read_json_object(request)
        group = parsing.optional_text(body, "consumerGroup") or QUEUE_MODE
        error = parsing.optional_text(body, "error", max_length=10_000)
        return json_answer(request, 200, await self._admin_engines().browser
                           .dead_letter_message(*key, group, error))

    # -- dead letters and traces --------------------------------------------------------

    @app.route("/api/v1/dlq", methods=["GET"])
    async def dead_letters(self, request):
        filters: Dict[str, Any] = {
            "queue": parsing.optional_name(query.text(request, "queue"), "queue"),
            "consumerGroup": query.text(request, "consumerGroup"),
            "partition": parsing.optional_name(query.text(request, "partition"), "partition"),
            "from": parsing.timestamp(query.text(request, "from"), "from"),
            "to": parsing.timestamp(query.text(request, "to"), "to"),
            **query.page(request, 100),
        }
        return json_answer(request, 200, await self._engine.dead_letters(
            {key: value for key, value in filters.items() if value is not None}))

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
        if names and max(map(len, names)) > parsing.MAX_NAME_LENGTH:
            raise InvalidRequest(
                f"a trace name is longer than {parsing.MAX_NAME_LENGTH} characters")
        trace_id = await self._engine.add_trace({
            "transactionId": body["transactionId"], "partitionId": body["partitionId"],
            "consumerGroup": parsing.optional_text(body, "consumerGroup") or QUEUE_MODE,
            "traceNames": names or [],
            "eventType": parsing.optional_text(body, "eventType") or "info",
            "data": body["data"]})
        return json_answer(request, 201, {"success": True, "traceId": trace_id})

    @app.route("/api/v1/traces/names", methods=["GET"])
    async def trace_names(self, request):
        page = query.page(request, 50)
        return json_answer(request, 200, await self._engine.trace_names(
            page["limit"], page["offset"]))

    @app.route("/api/v1/traces/by-name/<path:name>", methods=["GET"])
    async def traces_by_name(self, request, name):
        page = query.page(request, 100)
        return json_answer(request, 200, await self._engine.traces_by_name(
            parsing.path_text(name, "name"), page["limit"], page["offset"]))

    @app.route("/api/v1/traces/<partition_id>/<path:transaction_id>", methods=["GET"])
    async def list_traces(self, request, partition_id, transaction_id):
        return json_answer(request, 200, await self._engine.traces(
            *_message_key(partition_id, transaction_id)))


def _message_key(partition_id: str, transaction_id: str) -> "tuple[str, str]":
    """A message's (partition id, transaction id) from the path."""
    return (parsing.require_uuid(parsing.path_text(partition_id, "partitionId"), "partitionId"),
            parsing.path_text(transaction_id, "transactionId"))
