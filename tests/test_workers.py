"""NUM_WORKERS: processes sharing the port, wake-ups across them, graceful stop."""

import concurrent.futures
import json
import os
import re
import socket
import time

import httpx
import pytest
from psycopg2.extensions import make_dsn

from tests.cluster_support import store_silently
from tests.support import expire_leases, unique_name, wait_until
from tests.test_long_poll import asleep_on_lock


def _worker_ids_seen(url: str, wanted: int, attempts: int = 400) -> set:
    """Worker ids answering /health over fresh connections (the kernel picks the worker
    that accepts each one), until ``wanted`` were seen or ``attempts`` ran out."""
    seen: set = set()
    for _ in range(attempts):
        with httpx.Client(base_url=url, timeout=5) as fresh_connection:
            seen.add(fresh_connection.get("/health").json()["worker_id"])
        if len(seen) >= wanted:
            break
    return seen


def _children(pid: int) -> list:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    if int(stat.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, ValueError):
                pass
    return found


def test_workers_share_the_port_and_each_serves_requests(make_server):
    server = make_server(NUM_WORKERS="2", WORKER_ID="multi")
    assert _worker_ids_seen(server.url, wanted=2) == {"multi-1", "multi-2"}


def _dsn_naming_the_application(pg_env: dict) -> str:
    """QUEEN_PG_DSN for the test database with an application_name of its own, as
    deployments set to tell their services apart in pg_stat_activity."""
    return make_dsn(host=pg_env["PG_HOST"], port=pg_env["PG_PORT"], user=pg_env["PG_USER"],
                    password=pg_env.get("PG_PASSWORD", ""), dbname=pg_env["PG_DB"],
                    application_name="billing-queue")


@pytest.mark.parametrize("connection", ["PG_*", "QUEEN_PG_DSN with application_name"])
def test_push_in_one_worker_wakes_long_polls_parked_in_the_others(make_server, pg_env,
                                                                   connection):
    # The DSN case: every worker's connections then share one application_name, so the
    # notices must name their sending worker some other way (queen.worker).
    own_dsn = {"QUEEN_PG_DSN": _dsn_naming_the_application(pg_env)} if "DSN" in connection \
        else {}
    # No fallback re-checks within the test: only a wake-up can deliver in time.
    server = make_server(NUM_WORKERS="2", POP_WAIT_INITIAL_INTERVAL_MS="30000",
                         POP_WAIT_MAX_INTERVAL_MS="30000", **own_dsn)
    queue = unique_name()

    def parked_pop(_):
        with httpx.Client(base_url=server.url, timeout=40) as own_connection:
            started = time.monotonic()
            answer = own_connection.get(f"/api/v1/pop/queue/{queue}",
                                        params={"wait": "true", "timeout": 20000})
            return answer.status_code, time.monotonic() - started

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        parked = [pool.submit(parked_pop, n) for n in range(6)]
        time.sleep(1.5)  # let every pop park (each on its own connection, spread over workers)
        pushed = httpx.post(f"{server.url}/api/v1/push", json={"items": [
            {"queue": queue, "partition": f"p{n}", "payload": n} for n in range(6)]})
        assert pushed.status_code == 201
        outcomes = [future.result(timeout=30) for future in parked]

    assert [code for code, _ in outcomes] == [200] * 6
    assert max(waited for _, waited in outcomes) < 10  # woken, not timed out at 20 s


def test_internal_notify_through_any_worker_wakes_the_long_polls_of_every_worker(
        make_server, db):
    # Messages stored behind the server's back (no NOTIFY): only /internal/api/notify,
    # whichever worker it reaches, can make the pops parked in the other worker see them.
    server = make_server(NUM_WORKERS="2", POP_WAIT_INITIAL_INTERVAL_MS="30000",
                         POP_WAIT_MAX_INTERVAL_MS="30000")
    queue = unique_name()
    assert httpx.post(f"{server.url}/api/v1/configure",
                      json={"queue": queue, "options": {}}).status_code == 200

    def parked_pop(_):
        with httpx.Client(base_url=server.url, timeout=40) as own_connection:
            return own_connection.get(f"/api/v1/pop/queue/{queue}",
                                      params={"wait": "true", "timeout": 20000})

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        parked = [pool.submit(parked_pop, n) for n in range(6)]
        time.sleep(1.5)  # let every pop park (each on its own connection, spread over workers)
        for n in range(6):
            store_silently(db, queue, f"p{n}", f"m{n}", n)
        notified = httpx.post(f"{server.url}/internal/api/notify", json={"queue": queue})
        assert notified.status_code == 200, notified.text
        answers = [future.result(timeout=30) for future in parked]

    assert [answer.status_code for answer in answers] == [200] * 6
    assert sorted(m["transactionId"] for answer in answers
                  for m in answer.json()["messages"]) == [f"m{n}" for n in range(6)]


def _all_gone(pids: list, within: float) -> bool:
    """Waits up to ``within`` seconds for every process of ``pids`` to exit."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{pid}") for pid in pids):
        time.sleep(0.1)
    return not any(os.path.exists(f"/proc/{pid}") for pid in pids)


def test_sigterm_stops_every_worker(make_server):
    server = make_server(NUM_WORKERS="2")
    workers = _children(server.pid)
    assert len(workers) == 2
    server.stop()
    assert _all_gone(workers, 10)


def test_workers_stop_when_their_parent_is_killed_and_a_restart_serves_again(make_server):
    """Left running, the workers of a SIGKILLed parent kept the port (the restarted parent
    could not listen) and nobody would restart them."""
    server = make_server(NUM_WORKERS="2")
    workers = _children(server.pid)
    assert len(workers) == 2
    server.kill()

    assert _all_gone(workers, 30)
    assert "the parent process" in server.log_text()

    server.start()
    assert len(_children(server.pid)) == 2
    assert len(_worker_ids_seen(server.url, 2)) == 2  # both new workers serve


def _client_on_worker(url: str, worker: str) -> httpx.Client:
    """A keep-alive client whose connection the kernel gave to ``worker``."""
    for _ in range(400):
        client = httpx.Client(base_url=url, timeout=40)
        if client.get("/health").json()["worker_id"] == worker:
            return client
        client.close()
    raise AssertionError(f"no connection reached {worker}")


def _socket_on_worker(port: int, worker: str) -> socket.socket:
    """A raw keep-alive socket accepted by ``worker`` (asked through /health on it)."""
    for _ in range(400):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, rest = sock.recv(65536).partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
        while len(rest) < length:
            rest += sock.recv(65536)
        if json.loads(rest)["worker_id"] == worker:
            return sock
        sock.close()
    raise AssertionError(f"no socket reached {worker}")


def test_an_undone_auto_ack_delivery_wakes_the_long_polls_of_the_other_worker(
        make_server, db):
    """An autoAck pop whose client left during its SQL moves the cursor back in worker 1;
    the pop parked in worker 2 must hear of it (no SQL NOTIFY says so)."""
    server = make_server(NUM_WORKERS="2", WORKER_ID="undo", POP_WAIT_INITIAL_INTERVAL_MS="30000",
                         POP_WAIT_MAX_INTERVAL_MS="30000")
    queue = unique_name()
    with httpx.Client(base_url=server.url, timeout=10) as http:
        http.post("/api/v1/push", json={"items": [{"queue": queue, "payload": "x"}]})
        assert http.get(f"/api/v1/pop/queue/{queue}", params={"wait": "false"}).status_code == 200
    parked_client = _client_on_worker(server.url, "undo-2")
    leaving = _socket_on_worker(server.port, "undo-1")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        parked = pool.submit(parked_client.get, f"/api/v1/pop/queue/{queue}",
                             params={"wait": "true", "timeout": 15000})
        time.sleep(1.0)  # parked in worker 2: the message is leased
        expire_leases(db, queue)  # no wake-up: the parked pop does not look again by itself
        with db.cursor() as cursor:
            cursor.execute("SET lock_timeout = '5s'")
            cursor.execute("BEGIN")
            cursor.execute("LOCK TABLE queen.messages IN ACCESS EXCLUSIVE MODE")
            leaving.sendall(f"GET /api/v1/pop/queue/{queue}?wait=false&autoAck=true "
                            "HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            wait_until(lambda: asleep_on_lock(db), message="the autoAck pop waiting")
            leaving.close()
            time.sleep(0.3)  # the close reaches worker 1
            cursor.execute("ROLLBACK")
        started = time.monotonic()
        answer = parked.result(timeout=30)
    parked_client.close()

    assert answer.status_code == 200, answer.text
    assert answer.json()["messages"][0]["data"] == "x"
    assert time.monotonic() - started < 10  # woken, not answered 204 at its timeout
