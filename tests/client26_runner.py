"""Runs one scenario with the official queen-mq 2.6.0 client; executed by .venv-client26's
Python (never imported by the test suite, whose venv holds 0.15.0 under the same name).

argv: the scenario file, then a JSON object of arguments. The scenario file defines
``async def scenario(client, args)``; its return value is printed as the last stdout line,
in JSON. An exception is printed there instead as ``{"raised": ..., "message": ..., ...}``
with the queen error's ``status``, ``code`` and ``reason`` when it has them.
"""

import asyncio
import json
import sys
import traceback

from queen import Queen


def describe(error: BaseException) -> dict:
    seen = {"raised": type(error).__name__, "message": str(error)}
    for name in ("status", "status_code", "code", "reason", "detail"):
        value = getattr(error, name, None)
        if isinstance(value, (str, int, float, bool)):
            seen[name] = value
    return seen


async def main(path: str, args: dict) -> object:
    namespace: dict = {}
    with open(path) as source:
        exec(compile(source.read(), path, "exec"), namespace)
    options = dict(args.get("client_options") or {})
    async with Queen(url=args["url"], **options) as client:
        try:
            return await namespace["scenario"](client, args)
        except Exception as error:  # reported to the test, which decides
            traceback.print_exc()
            return describe(error)


if __name__ == "__main__":
    outcome = asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))
    print(json.dumps(outcome, default=str))
