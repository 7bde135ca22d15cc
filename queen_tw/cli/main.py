"""``queen-tw``: the command line, parsed once and handed to one command.

Exit status: 0 done, 1 the server refused or the data is wrong (one line on stderr, with
the server's own message), 2 bad usage, 3 the server (or PostgreSQL, for ``migrate``) cannot
be reached.
"""

import argparse
import math
import os
import sys
from typing import Callable, List, Optional

from queen_tw.cli import backup, commands
from queen_tw.cli.api import Api, CliError
from queen_tw.cli.migrate import add_connection_flags, migrate

DEFAULT_URL = "http://localhost:6632"

EPILOG = """\
Every command but migrate talks to the HTTP API at --url (env QUEEN_URL), sending --token
(env QUEEN_TOKEN) as a bearer token when the server has JWT on. migrate connects to
PostgreSQL itself with the server's PG_* settings. Exit status: 0 ok, 1 error (the server's
message on stderr), 2 bad usage, 3 cannot connect."""


MAX_SECONDS = 10_000_000
"""Longest duration flag (about 115 days): beyond it the socket layer overflows."""


def _seconds(text: str) -> float:
    """A duration flag: 0 to MAX_SECONDS seconds (a NaN --wait never ran out)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= MAX_SECONDS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of seconds from 0 to {MAX_SECONDS}")
    return value


def _positive_seconds(text: str) -> float:
    """A wait for an answer: more than 0 seconds (0 is a non-blocking socket: no answer)."""
    value = _seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return value


def _connection_options(defaults: bool) -> argparse.ArgumentParser:
    """--url, --token, --timeout and --json; given before or after the command (only the
    top level holds defaults, or a sub-command's would overwrite what was given before)."""
    def default(value):
        return value if defaults else argparse.SUPPRESS

    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--url", default=default(os.environ.get("QUEEN_URL", DEFAULT_URL)),
                         help=f"server address (env QUEEN_URL, default {DEFAULT_URL})")
    options.add_argument("--token", default=default(os.environ.get("QUEEN_TOKEN")),
                         help="JWT for a server with JWT_ENABLED (env QUEEN_TOKEN)")
    options.add_argument("--timeout", dest="http_timeout", type=_positive_seconds,
                         default=default(30.0),
                         help="seconds to wait for each answer (default 30)")
    options.add_argument("--json", action="store_true", default=default(False),
                         help="print JSON for scripts instead of tables")
    return options


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree; each leaf sets ``run`` to its command function."""
    common = _connection_options(defaults=False)
    parser = argparse.ArgumentParser(
        prog="queen-tw", description="Administer a queen-tw server.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_connection_options(defaults=True)])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def leaf(parent, name: str, run: Callable, help: str) -> argparse.ArgumentParser:
        command = parent.add_parser(name, parents=[common], help=help, description=help)
        command.set_defaults(run=run)
        return command

    leaf(sub, "status", commands.status, "health, counts, buffer and maintenance flags")
    leaf(sub, "queues", commands.queues, "every queue with its message counts")

    queue = sub.add_parser("queue", help="one queue").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    leaf(queue, "show", commands.queue_show, "a queue's options, totals and partitions") \
        .add_argument("name", metavar="NAME")

    _add_dlq(sub, leaf)
    _add_groups(sub, leaf)

    switch = leaf(sub, "maintenance", commands.maintenance,
                  "show or switch maintenance (push: buffer every push; --pop: pops get 204)")
    switch.add_argument("action", choices=["on", "off", "status"], nargs="?", default="status")
    switch.add_argument("--pop", action="store_true", help="pop maintenance instead of push")

    buffer = sub.add_parser("buffer", help="the file buffer").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    leaf(buffer, "status", commands.buffer_status, "pending and failed buffered records")
    leaf(buffer, "replay", commands.buffer_replay,
         "drain the buffer now (switches push maintenance off) and wait until it is empty") \
        .add_argument("--wait", dest="timeout", type=_seconds, default=60.0,
                      help="seconds to wait for the buffer to empty (default 60)")

    for name, run, help in (
            ("backup", backup.backup, "write a queue's messages to a JSONL file"),
            ("restore", backup.restore, "push a backup's messages into a queue (dedupes)")):
        command = leaf(sub, name, run, help)
        command.add_argument("queue", metavar="QUEUE")
        command.add_argument("file", metavar="FILE")

    schema = sub.add_parser(
        "migrate", help="install or upgrade the schema, then exit",
        description="Install or upgrade the queen schema on the PostgreSQL the server's PG_* "
                    "settings (environment, or the flags below) name, as twistd queen "
                    "--migrate-only does, without starting a server.")
    schema.set_defaults(run=migrate, offline=True)
    schema.add_argument("--wait", type=_seconds, default=30.0,
                        help="seconds to retry while PostgreSQL does not answer (default 30)")
    schema.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print the result as JSON")
    add_connection_flags(schema)
    return parser


def _add_dlq(sub, leaf) -> None:
    dlq = sub.add_parser("dlq", help="dead letters").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    listing = leaf(dlq, "list", commands.dlq_list, "dead letters, newest failure first")
    listing.add_argument("--queue")
    listing.add_argument("--group", help="consumer group (__QUEUE_MODE__ for queue mode)")
    listing.add_argument("--partition")
    listing.add_argument("--limit", type=int, default=100)
    listing.add_argument("--offset", type=int, default=0)
    for name, run, help in (
            ("retry", commands.dlq_retry, "enqueue dead messages again"),
            ("purge", commands.dlq_purge, "delete dead messages (for every group)")):
        command = leaf(dlq, name, run, help)
        command.add_argument("partition_id", metavar="PARTITION_ID", nargs="?")
        command.add_argument("transaction_id", metavar="TRANSACTION_ID", nargs="?")
        command.add_argument("--queue", help="every dead letter of this queue")
        command.add_argument("--group", help="with --queue: only this group's")
        if name == "purge":
            command.add_argument("--yes", action="store_true",
                                 help="confirm a purge of a whole queue's dead letters")


def _add_groups(sub, leaf) -> None:
    groups = sub.add_parser("groups", help="consumer groups").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    leaf(groups, "list", commands.groups_list, "every group per queue, with state and lag")
    lag = leaf(groups, "lag", commands.groups_lag, "partitions lagging behind, worst first")
    lag.add_argument("--min-lag", type=int, default=0,
                     help="only partitions waiting at least this many seconds (default 0)")
    lag.add_argument("--queue", help="only this queue")


def main(argv: Optional[List[str]] = None) -> int:
    """Runs one command; returns the exit status (errors are one line on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "offline", False):
            return args.run(args)
        api = Api(args.url, args.token, args.http_timeout)
        return args.run(api, args)
    except CliError as err:
        print(f"queen-tw: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("queen-tw: interrupted", file=sys.stderr)
        return 130


def run() -> None:
    """The console-script entry point."""
    sys.exit(main())
