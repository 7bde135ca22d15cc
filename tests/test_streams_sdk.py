"""The official streaming SDK (``queen.streams`` of queen-mq 0.15.0) running real pipelines
against queen-tw, each worker a process of its own; every output is checked exactly.

Pipelines use event time (a ``ts`` in each payload) so the windows they close are known in
advance: the test computes the expected output from what it pushed and compares it with
everything on the sink queue, duplicates included. Each partition's events are pushed in
``ts`` order, and a last "closer" event far in the future moves the watermark past every
window. The idle-flush timers are off (``idle_flush_ms=0``): windows close on stream time
alone, so the output does not depend on when the machine gets round to a flush.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import httpx
import psycopg2.extensions
import pytest

from tests.binary_bodies import framed_body, framed_group, v7_id
from tests.http_helpers import configure
from tests.support import ServerProcess, unique_name, wait_until

pytestmark = pytest.mark.timeout(300)

BASE_MS = 1_700_000_000_000
"""Event time of the first event: a whole second, so window starts are BASE_MS + k * 1000."""
CLOSER_OFFSET_MS = 100_000
"""The closer event's time after BASE_MS: past the end of every window of every test."""
PUSH_SPACING_S = 0.002
"""Pause between two pushes of a test's events (see _push_plan)."""
SETTLE_S = 1.0
"""After the sink holds everything expected, how long the workers may go on before they are
stopped: an extra (duplicate) emission made meanwhile is caught by the exact comparison."""

WORKER = r'''
import asyncio, json, signal, sys, time
from queen import Queen, Stream, token_bucket_gate

url, source, sink, name, kind, delay_ms, batch, partitions = sys.argv[1:9]
delay = int(delay_ms) / 1000.0
KEY = lambda m: m["data"]["k"]
TS = lambda m: m["data"]["ts"]


def slow(m):
    if delay:
        time.sleep(delay)  # a worker busy with each event, so it can be killed mid-window
    return m["data"]


def labelled(value, ctx):
    out = dict(value) if isinstance(value, dict) else {"sum": value}
    out.update(key=ctx["key"], windowStart=ctx["windowStart"], windowEnd=ctx["windowEnd"])
    return out


def build(q):
    stream = Stream.from_(q.queue(source)).map(slow)
    if kind == "mapfilter":
        return (stream.filter(lambda m: m["data"]["n"] % 2 == 0)
                .map(lambda m: {"n": m["data"]["n"], "tripled": m["data"]["n"] * 3}))
    if kind == "gate":
        return stream.gate(token_bucket_gate(capacity=5, refill_per_sec=10))
    keyed = stream.key_by(KEY)
    if kind == "tumbling":
        windowed = keyed.window_tumbling(seconds=1, event_time=TS, idle_flush_ms=0)
        return windowed.reduce(lambda acc, d: acc + d["n"], 0).map(labelled)
    if kind == "sliding":
        windowed = keyed.window_sliding(size=2, slide=1, event_time=TS, idle_flush_ms=0)
        return windowed.reduce(lambda acc, d: acc + d["n"], 0).map(labelled)
    if kind == "session":
        windowed = keyed.window_session(gap=1, event_time=TS, idle_flush_ms=0)
        return windowed.reduce(lambda acc, d: acc + d["n"], 0).map(labelled)
    if kind == "flush":  # processing time: windows of a quiet partition close by the timer
        windowed = keyed.window_tumbling(seconds=1, idle_flush_ms=300)
        return windowed.reduce(lambda acc, d: acc + d["n"], 0).map(labelled)
    if kind == "aggregate":
        windowed = keyed.window_tumbling(seconds=1, event_time=TS, idle_flush_ms=0)
        return windowed.aggregate({"count": lambda d: 1, "sum": lambda d: d["n"],
                                   "max": lambda d: d["n"]}).map(labelled)
    raise SystemExit("unknown pipeline " + kind)


async def main():
    q = Queen(url=url)
    errors = []
    runner = await build(q).to(q.queue(sink)).run(
        query_id=name, url=url, batch_size=int(batch), max_partitions=int(partitions),
        max_wait_millis=300, on_error=lambda err, ctx: errors.append(f"{ctx}: {err}"))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("running", flush=True)
    await stop.wait()
    await runner.stop()
    print("METRICS " + json.dumps({**runner.metrics(), "errors": errors}), flush=True)
    await q.close()


asyncio.run(main())
'''


class Worker:
    """One SDK worker process running pipeline ``kind`` for query ``name``."""

    def __init__(self, server: ServerProcess, source: str, sink: str, name: str, kind: str,
                 delay_ms: int = 0, batch: int = 50, partitions: int = 4):
        descriptor, log_name = tempfile.mkstemp(prefix="queen-tw-stream-worker-", suffix=".log")
        self.log_path = Path(log_name)
        self.metrics: Dict[str, Any] = {}
        with os.fdopen(descriptor, "wb") as log:  # the child keeps its own copy
            self.process = subprocess.Popen(
                [sys.executable, "-c", WORKER, server.url, source, sink, name, kind,
                 str(delay_ms), str(batch), str(partitions)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> Dict[str, Any]:
        """SIGTERM: the runner stops after its cycle in flight; returns its metrics."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for line in self.output().splitlines():
            if line.startswith("METRICS "):
                self.metrics = json.loads(line[len("METRICS "):])
                return self.metrics
        raise AssertionError(f"the worker reported no metrics:\n{self.output()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: a crash, whatever it was doing."""
        self.process.kill()
        self.process.wait()

    def close(self) -> None:
        if self.process.poll() is None:
            self.kill()
        self.log_path.unlink(missing_ok=True)


@pytest.fixture
def workers() -> Iterator[List[Worker]]:
    """Workers started by a test; any still running at its end are killed."""
    started: List[Worker] = []
    yield started
    for worker in started:
        worker.close()


Event = Dict[str, Any]


def _events(partitions: int, per_partition: int, keys: str = "abc",
            step_ms: int = 50) -> Dict[str, List[Event]]:
    """Per partition name: events in ts order (k cycles through ``keys``), then a closer."""
    plan = {}
    for p in range(partitions):
        events = [{"k": keys[(i + p) % len(keys)], "n": (i * 7 + p) % 23 + 1,
                   "ts": BASE_MS + i * step_ms} for i in range(per_partition)]
        events.append({"k": "closer", "n": 0, "ts": BASE_MS + CLOSER_OFFSET_MS})
        plan[f"p{p}"] = events
    return plan


def _push_plan(http: httpx.Client, queue: str, plan: Dict[str, List[Event]]) -> None:
    """Pushes every event in its own request, at least 2 ms after the one before.

    The SDK orders a popped batch by (createdAt truncated to the millisecond, id) and acks
    the last of that order. Since ids carry the sub-millisecond fraction they sort in push
    order (see the test of one push below); spacing still keeps the SDK's event-time
    windows apart from createdAt coincidences, as the pipelines here were written for.
    """
    for partition, events in plan.items():
        for event in events:
            answer = http.post("/api/v1/push", json={"items": [
                {"queue": queue, "partition": partition, "payload": event}]})
            assert answer.status_code == 201, answer.text
            time.sleep(PUSH_SPACING_S)


def _sink(db: psycopg2.extensions.connection, queue: str) -> List[Tuple[str, Any]]:
    """(partition, payload) of every message on ``queue``, in each partition's order."""
    with db.cursor() as cursor:
        cursor.execute("""SELECT p.name, m.payload FROM queen.messages m
                            JOIN queen.partitions p ON p.id = m.partition_id
                            JOIN queen.queues q ON q.id = p.queue_id
                           WHERE q.name = %s ORDER BY p.name, m.created_at, m.id""", (queue,))
        return list(cursor.fetchall())


def _consumed(db: psycopg2.extensions.connection, source: str, query: str) -> int:
    """Messages of ``source`` the query's consumer group (the SDK's ``streams.<queryId>``)
    has acknowledged."""
    with db.cursor() as cursor:
        cursor.execute("""SELECT coalesce(sum(pc.total_consumed), 0)
                            FROM queen.partition_consumers pc
                            JOIN queen.partitions p ON p.id = pc.partition_id
                            JOIN queen.queues q ON q.id = p.queue_id
                           WHERE q.name = %s AND pc.consumer_group = %s""",
                       (source, f"streams.{query}"))
        return int(cursor.fetchone()[0])


def _window_rows(rows: List[Tuple[str, Any]], *fields: str) -> collections.Counter:
    """The sink's window emissions as a multiset of (partition, key, windowStart, fields...)."""
    return collections.Counter(
        (partition, payload["key"], payload["windowStart"], *(payload[f] for f in fields))
        for partition, payload in rows)


def _tumbling_sums(plan: Dict[str, List[Event]]) -> collections.Counter:
    sums: Dict[Tuple[str, str, int], int] = collections.defaultdict(int)
    for partition, events in plan.items():
        for event in events:
            if event["k"] != "closer":
                sums[(partition, event["k"], event["ts"] // 1000 * 1000)] += event["n"]
    return collections.Counter((p, k, ws, total) for (p, k, ws), total in sums.items())


class _Pipeline:
    """A source with events, a sink, and the query name for one SDK pipeline."""

    def __init__(self, http: httpx.Client, plan: Dict[str, List[Event]], lease_time: int = 30):
        self.source, self.sink = unique_name(), unique_name()
        self.name = unique_name("test-stream-")
        configure(http, self.source, leaseTime=lease_time)
        configure(http, self.sink)
        self.plan = plan
        _push_plan(http, self.source, plan)
        self.total = sum(len(events) for events in plan.values())

    def start(self, server: ServerProcess, workers: List[Worker], kind: str,
              **options: Any) -> Worker:
        worker = Worker(server, self.source, self.sink, self.name, kind, **options)
        workers.append(worker)
        return worker

    def wait_for(self, db: psycopg2.extensions.connection, expected_rows: int,
                 workers: List[Worker], within: float = 120.0) -> List[Tuple[str, Any]]:
        """Waits until every event is acknowledged and the sink holds ``expected_rows``
        (or more), lets the workers run on a moment, stops them and returns the sink."""
        def done() -> bool:
            for worker in workers:
                assert worker.process.poll() is None or worker.process.returncode == 0, \
                    worker.output()[-3000:]
            return (_consumed(db, self.source, self.name) >= self.total
                    and len(_sink(db, self.sink)) >= expected_rows)
        try:
            wait_until(done, within, 0.1, "the pipeline's whole output")
        except AssertionError:
            raise AssertionError("\n".join(w.output()[-3000:] for w in workers)) from None
        time.sleep(SETTLE_S)
        for worker in workers:
            if worker.process.poll() is None:
                worker.stop()
        return _sink(db, self.sink)


# -- stateless -------------------------------------------------------------------------------


def test_map_and_filter_deliver_each_kept_event_once_in_order(
        server: ServerProcess, http: httpx.Client, db: psycopg2.extensions.connection,
        workers: List[Worker]):
    plan = _events(partitions=3, per_partition=40)
    pipeline = _Pipeline(http, plan)
    pipeline.start(server, workers, "mapfilter", batch=7)
    expected = [(partition, {"n": e["n"], "tripled": e["n"] * 3})
                for partition, events in sorted(plan.items()) for e in events
                if e["n"] % 2 == 0]
    rows = pipeline.wait_for(db, len(expected), workers)
    assert rows == expected  # each partition's survivors, in source order, to its partition


def test_a_source_fed_by_binary_pushes_is_processed_once(
        server: ServerProcess, http: httpx.Client, db: psycopg2.extensions.connection,
        workers: List[Worker]):
    """A 2.6.0 binary push carries ids its client minted, all of one millisecond and random
    after it: the SDK's (createdAt, id) order of a batch is not the push order, and the
    message it acks as its last may sit anywhere in the delivery. Each event still reaches
    the sink exactly once (in the order the SDK processed each batch)."""
    source, sink, name = unique_name(), unique_name(), unique_name("test-stream-")
    configure(http, source, leaseTime=30)
    configure(http, sink)
    for partition in ("p0", "p1"):
        stamp = v7_id()[:6]  # one millisecond for the whole push, as the client does
        frames = [(stamp + v7_id()[6:], f"{partition}-{n}", json.dumps({"n": n}).encode())
                  for n in range(40)]
        answer = http.post("/api/v1/push", content=framed_body([framed_group(
            source, partition, frames)]), headers={"Content-Type": "application/x-queen-push"})
        assert answer.status_code == 201, answer.text
    worker = Worker(server, source, sink, name, "mapfilter", batch=7, partitions=2)
    workers.append(worker)
    wait_until(lambda: _consumed(db, source, name) >= 80, 60, 0.1, "every event acknowledged")
    time.sleep(SETTLE_S)
    worker.stop()
    expected = [(p, {"n": n, "tripled": 3 * n}) for p in ("p0", "p1") for n in range(0, 40, 2)]
    rows = _sink(db, sink)
    assert collections.Counter(json.dumps(row) for row in rows) == \
        collections.Counter(json.dumps(row) for row in expected)


# -- windows and reducers --------------------------------------------------------------------


def test_key_by_and_tumbling_window_sums_are_exact(
        server: ServerProcess, http: httpx.Client, db: psycopg2.extensions.connection,
        workers: List[Worker]):
    plan = _events(partitions=3, per_partition=60)
    pipeline = _Pipeline(http, plan)
    worker = pipeline.start(server, workers, "tumbling", batch=8)
    expected = _tumbling_sums(plan)
    rows = pipeline.wait_for(db, sum(expected.values()), workers)
    assert _window_rows(rows, "sum") == expected
    assert worker.metrics["errorsTotal"] == 0, worker.metrics


def test_aggregate_over_a_keyed_stream_is_exact(
        server: ServerProcess, http: httpx.Client, db: psycopg2.extensions.connection,
        workers: List[Worker]):
    plan = _events(partitions=2, per_partition=50, keys="xy")
    pipeline = _Pipeline(http, plan)
    pipeline.start(server, workers, "aggregate", batch=9)
    windows: Dict[Tuple[str, str, int], List[int]] = collections.defaultdict(list)
    for partition, events in plan.items():
        for e in events:
            if e["k"] != "closer":
                windows[(partition, e["k"], e["ts"] // 1000 * 1000)].append(e["n"])
    expected = collections.Counter((p, k, ws, len(ns), sum(ns), max(ns))
                                   for (p, k, ws), ns in windows.items())
    rows = pipeline.wait_for(db, sum(expected.values()), workers)
    assert _window_rows(rows, "count", "sum", "max") == expected


def test_sliding_window_sums_are_exact(
        server: ServerProcess, http: httpx.Client, db: psycopg2.extensions.connection,
        workers: List[Worker]):
    plan = _events(partitions=2, per_partition=50, keys="ab", step_ms=70)
    pipeline = _Pipeline(http, plan)
    pipeline.start(server, workers, "sliding", batch=6)
    sums: Dict[Tuple[str, str, int], int] = collections.defaultdict(int)
    for partition, events in plan.items():
        for e in events:
            if e["k"] == "closer":
                continue
            latest = e["ts"] // 1000 * 1000
            for start in (latest, latest - 1000):  # size 2 s, slide 1 s: two windows each
                sums[(partition, e["k"], start)] += e["n"]
    expected = collections.Counter((p, k, ws, total) for (p, k, ws), total in sums.items())
    rows = pipeline.wait_for(db, sum(expected.values()), workers)
    assert _window_rows(rows, "sum") == expected
    assert all(payload["windowEnd"] - payload["windowStart"] == 2000 for _, payload in rows)


def test_session_windows_close_on_gaps_and_their_sums_are_exact(
        server: ServerProcess, http: httpx.Client, db: psycopg2.extensions.connection,
        workers: List[Worker]):
    # per key, bursts separated by more than the 1 s gap
    bursts = {"a": [[0, 200, 400, 900], [3000, 3500], [7000]],
              "b": [[100, 1000, 1900], [4000], [5200, 6000, 6900]]}
    plan = {}
    for p in range(2):
        events = sorted(({"k": k, "n": i + 10 * p + 1, "ts": BASE_MS + t}
                         for k, burst_list in bursts.items()
                         for i, t in enumerate(t for burst in burst_list for t in burst)),
                        key=lambda e: e["ts"])
        events.append({"k": "closer", "n": 0, "ts": BASE_MS + CLOSER_OFFSET_MS})
        plan[f"p{p}"] = events
    pipeline = _Pipeline(http, plan)
    pipeline.start(server, workers, "session", batch=4)
    expected: collections.Counter = collections.Counter()
    for partition, events in plan.items():
        for key in bursts:
            mine = [e for e in events if e["k"] == key]
            start, total, last = mine[0]["ts"], 0, mine[0]["ts"]
            for e in mine:
                if e["ts"] - last > 1000:
                    expected[(partition, key, start, total)] += 1
                    start, total = e["ts"], 0
                total += e["n"]
                last = e["ts"]
            expected[(partition, key, start, total)] += 1
    assert sum(expected.values()) == 12
    rows = pipeline.wait_for(db, sum(expected.values()), workers)
    assert _window_rows(rows, "sum") == expected


def test_idle_flush_closes_the_windows_of_a_quiet_partition(
        server: ServerProcess, http: httpx.Client, db: psycopg2.extensions.connection,
        workers: List[Worker]):
    # processing time: each event's window is its createdAt's second; nothing arrives after
    # the pushes, so only the idle-flush timer (state/get with ripe_at_or_before) closes them
    plan = {f"p{p}": [{"k": "ab"[i % 2], "n": i + 1, "ts": 0} for i in range(12)]
            for p in range(2)}
    pipeline = _Pipeline(http, plan)
    with db.cursor() as cursor:
        cursor.execute("""SELECT p.name, m.payload->>'k', (m.payload->>'n')::int,
                                 floor(extract(epoch FROM m.created_at) * 1000)::bigint
                            FROM queen.messages m
                            JOIN queen.partitions p ON p.id = m.partition_id
                            JOIN queen.queues q ON q.id = p.queue_id WHERE q.name = %s""",
                       (pipeline.source,))
        sums: Dict[Tuple[str, str, int], int] = collections.defaultdict(int)
        for partition, key, n, created_ms in cursor.fetchall():
            sums[(partition, key, created_ms // 1000 * 1000)] += n
    expected = collections.Counter((p, k, ws, total) for (p, k, ws), total in sums.items())
    pipeline.start(server, workers, "flush", batch=50)
    rows = pipeline.wait_for(db, sum(expected.values()), workers)
    assert _window_rows(rows, "sum") == expected


# -- gate ------------------------------------------------------------------------------------


def test_gate_lets_everything_through_once_in_order_despite_denials(
        server: ServerProcess, http: httpx.Client, db: psycopg2.extensions.connection,
        workers: List[Worker]):
    plan = {f"p{p}": [{"k": "g", "n": i, "ts": BASE_MS + i} for i in range(20)]
            for p in range(2)}
    # a 1 s lease: a denied tail stays leased that long, then comes back in order
    pipeline = _Pipeline(http, plan, lease_time=1)
    worker = pipeline.start(server, workers, "gate", batch=20)
    expected = [(partition, e) for partition, events in sorted(plan.items()) for e in events]
    rows = pipeline.wait_for(db, len(expected), workers)
    assert rows == expected
    assert worker.metrics["gateDenialsTotal"] > 0, worker.metrics


# -- crash and concurrency -------------------------------------------------------------------


def test_a_worker_killed_mid_window_and_restarted_loses_and_doubles_nothing(
        server: ServerProcess, http: httpx.Client, db: psycopg2.extensions.connection,
        workers: List[Worker]):
    plan = _events(partitions=3, per_partition=150, keys="abcd", step_ms=20)
    pipeline = _Pipeline(http, plan, lease_time=2)
    first = pipeline.start(server, workers, "tumbling", delay_ms=8, batch=10, partitions=2)
    wait_until(lambda: _consumed(db, pipeline.source, pipeline.name) >= pipeline.total // 4,
               60, 0.05, "a quarter of the events consumed")
    first.kill()  # mid-window: leases held, a batch half done, nothing told
    consumed = _consumed(db, pipeline.source, pipeline.name)
    assert consumed < pipeline.total, "the worker finished before it could be killed"
    pipeline.start(server, workers, "tumbling", delay_ms=0, batch=10, partitions=2)
    expected = _tumbling_sums(plan)
    rows = pipeline.wait_for(db, sum(expected.values()), workers[1:])
    assert _window_rows(rows, "sum") == expected  # no window lost, none counted twice


def test_two_workers_on_one_query_share_partitions_without_double_processing(
        server: ServerProcess, http: httpx.Client, db: psycopg2.extensions.connection,
        workers: List[Worker]):
    plan = _events(partitions=6, per_partition=50, keys="ab", step_ms=40)
    pipeline = _Pipeline(http, plan)
    for _ in range(2):
        pipeline.start(server, workers, "tumbling", delay_ms=4, batch=10, partitions=2)
    expected = _tumbling_sums(plan)
    rows = pipeline.wait_for(db, sum(expected.values()), workers)
    assert _window_rows(rows, "sum") == expected
    processed = [w.metrics["messagesTotal"] for w in workers]
    assert all(n > 0 for n in processed), processed  # both took partitions
    assert sum(processed) == pipeline.total  # and no message went through both


# -- what the SDK assumes of message ids -------------------------------------------------------


def _sdk_order_key(message: Dict[str, Any]) -> Tuple[int, str]:
    """How the SDK's runner orders a popped batch (queen/streams/runtime/runner.py)."""
    created = datetime.fromisoformat(message["createdAt"].replace("Z", "+00:00"))
    return int(created.timestamp() * 1000), message["id"]


def test_one_push_pops_in_the_order_the_sdk_sorts_it(http: httpx.Client):
    queue = unique_name()
    answer = http.post("/api/v1/push", json={"items": [
        {"queue": queue, "payload": {"n": n}} for n in range(50)]})
    assert answer.status_code == 201
    delivery = http.get(f"/api/v1/pop/queue/{queue}", params={"batch": 50, "wait": "false"})
    messages = delivery.json()["messages"]
    assert [m["data"]["n"] for m in sorted(messages, key=_sdk_order_key)] == list(range(50))
