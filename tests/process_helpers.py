"""Running ``twistd queen`` to its end, for the tests of start-up refusals.

:data:`NOWHERE_PG` points PG_HOST at a socket directory that does not exist, so a server
that got past its checks could never touch a PostgreSQL on this machine.
"""

from __future__ import annotations

import os
import subprocess

from support import REPO_ROOT, TWISTD

CEILING_S = 60
NOWHERE_PG = {"PG_HOST": "/nonexistent/queen-tw-test-socket-dir"}


def run_queen(*queen_args: str, env: dict[str, str] | None = None,
              pythonpath: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """``twistd -n queen <args>`` logging to stdout, run to its end."""
    environment = {**os.environ, **NOWHERE_PG, **(env or {}),
                   "PYTHONPATH": os.pathsep.join([*pythonpath, str(REPO_ROOT)])}
    return subprocess.run([*TWISTD, "-n", "--pidfile=", "--logfile=-", "queen", *queen_args],
                          env=environment, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=CEILING_S, check=False)


def assert_refused_with(result: subprocess.CompletedProcess[str], line: str) -> None:
    """Status 1, the reason on one line, and neither a traceback nor the option help."""
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert f"queen-tw: {line}" in output, output
    assert "Traceback" not in output
    assert "--ack-max-batch-size" not in output  # the help text would list every option
