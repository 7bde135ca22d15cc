"""Query-string parameters (WIRE.md 1.2, 2.3.1, 3.x), read as the contract says.

WIRE.md 1.2: "booleans are true only for ``true`` or ``1``; unparsable integers take the
default", and 2.3.1 clamps ``batch`` to at least 1: an integer outside its range is clamped
to it. An absent or empty parameter takes the default. (An earlier release answered 400 for
``batch=abc`` or ``wait=maybe``, against the contract.) Text that cannot be a name or a
time still answers 400 naming the parameter.
"""

import re
from typing import Any, Collection, Dict, Optional

from queen_tw.errors import InvalidRequest
from queen_tw.http.parsing import optional_name, timestamp

INT32_MAX = 2**31 - 1
_INTEGER = re.compile(r"[+-]?[0-9]+")
_TRUE = ("true", "1")


def text(request, name: str) -> Optional[str]:
    """The first value of ``name``, decoded; None when absent."""
    values = request.args.get(name.encode())
    if not values:
        return None
    try:
        value = values[0].decode()
    except UnicodeDecodeError:
        raise InvalidRequest(f"{name} is not valid UTF-8") from None
    if "\x00" in value:
        raise InvalidRequest(f"{name} must not contain \\u0000")
    return value


def flag(request, name: str, default: bool = False) -> bool:
    """True for ``true`` or ``1`` (any case), false for any other value given."""
    value = text(request, name)
    if not value:
        return default
    return value.strip().lower() in _TRUE


def integer(request, name: str, default: int, minimum: int,
            maximum: int = INT32_MAX) -> int:
    """A decimal integer clamped to ``[minimum, maximum]``; ``default`` when absent or not
    an integer."""
    value = text(request, name)
    if not value:
        return default
    digits = value.strip()
    if not _INTEGER.fullmatch(digits):
        return default
    if len(digits) > 20:  # beyond any bound here; int() of thousands of digits is refused
        return minimum if digits.startswith("-") else maximum
    return min(max(int(digits), minimum), maximum)


def choice(request, name: str, choices: Collection[str], default: str) -> str:
    """One of ``choices`` (compared in lower case)."""
    value = text(request, name)
    if not value:
        return default
    if value.lower() not in choices:
        raise InvalidRequest(f"{name} must be one of {', '.join(sorted(choices))}")
    return value


def page(request, default_limit: int) -> Dict[str, int]:
    """``limit`` (1-1000, larger values are capped) and ``offset`` (≥ 0) of a listing."""
    return {"limit": min(integer(request, "limit", default_limit, 1), 1000),
            "offset": integer(request, "offset", 0, 0)}


MESSAGE_STATUSES = ("pending", "processing", "completed", "dead_letter", "failed")


def message_filters(request) -> Dict[str, Any]:
    """The filters of ``GET /api/v1/messages`` (WIRE.md 3.2); absent filters are left out."""
    status = text(request, "status")
    if status and status not in MESSAGE_STATUSES:
        raise InvalidRequest(f"status must be one of {', '.join(MESSAGE_STATUSES)}")
    filters: Dict[str, Any] = {
        "queue": optional_name(text(request, "queue"), "queue"),
        "partition": optional_name(text(request, "partition"), "partition"),
        "ns": text(request, "ns") or text(request, "namespace"),
        "task": text(request, "task"),
        "status": status,
        "from": timestamp(text(request, "from"), "from"),
        "to": timestamp(text(request, "to"), "to"),
        **page(request, 200),
    }
    return {key: value for key, value in filters.items() if value}
