"""Tools of the durability tests: a private PostgreSQL, producers that keep a ledger of every
answer, a drain that reads every partition back, and the count that compares the two.

The rule being checked (issue #6): every push answered ``queued``, ``duplicate`` or
``buffered`` is delivered, once, and in the order it was sent within its partition.

Producers own their partitions (one thread per partition set) and push sequentially, so send
order is well defined; a push that gets no acknowledgement (503, connection refused, timeout)
is sent again with the same transactionIds until it is acknowledged, as the official clients
do. Nothing here mocks anything: the server is the real twistd process, PostgreSQL is real.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from queen_tw.db.embedded import EmbeddedPostgres

from support import ServerProcess, wait_until

ACKNOWLEDGED = ("queued", "duplicate", "buffered")


@contextmanager
def private_postgres() -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL of its own, in a fresh directory: safe to freeze, stop and restart."""
    root = Path(tempfile.mkdtemp(prefix="queen-tw-faultpg-"))
    postgres = EmbeddedPostgres(root / "data")
    postgres.start()
    try:
        yield postgres
    finally:
        postgres.stop()
        shutil.rmtree(root, ignore_errors=True)


class Fleet:
    """Servers started on one PostgreSQL; :meth:`close` stops (or kills) whatever still runs."""

    def __init__(self, pg_env: dict[str, str]):
        self.pg_env = pg_env
        self.servers: list[ServerProcess] = []
        self.workdirs: list[Path] = []

    def server(self, start: bool = True, **env: str) -> ServerProcess:
        workdir = Path(tempfile.mkdtemp(prefix="queen-tw-fault-"))
        self.workdirs.append(workdir)
        process = ServerProcess(self.pg_env, workdir, env)
        self.servers.append(process)
        return process.start() if start else process

    def close(self) -> None:
        for process in self.servers:
            process.stop()
        for workdir in self.workdirs:
            shutil.rmtree(workdir, ignore_errors=True)


def health_code(url: str, timeout: float = 10.0) -> int:
    """The status of GET /health (0 when there is no answer at all)."""
    try:
        return httpx.get(f"{url}/health", timeout=timeout).status_code
    except httpx.HTTPError:
        return 0


def buffer_status(url: str) -> dict[str, Any] | None:
    try:
        answer = httpx.get(f"{url}/api/v1/status/buffers", timeout=10)
    except httpx.HTTPError:
        return None
    return answer.json() if answer.status_code == 200 else None


def set_maintenance(url: str, enabled: bool, pop: bool = False) -> dict[str, Any]:
    path = "/api/v1/system/maintenance/pop" if pop else "/api/v1/system/maintenance"
    answer = httpx.post(f"{url}{path}", json={"enabled": enabled}, timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()


# -- producers --------------------------------------------------------------------------

@dataclass
class Sent:
    """One message a producer sent, and what became of it."""

    partition: str
    seq: int
    transaction_id: str
    statuses: list[str] = field(default_factory=list)

    @property
    def acknowledged(self) -> bool:
        return any(status in ACKNOWLEDGED for status in self.statuses)


@dataclass
class Ledger:
    """Everything the producers sent, by transactionId, plus how the answers went."""

    queue: str
    sent: dict[str, Sent] = field(default_factory=dict)
    answers: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, what: str) -> None:
        with self.lock:
            self.answers[what] += 1

    @property
    def acknowledged(self) -> list[Sent]:
        return [sent for sent in self.sent.values() if sent.acknowledged]

    def partitions(self) -> list[str]:
        return sorted({sent.partition for sent in self.sent.values()})


class Producers:
    """``threads`` producers, each pushing in turn to its own ``partitions_each`` partitions,
    ``batch`` messages per request, until :meth:`stop` (or ``limit`` messages each).

    Each request is retried with the same transactionIds until it is acknowledged or
    ``give_up_after`` seconds passed since the producers were told to stop.
    """

    def __init__(self, url: str, queue: str, threads: int = 4, partitions_each: int = 2,
                 batch: int = 2, pause: float = 0.01, limit: int = 200,
                 give_up_after: float = 60.0):
        self.url = url
        self.ledger = Ledger(queue)
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True)
                         for n in range(threads)]
        self._partitions_each = partitions_each
        self._batch = batch
        self._pause = pause
        self._limit = limit
        self._give_up_after = give_up_after
        self._stopping = threading.Event()
        self._stopped_at = 0.0
        self.errors: list[str] = []

    def start(self) -> Producers:
        for thread in self._threads:
            thread.start()
        return self

    def sent_count(self) -> int:
        return len(self.ledger.sent)

    def stop(self, timeout: float = 90.0) -> Ledger:
        self._stopped_at = time.monotonic()
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout)
            assert not thread.is_alive(), "a producer did not finish"
        return self.ledger

    def _run(self, number: int) -> None:
        partitions = [f"p{number}-{k}" for k in range(self._partitions_each)]
        seqs = dict.fromkeys(partitions, 0)
        with httpx.Client(base_url=self.url, timeout=15) as client:
            turn = 0
            while not self._stopping.is_set() and min(seqs.values()) < self._limit:
                partition = partitions[turn % len(partitions)]
                turn += 1
                batch = []
                for _ in range(self._batch):
                    sent = Sent(partition, seqs[partition], str(uuid.uuid4()))
                    seqs[partition] += 1
                    batch.append(sent)
                    with self.ledger.lock:
                        self.ledger.sent[sent.transaction_id] = sent
                self._push_until_acknowledged(client, batch)
                time.sleep(self._pause)

    def _push_until_acknowledged(self, client: httpx.Client, batch: list[Sent]) -> None:
        items = [{"queue": self.ledger.queue, "partition": sent.partition,
                  "transactionId": sent.transaction_id,
                  "payload": {"partition": sent.partition, "seq": sent.seq}} for sent in batch]
        while True:
            try:
                answer = client.post("/api/v1/push", json={"items": items})
                what = str(answer.status_code)
            except httpx.HTTPError as err:
                answer, what = None, err.__class__.__name__
            self.ledger.note(what)
            if answer is not None and answer.status_code == 201:
                results = answer.json()
                for sent, result in zip(batch, results, strict=True):
                    sent.statuses.append(result["status"])
                    self.ledger.note(result["status"])
                if all(sent.acknowledged for sent in batch):
                    return
                items = [item for item, sent in zip(items, batch, strict=True)
                         if not sent.acknowledged]
                batch = [sent for sent in batch if not sent.acknowledged]
            elif answer is not None and answer.status_code < 500:
                self.errors.append(f"{answer.status_code}: {answer.text[:200]}")
                return
            if self._stopping.is_set() and \
                    time.monotonic() - self._stopped_at > self._give_up_after:
                self.errors.append(f"gave up on {len(batch)} messages after stop")
                return
            time.sleep(0.2)


# -- reading everything back ------------------------------------------------------------

def drain(url: str, queue: str, partitions: list[str], timeout: float = 60.0
          ) -> dict[str, list[dict[str, Any]]]:
    """Every message of each partition, in delivery order (autoAck pops, so no leases and
    no redelivery): waits until the server's buffer is empty, then pops until 204."""
    wait_until(lambda: (buffer_status(url) or {}).get("pending") == 0, timeout,
               interval=0.1, message="file buffer drained")
    delivered: dict[str, list[dict[str, Any]]] = {}
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=url, timeout=15) as client:
        for partition in partitions:
            got: list[dict[str, Any]] = []
            while time.monotonic() < deadline:
                answer = client.get(f"/api/v1/pop/queue/{queue}/partition/{partition}",
                                    params={"batch": 500, "autoAck": "true", "wait": "false"})
                if answer.status_code == 204:
                    break
                assert answer.status_code == 200, answer.text
                got.extend(answer.json()["messages"])
            delivered[partition] = got
    return delivered


@dataclass
class Count:
    """The outcome of comparing a ledger with what was delivered."""

    sent: int
    acknowledged: int
    buffered: int
    delivered: int
    missing: list[str]
    duplicates: int
    out_of_order: list[str]
    unacknowledged_delivered: int
    answers: dict[str, int]

    def assert_nothing_lost(self) -> None:
        assert not self.missing, f"{len(self.missing)} acknowledged messages lost: {self}"
        assert not self.out_of_order, f"order broken: {self}"
        assert self.duplicates == 0, f"{self.duplicates} duplicate deliveries: {self}"


def report(name: str, result: Count) -> None:
    """One line of counts on stdout (``pytest -s`` shows it)."""
    print(f"\n[fault] {name}: sent={result.sent} acknowledged={result.acknowledged} "
          f"buffered={result.buffered} delivered={result.delivered} "
          f"missing={len(result.missing)} duplicates={result.duplicates} "
          f"out_of_order={len(result.out_of_order)} "
          f"unacknowledged_delivered={result.unacknowledged_delivered} answers={result.answers}")


def count(ledger: Ledger, delivered: dict[str, list[dict[str, Any]]]) -> Count:
    """Compares the ledger with the delivered messages, partition by partition."""
    seen: dict[str, int] = defaultdict(int)
    out_of_order = []
    for partition, messages in delivered.items():
        last = -1
        for message in messages:
            seen[message["transactionId"]] += 1
            seq = message["data"]["seq"]
            if seen[message["transactionId"]] == 1:
                if seq <= last:
                    out_of_order.append(f"{partition}: seq {seq} after {last}")
                last = max(last, seq)
    acknowledged = ledger.acknowledged
    return Count(
        sent=len(ledger.sent),
        acknowledged=len(acknowledged),
        buffered=sum("buffered" in sent.statuses for sent in ledger.sent.values()),
        delivered=sum(len(messages) for messages in delivered.values()),
        missing=[sent.transaction_id for sent in acknowledged if not seen.get(sent.transaction_id)],
        duplicates=sum(n - 1 for n in seen.values() if n > 1),
        out_of_order=out_of_order,
        unacknowledged_delivered=sum(1 for tid in seen if tid in ledger.sent
                                     and not ledger.sent[tid].acknowledged),
        answers=dict(ledger.answers),
    )


def run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, check=False)


@contextmanager
def private_fleet() -> Iterator[Fleet]:
    """Servers on a PostgreSQL of their own: maintenance flags are cluster-wide, so switching
    them must not touch the session's shared database. For a module-scoped ``fleet``
    fixture."""
    with private_postgres() as postgres:
        servers = Fleet(postgres.pg_env())
        try:
            yield servers
        finally:
            servers.close()
