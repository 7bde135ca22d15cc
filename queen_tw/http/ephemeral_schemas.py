"""JSON schemas of the ephemeral routes' bodies and answers, for the OpenAPI document
(:mod:`queen_tw.http.openapi` lists the operations; the fuzz test checks answers against
these)."""

from typing import Any, Dict

from queen_tw.ephemeral.engine import ACK_STATUSES
from queen_tw.ephemeral.options import POLICIES
from queen_tw.http.openapi_schemas import ANY_JSON, BOOLEAN, INTEGER, STRING, array, nullable, obj

Schema = Dict[str, Any]

NAME: Schema = {"type": "string", "minLength": 1, "maxLength": 512,
                "pattern": "^[^\\u0000-\\u001f]*$"}
"""Queue, partition and group names: at most 512 bytes (fewer characters when they are
not ASCII), no control characters."""

_COUNT: Schema = {"type": "integer", "minimum": 0}
_WINDOW = obj([], ms=nullable({"type": "integer", "minimum": 0, "maximum": 300_000}),
              count=nullable({"type": "integer", "minimum": 0, "maximum": 10_000}))
_OPTIONS = obj(
    [], maxBytes=nullable(_COUNT), maxLength=nullable(_COUNT),
    policy=nullable({"enum": list(POLICIES)}),
    ttlSeconds=nullable({"type": "integer", "minimum": 0, "maximum": 10 * 365 * 86400}),
    leaseSeconds=nullable({"type": "integer", "minimum": 0, "maximum": 86400}),
    retryLimit=nullable({"type": "integer", "minimum": 0, "maximum": 1000}),
    windowBuffer=nullable(_WINDOW))
_OPTIONS["additionalProperties"] = False
_WINDOW["additionalProperties"] = False

CONFIGURE = obj(["queue"], queue=NAME, options=nullable(_OPTIONS))
DECLARATION = obj(["queue", "options"], queue=STRING, options={"type": "object"})
QUEUE_ONLY = obj(["queue"], queue=NAME)
RESET_ANSWER = obj(["queue", "dropped"], queue=STRING, dropped=INTEGER)
DELETE_ANSWER = obj(["queue", "deleted", "declared"], queue=STRING, deleted=BOOLEAN,
                    declared=BOOLEAN)
PUSH = obj(["queue", "messages"], queue=NAME, partition=NAME,
           messages={"type": "array", "maxItems": 10_000,
                     "items": obj(["payload"], payload=ANY_JSON)})
PUSH_ANSWER = obj(["pushed"], pushed=INTEGER)
POP_ANSWER = obj(["queue", "messages"], queue=STRING, messages=array(obj(
    ["id", "partition", "attempts", "payload"], id=STRING, partition=STRING,
    attempts=INTEGER, payload=ANY_JSON)))
ACK = obj(["queue", "acks"], queue=NAME, group=nullable({"type": "string"}),
          acks={"type": "array", "maxItems": 10_000, "items": obj(
              ["id"], id={"type": "string", "minLength": 1},
              status=nullable({"enum": list(ACK_STATUSES)}), error=ANY_JSON)})
ACK_ANSWER = obj(["results"], results=array(obj(
    ["id", "outcome"], id=STRING,
    outcome={"enum": ["acked", "redelivered", "stale", "unknown"]})))
_DROPS = obj(["bounds", "ttl", "retry"], bounds=INTEGER, ttl=INTEGER, retry=INTEGER)
_TIER: Schema = {"enum": ["declared", "implicit"]}
QUEUES_ANSWER = obj(["queues", "count", "cellBytes"], count=INTEGER, cellBytes=INTEGER,
                    unreachable=array(STRING),  # members that did not answer, when any
                    queues=array(obj(
                        ["queue", "tier", "depth", "bytes", "partitions", "groups", "drops",
                         "options"], queue=STRING, tier=_TIER, depth=INTEGER, bytes=INTEGER,
                        partitions=INTEGER, groups=INTEGER, drops=_DROPS,
                        options={"type": "object"})))
DEPTH_ANSWER = obj(
    ["queue", "group", "tier", "pending", "partitionsPending", "bytes", "partitions",
     "groups"], queue=STRING, group=nullable(STRING), tier=_TIER, pending=INTEGER,
    partitionsPending=INTEGER, bytes=INTEGER,
    partitions=array(obj(["partition", "pending", "bytes"], partition=STRING,
                         pending=INTEGER, bytes=INTEGER)),
    groups=array(obj(["group", "pending", "skipped"], group=STRING, pending=INTEGER,
                     skipped=INTEGER)))
PATH_NAME: Schema = {"type": "string", "minLength": 1, "maxLength": 512,
                     "pattern": "^[^/\\u0000-\\u001f]*$"}
"""A queue name as a path segment (no ``/``)."""
