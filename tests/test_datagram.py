"""The peer-sync datagram codec and replay guard (WIRE 6.3), on bytes alone."""

import hashlib
import hmac
import random
import struct

import pytest

from queen_tw.cluster import datagram as dg
from queen_tw.cluster.datagram import Datagram, DatagramTooLarge, Rejected, ReplayGuard

from datagram_fuzz import SESSION, craft, hostile_datagrams

SECRET = "clé partagée".encode()


def _encode(kind=dg.MESSAGE_AVAILABLE, payload=None, secret=SECRET, **fields):
    values = {"sender_id": "höst-a:6633", "session_id": SESSION, "sequence": 7,
              "sent_ms": 1_700_000_000_123}
    values.update(fields)
    return dg.encode(kind, {"queue": "q", "partition": "p"} if payload is None else payload,
                     secret=secret, **values)


def _reason(data: bytes, secret=SECRET) -> str:
    with pytest.raises(Rejected) as caught:
        dg.decode(data, secret)
    return caught.value.reason


@pytest.mark.parametrize("secret", [SECRET, None])
@pytest.mark.parametrize("kind, payload", [
    (dg.MESSAGE_AVAILABLE, {"queue": "orders", "partition": "eu-1", "ts": 5}),
    (dg.MESSAGE_AVAILABLE, {"queue": "orders", "partition": None, "ts": 5}),
    (dg.HEARTBEAT, {}),
    (dg.QUEUE_CONFIG_SET, {"queue": "orders", "config": {"lease_time": 30}, "version": 2}),
    (dg.QUEUE_CONFIG_DELETE, {"queue": "orders"}),
    (dg.MAINTENANCE_MODE_SET, {"enabled": True, "ts": 1}),
    (dg.POP_MAINTENANCE_MODE_SET, {"enabled": False, "ts": 1}),
])
def test_every_type_round_trips_signed_and_unsigned(kind, payload, secret):
    data = _encode(kind, payload, secret=secret)

    assert dg.decode(data, secret) == Datagram(kind, "höst-a:6633", SESSION, 7,
                                               1_700_000_000_123, payload, bool(secret))


def test_layout_is_the_one_in_wire_6_3():
    data = _encode(payload={"queue": "q"}, sender_id="ab", sequence=258, sent_ms=513)
    body = b'{"queue":"q"}'

    assert data[:4] == b"QTW\x01"
    assert data[4] == dg.MESSAGE_AVAILABLE and data[5] == dg.FLAG_SIGNED
    assert struct.unpack(">HQQ", data[6:24]) == (len(body), 513, 258)
    assert data[24:40] == SESSION and data[40] == 2 and data[41:43] == b"ab"
    assert data[43:-32] == body
    assert data[-32:] == hmac.new(SECRET, data[:-32], hashlib.sha256).digest()
    assert len(_encode(secret=None)) == len(_encode()) - 32 and _encode(secret=None)[5] == 0


def test_a_signed_datagram_is_read_without_a_secret_but_its_signature_is_not_checked():
    forged = craft(secret=b"whatever")

    assert dg.decode(forged, None).signed


def test_encode_refuses_a_datagram_over_1400_bytes_and_builds_one_of_exactly_1400():
    base = len(_encode(payload={"queue": "q", "pad": ""}))
    exact = _encode(payload={"queue": "q", "pad": "x" * (1400 - base)})

    assert len(exact) == 1400 and dg.decode(exact, SECRET).payload["pad"]
    with pytest.raises(DatagramTooLarge):
        _encode(payload={"queue": "q", "pad": "x" * (1401 - base)})


@pytest.mark.parametrize("fields", [{"sender_id": ""}, {"sender_id": "x" * 65},
                                    {"session_id": b"short"}, {"sequence": -1}])
def test_encode_refuses_fields_out_of_range(fields):
    with pytest.raises(ValueError):
        _encode(**fields)


@pytest.mark.parametrize("data, reason", [
    (craft(secret=SECRET)[:40], "truncated"),
    (craft(secret=SECRET)[:dg.HEADER_SIZE + 31], "truncated"),
    (craft(body=b'{"queue":"q","x":"' + b"y" * 1400 + b'"}', secret=SECRET), "oversized"),
    (craft(magic=b"QTW\x02", secret=SECRET), "bad_magic"),
    (craft(flags=0x03, secret=SECRET), "bad_flags"),
    (craft(secret=None), "unsigned"),
    (craft(secret=b"another secret"), "bad_signature"),
    (craft(sender_length=0, secret=SECRET), "bad_sender_id"),
    (craft(sender=b"x" * 65, secret=SECRET), "bad_sender_id"),
    (craft(sender=b"caf\xe9", secret=SECRET), "bad_sender_id"),
    (craft(payload_length=3, secret=SECRET), "bad_length"),
    (craft(sender_length=200, secret=SECRET), "bad_sender_id"),
    (craft(body=b"{oops", secret=SECRET), "bad_json"),
    (craft(body=b'["q"]', secret=SECRET), "bad_json"),
    (craft(body=b'{"queue":"\xff"}', secret=SECRET), "bad_json"),
    (craft(body=b"[" * 1300, secret=SECRET), "bad_json"),
    (craft(kind=2, secret=SECRET), "unknown_type"),
    (craft(body=b'{"partition":"p"}', secret=SECRET), "bad_payload"),
    (craft(body=b'{"queue":"q","partition":4}', secret=SECRET), "bad_payload"),
    (craft(kind=dg.QUEUE_CONFIG_SET, body=b'{"queue":"q","config":[]}', secret=SECRET),
     "bad_payload"),
    (craft(kind=dg.POP_MAINTENANCE_MODE_SET, body=b'{"enabled":1}', secret=SECRET),
     "bad_payload"),
])
def test_each_bad_datagram_is_rejected_with_its_reason(data, reason):
    assert _reason(data) == reason


def test_a_changed_byte_anywhere_fails_the_signature():
    data = craft(secret=SECRET)
    reasons = {_reason(data[:i] + bytes([data[i] ^ 0x40]) + data[i + 1:])
               for i in range(len(data))}

    assert reasons == {"bad_magic", "bad_flags", "bad_signature"}


def test_the_signature_is_compared_in_constant_time(monkeypatch):
    compared = []
    real = hmac.compare_digest
    monkeypatch.setattr(dg.hmac, "compare_digest",
                        lambda a, b: compared.append((a, b)) or real(a, b))

    dg.decode(craft(secret=SECRET), SECRET)

    assert len(compared) == 1


def test_twelve_thousand_hostile_datagrams_are_all_rejected_and_raise_nothing_else():
    rng = random.Random(16)
    reasons = set()
    for data in hostile_datagrams(rng, 12_000, SECRET):
        reasons.add(_reason(data))
        try:  # without a secret some of them are well formed; none may raise anything else
            dg.decode(data, None)
        except Rejected:
            pass

    assert {"truncated", "oversized", "bad_magic", "bad_flags", "unsigned", "bad_signature",
            "bad_sender_id", "bad_length", "bad_json", "unknown_type",
            "bad_payload"} <= reasons


class _Now:
    def __init__(self, ms: int):
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def _packet(sender="b:1", session=SESSION, sequence=1, sent_ms=100_000) -> Datagram:
    return Datagram(dg.HEARTBEAT, sender, session, sequence, sent_ms, {}, True)


def _guard_reason(guard: ReplayGuard, packet: Datagram) -> str:
    with pytest.raises(Rejected) as caught:
        guard.admit(packet)
    return caught.value.reason


def test_the_same_session_needs_a_higher_sequence():
    guard = ReplayGuard(_Now(100_000))
    guard.admit(_packet(sequence=5))

    assert _guard_reason(guard, _packet(sequence=5)) == "replayed"
    assert _guard_reason(guard, _packet(sequence=4)) == "replayed"
    guard.admit(_packet(sequence=9))
    assert _guard_reason(guard, _packet(sequence=6)) == "replayed"


def test_datagrams_more_than_30_s_from_the_local_clock_are_stale():
    now = _Now(100_000)
    guard = ReplayGuard(now)

    assert _guard_reason(guard, _packet(sent_ms=100_000 - 30_001)) == "stale"
    assert _guard_reason(guard, _packet(sent_ms=100_000 + 30_001)) == "stale"
    guard.admit(_packet(sent_ms=100_000 - 30_000))
    now.ms = 200_000
    assert _guard_reason(guard, _packet(sequence=2, sent_ms=100_000)) == "stale"


def test_a_new_session_is_accepted_only_if_newer_than_the_last_accepted_datagram():
    guard = ReplayGuard(_Now(100_000))
    guard.admit(_packet(session=b"A" * 16, sequence=50, sent_ms=99_000))

    assert _guard_reason(guard, _packet(session=b"O" * 16, sent_ms=98_000)) == "old_session"
    assert _guard_reason(guard, _packet(session=b"O" * 16, sent_ms=99_000)) == "old_session"
    guard.admit(_packet(session=b"N" * 16, sequence=1, sent_ms=99_500))
    assert _guard_reason(guard, _packet(session=b"A" * 16, sequence=51,
                                        sent_ms=99_400)) == "old_session"


def test_a_rejected_datagram_changes_nothing_and_senders_are_independent():
    guard = ReplayGuard(_Now(100_000))
    guard.admit(_packet(sequence=3))
    _guard_reason(guard, _packet(sequence=2, sent_ms=0))

    guard.admit(_packet(sequence=4))
    guard.admit(_packet(sender="c:1", sequence=1))
    assert _guard_reason(guard, _packet(sequence=4)) == "replayed"


def test_the_least_recently_heard_sender_is_forgotten_beyond_the_limit():
    guard = ReplayGuard(_Now(100_000), max_senders=2)
    guard.admit(_packet(sender="a", sequence=9))
    guard.admit(_packet(sender="b", sequence=9))
    guard.admit(_packet(sender="a", sequence=10))
    guard.admit(_packet(sender="c", sequence=9))

    assert _guard_reason(guard, _packet(sender="a", sequence=10)) == "replayed"
    guard.admit(_packet(sender="b", sequence=1))
