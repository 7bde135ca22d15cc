"""Option values at start: what README documents as valid serves, and a bad value stops the
server with one line naming the setting (README "Configuration": "Bad values are refused at
start with a message naming the variable"; "Running a cluster": "a port in use or a bad peer
entry stops startup with one line naming the setting"). Each of these once ended in a
traceback or in a buffer in the working directory.

Each case starts the real ``twistd queen`` with PG_HOST pointing nowhere (process_helpers) and
waits until it either exits or answers ``GET /health`` (any status: 503 while PostgreSQL is
away still means it is serving).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx

from process_helpers import NOWHERE_PG
from support import REPO_ROOT, TWISTD, free_port

SETTLE_CEILING_S = 30.0


def start_and_settle(*queen_args: str, env: dict[str, str], cwd: Path,
                     port: int) -> tuple[str, int | None, str]:
    """Run ``twistd -n queen`` until it exits or serves HTTP on ``port``.

    Returns (outcome, exit status, output); outcome is ``"exited"`` or ``"serving"`` (the
    process is then stopped with SIGTERM).
    """
    environment = {**os.environ, **NOWHERE_PG, **env, "PYTHONPATH": str(REPO_ROOT)}
    log = cwd.parent / f"twistd-{port}.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [*TWISTD, "-n", "--pidfile=", "--logfile=-", "queen", *queen_args],
            env=environment, cwd=cwd, stdin=subprocess.DEVNULL, stdout=output,
            stderr=subprocess.STDOUT)
    outcome = "timeout"
    deadline = time.monotonic() + SETTLE_CEILING_S
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                outcome = "exited"
                break
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                outcome = "serving"
                break
            except httpx.HTTPError:
                time.sleep(0.1)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    return outcome, process.returncode, log.read_text(errors="replace")


def assert_one_line_refusal_or_serving(outcome: str, status: int | None, output: str) -> None:
    """Either it serves, or it exits 1 with one ``queen-tw:`` line and no traceback."""
    assert outcome in ("exited", "serving"), output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    if outcome == "exited":
        assert status == 1, output[-3000:]
        assert "queen-tw: " in output, output[-3000:]


PEER_SYNC = {"QUEEN_UDP_PEERS": "127.0.0.1:9", "QUEEN_UDP_NOTIFY_PORT": "0"}


def start(tmp_path: Path, host: str = "127.0.0.1", **env: str
          ) -> tuple[str, int | None, str, Path]:
    """:func:`start_and_settle` on a free port with its own working directory and buffer
    directory (unless ``env`` names one); returns its outcome, status, output and cwd."""
    port = free_port()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env.setdefault("FILE_BUFFER_DIR", str(tmp_path / "buffers"))
    outcome, status, output = start_and_settle("--host", host, "--port", str(port), env=env,
                                               cwd=cwd, port=port)
    return outcome, status, output, cwd


def test_a_host_name_as_host_with_peer_sync_does_not_crash_with_a_traceback(
        tmp_path: Path) -> None:
    # README: HOST is the "HTTP bind address" (HTTP accepts a host name such as localhost),
    # and "The UDP socket binds HOST unless QUEEN_UDP_BIND says otherwise".
    outcome, _, output, _ = start(tmp_path, "localhost", **PEER_SYNC)

    assert outcome == "serving", output[-3000:]
    assert "Traceback" not in output, output[-3000:]


def test_a_bad_udp_bind_address_is_refused_with_one_line_naming_it(tmp_path: Path) -> None:
    outcome, status, output, _ = start(tmp_path, **PEER_SYNC, QUEEN_UDP_BIND="not-an-address")

    assert outcome == "exited", output[-3000:]
    assert_one_line_refusal_or_serving(outcome, status, output)
    assert "QUEEN_UDP_BIND" in output, output[-3000:]


def test_an_embedded_pg_directory_that_cannot_be_created_is_one_line_naming_it(
        tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("a regular file: no directory can be created under it")

    outcome, status, output, _ = start(tmp_path, QUEEN_EMBEDDED_PG=str(blocker / "pgdata"))

    assert outcome == "exited", output[-3000:]
    assert_one_line_refusal_or_serving(outcome, status, output)
    assert "QUEEN_EMBEDDED_PG" in output or "--embedded-pg" in output, output[-3000:]


def test_an_empty_file_buffer_dir_does_not_silently_buffer_into_the_working_directory(
        tmp_path: Path) -> None:
    # FILE_BUFFER_DIR is documented with the default /var/lib/queen/buffers; an empty value
    # (an env file line "FILE_BUFFER_DIR=") must not quietly put the buffer in the cwd.
    outcome, status, output, cwd = start(tmp_path, FILE_BUFFER_DIR="")

    assert outcome == "exited" and "FILE_BUFFER_DIR is empty" in output, output[-3000:]
    assert_one_line_refusal_or_serving(outcome, status, output)
    assert sorted(p.name for p in cwd.iterdir()) == [], output[-3000:]


def test_a_sync_receive_buffer_beyond_a_c_int_is_refused_with_one_line(
        tmp_path: Path) -> None:
    # SO_RCVBUF takes a C int of bytes: 5000 MiB overflowed it in a TypeError.
    outcome, status, output, _ = start(tmp_path, **PEER_SYNC, QUEEN_SYNC_RECV_BUFFER_MB="5000")

    assert outcome == "exited" and "QUEEN_SYNC_RECV_BUFFER_MB" in output, output[-3000:]
    assert_one_line_refusal_or_serving(outcome, status, output)
