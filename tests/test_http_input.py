"""Input that PostgreSQL cannot store, names no route can reach, and query parameters that
used to fall back silently: each answers 400 naming the problem and stores nothing (issue #15,
point 8). Values the official clients send keep working.
"""

from __future__ import annotations

import gzip
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.error_answers import assert_json_error
from tests.http_helpers import raw_answer
from tests.support import count_messages, unique_name


def post_raw(http: httpx.Client, path: str, raw: str) -> httpx.Response:
    return http.post(path, content=raw.encode(), headers={"Content-Type": "application/json"})


def nested(depth: int) -> str:
    return "[" * depth + "1" + "]" * depth


def push_body(queue: str, payload_json: str) -> str:
    return '{"items": [{"queue": "%s", "payload": %s}]}' % (queue, payload_json)  # noqa: UP031


# -- bodies PostgreSQL cannot store -----------------------------------------------------


UNSTORABLE_PAYLOADS = {
    "nul-in-text": ('"a\\u0000b"', "\\u0000"),
    "nul-in-key": ('{"k\\u0000": 1}', "\\u0000"),
    "lone-high-surrogate": ('"x\\ud800"', "surrogate"),
    "lone-low-surrogate": ('"\\udc00"', "surrogate"),
    "deep-nesting": (nested(5000), "nested deeper"),
    "nan": ("NaN", "NaN"),
    "infinity": ("Infinity", "Infinity"),
    "minus-infinity": ("-Infinity", "-Infinity"),
    "nan-beside-a-big-integer": ('[123456789012345678901234567890, NaN]', "NaN"),
    "number-overflowing-a-double": ("1e400", "out of range"),
}


@pytest.mark.parametrize("case", sorted(UNSTORABLE_PAYLOADS))
def test_unstorable_payload_answers_400_and_stores_nothing(http, db, case):
    payload, detail = UNSTORABLE_PAYLOADS[case]
    queue = unique_name()

    answer = post_raw(http, "/api/v1/push", push_body(queue, payload))

    error = assert_json_error(answer, 400)
    assert detail in error
    assert count_messages(db, queue) == 0


def test_integer_too_long_to_parse_answers_400(http, db):
    queue = unique_name()

    answer = post_raw(http, "/api/v1/push", push_body(queue, "9" * 5000))

    assert assert_json_error(answer, 400).startswith("Invalid JSON")
    assert count_messages(db, queue) == 0


def test_nul_in_a_queue_name_answers_400_and_creates_no_queue(http, db):
    queue = unique_name()

    answer = post_raw(http, "/api/v1/configure", '{"queue": "%s\\u0000x"}' % queue)  # noqa: UP031

    assert "\\u0000" in assert_json_error(answer, 400)
    with db.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM queen.queues WHERE name LIKE %s", (queue + "%",))
        assert cursor.fetchone()[0] == 0


@pytest.mark.parametrize("path", ["/api/v1/pop/queue/q%00x", "/api/v1/resources/queues/q%00x",
                                  "/api/v1/messages/0190a0b0-0000-7000-8000-000000000000/t%00"])
def test_nul_in_a_path_name_answers_400(http, path):
    assert_json_error(http.get(path, params={"wait": "false"}), 400)


def test_nul_in_a_query_parameter_answers_400(http):
    answer = http.get(f"/api/v1/pop/queue/{unique_name()}",
                      params={"wait": "false", "consumerGroup": "g\x00"})

    assert "consumerGroup" in assert_json_error(answer, 400)


def test_storable_edge_cases_round_trip(http):
    queue = unique_name()
    deep = json.loads(nested(500))
    payloads = ['"party \\ud83c\\udf89"', nested(500), "123456789012345678901234567890",
                '"a\\\\u0000 spelled out"']

    for payload in payloads:
        answer = post_raw(http, "/api/v1/push", push_body(queue, payload))
        assert answer.status_code == 201, answer.text
    popped = http.get(f"/api/v1/pop/queue/{queue}",
                      params={"wait": "false", "batch": "10", "autoAck": "true"})

    assert [m["data"] for m in popped.json()["messages"]] == [
        "party \U0001f389", deep, 123456789012345678901234567890, "a\\u0000 spelled out"]


def test_a_bad_push_among_concurrent_good_ones_leaves_them_unaffected(server, db):
    queue = unique_name()
    bodies = [push_body(queue, json.dumps({"n": n})) for n in range(12)]
    bodies[5] = push_body(queue, '"bad \\u0000"')
    bodies[9] = push_body(queue, '"bad \\ud800"')

    def send(body: str) -> int:
        with httpx.Client(base_url=server.url, timeout=40) as client:
            return post_raw(client, "/api/v1/push", body).status_code

    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        codes = list(pool.map(send, bodies))

    assert codes == [400 if n in (5, 9) else 201 for n in range(12)]
    assert count_messages(db, queue) == 10


# -- names that no route could reach ----------------------------------------------------


@pytest.mark.parametrize("body,message", [
    ({"queue": "a/b"}, "queue must not contain '/'"),
    ({"queue": ""}, "queue must not be empty"),
])
def test_configure_refuses_unreachable_names(http, body, message):
    assert_json_error(http.post("/api/v1/configure", json=body), 400, message)


@pytest.mark.parametrize("item,message", [
    ({"queue": "{q}/sub", "payload": 1}, "Queue must not contain '/'"),
    ({"queue": "", "payload": 1}, "Queue must not be empty"),
    ({"queue": "{q}", "partition": "p/1", "payload": 1}, "Partition must not contain '/'"),
    ({"queue": "{q}", "partition": "", "payload": 1}, "Partition must not be empty"),
])
def test_push_and_transaction_push_refuse_unreachable_names(http, db, item, message):
    queue = unique_name()
    item = {key: value.replace("{q}", queue) if isinstance(value, str) else value
            for key, value in item.items()}

    pushed = http.post("/api/v1/push", json={"items": [item]})
    in_transaction = http.post("/api/v1/transaction", json={
        "operations": [{"type": "push", "items": [item]}], "requiredLeases": []})

    assert_json_error(pushed, 400, message)
    assert_json_error(in_transaction, 400, message)
    assert count_messages(db, queue) == 0


UNREACHABLE = "holds a percent-escape (%41)"


def test_a_new_queue_named_with_a_percent_escape_is_refused_wherever_it_would_be_made(http, db):
    """The clients put queue names into pop paths unencoded and the server decodes them: a
    queue "q%41" took pushes (201 queued) while its pops asked for "qA"."""
    queue = unique_name() + "%41"

    configured = http.post("/api/v1/configure", json={"queue": queue})
    pushed = http.post("/api/v1/push", json={"items": [
        {"queue": queue, "payload": 1}, {"queue": unique_name() + "-50%", "payload": 2}]})
    in_transaction = http.post("/api/v1/transaction", json={
        "operations": [{"type": "push", "items": [{"queue": queue, "payload": 1}]}],
        "requiredLeases": []})

    assert UNREACHABLE in assert_json_error(configured, 400)
    assert in_transaction.status_code == 200, in_transaction.text  # a refused transaction
    assert in_transaction.json()["success"] is False
    assert UNREACHABLE in in_transaction.json()["error"]
    assert pushed.status_code == 201, pushed.text
    refused, stored = pushed.json()  # the request's other queue is stored
    assert refused["status"] == "failed" and UNREACHABLE in refused["error"]
    assert stored["status"] == "queued", stored
    with db.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM queen.queues WHERE name = %s", (queue,))
        assert cursor.fetchone()[0] == 0


def test_a_queue_named_so_before_keeps_working_and_partitions_may_hold_escapes(http, db):
    queue = unique_name() + "%41"
    with db.cursor() as cursor:  # made as an older server allowed (no trigger in replica mode)
        cursor.execute("BEGIN; SET LOCAL session_replication_role = replica;"
                       " INSERT INTO queen.queues (name) VALUES (%s); COMMIT", (queue,))

    assert http.post("/api/v1/configure", json={"queue": queue}).status_code == 200
    pushed = http.post("/api/v1/push", json={"items": [
        {"queue": queue, "partition": "user%40example.com", "payload": "kept"}]})
    assert [r["status"] for r in pushed.json()] == ["queued"], pushed.text

    popped = http.get(f"/api/v1/pop/queue/{queue.replace('%', '%25')}",
                      params={"wait": "false"})  # encoded, it is reached
    assert popped.status_code == 200, popped.text
    assert [(m["partition"], m["data"]) for m in popped.json()["messages"]] == [
        ("user%40example.com", "kept")]


@pytest.mark.parametrize("method,path", [
    ("GET", "/api/v1/pop/queue/a%2Fb"),
    ("GET", "/api/v1/pop/queue/q/partition/p%2F1"),
    ("GET", "/api/v1/resources/queues/a%2Fb"),
    ("DELETE", "/api/v1/resources/queues/a%2Fb"),
    ("DELETE", "/api/v1/consumer-groups/g/queues/a%2Fb"),
])
def test_a_slash_inside_a_path_name_answers_400(http, method, path):
    answer = http.request(method, path)

    assert "must not contain '/'" in assert_json_error(answer, 400)


@pytest.mark.parametrize("path,params", [
    ("/api/v1/dlq", {"queue": "a/b"}),
    ("/api/v1/messages", {"queue": "a/b"}),
    ("/api/v1/messages", {"queue": "q", "partition": "p/1"}),
    ("/api/v1/resources/partitions", {"queue": "a/b"}),
])
def test_a_slash_in_a_name_filter_answers_400(http, path, params):
    assert "must not contain '/'" in assert_json_error(http.get(path, params=params), 400)


# -- query parameters -------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sideways", "from_beginning", "ALL"])
def test_an_unknown_subscription_mode_means_all(http, mode):
    """WIRE.md 2.3.1: new and new-only start at now, anything else is all. (An unknown
    value answered 400.)"""
    queue = unique_name()
    http.post("/api/v1/push", json={"items": [{"queue": queue, "payload": "history"}]})

    answer = http.get(f"/api/v1/pop/queue/{queue}", params={
        "wait": "false", "consumerGroup": "g", "subscriptionMode": mode})

    assert answer.status_code == 200, answer.text
    assert [m["data"] for m in answer.json()["messages"]] == ["history"]


@pytest.mark.parametrize("param,value", [
    ("batch", "abc"), ("batch", "0"), ("batch", "-3"), ("batch", "1.5"),
    ("timeout", "abc"), ("timeout", "1e20"), ("timeout", "99999999999"),
    ("wait", "maybe"), ("autoAck", "maybe"), ("autoAck", "yes"),
    ("partitions", "0"), ("partitions", "many"),
])
def test_pop_reads_an_odd_parameter_as_the_contract_says(http, db, param, value):
    """WIRE.md 1.2: booleans are true only for true or 1; unparsable integers take the
    default; 2.3.1: batch is clamped to at least 1. (They answered 400.)"""
    queue = unique_name()
    http.post("/api/v1/push", json={"items": [{"queue": queue, "payload": 1}]})

    answer = http.get(f"/api/v1/pop/queue/{queue}", params={"wait": "false", param: value})

    assert answer.status_code == 200, answer.text
    assert [m["data"] for m in answer.json()["messages"]] == [1]
    with db.cursor() as cursor:  # "yes" and "maybe" are not true: the message is leased
        cursor.execute("""SELECT count(*) FROM queen.partition_consumers pc
                            JOIN queen.partitions p ON p.id = pc.partition_id
                            JOIN queen.queues q ON q.id = p.queue_id
                           WHERE q.name = %s AND pc.lease_expires_at > now()""", (queue,))
        assert cursor.fetchone()[0] == 1


@pytest.mark.parametrize("params", [
    {"batch": "1", "wait": "false", "timeout": "30000"},
    {"batch": "10", "wait": "true", "timeout": "1", "autoAck": "false"},
    {"batch": "1", "wait": "False", "timeout": "0", "subscriptionMode": "new"},
    {"batch": "1", "wait": "0", "subscriptionMode": "from_beginning"},
    {"batch": "1", "wait": "false", "subscriptionMode": "ALL", "subscriptionFrom": "now"},
    {"batch": "1", "wait": "false", "subscriptionMode": "new-only", "partitions": "3"},
    {"batch": "", "wait": "", "timeout": ""},
])
def test_pop_parameters_the_clients_send_keep_working(http, params):
    queue = unique_name()
    http.post("/api/v1/push", json={"items": [{"queue": queue, "payload": "m"}]})

    answer = http.get(f"/api/v1/pop/queue/{queue}", params=params)

    assert answer.status_code == 200, answer.text
    assert [m["data"] for m in answer.json()["messages"]] == ["m"]


@pytest.mark.parametrize("path,params", [
    ("/api/v1/pop", {"namespace": "ns", "batch": "lots", "wait": "false"}),
    ("/api/v1/dlq", {"limit": "abc"}),
    ("/api/v1/dlq", {"limit": "0"}),
    ("/api/v1/dlq", {"offset": "-1"}),
    ("/api/v1/messages", {"limit": "ten"}),
    ("/api/v1/resources/partitions", {"offset": "x"}),
    ("/api/v1/consumer-groups/lagging", {"minLagSeconds": "-5"}),
    ("/api/v1/consumer-groups/lagging", {"minLagSeconds": "soon"}),
])
def test_other_routes_read_odd_integers_as_their_default_or_bound(http, path, params):
    """WIRE.md 1.2: an unparsable integer takes the default, one out of range its bound."""
    assert http.get(path, params=params).status_code in (200, 204)


@pytest.mark.parametrize("value", ["9" * 30, "-" + "9" * 5000, "1e20", "99999999999"])
def test_an_odd_pop_timeout_is_clamped_or_the_default(http, value):
    queue = unique_name()
    http.post("/api/v1/push", json={"items": [{"queue": queue, "payload": "m"}]})

    answer = http.get(f"/api/v1/pop/queue/{queue}", params={"wait": "true", "timeout": value})

    assert answer.status_code == 200, answer.text  # a ready message answers at once


def test_delete_consumer_group_with_an_odd_delete_metadata_reads_it_as_false(http):
    """WIRE.md 1.2: a boolean is true only for true or 1."""
    answer = http.delete(f"/api/v1/consumer-groups/{unique_name()}",
                         params={"deleteMetadata": "maybe"})

    assert answer.status_code == 200, answer.text
    assert answer.json()["metadataDeleted"] is False


@pytest.mark.parametrize("path,params", [
    ("/api/v1/dlq", {"limit": "5000", "offset": "0"}),
    ("/api/v1/messages", {"limit": "10", "offset": "20"}),
    ("/api/v1/consumer-groups/lagging", {"minLagSeconds": "0"}),
])
def test_usable_listing_parameters_keep_working(http, path, params):
    assert http.get(path, params=params).status_code == 200


# -- bodies in a content coding the server does not read ----------------------------------


@pytest.mark.parametrize("coding", ["gzip", "deflate, gzip", "br"])
def test_a_compressed_body_answers_415_naming_the_coding_and_stores_nothing(http, db, coding):
    queue = unique_name()
    body = gzip.compress(push_body(queue, '{"n": 1}').encode())
    answer = http.post("/api/v1/push", content=body,
                       headers={"Content-Type": "application/json", "Content-Encoding": coding})
    assert_json_error(answer, 415)
    assert coding.split(",")[0] in answer.json()["error"]
    assert count_messages(db, queue) == 0


def test_identity_content_coding_is_read_as_usual(http, db):
    queue = unique_name()
    answer = http.post("/api/v1/push", content=push_body(queue, '{"n": 1}').encode(),
                       headers={"Content-Type": "application/json",
                                "Content-Encoding": "identity"})
    assert answer.status_code == 201, answer.text
    assert count_messages(db, queue) == 1


def test_a_content_coding_on_a_request_without_a_body_changes_nothing(http):
    answer = http.get("/health", headers={"Content-Encoding": "gzip"})

    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize("path", [
    "/api/v1/ephemeral/queues/a%0Ab/depth",          # found by the fuzzer: answered 500
    "/api/v1/messages/00000000-0000-0000-0000-000000000000/t%0Ax",
    "/api/v1/traces/by-name/n%0Ax",
    "/api/v1/kv/ns/k%0Ax",
])
def test_a_newline_inside_a_catch_all_segment_is_refused_or_not_found_never_500(http, path):
    """The router matches ``<path:...>`` over any character; a route module's own URL map
    with werkzeug's converter did not match a newline after the first character, and the
    ephemeral routes answered that 500. Every module's map now matches as the router does."""
    answer = http.get(path)

    assert answer.status_code in (200, 400, 404), answer.text
    assert answer.headers["content-type"].startswith("application/json")


def test_a_pipelining_client_that_does_not_read_is_answered_only_as_it_reads(make_server):
    """Requests pipelined by a client that reads no answer: the server stops reading and
    answering once its send buffer is full, and answers the rest, in order, as the client
    reads. Twisted answered every request it had read, full buffer or not: one such client
    pipelining the 118 KB OpenAPI document grew the server by hundreds of MB."""
    import socket
    import threading
    import time

    server = make_server()
    request = b"GET /api/v1/openapi.json HTTP/1.1\r\nHost: x\r\n\r\n"
    sent, pending = 0, b""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.setblocking(False)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            if not pending and sent < 5000:
                pending, sent = request * 50, sent + 50
            try:
                pending = pending[sock.send(pending):]
            except BlockingIOError:
                time.sleep(0.01)
        time.sleep(0.5)
        answered_unread = server.log_text().count('"GET /api/v1/openapi.json" 200')

        received = []
        sock.setblocking(True)
        reader = threading.Thread(target=lambda: received.extend(iter(
            lambda: sock.recv(1 << 20), b"")))
        reader.start()
        sock.sendall(pending + b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reader.join(60)
    answers = b"".join(received)

    assert sent >= 1000  # the client got well ahead of the answers
    # Bounded by the kernel's socket buffers (a few MB), not by what the client sent.
    assert answered_unread < 200, answered_unread
    assert answers.count(b"HTTP/1.1 200 OK\r\n") == sent + 1
    assert b'"status"' in answers[-2000:]


@pytest.mark.parametrize("chunks", [
    [b"%x\r\n" % (5 << 30) + b'{"items": ['],  # one chunk announcing 5 GiB
    [b"200\r\n" + b" " * 0x200 + b"\r\n", b"300\r\n"],  # the second takes it past 1000
])
def test_a_chunked_body_is_refused_at_the_chunk_that_takes_it_past_the_limit(make_server,
                                                                             chunks):
    """As a Content-Length over QUEEN_MAX_BODY_BYTES is refused before the body: the 413
    comes with the chunk header, not after the body's end or the read timeout (408)."""
    small = make_server(QUEEN_MAX_BODY_BYTES="1000")
    head = (b"POST /api/v1/push HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")

    answer = raw_answer(small.port, head + b"".join(chunks))  # never finished

    assert answer.startswith(b"HTTP/1.1 413 "), answer[:300]
    assert b"larger than 1000 bytes" in answer


def test_a_connection_that_sends_nothing_is_closed_after_a_short_read_timeout(make_server):
    """QUEEN_REQUEST_READ_TIMEOUT_MS below Twisted's 60 s idle timeout: a connection that
    never sends a byte (or stays idle after an answer) is closed after it too, instead of
    holding its descriptor for the 60 s."""
    import socket
    import time

    server = make_server(QUEEN_REQUEST_READ_TIMEOUT_MS="1000")
    with socket.create_connection(("127.0.0.1", server.port)) as silent, \
            socket.create_connection(("127.0.0.1", server.port)) as idle:
        idle.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        started = time.monotonic()
        for sock in (silent, idle):
            sock.settimeout(15)
            while sock.recv(65536):  # the idle one reads its answer first
                pass
        waited = time.monotonic() - started

    assert waited < 10, waited


def test_a_long_poll_whose_client_left_behind_a_large_pipelined_request_takes_nothing(
        make_server, db):
    """A long poll with more pipelined behind it than the server reads ahead: Twisted stopped
    reading the socket, missed the client leaving, and leased the next message to the gone
    long poll for leaseTime. The connection is closed instead, and the message stays free."""
    import socket
    import time

    server = make_server()
    queue = unique_name()
    with httpx.Client(base_url=server.url, timeout=20) as client:
        client.post("/api/v1/configure", json={"queue": queue, "options": {"leaseTime": 300}})
        body = json.dumps({"items": [{"queue": unique_name(), "payload": "x" * 100_000}]})
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(f"GET /api/v1/pop/queue/{queue}?wait=true&timeout=20000 HTTP/1.1\r\n"
                         "Host: x\r\n\r\n".encode())
            time.sleep(0.5)  # parked
            sock.sendall(f"POST /api/v1/push HTTP/1.1\r\nHost: x\r\nContent-Type: "
                         f"application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode())
            try:
                sock.sendall(body.encode())
            except OSError:
                pass  # closed by the server as it read past the limit
        time.sleep(1.0)
        assert client.post("/api/v1/push", json={"items": [
            {"queue": queue, "payload": "after the client left"}]}).status_code == 201
        time.sleep(0.5)
        popped = client.get(f"/api/v1/pop/queue/{queue}", params={"wait": "false"})

    assert popped.status_code == 200, popped.status_code
    assert popped.json()["messages"][0]["data"] == "after the client left"
