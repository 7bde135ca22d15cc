"""NUM_WORKERS: processes sharing the port, wake-ups across them, graceful stop."""

import concurrent.futures
import os
import time

import httpx
import pytest
from psycopg2.extensions import make_dsn

from tests.cluster_support import store_silently
from tests.support import unique_name


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
