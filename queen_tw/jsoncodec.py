"""JSON on the hot path: orjson where it is exact, the standard library where it is not.

Every pop answer, ack body and database parameter is written here, and every request body
read. Under load, the json module was the largest single cost of the server; orjson does
the same work several times faster. But orjson cannot write integers beyond 64 bits and
reads them as floats (losing digits), and it refuses NaN; payloads may hold such numbers
(jsonb keeps numbers of any size), so those documents go through ``json`` unchanged.

Request bodies (bytes) are read by orjson unless they hold a run of 19 or more digits, the
shortest that may not fit 64 bits (a long digit string inside a text value takes the slow
path too, harmlessly); the check is one ``bytes.translate`` and one ``find``, a few percent
of the parse. Database answers (str) are read by ``json``: the check would cost about what
orjson saves on them.
"""

import json
from typing import Any

import orjson

_DIGIT_MAP = bytes(0x31 if 0x30 <= byte <= 0x39 else 0x30 for byte in range(256))
_LONG_NUMBER = b"1" * 19


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON."""
    try:
        return orjson.dumps(value)
    except TypeError:  # orjson.JSONEncodeError: an integer beyond 64 bits, or a foreign type
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def dumps_text(value: Any) -> str:
    """Compact JSON as ``str`` (for database parameters)."""
    return dumps(value).decode()


def loads(data: Any) -> Any:
    """Parses ``bytes`` or ``str``; raises ``ValueError`` on malformed input."""
    if isinstance(data, bytes) and data.translate(_DIGIT_MAP).find(_LONG_NUMBER) < 0:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass  # NaN, Infinity, lone surrogates or malformed: json decides as before
    return json.loads(data)
