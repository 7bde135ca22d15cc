"""What storing segments instead of rows would buy (issue 20, point 6): PostgreSQL's CPU per
message for the same work laid out three ways, with pgbench, in one run.

    .venv/bin/python bench/segments_probe.py [--seconds 6] [--batch 100] [--clients 10]

It starts a private embedded PostgreSQL and a queen-tw server only to install the queen
schema (the server is stopped before measuring), then runs, batch by batch, each pgbench
client on a partition of its own (client_id % 10, as the server's fused calls group items):

- ``queen``: today's path, the SQL alone: ``queen.push_store`` for a push, then
  ``queen.pop_batch`` + ``queen.ack_core`` for a consume (the scripts of bench/load.py);
- ``rows``: the floor of one row per message: a bare insert of the same columns into a table
  with the same unique keys and ordering index, and a consume that reads a batch after a
  cursor and moves it (bench/load.py's raw scripts);
- ``segments``: one row per pushed batch and partition: the frames as one bytea, the ids and
  dedupe keys as arrays, numbered under the partition's row lock; a consume reads the next
  segment after the group's offset and commits the offset (an ack as an offset commit);
- ``segments+keys``: the same plus one narrow row per message in a dedupe table keyed by
  (partition, transactionId), which is what exactly-once on a client's transactionId costs
  when duplicates must be found across batches.

The figure is PostgreSQL's CPU (the postmaster and every backend, from /proc) per message,
and messages per PostgreSQL CPU-second. pgbench's own CPU is not counted and there is no
HTTP server: what it bounds is the database's share of a full cycle, the part the issue's
goal (25 000 messages per CPU-second of server plus PostgreSQL) cannot go below.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from typing import Dict, Iterator

from harness import running_stack
from load import (
    PAYLOAD,
    RAW_CONSUME,
    RAW_INSERT,
    RAW_SCHEMA,
    SQL_CONSUME,
    SQL_PUSH,
    EmbeddedPostgres,
    empty_queen_tables,
    pgbench,
    psql,
    save_report,
)
from push_formats import tree_cpu_seconds

PARTITION_ID = "('00000000-0000-0000-0000-0000000000' || lpad(:p::text, 2, '0'))::uuid"

SEGMENT_SCHEMA = """
DROP SCHEMA IF EXISTS bench_seg CASCADE;
CREATE SCHEMA bench_seg;
CREATE TABLE bench_seg.partitions (id uuid PRIMARY KEY, last_seq bigint NOT NULL DEFAULT 0);
CREATE TABLE bench_seg.segments (
    partition_id uuid NOT NULL, first_seq bigint NOT NULL, last_seq bigint NOT NULL,
    created_at timestamptz NOT NULL, ids uuid[] NOT NULL, txids text[] NOT NULL,
    frames bytea NOT NULL, PRIMARY KEY (partition_id, first_seq));
-- frames arrive compressed (zstd) from the client: PostgreSQL should not try again
ALTER TABLE bench_seg.segments ALTER COLUMN frames SET STORAGE EXTERNAL;
CREATE TABLE bench_seg.keys (partition_id uuid NOT NULL, txid text NOT NULL,
    seq bigint NOT NULL, PRIMARY KEY (partition_id, txid));
CREATE TABLE bench_seg.cursors (partition_id uuid PRIMARY KEY,
    offset_seq bigint NOT NULL DEFAULT 0);
INSERT INTO bench_seg.partitions (id)
SELECT ('00000000-0000-0000-0000-0000000000' || lpad(p::text, 2, '0'))::uuid
  FROM generate_series(0, 9) p;
INSERT INTO bench_seg.cursors (partition_id) SELECT id FROM bench_seg.partitions;
CREATE SEQUENCE bench_seg.batch_no;
"""

# One push: the partition's row lock numbers the batch, one segment row holds it. Ids and
# dedupe keys are made in SQL from a batch number (what the server would send as arrays);
# the frames are a constant of the batch's size.
SEGMENT_PUSH = """\\set p :client_id % 10
BEGIN;
UPDATE bench_seg.partitions SET last_seq = last_seq + {batch} WHERE id = PID
RETURNING last_seq - {batch} AS base \\gset
SELECT nextval('bench_seg.batch_no') AS b \\gset
{keys}INSERT INTO bench_seg.segments
    (partition_id, first_seq, last_seq, created_at, ids, txids, frames)
SELECT PID, :base + 1, :base + {batch}, clock_timestamp(),
       array_agg(md5(:b::text || '-' || g)::uuid ORDER BY g),
       array_agg(:b::text || '-' || g ORDER BY g), decode('{frames}', 'hex')
  FROM generate_series(1, {batch}) g;
COMMIT;
"""

SEGMENT_KEYS = """INSERT INTO bench_seg.keys (partition_id, txid, seq)
SELECT PID, :b::text || '-' || g, :base + g FROM generate_series(1, {batch}) g;
"""

# One consume: lock the group's offset, read the next segment after it (the consumer gets
# its frames), commit the offset to the segment's end.
SEGMENT_CONSUME = """\\set p :client_id % 10
BEGIN;
SELECT offset_seq AS o FROM bench_seg.cursors WHERE partition_id = PID FOR UPDATE \\gset
SELECT first_seq, last_seq, ids, txids, frames FROM bench_seg.segments
 WHERE partition_id = PID AND first_seq > :o ORDER BY first_seq LIMIT 1;
UPDATE bench_seg.cursors SET offset_seq = s.last_seq
  FROM (SELECT last_seq FROM bench_seg.segments
         WHERE partition_id = PID AND first_seq > :o ORDER BY first_seq LIMIT 1) s
 WHERE partition_id = PID;
COMMIT;
"""


def segment_push_script(batch: int, keys: bool) -> str:
    frames = (json.dumps(PAYLOAD).encode() * batch).hex()
    key_sql = SEGMENT_KEYS.format(batch=batch) if keys else ""
    script = SEGMENT_PUSH.format(batch=batch, frames=frames, keys=key_sql)
    return script.replace("PID", PARTITION_ID)


class Probe:
    """Runs pgbench scripts on one PostgreSQL and charges each its PostgreSQL CPU."""

    def __init__(self, pg: EmbeddedPostgres, seconds: float, clients: int):
        self.pg, self.seconds, self.clients = pg, seconds, clients

    def backlog(self, script: str) -> None:
        """More of the push just measured, unmeasured, so the consume has enough to read."""
        pgbench(self.pg, script, self.seconds, self.clients)

    def count(self, sql: str) -> int:
        return int(psql(self.pg, sql))

    def measure(self, script: str, counting_sql: str, available: int = 0) -> Dict[str, float]:
        """One pgbench phase; ``counting_sql`` counts the messages it stored or consumed.
        A consume (given the ``available`` backlog) runs half as long, as it is the faster
        side; one that took the whole backlog is flagged: its rate is only a bound."""
        seconds = max(1, self.seconds // 2) if available else self.seconds
        psql(self.pg, "CHECKPOINT")
        before = tree_cpu_seconds(self.pg.pid)
        started = time.monotonic()
        pgbench(self.pg, script, seconds, self.clients)
        elapsed = time.monotonic() - started
        cpu = tree_cpu_seconds(self.pg.pid) - before
        messages = self.count(counting_sql)
        return {"messages": messages, "rate": messages / elapsed, "pg_cpu_s": cpu,
                "us_per_msg": cpu / messages * 1e6 if messages else float("nan"),
                "drained": bool(available) and messages >= available}


Phases = Dict[str, Dict[str, float]]


def layout_queen(probe: Probe, batch: int) -> Phases:
    empty_queen_tables(probe.pg)
    items = json.dumps([{"queue": "bench-seg", "partition": "PX", "payload": PAYLOAD}
                        for _ in range(batch)]).replace("'", "''")
    script = SQL_PUSH.format(items=items)
    push = probe.measure(script, "SELECT count(*) FROM queen.messages")
    probe.backlog(script)
    backlog = probe.count("SELECT count(*) FROM queen.messages")
    psql(probe.pg, "VACUUM ANALYZE queen.messages")
    consume = probe.measure(
        SQL_CONSUME.format(batch=batch).replace("bench-sql-consume", "bench-seg"),
        """SELECT count(*) FROM queen.messages m JOIN queen.partition_consumers c
             ON c.partition_id = m.partition_id WHERE m.seq <= c.cursor_seq""",
        backlog)
    return {"push": push, "consume": consume}


def layout_rows(probe: Probe, batch: int) -> Phases:
    psql(probe.pg, RAW_SCHEMA)
    script = RAW_INSERT.format(payload=json.dumps(PAYLOAD), batch=batch)
    push = probe.measure(script, "SELECT count(*) FROM bench_raw.messages")
    probe.backlog(script)
    backlog = probe.count("SELECT count(*) FROM bench_raw.messages")
    psql(probe.pg, "VACUUM ANALYZE bench_raw.messages")
    consume = probe.measure(
        RAW_CONSUME.format(batch=batch),
        """SELECT count(*) FROM bench_raw.messages m JOIN bench_raw.cursors c
             ON c.partition_id = m.partition_id
          WHERE (m.created_at, m.id) <= (c.cursor_created_at, c.cursor_id)""",
        backlog)
    return {"push": push, "consume": consume}


def layout_segments(probe: Probe, batch: int, keys: bool) -> Phases:
    psql(probe.pg, SEGMENT_SCHEMA)
    script, stored = segment_push_script(batch, keys), \
        "SELECT coalesce(sum(cardinality(ids)), 0) FROM bench_seg.segments"
    push = probe.measure(script, stored)
    probe.backlog(script)
    backlog = probe.count(stored)
    if keys:  # every stored message has its dedupe row
        assert probe.count("SELECT count(*) FROM bench_seg.keys") == backlog
    psql(probe.pg, "VACUUM ANALYZE bench_seg.segments")
    consume = probe.measure(SEGMENT_CONSUME.replace("PID", PARTITION_ID),
                            "SELECT coalesce(sum(offset_seq), 0) FROM bench_seg.cursors",
                            backlog)
    return {"push": push, "consume": consume}


def cycle(row: Phases) -> float:
    """PostgreSQL microseconds of one message's push plus consume."""
    return row["push"]["us_per_msg"] + row["consume"]["us_per_msg"]


def render(args, results: Dict[str, Phases]) -> str:
    lines = [f"Batch {args.batch}, {args.clients} pgbench clients, {args.seconds:g} s a phase, "
             f"~{len(json.dumps(PAYLOAD))}-byte payloads; PostgreSQL CPU from /proc.", "",
             "| layout | push msg/s | push PG µs/msg | consume msg/s | consume PG µs/msg "
             "| cycle PG µs/msg | cycle msg per PG CPU-s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, row in results.items():
        push, consume = row["push"], row["consume"]
        bound = " (drained: a bound)" if consume["drained"] else ""
        lines.append(f"| {name} | {push['rate']:,.0f} | {push['us_per_msg']:.1f} "
                     f"| {consume['rate']:,.0f}{bound} | {consume['us_per_msg']:.1f} "
                     f"| {cycle(row):.1f} | {1e6 / cycle(row):,.0f} |")
    return "\n".join(lines) + "\n"


def probe_arguments(doc: str) -> argparse.ArgumentParser:
    """The options every pgbench probe takes (``--seconds``, ``--batch``, ``--clients``)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--clients", type=int, default=10)
    return parser


@contextlib.contextmanager
def schema_probe(prefix: str, args: argparse.Namespace) -> Iterator[Probe]:
    """A :class:`Probe` on a private PostgreSQL holding the queen schema (a server installs
    it and is stopped before anything is measured)."""
    with running_stack(prefix) as stack:
        stack.server.stop()
        yield Probe(stack.pg, args.seconds, args.clients)


def main() -> int:
    args = probe_arguments(__doc__).parse_args()
    with schema_probe("queen-bench-segments-", args) as probe:
        results: Dict[str, Phases] = {
            "queen (today)": layout_queen(probe, args.batch),
            "rows (floor)": layout_rows(probe, args.batch),
            "segments": layout_segments(probe, args.batch, keys=False),
            "segments+keys": layout_segments(probe, args.batch, keys=True),
        }
    report = render(args, results)
    print(report)
    save_report(f"segments-probe-{time.strftime('%Y%m%d-%H%M%S')}", report, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
