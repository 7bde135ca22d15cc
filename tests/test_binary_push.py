"""Binary push and transaction bodies over raw HTTP (WIRE2.md 9.1-9.3).

The bodies are built here byte by byte (the layout of the 2.6.0 client's encoder, written
anew), so a corrupt one can be made exactly: each malformed body must answer 400 with an
``error`` that names the fault, and store nothing. The decoder's pure functions are checked
without a server first.
"""

from __future__ import annotations

import concurrent.futures
import json
import random
import struct
import time
import uuid
from decimal import Decimal
from typing import Any, Dict, List, Optional

import httpx
import jwt
import orjson
import pytest
import pytest_twisted
from twisted.internet import defer

from queen_tw import jsoncodec
from queen_tw.engine.waiters import WaiterRegistry
from queen_tw.errors import InvalidRequest
from queen_tw.http import binary_push

from tests.binary_bodies import (
    Message,
    frame,
    framed_body,
    framed_group,
    id_text,
    plain_body,
    text16,
    transaction_body,
    v7_id,
    zstd,
)
from tests.engine_support import ONE_CALL_AT_A_TIME, in_process_engine
from tests.faultkit import private_fleet, set_maintenance
from tests.http_helpers import configure
from tests.support import (
    TEST_ENCRYPTION_KEY,
    count_messages,
    running_server,
    unique_name,
    wait_until,
)

BINARY = {"Content-Type": "application/x-queen-push"}
LIMIT = 64 * 1024 * 1024


def payload_value(payload: Any) -> Any:
    """A decoded item's payload as a value (a binary push's is JSON text, a Fragment)."""
    return jsoncodec.loads(orjson.dumps(payload))


def messages(count: int, prefix: str = "t") -> List[Message]:
    return [(v7_id(), f"{prefix}{n}", orjson.dumps({"n": n, "text": "é ✓"}))
            for n in range(count)]


def post(http: httpx.Client, body: bytes, path: str = "/api/v1/push") -> httpx.Response:
    return http.post(path, content=body, headers=BINARY)


def pop_all(http: httpx.Client, queue: str, partition: Optional[str] = None
            ) -> List[Dict[str, Any]]:
    path = f"/api/v1/pop/queue/{queue}" + (f"/partition/{partition}" if partition else "")
    answer = http.get(path, params={"wait": "false", "batch": 1000})
    assert answer.status_code in (200, 204), answer.text
    return answer.json()["messages"] if answer.status_code == 200 else []


# -- the decoder alone --------------------------------------------------------------------


def test_framed_body_decodes_to_push_items_with_the_client_ids_and_raw_payloads():
    sent = messages(3)
    body = framed_body([framed_group("q", "p", sent)])
    decoded = binary_push.decode_push(body, "alice", LIMIT)
    assert not decoded.counts_only
    # ids as 32 hex digits, which PostgreSQL reads as a uuid
    assert [item["id"] for item in decoded.items] == [m[0].hex() for m in sent]
    assert [item["transactionId"] for item in decoded.items] == ["t0", "t1", "t2"]
    assert {(item["queue"], item["partition"], item["producerSub"])
            for item in decoded.items} == {("q", "p", "alice")}
    # the payload bytes pass through as they came
    assert orjson.dumps([item["payload"] for item in decoded.items]) == (
        b"[" + b",".join(m[2] for m in sent) + b"]")
    assert [payload_value(item["payload"]) for item in decoded.items] == [
        {"n": n, "text": "é ✓"} for n in range(3)]


def test_frame_without_transaction_id_uses_its_message_id_text():
    message_id = v7_id()
    body = framed_body([framed_group("q", "p", [(message_id, "", b"1")])])
    [item] = binary_push.decode_push(body, None, LIMIT).items
    assert item["transactionId"] == id_text(message_id)
    assert item["id"] == message_id.hex()
    assert "producerSub" not in item


def test_plain_body_with_transaction_ids_and_zstd_body_decode_alike():
    groups = [("q", "a", [("x1", b'{"a":1}'), ("", b"null")]), ("q", "b", [("x3", b"[]")])]
    for flags in (4, 5, 6, 7):
        decoded = binary_push.decode_push(plain_body(groups, flags), None, LIMIT)
        assert decoded.counts_only == bool(flags & 2)
        assert [(i["partition"], i.get("transactionId")) for i in decoded.items] == [
            ("a", "x1"), ("a", None), ("b", "x3")]
        assert [payload_value(i["payload"]) for i in decoded.items] == [{"a": 1}, None, []]


def test_big_numbers_stay_exact_in_the_plain_value():
    body = plain_body([("q", "p", [("t", b'{"n": 123456789012345678901234567890}')])])
    [item] = binary_push.decode_push(body, None, LIMIT).items
    assert payload_value(item["payload"]) == {"n": 123456789012345678901234567890}


def _refusal(body: bytes, limit: int = LIMIT) -> str:
    with pytest.raises(InvalidRequest) as raised:
        binary_push.decode_push(body, None, limit)
    return raised.value.message


def test_decoder_names_what_is_wrong():
    good = messages(2)
    not_v7 = bytearray(v7_id())
    not_v7[6] = 0x40 | (not_v7[6] & 0x0F)
    cases = {
        "must start with QPB1": b"QPX1\x08" + struct.pack("<I", 0),
        "unknown flags": b"QPB1\x18" + struct.pack("<I", 0),
        "truncated": framed_body([framed_group("q", "p", good)])[:-5],
        "its header says 3": framed_body([framed_group("q", "p", good,
                                                                      count=3)]),
        "bytes after its 1 frames": framed_body([framed_group("q", "p", good, count=1)]),
        "not a version-7 UUID": framed_body([framed_group("q", "p", [(bytes(not_v7), "t",
                                                                      b"1")])]),
        "not a zstd frame": framed_body([framed_group("q", "p", good, z=b"not zstd at all")]),
        "flags must be 0": framed_body([framed_group(
            "q", "p", [], count=1, z=zstd(frame(v7_id(), "t", b"1", flags=1)))]),
        "payload is not valid JSON": framed_body([framed_group("q", "p", [(v7_id(), "t",
                                                                          b"{nope")])]),
        "Queue is not UTF-8": b"QPB1\x08" + struct.pack("<IH", 1, 2) + b"\xff\xfe",
        "Queue must not be empty": framed_body([framed_group("", "p", good)]),
        "repeats a message id": framed_body([framed_group("q", "p", [good[0], good[0]])]),
        "after its last group": framed_body([framed_group("q", "p", good)]) + b"x",
        "\\u0000": framed_body([framed_group("q", "p", [(v7_id(), "t", b'"a\\u0000"')])]),
        "raw_len is 5": b"QPB1\x05" + struct.pack("<I", 5) + zstd(struct.pack("<I", 0)),
    }
    for expected, body in cases.items():
        assert expected in _refusal(body), expected


def test_mutated_bodies_are_decoded_or_refused_never_crash():
    """Random byte flips, cuts and splices of valid bodies: the decoder either decodes them or
    raises InvalidRequest (a 400), never anything else (a 500)."""
    rng = random.Random(20)
    bodies = [framed_body([framed_group("q", "p", messages(3)), framed_group("q", "r",
                                                                             messages(1))]),
              plain_body([("q", "p", [("a", b'{"x": [1, 2]}'), ("", b"null")])], flags=5),
              plain_body([("q", "p", [(None, b'"s"')])], flags=2),
              transaction_body({"operations": []}, [framed_group("q", "p", messages(2))])]
    for _ in range(3000):
        body = bytearray(rng.choice(bodies))
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(body))
            action = rng.randrange(3)
            if action == 0:
                body[at] = rng.randrange(256)
            elif action == 1:
                del body[at:at + rng.randint(1, 8)]
            else:
                body[at:at] = rng.randbytes(rng.randint(1, 8))
        decode = (binary_push.decode_transaction if body[:4] == b"QTB1"
                  else binary_push.decode_push)
        try:
            decode(bytes(body), None, LIMIT)
        except InvalidRequest:
            pass


def test_a_frame_expanding_past_the_body_limit_is_refused_before_it_is_decompressed():
    body = framed_body([framed_group("q", "p", [(v7_id(), "t", b'"' + b"x" * 5000 + b'"')])])
    assert "more than the 1000 the request may still carry" in _refusal(body, limit=1000)


def test_the_frames_of_all_groups_together_are_bounded_by_the_body_limit():
    group = framed_group("q", "p", [(v7_id(), "t", b'"' + b"x" * 400 + b'"')])
    binary_push.decode_push(framed_body([group]), None, 1000)  # one group fits
    assert "the request may still carry" in _refusal(framed_body([group] * 3), limit=1000)


def test_transaction_body_puts_the_head_operations_before_the_pushes():
    sent = messages(2)
    head = {"operations": [{"type": "ack", "transactionId": "a", "partitionId": "p"}],
            "requiredLeases": []}
    decoded = binary_push.decode_transaction(
        transaction_body(head, [framed_group("q", "p", sent)]), "bob", LIMIT)
    body = decoded.as_json_body()
    assert [op["type"] for op in body["operations"]] == ["ack", "push"]
    assert [item["id"] for item in body["operations"][1]["items"]] == [
        m[0].hex() for m in sent]
    with pytest.raises(InvalidRequest, match="must start with QTB1"):
        binary_push.decode_transaction(b"QPB1\x00", None, LIMIT)
    with pytest.raises(InvalidRequest, match="head is not valid JSON"):
        binary_push.decode_transaction(b"QTB1\x00\x02\x00\x00\x00{x" + b"\x00" * 4, None, LIMIT)


# -- over HTTP ----------------------------------------------------------------------------


def test_framed_push_answers_as_json_and_stores_each_message_under_its_client_id(http, db):
    queue = unique_name()
    sent = messages(3)
    answer = post(http, framed_body([framed_group(queue, "p1", sent)]))
    assert answer.status_code == 201, answer.text
    results = answer.json()
    assert [r["index"] for r in results] == [0, 1, 2]
    assert {r["status"] for r in results} == {"queued"}
    assert [r["message_id"] for r in results] == [id_text(m[0]) for m in sent]
    assert [r["transaction_id"] for r in results] == ["t0", "t1", "t2"]
    assert {r["queueName"] for r in results} == {queue}
    popped = pop_all(http, queue, "p1")
    assert [(m["id"], m["transactionId"], m["data"]) for m in popped] == [
        (id_text(m[0]), m[1], json.loads(m[2])) for m in sent]
    with db.cursor() as cursor:
        cursor.execute("SELECT min(created_at) > now() - interval '1 minute' FROM queen.messages"
                       " WHERE id = ANY(%s::uuid[])", ([id_text(m[0]) for m in sent],))
        assert cursor.fetchone()[0] is True  # createdAt is the server's time


def test_same_framed_bytes_twice_store_once_and_answer_the_stored_ids(http, db):
    queue = unique_name()
    body = framed_body([framed_group(queue, "p", messages(4))])
    first = post(http, body).json()
    again = post(http, body)
    assert again.status_code == 201
    assert [r["status"] for r in again.json()] == ["duplicate"] * 4
    assert [r["message_id"] for r in again.json()] == [r["message_id"] for r in first]
    assert count_messages(db, queue) == 4


def test_plain_and_zstd_bodies_and_counts_answer(http, db):
    queue = unique_name()
    items = [("a", b'{"k": 1}'), ("", b'"text"'), ("a", b"2")]  # "a" twice: a duplicate
    answer = post(http, plain_body([(queue, "p", items)], flags=4))
    assert answer.status_code == 201
    statuses = [r["status"] for r in answer.json()]
    assert statuses == ["queued", "queued", "duplicate"]
    counts = post(http, plain_body([(queue, "p", [("b", b"3"), ("a", b"4")])], flags=7))
    assert counts.status_code == 201
    assert counts.json() == {"count": 2, "queued": 1, "duplicate": 1, "buffered": 0,
                             "error": None}
    assert [m["data"] for m in pop_all(http, queue)] == [{"k": 1}, "text", 3]
    assert count_messages(db, queue) == 3


def test_binary_and_json_pushes_to_one_partition_keep_their_order(http):
    queue = unique_name()
    for n in range(3):
        post(http, framed_body([framed_group(queue, "p", [(v7_id(), f"b{n}",
                                                           orjson.dumps(f"binary {n}"))])]))
        http.post("/api/v1/push", json={"items": [
            {"queue": queue, "partition": "p", "payload": f"json {n}"}]})
    assert [m["data"] for m in pop_all(http, queue, "p")] == [
        f"{kind} {n}" for n in range(3) for kind in ("binary", "json")]


def test_an_id_another_message_has_gets_a_server_id_instead_of_failing(http):
    queue = unique_name()
    message_id = v7_id()
    first = post(http, framed_body([framed_group(queue, "p", [(message_id, "one", b"1")])]))
    second = post(http, framed_body([framed_group(queue, "p", [(message_id, "two", b"2")])]))
    assert second.status_code == 201, second.text
    [stored] = second.json()
    assert stored["status"] == "queued"
    assert stored["message_id"] != first.json()[0]["message_id"] == id_text(message_id)
    assert [m["data"] for m in pop_all(http, queue)] == [1, 2]


def test_max_size_refuses_the_items_over_it_as_for_json(http):
    queue = unique_name()
    configure(http, queue, maxSize=2)
    answer = post(http, framed_body([framed_group(queue, "p", messages(3))]))
    assert [r["status"] for r in answer.json()] == ["queued", "queued", "failed"]
    assert "max capacity" in answer.json()[2]["error"]


def test_encrypted_queue_stores_ciphertext_and_pops_the_payload(http, db):
    queue = unique_name()
    configure(http, queue, encryptionEnabled=True)
    sent = messages(2)
    assert post(http, framed_body([framed_group(queue, "p", sent)])).status_code == 201
    with db.cursor() as cursor:
        cursor.execute("SELECT bool_and(is_encrypted), bool_and(payload ? 'encrypted') "
                       "FROM queen.messages WHERE id = ANY(%s::uuid[])",
                       ([id_text(m[0]) for m in sent],))
        assert cursor.fetchone() == (True, True)
    assert [m["data"] for m in pop_all(http, queue)] == [json.loads(m[2]) for m in sent]


def test_plain_payloads_beside_encrypted_ones_go_out_as_stored(http, db):
    """An answer holding an encrypted payload is opened in place: the plain payloads beside
    it keep their stored text (digits beyond a double's, trailing zeros) and their depth."""
    queue = unique_name()
    exact = b'{"x":0.12345678901234567890123,"y":1.50,"tiny":1e-400}'
    deep = json.loads("[" * 509 + "]" * 509)
    assert post(http, framed_body([framed_group(queue, "p", [(v7_id(), "exact", exact)])])
                ).status_code == 201
    assert http.post("/api/v1/push", json={"items": [
        {"queue": queue, "partition": "p", "payload": deep}]}).status_code == 201
    configure(http, queue, encryptionEnabled=True)
    assert http.post("/api/v1/push", json={"items": [
        {"queue": queue, "partition": "p", "payload": {"secret": 1}}]}).status_code == 201

    fetched = http.post("/api/v1/fetch", json={"entries": [
        {"queue": queue, "partition": "p", "offset": 0}]})
    popped = http.get(f"/api/v1/pop/queue/{queue}/partition/p",
                      params={"wait": "false", "batch": 10})

    with db.cursor() as cursor:
        cursor.execute("SELECT m.payload::text FROM queen.messages m JOIN queen.partitions p "
                       "ON p.id = m.partition_id JOIN queen.queues q ON q.id = p.queue_id "
                       "WHERE q.name = %s AND m.transaction_id = 'exact'", (queue,))
        [(stored,)] = cursor.fetchall()
    assert "0.12345678901234567890123" in stored and "1.50" in stored
    for answer in (fetched, popped):
        assert answer.status_code == 200, answer.text
        assert stored in answer.text
    records = fetched.json()["entries"][0]["records"]
    assert [r["payload"] for r in records[1:]] == [deep, {"secret": 1}]
    assert all("encrypted" not in r for r in records)
    assert [m["data"] for m in popped.json()["messages"][1:]] == [deep, {"secret": 1}]


def good_group(queue: str) -> bytes:
    """A well-formed group, put first in a corrupt body: a body refused late must not have
    stored it either."""
    return framed_group(queue, "first", messages(2, "g"))


def with_good_group(queue: str, bad: bytes) -> bytes:
    return framed_body([good_group(queue), bad])


def plain_item(transaction_id: str, payload: bytes) -> bytes:
    return text16(transaction_id) + struct.pack("<I", len(payload)) + payload


CORRUPT = {
    "bad magic": (lambda q: b"QPBX" + with_good_group(q, framed_group(q, "p", messages(1)))[4:],
                  "must start with QPB1"),
    "bad length": (lambda q: with_good_group(q, framed_group(q, "p", messages(1)))[:-1],
                   "truncated"),
    "bad count": (lambda q: with_good_group(q, framed_group(q, "p", messages(2), count=5)),
                  "its header says 5"),
    "id not v7": (lambda q: with_good_group(q, framed_group(q, "p", [
        (uuid.uuid4().bytes, "t", b"1")])), "not a version-7 UUID"),
    "bad zstd": (lambda q: with_good_group(q, framed_group(q, "p", messages(1),
                                                           z=zstd(b"x" * 64)[:-4])),
                 "zstd frame"),
    "bad JSON payload": (lambda q: with_good_group(q, framed_group(q, "p", [
        *messages(2), (v7_id(), "bad", b"{'single': 1}")])), "not valid JSON"),
    "truncated": (lambda q: with_good_group(q, framed_group(q, "p", messages(3)))[:-40],
                  "truncated"),
    # payloads that JSON pushes refuse, or that PostgreSQL would refuse as sent (500s once)
    "byte order mark": (lambda q: with_good_group(q, framed_group(q, "p", [
        (v7_id(), "bom", b'\xef\xbb\xbf{"a": 1}')])), "not valid JSON"),
    "UTF-16 payload": (lambda q: with_good_group(q, framed_group(q, "p", [
        (v7_id(), "utf16", '"ab"'.encode("utf-16-be"))])), "not valid JSON"),
    "trailing NUL byte": (lambda q: with_good_group(q, framed_group(q, "p", [
        (v7_id(), "nul", b"1\x00")])), "not valid JSON"),
    "nested past 512": (lambda q: with_good_group(q, framed_group(q, "p", [
        (v7_id(), "deep", b"[" * 600 + b"]" * 600)])), "nested deeper than 512"),
    "bad count in a plain body": (
        lambda q: (b"QPB1\x04" + struct.pack("<I", 2)
                   + text16(q) + text16("first") + struct.pack("<I", 1) + plain_item("g", b"1")
                   + text16(q) + text16("p") + struct.pack("<I", 3) + plain_item("a", b"2")),
        "truncated"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_body_answers_400_naming_the_fault_and_stores_nothing(http, db, case):
    queue = unique_name()
    make, expected = CORRUPT[case]
    answer = post(http, make(queue))
    assert answer.status_code == 400, answer.text
    assert expected in answer.json()["error"]
    assert count_messages(db, queue) == 0


def test_a_payload_postgresql_refuses_fails_its_partition_only(http, db):
    """1e-16384 is JSON orjson reads (as 0.0), sent to PostgreSQL as written: beyond what
    its numeric holds. The partition holding it answers failed (nothing of it stored, order
    intact), the other partition of the request is stored; no 500."""
    queue = unique_name()
    body = framed_body([good_group(queue), framed_group(queue, "p", [
        (v7_id(), "before", b"1"), (v7_id(), "tiny", b'{"x": 1e-16384}')])])
    answer = post(http, body)
    assert answer.status_code == 201, answer.text
    statuses = [(item["transaction_id"], item["status"]) for item in answer.json()]
    assert statuses == [("g0", "queued"), ("g1", "queued"), ("before", "failed"),
                        ("tiny", "failed")]
    assert "value overflows numeric format" in answer.json()[3]["error"]
    assert count_messages(db, queue) == 2


def test_a_refused_payload_fails_only_its_own_request_when_fused(http, db):
    queue = unique_name()
    bad = framed_body([framed_group(queue, "p", [(v7_id(), "tiny", b"1e-16384")])])
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        goods = [pool.submit(http.post, "/api/v1/push", json={"items": [
            {"queue": queue, "partition": "p", "transactionId": f"ok{n}", "payload": n}]})
            for n in range(6)]
        refused = pool.submit(post, http, bad)
        answers = [future.result() for future in goods]
    assert [answer.json()[0]["status"] for answer in answers] == ["queued"] * 6
    assert refused.result().json()[0]["status"] == "failed"
    assert count_messages(db, queue) == 6


def test_payloads_near_the_limits_are_stored_as_sent(http, db):
    # the prefilter also matches text and numbers PostgreSQL can hold: those pass
    queue = unique_name()
    kept = [b'{"x": 1e-16383}', b'{"x": 1.5e-16382}', b'"1e-99999 is only text"',
            b"[" * 500 + b"]" * 500]
    answer = post(http, framed_body([framed_group(queue, "p", [
        (v7_id(), f"t{n}", payload) for n, payload in enumerate(kept)])]))
    assert answer.status_code == 201, answer.text
    assert count_messages(db, queue) == len(kept)


def test_empty_and_json_bodies_with_the_binary_type_are_refused(http):
    assert post(http, b"").status_code == 400
    answer = post(http, b'{"items": []}')
    assert answer.status_code == 400 and "QPB1" in answer.json()["error"]


def test_binary_transaction_acks_and_pushes_in_one_commit_with_head_results_first(http, db):
    source, target = unique_name(), unique_name()
    http.post("/api/v1/push", json={"items": [{"queue": source, "payload": "in"}]})
    popped = http.get(f"/api/v1/pop/queue/{source}", params={"wait": "false"}).json()
    message = popped["messages"][0]
    sent = messages(2)
    head = {"operations": [{"type": "ack", "transactionId": message["transactionId"],
                            "partitionId": message["partitionId"],
                            "leaseId": message["leaseId"], "status": "completed"}],
            "requiredLeases": [message["leaseId"]]}
    answer = post(http, transaction_body(head, [framed_group(target, "p", sent)]),
                  "/api/v1/transaction")
    assert answer.status_code == 200, answer.text
    outcome = answer.json()
    assert outcome["success"] is True
    assert [(r["index"], r["type"]) for r in outcome["results"]] == [
        (0, "ack"), (1, "push"), (2, "push")]
    assert [r["messageId"] for r in outcome["results"][1:]] == [id_text(m[0]) for m in sent]
    assert [m["data"] for m in pop_all(http, target)] == [json.loads(m[2]) for m in sent]
    assert http.get(f"/api/v1/pop/queue/{source}", params={"wait": "false"}).status_code == 204


def test_binary_transaction_with_a_failing_ack_stores_nothing_and_counts_flag(http, db):
    target = unique_name()
    head = {"operations": [{"type": "ack", "transactionId": "never",
                            "partitionId": str(uuid.uuid4()), "status": "completed"}]}
    answer = post(http, transaction_body(head, [framed_group(target, "p", messages(2))]),
                  "/api/v1/transaction")
    assert answer.status_code == 200 and answer.json()["success"] is False
    assert count_messages(db, target) == 0
    counted = post(http, transaction_body({}, [framed_group(target, "p", messages(3))],
                                          flags=2), "/api/v1/transaction")
    assert counted.status_code == 200, counted.text
    assert {k: counted.json()[k] for k in ("success", "pushed", "duplicate", "acked",
                                           "results")} == {
        "success": True, "pushed": 3, "duplicate": 0, "acked": 0, "results": []}
    assert post(http, b"QTB1\x00\x01\x00\x00\x00[" + b"\x00" * 4,
                "/api/v1/transaction").status_code == 400


def test_a_rolled_back_counts_only_transaction_counts_nothing(http, db):
    """Flag 2 counted the results evaluated before the failure: a rollback said pushed 1."""
    queue = unique_name()
    http.post("/api/v1/configure", json={"queue": queue, "options": {"maxSize": 1}})
    answer = post(http, transaction_body({}, [framed_group(queue, "p", messages(2))], flags=2),
                  "/api/v1/transaction")
    assert answer.status_code == 200, answer.text
    assert {k: answer.json()[k] for k in ("success", "pushed", "duplicate", "acked")} == {
        "success": False, "pushed": 0, "duplicate": 0, "acked": 0}
    assert count_messages(db, queue) == 0


def test_lease_extend_answers_renewed_partitions_and_every_expiry_name(http):
    queue = unique_name()
    http.post("/api/v1/push", json={"items": [
        {"queue": queue, "partition": p, "payload": p} for p in ("a", "b", "c")]})
    popped = http.get(f"/api/v1/pop/queue/{queue}",
                      params={"wait": "false", "partitions": 2, "batch": 10}).json()
    answer = http.post(f"/api/v1/lease/{popped['leaseId']}/extend", json={"seconds": 60})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["success"] is True and body["renewed"] == 2
    assert body["newExpiresAt"] == body["expiresAt"] == body["lease_expires_at"] == \
        body["leaseExpiresAt"]


def test_binary_pushes_in_maintenance_are_buffered_then_stored_once_in_order():
    """The file buffer writes JSON: a binary push's pass-through payloads go there as their
    text (an encrypted queue's sealed), and are replayed like any push, each message under
    the id its client minted."""
    with private_fleet() as fleet:
        server = fleet.server(QUEEN_CACHE_REFRESH_INTERVAL_MS="200",
                              QUEEN_ENCRYPTION_KEY=TEST_ENCRYPTION_KEY)
        plain, sealed = unique_name(), unique_name()
        with httpx.Client(base_url=server.url, timeout=20) as http:
            configure(http, sealed, encryptionEnabled=True)
            set_maintenance(server.url, True)
            sent = {queue: messages(3) for queue in (plain, sealed)}
            for queue, group in sent.items():
                answer = post(http, framed_body([framed_group(queue, "p", group)]))
                assert [r["status"] for r in answer.json()] == ["buffered"] * 3, answer.text
            set_maintenance(server.url, False)
            for queue, group in sent.items():
                delivered = wait_until(lambda q=queue: pop_all(http, q) or None, 20, 0.2,
                                       "the buffer replayed")
                assert [(m["id"], m["transactionId"], m["data"]) for m in delivered] == [
                    (id_text(m[0]), m[1], json.loads(m[2])) for m in group]


@pytest.mark.parametrize("keyed", [False, True], ids=["no-key", "key"])
def test_a_buffered_binary_push_keeps_its_payload_text_exact(keyed):
    """A binary push stores its payload text as it came (numbers beyond a double included);
    one buffered while PostgreSQL takes no writes must come back the same, not re-read as
    doubles (the payload went through the buffer as a value until this was fixed). With a
    key, the buffer seals the payload of every queue not known to be plain (here: a queue
    new to the server, and one that encrypts): sealed as a value, it lost the digits too."""
    exact = b'{"price":12345678901234.123456789,"tiny":1.00000000000000000001,' \
            b'"big":123456789012345678901234567890}'
    with private_fleet() as fleet:
        server = fleet.server(**({"QUEEN_ENCRYPTION_KEY": TEST_ENCRYPTION_KEY} if keyed else {}))
        direct, buffered, encrypted = unique_name(), unique_name(), unique_name()
        queues = [buffered, encrypted] if keyed else [buffered]
        with httpx.Client(base_url=server.url, timeout=20) as http:
            assert post(http, framed_body([framed_group(direct, "p", [
                (v7_id(), "t0", exact)])])).status_code == 201
            if keyed:
                configure(http, encrypted, encryptionEnabled=True)
            set_maintenance(server.url, True)
            for queue in queues:
                answer = post(http, framed_body([framed_group(queue, "p", [
                    (v7_id(), "t0", exact)])]))
                assert [r["status"] for r in answer.json()] == ["buffered"], answer.text
            set_maintenance(server.url, False)
            texts = {}
            for queue in [direct, *queues]:
                texts[queue] = wait_until(lambda q=queue: _popped_text(http, q), 20, 0.2,
                                          "the buffer replayed")
    # (the encrypted queue's text is the one sealed; PostgreSQL's jsonb spaces out the others)
    exactly = {queue: json.loads(text, parse_float=Decimal) for queue, text in texts.items()}
    assert all(exactly[queue] == exactly[direct] for queue in queues), texts
    assert b"12345678901234.123456789" in texts[direct] and b"1.00000000000000000001" in \
        texts[direct]


def test_a_payload_postgresql_could_never_store_is_not_buffered():
    """1e-16384 passes orjson (as 0.0) and fails at PostgreSQL: live, its partition answers
    "failed"; during an outage it was answered "buffered" and then failed its replay for
    good. It is refused instead; numbers PostgreSQL keeps, however fine, are buffered."""
    kept = [b"1e-16383", b"0." + b"0" * 16382 + b"1", b"0.5E-00999", b"1.25e-1000"]
    with private_fleet() as fleet:
        server = fleet.server()
        queue = unique_name()
        with httpx.Client(base_url=server.url, timeout=20) as http:
            set_maintenance(server.url, True)
            answer = post(http, framed_body([framed_group(queue, f"p{n}", [
                (v7_id(), f"t{n}", number)]) for n, number in enumerate([*kept, b"1e-16384"])]))
            set_maintenance(server.url, False)

            statuses = [(r["transaction_id"], r["status"]) for r in answer.json()]
            assert statuses == [("t0", "buffered"), ("t1", "buffered"), ("t2", "buffered"),
                                ("t3", "buffered"), ("t4", "failed")], answer.text
            assert "16383 digits after the decimal point" in answer.json()[4]["error"]
            for n, number in enumerate(kept):
                text = wait_until(lambda n=n: _popped_text(http, queue, f"p{n}"), 20, 0.2,
                                  "the buffer replayed")
                assert Decimal(text.decode()) == Decimal(number.decode())
            state = http.get("/api/v1/system/maintenance").json()
        assert state["bufferStats"]["failedCount"] == 0


def _popped_text(http: httpx.Client, queue: str, partition: Optional[str] = None
                 ) -> Optional[bytes]:
    """The popped message's ``data`` as the server wrote it (numbers unparsed), None when
    nothing came."""
    path = f"/api/v1/pop/queue/{queue}" + (f"/partition/{partition}" if partition else "")
    answer = http.get(path, params={"wait": "false", "autoAck": "true"})
    if answer.status_code != 200:
        return None
    return answer.content.split(b'"data":', 1)[1].split(b',"traceId"', 1)[0]


def test_binary_push_and_transaction_carry_the_tokens_sub_and_need_read_write(pg_env):
    """With auth on, a binary push is the push route: read-write, and its messages get the
    admitted token's ``sub`` as ``producerSub``, as a JSON push's do."""
    secret = "binary-push-secret-long-enough-for-hs256"

    def bearer(sub: str, role: str) -> Dict[str, str]:
        claims = {"sub": sub, "role": role, "exp": int(time.time()) + 600}
        return {**BINARY, "Authorization": f"Bearer {jwt.encode(claims, secret, 'HS256')}"}

    queue = unique_name()
    with running_server(pg_env, prefix="queen-tw-binary-", JWT_ENABLED="true",
                        JWT_SECRET=secret) as server, \
            httpx.Client(base_url=server.url, timeout=20) as http:
        body = framed_body([framed_group(queue, "p", messages(2))])
        refused = http.post("/api/v1/push", content=body, headers=bearer("viewer", "read-only"))
        assert refused.status_code == 403
        writer = bearer("svc-binary", "read-write")
        assert http.post("/api/v1/push", content=body, headers=writer).status_code == 201
        txn = transaction_body({}, [framed_group(queue, "p", messages(1, "x"))])
        assert http.post("/api/v1/transaction", content=txn, headers=writer).json()["success"]
        popped = http.get(f"/api/v1/pop/queue/{queue}", params={"wait": "false", "batch": 10},
                          headers={"Authorization": writer["Authorization"]}).json()
        assert [m["producerSub"] for m in popped["messages"]] == ["svc-binary"] * 3


@pytest.fixture
def engine(pg_env, server):
    """The engine in this process (the reactor of pytest-twisted), one push call at a time."""
    with in_process_engine(pg_env, WaiterRegistry(), limits=ONE_CALL_AT_A_TIME) as queue_engine:
        yield queue_engine


@pytest_twisted.ensureDeferred
async def test_one_client_id_in_two_fused_requests_fails_neither(engine):
    """Two requests naming the same client-minted id (a misbehaving client) fused into one
    database call: the first keeps the id, the repeat gets a server id (push_store checks a
    given id before it takes it), and neither fails on the primary key."""
    queue, given = unique_name(), v7_id().hex()
    batcher = engine.batchers["push"]  # the store step of engine.push, in one reactor tick
    calls = batcher.calls
    # one partition: both rows in one INSERT, which the primary key would fail as a whole
    pushes = [batcher.submit([{"queue": queue, "partition": "p", "transactionId": txn,
                               "id": given, "payload": txn}]) for txn in ("a", "b")]
    results = [r[0] for r in await defer.gatherResults(pushes)]
    assert batcher.calls - calls == 1  # fused
    assert [r["status"] for r in results] == ["queued", "queued"]
    assert results[0]["message_id"] == str(uuid.UUID(given)) != results[1]["message_id"]


@pytest_twisted.ensureDeferred
async def test_a_binary_payload_fused_with_a_json_integer_beyond_64_bits_fails_neither(engine):
    """The fused call's parameters hold the binary push's payload text and an integer orjson
    cannot write: the standard library wrote the integer but not the text, and every request
    of the call answered 500."""
    queue = unique_name()
    batcher = engine.batchers["push"]
    calls = batcher.calls
    # one partition: one shard, so both share the database call and its parameter
    pushes = [batcher.submit([{"queue": queue, "partition": "p", "transactionId": "big",
                               "payload": {"big": 2**100}}]),
              batcher.submit([{"queue": queue, "partition": "p", "transactionId": "exact",
                               "payload": orjson.Fragment(b'{"z":1.50}')}])]
    results = [r[0] for r in await defer.gatherResults(pushes)]
    assert batcher.calls - calls == 1  # fused
    assert [r["status"] for r in results] == ["queued", "queued"]
