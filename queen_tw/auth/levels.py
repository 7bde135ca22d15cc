"""What each route requires and what each role may do (WIRE.md 4.2), in one table.

:data:`ROUTE_LEVELS` names every route of the server by method and Klein rule with its
level; a test compares it with the router, so a route added without a row fails the suite
instead of silently getting a default. A request no row matches falls back on
:data:`ADMIN_PREFIXES` (the WIRE's wildcard ``/api/v1/system/*``, ``/internal/api/*`` and
``/api/v1/migration/*`` rows), then on READ_WRITE, as WIRE 4.2 says for unknown routes.

Nothing here touches a request: :class:`RouteLevels` answers for a method and a path, which
keeps the table testable without a server and cacheable per path.
"""

from __future__ import annotations

import enum
import functools
import itertools
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, Iterable, Optional, Sequence, Tuple
from urllib.parse import unquote_to_bytes

from klein import Klein
from werkzeug.exceptions import MethodNotAllowed, NotFound
from werkzeug.routing import Map, PathConverter, RequestRedirect, Rule


class Level(enum.IntEnum):
    """What a route requires, lowest first: a role admits its own level and those below."""

    PUBLIC = 0
    READ_ONLY = 1
    READ_WRITE = 2
    ADMIN = 3


_P, _RO, _RW, _AD = Level.PUBLIC, Level.READ_ONLY, Level.READ_WRITE, Level.ADMIN

ROUTE_LEVELS: Tuple[Tuple[str, str, Level], ...] = (
    # public: probes, the API description and the dashboard's static files
    ("GET", "/health", _P),
    ("GET", "/metrics", _P),
    ("GET", "/metrics/prometheus", _P),
    ("GET", "/api/v1/openapi.json", _P),
    ("GET", "/", _P),
    ("GET", "/dashboard/<name>", _P),
    # the message path
    ("POST", "/api/v1/configure", _RW),
    ("POST", "/api/v1/push", _RW),
    ("GET", "/api/v1/pop", _RW),
    ("GET", "/api/v1/pop/queue/<queue>", _RW),
    ("GET", "/api/v1/pop/queue/<queue>/partition/<partition>", _RW),
    ("POST", "/api/v1/ack", _RW),
    ("POST", "/api/v1/ack/batch", _RW),
    ("POST", "/api/v1/transaction", _RW),
    ("POST", "/api/v1/lease/<lease_id>/extend", _RW),
    # resources and statistics
    ("GET", "/api/v1/resources/overview", _RO),
    ("GET", "/api/v1/resources/queues", _RO),
    ("GET", "/api/v1/resources/queues/<queue>", _RO),
    ("GET", "/api/v1/resources/queues/<queue>/depth", _RO),  # WIRE2.md 1.5, 10
    ("DELETE", "/api/v1/resources/queues/<queue>", _AD),
    ("GET", "/api/v1/resources/namespaces", _RO),
    ("GET", "/api/v1/resources/tasks", _RO),
    ("GET", "/api/v1/resources/partitions", _RO),
    ("DELETE", "/api/v1/queues/<queue>/clear", _AD),  # queen-tw (inferred)
    ("POST", "/api/v1/stats/refresh", _AD),
    ("GET", "/api/v1/status/buffers", _RO),
    # status and analytics for dashboards (WIRE.md 3.4)
    ("GET", "/api/v1/status", _RO),
    ("GET", "/api/v1/status/queues", _RO),
    ("GET", "/api/v1/status/queues/<queue>", _RO),
    ("GET", "/api/v1/status/queues/<queue>/messages", _RO),
    ("GET", "/api/v1/status/analytics", _RO),
    ("GET", "/api/v1/analytics/system-metrics", _RO),
    ("GET", "/api/v1/analytics/worker-metrics", _RO),
    ("GET", "/api/v1/analytics/postgres-stats", _RO),
    ("GET", "/api/v1/analytics/queue-lag", _RO),
    ("GET", "/api/v1/analytics/queue-ops", _RO),
    ("GET", "/api/v1/analytics/queue-parked-replicas", _RO),
    ("GET", "/api/v1/analytics/retention", _RO),
    # messages, dead letters, traces
    ("GET", "/api/v1/messages", _RO),
    ("GET", "/api/v1/messages/<partition_id>/<path:transaction_id>", _RO),
    ("DELETE", "/api/v1/messages/<partition_id>/<path:transaction_id>", _RW),
    ("POST", "/api/v1/messages/<partition_id>/<path:transaction_id>/retry", _RW),  # inferred
    ("POST", "/api/v1/messages/<partition_id>/<path:transaction_id>/dlq", _RW),  # inferred
    ("GET", "/api/v1/dlq", _RO),
    ("POST", "/api/v1/traces", _RW),
    ("GET", "/api/v1/traces/<partition_id>/<path:transaction_id>", _RO),
    ("GET", "/api/v1/traces/by-name/<path:name>", _RO),
    ("GET", "/api/v1/traces/names", _RO),
    # consumer groups
    ("GET", "/api/v1/consumer-groups", _RO),
    ("GET", "/api/v1/consumer-groups/lagging", _RO),
    ("GET", "/api/v1/consumer-groups/<group>", _RO),
    ("DELETE", "/api/v1/consumer-groups/<group>", _AD),
    ("DELETE", "/api/v1/consumer-groups/<group>/queues/<queue>", _AD),
    ("POST", "/api/v1/consumer-groups/<group>/subscription", _RW),
    ("POST", "/api/v1/consumer-groups/<group>/queues/<queue>/seek", _RW),
    ("POST", "/api/v1/consumer-groups/<group>/queues/<queue>/partitions/<partition>/seek",
     _RW),
    # system, shared state, internal (also covered by ADMIN_PREFIXES)
    ("GET", "/api/v1/system/maintenance", _AD),
    ("POST", "/api/v1/system/maintenance", _AD),
    ("GET", "/api/v1/system/maintenance/pop", _AD),
    ("POST", "/api/v1/system/maintenance/pop", _AD),
    ("GET", "/api/v1/system/shared-state", _AD),
    ("GET", "/internal/api/shared-state/stats", _AD),
    ("GET", "/internal/api/inter-instance/stats", _AD),
    ("POST", "/internal/api/notify", _AD),
    # streams (WIRE.md 3.9)
    ("POST", "/streams/v1/queries", _RW),
    ("POST", "/streams/v1/cycle", _RW),
    ("POST", "/streams/v1/state/get", _RO),
    # ephemeral queues (WIRE2.md 1.5, 7)
    ("POST", "/api/v1/ephemeral/configure", _RW),
    ("POST", "/api/v1/ephemeral/reset", _RW),
    ("DELETE", "/api/v1/ephemeral/queue/<path:queue>", _RW),
    ("POST", "/api/v1/ephemeral/push", _RW),
    ("GET", "/api/v1/ephemeral/pop", _RW),
    ("POST", "/api/v1/ephemeral/ack", _RW),
    ("GET", "/api/v1/ephemeral/queues", _RO),
    ("GET", "/api/v1/ephemeral/queues/<path:queue>/depth", _RO),
    # reads by offset (WIRE2.md 1.5, 6)
    ("POST", "/api/v1/fetch", _RO),
    ("POST", "/api/v1/partitions/changed", _RO),
    # KV state and locks (WIRE2.md 1.5, 2, 4): POST even for read-only batches
    ("POST", "/api/v1/kv", _RW),
    ("GET", "/api/v1/kv/<ns>/<path:key>", _RO),
    ("PUT", "/api/v1/kv/<ns>/<path:key>", _RW),
    ("DELETE", "/api/v1/kv/<ns>/<path:key>", _RW),
    ("POST", "/api/v1/locks", _RW),
    # timers (WIRE2.md 1.5, 3)
    ("POST", "/api/v1/timers", _RW),
    ("GET", "/api/v1/timers/<queue>", _RO),
    ("GET", "/api/v1/timers/<queue>/<path:timer_key>", _RO),
    ("DELETE", "/api/v1/timers/<queue>/<path:timer_key>", _RW),
)
"""(method, Klein rule, level) of every route; a GET row also covers HEAD."""

ADMIN_PREFIXES = ("/api/v1/system/", "/internal/api/", "/api/v1/migration/")
"""WIRE 4.2's wildcard ADMIN rows: a path under them that no row names is still ADMIN."""

DEFAULT_LEVEL = Level.READ_WRITE
"""WIRE 4.2: a route the table does not know requires read-write."""


@dataclass(frozen=True)
class RoleNames:
    """The role names of a deployment (``JWT_ROLE_ADMIN``, ``_READ_WRITE``, ``_READ_ONLY``)."""

    admin: str = "admin"
    read_write: str = "read-write"
    read_only: str = "read-only"

    def clearance(self, roles: Iterable[str]) -> Level:
        """The highest level ``roles`` admit; PUBLIC when none is a known role."""
        held = frozenset(roles)
        if self.admin in held:
            return Level.ADMIN
        if self.read_write in held:
            return Level.READ_WRITE
        if self.read_only in held:
            return Level.READ_ONLY
        return Level.PUBLIC


class SkipPaths:
    """``JWT_SKIP_PATHS``: paths served without authentication.

    An entry ending in ``/`` (other than ``/`` itself) skips every path under it; any other
    entry skips exactly its path, so the default ``/`` opens the root and nothing below it.
    """

    def __init__(self, entries: Iterable[str]):
        self.entries = tuple(entry for entry in entries if entry)
        self._prefixes = tuple(e for e in self.entries if e.endswith("/") and e != "/")
        self._exact: FrozenSet[str] = frozenset(self.entries) - frozenset(self._prefixes)

    @classmethod
    def parse(cls, text: str) -> SkipPaths:
        """The skip paths of a ``JWT_SKIP_PATHS`` comma list (blanks around entries dropped)."""
        return cls(entry.strip() for entry in text.split(","))

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and (
            path in self._exact or (bool(self._prefixes) and path.startswith(self._prefixes)))


class CatchAllConverter(PathConverter):
    """``<path:...>`` as the catch-all keys need it: any character after the first, control
    characters (a newline) included, which werkzeug's own path converter does not match."""

    regex = "[^/][\\s\\S]*?"


ROUTE_CONVERTERS = {"path": CatchAllConverter}
"""The converters of every URL map that routes or classes requests (the routes' Klein apps,
the router, the auth levels), so that they all match the same paths."""


def routed_klein() -> Klein:
    """A Klein app whose URL map has :data:`ROUTE_CONVERTERS` (every route module's app).

    An app with werkzeug's own ``path`` converter did not match a path the router had
    matched (a newline inside a catch-all segment), and answered that request 500."""
    app = Klein()
    app.url_map.converters.update(ROUTE_CONVERTERS)  # before any rule is added
    return app


def _catch_all_segments() -> Dict[Tuple[str, ...], Tuple[int, int]]:
    """For each route with a catch-all (``<path:...>``: KV keys and timer keys contain '/',
    WIRE2 2.4 and 3.2; ephemeral queue names may, WIRE2 7; so may a message's transactionId
    and a trace name, which nothing refuses at push), its leading fixed segments -> (the
    catch-all's first segment, how many segments follow it, the fewest of the routes sharing
    those fixed segments: ``…/{t}`` and ``…/{t}/retry``)."""
    found: Dict[Tuple[str, ...], Tuple[int, int]] = {}
    for _, rule, _ in ROUTE_LEVELS:
        segments = rule[1:].split("/")
        for index, segment in enumerate(segments):
            if segment.startswith("<path:"):
                fixed = tuple(itertools.takewhile(lambda part: not part.startswith("<"),
                                                  segments))
                after = len(segments) - index - 1
                found[fixed] = (index, min(after, found.get(fixed, (index, after))[1]))
    return found


_CATCH_ALL_SEGMENTS = _catch_all_segments()


def slash_refused(segments: Sequence[str]) -> bool:
    """True when a decoded path segment holds a '/' (sent as ``%2F``) where no route could
    tell it from a separator: anywhere but in a catch-all, where it decodes once into the key
    (as WIRE2 2.4 asks)."""
    for fixed, (first, after) in _CATCH_ALL_SEGMENTS.items():
        if len(segments) > first + after and tuple(segments[:len(fixed)]) == fixed:
            segments = [*segments[:first], *segments[len(segments) - after:]]
            break
    return any("/" in segment for segment in segments)


def routed_path(raw_path: bytes) -> Optional[str]:
    """The path as the routes match it: each segment percent-decoded (as Twisted does for
    ``request.postpath``) and read as UTF-8. None when no route can match it: a segment that
    is not UTF-8 or holds a refused encoded ``/`` (the routes answer 400 for both)."""
    if b"%" not in raw_path:
        try:
            return raw_path.decode("utf-8")
        except UnicodeDecodeError:
            return None
    try:
        segments = [unquote_to_bytes(segment).decode("utf-8")
                    for segment in raw_path[1:].split(b"/")]
    except UnicodeDecodeError:
        return None
    return None if slash_refused(segments) else "/" + "/".join(segments)


class RouteLevels:
    """The level a request needs, from :data:`ROUTE_LEVELS`, the skip paths and the defaults.

    Answers are cached per (method, raw path) in a bounded LRU: the hot routes' paths are a
    handful, and a pop's path repeats per queue, so the rule matching runs once per path.

    :param skip: paths that need no token (``JWT_SKIP_PATHS``).
    :param table: the (method, rule, level) rows; :data:`ROUTE_LEVELS` unless a test says.
    :param cache_size: how many distinct (method, path) answers are kept.
    """

    def __init__(self, skip: SkipPaths,
                 table: Iterable[Tuple[str, str, Level]] = ROUTE_LEVELS,
                 cache_size: int = 4096):
        self._skip = skip
        self._map = Map([Rule(rule, methods=[method], endpoint=level)
                         for method, rule, level in table], converters=ROUTE_CONVERTERS)
        self.level_of: Callable[[bytes, bytes], Level] = functools.lru_cache(
            maxsize=cache_size)(self._level_of)

    def _level_of(self, method: bytes, raw_path: bytes) -> Level:
        """The level of ``method`` on ``raw_path`` (the request's path, no query string)."""
        if method == b"OPTIONS":
            return Level.PUBLIC  # WIRE 1.6: pre-flights are never checked
        path = routed_path(raw_path)
        if path is None:
            return DEFAULT_LEVEL
        if path in self._skip:
            return Level.PUBLIC
        try:
            level, _ = self._map.bind("localhost", path_info=path,
                                      default_method=method.decode("latin-1")).match()
            return Level(level)
        except (NotFound, MethodNotAllowed, RequestRedirect):
            pass
        if path.startswith(ADMIN_PREFIXES):
            return Level.ADMIN
        return DEFAULT_LEVEL
