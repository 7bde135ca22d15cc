"""A long schemathesis run against a live queen-tw (issue #17 point 9): >= 20 000 requests.

Not run by CI (tests/test_fuzz.py is the bounded CI run). It starts a private embedded
PostgreSQL and one server on loopback, fuzzes every operation of the OpenAPI document the
server serves (valid and schema-breaking requests), prints a summary and exits non-zero when
an answer was >= 500, a request hung or an answer broke the document. With ``--jwt-secret``
the server runs with JWT on (HS256) and every request carries an admin token.

    .venv/bin/python bench/fuzz.py [--examples 210] [--jwt-secret SECRET]
"""

from __future__ import annotations

import argparse
import sys
import time

from harness import running_stack

from fuzz_support import fuzz


def _admin_token(secret: str) -> str:
    import jwt  # only with --jwt-secret

    now = int(time.time())
    return jwt.encode({"sub": "bench-fuzz", "role": "admin", "iat": now, "exp": now + 86_400},
                      secret, algorithm="HS256")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=210,
                        help="examples per operation and pass (default 210: ~21 600 "
                             "requests)")
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed")
    parser.add_argument("--timeout", type=float, default=20.0,
                        help="seconds without an answer that make a hang (default 20)")
    parser.add_argument("--jwt-secret", default=None,
                        help="run the server with JWT_ENABLED=true and this HS256 secret")
    args = parser.parse_args()

    env = {}
    headers = {}
    if args.jwt_secret:
        env = {"JWT_ENABLED": "true", "JWT_ALGORITHM": "HS256", "JWT_SECRET": args.jwt_secret}
        headers = {"Authorization": f"Bearer {_admin_token(args.jwt_secret)}"}
    with running_stack("queen-bench-fuzz-", env) as stack:
        started = time.monotonic()
        report = fuzz(stack.server.url, args.examples, headers, args.timeout, args.seed)
        elapsed = time.monotonic() - started
    print(f"auth {'on' if args.jwt_secret else 'off'}, {args.examples} examples per "
          f"operation and pass, {elapsed:.0f} s ({report.requests / elapsed:.0f} requests/s)")
    print(report.summary())
    for line in report.hangs + report.distinct_violations():
        print(" ", line)
    failed = report.server_errors or report.hangs or report.violations or report.refused_valid
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
