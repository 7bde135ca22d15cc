"""Validation of KV ops (WIRE2.md 2.1) and lock ops (WIRE2.md 4) before they reach PostgreSQL.

One function per body: :func:`kv_ops` (``POST /api/v1/kv``, the path sugar and a
transaction's ``kv`` rider) and :func:`lock_ops` (``POST /api/v1/locks``). Each returns ops
normalised for ``sql/functions/060_kv.sql`` / ``061_locks.sql`` or raises
:class:`KvInputError`, which the KV and lock routes answer with the WIRE2.md 1.2 envelope
``{"error": code, "reason": rule, "detail": prose}``. Nothing is applied when a single op is
refused: the whole call is validated first.
"""

import math
import re
from typing import Any, Dict, List, Optional, Set, Tuple

from queen_tw import jsoncodec
from queen_tw.errors import InvalidRequest

MAX_OPS = 256
MAX_OPS_IN_TRANSACTION = 64
MAX_KEYS = 4096
MAX_KEYS_IN_TRANSACTION = 256
MAX_KEY_BYTES = 512
MAX_VALUE_BYTES = 64 * 1024
MAX_TTL_SECONDS = 100 * 365 * 86400
"""A century: a longer TTL is a bug, and the timestamp arithmetic must stay in range."""
PREFIX_LIMIT_DEFAULT, PREFIX_LIMIT_MAX = 100, 1000
MAX_VERSION = 2**63 - 1

MAX_LOCK_OPS = 64
MAX_LOCK_NAME_BYTES = 256
MAX_OWNER_BYTES = 256
MAX_SEMAPHORE_LIMIT = 1024

_NAMESPACE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_TENANT_FIELDS = frozenset({"tenant", "tenantId", "_tenant"})
_COMMON = frozenset({"op", "ns", "required"})
_FIELDS = {
    "get": frozenset({"op", "ns", "key"}),
    "getMany": frozenset({"op", "ns", "keys"}),
    "getPrefix": frozenset({"op", "ns", "prefix", "after", "limit", "keysOnly"}),
    "put": _COMMON | {"key", "value", "ttlSeconds", "forever", "expect"},
    "putIfAbsent": _COMMON | {"key", "value", "ttlSeconds", "forever", "expect"},
    "delete": _COMMON | {"key", "expect"},
    "incr": _COMMON | {"key", "delta", "min", "max", "ttlSeconds", "forever", "expect"},
    "check": _COMMON | {"key", "expect"},
}
_WRITES = frozenset({"put", "putIfAbsent", "delete", "incr"})


class KvInputError(InvalidRequest):
    """A refused KV or lock call: ``code`` (``kv_bad_request``, ``payload_too_large``, …),
    ``reason`` (the rule, a stable id) and the message as ``detail``; 400 unless ``status``."""

    def __init__(self, code: str, reason: str, detail: str, status: int = 400):
        super().__init__(detail)
        self.code = code
        self.reason = reason
        self.status = status

    def envelope(self) -> Dict[str, str]:
        """The WIRE2.md 1.2 body."""
        return {"error": self.code, "reason": self.reason, "detail": self.message}


def _bad(reason: str, detail: str) -> KvInputError:
    return KvInputError("kv_bad_request", reason, detail)


def operations_of(body: Any, what: str) -> List[Any]:
    """The op list of a KV or lock body: ``{"operations": [...]}`` or a bare array."""
    if isinstance(body, dict):
        body = body.get("operations")
    if not isinstance(body, list):
        raise KvInputError(f"{what}_bad_request", f"{what}_operations_required",
                           "the body must be {\"operations\": [...]} or an array of ops")
    return body


def kv_ops(ops: List[Any], in_transaction: bool = False) -> List[Dict[str, Any]]:
    """Validated, normalised KV ops (WIRE2.md 2.1 limits; 5.1 inside a transaction)."""
    max_ops = MAX_OPS_IN_TRANSACTION if in_transaction else MAX_OPS
    if len(ops) > max_ops:
        raise _bad("kv_too_many_ops", f"at most {max_ops} ops per call, got {len(ops)}")
    clean = [_kv_op(op, index, in_transaction) for index, op in enumerate(ops)]
    max_keys = MAX_KEYS_IN_TRANSACTION if in_transaction else MAX_KEYS
    keys = sum(_key_count(op) for op in clean)
    if keys > max_keys:
        raise _bad("kv_too_many_keys", f"at most {max_keys} keys per call, got {keys}")
    written: Set[Tuple[str, str]] = set()
    for index, op in enumerate(clean):
        if op["op"] in _WRITES:
            if (op["ns"], op["key"]) in written:
                raise _bad("kv_duplicate_key_in_call",
                           f"op {index}: key {op['key']!r} of {op['ns']!r} is written by an "
                           "earlier op of this call; a key may be written once per call")
            written.add((op["ns"], op["key"]))
    return clean


def _key_count(op: Dict[str, Any]) -> int:
    if op["kind"] == "getMany":
        return len(op["keys"])
    if op["kind"] == "getPrefix":
        return int(op["limit"])
    return 1


def _kv_op(op: Any, index: int, in_transaction: bool) -> Dict[str, Any]:
    if not isinstance(op, dict):
        raise _bad("kv_bad_op", f"op {index} must be an object")
    name = op.get("op")
    if not isinstance(name, str) or name not in _FIELDS:
        raise _bad("kv_unknown_op", f"op {index}: unknown op {name!r}; one of "
                   + ", ".join(sorted(_FIELDS)))
    tenant = _TENANT_FIELDS & set(op)
    if tenant:
        raise _bad("kv_tenant_field", f"op {index}: field {sorted(tenant)[0]!r} is not accepted")
    unknown = sorted(set(op) - _FIELDS[name])
    if unknown:
        raise _bad("kv_unknown_field", f"op {index} ({name}): unknown field {unknown[0]!r}")
    if name == "getPrefix" and in_transaction:
        raise _bad("kv_get_prefix_not_allowed_in_transaction",
                   f"op {index}: getPrefix cannot run inside a transaction")
    clean: Dict[str, Any] = {"op": name, "kind": "put" if name == "putIfAbsent" else name,
                             "ns": _namespace(op.get("ns"), index)}
    if "key" in _FIELDS[name]:
        clean["key"] = _key(op.get("key"), index, "key")
    _BUILDERS[name](op, clean, index)
    required = op.get("required", False)
    if not isinstance(required, bool):
        raise _bad("kv_bad_required", f"op {index}: required must be a boolean")
    clean["required"] = required
    return clean


def _namespace(ns: Any, index: int) -> str:
    if not isinstance(ns, str) or not _NAMESPACE.fullmatch(ns):
        raise _bad("kv_bad_namespace", f"op {index}: ns must match "
                   "^[a-z0-9][a-z0-9._-]{0,63}$")
    return ns


def _key(key: Any, index: int, field: str) -> str:
    if not isinstance(key, str) or not key:
        raise _bad("kv_bad_key", f"op {index}: {field} must be a non-empty string")
    if "\x00" in key:
        raise _bad("kv_bad_key", f"op {index}: {field} must not contain \\u0000")
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise KvInputError("payload_too_large", "kv_key_too_large",
                           f"op {index}: {field} is longer than {MAX_KEY_BYTES} bytes", 413)
    return key


def _expect(op: Dict[str, Any], index: int) -> Optional[int]:
    if "expect" not in op:
        return None
    expect = op["expect"]
    if isinstance(expect, bool) or not isinstance(expect, int) or not 0 <= expect <= MAX_VERSION:
        raise _bad("kv_bad_expect", f"op {index}: expect must be a version, an integer >= 0")
    return expect


def _ttl(op: Dict[str, Any], index: int) -> Optional[int]:
    """Seconds to live, or None for ``forever``: exactly one of the two is mandatory."""
    has_ttl, has_forever = op.get("ttlSeconds") is not None, op.get("forever") is not None
    if has_ttl == has_forever:
        raise _bad("kv_expiry_not_specified", f"op {index}: give exactly one of ttlSeconds "
                   "(an integer > 0) or forever: true")
    if has_forever:
        if op["forever"] is not True:
            raise _bad("kv_bad_expiry", f"op {index}: forever must be true when given")
        return None
    ttl = op["ttlSeconds"]
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not 0 < ttl <= MAX_TTL_SECONDS:
        raise _bad("kv_bad_ttl", f"op {index}: ttlSeconds must be an integer from 1 to "
                   f"{MAX_TTL_SECONDS}")
    return ttl


def _number(op: Dict[str, Any], field: str, index: int, default: Any = None) -> Any:
    """The field's number; ``default`` when it is absent or null (a null delta reached SQL,
    whose ``value + NULL`` broke the row's NOT NULL: a 500)."""
    value = op.get(field)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not math.isfinite(value)):
        raise _bad("kv_bad_number", f"op {index}: {field} must be a number")
    return value


def _value(op: Dict[str, Any], clean: Dict[str, Any], index: int) -> None:
    if "value" not in op:
        raise _bad("kv_value_required", f"op {index}: value is required (null is a value)")
    if len(jsoncodec.dumps(op["value"])) > MAX_VALUE_BYTES:
        raise KvInputError("payload_too_large", "kv_value_too_large",
                           f"op {index}: value is larger than {MAX_VALUE_BYTES} bytes as "
                           "compact JSON", 413)
    clean["value"] = op["value"]


def _build_get(op: Dict[str, Any], clean: Dict[str, Any], index: int) -> None:
    pass


def _build_get_many(op: Dict[str, Any], clean: Dict[str, Any], index: int) -> None:
    keys = op.get("keys")
    if not isinstance(keys, list) or not keys:
        raise _bad("kv_bad_keys", f"op {index}: keys must be a non-empty array")
    clean["keys"] = [_key(key, index, "keys[]") for key in keys]


def _build_get_prefix(op: Dict[str, Any], clean: Dict[str, Any], index: int) -> None:
    clean["prefix"] = _key(op.get("prefix"), index, "prefix")
    if op.get("after") is not None:
        clean["after"] = _key(op["after"], index, "after")
    limit = op.get("limit")
    if limit is None:
        limit = PREFIX_LIMIT_DEFAULT
    elif isinstance(limit, bool) or not isinstance(limit, int):
        raise _bad("kv_bad_limit", f"op {index}: limit must be an integer")
    clean["limit"] = min(max(limit, 1), PREFIX_LIMIT_MAX)  # clamped, never refused
    keys_only = op.get("keysOnly", False)
    if not isinstance(keys_only, bool):
        raise _bad("kv_bad_keys_only", f"op {index}: keysOnly must be a boolean")
    clean["keysOnly"] = keys_only


def _build_put(op: Dict[str, Any], clean: Dict[str, Any], index: int) -> None:
    _value(op, clean, index)
    clean["ttl"] = _ttl(op, index)
    clean["expect"] = _expect(op, index)


def _build_put_if_absent(op: Dict[str, Any], clean: Dict[str, Any], index: int) -> None:
    _build_put(op, clean, index)
    if clean["expect"] not in (None, 0):
        raise _bad("kv_bad_expect", f"op {index}: putIfAbsent means expect 0; "
                   f"expect {clean['expect']} beside it is a contradiction")
    clean["expect"] = 0


def _build_delete(op: Dict[str, Any], clean: Dict[str, Any], index: int) -> None:
    clean["expect"] = _expect(op, index)


def _build_check(op: Dict[str, Any], clean: Dict[str, Any], index: int) -> None:
    clean["expect"] = _expect(op, index)
    if clean["expect"] is None:
        raise _bad("kv_bad_expect", f"op {index}: check needs expect (0: must not exist)")


def _build_incr(op: Dict[str, Any], clean: Dict[str, Any], index: int) -> None:
    if "expect" in op:
        raise _bad("kv_bad_expect", f"op {index}: incr takes no expect (it is the way out "
                   "of a compare-and-set loop)")
    clean["delta"] = _number(op, "delta", index, 1)
    clean["min"] = _number(op, "min", index)
    clean["max"] = _number(op, "max", index)
    if clean["min"] is not None and clean["max"] is not None and clean["min"] > clean["max"]:
        raise _bad("kv_bad_bounds", f"op {index}: min is above max")
    clean["ttl"] = _ttl(op, index)


_BUILDERS = {
    "get": _build_get, "getMany": _build_get_many, "getPrefix": _build_get_prefix,
    "put": _build_put, "putIfAbsent": _build_put_if_absent, "delete": _build_delete,
    "incr": _build_incr, "check": _build_check,
}


# -- locks ----------------------------------------------------------------------------------

_LOCK_FIELDS = {
    "acquire": frozenset({"op", "name", "ttlSeconds", "owner", "limit"}),
    "renew": frozenset({"op", "name", "token", "ttlSeconds", "slot", "owner"}),
    "release": frozenset({"op", "name", "token", "slot"}),
    "get": frozenset({"op", "name"}),
}


def _lock_bad(reason: str, detail: str) -> KvInputError:
    return KvInputError("locks_bad_request", reason, detail)


def lock_ops(ops: List[Any]) -> List[Dict[str, Any]]:
    """Validated lock ops (WIRE2.md 4): at most 64, each lock named once."""
    if len(ops) > MAX_LOCK_OPS:
        raise _lock_bad("locks_too_many_ops", f"at most {MAX_LOCK_OPS} ops per call")
    clean = [_lock_op(op, index) for index, op in enumerate(ops)]
    names = [op["name"] for op in clean]
    if len(set(names)) != len(names):
        raise _lock_bad("locks_duplicate_name", "each lock may be named once per call")
    return clean


def _lock_op(op: Any, index: int) -> Dict[str, Any]:
    if not isinstance(op, dict):
        raise _lock_bad("locks_bad_op", f"op {index} must be an object")
    name = op.get("op")
    if not isinstance(name, str) or name not in _LOCK_FIELDS:
        raise _lock_bad("locks_unknown_op", f"op {index}: unknown op {name!r}; one of "
                        "acquire, renew, release, get")
    unknown = sorted(set(op) - _LOCK_FIELDS[name])
    if unknown:
        raise _lock_bad("locks_unknown_field", f"op {index} ({name}): unknown field "
                        f"{unknown[0]!r}")
    clean: Dict[str, Any] = {"op": name, "name": _lock_text(op.get("name"), index, "name",
                                                           MAX_LOCK_NAME_BYTES, "#")}
    if name in ("acquire", "renew"):
        ttl = op.get("ttlSeconds")
        if isinstance(ttl, bool) or not isinstance(ttl, int) or not 0 < ttl <= MAX_TTL_SECONDS:
            raise _lock_bad("locks_ttl_required", f"op {index}: ttlSeconds must be an "
                            f"integer from 1 to {MAX_TTL_SECONDS} (a lock has no forever)")
        clean["ttl"] = ttl
        if op.get("owner") is not None:
            clean["owner"] = _lock_text(op["owner"], index, "owner", MAX_OWNER_BYTES, "")
    if name in ("renew", "release"):
        token = op.get("token")
        if isinstance(token, bool) or not isinstance(token, int) or not 0 < token <= MAX_VERSION:
            raise _lock_bad("locks_token_required", f"op {index}: token must be the permit's "
                            "token, an integer > 0")
        clean["token"] = token
        clean["slot"] = _whole(op.get("slot"), index, "slot", 0, MAX_SEMAPHORE_LIMIT - 1)
    if name == "acquire":
        clean["limit"] = _whole(op.get("limit"), index, "limit", 1, MAX_SEMAPHORE_LIMIT)
    return clean


def _whole(value: Any, index: int, field: str, low: int, high: int) -> int:
    if value is None:
        return low
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _lock_bad(f"locks_bad_{field}", f"op {index}: {field} must be an integer from "
                        f"{low} to {high}")
    return value


def _lock_text(value: Any, index: int, field: str, max_bytes: int, forbidden: str) -> str:
    if (not isinstance(value, str) or not value
            or len(value.encode("utf-8", "surrogatepass")) > max_bytes
            or any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or c in forbidden for c in value)):
        extra = f", without {forbidden!r}" if forbidden else ""
        raise _lock_bad(f"locks_bad_{field}", f"op {index}: {field} must be a non-empty "
                        f"string of at most {max_bytes} bytes, without control characters"
                        + extra)
    return value
