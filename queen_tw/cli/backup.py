"""``backup QUEUE FILE`` and ``restore QUEUE FILE``: one queue's messages as JSON lines.

The file starts with the queue's declaration, then one line per message, partition by
partition, each partition in offset (commit) order::

    {"type": "queue", "name": "orders", "namespace": "", "task": "", "options": {...}}
    {"type": "message", "partition": "p1", "transactionId": "t1", "payload": {...},
     "traceId": null, "createdAt": "2026-12-05T07:50:05.815323Z", "offset": 0}

Reading uses bulk routes: ``POST /api/v1/fetch`` gives payloads (decrypted), transaction ids
and times of up to 1 024 partitions per call, and ``GET /api/v1/messages`` the trace ids, a
time window of up to 1 000 messages per call. Every message in PostgreSQL is included,
consumed or not; pushes still in a file buffer are not.

Restoring pushes the lines in file order, in batches, keeping each message's partition,
transactionId and traceId: order per partition holds, and a message already there (a
second restore) answers ``duplicate`` and is not stored twice. A missing queue is created
first with the backed-up options. The restored messages are new messages (new ids, times
and offsets) that every consumer group will see.
"""

import argparse
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from queen_tw.cli.api import EXIT_USAGE, Api, CliError, HttpError, path_of
from queen_tw.cli.output import print_json

FETCH_ENTRIES = 1024
"""Partitions per ``POST /api/v1/fetch`` (the route's limit)."""
FETCH_CALL_BYTES = 4 * 1024 * 1024
"""Payload bytes asked per fetch call: bounds the CLI's memory per answer (the route allows
64 MiB); a partition left out by the budget is asked again in the next call."""
LIST_PAGE = 1000
"""Messages per ``GET /api/v1/messages`` page (the route's cap)."""
PUSH_ITEMS = 500
PUSH_BYTES = 4 * 1024 * 1024
"""A restore batch ends at whichever comes first (the server takes 64 MiB bodies)."""


# -- backup -----------------------------------------------------------------------------

def backup(api: Api, args: argparse.Namespace) -> int:
    """Writes the queue's declaration and every message to ``args.file`` (atomically)."""
    detail = api.get(path_of("api", "v1", "resources", "queues", args.queue))
    partitions = sorted(p["name"] for p in detail.get("partitions", []))
    target = Path(args.file)
    partial = target.with_name(target.name + ".partial")
    count = 0
    try:
        with open(partial, "w", encoding="utf-8") as out:
            out.write(_line({"type": "queue", "name": detail["name"],
                             "namespace": detail.get("namespace") or "",
                             "task": detail.get("task") or "",
                             "options": detail.get("options") or {}}))
            for partition, records in _records(api, args.queue, partitions):
                trace_ids = _trace_ids(api, args.queue, partition, records)
                for record in records:
                    out.write(_line({
                        "type": "message", "partition": partition,
                        "transactionId": record["transactionId"],
                        "payload": record.get("payload"),
                        "traceId": trace_ids.get(record["transactionId"]),
                        "createdAt": record.get("ts"), "offset": record["offset"]}))
                count += len(records)
        os.replace(partial, target)
    except OSError as err:
        raise CliError(f"cannot write {target}: {err.strerror or err}", EXIT_USAGE) from None
    finally:
        partial.unlink(missing_ok=True)
    summary = {"queue": args.queue, "messages": count, "partitions": len(partitions),
               "file": str(target)}
    if args.json:
        print_json(summary)
    else:
        print(f"backed up {count} message(s) of {args.queue} ({len(partitions)} "
              f"partition(s)) to {target}")
    return 0


def _records(api: Api, queue: str, partitions: List[str]
             ) -> Iterator[Tuple[str, List[Dict[str, Any]]]]:
    """Each partition's records in offset order, up to the end it had when first read."""
    for start in range(0, len(partitions), FETCH_ENTRIES):
        chunk = partitions[start:start + FETCH_ENTRIES]
        found: Dict[str, List[Dict[str, Any]]] = {name: [] for name in chunk}
        offsets = {name: 0 for name in chunk}
        ends: Dict[str, int] = {}
        while offsets:
            answer = api.post("/api/v1/fetch", {"maxBytes": FETCH_CALL_BYTES, "entries": [
                {"queue": queue, "partition": name, "offset": offset}
                for name, offset in offsets.items()]})
            delivered = any(entry["records"] for entry in answer["entries"])
            for entry in answer["entries"]:
                name = entry["partition"]
                ends.setdefault(name, entry["highWatermark"])
                offsets[name] = _next_offset(entry, offsets[name], found[name], delivered)
                if offsets[name] >= ends[name]:
                    del offsets[name]
        for name in chunk:
            yield name, found[name]


def _next_offset(entry: Dict[str, Any], asked: int, found: List[Dict[str, Any]],
                 call_delivered: bool) -> int:
    """Where the next fetch of this partition starts; past its end when it is done.

    An entry without records while others got some may only have met the call's byte
    budget, so it is asked again; a call that delivered nothing at all means nothing is
    left (the first record of a call always comes, however large).
    """
    error = entry.get("error")
    if error == "OFFSET_OUT_OF_RANGE" and asked < entry["logStartOffset"]:
        return int(entry["logStartOffset"])  # older messages were removed by retention
    if error == "UNKNOWN_TOPIC_OR_PARTITION":
        raise CliError(f"the queue disappeared during the backup ({error})")
    if error or not call_delivered:
        return 2**63  # past its end, or nothing left up to it: done
    if not entry["records"]:
        return asked
    found.extend(entry["records"])
    return int(entry["records"][-1]["offset"]) + 1


def _trace_ids(api: Api, queue: str, partition: str, records: List[Dict[str, Any]]
               ) -> Dict[str, Optional[str]]:
    """transactionId -> traceId of the partition's ``records`` (only the listing has them).

    Read in time windows of up to a page of records each (``from``/``to`` of the window's
    oldest and newest), so each listing reads the rows of that window only, not the whole
    table; a full page is followed by the next one.
    """
    trace_ids: Dict[str, Optional[str]] = {}
    for start in range(0, len(records), LIST_PAGE):
        times = [record["ts"] for record in records[start:start + LIST_PAGE]]
        window = {"queue": queue, "partition": partition, "from": min(times),
                  "to": max(times), "limit": LIST_PAGE}
        offset = 0
        while True:
            page = api.get("/api/v1/messages", query={**window, "offset": offset})
            rows = page.get("messages", [])
            trace_ids.update((m["transactionId"], m.get("traceId")) for m in rows)
            offset += len(rows)
            if len(rows) < LIST_PAGE:
                break
    return trace_ids


def _line(data: Dict[str, Any]) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n"


# -- restore ----------------------------------------------------------------------------

def restore(api: Api, args: argparse.Namespace) -> int:
    """Pushes the file's messages into ``args.queue`` (created from the file if missing)."""
    header, messages = read_backup(Path(args.file))
    created = _ensure_queue(api, args.queue, header)
    counts = {"queued": 0, "duplicate": 0, "buffered": 0}
    for batch in _batches(messages):
        results = _pushed(api, args.queue, args.file, batch)
        for (line, _), result in zip(batch, results, strict=True):
            state = result.get("status")
            if state not in counts:
                raise CliError(f"{args.file}:{line}: push {state}: {result.get('error')} "
                               "(the lines before it are restored; run the restore again "
                               "once fixed: it dedupes)")
            counts[state] += 1
    summary = {"queue": args.queue, "created": created, "messages": len(messages), **counts}
    if args.json:
        print_json(summary)
    else:
        print(f"restored {len(messages)} message(s) into {args.queue}"
              f"{' (queue created)' if created else ''}: {counts['queued']} queued, "
              f"{counts['duplicate']} duplicate, {counts['buffered']} buffered")
    return 0


def _pushed(api: Api, queue: str, file: str,
            batch: List[Tuple[int, Dict[str, Any]]]) -> List[Dict[str, Any]]:
    """The push results of ``batch``'s lines. A push the server refuses as a whole (a bad
    traceId, a partition name it cannot store, QUEEN_MAX_PUSH_ITEMS) stored none of them:
    its halves are pushed on their own until the refusal names one line, FILE:LINE."""
    items = [_push_item(queue, message) for _, message in batch]
    try:
        results = api.post("/api/v1/push", {"items": items})
    except HttpError as err:
        if err.status not in (400, 413):
            raise
        if len(batch) == 1:
            raise CliError(f"{file}:{batch[0][0]}: push refused: {err.reason} (the lines "
                           "before it are restored; run the restore again once fixed: it "
                           "dedupes)") from None
        half = len(batch) // 2
        return _pushed(api, queue, file, batch[:half]) + _pushed(api, queue, file, batch[half:])
    if not isinstance(results, list) or len(results) != len(batch):
        raise CliError(f"unexpected push answer: {results!r:.200}")
    return results


def read_backup(path: Path) -> Tuple[Optional[Dict[str, Any]], List[Tuple[int, Dict[str, Any]]]]:
    """The file's queue declaration (None without one) and its ``(line number, message)``
    pairs; raises CliError naming the first bad line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise CliError(f"cannot read {path}: {getattr(err, 'strerror', None) or err}",
                       EXIT_USAGE) from None
    header: Optional[Dict[str, Any]] = None
    messages: List[Tuple[int, Dict[str, Any]]] = []
    # Lines end at "\n" only: str.splitlines() also breaks at U+2028, U+2029, U+0085 and
    # other separators a payload may hold unescaped (the lines are written ensure_ascii=False).
    for number, raw in enumerate(text.split("\n"), start=1):
        raw = raw.rstrip("\r")
        if not raw.strip():
            continue
        line = _parsed(path, number, raw)
        if line.get("type") == "queue" and header is None and not messages:
            header = line
        else:
            messages.append((number, line))
    return header, messages


def _parsed(path: Path, number: int, raw: str) -> Dict[str, Any]:
    try:
        line = json.loads(raw)
    except ValueError as err:
        raise CliError(f"{path}:{number}: not JSON ({err})") from None
    if not isinstance(line, dict):
        raise CliError(f"{path}:{number}: expected a JSON object")
    if line.get("type", "message") == "message":
        for field in ("partition", "transactionId"):
            if not isinstance(line.get(field), str) or not line[field]:
                raise CliError(f"{path}:{number}: {field} (a non-empty string) is required")
        if "payload" not in line:
            raise CliError(f"{path}:{number}: payload is required")
    elif line.get("type") != "queue":
        raise CliError(f"{path}:{number}: unknown line type {line.get('type')!r}")
    return line


def _ensure_queue(api: Api, queue: str, header: Optional[Dict[str, Any]]) -> bool:
    """Creates the queue from the backed-up declaration when it does not exist; True then.
    An existing queue keeps its own options."""
    try:
        api.get(path_of("api", "v1", "resources", "queues", queue))
        return False
    except HttpError as err:
        if err.status != 404:
            raise
    declaration = header or {}
    api.post("/api/v1/configure", {"queue": queue,
                                   "namespace": declaration.get("namespace") or "",
                                   "task": declaration.get("task") or "",
                                   "options": declaration.get("options") or {}})
    return True


def _batches(messages: List[Tuple[int, Dict[str, Any]]]
             ) -> Iterator[List[Tuple[int, Dict[str, Any]]]]:
    """Consecutive runs of ``(line number, message)``, each one push."""
    batch: List[Tuple[int, Dict[str, Any]]] = []
    size = 0
    for number, message in messages:
        weight = len(json.dumps(message.get("payload"), ensure_ascii=False)) + 200
        if batch and (len(batch) >= PUSH_ITEMS or size + weight > PUSH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append((number, message))
        size += weight
    if batch:
        yield batch


def _push_item(queue: str, message: Dict[str, Any]) -> Dict[str, Any]:
    item = {"queue": queue, "partition": message["partition"],
            "transactionId": message["transactionId"], "payload": message["payload"]}
    if message.get("traceId"):
        item["traceId"] = message["traceId"]
    return item
