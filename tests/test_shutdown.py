"""Graceful shutdown on SIGTERM: parked long-polls answer 204, work in flight finishes, the
buffer is closed, an embedded PostgreSQL started by the server is stopped, all quickly."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

import httpx
from twisted.application import service as service_module
from twisted.internet import defer
from twisted.internet.task import Clock

from queen_tw.db.embedded import EmbeddedPostgres
from queen_tw.lifecycle import OrderedMultiService

from faultkit import Producers, count, drain, report, wait_until
from support import unique_name

STOP_BOUND_S = 30  # the issue asks for "well under 40 s"
CLEAN_EXIT = (0, -signal.SIGTERM)  # twistd ends by re-raising the signal that stopped it


def test_sigterm_answers_parked_long_polls_with_204_and_exits(make_server) -> None:
    server = make_server()
    queue = unique_name()
    answers: list[int] = []

    def long_poll() -> None:
        answer = httpx.get(f"{server.url}/api/v1/pop/queue/{queue}",
                           params={"wait": "true", "timeout": 60000}, timeout=90)
        answers.append(answer.status_code)
    poller = threading.Thread(target=long_poll, daemon=True)
    poller.start()
    time.sleep(0.5)  # parked by now

    started = time.monotonic()
    exit_code = server.stop(timeout=STOP_BOUND_S)
    poller.join(10)

    assert answers == [204]
    assert exit_code in CLEAN_EXIT and time.monotonic() - started < STOP_BOUND_S
    assert "shutting down" in server.log_text()


def _answer(connection: socket.socket) -> tuple[bytes, bytes]:
    """One HTTP/1.1 answer read off ``connection``: (head, body) by its Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += connection.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    declared = re.search(rb"(?i)content-length: *(\d+)", head)
    length = int(declared.group(1)) if declared else 0  # (a 204 has none)
    while len(body) < length:
        body += connection.recv(65536)
    return head, body


def test_sigterm_closes_kept_alive_connections_before_the_process_ends(make_server) -> None:
    """A client's kept-alive connection stayed open until the process exited, and a request
    sent on it meanwhile died unanswered: a protocol error, on which the 2.6.0 client's
    consume() exits instead of failing over. Answers given while stopping now close their
    connection, and idle ones are closed once the listener is."""
    server = make_server()
    request = (f"GET {{}} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n\r\n")
    idle = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    idle.sendall(request.format("/health").encode())
    assert b" 200 " in _answer(idle)[0].split(b"\r\n")[0]
    parked = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    parked.sendall(request.format(
        f"/api/v1/pop/queue/{unique_name()}?wait=true&timeout=60000").encode())
    time.sleep(0.5)  # parked by now

    server.process.send_signal(signal.SIGTERM)
    head, _ = _answer(parked)

    assert head.startswith(b"HTTP/1.1 204") and b"connection: close" in head.lower(), head
    assert parked.recv(1) == b""  # closed after the answer
    assert idle.recv(1) == b""
    assert server.stop(timeout=STOP_BOUND_S) in CLEAN_EXIT
    assert re.search(r"closed [1-9]\d* idle client connections", server.log_text())


def test_sigterm_under_load_loses_no_acknowledged_push(make_server) -> None:
    server = make_server()
    producers = Producers(server.url, unique_name(), threads=3, limit=150).start()
    wait_until(lambda: producers.sent_count() >= 100, 20, message="load before the stop")

    assert server.stop(timeout=STOP_BOUND_S) in CLEAN_EXIT
    time.sleep(0.5)
    server.start()  # same port and buffer directory: replays anything left in the buffer

    ledger = producers.stop()
    result = count(ledger, drain(server.url, ledger.queue, ledger.partitions()))
    report("SIGTERM under load, then restart", result)
    result.assert_nothing_lost()
    assert result.acknowledged == result.sent


def test_sigterm_stops_the_embedded_postgres_the_server_started(make_server) -> None:
    # not pytest's tmp_path: it is 0700 under root, and the embedded PostgreSQL runs as an
    # unprivileged user that must reach its data directory
    root = Path(tempfile.mkdtemp(prefix="queen-tw-shutdown-pg-"))
    postgres = EmbeddedPostgres(root / "pg")
    try:
        server = make_server(QUEEN_EMBEDDED_PG=str(postgres.data_dir))
        assert postgres.is_running()

        assert server.stop(timeout=STOP_BOUND_S) in CLEAN_EXIT

        assert not postgres.is_running()
    finally:
        postgres.stop()
        shutil.rmtree(root, ignore_errors=True)


class _Step(service_module.Service):
    """A child whose stop finishes when the test says so (or never)."""

    def __init__(self, name: str, log: list[str]):
        self.setName(name)
        self.log = log
        self.done: defer.Deferred = defer.Deferred()

    def stopService(self):
        super().stopService()
        self.log.append(f"stop {self.name}")
        self.done.addCallback(lambda _: self.log.append(f"stopped {self.name}"))
        return self.done


def test_children_stop_in_reverse_order_one_at_a_time_within_the_budget() -> None:
    clock, log = Clock(), []
    top = OrderedMultiService(clock, step_timeout=10, total_timeout=12, last_grace=2)
    first, second, hung, last = (_Step(n, log) for n in ("first", "second", "hung", "last"))
    for child in (first, second, hung, last):
        child.setServiceParent(top)
    top.startService()

    stopping = top.stopService()
    assert log == ["stop last"]  # nothing else before "last" finished
    last.done.callback(None)
    assert log[-1] == "stop hung"
    clock.advance(10)  # "hung" never finishes: its step times out
    assert log[-1] == "stop second"
    clock.advance(2)  # the budget is spent: "second" gets the last grace only
    assert log[-1] == "stop first"
    first.done.callback(None)

    assert stopping.called
    assert log == ["stop last", "stopped last", "stop hung", "stop second", "stop first",
                   "stopped first"]
