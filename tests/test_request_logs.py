"""Request ids and access lines, checked in the log of a real ``twistd queen``.

Every answer echoes ``X-Request-Id`` (the client's when acceptable, else one the server
makes), and every request leaves one access line (namespace ``queen_tw.access``) carrying the
same id, whichever part of the server answered: the hot push shortcut, a Klein route, a 404,
a 413, a pre-flight, the auth gate's 401 and 403, or nobody because the client left.
"""

from __future__ import annotations

import io
import json
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from twisted.logger import LogLevel, formatEvent, textFileLogObserver
from twisted.python.failure import Failure

from queen_tw.http.site import ACCESS_FORMAT
from queen_tw.logs import event_message, file_observer

from support import ServerProcess, running_server, unique_name, wait_until

WORKER = "logs-worker-7"
MAX_BODY = 4096
GENERATED_ID = re.compile(r"[0-9a-f]{16}")
SECRET = "request-logs-secret-that-is-long-enough-for-hs256"

Record = dict[str, Any]


@pytest.fixture(scope="module")
def json_server(pg_env: dict[str, str]) -> Iterator[ServerProcess]:
    """A server writing JSON lines, with a small body limit for the 413 case."""
    with running_server(pg_env, prefix="queen-tw-request-logs-", LOG_FORMAT="json",
                        WORKER_ID=WORKER, QUEEN_MAX_BODY_BYTES=str(MAX_BODY)) as process:
        yield process


@pytest.fixture
def client(json_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=json_server.url, timeout=30) as made:
        yield made


def records(server: ServerProcess) -> list[Record]:
    """Every line of the server's log, each parsed as JSON (a line that is not fails)."""
    return [json.loads(line) for line in server.log_text().splitlines()]


def access_line(server: ServerProcess, request_id: str) -> Record:
    """The access line of the request ``request_id``, once the server has written it."""
    def found() -> Record | None:
        lines = [r for r in records(server)
                 if r["namespace"] == "queen_tw.access" and r.get("requestId") == request_id]
        assert len(lines) <= 1, lines
        return lines[0] if lines else None
    return wait_until(found, message=f"the access line of {request_id}")


def fresh_id() -> str:
    return f"abc-{uuid.uuid4().hex[:8]}"


def answered_and_logged(server: ServerProcess, answer: httpx.Response, status: int,
                        method: str, path: str) -> Record:
    """Asserts ``answer`` has ``status`` and an echoed id whose access line says the same."""
    assert answer.status_code == status, answer.text
    request_id = answer.headers["x-request-id"]
    line = access_line(server, request_id)
    assert line["level"] == "info" and line["worker"] == WORKER
    fields = line["fields"]
    assert (fields["method"], fields["path"], fields["status"]) == (method, path, status)
    assert fields["bytes"] == len(answer.content)
    assert fields["peer"] == "127.0.0.1"
    assert isinstance(fields["durationMs"], float) and fields["durationMs"] >= 0
    return line


def test_a_clients_request_id_is_echoed_and_names_its_access_line(
        json_server: ServerProcess, client: httpx.Client) -> None:
    answer = client.get("/health", headers={"X-Request-Id": "abc"})

    assert answer.headers["x-request-id"] == "abc"
    line = answered_and_logged(json_server, answer, 200, "GET", "/health")
    assert line["message"].startswith('127.0.0.1 "GET /health" 200 ')


def test_without_an_id_the_server_makes_one_per_request(
        json_server: ServerProcess, client: httpx.Client) -> None:
    first = client.get("/health")
    second = client.get("/health")

    ids = {first.headers["x-request-id"], second.headers["x-request-id"]}
    assert len(ids) == 2 and all(GENERATED_ID.fullmatch(made) for made in ids)
    answered_and_logged(json_server, first, 200, "GET", "/health")
    answered_and_logged(json_server, second, 200, "GET", "/health")


@pytest.mark.parametrize("bad", ["x" * 129, "has space", "tab\there", "é-accent"])
def test_an_unacceptable_request_id_is_replaced(
        json_server: ServerProcess, bad: str) -> None:
    with socket.create_connection(("127.0.0.1", json_server.port), timeout=30) as raw:
        raw.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                    b"X-Request-Id: " + bad.encode() + b"\r\n\r\n")
        head = _read_all(raw).split(b"\r\n\r\n", 1)[0].decode("latin-1")

    [echoed] = [line.split(":", 1)[1].strip() for line in head.split("\r\n")
                if line.lower().startswith("x-request-id:")]
    assert GENERATED_ID.fullmatch(echoed), echoed
    assert access_line(json_server, echoed)["fields"]["status"] == 200


def _read_all(raw: socket.socket) -> bytes:
    chunks = []
    while chunk := raw.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_the_hot_push_shortcut_echoes_and_logs_its_request(
        json_server: ServerProcess, client: httpx.Client) -> None:
    request_id = fresh_id()
    answer = client.post("/api/v1/push", headers={"X-Request-Id": request_id}, json={
        "items": [{"queue": unique_name(), "payload": {"n": 1}}]})

    assert answer.headers["x-request-id"] == request_id
    answered_and_logged(json_server, answer, 201, "POST", "/api/v1/push")


def test_a_404_echoes_and_logs_its_request_with_the_query_string(
        json_server: ServerProcess, client: httpx.Client) -> None:
    request_id = fresh_id()
    answer = client.get("/api/v1/no-such-route?x=1", headers={"X-Request-Id": request_id})

    assert answer.headers["x-request-id"] == request_id
    answered_and_logged(json_server, answer, 404, "GET", "/api/v1/no-such-route?x=1")


def test_a_413_echoes_and_logs_its_request(
        json_server: ServerProcess, client: httpx.Client) -> None:
    request_id = fresh_id()
    answer = client.post("/api/v1/push", headers={"X-Request-Id": request_id,
                                                  "Content-Type": "application/json"},
                         content=b"x" * (MAX_BODY + 1))

    assert answer.headers["x-request-id"] == request_id
    answered_and_logged(json_server, answer, 413, "POST", "/api/v1/push")


def test_a_preflight_exposes_the_request_id_header(
        json_server: ServerProcess, client: httpx.Client) -> None:
    request_id = fresh_id()
    answer = client.options("/api/v1/push", headers={"X-Request-Id": request_id})

    assert answer.headers["x-request-id"] == request_id
    assert answer.headers["access-control-expose-headers"] == "X-Request-Id"
    assert "X-Request-Id" in answer.headers["access-control-allow-headers"]
    answered_and_logged(json_server, answer, 204, "OPTIONS", "/api/v1/push")


def test_a_client_that_leaves_a_long_poll_gets_an_access_line_with_status_499(
        json_server: ServerProcess, client: httpx.Client) -> None:
    queue = unique_name()
    client.post("/api/v1/configure", json={"queue": queue}).raise_for_status()
    # The client gives up long before the server would answer; while the server has not yet
    # seen the request there is no line, so each try uses its own id and a longer patience.
    for patience in (1.0, 2.0, 4.0, 8.0):
        request_id = fresh_id()
        with pytest.raises(httpx.ReadTimeout):
            httpx.get(f"{json_server.url}/api/v1/pop/queue/{queue}",
                      params={"wait": "true", "timeout": "60000"},
                      headers={"X-Request-Id": request_id}, timeout=patience)
        try:
            line = access_line(json_server, request_id)
            break
        except AssertionError:
            continue
    else:
        pytest.fail("no access line for a long poll its client left")
    assert line["fields"]["status"] == 499 and line["fields"]["bytes"] == 0
    assert line["fields"]["path"].startswith(f"/api/v1/pop/queue/{queue}?")


def test_every_line_of_a_json_log_is_json_and_names_the_worker(
        json_server: ServerProcess, client: httpx.Client) -> None:
    client.get("/health").raise_for_status()
    wait_until(lambda: any(r["namespace"] == "queen_tw.access" for r in records(json_server)),
               message="an access line")

    lines = records(json_server)

    assert lines and all(r["worker"] == WORKER for r in lines)
    assert all({"time", "level", "namespace", "message"} <= set(r) for r in lines)


def mint(role: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": "logs-user", "role": role, "iat": now, "exp": now + 3600},
                      SECRET, algorithm="HS256")


def test_the_auth_gates_401_and_403_echo_and_log_their_requests(
        make_server: Callable[..., ServerProcess]) -> None:
    server = make_server(LOG_FORMAT="json", WORKER_ID=WORKER, JWT_ENABLED="true",
                         JWT_SECRET=SECRET)
    token = mint("read-only")
    with httpx.Client(base_url=server.url, timeout=30) as guarded:
        no_token = guarded.get("/api/v1/resources/queues")
        read_only = guarded.post("/api/v1/push", json={"items": []},
                                 headers={"Authorization": f"Bearer {token}"})

    answered_and_logged(server, no_token, 401, "GET", "/api/v1/resources/queues")
    refused = answered_and_logged(server, read_only, 403, "POST", "/api/v1/push")
    assert "logs-user" not in json.dumps(refused)  # the token is never in the access line
    assert token not in server.log_text()
    refusals = [r for r in records(server) if r["namespace"] == "queen_tw.http.auth_gate"
                and r.get("requestId") == read_only.headers["x-request-id"]]
    assert [r["level"] for r in refusals] == ["info"]  # the gate's own line names it too


def finished_log(make_server: Callable[..., ServerProcess], **env: str) -> ServerProcess:
    """A server that answered a request with a known id and then stopped (its log is
    complete)."""
    server = make_server(LOG_FORMAT="json", **env)
    answer = httpx.get(f"{server.url}/health", headers={"X-Request-Id": "abc-quiet"},
                       timeout=30)
    assert answer.headers["x-request-id"] == "abc-quiet"
    server.stop()
    return server


def test_access_log_false_writes_no_access_lines(
        make_server: Callable[..., ServerProcess]) -> None:
    server = finished_log(make_server, ACCESS_LOG="false")

    lines = records(server)
    assert any("starting up" in r["message"] for r in lines)  # the log itself is written
    assert not [r for r in lines if r["namespace"] == "queen_tw.access"]
    assert "abc-quiet" not in server.log_text()


def test_log_level_warn_writes_no_access_lines(
        make_server: Callable[..., ServerProcess]) -> None:
    server = finished_log(make_server, LOG_LEVEL="warn", POLL_WORKER_INTERVAL="100")

    lines = records(server)
    assert any("POLL_WORKER_INTERVAL" in r["message"] for r in lines)  # warnings still are
    assert not [r for r in lines if r["namespace"] == "queen_tw.access"]


def test_the_text_format_access_line_reads_as_one_sentence(
        make_server: Callable[..., ServerProcess]) -> None:
    server = make_server(LOG_FORMAT="text")
    httpx.get(f"{server.url}/health?probe=1", headers={"X-Request-Id": "abc-text"}, timeout=30)

    line = wait_until(lambda: next((text for text in server.log_text().splitlines()
                                    if "id=abc-text" in text), None), message="the access line")
    assert re.search(r' \[queen_tw\.access#info\] 127\.0\.0\.1 "GET /health\?probe=1" 200 '
                     r"\d+B \d+(\.\d+)?ms id=abc-text$", line), line


class LogFileServer(ServerProcess):
    """A server that logs through twistd's ``--logfile`` into a file of its own."""

    @property
    def log_file(self) -> Path:
        return self.workdir / "twistd-json.log"

    def command(self) -> list[str]:
        command = super().command()
        command[command.index("--logfile=-")] = f"--logfile={self.log_file}"
        return command


def test_a_twistd_logfile_gets_json_access_lines(
        pg_env: dict[str, str], tmp_path: Path) -> None:
    server = LogFileServer(pg_env, tmp_path, {"LOG_FORMAT": "json", "WORKER_ID": WORKER})
    server.start()
    try:
        httpx.get(f"{server.url}/health", headers={"X-Request-Id": "abc-file"}, timeout=30)
    finally:
        server.stop()

    lines = [json.loads(line) for line in server.log_file.read_text().splitlines()]
    [access] = [r for r in lines if r.get("requestId") == "abc-file"]
    assert access["namespace"] == "queen_tw.access" and access["worker"] == WORKER
    assert access["fields"]["status"] == 200


def test_each_worker_of_an_instance_names_itself_on_its_lines(
        make_server: Callable[..., ServerProcess]) -> None:
    server = make_server(LOG_FORMAT="json", WORKER_ID=WORKER, NUM_WORKERS="2")
    for _ in range(4):
        httpx.get(f"{server.url}/health", timeout=30)
    server.stop()

    lines = records(server)
    access = [r for r in lines if r["namespace"] == "queen_tw.access"]
    assert access and {r["worker"] for r in access} <= {f"{WORKER}-1", f"{WORKER}-2"}
    assert all(r["worker"] in (WORKER, f"{WORKER}-1", f"{WORKER}-2") for r in lines)


# --- the fast renderers give what Twisted's own would --------------------------------------


def twisted_events() -> list[dict[str, Any]]:
    """Events of the shapes the server logs: fields with format specs and attribute access,
    a call in the format, a failure, a missing field, braces in a value, a legacy event."""
    try:
        raise ValueError("broken on purpose")
    except ValueError:
        failure = Failure()
    base = {"log_namespace": "queen_tw.test", "log_level": LogLevel.info, "log_time": 1.5e9}
    return [
        {**base, "log_format": ACCESS_FORMAT, "peer": "127.0.0.1", "method": "GET",
         "path": "/x?{y}", "status": 200, "bytes": 12, "durationMs": 0.25, "request_id": "a"},
        {**base, "log_format": "{n:.2f} {who!r} {obj.real} {items[0]}", "n": 1 / 3,
         "who": "x", "obj": 3, "items": ["first"]},
        {**base, "log_format": "called {f()}", "f": lambda: "back"},
        {**base, "log_format": "it broke\nsecond line", "log_failure": failure,
         "log_level": LogLevel.critical},
        {**base, "log_format": "missing {nothing}"},
        {"log_legacy": True, "message": ("legacy", "text"), "isError": 0, "system": "-",
         "log_time": 1.5e9, "log_format": "{log_text}", "log_text": "legacy text"},
    ]


def test_messages_render_as_twisted_renders_them() -> None:
    for event in twisted_events():
        if "nothing" in event["log_format"]:
            assert event_message(event).startswith("Unable to format event")
        else:
            assert event_message(event) == formatEvent(event)


def test_text_lines_are_twistds_classic_lines() -> None:
    ours, theirs = io.StringIO(), io.StringIO()
    observer, reference = file_observer(ours, "text"), textFileLogObserver(theirs)

    for event in twisted_events():
        observer(dict(event))
        reference(dict(event))

    assert ours.getvalue() == theirs.getvalue()
    assert '[queen_tw.test#info] 127.0.0.1 "GET /x?{y}" 200 12B 0.25ms id=a\n' in ours.getvalue()
