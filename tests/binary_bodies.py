"""Binary push and transaction bodies built byte by byte (WIRE2.md 9.1-9.3), for the tests
and the benchmark (bench/push_formats.py).

The layout is the 2.6.0 client's (queen/http/push_binary.py), written anew so that a test
can also build the bodies the client never would: wrong counts, foreign flags, ids that
are not version 7.
"""

from __future__ import annotations

import json
import os
import struct
import time
import uuid
from typing import Any, Dict, Optional, Sequence, Tuple

import zstandard


def text16(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<H", len(data)) + data


def zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=1, write_content_size=True).compress(data)


def v7_id(offset_ms: int = 0) -> bytes:
    """A version-7 UUID's 16 bytes (the client's recipe: time in ms, then random bits)."""
    stamp = (time.time_ns() // 1_000_000 + offset_ms).to_bytes(6, "big")
    tail = bytearray(os.urandom(10))
    tail[0] = 0x70 | (tail[0] & 0x0F)
    tail[2] = 0x80 | (tail[2] & 0x3F)
    return stamp + bytes(tail)


def frame(message_id: bytes, transaction_id: str, payload: bytes, flags: int = 0) -> bytes:
    txn = transaction_id.encode()
    return (struct.pack("<I", 1 + 16 + 2 + len(txn) + len(payload)) + bytes([flags])
            + message_id + struct.pack("<H", len(txn)) + txn + payload)


Message = Tuple[bytes, str, bytes]  # (id, transactionId, payload JSON)


def framed_group(queue: str, partition: str, messages: Sequence[Message],
                 count: Optional[int] = None, z: Optional[bytes] = None) -> bytes:
    if z is None:
        z = zstd(b"".join(frame(*m) for m in messages))
    n = len(messages) if count is None else count
    return text16(queue) + text16(partition) + struct.pack("<II", n, len(z)) + z


def framed_body(groups: Sequence[bytes], flags: int = 8) -> bytes:
    return b"QPB1" + bytes([flags]) + struct.pack("<I", len(groups)) + b"".join(groups)


def plain_body(groups: Sequence[Tuple[str, str, Sequence[Tuple[Optional[str], bytes]]]],
               flags: int = 4) -> bytes:
    """flags 4 (every item has a transactionId), with 1 the body zstd-compressed."""
    body = struct.pack("<I", len(groups))
    for queue, partition, items in groups:
        body += text16(queue) + text16(partition) + struct.pack("<I", len(items))
        for transaction_id, payload in items:
            if flags & 4:
                body += text16(transaction_id or "")
            body += struct.pack("<I", len(payload)) + payload
    if flags & 1:
        return b"QPB1" + bytes([flags]) + struct.pack("<I", len(body)) + zstd(body)
    return b"QPB1" + bytes([flags]) + body


def transaction_body(head: Dict[str, Any], groups: Sequence[bytes], flags: int = 0) -> bytes:
    data = json.dumps(head).encode()
    return (b"QTB1" + bytes([flags]) + struct.pack("<I", len(data)) + data
            + struct.pack("<I", len(groups)) + b"".join(groups))


def id_text(message_id: bytes) -> str:
    return str(uuid.UUID(bytes=message_id))
