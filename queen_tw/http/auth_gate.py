"""The authorization gate: every request passes here before any route (WIRE.md 4.2, 4.3).

:class:`AuthGate` is the site's root resource when ``JWT_ENABLED=true``; the hot push/pop/ack
shortcut, the Klein routes, the streams and internal routes and any route added later all
sit behind it, so none can be reached without the level :mod:`queen_tw.auth.levels` gives it.
Pre-flights (``OPTIONS``) and oversized bodies are answered by the site's request class
before the root is asked, as WIRE 1.6 and 1.7 want.

A token verified before is recognised synchronously (:meth:`TokenVerifier.cached`), so the
common request is decided without a Deferred; the first sight of a token is verified
asynchronously (a JWKS fetch may be needed) and the request continues once it is, unless the
client has gone meanwhile.

The admitted :class:`~queen_tw.auth.tokens.Identity` is handed to the routes in one place:
:func:`identity_of` reads what the gate attached to the request; :func:`producer_sub` is what
the message routes stamp on every message they write (WIRE 4.3).
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET

from queen_tw.auth.errors import AuthError
from queen_tw.auth.levels import Level, RoleNames, RouteLevels, SkipPaths
from queen_tw.auth.tokens import Identity, TokenVerifier, make_verifier
from queen_tw.config import Config
from queen_tw.http.answers import error_answer, json_answer
from queen_tw.http.site import request_id_of

log = Logger()

INSUFFICIENT = "Insufficient permissions"
_IDENTITY = "queen_identity"
"""The request attribute the gate sets; read only through :func:`identity_of`."""


def identity_of(request: Any) -> Optional[Identity]:
    """Who the gate admitted this request as; None when authentication is off or the route
    is public (no token was asked for)."""
    return getattr(request, _IDENTITY, None)


def producer_sub(request: Any) -> Optional[str]:
    """The ``producerSub`` of messages this request writes: the admitted token's ``sub``,
    None without one (auth off, public route, token without ``sub``)."""
    identity = identity_of(request)
    return identity.sub if identity is not None else None


class AuthGate(Resource):
    """Admits a request to ``inner`` when its token's roles reach the route's level.

    :param inner: the site's routes (the hot shortcut in front of the Klein routes).
    :param verifier: turns the ``Authorization`` header into an :class:`Identity`.
    :param levels: the level each (method, path) requires, skip paths included.
    :param roles: the deployment's role names.
    """

    isLeaf = True

    def __init__(self, inner: IResource, verifier: TokenVerifier, levels: RouteLevels,
                 roles: RoleNames):
        super().__init__()
        self._inner = inner
        self._verifier = verifier
        self._levels = levels
        self._roles = roles

    def render(self, request):
        level = self._levels.level_of(request.method, request.path)
        if level is Level.PUBLIC:
            return self._inner.render(request)
        headers = request.requestHeaders.getRawHeaders(b"authorization") or [None]
        if len(headers) > 1:
            # which one a proxy or the client meant is anyone's guess: refuse, never pick
            request.setHeader(b"WWW-Authenticate", b"Bearer")
            return json_answer(request, 401, {"error": "Token decode error: several "
                                                        "Authorization headers, send exactly "
                                                        "one"})
        header = headers[0]
        identity = self._verifier.cached(header)
        if identity is not None:
            return self._admit(request, identity, level)
        left: List[bool] = [False]
        request.notifyFinish().addBoth(lambda _: left.__setitem__(0, True))
        verified = defer.ensureDeferred(self._verifier.verify(header))
        verified.addCallbacks(self._verified, self._refused, callbackArgs=(request, level, left),
                              errbackArgs=(request, left))
        verified.addErrback(lambda failure: log.failure("answering {path} failed", failure,
                                                        path=_path(request),
                                                        request_id=request_id_of(request)))
        return NOT_DONE_YET

    def refuses_unread(self, method: bytes, uri: bytes, headers: Headers) -> bool:
        """True when a request will be refused whatever its body: it has no Authorization
        header and its route needs one. The site then answers it without reading the body
        (``site._DeadlineChannel``): an anonymous client must not make the server take in
        and hold bodies up to QUEEN_MAX_BODY_BYTES."""
        if headers.hasHeader(b"authorization"):
            return False
        return self._levels.level_of(method, uri.split(b"?", 1)[0]) is not Level.PUBLIC

    def _admit(self, request, identity: Identity, level: Level):
        """The inner routes' answer when ``identity`` may use a ``level`` route, else 403."""
        if self._roles.clearance(identity.roles) < level:
            log.info("refused {method} {path} to {sub} (roles {roles}): the route needs "
                     "{needed}", method=request.method.decode("latin-1"), path=_path(request),
                     sub=identity.sub, roles=sorted(identity.roles), needed=level.name,
                     request_id=request_id_of(request))
            return json_answer(request, 403, {"error": INSUFFICIENT})
        setattr(request, _IDENTITY, identity)
        return self._inner.render(request)

    def _verified(self, identity: Identity, request, level: Level, left: List[bool]) -> None:
        if left[0]:
            return  # the client went while its token was checked: nothing to answer
        try:
            request.render(_Answer(lambda: self._admit(request, identity, level)))
        except Exception:
            _finish(request, error_answer(request, Failure()))

    def _refused(self, failure: Failure, request, left: List[bool]) -> None:
        if left[0]:
            return
        error = failure.value
        if not isinstance(error, AuthError):
            _finish(request, error_answer(request, failure))  # a bug: logged, answered 500
            return
        if error.status >= 500:
            log.warn("cannot verify tokens for {path}: {error}", path=_path(request),
                     error=error.message, request_id=request_id_of(request))
        else:
            log.debug("refused {path}: {error}", path=_path(request), error=error.message,
                      request_id=request_id_of(request))
            request.setHeader(b"WWW-Authenticate", b"Bearer")
        _finish(request, json_answer(request, error.status, {"error": error.message}))


class _Answer(Resource):
    """Lets the gate's late decision be rendered by ``Request.render`` (which finishes the
    request, sets Content-Length and drops the body of a HEAD) like any other answer."""

    isLeaf = True

    def __init__(self, answer: Callable[[], Any]):
        super().__init__()
        self._answer = answer

    def render(self, request):
        return self._answer()


def _finish(request, body: bytes) -> None:
    request.write(body)
    request.finish()


def _path(request) -> str:
    return request.path.decode("utf-8", errors="replace")


def guarded(root: IResource, config: Config, reactor) -> IResource:
    """``root`` behind an :class:`AuthGate` when ``JWT_ENABLED=true``, else ``root`` itself.

    ``reactor`` is the verifier's clock and the JWKS fetcher's reactor.
    """
    verifier = make_verifier(config, reactor)
    if verifier is None:
        return root
    skip = SkipPaths.parse(config.jwt_skip_paths)
    log.info("authorization on every route; no token needed for {skip}",
             skip=", ".join(skip.entries) or "no path")
    return AuthGate(root, verifier, RouteLevels(skip),
                    RoleNames(admin=config.jwt_role_admin,
                              read_write=config.jwt_role_read_write,
                              read_only=config.jwt_role_read_only))
