"""Config and maintenance changes between the worker processes of one NUM_WORKERS instance.

A configure, queue delete or maintenance toggle is handled by whichever worker got the
request; the other workers must apply it at once too (their queue config cache, their
flags), and worker 1 must tell the peer instances (only it has the UDP socket). Likewise a
change worker 1 hears from a peer must reach its siblings. The workers already share a
PostgreSQL LISTEN connection each (:mod:`queen_tw.cluster.pg_wakeups`), so the change
travels as a NOTIFY on its own channel: every worker applies the notices of the others, and
worker 1 also forwards its siblings' notices to the peers. A worker never acts on its own
notice, and siblings never forward, so nothing loops.

Advisory like the datagrams: a notice lost with a dropped connection leaves the periodic
re-read from PostgreSQL (maintenance flags every second on workers) and the cache TTL.
"""

from typing import Any, Callable, Dict, Iterable, Optional, Protocol, Tuple

from twisted.logger import Logger

from queen_tw.cluster.config_cache import QueueConfigCache
from queen_tw.maintenance import MAINTENANCE, POP_MAINTENANCE, Maintenance

log = Logger()

Notice = Dict[str, Any]


class PeerAnnouncer(Protocol):
    """The three announcements worker 1 forwards (``PeerSync`` has them)."""

    def announce_config_set(self, queue: str, config: Dict[str, Any]) -> None: ...

    def announce_config_delete(self, queue: str) -> None: ...

    def announce_maintenance(self, key: str, enabled: bool) -> None: ...


class SiblingBus:
    """Sends this worker's changes to its siblings and applies theirs.

    Also the ``PeerNotices`` of ``QueueEngine`` and the maintenance callback on workers
    other than 1 (worker 1's :class:`~queen_tw.cluster.wiring.ClusterNotices` calls it too).

    :param cache: this worker's queue config cache.
    :param maintenance: this worker's flags.
    """

    def __init__(self, cache: QueueConfigCache, maintenance: Maintenance):
        self._cache = cache
        self._maintenance = maintenance
        self._send: Optional[Callable[[Notice], None]] = None
        self._relay: Optional[Callable[[str, Optional[str]], None]] = None
        self._peers: Optional[PeerAnnouncer] = None

    def attach(self, send: Callable[[Notice], None],
               relay: Callable[[str, Optional[str]], None]) -> None:
        """``send(notice)`` delivers a notice to the siblings and ``relay(queue, partition)``
        a wake-up (both over the LISTEN connection)."""
        self._send = send
        self._relay = relay

    def forward_to(self, peers: PeerAnnouncer) -> None:
        """Worker 1: siblings' changes are announced to the peer instances too."""
        self._peers = peers

    def announce_messages(self, keys: Iterable[Tuple[str, Optional[str]]]) -> None:
        """Nothing to do: the push functions NOTIFY ``queen_wakeup`` at commit already."""

    def announce_available(self, keys: Iterable[Tuple[str, Optional[str]]]) -> None:
        """Wakes the siblings' pops on these partitions; worker 1, hearing it, tells the
        peers too (``wiring.sibling_wakeups``)."""
        if self._relay is None:
            log.debug("wake-up not relayed to the sibling workers: not listening yet")
            return
        for queue, partition in keys:
            self._relay(queue, partition)

    def announce_config_set(self, queue: str, config: Dict[str, Any]) -> None:
        self._tell({"kind": "config_set", "queue": queue, "config": config})

    def announce_config_delete(self, queue: str) -> None:
        self._tell({"kind": "config_delete", "queue": queue})

    def announce_maintenance(self, key: str, enabled: bool) -> None:
        self._tell({"kind": "maintenance", "key": key, "enabled": enabled})

    def received(self, notice: Notice) -> None:
        """A sibling's notice: applied here; worker 1 also tells the peers. Malformed
        notices are ignored (logged at debug)."""
        kind, queue = notice.get("kind"), notice.get("queue")
        if kind == "config_set" and isinstance(queue, str) and isinstance(
                notice.get("config"), dict):
            self._cache.apply_peer_config(queue, notice["config"])
            if self._peers is not None:
                self._peers.announce_config_set(queue, notice["config"])
        elif kind == "config_delete" and isinstance(queue, str):
            self._cache.forget(queue)
            if self._peers is not None:
                self._peers.announce_config_delete(queue)
        elif kind == "maintenance" and notice.get("key") in (MAINTENANCE, POP_MAINTENANCE) \
                and isinstance(notice.get("enabled"), bool):
            self._maintenance.apply_from_peer(notice["key"], notice["enabled"])
            if self._peers is not None:
                self._peers.announce_maintenance(notice["key"], notice["enabled"])
        else:
            log.debug("ignored a malformed sibling notice {notice!r}", notice=notice)

    def _tell(self, notice: Notice) -> None:
        if self._send is None:
            log.debug("sibling notice {kind} not sent: not listening yet", kind=notice["kind"])
            return
        self._send(notice)
