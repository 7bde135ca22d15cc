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
"""

import os
import sys
from typing import NoReturn

from twisted.logger import Logger

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


def _exit_now() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(EXIT_FAILURE)  # after the services stopped: nothing else left to run
