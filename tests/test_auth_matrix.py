"""Authorization on every route (WIRE.md 4.2, 4.3): a route x token matrix over a real socket.

The routes are read from the router (every Klein app of ``route_sets``; the hot push/pop/ack
shortcut serves the same paths), never listed here, so a route added without a row in
``queen_tw.auth.levels`` fails ``test_every_routed_route_has_a_level``, and its cells are
called like every other route's. The level each route *should* have is restated below from
WIRE 4.2's prose (prefixes and named exceptions), independently of the table the gate uses.

Each route is called, over a real socket on a server started with ``JWT_ENABLED=true``, with
no token, an expired token, a wrong-issuer token, a wrong-audience token and a read-only,
read-write and admin token (HS256, minted with pyjwt). Expected: 401 with WIRE 4.3's text for
the first four (unless the route is public), 403 ``Insufficient permissions`` for a role below
the route's level, and neither 401 nor 403 (nor a 5xx) otherwise: no cell may bypass.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any, Dict, List, Optional, Tuple, cast

import httpx
import jwt
import pytest

from queen_tw.auth.levels import (
    ROUTE_LEVELS,
    Level,
    RoleNames,
    RouteLevels,
    SkipPaths,
    routed_path,
)
from queen_tw.http.messaging import PopDefaults
from queen_tw.http.openapi import openapi_document
from queen_tw.http.routes import route_sets

from tests.error_answers import assert_json_error
from tests.http_helpers import raw_answer
from tests.support import running_server, unique_name

SECRET = "matrix-secret-that-is-long-enough-for-hs256"
ISSUER = "https://idp.matrix.test"
AUDIENCE = "queen-matrix"

JWT_ENV = {"JWT_ENABLED": "true", "JWT_SECRET": SECRET, "JWT_ISSUER": ISSUER,
           "JWT_AUDIENCE": AUDIENCE}

Route = Tuple[str, str]  # (method, Klein rule)


def mint(role: Optional[str] = "read-write", sub: Optional[str] = "matrix-user",
         lifetime_s: float = 3600, **overrides: Any) -> str:
    """An HS256 token of the matrix server (``overrides`` replace or add claims)."""
    now = int(time.time())
    claims: Dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "iat": now,
                              "exp": now + int(lifetime_s)}
    if sub is not None:
        claims["sub"] = sub
    if role is not None:
        claims["role"] = role
    claims.update(overrides)
    return jwt.encode(claims, SECRET, algorithm="HS256")


TOKENS: Dict[str, Optional[str]] = {
    "none": None,
    "expired": mint(lifetime_s=-3600),
    "wrong-issuer": mint(iss="https://someone.else"),
    "wrong-audience": mint(aud="another-service"),
    "read-only": mint("read-only"),
    "read-write": mint("read-write"),
    "admin": mint("admin"),
}
REFUSALS = {"none": "Authentication required", "expired": "Token has expired",
            "wrong-issuer": "Invalid token issuer", "wrong-audience": "Invalid token audience"}
CLEARANCE = {"read-only": Level.READ_ONLY, "read-write": Level.READ_WRITE,
             "admin": Level.ADMIN}


def routed() -> List[Route]:
    """Every (method, rule) the site routes, read from the Klein apps it is made of."""
    found = set()
    for route_set in route_sets(cast(Any, None), "matrix", PopDefaults(1, 1000, "all")):
        for rule in route_set.app.url_map.iter_rules():
            for method in rule.methods or ():
                if method not in ("HEAD", "OPTIONS"):  # answered for any path, not routed
                    found.add((method, rule.rule))
    return sorted(found, key=lambda route: (route[1], route[0]))


ROUTED = routed()


def wire_level(method: str, rule: str) -> Level:
    """WIRE 4.2's level for a route, restated from its prose (not from the gate's table)."""
    if rule in ("/health", "/metrics", "/metrics/prometheus", "/api/v1/openapi.json", "/",
                "/dashboard/<name>"):
        return Level.PUBLIC  # probes, the dashboard; the OpenAPI document (issue #17 point 8)
    if rule.startswith(("/api/v1/system/", "/internal/api/", "/api/v1/migration/")):
        return Level.ADMIN
    if (method, rule) in {("DELETE", "/api/v1/resources/queues/<queue>"),
                          ("DELETE", "/api/v1/consumer-groups/<group>"),
                          ("DELETE", "/api/v1/consumer-groups/<group>/queues/<queue>"),
                          ("POST", "/api/v1/stats/refresh"),
                          ("DELETE", "/api/v1/queues/<queue>/clear")}:
        return Level.ADMIN
    read_prefixes = ("/api/v1/resources/", "/api/v1/status", "/api/v1/analytics/",
                     "/api/v1/messages", "/api/v1/dlq", "/api/v1/consumer-groups",
                     "/api/v1/traces")
    if method == "GET" and rule.startswith(read_prefixes):
        return Level.READ_ONLY
    if (method, rule) == ("POST", "/streams/v1/state/get"):
        return Level.READ_ONLY
    if method == "GET" and rule.startswith("/api/v1/timers/"):
        return Level.READ_ONLY  # WIRE2 1.5: timer reads
    if method == "GET" and rule.startswith("/api/v1/ephemeral/queues"):
        return Level.READ_ONLY  # WIRE2.md 1.5: the ephemeral listing and depth reads
    if (method, rule) in {("POST", "/api/v1/fetch"), ("POST", "/api/v1/partitions/changed")}:
        return Level.READ_ONLY  # reads by offset (WIRE2.md 1.5)
    if (method, rule) == ("GET", "/api/v1/kv/<ns>/<path:key>"):
        return Level.READ_ONLY  # WIRE2.md 1.5: the KV path GET (POST /api/v1/kv is RW)
    return Level.READ_WRITE


_VARIABLE = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")


def concrete_path(rule: str) -> str:
    """The rule with each variable filled: ids get a fresh UUID, names a fresh name."""
    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        return str(uuid.uuid4()) if name.endswith("_id") else unique_name()
    return _VARIABLE.sub(value, rule)


def expected(level: Level, token: str) -> str:
    """What the matrix cell must show: a 401 text, ``403``, or ``pass``."""
    if level is Level.PUBLIC:
        return "pass"
    if token in REFUSALS:
        return f"401 {REFUSALS[token]}"
    return "pass" if CLEARANCE[token] >= level else "403"


def observed(answer: httpx.Response) -> str:
    """The matrix cell an answer shows (an auth refusal checked for WIRE 4.3's shape)."""
    if answer.status_code == 401:
        return f"401 {assert_json_error(answer, 401)}"
    if answer.status_code == 403:
        assert_json_error(answer, 403, "Insufficient permissions")
        return "403"
    if answer.status_code >= 500:
        return f"{answer.status_code} {answer.text[:200]}"
    return "pass"


@pytest.fixture(scope="module")
def auth_server(pg_env: dict[str, str]) -> Iterator[Any]:
    with running_server(pg_env, prefix="queen-tw-auth-", **JWT_ENV) as process:
        yield process


@pytest.fixture
def client(auth_server: Any) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=auth_server.url, timeout=40) as http:
        yield http


def call(client: httpx.Client, method: str, path: str, token: Optional[str]) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return client.request(method, path, headers=headers)


# -- the table against the router and WIRE 4.2 ------------------------------------------


def test_every_routed_route_has_a_level() -> None:
    table = {(method, rule) for method, rule, _ in ROUTE_LEVELS}
    missing = [route for route in ROUTED if route not in table]

    assert ROUTED and not missing, f"routes without a row in auth/levels.py: {missing}"


@pytest.mark.parametrize("method,rule,level", ROUTE_LEVELS,
                         ids=[f"{m} {r}" for m, r, _ in ROUTE_LEVELS])
def test_level_table_says_what_wire_says(method: str, rule: str, level: Level) -> None:
    assert level is wire_level(method, rule)


def test_openapi_document_states_the_levels_the_gate_enforces() -> None:
    table = {(method, _VARIABLE.sub("{}", rule)): level for method, rule, level in ROUTE_LEVELS}
    stated = {}
    for path, operations in openapi_document()["paths"].items():
        shape = re.sub(r"\{[^{}]+\}", "{}", path)
        for method, operation in operations.items():
            if isinstance(operation, dict) and "x-queen-level" in operation:
                stated[(method.upper(), shape)] = operation["x-queen-level"]

    assert stated and {route: table[route].name for route in stated} == stated


# -- the matrix over a real socket ------------------------------------------------------


@pytest.mark.parametrize("method,rule", ROUTED, ids=[f"{m} {r}" for m, r in ROUTED])
def test_route_answers_each_token_as_its_level_requires(client: httpx.Client, method: str,
                                                        rule: str) -> None:
    level = wire_level(method, rule)
    want = {token: expected(level, token) for token in TOKENS}

    seen = {token: observed(call(client, method, concrete_path(rule), value))
            for token, value in TOKENS.items()}

    assert seen == want


@pytest.mark.parametrize("method,path", [
    ("POST", "/api/v1/push"), ("POST", "/api/v1/ack"), ("POST", "/api/v1/ack/batch"),
    ("GET", "/api/v1/pop/queue/q-hot"), ("GET", "/api/v1/pop/queue/q-hot/partition/p"),
])
def test_hot_shortcut_paths_are_gated(client: httpx.Client, method: str, path: str) -> None:
    """These exact paths skip Klein (http/hot_routes.py); the gate is in front of them too."""
    push = {"items": [{"queue": unique_name(), "payload": {"never": "stored"}}]}
    body = push if path.endswith("push") else {}

    no_token = client.request(method, path, json=body)
    read_only = client.request(method, path, json=body,
                               headers={"Authorization": f"Bearer {TOKENS['read-only']}"})

    assert_json_error(no_token, 401, "Authentication required")
    assert no_token.headers["www-authenticate"] == "Bearer"
    assert no_token.headers["access-control-allow-origin"] == "*"
    assert_json_error(read_only, 403, "Insufficient permissions")


def test_escaped_path_of_an_admin_route_still_needs_admin(client: httpx.Client) -> None:
    """``%73`` is ``s``: the routes decode it, so the gate must judge the decoded path."""
    read_write = {"Authorization": f"Bearer {TOKENS['read-write']}"}
    admin = {"Authorization": f"Bearer {TOKENS['admin']}"}

    refused = client.get("/api/v1/%73ystem/maintenance", headers=read_write)
    served = client.get("/api/v1/%73ystem/maintenance", headers=admin)

    assert_json_error(refused, 403, "Insufficient permissions")
    assert served.status_code == 200 and "maintenanceMode" in served.json()


@pytest.mark.parametrize("target", [
    b"xapi/v1/system/maintenance", b"*api/v1/system/maintenance",
    b"x/api/v1/system/maintenance", b"xinternal/api/notify",
])
def test_a_target_not_starting_with_a_slash_is_400_not_an_admin_route(
        auth_server: Any, target: bytes) -> None:
    """The routes drop a path's first byte whatever it is, while the gate priced the path as
    sent (no rule matched: read-write): a read-write token reached every admin route."""
    request = (b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
               b"Authorization: Bearer " + TOKENS["read-write"].encode() + b"\r\n\r\n")

    answer = raw_answer(auth_server.port, request)

    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert b"must be a path starting with '/'" in answer


def test_an_absolute_form_target_is_served_and_gated_as_its_path(auth_server: Any) -> None:
    """RFC 9112 3.2.2: a server must accept ``GET http://host/path`` (it answered 404)."""
    def get(target: bytes, role: str) -> bytes:
        return raw_answer(auth_server.port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n"
                          b"Connection: close\r\nAuthorization: Bearer "
                          + TOKENS[role].encode() + b"\r\n\r\n")

    admin_route = b"http://127.0.0.1/api/v1/system/maintenance"
    assert get(admin_route, "read-write").startswith(b"HTTP/1.1 403 ")
    assert get(admin_route, "admin").startswith(b"HTTP/1.1 200 ")
    assert get(b"http://127.0.0.1/health", "read-only").startswith(b"HTTP/1.1 200 ")


def test_unknown_route_needs_read_write_and_then_answers_404(client: httpx.Client) -> None:
    read_only = client.get("/api/v1/no-such-route",
                           headers={"Authorization": f"Bearer {TOKENS['read-only']}"})
    read_write = client.get("/api/v1/no-such-route",
                            headers={"Authorization": f"Bearer {TOKENS['read-write']}"})

    assert_json_error(client.get("/api/v1/no-such-route"), 401, "Authentication required")
    assert_json_error(read_only, 403, "Insufficient permissions")
    assert_json_error(read_write, 404, "Not found")


def test_preflight_is_answered_without_a_token(client: httpx.Client) -> None:
    answer = client.options("/api/v1/system/maintenance")

    assert answer.status_code == 204
    assert answer.headers["access-control-allow-headers"] == (
        "Content-Type, Authorization, X-Request-Id")


def test_roles_array_claim_grants_the_highest_listed_role(client: httpx.Client) -> None:
    token = mint(role=None, roles=["reporting", "admin"])

    answer = client.get("/api/v1/system/maintenance", headers={"Authorization": token})

    assert answer.status_code == 200, answer.text  # a header without "Bearer" is the token


def test_token_without_a_known_role_is_refused_with_403(client: httpx.Client) -> None:
    token = mint(role="auditor")

    answer = client.get("/api/v1/resources/queues", headers={"Authorization": f"Bearer {token}"})

    assert_json_error(answer, 403, "Insufficient permissions")


@pytest.mark.parametrize("header,error", [
    ("Bearer", "Empty token"),
    ("Bearer not.a.token", None),
    ("Bearer " + "A" * 9000, None),
    (f"Bearer {jwt.encode({'sub': 'x', 'role': 'admin'}, None, algorithm='none')}", None),
    (f"Bearer {mint(role='admin')[:-4]}AAAA", "Invalid token signature"),
])
def test_bad_tokens_answer_401_never_500(client: httpx.Client, header: str,
                                         error: Optional[str]) -> None:
    answer = client.post("/api/v1/push", headers={"Authorization": header},
                         json={"items": [{"queue": unique_name(), "payload": 1}]})

    assert_json_error(answer, 401, error)


# -- the pieces of the gate, without a server -------------------------------------------


def test_skip_paths_match_exactly_or_as_prefix_when_ending_in_slash() -> None:
    skip = SkipPaths.parse("/health, /api/v1/resources/, /")

    assert "/health" in skip and "/" in skip
    assert "/api/v1/resources/queues" in skip
    assert "/health/x" not in skip
    assert "/api/v1/resources" not in skip
    assert "/api/v1/push" not in skip  # "/" opens the root only


def test_skipped_path_needs_no_token_but_others_do() -> None:
    levels = RouteLevels(SkipPaths.parse("/api/v1/resources/"))

    assert levels.level_of(b"GET", b"/api/v1/resources/queues") is Level.PUBLIC
    assert levels.level_of(b"DELETE", b"/api/v1/resources/queues/q") is Level.PUBLIC
    assert levels.level_of(b"GET", b"/api/v1/messages") is Level.READ_ONLY


@pytest.mark.parametrize("method,path,level", [
    (b"GET", b"/api/v1/pop/queue/orders", Level.READ_WRITE),
    (b"HEAD", b"/api/v1/resources/queues", Level.READ_ONLY),
    (b"OPTIONS", b"/api/v1/system/maintenance", Level.PUBLIC),
    (b"GET", b"/api/v1/system/not-yet-routed", Level.ADMIN),
    (b"POST", b"/internal/api/anything/new", Level.ADMIN),
    (b"GET", b"/api/v1/migration/status", Level.ADMIN),
    (b"GET", b"/api/v1/brand-new", Level.READ_WRITE),
    (b"PUT", b"/api/v1/resources/queues/q", Level.READ_WRITE),  # a method no row has
    (b"GET", b"/api/v1/%73tatus/buffers", Level.READ_ONLY),
    (b"GET", b"/api/v1/resources/queues/a%2Fb", Level.READ_WRITE),  # the routes refuse it
    (b"GET", b"/api/v1/resources/queues/%ff", Level.READ_WRITE),
    (b"GET", b"/api/v1/kv/ns/a%2Fb", Level.READ_ONLY),  # the key's encoded '/' is routed
    (b"DELETE", b"/api/v1/timers/q/a%2Fb", Level.READ_WRITE),
    (b"GET", b"/health", Level.PUBLIC),
    (b"GET", b"/health/", Level.READ_WRITE),  # not the skip path; no route either
])
def test_level_of_a_request(method: bytes, path: bytes, level: Level) -> None:
    levels = RouteLevels(SkipPaths.parse("/health,/metrics/prometheus,/metrics,/"))

    assert levels.level_of(method, path) is level


def test_routed_path_decodes_as_the_routes_do() -> None:
    assert routed_path(b"/api/v1/pop/queue/orders") == "/api/v1/pop/queue/orders"
    assert routed_path(b"/api/v1/resources/queues/caf%C3%A9") == "/api/v1/resources/queues/café"
    assert routed_path(b"/api/v1/resources/queues/a%2Fb") is None
    assert routed_path(b"/api/v1/resources/queues/%ff") is None
    # catch-all keys (KV, timers) take an encoded '/' into the key; their other names do not
    assert routed_path(b"/api/v1/kv/ns/a%2Fb/c") == "/api/v1/kv/ns/a/b/c"
    assert routed_path(b"/api/v1/timers/q/a%2Fb") == "/api/v1/timers/q/a/b"
    assert routed_path(b"/api/v1/kv/n%2Fs/a") is None
    assert routed_path(b"/api/v1/timers/q%2Fx/a") is None


def test_catch_all_keys_with_a_newline_get_their_routes_level() -> None:
    levels = RouteLevels(SkipPaths.parse("/health"))

    assert levels.level_of(b"GET", b"/api/v1/kv/ns/a%0Ab") is Level.READ_ONLY
    assert levels.level_of(b"GET", b"/api/v1/timers/q/a%0Ab") is Level.READ_ONLY


def test_role_names_are_configurable() -> None:
    names = RoleNames(admin="queen-admin", read_write="producer", read_only="viewer")

    assert names.clearance({"producer"}) is Level.READ_WRITE
    assert names.clearance({"viewer", "queen-admin"}) is Level.ADMIN
    assert names.clearance({"read-write"}) is Level.PUBLIC  # the default names mean nothing now


@pytest.mark.parametrize("size, expect", [(60 * 1024 * 1024, True), (10 * 1024 * 1024, False)])
def test_an_anonymous_body_is_refused_without_being_read(auth_server: Any, size: int,
                                                         expect: bool) -> None:
    """No token, a route that needs one: the 401 comes before the body (never invited with
    100 Continue), and the connection closes; an anonymous client cannot make the server
    take in bodies of up to QUEEN_MAX_BODY_BYTES."""
    head = (b"POST /api/v1/push HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + (b"Expect: 100-continue\r\n" if expect else b"")
            + b"Content-Length: " + str(size).encode() + b"\r\n\r\n")

    answer = raw_answer(auth_server.port, head)  # its body is never sent

    assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
    assert b"100 Continue" not in answer and b"Authentication required" in answer


def test_an_anonymous_chunked_body_is_refused_once_it_passes_a_mebibyte(
        auth_server: Any) -> None:
    """A chunked body announces no length up front: it was read to its end (up to
    QUEEN_MAX_BODY_BYTES) before the 401. Now it is refused at the chunk that takes it past
    1 MiB, here a chunk header announcing 2 MiB, before the chunk's bytes come."""
    head = (b"POST /api/v1/push HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % (2 << 20) + b'{"items": [')

    answer = raw_answer(auth_server.port, head)  # the rest of the chunk is never sent

    assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
    assert b"Authentication required" in answer


def test_a_small_anonymous_body_is_read_and_answered_401(client: httpx.Client) -> None:
    answer = client.post("/api/v1/push", json={"items": [{"queue": "q", "payload": 1}]})

    assert_json_error(answer, 401)


def test_an_absolute_form_body_for_a_skipped_path_is_read(pg_env: dict[str, str]) -> None:
    """The channel asks the gate, at header time, whether an anonymous body will be refused:
    it asked with the target as sent, so an absolute-form request to a path in
    JWT_SKIP_PATHS was refused 401 unread, where the gate serves that path to anyone."""
    with running_server(pg_env, prefix="queen-tw-auth-skip-", **JWT_ENV,
                        JWT_SKIP_PATHS="/api/v1/push") as skipping:
        body = json.dumps({"items": [{"queue": unique_name(), "payload": "x" * (2 << 20)}]})
        answer = raw_answer(skipping.port, (
            "POST http://127.0.0.1/api/v1/push HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n{body}").encode())
    assert answer.startswith(b"HTTP/1.1 201 "), answer[:200]
