"""Encrypted payloads inside answers PostgreSQL wrote as text: pops and reads by offset.

PostgreSQL writes a pop's messages and a fetch's records as finished JSON text, which the
server passes on unparsed. An encrypted payload appears there as its stored envelope: the
jsonb text of ``{"iv", "authTag", "encrypted"}``, three base64 strings, so no brace inside
it. The plaintext's JSON text replaces exactly that span, and every other byte goes out as
PostgreSQL wrote it. Parsing the whole answer and writing it again instead changed the plain
payloads beside an encrypted one (numbers beyond a double's precision lost digits) and failed
on payloads nested near the depth limit.

Where the envelopes are: a pop message starts ``{"id":"<id>"`` and its first ``,"data":``
key is its payload (every string before it is JSON-escaped, so no unescaped quote can fake
the key); a fetch record ends ``,"payload":<envelope>,"ts":"…","encrypted":true}``, a marker
with no space after the colon, which jsonb's own text (``": "``) never writes.
"""

import json
from typing import Any, Callable, Iterable, List, Optional, Tuple

OpenPayload = Callable[[Any], Optional[str]]
"""A stored envelope's plaintext JSON text; None when it cannot be opened (a tampered row):
the envelope then goes out as stored. Without a key it raises (``NoEncryptionKey``), and so
do the functions below: nothing is handed out."""

_ENVELOPE_KEYS = {"iv", "authTag", "encrypted"}
_FETCH_MARKER = ',"encrypted":true'
_FETCH_TS = ',"ts":"'
_POP_DATA = ',"data":'

_Span = Tuple[int, int, str]


def open_pop_messages(text: str, encrypted_ids: Iterable[str], open_payload: OpenPayload
                      ) -> str:
    """A pop's message array with the ``data`` of the messages ``encrypted_ids`` opened."""
    spans: List[_Span] = []
    for message_id in encrypted_ids:
        start = text.find('{"id":"' + message_id + '"')
        data = text.find(_POP_DATA, start) if start >= 0 else -1
        if data >= 0:
            spans += _opened(text, data + len(_POP_DATA), open_payload)
    return _spliced(text, spans)


def open_fetch_records(text: str, open_payload: OpenPayload) -> str:
    """A fetch answer with every marked record's payload opened and its marker gone."""
    spans: List[_Span] = []
    at = text.find(_FETCH_MARKER)
    while at >= 0:
        spans.append((at, at + len(_FETCH_MARKER), ""))
        ts = text.rfind(_FETCH_TS, 0, at)
        start = text.rfind("{", 0, ts)
        if ts > 0 and start >= 0:
            spans += [span for span in _opened(text, start, open_payload) if span[1] == ts]
        at = text.find(_FETCH_MARKER, at + len(_FETCH_MARKER))
    return _spliced(text, spans)


def _opened(text: str, start: int, open_payload: OpenPayload) -> List[_Span]:
    """The envelope object at ``start`` and its plaintext, or nothing when there is none
    there or it cannot be opened."""
    if not text.startswith("{", start):
        return []
    end = text.find("}", start) + 1
    try:
        stored = json.loads(text[start:end]) if end > 0 else None
    except ValueError:
        return []
    if not isinstance(stored, dict) or set(stored) != _ENVELOPE_KEYS:
        return []
    plain = open_payload(stored)
    return [] if plain is None else [(start, end, plain)]


def _spliced(text: str, spans: List[_Span]) -> str:
    """``text`` with each (start, end) span replaced; spans never overlap."""
    if not spans:
        return text
    pieces, position = [], 0
    for start, end, replacement in sorted(spans):
        pieces += [text[position:start], replacement]
        position = end
    pieces.append(text[position:])
    return "".join(pieces)


__all__ = ["OpenPayload", "open_fetch_records", "open_pop_messages"]
