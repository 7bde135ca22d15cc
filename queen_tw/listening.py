"""The HTTP listening socket: serve on it, or end the process saying why it cannot be had.

Where to listen is a Twisted endpoint description (``QUEEN_LISTEN`` / ``--listen``), so
native TLS (``ssl:6632:privateKey=key.pem:certKey=cert.pem``), a unix socket or a tcp
interface is a setting, not code; left empty it is today's TCP on ``HOST:PORT``. A
description Twisted cannot parse, or whose certificate or key file cannot be loaded, refuses
to start with one line naming ``QUEEN_LISTEN``.

A port already in use used to leave a traceback in the log and a process that kept running
without a listener, so a supervisor (systemd's ``Restart=on-failure``) never noticed. Here a
refused listen ends the process with one line such as ``queen-tw: cannot listen on
0.0.0.0:6632: address already in use (set PORT or --port)`` and status 1.
"""

from __future__ import annotations

import errno
import socket
from typing import TYPE_CHECKING, Any, Callable

from twisted.application import service
from twisted.internet import defer, endpoints
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from queen_tw.startup import fatal, refuse_to_start

log = Logger()

if TYPE_CHECKING:
    from queen_tw.config import Config

# How long a NUM_WORKERS worker waits for its first try at PostgreSQL before sharing the
# listening socket anyway (a hung database must not keep it from buffering pushes).
WORKER_JOIN_WAIT_S = 5.0
LISTEN_BACKLOG = 1024
"""Connections the kernel queues before the server accepts them (capped by the kernel's
``net.core.somaxconn``). Twisted's default of 50 made a burst of a few hundred clients
connecting at once, a fleet of consumers starting, wait a second for a SYN retransmit each."""

_HINTS = {
    errno.EADDRINUSE: "set PORT or --port",
    errno.EACCES: "ports below 1024 need privileges; set PORT or --port",
    errno.EADDRNOTAVAIL: "no such local address; set HOST or --host",
}


def listen_refusal(address: str, error: object, setting: str | None = None) -> str:
    """The one-line reason for a refused listen on ``address`` (``host:port``).

    ``error`` is the ``OSError`` of ``bind``/``listen`` or Twisted's ``CannotListenError``
    wrapping one; the operator's next step is named for the usual causes, or is "check
    ``setting``" when the address came from that setting (``QUEEN_LISTEN``).
    """
    cause = error.socketError if isinstance(error, CannotListenError) else error
    if isinstance(cause, OSError) and cause.strerror:
        text = cause.strerror[:1].lower() + cause.strerror[1:]
        hint = (f"check {setting}" if setting
                else _HINTS.get(cause.errno or 0, "check HOST and PORT"))
        return f"cannot listen on {address}: {text} ({hint})"
    return f"cannot listen on {address}: {cause}"


def listen_address(config: Config) -> str:
    """Where a process listens, as its refusal would name it."""
    if config.listen_fd is not None:
        return f"the inherited socket (QUEEN_LISTEN_FD={config.listen_fd})"
    if config.listen.strip():
        return config.listen.strip()
    return f"{config.host}:{config.port}"


def described_endpoint(reactor: Any, description: str) -> IStreamServerEndpoint:
    """The endpoint of a ``QUEEN_LISTEN`` description; refuses to start when it is unusable.

    ``serverFromString`` parses and, for ``ssl:``, loads the key and certificate at once, so
    a typo or a missing file is found here, before anything else starts. Its parsers raise
    whatever they meet (``ValueError`` for the syntax, ``OSError`` for a file, pyOpenSSL's
    errors for a file that is not a PEM key or certificate), hence the broad catch: every
    one of them ends the same way, one line naming the setting.
    """
    try:
        return endpoints.serverFromString(reactor, description)
    except Exception as err:
        refuse_to_start(f"QUEEN_LISTEN: cannot use {description!r}: {_reason(err)}")


def _reason(error: Exception) -> str:
    if isinstance(error, OSError) and error.strerror:
        where = f" ({error.filename})" if error.filename else ""
        return f"{error.strerror}{where}"
    if type(error).__module__.startswith("OpenSSL"):  # its text is a list of OpenSSL codes
        return f"not a usable PEM private key and certificate ({error})"
    return str(error) or error.__class__.__name__


def http_listener(config: Config, factory: Any, reactor: Any,
                  database_tried: Callable[[], defer.Deferred[None]] | None = None
                  ) -> ListenerService:
    """The listener of ``config``: the inherited socket of a ``NUM_WORKERS`` worker, else the
    ``QUEEN_LISTEN`` description, else TCP on ``HOST:PORT``.

    A worker shares its socket with siblings that may already serve, so it takes connections
    only once ``database_tried`` fires (its first attempt to reach PostgreSQL ended) or
    :data:`WORKER_JOIN_WAIT_S` passed: otherwise a worker (re)starting beside healthy siblings
    answers part of the traffic with 503 "Database unavailable" for no reason. A lone process
    listens at once, so ``/health`` says what it is doing from the start.
    """
    if config.listen_fd is not None:
        endpoint: IStreamServerEndpoint = endpoints.AdoptedStreamServerEndpoint(
            reactor, config.listen_fd, socket.AF_INET)
        not_before = None
        if database_tried is not None:
            tried = database_tried

            def not_before() -> defer.Deferred[None]:
                # PostgreSQL down or hung: join anyway, pushes then go to the file buffer
                return tried().addTimeout(WORKER_JOIN_WAIT_S, reactor,
                                          onTimeoutCancel=lambda *_: None)
        return ListenerService(endpoint, factory, reactor, listen_address(config),
                               not_before=not_before)
    description = config.listen.strip()
    if description:
        return ListenerService(described_endpoint(reactor, description), factory, reactor,
                               description, setting="QUEEN_LISTEN")
    endpoint = endpoints.TCP4ServerEndpoint(reactor, config.port, backlog=LISTEN_BACKLOG,
                                            interface=config.host)
    return ListenerService(endpoint, factory, reactor, listen_address(config))


class ListenerService(service.Service):
    """Serves ``factory`` on ``endpoint``; a refused listen ends the process.

    twistd calls :meth:`privilegedStartService` before the reactor runs, so a port in use
    (TCP endpoints listen synchronously) refuses to start with the reason on stderr. An
    endpoint that fails later, once the reactor runs, stops the server through
    :func:`queen_tw.startup.fatal`: both end with status 1.

    :param endpoint: where to listen.
    :param factory: the protocol factory (the HTTP site).
    :param reactor: tells whether the reactor runs yet and is stopped by a late failure.
    :param address: ``host:port`` (or a description) for the refusal message.
    :param setting: the setting ``address`` came from, named in the refusal's hint (None:
        the usual HOST/PORT hints).
    :param not_before: when given, listening waits until the Deferred it returns fires.
    """

    def __init__(self, endpoint: IStreamServerEndpoint, factory: Any, reactor: Any,
                 address: str, setting: str | None = None,
                 not_before: Callable[[], defer.Deferred[None]] | None = None) -> None:
        self._endpoint = endpoint
        self._not_before = not_before
        self._factory = factory
        self._reactor = reactor
        self._address = address
        self._setting = setting
        self._listening: defer.Deferred[Any] | None = None

    def privilegedStartService(self) -> None:
        """Listens now (twistd: before the reactor runs and before privileges are shed)."""
        super().privilegedStartService()
        refused: list[str] = []
        if self._not_before is None:
            self._listening = self._endpoint.listen(self._factory)
        else:
            self._listening = self._not_before().addCallback(
                lambda _: self._endpoint.listen(self._factory))
        self._listening.addErrback(self._listen_failed, refused)
        if refused:  # failed at once: raised here, a Deferred would swallow the SystemExit
            refuse_to_start(refused[0])

    def startService(self) -> None:
        """Listens unless :meth:`privilegedStartService` already did (services started
        without twistd, e.g. in tests)."""
        super().startService()
        if self._listening is None:
            self.privilegedStartService()

    def stopService(self) -> defer.Deferred[None] | None:
        """Stops listening; fires once the port is closed (or the attempt cancelled)."""
        super().stopService()
        listening, self._listening = self._listening, None
        if listening is None:
            return None
        listening.cancel()  # a no-op once the port is open
        return listening.addCallback(_stop_listening)

    def _listen_failed(self, failure: Failure, refused: list[str]) -> None:
        if failure.check(defer.CancelledError):
            return  # stopped before the port was open
        reason = listen_refusal(self._address, failure.value, self._setting)
        if self._reactor.running:
            fatal(self._reactor, reason)
        else:
            refused.append(reason)


class IdleConnectionsClosed(service.Service):
    """Added to stage ``listener`` before the listener, so it stops after it: closes the
    site's keep-alive connections that have no request under way (a request sent on one
    later would die unanswered with the process). Answers under way close theirs once the
    process is stopping (``make_site``'s ``stopping``)."""

    def __init__(self, site: Any) -> None:
        self._site = site

    def stopService(self) -> None:
        super().stopService()
        closed = self._site.close_idle_connections()
        if closed:
            log.info("closed {n} idle client connections", n=closed)


def _stop_listening(port: IListeningPort | None) -> defer.Deferred[None] | None:
    return port.stopListening() if port is not None else None


def open_listening_socket(host: str, port: int, backlog: int = LISTEN_BACKLOG) -> socket.socket:
    """A bound, listening TCP socket for processes that share it (``NUM_WORKERS``).

    Call it before the reactor runs (``privilegedStartService``): when the address cannot be
    had the process refuses to start with the same line as :class:`ListenerService`.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(backlog)
    except OSError as err:
        listener.close()
        refuse_to_start(listen_refusal(f"{host}:{port}", err))
    return listener
