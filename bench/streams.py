"""Streams throughput: the official SDK's keyBy + tumbling-window pipeline (issue 19).

    .venv/bin/python bench/streams.py [--events 100000] [--partitions 8] [--keys 16]
                                      [--batch 500] [--max-partitions 4] [--workers 1]

Starts a private embedded PostgreSQL and a queen-tw server, pushes ``--events`` events over
``--partitions`` partitions of a source queue (each with a key out of ``--keys`` and an event
time 10 ms after the previous one of its partition; a 1 s tumbling window holds 100 events of
a partition), then runs ``--workers`` SDK runners (``queen.streams`` of queen-mq 0.15.0, in
this process) of

    Stream.from_(source).key_by(k).window_tumbling(seconds=1, event_time=ts, idle_flush_ms=0)
          .reduce(sum of n, 0).to(sink)

until every event is acknowledged. Reports events/s over the run, the latency of the SDK's
``/streams/v1/cycle`` commits and ``/streams/v1/state/get`` reads (p50/p99/max, as the SDK
sees them), and checks every window sum on the sink against what was pushed. The source is
vacuumed between the prefill and the run, so both prefills below start the run alike.

The prefill pushes 1000 events per request (ids of one push sort in push order, as the SDK's
batch order needs); ``--spaced-prefill`` pushes one event per request instead, each
partition's 1.1 ms apart (slow to prefill), as the SDK tests do.

Prints a markdown report and writes it to ``bench/out/streams.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Dict, List, Tuple

import httpx
import psycopg2
from harness import QUIET_SERVER_ENV, running_stack
from load import Connection, save_report

BASE_MS = 1_700_000_000_000
STEP_MS = 10
PUSH_SPACING_S = 0.0011


def plan_events(events: int, partitions: int, keys: int) -> Dict[str, List[Dict[str, Any]]]:
    """Per partition: its events in time order, then a closer far in the future."""
    plan: Dict[str, List[Dict[str, Any]]] = {}
    per_partition = events // partitions
    for p in range(partitions):
        plan[f"p{p}"] = [{"k": f"k{(i * 7 + p) % keys}", "n": (i * 13 + p) % 97 + 1,
                          "ts": BASE_MS + i * STEP_MS} for i in range(per_partition)]
        plan[f"p{p}"].append({"k": "closer", "n": 0,
                              "ts": BASE_MS + (per_partition + 1000) * STEP_MS})
    return plan


def expected_sums(plan: Dict[str, List[Dict[str, Any]]]) -> collections.Counter:
    sums: Dict[Tuple[str, str, int], int] = collections.defaultdict(int)
    for partition, events in plan.items():
        for event in events:
            if event["k"] != "closer":
                sums[(partition, event["k"], event["ts"] // 1000 * 1000)] += event["n"]
    return collections.Counter((p, k, ws, s) for (p, k, ws), s in sums.items())


async def prefill(port: int, queue: str, plan: Dict[str, List[Dict[str, Any]]],
                  spaced: bool) -> float:
    """Pushes every event (one keep-alive connection per partition); returns the seconds."""
    started = time.monotonic()
    per_request = 1 if spaced else 1000

    async def one_partition(partition: str, events: List[Dict[str, Any]]) -> None:
        connection = Connection("127.0.0.1", port)
        for start in range(0, len(events), per_request):
            status, body = await connection.request("POST", "/api/v1/push", json.dumps(
                {"items": [{"queue": queue, "partition": partition, "payload": event}
                           for event in events[start:start + per_request]]}).encode())
            if status != 201:
                raise RuntimeError(f"push answered {status}: {body[:200]!r}")
            if spaced:
                await asyncio.sleep(PUSH_SPACING_S)
    await asyncio.gather(*(one_partition(p, events) for p, events in plan.items()))
    return time.monotonic() - started


def consumed(dsn: str, source: str, group: str) -> int:
    with psycopg2.connect(dsn) as connection, connection.cursor() as cursor:
        cursor.execute("""SELECT coalesce(sum(pc.total_consumed), 0)
                            FROM queen.partition_consumers pc
                            JOIN queen.partitions p ON p.id = pc.partition_id
                            JOIN queen.queues q ON q.id = p.queue_id
                           WHERE q.name = %s AND pc.consumer_group = %s""", (source, group))
        return int(cursor.fetchone()[0])


def sink_rows(dsn: str, sink: str) -> collections.Counter:
    with psycopg2.connect(dsn) as connection, connection.cursor() as cursor:
        cursor.execute("""SELECT p.name, m.payload FROM queen.messages m
                            JOIN queen.partitions p ON p.id = m.partition_id
                            JOIN queen.queues q ON q.id = p.queue_id WHERE q.name = %s""",
                       (sink,))
        return collections.Counter((p, payload["key"], payload["windowStart"], payload["sum"])
                                   for p, payload in cursor.fetchall())


def timed(calls: List[float], function):
    """``function`` (a coroutine function) recording each call's seconds in ``calls``."""
    async def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return await function(*args, **kwargs)
        finally:
            calls.append(time.perf_counter() - started)
    return wrapper


async def run_pipeline(args, url: str, dsn: str, source: str, sink: str, name: str,
                       total: int) -> Dict[str, Any]:
    from queen import Queen, Stream
    from queen.streams.runtime import runner as runner_module

    cycles: List[float] = []
    reads: List[float] = []
    runner_module.commit_cycle = timed(cycles, runner_module.commit_cycle)
    runner_module.get_state = timed(reads, runner_module.get_state)

    def labelled(value, ctx):
        return {"key": ctx["key"], "windowStart": ctx["windowStart"], "sum": value}

    clients = [Queen(url=url) for _ in range(args.workers)]
    errors: List[str] = []
    started = time.monotonic()
    runners = [await (Stream.from_(q.queue(source))
                      .key_by(lambda m: m["data"]["k"])
                      .window_tumbling(seconds=1, event_time=lambda m: m["data"]["ts"],
                                       idle_flush_ms=0)
                      .reduce(lambda acc, d: acc + d["n"], 0)
                      .map(labelled)
                      .to(q.queue(sink))
                      .run(query_id=name, url=url, batch_size=args.batch,
                           max_partitions=args.max_partitions, max_wait_millis=500,
                           on_error=lambda err, ctx: errors.append(f"{ctx}: {err}")))
               for q in clients]
    group = f"streams.{name}"
    while consumed(dsn, source, group) < total:
        await asyncio.sleep(0.2)
    elapsed = time.monotonic() - started
    for runner in runners:
        await runner.stop()
    for q in clients:
        await q.close()
    metrics = [runner.metrics() for runner in runners]
    return {"elapsed": elapsed, "cycles": cycles, "reads": reads, "errors": errors,
            "metrics": metrics}


def percentiles(values: List[float]) -> Dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {"n": 0, "p50": 0.0, "p99": 0.0, "max": 0.0}
    return {"n": len(ordered), "p50": statistics.median(ordered) * 1000,
            "p99": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000,
            "max": ordered[-1] * 1000}


def render(r: Dict[str, Any]) -> str:
    c, s = r["cycle_ms"], r["state_get_ms"]
    return "\n".join([
        "## Streams: keyBy + tumbling window (bench/streams.py)",
        "",
        f"Machine: {r['machine']}. Command: `{r['command']}`.",
        "",
        f"- events: {r['events']} over {r['partitions']} partitions, {r['keys']} keys, "
        f"batch {r['batch']}, maxPartitions {r['max_partitions']}, {r['workers']} worker(s)",
        f"- processed in {r['elapsed']:.1f} s: **{r['events_per_s']:.0f} events/s** "
        f"({r['prefill_s']:.0f} s to push them first, not counted)",
        f"- cycle commits (`POST /streams/v1/cycle`, as the SDK sees them): {c['n']}, "
        f"p50 {c['p50']:.1f} ms, p99 {c['p99']:.1f} ms, max {c['max']:.1f} ms",
        f"- state reads (`POST /streams/v1/state/get`): {s['n']}, p50 {s['p50']:.1f} ms, "
        f"p99 {s['p99']:.1f} ms",
        f"- window sums on the sink: {r['windows']} windows, exact: **{r['exact']}** "
        f"(SDK errors: {r['errors']})",
        ""])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--keys", type=int, default=16)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--max-partitions", type=int, default=4)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--spaced-prefill", action="store_true",
                        help="push events one by one, each partition's 1.1 ms apart")
    args = parser.parse_args()

    quiet = {**QUIET_SERVER_ENV, "ACCESS_LOG": "false"}
    with running_stack("queen-tw-streams-bench-", quiet) as stack:
        server, dsn = stack.server, stack.dsn
        source, sink, name = "bench-stream-source", "bench-stream-sink", "bench-stream"
        with httpx.Client(base_url=server.url, timeout=30) as http:
            for queue in (source, sink):
                http.post("/api/v1/configure", json={
                    "queue": queue, "options": {"leaseTime": 60}}).raise_for_status()
        plan = plan_events(args.events, args.partitions, args.keys)
        total = sum(len(events) for events in plan.values())
        prefill_s = asyncio.run(prefill(server.port, source, plan, args.spaced_prefill))
        # The same start for both prefills: a bulk load's rows otherwise pay their first
        # visit (hint bits) and autovacuum during the run, a slow prefill's do not.
        connection = psycopg2.connect(dsn)
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute("VACUUM (ANALYZE) queen.messages, queen.partitions")
        connection.close()
        run = asyncio.run(run_pipeline(args, server.url, dsn, source, sink, name, total))
        expected = expected_sums(plan)
        got = sink_rows(dsn, sink)
        result = {
            "machine": f"{platform.node()} ({os.cpu_count()} CPUs, {platform.machine()}, "
                       f"Python {platform.python_version()})",
            "command": "python bench/streams.py " + " ".join(sys.argv[1:]),
            "events": total, "partitions": args.partitions, "keys": args.keys,
            "batch": args.batch, "max_partitions": args.max_partitions,
            "workers": args.workers, "elapsed": run["elapsed"],
            "events_per_s": total / run["elapsed"], "prefill_s": prefill_s,
            "cycle_ms": percentiles(run["cycles"]), "state_get_ms": percentiles(run["reads"]),
            "windows": sum(expected.values()), "exact": got == expected,
            "errors": len(run["errors"])}
        report = render(result)
        print(report)
        save_report("streams", report, result)
        return 0 if result["exact"] else 1


if __name__ == "__main__":
    sys.exit(main())
