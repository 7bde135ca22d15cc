"""JSON on the hot path: orjson where it is exact, the standard library where it is not.

Every pop answer, ack body and database parameter is written here, and every request body
read. Under load, the json module was the largest single cost of the server; orjson does
the same work several times faster. But orjson cannot write integers beyond 64 bits and
reads them as floats (losing digits); payloads may hold such numbers (jsonb keeps numbers of
any size), so those documents go through ``json`` unchanged.

Request bodies (bytes) are read by orjson unless they hold a run of 19 or more digits, the
shortest that may not fit 64 bits (a long digit string inside a text value takes the slow
path too, harmlessly); the check is one ``bytes.translate`` and one ``find``, a few percent
of the parse.

A body is also refused (:class:`UnstorableJSON`) when PostgreSQL could not store it or the
server could not write it back: ``\\u0000`` (jsonb and text reject it), a lone UTF-16
surrogate (not UTF-8), ``NaN``/``Infinity`` or a number overflowing a double (not JSON; they
used to become ``null``), or containers nested deeper than :data:`MAX_DEPTH` (the standard
library recurses once per level). The checks cost nothing on ordinary bodies: orjson already
refuses surrogates and non-finite numbers, and the tree is walked only when the raw bytes
hold a ``\\u0000`` escape, when they hold more than :data:`MAX_DEPTH` brackets and orjson
cannot write the document back (it stops at 254 levels), or when the slow path ran.
"""

import decimal
import json
import math
import re
from typing import Any, List, Optional, Tuple

import orjson

MAX_DEPTH = 512
"""Deepest nesting of arrays and objects accepted in a request body."""

_DIGIT_MAP = bytes(0x31 if 0x30 <= byte <= 0x39 else 0x30 for byte in range(256))
_LONG_NUMBER = b"1" * 19
_NUL_ESCAPE = b"\\u0000"
_STAND_IN = re.compile(rb'"\\u0000(\d+)\\u0000"')


class UnstorableJSON(ValueError):
    """Well-formed JSON that the server refuses to store (the message says why)."""


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON; an ``orjson.Fragment`` (JSON text kept as it came, such as a
    binary push's payload) is written as that text on either path."""
    try:
        return orjson.dumps(value)
    except TypeError:  # orjson.JSONEncodeError: an integer beyond 64 bits, or too deep
        return _dumps_slowly(value)


def _dumps_slowly(value: Any) -> bytes:
    """:func:`dumps` by the standard library, which writes any integer and nests to
    :data:`MAX_DEPTH` but cannot embed JSON text: each fragment is written as a stand-in
    string that no accepted document can hold (it has a NUL, which every request refuses),
    then replaced by the fragment's text."""
    fragments: List[bytes] = []

    def stand_in(item: Any) -> str:
        if not isinstance(item, orjson.Fragment):
            raise TypeError(f"Object of type {type(item).__name__} is not JSON serializable")
        fragments.append(orjson.dumps(item))  # (a fragment written alone is its text)
        return f"\x00{len(fragments) - 1}\x00"

    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False,
                      default=stand_in).encode()
    if not fragments:
        return text
    return _STAND_IN.sub(lambda found: fragments[int(found.group(1))], text)


def dumps_text(value: Any) -> str:
    """Compact JSON as ``str`` (for database parameters)."""
    return dumps(value).decode()


def loads(data: Any) -> Any:
    """Parses a request body (``bytes`` or ``str``).

    Raises ``ValueError`` on malformed input and its subclass :class:`UnstorableJSON` on a
    document PostgreSQL could not store (see the module docstring).
    """
    if isinstance(data, bytes) and data.translate(_DIGIT_MAP).find(_LONG_NUMBER) < 0:
        try:
            value = orjson.loads(data)
        except orjson.JSONDecodeError:
            pass  # NaN, Infinity, lone surrogates, too deep or malformed: json decides
        else:
            if _NUL_ESCAPE in data or (data.count(b"[") + data.count(b"{") > MAX_DEPTH
                                       and not _shallow(value)):
                _refuse_unstorable(value, surrogates_possible=False)
            return value
    try:
        value = json.loads(data, parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:
        raise UnstorableJSON(f"JSON nested deeper than {MAX_DEPTH} levels") from None
    _refuse_unstorable(value, surrogates_possible=True)
    return value


# PostgreSQL's numeric keeps at most 16383 digits after the decimal point. orjson reads a
# number past that (1e-16384) as 0.0, so a payload kept as its text (a binary push's) passes
# every check and fails its store: its partition's items answer "failed". Buffered during an
# outage it would fail its replay for good, so the buffer refuses it (QueueEngine._buffer).
# Only a number with an exponent of -1000 or below, or 6000 fraction digits, can be past it.
MAX_NUMERIC_SCALE = 16383
FINE_NUMBER = re.compile(rb"[eE]-0*[1-9][0-9]{3}|\.[0-9]{6000}")


def refuse_unstorable_numbers(data: bytes) -> None:
    """Raises :class:`UnstorableJSON` when JSON text ``data`` holds a number PostgreSQL's
    numeric cannot hold (see MAX_NUMERIC_SCALE); cheap unless FINE_NUMBER finds one."""
    if FINE_NUMBER.search(data) is not None:
        json.loads(data, parse_constant=_no_constant, parse_float=_storable_scale)


def _storable_scale(text: str) -> float:
    exponent = decimal.Decimal(text).as_tuple().exponent
    if isinstance(exponent, int) and -exponent > MAX_NUMERIC_SCALE:
        raise UnstorableJSON(f"number {text[:40]} has more than {MAX_NUMERIC_SCALE} digits "
                             "after the decimal point, more than PostgreSQL keeps")
    return 0.0


def _shallow(value: Any) -> bool:
    """True when ``value`` nests at most 254 levels: orjson writes it, in C, many times
    faster than :func:`_refuse_unstorable` walks a wide document (a push of many items)."""
    try:
        orjson.dumps(value)
    except TypeError:  # orjson.JSONEncodeError: deeper than orjson's limit of 254 levels
        return False
    return True


def _no_constant(name: str) -> Any:
    raise UnstorableJSON(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise UnstorableJSON(f"number {text[:40]} is out of range")
    return number


def _refuse_unstorable(value: Any, surrogates_possible: bool) -> None:
    """Raises :class:`UnstorableJSON` for the first thing PostgreSQL could not store."""
    stack: List[Tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            problem = _string_problem(item, surrogates_possible)
            if problem is not None:
                raise UnstorableJSON(problem)
            continue
        if isinstance(item, dict):
            children: Any = item.values()
            stack.extend((key, depth) for key in item)
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth >= MAX_DEPTH:
            raise UnstorableJSON(f"JSON nested deeper than {MAX_DEPTH} levels")
        stack.extend((child, depth + 1) for child in children)


def _string_problem(text: str, surrogates_possible: bool) -> Optional[str]:
    if "\x00" in text:
        return "text holds \\u0000 (NUL), which PostgreSQL cannot store"
    if surrogates_possible and not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return "text holds a lone UTF-16 surrogate (such as \\ud800), which is not Unicode"
    return None
