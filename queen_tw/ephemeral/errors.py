"""Refusals of the ephemeral surface, each with the ``code`` its ``{error, code}`` answer
carries (WIRE2.md 1.2): clients branch on the code, people read the message."""

from queen_tw.errors import QueenError


class EphemeralError(QueenError):
    """A refusal with an HTTP status and a stable ``code``."""

    code = "ephemeral_error"

    def __init__(self, message: str, status: int = 0, code: str = ""):
        super().__init__(message)
        if status:
            self.status = status
        if code:
            self.code = code


class BadRequest(EphemeralError):
    """Malformed body, parameter or option (400)."""

    status = 400
    code = "ephemeral_bad_request"


class QueueFull(EphemeralError):
    """The queue is at maxBytes/maxLength and its policy is reject (429)."""

    status = 429
    code = "queue_full"


class NoRoom(EphemeralError):
    """The broker-wide byte budget (QUEEN_EPHEMERAL_MAX_BYTES) is used up (503)."""

    status = 503
    code = "ephemeral_unavailable"


class QueueNotFound(EphemeralError):
    """A depth read of a queue this server does not have (404)."""

    status = 404
    code = "ephemeral_queue_not_found"
