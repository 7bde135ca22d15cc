"""The options of an ephemeral queue (WIRE2.md 7): what ``configure`` accepts, and the
settings the engine applies once the broker's defaults fill the gaps.

The option list is closed: an unknown key is refused, because every option bounds something
and a misspelt one silently left at its default is a queue that drops data for a reason
nobody can see. The stored declaration keeps only keys this module knows, so reading it back
at start goes through the same :func:`parse_options`.
"""

from dataclasses import dataclass
from typing import Any, Dict, Mapping

from queen_tw.ephemeral.errors import BadRequest

POLICIES = ("reject", "dropOldest")

OPTION_NAMES = ("maxBytes", "maxLength", "policy", "ttlSeconds", "leaseSeconds", "retryLimit",
                "windowBuffer")

# Upper bounds of the numeric options: beyond them a value is a mistake (a lease of years, a
# window longer than any long poll), answered 400 rather than silently clamped.
_LIMITS = {"maxBytes": 2**53, "maxLength": 2**53, "ttlSeconds": 10 * 365 * 86400,
           "leaseSeconds": 86400, "retryLimit": 1000}
_WINDOW_LIMITS = {"ms": 300_000, "count": 10_000}


@dataclass(frozen=True)
class Defaults:
    """The broker's settings for what a queue leaves out (QUEEN_EPHEMERAL_* options).

    ``max_bytes`` is the broker-wide budget over every ephemeral queue (0 = unlimited);
    ``queue_max_bytes`` and ``queue_max_length`` bound a queue that declares no bound.
    """

    max_bytes: int = 256 * 1024 * 1024
    queue_max_bytes: int = 16 * 1024 * 1024
    queue_max_length: int = 10_000
    lease_seconds: int = 30
    retry_limit: int = 3


@dataclass(frozen=True)
class Settings:
    """What the engine applies to one queue: its options over the broker's defaults."""

    max_bytes: int
    max_length: int
    policy: str
    ttl_seconds: int
    lease_seconds: int
    retry_limit: int
    window_ms: int
    window_count: int

    @property
    def windowed(self) -> bool:
        """True when a waiting pop keeps collecting after its first message."""
        return self.window_ms > 0 or self.window_count > 0

    def as_options(self) -> Dict[str, Any]:
        """The effective settings in the wire's spelling (the queues listing)."""
        return {"maxBytes": self.max_bytes, "maxLength": self.max_length,
                "policy": self.policy, "ttlSeconds": self.ttl_seconds,
                "leaseSeconds": self.lease_seconds, "retryLimit": self.retry_limit,
                "windowBuffer": {"ms": self.window_ms, "count": self.window_count}}


def _count(value: Any, what: str, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadRequest(f"{what} must be a non-negative integer")
    if value > maximum:
        raise BadRequest(f"{what} must be at most {maximum}")
    return value


def _window(value: Any) -> Dict[str, int]:
    if not isinstance(value, dict):
        raise BadRequest("windowBuffer must be an object {ms?, count?}")
    unknown = sorted(set(value) - set(_WINDOW_LIMITS))
    if unknown:
        raise BadRequest(f"unknown windowBuffer field {unknown[0]!r}; the fields are ms, count")
    return {key: _count(value[key], f"windowBuffer.{key}", limit)
            for key, limit in _WINDOW_LIMITS.items() if value.get(key) is not None}


def parse_options(raw: Any) -> Dict[str, Any]:
    """The options of a ``configure`` body, checked; ``null`` values are left out.

    Raises :class:`BadRequest` naming the first bad option.
    """
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise BadRequest("options must be an object")
    unknown = sorted(set(raw) - set(OPTION_NAMES))
    if unknown:
        raise BadRequest(f"unknown option {unknown[0]!r}; the ephemeral options are "
                         f"{', '.join(OPTION_NAMES)}")
    options: Dict[str, Any] = {}
    for name in OPTION_NAMES:
        value = raw.get(name)
        if value is None:
            continue
        if name == "policy":
            if value not in POLICIES:
                raise BadRequest('policy must be "reject" or "dropOldest"')
            options[name] = value
        elif name == "windowBuffer":
            options[name] = _window(value)
        else:
            options[name] = _count(value, name, _LIMITS[name])
    return options


def settings_of(options: Mapping[str, Any], defaults: Defaults) -> Settings:
    """``options`` (as :func:`parse_options` returns them) over ``defaults``.

    A bound of 0 means the broker's default, as an absent one does; ``ttlSeconds`` 0 means
    no age limit and ``retryLimit`` 0 means no redelivery.
    """
    window = options.get("windowBuffer") or {}
    return Settings(
        max_bytes=options.get("maxBytes") or defaults.queue_max_bytes,
        max_length=options.get("maxLength") or defaults.queue_max_length,
        policy=options.get("policy", "reject"),
        ttl_seconds=options.get("ttlSeconds", 0),
        lease_seconds=options.get("leaseSeconds") or defaults.lease_seconds,
        retry_limit=options.get("retryLimit", defaults.retry_limit),
        window_ms=window.get("ms", 0),
        window_count=window.get("count", 0))
