"""JSON on the hot path: orjson writes, the standard library reads.

Every pop answer, ack body and database parameter is written here. Under load, json.dumps
was the largest single cost of the server; orjson writes the same documents over ten times
faster. It cannot write integers beyond 64 bits, which payloads may hold (jsonb keeps
numbers of any size), so those rare documents go through ``json`` unchanged.

Reading stays with ``json``: orjson reads integers beyond 64 bits as floats (losing digits),
and telling such documents apart costs about what orjson saves on reading.
"""

import json
from typing import Any

import orjson

loads = json.loads


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON."""
    try:
        return orjson.dumps(value)
    except TypeError:  # orjson.JSONEncodeError: an integer beyond 64 bits, or a foreign type
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def dumps_text(value: Any) -> str:
    """Compact JSON as ``str`` (for database parameters)."""
    return dumps(value).decode()
