"""The gate's two ways of deciding (queen_tw/http/auth_gate.py), in-process over a socket.

A token seen before is decided synchronously; a new one is verified asynchronously and the
request continues afterwards: with the routes' answer, a 403, the verifier's 401/500, or
nothing at all when the client left meanwhile. The routes behind the gate are a recording
resource, and the verifier is the real :class:`TokenVerifier` (HS256) — only the tests that
need to hold a verification open or make it fail replace its ``verify``.
"""

from __future__ import annotations

import json
import time
from typing import Any, List, Optional

import jwt
import pytest_twisted
import treq
from twisted.internet import defer, endpoints, protocol, reactor
from twisted.protocols import policies
from twisted.web.resource import Resource

from queen_tw.auth.errors import AuthError
from queen_tw.auth.levels import RoleNames, RouteLevels, SkipPaths
from queen_tw.auth.tokens import Identity, TokenVerifier
from queen_tw.http.auth_gate import AuthGate, identity_of, producer_sub
from queen_tw.http.site import make_site

from tests.support import wait_until_reactor

SECRET = "gate-secret-that-is-long-enough-for-hs256"


def token(role: str = "read-write", sub: str = "gate-user") -> str:
    now = int(time.time())
    return jwt.encode({"sub": sub, "role": role, "iat": now, "exp": now + 600}, SECRET,
                      algorithm="HS256")


class Recorder(Resource):
    """The routes behind the gate: answers 200 with the producerSub the gate handed over."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.rendered: List[Optional[Identity]] = []

    def render(self, request: Any) -> bytes:
        self.rendered.append(identity_of(request))
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps({"producerSub": producer_sub(request)}).encode()


class CountingVerifier(TokenVerifier):
    """The real verifier, counting how often a token had to be verified in full."""

    def __init__(self) -> None:
        super().__init__(algorithm="HS256", clock=reactor, secret=SECRET)
        self.verified = 0

    async def verify(self, authorization: Optional[bytes]) -> Identity:
        self.verified += 1
        return await super().verify(authorization)


class HeldVerifier(TokenVerifier):
    """A verifier whose full verification waits until the test fires ``outcome``."""

    def __init__(self) -> None:
        super().__init__(algorithm="HS256", clock=reactor, secret=SECRET)
        self.outcome: defer.Deferred[Identity] = defer.Deferred()
        self.asked = 0

    async def verify(self, authorization: Optional[bytes]) -> Identity:
        self.asked += 1
        return await self.outcome


class Serving:
    """A site with the gate in front of a :class:`Recorder`, on a loopback port."""

    def __init__(self, verifier: TokenVerifier):
        self.routes = Recorder()
        site = make_site(AuthGate(self.routes, verifier, RouteLevels(SkipPaths(["/health"])),
                                  RoleNames()), 1 << 20)
        # keeps the open connections in .protocols, each removed when its connection is lost
        self.connections = policies.WrappingFactory(site)
        self.port = reactor.listenTCP(0, self.connections, interface="127.0.0.1")
        self.base = f"http://127.0.0.1:{self.port.getHost().port}"

    async def close(self) -> None:
        for connection in list(self.connections.protocols):
            connection.transport.loseConnection()
        await defer.maybeDeferred(self.port.stopListening)


async def fetch(url: str, method: str = "GET", bearer: Optional[str] = None) -> tuple:
    headers = {b"Authorization": [f"Bearer {bearer}".encode()]} if bearer else {}
    answer = await treq.request(method, url, headers=headers, persistent=False)
    return answer.code, await answer.content(), answer.headers


@pytest_twisted.ensureDeferred
async def test_a_known_token_is_decided_without_verifying_it_again() -> None:
    verifier = CountingVerifier()
    serving = Serving(verifier)
    bearer = token(sub="svc-a")
    try:
        first = await fetch(serving.base + "/api/v1/push", "POST", bearer)
        second = await fetch(serving.base + "/api/v1/push", "POST", bearer)
    finally:
        await serving.close()

    assert first[:2] == second[:2] == (200, b'{"producerSub": "svc-a"}')
    assert verifier.verified == 1


@pytest_twisted.ensureDeferred
async def test_verified_request_continues_with_a_403_when_the_role_is_too_low() -> None:
    serving = Serving(CountingVerifier())
    try:
        code, body, _ = await fetch(serving.base + "/api/v1/system/maintenance", "POST",
                                    token("read-write"))
    finally:
        await serving.close()

    assert (code, json.loads(body)) == (403, {"error": "Insufficient permissions"})
    assert serving.routes.rendered == []


@pytest_twisted.ensureDeferred
async def test_head_of_a_verified_request_has_no_body() -> None:
    serving = Serving(CountingVerifier())
    try:
        code, body, headers = await fetch(serving.base + "/api/v1/resources/queues", "HEAD",
                                          token("read-only"))
    finally:
        await serving.close()

    assert (code, body) == (200, b"")
    assert headers.getRawHeaders(b"content-length") == [b"28"]  # the GET body's length


@pytest_twisted.ensureDeferred
async def test_public_route_is_served_without_a_token_and_without_an_identity() -> None:
    serving = Serving(CountingVerifier())
    try:
        code, body, _ = await fetch(serving.base + "/health")
    finally:
        await serving.close()

    assert (code, body) == (200, b'{"producerSub": null}')
    assert serving.routes.rendered == [None]


@pytest_twisted.ensureDeferred
async def test_client_that_leaves_during_verification_gets_no_route_run() -> None:
    verifier = HeldVerifier()
    serving = Serving(verifier)
    client = await endpoints.connectProtocol(
        endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", serving.port.getHost().port),
        protocol.Protocol())
    try:
        client.transport.write(b"POST /api/v1/push HTTP/1.1\r\nHost: gate\r\n"
                               b"Authorization: Bearer " + token().encode() + b"\r\n"
                               b"Content-Length: 0\r\n\r\n")
        await wait_until_reactor(lambda: verifier.asked, message="the verification")
        client.transport.loseConnection()
        await wait_until_reactor(lambda: not serving.connections.protocols,
                                 message="the server seeing the client leave")
        verifier.outcome.callback(Identity("gate-user", frozenset({"admin"}), None))
    finally:
        await serving.close()

    assert serving.routes.rendered == []


@pytest_twisted.ensureDeferred
async def test_verifier_that_cannot_verify_answers_its_500_text() -> None:
    verifier = HeldVerifier()
    serving = Serving(verifier)
    try:
        answering = defer.ensureDeferred(fetch(serving.base + "/api/v1/push", "POST", "t"))
        await wait_until_reactor(lambda: verifier.asked, message="the verification")
        verifier.outcome.errback(AuthError("Failed to fetch JWKS", 500))
        code, body, headers = await answering
    finally:
        await serving.close()

    assert (code, json.loads(body)) == (500, {"error": "Failed to fetch JWKS"})
    assert not headers.hasHeader(b"www-authenticate")


@pytest_twisted.ensureDeferred
async def test_a_bug_in_verification_is_a_json_500_not_a_traceback() -> None:
    verifier = HeldVerifier()
    serving = Serving(verifier)
    try:
        answering = defer.ensureDeferred(fetch(serving.base + "/api/v1/push", "POST", "t"))
        await wait_until_reactor(lambda: verifier.asked, message="the verification")
        verifier.outcome.errback(KeyError("kid"))
        code, body, _ = await answering
    finally:
        await serving.close()

    assert (code, json.loads(body)) == (500, {"error": "Internal server error"})


@pytest_twisted.ensureDeferred
async def test_several_authorization_headers_are_refused_whichever_comes_first() -> None:
    """Which header a client or a proxy meant is anyone's guess: one bad and one good token
    must not be admitted by their order."""
    serving = Serving(CountingVerifier())
    good, bad = f"Bearer {token()}".encode(), b"Bearer junk"
    try:
        answers = [await treq.request("POST", serving.base + "/api/v1/push", persistent=False,
                                      headers={b"Authorization": pair})
                   for pair in ([bad, good], [good, bad], [good, good])]
        bodies = [json.loads(await answer.content()) for answer in answers]
    finally:
        await serving.close()

    assert [answer.code for answer in answers] == [401, 401, 401]
    # one of WIRE.md 4.3's texts
    assert all(body["error"] == "Token decode error: several Authorization headers, send "
               "exactly one" for body in bodies)
    assert serving.routes.rendered == []
