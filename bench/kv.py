"""KV and lock throughput (WIRE2.md 2, 4): single-op calls of ``POST /api/v1/kv`` and lock
acquire/release round trips of ``POST /api/v1/locks``.

    .venv/bin/python bench/kv.py [--seconds 10] [--connections 4] [--keys 1000]

Starts a private embedded PostgreSQL and one queen-tw server (default settings), fills
``--keys`` keys of 100-byte values, then runs each scenario for ``--seconds`` over
``--connections`` keep-alive connections, each sending one request at a time:

- ``get``: one ``get`` of a random key per call;
- ``put``: one ``put`` (``ttlSeconds`` 600) of a random key per call;
- ``incr``: one ``incr`` of one of 8 counters per call (writers of a counter queue on its lock);
- ``lock``: per iteration an ``acquire`` of the connection's own lock then its ``release``
  (two calls; the figure counts iterations);
- ``lock-contended``: every connection acquires and releases the same lock; an iteration
  counts whether it got the lock or was refused.

Reports calls per second and the latency of each call (p50/p99, client side), and the CPU
seconds the server and PostgreSQL spent per scenario. Prints a markdown report and writes it
to ``bench/out/kv.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import sys
import time
from typing import Any, Awaitable, Callable, Dict, List

from harness import QUIET_SERVER_ENV, running_stack
from load import Connection, save_report
from wakeup_latency import cpu_seconds, postgres_pids

from queen_tw.db.embedded import EmbeddedPostgres

from support import ServerProcess

NS = "bench"
VALUE = {"data": "x" * 88}  # ~100 bytes of JSON

Step = Callable[[Connection, int], Awaitable[int]]  # one iteration; returns calls made


async def _post(connection: Connection, path: str, body: Any) -> Dict[str, Any]:
    status, data = await connection.request("POST", path, json.dumps(body).encode())
    if status != 200:
        raise RuntimeError(f"{path}: {status} {data[:200]!r}")
    return json.loads(data)


def kv_step(make_op: Callable[[int], Dict[str, Any]]) -> Step:
    async def step(connection: Connection, worker: int) -> int:
        await _post(connection, "/api/v1/kv", {"operations": [make_op(worker)]})
        return 1
    return step


def lock_step(name_of: Callable[[int], str]) -> Step:
    async def step(connection: Connection, worker: int) -> int:
        name = name_of(worker)
        [got] = (await _post(connection, "/api/v1/locks", {"operations": [
            {"op": "acquire", "name": name, "ttlSeconds": 30, "owner": f"w{worker}"}]})
        )["results"]
        if not got["acquired"]:
            return 1
        await _post(connection, "/api/v1/locks", {"operations": [
            {"op": "release", "name": name, "token": got["token"]}]})
        return 2
    return step


def scenarios(keys: int) -> Dict[str, Step]:
    return {
        "get": kv_step(lambda w: {"op": "get", "ns": NS, "key": f"k{random.randrange(keys)}"}),
        "put": kv_step(lambda w: {"op": "put", "ns": NS, "key": f"k{random.randrange(keys)}",
                                  "value": VALUE, "ttlSeconds": 600}),
        "incr": kv_step(lambda w: {"op": "incr", "ns": NS, "key": f"c{random.randrange(8)}",
                                   "forever": True}),
        "lock": lock_step(lambda w: f"bench-lock-{w}"),
        "lock-contended": lock_step(lambda w: "bench-lock-shared"),
    }


async def run(port: int, step: Step, seconds: float, connections: int) -> Dict[str, Any]:
    latencies: List[float] = []
    iterations = calls = 0

    async def worker(n: int) -> None:
        nonlocal iterations, calls
        connection = Connection("127.0.0.1", port)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            started = time.perf_counter()
            made = await step(connection, n)
            latencies.append((time.perf_counter() - started) * 1000 / made)
            iterations += 1
            calls += made

    started = time.monotonic()
    await asyncio.gather(*(worker(n) for n in range(connections)))
    elapsed = time.monotonic() - started
    ordered = sorted(latencies)
    return {"iterations_per_s": iterations / elapsed, "calls_per_s": calls / elapsed,
            "p50_ms": statistics.median(ordered),
            "p99_ms": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]}


async def fill(port: int, keys: int) -> None:
    connection = Connection("127.0.0.1", port)
    for first in range(0, keys, 256):
        await _post(connection, "/api/v1/kv", {"operations": [
            {"op": "put", "ns": NS, "key": f"k{n}", "value": VALUE, "ttlSeconds": 600}
            for n in range(first, min(first + 256, keys))]})


def measure(args: argparse.Namespace, pg: EmbeddedPostgres, server: ServerProcess
            ) -> Dict[str, Any]:
    asyncio.run(fill(server.port, args.keys))
    pid = [server.process.pid] if server.process is not None else []
    figures: Dict[str, Any] = {}
    for name, step in scenarios(args.keys).items():
        server_cpu, pg_cpu = cpu_seconds(pid), cpu_seconds(postgres_pids(pg))
        figures[name] = asyncio.run(run(server.port, step, args.seconds, args.connections))
        figures[name]["cpu_s"] = {"server": round(cpu_seconds(pid) - server_cpu, 2),
                                  "postgres": round(cpu_seconds(postgres_pids(pg)) - pg_cpu, 2)}
        print(name, figures[name], file=sys.stderr)
    return {"seconds": args.seconds, "connections": args.connections, "keys": args.keys,
            "machine": f"{platform.machine()}, {platform.system()}, Python "
                       f"{platform.python_version()}", "scenarios": figures}


def render(r: Dict[str, Any]) -> str:
    lines = ["## KV and locks (bench/kv.py)", "",
             f"{r['connections']} keep-alive connections, one request at a time each, "
             f"{r['seconds']} s per scenario, {r['keys']} keys of ~100 bytes; {r['machine']}.",
             "", "| scenario | iterations/s | calls/s | p50 per call | p99 per call "
             "| CPU s server | CPU s PostgreSQL |", "|---|---|---|---|---|---|---|"]
    for name, f in r["scenarios"].items():
        lines.append(f"| {name} | {f['iterations_per_s']:.0f} | {f['calls_per_s']:.0f} | "
                     f"{f['p50_ms']:.2f} ms | {f['p99_ms']:.2f} ms | {f['cpu_s']['server']} | "
                     f"{f['cpu_s']['postgres']} |")
    lines += ["", "lock: acquire + release of a lock of one's own (2 calls per iteration); "
              "lock-contended: one lock for all, an iteration is an acquire, plus the release "
              "when it was granted."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--keys", type=int, default=1000)
    args = parser.parse_args()

    with running_stack("queen-tw-kv-", QUIET_SERVER_ENV) as stack:
        result = measure(args, stack.pg, stack.server)
        report = render(result)
        print(report)
        save_report("kv", report, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
