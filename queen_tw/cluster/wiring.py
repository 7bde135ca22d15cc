"""How the UDP peer sync is plugged into one server process (issue #16, WIRE 6).

:class:`~queen_tw.cluster.peer_sync.PeerSync` only moves datagrams; this module says what
the server tells its peers and what it does with what they say:

- outgoing: committed pushes (``QueueEngine`` through :class:`ClusterNotices`), configure and
  delete, maintenance toggles (a callback given to ``Maintenance``);
- incoming: a ``MESSAGE_AVAILABLE`` wakes the local long-polls of that partition and the
  queue's wildcard ones; a queue config set/delete updates the
  :class:`~queen_tw.cluster.config_cache.QueueConfigCache`; a maintenance flag is applied
  at once. Bad field types are ignored and logged at debug; nothing raises into the reactor.

NUM_WORKERS > 1: one UDP socket per instance, owned by worker 1. The parent binds it before
the reactor runs (a port in use refuses to start with one line) and hands it to worker 1 as
an inherited descriptor (``QUEEN_SYNC_FD``), so the port stays held while worker 1 is
restarted. The other workers run no peer sync. The PostgreSQL ``queen_wakeup`` NOTIFY relay
(:mod:`queen_tw.cluster.pg_wakeups`) carries the rest, since every worker already LISTENs on
it:

- a peer's ``MESSAGE_AVAILABLE`` wakes worker 1's waiters and is relayed on that channel to
  its siblings;
- a sibling's committed push reaches worker 1 on that channel (the push functions NOTIFY),
  and worker 1 announces it to the peers;
- a configure, queue delete or maintenance toggle made through any worker goes to the
  others as a NOTIFY on ``queen_sync`` (:mod:`queen_tw.cluster.sibling_bus`): each applies
  it at once and worker 1 announces it to the peers; a peer's change heard by worker 1 goes
  to its siblings the same way. Lost notices are covered by the periodic re-reads (the
  flags every second on workers, the config cache within ``QUEEN_QUEUE_CONFIG_TTL_MS``);
- the shared-state route answers from any worker: worker 1 publishes its counters for the
  siblings (:mod:`queen_tw.cluster.worker_stats`).

Why worker 1 rather than the parent: the parent runs no database pool, no waiters and no
caches, so everything a datagram changes would need a second hop to reach a worker; worker 1
applies it where it lands and only its siblings need the PostgreSQL hop they already have.
"""

import errno
import os
import socket
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from twisted.application import service
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from queen_tw.cluster.config_cache import QueueConfigCache
from queen_tw.cluster.peer_sync import PeerSync, SyncHandlers, SyncPortUnavailable, SyncSettings
from queen_tw.cluster.peers import parse_peers
from queen_tw.cluster.pg_wakeups import PostgresWakeups
from queen_tw.cluster.sibling_bus import SiblingBus
from queen_tw.cluster.worker_stats import (
    PublishedSharedState,
    publisher_service,
    stats_path,
)
from queen_tw.config import Config
from queen_tw.engine.queue_engine import PeerNotices
from queen_tw.engine.waiters import WaiterRegistry
from queen_tw.maintenance import Maintenance
from queen_tw.startup import fatal, refuse_to_start

log = Logger()

MiB = 1024 * 1024

WakeupRelay = Callable[[str, Optional[str]], None]
"""Hands a peer's wake-up ``(queue, partition)`` to the sibling workers."""


def server_identity(config: Config, hostname: Optional[str] = None) -> str:
    """``<hostname>:<udp port>`` (WIRE 6.1). With port 0 (tests: any free port) the pid
    stands in for the port, so two such instances on one machine never share an id."""
    host = hostname or socket.gethostname()
    if config.udp_notify_port:
        return f"{host}:{config.udp_notify_port}"
    return f"{host}:pid{os.getpid()}"


def sync_settings(config: Config) -> SyncSettings:
    """The :class:`SyncSettings` of ``config`` (already validated by ``Config``)."""
    secret = config.sync_secret.encode("utf-8") if config.sync_secret else None
    return SyncSettings(
        peers=parse_peers(config.udp_peers, config.udp_notify_port),
        port=config.udp_notify_port, interface=config.udp_interface, secret=secret,
        heartbeat_ms=config.sync_heartbeat_ms,
        dead_threshold_ms=config.sync_dead_threshold_ms, server_id=server_identity(config),
        recv_buffer_bytes=config.sync_recv_buffer_mb * MiB or None,
        inherited_fd=config.sync_fd)


def udp_refusal(interface: str, port: int, error: object) -> str:
    """The one line of a peer-sync port that cannot be bound, naming the setting."""
    cause = error.socketError if isinstance(error, CannotListenError) else error
    if isinstance(cause, OSError) and cause.strerror:
        text = cause.strerror[:1].lower() + cause.strerror[1:]
    else:
        text = str(cause)
    address_problem = (isinstance(cause, socket.gaierror)  # a name that does not resolve
                       or getattr(cause, "errno", None) == errno.EADDRNOTAVAIL)
    hint = "set QUEEN_UDP_BIND or HOST" if address_problem else "set QUEEN_UDP_NOTIFY_PORT"
    return f"cannot listen on UDP {interface}:{port}: {text} ({hint})"


def open_udp_socket(interface: str, port: int) -> socket.socket:
    """A bound, non-blocking UDP socket for worker 1 to inherit (``NUM_WORKERS``); called
    before the reactor runs, it refuses to start with one line when the port is taken."""
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    udp = socket.socket(family, socket.SOCK_DGRAM)
    try:
        udp.bind((interface, port))
    except OSError as err:
        udp.close()
        refuse_to_start(udp_refusal(interface, port, err))
    udp.setblocking(False)
    return udp


class ClusterNotices:
    """What worker 1 or a single process tells its peers (``QueueEngine``'s ``PeerNotices``,
    the maintenance callback), and, on worker 1, its sibling workers.

    :param sync: the peer-sync service.
    :param siblings: worker 1's bus to its sibling workers (None in a single process).
    """

    def __init__(self, sync: PeerSync, siblings: Optional[SiblingBus] = None):
        self._sync = sync
        self._siblings = siblings

    def announce_messages(self, keys: Iterable[Tuple[str, Optional[str]]]) -> None:
        # PeerSync's hint says str, its datagram allows None (WIRE 6.1: any partition)
        self._sync.announce_messages(keys)

    def announce_available(self, keys: Iterable[Tuple[str, Optional[str]]]) -> None:
        keys = list(keys)
        self._sync.announce_messages(keys)
        if self._siblings is not None:
            self._siblings.announce_available(keys)

    def announce_config_set(self, queue: str, config: Dict[str, Any]) -> None:
        self._sync.announce_config_set(queue, config)
        if self._siblings is not None:
            self._siblings.announce_config_set(queue, config)

    def announce_config_delete(self, queue: str) -> None:
        self._sync.announce_config_delete(queue)
        if self._siblings is not None:
            self._siblings.announce_config_delete(queue)

    def announce_maintenance(self, key: str, enabled: bool) -> None:
        self._sync.announce_maintenance(key, enabled)
        if self._siblings is not None:
            self._siblings.announce_maintenance(key, enabled)


def sync_handlers(waiters: WaiterRegistry, cache: QueueConfigCache, maintenance: Maintenance,
                  siblings: Optional[SiblingBus], wakeup_relays: List[WakeupRelay]
                  ) -> SyncHandlers:
    """What a peer's datagram does here (see the module docstring); on worker 1 each change
    is passed on to the sibling workers too (wake-ups through ``wakeup_relays``, filled once
    the LISTEN connection exists)."""

    def message_available(queue: str, partition: Optional[str]) -> None:
        waiters.notify(queue, partition)
        for relay in wakeup_relays:
            relay(queue, partition)

    def config_set(queue: str, config: Dict[str, Any]) -> None:
        cache.apply_peer_config(queue, config)
        if siblings is not None:
            siblings.announce_config_set(queue, config)

    def config_delete(queue: str) -> None:
        cache.forget(queue)
        if siblings is not None:
            siblings.announce_config_delete(queue)

    def maintenance_set(key: str, enabled: bool) -> None:
        maintenance.apply_from_peer(key, enabled)
        if siblings is not None:
            siblings.announce_maintenance(key, enabled)

    return SyncHandlers(message_available=message_available, config_set=config_set,
                        config_delete=config_delete, maintenance=maintenance_set)


class SyncService(service.MultiService):
    """Holds the :class:`PeerSync`; a port that cannot be bound stops the server with one
    line naming ``QUEEN_UDP_NOTIFY_PORT`` instead of a traceback.

    :param sync: the peer-sync service (its only child).
    :param reactor: stopped by :func:`~queen_tw.startup.fatal` if binding fails only once
        the reactor runs (no twistd privileged step, as in tests).
    """

    def __init__(self, sync: PeerSync, reactor):
        super().__init__()
        self.sync = sync
        self._reactor = reactor
        sync.setServiceParent(self)

    def privilegedStartService(self) -> None:
        reason = self._bind()
        if reason is not None:
            refuse_to_start(reason)
        super().privilegedStartService()

    def startService(self) -> None:
        reason = self._bind()
        if reason is not None:
            fatal(self._reactor, reason)
            return
        super().startService()

    def _bind(self) -> Optional[str]:
        try:
            self.sync.bind()
        except SyncPortUnavailable as err:
            settings = self.sync.settings
            return udp_refusal(settings.interface, settings.port, err.cause)
        return None


class SharedState:
    """The read-only view of ``GET /api/v1/system/shared-state`` (WIRE 3.7).

    :param sync: peer transport and liveness counters.
    :param cache: the queue config cache counters.
    :param maintenance: the two flags as this process knows them.
    """

    def __init__(self, sync: PeerSync, cache: QueueConfigCache, maintenance: Maintenance):
        self._sync = sync
        self._cache = cache
        self._maintenance = maintenance

    def stats(self) -> Dict[str, Any]:
        body = self._sync.stats()
        body["queue_config_cache"] = self._cache.stats()
        body["maintenance_mode"] = self._maintenance.maintenance_mode
        body["pop_maintenance_mode"] = self._maintenance.pop_maintenance_mode
        return body


class Cluster:
    """The peer-sync parts of one process, whichever its role (see the module docstring).

    :param notices: for ``QueueEngine`` (None: nobody to tell).
    :param shared_state: for the shared-state routes (None: sync off).
    :param service: the UDP side, in stage ``jobs`` (None: not this process).
    :param siblings: the bus between NUM_WORKERS workers (None in a single process).
    :param wake: handler of the sibling workers' ``queen_wakeup`` notices.
    :param wakeup_relays: where worker 1 hands peers' wake-ups for its siblings.
    """

    def __init__(self, notices: Optional[PeerNotices],
                 shared_state: SharedState | PublishedSharedState | None,
                 service: Optional[SyncService], siblings: Optional[SiblingBus],
                 wake: Callable[[str, Optional[str]], object],
                 wakeup_relays: Optional[List[WakeupRelay]] = None):
        self.notices = notices
        self.shared_state = shared_state
        self.service = service
        self.siblings = siblings
        self.wake = wake
        self._wakeup_relays = wakeup_relays if wakeup_relays is not None else []

    def attach(self, wakeups: PostgresWakeups) -> None:
        """NUM_WORKERS: the LISTEN connection carries this worker's notices to its siblings
        (and, on worker 1, peers' wake-ups)."""
        if self.siblings is not None:
            self.siblings.attach(wakeups.publish, wakeups.relay)
        if self.service is not None:
            self._wakeup_relays.append(wakeups.relay)


def build_cluster(config: Config, waiters: WaiterRegistry, cache: QueueConfigCache,
                  maintenance: Maintenance, reactor, in_group: bool) -> Cluster:
    """The peer-sync parts for this process: the UDP sync when QUEEN_UDP_PEERS is set and
    QUEEN_SYNC_ENABLED is not false (with NUM_WORKERS, on worker 1 only: the one given the
    parent's socket), and the bus between workers when this is one of NUM_WORKERS."""
    siblings = SiblingBus(cache, maintenance) if in_group else None
    if not config.sync_wanted:
        if siblings is not None:
            maintenance.announce_changes_to(siblings.announce_maintenance)
        return Cluster(siblings, None, None, siblings, waiters.notify)
    if in_group and config.sync_fd is None:  # a worker other than 1
        assert siblings is not None
        maintenance.announce_changes_to(siblings.announce_maintenance)
        published = stats_path(config.file_buffer_dir, server_identity(config))
        return Cluster(siblings, PublishedSharedState(published, cache, maintenance),
                       None, siblings, waiters.notify)
    relays: List[WakeupRelay] = []
    sync = PeerSync(sync_settings(config),
                    sync_handlers(waiters, cache, maintenance, siblings, relays), reactor)
    notices = ClusterNotices(sync, siblings)
    maintenance.announce_changes_to(notices.announce_maintenance)
    holder = SyncService(sync, reactor)
    wake: Callable[[str, Optional[str]], object] = waiters.notify
    if siblings is not None:  # worker 1
        siblings.forward_to(sync)
        publisher_service(stats_path(config.file_buffer_dir, server_identity(config)), sync.stats,
                          reactor).setServiceParent(holder)
        wake = sibling_wakeups(waiters, notices)
    return Cluster(notices, SharedState(sync, cache, maintenance), holder, siblings, wake,
                   relays)


def sibling_wakeups(waiters: WaiterRegistry, notices: ClusterNotices
                    ) -> Callable[[str, Optional[str]], None]:
    """Worker 1's handler of a sibling's ``queen_wakeup`` notice (a committed push or a
    lease release there): wake the pops parked here and tell the peers."""

    def woken(queue: str, partition: Optional[str]) -> None:
        waiters.notify(queue, partition)
        notices.announce_messages([(queue, partition)])

    return woken
