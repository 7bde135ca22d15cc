"""UDP peer sync between the instances of a cluster (WIRE 6): the service and its protocol.

Advisory only. PostgreSQL stays the truth; a lost datagram costs latency (a waiter wakes on
its fallback timer, a config or maintenance flag arrives with the next periodic re-read),
never a message. What the instances tell each other:

- ``MESSAGE_AVAILABLE`` after a committed push batch, once per distinct (queue, partition),
  so long-polls parked on other instances wake at once;
- ``HEARTBEAT`` every ``heartbeat_ms``, from which :class:`~queen_tw.cluster.peers.PeerTable`
  knows who is alive and who restarted;
- queue config set/delete and the two maintenance flags, applied by peers at once.

Receiving is hostile ground: every datagram goes through
:func:`~queen_tw.cluster.datagram.decode` (HMAC when a secret is set) and the
:class:`~queen_tw.cluster.datagram.ReplayGuard`; rejects are counted per reason, own
datagrams (same sender id and session) are ignored, and a handler that fails is logged.
Nothing a datagram contains can raise into the reactor.

One UDP socket per instance, not per worker. With ``NUM_WORKERS > 1`` the intended owner is
worker 1: the parent binds the port before the reactor runs (so a port in use refuses to
start, as the HTTP socket does) and hands it to worker 1 as an inherited descriptor
(``SyncSettings.inherited_fd``), so the port stays held while worker 1 is restarted. Worker 1
relays what peers say to its sibling workers through the PostgreSQL ``queen_wakeup``
NOTIFY relay (:mod:`queen_tw.cluster.pg_wakeups`) and announces the pushes it hears of on
that same channel from its siblings; the siblings see remote config and maintenance changes
through their periodic re-read from PostgreSQL.
"""

import ipaddress
import os
import socket
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from twisted.application import service
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from queen_tw.clock import wall_seconds
from queen_tw.cluster import datagram as dg
from queen_tw.cluster.datagram import Datagram, DatagramTooLarge, Rejected, ReplayGuard
from queen_tw.cluster.peers import (
    RESOLVE_INTERVAL_MS,
    PeerAddress,
    PeerResolver,
    PeerTable,
    Resolve,
)
from queen_tw.services.periodic import PeriodicService

log = Logger()

MAINTENANCE_KEYS = {
    dg.MAINTENANCE_MODE_SET: "maintenance_mode",
    dg.POP_MAINTENANCE_MODE_SET: "pop_maintenance_mode",
}
"""Datagram type of each ``queen.system_state`` flag (WIRE 3.7)."""
MAX_LEARNED = 1024
"""Most sender ids whose source address is remembered for the stats."""


@dataclass(frozen=True)
class SyncSettings:
    """What :class:`PeerSync` needs from the configuration (WIRE 5, "Cluster sync").

    :param peers: from :func:`~queen_tw.cluster.peers.parse_peers`.
    :param port: ``QUEEN_UDP_NOTIFY_PORT`` (0: any free port, for tests).
    :param interface: the address to bind.
    :param secret: UTF-8 bytes of ``QUEEN_SYNC_SECRET``; None sends and accepts unsigned.
    :param heartbeat_ms: ``QUEEN_SYNC_HEARTBEAT_MS``.
    :param dead_threshold_ms: ``QUEEN_SYNC_DEAD_THRESHOLD_MS``.
    :param server_id: this instance's identity, ``<hostname>:<udp port>`` (WIRE 6.1).
    :param recv_buffer_bytes: ``QUEEN_SYNC_RECV_BUFFER_MB`` in bytes (None: system default).
    :param inherited_fd: an already bound UDP socket to use instead of binding ``port``.
    """

    peers: List[PeerAddress]
    port: int
    interface: str
    secret: Optional[bytes]
    heartbeat_ms: int
    dead_threshold_ms: int
    server_id: str
    recv_buffer_bytes: Optional[int] = None
    inherited_fd: Optional[int] = None


@dataclass(frozen=True)
class SyncHandlers:
    """What the server does with what peers say (each call is guarded: a raise is logged).

    :param message_available: ``(queue, partition or None)``: wake local waiters.
    :param config_set: ``(queue, config)``: replace the cached config.
    :param config_delete: ``(queue)``: drop the cached config.
    :param maintenance: ``(key, enabled)`` with key ``maintenance_mode`` or
        ``pop_maintenance_mode``: set the local flag.
    """

    message_available: Callable[[str, Optional[str]], None]
    config_set: Callable[[str, Dict[str, Any]], None]
    config_delete: Callable[[str], None]
    maintenance: Callable[[str, bool], None]


def _ip_literal(interface: str) -> str:
    """``interface`` as an IP address: listenUDP takes no host name (HOST=localhost serves
    HTTP, and a bound socket of NUM_WORKERS resolves it). IPv4 first, as peers mostly are.
    Raises ``socket.gaierror`` (an ``OSError``) for a name that does not resolve."""
    try:
        ipaddress.ip_address(interface)
        return interface
    except ValueError:
        pass
    try:
        found = socket.getaddrinfo(interface, None, socket.AF_INET, socket.SOCK_DGRAM)
    except socket.gaierror:
        found = socket.getaddrinfo(interface, None, type=socket.SOCK_DGRAM)
    return str(found[0][4][0])


class SyncPortUnavailable(Exception):
    """The UDP port cannot be bound; the message names ``QUEEN_UDP_NOTIFY_PORT``.

    :ivar cause: the ``OSError`` (or Twisted's ``CannotListenError``) of the bind, so the
        caller can word the refusal for its cause.
    """

    def __init__(self, message: str, cause: BaseException):
        super().__init__(message)
        self.cause = cause


class _SyncProtocol(DatagramProtocol):
    def __init__(self, receive: Callable[[bytes, Tuple[str, int]], None]):
        self._receive = receive

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        try:
            self._receive(datagram, addr)
        except Exception:
            log.failure("peer-sync datagram from {addr} not handled", addr=addr)


class PeerSync(service.MultiService):
    """The peer-sync service: binds the UDP port, sends heartbeats, re-resolves peer names
    every 30 s, announces local events and applies the peers' ones through ``handlers``.

    :param settings: see :class:`SyncSettings`.
    :param handlers: see :class:`SyncHandlers`.
    :param reactor: provides ``listenUDP`` and is the clock of heartbeats and liveness.
    :param resolve: name resolution off the reactor thread (default ``reactor.resolve``).
    :param wall: seconds since the epoch, for the datagrams' send times, which other hosts
        hold to their clocks (default :func:`queen_tw.clock.wall_seconds`; the reactor keeps
        monotonic time).
    """

    def __init__(self, settings: SyncSettings, handlers: SyncHandlers, reactor,
                 resolve: Optional[Resolve] = None, wall: Callable[[], float] = wall_seconds):
        super().__init__()
        self._wall = wall
        self.settings = settings
        self._handlers = handlers
        self._reactor = reactor
        self._protocol = _SyncProtocol(self._received)
        self._listening: Optional[IListeningPort] = None
        self._session_id = os.urandom(dg.SESSION_ID_SIZE)
        self._sequence = 0
        self._guard = ReplayGuard(self._now_ms)
        self._table = PeerTable(reactor, settings.dead_threshold_ms)
        self._resolver = PeerResolver(settings.peers, resolve or reactor.resolve)
        self._learned: Dict[str, str] = {}
        self._unreachable: Dict[Tuple[str, int], bool] = {}
        self._drops: Counter[str] = Counter()
        self._drops_reported = 0
        self.messages_sent = 0
        self.messages_received = 0
        self.messages_dropped = 0
        self.signature_failures = 0
        self.sequence_rejections = 0
        PeriodicService("peer name resolution", RESOLVE_INTERVAL_MS, self._refresh_peers,
                        reactor, now=True).setServiceParent(self)
        PeriodicService("peer heartbeat", settings.heartbeat_ms, self._heartbeat, reactor,
                        now=True).setServiceParent(self)

    @property
    def session_id(self) -> bytes:
        """This run's random session id (a new one per :class:`PeerSync`)."""
        return self._session_id

    @property
    def port(self) -> int:
        """The bound UDP port (the configured one before :meth:`bind`)."""
        if self._listening is None:
            return self.settings.port
        address = self._listening.getHost()
        assert isinstance(address, (IPv4Address, IPv6Address))
        return address.port

    def bind(self) -> None:
        """Binds the UDP socket now (idempotent); start does it when not done before.

        :raises SyncPortUnavailable: the port is in use, privileged, or the interface is
            not an address of this machine.
        """
        if self._listening is not None:
            return
        settings = self.settings
        try:
            if settings.inherited_fd is not None:
                family = socket.AF_INET6 if ":" in settings.interface else socket.AF_INET
                self._listening = self._reactor.adoptDatagramPort(
                    settings.inherited_fd, family, self._protocol)
            else:
                self._listening = self._reactor.listenUDP(
                    settings.port, self._protocol, interface=_ip_literal(settings.interface))
        except (CannotListenError, OSError) as error:
            reason = getattr(error, "socketError", None) or error
            raise SyncPortUnavailable(
                f"QUEEN_UDP_NOTIFY_PORT={settings.port}: cannot listen on UDP "
                f"{settings.interface}:{settings.port} ({reason})", error) from None
        if settings.recv_buffer_bytes:
            self._set_receive_buffer(settings.recv_buffer_bytes)
        log.info("peer sync listening on UDP {interface}:{port} as {server_id}, "
                 "{count} peer(s), {signed}", interface=settings.interface, port=self.port,
                 server_id=settings.server_id, count=len(settings.peers),
                 signed="signed" if settings.secret else "unsigned")

    def privilegedStartService(self) -> None:
        self.bind()
        super().privilegedStartService()

    def startService(self) -> None:
        self.bind()
        super().startService()

    def stopService(self) -> defer.Deferred:
        stopped = defer.maybeDeferred(super().stopService)
        stopped.addCallback(self._unbind)
        return stopped

    def announce_messages(self, keys: Iterable[Tuple[str, Optional[str]]]) -> None:
        """One ``MESSAGE_AVAILABLE`` per distinct ``(queue, partition)`` in ``keys``; a
        ``None`` partition wakes every waiter of the queue."""
        for queue, partition in dict.fromkeys(keys):
            self._send(dg.MESSAGE_AVAILABLE,
                       {"queue": queue, "partition": partition, "ts": self._now_ms()})

    def announce_config_set(self, queue: str, config: Dict[str, Any]) -> None:
        """Tells peers the new config of ``queue`` (skipped with a log if over 1400 bytes)."""
        self._send(dg.QUEUE_CONFIG_SET,
                   {"queue": queue, "config": config, "version": self._now_ms()})

    def announce_config_delete(self, queue: str) -> None:
        """Tells peers ``queue`` was deleted."""
        self._send(dg.QUEUE_CONFIG_DELETE, {"queue": queue})

    def announce_maintenance(self, key: str, enabled: bool) -> None:
        """Tells peers a maintenance flag changed; ``key`` as in :class:`SyncHandlers`."""
        kind = next((kind for kind, name in MAINTENANCE_KEYS.items() if name == key), None)
        if kind is None:
            raise ValueError(f"unknown maintenance flag {key!r}")
        self._send(kind, {"enabled": enabled, "ts": self._now_ms()})

    def stats(self) -> Dict[str, Any]:
        """WIRE 3.7 ``shared-state`` fields this component knows (the server adds the
        config cache and the maintenance flags)."""
        settings = self.settings
        return {
            "enabled": True,
            "running": bool(self.running),
            "server_id": settings.server_id,
            "transport": {
                "server_id": settings.server_id,
                "session_id": self._session_id.hex(),
                "port": self.port,
                "peer_count": len(settings.peers),
                "peers": [str(peer) for peer in settings.peers],
                "peer_addresses": self._resolver.describe(),
                "learned_identities_count": len(self._learned),
                "learned_identities": dict(self._learned),
                "messages_sent": self.messages_sent,
                "messages_received": self.messages_received,
                "messages_dropped": self.messages_dropped,
                "signature_failures": self.signature_failures,
                "sequence_rejections": self.sequence_rejections,
                "drops_by_reason": dict(self._drops),
            },
            "server_health": self._table.counts(),
        }

    def _now_ms(self) -> int:
        return int(self._wall() * 1000)

    def _set_receive_buffer(self, size: int) -> None:
        handle = getattr(self._listening, "socket", None)
        if handle is None:
            return
        try:
            handle.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
        except OSError as error:
            log.warn("peer sync: receive buffer of {size} bytes refused ({error})",
                     size=size, error=error)

    def _unbind(self, result: Any) -> Any:
        listening, self._listening = self._listening, None
        if listening is None:
            return result
        return defer.maybeDeferred(listening.stopListening).addCallback(lambda _: result)

    async def _refresh_peers(self) -> None:
        await self._resolver.refresh()
        self._report_drops()

    async def _heartbeat(self) -> None:
        self._send(dg.HEARTBEAT, {"ts": self._now_ms()})
        self._table.sweep()

    def _send(self, kind: int, payload: Dict[str, Any]) -> None:
        if self._listening is None:
            return
        try:
            data = dg.encode(kind, payload, sender_id=self.settings.server_id,
                             session_id=self._session_id, sequence=self._sequence + 1,
                             sent_ms=self._now_ms(), secret=self.settings.secret)
        except DatagramTooLarge as error:
            log.warn("{type} for queue {queue} not sent to peers: {error}; they will read it "
                     "from PostgreSQL at their next refresh", type=dg.TYPE_NAMES[kind],
                     queue=payload.get("queue"), error=error)
            return
        self._sequence += 1
        for target in self._resolver.targets():
            self._send_to(data, target)

    def _send_to(self, data: bytes, target: Tuple[str, int]) -> None:
        assert self._listening is not None
        try:
            self._listening.write(data, target)  # type: ignore[attr-defined]
        except Exception as error:  # an unreachable network, a v6 address on a v4 socket
            if not self._unreachable.get(target):
                self._unreachable[target] = True
                log.warn("peer sync: cannot send to {target} ({error}); still trying",
                         target=target, error=error)
            return
        self.messages_sent += 1
        if self._unreachable.pop(target, False):
            log.info("peer sync: sending to {target} again", target=target)

    def _received(self, data: bytes, addr: Tuple[str, int]) -> None:
        try:
            datagram = dg.decode(data, self.settings.secret)
            if datagram.sender_id == self.settings.server_id and \
                    datagram.session_id == self._session_id:
                return
            self._guard.admit(datagram)
        except Rejected as rejected:
            self._dropped(rejected.reason, addr)
            return
        self.messages_received += 1
        if datagram.sender_id in self._learned or len(self._learned) < MAX_LEARNED:
            self._learned[datagram.sender_id] = f"{addr[0]}:{addr[1]}"
        self._dispatch(datagram)

    def _dropped(self, reason: str, addr: Tuple[str, int]) -> None:
        self.messages_dropped += 1
        if reason in dg.SIGNATURE_REASONS:
            self.signature_failures += 1
        if reason in dg.REPLAY_REASONS:
            self.sequence_rejections += 1
        if not self._drops[reason]:
            log.warn("peer sync: dropped a datagram from {addr}: {reason} (first of its kind; "
                     "counts in shared-state stats)", addr=addr, reason=reason)
        self._drops[reason] += 1

    def _report_drops(self) -> None:
        """A summary line of the drops since the last one, so a flood is one line per 30 s."""
        new = self.messages_dropped - self._drops_reported
        if new:
            self._drops_reported = self.messages_dropped
            log.warn("peer sync: {count} datagram(s) dropped since the last report; "
                     "totals by reason: {reasons}", count=new, reasons=dict(self._drops))

    def _dispatch(self, datagram: Datagram) -> None:
        payload = datagram.payload
        kind = datagram.type
        if kind == dg.HEARTBEAT:
            self._table.heartbeat(datagram.sender_id, datagram.session_id)
        elif kind == dg.MESSAGE_AVAILABLE:
            self._call(datagram, self._handlers.message_available, payload["queue"],
                       payload.get("partition"))
        elif kind == dg.QUEUE_CONFIG_SET:
            self._call(datagram, self._handlers.config_set, payload["queue"],
                       payload["config"])
        elif kind == dg.QUEUE_CONFIG_DELETE:
            self._call(datagram, self._handlers.config_delete, payload["queue"])
        else:
            self._call(datagram, self._handlers.maintenance, MAINTENANCE_KEYS[kind],
                       payload["enabled"])

    def _call(self, datagram: Datagram, handler: Callable[..., Any], *args: Any) -> None:
        try:
            result = handler(*args)
        except Exception:
            log.failure("handling {type} from {peer} failed", type=dg.TYPE_NAMES[datagram.type],
                        peer=datagram.sender_id)
            return
        if isinstance(result, defer.Deferred):
            result.addErrback(lambda failure: log.failure(
                "handling {type} from {peer} failed", failure,
                type=dg.TYPE_NAMES[datagram.type], peer=datagram.sender_id))
