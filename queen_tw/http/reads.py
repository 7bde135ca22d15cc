"""Reads by offset (WIRE2.md 6): ``POST /api/v1/fetch`` and ``POST /api/v1/partitions/changed``.

Every field is checked here and a bad one answers 400 naming it, with nothing read. Bounds
that only size the answer are clamped, as upstream clamps them (``maxBytes``, ``maxWaitMs``,
``minBytes``, ``limit``); the entry counts are refused above their limit, since dropping
entries would leave a caller waiting for partitions nobody read. Per-entry conditions
(unknown queue, offset out of range, a cursor of the other mode) are not errors of the call:
they answer 200 with the entry's ``error``.
"""

from typing import Any, List, Mapping, Optional, TypeGuard

from queen_tw.auth.levels import routed_klein
from queen_tw.engine.queue_engine import QueueEngine
from queen_tw.engine.reads import BadSince, ChangedEntry, FetchEntry, FetchRequest, OffsetReads
from queen_tw.errors import InvalidRequest, NotFound
from queen_tw.http import parsing
from queen_tw.http.answers import answering_errors, json_answer

MIB = 1024 * 1024
MAX_FETCH_ENTRIES = 1024
ENTRY_MAX_BYTES_DEFAULT = 1 * MIB
ENTRY_MAX_BYTES_CEILING = 8 * MIB
CALL_MAX_BYTES_CEILING = 64 * MIB
MAX_WAIT_MS = 30_000
MAX_CHANGED_ENTRIES = 64
CHANGED_LIMIT_DEFAULT = 1000
CHANGED_LIMIT_CEILING = 1000
MAX_OFFSET = 2**63 - 1


class ReadRoutes:
    """The two read routes.

    :param messages: the message path, whose pool, waiter registry, clock and payload key the
        reads share (their :class:`OffsetReads` is built here); both routes answer 404
        without it.
    """

    app = answering_errors(routed_klein())

    def __init__(self, messages: Optional[QueueEngine] = None):
        self._messages = messages
        self._engine: Optional[OffsetReads] = None

    def _reads(self) -> OffsetReads:
        if self._engine is None:
            if self._messages is None:
                raise NotFound("Not found")
            messages = self._messages
            self._engine = OffsetReads(
                messages.database, messages.waiters, messages.clock,
                open_payload=messages.open_payload)
        return self._engine

    @app.route("/api/v1/fetch", methods=["POST"])
    async def fetch(self, request):
        fetch = fetch_request(parsing.read_json_object(request))
        return json_answer(request, 200, await self._reads().fetch(fetch))

    @app.route("/api/v1/partitions/changed", methods=["POST"])
    async def partitions_changed(self, request):
        entries = changed_entries(parsing.read_json_object(request))
        try:
            answer = await self._reads().changed(entries)
        except BadSince as err:
            raise InvalidRequest(f"since is not a timestamp: {err}") from None
        return json_answer(request, 200, answer)


def fetch_request(body: Mapping[str, Any]) -> FetchRequest:
    """A ``POST /api/v1/fetch`` body, checked; raises InvalidRequest naming the bad field."""
    raw = _entry_list(body, MAX_FETCH_ENTRIES)
    entries = tuple(_fetch_entry(entry, n) for n, entry in enumerate(raw))
    call_bytes = _clamped(body, "maxBytes", CALL_MAX_BYTES_CEILING, 1, CALL_MAX_BYTES_CEILING)
    max_wait_ms = _clamped(body, "maxWaitMs", 0, 0, MAX_WAIT_MS, negative="must not be negative")
    min_bytes = _clamped(body, "minBytes", 1, 0, MAX_OFFSET)
    return FetchRequest(entries, call_bytes, max_wait_ms, min_bytes)


def changed_entries(body: Mapping[str, Any]) -> List[ChangedEntry]:
    """A ``POST /api/v1/partitions/changed`` body, checked; raises InvalidRequest naming the
    bad field. Whether ``since`` is a timestamp PostgreSQL decides (any form it reads)."""
    raw = _entry_list(body, MAX_CHANGED_ENTRIES)
    return [_changed_entry(entry, n) for n, entry in enumerate(raw)]


def _entry_list(body: Mapping[str, Any], most: int) -> List[Any]:
    entries = body.get("entries")
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise InvalidRequest("entries must be an array")
    if len(entries) > most:
        raise InvalidRequest(f"{len(entries)} entries exceed the limit of {most} per call")
    return entries


def _fetch_entry(entry: Any, n: int) -> FetchEntry:
    where = f"entries[{n}]"
    if not isinstance(entry, dict):
        raise InvalidRequest(f"{where} must be an object")
    queue = _name(entry.get("queue"), f"{where}.queue")
    partition = entry.get("partition")
    if partition is None:
        partition = "Default"
    elif _is_int(partition):
        partition = str(partition)  # a partition number names the partition of that name
    partition = _name(partition, f"{where}.partition")
    offset = entry.get("offset")
    if not _is_int(offset):
        raise InvalidRequest(f"{where}.offset must be an integer")
    if offset < 0:
        raise InvalidRequest(f"{where}.offset must not be negative (read the bounds from "
                             "highWatermark and logStartOffset instead)")
    max_bytes = _clamped(entry, "maxBytes", ENTRY_MAX_BYTES_DEFAULT, 1, ENTRY_MAX_BYTES_CEILING,
                         where=where)
    return FetchEntry(queue, partition, min(offset, MAX_OFFSET), max_bytes)


def _changed_entry(entry: Any, n: int) -> ChangedEntry:
    where = f"entries[{n}]"
    if not isinstance(entry, dict):
        raise InvalidRequest(f"{where} must be an object")
    queue = _name(entry.get("queue"), f"{where}.queue")
    since = entry.get("since")
    if since is not None and not isinstance(since, str):
        raise InvalidRequest(f"{where}.since must be a timestamp string or null")
    after = entry.get("after")
    if after is not None and not isinstance(after, str):
        raise InvalidRequest(f"{where}.after must be a string (a previous answer's next) "
                             "or null")
    limit = _clamped(entry, "limit", CHANGED_LIMIT_DEFAULT, 1, CHANGED_LIMIT_CEILING,
                     where=where)
    return ChangedEntry(queue, since, after or None, limit)


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidRequest(f"{what} must be a string")
    return parsing.check_name(value, what)


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _clamped(fields: Mapping[str, Any], key: str, default: int, low: int, high: int,
             where: str = "", negative: Optional[str] = None) -> int:
    """An optional integer field (absent or null: ``default``) clamped to ``low..high``; a
    negative one is refused when ``negative`` says why."""
    value = fields.get(key)
    name = f"{where}.{key}" if where else key
    if value is None:
        return default
    if not _is_int(value):
        raise InvalidRequest(f"{name} must be an integer")
    if value < 0 and negative is not None:
        raise InvalidRequest(f"{name} {negative}")
    return max(low, min(value, high))

