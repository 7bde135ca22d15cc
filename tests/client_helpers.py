"""Helpers for driving the official ``queen-mq`` Python client from synchronous tests.

Shared by the interop test modules; they live here so that importing them never pulls in
another module's tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Any, AsyncIterator, Coroutine, Dict, List, Optional

import pytest
from queen import Queen

SCENARIO_TIMEOUT_S = 60.0
"""Upper bound for one whole scenario; a server that stops answering fails the test here."""


def run_scenario(scenario: Coroutine[Any, Any, Any], timeout_s: float = SCENARIO_TIMEOUT_S) -> Any:
    """Run an async scenario to completion and return its result.

    Args:
        scenario: the coroutine to run on a fresh event loop.
        timeout_s: fail the test if the scenario has not finished after this many seconds.
    """

    async def bounded() -> Any:
        return await asyncio.wait_for(scenario, timeout_s)

    try:
        return asyncio.run(bounded())
    except TimeoutError:
        pytest.fail(f"scenario did not finish within {timeout_s} s")


@contextlib.asynccontextmanager
async def connect(url: str, bearer: Optional[str] = None) -> AsyncIterator[Queen]:
    """Open an official client on ``url`` (with ``bearer_token`` when given) and close it
    afterwards.

    ``Queen()`` installs its own SIGINT/SIGTERM handlers and ``close()`` resets them to the
    defaults; the handlers pytest had are put back so Ctrl-C keeps working.
    """
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    # with a positional URL the client drops every keyword, bearer_token included
    client = Queen(url=url, bearer_token=bearer) if bearer is not None else Queen(url)
    try:
        yield client
    finally:
        try:
            await client.close()
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)


async def pop_now(
    client: Queen, queue: str, batch: int = 10, partition: Optional[str] = None
) -> List[Dict[str, Any]]:
    """Pop without long-polling, as the client's own tests do right after a push."""
    builder = client.queue(queue)
    if partition is not None:
        builder = builder.partition(partition)
    return await builder.batch(batch).wait(False).pop()
