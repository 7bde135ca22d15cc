"""The routes every message passes through — push, pop, ack — dispatched without Klein.

For each request Klein binds a werkzeug URL map, matches it against every rule, adapts the
request and chains several Deferreds; for a push or an ack of one message that is most of
the server's time (see bench/RESULTS.md). These five routes are recognised here by their
plain path and call the very same :class:`~queen_tw.http.messaging.MessagingRoutes` methods,
with the same error answers; any other request — other routes, other methods (405 there),
paths with escapes or empty segments, errors of routing — is handed to the composed routes
unchanged, so both ways answer alike. The shortcut skips Klein, not authorization: with
``JWT_ENABLED=true`` this resource sits behind :class:`~queen_tw.http.auth_gate.AuthGate`.
"""

from typing import Any, Callable, Dict, Optional, Tuple

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET

from queen_tw.http.answers import error_answer
from queen_tw.http.messaging import MessagingRoutes
from queen_tw.http.site import request_id_of

log = Logger()

_POP_PREFIX = b"/api/v1/pop/queue/"

Route = Tuple[Callable[..., Any], Tuple[str, ...]]


class HotRoutes(Resource):
    """The site's root: push, pop and ack straight to ``messaging``, the rest to ``fallback``.

    :param messaging: the routes whose methods answer push, pop and ack.
    :param fallback: every route, ``messaging``'s included (see :mod:`queen_tw.http.routes`).
    """

    isLeaf = True

    def __init__(self, messaging: MessagingRoutes, fallback: IResource):
        super().__init__()
        self._messaging = messaging
        self._fallback = fallback
        self._exact: Dict[Tuple[bytes, bytes], Callable[..., Any]] = {
            (b"POST", b"/api/v1/push"): messaging.push,
            (b"POST", b"/api/v1/ack"): messaging.ack,
            (b"POST", b"/api/v1/ack/batch"): messaging.ack_batch,
        }

    def render(self, request):
        route = self._route(request)
        if route is None:
            return self._fallback.render(request)
        handler, args = route
        finished = [False]
        request.notifyFinish().addBoth(lambda _: finished.__setitem__(0, True))
        try:
            answer = defer.ensureDeferred(handler(request, *args))
        except Exception:
            answer = defer.fail()
        answer.addCallbacks(self._write, self._failed,
                            callbackArgs=(request, finished), errbackArgs=(request, finished))
        answer.addErrback(lambda failure: log.failure("writing an answer failed", failure,
                                                      request_id=request_id_of(request)))
        return NOT_DONE_YET

    def _route(self, request) -> Optional[Route]:
        """The handler and path arguments of a hot request, or None for the composed routes."""
        path = request.path
        if b"%" in path or b"//" in path or path.endswith(b"/"):
            return None  # escapes and empty segments: the composed routes decide, as for any
        handler = self._exact.get((request.method, path))
        if handler is not None:
            return handler, ()
        if request.method != b"GET" or not path.startswith(_POP_PREFIX):
            return None
        try:
            segments = path[len(_POP_PREFIX):].decode("utf-8").split("/")
        except UnicodeDecodeError:
            return None
        if len(segments) == 1:
            return self._messaging.pop_any_partition, (segments[0],)
        if len(segments) == 3 and segments[1] == "partition":
            return self._messaging.pop_one_partition, (segments[0], segments[2])
        return None

    def _write(self, body: bytes, request, finished) -> None:
        if finished[0]:
            return  # the client left; the work itself is done
        request.write(body)
        request.finish()

    def _failed(self, failure: Failure, request, finished) -> None:
        if finished[0]:
            if not failure.check(defer.CancelledError):
                log.failure("error after the client left {path}", failure,
                            path=request.path.decode(errors="replace"),
                            request_id=request_id_of(request))
            return
        self._write(error_answer(request, failure), request, finished)
