"""The binary bodies of queen-mq 2.x (WIRE2.md 9.1-9.3), decoded into ordinary push items.

``Content-Type: application/x-queen-push`` on ``POST /api/v1/push`` (magic ``QPB1``) and on
``POST /api/v1/transaction`` (magic ``QTB1``). All integers are little-endian; ``u16+x`` is a
u16 byte length, then that many UTF-8 bytes::

    "QPB1" u8 flags [u32 raw_len, if flags & 1] body
      flags: 1 body is one zstd frame of raw_len bytes, 2 answer counts only,
             4 every item carries a transactionId ("" = the server mints), 8 framed groups
      body (no 8): u32 groups, group = u16+queue u16+partition u32 n,
                   n x ([u16+transactionId, if flags & 4] u32 len payload-JSON)
      body (8):    u32 groups, group = u16+queue u16+partition u32 n u32 z_len z,
                   z = one zstd frame of n x (u32 body_len u8 0 16B-id u16+transactionId payload)
    "QTB1" u8 flags u32 head_len head-JSON, then the groups as with flag 8

The decoder checks everything a client can get wrong (magic, flags, lengths, counts, UTF-8,
names, version-7 ids, the zstd frames, each payload being one JSON document PostgreSQL can
store) and raises :class:`~queen_tw.errors.InvalidRequest` naming the first fault, so a
malformed body stores nothing. It yields the items a JSON push would (see
:func:`queen_tw.http.parsing.push_item`), with two differences:

- ``payload`` is an ``orjson.Fragment`` of the bytes as they came: they are checked once
  (orjson, in C) but never turned into Python objects and back; the database parameter,
  the file buffer's record and an encrypted queue's ciphertext are written around them.
- a framed message (flag 8) carries ``id``, the version-7 id its client minted, which
  ``queen.push_store`` stores it under.
"""

import struct
from collections import deque
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple

import orjson
import zstandard

from queen_tw import jsoncodec
from queen_tw.errors import InvalidRequest
from queen_tw.http.auth_gate import producer_sub
from queen_tw.http.parsing import (
    MAX_NAME_LENGTH,
    ValidatedPush,
    check_name,
    check_push_count,
    push_limit,
)

CONTENT_TYPE = b"application/x-queen-push"
PUSH_MAGIC = b"QPB1"
TRANSACTION_MAGIC = b"QTB1"

FLAG_ZSTD = 1
FLAG_COUNTS = 2
FLAG_TRANSACTION_IDS = 4
FLAG_FRAMES = 8
_PUSH_FLAGS = FLAG_ZSTD | FLAG_COUNTS | FLAG_TRANSACTION_IDS | FLAG_FRAMES
_TRANSACTION_FLAGS = FLAG_COUNTS
_DEFAULT_LIMIT = 64 * 1024 * 1024  # a request outside the site (tests): the default limit

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_FRAME_HEAD = 1 + 16 + 2  # flags, message id, transactionId length
_NULL = orjson.Fragment(b"null")
_NUL_ESCAPE = b"\\u0000"
# One decompression context for the process (making one costs ~12 us, using it ~1 us); the
# reactor thread is its only user.
_DECOMPRESSOR = zstandard.ZstdDecompressor()


@dataclass(frozen=True)
class PushBody:
    """A decoded ``QPB1`` body: the push items in wire order, and whether the answer is the
    counts only (flag 2)."""

    items: List[Dict[str, Any]]
    counts_only: bool


@dataclass(frozen=True)
class TransactionBody:
    """A decoded ``QTB1`` body: the JSON head (the transaction without its pushes), the
    pushed items in group order, and whether the answer counts pushes and acks (flag 2)."""

    head: Dict[str, Any]
    items: List[Dict[str, Any]]
    counts_only: bool

    def as_json_body(self) -> Dict[str, Any]:
        """The transaction as its JSON body would be: the head's operations, then one push
        operation with every pushed item (WIRE2.md 9.3: results come in that order)."""
        operations = self.head.get("operations")
        if operations is None:
            operations = []
        if not isinstance(operations, list):
            raise InvalidRequest("operations array required")
        pushes = [ValidatedPush(type="push", items=self.items)] if self.items else []
        return {**self.head, "operations": operations + pushes}


def read_push(request) -> PushBody:
    """The decoded binary push body of ``request`` (see :func:`decode_push`)."""
    return decode_push(_content(request), producer_sub(request), _limit(request),
                       push_limit(request))


def read_transaction(request) -> TransactionBody:
    """The decoded binary transaction body of ``request`` (see :func:`decode_transaction`)."""
    return decode_transaction(_content(request), producer_sub(request), _limit(request),
                              push_limit(request))


def _content(request) -> bytes:
    return request.content.read() if request.content is not None else b""


def _limit(request) -> int:
    return int(getattr(request, "max_body_bytes", _DEFAULT_LIMIT))


def is_binary(request) -> bool:
    """True when the request says its body is a binary push or transaction body."""
    kind = request.getHeader(b"content-type")
    return kind is not None and kind.split(b";", 1)[0].strip().lower() == CONTENT_TYPE


def decode_push(body: bytes, producer_sub: Optional[str], max_bytes: int,
                max_messages: Optional[int] = None) -> PushBody:
    """The items of a ``QPB1`` body. ``producer_sub`` is stamped on each item as on a JSON
    push; ``max_bytes`` bounds what its zstd frames may expand to, all together (the request
    body limit: a small body of highly compressed frames must not fill the memory), and
    ``max_messages`` how many messages its groups may declare (413 beyond, checked before a
    group's frames are expanded)."""
    reader = _Reader(body, "push body")
    if reader.take(4, "magic") != PUSH_MAGIC:
        raise InvalidRequest("Binary push body must start with QPB1")
    flags = reader.u8("flags")
    if flags & ~_PUSH_FLAGS:
        raise InvalidRequest(f"Binary push body has unknown flags {flags & ~_PUSH_FLAGS:#x}")
    if flags & FLAG_ZSTD:
        raw_len = reader.u32("raw_len")
        reader = _Reader(_unzstd(reader.rest(), "push body", max_bytes, raw_len), "push body")
        max_bytes -= raw_len
    if flags & FLAG_FRAMES:
        items = _framed_groups(reader, max_bytes, max_messages)
    else:
        items = _plain_groups(reader, bool(flags & FLAG_TRANSACTION_IDS), max_messages)
    reader.finish()
    return PushBody(_stamped(items, producer_sub), bool(flags & FLAG_COUNTS))


def decode_transaction(body: bytes, producer_sub: Optional[str], max_bytes: int,
                       max_messages: Optional[int] = None) -> TransactionBody:
    """The head and the pushed items of a ``QTB1`` body (see :func:`decode_push`)."""
    reader = _Reader(body, "transaction body")
    if reader.take(4, "magic") != TRANSACTION_MAGIC:
        raise InvalidRequest("Binary transaction body must start with QTB1")
    flags = reader.u8("flags")
    if flags & ~_TRANSACTION_FLAGS:
        raise InvalidRequest(
            f"Binary transaction body has unknown flags {flags & ~_TRANSACTION_FLAGS:#x}")
    head_bytes = reader.take(reader.u32("head length"), "head")
    items = _framed_groups(reader, max_bytes, max_messages)
    reader.finish()
    return TransactionBody(_head(head_bytes), _stamped(items, producer_sub),
                           bool(flags & FLAG_COUNTS))


def _head(data: bytes) -> Dict[str, Any]:
    if not data.strip():
        return {}
    try:
        head = jsoncodec.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise InvalidRequest(f"Binary transaction head is not valid JSON: {err}") from None
    if not isinstance(head, dict):
        raise InvalidRequest("Binary transaction head must be a JSON object")
    return head


def _stamped(items: List[Dict[str, Any]], producer_sub: Optional[str]
             ) -> List[Dict[str, Any]]:
    if producer_sub:
        for item in items:
            item["producerSub"] = producer_sub
    return items


class _Reader:
    """Reads a body front to back; every shortfall is a 400 naming the field and offset."""

    __slots__ = ("data", "pos", "what")

    def __init__(self, data: bytes, what: str):
        self.data = data
        self.pos = 0
        self.what = what

    def take(self, count: int, field: str) -> bytes:
        end = self.pos + count
        if end > len(self.data):
            raise InvalidRequest(f"Binary {self.what} is truncated: {field} needs {count} "
                                 f"bytes at offset {self.pos}, {len(self.data) - self.pos} left")
        chunk = self.data[self.pos:end]
        self.pos = end
        return chunk

    def u8(self, field: str) -> int:
        return self.take(1, field)[0]

    def u16(self, field: str) -> int:
        return int(_U16.unpack(self.take(2, field))[0])

    def u32(self, field: str) -> int:
        return int(_U32.unpack(self.take(4, field))[0])

    def name(self, what: str) -> str:
        return check_name(_utf8(self.take(self.u16(f"{what} length"), what), what), what)

    def rest(self) -> bytes:
        chunk = self.data[self.pos:]
        self.pos = len(self.data)
        return chunk

    def finish(self) -> None:
        if self.pos != len(self.data):
            raise InvalidRequest(f"Binary {self.what} has {len(self.data) - self.pos} bytes "
                                 f"after its last group")


def _utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(f"{what} is not UTF-8") from None


def _transaction_id(data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("TransactionId is not UTF-8") from None
    if len(data) > MAX_NAME_LENGTH and len(text) > MAX_NAME_LENGTH:
        raise InvalidRequest(f"TransactionId is longer than {MAX_NAME_LENGTH} characters")
    if b"\x00" in data:
        raise InvalidRequest("TransactionId must not contain \\u0000")
    return text


def _plain_groups(reader: _Reader, with_transaction_ids: bool,
                  max_messages: Optional[int]) -> List[Dict[str, Any]]:
    """Groups without frames: each item a length-prefixed payload (and transactionId)."""
    items: List[Dict[str, Any]] = []
    payloads: List[bytes] = []
    least = 4 + (2 if with_transaction_ids else 0)  # the length fields of an item
    for group in range(reader.u32("group count")):
        queue = reader.name("Queue")
        partition = reader.name("Partition")
        count = reader.u32("item count")
        left = len(reader.data) - reader.pos
        if count > left // least:  # a malformed count is a 400, not a request too large
            raise InvalidRequest(f"Binary push is truncated: group {group} declares {count} "
                                 f"items, the {left} bytes left hold at most {left // least}")
        check_push_count(len(items) + count, max_messages)
        for _ in range(count):
            item: Dict[str, Any] = {"queue": queue, "partition": partition}
            if with_transaction_ids:
                transaction_id = _transaction_id(reader.take(reader.u16("TransactionId length"),
                                                             "TransactionId"))
                if transaction_id:
                    item["transactionId"] = transaction_id
            payload = reader.take(reader.u32("payload length"), "payload")
            payloads.append(payload)
            item["payload"] = orjson.Fragment(payload) if payload else _NULL
            items.append(item)
    _check_payloads(payloads, [reader.data])
    return items


def _framed_groups(reader: _Reader, max_bytes: int,
                   max_messages: Optional[int]) -> List[Dict[str, Any]]:
    """Groups of zstd-compressed frames, each with the message id its client minted."""
    items: List[Dict[str, Any]] = []
    payloads: List[bytes] = []
    blobs: List[bytes] = []
    for group in range(reader.u32("group count")):
        queue = reader.name("Queue")
        partition = reader.name("Partition")
        count = reader.u32("message count")
        compressed = reader.take(reader.u32("z_len"), "zstd frame")
        most = _declared_size(compressed, f"group {group}") // (4 + _FRAME_HEAD)
        if count > most:  # a malformed count is a 400, not a request too large
            raise InvalidRequest(f"Binary push group {group} holds at most {most} frames, "
                                 f"its header says {count}")
        check_push_count(len(items) + count, max_messages)
        frames = _unzstd(compressed, f"group {group}", max_bytes)
        max_bytes -= len(frames)  # what every group expands to counts against one limit
        _read_frames(frames, count, group, queue, partition, items, payloads)
        blobs.append(frames)
    _check_payloads(payloads, blobs)
    ids = {item["id"] for item in items}
    if len(ids) != len(items):
        raise InvalidRequest("Binary push body repeats a message id")
    return items


def _read_frames(frames: bytes, count: int, group: int, queue: str, partition: str,
                 items: List[Dict[str, Any]], payloads: List[bytes]) -> None:
    """Appends the ``count`` frames of one group to ``items`` (and their payload bytes to
    ``payloads``); the frames must fill ``frames`` exactly. Every message pays this loop,
    so it keeps to slicing and C calls (~1.5 us a frame)."""
    try:
        _read_frames_into(frames, count, group, queue, partition, items, payloads)
    except UnicodeDecodeError:
        raise InvalidRequest(f"Binary push group {group}: a TransactionId is not UTF-8"
                             ) from None


def _read_frames_into(frames: bytes, count: int, group: int, queue: str, partition: str,
                      items: List[Dict[str, Any]], payloads: List[bytes]) -> None:
    frame_length, text_length = _U32.unpack_from, _U16.unpack_from
    fragment, add_item, add_payload = orjson.Fragment, items.append, payloads.append
    pos, size = 0, len(frames)
    for n in range(count):
        if pos + 4 + _FRAME_HEAD > size:
            raise InvalidRequest(f"Binary push group {group} holds {n} frames, "
                                 f"its header says {count}")
        end = pos + 4 + frame_length(frames, pos)[0]
        txn_at = pos + 4 + _FRAME_HEAD
        payload_at = txn_at + text_length(frames, pos + 21)[0]
        if payload_at > end or end > size:
            raise InvalidRequest(f"Binary push group {group}, frame {n}: its lengths do not "
                                 f"fit the frame")
        if frames[pos + 4]:
            raise InvalidRequest(f"Binary push group {group}, frame {n}: flags must be 0")
        # version nibble 7 (byte 6), RFC 9562 variant 10 (byte 8)
        if frames[pos + 11] >> 4 != 7 or frames[pos + 13] >> 6 != 2:
            raise InvalidRequest(f"Binary push group {group}, frame {n}: the message id is "
                                 f"not a version-7 UUID")
        # 32 hex digits: PostgreSQL reads a uuid so, and hyphens cost a Python step a frame
        message_id = frames[pos + 5:pos + 21].hex()
        txn = frames[txn_at:payload_at]
        if b"\x00" in txn or payload_at - txn_at > MAX_NAME_LENGTH:
            _transaction_id(txn)  # raises with the rule it breaks, unless long in bytes only
        payload = frames[payload_at:end]
        add_payload(payload)
        add_item({
            "queue": queue, "partition": partition,
            # an item without its own transactionId uses its id's text (as the client does)
            "transactionId": txn.decode() if txn else _hyphenated(message_id),
            "id": message_id,
            "payload": fragment(payload) if payload else _NULL})
        pos = end
    if pos != size:
        raise InvalidRequest(f"Binary push group {group} has {size - pos} bytes after its "
                             f"{count} frames")


def _hyphenated(hex_id: str) -> str:
    return f"{hex_id[:8]}-{hex_id[8:12]}-{hex_id[12:16]}-{hex_id[16:20]}-{hex_id[20:]}"


def _unzstd(frame: bytes, what: str, max_bytes: int, expected: Optional[int] = None) -> bytes:
    """One zstd frame, decompressed; its declared content size must be known, within
    ``max_bytes`` and equal to ``expected`` when given."""
    declared = _declared_size(frame, what)
    if declared > max_bytes:
        raise InvalidRequest(f"Binary {what}: the zstd frame expands to {declared} bytes, "
                             f"more than the {max_bytes} the request may still carry")
    if expected is not None and declared != expected:
        raise InvalidRequest(f"Binary {what}: raw_len is {expected} but the zstd frame "
                             f"holds {declared} bytes")
    stream = _DECOMPRESSOR.decompressobj()
    try:
        raw = stream.decompress(frame)
    except zstandard.ZstdError as err:
        raise InvalidRequest(f"Binary {what}: corrupt zstd frame ({err})") from None
    if not stream.eof or len(raw) != declared:
        raise InvalidRequest(f"Binary {what}: the zstd frame is truncated")
    if stream.unused_data:
        raise InvalidRequest(f"Binary {what}: {len(stream.unused_data)} bytes follow the "
                             f"zstd frame")
    return raw


def _declared_size(frame: bytes, what: str) -> int:
    """The content size a zstd frame's header declares (a 400 when it has none)."""
    try:
        declared = int(zstandard.frame_content_size(frame))
    except zstandard.ZstdError as err:
        raise InvalidRequest(f"Binary {what}: not a zstd frame ({err})") from None
    if declared < 0:
        raise InvalidRequest(f"Binary {what}: the zstd frame does not declare its size")
    return declared


def _check_payloads(payloads: List[bytes], blobs: List[bytes]) -> None:
    """Each payload must be one JSON document that a JSON push would accept (see
    :mod:`queen_tw.jsoncodec`). orjson checks them all in one C loop; the careful check, which
    also names the problem, runs only where orjson refused, or where the bytes may hold what
    orjson reads but the JSON path would not take: a NUL escape anywhere in the body
    (``blobs``), nesting past jsoncodec.MAX_DEPTH (only a payload that long has that many
    brackets). What PostgreSQL alone refuses (a number beyond its numeric) is a 400 too
    (queen_tw/db/pool.py)."""
    try:
        deque(map(orjson.loads, payloads), maxlen=0)
        suspects: Iterable[int] = ()
        if any(_NUL_ESCAPE in blob for blob in blobs):
            suspects = range(len(payloads))
        else:
            suspects = [index for index, payload in enumerate(payloads)
                        if len(payload) > 2 * jsoncodec.MAX_DEPTH
                        and payload.count(b"[") + payload.count(b"{") > jsoncodec.MAX_DEPTH]
    except orjson.JSONDecodeError:
        suspects = range(len(payloads))
    for index in suspects:
        if not payloads[index]:
            continue  # an empty payload is null
        try:
            _check_payload(payloads[index])
        except (ValueError, UnicodeDecodeError) as err:
            raise InvalidRequest(f"Binary push item {index}: payload is not valid JSON: "
                                 f"{err}") from None


def _check_payload(payload: bytes) -> None:
    """Raises ValueError naming why PostgreSQL would not store ``payload`` as it is."""
    try:
        orjson.loads(payload)
    except orjson.JSONDecodeError:
        # Decoded strictly: json.loads(bytes) would read UTF-16 or skip a byte order mark,
        # while PostgreSQL takes the bytes as sent.
        jsoncodec.loads(payload.decode("utf-8"))
    else:
        jsoncodec.loads(payload)  # valid UTF-8 JSON: its NUL and depth checks


def counts_answer(results: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The flag-2 answer of a push: how many items were queued, duplicate, buffered, and the
    first failure's error (null when none failed, so a successful answer has no truthy
    ``error``)."""
    tally = {"queued": 0, "duplicate": 0, "buffered": 0, "failed": 0}
    error = None
    for result in results:
        status = result.get("status")
        if status in tally:
            tally[status] += 1
        if status == "failed" and error is None:
            error = result.get("error") or "failed"
    return {"count": len(results), "queued": tally["queued"], "duplicate": tally["duplicate"],
            "buffered": tally["buffered"], "error": error}


def transaction_counts(outcome: Dict[str, Any], operations: List[Dict[str, Any]]
                       ) -> Dict[str, Any]:
    """The flag-2 answer of a binary transaction: the results of its ``operations`` (one
    per pushed item, one per other operation) are counted (``pushed``, ``duplicate``,
    ``acked``); the riders' results, which follow them, stay. A transaction rolled back
    pushed and acked nothing, whatever its results evaluated before the failure say."""
    results = outcome.get("results") or []
    entries = sum(len(op["items"]) if op["type"] == "push" else 1 for op in operations)
    counted, riders = results[:entries], results[entries:]
    if not outcome.get("success"):
        counted = []
    tally: Tuple[int, int, int] = (
        sum(1 for r in counted if r.get("type") == "push" and r.get("status") == "queued"),
        sum(1 for r in counted if r.get("type") == "push" and r.get("status") == "duplicate"),
        sum(1 for r in counted if r.get("type") == "ack" and r.get("success")))
    return dict(outcome, results=riders, pushed=tally[0], duplicate=tally[1], acked=tally[2])
