"""Push formats: JSON vs binary vs compressed push bodies (WIRE2.md 9.1, 9.2), in one run.

    .venv/bin/python bench/push_formats.py [--seconds 6] [--batch 100] [--connections 20]

It starts a private embedded PostgreSQL and one queen-tw server (``twistd queen``), then
measures, each phase on empty tables:

- push msg/s at ``--batch`` items per request for the three bodies of one partition each
  (what a client's ``queue(q).partition(p).push([...])`` sends; ~200-byte payloads, 10
  partitions in turn): JSON, binary (``QPB1`` flag 0, the server mints transaction ids) and
  compressed frames (``QPB1`` flag 8, client-minted v7 ids, as the 2.6.0 client with
  ``push_compression``);
- the full cycle with JSON and with compressed pushes: producers push while consumers pop
  (``wait=true``) and ack each batch (``/ack/batch``); producers pause while more than
  ``--backlog`` messages wait, then stop after ``--seconds`` and the consumers drain the
  queue, so every message counted went through push, pop and ack;
- for every phase the efficiency: messages per CPU-second of the server process and of all
  of PostgreSQL (the postmaster and every backend, exited ones included through the
  postmaster's reaped-children times), read from /proc before and after.

Each phase checks its messages: every ``queued`` answer is a stored row, and in the cycles
every stored message is consumed exactly once. The load generator (this process) shares the
machine, which bounds the rates on a 2-core box; the efficiency figures do not count it.
The report (markdown) is printed and written under ``bench/out/``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List

from harness import running_stack  # first: puts tests/ (binary_bodies) on sys.path

# isort: split
from binary_bodies import framed_body, framed_group, id_text, plain_body, v7_id
from load import (
    PARTITIONS,
    PAYLOAD,
    Connection,
    Recorder,
    consume_worker,
    count_stored,
    empty_queen_tables,
    save_report,
)

from queen_tw.db.embedded import EmbeddedPostgres

from support import ServerProcess

BINARY_TYPE = "application/x-queen-push"
PAYLOAD_BYTES = json.dumps(PAYLOAD, separators=(",", ":")).encode()
FORMATS = ("json", "binary", "compressed")


# --------------------------------------------------------------------------- CPU from /proc


def _stat(pid: int) -> List[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds of ``root`` and every process under it: its own time, the times of the
    children it reaped (exited backends), and the own time of every live descendant."""
    children: Dict[int, List[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                children.setdefault(int(_stat(int(entry.name))[1]), []).append(int(entry.name))
            except (OSError, IndexError):
                continue  # exited while we looked
    fields = _stat(root)
    ticks = sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    stack = list(children.get(root, []))
    while stack:
        pid = stack.pop()
        try:
            ticks += sum(int(f) for f in _stat(pid)[11:13])
        except (OSError, IndexError):
            continue
        stack.extend(children.get(pid, []))
    return ticks / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds spent by the server and by PostgreSQL since :meth:`start`."""

    def __init__(self, server_pid: int, postmaster_pid: int):
        self._pids = {"server": server_pid, "postgres": postmaster_pid}
        self._start: Dict[str, float] = {}

    def start(self) -> None:
        self._start = {name: tree_cpu_seconds(pid) for name, pid in self._pids.items()}

    def spent(self) -> Dict[str, float]:
        return {name: tree_cpu_seconds(pid) - self._start[name]
                for name, pid in self._pids.items()}


# --------------------------------------------------------------------------- bodies


def json_bodies(queue: str, batch: int) -> Callable[[], bytes]:
    bodies = [json.dumps({"items": [{"queue": queue, "partition": f"p{p}", "payload": PAYLOAD}
                                    for _ in range(batch)]}).encode()
              for p in range(PARTITIONS)]
    return _cycling(bodies)


def binary_bodies(queue: str, batch: int) -> Callable[[], bytes]:
    bodies = [plain_body([(queue, f"p{p}", [(None, PAYLOAD_BYTES)] * batch)], flags=0)
              for p in range(PARTITIONS)]
    return _cycling(bodies)


def _cycling(bodies: List[bytes]) -> Callable[[], bytes]:
    turn = iter(range(1 << 62))
    return lambda: bodies[next(turn) % len(bodies)]


def compressed_bodies(queue: str, batch: int, ready: int) -> Callable[[], bytes]:
    """Bodies of fresh messages (each needs ids of its own): ``ready`` are made before the
    measurement starts, any more on demand (counted against the load generator)."""

    def make(n: int) -> bytes:
        ids = [v7_id() for _ in range(batch)]
        # each frame's transactionId is its id's text, as the 2.6.0 client sends it
        return framed_body([framed_group(queue, f"p{n % PARTITIONS}",
                                         [(i, id_text(i), PAYLOAD_BYTES) for i in ids])])

    pool = [make(n) for n in range(ready)]
    made: Iterator[int] = iter(range(1 << 62))

    def next_body() -> bytes:
        n = next(made)
        return pool[n] if n < len(pool) else make(n)

    return next_body


def bodies_for(kind: str, queue: str, batch: int, ready: int) -> Callable[[], bytes]:
    if kind == "json":
        return json_bodies(queue, batch)
    if kind == "binary":
        return binary_bodies(queue, batch)
    return compressed_bodies(queue, batch, ready)


# --------------------------------------------------------------------------- load


class Backlog:
    """Messages pushed (answered queued) against messages consumed."""

    def __init__(self, consumed: Recorder):
        self.queued = 0
        self.consumed = consumed

    def waiting(self) -> int:
        return self.queued - self.consumed.messages


async def producer(port: int, kind: str, next_body: Callable[[], bytes], deadline: float,
                   rec: Recorder, backlog: Backlog | None = None, limit: int = 0) -> None:
    conn = Connection("127.0.0.1", port,
                      content_type=BINARY_TYPE if kind != "json" else "application/json")
    while time.monotonic() < deadline:
        if backlog is not None and backlog.waiting() > limit:
            await asyncio.sleep(0.005)
            continue
        body = next_body()
        started = time.monotonic()
        status, answer = await conn.request("POST", "/api/v1/push", body)
        rec.latencies.append(time.monotonic() - started)
        if status != 201:
            rec.errors += 1
            continue
        queued = answer.count(b'"status":"queued"')
        rec.messages += queued
        if backlog is not None:
            backlog.queued += queued


async def push_phase(args, server: ServerProcess, pg: EmbeddedPostgres, meter: CpuMeter,
                     kind: str) -> Dict:
    empty_queen_tables(pg)
    queue = f"bench-{kind}-{int(time.time())}"
    ready = int(args.expect_rate * args.seconds / args.batch) if kind == "compressed" else 0
    next_body = bodies_for(kind, queue, args.batch, ready)
    rec = Recorder()
    meter.start()
    started = time.monotonic()
    deadline = started + args.seconds
    await asyncio.gather(*(producer(server.port, kind, next_body, deadline, rec)
                           for _ in range(args.connections)))
    elapsed = time.monotonic() - started
    cpu = meter.spent()
    stored = count_stored(pg, queue)
    return _row(f"push {kind}", rec.messages, elapsed, cpu, rec,
                check=f"stored {stored} = queued {rec.messages}: {stored == rec.messages}")


async def cycle_phase(args, server: ServerProcess, pg: EmbeddedPostgres, meter: CpuMeter,
                      kind: str) -> Dict:
    empty_queen_tables(pg)
    queue = f"bench-cycle-{kind}-{int(time.time())}"
    ready = int(args.expect_rate * args.seconds / args.batch / 2) if kind == "compressed" else 0
    next_body = bodies_for(kind, queue, args.batch, ready)
    pushed, consumed, seen = Recorder(), Recorder(), set()
    backlog = Backlog(consumed)
    meter.start()
    started = time.monotonic()
    deadline = started + args.seconds
    await asyncio.gather(
        *(producer(server.port, kind, next_body, deadline, pushed, backlog, args.backlog)
          for _ in range(args.producers)),
        *(consume_worker(server.port, queue, args.batch, deadline, consumed, seen)
          for _ in range(args.consumers)))
    while consumed.messages < pushed.messages and time.monotonic() < deadline + 60:
        await asyncio.gather(*(consume_worker(server.port, queue, args.batch,
                                              time.monotonic() + 0.5, consumed, seen)
                               for _ in range(args.consumers)))
    elapsed = time.monotonic() - started
    cpu = meter.spent()
    stored = count_stored(pg, queue)
    ok = stored == pushed.messages == len(seen) == consumed.messages
    return _row(f"cycle {kind}", consumed.messages, elapsed, cpu, consumed,
                check=f"stored {stored}, queued {pushed.messages}, consumed once "
                      f"{len(seen)} of {consumed.messages}: {ok}")


def _row(phase: str, messages: int, elapsed: float, cpu: Dict[str, float], rec: Recorder,
         check: str) -> Dict:
    total = cpu["server"] + cpu["postgres"]
    lat = sorted(rec.latencies) or [0.0]
    return {"phase": phase, "messages": messages, "seconds": elapsed,
            "msg_per_s": messages / elapsed, "server_cpu_s": cpu["server"],
            "pg_cpu_s": cpu["postgres"], "msg_per_cpu_s": messages / total if total else 0.0,
            "p50_ms": 1000 * lat[len(lat) // 2], "errors": rec.errors, "check": check}


# --------------------------------------------------------------------------- main


async def measure(args, server: ServerProcess, pg: EmbeddedPostgres) -> List[Dict]:
    assert server.pid is not None and pg.pid is not None
    meter = CpuMeter(server.pid, pg.pid)
    rows = [await push_phase(args, server, pg, meter, kind) for kind in FORMATS]
    rows += [await cycle_phase(args, server, pg, meter, kind) for kind in ("json", "compressed")]
    return rows


def render(args, rows: List[Dict]) -> str:
    lines = [
        "# Push formats (bench/push_formats.py)", "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}, "
        f"Python {platform.python_version()}. Batch {args.batch}, {args.seconds:g} s per "
        f"phase; push phases {args.connections} connections; cycles {args.producers} "
        f"producers + {args.consumers} consumers, backlog <= {args.backlog}.", "",
        "| phase | messages | msg/s | p50 ms | server CPU s | PostgreSQL CPU s "
        "| msg per CPU-s | errors | check |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['phase']} | {r['messages']} | {r['msg_per_s']:,.0f} | "
                     f"{r['p50_ms']:.1f} | {r['server_cpu_s']:.2f} | {r['pg_cpu_s']:.2f} | "
                     f"{r['msg_per_cpu_s']:,.0f} | {r['errors']} | {r['check']} |")
    by = {r["phase"]: r for r in rows}
    lines += ["", "Compressed / JSON push rate: "
              f"{by['push compressed']['msg_per_s'] / by['push json']['msg_per_s']:.2f}x; "
              "binary / JSON: "
              f"{by['push binary']['msg_per_s'] / by['push json']['msg_per_s']:.2f}x. "
              "Full-cycle efficiency (msg per CPU-s, server + PostgreSQL): JSON "
              f"{by['cycle json']['msg_per_cpu_s']:,.0f}, compressed "
              f"{by['cycle compressed']['msg_per_cpu_s']:,.0f}."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--producers", type=int, default=8)
    parser.add_argument("--consumers", type=int, default=16)
    parser.add_argument("--backlog", type=int, default=20_000)
    parser.add_argument("--expect-rate", type=float, default=60_000,
                        help="msg/s the compressed bodies made in advance are sized for")
    parser.add_argument("--env", action="append", default=[],
                        help="extra NAME=VALUE for the server (repeatable)")
    args = parser.parse_args()

    with running_stack("queen-bench-formats-",
                       dict(e.split("=", 1) for e in args.env)) as stack:
        rows = asyncio.run(measure(args, stack.server, stack.pg))
    report = render(args, rows)
    print(report)
    save_report(f"push-formats-{time.strftime('%Y%m%d-%H%M%S')}", report, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
