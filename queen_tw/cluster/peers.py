"""Who the peers are: the configured list, their addresses, and which of them are alive.

- :func:`parse_peers` reads ``QUEEN_UDP_PEERS`` (WIRE 5) and names the bad entry in its
  error so the server can refuse to start with one line;
- :class:`PeerResolver` turns host names into addresses off the reactor thread and again
  every :data:`RESOLVE_INTERVAL_MS`, so a peer moved to another address (a container
  restarted) is followed; a name that does not resolve is kept and retried;
- :class:`PeerTable` is the liveness view built from heartbeats, keyed by sender id (a
  peer's identity is what it says in its datagrams, not where they come from).
"""

import ipaddress
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, cast

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

RESOLVE_INTERVAL_MS = 30_000
_HOST_NAME = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9._-]*[A-Za-z0-9_])?$")


@dataclass(frozen=True)
class PeerAddress:
    """One configured peer: a host name or IP literal and its UDP port."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_peers(raw: str, default_port: int) -> List[PeerAddress]:
    """Parses a comma list of ``host[:port]`` (``http://``/``https://`` and a trailing ``/``
    allowed and stripped; IPv6 literals in brackets); blank entries are skipped.

    :raises ValueError: one line naming the bad entry (empty host, a path, a bad port).
    """
    peers: List[PeerAddress] = []
    for entry in raw.split(","):
        text = entry.strip()
        if text:
            peers.append(_parse_entry(text, default_port))
    return peers


def _parse_entry(entry: str, default_port: int) -> PeerAddress:
    rest = entry
    for scheme in ("http://", "https://"):
        if rest.lower().startswith(scheme):
            rest = rest[len(scheme):]
    rest = rest.removesuffix("/")
    if "/" in rest:
        raise ValueError(f"peer {entry!r}: expected host[:port], found a path")
    if rest.startswith("["):
        host, closing, after = rest[1:].partition("]")
        if not closing or (after and not after.startswith(":")):
            raise ValueError(f"peer {entry!r}: bad IPv6 literal, expected [address]:port")
        port_text: Optional[str] = after[1:] if after else None
        if not _is_ip(host) or ":" not in host:
            raise ValueError(f"peer {entry!r}: {host!r} is not an IPv6 address")
    else:
        host, colon, port_text_found = rest.partition(":")
        port_text = port_text_found if colon else None
        if not host:
            raise ValueError(f"peer {entry!r}: empty host")
        if not _HOST_NAME.match(host):
            raise ValueError(f"peer {entry!r}: {host!r} is not a host name or IPv4 address")
    return PeerAddress(host, _parse_port(entry, port_text, default_port))


def _parse_port(entry: str, text: Optional[str], default_port: int) -> int:
    if text is None:
        return default_port
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"peer {entry!r}: port {text!r} is not a number from 1 to 65535")
    return int(text)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


Resolve = Callable[[str], "defer.Deferred[str]"]
"""Name to address without blocking the reactor, e.g. ``reactor.resolve``."""


class PeerResolver:
    """The current address of every configured peer.

    IP literals are used as they are; names go through ``resolve`` at each
    :meth:`refresh`. A name that stops resolving keeps its last address (a DNS blip should
    not cut the cluster); one that never resolved is skipped when sending until it does.
    Each change of state is logged once: first address, new address, failure, recovery.
    """

    def __init__(self, peers: List[PeerAddress], resolve: Resolve):
        self._peers = list(peers)
        self._resolve = resolve
        self._addresses: Dict[PeerAddress, Optional[str]] = {
            peer: peer.host if _is_ip(peer.host) else None for peer in peers}
        self._failing: Dict[PeerAddress, bool] = {}

    async def refresh(self) -> None:
        """Resolves every host name once; failures are logged and kept for the next run."""
        names = [peer for peer in self._peers if not _is_ip(peer.host)]
        results = await defer.DeferredList([self._resolve(peer.host) for peer in names],
                                           consumeErrors=True)
        for peer, (succeeded, value) in zip(names, results, strict=True):
            if succeeded:
                self._resolved(peer, value)
            else:
                self._failed(peer, cast(Failure, value).getErrorMessage())

    def targets(self) -> List[Tuple[str, int]]:
        """Where to send: ``(address, port)`` of every peer with a known address."""
        return [(address, peer.port) for peer, address in self._addresses.items()
                if address is not None]

    def describe(self) -> List[Dict[str, Any]]:
        """Each configured peer with its current address (None: not resolved yet)."""
        return [{"peer": str(peer), "address": address}
                for peer, address in self._addresses.items()]

    def _resolved(self, peer: PeerAddress, address: str) -> None:
        previous = self._addresses[peer]
        if self._failing.pop(peer, False):
            log.info("peer {peer} resolves again, to {address}", peer=str(peer),
                     address=address)
        elif previous != address:
            log.info("peer {peer} resolves to {address}", peer=str(peer), address=address)
        self._addresses[peer] = address

    def _failed(self, peer: PeerAddress, error: str) -> None:
        if self._failing.get(peer):
            return
        self._failing[peer] = True
        kept = self._addresses[peer]
        log.warn("peer {peer} does not resolve ({error}); {what}, retried every {s} s",
                 peer=str(peer), error=error, s=RESOLVE_INTERVAL_MS // 1000,
                 what=f"still sending to {kept}" if kept else "nothing sent to it")


@dataclass
class _Liveness:
    session_id: bytes
    last_heartbeat: float
    alive: bool


class PeerTable:
    """Liveness of the peers that sent heartbeats, keyed by sender id.

    A heartbeat makes its sender alive; a sender is dead once ``dead_threshold_ms`` passes
    without one (read from ``clock`` whenever asked, so counts are exact between sweeps).
    A heartbeat carrying a new session id from a known sender is a restart. At most
    ``max_peers`` senders are kept (the least recently heard is forgotten), so forged ids
    cannot grow memory without bound.
    """

    def __init__(self, clock: IReactorTime, dead_threshold_ms: int, max_peers: int = 1024):
        self._clock = clock
        self._threshold = dead_threshold_ms / 1000.0
        self._max_peers = max_peers
        self._peers: OrderedDict[str, _Liveness] = OrderedDict()
        self.heartbeats_received = 0
        self.restarts_detected = 0

    def heartbeat(self, sender_id: str, session_id: bytes) -> None:
        """Records a heartbeat from ``sender_id`` in session ``session_id``."""
        now = self._clock.seconds()
        self.heartbeats_received += 1
        known = self._peers.get(sender_id)
        if known is None:
            log.info("peer {peer} is alive", peer=sender_id)
        elif known.session_id != session_id:
            self.restarts_detected += 1
            log.info("peer {peer} restarted (new session)", peer=sender_id)
        elif not known.alive:
            log.info("peer {peer} is alive again", peer=sender_id)
        self._peers[sender_id] = _Liveness(session_id, now, True)
        self._peers.move_to_end(sender_id)
        while len(self._peers) > self._max_peers:
            self._peers.popitem(last=False)

    def is_alive(self, sender_id: str) -> bool:
        """Whether ``sender_id`` sent a heartbeat within the dead threshold."""
        known = self._peers.get(sender_id)
        return known is not None and self._clock.seconds() - known.last_heartbeat \
            <= self._threshold

    def sweep(self) -> None:
        """Logs each peer that has gone dead since the last sweep (once per death)."""
        for sender_id, known in self._peers.items():
            if known.alive and not self.is_alive(sender_id):
                known.alive = False
                log.warn("peer {peer} is dead: no heartbeat for {ms} ms", peer=sender_id,
                         ms=int(self._threshold * 1000))

    def counts(self) -> Dict[str, int]:
        """The ``server_health`` fields of WIRE 3.7."""
        alive = sum(1 for sender_id in self._peers if self.is_alive(sender_id))
        return {
            "servers_tracked": len(self._peers),
            "servers_alive": alive,
            "servers_dead": len(self._peers) - alive,
            "heartbeats_received": self.heartbeats_received,
            "restarts_detected": self.restarts_detected,
        }
