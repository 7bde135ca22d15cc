"""The identity provider's signing keys, fetched from ``JWT_JWKS_URL`` (WIRE.md 4.1).

Requests must not wait on the identity provider (IdP) more than they have to, and a flood of
tokens must not turn into a flood of fetches, so:

- the key set is fetched with treq (never blocking the reactor), bounded by
  ``JWT_JWKS_TIMEOUT_MS``; concurrent requests that need a fetch share one;
- once loaded, keys are served from memory; when they are older than
  ``JWT_JWKS_REFRESH_INTERVAL`` a refresh starts in the background and requests keep using
  the current keys meanwhile;
- a token naming an unknown ``kid`` forces one refresh (keys rotated at the IdP), but fetch
  attempts of any kind are at most one per :data:`FETCH_FLOOR_S`, so unknown kids (or an IdP
  that is down) cost the IdP one request per floor, whatever the request rate;
- a failed fetch keeps the keys already held: an IdP outage does not lock anyone out;
- until a first fetch succeeds, requests that need a key get 500 ``Failed to fetch JWKS``;
  the next attempt after the floor picks the IdP up again, without a restart.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from jwt import PyJWK
from jwt.exceptions import PyJWTError
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from queen_tw.auth.errors import AuthError
from queen_tw.auth.keys import PublicKey, key_family

log = Logger()

FETCH_FLOOR_S = 10.0
"""Least time between two fetch attempts (forced by an unknown kid, or retrying a failure)."""

MAX_JWKS_BYTES = 1024 * 1024
"""A key set larger than this is refused rather than parsed."""

FAILED_TO_FETCH = "Failed to fetch JWKS"


class HttpGetter(Protocol):
    """What is needed of treq (the module or a ``treq.client.HTTPClient``): one GET."""

    def get(self, url: str, headers: Any = None, **kwargs: Any) -> defer.Deferred[Any]: ...


class JwksUnavailable(Exception):
    """One fetch of the key set failed; the message says how (logged, never sent)."""


@dataclass(frozen=True)
class SigningKey:
    """One usable key of the set: its ``kid``, family (``RSA`` / ``EdDSA``), the ``alg`` the
    IdP pinned it to (if any) and the key object pyjwt verifies with."""

    kid: Optional[str]
    family: str
    alg: Optional[str]
    key: PublicKey


def parse_key_set(body: bytes) -> list[SigningKey]:
    """The signature keys (RSA, Ed25519) of a JWKS document; others are skipped.

    Raises :class:`JwksUnavailable` when the document is not a JWKS or holds no usable key,
    so a broken answer from the IdP is treated like no answer (the old keys stay).
    """
    if len(body) > MAX_JWKS_BYTES:
        raise JwksUnavailable(f"key set of {len(body)} bytes is over {MAX_JWKS_BYTES}")
    try:
        document = json.loads(body)
    except ValueError as err:
        raise JwksUnavailable(f"not JSON: {err}") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise JwksUnavailable('no "keys" array')
    keys = [key for key in map(_signing_key, entries) if key is not None]
    if not keys:
        raise JwksUnavailable(f"none of {len(entries)} keys is an RSA or Ed25519 signature key")
    return keys


def _signing_key(entry: Any) -> Optional[SigningKey]:
    """One JWK as a :class:`SigningKey`, or None when it cannot verify our tokens."""
    if not isinstance(entry, Mapping) or entry.get("use", "sig") != "sig":
        return None
    kty, crv = entry.get("kty"), entry.get("crv")
    if not (kty == "RSA" or (kty == "OKP" and crv == "Ed25519")):
        return None
    kid, alg = entry.get("kid"), entry.get("alg")
    try:
        key = PyJWK(dict(entry)).key
    except (PyJWTError, ValueError, TypeError) as err:
        log.warn("JWKS key {kid} skipped: {reason}", kid=kid, reason=str(err))
        return None
    if isinstance(key, (RSAPrivateKey, Ed25519PrivateKey)):
        # An IdP that publishes the private half ("d") is misconfigured; only the public half
        # verifies, and classing the private key by type would mistake its family.
        log.warn("JWKS key {kid} publishes its private part; only its public key is used",
                 kid=kid)
        key = key.public_key()
    return SigningKey(kid if isinstance(kid, str) else None, key_family(key),
                      alg if isinstance(alg, str) else None, key)


class JwksKeys:
    """The key set of one JWKS URL, loaded on first use and kept fresh (see the module).

    ``clock`` times the refresh interval, the fetch floor and the fetch timeout;
    ``http`` does the GET (treq in production, the same over loopback in tests).
    """

    def __init__(self, url: str, clock: IReactorTime, http: HttpGetter, *,
                 timeout_s: float, refresh_interval_s: float,
                 fetch_floor_s: float = FETCH_FLOOR_S) -> None:
        self._url = url
        self._clock = clock
        self._http = http
        self._timeout_s = timeout_s
        self._refresh_interval_s = refresh_interval_s
        self._fetch_floor_s = fetch_floor_s
        self._keys: list[SigningKey] = []
        self._loaded_at: Optional[float] = None
        self._last_attempt = float("-inf")
        self._waiting: Optional[list[defer.Deferred[None]]] = None

    async def key_for(self, kid: Optional[str], alg: str) -> PublicKey:
        """The key that verifies a token signed with ``alg`` by key ``kid``.

        Raises :class:`AuthError`: 500 ``Failed to fetch JWKS`` while no key set was ever
        fetched, 401 ``Unknown key ID: <kid>`` when the kid is still unknown after the one
        refresh it may force, 401 ``Token verification failed: …`` when the key cannot
        verify ``alg`` or a token without kid does not pick one key.
        """
        if self._loaded_at is None:
            await self._refresh()
            if self._loaded_at is None:
                raise AuthError(FAILED_TO_FETCH, 500)
        elif self._clock.seconds() - self._loaded_at >= self._refresh_interval_s:
            self._refresh()  # in the background; this request uses the keys held now
        found = self._find(kid, alg)
        if found is None and kid is not None:
            await self._refresh()  # rotated at the IdP? (the floor bounds how often)
            found = self._find(kid, alg)
        if found is None:
            if kid is None:
                raise AuthError("Token verification failed: the token has no kid and "
                                f"the JWKS does not hold exactly one {alg} key")
            raise AuthError(f"Unknown key ID: {kid}")
        if found.family != _family(alg) or (found.alg is not None and found.alg != alg):
            raise AuthError(f"Token verification failed: key {kid} cannot verify {alg} tokens")
        return found.key

    def _find(self, kid: Optional[str], alg: str) -> Optional[SigningKey]:
        """The key named ``kid``; without a kid, the only key of ``alg``'s family."""
        if kid is not None:
            return next((key for key in self._keys if key.kid == kid), None)
        family = [key for key in self._keys if key.family == _family(alg)]
        return family[0] if len(family) == 1 else None

    def _refresh(self) -> defer.Deferred[None]:
        """Fires once a fetch attempt ended (never with a failure).

        Joins the fetch in flight if there is one; starts none within the floor of the last
        attempt, so callers then go on with the keys already held.
        """
        waiter: defer.Deferred[None] = defer.Deferred()
        if self._waiting is not None:
            self._waiting.append(waiter)
            return waiter
        now = self._clock.seconds()
        if now - self._last_attempt < self._fetch_floor_s:
            waiter.callback(None)
            return waiter
        self._last_attempt = now
        self._waiting = [waiter]
        fetch = defer.Deferred.fromCoroutine(self._download())
        fetch.addTimeout(self._timeout_s, self._clock, onTimeoutCancel=_timed_out)
        fetch.addCallbacks(self._loaded, self._failed)
        fetch.addBoth(self._wake)
        return waiter

    async def _download(self) -> list[SigningKey]:
        """One GET of the key set, parsed."""
        response = await self._http.get(self._url, headers={b"Accept": [b"application/json"]})
        if response.code != 200:
            raise JwksUnavailable(f"HTTP {response.code}")
        return parse_key_set(await response.content())

    def _loaded(self, keys: list[SigningKey]) -> None:
        """Adopts a fetched key set."""
        first = self._loaded_at is None
        self._keys = keys
        self._loaded_at = self._clock.seconds()
        log.info("JWKS {how} from {url}: {count} keys ({kids})",
                 how="loaded" if first else "refreshed", url=self._url, count=len(keys),
                 kids=", ".join(str(key.kid) for key in keys))

    def _failed(self, failure: Failure) -> None:
        """Logs a failed fetch; the keys held (if any) stay in use."""
        reason = (f"no answer within {self._timeout_s:g} s" if failure.check(defer.TimeoutError)
                  else failure.getErrorMessage() or type(failure.value).__name__)
        log.warn("JWKS fetch from {url} failed: {reason}; {kept}", url=self._url,
                 reason=reason, kept=(f"keeping {len(self._keys)} keys"
                                      if self._loaded_at is not None else "no keys yet"))

    def _wake(self, _: None) -> None:
        """Releases every caller waiting on the fetch that just ended."""
        waiting, self._waiting = self._waiting or [], None
        for waiter in waiting:
            waiter.callback(None)


def _timed_out(result: object, timeout: float) -> Failure:
    """A fetch cancelled by its timeout, as a :class:`~twisted.internet.defer.TimeoutError`
    whatever the HTTP client wrapped the cancellation in (treq fails with a
    ``ResponseNeverReceived`` holding the ``CancelledError``, which ``addTimeout``'s default
    would pass on unrecognised)."""
    return Failure(defer.TimeoutError(f"no answer within {timeout:g} s"))


def _family(alg: str) -> str:
    """The key family that verifies ``alg`` (RS256/384/512 -> RSA, EdDSA -> EdDSA)."""
    return "EdDSA" if alg == "EdDSA" else "RSA"
