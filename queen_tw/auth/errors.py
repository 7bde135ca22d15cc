"""The one exception of authentication, carrying the HTTP answer WIRE.md 4.3 prescribes."""

from __future__ import annotations


class AuthError(Exception):
    """A request could not be authenticated.

    ``status`` is 401 when the caller's token is missing or bad, 500 when the server cannot
    verify any token (no HS256 secret, JWKS unreachable); ``message`` is WIRE 4.3's text,
    sent as ``{"error": message}``. Kept free of HTTP machinery so the verifier can be used
    and tested without a request.
    """

    def __init__(self, message: str, status: int = 401) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
