"""The admin commands that read or change the server through its HTTP API.

Each command takes the :class:`~queen_tw.cli.api.Api` and the parsed arguments, prints a
human table (or the server's JSON with ``--json``) and returns the exit status. The routes
are the server's own (queen_tw/http/*.py), so the CLI needs no privilege the HTTP API does
not grant: with JWT on, reads need a read-only token, changes read-write, maintenance and
the buffer's details admin.
"""

import argparse
import time
from typing import Any, Callable, Dict, List, Optional

from queen_tw.cli.api import EXIT_ERROR, EXIT_USAGE, Api, CliError, HttpError, path_of
from queen_tw.cli.output import print_fields, print_json, print_table

DLQ_PAGE = 1000
"""Dead letters read per request when a command works on all of a queue's."""

REPLAY_POLL_S = 0.5


# -- status, queues ---------------------------------------------------------------------

def status(api: Api, args: argparse.Namespace) -> int:
    """Health, counts and flags in one view; exit 1 when the server says it is unhealthy."""
    health = api.get("/health", accept=(200, 503))
    overview, overview_error = _unless_unavailable(lambda: api.get("/api/v1/resources/overview"))
    flags = _maintenance_if_allowed(api)
    healthy = isinstance(health, dict) and health.get("status") == "healthy"
    if args.json:
        print_json({"health": health, "overview": overview, "maintenance": flags})
        return 0 if healthy else EXIT_ERROR
    buffer = health.get("file_buffer") or {}
    messages = (overview or {}).get("messages") or {}
    counts = (", ".join(f"{key} {value}" for key, value in messages.items())
              if overview is not None else f"unavailable ({overview_error})")
    fields: List[Any] = [
        ("server", f"{api.base_url} ({health.get('server')} {health.get('version')}, "
                   f"worker {health.get('worker_id')})"),
        ("status", health.get("status")), ("database", health.get("database")),
        ("queues", (overview or {}).get("queues")),
        ("partitions", (overview or {}).get("partitions")),
        ("messages", counts),
        ("file buffer", f"pending {buffer.get('pending', '-')}, failed "
                        f"{buffer.get('failed', '-')}, "
                        f"{'healthy' if buffer.get('healthy') else 'UNHEALTHY'}"),
        ("peer sync", "on" if (health.get("shared_state") or {}).get("enabled") else "off"),
    ]
    if flags is None:
        fields.append(("maintenance", "unknown (needs an admin token, or the database)"))
    else:
        fields.append(("maintenance", f"push {_on(flags.get('maintenanceMode'))}, pop "
                                      f"{_on(flags.get('popMaintenanceMode'))}"))
    print_fields(fields)
    return 0 if healthy else EXIT_ERROR


def queues(api: Api, args: argparse.Namespace) -> int:
    """Every queue with its partition and message counts."""
    answer = api.get("/api/v1/resources/queues")
    if args.json:
        print_json(answer)
        return 0
    print_table(
        ["QUEUE", "NAMESPACE", "TASK", "PARTITIONS", "TOTAL", "PENDING", "PROCESSING"],
        ([q["name"], q.get("namespace") or "", q.get("task") or "", q.get("partitions"),
          (q.get("messages") or {}).get("total"), (q.get("messages") or {}).get("pending"),
          (q.get("messages") or {}).get("processing")]
         for q in answer.get("queues", [])),
        empty="(no queues)")
    return 0


def queue_show(api: Api, args: argparse.Namespace) -> int:
    """One queue: its options, totals and partitions."""
    detail = api.get(path_of("api", "v1", "resources", "queues", args.name))
    if args.json:
        print_json(detail)
        return 0
    totals = detail.get("totals") or {}
    print_fields([("queue", detail.get("name")), ("id", detail.get("id")),
                  ("namespace", detail.get("namespace") or "-"),
                  ("task", detail.get("task") or "-"), ("created", detail.get("createdAt")),
                  ("messages", ", ".join(f"{k} {v}" for k, v in totals.items()))])
    print("\noptions:")
    print_fields(sorted((detail.get("options") or {}).items()))
    print()
    print_table(["PARTITION", "TOTAL", "PENDING", "PROCESSING", "COMPLETED", "DEAD", "NEWEST"],
                ([p["name"], *(p.get("stats", {}).get(key) for key in
                               ("total", "pending", "processing", "completed", "deadLetter")),
                  p.get("newestMessage")] for p in detail.get("partitions", [])),
                empty="(no partitions)")
    return 0


# -- dead letters -----------------------------------------------------------------------

def dlq_list(api: Api, args: argparse.Namespace) -> int:
    """One page of dead letters, newest failure first."""
    answer = api.get("/api/v1/dlq", query={
        "queue": args.queue, "consumerGroup": args.group, "partition": args.partition,
        "limit": args.limit, "offset": args.offset})
    if args.json:
        print_json(answer)
        return 0
    rows = answer.get("messages", [])
    print_table(["FAILED AT", "QUEUE", "PARTITION", "GROUP", "PARTITION ID", "TRANSACTION ID",
                 "RETRIES", "ERROR"],
                ([m.get("failedAt"), m.get("queue"), m.get("partition"), m.get("consumerGroup"),
                  m.get("partitionId"), m.get("transactionId"), m.get("retryCount"),
                  _short(m.get("errorMessage"))] for m in rows),
                empty="(no dead letters)")
    print(f"{len(rows)} shown of {answer.get('total', len(rows))}")
    return 0


def dlq_retry(api: Api, args: argparse.Namespace) -> int:
    """Enqueues dead messages again (a copy at their partition's tail) and forgets them."""
    return _each_dead_letter(api, args, "retried", lambda key: api.post(
        path_of("api", "v1", "messages", *key, "retry")))


def dlq_purge(api: Api, args: argparse.Namespace) -> int:
    """Deletes dead messages (gone for every consumer group)."""
    if args.queue and not args.yes:
        raise CliError("dlq purge --queue deletes every dead message of the queue: add --yes",
                       EXIT_USAGE)
    return _each_dead_letter(api, args, "purged", lambda key: api.delete(
        path_of("api", "v1", "messages", *key)))


def _each_dead_letter(api: Api, args: argparse.Namespace, done: str, act) -> int:
    keys = _dead_letter_keys(api, args)
    results = []
    for key in keys:
        results.append({"partitionId": key[0], "transactionId": key[1], **(act(key) or {})})
    if args.json:
        print_json({done: len(results), "messages": results})
    else:
        print(f"{done} {len(results)} dead letter(s)")
    return 0


def _dead_letter_keys(api: Api, args: argparse.Namespace) -> List[tuple[str, str]]:
    """The (partitionId, transactionId) pairs named on the command line, or every dead
    letter of ``--queue`` (read before the first change, each message once)."""
    if args.partition_id and args.transaction_id:
        if args.queue:
            raise CliError("give either PARTITION_ID TRANSACTION_ID or --queue, not both",
                           EXIT_USAGE)
        return [(args.partition_id, args.transaction_id)]
    if not args.queue or args.partition_id:
        raise CliError("give PARTITION_ID TRANSACTION_ID, or --queue NAME for all of a "
                       "queue's dead letters", EXIT_USAGE)
    keys: Dict[tuple[str, str], None] = {}
    offset = 0
    while True:
        page = api.get("/api/v1/dlq", query={"queue": args.queue, "consumerGroup": args.group,
                                             "limit": DLQ_PAGE, "offset": offset})
        rows = page.get("messages", [])
        keys.update(((m["partitionId"], m["transactionId"]), None) for m in rows)
        offset += len(rows)
        if len(rows) < DLQ_PAGE:
            return list(keys)


# -- consumer groups --------------------------------------------------------------------

def groups_list(api: Api, args: argparse.Namespace) -> int:
    """Every (group, queue) with its state and lag."""
    answer = api.get("/api/v1/consumer-groups")
    if args.json:
        print_json(answer)
        return 0
    print_table(["GROUP", "QUEUE", "STATE", "MEMBERS", "PARTITIONS LAGGING", "MAX LAG (s)",
                 "SUBSCRIPTION"],
                ([g.get("name"), g.get("queueName"), g.get("state"), g.get("members"),
                  g.get("partitionsWithLag"), g.get("maxTimeLag"), g.get("subscriptionMode")]
                 for g in answer),
                empty="(no consumer groups)")
    return 0


def groups_lag(api: Api, args: argparse.Namespace) -> int:
    """Partitions whose oldest unconsumed message waits at least ``--min-lag`` seconds."""
    answer = api.get("/api/v1/consumer-groups/lagging", query={"minLagSeconds": args.min_lag})
    if args.queue:
        answer = [row for row in answer if row.get("queue_name") == args.queue]
    if args.json:
        print_json(answer)
        return 0
    print_table(["GROUP", "QUEUE", "PARTITION", "MESSAGES BEHIND", "LAG (s)",
                 "OLDEST UNCONSUMED", "LAST CONSUMED"],
                ([row.get("consumer_group"), row.get("queue_name"), row.get("partition_name"),
                  row.get("offset_lag"), row.get("time_lag_seconds"),
                  row.get("oldest_unconsumed_at"), row.get("last_consumed_at")]
                 for row in answer),
                empty=f"(no partition lags {args.min_lag} s or more)")
    return 0


# -- maintenance and the file buffer ----------------------------------------------------

def maintenance(api: Api, args: argparse.Namespace) -> int:
    """Shows or switches push maintenance (``--pop``: pop maintenance), cluster-wide."""
    route = "/api/v1/system/maintenance" + ("/pop" if args.pop else "")
    if args.action == "status":
        answer = api.get(route)
    else:
        answer = api.post(route, {"enabled": args.action == "on"})
    if args.json:
        print_json(answer)
        return 0
    if "maintenanceMode" in answer:
        print(f"push maintenance: {_on(answer['maintenanceMode'])} "
              f"(buffered messages: {answer.get('bufferedMessages')})")
    if "popMaintenanceMode" in answer:
        print(f"pop maintenance: {_on(answer['popMaintenanceMode'])}")
    if answer.get("message"):
        print(answer["message"])
    return 0


def buffer_status(api: Api, args: argparse.Namespace) -> int:
    """The file buffer of the process that answers: pending and failed records."""
    answer = api.get("/api/v1/status/buffers")
    if args.json:
        print_json(answer)
        return 0
    print_fields([("worker", answer.get("worker")), ("pending", answer.get("pending")),
                  ("failed", answer.get("failed")), ("healthy", answer.get("healthy")),
                  ("fsyncs", answer.get("fsyncs")), ("database", answer.get("dbHealthy"))])
    return 0


def buffer_replay(api: Api, args: argparse.Namespace) -> int:
    """Replays the file buffer now and waits until it is empty (or ``--timeout``).

    The server replays by itself whenever PostgreSQL answers and push maintenance is off;
    what can hold a buffer back on purpose is push maintenance, so this switches it off
    (cluster-wide, as ``maintenance off``) when it is on, then follows the pending count.
    """
    flags = api.get("/api/v1/system/maintenance")
    released = bool(flags.get("maintenanceMode"))
    if released:
        api.post("/api/v1/system/maintenance", {"enabled": False})
        if not args.json:
            print("push maintenance was on: switched off so the buffer drains")
    deadline = time.monotonic() + args.timeout
    buffer = api.get("/api/v1/status/buffers")
    while buffer.get("pending", 0) > 0 and time.monotonic() < deadline:
        time.sleep(REPLAY_POLL_S)
        buffer = api.get("/api/v1/status/buffers")
    drained = buffer.get("pending", 0) == 0
    if args.json:
        print_json({"drained": drained, "maintenanceReleased": released, **buffer})
    elif drained:
        print(f"buffer empty (failed records kept aside: {buffer.get('failed')})")
    if not drained:
        why = "" if buffer.get("dbHealthy") else " (PostgreSQL does not answer)"
        raise CliError(f"{buffer.get('pending')} message(s) still buffered after "
                       f"{args.timeout:g} s{why}")
    return 0


def _maintenance_if_allowed(api: Api) -> Optional[Dict[str, Any]]:
    """The maintenance flags, or None when this token may not read them (admin only) or
    the server cannot tell (PostgreSQL down)."""
    try:
        return api.get("/api/v1/system/maintenance")
    except HttpError as err:
        if err.status in (401, 403) or err.status >= 500:
            return None
        raise


def _unless_unavailable(read: Callable[[], Any]) -> "tuple[Any, Optional[str]]":
    """``(answer, None)``, or ``(None, reason)`` when the server answers 5xx (PostgreSQL
    down: the status still shows what ``/health`` knows)."""
    try:
        return read(), None
    except HttpError as err:
        if err.status < 500:
            raise
        return None, f"HTTP {err.status}: {err.reason}"


def _on(flag: Any) -> str:
    return "on" if flag else "off"


def _short(text: Optional[str], most: int = 60) -> Optional[str]:
    if text is None or len(text) <= most:
        return text
    return text[:most - 1] + "…"
