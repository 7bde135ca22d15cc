"""The HTTP site: CORS on every answer, OPTIONS pre-flight, and the request body limit.

These are properties of every request, so they live in the request class instead of in each
route: a route never sees an oversized body or a pre-flight.
"""

import io
import json
from typing import Optional

from twisted.web.resource import IResource
from twisted.web.server import Request, Site

CORS_HEADERS = {
    b"Access-Control-Allow-Origin": b"*",
    b"Access-Control-Allow-Methods": b"GET, POST, PUT, DELETE, OPTIONS",
    b"Access-Control-Allow-Headers": b"Content-Type, Authorization",
}


class _Discard(io.BytesIO):
    """Swallows the body of a request that is already refused for its size."""

    def write(self, data) -> int:
        return len(data)


class QueenRequest(Request):
    """A request that adds CORS headers, answers OPTIONS and refuses oversized bodies."""

    max_body_bytes = 64 * 1024 * 1024

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._received = 0
        self._too_large = False

    def gotLength(self, length: Optional[int]) -> None:
        if length is not None and length > self.max_body_bytes:
            self._too_large = True
            self.content = _Discard()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._too_large:
            return
        self._received += len(data)
        if self._received > self.max_body_bytes:  # chunked bodies announce no length
            self._too_large = True
            if self.content is not None:
                self.content.close()
            self.content = _Discard()
            return
        super().handleContentChunk(data)

    def process(self) -> None:
        for name, value in CORS_HEADERS.items():
            self.setHeader(name, value)
        if self.method == b"OPTIONS":
            self.setHeader(b"Access-Control-Max-Age", b"86400")
            self.setResponseCode(204)
            self.finish()
            return
        if self._too_large:
            self._refuse(413, f"Request body larger than {self.max_body_bytes} bytes")
            return
        super().process()

    def _refuse(self, code: int, error: str) -> None:
        self.setResponseCode(code)
        self.setHeader(b"Content-Type", b"application/json")
        self.write(json.dumps({"error": error}).encode())
        self.finish()


class _QuietSite(Site):
    """A Site without an access log: per-request lines would dominate the logs."""

    def log(self, request) -> None:
        pass


def make_site(resource: IResource, max_body_bytes: int) -> Site:
    """A Site serving ``resource`` with :class:`QueenRequest` and no access log."""
    limit = max_body_bytes

    class BoundQueenRequest(QueenRequest):
        max_body_bytes = limit

    # parsePOSTFormSubmission: Twisted would parse every POST's Content-Type with the email
    # package looking for HTML forms, ~17 % of a small push's CPU (py-spy). We take JSON only.
    site = _QuietSite(resource, parsePOSTFormSubmission=False)
    site.requestFactory = BoundQueenRequest
    return site
