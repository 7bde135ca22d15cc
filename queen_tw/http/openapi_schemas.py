"""JSON Schemas of the bodies the HTTP API reads and writes, for the OpenAPI document.

They describe what the route code accepts and answers (see :mod:`queen_tw.http.parsing`,
:mod:`queen_tw.http.query` and docs/API.md), not an ideal: the schemathesis run in
tests/test_fuzz.py checks every answer against them, so a schema that is stricter or looser
than the server shows up there. Success bodies list the keys clients rely on and leave the
rest open, since the contract lets the server add keys.
"""

from typing import Any, Dict, List

from queen_tw.http.parsing import MAX_NAME_LENGTH, QUEUE_OPTIONS
from queen_tw.http.query import INT32_MAX

Schema = Dict[str, Any]

NAME_PATTERN = "^[^/\\u0000]*$"
"""A queue or partition name is one path segment of the pop routes: no ``/`` and no NUL."""


def ref(name: str) -> Schema:
    """A reference to ``components/schemas/name``."""
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: Schema) -> Schema:
    """``schema`` or JSON null (clients send null for an unset optional field)."""
    return {"anyOf": [schema, {"type": "null"}]}


def obj(required: List[str], **properties: Schema) -> Schema:
    """An object with ``properties`` (``required`` among them) that may carry other keys."""
    schema: Schema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema


def array(items: Schema) -> Schema:
    return {"type": "array", "items": items}


STRING: Schema = {"type": "string"}
BOOLEAN: Schema = {"type": "boolean"}
INTEGER: Schema = {"type": "integer"}
UUID: Schema = {"type": "string", "format": "uuid"}
TIMESTAMP: Schema = {"type": "string", "description": "ISO-8601, UTC with Z"}
TIME_INPUT: Schema = {"type": "string", "format": "date-time",
                      "description": "any ISO-8601 date or date-time Python reads; no offset "
                                     "means UTC; years 1-9999 once in UTC"}
NAME: Schema = {"type": "string", "minLength": 1, "maxLength": MAX_NAME_LENGTH,
                "pattern": NAME_PATTERN}
SHORT_TEXT: Schema = {"type": "string", "maxLength": MAX_NAME_LENGTH}
ANY_JSON: Schema = {"description": "any JSON value"}


def _option(kind: str, name: str) -> Schema:
    """A configure option: a JSON value or its string form (WIRE.md 2.1)."""
    if kind == "bool":
        return nullable({"anyOf": [BOOLEAN, {"type": "string", "enum": ["true", "false"]}]})
    low = -INT32_MAX if name == "priority" else 0
    return nullable({"anyOf": [
        {"type": "integer", "minimum": low, "maximum": INT32_MAX},
        {"type": "string", "pattern": "^[0-9]{1,9}$"}]})


def _echoed_option(kind: str) -> Schema:
    return BOOLEAN if kind == "bool" else INTEGER


_PUSH_ITEM = obj(
    ["queue"],
    queue=NAME,
    partition=nullable(NAME),
    payload=ANY_JSON,
    transactionId=nullable(SHORT_TEXT),
    traceId=nullable(UUID),
    producerSub={"description": "ignored: the server stamps the token's sub"})

_ACK_FIELDS: Dict[str, Schema] = {
    "transactionId": {"type": "string", "minLength": 1},
    "partitionId": UUID,
    "status": nullable({"type": "string",
                        "enum": ["completed", "success", "failed", "dlq", "retry"]}),
    "consumerGroup": nullable(SHORT_TEXT),
    "leaseId": nullable({"anyOf": [UUID, {"const": ""}]}),
    "error": nullable({"type": "string", "maxLength": 10_000}),
}

_POPPED_MESSAGE = obj(
    ["id", "transactionId", "partitionId", "leaseId", "partition", "consumerGroup",
     "data", "traceId", "producerSub", "createdAt"],
    id=UUID, transactionId=STRING, partitionId=UUID, leaseId=STRING, partition=STRING,
    consumerGroup=STRING, data=ANY_JSON, traceId=nullable(STRING),
    producerSub=nullable(STRING), createdAt=TIMESTAMP, queue=STRING, retryCount=INTEGER,
    deliveryAttempt=INTEGER, offset=INTEGER)

_HEALTH = obj(
    ["status", "database", "server", "worker_id", "version"],
    status={"enum": ["healthy", "unhealthy"]},
    database={"enum": ["connected", "disconnected"]},
    server=STRING, worker_id=STRING, version=STRING,
    shared_state=obj(["enabled"], enabled=BOOLEAN),
    queen=obj(["worker_id", "status"], worker_id=STRING, status=STRING),
    file_buffer=obj(["pending", "failed", "healthy"], pending=INTEGER, failed=INTEGER,
                    healthy=BOOLEAN))

NUMBER: Schema = {"type": "number"}
_COUNTS = obj(["total", "pending"], total=INTEGER, pending=INTEGER, processing=INTEGER)
_STATS = obj([], **{key: NUMBER for key in ("avg", "median", "min", "max")})
_PAGE = {"limit": INTEGER, "offset": INTEGER, "total": INTEGER}

_READ_ERRORS: Schema = {"enum": ["UNKNOWN_TOPIC_OR_PARTITION", "OFFSET_OUT_OF_RANGE",
                                  "BAD_CURSOR"]}
_READS: Dict[str, Schema] = {
    "FetchRequest": obj(
        [], entries=nullable({**array(obj(
            ["queue", "offset"], queue=NAME,
            partition=nullable({"anyOf": [NAME, INTEGER]}),
            offset={"type": "integer", "minimum": 0},
            maxBytes=nullable(INTEGER))), "maxItems": 1024}),
        maxBytes=nullable(INTEGER), maxWaitMs=nullable({"type": "integer", "minimum": 0}),
        minBytes=nullable(INTEGER)),
    "FetchAnswer": obj(["entries"], entries=array(obj(
        ["queue", "partition", "records", "highWatermark", "logStartOffset"],
        queue=STRING, partition=STRING, highWatermark=INTEGER, logStartOffset=INTEGER,
        error=_READ_ERRORS, records=array(obj(
            ["offset", "transactionId", "payload", "ts"], offset=INTEGER,
            transactionId=STRING, payload=ANY_JSON, ts=TIMESTAMP))))),
    "PartitionsChangedRequest": obj(
        [], entries=nullable({**array(obj(
            ["queue"], queue=NAME, since=nullable(STRING), after=nullable(STRING),
            limit=nullable(INTEGER))), "maxItems": 64})),
    "PartitionsChangedAnswer": obj(
        ["entries", "safeTime"], safeTime=TIMESTAMP, safeTimeDegraded=BOOLEAN,
        entries=array(obj(
            ["queue", "partitions", "next"], queue=STRING, next=nullable(STRING),
            error=_READ_ERRORS, partitions=array(obj(
                ["name", "id", "lastOffset", "logStart", "lastWriteAt"], name=STRING, id=UUID,
                lastOffset=INTEGER, logStart=INTEGER, lastWriteAt=nullable(TIMESTAMP)))))),
}
"""Reads by offset (WIRE2.md 6)."""

COMPONENTS: Dict[str, Schema] = {
    **_READS,
    "Error": {"type": "object", "required": ["error"],
              "properties": {"error": {"type": "string"}}},
    "ConfigureRequest": obj(
        ["queue"], queue=NAME, namespace=nullable(SHORT_TEXT), task=nullable(SHORT_TEXT),
        options=nullable(obj([], **{name: _option(kind, name)
                                    for name, (kind, _default) in QUEUE_OPTIONS.items()}))),
    "ConfigureAnswer": obj(
        ["configured", "queueId", "partitionId", "queue", "namespace", "task", "options"],
        configured={"const": True}, queueId=UUID, partitionId=UUID, queue=STRING,
        namespace=STRING, task=STRING,
        options=obj(list(QUEUE_OPTIONS), **{name: _echoed_option(kind)
                                            for name, (kind, _default) in
                                            QUEUE_OPTIONS.items()})),
    "PushItem": _PUSH_ITEM,
    "PushRequest": obj(["items"], items=array(ref("PushItem")),
                       bufferMs=ANY_JSON, bufferMax=ANY_JSON),
    "PushResult": obj(["status"], index=INTEGER,
                      status={"enum": ["queued", "duplicate", "buffered", "failed"]},
                      transaction_id=STRING, message_id=UUID, partition_id=UUID,
                      trace_id=nullable(STRING), queueName=STRING, error=nullable(STRING)),
    "PopAnswer": obj(
        ["success", "messages"], success={"const": True}, queue=nullable(STRING),
        partition=nullable(STRING), partitionId=nullable(UUID), leaseId=STRING,
        consumerGroup=STRING, messages=array(_POPPED_MESSAGE), partitionsClaimed=INTEGER,
        autopilot=obj(["partitions", "batch", "waitMs"], partitions=INTEGER, batch=INTEGER,
                      waitMs=INTEGER),
        conflation={"const": True}, conflationConflict={"const": True}),
    "QueueDepth": obj(
        ["queue", "group", "pending", "partitionsPending", "conflation", "effectivePending",
         "partitions"], queue=STRING, group=nullable(STRING), pending=INTEGER,
        partitionsPending=INTEGER, conflation=BOOLEAN, effectivePending=INTEGER,
        partitions=array(obj(["partition", "pending"], partition=STRING, pending=INTEGER))),
    "AckRequest": obj(["transactionId", "partitionId"], **_ACK_FIELDS),
    "AckBatchRequest": obj(
        ["acknowledgments"], consumerGroup=nullable(SHORT_TEXT),
        acknowledgments=array(obj(["transactionId", "partitionId"], **_ACK_FIELDS))),
    "AckResult": obj(["index", "transactionId", "success", "error"],
                     index=INTEGER, transactionId=STRING, success=BOOLEAN,
                     error=nullable(STRING), queueName=nullable(STRING),
                     partitionName=nullable(STRING), leaseReleased=BOOLEAN, dlq=BOOLEAN),
    "TransactionRequest": {
        "type": "object", "required": ["operations"], "additionalProperties": False,
        "properties": {
            "operations": {"type": "array", "items": {"anyOf": [
                obj(["type", "items"], type={"const": "push"},
                    items={"type": "array", "minItems": 1, "items": ref("PushItem")}),
                obj(["type", "transactionId", "partitionId"], type={"const": "ack"},
                    consumer_group=nullable(SHORT_TEXT), **_ACK_FIELDS)]}},
            "requiredLeases": nullable(array({"anyOf": [UUID, {"const": ""}]})),
            "kv": {"type": ["array", "null"], "maxItems": 64, "items": {"type": "object"},
                   "description": "KV ops (WIRE2.md 5.1), lock guards first; with an empty "
                                  "operations array, this alone makes the bundle"},
            "timers": {"type": ["array", "null"], "maxItems": 256, "items": {"type": "object"},
                       "description": "timer ops (WIRE2.md 3.1, 5.1)"},
        }},
    "TransactionAnswer": obj(["transactionId", "success", "results"],
                             transactionId=nullable(STRING), success=BOOLEAN,
                             results=array({"type": "object"}), error=nullable(STRING)),
    "LeaseExtendRequest": obj([], seconds=nullable(
        {"type": "integer", "minimum": 1, "maximum": INT32_MAX})),
    "LeaseExtendAnswer": obj(["leaseId", "success", "leaseExpiresAt"], leaseId=UUID,
                             success={"const": True}, leaseExpiresAt=TIMESTAMP,
                             newExpiresAt=TIMESTAMP, expiresAt=TIMESTAMP,
                             lease_expires_at=TIMESTAMP,
                             renewed={"type": "integer", "minimum": 1}),
    "QueueDeleted": obj(["deleted", "queue", "existed"], deleted={"const": True},
                        queue=STRING, existed=BOOLEAN),
    "Health": _HEALTH,
    "MessageDlqRequest": obj([], consumerGroup=nullable(SHORT_TEXT),
                             error=nullable({"type": "string", "maxLength": 10_000})),
    "TraceRequest": obj(
        ["transactionId", "partitionId", "data"],
        transactionId={"type": "string", "minLength": 1}, partitionId=UUID,
        consumerGroup=nullable(SHORT_TEXT), eventType=nullable(SHORT_TEXT),
        traceNames=nullable({"anyOf": [STRING, array(STRING)]}),
        data={"not": {"type": "null"}, "description": "any JSON value but null"}),
    "TraceCreated": obj(["success", "traceId"], success={"const": True}, traceId=STRING),
    "Traces": obj(["traces"], traces=array({"type": "object"})),
    "TraceNames": obj(["trace_names", "total", "pagination"],
                      trace_names=array({"type": "object"}), total=INTEGER,
                      pagination={"type": "object"}),
    "TracesByName": obj(["traces", "total", "pagination"], traces=array({"type": "object"}),
                        total=INTEGER, pagination={"type": "object"}),
    "SubscriptionRequest": obj(["subscriptionTimestamp"], subscriptionTimestamp=TIME_INPUT),
    "SeekRequest": {"anyOf": [
        obj(["toEnd"], toEnd={"const": True}, timestamp=ANY_JSON),
        obj(["timestamp"], toEnd=nullable({"const": False}), timestamp=TIME_INPUT)]},
    "EnabledFlag": obj(["enabled"], enabled=BOOLEAN),
    "NotifyRequest": obj(["queue"], queue=NAME, partition=nullable(NAME)),
    "MaintenanceStatus": obj(
        ["maintenanceMode", "popMaintenanceMode", "bufferedMessages", "bufferHealthy",
         "bufferStats"], maintenanceMode=BOOLEAN, popMaintenanceMode=BOOLEAN,
        bufferedMessages=INTEGER, bufferHealthy=BOOLEAN, bufferStats={"type": "object"}),
    "MaintenanceSet": obj(["maintenanceMode", "bufferedMessages", "bufferHealthy", "message"],
                          maintenanceMode=BOOLEAN, bufferedMessages=INTEGER,
                          bufferHealthy=BOOLEAN, message=STRING),
    "PopMaintenance": obj(["popMaintenanceMode", "message"], popMaintenanceMode=BOOLEAN,
                          message=STRING),
    "BufferStatus": obj(["pending", "failed", "healthy", "dbHealthy", "worker"],
                        pending=INTEGER, failed=INTEGER, healthy=BOOLEAN, fsyncs=INTEGER,
                        dbHealthy=BOOLEAN, worker=STRING),
    "SharedState": obj(["enabled"], enabled=BOOLEAN, reason=STRING),
    "NotifyAnswer": obj(["status"], status={"const": "ok"}),
    "Overview": obj(
        ["queues", "partitions", "namespaces", "tasks", "messages", "timestamp"],
        queues=INTEGER, partitions=INTEGER, namespaces=INTEGER, tasks=INTEGER,
        messages=obj(["total", "pending", "processing", "completed", "failed", "deadLetter"],
                     **{key: INTEGER for key in ("total", "pending", "processing",
                                                 "completed", "failed", "deadLetter")}),
        lag=obj([], time=_STATS, offset=_STATS),
        throughput=obj([], ingestedPerSecond=NUMBER, processedPerSecond=NUMBER),
        timestamp=TIMESTAMP, statsAge=nullable(NUMBER)),
    "QueueList": obj(["queues"], queues=array(obj(
        ["id", "name", "namespace", "task", "createdAt", "partitions", "messages"],
        id=UUID, name=STRING, namespace=STRING, task=STRING, createdAt=TIMESTAMP,
        partitions=INTEGER, messages=_COUNTS))),
    "NamespaceList": obj(["namespaces"], namespaces=array(obj(
        ["namespace", "queues", "partitions", "messages"], namespace=STRING, queues=INTEGER,
        partitions=INTEGER, messages=_COUNTS))),
    "TaskList": obj(["tasks"], tasks=array(obj(
        ["task", "queues", "partitions", "messages"], task=STRING, queues=INTEGER,
        partitions=INTEGER, messages=_COUNTS))),
    "PartitionList": obj(["partitions", *_PAGE], **_PAGE, partitions=array(obj(
        ["id", "name", "queue", "createdAt", "messages"], id=UUID, name=STRING,
        queue=STRING, createdAt=TIMESTAMP, lastActivity=nullable(TIMESTAMP),
        messages=_COUNTS))),
    "MessageList": obj(["messages"], mode={"type": "object"}, messages=array(obj(
        ["id", "transactionId", "partitionId", "queue", "partition", "status", "createdAt"],
        id=UUID, transactionId=STRING, partitionId=UUID, queuePath=STRING, queue=STRING,
        partition=STRING, namespace=STRING, task=STRING, status=STRING,
        traceId=nullable(STRING), producerSub=nullable(STRING), createdAt=TIMESTAMP,
        leaseExpiresAt=nullable(TIMESTAMP)))),
    "DeadLetters": obj(["messages", *_PAGE], **_PAGE, messages=array(obj(
        ["id", "transactionId", "partitionId", "queue", "partition", "consumerGroup",
         "errorMessage", "data", "createdAt", "failedAt"],
        id=UUID, transactionId=STRING, partitionId=nullable(UUID), queue=STRING,
        partition=STRING, consumerGroup=STRING, errorMessage=nullable(STRING),
        retryCount=INTEGER, data=ANY_JSON, dataOmitted=BOOLEAN, producerSub=nullable(STRING),
        createdAt=TIMESTAMP, failedAt=TIMESTAMP, timerKey=STRING))),
    "GroupRows": array(obj(
        ["name", "topics", "queueName", "state"], name=STRING, topics=array(STRING),
        queueName=STRING, members=INTEGER, partitionsWithLag=INTEGER,
        state={"enum": ["Lagging", "Stable", "Dead"]}, subscriptionMode=nullable(STRING),
        subscriptionTimestamp=nullable(TIMESTAMP))),
    "GroupDetail": {"type": "object", "additionalProperties": obj(
        ["partitions"], partitions=array(obj(
            ["partition", "offsetLag", "leaseActive"], partition=STRING,
            workerId=nullable(STRING),
            offsetLag=INTEGER, timeLagSeconds=NUMBER, totalConsumed=INTEGER,
            lastConsumedAt=nullable(TIMESTAMP), leaseActive=BOOLEAN)))},
}
