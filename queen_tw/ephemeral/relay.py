"""One relay hop to the instance that owns an ephemeral queue (``QUEEN_EPHEMERAL_PEERS``).

A request for a queue another member owns is sent on as it came (method, path and query
byte for byte, body, ``Authorization``) with the header ``x-queen-eph-fwd: 1``, and the
owner's answer is passed back (status, body, ``Retry-After``). A request that carries the
header is never relayed again: an instance that receives one for a queue it does not own
answers 503 ``owner_moved`` (two instances with different peer lists), so a request makes
at most one hop. An owner that cannot be reached answers 503 ``ephemeral_forward_failed``.
"""

from typing import Any, List, Optional

import treq
from treq.client import HTTPClient
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from queen_tw.ephemeral.errors import EphemeralError

FORWARDED_HEADER = b"x-queen-eph-fwd"

DEADLINE_S = 30.0
"""Longest wait for an owner's answer to a request that does not long-poll."""

LONG_POLL_SLACK_S = 5.0
"""Added to a relayed long poll's own timeout, so the owner's empty answer wins the race."""


class OwnerMoved(EphemeralError):
    """A relayed request reached an instance that does not own its queue either."""

    status = 503
    code = "owner_moved"


class ForwardFailed(EphemeralError):
    """The owner of the queue could not be reached."""

    status = 503
    code = "ephemeral_forward_failed"


def is_forwarded(request) -> bool:
    """Whether another instance relayed this request."""
    return request.requestHeaders.hasHeader(FORWARDED_HEADER)


class Relay:
    """Sends requests on to their queue's owner over persistent connections.

    :param reactor: for the connection pool and timeouts.
    """

    def __init__(self, reactor: IReactorTime):
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = 32
        self._http = HTTPClient(Agent(reactor, pool=self._pool))

    def close(self) -> "defer.Deferred[None]":
        """Closes the idle connections (at stop)."""
        return self._pool.closeCachedConnections()

    async def forward(self, request, owner: str, body: bytes,
                      timeout: float = DEADLINE_S) -> bytes:
        """Sends ``request`` (with ``body``) to ``owner`` and answers with the owner's
        answer; a client that goes away cancels the relayed request."""
        headers = Headers({FORWARDED_HEADER: [b"1"]})
        for name in (b"authorization", b"content-type"):
            value = request.getHeader(name)
            if value is not None:
                headers.setRawHeaders(name, [value])
        sent = self._http.request(request.method.decode(), owner + request.uri.decode(),
                                  data=body or None, headers=headers, timeout=timeout)
        gone: List[bool] = []

        def client_gone(_: Any) -> None:
            gone.append(True)
            sent.cancel()
        request.notifyFinish().addErrback(client_gone)
        try:
            response = await sent
            content = await treq.content(response)
        except Exception as err:
            if gone:  # cancelled for a client that left: there is no one to answer
                raise defer.CancelledError() from None
            if _cancelled(err):
                raise ForwardFailed(f"the owner of this queue ({owner}) did not answer "
                                    f"within {timeout:g} s") from None
            raise ForwardFailed(f"could not reach the owner of this queue ({owner}): "
                                f"{err}") from None
        request.setResponseCode(response.code)
        for name in (b"content-type", b"retry-after"):
            value = _first(response.headers.getRawHeaders(name))
            if value is not None:
                request.setHeader(name, value)
        request.setHeader(b"Content-Length", b"%d" % len(content))
        return content

    async def fetch(self, owner: str, path: str, request) -> Any:
        """GET ``path`` from ``owner`` as a relayed request; the decoded JSON answer."""
        headers = Headers({FORWARDED_HEADER: [b"1"]})
        authorization = request.getHeader(b"authorization")
        if authorization is not None:
            headers.setRawHeaders(b"authorization", [authorization])
        try:
            response = await self._http.get(owner + path, headers=headers,
                                            timeout=DEADLINE_S)
            if response.code != 200:
                raise ValueError(f"HTTP {response.code}")
            return await treq.json_content(response)
        except Exception as err:
            raise ForwardFailed(f"could not read the ephemeral queues of {owner}: "
                                f"{err}") from None


def _cancelled(error: Exception) -> bool:
    """Whether ``error`` is treq's timeout: a cancellation, bare or as the reason why no
    response came."""
    if isinstance(error, defer.CancelledError):
        return True
    reasons = getattr(error, "reasons", None) or []
    return any(reason.check(defer.CancelledError) for reason in reasons)


def _first(values: Optional[List[bytes]]) -> Optional[bytes]:
    return values[0] if values else None
