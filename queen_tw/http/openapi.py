"""The OpenAPI 3.1 document of the whole HTTP API, served at ``GET /api/v1/openapi.json``.

One table below says, for every routed path and method, its parameters (with the types,
enums and bounds that :mod:`queen_tw.http.query` and :mod:`queen_tw.http.parsing` enforce),
its bodies, its answers and its access level (WIRE.md 4.2, as the ``x-queen-level``
extension). tests/test_openapi.py proves the table and the Klein URL maps agree both ways, and
tests/test_fuzz.py drives schemathesis with it against a live server, so the document cannot
drift from what is served without a test failing. The document is built once per process.
"""

import functools
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

from queen_tw import __version__, jsoncodec
from queen_tw.auth.levels import Level, RouteLevels, SkipPaths, routed_klein
from queen_tw.http import ephemeral_schemas as eph
from queen_tw.http import openapi_schemas as schemas
from queen_tw.http.answers import answering_errors
from queen_tw.http.openapi_schemas import Schema, ref
from queen_tw.http.query import INT32_MAX, MESSAGE_STATUSES
from queen_tw.http.status import ANSWERS as STATUS_ANSWERS
from queen_tw.http.status import INTERVALS, TIME_PARAMETER

OPENAPI_PATH = "/api/v1/openapi.json"

_LEVELS = RouteLevels(SkipPaths(()))
"""The auth gate's own table (WIRE.md 4.2), without skip paths: the level a deployment
starts from, shown on each operation as ``x-queen-level``."""

_DESCRIPTIONS = {
    400: "malformed body, path or query parameter",
    401: "authentication is on and the token is missing or invalid",
    403: "the token's role is below the route's level",
    404: "not found",
    409: "a streams query of that name is registered with another config_hash (the body "
         "also has success: false, query_id and name); a dead timer's retry whose timerKey "
         "has been scheduled again; a message's retry into a queue at its maxSize",
    413: "a streams state value, a KV key or a KV value, or a timer payload above its "
         "size limit",
    429: "an ephemeral queue is full and its policy is reject (code queue_full; Retry-After)",
    503: "PostgreSQL unreachable or the server overloaded (Retry-After: 1)",
}


def _query(name: str, schema: Schema, description: str = "") -> Dict[str, Any]:
    parameter: Dict[str, Any] = {"name": name, "in": "query", "required": False,
                                 "schema": schema}
    if description:
        parameter["description"] = description
    return parameter


def _path(name: str, schema: Schema) -> Dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema}


def _int(minimum: int, maximum: int = INT32_MAX) -> Schema:
    return {"type": "integer", "minimum": minimum, "maximum": maximum}


_QUEUE = _path("queue", schemas.NAME)
_PARTITION = _path("partition", schemas.NAME)
_GROUP = _path("group", {"type": "string", "minLength": 1})
_PARTITION_ID = _path("partitionId", schemas.UUID)
_TRANSACTION_ID = _path("transactionId", {"type": "string", "minLength": 1})
_PAGE = (_query("limit", _int(1), "page size; values above 1000 are capped"),
         _query("offset", _int(0)))
_NAME_FILTER = {"type": "string", "maxLength": schemas.MAX_NAME_LENGTH,
                "pattern": schemas.NAME_PATTERN}
_DELETE_METADATA = _query("deleteMetadata", schemas.BOOLEAN,
                          "also drop the group's subscription records (default true)")

_POP_PARAMS = (
    _query("batch", _int(1), "most messages in the answer (above 10000: 10000)"),
    _query("wait", schemas.BOOLEAN, "long-poll until a message comes or timeout passes"),
    _query("timeout", _int(-INT32_MAX), "long-poll limit in ms; <= 0 answers at once"),
    _query("consumerGroup", schemas.SHORT_TEXT, "default __QUEUE_MODE__ (queue mode)"),
    _query("autoAck", schemas.BOOLEAN),
    _query("subscriptionMode", {"type": "string"},
           "a named group's start on first contact: new or new-only = now; anything else "
           "(all, from_beginning, ...) = the beginning"),
    _query("subscriptionFrom", {"type": "string"}, "'now' or an ISO-8601 timestamp"),
    _query("autopilot", schemas.BOOLEAN,
           "the server chooses batch (100) and partitions when they are left out (WIRE2 8.3)"),
    _query("conflation", schemas.BOOLEAN, "last-value delivery for a named group; 400 in "
           "queue mode or with autoAck (WIRE2 8.4)"),
)
_PARTITIONS = _query("partitions", _int(1), "most partitions claimed by this pop")
_RANGE = (_query("from", TIME_PARAMETER, "default: an hour before to"),
          _query("to", TIME_PARAMETER, "default: now"))
_QUEUE_FILTERS = (_query("queue", _NAME_FILTER, "404 if no such queue"),
                  _query("namespace", {"type": "string"}), _query("task", {"type": "string"}))
_WORKER_FILTERS = (_query("hostname", {"type": "string"}), _query("workerId", {"type": "string"}))
_STATUS_LIMIT = _query("limit", {"type": "integer", "minimum": 1}, "values above 1000 are capped")


_KV_NS = _path("ns", {"type": "string", "pattern": "^[a-z0-9][a-z0-9._-]{0,63}$"})
_KV_KEY = _path("key", {"type": "string", "minLength": 1,
                        "description": "may contain '/' (a catch-all); at most 512 bytes"})
_KV_OPS = {"type": "array", "maxItems": 256, "items": {
    "type": "object", "required": ["op", "ns"],
    "properties": {"op": {"enum": ["get", "getMany", "getPrefix", "put", "putIfAbsent",
                                   "delete", "incr", "check"]},
                   "ns": {"type": "string"}}}}
_KV_REQUEST: Schema = {"anyOf": [schemas.obj(["operations"], operations=_KV_OPS), _KV_OPS]}
_KV_ELEMENT = schemas.obj([], index=schemas.INTEGER, op=schemas.STRING,
                          applied=schemas.BOOLEAN, found=schemas.BOOLEAN, key=schemas.STRING,
                          version=schemas.INTEGER, ok=schemas.BOOLEAN)
_KV_ANSWER = schemas.obj([], results=schemas.array(_KV_ELEMENT), ok={"const": False},
                         reason={"const": "kv_precondition"}, failedIndex=schemas.INTEGER,
                         kvReason=schemas.STRING)
_KV_PUT: Schema = {"type": "object", "properties": {
    "value": schemas.ANY_JSON, "ttlSeconds": schemas.INTEGER, "forever": {"const": True},
    "expect": schemas.INTEGER, "required": schemas.BOOLEAN}}
_KV_DELETE: Schema = {"type": "object", "properties": {
    "expect": schemas.INTEGER, "required": schemas.BOOLEAN}}
_LOCK_OPS = {"type": "array", "maxItems": 64, "items": {
    "type": "object", "required": ["op", "name"],
    "properties": {"op": {"enum": ["acquire", "renew", "release", "get"]},
                   "name": {"type": "string", "minLength": 1}}}}
_LOCKS_REQUEST: Schema = {"anyOf": [schemas.obj(["operations"], operations=_LOCK_OPS),
                                    _LOCK_OPS]}
_LOCKS_ANSWER = schemas.obj(["results"], results=schemas.array(schemas.obj(
    ["index", "op", "name"], index=schemas.INTEGER, op=schemas.STRING, name=schemas.STRING)))


class _Op:
    """One documented operation: what it reads, what it answers, who may call it."""

    def __init__(self, operation_id: str, summary: str,
                 answers: Dict[int, Optional[Schema]],
                 parameters: Sequence[Dict[str, Any]] = (),
                 body: Optional[Schema] = None, body_required: bool = False,
                 errors: Sequence[int] = (400, 503),
                 media_types: Sequence[str] = ("application/json",)):
        self.operation_id = operation_id
        self.summary = summary
        self.answers = answers
        self.parameters = list(parameters)
        self.body = body
        self.body_required = body_required
        self.errors = errors
        self.media_types = media_types

    def document(self, level: Level) -> Dict[str, Any]:
        """The OpenAPI operation object, for a route of ``level``."""
        responses: Dict[str, Any] = {}
        for code, schema in self.answers.items():
            if schema is None:
                responses[str(code)] = {"description": "nothing to deliver (no body)"}
            else:
                responses[str(code)] = {"description": "success", "content": {
                    media: {"schema": schema} for media in self.media_types}}
        codes = list(self.errors)
        if level != Level.PUBLIC:
            codes += [401, 403]
        for code in sorted(codes):
            responses[str(code)] = {"$ref": f"#/components/responses/E{code}"}
        operation: Dict[str, Any] = {
            "operationId": self.operation_id, "summary": self.summary,
            "x-queen-level": level.name, "responses": responses}
        if level == Level.PUBLIC:
            operation["security"] = []
        if self.parameters:
            operation["parameters"] = self.parameters
        if self.body is not None:
            operation["requestBody"] = {
                "required": self.body_required,
                "content": {"application/json": {"schema": self.body}}}
        return operation


_ANY_OBJECT: Schema = {"type": "object"}
_ANY_ARRAY: Schema = {"type": "array", "items": {"type": "object"}}

_MESSAGE_KEY = (_PARTITION_ID, _TRANSACTION_ID)

_STREAM_NAME: Schema = {"type": "string", "minLength": 1, "maxLength": schemas.MAX_NAME_LENGTH}
_STREAMS_REGISTER = schemas.obj(
    ["name", "source_queue", "config_hash"], name=_STREAM_NAME, source_queue=schemas.NAME,
    sink_queue=schemas.nullable(schemas.NAME),
    config_hash={"type": "string", "minLength": 1, "maxLength": 1024},
    reset=schemas.nullable(schemas.BOOLEAN))
_STREAMS_REGISTERED = schemas.obj(
    ["success", "query_id", "name", "config_hash", "fresh", "reset"],
    success={"const": True}, query_id=schemas.UUID, name=schemas.STRING,
    config_hash=schemas.STRING, fresh=schemas.BOOLEAN, reset=schemas.BOOLEAN)
_STATE_KEY: Schema = {"type": "string", "minLength": 1, "maxLength": 1024}
_STREAMS_CYCLE = schemas.obj(
    ["query_id", "partition_id"], query_id=schemas.UUID, partition_id=schemas.UUID,
    consumer_group=schemas.nullable(schemas.SHORT_TEXT),
    release_lease=schemas.nullable(schemas.BOOLEAN),
    state_ops=schemas.nullable(schemas.array(schemas.obj(
        ["type", "key"], type={"enum": ["upsert", "delete"]}, key=_STATE_KEY,
        value={"description": "any JSON value; required for an upsert"}))),
    push_items=schemas.nullable(schemas.array(ref("PushItem"))),
    ack=schemas.nullable(schemas.obj(
        ["transactionId"], transactionId=_STREAM_NAME, leaseId=schemas.nullable(schemas.UUID),
        status=schemas.nullable({"enum": ["completed", "success", "failed", "dlq"]}),
        count=schemas.nullable(_int(0)),
        error=schemas.nullable({"type": "string", "maxLength": 10_000}))))
_STREAMS_CYCLED = schemas.obj(
    ["success", "query_id", "partition_id", "state_ops_applied", "push_results",
     "ack_result"], success=schemas.BOOLEAN, query_id=schemas.UUID,
    partition_id=schemas.UUID, state_ops_applied=schemas.INTEGER,
    push_results=schemas.array(ref("PushResult")),
    ack_result=schemas.nullable(schemas.obj(
        ["success", "count", "lease_released", "dlq"], success=schemas.BOOLEAN,
        count=schemas.INTEGER, lease_released=schemas.BOOLEAN, dlq=schemas.BOOLEAN)),
    error=schemas.nullable(schemas.STRING))
_STREAMS_STATE_GET = schemas.obj(
    ["query_id", "partition_id"], query_id=schemas.UUID, partition_id=schemas.UUID,
    keys=schemas.nullable(schemas.array(schemas.STRING)),
    key_prefix=schemas.nullable({"type": "string", "maxLength": 1024}),
    ripe_at_or_before=schemas.nullable({"type": "number"}))
_STREAMS_STATE = schemas.obj(
    ["success", "rows"], success={"const": True}, rows=schemas.array(schemas.obj(
        ["key", "value", "updated_at"], key=schemas.STRING, value=schemas.ANY_JSON,
        updated_at=schemas.TIMESTAMP)))

_TIMER_KEY: Schema = {"type": "string", "minLength": 1, "maxLength": 1024}
_TIMER_OP = schemas.obj(
    ["op", "queue", "timerKey"], op={"enum": ["schedule", "reschedule", "cancel"]},
    queue=schemas.NAME, timerKey=_TIMER_KEY, partition=schemas.nullable(schemas.NAME),
    txn=schemas.nullable({"type": "string", "maxLength": schemas.MAX_NAME_LENGTH,
                          "description": "the fired message's transactionId; required to "
                                         "schedule"}),
    delayMs={"type": "number", "description": "ms from now; required to schedule; "
                                              "above 90 days 403"},
    payload={"type": "string", "contentEncoding": "base64",
             "description": "the message body (JSON), base64; required to schedule"},
    payloadZstd=schemas.nullable(schemas.BOOLEAN))
_TIMER_RESULT = schemas.obj(
    ["ok", "status", "queue", "timerKey"], ok=schemas.BOOLEAN,
    status={"enum": ["scheduled", "rescheduled", "cancelled", "absent", "too_late"]},
    queue=schemas.STRING, timerKey=schemas.STRING, txn=schemas.nullable(schemas.STRING),
    messageId=schemas.UUID, deliverAt=schemas.TIMESTAMP)
_TIMER_FIELDS: Dict[str, Schema] = dict(
    queue=schemas.STRING, timerKey=schemas.STRING, partition=schemas.STRING,
    deliverAt=schemas.TIMESTAMP, txn=schemas.STRING, messageId=schemas.UUID,
    payloadZstd=schemas.BOOLEAN, encrypted=schemas.BOOLEAN,
    producerSub=schemas.nullable(schemas.STRING), attempts=schemas.INTEGER,
    lastError=schemas.nullable(schemas.STRING), claimed=schemas.BOOLEAN,
    createdAt=schemas.TIMESTAMP, updatedAt=schemas.TIMESTAMP)
_TIMER_PEEK = schemas.obj(["found", "queue", "timerKey"], found=schemas.BOOLEAN,
                          payload={"type": "string", "contentEncoding": "base64"},
                          **_TIMER_FIELDS)
_TIMER_PAGE = schemas.obj(["rows", "truncated", "nextAfter"],
                          rows=schemas.array(schemas.obj(list(_TIMER_FIELDS), **_TIMER_FIELDS)),
                          truncated=schemas.BOOLEAN,
                          nextAfter=schemas.nullable(schemas.STRING))
_TIMER_PATH = (_QUEUE, _path("timerKey", _TIMER_KEY))

OPERATIONS: List[Tuple[str, str, _Op]] = [
    # -- the message path (WIRE.md 2.1-2.7) --
    ("/api/v1/configure", "post", _Op(
        "configure", "Create or replace one queue's options",
        {200: ref("ConfigureAnswer")}, body=ref("ConfigureRequest"), body_required=True)),
    ("/api/v1/push", "post", _Op(
        "push", "Push messages (one result per item, in order)",
        {201: {"type": "array", "items": ref("PushResult")}},
        body=ref("PushRequest"), body_required=True)),
    ("/api/v1/pop/queue/{queue}", "get", _Op(
        "popQueue", "Pop from any partition of a queue",
        {200: ref("PopAnswer"), 204: None}, [_QUEUE, *_POP_PARAMS, _PARTITIONS])),
    ("/api/v1/pop/queue/{queue}/partition/{partition}", "get", _Op(
        "popPartition", "Pop from one partition",
        {200: ref("PopAnswer"), 204: None}, [_QUEUE, _PARTITION, *_POP_PARAMS])),
    ("/api/v1/pop", "get", _Op(
        "popNamespace", "Pop from the queues of a namespace and/or task",
        {200: ref("PopAnswer"), 204: None},
        [_query("namespace", {"type": "string"}, "namespace or task is required"),
         _query("task", {"type": "string"}), *_POP_PARAMS, _PARTITIONS])),
    ("/api/v1/ack", "post", _Op(
        "ack", "Acknowledge one message",
        {200: {"type": "array", "items": ref("AckResult")}},
        body=ref("AckRequest"), body_required=True)),
    ("/api/v1/ack/batch", "post", _Op(
        "ackBatch", "Acknowledge several messages",
        {200: {"type": "array", "items": ref("AckResult")}},
        body=ref("AckBatchRequest"), body_required=True)),
    ("/api/v1/transaction", "post", _Op(
        "transaction", "Pushes and acks that commit together or not at all",
        {200: ref("TransactionAnswer")}, body=ref("TransactionRequest"), body_required=True)),
    ("/api/v1/lease/{leaseId}/extend", "post", _Op(
        "extendLease", "Extend every partition lease held under one lease id",
        {200: ref("LeaseExtendAnswer")}, [_path("leaseId", schemas.UUID)],
        body=ref("LeaseExtendRequest"), errors=(400, 404, 503))),
    # -- queues and the resource browser (WIRE.md 2.7, 3.1) --
    ("/api/v1/resources/queues", "get", _Op(
        "listQueues", "Every queue with its counts", {200: ref("QueueList")})),
    ("/api/v1/resources/queues/{queue}", "get", _Op(
        "getQueue", "One queue with its partitions", {200: _ANY_OBJECT}, [_QUEUE],
        errors=(400, 404, 503))),
    ("/api/v1/resources/queues/{queue}/depth", "get", _Op(
        "getQueueDepth", "A queue's backlog per partition, for one group or the worst of them",
        {200: ref("QueueDepth")},
        [_QUEUE, _query("group", schemas.SHORT_TEXT, "default: every group's worst")],
        errors=(400, 404, 503))),
    ("/api/v1/resources/queues/{queue}", "delete", _Op(
        "deleteQueue", "Delete a queue and everything in it",
        {200: ref("QueueDeleted")}, [_QUEUE])),
    ("/api/v1/queues/{queue}/clear", "delete", _Op(
        "clearQueue", "Delete a queue's (or one partition's) messages",
        {200: _ANY_OBJECT}, [_QUEUE, _query("partition", _NAME_FILTER)],
        errors=(400, 404, 503))),
    ("/api/v1/resources/overview", "get", _Op(
        "overview", "Counts over the whole server", {200: ref("Overview")})),
    ("/api/v1/resources/namespaces", "get", _Op(
        "namespaces", "Namespaces with their counts", {200: ref("NamespaceList")})),
    ("/api/v1/resources/tasks", "get", _Op(
        "tasks", "Tasks with their counts", {200: ref("TaskList")})),
    ("/api/v1/resources/partitions", "get", _Op(
        "partitions", "Partitions, optionally of one queue",
        {200: ref("PartitionList")}, [_query("queue", _NAME_FILTER), *_PAGE])),
    ("/api/v1/stats/refresh", "post", _Op(
        "refreshStats", "Recompute the statistics now", {200: _ANY_OBJECT})),
    # -- messages, dead letters, traces (WIRE.md 3.2, 3.3, 3.6) --
    ("/api/v1/messages", "get", _Op(
        "listMessages", "Messages, newest first", {200: ref("MessageList")},
        [_query("queue", _NAME_FILTER), _query("partition", _NAME_FILTER),
         _query("ns", {"type": "string"}), _query("namespace", {"type": "string"}),
         _query("task", {"type": "string"}),
         _query("status", {"type": "string", "enum": list(MESSAGE_STATUSES)}),
         _query("from", schemas.TIME_INPUT), _query("to", schemas.TIME_INPUT), *_PAGE])),
    ("/api/v1/messages/{partitionId}/{transactionId}", "get", _Op(
        "getMessage", "One message with its payload", {200: _ANY_OBJECT},
        _MESSAGE_KEY, errors=(400, 404, 503))),
    ("/api/v1/messages/{partitionId}/{transactionId}", "delete", _Op(
        "deleteMessage", "Delete one message", {200: _ANY_OBJECT}, _MESSAGE_KEY,
        errors=(400, 404, 503))),
    ("/api/v1/messages/{partitionId}/{transactionId}/retry", "post", _Op(
        "retryMessage", "Enqueue a copy of a message at its partition's tail (a dead "
        "timer's message: schedule the timer again, due now)",
        {200: _ANY_OBJECT}, _MESSAGE_KEY, errors=(400, 404, 409, 503))),
    ("/api/v1/messages/{partitionId}/{transactionId}/dlq", "post", _Op(
        "deadLetterMessage", "Move a message to the dead-letter queue",
        {200: _ANY_OBJECT}, _MESSAGE_KEY, body=ref("MessageDlqRequest"),
        errors=(400, 404, 503))),
    ("/api/v1/dlq", "get", _Op(
        "deadLetters", "Dead letters, newest failure first",
        {200: ref("DeadLetters")},
        [_query("queue", _NAME_FILTER), _query("consumerGroup", {"type": "string"}),
         _query("partition", _NAME_FILTER), _query("from", schemas.TIME_INPUT),
         _query("to", schemas.TIME_INPUT), *_PAGE])),
    ("/api/v1/traces", "post", _Op(
        "addTrace", "Record a trace event on a message",
        {201: ref("TraceCreated")}, body=ref("TraceRequest"), body_required=True,
        errors=(400, 404, 503))),
    ("/api/v1/traces/{partitionId}/{transactionId}", "get", _Op(
        "listTraces", "A message's trace events, oldest first",
        {200: ref("Traces")}, _MESSAGE_KEY)),
    ("/api/v1/traces/names", "get", _Op(
        "traceNames", "Trace names with their event and message counts, newest use first",
        {200: ref("TraceNames")}, [*_PAGE])),
    ("/api/v1/traces/by-name/{name}", "get", _Op(
        "tracesByName", "The trace events carrying a name, oldest first, with their messages",
        {200: ref("TracesByName")}, [_path("name", {"type": "string", "minLength": 1}), *_PAGE],
        errors=(400, 503))),
    # -- consumer groups (WIRE.md 3.5) --
    ("/api/v1/consumer-groups", "get", _Op(
        "listGroups", "One row per (group, queue)", {200: ref("GroupRows")})),
    ("/api/v1/consumer-groups/lagging", "get", _Op(
        "laggingGroups", "Partitions whose oldest unconsumed message is old",
        {200: _ANY_ARRAY}, [_query("minLagSeconds", _int(0))])),
    ("/api/v1/consumer-groups/{group}", "get", _Op(
        "getGroup", "A group's partitions per queue", {200: ref("GroupDetail")},
        [_GROUP])),
    ("/api/v1/consumer-groups/{group}", "delete", _Op(
        "deleteGroup", "Drop a group's cursors and leases", {200: _ANY_OBJECT},
        [_GROUP, _DELETE_METADATA])),
    ("/api/v1/consumer-groups/{group}/queues/{queue}", "delete", _Op(
        "deleteGroupForQueue", "Drop a group's cursors and leases on one queue",
        {200: _ANY_OBJECT}, [_GROUP, _QUEUE, _DELETE_METADATA])),
    ("/api/v1/consumer-groups/{group}/subscription", "post", _Op(
        "setSubscription", "Move the start of a group's subscriptions",
        {200: _ANY_OBJECT}, [_GROUP], body=ref("SubscriptionRequest"), body_required=True)),
    ("/api/v1/consumer-groups/{group}/queues/{queue}/seek", "post", _Op(
        "seek", "Move a group's cursors on a queue to the end or a time",
        {200: _ANY_OBJECT}, [_GROUP, _QUEUE], body=ref("SeekRequest"), body_required=True,
        errors=(400, 404, 503))),
    ("/api/v1/consumer-groups/{group}/queues/{queue}/partitions/{partition}/seek", "post",
     _Op("seekPartition", "Move a group's cursor on one partition to its end",
        {200: _ANY_OBJECT}, [_GROUP, _QUEUE, _PARTITION], errors=(400, 404, 503))),
    # -- the server itself (WIRE.md 2.8, 3.7) --
    ("/health", "get", _Op(
        "health", "Whether the database answers",
        {200: ref("Health"), 503: ref("Health")}, errors=())),
    ("/api/v1/system/maintenance", "get", _Op(
        "maintenanceStatus", "The push maintenance flag and the file buffer",
        {200: ref("MaintenanceStatus")}, errors=(503,))),
    ("/api/v1/system/maintenance", "post", _Op(
        "setMaintenance", "Divert pushes to the file buffer (or drain it)",
        {200: ref("MaintenanceSet")}, body=ref("EnabledFlag"), body_required=True)),
    ("/api/v1/system/maintenance/pop", "get", _Op(
        "popMaintenanceStatus", "The pop maintenance flag",
        {200: ref("PopMaintenance")}, errors=(503,))),
    ("/api/v1/system/maintenance/pop", "post", _Op(
        "setPopMaintenance", "Make every pop answer 204 (or stop)",
        {200: ref("PopMaintenance")}, body=ref("EnabledFlag"), body_required=True)),
    ("/api/v1/status/buffers", "get", _Op(
        "bufferStatus", "The file buffer of this worker",
        {200: ref("BufferStatus")}, errors=(503,))),
    # -- status and analytics for dashboards (WIRE.md 3.4; queen_tw/http/status.py) --
    ("/api/v1/status", "get", _Op(
        "status", "Throughput, queues, counts, leases, workers and errors over a range",
        {200: STATUS_ANSWERS["status"]}, [*_RANGE, *_QUEUE_FILTERS], errors=(400, 404, 503))),
    ("/api/v1/status/queues", "get", _Op(
        "statusQueues", "A page of queues with their counts",
        {200: STATUS_ANSWERS["queues"]},
        [*_RANGE, *_QUEUE_FILTERS[1:], _STATUS_LIMIT, _query("offset", _int(0))])),
    ("/api/v1/status/queues/{queue}", "get", _Op(
        "statusQueue", "A queue, its options, partitions, cursors and group lag",
        {200: STATUS_ANSWERS["queue"]}, [_QUEUE], errors=(400, 404, 503))),
    ("/api/v1/status/queues/{queue}/messages", "get", _Op(
        "statusQueueMessages", "A page of a queue's messages, newest first",
        {200: STATUS_ANSWERS["queueMessages"]},
        [_QUEUE, _STATUS_LIMIT, _query("offset", _int(0))], errors=(400, 404, 503))),
    ("/api/v1/status/analytics", "get", _Op(
        "statusAnalytics", "Queue operations per minute, hour or day",
        {200: STATUS_ANSWERS["analytics"]},
        [*_RANGE, *_QUEUE_FILTERS,
         _query("interval", {"type": "string", "enum": list(INTERVALS)}, "default hour")],
        errors=(400, 404, 503))),
    ("/api/v1/analytics/system-metrics", "get", _Op(
        "systemMetrics", "The workers' figures summed per time bucket",
        {200: STATUS_ANSWERS["systemMetrics"]}, [*_RANGE, *_WORKER_FILTERS])),
    ("/api/v1/analytics/worker-metrics", "get", _Op(
        "workerMetrics", "One time series per worker",
        {200: STATUS_ANSWERS["workerMetrics"]}, [*_RANGE, *_WORKER_FILTERS])),
    ("/api/v1/analytics/postgres-stats", "get", _Op(
        "postgresStats", "Database size, cache hits, connections, tables and indexes",
        {200: STATUS_ANSWERS["postgresStats"]}, errors=(503,))),
    ("/api/v1/analytics/queue-lag", "get", _Op(
        "queueLag", "Pop lag per queue and time bucket",
        {200: STATUS_ANSWERS["queueLag"]}, [*_RANGE, _QUEUE_FILTERS[0]],
        errors=(400, 404, 503))),
    ("/api/v1/analytics/queue-ops", "get", _Op(
        "queueOps", "Operations per queue and time bucket",
        {200: STATUS_ANSWERS["queueOps"]}, [*_RANGE, _QUEUE_FILTERS[0]],
        errors=(400, 404, 503))),
    ("/api/v1/analytics/queue-parked-replicas", "get", _Op(
        "queueParkedReplicas", "Long polls parked per queue and time bucket",
        {200: STATUS_ANSWERS["queueParked"]}, [*_RANGE, _QUEUE_FILTERS[0]],
        errors=(400, 404, 503))),
    ("/api/v1/analytics/retention", "get", _Op(
        "retention", "Rows and oldest row of each table retention prunes",
        {200: STATUS_ANSWERS["retention"]}, [*_RANGE, _QUEUE_FILTERS[0]],
        errors=(400, 404, 503))),
    ("/internal/api/notify", "post", _Op(
        "notify", "Wake the pops waiting on a queue here and on the peers",
        {200: ref("NotifyAnswer")}, body=ref("NotifyRequest"), body_required=True,
        errors=(400,))),
    ("/api/v1/system/shared-state", "get", _Op(
        "sharedState", "Peer-sync statistics", {200: ref("SharedState")}, errors=())),
    ("/internal/api/shared-state/stats", "get", _Op(
        "sharedStateInternal", "Peer-sync statistics (alias)",
        {200: ref("SharedState")}, errors=())),
    ("/internal/api/inter-instance/stats", "get", _Op(
        "interInstanceStats", "Peer-sync statistics (alias)",
        {200: ref("SharedState")}, errors=())),
    (OPENAPI_PATH, "get", _Op(
        "openapi", "This document", {200: {"type": "object"}}, errors=())),
    # -- streams (WIRE.md 3.9) --
    ("/streams/v1/queries", "post", _Op(
        "registerStreamQuery", "Register a streaming query (idempotent for the same hash)",
        {200: _STREAMS_REGISTERED}, body=_STREAMS_REGISTER, body_required=True,
        errors=(400, 409, 503))),
    ("/streams/v1/cycle", "post", _Op(
        "streamCycle", "Commit a stream cycle: state ops, sink pushes and the source ack "
        "in one transaction (a failure answers 200 with success false)",
        {200: _STREAMS_CYCLED}, body=_STREAMS_CYCLE, body_required=True,
        errors=(400, 404, 413, 503))),
    ("/streams/v1/state/get", "post", _Op(
        "streamState", "Read a streaming query's state on one partition",
        {200: _STREAMS_STATE}, body=_STREAMS_STATE_GET, body_required=True,
        errors=(400, 404, 503))),
    # -- reads by offset (WIRE2.md 6): no lease, no cursor --
    ("/api/v1/fetch", "post", _Op(
        "fetch", "Read partitions' records from offsets (long poll with maxWaitMs)",
        {200: ref("FetchAnswer")}, body=ref("FetchRequest"))),
    ("/api/v1/partitions/changed", "post", _Op(
        "partitionsChanged", "A queue's partitions, or those written since a time, by pages",
        {200: ref("PartitionsChangedAnswer")}, body=ref("PartitionsChangedRequest"))),
    # -- KV state and locks (WIRE2.md 2, 4; queen_tw/http/kv.py) --
    ("/api/v1/kv", "post", _Op(
        "kv", "KV ops in one transaction, results index-aligned (a lost precondition is a "
        "verdict: 200)", {200: _KV_ANSWER}, body=_KV_REQUEST, body_required=True,
        errors=(400, 413, 503))),
    ("/api/v1/kv/{ns}/{key}", "get", _Op(
        "kvGet", "One key (the get element, ETag = version)", {200: _KV_ELEMENT},
        [_KV_NS, _KV_KEY])),
    ("/api/v1/kv/{ns}/{key}", "put", _Op(
        "kvPut", "Write one key", {200: _KV_ELEMENT}, [_KV_NS, _KV_KEY], body=_KV_PUT,
        body_required=True, errors=(400, 413, 503))),
    ("/api/v1/kv/{ns}/{key}", "delete", _Op(
        "kvDelete", "Delete one key", {200: _KV_ELEMENT}, [_KV_NS, _KV_KEY],
        body=_KV_DELETE)),
    ("/api/v1/locks", "post", _Op(
        "locks", "Lock and semaphore ops (independent), one result each",
        {200: _LOCKS_ANSWER}, body=_LOCKS_REQUEST, body_required=True)),
    # -- ephemeral queues (WIRE2.md 7; queen_tw/http/ephemeral.py): {error, code} refusals --
    ("/api/v1/ephemeral/configure", "post", _Op(
        "ephemeralConfigure", "Declare an ephemeral queue (options stored in PostgreSQL)",
        {201: eph.DECLARATION}, body=eph.CONFIGURE, body_required=True)),
    ("/api/v1/ephemeral/reset", "post", _Op(
        "ephemeralReset", "Drop an ephemeral queue's messages, leases and cursors",
        {200: eph.RESET_ANSWER}, body=eph.QUEUE_ONLY, body_required=True)),
    ("/api/v1/ephemeral/queue/{queue}", "delete", _Op(
        "ephemeralDelete", "Delete an ephemeral queue and its declaration",
        {200: eph.DELETE_ANSWER}, [_path("queue", eph.PATH_NAME)])),
    ("/api/v1/ephemeral/push", "post", _Op(
        "ephemeralPush", "Push to one partition of an ephemeral queue, all or nothing",
        {201: eph.PUSH_ANSWER}, body=eph.PUSH, body_required=True, errors=(400, 429, 503))),
    ("/api/v1/ephemeral/pop", "get", _Op(
        "ephemeralPop", "Pop from an ephemeral queue (an empty list, never 204)",
        {200: eph.POP_ANSWER},
        [{**_query("queue", eph.NAME), "required": True}, _query("partition", eph.NAME),
         _query("group", eph.NAME, "none = queue mode"),
         _query("batch", _int(1), "most messages (above 10000: 10000)"),
         _query("wait", schemas.BOOLEAN),
         _query("timeout", _int(0), "long-poll limit in ms (above 300000: 300000)"),
         _query("autoAck", schemas.BOOLEAN, "commit at delivery, no lease")])),
    ("/api/v1/ephemeral/ack", "post", _Op(
        "ephemeralAck", "Settle deliveries: acked, redelivered, stale or unknown per id",
        {200: eph.ACK_ANSWER}, body=eph.ACK, body_required=True)),
    ("/api/v1/ephemeral/queues", "get", _Op(
        "ephemeralQueues", "Every ephemeral queue (of every QUEEN_EPHEMERAL_PEERS member) "
        "with gauges and options", {200: eph.QUEUES_ANSWER}, errors=(503,))),
    ("/api/v1/ephemeral/queues/{queue}/depth", "get", _Op(
        "ephemeralDepth", "An ephemeral queue's backlog per partition and group",
        {200: eph.DEPTH_ANSWER}, [_path("queue", eph.PATH_NAME), _query("group", eph.NAME)],
        errors=(400, 404, 503))),
    # -- timers (WIRE2.md 3; refusals in the {error, reason, detail} envelope) --
    ("/api/v1/timers", "post", _Op(
        "timersBatch", "Schedule, reschedule or cancel timers (at most 256 ops, one "
        "transaction); results index-aligned, verdicts (too_late, absent) are 200s",
        {200: schemas.obj(["results"], results=schemas.array(_TIMER_RESULT))},
        body=schemas.obj(["operations"], operations=schemas.array(_TIMER_OP)),
        body_required=True, errors=(400, 413, 503))),
    ("/api/v1/timers/{queue}", "get", _Op(
        "timersList", "A keyset page of a queue's pending timers, in timerKey byte order",
        {200: _TIMER_PAGE},
        [_QUEUE, _query("after", {"type": "string"}, "exclusive timerKey cursor"),
         _query("limit", {"type": "string"}, "default 100, clamped to 1..1000")])),
    ("/api/v1/timers/{queue}/{timerKey}", "get", _Op(
        "timerPeek", "One pending timer with its payload as stored (found false if none)",
        {200: _TIMER_PEEK}, _TIMER_PATH)),
    ("/api/v1/timers/{queue}/{timerKey}", "delete", _Op(
        "timerCancel", "Cancel a pending timer: cancelled, absent (maybe delivered) or "
        "too_late (being fired)", {200: _TIMER_RESULT},
        [*_TIMER_PATH, _query("txn", {"type": "string"}, "echoed when absent")])),
    # -- the dashboard (issue 18 point 6): public static files --
    ("/", "get", _Op(
        "dashboard", "The dashboard page", {200: {"type": "string"}}, errors=(),
        media_types=("text/html",))),
    ("/dashboard/{name}", "get", _Op(
        "dashboardFile", "A script or style sheet of the dashboard page",
        {200: {"type": "string"}}, [_path("name", {"type": "string", "minLength": 1})],
        errors=(400, 404), media_types=("text/javascript", "text/css", "image/svg+xml"))),
    # -- metrics (WIRE.md 3.8; queen_tw/http/metrics_routes.py): public --
    ("/metrics", "get", _Op(
        "metrics", "This worker's uptime, request and message totals and rates, pool, memory "
        "(no V8 heap: its fields are 0) and CPU (microseconds)",
        {200: {"type": "object", "required": ["uptime", "requests", "messages", "database",
                                               "memory", "cpu"],
               "properties": {
                   "uptime": {"type": "number"},
                   **{part: {"type": "object", "required": list(fields),
                             "properties": {field: {"type": "number"} for field in fields}}
                      for part, fields in (
                          ("requests", ("total", "rate")), ("messages", ("total", "rate")),
                          ("database", ("poolSize", "idleConnections", "waitingRequests")),
                          ("memory", ("rss", "heapTotal", "heapUsed", "external",
                                      "arrayBuffers")),
                          ("cpu", ("user", "system")))}}}},
        errors=())),
    ("/metrics/prometheus", "get", _Op(
        "prometheus", "Prometheus text format 0.0.4: this worker's families and, when "
        "PostgreSQL answers, the cluster's", {200: {"type": "string"}}, errors=(),
        media_types=("text/plain",))),
]


def _example_path(path: str) -> str:
    """``path`` with each ``{variable}`` filled in, as a request would name it."""
    return re.sub(r"\{[^{}]+\}", "x", path)


def _error_responses() -> Dict[str, Any]:
    return {f"E{code}": {"description": text,
                         "content": {"application/json": {"schema": ref("Error")}}}
            for code, text in _DESCRIPTIONS.items()}


@functools.cache
def openapi_document() -> Dict[str, Any]:
    """The document as a dict (built once; callers must not change it)."""
    paths: Dict[str, Dict[str, Any]] = {}
    for path, method, operation in OPERATIONS:
        level = _LEVELS.level_of(method.upper().encode(), _example_path(path).encode())
        paths.setdefault(path, {})[method] = operation.document(level)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "queen-tw",
            "version": __version__,
            "description": (
                "PostgreSQL-backed message queue, wire-compatible with Queen MQ (docs/API.md). "
                "Every 4xx/5xx body is {\"error\": text}. Every path also answers OPTIONS "
                "with 204 and CORS headers, without authentication. With JWT_ENABLED=true "
                "each operation needs a bearer token whose role reaches its x-queen-level."),
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "bearerFormat": "JWT"}},
            "schemas": schemas.COMPONENTS,
            "responses": _error_responses(),
        },
    }


@functools.cache
def _document_bytes() -> bytes:
    return jsoncodec.dumps(openapi_document())


class OpenApiRoutes:
    """Serves the document (public, WIRE.md 4.2 as extended here)."""

    app = answering_errors(routed_klein())

    @app.route("/api/v1/openapi.json", methods=["GET"])  # = OPENAPI_PATH, written out
    def openapi(self, request):
        request.setResponseCode(200)
        body = _document_bytes()
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Content-Length", b"%d" % len(body))
        return body
