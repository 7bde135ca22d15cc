"""KV state and locks over HTTP (WIRE2.md 2, 4): ``POST /api/v1/kv`` (every op, what the
2.6.0 client sends), its path sugar ``GET``/``PUT``/``DELETE /api/v1/kv/{ns}/{key…}``, and
``POST /api/v1/locks``.

Verdicts (a lost race, a missing key, a held lock) are 200 with an explicit field; a refused
call answers the WIRE2.md 1.2 envelope ``{"error": code, "reason": rule, "detail": prose}``
(400, or 413 for a key or value above its limit), with nothing applied.
"""

from typing import Any, Dict, List

from twisted.python.failure import Failure

from queen_tw import jsoncodec
from queen_tw.auth.levels import routed_klein
from queen_tw.engine.kv import KvEngine
from queen_tw.engine.queue_engine import QueueEngine
from queen_tw.errors import NotFound, Unavailable
from queen_tw.http.answers import answering_errors, json_answer
from queen_tw.http.kv_input import KvInputError, kv_ops, lock_ops, operations_of

_SUGAR_FIELDS = frozenset({"op", "ns", "key"})


def _read_json(request, what: str) -> Any:
    """The body as JSON (``None`` when empty); malformed JSON is a ``<what>_bad_request``."""
    raw = request.content.read() if request.content is not None else b""
    if not raw.strip():
        return None
    try:
        return jsoncodec.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise KvInputError(f"{what}_bad_request", f"{what}_bad_json",
                           f"the body is not JSON this server can store: {err}") from None


def _refuse_query_string(request) -> None:
    if b"?" in request.uri:
        raise KvInputError("kv_bad_request", "kv_query_string_not_allowed",
                           "the KV path routes take no query string")


class KvRoutes:
    """The KV and lock routes.

    :param messages: the message path, whose pool the KV engine shares (404 without it).
    """

    app = routed_klein()

    @app.handle_errors(KvInputError)
    def _refused(self, request, failure: Failure) -> bytes:
        error = failure.value
        assert isinstance(error, KvInputError)  # the only type this handler is given
        return json_answer(request, error.status, error.envelope())

    @app.handle_errors(Unavailable)
    def _unavailable(self, request, failure: Failure) -> bytes:
        # transient (PostgreSQL unreachable, overload): the client retries (WIRE2.md 1.2, 1.3)
        surface = "locks" if request.path.startswith(b"/api/v1/locks") else "kv"
        request.setHeader(b"Retry-After", b"1")
        return json_answer(request, 503, {"error": f"{surface}_unavailable",
                                          "reason": "database_unavailable",
                                          "detail": str(failure.value)})

    answering_errors(app)  # every other error as the rest of the site answers it

    def __init__(self, messages: QueueEngine | None = None):
        self._messages = messages
        self._engine: KvEngine | None = None

    def _kv(self) -> KvEngine:
        if self._engine is None:
            if self._messages is None:
                raise NotFound("Not found")
            self._engine = KvEngine(self._messages.database)
        return self._engine

    @app.route("/api/v1/kv", methods=["POST"])
    async def batch(self, request):
        ops = kv_ops(operations_of(_read_json(request, "kv"), "kv"))
        return json_answer(request, 200, await self._kv().apply(ops))

    @app.route("/api/v1/locks", methods=["POST"])
    async def locks(self, request):
        ops = lock_ops(operations_of(_read_json(request, "locks"), "locks"))
        return json_answer(request, 200, await self._kv().locks(ops))

    # -- path sugar (WIRE2.md 2.4) ------------------------------------------------------

    @app.route("/api/v1/kv/<ns>/<path:key>", methods=["GET"])
    async def get_key(self, request, ns, key):
        _refuse_query_string(request)
        answer = await self._one(request, {"op": "get", "ns": ns, "key": key})
        if answer.get("found"):
            request.setHeader(b"ETag", b'"%d"' % answer["version"])
        return json_answer(request, 200, answer)

    @app.route("/api/v1/kv/<ns>/<path:key>", methods=["PUT"])
    async def put_key(self, request, ns, key):
        _refuse_query_string(request)
        op = dict(self._sugar_body(request), op="put", ns=ns, key=key)
        return json_answer(request, 200, await self._one(request, op))

    @app.route("/api/v1/kv/<ns>/<path:key>", methods=["DELETE"])
    async def delete_key(self, request, ns, key):
        _refuse_query_string(request)
        op = dict(self._sugar_body(request), op="delete", ns=ns, key=key)
        return json_answer(request, 200, await self._one(request, op))

    def _sugar_body(self, request) -> Dict[str, Any]:
        body = _read_json(request, "kv")
        if body is None:
            return {}
        if not isinstance(body, dict):
            raise KvInputError("kv_bad_request", "kv_bad_body", "the body must be an object")
        named = sorted(_SUGAR_FIELDS & set(body))
        if named:
            raise KvInputError("kv_bad_request", "kv_path_field_in_body",
                               f"{named[0]} comes from the path, not the body")
        return body

    async def _one(self, request, op: Dict[str, Any]) -> Dict[str, Any]:
        """The element of one op, or the precondition failure of a ``required`` one."""
        answer = await self._kv().apply(kv_ops([op]))
        results: List[Dict[str, Any]] = answer.get("results") or []
        return results[0] if results else answer
