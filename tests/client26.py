"""Drive the official queen-mq 2.6.0 client from the tests.

2.6.0 imports as ``queen`` like the 0.15.0 client in the test venv, so it is installed in a venv
of its own (``make client26``: .venv-client26, or ``CLIENT26_PYTHON``) and each scenario runs
in a subprocess through tests/client26_runner.py. A scenario is the source of an
``async def scenario(client, args)`` returning something JSON can carry.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.support import REPO_ROOT

RUNNER = Path(__file__).with_name("client26_runner.py")


def client26_python() -> str:
    """The interpreter that has queen-mq 2.6.0; a missing one fails the test, never skips."""
    python = os.environ.get("CLIENT26_PYTHON") or str(REPO_ROOT / ".venv-client26/bin/python")
    if not Path(python).exists():
        pytest.fail(f"{python} missing: run `make client26` (queen-mq 2.6.0 in its own venv)")
    return python


def run26(url: str, source: str, timeout_s: float = 90.0, **args: Any) -> Any:
    """Run ``source`` (defining ``async def scenario(client, args)``) against ``url``.

    ``args`` reach the scenario (``args["url"]`` is ``url``); ``client_options`` among them
    are passed to ``Queen(...)`` (e.g. ``{"binary_push": True}``). Returns the scenario's
    result, or ``{"raised": ...}`` when it raised; a crash or timeout fails the test with the
    subprocess's output.
    """
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as script:
        script.write(textwrap.dedent(source))
    try:
        done = subprocess.run(
            [client26_python(), str(RUNNER), script.name, json.dumps({"url": url, **args})],
            capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as expired:
        pytest.fail(f"2.6.0 scenario did not finish in {timeout_s} s: {expired.stderr!r}")
    finally:
        os.unlink(script.name)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        pytest.fail(f"2.6.0 scenario crashed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return json.loads(lines[-1])
