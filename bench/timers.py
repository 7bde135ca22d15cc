"""Timer delivery lag with many pending timers (WIRE2.md 3.4).

    .venv/bin/python bench/timers.py [--timers 10000] [--lead-ms 5000] [--span-ms 10000]
                                     [--partitions 20] [--instances 1]

Starts a private embedded PostgreSQL and ``--instances`` servers on it (default settings
otherwise), schedules ``--timers`` timers through ``POST /api/v1/timers`` (256 per call, the
calls spread over the instances) with their due times evenly spread over ``--span-ms``,
starting ``--lead-ms`` from now (so every timer is pending before the first is due), over
``--partitions`` partitions of one queue. Then waits until every timer has fired and reports
the delivery lag of each message: its ``created_at`` (the fire's time, PostgreSQL's clock)
minus the ``deliverAt`` its schedule answered (PostgreSQL's clock too), p50/p99/max; and the
CPU seconds of the servers and of PostgreSQL while they fired. ``--span-ms 0`` makes them all
due at the same instant (the worst burst).

Prints a markdown report and writes it to ``bench/out/timers.md``.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import time
from datetime import datetime
from typing import Any, Dict, List

import httpx
import psycopg2
from harness import QUIET_SERVER_ENV, running_stack
from load import save_report
from wakeup_latency import cpu_seconds, postgres_pids

from queen_tw.db.embedded import EmbeddedPostgres

from support import ServerProcess

CALL_SIZE = 256
QUEUE = "bench-timers"


def schedule_all(urls: List[str], args: argparse.Namespace) -> Dict[str, datetime]:
    """Schedules the timers; returns deliverAt by promised message id."""
    payload = base64.b64encode(json.dumps({"bench": True}).encode()).decode()
    promised: Dict[str, datetime] = {}
    started = time.monotonic()
    clients = [httpx.Client(base_url=url, timeout=60) for url in urls]
    try:
        for call, first in enumerate(range(0, args.timers, CALL_SIZE)):
            elapsed_ms = (time.monotonic() - started) * 1000
            ops = [{"op": "schedule", "queue": QUEUE, "timerKey": f"t{n:06d}",
                    "partition": f"p{n % args.partitions}", "txn": f"txn-{n}",
                    "payload": payload,
                    "delayMs": args.lead_ms - elapsed_ms + args.span_ms * n / args.timers}
                   for n in range(first, min(first + CALL_SIZE, args.timers))]
            answer = clients[call % len(clients)].post("/api/v1/timers",
                                                       json={"operations": ops})
            answer.raise_for_status()
            for result in answer.json()["results"]:
                promised[result["messageId"]] = datetime.fromisoformat(
                    result["deliverAt"].replace("Z", "+00:00"))
    finally:
        for client in clients:
            client.close()
    scheduling_s = time.monotonic() - started
    if scheduling_s * 1000 > args.lead_ms:
        print(f"warning: scheduling took {scheduling_s:.1f} s, longer than the lead",
              file=sys.stderr)
    print(f"scheduled {len(promised)} timers in {scheduling_s:.2f} s", file=sys.stderr)
    return promised


def pending(dsn: str) -> int:
    with psycopg2.connect(dsn) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM queen.timers WHERE queue = %s", (QUEUE,))
        return int(cursor.fetchone()[0])


def fire_times(dsn: str) -> Dict[str, datetime]:
    with psycopg2.connect(dsn) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT m.id::text, m.created_at FROM queen.messages m"
                       "  JOIN queen.partitions p ON p.id = m.partition_id"
                       "  JOIN queen.queues q ON q.id = p.queue_id WHERE q.name = %s",
                       (QUEUE,))
        return dict(cursor.fetchall())


def percentile(values: List[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def measure(args: argparse.Namespace, pg: EmbeddedPostgres, servers: List[ServerProcess],
            dsn: str) -> Dict[str, Any]:
    promised = schedule_all([server.url for server in servers], args)
    pids = [server.process.pid for server in servers if server.process is not None]
    server_cpu, pg_cpu = cpu_seconds(pids), cpu_seconds(postgres_pids(pg))
    deadline = time.monotonic() + (args.lead_ms + args.span_ms) / 1000 + 120
    while pending(dsn) and time.monotonic() < deadline:
        time.sleep(0.2)
    server_cpu, pg_cpu = cpu_seconds(pids) - server_cpu, cpu_seconds(postgres_pids(pg)) - pg_cpu
    fired = fire_times(dsn)
    lags = [(fired[mid] - due).total_seconds() * 1000 for mid, due in promised.items()
            if mid in fired]
    return {"timers": args.timers, "fired": len(lags), "instances": args.instances,
            "lead_ms": args.lead_ms, "span_ms": args.span_ms, "partitions": args.partitions,
            "lag_ms": {"min": min(lags), "p50": statistics.median(lags),
                       "p99": percentile(lags, 0.99), "max": max(lags)},
            "cpu_s": {"servers": round(server_cpu, 2), "postgres": round(pg_cpu, 2)}}


def render(r: Dict[str, Any]) -> str:
    lag = r["lag_ms"]
    return "\n".join([
        "## Timer delivery lag (bench/timers.py)", "",
        f"{r['timers']} timers pending, due over {r['span_ms']} ms starting {r['lead_ms']} ms "
        f"after scheduling began, {r['partitions']} partitions, {r['instances']} "
        "instance(s), default sweeper settings.", "",
        "| fired | lag min | lag p50 | lag p99 | lag max | CPU s servers | CPU s PostgreSQL |",
        "|---|---|---|---|---|---|---|",
        f"| {r['fired']} | {lag['min']:.1f} ms | {lag['p50']:.1f} ms | {lag['p99']:.1f} ms | "
        f"{lag['max']:.1f} ms | {r['cpu_s']['servers']} | {r['cpu_s']['postgres']} |", "",
        "Lag = the message's created_at (the fire) minus the deliverAt the schedule answered, "
        "both PostgreSQL's clock; never negative (\"not before\").",
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--timers", type=int, default=10_000)
    parser.add_argument("--lead-ms", type=int, default=5000)
    parser.add_argument("--span-ms", type=int, default=10_000)
    parser.add_argument("--partitions", type=int, default=20)
    parser.add_argument("--instances", type=int, default=1)
    args = parser.parse_args()

    with running_stack("queen-tw-timers-", with_server=False) as stack:
        for n in range(args.instances):
            stack.start_server(f"server-{n}", QUIET_SERVER_ENV)
        result = measure(args, stack.pg, stack.servers, stack.dsn)
        report = render(result)
        print(report)
        save_report("timers", report, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
