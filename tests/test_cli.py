"""The ``queen-tw`` admin CLI, run as a subprocess (``python -m queen_tw.cli``) against real
servers on the test PostgreSQL: each command's table and ``--json`` on real data, its exit
statuses (1 with the server's message, 2 bad usage, 3 nobody listening), JWT, maintenance
and the buffer replay, a backup -> delete -> restore round trip, and ``migrate`` on a fresh
database.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import jwt
import psycopg2
import psycopg2.extensions
import pytest

from scratch_databases import scratch_database, server_env
from support import REPO_ROOT, ServerProcess, free_port, unique_name, wait_until

JWT_SECRET = "cli-secret-that-is-long-enough-for-hs256"


def cli(*args: str, url: str | None = None, env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Runs the CLI; ``url`` goes in as QUEEN_URL (the way a deployment sets it)."""
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("QUEEN_URL", "QUEEN_TOKEN")}
    environment.update({"PYTHONPATH": str(REPO_ROOT), **(env or {})})
    if url is not None:
        environment["QUEEN_URL"] = url
    return subprocess.run([sys.executable, "-m", "queen_tw.cli", *args], env=environment,
                          capture_output=True, text=True, timeout=timeout, check=False)


def ok_json(*args: str, url: str | None = None, env: dict[str, str] | None = None) -> Any:
    done = cli(*args, "--json", url=url, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def push(http: httpx.Client, queue: str, items: list[dict[str, Any]]) -> list[dict]:
    answer = http.post("/api/v1/push", json={"items": [{"queue": queue, **item}
                                                         for item in items]})
    assert answer.status_code == 201, answer.text
    return answer.json()


def dead_letter_all(http: httpx.Client, queue: str, error: str) -> None:
    """Pops every message of ``queue`` (queue mode) and acks it ``dlq``."""
    while True:
        popped = http.get(f"/api/v1/pop/queue/{queue}", params={"batch": 100})
        if popped.status_code == 204:
            return
        body = popped.json()
        for message in body["messages"]:
            answer = http.post("/api/v1/ack", json={
                "transactionId": message["transactionId"], "partitionId": body["partitionId"],
                "leaseId": body["leaseId"], "status": "dlq", "error": error})
            assert answer.status_code == 200, answer.text


# -- reading ----------------------------------------------------------------------------

def test_status_shows_health_counts_and_flags(server: ServerProcess) -> None:
    done = cli("status", url=server.url)
    assert done.returncode == 0, done.stderr
    assert "status:      healthy" in done.stdout
    assert "database:    connected" in done.stdout
    assert "maintenance: push off, pop off" in done.stdout
    answer = ok_json("status", url=server.url)
    assert answer["health"]["status"] == "healthy"
    assert answer["maintenance"]["maintenanceMode"] is False
    assert isinstance(answer["overview"]["queues"], int)


def test_queues_and_queue_show_list_real_counts(server: ServerProcess,
                                                http: httpx.Client) -> None:
    queue = unique_name("cli-q-")
    http.post("/api/v1/configure", json={"queue": queue, "options": {"leaseTime": 17}})
    push(http, queue, [{"partition": "a", "payload": n} for n in range(3)]
         + [{"partition": "b", "payload": 9}])

    table = cli("queues", url=server.url)
    assert table.returncode == 0, table.stderr
    row = next(line for line in table.stdout.splitlines() if line.startswith(queue + " "))
    assert row.split()[1:] == ["3", "4", "4", "0"]  # partitions (Default, a, b), counts
    listed = ok_json("queues", url=server.url)
    assert any(q["name"] == queue for q in listed["queues"])

    shown = cli("queue", "show", queue, url=server.url)
    assert shown.returncode == 0, shown.stderr
    assert "leaseTime:" in shown.stdout and " 17\n" in shown.stdout
    partition_rows = {line.split()[0]: line.split()[1:3] for line in shown.stdout.splitlines()
                      if line.split()[:1] in (["a"], ["b"])}
    assert partition_rows == {"a": ["3", "3"], "b": ["1", "1"]}
    assert ok_json("queue", "show", queue, url=server.url)["options"]["leaseTime"] == 17


def test_groups_list_and_lag_show_an_unacked_group(server: ServerProcess,
                                                   http: httpx.Client) -> None:
    queue = unique_name("cli-lag-")
    group = unique_name("g-")
    push(http, queue, [{"partition": "p", "payload": n} for n in range(5)])
    popped = http.get(f"/api/v1/pop/queue/{queue}", params={"consumerGroup": group})
    assert popped.status_code == 200

    listed = cli("groups", "list", url=server.url)
    assert listed.returncode == 0, listed.stderr
    assert any(line.split()[:2] == [group, queue] for line in listed.stdout.splitlines())

    lag = cli("groups", "lag", "--queue", queue, url=server.url)
    assert lag.returncode == 0, lag.stderr
    row = next(line.split() for line in lag.stdout.splitlines() if line.startswith(group))
    assert row[1:4] == [queue, "p", "5"]
    rows = ok_json("groups", "lag", "--queue", queue, url=server.url)
    assert {(r["consumer_group"], r["offset_lag"]) for r in rows} >= {(group, 5)}
    assert all(r["queue_name"] == queue for r in rows)


# -- errors and exit statuses -----------------------------------------------------------

def test_unknown_queue_exits_1_with_the_servers_message(server: ServerProcess) -> None:
    done = cli("queue", "show", "no-such-queue-" + uuid.uuid4().hex, url=server.url)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.startswith("queen-tw: GET /api/v1/resources/queues/")
    assert "HTTP 404: Queue not found" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_status_during_a_database_outage_shows_what_health_knows(
        make_server, pg_env: dict[str, str], pg_dsn: str) -> None:
    with scratch_database(pg_dsn) as dsn:
        server = make_server(**server_env(pg_env, dsn))
        _drop_database(pg_dsn, psycopg2.extensions.parse_dsn(dsn)["dbname"])
        wait_until(lambda: httpx.get(server.url + "/health").status_code == 503, timeout=15)
        done = cli("status", url=server.url)
        server.stop()
    assert done.returncode == 1, done.stderr
    assert "status:      unhealthy" in done.stdout
    assert "database:    disconnected" in done.stdout
    assert "messages:    unavailable (HTTP 503: " in done.stdout


def _drop_database(admin_dsn: str, name: str) -> None:
    admin = psycopg2.connect(admin_dsn)
    admin.autocommit = True
    try:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        admin.close()


def test_server_down_exits_3() -> None:
    done = cli("status", url=f"http://127.0.0.1:{free_port()}")
    assert done.returncode == 3
    assert "cannot reach http://127.0.0.1:" in done.stderr
    assert "refused" in done.stderr.lower()


@pytest.mark.parametrize("args", [
    ("no-such-command",), ("queue",), ("dlq", "retry"), ("dlq", "list", "--limit", "x"),
    ("maintenance", "sideways"),
    # durations the socket layer would raise on (tracebacks before), or never run out
    ("--timeout", "-1", "status"), ("--timeout", "nan", "status"),
    ("--timeout", "inf", "status"), ("--timeout", "0", "status"),
    ("buffer", "replay", "--wait", "nan"), ("migrate", "--wait", "nan"),
])
def test_bad_usage_exits_2(server: ServerProcess, args: tuple[str, ...]) -> None:
    done = cli(*args, url=server.url)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stderr.strip() and "Traceback" not in done.stderr


def test_a_token_with_a_line_break_is_named_as_the_fault(server: ServerProcess) -> None:
    """http.client refuses such a header value with a ValueError, which was reported as an
    unusable --url."""
    done = cli("--token", "line\nbreak", "status", url=server.url)
    assert done.returncode == 2
    assert done.stderr.strip() == ("queen-tw: --token holds a line break or NUL: not a usable "
                                   "token")


@pytest.mark.parametrize("url", ["notaurl", "http://127.0.0.1:abc", "http://[::1"])
def test_an_unusable_url_is_one_line_and_exits_2(url: str) -> None:
    done = cli("status", url=url)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("queen-tw: --url ") and len(done.stderr.splitlines()) == 1


def test_a_url_of_another_web_server_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    """A proxy's page or a wrong port answering 200 with HTML: the command read it as JSON
    and failed with an AttributeError traceback."""
    import functools
    import http.server
    import threading

    (tmp_path / "api" / "v1" / "resources").mkdir(parents=True)
    (tmp_path / "api" / "v1" / "resources" / "queues").write_text("<html>queues</html>")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    try:
        done = cli("queues", url=f"http://127.0.0.1:{web.server_address[1]}")
    finally:
        web.shutdown()
        web.server_close()
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines() == [
        "queen-tw: GET /api/v1/resources/queues: the answer is not JSON; is "
        f"http://127.0.0.1:{web.server_address[1]} a queen-tw server?"]


# -- dead letters -----------------------------------------------------------------------

def test_dlq_list_retry_and_purge(server: ServerProcess, http: httpx.Client) -> None:
    queue = unique_name("cli-dlq-")
    push(http, queue, [{"partition": "p", "transactionId": f"t{n}", "payload": n}
                       for n in range(3)])
    dead_letter_all(http, queue, "handler exploded")

    listing = cli("dlq", "list", "--queue", queue, url=server.url)
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.count("handler exploded") == 3
    assert "3 shown of 3" in listing.stdout
    dead = ok_json("dlq", "list", "--queue", queue, url=server.url)
    assert dead["total"] == 3
    first = next(m for m in dead["messages"] if m["transactionId"] == "t0")

    retried = cli("dlq", "retry", first["partitionId"], "t0", url=server.url)
    assert retried.returncode == 0, retried.stderr
    assert "retried 1 dead letter(s)" in retried.stdout
    again = http.get(f"/api/v1/pop/queue/{queue}").json()["messages"]
    assert [m["data"] for m in again] == [0]
    assert ok_json("dlq", "list", "--queue", queue, url=server.url)["total"] == 2

    refused = cli("dlq", "purge", "--queue", queue, url=server.url)
    assert refused.returncode == 2 and "--yes" in refused.stderr
    purged = ok_json("dlq", "purge", "--queue", queue, "--yes", url=server.url)
    assert purged["purged"] == 2
    assert ok_json("dlq", "list", "--queue", queue, url=server.url)["total"] == 0
    gone = http.get(f"/api/v1/messages/{first['partitionId']}/t1")
    assert gone.status_code == 404


# -- maintenance, the buffer, JWT (servers of their own) --------------------------------

def test_maintenance_and_buffer_replay(make_server, pg_env: dict[str, str],
                                       pg_dsn: str) -> None:
    # the flags hold for every server of a database: a database of its own, so the shared
    # server never starts buffering the other tests' pushes
    with scratch_database(pg_dsn) as dsn:
        server = make_server(**server_env(pg_env, dsn))
        try:
            _switch_maintenance_and_replay(server)
        finally:
            server.stop()


def _switch_maintenance_and_replay(server: ServerProcess) -> None:
    queue = unique_name("cli-buf-")
    with httpx.Client(base_url=server.url, timeout=30) as http:
        on = cli("maintenance", "on", url=server.url)
        assert on.returncode == 0, on.stderr
        assert "push maintenance: on" in on.stdout
        answers = push(http, queue, [{"partition": "p", "payload": n} for n in range(4)])
        assert {a["status"] for a in answers} == {"buffered"}
        assert ok_json("buffer", "status", url=server.url)["pending"] == 4
        assert "pending:  4" in cli("buffer", "status", url=server.url).stdout

        replay = cli("buffer", "replay", "--wait", "20", url=server.url)
        assert replay.returncode == 0, replay.stderr
        assert "switched off" in replay.stdout and "buffer empty" in replay.stdout
        assert ok_json("maintenance", url=server.url)["maintenanceMode"] is False
        fetched = http.post("/api/v1/fetch", json={"entries": [
            {"queue": queue, "partition": "p", "offset": 0}]}).json()
        assert [r["payload"] for r in fetched["entries"][0]["records"]] == [0, 1, 2, 3]

        assert ok_json("maintenance", "on", "--pop", url=server.url)["popMaintenanceMode"]
        assert http.get(f"/api/v1/pop/queue/{queue}").status_code == 204
        off = cli("maintenance", "off", "--pop", url=server.url)
        assert "pop maintenance: off" in off.stdout
        assert len(http.get(f"/api/v1/pop/queue/{queue}",
                            params={"batch": 10}).json()["messages"]) == 4


def _token(role: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": "cli-test", "role": role, "iat": now, "exp": now + 600},
                      JWT_SECRET, algorithm="HS256")


def test_jwt_token_from_flag_or_environment(make_server) -> None:
    server = make_server(JWT_ENABLED="true", JWT_SECRET=JWT_SECRET)
    refused = cli("queues", url=server.url)
    assert refused.returncode == 1
    assert "HTTP 401" in refused.stderr

    assert cli("queues", "--token", _token("admin"), url=server.url).returncode == 0
    by_env = cli("status", url=server.url, env={"QUEEN_TOKEN": _token("read-only")})
    assert by_env.returncode == 0, by_env.stderr
    assert "maintenance: unknown (needs an admin token" in by_env.stdout
    too_weak = cli("maintenance", "on", url=server.url,
                   env={"QUEEN_TOKEN": _token("read-only")})
    assert too_weak.returncode == 1 and "HTTP 403" in too_weak.stderr


# -- backup and restore -----------------------------------------------------------------

def _messages(path: Path) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["type"] == "queue"
    return lines[1:]


def test_backup_delete_restore_keeps_messages_and_order(server: ServerProcess,
                                                        http: httpx.Client,
                                                        tmp_path: Path) -> None:
    queue = unique_name("cli-backup-")
    http.post("/api/v1/configure", json={"queue": queue, "options": {
        "leaseTime": 17, "encryptionEnabled": True}})
    trace = "0190a3c4-0000-7000-8000-0000000000aa"
    items = [{"partition": f"p{n % 3}", "transactionId": f"tx-{n}",
              "payload": {"n": n, "text": "é" * (n % 4)},
              **({"traceId": trace} if n % 5 == 0 else {})} for n in range(60)]
    for start in range(0, 60, 20):
        push(http, queue, items[start:start + 20])
    http.get(f"/api/v1/pop/queue/{queue}/partition/p0", params={"batch": 3, "autoAck": "true"})

    first = tmp_path / "first.jsonl"
    done = cli("backup", queue, str(first), url=server.url)
    assert done.returncode == 0, done.stderr
    assert f"backed up 60 message(s) of {queue} (4 partition(s))" in done.stdout
    saved = _messages(first)
    by_partition = {p: [m["transactionId"] for m in saved if m["partition"] == p]
                    for p in ("p0", "p1", "p2")}
    assert by_partition == {p: [f"tx-{n}" for n in range(60) if f"p{n % 3}" == p]
                            for p in ("p0", "p1", "p2")}
    assert saved[0]["payload"] == {"n": 0, "text": ""}  # decrypted
    assert {m["transactionId"] for m in saved if m["traceId"] == trace} == {
        f"tx-{n}" for n in range(0, 60, 5)}

    assert http.delete(f"/api/v1/resources/queues/{queue}").json()["existed"] is True
    restored = ok_json("restore", queue, str(first), url=server.url)
    assert restored == {"queue": queue, "created": True, "messages": 60, "queued": 60,
                        "duplicate": 0, "buffered": 0}
    options = http.get(f"/api/v1/resources/queues/{queue}").json()["options"]
    assert options["leaseTime"] == 17 and options["encryptionEnabled"] is True

    second = tmp_path / "second.jsonl"
    assert cli("backup", queue, str(second), url=server.url).returncode == 0
    keep = ("partition", "transactionId", "payload", "traceId")
    assert [{k: m[k] for k in keep} for m in _messages(second)] == \
        [{k: m[k] for k in keep} for m in saved]

    again = cli("restore", queue, str(first), url=server.url)
    assert again.returncode == 0, again.stderr
    assert "0 queued, 60 duplicate" in again.stdout
    popped = http.get(f"/api/v1/pop/queue/{queue}/partition/p1", params={"batch": 100})
    assert [m["transactionId"] for m in popped.json()["messages"]] == by_partition["p1"]


def test_payloads_with_unicode_line_separators_survive_backup_and_restore(
        server: ServerProcess, http: httpx.Client, tmp_path: Path) -> None:
    """The lines are JSON written without ASCII escapes: U+2028, U+2029 and U+0085 stay raw
    inside them, and reading the file must not break lines there."""
    queue = unique_name("cli-separators-")
    payloads = ["line\u2028sep", "para\u2029graph", "next\u0085line", {"k\u2028": "\x0c\x1c"}]
    push(http, queue, [{"payload": payload} for payload in payloads])
    target = tmp_path / "separators.jsonl"
    assert cli("backup", queue, str(target), url=server.url).returncode == 0

    copy = unique_name("cli-separators-copy-")
    restored = cli("restore", copy, str(target), url=server.url)

    assert restored.returncode == 0, restored.stderr
    popped = http.get(f"/api/v1/pop/queue/{copy}", params={"batch": 10, "wait": "false"})
    assert [m["data"] for m in popped.json()["messages"]] == payloads


def test_backup_reads_partitions_the_fetch_budget_left_out(server: ServerProcess,
                                                          http: httpx.Client,
                                                          tmp_path: Path) -> None:
    """Six ~900 KB messages in six partitions: a 4 MiB fetch call holds four of them, so
    the other partitions answer without records and must be asked again, not skipped."""
    queue = unique_name("cli-big-")
    payloads = {f"p{n}": base64.b64encode(os.urandom(675_000)).decode() for n in range(6)}
    for partition, payload in payloads.items():
        push(http, queue, [{"partition": partition, "payload": payload}])
    target = tmp_path / "big.jsonl"
    done = cli("backup", queue, str(target), url=server.url)
    assert done.returncode == 0, done.stderr
    assert {m["partition"]: m["payload"] for m in _messages(target)} == payloads


def test_restore_refuses_a_bad_file(server: ServerProcess, tmp_path: Path) -> None:
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"type": "message", "partition": "p", "transactionId": "t", '
                      '"payload": 1}\nnot json\n')
    done = cli("restore", unique_name("cli-bad-"), str(broken), url=server.url)
    assert done.returncode == 1
    assert f"{broken}:2: not JSON" in done.stderr
    missing = cli("restore", "q", str(tmp_path / "absent.jsonl"), url=server.url)
    assert missing.returncode == 2 and "cannot read" in missing.stderr


def test_a_line_the_server_refuses_whole_is_named(server: ServerProcess, http: httpx.Client,
                                                  tmp_path: Path) -> None:
    """A bad traceId makes the server refuse the whole push of 500 lines: the restore said
    only 'HTTP 400: TraceId must be a UUID'. It now finds and names the line; the lines
    before it are stored."""
    lines = [{"type": "message", "partition": "p", "transactionId": f"t{n}", "payload": n}
             for n in range(7)]
    lines[4]["traceId"] = "not-a-uuid"
    backup_file = tmp_path / "bad-trace.jsonl"
    backup_file.write_text("".join(json.dumps(line) + "\n" for line in lines))
    queue = unique_name("cli-trace-")

    done = cli("restore", queue, str(backup_file), url=server.url)

    assert done.returncode == 1
    assert done.stderr.startswith(f"queen-tw: {backup_file}:5: push refused: TraceId"), \
        done.stderr
    stored = http.get("/api/v1/messages", params={"queue": queue}).json()["messages"]
    assert {m["transactionId"] for m in stored} >= {"t0", "t1", "t2", "t3"}
    assert "t4" not in {m["transactionId"] for m in stored}


# -- migrate ----------------------------------------------------------------------------

def test_migrate_installs_then_finds_the_schema_up_to_date(pg_env: dict[str, str],
                                                          pg_dsn: str) -> None:
    with scratch_database(pg_dsn) as dsn:
        env = server_env(pg_env, dsn)
        first = cli("migrate", env=env)
        assert first.returncode == 0, first.stderr
        assert first.stdout.startswith("applied: migrations/0001_baseline.sql")
        assert ok_json("migrate", env=env) == {"applied": []}
    unreachable = cli("migrate", "--wait", "0", "--pg-port", str(free_port()),
                      env={**pg_env, "PG_HOST": "127.0.0.1"})
    assert unreachable.returncode == 3
    assert "cannot reach PostgreSQL" in unreachable.stderr


def test_migrate_is_not_bounded_by_the_request_statement_timeout(pg_env: dict[str, str],
                                                                 pg_dsn: str) -> None:
    """An upgrade can take long (migration 4 rewrites every message): cancelled by
    DB_STATEMENT_TIMEOUT, it was retried, then reported as 'cannot reach PostgreSQL'."""
    with scratch_database(pg_dsn) as dsn:
        done = cli("migrate", "--wait", "1",
                   env={**server_env(pg_env, dsn), "DB_STATEMENT_TIMEOUT": "1"})
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("applied: migrations/0001_baseline.sql")


def test_migrate_kept_waiting_by_a_lock_says_so_and_exits_1(pg_env: dict[str, str],
                                                           pg_dsn: str) -> None:
    from queen_tw.db.schema import SCHEMA_LOCK_ID

    with scratch_database(pg_dsn) as dsn:
        holder = psycopg2.connect(dsn)
        try:
            with holder.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_lock(%s)", (SCHEMA_LOCK_ID,))
            done = cli("migrate", "--wait", "1",
                       env={**server_env(pg_env, dsn), "DB_LOCK_TIMEOUT": "300"})
        finally:
            holder.close()
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("queen-tw: schema upgrade did not finish: ")
    assert "lock timeout" in done.stderr and len(done.stderr.splitlines()) == 1
