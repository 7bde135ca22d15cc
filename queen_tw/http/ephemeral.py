"""The eight verbs of ephemeral queues (WIRE2.md 7): ``/api/v1/ephemeral/*``.

Push, pop and ack use only the in-process engine; configure and delete write the queue's
declaration to PostgreSQL first (503 ``ephemeral_unavailable`` when it cannot, with nothing
changed). Every refusal is ``{"error": prose, "code": stable id}`` (WIRE2.md 1.2); the
2.6.0 client branches on ``code`` (a 404 without ``ephemeral_queue_not_found`` reads as "this
broker has no ephemeral queues"). A queue lives on one instance: with
``QUEEN_EPHEMERAL_PEERS`` the others relay its requests there (README: Ephemeral queues).
"""

import inspect
from typing import Any, Callable, Dict, List, Optional, Tuple

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from queen_tw import jsoncodec
from queen_tw.auth.levels import routed_klein
from queen_tw.ephemeral.engine import ACK_STATUSES, DEFAULT_PARTITION, QUEUE_MODE, Delivery
from queen_tw.ephemeral.errors import BadRequest, EphemeralError
from queen_tw.ephemeral.options import parse_options
from queen_tw.ephemeral.relay import (
    DEADLINE_S,
    LONG_POLL_SLACK_S,
    OwnerMoved,
    is_forwarded,
)
from queen_tw.ephemeral.service import Ephemeral
from queen_tw.errors import InvalidRequest, NotFound, PayloadTooLarge, QueenError, Unavailable
from queen_tw.http import parsing, query
from queen_tw.http.answers import json_answer
from queen_tw.http.site import request_id_of

log = Logger()

MAX_NAME_BYTES = 512
MAX_ITEMS = 10_000
"""Most messages per push and acks per ack call."""
MAX_BATCH = 10_000
MAX_TIMEOUT_MS = 300_000
DEFAULT_TIMEOUT_MS = 30_000


def check_name(value: Any, what: str) -> str:
    """A queue, partition or group name: a non-empty string of at most 512 bytes without
    control characters (they would alias names joined into keys)."""
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{what} is required (a non-empty string)")
    if len(value.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise BadRequest(f"{what} is longer than {MAX_NAME_BYTES} bytes")
    if any(ord(char) < 0x20 or 0x7F <= ord(char) <= 0x9F for char in value):  # C0, DEL, C1
        raise BadRequest(f"control characters are not allowed in {what}")
    return value


def _optional_name(value: Any, what: str) -> Optional[str]:
    return None if value is None or value == "" else check_name(value, what)


def _body(request) -> Dict[str, Any]:
    try:
        return parsing.read_json_object(request)
    except InvalidRequest as err:
        raise BadRequest(err.message) from None


def _payloads(raw: Any) -> List[bytes]:
    """The messages of a push as JSON texts, exactly as they will be delivered."""
    if not isinstance(raw, list):
        raise BadRequest("messages is required (an array of {payload})")
    if len(raw) > MAX_ITEMS:
        raise BadRequest(f"at most {MAX_ITEMS} messages per push")
    payloads = []
    for index, message in enumerate(raw):
        if not isinstance(message, dict) or "payload" not in message:
            raise BadRequest(f"messages[{index}] must be an object with a payload")
        # A copy of exactly the text's size: orjson's result keeps the buffer it wrote into
        # (4 KiB for a 100-byte payload, measured), and these bytes live as long as the
        # message does.
        payloads.append(bytes(memoryview(jsoncodec.dumps(message["payload"]))))
    return payloads


def _acks(raw: Any) -> List[Tuple[str, str]]:
    if not isinstance(raw, list):
        raise BadRequest("acks is required (an array of {id, status?})")
    if len(raw) > MAX_ITEMS:
        raise BadRequest(f"at most {MAX_ITEMS} acks per call")
    acks = []
    for index, entry in enumerate(raw):
        if not isinstance(entry, dict):
            raise BadRequest(f"acks[{index}] must be an object")
        message_id = entry.get("id")
        if not isinstance(message_id, str) or not message_id:
            raise BadRequest(f"acks[{index}].id is required (a non-empty string)")
        status = entry.get("status")
        if status is None:
            status = "completed"
        if status not in ACK_STATUSES:
            raise BadRequest(f"acks[{index}].status must be one of {', '.join(ACK_STATUSES)}")
        acks.append((message_id, status))
    return acks


def _pop_answer(request, queue: str, deliveries: List[Delivery]) -> bytes:
    """``{queue, messages: [{id, partition, attempts, payload}]}`` with each payload's
    stored JSON written as is."""
    dumps = jsoncodec.dumps
    messages = b",".join(
        b'{"id":%s,"partition":%s,"attempts":%d,"payload":%s}'
        % (dumps(each.id), dumps(each.partition), each.attempts, each.payload)
        for each in deliveries)
    body = b'{"queue":%s,"messages":[%s]}' % (dumps(queue), messages)
    request.setResponseCode(200)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Content-Length", b"%d" % len(body))
    return body


def error_answer(request, failure: Failure) -> bytes:
    """Any refusal as ``{error, code}``; an unexpected error is logged and answered 500."""
    error = failure.value
    if isinstance(error, EphemeralError):
        status, code = error.status, error.code
    elif isinstance(error, (InvalidRequest, PayloadTooLarge)):
        status = error.status
        code = "ephemeral_bad_request" if status == 400 else "payload_too_large"
    elif isinstance(error, Unavailable):
        status, code = 503, "ephemeral_unavailable"
    elif isinstance(error, NotFound):
        status, code = 404, "no_such_route"
    else:
        log.failure("unexpected error on {method} {path}", failure,
                    method=request.method.decode(), path=request.path.decode(errors="replace"),
                    request_id=request_id_of(request))
        return json_answer(request, 500, {"error": "Internal server error",
                                          "code": "ephemeral_error"})
    if status in (429, 503):
        request.setHeader(b"Retry-After", b"1")
    message = error.message if isinstance(error, QueenError) else str(error)
    return json_answer(request, status, {"error": message, "code": code})


class EphemeralRoutes:
    """Routes of ephemeral queues.

    :param ephemeral: the engine, its long polls and declarations (None: every route
        answers 404, as a broker without ephemeral queues does).

    With ``QUEEN_EPHEMERAL_PEERS`` a request for a queue another instance owns is checked
    here, then relayed to the owner (:mod:`queen_tw.ephemeral.relay`).
    """

    app = routed_klein()

    def __init__(self, ephemeral: Optional[Ephemeral] = None):
        self._ephemeral = ephemeral

    @app.handle_errors(Exception)
    def _refused(self, request, failure):
        return error_answer(request, failure)

    def _parts(self) -> Ephemeral:
        if self._ephemeral is None:
            raise NotFound("Not found")
        return self._ephemeral

    @app.route("/api/v1/ephemeral/configure", methods=["POST"])
    def configure(self, request):
        parts = self._parts()
        body = _body(request)
        queue = check_name(body.get("queue"), "queue")
        options = parse_options(body.get("options"))

        async def here() -> bytes:
            return json_answer(request, 201,
                               await parts.declarations.configure(queue, options))
        return _at_owner(request, parts, queue, here)

    @app.route("/api/v1/ephemeral/reset", methods=["POST"])
    def reset(self, request):
        parts = self._parts()
        queue = check_name(_body(request).get("queue"), "queue")
        return _at_owner(request, parts, queue, lambda: json_answer(
            request, 200, {"queue": queue, "dropped": parts.engine.reset(queue)}))

    @app.route("/api/v1/ephemeral/queue/<path:queue>", methods=["DELETE"])
    def delete(self, request, queue):
        parts = self._parts()
        queue = check_name(queue, "queue")

        async def here() -> bytes:
            return json_answer(request, 200, await parts.declarations.delete(queue))
        return _at_owner(request, parts, queue, here)

    @app.route("/api/v1/ephemeral/push", methods=["POST"])
    def push(self, request):
        parts = self._parts()
        body = _body(request)
        queue = check_name(body.get("queue"), "queue")
        given = body.get("partition")  # null means absent (WIRE.md 1.2): Default
        partition = check_name(DEFAULT_PARTITION if given is None else given, "partition")
        payloads = _payloads(body.get("messages"))
        return _at_owner(request, parts, queue, lambda: _when_ready(parts, lambda: json_answer(
            request, 201, {"pushed": parts.engine.push(queue, partition, payloads)})))

    @app.route("/api/v1/ephemeral/pop", methods=["GET"])
    def pop(self, request):
        parts = self._parts()
        try:
            queue = check_name(query.text(request, "queue"), "queue")
            partition = _optional_name(query.text(request, "partition"), "partition")
            group = _optional_name(query.text(request, "group"), "group") or QUEUE_MODE
            batch = min(query.integer(request, "batch", 1, 1), MAX_BATCH)
            wait = query.flag(request, "wait")
            timeout = min(query.integer(request, "timeout", DEFAULT_TIMEOUT_MS, 0),
                          MAX_TIMEOUT_MS)
            auto_ack = query.flag(request, "autoAck")
        except InvalidRequest as err:
            raise BadRequest(err.message) from None
        relay_timeout = timeout / 1000.0 + LONG_POLL_SLACK_S if wait else DEADLINE_S
        return _at_owner(request, parts, queue, lambda: _when_ready(parts, lambda: _waited_pop(
            request, queue, parts.polls.pop(queue, partition, group, batch, auto_ack, wait,
                                            timeout))), relay_timeout)

    @app.route("/api/v1/ephemeral/ack", methods=["POST"])
    def ack(self, request):
        parts = self._parts()
        body = _body(request)
        queue = check_name(body.get("queue"), "queue")
        group = _optional_name(body.get("group"), "group") or QUEUE_MODE
        acks = _acks(body.get("acks"))
        return _at_owner(request, parts, queue, lambda: _when_ready(
            parts, lambda: json_answer(request, 200, {"results": [
                {"id": message_id, "outcome": outcome}
                for message_id, outcome in parts.engine.ack(queue, group, acks)]})))

    @app.route("/api/v1/ephemeral/queues", methods=["GET"])
    async def queues(self, request):
        parts = self._parts()
        await parts.declarations.ready()
        rows = [row for row in parts.engine.listing()
                if parts.placement.owner(row["queue"]) is None]
        cell_bytes = parts.engine.bytes
        unreachable: List[str] = []
        if not is_forwarded(request):  # the owners' rows, once, from the instance asked
            members = parts.placement.others()
            answers = await defer.DeferredList(
                [defer.ensureDeferred(parts.relay.fetch(member, "/api/v1/ephemeral/queues",
                                                        request)) for member in members],
                consumeErrors=True)
            for member, (fetched, theirs) in zip(members, answers, strict=True):
                if not fetched:  # a member down: its queues are missing, the rest is listed
                    log.warn("ephemeral listing without {member}: {error}", member=member,
                             error=theirs.getErrorMessage())
                    unreachable.append(member)
                    continue
                rows.extend(theirs["queues"])
                cell_bytes += theirs["cellBytes"]
        rows.sort(key=lambda row: row["queue"])
        body = {"queues": rows, "count": len(rows), "cellBytes": cell_bytes}
        if unreachable:
            body["unreachable"] = unreachable
        return json_answer(request, 200, body)

    @app.route("/api/v1/ephemeral/queues/<path:queue>/depth", methods=["GET"])
    def depth(self, request, queue):
        parts = self._parts()
        try:
            group = _optional_name(query.text(request, "group"), "group")
        except InvalidRequest as err:
            raise BadRequest(err.message) from None
        queue = check_name(queue, "queue")
        return _at_owner(request, parts, queue, lambda: _when_ready(
            parts, lambda: json_answer(request, 200, parts.engine.depth(queue, group))))


def _at_owner(request, parts: Ephemeral, queue: str, here: Callable[[], Any],
              relay_timeout: float = DEADLINE_S) -> Any:
    """``here()`` when this instance owns ``queue``; otherwise the owner's answer to the same
    request (one hop: a relayed request that lands on a non-owner is refused)."""
    owner = parts.placement.owner(queue)
    if owner is None:
        answer = here()
        return defer.ensureDeferred(answer) if inspect.iscoroutine(answer) else answer
    if is_forwarded(request):
        raise OwnerMoved(f"this instance does not own the ephemeral queue {queue!r} either "
                         "(QUEEN_EPHEMERAL_PEERS differ between instances?); not served")
    relayed = defer.ensureDeferred(parts.relay.forward(request, owner, _raw(request),
                                                       relay_timeout))
    relayed.addErrback(_client_gone)
    return relayed


def _raw(request) -> bytes:
    """The request body as received (the relay sends it on unchanged)."""
    if request.content is None:
        return b""
    request.content.seek(0)
    return request.content.read()


def _when_ready(parts: Ephemeral, answer: Callable[[], Any]) -> Any:
    """``answer()`` now, or once the declarations are loaded when no load has succeeded
    yet (the first requests after a start)."""
    if parts.declarations.loaded:
        return answer()
    waiting = defer.ensureDeferred(parts.declarations.ready())
    waiting.addCallback(lambda _: answer())
    return waiting


def _waited_pop(request, queue: str, answer: defer.Deferred) -> defer.Deferred:
    """Writes the pop's answer when it comes; a client that leaves cancels its wait."""
    if not answer.called:
        request.notifyFinish().addErrback(lambda _: answer.cancel())
    answer.addCallback(lambda deliveries: _pop_answer(request, queue, deliveries))
    answer.addErrback(_client_gone)
    return answer


def _client_gone(failure: Failure) -> None:
    """The pop was cancelled because its client went away: there is no one to answer."""
    failure.trap(defer.CancelledError)
