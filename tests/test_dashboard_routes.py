"""The dashboard's static files over plain HTTP (issue 18 point 6): ``/`` is the page, its
scripts and style sheet are under ``/dashboard/``, with their content types and caching
headers; nothing outside the dashboard directory can be reached; all of it is public when
JWT authentication is on, while the API it calls is not."""

from __future__ import annotations

import http.client
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from queen_tw.http.dashboard import DASHBOARD_DIR, load_assets

from tests.support import ServerProcess, running_server

JWT_ENV = {"JWT_ENABLED": "true", "JWT_SECRET": "dashboard-secret-long-enough-for-hs256",
           "JWT_SKIP_PATHS": "/health"}
"""Authentication on, and ``/`` not among the skip paths: the dashboard's own level says it
is public, not the deployment's skip list."""


def raw_get(server: ServerProcess, path: str) -> tuple[int, bytes]:
    """GET ``path`` sent byte for byte (httpx would resolve ``..`` before sending)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        connection.putrequest("GET", path, skip_accept_encoding=True)
        connection.endheaders()
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


def test_root_serves_the_page_as_html(http: httpx.Client) -> None:
    answer = http.get("/")

    assert answer.status_code == 200
    assert answer.headers["content-type"] == "text/html; charset=utf-8"
    assert answer.headers["cache-control"] == "no-cache"
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert "script-src 'self'" in answer.headers["content-security-policy"]
    assert answer.text.lstrip().lower().startswith("<!doctype html>")
    assert answer.content == (DASHBOARD_DIR / "index.html").read_bytes()


@pytest.mark.parametrize("name,content_type", [
    ("app.js", "text/javascript; charset=utf-8"),
    ("charts.js", "text/javascript; charset=utf-8"),
    ("style.css", "text/css; charset=utf-8"),
])
def test_assets_are_served_with_their_content_type(http: httpx.Client, name: str,
                                                   content_type: str) -> None:
    answer = http.get(f"/dashboard/{name}")

    assert answer.status_code == 200
    assert answer.headers["content-type"] == content_type
    assert answer.headers["cache-control"] == "no-cache"
    assert answer.content == (DASHBOARD_DIR / name).read_bytes()


def test_every_file_the_page_and_scripts_name_is_served(http: httpx.Client) -> None:
    page = http.get("/").text
    named = set(re.findall(r'(?:src|href)="(/dashboard/[^"]+)"', page))
    for script in DASHBOARD_DIR.glob("*.js"):
        named |= {f"/dashboard/{module}" for module in
                  re.findall(r'from\s+"\./([^"]+)"', script.read_text())}

    assert {"/dashboard/app.js", "/dashboard/style.css", "/dashboard/charts.js"} <= named
    for path in sorted(named):
        assert http.get(path).status_code == 200, path


def test_an_unchanged_file_is_revalidated_with_304(http: httpx.Client) -> None:
    first = http.get("/dashboard/app.js")

    again = http.get("/dashboard/app.js", headers={"If-None-Match": first.headers["etag"]})
    stale = http.get("/dashboard/app.js", headers={"If-None-Match": '"not-this-one"'})
    any_tag = http.get("/dashboard/app.js", headers={"If-None-Match": "*"})

    assert again.status_code == 304 and again.content == b""
    assert stale.status_code == 200 and stale.content == first.content
    assert any_tag.status_code == 304  # "*" matches any current file (RFC 9110 13.1.2)


@pytest.mark.parametrize("path", ["/", "/dashboard/index.html"])
def test_the_page_refuses_to_be_framed_wherever_it_is_served(http: httpx.Client,
                                                             path: str) -> None:
    answer = http.get(path)

    assert answer.status_code == 200
    assert answer.headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]


def test_head_of_the_page_has_no_body(http: httpx.Client) -> None:
    answer = http.head("/")

    assert answer.status_code == 200
    assert answer.headers["content-type"] == "text/html; charset=utf-8"
    assert answer.content == b""


def test_unknown_asset_is_a_json_404(http: httpx.Client) -> None:
    answer = http.get("/dashboard/no-such-file.js")

    assert answer.status_code == 404
    assert answer.json() == {"error": "Not found"}


@pytest.mark.parametrize("path", [
    "/dashboard/../setup.cfg",
    "/dashboard/%2e%2e/setup.cfg",
    "/dashboard/%2E%2E/%2E%2E/setup.cfg",
    "/dashboard/..",
    "/dashboard/%2e%2e",
    "/dashboard/..%2fsetup.cfg",
    "/dashboard/%2e%2e%2f%2e%2e%2fsetup.cfg",
    "/dashboard//etc/passwd",
    "/dashboard/%2fetc%2fpasswd",
    "/dashboard/%2Fwork%2Fmain%2Fsetup.cfg",
    "/dashboard/../../../../etc/passwd",
    "/dashboard/dashboard.py",
    "/dashboard/__init__.py",
    "/dashboard/.",
    "/dashboard/",
])
def test_paths_outside_the_dashboard_files_are_refused(server: ServerProcess,
                                                       path: str) -> None:
    status, body = raw_get(server, path)

    # 404, or 400 for an encoded "/" inside a name (the router's rule for every route)
    assert status in (400, 404), (path, status)
    assert b"[metadata]" not in body and b"root:" not in body and b"import" not in body


def test_only_page_scripts_and_styles_of_the_directory_itself_are_loaded(
        tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<!doctype html>")
    (tmp_path / "app.js").write_text("export {};")
    (tmp_path / "notes.txt").write_text("private")
    (tmp_path / "tool.py").write_text("print()")
    (tmp_path / ".hidden.js").write_text("x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "inner.js").write_text("y")

    assets = load_assets(tmp_path)

    assert sorted(assets) == ["app.js", "index.html"]
    assert assets["app.js"].content_type == b"text/javascript; charset=utf-8"
    assert load_assets(tmp_path / "missing") == {}


@pytest.fixture(scope="module")
def jwt_server(pg_env: dict[str, str]) -> Iterator[ServerProcess]:
    with running_server(pg_env, prefix="queen-tw-dashboard-jwt-", **JWT_ENV) as process:
        yield process


def test_dashboard_is_public_when_authentication_is_on(jwt_server: ServerProcess) -> None:
    with httpx.Client(base_url=jwt_server.url, timeout=30) as client:
        page = client.get("/")
        script = client.get("/dashboard/app.js")
        api = client.get("/api/v1/resources/queues")

    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert script.status_code == 200
    assert api.status_code == 401 and api.json() == {"error": "Authentication required"}


def test_traversal_is_refused_before_authentication_matters(jwt_server: ServerProcess) -> None:
    status, body = raw_get(jwt_server, "/dashboard/../setup.cfg")

    # not a dashboard path: it needs a token like any unknown route, and holds no file
    assert status == 401
    assert b"[metadata]" not in body
