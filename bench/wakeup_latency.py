"""Long-poll wake-up latency and the cost of idle parked pops (issue #4).

    .venv/bin/python bench/wakeup_latency.py [--waiters 1000] [--queues 100] [--pushes 200]
                                             [--idle-seconds 10] [--instances 1]

Starts a private embedded PostgreSQL (with ``track_functions = pl`` so the database counts
``queen.pop_request`` calls) and parks ``--waiters`` long-poll pops (``wait=true``,
``autoAck=true``, 60 s timeout) spread evenly over ``--queues`` queues, each on its own
keep-alive connection. A delivered pop re-parks at once, so the number stays constant.

1. With the default ``POP_WAIT_*`` settings: for ``--idle-seconds`` nothing is pushed (server
   and PostgreSQL CPU, database pop attempts per second = the fallback re-checks); then one
   message at a time is pushed (50 ms apart) to the queues in turn, measuring push sent →
   message received by a parked pop (p50/p99/max).
2. On a second server whose fallback re-check is slowed to 60 s, the same pushes again, to
   count the database pop attempts a wake-up costs (PostgreSQL publishes function counts
   lazily, so the script waits for them to settle).

With ``--instances N`` (N > 1) it measures the cross-instance wake-up instead (issue #16):
N servers on the one PostgreSQL, synced over loopback UDP (``QUEEN_UDP_PEERS``, a shared
secret), each with the fallback re-check slowed to 60 s so that only a local wake-up or a
peer's datagram can deliver. The ``--waiters`` are spread over the instances, every waiter
of a queue on the same instance (queue q on instance q mod N), and every push goes to
instance 0: a message for a queue parked elsewhere can only arrive through the datagram.
Push → receive latency is reported for those remote deliveries and, for comparison, for
the local ones (the idle and attempts-per-push phases are not run in this mode). Report:
``bench/out/wakeup_latency_cross.md``.

Prints a markdown report and writes it to ``bench/out/wakeup_latency.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

import httpx
import psycopg2
from harness import QUIET_SERVER_ENV, Stack, running_stack
from load import Connection, save_report  # Connection: a minimal keep-alive HTTP client

from queen_tw.db.embedded import EmbeddedPostgres

from support import ServerProcess


def cpu_seconds(pids: List[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def postgres_pids(pg: EmbeddedPostgres) -> List[int]:
    return pg._server_pids()  # the postmaster and its backends


def pop_attempts(dsn: str) -> int:
    with psycopg2.connect(dsn) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_force_next_flush()")
        cursor.execute("SELECT coalesce(sum(calls), 0) FROM pg_stat_user_functions "
                       "WHERE schemaname = 'queen' AND funcname = 'pop_request'")
        return int(cursor.fetchone()[0])


class Waiters:
    """Parked long polls; records when each message arrives, keyed by its payload.

    Waiters of queue number q poll the server on ``ports[q % len(ports)]``.
    """

    def __init__(self, ports: List[int], queues: List[str], count: int):
        self._ports, self._queues, self._count = ports, queues, count
        self.queue = lambda n: queues[n % len(queues)]
        self.port_of = lambda n: ports[n % len(queues) % len(ports)]
        self.received: Dict[str, float] = {}
        self.parked = 0
        self.errors = 0
        self._stop = False
        self._tasks: List[asyncio.Task] = []

    def start(self) -> None:
        self._tasks = [asyncio.ensure_future(self._loop(self.queue(n), self.port_of(n)))
                       for n in range(self._count)]

    async def _loop(self, queue: str, port: int) -> None:
        conn = Connection("127.0.0.1", port)
        path = f"/api/v1/pop/queue/{queue}?wait=true&timeout=60000&autoAck=true"
        while not self._stop:
            self.parked += 1
            status, body = await conn.request("GET", path)
            self.parked -= 1
            now = time.monotonic()
            if status == 200:
                for message in json.loads(body)["messages"]:
                    self.received[message["data"]["tag"]] = now
            elif status != 204:
                self.errors += 1

    def stop(self) -> None:
        self._stop = True
        for task in self._tasks:
            task.cancel()


async def park(args, servers: List[ServerProcess]) -> Waiters:
    queues = [f"wake-{n}" for n in range(args.queues)]
    control = Connection("127.0.0.1", servers[0].port)
    for queue in queues:
        status, _ = await control.request("POST", "/api/v1/configure",
                                          json.dumps({"queue": queue}).encode())
        assert status == 200
    waiters = Waiters([server.port for server in servers], queues, args.waiters)
    waiters.start()
    await asyncio.sleep(3)  # every pop made its first attempt and parked
    return waiters


async def push_one_by_one(args, server: ServerProcess, waiters: Waiters) -> List[float]:
    """Pushes --pushes messages 50 ms apart; returns push→receive latencies in ms."""
    return sorted((await latencies_by_push(args, server, waiters)).values())


async def latencies_by_push(args, server: ServerProcess, waiters: Waiters) -> Dict[int, float]:
    """Pushes --pushes messages 50 ms apart, push n to queue n; returns push→receive
    latency in ms by push number (pushes never received are missing)."""
    control = Connection("127.0.0.1", server.port)
    sent: Dict[str, float] = {}
    for n in range(args.pushes):
        tag = f"m{n}-{server.port}"
        body = json.dumps({"items": [{"queue": waiters.queue(n), "payload": {"tag": tag},
                                      "transactionId": tag}]}).encode()
        sent[tag] = time.monotonic()
        status, _ = await control.request("POST", "/api/v1/push", body)
        assert status == 201
        await asyncio.sleep(0.05)
    deadline = time.monotonic() + 10
    while len(waiters.received) < args.pushes and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return {n: 1000 * (waiters.received[tag] - at)
            for n, (tag, at) in enumerate(sent.items()) if tag in waiters.received}


async def measure_latency_and_idle(args, pg: EmbeddedPostgres, server: ServerProcess,
                                   dsn: str) -> Dict:
    waiters = await park(args, [server])
    attempts_before = pop_attempts(dsn)
    pg_pids = postgres_pids(pg)
    server_cpu, pg_cpu = cpu_seconds([server.pid]), cpu_seconds(pg_pids)
    await asyncio.sleep(args.idle_seconds)
    idle = {
        "server_cpu_pct": 100 * (cpu_seconds([server.pid]) - server_cpu) / args.idle_seconds,
        "pg_cpu_pct": 100 * (cpu_seconds(pg_pids) - pg_cpu) / args.idle_seconds,
        "attempts_per_s": (pop_attempts(dsn) - attempts_before) / args.idle_seconds,
    }
    latencies = await push_one_by_one(args, server, waiters)
    waiters.stop()
    return {
        "waiters": args.waiters, "queues": args.queues, "pushes": args.pushes,
        "delivered": len(latencies), "errors": waiters.errors,
        "p50_ms": statistics.median(latencies),
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "max_ms": latencies[-1], "idle": idle, "idle_seconds": args.idle_seconds,
    }


async def measure_attempts(args, server: ServerProcess, dsn: str) -> float:
    waiters = await park(args, [server])
    await asyncio.sleep(11)  # let idle backends publish their function counts
    before = pop_attempts(dsn)
    latencies = await push_one_by_one(args, server, waiters)
    await asyncio.sleep(11)
    after = pop_attempts(dsn)
    waiters.stop()
    assert len(latencies) == args.pushes
    return (after - before) / args.pushes


def percentiles(latencies: List[float]) -> Dict[str, float]:
    ordered = sorted(latencies)
    if not ordered:
        return {"count": 0, "p50_ms": float("nan"), "p99_ms": float("nan"),
                "max_ms": float("nan")}
    return {"count": len(ordered), "p50_ms": statistics.median(ordered),
            "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
            "max_ms": ordered[-1]}


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def cluster_env(count: int) -> List[Dict[str, str]]:
    """Per-instance environment of a ``count``-instance cluster on loopback UDP."""
    ports = [free_udp_port() for _ in range(count)]
    return [{"QUEEN_UDP_NOTIFY_PORT": str(port),
             "QUEEN_UDP_PEERS": ",".join(f"127.0.0.1:{other}" for other in ports
                                         if other != port),
             "QUEEN_SYNC_SECRET": "bench-secret", "NUM_WORKERS": "1",
             "POP_WAIT_INITIAL_INTERVAL_MS": "60000", "POP_WAIT_MAX_INTERVAL_MS": "60000"}
            for port in ports]


def shared_state(server: ServerProcess) -> Dict:
    return httpx.get(f"{server.url}/api/v1/system/shared-state", timeout=10).json()


def shared_counter(server: ServerProcess, field: str) -> int:
    return int(shared_state(server)["transport"][field])


def wait_peers_alive(servers: List[ServerProcess], ceiling_s: float = 30.0) -> None:
    """Until every instance has heard heartbeats from all the others."""
    deadline = time.monotonic() + ceiling_s
    while not all(shared_state(s)["server_health"]["servers_alive"] == len(servers) - 1
                  for s in servers):
        if time.monotonic() > deadline:
            raise RuntimeError("the instances did not see each other alive")
        time.sleep(0.1)


async def measure_cross_instance(args, servers: List[ServerProcess]) -> Dict:
    """Waiters spread over the instances (a queue's waiters on one instance), pushes on
    instance 0; latencies split into remote (datagram) and local deliveries."""
    waiters = await park(args, servers)
    received_before = [shared_counter(s, "messages_received") for s in servers[1:]]
    by_push = await latencies_by_push(args, servers[0], waiters)
    waiters.stop()
    local_port = servers[0].port
    remote = [ms for n, ms in by_push.items() if waiters.port_of(n) != local_port]
    local = [ms for n, ms in by_push.items() if waiters.port_of(n) == local_port]
    return {
        "instances": len(servers), "waiters": args.waiters, "queues": args.queues,
        "pushes": args.pushes, "delivered": len(by_push), "errors": waiters.errors,
        "remote": percentiles(remote), "local": percentiles(local),
        "datagrams_received_by_peers": sum(
            shared_counter(s, "messages_received") - before
            for s, before in zip(servers[1:], received_before, strict=True)),
    }


def render_cross(r: Dict) -> str:
    rows = []
    for label, key in (("on another instance (peer datagram)", "remote"),
                       ("on the pushing instance (local)", "local")):
        figures = r[key]
        rows.append(f"| {label} | {figures['count']} | {figures['p50_ms']:.1f} ms | "
                    f"{figures['p99_ms']:.1f} ms | {figures['max_ms']:.1f} ms |")
    return "\n".join([
        f"{r['waiters']:,} parked long polls on {r['queues']} queues spread over "
        f"{r['instances']} instances (each queue's waiters on one instance), fallback "
        "re-check at 60 s; every push on instance 0:",
        "",
        "| delivered | pushes | p50 | p99 | max |",
        "|---|---:|---:|---:|---:|",
        *rows,
        "",
        f"{r['pushes']} pushes 50 ms apart, {r['delivered']} delivered, {r['errors']} errors; "
        f"datagrams received by the other instances meanwhile: "
        f"{r['datagrams_received_by_peers']} (heartbeats included).",
    ])


def run_cross_instance(args, stack: Stack) -> None:
    servers = [stack.start_server(f"instance-{n}", dict(QUIET_SERVER_ENV, **sync))
               for n, sync in enumerate(cluster_env(args.instances))]
    wait_peers_alive(servers)
    result = asyncio.run(measure_cross_instance(args, servers))
    report = render_cross(result)
    print(report)
    save_report("wakeup_latency_cross", report, result)


def render(r: Dict) -> str:
    idle = r["idle"]
    return "\n".join([
        f"{r['waiters']:,} parked long polls on {r['queues']} queues "
        f"({r['waiters'] // r['queues']} per queue), default POP_WAIT_* settings:",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| push → parked pop receives it, p50 | {r['p50_ms']:.1f} ms |",
        f"| push → parked pop receives it, p99 | {r['p99_ms']:.1f} ms |",
        f"| push → parked pop receives it, max | {r['max_ms']:.1f} ms |",
        f"| database pop attempts per push (10 pops parked on the queue) | "
        f"{r['attempts_per_push']:.2f} |",
        f"| idle: server CPU | {idle['server_cpu_pct']:.1f} % of one core |",
        f"| idle: PostgreSQL CPU (all backends) | {idle['pg_cpu_pct']:.1f} % of one core |",
        f"| idle: database pop attempts (fallback re-checks) | "
        f"{idle['attempts_per_s']:.0f} /s |",
        "",
        f"{r['pushes']} pushes 50 ms apart, {r['delivered']} delivered, {r['errors']} errors; "
        f"idle figures over {r['idle_seconds']} s.",
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--waiters", type=int, default=1000)
    parser.add_argument("--queues", type=int, default=100)
    parser.add_argument("--pushes", type=int, default=200)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--instances", type=int, default=1,
                        help="more than 1: the cross-instance wake-up of a UDP-synced cluster")
    args = parser.parse_args()

    with running_stack("queen-tw-wakeup-", with_server=False) as stack:
        dsn = stack.dsn
        connection = psycopg2.connect(dsn)
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute("ALTER SYSTEM SET track_functions = 'pl'")
            cursor.execute("SELECT pg_reload_conf()")
        connection.close()
        if args.instances > 1:
            run_cross_instance(args, stack)
            return 0
        server = stack.start_server("server", QUIET_SERVER_ENV)
        result = asyncio.run(measure_latency_and_idle(args, stack.pg, server, dsn))
        server.stop()
        server = stack.start_server("slow-fallback", dict(
            QUIET_SERVER_ENV, POP_WAIT_INITIAL_INTERVAL_MS="60000",
            POP_WAIT_MAX_INTERVAL_MS="60000"))
        result["attempts_per_push"] = asyncio.run(measure_attempts(args, server, dsn))
        report = render(result)
        print(report)
        save_report("wakeup_latency", report, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
