"""`twistd queen` on the command line: bad values are refused before anything starts."""

from __future__ import annotations

import os
import subprocess

from support import REPO_ROOT, TWISTD


def run_twistd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run twistd from the test interpreter with the checkout importable."""
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    return subprocess.run([*TWISTD, *args], env=environment, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60, check=False)


def test_bad_port_flag_is_refused_with_a_message_naming_port() -> None:
    result = run_twistd("-n", "--pidfile=", "queen", "--port", "abc")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "PORT: expected an integer, got 'abc'" in output
    assert "Traceback" not in output


def test_bad_environment_value_is_refused_with_a_message_naming_it() -> None:
    result = run_twistd("-n", "--pidfile=", "queen", env={"PG_USE_SSL": "perhaps"})
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "PG_USE_SSL: expected true/false" in output
    assert "Traceback" not in output


def test_help_lists_flags_with_their_environment_names() -> None:
    result = run_twistd("queen", "--help")
    assert result.returncode == 0
    assert "--embedded-pg=" in result.stdout and "env QUEEN_EMBEDDED_PG" in result.stdout
    assert "--migrate-only" in result.stdout


def test_bad_value_is_reported_without_the_help_text() -> None:
    result = run_twistd("-n", "--pidfile=", "queen", "--port", "abc")
    assert "Usage:" not in result.stdout + result.stderr
