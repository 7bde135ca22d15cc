"""JWKS keys (WIRE.md 4.1): fetched over a real loopback socket from a twisted.web IdP.

The IdP below serves a key set the test can rotate, break (503), or make hang, and counts the
requests it received, which is how the fetch floor is proven. Time (refresh interval, fetch
floor, fetch timeout, token cache) runs on a ``task.Clock`` the test drives; only the HTTP
exchange itself uses the real reactor, awaited, never slept on.

The last tests put the real :class:`~queen_tw.http.auth_gate.AuthGate` in front, on its own
loopback port, to pin what a client sees while the IdP is down: WIRE 4.1's 500
``Failed to fetch JWKS`` while no key set was ever fetched, 401 ``Unknown key ID`` once one
was, always as a JSON error, never a traceback.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
import pytest_twisted
import treq
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.internet import defer, reactor, task
from twisted.web import resource, server

from queen_tw.auth.errors import AuthError
from queen_tw.auth.jwks import FETCH_FLOOR_S, JwksKeys, JwksUnavailable, parse_key_set
from queen_tw.auth.levels import RoleNames, RouteLevels, SkipPaths
from queen_tw.auth.tokens import Identity, TokenVerifier, make_verifier
from queen_tw.config import Config
from queen_tw.http.auth_gate import AuthGate
from queen_tw.http.site import make_site

from support import free_port, wait_until_reactor

REFRESH_S = 3600


def jwk(private_key: Any, kid: str | None, **extra: Any) -> dict[str, Any]:
    """The public JWK of a private key, as an IdP publishes it."""
    algorithm = (jwt.algorithms.OKPAlgorithm if isinstance(private_key, ed25519.Ed25519PrivateKey)
                 else jwt.algorithms.RSAAlgorithm)
    entry = json.loads(algorithm.to_jwk(private_key.public_key()))
    if kid is not None:
        entry["kid"] = kid
    entry.update(extra)
    return entry


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


RSA_1, RSA_2 = rsa_key(), rsa_key()
ED_1 = ed25519.Ed25519PrivateKey.generate()


def mint(private_key: Any, kid: str | None, algorithm: str = "RS256") -> bytes:
    """A fresh token (its own jti, so no test reuses another's cache entry)."""
    now = int(time.time())
    headers = {"kid": kid} if kid is not None else None
    token = jwt.encode({"sub": "svc", "role": "admin", "iat": now, "exp": now + 600,
                        "jti": uuid.uuid4().hex}, private_key, algorithm=algorithm,
                       headers=headers)
    return b"Bearer " + token.encode()


class FakeIdP(resource.Resource):
    """A JWKS endpoint: ``keys`` is served as is; ``down`` answers 503; ``hang`` never
    answers. ``requests`` counts every request received."""

    isLeaf = True

    def __init__(self, keys: list[dict[str, Any]]) -> None:
        super().__init__()
        self.keys = keys
        self.down = False
        self.hang = False
        self.requests = 0

    def render_GET(self, request: Any) -> Any:
        self.requests += 1
        if self.hang:
            return server.NOT_DONE_YET
        if self.down:
            request.setResponseCode(503)
            return b"unavailable"
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"keys": self.keys}).encode()


@pytest.fixture
def idp_url() -> Iterator[tuple[FakeIdP, str]]:
    """A FakeIdP serving RSA_1 as k1 on a loopback port."""
    idp = FakeIdP([jwk(RSA_1, "k1")])
    port = reactor.listenTCP(0, server.Site(idp), interface="127.0.0.1")
    yield idp, f"http://127.0.0.1:{port.getHost().port}/.well-known/jwks.json"
    pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


@pytest.fixture
def idp(idp_url: tuple[FakeIdP, str]) -> FakeIdP:
    return idp_url[0]


@pytest.fixture
def clock() -> task.Clock:
    """Test time, starting at the system time pyjwt checks claims against."""
    made = task.Clock()
    made.advance(time.time())
    return made


@pytest.fixture
def verifier(idp_url: tuple[FakeIdP, str], clock: task.Clock) -> TokenVerifier:
    """An RS256 verifier whose keys come from the fake IdP, through treq."""
    config = Config.from_sources({"JWT_ENABLED": "true", "JWT_ALGORITHM": "auto",
                                  "JWT_JWKS_URL": idp_url[1],
                                  "JWT_JWKS_REFRESH_INTERVAL": str(REFRESH_S)}, {})
    made = make_verifier(config, clock)
    assert made is not None
    return made


async def verify(verifier: TokenVerifier, header: bytes) -> Identity | AuthError:
    """The identity, or the AuthError ``verify`` raised."""
    try:
        return await verifier.verify(header)
    except AuthError as err:
        return err


async def refusal(verifier: TokenVerifier, header: bytes) -> tuple[int, str]:
    result = await verify(verifier, header)
    assert isinstance(result, AuthError), f"admitted: {result}"
    return result.status, result.message


@pytest_twisted.ensureDeferred
async def test_rsa_and_ed25519_keys_of_the_set_verify_their_tokens(
        verifier: TokenVerifier, idp: FakeIdP) -> None:
    idp.keys = [jwk(RSA_1, "k1"), jwk(ED_1, "ed", alg="EdDSA")]
    for header in (mint(RSA_1, "k1"), mint(RSA_1, "k1", "RS512"), mint(ED_1, "ed", "EdDSA")):
        assert isinstance(await verify(verifier, header), Identity)
    assert idp.requests == 1


def private_jwk(private_key: Any, kid: str) -> dict[str, Any]:
    """The JWK of the private key itself (with "d"): what a misconfigured IdP publishes."""
    algorithm = (jwt.algorithms.OKPAlgorithm if isinstance(private_key, ed25519.Ed25519PrivateKey)
                 else jwt.algorithms.RSAAlgorithm)
    return {**json.loads(algorithm.to_jwk(private_key)), "kid": kid}


@pytest_twisted.ensureDeferred
async def test_a_published_private_key_verifies_by_its_public_half(
        verifier: TokenVerifier, idp: FakeIdP) -> None:
    idp.keys = [private_jwk(RSA_1, "k1"), private_jwk(ED_1, "ed")]
    assert "d" in idp.keys[0] and "d" in idp.keys[1]
    for header in (mint(RSA_1, "k1"), mint(ED_1, "ed", "EdDSA")):
        assert isinstance(await verify(verifier, header), Identity)
    assert await refusal(verifier, mint(RSA_2, "k1")) == (401, "Invalid token signature")


@pytest_twisted.ensureDeferred
async def test_a_key_pinned_to_another_alg_is_refused(verifier: TokenVerifier,
                                                       idp: FakeIdP) -> None:
    idp.keys = [jwk(RSA_1, "k1", alg="RS256")]
    assert await refusal(verifier, mint(RSA_1, "k1", "RS384")) == (
        401, "Token verification failed: key k1 cannot verify RS384 tokens")
    assert await refusal(verifier, mint(ED_1, "k1", "EdDSA")) == (
        401, "Token verification failed: key k1 cannot verify EdDSA tokens")


@pytest_twisted.ensureDeferred
async def test_a_token_without_kid_uses_the_only_key_of_its_family(
        idp_url: tuple[FakeIdP, str], clock: task.Clock) -> None:
    idp, url = idp_url
    idp.keys = [jwk(RSA_1, None), jwk(ED_1, "ed")]
    keys = JwksKeys(url, clock, treq, timeout_s=5, refresh_interval_s=REFRESH_S)
    made = TokenVerifier(algorithm="RS256", clock=clock, jwks=keys)
    assert isinstance(await verify(made, mint(RSA_1, None)), Identity)
    idp.keys = [jwk(RSA_1, None), jwk(RSA_2, "k2")]
    clock.advance(REFRESH_S)
    await keys.key_for("k2", "RS256")  # the refreshed set, with two RSA keys
    with pytest.raises(AuthError, match="has no kid and the JWKS does not hold exactly one"):
        await keys.key_for(None, "RS256")


@pytest_twisted.ensureDeferred
async def test_a_rotated_key_is_picked_up_without_restart(
        verifier: TokenVerifier, idp: FakeIdP, clock: task.Clock) -> None:
    assert isinstance(await verify(verifier, mint(RSA_1, "k1")), Identity)
    idp.keys = [jwk(RSA_2, "k2")]
    clock.advance(FETCH_FLOOR_S)
    assert isinstance(await verify(verifier, mint(RSA_2, "k2")), Identity)
    assert idp.requests == 2


@pytest_twisted.ensureDeferred
async def test_a_flood_of_unknown_kids_costs_the_idp_one_fetch_per_floor(
        verifier: TokenVerifier, idp: FakeIdP, clock: task.Clock) -> None:
    assert isinstance(await verify(verifier, mint(RSA_1, "k1")), Identity)
    clock.advance(FETCH_FLOOR_S)
    kids = [f"forged-{n}" for n in range(50)]
    answers = await defer.gatherResults([
        defer.ensureDeferred(refusal(verifier, mint(RSA_2, kid))) for kid in kids])
    assert answers == [(401, f"Unknown key ID: {kid}") for kid in kids]
    assert idp.requests == 2  # the first load, then one forced refresh for all fifty
    clock.advance(FETCH_FLOOR_S - 1)
    assert await refusal(verifier, mint(RSA_2, "forged-again")) == (
        401, "Unknown key ID: forged-again")
    assert idp.requests == 2
    clock.advance(1)
    await refusal(verifier, mint(RSA_2, "forged-later"))
    assert idp.requests == 3


@pytest_twisted.ensureDeferred
async def test_concurrent_first_requests_share_one_fetch(verifier: TokenVerifier,
                                                         idp: FakeIdP) -> None:
    answers = await defer.gatherResults([
        defer.ensureDeferred(verify(verifier, mint(RSA_1, "k1"))) for _ in range(20)])
    assert all(isinstance(answer, Identity) for answer in answers)
    assert idp.requests == 1


@pytest_twisted.ensureDeferred
async def test_an_idp_down_at_start_answers_500_until_it_comes_up(
        verifier: TokenVerifier, idp: FakeIdP, clock: task.Clock) -> None:
    idp.down = True
    assert await refusal(verifier, mint(RSA_1, "k1")) == (500, "Failed to fetch JWKS")
    assert await refusal(verifier, mint(RSA_1, "k1")) == (500, "Failed to fetch JWKS")
    assert idp.requests == 1  # the retry waits for the floor
    idp.down = False
    clock.advance(FETCH_FLOOR_S)
    assert isinstance(await verify(verifier, mint(RSA_1, "k1")), Identity)
    assert idp.requests == 2


@pytest_twisted.ensureDeferred
async def test_an_idp_that_refuses_connections_is_failed_to_fetch(clock: task.Clock) -> None:
    url = f"http://127.0.0.1:{free_port()}/jwks"
    made = TokenVerifier(algorithm="RS256", clock=clock,
                         jwks=JwksKeys(url, clock, treq, timeout_s=5,
                                       refresh_interval_s=REFRESH_S))
    assert await refusal(made, mint(RSA_1, "k1")) == (500, "Failed to fetch JWKS")


@pytest_twisted.ensureDeferred
async def test_an_idp_that_does_not_answer_times_out_as_failed_to_fetch(
        verifier: TokenVerifier, idp: FakeIdP, clock: task.Clock) -> None:
    idp.hang = True
    pending = defer.ensureDeferred(verify(verifier, mint(RSA_1, "k1")))
    await wait_until_reactor(lambda: idp.requests == 1, message="the JWKS request")
    assert not pending.called
    clock.advance(5.0)  # JWT_JWKS_TIMEOUT_MS's default
    result = await pending
    assert isinstance(result, AuthError)
    assert (result.status, result.message) == (500, "Failed to fetch JWKS")


@pytest_twisted.ensureDeferred
async def test_a_fetch_that_times_out_is_logged_as_a_timeout(
        verifier: TokenVerifier, idp_url: tuple[FakeIdP, str], clock: task.Clock,
        lines: list[str]) -> None:
    idp, url = idp_url
    idp.hang = True
    pending = defer.ensureDeferred(verify(verifier, mint(RSA_1, "k1")))
    await wait_until_reactor(lambda: idp.requests == 1, message="the JWKS request")
    clock.advance(5.0)
    await pending
    assert [line for line in lines if "JWKS" in line] == [
        f"JWKS fetch from {url} failed: no answer within 5 s; no keys yet"]


@pytest_twisted.ensureDeferred
async def test_an_idp_down_mid_run_keeps_the_keys_held(
        verifier: TokenVerifier, idp: FakeIdP, clock: task.Clock) -> None:
    assert isinstance(await verify(verifier, mint(RSA_1, "k1")), Identity)
    idp.down = True
    clock.advance(REFRESH_S)
    assert isinstance(await verify(verifier, mint(RSA_1, "k1")), Identity)
    await wait_until_reactor(lambda: idp.requests == 2, message="the background refresh")
    clock.advance(FETCH_FLOOR_S)
    assert isinstance(await verify(verifier, mint(RSA_1, "k1")), Identity)
    assert await refusal(verifier, mint(RSA_2, "k2")) == (401, "Unknown key ID: k2")


@pytest_twisted.ensureDeferred
async def test_keys_are_refreshed_in_the_background_after_the_interval(
        verifier: TokenVerifier, idp: FakeIdP, clock: task.Clock) -> None:
    assert isinstance(await verify(verifier, mint(RSA_1, "k1")), Identity)
    idp.keys = [jwk(RSA_1, "k1"), jwk(RSA_2, "k2")]
    clock.advance(REFRESH_S - 1)
    await verify(verifier, mint(RSA_1, "k1"))
    assert idp.requests == 1  # not due yet
    clock.advance(1)
    assert isinstance(await verify(verifier, mint(RSA_1, "k1")), Identity)  # held keys
    await wait_until_reactor(lambda: idp.requests == 2, message="the background refresh")
    # Within the floor of that refresh no fetch can be forced, so k2 verifies only once
    # the background refresh has been adopted.
    deadline = time.monotonic() + 30
    while not isinstance(await verify(verifier, mint(RSA_2, "k2")), Identity):
        assert time.monotonic() < deadline, "the refreshed keys were never adopted"
        await task.deferLater(reactor, 0.01, lambda: None)
    assert idp.requests == 2


@pytest.mark.parametrize("body", [
    b"not json", b"[]", b'{"keys": {}}', b'{"keys": []}',
    b'{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}',
    b'{"keys": [{"kty": "RSA", "n": "!!", "e": "AQAB", "kid": "bad"}]}',
    b'{"keys": [{"kty": "OKP", "crv": "X25519", "x": "AAAA"}]}',
])
def test_a_key_set_without_a_usable_signature_key_is_a_failed_fetch(body: bytes) -> None:
    with pytest.raises(JwksUnavailable):
        parse_key_set(body)


def test_encryption_keys_and_unusable_entries_are_skipped() -> None:
    body = json.dumps({"keys": [jwk(RSA_2, "enc", use="enc"), "junk", jwk(RSA_1, "k1")]})
    assert [key.kid for key in parse_key_set(body.encode())] == ["k1"]


class Admitted(resource.Resource):
    """The routes behind the gate: 200 for whoever the gate lets through."""

    isLeaf = True

    def render(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return b"{}"


async def through_the_gate(verifier: TokenVerifier,
                           header: bytes) -> tuple[int, Any, Any]:
    """Status, decoded body and headers of ``POST /api/v1/push`` with ``header`` as its
    ``Authorization``, answered by an AuthGate on a loopback port of its own."""
    site = make_site(AuthGate(Admitted(), verifier, RouteLevels(SkipPaths([])), RoleNames()),
                     1 << 20)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    try:
        answer = await treq.post(f"http://127.0.0.1:{port.getHost().port}/api/v1/push",
                                 b"{}", headers={b"Authorization": [header]},
                                 persistent=False)
        return answer.code, json.loads(await answer.content()), answer.headers
    finally:
        await defer.maybeDeferred(port.stopListening)


@pytest_twisted.ensureDeferred
async def test_the_gate_answers_500_failed_to_fetch_jwks_while_no_key_set_was_ever_fetched(
        verifier: TokenVerifier, idp: FakeIdP, lines: list[str]) -> None:
    idp.down = True
    code, body, headers = await through_the_gate(verifier, mint(RSA_1, "k1"))
    assert (code, body) == (500, {"error": "Failed to fetch JWKS"})
    assert not headers.hasHeader(b"WWW-Authenticate")  # not the caller's fault
    assert any("JWKS fetch from" in line and "failed: HTTP 503; no keys yet" in line
               for line in lines)
    assert any("cannot verify tokens for /api/v1/push: Failed to fetch JWKS" in line
               for line in lines)
    assert not any("Traceback" in line for line in lines)


@pytest_twisted.ensureDeferred
async def test_the_gate_answers_500_when_the_idp_refuses_connections(
        clock: task.Clock) -> None:
    url = f"http://127.0.0.1:{free_port()}/jwks"
    made = TokenVerifier(algorithm="RS256", clock=clock,
                         jwks=JwksKeys(url, clock, treq, timeout_s=5,
                                       refresh_interval_s=REFRESH_S))
    code, body, _ = await through_the_gate(made, mint(RSA_1, "k9"))
    assert (code, body) == (500, {"error": "Failed to fetch JWKS"})


@pytest_twisted.ensureDeferred
async def test_the_gate_answers_401_unknown_key_id_while_the_idp_is_down_with_keys_held(
        verifier: TokenVerifier, idp: FakeIdP, clock: task.Clock) -> None:
    assert (await through_the_gate(verifier, mint(RSA_1, "k1")))[:2] == (200, {})
    idp.down = True
    clock.advance(FETCH_FLOOR_S)  # so the unknown kid really asks the IdP, which fails
    code, body, headers = await through_the_gate(verifier, mint(RSA_2, "k2"))
    assert (code, body) == (401, {"error": "Unknown key ID: k2"})
    assert headers.getRawHeaders(b"WWW-Authenticate") == [b"Bearer"]
    assert idp.requests == 2
