"""Pop latency against the number of partitions in a queue (issue #4, DESIGN.md lookup).

    .venv/bin/python bench/pop_scale.py [--partitions 10,1000,10000] [--rounds 300] [--pending 5]

Starts a private embedded PostgreSQL and a queen-tw server. For each partition count N it
creates a queue with N partitions that all hold consumed messages, keeps ``--pending``
partitions with work, and times wildcard pops (``wait=false``; each popped message is then
acked and one new message pushed to a random partition, so the number of partitions with
work stays constant). It also times a pop that finds nothing, and, at the SQL level, the
old candidate query (every partition of the queue joined to its cursor) against the
pending-lookup query the server now uses (EXPLAIN ANALYZE execution time).

Prints a markdown report and writes it to ``bench/out/pop_scale.md``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from typing import Dict, List

import httpx
import psycopg2
from harness import running_stack
from load import save_report

# What pop_request ran before the lookup existed: every partition of the queue.
FULL_SCAN = """
SELECT p.id FROM queen.partitions p
  LEFT JOIN queen.partition_consumers pc
         ON pc.partition_id = p.id AND pc.consumer_group = '__QUEUE_MODE__'
 WHERE p.queue_id = %(queue)s AND p.last_message_id IS NOT NULL
   AND (pc.partition_id IS NULL OR (
            (pc.cursor_created_at, pc.cursor_id) < (p.last_message_at, p.last_message_id)
        AND (pc.lease_id IS NULL OR pc.lease_expires_at <= now())
        AND (pc.retry_after IS NULL OR pc.retry_after <= now())))
 ORDER BY pc.last_served_at NULLS FIRST, p.id
"""

# The candidate query of queen.pop_request (sql/functions/003_pop.sql), for one queue, no
# delay/window.
LOOKUP = """
SELECT pp.partition_id FROM queen.partition_pending pp
  JOIN queen.queues qu ON qu.id = pp.queue_id
  JOIN queen.partitions p ON p.id = pp.partition_id
  LEFT JOIN queen.partition_consumers pc
         ON pc.partition_id = pp.partition_id AND pc.consumer_group = '__QUEUE_MODE__'
 WHERE pp.queue_id = ANY(ARRAY[%(queue)s]::uuid[]) AND pp.consumer_group = '__QUEUE_MODE__'
   AND (pc.partition_id IS NULL OR (
            (pc.cursor_created_at, pc.cursor_id) < (pp.last_message_at, pp.last_message_id)
        AND (pc.lease_id IS NULL OR pc.lease_expires_at <= now())
        AND (pc.retry_after IS NULL OR pc.retry_after <= now())))
 ORDER BY qu.priority DESC, pc.last_served_at NULLS FIRST, pp.partition_id
"""


def percentile(samples: List[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def push(client: httpx.Client, queue: str, partitions: List[int], tag: str) -> None:
    for start in range(0, len(partitions), 1000):
        chunk = partitions[start:start + 1000]
        answer = client.post("/api/v1/push", json={"items": [
            {"queue": queue, "partition": f"p{n}", "payload": {"n": n},
             "transactionId": f"{tag}-{n}"} for n in chunk]})
        answer.raise_for_status()


def drain(client: httpx.Client, queue: str) -> int:
    taken = 0
    while True:
        answer = client.get(f"/api/v1/pop/queue/{queue}", params={
            "wait": "false", "batch": 1000, "partitions": 1000, "autoAck": "true"})
        if answer.status_code == 204:
            return taken
        taken += len(answer.json()["messages"])


def sql_time(dsn: str, sql: str, queue_id: str, repeat: int = 20) -> float:
    """Median EXPLAIN ANALYZE execution time of ``sql`` in ms."""
    with psycopg2.connect(dsn) as connection, connection.cursor() as cursor:
        times = []
        for _ in range(repeat):
            cursor.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, {"queue": queue_id})
            times.append(cursor.fetchone()[0][0]["Execution Time"])
        return statistics.median(times)


def measure(client: httpx.Client, dsn: str, n: int, rounds: int, pending: int) -> Dict:
    queue = f"scale-{n}-{int(time.time())}"
    push(client, queue, list(range(n)), "fill")
    drained = drain(client, queue)
    assert drained == n, (drained, n)
    push(client, queue, random.sample(range(n), pending), "pending")

    pops = []
    for counter in range(1, rounds + 1):
        started = time.perf_counter()
        answer = client.get(f"/api/v1/pop/queue/{queue}", params={"wait": "false"})
        pops.append(1000 * (time.perf_counter() - started))
        assert answer.status_code == 200, "a partition with work must be found"
        message = answer.json()["messages"][0]
        client.post("/api/v1/ack", json={
            "transactionId": message["transactionId"], "partitionId": message["partitionId"],
            "leaseId": message["leaseId"]}).raise_for_status()
        push(client, queue, [random.randrange(n)], f"r{counter}")
    drain(client, queue)

    empties = []
    for _ in range(max(rounds // 3, 20)):
        started = time.perf_counter()
        answer = client.get(f"/api/v1/pop/queue/{queue}", params={"wait": "false"})
        empties.append(1000 * (time.perf_counter() - started))
        assert answer.status_code == 204

    push(client, queue, random.sample(range(n), pending), "explain")
    with psycopg2.connect(dsn) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT id FROM queen.queues WHERE name = %s", (queue,))
        queue_id = cursor.fetchone()[0]
    return {
        "partitions": n, "pending": pending,
        "pop_p50": statistics.median(pops), "pop_p99": percentile(pops, 0.99),
        "empty_p50": statistics.median(empties), "empty_p99": percentile(empties, 0.99),
        "sql_full_scan": sql_time(dsn, FULL_SCAN, queue_id),
        "sql_lookup": sql_time(dsn, LOOKUP, queue_id),
    }


def render(rows: List[Dict], rounds: int) -> str:
    lines = [
        "| partitions | with work | pop p50 ms | pop p99 ms | empty pop p50 ms | empty pop p99 ms "
        "| SQL: old full scan ms | SQL: pending lookup ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['partitions']:,} | {r['pending']} | {r['pop_p50']:.2f} | "
                     f"{r['pop_p99']:.2f} | {r['empty_p50']:.2f} | {r['empty_p99']:.2f} | "
                     f"{r['sql_full_scan']:.3f} | {r['sql_lookup']:.3f} |")
    lines.append("")
    lines.append(f"{rounds} sequential wildcard pops per row (HTTP round trip, `wait=false`, "
                 "one keep-alive connection); SQL columns are median EXPLAIN ANALYZE execution "
                 "times of the candidate query alone.")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--partitions", default="10,1000,10000")
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--pending", type=int, default=5)
    args = parser.parse_args()

    quiet = {"STATS_INTERVAL_MS": "3600000", "RETENTION_INTERVAL": "3600000",
             "LOG_LEVEL": "warn"}  # eviction stays on, as it always did here
    with running_stack("queen-tw-popscale-", quiet) as stack:
        with httpx.Client(base_url=stack.server.url, timeout=60) as client:
            # warm-up: caches, plans, JIT of paths
            measure(client, stack.dsn, 10, 100, args.pending)
            rows = [measure(client, stack.dsn, int(n), args.rounds, args.pending)
                    for n in args.partitions.split(",")]
        report = render(rows, args.rounds)
        print(report)
        save_report("pop_scale", report, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
