"""The Streams API's routes (WIRE.md 3.9): what the official streaming SDKs call.

``POST /streams/v1/queries`` registers a query, ``POST /streams/v1/cycle`` commits one cycle
(state ops, sink pushes and the source ack in one transaction) and ``POST
/streams/v1/state/get`` reads state. Every field is checked here, and a bad one answers 400
naming it; a state value larger than :data:`MAX_STATE_VALUE_BYTES` answers 413. A cycle that
fails once it reached PostgreSQL (lease lost, a sink item refused) still answers 200, with
``success: false``, as the SDKs expect.
"""

import math
import sys
from typing import Any, Dict, List, Mapping, Optional

from queen_tw import jsoncodec
from queen_tw.auth.levels import routed_klein
from queen_tw.engine.queue_engine import QUEUE_MODE, QueueEngine
from queen_tw.engine.streams import ConfigHashConflict, StreamsEngine
from queen_tw.errors import InvalidRequest, NotFound, PayloadTooLarge
from queen_tw.http import parsing
from queen_tw.http.answers import answering_errors, json_answer
from queen_tw.http.auth_gate import producer_sub

MAX_STATE_VALUE_BYTES = 1024 * 1024
"""Largest state value a cycle may store, as compact JSON (1 MiB): the SDKs keep small
accumulators; a bigger value is almost surely a bug (an unbounded list), refused with 413
before it slows every later state read of its partition."""

MAX_STATE_KEY_LENGTH = 1024
"""Longest state key: the SDKs' keys are an operator tag, a window start and a user key."""

MAX_STATE_KEY_BYTES = 2048
"""Longest state key in UTF-8 bytes: what PostgreSQL's index on the state rows can hold
(about 2.7 KB a row with the ids) with room to spare. 1024 characters of 3- or 4-byte
characters passed the length check, then failed every cycle carrying them."""

ACK_STATUSES = frozenset({"completed", "success", "failed", "dlq"})


class StreamRoutes:
    """Routes of the Streams API.

    :param messages: the message path, whose pool, pushes and acks the cycles share (its
        :class:`StreamsEngine` is built here); every route answers 404 without it.
    """

    app = answering_errors(routed_klein())

    def __init__(self, messages: Optional[QueueEngine] = None):
        self._messages = messages
        self._engine: Optional[StreamsEngine] = None

    def _streams(self) -> StreamsEngine:
        """The engine, built at the first streams request (nothing to build for a site
        that never gets one)."""
        if self._engine is None:
            if self._messages is None:
                raise NotFound("Not found")
            self._engine = StreamsEngine(self._messages.database, self._messages)
        return self._engine

    @app.route("/streams/v1/queries", methods=["POST"])
    async def register(self, request):
        body = parsing.read_json_object(request)
        name = _required_text(body, "name")
        source_queue = parsing.check_name(_required_text(body, "source_queue"), "source_queue")
        sink_queue = parsing.optional_text(body, "sink_queue")
        config_hash = _required_text(body, "config_hash", max_length=1024)
        reset = _optional_flag(body, "reset", False)
        engine = self._streams()
        try:
            answer = await engine.register(
                name, source_queue, parsing.check_name(sink_queue, "sink_queue")
                if sink_queue else None, config_hash, reset)
        except ConfigHashConflict as conflict:
            return json_answer(request, 409, conflict.body)
        return json_answer(request, 200, answer)

    @app.route("/streams/v1/cycle", methods=["POST"])
    async def cycle(self, request):
        body = parsing.read_json_object(request)
        query_id = _required_uuid(body, "query_id")
        partition_id = _required_uuid(body, "partition_id")
        group = parsing.optional_text(body, "consumer_group") or QUEUE_MODE
        release_lease = _optional_flag(body, "release_lease", True)
        state_ops = _state_ops(body.get("state_ops"))
        push_items = _push_items(body.get("push_items"), producer_sub(request),
                                 parsing.push_limit(request))
        ack = _ack(body.get("ack"))
        answer = await self._streams().cycle(query_id, partition_id, group, release_lease,
                                             state_ops, push_items, ack)
        return json_answer(request, 200, answer)

    @app.route("/streams/v1/state/get", methods=["POST"])
    async def state_get(self, request):
        body = parsing.read_json_object(request)
        query_id = _required_uuid(body, "query_id")
        partition_id = _required_uuid(body, "partition_id")
        keys = body.get("keys")
        if keys is None:
            keys = []
        if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys):
            raise InvalidRequest("keys must be an array of strings")
        key_prefix = parsing.optional_text(body, "key_prefix", max_length=MAX_STATE_KEY_LENGTH)
        ripe = body.get("ripe_at_or_before")
        if ripe is not None and (isinstance(ripe, bool) or not isinstance(ripe, (int, float))
                                 # (an integer too big for a float: isfinite overflowed)
                                 or abs(ripe) > sys.float_info.max or not math.isfinite(ripe)):
            raise InvalidRequest("ripe_at_or_before must be a number (epoch milliseconds)")
        return json_answer(request, 200, await self._streams().state(
            query_id, partition_id, keys, key_prefix, ripe))


def _required_text(body: Mapping[str, Any], key: str,
                   max_length: int = parsing.MAX_NAME_LENGTH) -> str:
    value = parsing.optional_text(body, key, max_length=max_length)
    if not value:
        raise InvalidRequest(f"{key} is required")
    return value


def _required_uuid(body: Mapping[str, Any], key: str) -> str:
    value = body.get(key)
    if value is None or value == "":
        raise InvalidRequest(f"{key} is required")
    return parsing.require_uuid(value, key)


def _optional_flag(body: Mapping[str, Any], key: str, default: bool) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidRequest(f"{key} must be a boolean")
    return value


def _state_ops(raw: Any) -> List[Dict[str, Any]]:
    """``state_ops``: upserts (with a value of at most MAX_STATE_VALUE_BYTES) and deletes."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise InvalidRequest("state_ops must be an array")
    ops = []
    for index, op in enumerate(raw):
        where = f"state_ops[{index}]"
        if not isinstance(op, dict):
            raise InvalidRequest(f"{where} must be an object")
        kind = op.get("type")
        if kind not in ("upsert", "delete"):
            raise InvalidRequest(f"{where}.type must be 'upsert' or 'delete'")
        key = op.get("key")
        if not isinstance(key, str) or not key:
            raise InvalidRequest(f"{where}.key is required (a non-empty string)")
        if len(key) > MAX_STATE_KEY_LENGTH:
            raise InvalidRequest(f"{where}.key is longer than {MAX_STATE_KEY_LENGTH} characters")
        if len(key.encode("utf-8", "surrogatepass")) > MAX_STATE_KEY_BYTES:
            raise InvalidRequest(f"{where}.key is longer than {MAX_STATE_KEY_BYTES} bytes "
                                 "in UTF-8")
        if "\x00" in key:
            raise InvalidRequest(f"{where}.key must not contain \\u0000")
        if kind == "delete":
            ops.append({"type": "delete", "key": key})
            continue
        if "value" not in op:
            raise InvalidRequest(f"{where}.value is required for an upsert")
        size = len(jsoncodec.dumps(op["value"]))
        if size > MAX_STATE_VALUE_BYTES:
            raise PayloadTooLarge(
                f"{where}.value is {size} bytes of JSON; a state value may be at most "
                f"{MAX_STATE_VALUE_BYTES} bytes")
        ops.append({"type": "upsert", "key": key, "value": op["value"]})
    return ops


def _push_items(raw: Any, sub: Optional[str], max_items: Optional[int]) -> List[Dict[str, Any]]:
    """``push_items``: items as ``POST /api/v1/push`` takes them (WIRE.md 2.2), stamped
    with the token's ``sub`` as producerSub, at most QUEEN_MAX_PUSH_ITEMS (413)."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise InvalidRequest("push_items must be an array")
    parsing.check_push_count(len(raw), max_items)
    items = []
    for index, item in enumerate(raw):
        try:
            items.append(parsing.push_item(item, index, sub))
        except InvalidRequest as err:
            raise InvalidRequest(f"push_items[{index}]: {err.message}") from None
    return items


def _ack(raw: Any) -> Optional[Dict[str, Any]]:
    """``ack``: null (a cycle without an ack, e.g. an idle flush) or the last handled
    message's ack."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise InvalidRequest("ack must be an object or null")
    transaction_id = raw.get("transactionId")
    if not isinstance(transaction_id, str) or not transaction_id:
        raise InvalidRequest("ack.transactionId is required")
    if len(transaction_id) > parsing.MAX_NAME_LENGTH:
        raise InvalidRequest(
            f"ack.transactionId is longer than {parsing.MAX_NAME_LENGTH} characters")
    lease_id = parsing.optional_text(raw, "leaseId", "ack.leaseId")
    if lease_id:
        lease_id = parsing.require_uuid(lease_id, "ack.leaseId")
    status = raw.get("status")
    if status is None:
        status = "completed"
    if not isinstance(status, str) or status.lower() not in ACK_STATUSES:
        raise InvalidRequest("ack.status must be one of completed, success, failed, dlq")
    count = raw.get("count")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int)
                              or not 0 <= count <= 2**31 - 1):
        raise InvalidRequest("ack.count must be a non-negative integer")
    return {"transactionId": transaction_id, "leaseId": lease_id or None,
            "status": status.lower(), "count": count,
            "error": parsing.optional_text(raw, "error", "ack.error", max_length=10_000)}
