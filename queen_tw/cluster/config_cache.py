"""The queue settings a push needs before it reaches PostgreSQL, cached per queue.

Every push must know whether its queue has ``encryptionEnabled``: with a
``QUEEN_ENCRYPTION_KEY`` the payload is sealed in Python before the SQL call, and without one
such a push is refused rather than stored in plaintext. Reading ``queue_flags`` for every
request cost a round trip per push; this cache keeps the answer.

Correctness before hit rate, because a stale "not encrypted" would store an encrypted
queue's payload in plaintext:

- a configure or delete made through this process updates the entry at once;
- a peer's ``QUEUE_CONFIG_SET`` / ``QUEUE_CONFIG_DELETE`` datagram updates it at once;
- every entry expires ``ttl`` seconds after it was written, so a change that reached this
  process by neither path (a lost datagram, sync off, another worker of NUM_WORKERS) is
  read from PostgreSQL at the latest ``ttl`` later. That is the bound, and the
  ``QUEEN_QUEUE_CONFIG_TTL_MS`` option sets it (``0`` turns the cache off). The same race
  exists without any cache for the length of one push (flags read, then the insert), so a
  short TTL keeps the guarantee of the uncached server while saving nearly every read.

A read from PostgreSQL that was overtaken by a change (it began before a configure or a
peer's datagram arrived, and may have read the old row) is used for the push that made it,
like any read, but not cached: :meth:`QueueConfigCache.remember_read` drops it.

Only the encryption flag is kept: it is the only setting the server reads outside the SQL
functions, which read every other setting in their own transaction.
"""

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Tuple

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

log = Logger()

DEFAULT_MAX_ENTRIES = 10_000
"""Queues kept at most; the least recently written are forgotten first."""


@dataclass(frozen=True)
class _Entry:
    encrypted: bool
    written: float


class QueueConfigCache:
    """Whether each queue encrypts its payloads, for at most ``ttl`` seconds.

    :param clock: time source of the expiry.
    :param ttl: seconds an entry is trusted; 0 disables the cache (every lookup misses).
    :param max_entries: most queues kept.
    """

    def __init__(self, clock: IReactorTime, ttl: float, max_entries: int = DEFAULT_MAX_ENTRIES):
        self._clock = clock
        self._ttl = ttl
        self._max_entries = max_entries
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.changes = 0
        """How many changes (configure, delete, peer config) arrived; see :meth:`remember_read`."""

    def encrypted(self, queues: Iterable[str]) -> Dict[str, bool]:
        """The known flags of ``queues``; the caller reads the missing ones from PostgreSQL
        and hands them to :meth:`remember_read`. Counts one hit or miss per queue."""
        now = self._clock.seconds()
        known: Dict[str, bool] = {}
        for queue in queues:
            entry = self._entries.get(queue)
            if entry is not None and now - entry.written < self._ttl:
                known[queue] = entry.encrypted
                self.hits += 1
            else:
                self.misses += 1
        return known

    def store(self, flags: Mapping[str, bool]) -> None:
        """Records flags that are news: a configure's answer, a peer's config."""
        self.changes += 1
        self._write(flags)

    def remember_read(self, flags: Mapping[str, bool], changes_before: int) -> None:
        """Caches flags read from PostgreSQL, unless a change arrived since the read began
        (``changes_before`` = :attr:`changes` then): the read may predate it."""
        if self.changes != changes_before:
            log.debug("queue flags read overtaken by a change; not cached")
            return
        self._write(flags)

    def _write(self, flags: Mapping[str, bool]) -> None:
        if self._ttl <= 0:
            return
        now = self._clock.seconds()
        for queue, encrypted in flags.items():
            self._entries[queue] = _Entry(encrypted, now)
            self._entries.move_to_end(queue)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def forget(self, queue: str) -> None:
        """The queue was deleted (here or on a peer): the next push reads it again."""
        self.changes += 1
        self._entries.pop(queue, None)

    def forget_all(self) -> None:
        """PostgreSQL found a flag out of date (a push refused with QueueSettingsChanged):
        every queue is read again."""
        self.changes += 1
        self._entries.clear()

    def apply_peer_config(self, queue: str, config: Any) -> None:
        """A peer's ``QUEUE_CONFIG_SET`` (WIRE 6.1): takes ``encryption_enabled`` from it.

        A config without a boolean ``encryption_enabled`` is ignored (logged at debug) and
        the entry is dropped, so the next push reads PostgreSQL rather than trusting what
        was cached before the change.
        """
        encrypted = config.get("encryption_enabled") if isinstance(config, dict) else None
        if not isinstance(encrypted, bool):
            log.debug("peer config of queue {queue} has no boolean encryption_enabled; "
                      "it will be read from PostgreSQL", queue=queue)
            self.forget(queue)
            return
        self.store({queue: encrypted})

    def stats(self) -> Dict[str, Any]:
        """``queue_config_cache`` of the shared-state route (WIRE 3.7)."""
        lookups = self.hits + self.misses
        return {"size": len(self._entries), "hits": self.hits, "misses": self.misses,
                "hit_rate": round(self.hits / lookups, 4) if lookups else 0.0}


def wire_config(answer: Mapping[str, Any]) -> Dict[str, Any]:
    """The ``config`` of a ``QUEUE_CONFIG_SET`` datagram (WIRE 6.1) from ``configure_queue``'s
    answer (camelCase options, queue id, namespace and task)."""
    options = answer.get("options") or {}
    fields: List[Tuple[str, str]] = [
        ("lease_time", "leaseTime"), ("retry_limit", "retryLimit"),
        ("retry_delay", "retryDelay"), ("delayed_processing", "delayedProcessing"),
        ("window_buffer", "windowBuffer"), ("encryption_enabled", "encryptionEnabled"),
        ("dlq_enabled", "deadLetterQueue"), ("dlq_after_max_retries", "dlqAfterMaxRetries"),
        ("max_size", "maxSize"), ("ttl", "ttl"), ("priority", "priority"),
        ("retention_seconds", "retentionSeconds"),
        ("completed_retention_seconds", "completedRetentionSeconds"),
        ("retention_enabled", "retentionEnabled"),
        ("max_wait_time_seconds", "maxWaitTimeSeconds"),
    ]
    config: Dict[str, Any] = {"id": answer.get("queueId"),
                              "namespace_name": answer.get("namespace") or "",
                              "task": answer.get("task") or ""}
    config.update({wire: options.get(ours) for wire, ours in fields})
    return config

