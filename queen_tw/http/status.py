"""Status and analytics routes for dashboards (WIRE.md 3.4), all GET and read-only.

A ``from``/``to`` that is neither ISO-8601 nor epoch milliseconds, or a ``from`` after
``to``, answers 400 naming the parameter; ``limit`` and ``offset`` are read as WIRE.md 1.2
says (not an integer: the default; out of range: clamped, a ``limit`` to 1..1000). A
named queue that does not exist answers 404 ``Queue not found``. The answers are computed by
:class:`~queen_tw.engine.analytics.Analytics`; without it (a server built without the admin
engines) every route answers 404. ``/api/v1/status/buffers`` lives with the system routes.
"""

import re
from datetime import UTC, datetime, timedelta
from typing import Any, Dict, Optional

from queen_tw.auth.levels import routed_klein
from queen_tw.engine.admin import AdminEngines
from queen_tw.engine.analytics import Analytics
from queen_tw.errors import InvalidRequest, NotFound
from queen_tw.http import parsing, query
from queen_tw.http.answers import answering_errors, json_answer
from queen_tw.http.openapi_schemas import (
    BOOLEAN,
    INTEGER,
    NUMBER,
    STRING,
    TIMESTAMP,
    UUID,
    Schema,
    array,
    nullable,
    obj,
)

MAX_LIMIT = 1000
"""The largest page a listing answers; a larger ``limit`` is capped to it."""

INTERVALS = ("minute", "hour", "day")
"""The buckets of ``/api/v1/status/analytics``."""

_EPOCH_MS = re.compile(r"-?[0-9]{1,16}")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def moment(request, name: str) -> Optional[str]:
    """The time parameter ``name`` as ISO-8601 UTC, or None when absent.

    Accepts what :func:`queen_tw.http.parsing.timestamp` accepts, and a string of digits as
    milliseconds since the Unix epoch (dashboards send both).
    """
    text = query.text(request, name)
    if not text:
        return None
    text = text.strip()
    if _EPOCH_MS.fullmatch(text):
        try:
            when = _EPOCH + timedelta(milliseconds=int(text))
        except OverflowError:
            raise InvalidRequest(f"{name} is out of range (years 1-9999 in UTC)") from None
        return when.isoformat()
    try:
        return parsing.timestamp(text, name)
    except InvalidRequest:
        raise InvalidRequest(
            f"{name} must be an ISO-8601 timestamp or milliseconds since the epoch") from None


def time_range(request) -> Dict[str, str]:
    """``from`` and ``to`` (those given); 400 when ``from`` is after ``to``."""
    start, end = moment(request, "from"), moment(request, "to")
    if start is not None and end is not None and (
            datetime.fromisoformat(start) > datetime.fromisoformat(end)):
        raise InvalidRequest("from must not be after to")
    return _present({"from": start, "to": end})


def limit(request, default: int) -> int:
    """``limit``: an integer from 1 to :data:`MAX_LIMIT` (clamped)."""
    return min(query.integer(request, "limit", default, 1), MAX_LIMIT)


def offset(request) -> int:
    """``offset``: an integer from 0 to 2^31-1."""
    return query.integer(request, "offset", 0, 0)


def queue_filters(request) -> Dict[str, Any]:
    """``queue``, ``namespace`` and ``task`` (those given)."""
    return _present({
        "queue": parsing.optional_name(query.text(request, "queue"), "queue"),
        "namespace": query.text(request, "namespace"),
        "task": query.text(request, "task"),
    })


def worker_filters(request) -> Dict[str, Any]:
    """``hostname`` and ``workerId`` (those given)."""
    return _present({"hostname": query.text(request, "hostname"),
                     "workerId": query.text(request, "workerId")})


def _present(values: Dict[str, Any]) -> Dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None and value != ""}


class StatusRoutes:
    """The dashboard's status and analytics routes.

    :param admin: the analytics engine lives here; every route answers 404 without it.
    """

    app = answering_errors(routed_klein())

    def __init__(self, admin: Optional[AdminEngines] = None):
        self._admin = admin

    def _analytics(self) -> Analytics:
        if self._admin is None or self._admin.analytics is None:
            raise NotFound("Not found")
        return self._admin.analytics

    # -- status -------------------------------------------------------------------------

    @app.route("/api/v1/status", methods=["GET"])
    async def status(self, request):
        filters = {**time_range(request), **queue_filters(request)}
        return json_answer(request, 200, await self._analytics().status(filters))

    @app.route("/api/v1/status/queues", methods=["GET"])
    async def queues(self, request):
        filters = {**time_range(request),
                   **_present({"namespace": query.text(request, "namespace"),
                               "task": query.text(request, "task")}),
                   "limit": limit(request, 100), "offset": offset(request)}
        return json_answer(request, 200, await self._analytics().queues(filters))

    @app.route("/api/v1/status/queues/<queue>", methods=["GET"])
    async def queue(self, request, queue):
        return json_answer(request, 200, await self._analytics().queue(
            parsing.check_name(queue, "queue")))

    @app.route("/api/v1/status/queues/<queue>/messages", methods=["GET"])
    async def queue_messages(self, request, queue):
        name = parsing.check_name(queue, "queue")
        page_size, skip = limit(request, 50), offset(request)
        return json_answer(request, 200, await self._analytics().queue_messages(
            name, page_size, skip))

    @app.route("/api/v1/status/analytics", methods=["GET"])
    async def analytics(self, request):
        interval = query.choice(request, "interval", INTERVALS, "hour").lower()
        filters = {**time_range(request), **queue_filters(request), "interval": interval}
        return json_answer(request, 200, await self._analytics().analytics(filters))

    # -- analytics ----------------------------------------------------------------------

    @app.route("/api/v1/analytics/system-metrics", methods=["GET"])
    async def system_metrics(self, request):
        filters = {**time_range(request), **worker_filters(request)}
        return json_answer(request, 200, await self._analytics().system_metrics(filters))

    @app.route("/api/v1/analytics/worker-metrics", methods=["GET"])
    async def worker_metrics(self, request):
        filters = {**time_range(request), **worker_filters(request)}
        return json_answer(request, 200, await self._analytics().worker_metrics(filters))

    @app.route("/api/v1/analytics/postgres-stats", methods=["GET"])
    async def postgres_stats(self, request):
        return json_answer(request, 200, await self._analytics().postgres_stats())

    @app.route("/api/v1/analytics/queue-lag", methods=["GET"])
    async def queue_lag(self, request):
        return json_answer(request, 200, await self._analytics().queue_series(
            "lag", self._queue_series_filters(request)))

    @app.route("/api/v1/analytics/queue-ops", methods=["GET"])
    async def queue_ops(self, request):
        return json_answer(request, 200, await self._analytics().queue_series(
            "ops", self._queue_series_filters(request)))

    @app.route("/api/v1/analytics/queue-parked-replicas", methods=["GET"])
    async def queue_parked_replicas(self, request):
        return json_answer(request, 200, await self._analytics().queue_series(
            "parked", self._queue_series_filters(request)))

    @app.route("/api/v1/analytics/retention", methods=["GET"])
    async def retention(self, request):
        return json_answer(request, 200, await self._analytics().retention(
            self._queue_series_filters(request)))

    @staticmethod
    def _queue_series_filters(request) -> Dict[str, Any]:
        return {**time_range(request), **_present({
            "queue": parsing.optional_name(query.text(request, "queue"), "queue")})}


# -- what the routes answer, for the OpenAPI document (queen_tw/http/openapi.py) ------------


def _all(**properties: Schema) -> Schema:
    """An object with every one of ``properties`` (and maybe more)."""
    return obj(list(properties), **properties)


_TIME = nullable(TIMESTAMP)
_AVG_MAX = _all(avg=NUMBER, max=NUMBER)
_MESSAGE_COUNTS = _all(total=INTEGER, pending=INTEGER, processing=INTEGER)
_PAGINATION = _all(limit=INTEGER, offset=INTEGER, total=INTEGER)
_RANGE = {"from": TIMESTAMP, "to": TIMESTAMP, "bucketMinutes": INTEGER}
_GAUGES: Dict[str, Schema] = {
    "rssBytes": INTEGER, "cpuPercent": NUMBER, "eventLoopLagMs": _AVG_MAX,
    "dbPoolSize": INTEGER, "dbPoolIdle": INTEGER, "dbPoolWaiting": INTEGER,
    "bufferPending": INTEGER, "bufferFailed": INTEGER}


def _series(point: Schema, **keys: Schema) -> Schema:
    return _all(**_RANGE, series=array(_all(**keys, points=array(point))))


ANSWERS: Dict[str, Schema] = {
    "status": _all(
        timeRange=_all(**{"from": TIMESTAMP, "to": TIMESTAMP}), bucketMinutes=INTEGER,
        pointCount=INTEGER,
        throughput=array(_all(
            timestamp=TIMESTAMP, pushRequests=INTEGER, pushMessages=INTEGER,
            popMessages=INTEGER, ackSuccess=INTEGER, ackFailed=INTEGER, transactions=INTEGER,
            dlq=INTEGER, ingestedPerSecond=NUMBER, processedPerSecond=NUMBER,
            latencyMs=_all(push=NUMBER, pop=NUMBER, ack=NUMBER))),
        queues=array(_all(name=STRING, pushMessages=INTEGER, popMessages=INTEGER,
                          ackSuccess=INTEGER, ackFailed=INTEGER, dlq=INTEGER,
                          popLagMs=_AVG_MAX)),
        messages=_all(total=INTEGER, pending=INTEGER, processing=INTEGER, completed=INTEGER,
                      deadLetter=INTEGER),
        leases=_all(active=INTEGER, partitionsLocked=INTEGER),
        deadLetterQueue=_all(total=INTEGER, inRange=INTEGER),
        workers=array(_all(hostname=STRING, workerId=STRING, pid=INTEGER, lastSeen=TIMESTAMP,
                           eventLoopLagMs=_AVG_MAX, rssBytes=INTEGER, cpuPercent=NUMBER,
                           dbPoolSize=INTEGER, dbPoolIdle=INTEGER, bufferPending=INTEGER,
                           bufferFailed=INTEGER, dbHealthy=BOOLEAN, alive=BOOLEAN)),
        errors=_all(dbErrors=INTEGER, ackFailed=INTEGER, dlq=INTEGER),
        statsAge=nullable(NUMBER)),
    "queues": _all(
        queues=array(_all(id=UUID, name=STRING, namespace=STRING, task=STRING,
                          createdAt=TIMESTAMP, partitions=INTEGER, messages=_MESSAGE_COUNTS)),
        pagination=_PAGINATION),
    "queue": _all(
        queue=_all(id=UUID, name=STRING, namespace=STRING, task=STRING, createdAt=TIMESTAMP,
                   priority=INTEGER,
                   config=_all(leaseTime=INTEGER, retryLimit=INTEGER, retryDelay=INTEGER,
                               ttl=INTEGER, maxQueueSize=INTEGER, deadLetterQueue=BOOLEAN)),
        messages=_all(total=INTEGER, pending=INTEGER, processing=INTEGER, completed=INTEGER,
                      deadLetter=INTEGER),
        partitions=array(_all(
            id=UUID, name=STRING, createdAt=TIMESTAMP, messages=_MESSAGE_COUNTS,
            cursor=_all(totalConsumed=INTEGER, batchesConsumed=INTEGER, lastActivity=_TIME),
            consumerGroups=array(_all(name=STRING, offsetLag=INTEGER,
                                      timeLagSeconds=NUMBER)))),
        totals=_all(total=INTEGER, pending=INTEGER, processing=INTEGER, completed=INTEGER,
                    deadLetter=INTEGER, partitions=INTEGER, consumed=INTEGER)),
    "queueMessages": _all(
        messages=array(_all(id=UUID, transactionId=STRING, partitionId=UUID, queuePath=STRING,
                            queue=STRING, partition=STRING,
                            status={"enum": ["pending", "processing", "completed",
                                             "dead_letter"]},
                            createdAt=TIMESTAMP)),
        pagination=_PAGINATION),
    "analytics": _all(
        interval={"enum": list(INTERVALS)}, dataPoints=array(_all(
            timestamp=TIMESTAMP, pushMessages=INTEGER, popMessages=INTEGER,
            ackSuccess=INTEGER, ackFailed=INTEGER, dlq=INTEGER, avgPopLagMs=NUMBER)),
        **{"from": TIMESTAMP, "to": TIMESTAMP}),
    "systemMetrics": _all(**_RANGE, series=array(_all(
        timestamp=TIMESTAMP, workers=INTEGER, **_GAUGES, pushMessages=INTEGER,
        popMessages=INTEGER, ackSuccess=INTEGER, ackFailed=INTEGER, dbErrors=INTEGER))),
    "workerMetrics": _series(
        _all(timestamp=TIMESTAMP, **_GAUGES, dbHealthy=BOOLEAN),
        hostname=STRING, workerId=STRING, pid=INTEGER),
    "postgresStats": _all(
        database=_all(sizeBytes=INTEGER, cacheHitRatio=nullable(NUMBER), connections=INTEGER),
        tables=array(_all(name=STRING, sizeBytes=INTEGER, liveRows=INTEGER, deadRows=INTEGER,
                          lastVacuum=_TIME, lastAutovacuum=_TIME, lastAnalyze=_TIME)),
        indexes=array(_all(name=STRING, table=STRING, sizeBytes=INTEGER, scans=INTEGER))),
    "queueLag": _series(_all(timestamp=TIMESTAMP, avgMs=NUMBER, maxMs=NUMBER,
                             popMessages=INTEGER), queue=STRING),
    "queueOps": _series(_all(timestamp=TIMESTAMP, pushMessages=INTEGER, popMessages=INTEGER,
                             ackSuccess=INTEGER, ackFailed=INTEGER, dlq=INTEGER),
                        queue=STRING),
    "queueParked": _series(_all(timestamp=TIMESTAMP, parkedConsumers=INTEGER,
                                replicas=INTEGER), queue=STRING),
    "retention": _all(**_RANGE, metricsRetentionDays=INTEGER, series=array(_all(
        table=STRING, rows=INTEGER, oldestAt=_TIME, oldestAgeSeconds=nullable(NUMBER)))),
}
"""The JSON Schema of each route's answer, by the route's method name."""

TIME_PARAMETER: Schema = {"anyOf": [
    {"type": "string", "format": "date-time"},
    {"type": "string", "pattern": "^-?[0-9]{1,16}$"}],
    "description": "ISO-8601 (no offset means UTC), or milliseconds since the Unix epoch"}
