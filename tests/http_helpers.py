"""Blocking HTTP helpers for the queue API (WIRE.md 2.x), shared by the test modules.

They live here, not in a test module, so that importing them never collects or runs another
module's tests. Each helper asserts the status code it expects, so a test reads as the
scenario it checks and a wrong answer fails where it happened.
"""

from __future__ import annotations

import socket
from typing import Any, Dict, List, Optional

import httpx

from tests.support import wait_until


def configure(http: httpx.Client, queue: str, **options: Any) -> Dict[str, Any]:
    """Creates or reconfigures ``queue`` with the given options; returns the echo."""
    answer = http.post("/api/v1/configure", json={"queue": queue, "options": options})
    assert answer.status_code == 200, answer.text
    return answer.json()


def push(http: httpx.Client, queue: str, payloads: List[Any], partition: str = "Default",
         prefix: str = "t") -> List[Dict[str, Any]]:
    """Pushes one message per payload with transaction ids ``<prefix>0``, ``<prefix>1`` …"""
    answer = http.post("/api/v1/push", json={"items": [
        {"queue": queue, "partition": partition, "payload": payload,
         "transactionId": f"{prefix}{n}"} for n, payload in enumerate(payloads)]})
    assert answer.status_code == 201, answer.text
    assert {r["status"] for r in answer.json()} == {"queued"}, answer.text
    return answer.json()


def pop_answer(http: httpx.Client, queue: str, partition: Optional[str] = None,
               **params: Any) -> httpx.Response:
    """The raw answer of a pop; ``wait=false`` unless the caller asks for a long-poll."""
    path = f"/api/v1/pop/queue/{queue}"
    if partition is not None:
        path += f"/partition/{partition}"
    return http.get(path, params={"wait": "false", **params})


def pop(http: httpx.Client, queue: str, partition: Optional[str] = None,
        **params: Any) -> Optional[Dict[str, Any]]:
    """The 200 body of a pop, or None for 204 (anything else fails the test)."""
    answer = pop_answer(http, queue, partition, **params)
    assert answer.status_code in (200, 204), answer.text
    return answer.json() if answer.status_code == 200 else None


def ack(http: httpx.Client, message: Dict[str, Any], status: str = "completed",
        **extra: Any) -> Dict[str, Any]:
    """Acks one popped message with its own lease; returns the single result item."""
    body = {"transactionId": message["transactionId"], "partitionId": message["partitionId"],
            "status": status, "leaseId": message["leaseId"] or None, **extra}
    answer = http.post("/api/v1/ack", json=body)
    assert answer.status_code == 200, answer.text
    results = answer.json()
    assert isinstance(results, list) and len(results) == 1, answer.text
    return results[0]


def poll_pop(http: httpx.Client, queue: str, within: float = 30.0,
             **params: Any) -> Dict[str, Any]:
    """Pops (wait=false) every few ms until something comes; fails after ``within`` seconds.

    ``within`` is a ceiling for a broken server, not a timing expectation: keep it generous.
    """
    return wait_until(lambda: pop(http, queue, **params), within,
                      message=f"a delivery from {queue}")


def dead_letters(http: httpx.Client, queue: str) -> Dict[str, Any]:
    """The queue's dead-letter listing (``GET /api/v1/dlq``)."""
    answer = http.get("/api/v1/dlq", params={"queue": queue})
    assert answer.status_code == 200, answer.text
    return answer.json()


def raw_answer(port: int, request: bytes) -> bytes:
    """Everything the server on ``port`` sends back to the raw ``request`` bytes before it
    closes the connection (for what no HTTP client would send: half a request, a head
    whose body never comes)."""
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except OSError:
            pass
    return answer
