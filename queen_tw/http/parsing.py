"""Parsing and validation of request bodies and path segments (WIRE.md 1.2).

Every function raises :class:`~queen_tw.errors.InvalidRequest` with a message that says what
is wrong; nothing here touches the database. Query strings are read by
:mod:`queen_tw.http.query`.
"""

import re
import uuid
from datetime import UTC, datetime
from typing import Any, Dict, List, Mapping, Optional, cast

from queen_tw import jsoncodec
from queen_tw.errors import InvalidRequest, PayloadTooLarge
from queen_tw.http import kv_input

MAX_NAME_LENGTH = 255


def read_json_object(request) -> Dict[str, Any]:
    """The body as a JSON object; an empty body is ``{}``."""
    raw = request.content.read() if request.content is not None else b""
    if not raw.strip():
        return {}
    try:
        body = jsoncodec.loads(raw)
    except jsoncodec.UnstorableJSON as err:
        raise InvalidRequest(f"Request body refused: {err}") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise InvalidRequest(f"Invalid JSON: {err}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("Request body must be a JSON object")
    return body


def check_name(name: str, what: str) -> str:
    """A queue or partition name every route can reach: not empty, at most 255 characters,
    no ``/`` (a name is one path segment of the pop and resource routes), not ``.`` or
    ``..`` (clients and browsers drop such a segment from a URL, encoded or not) and no
    NUL."""
    if not name:
        raise InvalidRequest(f"{what} must not be empty")
    if name in (".", ".."):
        raise InvalidRequest(f"{what} must not be '{name}': URLs drop such a path segment, "
                             "so no pop or resource route could name it")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidRequest(f"{what} is longer than {MAX_NAME_LENGTH} characters")
    if "/" in name:
        raise InvalidRequest(f"{what} must not contain '/'")
    if "\x00" in name:
        raise InvalidRequest(f"{what} must not contain \\u0000")
    return name


def path_text(segment: str, what: str) -> str:
    """A path segment that PostgreSQL can store. Twisted has already percent-decoded it
    (WIRE.md 1.2), so it is not decoded again: ``%2541`` names ``%41``, not ``A``."""
    if "\x00" in segment:
        raise InvalidRequest(f"{what} must not contain \\u0000")
    return segment


def group_name(segment: str) -> str:
    """A consumer group named by a path segment: as :func:`path_text`, at most 255
    characters (what pops accept, and what fits PostgreSQL's indexes)."""
    if len(segment) > MAX_NAME_LENGTH:
        raise InvalidRequest(f"consumerGroup is longer than {MAX_NAME_LENGTH} characters")
    return path_text(segment, "consumerGroup")


def optional_name(value: Optional[str], what: str) -> Optional[str]:
    """A name filter from a query string: absent or empty means no filter."""
    return check_name(value, what) if value else None


_HEX = "[0-9a-fA-F]"
_CANONICAL_UUID = re.compile(f"{_HEX}{{8}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{12}}")
# What PostgreSQL's uuid input reads: 32 hex digits, a hyphen allowed after any group of four,
# the whole optionally in braces. (uuid.UUID also takes "urn:uuid:", "+" and "_", which
# PostgreSQL refuses: such an id passed here and failed the statement, or a buffered push's
# replay, later.)
_UUID_DIGITS = f"{_HEX}{{4}}(?:-?{_HEX}{{4}}){{7}}"
_POSTGRESQL_UUID = re.compile(f"{_UUID_DIGITS}|\\{{{_UUID_DIGITS}\\}}")


def postgresql_uuid(text: Any) -> Optional[str]:
    """``text`` in PostgreSQL's output form (lowercase, hyphenated), or None if PostgreSQL
    would not read it as a uuid: the validation of ids from requests (the engine's
    ``canonical_uuid`` only re-prints ids known to be valid). Ids compared as text
    (requiredLeases) must be in this form: the holder's own lease written in capitals was
    "held under another lease"."""
    if not isinstance(text, str):
        return None
    if _CANONICAL_UUID.fullmatch(text):  # the usual form, 4x cheaper than uuid.UUID
        return text.lower()
    if _POSTGRESQL_UUID.fullmatch(text):
        return str(uuid.UUID(text))
    return None


def require_uuid(text: Any, what: str) -> str:
    """``text`` in PostgreSQL's output form (postgresql_uuid); 400 if it is not a uuid."""
    canonical = postgresql_uuid(text)
    if canonical is None:
        raise InvalidRequest(f"{what} must be a UUID")
    return canonical


def optional_text(body: Mapping[str, Any], key: str, what: Optional[str] = None,
                  max_length: int = MAX_NAME_LENGTH) -> Optional[str]:
    """A string field that may be absent or null."""
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"{what or key} must be a string")
    if len(value) > max_length:
        raise InvalidRequest(f"{what or key} is longer than {max_length} characters")
    return value


_UTC_DESIGNATOR = re.compile("[zZ]$")


def timestamp(text: Optional[str], what: str) -> Optional[str]:
    """An ISO-8601 timestamp, passed on as UTC in the one form PostgreSQL always reads
    (``2024-05-01T12:00:00.250000+00:00``); a time without an offset is UTC (WIRE.md 1.5).

    Python accepts forms PostgreSQL refuses (week dates such as ``2020-W01-1``, offsets
    beyond 15:59), which answered 500 when handed on as sent; and an offset can push a
    time out of years 1-9999, which PostgreSQL would read as BC or year 10000.
    """
    if text is None or text == "":
        return None
    try:
        moment = datetime.fromisoformat(_UTC_DESIGNATOR.sub("+00:00", text))
    except ValueError:
        raise InvalidRequest(f"{what} must be an ISO-8601 timestamp") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC).isoformat()
    except OverflowError:
        raise InvalidRequest(f"{what} is out of range (years 1-9999 in UTC)") from None


def required_timestamp(body: Mapping[str, Any], key: str, missing: str) -> str:
    """The ISO-8601 timestamp ``body[key]``; ``missing`` is the error when it is absent."""
    text = optional_text(body, key)
    if not text:
        raise InvalidRequest(missing)
    return cast(str, timestamp(text, key))


def push_items(body: Mapping[str, Any], producer_sub: Optional[str] = None,
               max_items: Optional[int] = None) -> List[Dict[str, Any]]:
    """The validated ``items`` of a push (WIRE.md 2.2); one bad item rejects them all.
    ``producer_sub`` is stamped on each (see :func:`push_item`); more than ``max_items``
    (QUEEN_MAX_PUSH_ITEMS) is 413."""
    items = body.get("items")
    if not isinstance(items, list):
        raise InvalidRequest("items array is required")
    check_push_count(len(items), max_items)
    return [push_item(item, index, producer_sub) for index, item in enumerate(items)]


def push_limit(request: Any) -> Optional[int]:
    """QUEEN_MAX_PUSH_ITEMS, as the site bound it to its requests (None outside the site)."""
    return getattr(request, "max_push_items", None)


def check_push_count(count: int, max_items: Optional[int]) -> None:
    """413 for a request carrying more messages than QUEEN_MAX_PUSH_ITEMS: its items cost
    the server hundreds of bytes each, whatever the body, and go to PostgreSQL in one call."""
    if max_items is not None and count > max_items:
        raise PayloadTooLarge(f"The request carries {count} messages; at most {max_items} "
                              "are accepted in one (QUEEN_MAX_PUSH_ITEMS): split it")


def push_item(item: Any, index: int, producer_sub: Optional[str] = None) -> Dict[str, Any]:
    """One validated push item. Its ``producerSub`` is the server's (WIRE.md 4.3): the
    admitted token's ``sub`` given as ``producer_sub``, never the body's, which is dropped;
    without one the item has none and the message stores NULL."""
    if not isinstance(item, dict):
        raise InvalidRequest(f"Item {index} must be an object")
    queue = item.get("queue")
    if not isinstance(queue, str):
        raise InvalidRequest("Queue must be a string")
    clean: Dict[str, Any] = {"queue": check_name(queue, "Queue")}
    partition = item.get("partition")
    if partition is not None:
        if not isinstance(partition, str):
            raise InvalidRequest("Partition must be a string")
        clean["partition"] = check_name(partition, "Partition")
    if "payload" in item:
        clean["payload"] = item["payload"]
    transaction_id = optional_text(item, "transactionId", "TransactionId")
    if transaction_id:
        clean["transactionId"] = transaction_id
    trace_id = optional_text(item, "traceId", "TraceId")
    if trace_id:
        clean["traceId"] = require_uuid(trace_id, "TraceId")
    if producer_sub:
        clean["producerSub"] = producer_sub
    return clean


def ack_item(item: Any, group: Optional[str], index: int) -> Dict[str, Any]:
    """One validated acknowledgement; ``group`` overrides the item's own group."""
    if not isinstance(item, dict):
        raise InvalidRequest(f"Acknowledgment {index} must be an object")
    transaction_id = item.get("transactionId")
    if not isinstance(transaction_id, str) or not transaction_id:
        raise InvalidRequest("transactionId is required")
    partition_id = item.get("partitionId")
    if partition_id is None or partition_id == "":
        raise InvalidRequest("partitionId is required to ensure message uniqueness")
    partition_id = require_uuid(partition_id, "partitionId")
    status = item.get("status")
    if status is not None and not isinstance(status, str):
        raise InvalidRequest("status must be a string")
    lease_id = optional_text(item, "leaseId")
    if lease_id:
        lease_id = require_uuid(lease_id, "leaseId")
    return {
        "index": index,
        "transactionId": transaction_id,
        "partitionId": partition_id,
        "status": status or "completed",
        "consumerGroup": group if group is not None else optional_text(item, "consumerGroup"),
        "leaseId": lease_id or None,
        "error": optional_text(item, "error", max_length=10_000),
    }


# name -> (kind, default); kinds: int (>= 0) or bool. The order is the echo order.
QUEUE_OPTIONS = {
    "priority": ("int", 0), "leaseTime": ("int", 300), "retryLimit": ("int", 3),
    "retryDelay": ("int", 1000), "maxSize": ("int", 0), "ttl": ("int", 3600),
    "deadLetterQueue": ("bool", False), "dlqAfterMaxRetries": ("bool", False),
    "delayedProcessing": ("int", 0), "windowBuffer": ("int", 0),
    "retentionSeconds": ("int", 0), "completedRetentionSeconds": ("int", 0),
    "retentionEnabled": ("bool", False), "encryptionEnabled": ("bool", False),
    "maxWaitTimeSeconds": ("int", 0),
}
_INT_LIMIT = 2**31 - 1


def queue_options(raw: Any) -> Dict[str, Any]:
    """Typed configure options (numbers or their string forms); unknown keys are ignored."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InvalidRequest("options must be an object")
    options = {}
    for name, (kind, _default) in QUEUE_OPTIONS.items():
        if raw.get(name) is None:
            continue
        options[name] = (_option_int if kind == "int" else _option_bool)(name, raw[name])
    return options


def _option_int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise InvalidRequest(f"{name} must be an integer")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise InvalidRequest(f"{name} must be an integer") from None
    if not isinstance(value, int):
        raise InvalidRequest(f"{name} must be an integer")
    if name != "priority" and value < 0:
        raise InvalidRequest(f"{name} must not be negative")
    if abs(value) > _INT_LIMIT:
        raise InvalidRequest(f"{name} is out of range")
    return value


def _option_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise InvalidRequest(f"{name} must be a boolean")


class ValidatedPush(dict):
    """A push operation whose items were validated already (the pushes of a binary
    transaction body, which carry the ids their client minted); a JSON body never makes
    one, so a JSON push cannot name its message ids."""


def transaction_op(op: Any, index: int, producer_sub: Optional[str] = None) -> Dict[str, Any]:
    """One validated transaction operation (WIRE.md 2.5); an unknown type is kept as is
    (it fails the transaction, not the request). Pushed items get ``producer_sub`` as in
    :func:`push_item`."""
    if not isinstance(op, dict):
        raise InvalidRequest(f"Operation {index} must be an object")
    kind = op.get("type")
    if not isinstance(kind, str):
        raise InvalidRequest(f"Operation {index} needs a type")
    if isinstance(op, ValidatedPush):
        return op  # a binary transaction's frames, checked by queen_tw.http.binary_push
    if kind == "push":
        items = op.get("items")
        if not isinstance(items, list) or not items:
            raise InvalidRequest(f"Operation {index}: items array is required")
        return {"type": "push",
                "items": [push_item(item, n, producer_sub) for n, item in enumerate(items)]}
    if kind == "ack":
        group = optional_text(op, "consumerGroup") or optional_text(op, "consumer_group")
        return dict(ack_item(op, group, 0), type="ack")
    return {"type": kind}


TRANSACTION_FIELDS = frozenset({"operations", "requiredLeases"})
TRANSACTION_RIDERS = ("kv", "timers")  # WIRE2.md 5.1: KV ops (lock guards first) and timers


def transaction_operations(body: Mapping[str, Any], producer_sub: Optional[str] = None,
                           max_items: Optional[int] = None) -> List[Dict[str, Any]]:
    """The validated operations of ``POST /api/v1/transaction`` (WIRE.md 2.5), pushes
    stamped with ``producer_sub`` (:func:`push_item`), at most ``max_items`` messages in
    all (413 beyond). ``operations`` may be empty when a
    rider is not (a guard-only or timer-only bundle, WIRE2.md 5.1); the riders are read by
    :func:`transaction_riders`.

    Any top-level field this server does not know may make the bundle conditional — a guard
    such as "only if this key is absent". Ignoring it would commit the bundle without its
    condition, so it is refused before anything runs.
    """
    unknown = sorted(set(body) - TRANSACTION_FIELDS - set(TRANSACTION_RIDERS))
    if unknown:
        raise InvalidRequest(
            f"Unknown transaction field '{unknown[0]}': refused rather than ignored, as it "
            "may change what the transaction does; nothing was applied")
    operations = body.get("operations")
    if not isinstance(operations, list):
        raise InvalidRequest("operations array required")
    check_push_count(sum(len(op["items"]) for op in operations
                         if isinstance(op, dict) and isinstance(op.get("items"), list)),
                     max_items)
    if not operations and all(body.get(rider) in (None, []) for rider in TRANSACTION_RIDERS):
        raise InvalidRequest("operations array cannot be empty")
    return [transaction_op(op, index, producer_sub) for index, op in enumerate(operations)]


def transaction_riders(body: Mapping[str, Any]) -> Dict[str, Any]:
    """The riders of a transaction body (WIRE2.md 5.1), JSON or binary (its head), validated:
    ``{"kv": [...], "timers": [...]}``, KV ops as ``queen.kv_apply`` takes them and timer ops
    as :func:`queen_tw.http.timers.timer_operations` makes them; an absent, null or empty
    rider is left out. A refused op refuses the whole transaction (4xx, nothing applied)."""
    riders: Dict[str, Any] = {}
    kv = body.get("kv")
    if kv not in (None, []):
        if not isinstance(kv, list):
            raise InvalidRequest("Transaction 'kv' rider must be an array of KV ops; nothing "
                                 "was applied")
        try:
            riders["kv"] = kv_input.kv_ops(kv, in_transaction=True)
        except kv_input.KvInputError as err:
            raise kv_input.KvInputError(
                err.code, err.reason, f"Transaction 'kv' rider refused, nothing was applied: "
                f"{err.message}", err.status) from None
    if body.get("timers") not in (None, []):
        from queen_tw.http.timers import TimersRefused, timer_operations  # it imports parsing
        try:
            riders["timers"] = timer_operations(body["timers"], where="timers")
        except TimersRefused as err:
            raise TimersRefused(err.status, err.code, err.reason,
                                f"Transaction 'timers' rider refused, nothing was applied: "
                                f"{err.message}") from None
    return riders


def required_leases(body: Mapping[str, Any]) -> List[str]:
    """``requiredLeases`` of a transaction (WIRE.md 9.4): lease ids, ``""`` tolerated; absent
    or null is none (``{}`` or ``false`` are refused like any other non-array: they committed
    unfenced)."""
    leases = body.get("requiredLeases")
    if leases is None:
        return []
    if isinstance(leases, list):
        canonical = [lease if lease == "" else postgresql_uuid(lease) for lease in leases]
        if None not in canonical:
            return cast(List[str], canonical)
    raise InvalidRequest("requiredLeases must be an array of lease ids")
