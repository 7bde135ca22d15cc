"""Kubernetes probe of one queen-tw pod over GET /health: exit 0 = pass, 1 = fail.

    python probe.py live        the server answers /health at all (200 or 503)
    python probe.py ready       it can take pushes: PostgreSQL answers, or its file
                                buffer is healthy (pushes are buffered and replayed later)
    python probe.py ready-db    PostgreSQL answers (/health says 200)

Why not an httpGet probe: /health answers 503 while PostgreSQL is away, and then an httpGet
liveness probe would restart every pod during a database failover, and an httpGet readiness
probe would empty the Service, so no push could reach the file buffer that exists for
exactly that outage. The standard library only: the image has Python and nothing else.
"""

import json
import os
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 4.0


def read_health(port: str) -> tuple[int, dict]:
    """(status, body) of GET /health; raises OSError when nothing answers."""
    url = f"http://127.0.0.1:{port}/health"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as error:  # 503 and friends still carry the JSON body
        with error:
            try:
                return error.code, json.load(error)
            except ValueError:
                return error.code, {}


def passes(mode: str, status: int, body: dict) -> bool:
    """Whether a /health answer passes the probe ``mode``."""
    if mode == "live":
        return True
    if status == 200:
        return True
    buffer = body.get("file_buffer") or {}
    return mode == "ready" and status == 503 and buffer.get("healthy") is True


def main(argv: list[str]) -> int:
    mode = argv[1] if len(argv) > 1 else ""
    if mode not in ("live", "ready", "ready-db"):
        print(f"usage: {argv[0]} live|ready|ready-db", file=sys.stderr)
        return 2
    try:
        status, body = read_health(os.environ.get("PORT") or "6632")
    except (OSError, ValueError) as error:
        print(f"/health did not answer: {error}", file=sys.stderr)
        return 1
    if passes(mode, status, body):
        return 0
    print(f"/health answered {status}: {json.dumps(body)}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
