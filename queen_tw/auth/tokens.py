"""Turning an ``Authorization`` header into a verified :class:`Identity` (WIRE.md 4.1, 4.3).

Every signature and claim check is pyjwt's (with cryptography's keys); this module only
chooses the key and maps pyjwt's exceptions to WIRE 4.3's texts. Whatever a client sends
(no token, 9 KiB of header, bytes that are not ASCII, garbage base64, ``alg: none``) ends
as :class:`AuthError`, never as an unexpected exception.

Verified tokens are remembered in a bounded LRU keyed by the raw token, each until its
``exp`` + ``JWT_CLOCK_SKEW`` (the same instant pyjwt would start refusing it), so a client
reusing its token costs one dictionary lookup per request. Failures are never cached: a
token that failed is checked again in full (HS256 and PEM checks are microseconds, and
JWKS fetches are bounded by :mod:`queen_tw.auth.jwks`).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, FrozenSet, Optional, cast

import jwt
import treq
from jwt import exceptions as jwt_errors
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from queen_tw.auth.errors import AuthError
from queen_tw.auth.jwks import HttpGetter, JwksKeys
from queen_tw.auth.keys import PublicKey, key_family, load_public_key
from queen_tw.clock import wall_seconds
from queen_tw.config import Config

log = Logger()

MAX_AUTHORIZATION_BYTES = 8192
"""A longer ``Authorization`` header is refused before any parsing."""

CACHE_ENTRIES = 10_000
"""Verified tokens remembered at once; the least recently used is dropped first."""

NO_EXPIRY_CACHE_S = 300.0
"""How long a verified token without a finite ``exp`` is remembered (it never expires by
itself, but a key the IdP withdrew should stop admitting it eventually)."""

RSA_ALGORITHMS = ("RS256", "RS384", "RS512")
ACCEPTED_TYPES = frozenset({"jwt", "at+jwt", "application/jwt", "application/at+jwt"})
"""``typ`` header values of a JWT access token (RFC 7519, RFC 9068), compared lower-case."""

_BEARER = b"bearer"


@dataclass(frozen=True)
class Identity:
    """Who a verified token speaks for.

    ``sub`` is the token's subject (None when absent or empty; it becomes a message's
    ``producerSub``), ``roles`` the role names of ``JWT_ROLES_CLAIM`` and
    ``JWT_ROLES_ARRAY_CLAIM`` as written in the token, ``expires_at`` its ``exp`` (epoch
    seconds) if it has one.
    """

    sub: Optional[str]
    roles: FrozenSet[str]
    expires_at: Optional[float]


@dataclass(frozen=True)
class _Remembered:
    identity: Identity
    valid_until: float


class TokenVerifier:
    """Verifies bearer tokens for one configuration (see the module docstring).

    ``algorithm`` is ``HS256``, ``RS256`` (admits RS256/384/512), ``EdDSA`` or ``auto``
    (by the token's ``alg``, among the algorithms some configured key can verify).
    ``public_key`` (a PEM key) wins over ``jwks`` for its family. ``clock`` times the
    cache; the claims themselves are checked by pyjwt against the system time.
    """

    def __init__(self, *, algorithm: str, clock: IReactorTime, secret: str = "",
                 public_key: Optional[PublicKey] = None, jwks: Optional[JwksKeys] = None,
                 issuer: Optional[str] = None, audience: Optional[str] = None,
                 clock_skew_s: float = 30.0, roles_claim: str = "role",
                 roles_array_claim: str = "roles", cache_entries: int = CACHE_ENTRIES,
                 wall: Callable[[], float] = wall_seconds) -> None:
        self._algorithm = algorithm
        self._clock = clock
        self._wall = wall
        self._secret = secret
        self._public_key = public_key
        self._jwks = jwks
        self._issuer = issuer or None
        self._audience = audience or None
        self._skew = clock_skew_s
        self._roles_claim = roles_claim
        self._roles_array_claim = roles_array_claim
        self._cache_entries = cache_entries
        self._cache: OrderedDict[bytes, _Remembered] = OrderedDict()

    def cached(self, authorization: Optional[bytes]) -> Optional[Identity]:
        """The identity of a token verified before and still valid, else None.

        Synchronous and cheap, for the hot paths: None means "call :meth:`verify`", which
        gives the answer (or the error) for every other case.
        """
        if authorization is None or len(authorization) > MAX_AUTHORIZATION_BYTES:
            return None
        return self._recall(_strip_bearer(authorization))

    async def verify(self, authorization: Optional[bytes]) -> Identity:
        """The identity of a valid token; raises :class:`AuthError` with WIRE 4.3's text."""
        token = _bearer_token(authorization)
        known = self._recall(token)
        if known is not None:
            return known
        try:
            text = token.decode("ascii")
        except UnicodeDecodeError:
            raise AuthError("Token decode error: the token is not ASCII") from None
        header = _unverified_header(text)
        alg = header.get("alg")
        if not isinstance(alg, str):
            raise AuthError("Token decode error: the header has no alg")
        self._check_algorithm(alg)
        key = await self._key_for(alg, header.get("kid"))
        claims = self._decode(text, key, alg)
        identity = self._identity(claims)
        self._remember(token, identity)
        return identity

    def _check_algorithm(self, alg: str) -> None:
        """Refuses an ``alg`` this configuration does not verify (``none`` included)."""
        if self._algorithm == "auto":
            if alg not in self._auto_algorithms():
                raise AuthError(f"Unsupported algorithm: {alg}")
            return
        admitted = RSA_ALGORITHMS if self._algorithm == "RS256" else (self._algorithm,)
        if alg not in admitted:
            raise AuthError(f"Token uses {alg}, expected {self._algorithm}")

    def _auto_algorithms(self) -> tuple[str, ...]:
        """What ``auto`` admits: the algorithms of the configured keys."""
        admitted: tuple[str, ...] = ("HS256",) if self._secret else ()
        families = {key_family(self._public_key)} if self._public_key is not None else set()
        if self._jwks is not None:
            families |= {"RSA", "EdDSA"}
        if "RSA" in families:
            admitted += RSA_ALGORITHMS
        if "EdDSA" in families:
            admitted += ("EdDSA",)
        return admitted

    async def _key_for(self, alg: str, kid: Any) -> str | PublicKey:
        """The secret or public key that verifies ``alg``."""
        if alg == "HS256":
            if not self._secret:
                raise AuthError("HS256 secret not configured", 500)
            return self._secret
        family = "EdDSA" if alg == "EdDSA" else "RSA"
        if self._public_key is not None and key_family(self._public_key) == family:
            return self._public_key
        if self._jwks is None:
            raise AuthError(f"Unsupported algorithm: {alg}")
        return await self._jwks.key_for(kid, alg)

    def _decode(self, text: str, key: str | PublicKey, alg: str) -> dict[str, Any]:
        """pyjwt's checks of signature, ``exp``/``nbf``/``iat`` (with the skew), ``iss`` and
        ``aud`` when configured; its exceptions become WIRE 4.3's texts."""
        try:
            return jwt.decode(text, key, algorithms=[alg], issuer=self._issuer,
                              audience=self._audience, leeway=self._skew,
                              options={"verify_aud": self._audience is not None})
        except jwt_errors.ExpiredSignatureError:
            raise AuthError("Token has expired") from None
        except jwt_errors.InvalidSignatureError:
            raise AuthError("Invalid token signature") from None
        except jwt_errors.InvalidIssuerError:
            raise AuthError("Invalid token issuer") from None
        except jwt_errors.InvalidAudienceError:
            raise AuthError("Invalid token audience") from None
        except jwt_errors.MissingRequiredClaimError as err:
            if err.claim == "iss":
                raise AuthError("Invalid token issuer") from None
            if err.claim == "aud":
                raise AuthError("Invalid token audience") from None
            raise AuthError(f"Token verification failed: {err}") from None
        except jwt_errors.DecodeError as err:
            raise AuthError(f"Token decode error: {err}") from None
        except jwt_errors.PyJWTError as err:
            raise AuthError(f"Token verification failed: {err}") from None

    def _identity(self, claims: Mapping[str, Any]) -> Identity:
        """The :class:`Identity` of verified claims; role claims of other types are ignored.
        A ``sub`` that could not be stored as a message's ``producerSub`` (a NUL, a lone
        surrogate) is refused here, rather than fail every push it signs."""
        sub = claims.get("sub")
        if isinstance(sub, str) and not _storable(sub):
            raise AuthError("Token verification failed: the sub claim holds a NUL "
                            "character or a lone surrogate")
        roles = set()
        role = claims.get(self._roles_claim)
        if isinstance(role, str) and role:
            roles.add(role)
        listed = claims.get(self._roles_array_claim)
        if isinstance(listed, list):
            roles.update(item for item in listed if isinstance(item, str) and item)
        return Identity(sub=sub if isinstance(sub, str) and sub else None,
                        roles=frozenset(roles), expires_at=_expiry(claims.get("exp")))

    def _recall(self, token: bytes) -> Optional[Identity]:
        """A remembered identity still valid at the clock's time (and marked recently used)."""
        entry = self._cache.get(token)
        if entry is None:
            return None
        expires_at = entry.identity.expires_at
        if self._clock.seconds() >= entry.valid_until or (
                expires_at is not None and self._wall() >= expires_at + self._skew):
            del self._cache[token]  # (the wall clock, as pyjwt's: it may have stepped)
            return None
        self._cache.move_to_end(token)
        return entry.identity

    def _remember(self, token: bytes, identity: Identity) -> None:
        """Keeps a verified token until ``exp`` + skew, dropping the least recently used."""
        if identity.expires_at is not None and math.isfinite(identity.expires_at):
            # exp is wall time (as pyjwt checked it); the cache runs on the clock's time
            valid_until = (self._clock.seconds() + identity.expires_at + self._skew
                           - self._wall())
        else:
            valid_until = self._clock.seconds() + NO_EXPIRY_CACHE_S
        self._cache[token] = _Remembered(identity, valid_until)
        self._cache.move_to_end(token)
        while len(self._cache) > self._cache_entries:
            self._cache.popitem(last=False)


def _storable(text: str) -> bool:
    """True when PostgreSQL can store ``text``: no NUL, and valid UTF-8 once encoded."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _expiry(exp: Any) -> Optional[float]:
    """``exp`` in epoch seconds, read as pyjwt reads it when it checks it (``int(exp)``: a
    string of digits counts, a fraction is cut): read otherwise, the cache kept a token past
    the expiry pyjwt enforces. None without one; an integer too large for a float (a signed
    "never") is infinity."""
    if exp is None:
        return None
    try:
        return float(int(exp))
    except OverflowError:
        return math.inf
    except (TypeError, ValueError):
        return None


def _strip_bearer(authorization: bytes) -> bytes:
    """The token of a header value: after ``Bearer`` (any case), else the whole value."""
    value = authorization.strip()
    if value[:6].lower() == _BEARER and (len(value) == 6 or value[6:7] in (b" ", b"\t")):
        return value[6:].strip()
    return value


def _bearer_token(authorization: Optional[bytes]) -> bytes:
    """The token to verify; raises for a missing, oversized or empty one."""
    if authorization is None:
        raise AuthError("Authentication required")
    if len(authorization) > MAX_AUTHORIZATION_BYTES:
        raise AuthError(f"Token decode error: the Authorization header is over "
                        f"{MAX_AUTHORIZATION_BYTES} bytes")
    token = _strip_bearer(authorization)
    if not token:
        raise AuthError("Empty token")
    return token


def _unverified_header(text: str) -> dict[str, Any]:
    """The token's JOSE header, read only to choose the key; ``typ`` must name a JWT."""
    try:
        header = jwt.get_unverified_header(text)
    except jwt_errors.PyJWTError as err:
        raise AuthError(f"Token decode error: {err}") from None
    typ = header.get("typ")
    if typ is not None and (not isinstance(typ, str) or typ.lower() not in ACCEPTED_TYPES):
        raise AuthError(f"Token decode error: typ {typ!r} is not a JWT")
    return header


def make_verifier(config: Config, reactor: IReactorTime,
                  http_client: Optional[HttpGetter] = None) -> Optional[TokenVerifier]:
    """The verifier of ``config``, or None when ``JWT_ENABLED`` is off (every route open).

    ``reactor`` is the clock of the cache and of the JWKS refreshes and timeouts;
    ``http_client`` fetches the JWKS (treq when None).
    """
    if not config.jwt_enabled:
        return None
    public_key = load_public_key(config.jwt_public_key) if config.jwt_public_key else None
    jwks = None
    if config.jwt_jwks_url:
        getter = http_client or cast(HttpGetter, treq)
        jwks = JwksKeys(config.jwt_jwks_url, reactor, getter,
                        timeout_s=config.jwt_jwks_timeout_ms / 1000,
                        refresh_interval_s=config.jwt_jwks_refresh_interval)
    sources = [name for name, present in (("JWT_SECRET", bool(config.jwt_secret)),
                                          ("JWT_PUBLIC_KEY", public_key is not None),
                                          ("JWT_JWKS_URL", jwks is not None)) if present]
    log.info("JWT authentication on: {algorithm} with keys from {sources}",
             algorithm=config.jwt_algorithm, sources=", ".join(sources) or "nowhere")
    return TokenVerifier(
        algorithm=config.jwt_algorithm, clock=reactor, secret=config.jwt_secret,
        public_key=public_key, jwks=jwks, issuer=config.jwt_issuer,
        audience=config.jwt_audience, clock_skew_s=config.jwt_clock_skew,
        roles_claim=config.jwt_roles_claim, roles_array_claim=config.jwt_roles_array_claim)
