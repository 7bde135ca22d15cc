"""``migrate``: install or upgrade the ``queen`` schema without starting a server.

The same installer as the server's start and ``twistd queen --migrate-only``
(:func:`queen_tw.db.schema.install_schema`, one transaction under an advisory lock), on the
PostgreSQL the server's own settings name: the ``PG_*`` / ``QUEEN_PG_DSN`` environment, or the
same options as flags (``--pg-host``…, see :data:`queen_tw.config.OPTIONS`). PostgreSQL not
answering yet is retried with backoff for ``--wait`` seconds; a failed upgrade is reported
at once (nothing was changed, and trying again would not help).
"""

import argparse
import os
import time
from typing import Dict, Optional

import psycopg2

from queen_tw.cli.api import EXIT_ERROR, EXIT_UNREACHABLE, EXIT_USAGE, CliError
from queen_tw.cli.output import print_json
from queen_tw.config import OPTIONS, Config, ConfigError
from queen_tw.db.schema import SchemaUpgradeError, install_schema
from queen_tw.paths import sql_dir
from queen_tw.services.retry import Backoff

CONNECTION_FIELDS = tuple(
    spec for spec in OPTIONS
    if spec.field.startswith("pg_") or spec.field == "db_connection_timeout_ms")
"""The server options ``migrate`` takes as flags: where PostgreSQL is and how to log in."""


def add_connection_flags(parser: argparse.ArgumentParser) -> None:
    """``--pg-host`` and the other connection options, named and documented as twistd's."""
    for spec in CONNECTION_FIELDS:
        parser.add_argument(f"--{spec.flag}", dest=spec.field, default=None,
                            help=f"{spec.help} (env {spec.env})")


def migrate(args: argparse.Namespace) -> int:
    """Applies what the database lacks; prints what was applied."""
    dsn = _dsn(args)
    backoff = Backoff(0.5, multiplier=2.0, maximum=5.0)
    deadline = time.monotonic() + args.wait
    while True:
        try:
            applied = install_schema(dsn, sql_dir())
            break
        except SchemaUpgradeError as err:
            raise CliError(f"schema upgrade failed: {err}", EXIT_ERROR) from None
        except psycopg2.OperationalError as err:
            if time.monotonic() >= deadline and getattr(err, "pgcode", None):
                # PostgreSQL answered (a lock held past DB_LOCK_TIMEOUT, a full disk)
                raise CliError(f"schema upgrade did not finish: {_first_line(err)}; nothing "
                               "was changed", EXIT_ERROR) from None
            if time.monotonic() >= deadline:
                raise CliError(f"cannot reach PostgreSQL: {_first_line(err)}",
                               EXIT_UNREACHABLE) from None
            time.sleep(min(backoff.next_delay(), max(0.0, deadline - time.monotonic())))
    if args.json:
        print_json({"applied": applied})
    elif applied:
        print("applied: " + ", ".join(applied))
    else:
        print("schema is up to date")
    return 0


def _dsn(args: argparse.Namespace) -> str:
    flags: Dict[str, Optional[str]] = {spec.field: getattr(args, spec.field)
                                       for spec in CONNECTION_FIELDS}
    try:
        return Config.from_sources(os.environ, flags).dsn
    except ConfigError as err:
        raise CliError(str(err), EXIT_USAGE) from None


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
