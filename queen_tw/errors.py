"""Domain errors. The HTTP layer maps each to a status code and a JSON body in one place."""


class QueenError(Exception):
    """Base of every error that is the client's to see; ``status`` is the HTTP code."""

    status = 500

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidRequest(QueenError):
    """Malformed body, parameter or field."""

    status = 400


class RefusedByDatabase(InvalidRequest):
    """PostgreSQL refused the request's data as beyond one of its limits (SQLSTATE class 54,
    e.g. a value too long for an index): the same request would be refused again."""


class NotFound(QueenError):
    """Unknown route, queue, lease or message."""

    status = 404


class PayloadTooLarge(QueenError):
    """Request body above ``QUEEN_MAX_BODY_BYTES``."""

    status = 413


class Unavailable(QueenError):
    """PostgreSQL unreachable or the server overloaded: the client should retry."""

    status = 503


class DatabaseUnavailable(Unavailable):
    """PostgreSQL could not be reached or the connection broke mid-call."""


class NoEncryptionKey(Unavailable):
    """A pop or a read by offset met a payload stored encrypted, and this server has no
    ``QUEEN_ENCRYPTION_KEY``: the stored envelope is never handed out as the message (503;
    a pop gives its delivery back), a server with the key serves it."""

    def __init__(self, message: str = (
            "A payload is stored encrypted and this server has no QUEEN_ENCRYPTION_KEY to "
            "open it; nothing was handed out: read it through a server that has the key")):
        super().__init__(message)


class QueueSettingsChanged(Unavailable):
    """A push met a queue whose ``encryptionEnabled`` changed after the server read it (a
    configure through another worker or instance, not yet known here): PostgreSQL stored
    nothing rather than keep a payload in plaintext. Read the flags again and retry (503)."""


class DatabaseBusy(Unavailable):
    """PostgreSQL undid a call (deadlock or serialization failure) every time the pool ran it.

    Nothing of the call was applied, and the database is up: the client may simply retry
    (503), and a push is not diverted to the file buffer as in an outage."""
