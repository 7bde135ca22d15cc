"""What the benchmarks set up and tear down: a private embedded PostgreSQL and queen-tw
servers on it, all in one temporary directory.

    with running_stack("queen-tw-kv-", QUIET_SERVER_ENV) as stack:
        measure(stack.pg, stack.server)

Importing this module puts the repository root and ``tests/`` on ``sys.path``, so a script
run as ``.venv/bin/python bench/<name>.py`` can then import ``queen_tw`` and the tests'
``support``: import it before them.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from queen_tw.config import Config  # noqa: E402
from queen_tw.db.embedded import EmbeddedPostgres  # noqa: E402

from support import ServerProcess  # noqa: E402

QUIET_SERVER_ENV: Dict[str, str] = {
    "STATS_INTERVAL_MS": "3600000", "RETENTION_INTERVAL": "3600000",
    "EVICTION_INTERVAL": "3600000", "LOG_LEVEL": "warn"}
"""Server settings that keep the periodic jobs (stats, retention, eviction) an hour apart
and the log at warnings, so that neither runs during a measurement."""


@dataclass
class Stack:
    """A private PostgreSQL and the servers a benchmark started on it, all under ``root``."""

    root: Path
    pg: EmbeddedPostgres
    servers: List[ServerProcess] = field(default_factory=list)

    @property
    def server(self) -> ServerProcess:
        """The first server started: the one :func:`running_stack` starts unless told not to."""
        return self.servers[0]

    @property
    def dsn(self) -> str:
        """The DSN queen-tw builds for this PostgreSQL (with the server's statement and lock
        timeouts), for a benchmark's own SQL."""
        return Config.from_sources(self.pg.pg_env(), {}).dsn

    def start_server(self, name: str = "server",
                     env: Optional[Mapping[str, str]] = None) -> ServerProcess:
        """Starts a server on the PostgreSQL and returns it once healthy.

        :param name: its directory under ``root`` (log and file buffer).
        :param env: variables added to its environment.

        The stack stops it on exit; stopping it earlier is fine.
        """
        server = ServerProcess(self.pg.pg_env(), self.root / name, env)
        self.servers.append(server)  # before start(): a failed start is stopped too
        return server.start()


@contextmanager
def running_stack(prefix: str, server_env: Optional[Mapping[str, str]] = None, *,
                  with_server: bool = True) -> Iterator[Stack]:
    """A started PostgreSQL in a new temporary directory, and one started server on it.

    :param prefix: the directory's name prefix (``tempfile.mkdtemp``).
    :param server_env: variables added to that server's environment.
    :param with_server: False starts no server; :meth:`Stack.start_server` starts any.

    On exit every server is stopped, then PostgreSQL, and the directory is removed.
    """
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)
    stack = Stack(root, EmbeddedPostgres(root / "pg"))
    try:
        stack.pg.start()
        if with_server:
            stack.start_server(env=server_env)
        yield stack
    finally:
        for server in stack.servers:
            server.stop()
        stack.pg.stop()
        shutil.rmtree(root, ignore_errors=True)
