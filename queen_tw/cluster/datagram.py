"""The peer-sync datagram (WIRE 6.3): bytes in and out, HMAC, and the replay guard.

Pure code, no sockets and no reactor, so every rule can be tested on bytes alone. A
datagram comes from the network and anybody can send one: :func:`decode` turns any input
into either a :class:`Datagram` or one :class:`Rejected` carrying a reason code (the
protocol counts drops per reason), and nothing else. Layout, all integers big-endian::

    0-3 magic b"QTW\\x01" | 4 type | 5 flags (bit 0 = signed) | 6-7 payload length
    8-15 sender wall-clock ms | 16-23 sequence | 24-39 session id (16 random bytes)
    40 sender-id length L (1..64) | 41.. sender id UTF-8 | payload: compact UTF-8 JSON object
    then, when signed, 32 bytes of HMAC-SHA256 over everything before them

The datagram never exceeds :data:`MAX_DATAGRAM` bytes so it is never fragmented.
"""

import hashlib
import hmac
import json
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

MAGIC = b"QTW\x01"

MESSAGE_AVAILABLE = 1
HEARTBEAT = 3
QUEUE_CONFIG_SET = 10
QUEUE_CONFIG_DELETE = 11
MAINTENANCE_MODE_SET = 40
POP_MAINTENANCE_MODE_SET = 41

TYPE_NAMES = {
    MESSAGE_AVAILABLE: "MESSAGE_AVAILABLE",
    HEARTBEAT: "HEARTBEAT",
    QUEUE_CONFIG_SET: "QUEUE_CONFIG_SET",
    QUEUE_CONFIG_DELETE: "QUEUE_CONFIG_DELETE",
    MAINTENANCE_MODE_SET: "MAINTENANCE_MODE_SET",
    POP_MAINTENANCE_MODE_SET: "POP_MAINTENANCE_MODE_SET",
}
"""The types queen-tw acts on; any other type (2, 20, 21, 25, 30, 31 are reserved) is dropped."""

FLAG_SIGNED = 0x01
MAX_DATAGRAM = 1400
MAX_SENDER_ID = 64
SESSION_ID_SIZE = 16
SIGNATURE_SIZE = 32
CLOCK_WINDOW_MS = 30_000
"""A datagram whose sender clock is further than this from ours is stale (or forged)."""

_HEADER = struct.Struct(">4sBBHQQ16sB")
HEADER_SIZE = _HEADER.size
_U64 = 2**64


class Rejected(Exception):
    """A datagram that is dropped; ``reason`` is a short code for counters and logs.

    Reasons: ``truncated``, ``oversized``, ``bad_magic``, ``bad_flags``, ``unsigned``,
    ``bad_signature``, ``bad_sender_id``, ``bad_length``, ``bad_json``, ``unknown_type``,
    ``bad_payload`` (from :func:`decode`); ``stale``, ``replayed``, ``old_session`` (from
    :class:`ReplayGuard`).
    """

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class DatagramTooLarge(ValueError):
    """What :func:`encode` raises rather than build a datagram over :data:`MAX_DATAGRAM`."""


SIGNATURE_REASONS = frozenset({"unsigned", "bad_signature"})
"""Rejections counted as ``signature_failures``."""
REPLAY_REASONS = frozenset({"stale", "replayed", "old_session"})
"""Rejections counted as ``sequence_rejections``."""


@dataclass(frozen=True)
class Datagram:
    """One decoded datagram; ``payload`` has been checked against its type (see decode)."""

    type: int
    sender_id: str
    session_id: bytes
    sequence: int
    sent_ms: int
    payload: Dict[str, Any]
    signed: bool


def encode(kind: int, payload: Dict[str, Any], *, sender_id: str, session_id: bytes,
           sequence: int, sent_ms: int, secret: Optional[bytes]) -> bytes:
    """Builds the bytes of one datagram, signed when ``secret`` is given.

    :raises DatagramTooLarge: the result would exceed :data:`MAX_DATAGRAM` bytes (a big
        queue config): the caller skips it, peers catch up from PostgreSQL.
    :raises ValueError: a field outside its range (a programming error, not input).
    """
    sender = sender_id.encode("utf-8")
    if not 1 <= len(sender) <= MAX_SENDER_ID:
        raise ValueError(f"sender id must be 1 to {MAX_SENDER_ID} bytes of UTF-8")
    if len(session_id) != SESSION_ID_SIZE:
        raise ValueError(f"session id must be {SESSION_ID_SIZE} bytes")
    if not (0 <= kind < 256 and 0 <= sequence < _U64 and 0 <= sent_ms < _U64):
        raise ValueError("type, sequence or timestamp out of range")
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    size = HEADER_SIZE + len(sender) + len(body) + (SIGNATURE_SIZE if secret else 0)
    if size > MAX_DATAGRAM:
        raise DatagramTooLarge(f"datagram of {size} bytes exceeds {MAX_DATAGRAM}")
    flags = FLAG_SIGNED if secret else 0
    data = _HEADER.pack(MAGIC, kind, flags, len(body), sent_ms, sequence, session_id,
                        len(sender)) + sender + body
    if secret:
        data += _signature(secret, data)
    return data


def decode(data: bytes, secret: Optional[bytes]) -> Datagram:
    """Parses and checks one received datagram.

    With a ``secret`` only signed datagrams with a matching HMAC pass (compared in
    constant time); without one, the signature of a signed datagram cannot be checked and
    is ignored. Raises :class:`Rejected` and nothing else, whatever the bytes.
    """
    if len(data) > MAX_DATAGRAM:
        raise Rejected("oversized")
    if len(data) < HEADER_SIZE:
        raise Rejected("truncated")
    magic, kind, flags, payload_length, sent_ms, sequence, session_id, sender_length = \
        _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise Rejected("bad_magic")
    if flags & ~FLAG_SIGNED:
        raise Rejected("bad_flags")
    signed = bool(flags & FLAG_SIGNED)
    end = len(data)
    if signed:
        if end < HEADER_SIZE + SIGNATURE_SIZE:
            raise Rejected("truncated")
        end -= SIGNATURE_SIZE
    if secret:
        if not signed:
            raise Rejected("unsigned")
        if not hmac.compare_digest(_signature(secret, data[:end]), data[end:]):
            raise Rejected("bad_signature")
    if not 1 <= sender_length <= MAX_SENDER_ID:
        raise Rejected("bad_sender_id")
    if HEADER_SIZE + sender_length + payload_length != end:
        raise Rejected("bad_length")
    body_start = HEADER_SIZE + sender_length
    try:
        sender_id = data[HEADER_SIZE:body_start].decode("utf-8")
    except UnicodeDecodeError:
        raise Rejected("bad_sender_id") from None
    payload = _parse_json(data[body_start:end])
    if kind not in TYPE_NAMES:
        raise Rejected("unknown_type")
    _check_payload(kind, payload)
    return Datagram(kind, sender_id, session_id, sequence, sent_ms, payload, signed)


def _signature(secret: bytes, signed_part: bytes) -> bytes:
    return hmac.new(secret, signed_part, hashlib.sha256).digest()


def _parse_json(body: bytes) -> Dict[str, Any]:
    try:
        value = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):  # bad UTF-8 and bad JSON are both ValueErrors
        raise Rejected("bad_json") from None
    if not isinstance(value, dict):
        raise Rejected("bad_json")
    return value


def _check_payload(kind: int, payload: Dict[str, Any]) -> None:
    """The fields each type's receiver reads must be there with the right JSON type."""
    if kind in (MESSAGE_AVAILABLE, QUEUE_CONFIG_SET, QUEUE_CONFIG_DELETE):
        queue = payload.get("queue")
        if not isinstance(queue, str) or not queue:
            raise Rejected("bad_payload")
    if kind == MESSAGE_AVAILABLE and not isinstance(payload.get("partition"), (str, type(None))):
        raise Rejected("bad_payload")
    if kind == QUEUE_CONFIG_SET and not isinstance(payload.get("config"), dict):
        raise Rejected("bad_payload")
    if kind in (MAINTENANCE_MODE_SET, POP_MAINTENANCE_MODE_SET) and \
            not isinstance(payload.get("enabled"), bool):
        raise Rejected("bad_payload")


@dataclass
class _SenderState:
    session_id: bytes
    sequence: int
    sent_ms: int


class ReplayGuard:
    """Drops replayed and stale datagrams; remembers the last accepted one per sender.

    - a datagram whose sender clock is more than :data:`CLOCK_WINDOW_MS` from ``now_ms()``
      is ``stale`` (clocks of the instances are expected to be NTP-synchronised);
    - in the sender's current session the sequence must grow (else ``replayed``);
    - a new session is accepted only if its clock is newer than the last accepted
      datagram of that sender (else ``old_session``: a captured old session replayed).

    Own datagrams are the caller's to drop (by sender id and session) before this guard.
    At most ``max_senders`` senders are remembered; beyond that the one heard from least
    recently is forgotten, so forged sender ids cannot grow memory without bound.
    """

    def __init__(self, now_ms: Callable[[], int], *, window_ms: int = CLOCK_WINDOW_MS,
                 max_senders: int = 1024):
        self._now_ms = now_ms
        self._window_ms = window_ms
        self._max_senders = max_senders
        self._senders: OrderedDict[str, _SenderState] = OrderedDict()

    def admit(self, datagram: Datagram) -> None:
        """Records ``datagram`` as accepted, or raises :class:`Rejected` without recording."""
        if abs(self._now_ms() - datagram.sent_ms) > self._window_ms:
            raise Rejected("stale")
        known = self._senders.get(datagram.sender_id)
        if known is not None:
            if known.session_id == datagram.session_id:
                if datagram.sequence <= known.sequence:
                    raise Rejected("replayed")
            elif datagram.sent_ms <= known.sent_ms:
                raise Rejected("old_session")
        self._senders[datagram.sender_id] = _SenderState(
            datagram.session_id, datagram.sequence, datagram.sent_ms)
        self._senders.move_to_end(datagram.sender_id)
        while len(self._senders) > self._max_senders:
            self._senders.popitem(last=False)
