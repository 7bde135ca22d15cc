"""Statistics refresh cost at two queue sizes (issue 18 point 4).

    .venv/bin/python bench/stats_refresh.py [--sizes 10000,2000000] [--runs 20] [--before]

It starts a private embedded PostgreSQL, installs the schema and fills it through the real
push function (``queen.push_store``, 1 000 items a call, 10 queues of 10 partitions, small
JSON payloads). At each size it brings the queues to a working state with the real pop
functions: every partition 30 % consumed by its queue-mode cursor (autoAck pops), 10 messages
of each leased, a named group 10 % in, and five dead letters per queue. Then it times
``queen.refresh_stats()`` (what ``POST /api/v1/stats/refresh`` and the STATS_INTERVAL_MS job
run) ``--runs`` times and prints the median and p95.

``--before`` also times the full recount this replaced: ``refresh_stats`` and
``partition_stats`` as of commit 2e1b845 (read with ``git show``), installed beside the
current ones as ``refresh_stats_before`` / ``partition_stats_before`` and run on the same
data (fewer runs at the large size: each one reads every message).

The report (markdown) is printed and written to ``bench/out/``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Dict, List

import psycopg2
from harness import REPO, running_stack

from queen_tw.db.schema import install_schema
from queen_tw.paths import sql_dir

BEFORE_COMMIT = "2e1b845"
QUEUES = 10
PARTITIONS_PER_QUEUE = 10
CHUNK = 1000

FILL = """
    SELECT length(queen.push_store((
        SELECT jsonb_agg(jsonb_build_object(
                   'queue', 'bench-stats-' || (g %% {queues}),
                   'partition', 'p' || ((g / {queues}) %% {parts}),
                   'transactionId', 'tx' || g,
                   'payload', jsonb_build_object('n', g, 'pad', 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx'))
                 ORDER BY g)
          FROM generate_series(%(lo)s, %(hi)s) g))::text)
"""


def _git_show(path: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), "show", f"{BEFORE_COMMIT}:{path}"],
                          check=True, capture_output=True, text=True).stdout


def _function(text: str, name: str) -> str:
    """One CREATE FUNCTION statement of a SQL file, by name."""
    match = re.search(rf"CREATE OR REPLACE FUNCTION queen\.{name}\(.*?\n\$\$;\n", text, re.S)
    if match is None:
        raise RuntimeError(f"{name} not found at {BEFORE_COMMIT}")
    return match.group(0)


def install_before(cursor) -> None:
    """The recount as it was at BEFORE_COMMIT, under names of its own."""
    partition_stats = _function(_git_show("sql/functions/005_admin.sql"), "partition_stats")
    refresh = _function(_git_show("sql/functions/022_stats_resources.sql"), "refresh_stats")
    for text in (partition_stats, refresh):
        cursor.execute(text.replace("queen.partition_stats(", "queen.partition_stats_before(")
                           .replace("queen.refresh_stats(", "queen.refresh_stats_before("))


def fill(cursor, start: int, end: int) -> float:
    """Pushes messages start..end-1 through queen.push_store; returns the seconds it took."""
    began = time.perf_counter()
    for lo in range(start, end, CHUNK):
        hi = min(lo + CHUNK, end) - 1
        cursor.execute(FILL.format(queues=QUEUES, parts=PARTITIONS_PER_QUEUE),
                       {"lo": lo, "hi": hi})
    return time.perf_counter() - began


def bring_to_working_state(cursor) -> None:
    """Queue-mode cursors at 30 % of every partition, 10 leased messages each, a named group
    at 10 %, five dead letters per queue: all through the real pop and DLQ functions."""
    cursor.execute("UPDATE queen.partition_consumers SET lease_id = NULL, lease_expires_at = NULL")
    cursor.execute("""
        SELECT qu.name, p.name, p.message_count,
               coalesce((SELECT pc.total_consumed FROM queen.partition_consumers pc
                          WHERE pc.partition_id = p.id
                            AND pc.consumer_group = '__QUEUE_MODE__'), 0),
               coalesce((SELECT pc.total_consumed FROM queen.partition_consumers pc
                          WHERE pc.partition_id = p.id AND pc.consumer_group = 'reporting'), 0)
          FROM queen.partitions p JOIN queen.queues qu ON qu.id = p.queue_id
         WHERE qu.name LIKE 'bench-stats-%%'""")
    for queue, partition, stored, queue_mode, named in cursor.fetchall():
        requests = []
        if int(stored * 0.3) > queue_mode:
            requests.append({"queue": queue, "partition": partition, "autoAck": True,
                             "batch": int(stored * 0.3) - queue_mode})
        if int(stored * 0.1) > named:
            requests.append({"queue": queue, "partition": partition, "autoAck": True,
                             "consumerGroup": "reporting", "batch": int(stored * 0.1) - named})
        requests.append({"queue": queue, "partition": partition, "batch": 10})
        cursor.execute("SELECT count(*) FROM queen.pop_batch(%s::jsonb)", (json.dumps(requests),))
    cursor.execute("""
        SELECT queen.dead_letter_message(m.partition_id, m.transaction_id, 'reporting', 'bench')
          FROM queen.queues qu
          CROSS JOIN LATERAL (SELECT m.partition_id, m.transaction_id
                                FROM queen.partitions p
                                JOIN queen.messages m ON m.partition_id = p.id
                               WHERE p.queue_id = qu.id
                               ORDER BY m.created_at DESC LIMIT 5) m
         WHERE qu.name LIKE 'bench-stats-%%'""")
    cursor.execute("VACUUM ANALYZE")


def time_calls(cursor, sql: str, runs: int) -> List[float]:
    """Milliseconds of each of ``runs`` calls, measured from the client."""
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        cursor.execute(sql)
        cursor.fetchall()
        times.append((time.perf_counter() - began) * 1000)
    return times


def p95(values: List[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,2000000",
                        help="comma list of stored-message counts, ascending")
    parser.add_argument("--runs", type=int, default=20, help="refreshes timed at each size")
    parser.add_argument("--before", action="store_true",
                        help=f"also time the full recount of {BEFORE_COMMIT}")
    parser.add_argument("--before-runs-large", type=int, default=5,
                        help="runs of the old recount at sizes above 100 000")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    rows: List[Dict[str, object]] = []
    with running_stack("queen-bench-stats-", with_server=False) as stack:
        install_schema(stack.pg.dsn, sql_dir())
        connection = psycopg2.connect(stack.pg.dsn)
        connection.autocommit = True
        with connection.cursor() as cursor:
            if args.before:
                install_before(cursor)
            stored = 0
            for size in sizes:
                seconds = fill(cursor, stored, size)
                print(f"filled {stored} -> {size} messages in {seconds:.0f} s", flush=True)
                stored = size
                bring_to_working_state(cursor)
                cursor.execute("SELECT queen.refresh_stats()")  # warm caches, first snapshot
                after = time_calls(cursor, "SELECT queen.refresh_stats()", args.runs)
                rows.append({"size": size, "function": "refresh_stats (positions)",
                             "runs": len(after), "median": statistics.median(after),
                             "p95": p95(after)})
                print(rows[-1], flush=True)
                if args.before:
                    runs = args.runs if size <= 100_000 else args.before_runs_large
                    before = time_calls(cursor, "SELECT queen.refresh_stats_before()", runs)
                    rows.append({"size": size, "function": f"full recount ({BEFORE_COMMIT})",
                                 "runs": len(before), "median": statistics.median(before),
                                 "p95": p95(before)})
                    print(rows[-1], flush=True)
        connection.close()

    report = render(args, rows)
    print(report)
    out = REPO / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / f"stats-refresh-{time.strftime('%Y%m%d-%H%M%S')}.md").write_text(report)
    return 0


def render(args, rows: List[Dict[str, object]]) -> str:
    lines = [
        f"Machine: {platform.node()} · {os.cpu_count()} cores · Python "
        f"{platform.python_version()} · {time.strftime('%Y-%m-%d %H:%M')}",
        f"Command: `.venv/bin/python bench/stats_refresh.py --sizes {args.sizes} "
        f"--runs {args.runs}{' --before' if args.before else ''}`",
        f"Layout: {QUEUES} queues x {PARTITIONS_PER_QUEUE} partitions; queue-mode cursors at "
        "30 %, 10 leased per partition, a named group at 10 %, 5 dead letters per queue.",
        "",
        "| stored messages | function | runs | median ms | p95 ms |",
        "|---:|---|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(f"| {row['size']:,} | {row['function']} | {row['runs']} | "
                     f"{row['median']:.1f} | {row['p95']:.1f} |".replace(",", " "))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
