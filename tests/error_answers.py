"""The shape every error answer has (WIRE.md 1.3), checked the same way by every test module.

A helper module, not a test module, so that importing it never collects another module's tests.
"""

from __future__ import annotations

from typing import Optional

import httpx


def assert_json_error(answer: httpx.Response, code: int, message: Optional[str] = None) -> str:
    """The answer is ``code`` with a JSON ``{"error": str}`` body; returns the error text."""
    assert answer.status_code == code, answer.text
    assert answer.headers["content-type"].startswith("application/json"), answer.headers
    body = answer.json()
    assert set(body) == {"error"}, body
    assert isinstance(body["error"], str) and body["error"]
    assert "Traceback" not in answer.text
    if message is not None:
        assert body["error"] == message
    return body["error"]
