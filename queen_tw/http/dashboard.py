"""The dashboard's static files, served on the API's own port (issue 18 point 6, WIRE.md 4.2).

``GET /`` is the page (``index.html``); ``GET /dashboard/<name>`` are its scripts and style
sheet. Both are public: the page holds no data, and the API calls it makes carry the token the
user typed (see ``queen_tw/dashboard/app.js``).

Only the files found in the dashboard directory when the routes are built can be served: a
name is looked up in that table, never joined to a path, so ``..``, an absolute path or an
encoded separator can only miss (404). Each file is read once; it is answered with its content
type, ``nosniff``, an ``ETag`` and ``Cache-Control: no-cache`` (a browser revalidates and gets
304 until the package changes), and the page with a Content-Security-Policy that admits only
this origin's scripts, styles and API.
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

from queen_tw.auth.levels import routed_klein
from queen_tw.http.answers import answering_errors, not_found

DASHBOARD_DIR = Path(__file__).resolve().parent.parent / "dashboard"
"""Where the package keeps the dashboard's files (``queen_tw/dashboard/``)."""

ASSET_PREFIX = "/dashboard/"
"""The path the page loads its scripts and style sheet from."""

CONTENT_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".svg": b"image/svg+xml",
}
"""The kinds of file served, by suffix; any other file of the directory is not served."""

PAGE_POLICY = (b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
               b"connect-src 'self'; base-uri 'none'; form-action 'none'; "
               b"frame-ancestors 'none'")
"""The page's Content-Security-Policy: its own files and API only, no inline code."""


@dataclass(frozen=True)
class Asset:
    """One file of the dashboard, as it is answered."""

    body: bytes
    content_type: bytes
    etag: bytes


def load_assets(directory: Path = DASHBOARD_DIR) -> Dict[str, Asset]:
    """Every servable file directly in ``directory``, by file name (empty if it is missing)."""
    assets: Dict[str, Asset] = {}
    if not directory.is_dir():
        return assets
    for path in sorted(directory.iterdir()):
        content_type = CONTENT_TYPES.get(path.suffix)
        if content_type is None or not path.is_file() or path.name.startswith("."):
            continue
        body = path.read_bytes()
        etag = b'"%s"' % hashlib.sha256(body).hexdigest()[:32].encode()
        assets[path.name] = Asset(body, content_type, etag)
    return assets


class DashboardRoutes:
    """Serves ``index.html`` at ``/`` and the other files at ``/dashboard/<name>``.

    :param directory: where the files are; the package's dashboard directory unless a test
        says otherwise.
    """

    app = answering_errors(routed_klein())

    def __init__(self, directory: Path = DASHBOARD_DIR):
        self._assets = load_assets(directory)

    @app.route("/", methods=["GET"])
    def page(self, request):
        return self._answer(request, "index.html")

    @app.route("/dashboard/<name>", methods=["GET"])  # = ASSET_PREFIX, written out
    def asset(self, request, name):
        return self._answer(request, name)

    def _answer(self, request, name: str) -> bytes:
        asset: Optional[Asset] = self._assets.get(name)
        if asset is None:
            return not_found(request)
        request.setHeader(b"Content-Type", asset.content_type)
        request.setHeader(b"Cache-Control", b"no-cache")
        request.setHeader(b"ETag", asset.etag)
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        # On every file, not only at "/": the page is also reachable as
        # /dashboard/index.html, which must not be framed by another site either.
        request.setHeader(b"Content-Security-Policy", PAGE_POLICY)
        request.setHeader(b"X-Frame-Options", b"DENY")
        tags = _etags(request.getHeader(b"if-none-match"))
        if asset.etag in tags or b"*" in tags:
            request.setResponseCode(304)
            return b""
        request.setResponseCode(200)
        request.setHeader(b"Content-Length", b"%d" % len(asset.body))
        return asset.body


def _etags(header: Optional[bytes]) -> "list[bytes]":
    """The entity tags an ``If-None-Match`` header lists (weak ones compared as strong)."""
    if not header:
        return []
    return [tag.strip().removeprefix(b"W/") for tag in header.split(b",")]
