"""Query-string parameters (WIRE.md 1.2, 2.3.1, 3.x), read strictly.

A parameter that is given but unusable answers 400 naming it instead of silently taking its
default: a client asking for ``batch=abc`` or ``wait=maybe`` has a bug it should see. An
absent or empty parameter takes the default. Every value the official clients send parses.
"""

import re
from typing import Any, Collection, Dict, Optional

from queen_tw.errors import InvalidRequest
from queen_tw.http.parsing import optional_name, timestamp

INT32_MAX = 2**31 - 1
_INTEGER = re.compile(r"[+-]?[0-9]+")
_TRUE = ("true", "1")
_FALSE = ("false", "0")


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
    """``true``/``1`` or ``false``/``0`` (any case)."""
    value = text(request, name)
    if not value:
        return default
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise InvalidRequest(f"{name} must be true or false")


def integer(request, name: str, default: int, minimum: int,
            maximum: int = INT32_MAX) -> int:
    """A decimal integer within ``[minimum, maximum]``."""
    value = text(request, name)
    if not value:
        return default
    digits = value.strip()
    if not _INTEGER.fullmatch(digits):
        raise InvalidRequest(f"{name} must be an integer")
    if len(digits) > 20:  # beyond any bound here; int() of thousands of digits is refused
        number = minimum - 1 if digits.startswith("-") else maximum + 1
    else:
        number = int(digits)
    if number < minimum:
        raise InvalidRequest(f"{name} must be at least {minimum}")
    if number > maximum:
        raise InvalidRequest(f"{name} must be at most {maximum}")
    return number


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
