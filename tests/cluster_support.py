"""The harness of the cluster tests (issue #16): several real ``twistd queen`` processes on
one PostgreSQL that sync over UDP, a network namespace with real packet loss, and probes.

Everything here is real: the instances are subprocesses, the datagrams go through the
kernel, the loss is an nftables rule. Nothing here mocks the server or the database.

Why a network namespace for the loss test: the rule that drops datagrams must not touch
the loopback of the machine the other tests (and other people) use. All instances of the
lossy cluster live in one namespace of their own, on its loopback, so the rule sees only
their traffic and no address outside loopback is ever used. The test reaches them from
threads that joined the namespace (``setns`` changes the network namespace of the calling
thread only), and processes started from such a thread are born inside it. PostgreSQL is
reached through its unix socket, which a namespace does not hide.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
from psycopg2.extensions import connection

from queen_tw.cluster import datagram as dg

from support import ServerProcess, wait_until

T = TypeVar("T")

SECRET = "cluster-test-secret"
HEARTBEAT_MS = 200
DEAD_THRESHOLD_MS = 1000
SLOW_FALLBACK_MS = "600000"
"""POP_WAIT_* and cache refresh at 10 minutes: within a test's 30 s ceiling, only a
datagram can explain a wake-up, a config change or a maintenance flag seen by a peer."""

QUIET = {"STATS_INTERVAL_MS": "3600000", "RETENTION_INTERVAL": "3600000",
         "EVICTION_INTERVAL": "3600000", "QUEEN_TIMERS_SWEEP_INTERVAL_MS": SLOW_FALLBACK_MS,
         "NUM_WORKERS": "1"}
"""Background jobs out of the way: the only pop queries an instance runs are the tests'.

The timer sweeper matters most: the pool reuses its first free connection, so a sweep that
starts a few milliseconds after a pop attempt overwrites the query ``pg_stat_activity`` shows
for it, and :func:`wait_parked` sees the attempt end only if it sampled it running. With no
timer due, it sweeps once at start (and when a timer scheduled on it comes due)."""


def free_udp_port(host: str = "127.0.0.1") -> int:
    """A UDP port nothing is bound to right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class ClusterNode(ServerProcess):
    """One instance of a cluster: a :class:`ServerProcess` with a UDP port and a
    PostgreSQL ``application_name`` of its own (``WORKER_ID``), by which the tests see the
    queries it runs in ``pg_stat_activity``."""

    def __init__(self, name: str, pg_env: Mapping[str, str], workdir: Path, udp_port: int,
                 env_overrides: Mapping[str, str]):
        self.name = name
        self.udp_port = udp_port
        self.worker_id = f"cluster-{name}-{uuid.uuid4().hex[:8]}"
        super().__init__(pg_env, workdir, {
            **QUIET, "WORKER_ID": self.worker_id, "QUEEN_UDP_NOTIFY_PORT": str(udp_port),
            **env_overrides})

    def get(self, path: str, **params: Any) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", params=params, timeout=40)

    def post(self, path: str, body: Any) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", json=body, timeout=40)

    def shared_state(self) -> dict[str, Any]:
        """``GET /api/v1/system/shared-state`` (WIRE 3.7)."""
        answer = self.get("/api/v1/system/shared-state")
        assert answer.status_code == 200, answer.text
        state = answer.json()
        assert state.get("enabled") is True, f"{self.name}: sync is off: {state}"
        return state

    def transport(self, field: str) -> int:
        return int(self.shared_state()["transport"][field])

    def health(self, field: str) -> int:
        return int(self.shared_state()["server_health"][field])

    def counted(self, field: str, at_least: int) -> bool:
        """Whether the transport counter ``field`` has reached ``at_least``."""
        return self.transport(field) >= at_least

    def sees_peers(self, alive: int, dead: int) -> bool:
        health = self.shared_state()["server_health"]
        return bool(health["servers_alive"] == alive and health["servers_dead"] == dead)

    def in_maintenance(self, enabled: bool) -> bool:
        """Whether this instance's own push-maintenance flag is ``enabled``."""
        return bool(self.shared_state()["maintenance_mode"] is enabled)


class Cluster:
    """``names`` instances on one PostgreSQL, each listing all the others in
    ``QUEEN_UDP_PEERS``, with one shared secret and fast heartbeats.

    :param env: environment overrides of every instance.
    :param node_env: further overrides of single instances, by name.
    :param spawn: runs a callable where the instances must live (a namespace's threads);
        by default, right here.
    """

    def __init__(self, pg_env: Mapping[str, str], env: Mapping[str, str] | None = None, *,
                 names: tuple[str, ...] = ("a", "b", "c"),
                 node_env: Mapping[str, Mapping[str, str]] | None = None,
                 spawn: Callable[[Callable[[], Any]], Any] | None = None):
        self.root = Path(tempfile.mkdtemp(prefix="queen-tw-cluster-"))
        self._spawn: Callable[[Callable[[], Any]], Any] = spawn or (lambda call: call())
        ports = {name: free_udp_port() for name in names}
        self.nodes: dict[str, ClusterNode] = {}
        for name in names:
            peers = ",".join(f"127.0.0.1:{port}" for other, port in ports.items()
                             if other != name)
            self.nodes[name] = ClusterNode(name, pg_env, self.root / name, ports[name], {
                "QUEEN_UDP_PEERS": peers, "QUEEN_SYNC_SECRET": SECRET,
                "QUEEN_SYNC_HEARTBEAT_MS": str(HEARTBEAT_MS),
                "QUEEN_SYNC_DEAD_THRESHOLD_MS": str(DEAD_THRESHOLD_MS), **(env or {}),
                **(node_env or {}).get(name, {})})

    def __getitem__(self, name: str) -> ClusterNode:
        return self.nodes[name]

    def start(self, node: ClusterNode | None = None) -> None:
        """Starts one instance (or all), each waited for until healthy."""
        for each in [node] if node else self.nodes.values():
            self._spawn(each.start)

    def wait_all_alive(self) -> None:
        """Until every instance has heard heartbeats from every other one."""
        others = len(self.nodes) - 1
        for node in self.nodes.values():
            wait_until(lambda node=node: node.health("servers_alive") == others,
                       message=f"{node.name} seeing its {others} peers alive")

    def stop(self) -> None:
        for node in self.nodes.values():
            node.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def log_tails(self) -> str:
        return "\n".join(f"--- {name} ---\n{node.log_tail(40)}"
                         for name, node in self.nodes.items())


# -- what an instance did, seen from PostgreSQL ----------------------------------------

def db_now(db: connection) -> Any:
    with db.cursor() as cursor:
        cursor.execute("SELECT clock_timestamp()")
        return cursor.fetchone()[0]


def pop_queries_since(db: connection, node: ClusterNode, since: Any) -> list[str]:
    """States of ``node``'s connections whose latest query is a pop started after ``since``.

    A parked long-poll is proven parked once its first attempt has finished (``idle``) and
    found nothing; a wake-up shows as a new attempt. Pops are calls of the ``queen.pop…``
    SQL functions; the flag re-read mentions ``pop_maintenance_mode`` and is not one.
    """
    with db.cursor() as cursor:
        cursor.execute("""SELECT state FROM pg_stat_activity
                           WHERE application_name = %s AND query ILIKE '%%queen.pop%%'
                             AND query_start > %s""", (node.worker_id, since))
        return [row[0] for row in cursor.fetchall()]


QUEUE_MODE = "__QUEUE_MODE__"
"""The consumer group of a pop without one (queue mode)."""


class PopAttempts:
    """The pop calls one instance finished after a moment, as far as ``pg_stat_activity``
    (which shows each connection's latest query only) lets a sampler see them.

    A call counts as finished when its connection shows it ``idle``, or when a call seen
    running has been replaced by a later query on that connection: the pool reuses its
    first free connection, so a background query (a declarations re-read, a sweep) can
    overwrite a finished pop within milliseconds.
    """

    def __init__(self, db: connection, node: ClusterNode, since: Any):
        self._db, self._node, self._since = db, node, since
        self._running: dict[int, Any] = {}  # pid -> start of the pop call seen running there
        self.finished: set[Any] = set()     # starts of the pop calls known to have finished

    def sample(self) -> None:
        with self._db.cursor() as cursor:
            cursor.execute("""SELECT pid, state, query_start, query ILIKE '%%queen.pop%%'
                                FROM pg_stat_activity
                               WHERE application_name = %s AND query_start > %s""",
                           (self._node.worker_id, self._since))
            for pid, state, started, is_pop in cursor.fetchall():
                seen = self._running.get(pid)
                if seen is not None and started > seen:
                    self.finished.add(self._running.pop(pid))
                if is_pop and state == "idle":
                    self.finished.add(started)
                elif is_pop:
                    self._running[pid] = started


def first_contact_done(db: connection, queues: Sequence[str], group: str, after: Any) -> bool:
    """Whether a pop call started at ``after`` ran with the subscriptions of ``group`` to
    ``queues`` in place. A group's first pop answers "needs a subscription", the server
    records it in a call of its own and pops again: only that second call is the attempt
    that parks. A queue that does not exist needs none."""
    with db.cursor() as cursor:
        cursor.execute("""SELECT bool_and(cs.created_at IS NOT NULL AND cs.created_at < %s)
                            FROM queen.queues q
                            LEFT JOIN queen.consumer_subscriptions cs
                                   ON cs.queue_id = q.id AND cs.consumer_group = %s
                           WHERE q.name = ANY(%s)""", (after, group, list(queues)))
        [(ready,)] = cursor.fetchall()
        return ready is not False  # NULL: none of the queues exists


def wait_parked(db: connection, node: ClusterNode, since: Any, queues: Sequence[str],
                pending: Future[Any] | None = None, group: str = QUEUE_MODE) -> None:
    """Until ``node`` has finished the first attempt of a long-poll of ``group`` on
    ``queues`` sent after ``since``: it looked, found nothing, and is parked, so whatever
    is stored next can reach it only through a wake-up. ``pending``, the long-poll itself,
    must not have answered meanwhile."""
    attempts = PopAttempts(db, node, since)

    def attempted() -> bool:
        if pending is not None and pending.done():
            return True
        attempts.sample()
        return any(first_contact_done(db, queues, group, started)
                   for started in attempts.finished)

    wait_until(attempted, interval=0.005, message=f"the first pop attempt on {node.name}")
    if pending is not None:
        assert not pending.done(), f"the long-poll answered at once: {pending.result()}"


def store_silently(db: connection, queue: str, partition: str, transaction_id: str,
                   payload: Any) -> None:
    """Stores one message with the push function itself, from the test's own session: no
    instance hears of it, so only an announcement (or a fallback re-check) can make a parked
    pop see it."""
    with db.cursor() as cursor:
        cursor.execute("SELECT queen.push_store(%s::jsonb)", (json.dumps([{
            "queue": queue, "partition": partition, "payload": payload,
            "transactionId": transaction_id}]),))


# -- a sender outside the cluster --------------------------------------------------------

class Announcer:
    """Sends WIRE 6.3 datagrams from the test process, signed with ``secret`` (an intruder
    when it is not the cluster's)."""

    def __init__(self, sender_id: str, secret: str | None):
        self.sender_id = sender_id
        self.secret = secret.encode() if secret else None
        self.session = os.urandom(dg.SESSION_ID_SIZE)
        self.sequence = 0
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def message_available(self, queue: str, partition: str | None,
                          targets: list[int]) -> None:
        self._send(dg.MESSAGE_AVAILABLE, {"queue": queue, "partition": partition}, targets)

    def maintenance(self, kind: int, enabled: bool, targets: list[int]) -> None:
        """A maintenance change (``dg.MAINTENANCE_MODE_SET`` or ``POP_…``) as a peer sends
        it after storing the flag."""
        self._send(kind, {"enabled": enabled}, targets)

    def _send(self, kind: int, payload: dict[str, Any], targets: list[int]) -> None:
        self.sequence += 1
        now_ms = int(time.time() * 1000)
        data = dg.encode(kind, {**payload, "ts": now_ms}, sender_id=self.sender_id,
                         session_id=self.session, sequence=self.sequence, sent_ms=now_ms,
                         secret=self.secret)
        for port in targets:
            self._socket.sendto(data, ("127.0.0.1", port))

    def close(self) -> None:
        self._socket.close()


# -- a network namespace with real packet loss ------------------------------------------

_CLONE_NEWNET = 0x40000000


def namespace_unavailable(pg_env: Mapping[str, str]) -> str | None:
    """Why the real-loss test cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (apt-get install -y iproute2 nftables)"
    if not pg_env.get("PG_HOST", "").startswith("/"):
        return "PostgreSQL is not on a unix socket, which a namespace could reach"
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"this sandbox refuses new network namespaces ({probe.stderr.strip()})"
    return None


class LossyNamespace:
    """A network namespace of its own whose loopback loses ``percent`` % of the UDP
    datagrams sent to ``ports`` (nftables ``numgen random``, counted)."""

    def __init__(self, threads: int):
        self.name = f"qtw-loss-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._threads = threads
        self._executor: ThreadPoolExecutor | None = None

    def create(self) -> None:
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self.run(["ip", "link", "set", "lo", "up"])
        self._executor = ThreadPoolExecutor(self._threads, thread_name_prefix=self.name,
                                            initializer=self._enter)

    def drop(self, ports: list[int], percent: int) -> None:
        assert 0 < percent < 100 and percent % 10 == 0
        port_set = ", ".join(str(port) for port in ports)
        rules = ("table inet qtw_loss {\n chain input {\n"
                 "  type filter hook input priority 0; policy accept;\n"
                 f"  meta l4proto udp udp dport {{ {port_set} }} "
                 f"numgen random mod 10 < {percent // 10} counter drop\n }}\n}}\n")
        subprocess.run(["ip", "netns", "exec", self.name, "nft", "-f", "-"],
                       input=rules.encode(), check=True)

    def dropped(self) -> int:
        """Datagrams the rule has dropped so far."""
        listing = self.run(["nft", "list", "table", "inet", "qtw_loss"])
        words = listing.split()
        return int(words[words.index("packets") + 1])

    def run(self, command: list[str]) -> str:
        return subprocess.run(["ip", "netns", "exec", self.name, *command], check=True,
                              capture_output=True, text=True).stdout

    def submit(self, call: Callable[..., T], *args: Any) -> Future[T]:
        """Runs ``call`` on a thread inside the namespace."""
        assert self._executor is not None, "create() first"
        return self._executor.submit(call, *args)

    def call(self, call: Callable[[], T]) -> T:
        return self.submit(call).result()

    def _enter(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        handle = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            if libc.setns(handle, _CLONE_NEWNET) != 0:
                error = ctypes.get_errno()
                raise OSError(error, f"setns into {self.name}: {os.strerror(error)}")
        finally:
            os.close(handle)

    def destroy(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        subprocess.run(["ip", "netns", "del", self.name], check=False,
                       capture_output=True)


@contextmanager
def lossy_namespace(threads: int) -> Iterator[LossyNamespace]:
    """A :class:`LossyNamespace`, deleted on exit whatever happened."""
    namespace = LossyNamespace(threads)
    try:
        namespace.create()
        yield namespace
    finally:
        namespace.destroy()
