"""How close ``queen.push_store`` is to the least a row-per-message push can cost PostgreSQL
(issue 20, point 6), with pgbench, in one run.

    .venv/bin/python bench/push_floor.py [--seconds 6] [--batch 100] [--clients 10] [--rounds 2]

It starts a private embedded PostgreSQL and a queen-tw server only to install the queen
schema (the server is stopped before measuring), then pushes ``--batch`` messages per
statement, each pgbench client into a partition of its own (client_id % 10), four ways:

- ``push_store``: today's push SQL alone, as the server calls it (bench/load.py's SQL_PUSH);
- ``insert, 3 indexes``: a bare INSERT of the same columns into a copy of queen.messages with
  its primary key, its dedupe key (partition, transactionId) and its ordering index, payload
  and ids made in SQL (no JSON to read);
- ``insert, 4 indexes``: the same plus the offsets' unique index (partition, seq);
- ``items, 4 indexes``: the payloads and transactionIds read from a JSON array of items, as
  push_store reads them;
- ``locked, 4 indexes``: that, under the partition's row lock, numbered after its last
  offset, deduplicated (ON CONFLICT) and with the partition's counter moved: the least a
  push with queen-tw's guarantees (order, dense offsets, dedupe) has to do.

The figure is PostgreSQL's CPU (the postmaster and every backend, from /proc) per message.
"""

from __future__ import annotations

import json
import time
from typing import Dict, List

from load import PAYLOAD, SQL_PUSH, empty_queen_tables, psql, save_report
from segments_probe import Probe, probe_arguments, schema_probe

PARTITION_ID = "('00000000-0000-0000-0000-0000000000' || lpad(:p::text, 2, '0'))::uuid"

COPY_SCHEMA = """
DROP SCHEMA IF EXISTS bench_floor CASCADE;
CREATE SCHEMA bench_floor;
CREATE TABLE bench_floor.messages (LIKE queen.messages INCLUDING DEFAULTS);
ALTER TABLE bench_floor.messages ADD PRIMARY KEY (id);
CREATE UNIQUE INDEX ON bench_floor.messages (partition_id, transaction_id);
CREATE INDEX ON bench_floor.messages (partition_id, created_at, id);
{offsets_index}
CREATE TABLE bench_floor.partitions (id uuid PRIMARY KEY, last_seq bigint NOT NULL DEFAULT 0);
INSERT INTO bench_floor.partitions
SELECT ('00000000-0000-0000-0000-0000000000' || lpad(p::text, 2, '0'))::uuid
  FROM generate_series(0, 9) p;
CREATE SEQUENCE bench_floor.seq;
"""
OFFSETS_INDEX = "CREATE UNIQUE INDEX ON bench_floor.messages (partition_id, seq);"

BARE_INSERT = """\\set p :client_id % 10
INSERT INTO bench_floor.messages (id, partition_id, transaction_id, payload, created_at, seq)
SELECT gen_random_uuid(), PID, gen_random_uuid()::text, '{payload}'::jsonb, clock_timestamp(),
       nextval('bench_floor.seq')
  FROM generate_series(1, {batch});
"""

ITEMS_INSERT = """\\set p :client_id % 10
INSERT INTO bench_floor.messages (id, partition_id, transaction_id, payload, created_at, seq)
SELECT gen_random_uuid(), PID,
       coalesce(nullif(t.e->>'transactionId', ''), gen_random_uuid()::text),
       t.e->'payload', clock_timestamp(), nextval('bench_floor.seq')
  FROM jsonb_array_elements('{items}'::jsonb) t(e);
"""

LOCKED_INSERT = """\\set p :client_id % 10
BEGIN;
SELECT last_seq AS last FROM bench_floor.partitions WHERE id = PID FOR NO KEY UPDATE \\gset
WITH stored AS (
    INSERT INTO bench_floor.messages (id, partition_id, transaction_id, payload, created_at, seq)
    SELECT gen_random_uuid(), PID,
           coalesce(nullif(t.e->>'transactionId', ''), gen_random_uuid()::text),
           t.e->'payload', clock_timestamp(), :last + t.o
      FROM jsonb_array_elements('{items}'::jsonb) WITH ORDINALITY t(e, o)
    ON CONFLICT (partition_id, transaction_id) DO NOTHING
    RETURNING id)
UPDATE bench_floor.partitions SET last_seq = last_seq + (SELECT count(*) FROM stored)
 WHERE id = PID;
COMMIT;
"""

COUNT_COPY = "SELECT count(*) FROM bench_floor.messages"


def variants(batch: int) -> List[tuple]:
    """(name, offsets index or not, pgbench script) of the four layouts after push_store."""
    payload = json.dumps(PAYLOAD)
    items = json.dumps([{"payload": PAYLOAD} for _ in range(batch)]).replace("'", "''")

    def script(template: str) -> str:
        return (template.replace("PID", PARTITION_ID).replace("{payload}", payload)
                .replace("{items}", items).replace("{batch}", str(batch)))

    return [("insert, 3 indexes", False, script(BARE_INSERT)),
            ("insert, 4 indexes", True, script(BARE_INSERT)),
            ("items, 4 indexes", True, script(ITEMS_INSERT)),
            ("locked, 4 indexes", True, script(LOCKED_INSERT))]


def measure(probe: Probe, batch: int, rounds: int) -> Dict[str, List[float]]:
    """PostgreSQL µs per message of every layout, once per round, rounds interleaved."""
    queue_items = json.dumps([{"queue": "bench-floor", "partition": "PX", "payload": PAYLOAD}
                              for _ in range(batch)]).replace("'", "''")
    figures: Dict[str, List[float]] = {}
    for _ in range(rounds):
        empty_queen_tables(probe.pg)
        row = probe.measure(SQL_PUSH.format(items=queue_items),
                            "SELECT count(*) FROM queen.messages")
        figures.setdefault("push_store", []).append(row["us_per_msg"])
        for name, offsets, script in variants(batch):
            psql(probe.pg, COPY_SCHEMA.format(offsets_index=OFFSETS_INDEX if offsets else ""))
            row = probe.measure(script, COUNT_COPY)
            figures.setdefault(name, []).append(row["us_per_msg"])
    return figures


def render(args, figures: Dict[str, List[float]]) -> str:
    rounds = " / ".join(f"round {n + 1}" for n in range(args.rounds))
    lines = ["# push_store against a bare row-per-message insert (bench/push_floor.py)", "",
             f"Batch {args.batch}, {args.clients} pgbench clients, {args.seconds:g} s per "
             "phase; PostgreSQL CPU µs per message.", "",
             f"| layout | {rounds} |", "|---|---:|"]
    for name, values in figures.items():
        lines.append(f"| {name} | " + " / ".join(f"{v:.1f}" for v in values) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = probe_arguments(__doc__)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with schema_probe("queen-bench-floor-", args) as probe:
        figures = measure(probe, args.batch, args.rounds)
    report = render(args, figures)
    print(report)
    save_report(f"push-floor-{time.strftime('%Y%m%d-%H%M%S')}", report, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
