"""Timers' routes (WIRE2.md 3): ``POST /api/v1/timers`` (schedule, reschedule and cancel in
one batch), ``DELETE /api/v1/timers/{queue}/{timerKey…}`` (cancel), ``GET
/api/v1/timers/{queue}`` (list) and ``GET /api/v1/timers/{queue}/{timerKey…}`` (peek).

Verdicts (``too_late``, ``absent``, ``found: false``) are 200s; refusals use the WIRE2 1.2
envelope ``{"error": code, "reason": stable id, "detail": prose}``. :func:`timer_operations`
validates an ``operations`` array; the timers rider of ``POST /api/v1/transaction`` uses it
too, then :meth:`TimersEngine.prepare` and ``queen.timers_schedule``.
"""

import base64
import binascii
import math
from typing import Any, Dict, List, NoReturn, Optional, Tuple

import orjson
import zstandard
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from queen_tw import jsoncodec
from queen_tw.auth.levels import routed_klein
from queen_tw.engine.timers import TimersEngine
from queen_tw.errors import InvalidRequest, NotFound, PayloadTooLarge, QueenError, Unavailable
from queen_tw.http import parsing, query
from queen_tw.http.answers import json_answer
from queen_tw.http.auth_gate import producer_sub
from queen_tw.http.site import request_id_of

log = Logger()

MAX_OPERATIONS = 256
"""Most ops in one ``POST /api/v1/timers`` (WIRE2 3.1)."""

MAX_PAYLOAD_BYTES = 1024 * 1024
"""Largest decoded payload (the base64-decoded bytes), WIRE2 3.1; above it 413."""

MAX_DECOMPRESSED_BYTES = 16 * 1024 * 1024
"""Largest body a ``payloadZstd`` payload may decompress to (bounds a decompression bomb)."""

HORIZON_MS = 90 * 24 * 3600 * 1000
"""Furthest a timer may be scheduled (upstream's horizon): beyond it 403."""

MAX_KEY_LENGTH = 1024
"""Longest timerKey."""

LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX = 100, 1000

OPS = ("schedule", "reschedule", "cancel")

SERVER_OWNED = frozenset({
    "producerSub", "producer_sub", "messageId", "message_id", "deliverAt", "deliver_at",
    "delaySeconds", "delay_seconds", "attempts", "claimToken", "claim_token", "claimedUntil"})
"""Fields the server owns (WIRE2 3.1): refused, never ignored; so is any field starting
with ``_`` or ``tenant`` (``tenant*``)."""


class TimersRefused(QueenError):
    """A refused timer request, answered in the WIRE2 1.2 envelope.

    :param status: HTTP status.
    :param code: ``error`` (``timers_bad_request``, ``payload_too_large``, …).
    :param reason: the stable id of the rule (``timers_delay_required``, …).
    :param detail: what is wrong, in prose.
    """

    def __init__(self, status: int, code: str, reason: str, detail: str):
        super().__init__(detail)
        self.status = status
        self.code = code
        self.reason = reason

    def envelope(self) -> Dict[str, str]:
        return {"error": self.code, "reason": self.reason, "detail": self.message}


def _bad(reason: str, detail: str) -> NoReturn:
    raise TimersRefused(400, "timers_bad_request", reason, detail)


def timer_operations(raw: Any, where: str = "operations") -> List[Dict[str, Any]]:
    """The validated ops of ``raw`` (an ``operations`` array, or a transaction's ``timers``
    rider; ``where`` names it in errors). Each op is ``{op, queue, timerKey, …}``; a
    scheduling op also has ``txn``, ``delayMs``, ``payload`` (the base64 text as sent),
    ``payloadZstd``, ``value`` (the payload's JSON, parsed) and, when ``payloadZstd``,
    ``body`` (that JSON, which the fire pushes). Raises :class:`TimersRefused`."""
    if not isinstance(raw, list):
        _bad("timers_operations_required", f"{where} must be an array of timer operations")
    if len(raw) > MAX_OPERATIONS:
        _bad("timers_too_many_operations",
             f"{where} has {len(raw)} operations; at most {MAX_OPERATIONS} per call")
    ops = [timer_operation(op, f"{where}[{index}]") for index, op in enumerate(raw)]
    seen = set()
    for index, op in enumerate(ops):
        key = (op["queue"], op["timerKey"])
        if key in seen:
            _bad("timers_duplicate_key_in_call",
                 f"{where}[{index}]: queue {op['queue']!r} timerKey {op['timerKey']!r} "
                 "appears twice in one call")
        seen.add(key)
    return ops


def timer_operation(raw: Any, where: str) -> Dict[str, Any]:
    """One validated op (see :func:`timer_operations`)."""
    if not isinstance(raw, dict):
        _bad("timers_bad_op", f"{where} must be an object")
    for field in raw:
        if field in SERVER_OWNED or field.startswith(("_", "tenant")):
            _bad("timers_server_owned_field",
                 f"{where}.{field} is set by the server and cannot be sent")
    kind = raw.get("op")
    if kind not in OPS:
        _bad("timers_bad_op", f"{where}.op must be one of {', '.join(OPS)}")
    op: Dict[str, Any] = {"op": kind, "queue": _queue(raw.get("queue"), where),
                          "timerKey": _timer_key(raw.get("timerKey"), where)}
    txn = _txn(raw.get("txn"), where)
    if kind == "cancel":
        if txn is not None:
            op["txn"] = txn
        return op
    if txn is None:
        _bad("timers_txn_required", f"{where}.txn is required (the fired message's "
                                    "transactionId)")
    op["txn"] = txn
    return _with_message_fields(op, raw, where)


def _with_message_fields(op: Dict[str, Any], raw: Dict[str, Any], where: str
                         ) -> Dict[str, Any]:
    """``op`` (a schedule or reschedule) with what its message will be: partition, delay
    and payload."""
    partition = raw.get("partition")
    if partition is not None:
        op["partition"] = _checked_name(partition, f"{where}.partition",
                                        "timers_bad_partition")
    op["delayMs"] = _delay_ms(raw.get("delayMs"), where)
    zstd = raw.get("payloadZstd")
    if zstd is not None and not isinstance(zstd, bool):
        _bad("timers_bad_payload_zstd", f"{where}.payloadZstd must be true or false")
    op["payloadZstd"] = bool(zstd)
    op["payload"], op["value"] = _payload(raw.get("payload"), op["payloadZstd"], where)
    if op["payloadZstd"]:
        op["body"] = op["value"]
    return op


def _checked_name(value: Any, what: str, reason: str) -> str:
    if not isinstance(value, str):
        _bad(reason, f"{what} must be a string")
    try:
        return parsing.check_name(value, what)
    except InvalidRequest as err:
        _bad(reason, err.message)


def _queue(value: Any, where: str) -> str:
    if value is None or value == "":
        _bad("timers_queue_required", f"{where}.queue is required (a non-empty string)")
    return _checked_name(value, f"{where}.queue", "timers_bad_queue")


def _timer_key(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        _bad("timers_key_required", f"{where}.timerKey is required (a non-empty string)")
    if len(value) > MAX_KEY_LENGTH:
        _bad("timers_bad_key", f"{where}.timerKey is longer than {MAX_KEY_LENGTH} characters")
    if "\x00" in value:
        _bad("timers_bad_key", f"{where}.timerKey must not contain \\u0000")
    if value.startswith("/") or any(part in (".", "..") for part in value.split("/")):
        # the peek and cancel paths could not name it: URLs merge a leading '//' and
        # resolve dot segments, so such a timer could be neither read nor cancelled
        _bad("timers_bad_key", f"{where}.timerKey must not start with '/' nor have a '.' "
                               "or '..' segment (the timer routes' paths could not name it)")
    return value


def _txn(value: Any, where: str) -> Optional[str]:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        _bad("timers_bad_txn", f"{where}.txn must be a string")
    if len(value) > parsing.MAX_NAME_LENGTH:
        _bad("timers_bad_txn",
             f"{where}.txn is longer than {parsing.MAX_NAME_LENGTH} characters")
    if "\x00" in value:
        _bad("timers_bad_txn", f"{where}.txn must not contain \\u0000")
    return value


def _delay_ms(value: Any, where: str) -> float:
    """The delay in ms; a past one (negative) fires on the first sweep, and is kept within
    the horizon only so the arithmetic stays in range."""
    if value is None:
        _bad("timers_delay_required", f"{where}.delayMs is required (milliseconds from now)")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
            value):
        _bad("timers_bad_delay", f"{where}.delayMs must be a number of milliseconds")
    if value > HORIZON_MS:
        raise TimersRefused(403, "timer_horizon_exceeded", "timer_horizon_exceeded",
                            f"{where}.delayMs {value} is beyond the horizon of "
                            f"{HORIZON_MS} ms (90 days)")
    return max(value, -HORIZON_MS)


def _payload(value: Any, zstd: bool, where: str) -> Tuple[str, orjson.Fragment]:
    """(the base64 text, the JSON it carries): decoded, decompressed when ``zstd``, and
    checked, since the timer will become a message with a JSON body. The JSON stays its
    text (a ``Fragment``): sealed or stored parsed, its numbers beyond a double's precision
    lost digits the message of a plain timer keeps."""
    if not isinstance(value, str):
        _bad("timers_payload_required", f"{where}.payload is required (base64 of the body)")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        _bad("timers_bad_payload", f"{where}.payload is not valid base64")
    if len(raw) > MAX_PAYLOAD_BYTES:
        raise TimersRefused(413, "payload_too_large", "timers_payload_too_large",
                            f"{where}.payload decodes to {len(raw)} bytes; at most "
                            f"{MAX_PAYLOAD_BYTES}")
    if zstd:
        try:
            raw = zstandard.ZstdDecompressor().decompress(
                raw, max_output_size=MAX_DECOMPRESSED_BYTES)
        except zstandard.ZstdError as err:
            _bad("timers_bad_zstd", f"{where}.payload is not one zstd frame of at most "
                                    f"{MAX_DECOMPRESSED_BYTES} bytes: {err}")
    try:
        # UTF-8 only, as PostgreSQL reads it when the timer fires: the parser alone also takes
        # a byte order mark and UTF-16/32, which were scheduled and then failed every fire.
        if raw.decode("utf-8").startswith("\ufeff"):
            raise ValueError("it starts with a byte order mark")
        jsoncodec.loads(raw)
        jsoncodec.refuse_unstorable_numbers(raw)
        return value, orjson.Fragment(raw)
    except (ValueError, UnicodeDecodeError) as err:
        _bad("timers_payload_not_json", f"{where}.payload is not a JSON document: {err}")


class TimerRoutes:
    """The four timer routes.

    :param timers: the timers' engine (every route answers 404 without it).
    """

    app = routed_klein()

    def __init__(self, timers: Optional[TimersEngine] = None):
        self._timers = timers

    def _engine(self) -> TimersEngine:
        if self._timers is None:
            raise NotFound("Not found")
        return self._timers

    @app.route("/api/v1/timers", methods=["POST"])
    async def batch(self, request):
        engine = self._engine()
        body = parsing.read_json_object(request)
        ops = timer_operations(body.get("operations"))
        results = await engine.apply(ops, producer_sub(request))
        return json_answer(request, 200, {"results": results})

    @app.route("/api/v1/timers/<queue>", methods=["GET"])
    async def list_timers(self, request, queue):
        engine = self._engine()
        queue = _checked_name(queue, "queue", "timers_bad_queue")
        after = query.text(request, "after") or None
        return json_answer(request, 200, await engine.list(queue, after, _limit(request)))

    @app.route("/api/v1/timers/<queue>/<path:timer_key>", methods=["GET"])
    async def peek(self, request, queue, timer_key):
        engine = self._engine()
        queue = _checked_name(queue, "queue", "timers_bad_queue")
        return json_answer(request, 200, await engine.peek(
            queue, _timer_key(timer_key, "path")))

    @app.route("/api/v1/timers/<queue>/<path:timer_key>", methods=["DELETE"])
    async def cancel(self, request, queue, timer_key):
        engine = self._engine()
        queue = _checked_name(queue, "queue", "timers_bad_queue")
        txn = _txn(query.text(request, "txn"), "query")
        return json_answer(request, 200, await engine.cancel(
            queue, _timer_key(timer_key, "path"), txn))

    @app.handle_errors(Exception)
    def _refused(self, request: IRequest, failure: Failure) -> bytes:
        return timers_error_answer(request, failure)


def _limit(request) -> int:
    """``limit``: clamped to 1..1000, never refused; unparsable means the default."""
    text = query.text(request, "limit")
    try:
        limit = int(text) if text else LIST_LIMIT_DEFAULT
    except ValueError:
        limit = LIST_LIMIT_DEFAULT
    return min(max(limit, 1), LIST_LIMIT_MAX)


_CODES = {400: "timers_bad_request", 413: "payload_too_large", 503: "timers_unavailable"}


def timers_error_answer(request, failure: Failure) -> bytes:
    """Any error of a timer route in the WIRE2 1.2 envelope (``Not found`` stays WIRE's)."""
    error = failure.value
    if isinstance(error, TimersRefused):
        return json_answer(request, error.status, error.envelope())
    if isinstance(error, NotFound):
        return json_answer(request, 404, {"error": error.message})
    if isinstance(error, (InvalidRequest, PayloadTooLarge, Unavailable)):
        if isinstance(error, Unavailable):
            request.setHeader(b"Retry-After", b"1")
        code = _CODES[error.status]
        return json_answer(request, error.status,
                           {"error": code, "reason": code, "detail": error.message})
    log.failure("unexpected error on {method} {path}", failure,
                method=request.method.decode(), path=request.path.decode(errors="replace"),
                request_id=request_id_of(request))
    return json_answer(request, 500, {"error": "timers_error", "reason": "timers_error",
                                      "detail": "Internal server error"})
