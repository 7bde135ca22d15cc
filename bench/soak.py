"""Soak: mixed push / pop / ack for a long time with a fault every minute, then count.

    .venv/bin/python bench/soak.py [--minutes 10] [--append-results]

Not run by CI (it takes as long as you ask). It starts a private embedded PostgreSQL and one
queen-tw server, then runs for ``--minutes``:

- producers (threads, each owning its partitions) push with recorded transactionIds and
  retry every push that is not acknowledged, as the clients do;
- consumers long-poll any partition of the queue (leaseTime 5 s), record every delivery and
  ack it — except about one delivery in 50, left unacked on purpose as a crashed consumer
  would, so leases expire and messages are redelivered;
- every minute one fault, in turn: PostgreSQL frozen (SIGSTOP) 6 s; PostgreSQL stopped 5 s;
  server SIGKILLed and restarted; server SIGTERMed and restarted; push maintenance 10 s; pop
  maintenance 5 s; buffer disk full 5 s (a small tmpfs on the buffer directory, with push
  maintenance on so pushes need it; skipped where tmpfs cannot be mounted).

Then the producers stop, the consumers drain the queue, and the count says: every push
answered queued/duplicate/buffered delivered (missing must be 0); redeliveries, and whether
each is explained by a lease that expired (an unacked or refused-ack delivery before it);
order of first deliveries within each partition. The summary is printed as JSON and, with
``--append-results``, appended to bench/RESULTS.md under "## Soak".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import httpx  # noqa: E402

from queen_tw.db.embedded import EmbeddedPostgres  # noqa: E402

from faultkit import (  # noqa: E402
    Producers,
    buffer_status,
    health_code,
    private_postgres,
    set_maintenance,
    wait_until,
)
from support import ServerProcess, unique_name  # noqa: E402

LEASE_SECONDS = 5
SKIP_ACK_EVERY = 50

SERVER_ENV = {
    "LIBQUEEN_INFLIGHT_DEADLINE_MS": "3000",
    "QUEEN_CACHE_REFRESH_INTERVAL_MS": "1000",
    "FILE_BUFFER_EVENTS_PER_FILE": "500",
    "LOG_LEVEL": "warn",
}


# -- consumers ----------------------------------------------------------------------------

@dataclass
class Delivery:
    transaction_id: str
    partition: str
    seq: int
    lease_id: str
    at: float
    acked: bool = False


@dataclass
class Deliveries:
    items: list[Delivery] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    pops: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    acks: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def note(self, table: dict[str, int], what: str) -> None:
        with self.lock:
            table[what] += 1


class Consumers:
    """Threads long-polling the queue, acking all but one delivery in SKIP_ACK_EVERY."""

    def __init__(self, url: str, queue: str, threads: int = 4):
        self.url = url
        self.queue = queue
        self.seen = Deliveries()
        self.last_delivery = time.monotonic()
        self._stopping = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True)
                         for n in range(threads)]

    def start(self) -> Consumers:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        for thread in self._threads:
            thread.join(30)

    def _run(self, number: int) -> None:
        rng = random.Random(number)
        with httpx.Client(base_url=self.url, timeout=15) as client:
            while not self._stopping.is_set():
                try:
                    answer = client.get(f"/api/v1/pop/queue/{self.queue}",
                                        params={"batch": 10, "wait": "true", "timeout": 2000})
                except httpx.HTTPError as err:
                    self.seen.note(self.seen.pops, err.__class__.__name__)
                    time.sleep(0.5)
                    continue
                self.seen.note(self.seen.pops, str(answer.status_code))
                if answer.status_code != 200:
                    if answer.status_code >= 500:
                        time.sleep(0.5)
                    continue
                body = answer.json()
                now = time.monotonic()
                self.last_delivery = now
                batch = [Delivery(m["transactionId"], m["partition"], m["data"]["seq"],
                                  body["leaseId"], now) for m in body["messages"]]
                with self.seen.lock:
                    self.seen.items.extend(batch)
                if rng.randrange(SKIP_ACK_EVERY) == 0:
                    self.seen.note(self.seen.acks, "skipped")
                    continue  # a consumer that died: the lease expires, the batch comes back
                self._ack(client, body, batch)

    def _ack(self, client: httpx.Client, body: dict[str, Any], batch: list[Delivery]) -> None:
        acks = [{"transactionId": m["transactionId"], "partitionId": m["partitionId"],
                 "leaseId": body["leaseId"], "status": "completed"} for m in body["messages"]]
        for _ in range(3):
            try:
                answer = client.post("/api/v1/ack/batch", json={"acknowledgments": acks})
            except httpx.HTTPError as err:
                self.seen.note(self.seen.acks, err.__class__.__name__)
                time.sleep(0.5)
                continue
            if answer.status_code == 200:
                results = answer.json()
                for delivery, result in zip(batch, results, strict=False):
                    delivery.acked = bool(result.get("success"))
                self.seen.note(self.seen.acks, "ok" if all(d.acked for d in batch)
                               else "refused")
                return
            self.seen.note(self.seen.acks, str(answer.status_code))
            time.sleep(0.5)


# -- faults -------------------------------------------------------------------------------

class Faults:
    """One fault per call of :meth:`next`, in turn."""

    def __init__(self, postgres: EmbeddedPostgres, server: ServerProcess, tmpfs: bool):
        self.postgres = postgres
        self.server = server
        self.tmpfs = tmpfs
        self.done: list[dict[str, Any]] = []
        self._order = ["freeze", "postgres_restart", "server_sigkill", "server_sigterm",
                       "push_maintenance", "pop_maintenance", "disk_full"]
        self._turn = 0

    def next(self) -> None:
        name = self._order[self._turn % len(self._order)]
        self._turn += 1
        if name == "disk_full" and not self.tmpfs:
            name = "freeze"
        started = time.monotonic()
        getattr(self, name)()
        self.done.append({"fault": name, "seconds": round(time.monotonic() - started, 1)})
        print(f"  fault {name} done in {time.monotonic() - started:.1f}s", flush=True)

    def freeze(self) -> None:
        self.postgres.freeze()
        try:
            time.sleep(6)
        finally:
            self.postgres.thaw()

    def postgres_restart(self) -> None:
        self.postgres.stop()
        time.sleep(5)
        self.postgres.start()

    def server_sigkill(self) -> None:
        self.server.kill()
        self.server.start()

    def server_sigterm(self) -> None:
        self.server.stop(timeout=45)
        self.server.start()

    def push_maintenance(self) -> None:
        set_maintenance(self.server.url, True)
        time.sleep(10)
        set_maintenance(self.server.url, False)

    def pop_maintenance(self) -> None:
        set_maintenance(self.server.url, True, pop=True)
        time.sleep(5)
        set_maintenance(self.server.url, False, pop=True)

    def disk_full(self) -> None:
        set_maintenance(self.server.url, True)
        filler = self.server.buffer_dir / "filler"
        try:
            with contextlib.suppress(OSError), open(filler, "wb", buffering=0) as out:
                while True:
                    out.write(b"\0" * 65536)
            time.sleep(5)
        finally:
            filler.unlink(missing_ok=True)
            set_maintenance(self.server.url, False)


# -- the run ------------------------------------------------------------------------------

def soak(minutes: float) -> dict[str, Any]:
    with private_postgres() as postgres:
        workdir = Path(tempfile.mkdtemp(prefix="queen-tw-soak-"))
        server = ServerProcess(postgres.pg_env(), workdir, SERVER_ENV)
        server.buffer_dir.mkdir(parents=True, exist_ok=True)
        tmpfs = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs",
                                str(server.buffer_dir)], capture_output=True).returncode == 0
        try:
            server.start()
            return _run(postgres, server, tmpfs, minutes)
        finally:
            server.stop()
            if tmpfs:
                subprocess.run(["umount", "-l", str(server.buffer_dir)], capture_output=True)
            shutil.rmtree(workdir, ignore_errors=True)


def _run(postgres: EmbeddedPostgres, server: ServerProcess, tmpfs: bool,
         minutes: float) -> dict[str, Any]:
    queue = unique_name("soak-")
    httpx.post(f"{server.url}/api/v1/configure",
               json={"queue": queue, "options": {"leaseTime": LEASE_SECONDS, "retryLimit": 100}},
               timeout=10)
    producers = Producers(server.url, queue, threads=4, partitions_each=2, batch=2,
                          pause=0.05, limit=10 ** 9, give_up_after=120).start()
    consumers = Consumers(server.url, queue).start()
    faults = Faults(postgres, server, tmpfs)
    started = time.monotonic()
    end = started + minutes * 60
    next_fault = started + 30
    while time.monotonic() < end:
        if time.monotonic() >= next_fault:
            faults.next()
            next_fault += 60
        time.sleep(1)
        elapsed = time.monotonic() - started
        if int(elapsed) % 30 == 0:
            print(f"  {elapsed:.0f}s: sent {producers.sent_count()}, "
                  f"delivered {len(consumers.seen.items)}", flush=True)
    ledger = producers.stop(timeout=180)
    wait_until(lambda: health_code(server.url) == 200, 60, message="healthy at the end")
    wait_until(lambda: (buffer_status(server.url) or {}).get("pending") == 0, 120, 0.5,
               message="buffer drained")
    acknowledged = {s.transaction_id for s in ledger.acknowledged}
    # the consumers go on until every acknowledged message was delivered and 15 s passed
    # without any delivery (redeliveries of skipped acks included)
    wait_until(lambda: acknowledged <= {d.transaction_id for d in consumers.seen.items}
               and time.monotonic() - consumers.last_delivery > LEASE_SECONDS * 3,
               300, 1.0, message="every acknowledged message delivered")
    consumers.stop()
    return _count(ledger, consumers.seen, faults.done, minutes, producers.errors)


def _count(ledger, seen: Deliveries, faults: list[dict[str, Any]], minutes: float,
           producer_errors: list[str]) -> dict[str, Any]:
    by_tid: dict[str, list[Delivery]] = defaultdict(list)
    for delivery in sorted(seen.items, key=lambda d: d.at):
        by_tid[delivery.transaction_id].append(delivery)
    acknowledged = ledger.acknowledged
    missing = [s.transaction_id for s in acknowledged if s.transaction_id not in by_tid]
    redelivered = explained = 0
    for deliveries in by_tid.values():
        for earlier in deliveries[:-1]:
            redelivered += 1
            if not earlier.acked:  # never acked, or the ack came too late (lease expired)
                explained += 1
    out_of_order = 0
    firsts: dict[str, list[Delivery]] = defaultdict(list)
    for deliveries in by_tid.values():
        firsts[deliveries[0].partition].append(deliveries[0])
    for partition_firsts in firsts.values():
        seqs = [d.seq for d in sorted(partition_firsts, key=lambda d: d.at)]
        out_of_order += sum(1 for a, b in zip(seqs, seqs[1:], strict=False) if b < a)
    return {
        "minutes": minutes, "faults": faults,
        "pushed": len(ledger.sent), "acknowledged": len(acknowledged),
        "answered_buffered": sum("buffered" in s.statuses for s in ledger.sent.values()),
        "push_answers": dict(ledger.answers),
        "deliveries": len(seen.items), "distinct_delivered": len(by_tid),
        "missing": len(missing), "redelivered": redelivered,
        "redelivered_after_lease_expiry": explained,
        "redelivered_unexplained": redelivered - explained,
        "first_delivery_out_of_order": out_of_order,
        "pop_answers": dict(seen.pops), "ack_outcomes": dict(seen.acks),
        "producer_errors": producer_errors[:5],
    }


def _markdown(summary: dict[str, Any]) -> str:
    faults = ", ".join(f"{f['fault']} ({f['seconds']} s)" for f in summary["faults"])
    return "\n".join([
        "", "## Soak", "",
        f"`bench/soak.py --minutes {summary['minutes']:g}` on {platform.node()} "
        f"({time.strftime('%Y-%m-%d')}): 4 producers × 2 partitions, 4 long-polling "
        f"consumers (batch 10, leaseTime {LEASE_SECONDS} s, one batch in {SKIP_ACK_EVERY} "
        "left unacked on purpose), one fault a minute.", "",
        f"Faults, in order: {faults}.", "",
        "| count | value |", "|---|---|",
        f"| messages pushed | {summary['pushed']} |",
        f"| acknowledged (queued/duplicate/buffered) | {summary['acknowledged']} |",
        f"| of which answered `buffered` | {summary['answered_buffered']} |",
        f"| **acknowledged but never delivered** | **{summary['missing']}** |",
        f"| deliveries / distinct messages | {summary['deliveries']} / "
        f"{summary['distinct_delivered']} |",
        f"| redeliveries | {summary['redelivered']} "
        f"({summary['redelivered_after_lease_expiry']} after a lease expired — an unacked "
        f"or refused ack before —, {summary['redelivered_unexplained']} unexplained) |",
        f"| first deliveries out of order within a partition | "
        f"{summary['first_delivery_out_of_order']} |",
        f"| push answers | {summary['push_answers']} |",
        f"| pop answers | {summary['pop_answers']} |",
        f"| ack outcomes | {summary['ack_outcomes']} |",
        "",
        "Push 503s and connection errors were retried with the same transactionIds, as the "
        "clients do; every message ended acknowledged. Pass = 0 missing, 0 unexplained "
        "redeliveries, 0 out of order.",
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--append-results", action="store_true",
                        help="append the summary to bench/RESULTS.md under '## Soak'")
    args = parser.parse_args()
    summary = soak(args.minutes)
    print(json.dumps(summary, indent=2))
    if args.append_results:
        with open(REPO / "bench" / "RESULTS.md", "a") as results:
            results.write(_markdown(summary))
    ok = summary["missing"] == 0 and summary["redelivered_unexplained"] == 0 \
        and summary["first_delivery_out_of_order"] == 0
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
