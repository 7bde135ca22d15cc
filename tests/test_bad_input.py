"""Malformed requests on every core route (WIRE.md 1.2, 1.3, 1.6, 1.7, 2.1, 2.2, 2.4, 2.6, 3.6).

A bad request answers 400 (or 404/413) with ``Content-Type: application/json`` and a body
``{"error": str}``, never a traceback, and changes nothing in the database.
"""

from __future__ import annotations

import json
import socket
import struct
import time
import uuid
from typing import Any, Dict

import httpx
import pytest

from tests.binary_bodies import (
    frame,
    framed_body,
    framed_group,
    plain_body,
    text16,
    transaction_body,
    v7_id,
    zstd,
)
from tests.error_answers import assert_json_error
from tests.http_helpers import raw_answer
from tests.support import count_messages, unique_name

A_UUID = "0190a0b0-0000-7000-8000-000000000000"

POST_ROUTES = {
    "configure": "/api/v1/configure",
    "push": "/api/v1/push",
    "ack": "/api/v1/ack",
    "ack-batch": "/api/v1/ack/batch",
    "lease-extend": f"/api/v1/lease/{A_UUID}/extend",
    "traces": "/api/v1/traces",
}

CORS = {
    "access-control-allow-origin": "*",
    "access-control-allow-methods": "GET, POST, PUT, DELETE, OPTIONS",
    "access-control-allow-headers": "Content-Type, Authorization, X-Request-Id",
}


def post_raw(http: httpx.Client, path: str, raw: bytes) -> httpx.Response:
    return http.post(path, content=raw, headers={"Content-Type": "application/json"})


def queue_rows(db, queue: str) -> int:
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM queen.queues WHERE name = %s", (queue,))
        return cur.fetchone()[0]


message_rows = count_messages


# -- bodies that are not JSON objects ---------------------------------------------------


@pytest.mark.parametrize("route", sorted(POST_ROUTES))
def test_invalid_json_answers_400_invalid_json(http, route):
    answer = post_raw(http, POST_ROUTES[route], b'{"queue": "x", oops}')

    error = assert_json_error(answer, 400)
    assert error.startswith("Invalid JSON")


@pytest.mark.parametrize("route", sorted(POST_ROUTES))
@pytest.mark.parametrize("raw", [b"[1, 2]", b'"text"', b"42", b"null", b"true"])
def test_body_that_is_not_an_object_answers_400(http, route, raw):
    answer = post_raw(http, POST_ROUTES[route], raw)

    assert_json_error(answer, 400)


@pytest.mark.parametrize("route", sorted(POST_ROUTES))
def test_body_that_is_not_utf8_answers_400(http, route):
    answer = post_raw(http, POST_ROUTES[route], b'{"queue": "\xff\xfe"}')

    assert_json_error(answer, 400)


# -- configure --------------------------------------------------------------------------


@pytest.mark.parametrize("body", [{}, {"queue": None}, {"options": {}}])
def test_configure_without_queue_answers_queue_is_required(http, body):
    answer = http.post("/api/v1/configure", json=body)

    assert_json_error(answer, 400, "queue is required")


def test_configure_with_empty_queue_answers_queue_must_not_be_empty(http):
    answer = http.post("/api/v1/configure", json={"queue": ""})

    assert_json_error(answer, 400, "queue must not be empty")


@pytest.mark.parametrize("option,value", [
    ("leaseTime", "abc"),
    ("leaseTime", [1]),
    ("retryLimit", {"n": 1}),
    ("retryDelay", True),
    ("maxSize", 1.5),
    ("priority", "high"),
    ("encryptionEnabled", 5),
    ("dlqAfterMaxRetries", "maybe"),
    ("retentionEnabled", [True]),
])
def test_configure_with_wrong_option_type_answers_400_naming_the_option(http, db, option, value):
    queue = unique_name()

    answer = http.post("/api/v1/configure", json={"queue": queue, "options": {option: value}})

    error = assert_json_error(answer, 400)
    assert option in error
    assert queue_rows(db, queue) == 0


def test_configure_with_options_not_an_object_answers_400(http, db):
    queue = unique_name()

    answer = http.post("/api/v1/configure", json={"queue": queue, "options": [1, 2]})

    assert_json_error(answer, 400)
    assert queue_rows(db, queue) == 0


def test_configure_with_queue_not_a_string_answers_400(http):
    answer = http.post("/api/v1/configure", json={"queue": 42})

    assert_json_error(answer, 400)


# -- push -------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [{}, {"items": None}, {"items": "x"}, {"items": {"queue": "q"}}])
def test_push_without_items_array_answers_items_array_is_required(http, body):
    answer = http.post("/api/v1/push", json=body)

    assert_json_error(answer, 400, "items array is required")


@pytest.mark.parametrize("item,message", [
    ({"payload": 1}, "Queue must be a string"),
    ({"queue": 5, "payload": 1}, "Queue must be a string"),
    ({"queue": None, "payload": 1}, "Queue must be a string"),
    ({"queue": "{q}", "partition": 5}, "Partition must be a string"),
    ({"queue": "{q}", "partition": ["p"]}, "Partition must be a string"),
    ({"queue": "{q}", "transactionId": 5}, "TransactionId must be a string"),
    ({"queue": "{q}", "transactionId": {"id": 1}}, "TransactionId must be a string"),
    ({"queue": "{q}", "traceId": 5}, "TraceId must be a string"),
])
def test_push_item_with_wrong_field_answers_the_wire_message(http, db, item, message):
    queue = unique_name()
    item = {key: (queue if value == "{q}" else value) for key, value in item.items()}

    answer = http.post("/api/v1/push", json={"items": [item]})

    assert_json_error(answer, 400, message)
    assert message_rows(db, queue) == 0


def test_push_item_that_is_not_an_object_answers_400(http):
    answer = http.post("/api/v1/push", json={"items": ["just a string"]})

    assert_json_error(answer, 400)


def test_transaction_id_longer_than_255_answers_400(http, db):
    queue = unique_name()

    answer = http.post("/api/v1/push", json={"items": [
        {"queue": queue, "payload": 1, "transactionId": "x" * 256}]})

    assert_json_error(answer, 400)
    assert message_rows(db, queue) == 0


def test_transaction_id_of_255_characters_is_accepted(http):
    queue = unique_name()

    answer = http.post("/api/v1/push", json={"items": [
        {"queue": queue, "payload": 1, "transactionId": "x" * 255}]})

    assert answer.status_code == 201
    assert answer.json()[0]["status"] == "queued"


@pytest.mark.parametrize("bad_item", [
    # URLs drop a "." or ".." path segment (encoded too): no pop or resource route reaches it
    {"queue": "."}, {"queue": ".."}, {"partition": "."}, {"partition": ".."},
    {"traceId": "not-a-uuid"},
    # forms Python's uuid.UUID reads and PostgreSQL refuses: they were queued as "failed"
    # with a 201, or, during an outage, answered "buffered" and never replayed
    {"traceId": f"urn:uuid:{uuid.UUID(int=7)}"},
    {"traceId": "0000_0000_0000_0000_0000_0000_0000_0007"},
    {"traceId": "+" + "0" * 31},
    {"transactionId": "y" * 300},
    {"partition": 7},
    {"queue": None},
])
def test_one_bad_item_rejects_the_whole_push(http, db, bad_item):
    queue = unique_name()
    items = [{"queue": queue, "payload": n, "transactionId": f"ok{n}"} for n in range(3)]
    items.insert(2, {"queue": queue, "payload": "bad", **bad_item})

    answer = http.post("/api/v1/push", json={"items": items})

    assert_json_error(answer, 400)
    assert message_rows(db, queue) == 0


@pytest.mark.parametrize("trace_id", [
    "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11", "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}",
    "a0eebc999c0b4ef8bb6d6bb9bd380a11", "a0ee-bc99-9c0b-4ef8-bb6d-6bb9-bd38-0a11"])
def test_every_form_postgresql_reads_is_a_trace_id(http, trace_id):
    answer = http.post("/api/v1/push", json={"items": [
        {"queue": unique_name(), "payload": 1, "traceId": trace_id}]})

    assert answer.status_code == 201 and answer.json()[0]["status"] == "queued", answer.text


# -- pop --------------------------------------------------------------------------------


def test_pop_with_consumer_group_longer_than_255_answers_400(http):
    answer = http.get(f"/api/v1/pop/queue/{unique_name()}",
                      params={"wait": "false", "consumerGroup": "g" * 256})

    assert_json_error(answer, 400)


@pytest.mark.parametrize("route", ["seek", "partitions/p/seek", "../subscription"])
def test_consumer_group_routes_with_a_group_longer_than_255_answer_400(http, route):
    queue = unique_name()
    http.post("/api/v1/push", json={"items": [{"queue": queue, "partition": "p",
                                               "payload": 1}]}).raise_for_status()
    path = f"/api/v1/consumer-groups/{'g' * 3000}/queues/{queue}/{route}"
    answer = http.post(path.replace(f"/queues/{queue}/../", "/"), json={
        "toEnd": True, "subscriptionTimestamp": "2020-01-01T00:00:00Z"})

    assert_json_error(answer, 400, "consumerGroup is longer than 255 characters")


def test_pop_with_unparsable_numbers_takes_their_defaults(http):
    """WIRE.md 1.2: unparsable integers take the default (batch 1)."""
    queue = unique_name()
    http.post("/api/v1/push", json={"items": [{"queue": queue, "payload": n} for n in range(3)]})

    answer = http.get(f"/api/v1/pop/queue/{queue}",
                      params={"wait": "false", "batch": "lots", "timeout": "soon"})

    assert answer.status_code == 200, answer.text
    assert [m["data"] for m in answer.json()["messages"]] == [0]


# -- ack and ack/batch ------------------------------------------------------------------


@pytest.mark.parametrize("body,message", [
    ({}, "transactionId is required"),
    ({"partitionId": A_UUID}, "transactionId is required"),
    ({"transactionId": 5, "partitionId": A_UUID}, "transactionId is required"),
    ({"transactionId": "t"}, "partitionId is required to ensure message uniqueness"),
    ({"transactionId": "t", "partitionId": None},
     "partitionId is required to ensure message uniqueness"),
    ({"transactionId": "t", "partitionId": "p-1"}, "partitionId must be a UUID"),
    ({"transactionId": "t", "partitionId": 12}, "partitionId must be a UUID"),
])
def test_ack_with_missing_or_wrong_fields_answers_the_wire_message(http, body, message):
    answer = http.post("/api/v1/ack", json=body)

    assert_json_error(answer, 400, message)


@pytest.mark.parametrize("body", [{}, {"acknowledgments": None}, {"acknowledgments": "x"},
                                  {"acknowledgments": {"transactionId": "t"}}])
def test_batch_ack_without_array_answers_acknowledgments_array_is_required(http, body):
    answer = http.post("/api/v1/ack/batch", json=body)

    assert_json_error(answer, 400, "acknowledgments array is required")


@pytest.mark.parametrize("item,message", [
    ({"partitionId": A_UUID}, "transactionId is required"),
    ({"transactionId": "t"}, "partitionId is required to ensure message uniqueness"),
    ({"transactionId": "t", "partitionId": "nope"}, "partitionId must be a UUID"),
])
def test_batch_ack_with_one_bad_item_answers_the_wire_message(http, item, message):
    good = {"transactionId": "t0", "partitionId": A_UUID}

    answer = http.post("/api/v1/ack/batch", json={"acknowledgments": [good, item]})

    assert_json_error(answer, 400, message)


def test_batch_ack_with_one_bad_item_applies_none(http):
    queue = unique_name()
    http.post("/api/v1/push", json={"items": [
        {"queue": queue, "payload": n, "transactionId": f"t{n}"} for n in range(2)]})
    message = http.get(f"/api/v1/pop/queue/{queue}", params={"wait": "false"}).json()["messages"][0]
    valid = {"transactionId": message["transactionId"], "partitionId": message["partitionId"],
             "leaseId": message["leaseId"]}
    http.post("/api/v1/ack/batch", json={"acknowledgments": [valid, {"transactionId": "x"}]})

    answer = http.get(f"/api/v1/pop/queue/{queue}", params={"wait": "false"})

    assert answer.status_code == 204  # the valid ack was not applied: the lease is still held


# -- lease extend -----------------------------------------------------------------------


def test_lease_extend_with_non_uuid_lease_answers_400(http):
    answer = http.post("/api/v1/lease/12345/extend")

    assert_json_error(answer, 400)


@pytest.mark.parametrize("seconds", ["abc", -5, 0, 1.5, True])
def test_lease_extend_with_bad_seconds_answers_400(http, seconds):
    answer = http.post(f"/api/v1/lease/{A_UUID}/extend", json={"seconds": seconds})

    assert_json_error(answer, 400)


# -- dlq --------------------------------------------------------------------------------


@pytest.mark.parametrize("param", ["from", "to"])
def test_dlq_with_unparsable_time_answers_400(http, param):
    answer = http.get("/api/v1/dlq", params={"queue": unique_name(), param: "last tuesday"})

    assert_json_error(answer, 400)


def test_dlq_of_unknown_queue_is_empty(http):
    answer = http.get("/api/v1/dlq", params={"queue": unique_name()})

    assert answer.status_code == 200
    assert answer.json()["messages"] == []
    assert answer.json()["total"] == 0


# -- traces -----------------------------------------------------------------------------


@pytest.mark.parametrize("body", [
    {"data": {"a": 1}},
    {"transactionId": "t", "data": {"a": 1}},
    {"partitionId": A_UUID, "data": {"a": 1}},
    {"transactionId": "", "partitionId": A_UUID, "data": {"a": 1}},
])
def test_trace_without_ids_answers_transaction_id_and_partition_id_are_required(http, body):
    answer = http.post("/api/v1/traces", json=body)

    assert_json_error(answer, 400, "transactionId and partitionId are required")


@pytest.mark.parametrize("data", ["absent", None])
def test_trace_without_data_answers_data_is_required(http, data):
    body: Dict[str, Any] = {"transactionId": "t", "partitionId": A_UUID}
    if data != "absent":
        body["data"] = data

    answer = http.post("/api/v1/traces", json=body)

    assert_json_error(answer, 400, "data is required")


def test_trace_with_non_uuid_partition_answers_400(http):
    answer = http.post("/api/v1/traces", json={"transactionId": "t", "partitionId": "p",
                                               "data": {}})

    assert_json_error(answer, 400)


def test_trace_name_longer_than_255_answers_400_before_postgresql_sees_it(http):
    """A 3000-character name is too long for the trace-name index: PostgreSQL refused it,
    which answered 503 as if the database were down."""
    pushed = http.post("/api/v1/push", json={"items": [
        {"queue": unique_name(), "payload": 1}]}).json()[0]
    answer = http.post("/api/v1/traces", json={
        "transactionId": pushed["transaction_id"], "partitionId": pushed["partition_id"],
        "data": {}, "traceNames": ["ok", "n" * 3000]})

    assert_json_error(answer, 400, "a trace name is longer than 255 characters")


def test_trace_list_with_non_uuid_partition_answers_400(http):
    answer = http.get("/api/v1/traces/not-a-uuid/t")

    assert_json_error(answer, 400)


# -- resources --------------------------------------------------------------------------


def test_unknown_queue_detail_answers_404_queue_not_found(http):
    answer = http.get(f"/api/v1/resources/queues/{unique_name()}")

    assert_json_error(answer, 404, "Queue not found")


# -- routes, methods, sizes -------------------------------------------------------------


@pytest.mark.parametrize("method,path", [
    ("GET", "/api/v1/no-such-route"),
    ("POST", "/api/v1/no-such-route"),
    ("DELETE", "/api/v1/nothing/here"),
    ("GET", "/api/v2/push"),
    ("GET", "/api"),
    ("GET", "/internal/api/no-such-route"),
])
def test_unknown_route_answers_404_json(http, method, path):
    answer = http.request(method, path)

    assert_json_error(answer, 404)


@pytest.mark.parametrize("method,path", [
    ("GET", "/api/v1/push"),
    ("GET", "/api/v1/ack"),
    ("PUT", "/api/v1/configure"),
    ("POST", "/api/v1/pop/queue/somewhere"),
])
def test_wrong_method_on_a_known_route_answers_405_json(http, method, path):
    answer = http.request(method, path)

    assert_json_error(answer, 405, "Method not allowed")


@pytest.mark.parametrize("path", ["/api/v1/pop/queue/{queue}",
                                  "/api/v1/pop/queue/{queue}/partition/Default",
                                  "/api/v1/pop?namespace={queue}"])
@pytest.mark.parametrize("auto_ack", ["false", "true"])
def test_head_on_a_pop_route_is_405_and_hands_nothing_out(http, path, auto_ack):
    """HEAD matched the GET rule and ran the pop, whose answer Twisted then dropped: its
    messages were leased (or, with autoAck, consumed) and nobody received them."""
    queue = unique_name()
    http.post("/api/v1/configure", json={"queue": queue, "namespace": queue}
              ).raise_for_status()
    http.post("/api/v1/push", json={"items": [{"queue": queue, "payload": n}
                                              for n in range(3)]}).raise_for_status()
    url = path.format(queue=queue)
    answer = http.head(url, params={"batch": 10, "autoAck": auto_ack})

    assert answer.status_code == 405, answer.status_code
    assert answer.headers["Allow"] == "GET"
    other = http.post(url)  # another method's 405 lists only what is answered
    assert (other.status_code, other.headers["Allow"]) == (405, "GET")
    popped = http.get(f"/api/v1/pop/queue/{queue}", params={"batch": 10, "wait": "false"})
    assert [m["data"] for m in popped.json()["messages"]] == [0, 1, 2]


def test_oversized_body_answers_413_json(make_server):
    small = make_server(QUEEN_MAX_BODY_BYTES="1000")
    queue = unique_name()
    body = json.dumps({"items": [{"queue": queue, "payload": "x" * 2000}]}).encode()

    with httpx.Client(base_url=small.url, timeout=20) as client:
        answer = client.post("/api/v1/push", content=body,
                             headers={"Content-Type": "application/json"})

    assert_json_error(answer, 413)
    assert answer.headers["access-control-allow-origin"] == "*"


def test_body_under_the_limit_is_accepted(make_server):
    small = make_server(QUEEN_MAX_BODY_BYTES="1000")

    with httpx.Client(base_url=small.url, timeout=20) as client:
        answer = client.post("/api/v1/push", json={"items": [
            {"queue": unique_name(), "payload": "x" * 100}]})

    assert answer.status_code == 201


def test_a_request_over_the_message_limit_is_413_and_stores_nothing(make_server, db):
    """A 99 KB compressed body once declared 2.7 million messages: 19 s of a frozen server
    and 5.5 GB. QUEEN_MAX_PUSH_ITEMS bounds every way a request carries messages."""
    small = make_server(QUEEN_MAX_PUSH_ITEMS="5")
    queue = unique_name()
    items = [{"queue": queue, "payload": n} for n in range(6)]
    # six frames declared, the zstd frame big enough to hold them but corrupt after its
    # header: a 413 proves the count was checked before anything was decompressed
    huge_group = framed_group(queue, "p", [], count=6, z=zstd(bytes(6 * 64))[:-4])
    binary = {"Content-Type": "application/x-queen-push"}

    with httpx.Client(base_url=small.url, timeout=20) as client:
        refusals = [
            client.post("/api/v1/push", json={"items": items}),
            client.post("/api/v1/transaction", json={"operations": [
                {"type": "push", "items": items[:3]}, {"type": "push", "items": items[3:]}]}),
            client.post("/api/v1/push", headers=binary, content=framed_body([huge_group])),
            client.post("/api/v1/push", headers=binary, content=plain_body(
                [(queue, "p", [(f"t{n}", b"1") for n in range(6)])])),
            client.post("/api/v1/transaction", headers=binary,
                        content=transaction_body({}, [huge_group])),
        ]
        accepted = client.post("/api/v1/push", json={"items": items[:5]})

    for answer in refusals:  # the bogus frames prove the count is checked before expanding
        assert "QUEEN_MAX_PUSH_ITEMS" in assert_json_error(answer, 413)
    assert accepted.status_code == 201, accepted.text
    assert count_messages(db, queue) == 5


def test_a_count_its_bytes_cannot_hold_is_400_not_413(http, db):
    """A group declaring more messages than its bytes can hold is malformed (WIRE2 9.1),
    not a request too large, even past QUEEN_MAX_PUSH_ITEMS."""
    queue = unique_name()
    binary = {"Content-Type": "application/x-queen-push"}
    one = zstd(frame(v7_id(), "t", b"1"))
    for body in (framed_body([framed_group(queue, "p", [], count=200_000, z=one)]),
                 framed_body([framed_group(queue, "p", [], count=0xFFFFFFFF, z=one)]),
                 b"QPB1\x04" + struct.pack("<I", 1) + text16(queue) + text16("p")
                 + struct.pack("<I", 200_000) + text16("t") + struct.pack("<I", 1) + b"1"):
        answer = http.post("/api/v1/push", headers=binary, content=body)
        assert "200000" in assert_json_error(answer, 400) \
            or "4294967295" in answer.json()["error"]
    assert count_messages(db, queue) == 0


def _trickle(port: int, head: bytes, then: bytes, every: float = 0.2) -> bytes:
    """Sends ``head``, then ``then`` one byte every ``every`` seconds while the server keeps
    the connection; returns what the server answered before closing it."""
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        for byte in then:
            time.sleep(every)
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            sock.setblocking(False)
            try:
                answer += sock.recv(4096)
            except BlockingIOError:
                pass
            sock.setblocking(True)
            if answer:
                break
        sock.settimeout(5)
        try:
            while chunk := sock.recv(4096):
                answer += chunk
        except OSError:
            pass
    return answer


def test_a_request_trickling_past_the_read_timeout_is_408_and_closed(make_server, db):
    """Twisted's idle timeout starts over with every byte: one byte every half minute held
    a connection for good (slow clients could use up the server's file descriptors)."""
    slow = make_server(QUEEN_REQUEST_READ_TIMEOUT_MS="1000")
    queue = unique_name()
    body = json.dumps({"items": [{"queue": queue, "payload": "slow"}]}).encode()
    head = (b"POST /api/v1/push HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")

    started = time.monotonic()
    in_body = _trickle(slow.port, head, body)
    in_headers = _trickle(slow.port, b"GET /health HTTP/1.1\r\n", b"Host: x" * 40)

    for answer in (in_body, in_headers):
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert b"did not arrive in time" in answer
        assert b"Access-Control-Allow-Origin: *" in answer and b"X-Request-Id: " in answer
    assert time.monotonic() - started < 10
    assert count_messages(db, queue) == 0
    with httpx.Client(base_url=slow.url, timeout=20) as client:  # a long poll is not cut
        popped = client.get(f"/api/v1/pop/queue/{queue}",
                            params={"wait": "true", "timeout": 2500})
        assert popped.status_code == 204
        assert client.post("/api/v1/push", content=body,
                           headers={"Content-Type": "application/json"}).status_code == 201


def _health_over(sock: socket.socket) -> bytes:
    """One keep-alive ``GET /health`` on an open connection; its whole answer."""
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = b""
    while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        answer += chunk
    return answer


def test_connections_over_the_per_client_cap_get_503_and_are_closed(make_server):
    """Each connection holds a file descriptor: without a cap one client could take them
    all, and at the process's limit every other client would be refused."""
    capped = make_server(QUEEN_MAX_CLIENT_CONNECTIONS="3")
    held = [socket.create_connection(("127.0.0.1", capped.port), timeout=10) for _ in range(3)]
    try:
        for sock in held:
            assert _health_over(sock).startswith(b"HTTP/1.1 200 ")

        refused = raw_answer(capped.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert refused.startswith(b"HTTP/1.1 503 "), refused
        assert b"QUEEN_MAX_CLIENT_CONNECTIONS" in refused
        assert b"Access-Control-Allow-Origin: *" in refused and b"X-Request-Id: " in refused
        assert _health_over(held[0]).startswith(b"HTTP/1.1 200 ")  # the held ones still work

        held.pop().close()
        deadline = time.monotonic() + 10
        while True:  # the server counts the close once it has read it
            answer = raw_answer(capped.port, b"GET /health HTTP/1.1\r\nHost: x\r\n"
                                              b"Connection: close\r\n\r\n")
            if answer.startswith(b"HTTP/1.1 200 ") or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert answer.startswith(b"HTTP/1.1 200 "), answer
    finally:
        for sock in held:
            sock.close()
    assert "refusing new connections from 127.0.0.1" in capped.log_path.read_text()


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", b"400"),
    (b"POST /api/v1/push HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
     b"Content-Length: 3\r\n\r\n{}", b"400"),
    (b"POST /api/v1/push HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"zz\r\n", b"400"),
    (b"GET /api/v1/resources/queues?x=" + b"a" * 17000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
     b"414"),
    (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 17000 + b"\r\n\r\n", b"431"),
    # well-formed, only over Twisted's totals (16 KiB of headers, 500 headers): were 400
    (b"GET /health HTTP/1.1\r\nHost: x\r\n"
     + b"".join(b"X-H%d: %s\r\n" % (n, b"a" * 900) for n in range(20)) + b"\r\n", b"431"),
    (b"GET /health HTTP/1.1\r\nHost: x\r\n"
     + b"".join(b"X-H%d: a\r\n" % n for n in range(501)) + b"\r\n", b"431"),
], ids=["malformed header", "two lengths", "bad chunk size", "long request line",
        "long header", "large header block", "too many headers"])
def test_requests_twisted_cannot_parse_get_a_json_error_with_cors(server, request_bytes,
                                                                  status):
    answer = raw_answer(server.port, request_bytes)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 " + status + b" "), answer[:200]
    assert b"Access-Control-Allow-Origin: *" in head and b"X-Request-Id: " in head
    assert json.loads(body)["error"]


def test_a_declared_body_over_the_limit_is_refused_before_it_is_invited(make_server):
    small = make_server(QUEEN_MAX_BODY_BYTES="1000")
    answer = raw_answer(small.port, b"POST /api/v1/push HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
                         b"Content-Length: 5000000000\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b"100 Continue" not in answer
    assert b"larger than 1000 bytes" in answer


# -- every error is JSON, every answer has CORS -----------------------------------------


ERROR_REQUESTS = {
    "invalid-json": ("POST", "/api/v1/push", b"{nope"),
    "missing-field": ("POST", "/api/v1/ack", b"{}"),
    "unknown-route": ("GET", "/api/v1/does-not-exist", None),
    "unknown-lease": ("POST", f"/api/v1/lease/{uuid.uuid4()}/extend", None),
    "unknown-queue": ("GET", "/api/v1/resources/queues/test-never-made-0000", None),
    "wrong-method": ("GET", "/api/v1/push", None),
}


@pytest.mark.parametrize("case", sorted(ERROR_REQUESTS))
def test_error_answers_are_json_with_an_error_string(http, case):
    method, path, raw = ERROR_REQUESTS[case]

    answer = http.request(method, path, content=raw,
                          headers={"Content-Type": "application/json"} if raw else {})

    assert answer.status_code >= 400
    assert_json_error(answer, answer.status_code)


@pytest.mark.parametrize("case", sorted(ERROR_REQUESTS))
def test_error_answers_carry_cors_headers(http, case):
    method, path, raw = ERROR_REQUESTS[case]

    answer = http.request(method, path, content=raw,
                          headers={"Content-Type": "application/json"} if raw else {})

    assert {name: answer.headers.get(name) for name in CORS} == CORS


def test_normal_answer_carries_cors_headers(http):
    answer = http.post("/api/v1/configure", json={"queue": unique_name()})

    assert answer.status_code == 200
    assert {name: answer.headers.get(name) for name in CORS} == CORS


def test_204_answer_carries_cors_headers(http):
    answer = http.get(f"/api/v1/pop/queue/{unique_name()}", params={"wait": "false"})

    assert answer.status_code == 204
    assert {name: answer.headers.get(name) for name in CORS} == CORS


def test_health_answer_carries_cors_headers(http):
    answer = http.get("/health")

    assert {name: answer.headers.get(name) for name in CORS} == CORS


@pytest.mark.parametrize("path", ["/api/v1/push", "/api/v1/pop/queue/q", "/health",
                                  "/api/v1/no-such-route", "/anything/at/all", "/"])
def test_options_on_any_path_answers_204_preflight(http, path):
    answer = http.options(path, headers={"Origin": "http://example.test",
                                         "Access-Control-Request-Method": "POST"})

    assert answer.status_code == 204
    assert answer.content == b""
    assert answer.headers["access-control-max-age"] == "86400"
    assert {name: answer.headers.get(name) for name in CORS} == CORS
