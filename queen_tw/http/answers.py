"""How every route answers: JSON bodies, 204s, and the one mapping of errors to status codes.

Every route module registers :func:`error_answer` on its Klein app with :func:`answering_errors`
and the hot-route shortcut calls it directly, so a domain error, an unknown path or a bug is
answered the same way whichever way the request came in.
"""

from typing import Any, Iterable

from klein import Klein
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from queen_tw import jsoncodec
from queen_tw.errors import QueenError
from queen_tw.http.site import request_id_of

log = Logger()


def json_answer(request, code: int, body: Any) -> bytes:
    """``body`` as JSON with status ``code``."""
    data = jsoncodec.dumps(body)
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Content-Length", b"%d" % len(data))  # no chunked framing needed
    return data


def no_content(request) -> bytes:
    """204 without a body (a pop that delivers nothing)."""
    request.setResponseCode(204)
    return b""


def not_found(request) -> bytes:
    """404 for a path no route knows."""
    return json_answer(request, 404, {"error": "Not found"})


def method_not_allowed(request, allowed: Iterable[str]) -> bytes:
    """405 for a known path asked with another method; ``Allow`` lists the right ones."""
    request.setHeader(b"Allow", ", ".join(sorted(set(allowed))).encode())
    return json_answer(request, 405, {"error": "Method not allowed"})


def error_answer(request, failure: Failure) -> bytes:
    """A domain error as its status and ``{"error": message}``; anything else is a bug,
    logged with its traceback and answered 500 without it."""
    error = failure.value
    if isinstance(error, QueenError):
        if error.status == 503:
            request.setHeader(b"Retry-After", b"1")  # overload or outage: retry shortly
        return json_answer(request, error.status, {"error": error.message})
    log.failure("unexpected error on {method} {path}", failure,
                method=request.method.decode(), path=request.path.decode(errors="replace"),
                request_id=request_id_of(request))
    return json_answer(request, 500, {"error": "Internal server error"})


def answering_errors(app: Klein) -> Klein:
    """``app`` with :func:`error_answer` as its only error handler (call once per app)."""

    @app.handle_errors(Exception)
    def _answer(self: Any, request: IRequest, failure: Failure) -> bytes:
        # Klein's error-method shape: ``self`` is the route object the app is bound to,
        # which the mapping does not need.
        return error_answer(request, failure)

    return app
