"""The server's clocks against a host clock that steps or differs from PostgreSQL's.

Real servers run under libfaketime (Debian's ``faketime``; .ci/run installs it): with an offset
read from a file and CLOCK_MONOTONIC left alone, as an NTP step leaves it, or with a constant
offset, as on a host whose clock differs from PostgreSQL's. PostgreSQL is never faked.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict

import httpx
import pytest

from tests.http_helpers import configure, push
from tests.support import unique_name, wait_until

LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"


@pytest.fixture
def faketime() -> str:
    """The preload library. Without it these tests skip, saying why, as the browser and
    packet-loss tests do without theirs: `make test` stays green on a machine that has only
    what the README asks for (.ci/run installs it, so CI runs them)."""
    if not os.path.exists(LIBFAKETIME):
        pytest.skip(f"{LIBFAKETIME} missing: apt-get install -y faketime (.ci/run does)")
    return LIBFAKETIME


@pytest.fixture
def offset_file(faketime: str, tmp_path: Path) -> Path:
    return tmp_path / "faketime-offset"


def stepping(offset_file: Path) -> Dict[str, str]:
    """Environment of a process whose wall clock follows ``offset_file`` (see :func:`step`)."""
    offset_file.write_text("+0\n")
    return {"LD_PRELOAD": LIBFAKETIME, "FAKETIME_TIMESTAMP_FILE": str(offset_file),
            "FAKETIME_NO_CACHE": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


def step(offset_file: Path, offset: str) -> None:
    """Steps the wall clock of the processes started with :func:`stepping` to ``offset``
    from the real time (e.g. ``-20s``)."""
    fresh = offset_file.with_suffix(".new")
    fresh.write_text(offset + "\n")
    os.replace(fresh, offset_file)


def test_the_faked_environment_steps_the_wall_clock_only(offset_file: Path) -> None:
    script = ("import sys, time\na, m = time.time(), time.monotonic()\nprint('ready', flush=True)"
              "\nsys.stdin.readline()\nprint(time.time() - a, time.monotonic() - m)\n")
    child = subprocess.Popen([sys.executable, "-c", script], env={**os.environ,
                             **stepping(offset_file)}, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "ready"
    step(offset_file, "-20s")
    out, _ = child.communicate("go\n", timeout=20)
    wall, monotonic = map(float, out.split())
    assert -21 < wall < -19 and 0 <= monotonic < 5, out


def long_poll(url: str, queue: str, timeout_ms: int, outcome: Dict[str, Any]) -> None:
    started = time.monotonic()
    answer = httpx.get(f"{url}/api/v1/pop/queue/{queue}",
                       params={"wait": "true", "timeout": timeout_ms}, timeout=120)
    outcome.update(status=answer.status_code, took=time.monotonic() - started)


@pytest.mark.parametrize("offset", ["-20s", "+60s"])
def test_a_long_poll_lasts_its_timeout_across_a_clock_step(make_server, offset_file: Path,
                                                           offset: str) -> None:
    """The reactor timed its calls on the wall clock: a step back of 20 s made a 3 s long
    poll last 23 s; a step forward answered a 6 s one at once."""
    server = make_server(**stepping(offset_file))
    queue = unique_name()
    with httpx.Client(base_url=server.url, timeout=30) as http:
        configure(http, queue)
    outcome: Dict[str, Any] = {}
    poll = threading.Thread(target=long_poll, args=(server.url, queue, 6000, outcome))
    poll.start()
    time.sleep(1.0)  # parked
    step(offset_file, offset)
    poll.join(60)

    assert outcome["status"] == 204
    assert 5.5 < outcome["took"] < 9, outcome


def test_an_ephemeral_lease_outlives_a_forward_step(make_server, offset_file: Path) -> None:
    """A step forward of 120 s ended a 60 s ephemeral lease at once: the message went to a
    second consumer while the first still held it."""
    server = make_server(**stepping(offset_file))
    queue = unique_name("test-eph-")
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert http.post("/api/v1/ephemeral/configure", json={
            "queue": queue, "options": {"leaseSeconds": 60}}).status_code == 201
        assert http.post("/api/v1/ephemeral/push", json={
            "queue": queue, "messages": [{"payload": {"n": 1}}]}).status_code == 201
        first = http.get("/api/v1/ephemeral/pop", params={"queue": queue}).json()["messages"]
        step(offset_file, "+120s")
        time.sleep(1.5)
        second = http.get("/api/v1/ephemeral/pop", params={"queue": queue}).json()["messages"]
        acked = http.post("/api/v1/ephemeral/ack", json={
            "queue": queue, "acks": [{"id": first[0]["id"]}]}).json()

    assert len(first) == 1 and second == []
    assert acked["results"][0]["outcome"] == "acked", acked


def test_metrics_follow_postgresqls_clock_on_a_host_three_minutes_behind(make_server, db,
                                                                          faketime: str
                                                                          ) -> None:
    """Buckets carried the server's clock and were judged by PostgreSQL's now(): three
    minutes behind, the per-minute rates read 0 and the running worker read dead."""
    worker = unique_name("clock-")
    server = make_server(LD_PRELOAD=faketime, FAKETIME="-3m", WORKER_ID=worker,
                         METRICS_AGGREGATE_INTERVAL_S="1")

    def written() -> bool:  # the first write measures PostgreSQL's clock
        with db.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM queen.worker_metrics WHERE worker_id = %s",
                           (worker,))
            return cursor.fetchone()[0] >= 2
    wait_until(written, 20, message="two metrics writes of the skewed server")
    queue = unique_name()
    with httpx.Client(base_url=server.url, timeout=30) as http:
        configure(http, queue)
        push(http, queue, [{"n": n} for n in range(20)])
        time.sleep(3)  # written, by an interval of 1 s
        scrape = http.get("/metrics/prometheus").text
        workers = http.get("/api/v1/status").json()["workers"]
    with db.cursor() as cursor:
        cursor.execute("SELECT extract(epoch FROM now() - max(bucket_start)) "
                       "FROM queen.queue_metrics WHERE queue_name = %s", (queue,))
        newest_age = float(cursor.fetchone()[0])

    pushed = [line for line in scrape.splitlines()
              if line.startswith("queen_queue_push_messages_per_minute{")
              and f'queue="{queue}"' in line]
    assert pushed and float(pushed[0].rsplit(" ", 1)[1]) == 20, pushed
    assert [w["alive"] for w in workers if w["workerId"] == worker] == [True]
    assert newest_age < 30, newest_age
