"""Parsing and validation of request bodies and query strings (WIRE.md 1.2).

Every function raises :class:`~queen_tw.errors.InvalidRequest` with a message that says what
is wrong; nothing here touches the database.
"""

import re
import uuid
from datetime import datetime
from typing import Any, Dict, List, Mapping, Optional

from queen_tw import jsoncodec
from queen_tw.errors import InvalidRequest

MAX_NAME_LENGTH = 255


def read_json_object(request) -> Dict[str, Any]:
    """The body as a JSON object; an empty body is ``{}``."""
    raw = request.content.read() if request.content is not None else b""
    if not raw.strip():
        return {}
    try:
        body = jsoncodec.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise InvalidRequest(f"Invalid JSON: {err}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("Request body must be a JSON object")
    return body


def query_text(request, name: str) -> Optional[str]:
    values = request.args.get(name.encode())
    if not values:
        return None
    try:
        return values[0].decode()
    except UnicodeDecodeError:
        raise InvalidRequest(f"{name} is not valid UTF-8") from None


def query_bool(request, name: str, default: bool = False) -> bool:
    """True only for ``true`` or ``1`` (WIRE.md 1.2)."""
    text = query_text(request, name)
    if text is None:
        return default
    return text.lower() in ("true", "1")


def query_int(request, name: str, default: int) -> int:
    """An integer parameter; unparsable values take the default (WIRE.md 1.2)."""
    text = query_text(request, name)
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default


_HEX = "[0-9a-fA-F]"
_CANONICAL_UUID = re.compile(f"{_HEX}{{8}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{12}}")


def is_uuid(text: Any) -> bool:
    if not isinstance(text, str):
        return False
    if _CANONICAL_UUID.fullmatch(text):  # the usual form, 4x cheaper than uuid.UUID
        return True
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


def require_uuid(text: Any, what: str) -> str:
    if not is_uuid(text):
        raise InvalidRequest(f"{what} must be a UUID")
    return text


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


def timestamp(text: Optional[str], what: str) -> Optional[str]:
    """An ISO-8601 timestamp, passed on unchanged once it parses."""
    if text is None or text == "":
        return None
    try:
        datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest(f"{what} must be an ISO-8601 timestamp") from None
    return text


def push_items(body: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """The validated ``items`` of a push (WIRE.md 2.2); one bad item rejects them all."""
    items = body.get("items")
    if not isinstance(items, list):
        raise InvalidRequest("items array is required")
    return [push_item(item, index) for index, item in enumerate(items)]


def push_item(item: Any, index: int) -> Dict[str, Any]:
    if not isinstance(item, dict):
        raise InvalidRequest(f"Item {index} must be an object")
    queue = item.get("queue")
    if not isinstance(queue, str) or not queue:
        raise InvalidRequest("Queue must be a string")
    if len(queue) > MAX_NAME_LENGTH:
        raise InvalidRequest(f"Queue is longer than {MAX_NAME_LENGTH} characters")
    clean: Dict[str, Any] = {"queue": queue}
    partition = optional_text(item, "partition", "Partition")
    if partition is not None:
        if partition == "":
            raise InvalidRequest("Partition must not be empty")
        clean["partition"] = partition
    if "payload" in item:
        clean["payload"] = item["payload"]
    transaction_id = optional_text(item, "transactionId", "TransactionId")
    if transaction_id:
        clean["transactionId"] = transaction_id
    trace_id = optional_text(item, "traceId", "TraceId")
    if trace_id:
        clean["traceId"] = require_uuid(trace_id, "TraceId")
    # producerSub is always server-stamped (WIRE.md 4.3): the body's value is ignored.
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
    require_uuid(partition_id, "partitionId")
    status = item.get("status")
    if status is not None and not isinstance(status, str):
        raise InvalidRequest("status must be a string")
    lease_id = optional_text(item, "leaseId")
    if lease_id:
        require_uuid(lease_id, "leaseId")
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


def transaction_op(op: Any, index: int) -> Dict[str, Any]:
    """One validated transaction operation (WIRE.md 2.5); an unknown type is kept as is
    (it fails the transaction, not the request)."""
    if not isinstance(op, dict):
        raise InvalidRequest(f"Operation {index} must be an object")
    kind = op.get("type")
    if not isinstance(kind, str):
        raise InvalidRequest(f"Operation {index} needs a type")
    if kind == "push":
        items = op.get("items")
        if not isinstance(items, list) or not items:
            raise InvalidRequest(f"Operation {index}: items array is required")
        return {"type": "push", "items": [push_item(item, n) for n, item in enumerate(items)]}
    if kind == "ack":
        group = optional_text(op, "consumerGroup") or optional_text(op, "consumer_group")
        return dict(ack_item(op, group, 0), type="ack")
    return {"type": kind}


MESSAGE_STATUSES = ("pending", "processing", "completed", "dead_letter", "failed")


def message_query(request) -> Dict[str, Any]:
    """The filters of ``GET /api/v1/messages`` (WIRE.md 3.2); absent filters are left out."""
    status = query_text(request, "status")
    if status and status not in MESSAGE_STATUSES:
        raise InvalidRequest(f"status must be one of {', '.join(MESSAGE_STATUSES)}")
    query: Dict[str, Any] = {
        "queue": query_text(request, "queue"),
        "partition": query_text(request, "partition"),
        "ns": query_text(request, "ns") or query_text(request, "namespace"),
        "task": query_text(request, "task"),
        "status": status,
        "from": timestamp(query_text(request, "from"), "from"),
        "to": timestamp(query_text(request, "to"), "to"),
        "limit": min(max(query_int(request, "limit", 200), 1), 1000),
        "offset": max(query_int(request, "offset", 0), 0),
    }
    return {key: value for key, value in query.items() if value}
