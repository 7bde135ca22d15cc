"""The HTTP listener: a refused listen ends the process, before or after the reactor runs."""

from __future__ import annotations

import errno
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet import defer, endpoints
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactor, MemoryReactorClock

from queen_tw.config import Config
from queen_tw.listening import (
    LISTEN_BACKLOG,
    WORKER_JOIN_WAIT_S,
    ListenerService,
    http_listener,
    listen_refusal,
    open_listening_socket,
)


class LateEndpoint:
    """An endpoint whose listen is answered later, by the test."""

    def __init__(self) -> None:
        self.answer: defer.Deferred[object] = defer.Deferred()

    def listen(self, factory: object) -> defer.Deferred[object]:
        return self.answer


def in_use(port: int) -> CannotListenError:
    return CannotListenError("0.0.0.0", port, OSError(errno.EADDRINUSE, "Address already in use"))


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


@pytest.mark.parametrize("code,text,hint", [
    (errno.EADDRINUSE, "Address already in use", "set PORT or --port"),
    (errno.EACCES, "Permission denied", "ports below 1024 need privileges; set PORT or --port"),
    (errno.EADDRNOTAVAIL, "Cannot assign requested address",
     "no such local address; set HOST or --host"),
    (errno.EINVAL, "Invalid argument", "check HOST and PORT"),
])
def test_refusal_names_the_address_the_cause_and_what_to_change(
        code: int, text: str, hint: str) -> None:
    error = CannotListenError("h", 1, OSError(code, text))
    first, rest = text[0].lower(), text[1:]
    assert listen_refusal("h:1", error) == f"cannot listen on h:1: {first}{rest} ({hint})"


def test_a_port_refused_before_the_reactor_runs_ends_the_process() -> None:
    reactor = MemoryReactor()
    endpoint = LateEndpoint()
    endpoint.answer.errback(in_use(6632))
    listener = ListenerService(endpoint, Factory(), reactor, "0.0.0.0:6632")

    with pytest.raises(SystemExit, match="^queen-tw: cannot listen on 0.0.0.0:6632: address"):
        listener.privilegedStartService()


def test_a_port_refused_once_the_reactor_runs_stops_the_server() -> None:
    reactor = MemoryReactor()
    endpoint = LateEndpoint()
    listener = ListenerService(endpoint, Factory(), reactor, "0.0.0.0:6632")
    listener.privilegedStartService()
    reactor.running = True

    endpoint.answer.errback(in_use(6632))

    assert reactor.hasStopped
    assert reactor.triggers["after"]["shutdown"], "the exit after shutdown is not scheduled"


def test_a_listening_port_is_closed_when_the_service_stops() -> None:
    reactor = MemoryReactor()
    listener = ListenerService(endpoints.TCP4ServerEndpoint(reactor, 6632), Factory(), reactor,
                               "0.0.0.0:6632")
    listener.startService()
    [(port, *_)] = reactor.tcpServers
    assert port == 6632

    stopped = listener.stopService()

    assert stopped is not None and stopped.called
    assert not reactor.hasStopped


def test_stopping_before_the_port_opens_cancels_quietly() -> None:
    reactor = MemoryReactor()
    listener = ListenerService(LateEndpoint(), Factory(), reactor, "0.0.0.0:6632")
    listener.startService()

    listener.stopService()

    assert not reactor.hasStopped


def worker_listener(reactor: MemoryReactorClock, tried: defer.Deferred[None]
                    ) -> ListenerService:
    """The listener of one of NUM_WORKERS processes; its inherited socket is closed by the
    endpoint once adopted."""
    inherited = socket.socket(socket.AF_INET, socket.SOCK_STREAM).detach()
    config = Config.defaults().with_changes(listen_fd=inherited)
    return http_listener(config, Factory(), reactor, database_tried=lambda: tried)


def test_a_worker_takes_connections_only_once_its_database_was_tried() -> None:
    reactor = MemoryReactorClock()
    tried: defer.Deferred[None] = defer.Deferred()
    listener = worker_listener(reactor, tried)
    listener.privilegedStartService()
    listener.startService()
    assert reactor.adoptedPorts == []  # siblings answer meanwhile, not a 503 from this one

    tried.callback(None)

    [(_, family, _)] = reactor.adoptedPorts
    assert family == socket.AF_INET


def test_a_worker_whose_database_hangs_joins_after_a_bound() -> None:
    reactor = MemoryReactorClock()
    listener = worker_listener(reactor, defer.Deferred())  # never fires: PostgreSQL hung
    listener.startService()
    reactor.advance(WORKER_JOIN_WAIT_S - 0.1)
    assert reactor.adoptedPorts == []

    reactor.advance(0.2)

    assert len(reactor.adoptedPorts) == 1  # it serves: pushes go to its file buffer


def test_a_worker_stopped_while_waiting_for_its_database_never_listens() -> None:
    reactor = MemoryReactorClock()
    tried: defer.Deferred[None] = defer.Deferred()
    listener = worker_listener(reactor, tried)
    listener.startService()

    listener.stopService()
    tried.callback(None)
    reactor.advance(WORKER_JOIN_WAIT_S)

    assert reactor.adoptedPorts == [] and not reactor.hasStopped


def test_shared_socket_on_a_taken_port_ends_the_process(taken_port: int) -> None:
    with pytest.raises(SystemExit) as refused:
        open_listening_socket("127.0.0.1", taken_port)
    assert str(refused.value) == (f"queen-tw: cannot listen on 127.0.0.1:{taken_port}: "
                                  "address already in use (set PORT or --port)")


def test_shared_socket_listens() -> None:
    with open_listening_socket("127.0.0.1", 0) as listener, \
            socket.create_connection(listener.getsockname(), timeout=30) as client:
        assert client.getpeername() == listener.getsockname()


def test_a_server_queues_a_burst_of_connections(server) -> None:
    """Twisted's default backlog of 50 made a burst of a few hundred clients connecting at
    once wait a second each for a SYN retransmit (an audit: 45 to 167 of 400 connects), on
    an idle server. The listening socket's backlog (``ss``'s Send-Q) is the server's own."""
    listed = subprocess.run(["ss", "-ltnH", f"sport = :{server.port}"], capture_output=True,
                            text=True, check=True).stdout.split()
    kernel_cap = int(Path("/proc/sys/net/core/somaxconn").read_text())

    assert int(listed[2]) == min(LISTEN_BACKLOG, kernel_cap) > 50
