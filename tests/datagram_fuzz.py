"""Hostile peer-sync datagrams for tests: hand-crafted ones and a seeded generator.

:func:`craft` builds a datagram field by field, with a correct HMAC over whatever it was
given, so a test can reach each check behind the signature. :func:`hostile_datagrams`
yields datagrams that a receiver holding ``secret`` must reject, every one of them: random
bytes, mutations of valid signed datagrams (bit flips, truncations, extensions, lying
length fields, huge sender-id lengths) and correctly signed ones with bad contents
(non-UTF-8, JSON that is not an object, deep nesting, unknown types, bad flags).
"""

import hashlib
import hmac
import random
import struct
from typing import Iterator, Optional

from queen_tw.cluster import datagram as dg

SESSION = b"S" * 16


def craft(*, kind: int = dg.MESSAGE_AVAILABLE, flags: Optional[int] = None,
          sender: bytes = b"peer-a:6633", sender_length: Optional[int] = None,
          body: bytes = b'{"queue":"q","partition":"p","ts":1}',
          payload_length: Optional[int] = None, sent_ms: int = 1_000_000,
          sequence: int = 1, session: bytes = SESSION, magic: bytes = dg.MAGIC,
          secret: Optional[bytes] = None) -> bytes:
    """One datagram with every field chosen by the caller; signed (correctly) if ``secret``."""
    if flags is None:
        flags = dg.FLAG_SIGNED if secret else 0
    header = struct.pack(">4sBBHQQ16sB", magic, kind, flags,
                         len(body) if payload_length is None else payload_length,
                         sent_ms, sequence, session,
                         len(sender) if sender_length is None else sender_length)
    data = header + sender + body
    if secret:
        data += hmac.new(secret, data, hashlib.sha256).digest()
    return data


def valid(rng: random.Random, secret: Optional[bytes], sent_ms: int = 1_000_000) -> bytes:
    """A valid datagram of a random known type (sequence random, so each is distinct)."""
    kind = rng.choice(sorted(dg.TYPE_NAMES))
    payload: dict = {"ts": sent_ms}
    if kind in (dg.MESSAGE_AVAILABLE, dg.QUEUE_CONFIG_SET, dg.QUEUE_CONFIG_DELETE):
        payload["queue"] = f"queue-{rng.randrange(1000)}"
        payload["partition"] = "Default"
    if kind == dg.QUEUE_CONFIG_SET:
        payload["config"] = {"lease_time": rng.randrange(1, 600)}
    if kind in (dg.MAINTENANCE_MODE_SET, dg.POP_MAINTENANCE_MODE_SET):
        payload["enabled"] = rng.random() < 0.5
    return dg.encode(kind, payload, sender_id=f"peer-{rng.randrange(5)}:6633",
                     session_id=rng.randbytes(16), sequence=rng.randrange(1, 2**32),
                     sent_ms=sent_ms, secret=secret)


def _flip(rng: random.Random, data: bytes) -> bytes:
    mutated = bytearray(data)
    for _ in range(rng.randint(1, 5)):
        mutated[rng.randrange(len(mutated))] ^= rng.randint(1, 255)
    return bytes(mutated) if bytes(mutated) != data else _flip(rng, data)


def _set(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new):]


def hostile_datagrams(rng: random.Random, count: int, secret: bytes,
                      sent_ms: int = 1_000_000) -> Iterator[bytes]:
    """``count`` datagrams, each of which ``decode(data, secret)`` must reject."""
    crafted = [
        lambda: craft(sender_length=0, secret=secret),
        lambda: craft(sender_length=rng.randint(65, 255), secret=secret),
        lambda: craft(payload_length=rng.randrange(65536), secret=secret),
        lambda: craft(sender=rng.randbytes(rng.randint(1, 64)) + b"\xff", secret=secret),
        lambda: craft(body=b'{"queue":"\xff\xfe"}', secret=secret),
        lambda: craft(body=rng.choice([b"[1]", b"1", b"null", b'"s"', b"true"]),
                      secret=secret),
        lambda: craft(body=b"[" * rng.randint(1000, 1300), secret=secret),
        lambda: craft(body=b'{"a":' * 250 + b"1" + b"}" * 250, secret=secret),
        lambda: craft(body=rng.randbytes(rng.randint(0, 200)) + b"\x00{", secret=secret),
        lambda: craft(kind=rng.choice([0, 2, 20, 21, 25, 30, 31, 99, 255]), secret=secret),
        lambda: craft(body=b'{"queue":7}', secret=secret),
        lambda: craft(kind=dg.MAINTENANCE_MODE_SET, body=b'{"enabled":"yes"}',
                      secret=secret),
        lambda: craft(flags=rng.choice([2, 3, 0x80, 0xFF]), secret=secret),
        lambda: craft(magic=rng.randbytes(4), secret=secret),
        lambda: craft(secret=secret + b"-wrong"),
        lambda: craft(secret=None),
    ]
    mutations = [
        lambda data: _flip(rng, data),
        lambda data: data[:rng.randrange(len(data))],
        lambda data: data + rng.randbytes(rng.randint(1, 100)),
        lambda data: _set(data, 6, struct.pack(">H", (struct.unpack_from(">H", data, 6)[0]
                                                       + rng.randint(1, 65535)) % 65536)),
        lambda data: _set(data, 40, bytes([(data[40] + rng.randint(1, 255)) % 256])),
        lambda data: data[:-1] + bytes([data[-1] ^ 1]),
    ]
    for index in range(count):
        choice = index % 4
        if choice == 0:
            yield rng.randbytes(rng.choice([0, 1, 40, rng.randint(0, 1500)]))
        elif choice == 1:
            yield rng.choice(crafted)()
        else:
            yield rng.choice(mutations)(valid(rng, secret, sent_ms))
