"""Bearer-token verification (WIRE.md 4.1, 4.3): every algorithm, every error text, the cache.

Tokens are minted with pyjwt from keys made with cryptography here, in the test. Verifiers
without JWKS never wait on anything, so each verification has fired by the time ``verify``
returns and is read synchronously. pyjwt checks ``exp``/``nbf``/``iat`` against the system
time, so the injected clock (which times the cache) starts at the system time too.
"""

from __future__ import annotations

import base64
import json
import random
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.internet import defer, task

from queen_tw.auth.errors import AuthError
from queen_tw.auth.tokens import Identity, TokenVerifier, make_verifier
from queen_tw.config import Config, ConfigError

SECRET = "a-test-secret-that-is-long-enough-for-hs256"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ED_KEY = ed25519.Ed25519PrivateKey.generate()


def public_pem(private_key: Any) -> str:
    """The PEM text of a private key's public half."""
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def claims(**extra: Any) -> dict[str, Any]:
    """The claims the official test helpers mint (WIRE 4.1), valid for ten minutes."""
    now = int(time.time())
    return {"sub": "alice", "username": "alice", "role": "read-write", "iat": now,
            "exp": now + 600, **extra}


def mint(key: Any = SECRET, algorithm: str = "HS256", headers: dict[str, Any] | None = None,
         **extra: Any) -> bytes:
    """A signed token as the bytes of an ``Authorization`` header value."""
    return b"Bearer " + jwt.encode(claims(**extra), key, algorithm=algorithm,
                                   headers=headers).encode()


def unsigned(**extra: Any) -> bytes:
    """An ``alg: none`` token (no signature at all)."""
    return b"Bearer " + jwt.encode(claims(**extra), None, algorithm="none").encode()


def config(**env: str) -> Config:
    """A JWT-enabled configuration from environment values."""
    return Config.from_sources({"JWT_ENABLED": "true", **env}, {})


def system_clock() -> task.Clock:
    """A hand-driven clock that starts at the system time pyjwt checks claims against."""
    clock = task.Clock()
    clock.advance(time.time())
    return clock


def verifier(clock: task.Clock | None = None, **env: str) -> TokenVerifier:
    """The verifier of ``config(**env)`` (HS256 with :data:`SECRET` unless told)."""
    env.setdefault("JWT_SECRET", SECRET)
    made = make_verifier(config(**env), clock or system_clock())
    assert made is not None
    return made


def outcome(verifier: TokenVerifier, header: bytes | None) -> Identity | AuthError:
    """What ``verify`` decided: the identity, or the AuthError it raised."""
    fired: list[Any] = []
    defer.ensureDeferred(verifier.verify(header)).addBoth(fired.append)
    assert fired, "verification without JWKS must not wait"
    result = fired[0]
    if isinstance(result, Identity):
        return result
    assert isinstance(result.value, AuthError), result.getTraceback()
    return result.value


def refusal(verifier: TokenVerifier, header: bytes | None) -> tuple[int, str]:
    """(status, message) of a refused header; fails the test if it was admitted."""
    result = outcome(verifier, header)
    assert isinstance(result, AuthError), f"admitted: {result}"
    return result.status, result.message


# --- configuration -----------------------------------------------------------------------


def test_jwt_is_off_by_default_and_then_there_is_no_verifier() -> None:
    assert make_verifier(Config.defaults(), task.Clock()) is None


def test_jwt_defaults_are_upstreams() -> None:
    defaults = Config.defaults()
    assert (defaults.jwt_algorithm, defaults.jwt_clock_skew) == ("HS256", 30)
    assert defaults.jwt_skip_paths == "/health,/metrics/prometheus,/metrics,/"
    assert (defaults.jwt_jwks_refresh_interval, defaults.jwt_jwks_timeout_ms) == (3600, 5000)
    assert (defaults.jwt_roles_claim, defaults.jwt_roles_array_claim) == ("role", "roles")
    assert (defaults.jwt_role_admin, defaults.jwt_role_read_write,
            defaults.jwt_role_read_only) == ("admin", "read-write", "read-only")


def test_hs256_without_a_secret_refuses_to_start() -> None:
    with pytest.raises(ConfigError, match="^JWT_SECRET: required when JWT_ENABLED=true"):
        config()


@pytest.mark.parametrize("algorithm", ["RS256", "EdDSA"])
def test_public_key_algorithms_without_any_key_refuse_to_start(algorithm: str) -> None:
    with pytest.raises(ConfigError, match="needs JWT_PUBLIC_KEY or JWT_JWKS_URL"):
        config(JWT_ALGORITHM=algorithm)


def test_auto_without_any_key_refuses_to_start() -> None:
    with pytest.raises(ConfigError, match="JWT_ALGORITHM=auto needs"):
        config(JWT_ALGORITHM="auto")


def test_a_public_key_of_the_wrong_kind_refuses_to_start() -> None:
    with pytest.raises(ConfigError, match="RS256 needs an RSA key, got an EdDSA key"):
        config(JWT_ALGORITHM="RS256", JWT_PUBLIC_KEY=public_pem(ED_KEY))


def test_an_unreadable_or_unparsable_public_key_refuses_to_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="JWT_PUBLIC_KEY: cannot read PEM file"):
        config(JWT_ALGORITHM="RS256", JWT_PUBLIC_KEY=str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match="JWT_PUBLIC_KEY: not a PEM public key"):
        config(JWT_ALGORITHM="RS256",
               JWT_PUBLIC_KEY="-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----")


def test_a_jwks_url_must_be_http() -> None:
    with pytest.raises(ConfigError, match="JWT_JWKS_URL: expected an http"):
        config(JWT_ALGORITHM="RS256", JWT_JWKS_URL="file:///etc/keys.json")


def test_algorithm_names_are_case_insensitive_and_kept_canonical() -> None:
    assert config(JWT_ALGORITHM="eddsa",
                  JWT_PUBLIC_KEY=public_pem(ED_KEY)).jwt_algorithm == "EdDSA"
    with pytest.raises(ConfigError, match="JWT_ALGORITHM: expected one of"):
        config(JWT_ALGORITHM="ES256", JWT_SECRET=SECRET)


def test_the_secret_stays_out_of_repr() -> None:
    assert SECRET not in repr(config(JWT_SECRET=SECRET))


def test_the_public_key_may_be_a_file_or_text_with_escaped_newlines(tmp_path: Path) -> None:
    pem_file = tmp_path / "key.pem"
    pem_file.write_text(public_pem(RSA_KEY))
    escaped = public_pem(RSA_KEY).replace("\n", "\\n")
    for value in (str(pem_file), escaped):
        made = verifier(JWT_ALGORITHM="RS256", JWT_PUBLIC_KEY=value)
        assert isinstance(outcome(made, mint(RSA_KEY, "RS256")), Identity)


# --- admitted tokens ----------------------------------------------------------------------


def test_hs256_token_gives_the_identity_of_its_claims() -> None:
    expires = int(time.time()) + 100  # read once: a second boundary may pass before the assert
    token = mint(roles=["admin", 7, ""], exp=expires)
    identity = outcome(verifier(), token)
    assert identity == Identity(sub="alice", roles=frozenset({"read-write", "admin"}),
                                expires_at=float(expires))


def test_role_claim_names_are_configurable() -> None:
    made = verifier(JWT_ROLES_CLAIM="queen_role", JWT_ROLES_ARRAY_CLAIM="groups")
    identity = outcome(made, mint(queen_role="admin", groups=["read-only"]))
    assert isinstance(identity, Identity)
    assert identity.roles == {"admin", "read-only"}


@pytest.mark.parametrize("sub", [None, ""])
def test_a_missing_or_empty_sub_gives_no_sub(sub: str | None) -> None:
    token = claims(sub=sub)
    if sub is None:
        del token["sub"]
    header = b"Bearer " + jwt.encode(token, SECRET, algorithm="HS256").encode()
    identity = outcome(verifier(), header)
    assert isinstance(identity, Identity) and identity.sub is None


def test_the_bearer_prefix_is_case_insensitive_and_optional() -> None:
    token = mint()[len(b"Bearer "):]
    made = verifier()
    for header in (b"bearer " + token, b"BEARER   " + token, token, b"  Bearer " + token + b" "):
        assert isinstance(outcome(made, header), Identity), header


@pytest.mark.parametrize("algorithm", ["RS256", "RS384", "RS512"])
def test_rs256_setting_verifies_the_rsa_family_with_a_pem_key(algorithm: str) -> None:
    made = verifier(JWT_ALGORITHM="RS256", JWT_PUBLIC_KEY=public_pem(RSA_KEY))
    assert isinstance(outcome(made, mint(RSA_KEY, algorithm)), Identity)


def test_eddsa_with_a_pem_key() -> None:
    made = verifier(JWT_ALGORITHM="EdDSA", JWT_PUBLIC_KEY=public_pem(ED_KEY))
    assert isinstance(outcome(made, mint(ED_KEY, "EdDSA")), Identity)


def test_auto_picks_the_key_by_the_tokens_alg() -> None:
    made = verifier(JWT_ALGORITHM="auto", JWT_PUBLIC_KEY=public_pem(ED_KEY))
    assert isinstance(outcome(made, mint()), Identity)
    assert isinstance(outcome(made, mint(ED_KEY, "EdDSA")), Identity)
    assert refusal(made, mint(RSA_KEY, "RS256")) == (401, "Unsupported algorithm: RS256")


def test_auto_refuses_hs256_when_no_secret_is_configured() -> None:
    made = verifier(JWT_ALGORITHM="auto", JWT_SECRET="", JWT_PUBLIC_KEY=public_pem(RSA_KEY))
    assert isinstance(outcome(made, mint(RSA_KEY, "RS256")), Identity)
    assert refusal(made, mint()) == (401, "Unsupported algorithm: HS256")


def test_an_expiry_within_the_clock_skew_is_admitted() -> None:
    made = verifier(JWT_CLOCK_SKEW="30")
    assert isinstance(outcome(made, mint(exp=int(time.time()) - 10)), Identity)


def test_an_audience_is_not_checked_unless_configured() -> None:
    assert isinstance(outcome(verifier(), mint(aud="someone-else")), Identity)


def test_issuer_and_audience_are_admitted_when_they_match() -> None:
    made = verifier(JWT_ISSUER="https://idp.example", JWT_AUDIENCE="queen")
    token = mint(iss="https://idp.example", aud=["other", "queen"])
    assert isinstance(outcome(made, token), Identity)


# --- refused tokens: WIRE 4.3's texts ------------------------------------------------------


def test_no_header_is_authentication_required() -> None:
    assert refusal(verifier(), None) == (401, "Authentication required")


@pytest.mark.parametrize("header", [b"", b"Bearer", b"Bearer   ", b"   "])
def test_an_empty_token_is_refused(header: bytes) -> None:
    assert refusal(verifier(), header) == (401, "Empty token")


def test_a_wrong_signature_is_invalid_token_signature() -> None:
    assert refusal(verifier(), mint("another-secret-also-long-enough-for-hs256")) == (
        401, "Invalid token signature")
    made = verifier(JWT_ALGORITHM="RS256", JWT_PUBLIC_KEY=public_pem(RSA_KEY))
    assert refusal(made, mint(OTHER_RSA_KEY, "RS256")) == (401, "Invalid token signature")


def test_an_expired_token_is_refused() -> None:
    token = mint(iat=int(time.time()) - 600, exp=int(time.time()) - 60)
    assert refusal(verifier(JWT_CLOCK_SKEW="30"), token) == (401, "Token has expired")


def test_a_token_not_yet_valid_is_refused() -> None:
    status, message = refusal(verifier(), mint(nbf=int(time.time()) + 600))
    assert status == 401 and message.startswith("Token verification failed: ")


def test_an_iat_in_the_future_is_refused() -> None:
    status, message = refusal(verifier(), mint(iat=int(time.time()) + 600))
    assert status == 401 and message.startswith("Token verification failed: ")


def test_a_wrong_or_missing_issuer_is_invalid_token_issuer() -> None:
    made = verifier(JWT_ISSUER="https://idp.example")
    assert refusal(made, mint(iss="https://evil.example")) == (401, "Invalid token issuer")
    assert refusal(made, mint()) == (401, "Invalid token issuer")


def test_a_wrong_or_missing_audience_is_invalid_token_audience() -> None:
    made = verifier(JWT_AUDIENCE="queen")
    assert refusal(made, mint(aud="other")) == (401, "Invalid token audience")
    assert refusal(made, mint()) == (401, "Invalid token audience")


def test_a_token_of_another_algorithm_than_the_setting_is_refused() -> None:
    made = verifier(JWT_ALGORITHM="RS256", JWT_PUBLIC_KEY=public_pem(RSA_KEY))
    assert refusal(made, mint()) == (401, "Token uses HS256, expected RS256")
    assert refusal(verifier(), mint(RSA_KEY, "RS256")) == (401, "Token uses RS256, expected HS256")


def test_alg_none_is_refused_in_every_mode() -> None:
    assert refusal(verifier(), unsigned()) == (401, "Token uses none, expected HS256")
    made = verifier(JWT_ALGORITHM="auto")
    assert refusal(made, unsigned()) == (401, "Unsupported algorithm: none")


def test_auto_refuses_algorithms_it_does_not_know() -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    ec_key = ec.generate_private_key(ec.SECP256R1())
    made = verifier(JWT_ALGORITHM="auto")
    assert refusal(made, mint(ec_key, "ES256")) == (401, "Unsupported algorithm: ES256")


def test_hs256_without_a_secret_answers_500() -> None:
    # Only reachable when the start-up check is bypassed; the answer is upstream's.
    made = make_verifier(Config.defaults().with_changes(jwt_enabled=True), system_clock())
    assert made is not None
    assert refusal(made, mint()) == (500, "HS256 secret not configured")


def test_a_sub_that_is_not_a_string_is_refused() -> None:
    status, message = refusal(verifier(), mint(sub=42))
    assert status == 401 and message.startswith("Token verification failed: ")


def test_a_header_over_8_kib_is_refused_before_parsing() -> None:
    huge = mint(padding="x" * 9000)
    status, message = refusal(verifier(), huge)
    assert status == 401 and message.startswith("Token decode error: ")


def test_a_wrong_typ_is_refused() -> None:
    status, message = refusal(verifier(), mint(headers={"typ": "dpop+jwt"}))
    assert status == 401 and message.startswith("Token decode error: ")
    assert isinstance(outcome(verifier(), mint(headers={"typ": "at+jwt"})), Identity)


@pytest.mark.parametrize("header", [
    b"Bearer not-a-token",
    b"Bearer a.b.c",
    b"Bearer !!!.@@@.###",
    b"Bearer \xff\xfe\xfd.\x80.\x81",
    b"Bearer eyJhbGciOiJIUzI1NiJ9.e30",
    b"Bearer " + base64.urlsafe_b64encode(b"[1,2]").rstrip(b"=") + b".e30.sig",
    b"Bearer " + base64.urlsafe_b64encode(json.dumps({"alg": 5}).encode()).rstrip(b"=")
    + b".e30.c2ln",
    b"Bearer " + base64.urlsafe_b64encode(json.dumps({"alg": "HS256", "kid": []}).encode())
    .rstrip(b"=") + b".e30.c2ln",
])
def test_garbage_is_a_decode_error_never_an_exception(header: bytes) -> None:
    status, message = refusal(verifier(JWT_ALGORITHM="auto"), header)
    assert status == 401 and message.startswith("Token decode error: ")


def test_a_signed_payload_that_is_not_an_object_is_a_decode_error() -> None:
    token = jwt.api_jws.encode(b"[1, 2, 3]", SECRET, algorithm="HS256")
    status, message = refusal(verifier(), b"Bearer " + token.encode())
    assert status == 401 and message.startswith("Token decode error: ")


def _segments(token: bytes) -> list[bytes] | None:
    """The decoded parts of a compact JWT, or None when a part is not base64url."""
    try:
        return [base64.urlsafe_b64decode(part + b"=" * (-len(part) % 4))
                for part in token.split(b".")]
    except ValueError:
        return None


def test_random_bytes_always_end_as_a_401() -> None:
    rng = random.Random(17)
    made = verifier(JWT_ALGORITHM="auto", JWT_PUBLIC_KEY=public_pem(RSA_KEY))
    good = mint()[len(b"Bearer "):]
    for _ in range(500):
        mutated = bytearray(good)
        for _ in range(rng.randint(1, 8)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        if b"." in mutated and _segments(bytes(mutated)) == _segments(good):
            # a changed last character can differ only in base64's unused low bits: the
            # same header, claims and signature, i.e. the same token, rightly admitted
            continue
        assert refusal(made, b"Bearer " + bytes(mutated))[0] == 401
        noise = bytes(rng.randrange(256) for _ in range(rng.randint(1, 300)))
        assert refusal(made, noise)[0] == 401


# --- the verified-token cache ---------------------------------------------------------------


def test_a_verified_token_is_served_from_the_cache_until_exp_plus_skew() -> None:
    clock = system_clock()
    made = verifier(clock, JWT_CLOCK_SKEW="30")
    exp = int(clock.seconds()) + 120
    token = mint(exp=exp)
    assert made.cached(token) is None
    identity = outcome(made, token)
    assert made.cached(token) == identity
    assert made.cached(b"BEARER " + token[len(b"Bearer "):]) == identity
    clock.advance(exp + 30 - clock.seconds() - 0.5)
    assert made.cached(token) == identity
    clock.advance(1)
    assert made.cached(token) is None


def test_a_cached_token_ends_when_the_wall_clock_passes_its_exp() -> None:
    """The cache times entries on the reactor's (monotonic) clock; a step of the wall clock
    past exp ends the entry too, as pyjwt would refuse the token then."""
    wall = [time.time()]
    made = TokenVerifier(algorithm="HS256", clock=system_clock(), secret=SECRET,
                         clock_skew_s=30, wall=lambda: wall[0])
    token = mint(exp=int(wall[0]) + 120)
    identity = outcome(made, token)
    assert made.cached(token) == identity

    wall[0] += 151  # stepped past exp + skew; the reactor's clock did not move

    assert made.cached(token) is None


@pytest.mark.parametrize("as_sent", [str, lambda exp: exp + 0.9],
                         ids=["a string of digits", "a fraction"])
def test_the_cache_reads_exp_as_pyjwt_enforces_it(as_sent) -> None:
    """pyjwt reads exp as int(exp): "1700000000" counts and .9 is cut. The cache read a
    string as no exp (kept 300 s, past the expiry) and kept the fraction (up to 1 s more)."""
    clock = system_clock()
    made = verifier(clock, JWT_CLOCK_SKEW="0")
    exp = int(clock.seconds()) + 120
    token = mint(exp=as_sent(exp))
    assert isinstance(outcome(made, token), Identity)
    clock.advance(exp - clock.seconds() - 0.05)
    assert made.cached(token) is not None
    clock.advance(0.1)
    assert made.cached(token) is None


def test_a_token_without_exp_is_cached_for_a_bounded_time() -> None:
    clock = system_clock()
    made = verifier(clock)
    token_claims = claims()
    del token_claims["exp"]
    token = b"Bearer " + jwt.encode(token_claims, SECRET, algorithm="HS256").encode()
    assert isinstance(outcome(made, token), Identity)
    clock.advance(299)
    assert made.cached(token) is not None
    clock.advance(2)
    assert made.cached(token) is None


def test_an_exp_too_large_for_a_float_is_never_and_cached_for_a_bounded_time() -> None:
    clock = system_clock()
    made = verifier(clock)
    body = ('{"sub": "alice", "exp": 1' + "0" * 400 + "}").encode()
    token = b"Bearer " + jwt.api_jws.encode(body, SECRET, algorithm="HS256").encode()
    identity = outcome(made, token)
    assert isinstance(identity, Identity) and identity.expires_at == float("inf")
    clock.advance(301)
    assert made.cached(token) is None


def test_the_cache_is_bounded_and_drops_the_least_recently_used() -> None:
    clock = system_clock()
    made = TokenVerifier(algorithm="HS256", clock=clock, secret=SECRET, cache_entries=2)
    first, second, third = (mint(sub=name) for name in ("a", "b", "c"))
    for token in (first, second):
        outcome(made, token)
    assert made.cached(first) is not None  # now the most recently used
    outcome(made, third)
    assert made.cached(second) is None
    assert made.cached(first) is not None and made.cached(third) is not None


def test_a_cached_token_still_needs_its_header_to_fit() -> None:
    made = verifier()
    outcome(made, mint())
    assert made.cached(None) is None
    assert made.cached(b"x" * 9000) is None


@pytest.mark.parametrize("sub", ["mal\x00lory", "lone-\ud800"])
def test_a_subject_no_message_could_carry_is_refused(sub: str) -> None:
    """The sub becomes each pushed message's producerSub: PostgreSQL cannot store a NUL or a
    lone surrogate, and every push signed with it failed instead of a clean 401."""
    status, message = refusal(verifier(), mint(sub=sub))

    assert status == 401 and message.startswith("Token verification failed: the sub claim")
