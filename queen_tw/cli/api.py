"""The admin CLI's HTTP client: one blocking JSON call at a time, stdlib only.

Every failure becomes a :class:`CliError` carrying the exit status the CLI promises:
1 for an answer the server refused (its ``error`` text is kept), 3 when no answer came at
all (refused connection, unknown host, timeout). A bearer token is sent when given, for
servers started with ``JWT_ENABLED``.
"""

import http.client
import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Mapping, Optional

EXIT_ERROR = 1
"""The server answered with an error, or the data is wrong."""
EXIT_USAGE = 2
"""The command line (or a file it names) cannot be used."""
EXIT_UNREACHABLE = 3
"""No answer: the server is down, unknown or too slow."""


class CliError(Exception):
    """A failure the CLI reports in one line on stderr, ending with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR):
        super().__init__(message)
        self.exit_code = exit_code


class HttpError(CliError):
    """The server answered ``status`` with a refusal (``reason``: its ``error`` text)."""

    def __init__(self, method: str, path: str, status: int, reason: str):
        super().__init__(f"{method} {path}: HTTP {status}: {reason}")
        self.status = status
        self.reason = reason


class Api:
    """Calls the queen-tw HTTP API at ``base_url``.

    :param base_url: e.g. ``http://localhost:6632`` (a trailing ``/`` is ignored).
    :param token: a JWT sent as ``Authorization: Bearer``; None sends none.
    :param timeout: seconds to wait for each answer.
    """

    def __init__(self, base_url: str, token: Optional[str] = None, timeout: float = 30.0):
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._timeout = timeout

    def get(self, path: str, query: Optional[Mapping[str, Any]] = None,
            accept: tuple = (200,)) -> Any:
        """GET ``path`` (with ``query``); the decoded JSON body of an accepted status."""
        return self.call("GET", path, query=query, accept=accept)[1]

    def post(self, path: str, body: Any = None) -> Any:
        """POST ``body`` as JSON; the decoded answer."""
        return self.call("POST", path, body=body)[1]

    def delete(self, path: str, query: Optional[Mapping[str, Any]] = None) -> Any:
        """DELETE ``path``; the decoded answer."""
        return self.call("DELETE", path, query=query)[1]

    def call(self, method: str, path: str, query: Optional[Mapping[str, Any]] = None,
             body: Any = None, accept: tuple = (200, 201)) -> "tuple[int, Any]":
        """One request; ``(status, decoded body)`` when the status is in ``accept``.

        Raises :class:`HttpError` for any other status and :class:`CliError` (exit 3) when
        the server cannot be reached.
        """
        url = self.base_url + path
        if query:
            url += "?" + urllib.parse.urlencode(
                {key: _query_value(value) for key, value in query.items() if value is not None})
        try:
            request = urllib.request.Request(url, method=method, headers=self._headers(body))
            if body is not None:
                request.data = json.dumps(body).encode()
            with urllib.request.urlopen(request, timeout=self._timeout) as answer:
                return answer.status, self._json(method, path, _decoded(answer.read()))
        except urllib.error.HTTPError as err:
            decoded = _decoded(err.read())
            if err.code in accept:
                return err.code, decoded
            raise HttpError(method, path, err.code, _reason(decoded, err.reason)) from None
        except (TimeoutError, urllib.error.URLError, OSError) as err:
            raise CliError(f"cannot reach {self.base_url}: {_why(err)}",
                           EXIT_UNREACHABLE) from None
        except (ValueError, http.client.InvalidURL) as err:  # unknown scheme, bad port …
            raise CliError(f"--url {self.base_url!r} is not a usable http(s) URL: {err}",
                           EXIT_USAGE) from None
        except http.client.HTTPException as err:  # something answered, not in HTTP
            raise CliError(f"cannot reach {self.base_url}: not an HTTP answer "
                           f"({type(err).__name__})", EXIT_UNREACHABLE) from None

    def _json(self, method: str, path: str, body: Any) -> Any:
        """An accepted answer's body, refused when it is not JSON: every route the CLI calls
        answers JSON, so another server (a proxy's page, a wrong port) answered instead."""
        if isinstance(body, str):
            raise CliError(f"{method} {path}: the answer is not JSON; is {self.base_url} a "
                           "queen-tw server?")
        return body

    def _headers(self, body: Any) -> "dict[str, str]":
        if self._token and any(c in self._token for c in "\r\n\x00"):
            raise CliError("--token holds a line break or NUL: not a usable token", EXIT_USAGE)
        headers = {"Accept": "application/json", "User-Agent": "queen-tw-cli"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        return headers


def path_of(*segments: str) -> str:
    """``/api/v1/...`` with each name segment percent-encoded (names may hold spaces, ``#``…)."""
    return "/" + "/".join(urllib.parse.quote(segment, safe="") for segment in segments)


def _query_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _decoded(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")


def _reason(body: Any, fallback: str) -> str:
    if isinstance(body, dict) and body.get("error"):
        return str(body["error"])
    if isinstance(body, str) and body.strip():
        return body.strip().splitlines()[0]
    return str(fallback)


def _why(err: BaseException) -> str:
    reason = getattr(err, "reason", None)
    if isinstance(reason, BaseException):
        err = reason
    return getattr(err, "strerror", None) or str(err) or type(err).__name__
