"""Peer sync (WIRE 6): peer list parsing, name resolution, liveness on a driven clock, and
several PeerSync instances in this process talking over real loopback UDP sockets."""

import random
import socket
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from queen_tw.cluster import datagram as dg
from queen_tw.cluster.peer_sync import PeerSync, SyncHandlers, SyncPortUnavailable, SyncSettings
from queen_tw.cluster.peers import PeerAddress, PeerResolver, PeerTable, parse_peers

from datagram_fuzz import hostile_datagrams

SECRET = b"cluster secret"
CEILING_S = 30.0


# --- peer list ------------------------------------------------------------------------------

def test_peers_are_parsed_with_schemes_slashes_spaces_and_default_ports_handled():
    peers = parse_peers(" http://queen-b:7000/, https://10.0.0.3 ,queen-d, [::1]:6640,, ",
                        6633)

    assert peers == [PeerAddress("queen-b", 7000), PeerAddress("10.0.0.3", 6633),
                     PeerAddress("queen-d", 6633), PeerAddress("::1", 6640)]
    assert [str(peer) for peer in peers][-1] == "[::1]:6640"
    assert parse_peers("", 6633) == []


@pytest.mark.parametrize("raw, named", [
    ("queen-b:0", "'queen-b:0'"),
    ("queen-b:65536", "65536"),
    ("queen-b:http", "'http'"),
    ("queen-b:", "queen-b:"),
    ("http://", "empty host"),
    (":6633", "empty host"),
    ("queen-b/api", "path"),
    ("queen b", "'queen b'"),
    ("ok-host, bad host:1", "'bad host:1'"),
    ("[::1", "IPv6"),
    ("[not-v6]:1", "IPv6"),
    ("queen-b:٣", "'٣'"),
])
def test_a_bad_peer_entry_is_a_one_line_error_naming_it(raw, named):
    with pytest.raises(ValueError) as caught:
        parse_peers(raw, 6633)

    message = str(caught.value)
    assert named in message and "\n" not in message


class _FakeDns:
    """Answers from a dict that tests change; a missing name fails like a DNS error."""

    def __init__(self, answers: Dict[str, str]):
        self.answers = answers
        self.asked: List[str] = []

    def __call__(self, name: str) -> defer.Deferred:
        self.asked.append(name)
        if name in self.answers:
            return defer.succeed(self.answers[name])
        return defer.fail(OSError(f"no such host {name}"))


def _refresh(resolver: PeerResolver) -> None:
    done = defer.ensureDeferred(resolver.refresh())
    assert done.called, "the fake resolver answers at once"


def test_names_are_resolved_ip_literals_are_not_and_an_unresolved_name_is_kept_and_retried():
    dns = _FakeDns({"queen-b": "10.0.0.2"})
    resolver = PeerResolver(parse_peers("queen-b, 10.0.0.9:7000, queen-c", 6633), dns)

    assert resolver.targets() == [("10.0.0.9", 7000)]
    _refresh(resolver)
    assert resolver.targets() == [("10.0.0.2", 6633), ("10.0.0.9", 7000)]
    assert dns.asked == ["queen-b", "queen-c"]

    dns.answers = {"queen-c": "10.0.0.3"}
    _refresh(resolver)
    assert resolver.targets() == [("10.0.0.2", 6633), ("10.0.0.9", 7000), ("10.0.0.3", 6633)]
    dns.answers = {"queen-b": "10.0.0.12", "queen-c": "10.0.0.3"}
    _refresh(resolver)
    assert ("10.0.0.12", 6633) in resolver.targets()


def test_a_failing_name_is_logged_once_per_change_of_state():
    events: List[Dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        dns = _FakeDns({})
        resolver = PeerResolver(parse_peers("queen-b", 6633), dns)
        for _ in range(3):
            _refresh(resolver)
        dns.answers = {"queen-b": "10.0.0.2"}
        _refresh(resolver)
        _refresh(resolver)
    finally:
        globalLogPublisher.removeObserver(events.append)

    formats = [event["log_format"] for event in events if "peer" in event]
    assert formats == ["peer {peer} does not resolve ({error}); {what}, retried every {s} s",
                       "peer {peer} resolves again, to {address}"]


# --- liveness on a driven clock -------------------------------------------------------------

def test_a_peer_is_alive_after_a_heartbeat_and_dead_once_the_threshold_passes_without_one():
    clock = task.Clock()
    table = PeerTable(clock, dead_threshold_ms=5000)
    table.heartbeat("b:6633", b"1" * 16)
    clock.advance(5.0)

    assert table.counts()["servers_alive"] == 1
    clock.advance(0.001)
    assert table.counts() == {"servers_tracked": 1, "servers_alive": 0, "servers_dead": 1,
                              "heartbeats_received": 1, "restarts_detected": 0}
    table.heartbeat("b:6633", b"1" * 16)
    assert table.is_alive("b:6633") and table.restarts_detected == 0


def test_a_new_session_of_a_known_sender_is_a_restart():
    table = PeerTable(task.Clock(), dead_threshold_ms=5000)
    table.heartbeat("b:6633", b"1" * 16)
    table.heartbeat("c:6633", b"2" * 16)
    table.heartbeat("b:6633", b"3" * 16)
    table.heartbeat("b:6633", b"3" * 16)

    assert table.counts() == {"servers_tracked": 2, "servers_alive": 2, "servers_dead": 0,
                              "heartbeats_received": 4, "restarts_detected": 1}


def test_a_death_is_logged_once_and_the_table_is_bounded():
    clock = task.Clock()
    table = PeerTable(clock, dead_threshold_ms=1000, max_peers=2)
    events: List[Dict[str, Any]] = []
    for sender in ("a", "b", "c"):
        table.heartbeat(sender, b"1" * 16)
    globalLogPublisher.addObserver(events.append)
    try:
        clock.advance(2.0)
        table.sweep()
        table.sweep()
    finally:
        globalLogPublisher.removeObserver(events.append)

    dead = sorted(event["peer"] for event in events if "is dead" in event["log_format"])
    assert dead == ["b", "c"]
    assert table.counts()["servers_tracked"] == 2


# --- PeerSync over real loopback sockets ----------------------------------------------------

class _Recorder:
    """The handlers of one instance: records every call, lets a test await the n-th."""

    def __init__(self, fail_first: bool = False):
        self.calls: List[Tuple[Any, ...]] = []
        self._fail_first = fail_first
        self._waiting: List[Tuple[int, defer.Deferred]] = []

    def handlers(self) -> SyncHandlers:
        return SyncHandlers(
            message_available=lambda queue, partition: self._record("message", queue,
                                                                   partition),
            config_set=lambda queue, config: self._record("config_set", queue, config),
            config_delete=lambda queue: self._record("config_delete", queue),
            maintenance=lambda key, enabled: self._record("maintenance", key, enabled))

    def _record(self, *call: Any) -> None:
        self.calls.append(call)
        for count, waiting in list(self._waiting):
            if len(self.calls) >= count:
                self._waiting.remove((count, waiting))
                waiting.callback(None)
        if self._fail_first and len(self.calls) == 1:
            raise RuntimeError("handler bug")

    async def wait_for(self, count: int) -> List[Tuple[Any, ...]]:
        if len(self.calls) < count:
            waiting: defer.Deferred = defer.Deferred()
            self._waiting.append((count, waiting))
            await waiting.addTimeout(CEILING_S, reactor)
        return self.calls


class _Capture(DatagramProtocol):
    """A plain UDP socket: keeps what it receives and can send raw bytes."""

    def __init__(self):
        self.received: List[bytes] = []

    def datagramReceived(self, datagram, addr):
        self.received.append(datagram)

    def of_type(self, kind: int) -> List[bytes]:
        return [data for data in self.received if data[4] == kind]


async def eventually(condition: Callable[[], bool], what: str) -> None:
    """Polls ``condition`` on the reactor until true; fails after CEILING_S."""
    deadline = reactor.seconds() + CEILING_S
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError(f"still not true after {CEILING_S} s: {what}")
        await task.deferLater(reactor, 0.002, lambda: None)


class _Cluster:
    """Starts PeerSync instances and capture sockets on 127.0.0.1, stops them all at the end."""

    def __init__(self):
        self.started: List[PeerSync] = []
        self.sockets: List[Any] = []

    def capture(self) -> Tuple[_Capture, int]:
        protocol = _Capture()
        port = reactor.listenUDP(0, protocol, interface="127.0.0.1")
        self.sockets.append(port)
        return protocol, port.getHost().port

    def sync(self, peers: List[int], recorder: Optional[_Recorder] = None, *,
             secret: Optional[bytes] = SECRET, server_id: str = "a:1",
             heartbeat_ms: int = 60_000, dead_threshold_ms: int = 120_000,
             clock: Any = None, **extra: Any) -> PeerSync:
        settings = SyncSettings(
            peers=[PeerAddress("127.0.0.1", port) for port in peers], port=0,
            interface="127.0.0.1", secret=secret, heartbeat_ms=heartbeat_ms,
            dead_threshold_ms=dead_threshold_ms, server_id=server_id, **extra)
        # a driven clock stands for the wall clock too (the datagrams' send times)
        sync = PeerSync(settings, (recorder or _Recorder()).handlers(), clock or reactor,
                        **({"wall": clock.seconds} if clock is not None else {}))
        sync.startService()
        self.started.append(sync)
        return sync

    async def stop(self) -> None:
        for sync in self.started:
            if sync.running:
                await sync.stopService()
        for port in self.sockets:
            await port.stopListening()


def _transport(sync: PeerSync) -> Dict[str, Any]:
    return sync.stats()["transport"]


@pytest_twisted.ensureDeferred
async def test_each_announcement_reaches_the_peer_handlers_once_per_distinct_partition():
    cluster = _Cluster()
    try:
        got = _Recorder()
        a = cluster.sync([], got)
        b = cluster.sync([a.port], server_id="b:1")
        b.announce_messages([("orders", "eu"), ("orders", "eu"), ("orders", "us"),
                             ("orders", "eu")])
        b.announce_config_set("orders", {"lease_time": 45})
        b.announce_config_delete("old")
        b.announce_maintenance("maintenance_mode", True)
        b.announce_maintenance("pop_maintenance_mode", False)

        calls = await got.wait_for(6)
        assert calls == [("message", "orders", "eu"), ("message", "orders", "us"),
                         ("config_set", "orders", {"lease_time": 45}),
                         ("config_delete", "old"), ("maintenance", "maintenance_mode", True),
                         ("maintenance", "pop_maintenance_mode", False)]
        assert _transport(a)["learned_identities"] == {"b:1": f"127.0.0.1:{b.port}"}
        with pytest.raises(ValueError):
            b.announce_maintenance("other_mode", True)
    finally:
        await cluster.stop()


@pytest_twisted.ensureDeferred
async def test_wrong_or_missing_secrets_are_signature_failures_and_reach_no_handler():
    cluster = _Cluster()
    try:
        got = _Recorder()
        a = cluster.sync([], got)
        wrong = cluster.sync([a.port], server_id="wrong:1", secret=b"not the secret")
        unsigned = cluster.sync([a.port], server_id="unsigned:1", secret=None)
        good = cluster.sync([a.port], server_id="good:1")
        wrong.announce_messages([("orders", "eu")])
        unsigned.announce_messages([("orders", "eu")])
        await eventually(lambda: _transport(a)["signature_failures"] == 4,
                         "two heartbeats and two announcements refused")
        good.announce_messages([("orders", "marker")])

        assert await got.wait_for(1) == [("message", "orders", "marker")]
        assert _transport(a)["drops_by_reason"] == {"bad_signature": 2, "unsigned": 2}
        assert a.stats()["server_health"]["servers_tracked"] == 1
    finally:
        await cluster.stop()


@pytest_twisted.ensureDeferred
async def test_a_replayed_datagram_is_a_sequence_rejection_and_wakes_nobody():
    cluster = _Cluster()
    try:
        got = _Recorder()
        a = cluster.sync([], got)
        spy, spy_port = cluster.capture()
        b = cluster.sync([a.port, spy_port], server_id="b:1")
        b.announce_messages([("orders", "eu")])
        await got.wait_for(1)
        await eventually(lambda: spy.of_type(dg.MESSAGE_AVAILABLE), "the spy got the copy")

        cluster.sockets[0].write(spy.of_type(dg.MESSAGE_AVAILABLE)[0], ("127.0.0.1", a.port))
        await eventually(lambda: _transport(a)["sequence_rejections"] == 1, "replay refused")
        b.announce_messages([("orders", "marker")])
        assert await got.wait_for(2) == [("message", "orders", "eu"),
                                         ("message", "orders", "marker")]
        assert _transport(a)["drops_by_reason"] == {"replayed": 1}
    finally:
        await cluster.stop()


@pytest_twisted.ensureDeferred
async def test_own_datagrams_are_ignored_without_counting_as_drops():
    cluster = _Cluster()
    try:
        got = _Recorder()
        spy, spy_port = cluster.capture()
        a = cluster.sync([spy_port], got)
        a.announce_messages([("orders", "eu")])
        await eventually(lambda: spy.of_type(dg.MESSAGE_AVAILABLE), "a's datagram captured")
        for data in spy.received:
            cluster.sockets[0].write(data, ("127.0.0.1", a.port))
        b = cluster.sync([a.port], server_id="b:1")
        b.announce_messages([("orders", "marker")])

        assert await got.wait_for(1) == [("message", "orders", "marker")]
        assert _transport(a)["messages_dropped"] == 0
        assert _transport(a)["messages_received"] == 2  # b's heartbeat and b's announcement
    finally:
        await cluster.stop()


@pytest_twisted.ensureDeferred
async def test_heartbeats_make_a_peer_alive_a_stopped_one_dead_and_a_new_session_a_restart():
    cluster = _Cluster()
    try:
        a = cluster.sync([], dead_threshold_ms=300)

        def health() -> Dict[str, int]:
            return a.stats()["server_health"]

        b = cluster.sync([a.port], server_id="b:1", heartbeat_ms=50)
        await eventually(lambda: health()["heartbeats_received"] >= 3, "b's heartbeats")
        assert health()["servers_alive"] == 1
        await b.stopService()
        await eventually(lambda: health()["servers_dead"] == 1, "b seen dead")
        assert health()["servers_alive"] == 0 and health()["restarts_detected"] == 0

        cluster.sync([a.port], server_id="b:1", heartbeat_ms=50)
        await eventually(lambda: health()["servers_alive"] == 1, "b alive again")
        assert health()["restarts_detected"] == 1 and health()["servers_tracked"] == 1
    finally:
        await cluster.stop()


@pytest_twisted.ensureDeferred
async def test_ten_thousand_hostile_datagrams_are_counted_as_dropped_and_the_socket_serves_on():
    cluster = _Cluster()
    try:
        got = _Recorder()
        a = cluster.sync([], got, recv_buffer_bytes=4 * 1024 * 1024)
        cluster.capture()
        hostile = hostile_datagrams(random.Random(6633), 10_000, SECRET,
                                    sent_ms=int(reactor.seconds() * 1000))
        for sent, data in enumerate(hostile, start=1):
            cluster.sockets[0].write(data, ("127.0.0.1", a.port))
            if sent % 100 == 0:  # paced, so the kernel's receive buffer never overflows
                await eventually(lambda count=sent: _transport(a)["messages_dropped"] == count,
                                 f"{sent} datagrams counted")
        cluster.sync([a.port], server_id="b:1").announce_messages([("orders", "marker")])

        assert await got.wait_for(1) == [("message", "orders", "marker")]
        transport = _transport(a)
        assert transport["messages_dropped"] == 10_000 == sum(
            transport["drops_by_reason"].values())
        assert transport["messages_received"] == 2 and a.running
    finally:
        await cluster.stop()


@pytest_twisted.ensureDeferred
async def test_a_failing_handler_is_logged_and_the_next_datagram_is_still_handled():
    cluster = _Cluster()
    events: List[Dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        got = _Recorder(fail_first=True)
        a = cluster.sync([], got)
        b = cluster.sync([a.port], server_id="b:1")
        b.announce_messages([("orders", "eu"), ("orders", "us")])

        assert await got.wait_for(2) == [("message", "orders", "eu"), ("message", "orders", "us")]
        failures = [event for event in events if isinstance(event.get("log_failure"), Failure)]
        assert [(event["log_format"], event["log_failure"].getErrorMessage(), event["peer"])
                for event in failures] == [
            ("handling {type} from {peer} failed", "handler bug", "b:1")]
        assert a.running
    finally:
        globalLogPublisher.removeObserver(events.append)
        await cluster.stop()


@pytest_twisted.ensureDeferred
async def test_a_config_over_the_datagram_limit_is_not_sent():
    cluster = _Cluster()
    try:
        got = _Recorder()
        spy, spy_port = cluster.capture()
        a = cluster.sync([], got)
        b = cluster.sync([a.port, spy_port], server_id="b:1")
        b.announce_config_set("orders", {"note": "x" * 2000})
        b.announce_config_set("orders", {"lease_time": 5})

        assert await got.wait_for(1) == [("config_set", "orders", {"lease_time": 5})]
        await eventually(lambda: spy.of_type(dg.QUEUE_CONFIG_SET), "the spy got the config")
        assert all(len(data) <= dg.MAX_DATAGRAM for data in spy.received)
        assert len(spy.of_type(dg.QUEUE_CONFIG_SET)) == 1
    finally:
        await cluster.stop()


@pytest_twisted.ensureDeferred
async def test_a_port_in_use_refuses_to_start_naming_the_setting():
    cluster = _Cluster()
    try:
        a = cluster.sync([])
        settings = SyncSettings(peers=[], port=a.port, interface="127.0.0.1", secret=None,
                                heartbeat_ms=1000, dead_threshold_ms=5000, server_id="b:1")
        b = PeerSync(settings, _Recorder().handlers(), reactor)

        with pytest.raises(SyncPortUnavailable) as caught:
            b.privilegedStartService()
        assert f"QUEEN_UDP_NOTIFY_PORT={a.port}" in str(caught.value)
        assert not b.running
    finally:
        await cluster.stop()


class _ClockedReactor:
    """Real sockets, driven time: heartbeats happen when the test advances the clock."""

    def __init__(self, clock: task.Clock):
        self._clock = clock

    def __getattr__(self, name: str) -> Any:
        if name in ("seconds", "callLater", "getDelayedCalls"):
            return getattr(self._clock, name)
        return getattr(reactor, name)


@pytest_twisted.ensureDeferred
async def test_heartbeats_are_sent_at_start_and_then_every_interval():
    cluster = _Cluster()
    try:
        clock = task.Clock()
        clock.advance(1_700_000_000)
        spy, spy_port = cluster.capture()
        b = cluster.sync([spy_port], server_id="b:1", heartbeat_ms=1000,
                         clock=_ClockedReactor(clock))
        clock.advance(0.999)
        b.announce_messages([("orders", "marker")])
        await eventually(lambda: len(spy.received) == 2, "first heartbeat and the marker")
        clock.advance(0.001)
        await eventually(lambda: len(spy.received) == 3, "second heartbeat")

        kinds = [dg.decode(data, SECRET).type for data in spy.received]
        assert kinds == [dg.HEARTBEAT, dg.MESSAGE_AVAILABLE, dg.HEARTBEAT]
        assert [dg.decode(data, SECRET).sequence for data in spy.received] == [1, 2, 3]
        assert dg.decode(spy.received[2], SECRET).sent_ms == 1_700_000_001_000
    finally:
        await cluster.stop()


@pytest_twisted.ensureDeferred
async def test_stats_have_the_wire_3_7_shape():
    cluster = _Cluster()
    try:
        a = cluster.sync([9, 10], server_id="a:1")
        stats = a.stats()

        assert stats["enabled"] is True and stats["running"] is True
        assert stats["server_id"] == "a:1"
        assert set(stats["transport"]) >= {
            "server_id", "session_id", "port", "peer_count", "peers",
            "learned_identities_count", "learned_identities", "messages_sent",
            "messages_received", "messages_dropped", "signature_failures",
            "sequence_rejections"}
        assert stats["transport"]["peers"] == ["127.0.0.1:9", "127.0.0.1:10"]
        assert stats["transport"]["peer_addresses"] == [
            {"peer": "127.0.0.1:9", "address": "127.0.0.1"},
            {"peer": "127.0.0.1:10", "address": "127.0.0.1"}]
        assert stats["transport"]["port"] == a.port != 0
        assert len(stats["transport"]["session_id"]) == 32
        assert set(stats["server_health"]) == {"servers_tracked", "servers_alive",
                                               "servers_dead", "heartbeats_received",
                                               "restarts_detected"}
        await a.stopService()
        assert a.stats()["running"] is False
    finally:
        await cluster.stop()


@pytest_twisted.ensureDeferred
async def test_an_inherited_socket_is_used_instead_of_binding_the_port():
    cluster = _Cluster()
    inherited = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        inherited.bind(("127.0.0.1", 0))
        inherited.setblocking(False)
        got = _Recorder()
        a = cluster.sync([], got, inherited_fd=inherited.fileno())
        assert a.port == inherited.getsockname()[1]
        cluster.sync([a.port], server_id="b:1").announce_messages([("orders", "eu")])

        assert await got.wait_for(1) == [("message", "orders", "eu")]
    finally:
        await cluster.stop()
        inherited.close()


@pytest_twisted.ensureDeferred
async def test_a_peer_host_name_is_resolved_and_sent_to():
    cluster = _Cluster()
    try:
        got = _Recorder()
        a = cluster.sync([], got)
        settings = SyncSettings(peers=[PeerAddress("localhost", a.port)], port=0,
                                interface="127.0.0.1", secret=SECRET, heartbeat_ms=60_000,
                                dead_threshold_ms=120_000, server_id="b:1")
        b = PeerSync(settings, _Recorder().handlers(), reactor)
        b.startService()
        cluster.started.append(b)
        await eventually(lambda: _transport(b)["peer_addresses"] == [
            {"peer": f"localhost:{a.port}", "address": "127.0.0.1"}], "localhost resolved")
        b.announce_messages([("orders", "eu")])

        assert await got.wait_for(1) == [("message", "orders", "eu")]
    finally:
        await cluster.stop()
