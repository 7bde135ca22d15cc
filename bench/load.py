"""Throughput benchmark: queen-tw against the raw PostgreSQL limit, in one run.

    .venv/bin/python bench/load.py [--seconds 6] [--connections 50] [--batches 1,10,100,1000]

It starts a private embedded PostgreSQL and a queen-tw server (``twistd queen``) on a free
loopback port, then measures on the same machine and the same PostgreSQL:

- push msg/s at each batch size (``--connections`` keep-alive connections, 10 partitions,
  ~200-byte payloads), with p50/p99 request latency;
- pop+ack msg/s at each batch size (long-polling pops, then one ``/ack/batch`` per pop);
- the raw PostgreSQL limit for the same work with pgbench (the same columns, indexes and
  unique key; consuming = receiving a batch after a per-partition cursor and moving it);
- the server's SQL alone (pgbench calling ``queen.push_store``, or ``queen.pop_batch`` then
  ``queen.ack_core``), which splits each gap to raw into PostgreSQL's share and the server's;
- server RSS (peak) and CPU; and it counts messages after each run: every ``queued`` answer
  must be a stored row, and every stored message must be consumed exactly once.

The report (markdown) is printed and written to ``bench/out/``. Figures are noisy on a
2-core machine where the load generator, the server and PostgreSQL share the cores; the
script runs each scenario once per call, so run it a few times and report medians.

JWT authentication (WIRE.md 4):

    .venv/bin/python bench/load.py --jwt            # the run above with auth on
    .venv/bin/python bench/load.py --auth-compare   # push, pop+ack at batch 1, 100: off vs on

With auth on the server gets ``JWT_ENABLED=true`` and an HS256 ``JWT_SECRET``, and every
request carries ``Authorization: Bearer <token>`` (role read-write), one token per run as a
client reuses its token. ``--auth-compare`` runs an auth-off and an auth-on server side by
side on the same PostgreSQL and measures them in turn, batch by batch, for ``--rounds``
rounds whose medians it reports (the order alternates per round), so both see the same
machine; it skips the pgbench parts, which do not depend on auth. Beside throughput it gives
the server's CPU per message, which a machine busy with other work disturbs less, and the
verifier's own cost measured in-process. Before measuring, an auth-on server must refuse a
request without a token: figures of a server that ignores the token would measure nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import jwt
import orjson  # the consumers' JSON: the load generator's CPU comes out of the server's cores
from harness import REPO, running_stack

from queen_tw.db.embedded import EmbeddedPostgres, _pg_install_dir

from support import ServerProcess

PARTITIONS = 10
PAYLOAD = {"data": "x" * 180}  # ~200 bytes of JSON per message


# --------------------------------------------------------------------------- HTTP client


class Connection:
    """A minimal HTTP/1.1 keep-alive client: the load generator must cost little CPU."""

    def __init__(self, host: str, port: int, auth: str = "",
                 content_type: str = "application/json"):
        self._host, self._port = host, port
        self._auth = f"Authorization: {auth}\r\n" if auth else ""
        self._content_type = content_type  # of request bodies (binary pushes: push_formats.py)
        self._reader: Optional[asyncio.StreamReader] = None
        self._writer: Optional[asyncio.StreamWriter] = None

    async def request(self, method: str, path: str, body: Optional[bytes] = None
                      ) -> Tuple[int, bytes]:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self._host, self._port)
        head = f"{method} {path} HTTP/1.1\r\nHost: {self._host}\r\n{self._auth}"
        if body is not None:
            head += f"Content-Type: {self._content_type}\r\nContent-Length: {len(body)}\r\n"
        self._writer.write(head.encode() + b"\r\n" + (body or b""))
        status_line = await self._reader.readline()
        status = int(status_line.split()[1])
        length, chunked = 0, False
        while True:
            line = await self._reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if chunked:
            data = b""
            while True:
                size = int((await self._reader.readline()).strip(), 16)
                chunk = await self._reader.readexactly(size + 2)
                if size == 0:
                    break
                data += chunk[:-2]
            return status, data
        return status, await self._reader.readexactly(length) if length else b""


# --------------------------------------------------------------------------- scenarios


class Recorder:
    def __init__(self):
        self.latencies: List[float] = []
        self.messages = 0
        self.errors = 0
        self.refused = 0

    def summary(self, seconds: float) -> Dict[str, float]:
        lat = sorted(self.latencies) or [0.0]
        return {
            "msg_per_s": self.messages / seconds,
            "req_per_s": len(self.latencies) / seconds,
            "p50_ms": 1000 * lat[len(lat) // 2],
            "p99_ms": 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))],
            "errors": self.errors,
            "messages": self.messages,
            "refused": self.refused,
        }


async def push_worker(port: int, queue: str, batch: int, deadline: float, worker: int,
                      rec: Recorder, auth: str = "") -> None:
    conn = Connection("127.0.0.1", port, auth)
    # The server gives each item its transactionId, so a request body depends only on its
    # first partition: built once, the generator spends its CPU on sending, not on JSON.
    bodies = [json.dumps({"items": [
        {"queue": queue, "partition": f"p{(first + i) % PARTITIONS}", "payload": PAYLOAD}
        for i in range(batch)]}).encode() for first in range(PARTITIONS)]
    n = 0
    while time.monotonic() < deadline:
        body_bytes = bodies[(worker + n) % PARTITIONS]
        n += 1
        started = time.monotonic()
        status, body = await conn.request("POST", "/api/v1/push", body_bytes)
        while status == 503 and time.monotonic() < deadline + 30:
            rec.refused += 1  # back-pressure: retry as the official clients do
            await asyncio.sleep(0.05)
            status, body = await conn.request("POST", "/api/v1/push", body_bytes)
        rec.latencies.append(time.monotonic() - started)
        if status != 201:
            rec.errors += 1
            continue
        queued = body.count(b'"status":"queued"')  # compact JSON: no parse needed
        if queued != batch:  # something else in the answer: count it properly
            queued = sum(1 for r in json.loads(body) if r["status"] == "queued")
        rec.messages += queued
        rec.errors += batch - queued


async def consume_worker(port: int, queue: str, batch: int, deadline: float,
                         rec: Recorder, seen: set, auth: str = "") -> None:
    conn = Connection("127.0.0.1", port, auth)
    path = f"/api/v1/pop/queue/{queue}?batch={batch}&wait=true&timeout=500"
    while time.monotonic() < deadline:
        started = time.monotonic()
        status, body = await conn.request("GET", path)
        if status == 204:
            continue
        if status != 200:
            rec.errors += 1
            continue
        messages = orjson.loads(body)["messages"]
        acks = [{"transactionId": m["transactionId"], "partitionId": m["partitionId"],
                 "leaseId": m["leaseId"], "status": "completed"} for m in messages]
        status, body = await conn.request("POST", "/api/v1/ack/batch",
                                          orjson.dumps({"acknowledgments": acks}))
        rec.latencies.append(time.monotonic() - started)
        ok = status == 200 and all(r["success"] for r in orjson.loads(body))
        if not ok:
            rec.errors += 1
            continue
        for m in messages:
            if m["id"] in seen:
                rec.errors += 1  # a duplicate delivery of an acked message
            seen.add(m["id"])
        rec.messages += len(messages)


async def run_push(port: int, queue: str, batch: int, seconds: float, connections: int,
                   auth: str = "") -> Dict[str, float]:
    rec = Recorder()
    deadline = time.monotonic() + seconds
    started = time.monotonic()
    await asyncio.gather(*(push_worker(port, queue, batch, deadline, w, rec, auth)
                           for w in range(connections)))
    return rec.summary(time.monotonic() - started)


async def run_consume(port: int, queue: str, batch: int, seconds: float, connections: int,
                      auth: str = "") -> Tuple[Dict[str, float], int]:
    rec, seen = Recorder(), set()
    deadline = time.monotonic() + seconds
    started = time.monotonic()
    await asyncio.gather(*(consume_worker(port, queue, batch, deadline, rec, seen, auth)
                           for _ in range(connections)))
    return rec.summary(time.monotonic() - started), len(seen)


async def prefill(port: int, queue: str, total: int, auth: str = "") -> None:
    conn = Connection("127.0.0.1", port, auth)
    for start in range(0, total, 1000):
        items = [{"queue": queue, "partition": f"p{i % PARTITIONS}", "payload": PAYLOAD}
                 for i in range(start, min(total, start + 1000))]
        body = json.dumps({"items": items}).encode()
        status, _ = await conn.request("POST", "/api/v1/push", body)
        assert status == 201


# --------------------------------------------------------------------------- raw PostgreSQL

RAW_SCHEMA = """
DROP SCHEMA IF EXISTS bench_raw CASCADE;
CREATE SCHEMA bench_raw;
CREATE TABLE bench_raw.messages (
    id uuid PRIMARY KEY, partition_id uuid NOT NULL, transaction_id text NOT NULL,
    payload jsonb, trace_id uuid, producer_sub text, is_encrypted boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL, UNIQUE (partition_id, transaction_id));
CREATE INDEX ON bench_raw.messages (partition_id, created_at, id);
CREATE TABLE bench_raw.cursors (partition_id uuid PRIMARY KEY,
    cursor_created_at timestamptz NOT NULL DEFAULT '-infinity',
    cursor_id uuid NOT NULL DEFAULT '00000000-0000-0000-0000-000000000000');
INSERT INTO bench_raw.cursors (partition_id)
SELECT ('00000000-0000-0000-0000-0000000000' || lpad(p::text, 2, '0'))::uuid
  FROM generate_series(0, 9) p;
"""

RAW_INSERT = """\\set p random(0, 9)
INSERT INTO bench_raw.messages (id, partition_id, transaction_id, payload, created_at)
SELECT gen_random_uuid(), ('00000000-0000-0000-0000-0000000000' || lpad(:p::text, 2, '0'))::uuid,
       gen_random_uuid()::text, '{payload}'::jsonb, clock_timestamp()
  FROM generate_series(1, {batch});
"""

# Each pgbench client owns one partition (client_id % 10), so no client waits on another's
# cursor row; the cursor is read first so the batch query runs with constants and walks the
# (partition_id, created_at, id) index in order, as queen-tw's pop does. The batch's rows go
# to the client (a consumer receives its messages), then the cursor moves to the last one.
RAW_CONSUME = """\\set p :client_id % 10
BEGIN;
SELECT cursor_created_at AS cat, cursor_id AS cid FROM bench_raw.cursors
 WHERE partition_id = cu_id() FOR UPDATE \\gset
SELECT m.id, m.transaction_id, m.payload, m.created_at FROM bench_raw.messages m
 WHERE m.partition_id = cu_id() AND (m.created_at, m.id) > (:cat::timestamptz, :cid::uuid)
 ORDER BY m.created_at, m.id LIMIT {batch};
UPDATE bench_raw.cursors cu SET cursor_created_at = last.created_at, cursor_id = last.id
  FROM (SELECT created_at, id FROM (
            SELECT m.created_at, m.id FROM bench_raw.messages m
             WHERE m.partition_id = cu_id()
               AND (m.created_at, m.id) > (:cat::timestamptz, :cid::uuid)
             ORDER BY m.created_at, m.id LIMIT {batch}) b
         ORDER BY created_at DESC, id DESC LIMIT 1) last
 WHERE cu.partition_id = cu_id();
COMMIT;
""".replace("cu_id()", "('00000000-0000-0000-0000-0000000000' || lpad(:p::text, 2, '0'))::uuid")


def psql(pg: EmbeddedPostgres, sql: str) -> str:
    out = subprocess.run([str(_pg_install_dir() / "bin" / "psql"), "-XAtq", "-v", "ON_ERROR_STOP=1",
                          "-h", str(pg.socket_dir), "-p", str(pg.port), "-U", pg.user, pg.database,
                          "-c", sql], capture_output=True, text=True, env=_pg_tool_env())
    if out.returncode != 0:
        raise RuntimeError(f"psql failed on {sql[:60]!r}: {out.stderr.strip()}")
    return out.stdout.strip()


def _pg_tool_env() -> Dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def pgbench(pg: EmbeddedPostgres, script: str, seconds: float, clients: int) -> float:
    """Transactions per second of one pgbench run."""
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        f.write(script)
    os.chmod(f.name, 0o644)
    pgbench = str(_pg_install_dir() / "bin" / "pgbench")
    out = subprocess.run([pgbench, "-n", "-M", "extended", "-f", f.name,
                          "-c", str(clients), "-j", "2", "-T", str(int(seconds)),
                          "-h", str(pg.socket_dir), "-p", str(pg.port), "-U", pg.user, pg.database],
                         capture_output=True, text=True, env=_pg_tool_env())
    if out.returncode != 0:
        raise RuntimeError(f"pgbench failed: {out.stdout[-2000:]} {out.stderr[-2000:]}")
    for line in out.stdout.splitlines():
        if line.startswith("tps = "):
            return float(line.split()[2])
    raise RuntimeError(out.stdout + out.stderr)


def raw_push(pg, batch, seconds, clients) -> float:
    psql(pg, RAW_SCHEMA)
    psql(pg, "CHECKPOINT")
    script = RAW_INSERT.format(payload=json.dumps(PAYLOAD), batch=batch)
    return pgbench(pg, script, seconds, clients) * batch


# The server's push SQL without the server: each pgbench client stores `batch` items in one
# partition of its own (client_id % 10, as the server's fused calls group items by partition)
# with one `queen.push_store` call, so the gap between this and raw is PostgreSQL's share of
# the queue's bookkeeping, and the gap between this and the HTTP figure is the server's.
SQL_PUSH = """\\set p :client_id % 10
SELECT length(queen.push_store(replace('{items}', 'PX', 'p' || :p)::jsonb)::text);
"""


def sql_push(pg, batch, seconds, clients) -> float:
    empty_queen_tables(pg)
    items = json.dumps([{"queue": "bench-sql-push", "partition": "PX", "payload": PAYLOAD}
                        for _ in range(batch)]).replace("'", "''")
    return pgbench(pg, SQL_PUSH.format(items=items), seconds, clients) * batch


# The server's pop and ack SQL without the server: each pgbench client pops `batch` messages
# with one `queen.pop_batch` call and acknowledges them with one `queen.ack_core` call (the
# messages themselves serve as the ack items: ack_core reads their transactionId,
# partitionId and leaseId and takes a missing status as completed). Set against raw
# consume, it says how much of the pop+ack gap is PostgreSQL's work rather than the server's.
SQL_CONSUME = """SELECT coalesce(messages, '[]') AS m
  FROM queen.pop_batch('[{{"queue":"bench-sql-consume","batch":{batch}}}]'::jsonb) \\gset
SELECT length(queen.ack_core(:m::jsonb)::text);
"""


def sql_consume(pg, batch, seconds, clients) -> float:
    empty_queen_tables(pg)
    # pushes of 1 000 items; up to 120 k messages a second of run, since a fast phase of
    # the machine drained a fixed 300 k prefill in 5 s and the figure became a bound
    chunks = min(max(batch * 6, 60), 120 * int(seconds))
    prefill = chunks * 1000
    item = json.dumps({"queue": "bench-sql-consume", "partition": "PX", "payload": PAYLOAD})
    psql(pg, f"""SELECT sum(length(queen.push_store((
                     SELECT jsonb_agg(replace('{item}', 'PX', 'p' || (g % {PARTITIONS}))::jsonb
                                      ORDER BY g)
                       FROM generate_series(c * 1000, c * 1000 + 999) g))::text))
                   FROM generate_series(0, {chunks - 1}) c""")
    psql(pg, "VACUUM ANALYZE queen.messages")
    psql(pg, "CHECKPOINT")
    pgbench(pg, SQL_CONSUME.format(batch=batch), seconds, clients)
    consumed = int(psql(pg, """SELECT count(*) FROM queen.messages m
        JOIN queen.partition_consumers c ON c.partition_id = m.partition_id
        WHERE (m.created_at, m.id) <= (c.cursor_created_at, c.cursor_id)"""))
    return consumed / int(seconds) * (-1 if consumed >= prefill else 1)


def raw_consume(pg, batch, seconds, clients) -> float:
    prefill = min(max(batch * 60_000, 200_000), 2_000_000)  # so a run rarely drains it
    psql(pg, RAW_SCHEMA)
    psql(pg, RAW_INSERT.replace("\\set p random(0, 9)\n", "").replace(":p::text", "(g % 10)::text")
         .replace("generate_series(1, {batch})", f"generate_series(1, {prefill}) g")
         .format(payload=json.dumps(PAYLOAD)))
    psql(pg, "VACUUM ANALYZE bench_raw.messages")
    psql(pg, "CHECKPOINT")
    pgbench(pg, RAW_CONSUME.format(batch=batch), seconds, clients)
    consumed = psql(pg, """SELECT count(*) FROM bench_raw.messages m JOIN bench_raw.cursors c
                             ON c.partition_id = m.partition_id
                          WHERE (m.created_at, m.id) <= (c.cursor_created_at, c.cursor_id)""")
    # When every prefilled row was consumed the true limit is higher: flag it as a bound.
    return int(consumed) / int(seconds) * (-1 if int(consumed) >= prefill else 1)


# --------------------------------------------------------------------------- process stats


class ProcessSampler:
    """Peak RSS and CPU seconds of one process, from /proc."""

    def __init__(self, pid: int):
        self.pid = pid
        self.peak_rss_mb = 0.0
        self._task: Optional[asyncio.Task] = None

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    async def _sample(self):
        while True:
            self.peak_rss_mb = max(self.peak_rss_mb, self.rss_mb())
            await asyncio.sleep(0.25)

    def start(self):
        self._task = asyncio.ensure_future(self._sample())

    def stop(self):
        if self._task:
            self._task.cancel()


# --------------------------------------------------------------------------- main


def count_stored(pg: EmbeddedPostgres, queue: str) -> int:
    return int(psql(pg, f"""SELECT count(*) FROM queen.messages m
        JOIN queen.partitions p ON p.id = m.partition_id
        JOIN queen.queues q ON q.id = p.queue_id WHERE q.name = '{queue}'"""))


def empty_queen_tables(pg: EmbeddedPostgres) -> None:
    """Every scenario starts on empty tables, as every raw pgbench run does (RAW_SCHEMA):
    inserting into indexes grown by the earlier scenarios would cost queen-tw cache misses
    the raw run never pays. Safe mid-run: the server holds no state about past queues that
    a later scenario reads (each uses a queue of its own)."""
    for attempt in range(5):  # the server's background jobs may hold a lock the TRUNCATE needs
        try:
            psql(pg, "SET lock_timeout = '5s'; TRUNCATE queen.queues, queen.messages CASCADE")
            break
        except RuntimeError as err:
            if attempt == 4:
                raise
            print(f"retrying the table reset: {err}", file=sys.stderr)
            time.sleep(1)
    psql(pg, "CHECKPOINT")  # each measured run, raw or not, starts right after a checkpoint


async def measure_batch(args, pg: EmbeddedPostgres, server: ServerProcess,
                        sampler: ProcessSampler, batch: int, auth: str = "") -> List[Dict]:
    """The push row and the pop+ack row of one batch size against one server."""
    rows = []
    empty_queen_tables(pg)
    queue = f"bench-push-{batch}-{int(time.time())}"
    cpu0 = sampler.cpu_seconds()
    push = await run_push(server.port, queue, batch, args.seconds, args.connections, auth)
    push["cpu_pct"] = 100 * (sampler.cpu_seconds() - cpu0) / args.seconds
    stored = count_stored(pg, queue)
    push["stored"] = stored
    push["answered_queued"] = push["messages"]
    rows.append({"op": "push", "batch": batch, **push})

    empty_queen_tables(pg)
    queue = f"bench-consume-{batch}-{int(time.time())}"
    # enough that a run does not drain it (a drained run would understate the rate)
    total = min(max(batch * args.connections * 60, 60_000), 300_000)
    await prefill(server.port, queue, total, auth)
    psql(pg, "VACUUM ANALYZE queen.messages")  # as the raw consume prepares its table
    psql(pg, "CHECKPOINT")
    cpu0 = sampler.cpu_seconds()
    consume, unique = await run_consume(server.port, queue, batch, args.seconds,
                                        args.connections, auth)
    consume["cpu_pct"] = 100 * (sampler.cpu_seconds() - cpu0) / args.seconds
    consume["stored"] = total
    consume["unique_consumed"] = unique
    rows.append({"op": "pop+ack", "batch": batch, **consume})
    return rows


async def measure(args, pg: EmbeddedPostgres, server: ServerProcess, auth: str = ""
                  ) -> List[Dict]:
    rows = []
    sampler = ProcessSampler(server.pid)
    sampler.start()
    if auth:
        await check_auth_is_enforced(server.port, auth)
    for batch in args.batches:
        rows += await measure_batch(args, pg, server, sampler, batch, auth)
    sampler.stop()
    for row in rows:
        row["peak_rss_mb"] = sampler.peak_rss_mb
    return rows


# --------------------------------------------------------------------------- JWT auth


def jwt_env_and_header() -> Tuple[Dict[str, str], str]:
    """Server variables that turn HS256 auth on, and the header value every request sends:
    a read-write token (push, pop and ack need that level) valid for longer than a run."""
    secret = os.urandom(32).hex()
    now = int(time.time())
    token = jwt.encode({"sub": "bench", "username": "bench", "role": "read-write",
                        "iat": now, "exp": now + 6 * 3600}, secret, algorithm="HS256")
    return {"JWT_ENABLED": "true", "JWT_SECRET": secret}, f"Bearer {token}"


async def check_auth_is_enforced(port: int, auth: str) -> None:
    """Refuses to measure an auth-on server that admits a request without a token."""
    path = "/api/v1/resources/queues"
    without, _ = await Connection("127.0.0.1", port).request("GET", path)
    with_token, _ = await Connection("127.0.0.1", port, auth).request("GET", path)
    if without != 401 or with_token != 200:
        raise SystemExit(f"JWT auth is not enforced on port {port}: GET {path} answered "
                         f"{without} without a token and {with_token} with one "
                         "(expected 401 and 200); the figures would not measure auth")


async def measure_auth_pair(args, pg: EmbeddedPostgres, servers: Dict[str, ServerProcess],
                            auth: str) -> Dict[str, List[List[Dict]]]:
    """``args.rounds`` rounds of: each batch size against both servers, in turn (the order
    alternates between rounds so neither always runs on a warmer machine)."""
    samplers = {mode: ProcessSampler(server.pid) for mode, server in servers.items()}
    await check_auth_is_enforced(servers["on"].port, auth)
    rounds: Dict[str, List[List[Dict]]] = {"off": [], "on": []}
    for number in range(args.rounds):
        for mode in rounds:
            rounds[mode].append([])
        for batch in args.batches:
            for mode in (("off", "on") if number % 2 == 0 else ("on", "off")):
                rounds[mode][-1] += await measure_batch(
                    args, pg, servers[mode], samplers[mode], batch, auth if mode == "on" else "")
    return rounds


def _median_row(rows: List[Dict]) -> Dict:
    """One row per figure's median over the rounds (errors are summed: any is a defect)."""
    merged = dict(rows[0])
    for key in ("msg_per_s", "p50_ms", "p99_ms", "cpu_pct"):
        merged[key] = statistics.median(row[key] for row in rows)
    merged["errors"] = sum(row["errors"] for row in rows)
    merged["cpu_us_per_msg"] = statistics.median(
        1e4 * row["cpu_pct"] / row["msg_per_s"] for row in rows if row["msg_per_s"])
    return merged


def verifier_cost_us() -> Tuple[float, float]:
    """In-process cost of the verifier, in µs per request: a token seen before (the cache
    lookup every request of a client pays) and a new HS256 token (a full pyjwt check)."""
    from twisted.internet import defer, task

    from queen_tw.auth.tokens import TokenVerifier

    secret = os.urandom(32).hex()
    clock = task.Clock()
    clock.advance(time.time())
    verifier = TokenVerifier(algorithm="HS256", clock=clock, secret=secret)
    now = int(time.time())
    headers = [b"Bearer " + jwt.encode({"sub": f"u{n}", "role": "read-write", "iat": now,
                                        "exp": now + 600}, secret, algorithm="HS256").encode()
               for n in range(2000)]
    started = time.perf_counter()
    for header in headers:
        defer.ensureDeferred(verifier.verify(header))  # as the gate calls it
    full = (time.perf_counter() - started) / len(headers)
    started = time.perf_counter()
    for _ in range(50):
        for header in headers:
            verifier.cached(header)
    hit = (time.perf_counter() - started) / (50 * len(headers))
    return 1e6 * hit, 1e6 * full


def render_auth(args, rounds: Dict[str, List[List[Dict]]]) -> str:
    """Auth-on against auth-off throughput (medians over the rounds), per operation and
    batch size, with the targets of issue #17 (>= 90 % at batch 100, >= 80 % at batch 1).

    The on/off ratio is the median of each round's own ratio: the two runs of a round are
    back to back, so a slow phase of the machine affects both, where a ratio of medians
    could pair a fast phase with a slow one. Its range over the rounds shows the noise.
    """
    targets = {1: 80, 100: 90}
    rows = {mode: [_median_row(list(same)) for same in zip(*mode_rounds, strict=True)]
            for mode, mode_rounds in rounds.items()}
    paired = [[100 * on["msg_per_s"] / off["msg_per_s"]
               for off, on in zip(off_round, on_round, strict=True)]
              for off_round, on_round in zip(rounds["off"], rounds["on"], strict=True)]
    ratios = [sorted(cell) for cell in zip(*paired, strict=True)]
    hit_us, full_us = verifier_cost_us()
    lines = [
        f"Machine: {platform.node()} · {os.cpu_count()} cores · Python {platform.python_version()}"
        f" · {time.strftime('%Y-%m-%d %H:%M')} · CPython probe (3 M-step loop) "
        f"{cpython_probe_ms():.0f} ms",
        f"Command: `.venv/bin/python bench/load.py --auth-compare --rounds {args.rounds} "
        f"--seconds {args.seconds:g} --connections {args.connections} "
        f"--batches {','.join(map(str, args.batches))}`",
        "",
        f"Medians of {args.rounds} rounds; on/off is the median of the rounds' own ratios.",
        "",
        "| op | batch | auth off msg/s | auth on msg/s | on/off (range) | target | p50 ms off/on "
        "| p99 ms off/on | server CPU µs/msg off/on | errors off/on |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for off, on, cell in zip(rows["off"], rows["on"], ratios, strict=True):
        ratio = statistics.median(cell)
        target = targets.get(off["batch"])
        verdict = f">= {target} % {'met' if ratio >= target else 'MISSED'}" if target else "-"
        lines.append(
            f"| {off['op']} | {off['batch']} | {off['msg_per_s']:.0f} | {on['msg_per_s']:.0f} "
            f"| {ratio:.0f} % ({cell[0]:.0f}-{cell[-1]:.0f}) | {verdict} "
            f"| {off['p50_ms']:.1f} / {on['p50_ms']:.1f} "
            f"| {off['p99_ms']:.1f} / {on['p99_ms']:.1f} "
            f"| {off['cpu_us_per_msg']:.0f} / {on['cpu_us_per_msg']:.0f} "
            f"| {off['errors']} / {on['errors']} |")
    lines += ["", f"The verifier in-process: {hit_us:.2f} µs for a token seen before (the "
              f"cache), {full_us:.1f} µs for a new HS256 token (a full pyjwt check)."]
    return "\n".join(lines) + "\n"


def auth_compare(args) -> int:
    """``--auth-compare``: an auth-off and an auth-on server on one PostgreSQL, measured in
    turn batch by batch."""
    jwt_env, auth = jwt_env_and_header()
    extra = dict(e.split("=", 1) for e in args.env)
    with running_stack("queen-bench-auth-", with_server=False) as stack:
        servers = {"off": stack.start_server("off", extra),
                   "on": stack.start_server("on", {**extra, **jwt_env})}
        rounds = asyncio.run(measure_auth_pair(args, stack.pg, servers, auth))
    report = render_auth(args, rounds)
    print(report)
    save_report(f"load-auth-{time.strftime('%Y%m%d-%H%M%S')}", report, rounds)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--batches", default=None,
                        help="comma list (default 1,10,100,1000; with --auth-compare 1,100)")
    parser.add_argument("--raw-clients", type=int, default=10,
                        help="pgbench clients (the server's pool size by default)")
    parser.add_argument("--env", action="append", default=[],
                        help="extra NAME=VALUE for the server (repeatable)")
    parser.add_argument("--jwt", action="store_true",
                        help="JWT auth on: HS256 secret, a bearer token on every request")
    parser.add_argument("--auth-compare", action="store_true",
                        help="push and pop+ack with auth off and on, side by side (no pgbench)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="with --auth-compare: rounds measured, medians reported")
    args = parser.parse_args()
    default_batches = "1,100" if args.auth_compare else "1,10,100,1000"
    args.batches = [int(b) for b in (args.batches or default_batches).split(",")]
    if args.auth_compare:
        return auth_compare(args)
    jwt_env, auth = jwt_env_and_header() if args.jwt else ({}, "")

    with running_stack("queen-bench-",
                       {**dict(e.split("=", 1) for e in args.env), **jwt_env}) as stack:
        pg = stack.pg
        rows = asyncio.run(measure(args, pg, stack.server, auth))
        raw = {b: (raw_push(pg, b, args.seconds, args.raw_clients),
                   raw_consume(pg, b, args.seconds, args.raw_clients)) for b in args.batches}
        sql = {b: (sql_push(pg, b, args.seconds, args.raw_clients),
                   sql_consume(pg, b, args.seconds, args.raw_clients)) for b in args.batches}

    report = render(args, rows, raw, sql)
    print(report)
    save_report(f"load-{time.strftime('%Y%m%d-%H%M%S')}", report)
    return 0


def save_report(name: str, markdown: str, data: object = None) -> None:
    """Writes a benchmark's report (and its raw figures as JSON) under bench/out/."""
    out = REPO / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / f"{name}.md").write_text(markdown.rstrip("\n") + "\n")
    if data is not None:
        (out / f"{name}.json").write_text(json.dumps(data, indent=2))


def _bounded(rate: float) -> str:
    """A rate; negative means the run drained its prefill, so the true rate is higher."""
    return f"≥ {-rate:.0f}" if rate < 0 else f"{rate:.0f}"


def _bounded_ratio(rate: float, raw_rate: float) -> str:
    """rate / raw_rate, marked as a bound when either run drained its prefill."""
    if rate < 0 and raw_rate < 0:
        return "n/a (both drained)"
    mark = "≥ " if rate < 0 else "≤ " if raw_rate < 0 else ""
    return f"{mark}{100 * abs(rate) / abs(raw_rate):.0f} %"


def cpython_probe_ms() -> float:
    """Milliseconds of a fixed pure-Python loop (best of 3). The machine's speed varies by
    about two during a day, and the server's share of a message is pure CPython: reports
    from different days compare only beside this figure."""
    best = float("inf")
    for _ in range(3):
        started, total = time.perf_counter(), 0
        for i in range(3_000_000):
            total += i
        best = min(best, time.perf_counter() - started)
    return 1000 * best


def render(args, rows, raw, sql) -> str:
    lines = [
        f"Machine: {platform.node()} · {os.cpu_count()} cores · Python {platform.python_version()}"
        f" · {time.strftime('%Y-%m-%d %H:%M')} · CPython probe (3 M-step loop) "
        f"{cpython_probe_ms():.0f} ms",
        f"Command: `.venv/bin/python bench/load.py {'--jwt ' if args.jwt else ''}"
        f"--seconds {args.seconds:g} "
        f"--connections {args.connections} --batches {','.join(map(str, args.batches))}`",
        "",
        "| op | batch | msg/s | req/s | p50 ms | p99 ms | raw PG msg/s | ratio | server CPU % "
        "| errors | 503 retried | counted |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        raw_rate = raw[row["batch"]][0 if row["op"] == "push" else 1]
        bound = "≥ " if raw_rate < 0 else ""  # raw run drained its prefill: a lower bound
        raw_rate = abs(raw_rate)
        if row["op"] == "push":
            counted = f"stored {row['stored']} / answered queued {row['answered_queued']}"
        else:
            counted = f"consumed {row['unique_consumed']} unique of {row['stored']}"
        lines.append(
            f"| {row['op']} | {row['batch']} | {row['msg_per_s']:.0f} | {row['req_per_s']:.0f} "
            f"| {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | {bound}{raw_rate:.0f} "
            f"| {'≤ ' if bound else ''}{100 * row['msg_per_s'] / raw_rate:.0f} % "
            f"| {row['cpu_pct']:.0f} "
            f"| {row['errors']} | {row['refused']} | {counted} |")
    lines += ["", "The server's SQL alone (pgbench calling `queen.push_store`, or "
              "`queen.pop_batch` then `queen.ack_core`; no server; same clients as raw):",
              "", "| op | batch | SQL-only msg/s | raw PG msg/s | ratio |",
              "|---|---:|---:|---:|---:|"]
    for batch, rates in sql.items():
        for op, rate, raw_rate in (("push", rates[0], raw[batch][0]),
                                   ("pop+ack", rates[1], raw[batch][1])):
            lines.append(f"| {op} | {batch} | {_bounded(rate)} | {_bounded(raw_rate)} "
                         f"| {_bounded_ratio(rate, raw_rate)} |")
    lines.append("")
    lines.append(f"Server peak RSS: {rows[0]['peak_rss_mb']:.0f} MB")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
