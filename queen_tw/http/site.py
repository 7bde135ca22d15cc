"""The HTTP site: request ids, the access log, CORS on every answer, OPTIONS pre-flight, the
request body limit, and the time a request may take to arrive.

These are properties of every request, so they live in the request class instead of in each
route: a route never sees an oversized body or a pre-flight, and every answer — the hot
shortcut's, Klein's, a 404, a 413, the auth gate's 401 — carries ``X-Request-Id`` because
:meth:`QueenRequest.process` is where every request starts.
"""

import collections
import io
import itertools
import json
import os
import re
import time
from typing import Any, Callable, Optional

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel, _ChunkedTransferDecoder, _GenericHTTPChannelProtocol
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

REQUEST_ID_HEADER = b"X-Request-Id"

CORS_HEADERS = {
    b"Access-Control-Allow-Origin": b"*",
    b"Access-Control-Allow-Methods": b"GET, POST, PUT, DELETE, OPTIONS",
    b"Access-Control-Allow-Headers": b"Content-Type, Authorization, X-Request-Id",
    b"Access-Control-Expose-Headers": b"X-Request-Id",
}

UNREAD_ABOVE_BYTES = 1024 * 1024
"""An anonymous body larger than this, for a route that needs a token, is refused unread."""

CLIENT_LEFT = 499
"""The status an access line gives a request whose client closed the connection before the
answer was finished (nginx's convention; nothing with this code is ever sent)."""

ACCESS_FORMAT = ('{peer} "{method} {path}" {status} {bytes}B {durationMs}ms '
                 "id={request_id}")
"""The access line's text: rendered only by an observer that writes it (lazy)."""

access_log = Logger(namespace="queen_tw.access")
log = Logger()

_ACCEPTABLE_ID = re.compile(rb"[\x21-\x7e]{1,128}")
"""A client's ``X-Request-Id`` is kept when it is 1 to 128 visible ASCII characters."""


class RequestIds:
    """Short ids unique across processes: a random per-process prefix and a counter.

    Sixteen hex characters (more after 4 billion requests); no system call per request.
    """

    def __init__(self, prefix: Optional[str] = None):
        self._prefix = prefix if prefix is not None else os.urandom(4).hex()
        self._counter = itertools.count(1)

    def next(self) -> str:
        """A new id."""
        return f"{self._prefix}{next(self._counter):08x}"


_ids = RequestIds()


def accepted_request_id(header: Optional[bytes]) -> Optional[str]:
    """The client's ``X-Request-Id`` when it is acceptable (see :data:`_ACCEPTABLE_ID`),
    else None (the server makes one instead)."""
    if header is None or _ACCEPTABLE_ID.fullmatch(header) is None:
        return None
    return header.decode("ascii")


def request_id_of(request: Any) -> Optional[str]:
    """The id of the request at hand, for log events about it (None outside the site)."""
    return getattr(request, "request_id", None)


def _peer(address: Any) -> str:
    host = getattr(address, "host", None)
    return host if isinstance(host, str) else str(address)


class _Discard(io.BytesIO):
    """Swallows the body of a request that is already refused for its size."""

    def write(self, data) -> int:
        return len(data)


def _content_encoding(request: Request) -> Optional[str]:
    """The body's content coding when it is one the server cannot read (anything but
    ``identity``), else None."""
    values = request.requestHeaders.getRawHeaders(b"content-encoding") or []
    codings = [c.strip().lower() for v in values for c in v.decode("latin-1").split(",")]
    unread = [c for c in codings if c and c != "identity"]
    return ", ".join(unread) if unread else None


_ABSOLUTE_FORM = re.compile(rb"[Hh][Tt][Tt][Pp][Ss]?://[^/?#]*")


def _origin_form(target: bytes) -> bytes:
    """The path (and query) of a request target: an absolute-form target (RFC 9112 3.2.2,
    ``GET http://host/health``), which HTTP/1.1 servers must accept, is reduced to it."""
    match = _ABSOLUTE_FORM.match(target)
    if match is None:
        return target
    rest = target[match.end():]
    return rest if rest.startswith(b"/") else b"/" + rest


class QueenRequest(Request):
    """A request that carries an id, writes an access line, adds CORS headers, answers
    OPTIONS and refuses oversized bodies.

    ``access_log`` (bound per site by :func:`make_site`) says whether the access line is
    written: one info event per request, when it finishes or its client leaves.
    """

    max_body_bytes = 64 * 1024 * 1024
    max_push_items = 100000
    access_log = False

    request_id: Optional[str] = None
    """Set when the request is processed; echoed as ``X-Request-Id``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._received = 0
        self._too_large = False
        self._started = time.monotonic()
        self._logged = False

    def gotLength(self, length: Optional[int]) -> None:
        if length is not None and length > self.max_body_bytes:
            self._too_large = True
            self.content = _Discard()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._too_large:
            return
        self._received += len(data)
        if self._received > self.max_body_bytes:  # chunked bodies announce no length
            self._too_large = True
            if self.content is not None:
                self.content.close()
            self.content = _Discard()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        path = _origin_form(path)
        channel = self.channel
        if isinstance(channel, _DeadlineChannel) and channel.park(
                lambda: super(QueenRequest, self).requestReceived(command, path, version)):
            return
        super().requestReceived(command, path, version)

    def process(self) -> None:
        header = self.requestHeaders.getRawHeaders(REQUEST_ID_HEADER)
        request_id = accepted_request_id(header[0] if header else None) or _ids.next()
        self.request_id = request_id
        self.setHeader(REQUEST_ID_HEADER, request_id.encode("ascii"))
        for name, value in CORS_HEADERS.items():
            self.setHeader(name, value)
        if not self.path.startswith(b"/") and not (self.method == b"OPTIONS"
                                                   and self.path == b"*"):
            # The routes drop a path's first byte whatever it is, and the auth levels would
            # price the path as sent: "xapi/v1/system/…" reached admin routes as read-write.
            self._refuse(400, "The request target must be a path starting with '/' or an "
                              "absolute http(s) URL")
            return
        if self.method == b"OPTIONS":
            self.setHeader(b"Access-Control-Max-Age", b"86400")
            self.setResponseCode(204)
            self.finish()
            return
        if self._too_large:
            self._refuse(413, f"Request body larger than {self.max_body_bytes} bytes")
            return
        encoding = _content_encoding(self) if self._received else None  # a body to read
        if encoding is not None:
            # A compressed body would reach the routes as bytes that fail to parse: say why.
            self._refuse(415, f"Content-Encoding {encoding!r} is not supported: send the body "
                              "uncompressed (binary pushes compress their frames themselves)")
            return
        super().process()

    def write(self, data: bytes) -> None:
        site = getattr(self.channel, "site", None)
        if not self.startedWriting and isinstance(site, _QuietSite) and site.stopping():
            # The process is stopping: this answer ends its connection. The client's next
            # request then opens a new one, which the closed listener refuses (a network
            # error the clients fail over on); kept alive, it died unanswered with the
            # process (a protocol error the 2.6.0 client's consume() exits on).
            self.setHeader(b"connection", b"close")
            self.channel.persistent = False
        super().write(data)

    def finish(self) -> None:
        super().finish()
        self._log_access(self.code)

    def connectionLost(self, reason) -> None:
        super().connectionLost(reason)
        if not self.finished:
            self._log_access(CLIENT_LEFT)

    def _log_access(self, status: int) -> None:
        """The access line, once per processed request (a client that left mid-body has
        no request to log)."""
        if self._logged or self.request_id is None:
            return
        self._logged = True
        if not self.access_log:
            return
        access_log.info(ACCESS_FORMAT, peer=_peer(self.client),
                        method=self.method.decode("latin-1"),
                        path=self.uri.decode("utf-8", "replace"), status=status,
                        bytes=self.sentLength,
                        durationMs=round((time.monotonic() - self._started) * 1000, 2),
                        request_id=self.request_id)

    def _refuse(self, code: int, error: str) -> None:
        self.setResponseCode(code)
        self.setHeader(b"Content-Type", b"application/json")
        self.write(json.dumps({"error": error}).encode())
        self.finish()


class _DeadlineChannel(HTTPChannel):
    """An HTTP channel that gives each request ``site.read_timeout`` seconds from its first
    byte to arrive whole (headers and body), then answers 408 and closes the connection.

    Twisted's idle timeout starts over with every byte, so a client sending one byte every
    half minute held its connection (and a file descriptor) for good. The clock stops once
    the request is read: a long poll waits as long as it asks. Bytes a client sends while
    its previous request is being answered (pipelining) start no clock until it is done.
    """

    _read_timer: Optional[IDelayedCall] = None
    _counted_client: Optional[str] = None  # the address this connection counts against
    site: Optional[Site] = None  # set by the Site that builds the channel

    def connectionMade(self) -> None:
        super().connectionMade()
        site = self.site
        if isinstance(site, _QuietSite):
            site.open_channels.add(self)
        if not isinstance(site, _QuietSite) or not site.max_client_connections \
                or self.transport is None:
            return
        client = getattr(self.transport.getPeer(), "host", None)
        if client is None:
            return
        if not site.admit(client):
            self._answer_and_close(
                b"503 Service Unavailable",
                f"Too many connections from {client}: at most {site.max_client_connections} "
                "(QUEEN_MAX_CLIENT_CONNECTIONS); reuse connections or close idle ones")
            return
        self._counted_client = client

    # Pipelining behind a request in progress is read up to this many bytes. Twisted stops
    # reading the socket beyond its own (smaller) bound until the request is answered, and
    # a client that left meanwhile went unnoticed: a long poll's delivery leased to it hid
    # the messages for leaseTime. Beyond this the connection is closed instead, which the
    # request in progress sees as its client leaving (a long poll gives its delivery back).
    _optimisticEagerReadSize = 64 * 1024

    def dataReceived(self, data: bytes) -> None:
        if self._handlingRequest and data and (
                sum(map(len, self._dataBuffer)) + len(data) > self._optimisticEagerReadSize):
            self._close_overlong_pipeline()
            return
        limit = getattr(self.site, "read_timeout", 0)
        if data and limit and self._read_timer is None and not self._handlingRequest:
            self._read_timer = self.callLater(limit, self._too_slow)
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        self._stop_read_timer()
        super().allContentReceived()

    def _close_overlong_pipeline(self) -> None:
        peer = getattr(self.transport.getPeer(), "host", "?") if self.transport else "?"
        log.info("closing a connection from {peer}: more than {limit} bytes pipelined behind "
                 "a request in progress", peer=peer, limit=self._optimisticEagerReadSize)
        self._dataBuffer.clear()
        abort = getattr(self.transport, "abortConnection", None)
        if abort is not None:
            abort()
        elif self.transport is not None:
            self.transport.loseConnection()

    # Backpressure on pipelining. Twisted stops reading when the send buffer is full only
    # between requests, and answers every pipelined request it has read, full buffer or
    # not: a client pipelining requests answered at once (the OpenAPI document, dashboard
    # files) and never reading the answers grew the server by hundreds of MB. Here reading
    # stops whenever the send buffer is full, and a request read meanwhile waits (parked,
    # see QueenRequest.requestReceived) until the client has read what is ahead of it.
    _parked: Optional[Callable[[], None]] = None

    def pauseProducing(self) -> None:
        super().pauseProducing()
        if self._handlingRequest:
            self._networkProducer.pauseProducing()

    def resumeProducing(self) -> None:
        super().resumeProducing()
        parked, self._parked = self._parked, None
        if parked is not None:
            parked()

    def park(self, handle: Callable[[], None]) -> bool:
        """True when the send buffer is full: ``handle`` (a request's processing) then runs
        once it has drained, instead of adding its answer now."""
        if not self._waitingForTransport:
            return False
        self._parked = handle
        return True

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if isinstance(self.site, _QuietSite):
            self.site.open_channels.discard(self)
        self._stop_read_timer()
        self._parked = None
        if self._counted_client is not None and isinstance(self.site, _QuietSite):
            self.site.release(self._counted_client)
            self._counted_client = None
        super().connectionLost(reason)

    def _stop_read_timer(self) -> None:
        if self._read_timer is not None:
            if self._read_timer.active():
                self._read_timer.cancel()
            self._read_timer = None

    def allHeadersReceived(self) -> None:
        # A declared body over the limit is refused before it is read (and before Twisted
        # invites it with "100 Continue"); chunked bodies are counted as they come.
        # The request answers its 413 at once (id echoed, access line written), and the
        # connection closes after it rather than read what follows as a next request.
        limit = getattr(getattr(self.site, "requestFactory", None), "max_body_bytes", None)
        if limit is not None and self.length is not None and self.length > limit:
            self.persistent = False
            self.requests[-1].gotLength(self.length)
            self.length = 0  # no body is read: Twisted hands the request over right away
            return
        if self._refused_unread():
            self.persistent = False
            self.requests[-1].gotLength(0)
            self.length = 0  # handed over bodiless: the auth gate answers its 401
            return
        super().allHeadersReceived()
        self._anonymous_chunks = self.length is None and self._refused_anonymous()

    # A chunked body announces its size one chunk at a time, and never as a whole: it is
    # refused as soon as a chunk's header takes it past what it may be, rather than read to
    # its end (or to the read timeout) first.
    _anonymous_chunks = False  # a chunked body the auth gate will refuse (see above)

    def rawDataReceived(self, data: bytes) -> None:
        super().rawDataReceived(data)
        decoder = self._transferDecoder
        if self._handlingRequest or not isinstance(decoder, _ChunkedTransferDecoder) \
                or decoder.state != "BODY" or not self.requests \
                or getattr(self.transport, "disconnecting", True):
            return
        request = self.requests[-1]
        announced = getattr(request, "_received", 0) + decoder.length
        if announced > getattr(request, "max_body_bytes", announced):
            self._answer_and_close(b"413 Payload Too Large", "Request body larger than "
                                   f"{request.max_body_bytes} bytes")
        elif self._anonymous_chunks and announced > UNREAD_ABOVE_BYTES:
            self._answer_and_close(b"401 Unauthorized", "Authentication required")

    def _refused_unread(self) -> bool:
        """A body the auth gate will refuse whatever it holds (no token on a route that needs
        one), which the client waits to be invited to send ("Expect: 100-continue") or which
        is large: not read. A small body without that header is read as usual: closing on
        unread bytes can reset the connection before the client reads the 401."""
        if not self.length:
            return False
        request = self.requests[-1]
        expect = request.requestHeaders.getRawHeaders(b"expect") or []
        if self.length <= UNREAD_ABOVE_BYTES and b"100-continue" not in \
                [value.strip().lower() for value in expect]:
            return False
        return self._refused_anonymous()

    def _refused_anonymous(self) -> bool:
        """The auth gate will refuse this request whatever its body holds."""
        refuses = getattr(getattr(self.site, "resource", None), "refuses_unread", None)
        return refuses is not None and refuses(self._command, _origin_form(self._path),
                                               self.requests[-1].requestHeaders)

    def _respondToBadRequestAndDisconnect(self) -> None:
        # Twisted's answer to what it cannot parse (a malformed header, conflicting lengths,
        # a bad chunk size, too many headers) is a bare status line.
        self._answer_and_close(b"400 Bad Request", "Malformed HTTP request")

    def lineReceived(self, line: bytes) -> None:
        # Twisted answers a header block over its limits as malformed (400): say which.
        if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            self._answer_and_close(b"431 Request Header Fields Too Large", "The request's "
                                   f"headers are larger than {self.totalHeadersSize} bytes")
            return
        super().lineReceived(line)

    def headerReceived(self, line: bytes) -> bool:
        if self._receivedHeaderCount >= self.maxHeaders:
            self._answer_and_close(b"431 Request Header Fields Too Large",
                                   f"The request has more than {self.maxHeaders} headers")
            return False
        return super().headerReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        if getattr(self, "_HTTPChannel__first_line", 0):  # Twisted's own state, name-mangled
            self._answer_and_close(b"414 URI Too Long", "The request line is longer than "
                                   f"{self.MAX_LENGTH} bytes")
        else:
            self._answer_and_close(b"431 Request Header Fields Too Large",
                                   f"A header line is longer than {self.MAX_LENGTH} bytes")

    def _too_slow(self) -> None:
        self._read_timer = None
        self._answer_and_close(b"408 Request Timeout",
                               "Request Timeout: the request did not arrive in time")

    def _answer_and_close(self, status: bytes, error: str) -> None:
        """An answer from the channel itself, for a request no route will see: a JSON error
        with CORS headers and a request id, like every answer; then the connection closes."""
        self._stop_read_timer()
        if self.transport is None:
            return
        body = json.dumps({"error": error}).encode()
        head = [b"HTTP/1.1 " + status, b"Content-Type: application/json",
                b"Connection: close", b"Content-Length: %d" % len(body),
                REQUEST_ID_HEADER + b": " + _ids.next().encode("ascii"),
                *(name + b": " + value for name, value in CORS_HEADERS.items())]
        self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        log.debug("answered {status} from the connection itself: {error}",
                  status=status.decode(), error=error)
        self.loseConnection()


def _deadline_channel(factory: Site) -> _GenericHTTPChannelProtocol:
    # What Twisted's own factory function does (a private class of twisted.web.http, which
    # picks HTTP/1.1 or HTTP/2 per connection), with the channel above.
    return _GenericHTTPChannelProtocol(_DeadlineChannel())


class _QuietSite(Site):
    """A Site without twistd's own access log (:class:`QueenRequest` writes ours), whose
    connections give each request ``read_timeout`` seconds to arrive (0 = no limit), and
    which lets one client address hold at most ``max_client_connections`` connections
    (0 = no limit): each holds a file descriptor, and at the process's limit every client
    would be refused."""

    protocol = _deadline_channel
    read_timeout = 0.0
    max_client_connections = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._open_by_client: collections.Counter = collections.Counter()
        self._refusing: set = set()  # clients at the limit whose refusal was logged
        self.open_channels: set = set()
        self.stopping: Callable[[], bool] = lambda: False  # answers close their connections

    def close_idle_connections(self) -> int:
        """Closes every connection with no request under way (the listener is closed: the
        next request on one would die unanswered with the process); returns how many. The
        busy ones close after their answer (see :meth:`QueenRequest.write`)."""
        idle = [channel for channel in self.open_channels
                if not channel.requests and channel.transport is not None]
        for channel in idle:
            channel.transport.loseConnection()
        return len(idle)

    def admit(self, client: str) -> bool:
        """Counts a new connection from ``client``; False (not counted) when it already
        holds as many as allowed. The first refusal of a run is logged."""
        if self._open_by_client[client] >= self.max_client_connections:
            if client not in self._refusing:
                self._refusing.add(client)
                log.warn("refusing new connections from {client}: it holds {limit} "
                         "(QUEEN_MAX_CLIENT_CONNECTIONS)", client=client,
                         limit=self.max_client_connections)
            return False
        self._open_by_client[client] += 1
        return True

    def release(self, client: str) -> None:
        """A counted connection of ``client`` closed."""
        self._open_by_client[client] -= 1
        self._refusing.discard(client)
        if self._open_by_client[client] <= 0:
            del self._open_by_client[client]

    def log(self, request) -> None:
        pass


def make_site(resource: IResource, max_body_bytes: int, access_log: bool = False,
              max_push_items: int = QueenRequest.max_push_items,
              read_timeout_ms: int = 0, max_client_connections: int = 0,
              stopping: Callable[[], bool] = lambda: False) -> "_QuietSite":
    """A Site serving ``resource`` with :class:`QueenRequest`; ``access_log`` turns on one
    info line per request (``ACCESS_LOG``); ``max_push_items`` is QUEEN_MAX_PUSH_ITEMS,
    ``read_timeout_ms`` QUEEN_REQUEST_READ_TIMEOUT_MS and ``max_client_connections``
    QUEEN_MAX_CLIENT_CONNECTIONS; once ``stopping()``, every answer closes its connection."""
    limit, logged, items = max_body_bytes, access_log, max_push_items

    class BoundQueenRequest(QueenRequest):
        max_body_bytes = limit
        max_push_items = items
        access_log = logged

    # parsePOSTFormSubmission: Twisted would parse every POST's Content-Type with the email
    # package looking for HTML forms, ~17 % of a small push's CPU (py-spy). We take JSON only.
    site = _QuietSite(resource, parsePOSTFormSubmission=False)
    site.requestFactory = BoundQueenRequest
    site.read_timeout = read_timeout_ms / 1000.0
    # A connection with no request under way (new, or kept alive after an answer) is closed
    # after Twisted's idle timeout (60 s), or a second after the read timeout when that is
    # shorter: otherwise silent connections outlived the limit an operator set for slow
    # ones. (The second: a request stalled mid-way meets the read timeout first, and its 408.)
    if site.read_timeout:
        site.timeOut = min(site.timeOut or 60, site.read_timeout + 1)
    site.max_client_connections = max_client_connections
    site.stopping = stopping
    return site
