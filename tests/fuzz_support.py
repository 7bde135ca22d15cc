"""Schemathesis against a live queen-tw, driven by the OpenAPI document the server serves.

Shared by tests/test_fuzz.py (a bounded run in CI) and bench/fuzz.py (a long one). Every
operation of the document gets hypothesis-generated requests, valid ones and ones that break
the schema, sent over a real socket; each answer is checked for a 5xx, a status the document
does not list for that operation, a wrong content type and a body that does not match the
documented schema. A request that gets no answer within the timeout counts as a hang.

Import as ``from fuzz_support import fuzz``.
"""

from __future__ import annotations

import collections
import dataclasses
import uuid
from collections.abc import Mapping

import hypothesis
import requests
import schemathesis
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from queen_tw.http.openapi import OPENAPI_PATH

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]

LONG_POLL_CAP_MS = 100
"""A pop with ``wait=true`` legitimately stays open for its ``timeout`` (30 s by default, up to
2^31 ms): that is a long poll, not a hang. Generated pops that ask to wait get this ceiling so
the run measures the server, not the patience asked for; every other value is sent as drawn."""


@dataclasses.dataclass
class FuzzReport:
    """What a run sent and what it found."""

    requests: int = 0
    by_status: collections.Counter[int] = dataclasses.field(default_factory=collections.Counter)
    server_errors: int = 0
    refused_valid: int = 0
    """401/403 answers to schema-valid requests (which carry the caller's headers); requests
    in negative mode may have their ``Authorization`` header dropped or mangled on purpose."""
    hangs: list[str] = dataclasses.field(default_factory=list)
    violations: list[str] = dataclasses.field(default_factory=list)

    def distinct_violations(self) -> list[str]:
        """One line per operation and kind of violation (its first occurrence)."""
        seen: dict[str, str] = {}
        for violation in self.violations:
            seen.setdefault(violation.split(" (", 2)[0] + violation.split(": ", 1)[1][:40],
                            violation)
        return list(seen.values())

    def summary(self) -> str:
        statuses = ", ".join(f"{code}: {n}" for code, n in sorted(self.by_status.items()))
        return (f"{self.requests} requests ({statuses}); {self.server_errors} answers >= 500, "
                f"{len(self.hangs)} hangs, {len(self.violations)} schema violations, "
                f"{self.refused_valid} valid requests refused 401/403")


def _cap_long_poll(case: schemathesis.Case) -> None:
    body = case.body
    if isinstance(body, dict) and isinstance(body.get("maxWaitMs"), int) \
            and not isinstance(body["maxWaitMs"], bool) and body["maxWaitMs"] > 0:
        body["maxWaitMs"] = LONG_POLL_CAP_MS  # a fetch's long poll (WIRE2 6.2)
    query = case.query
    if not isinstance(query, dict) or "wait" not in query:
        return
    if str(query["wait"]).lower() in ("true", "1"):
        query["timeout"] = LONG_POLL_CAP_MS


def fuzz(base_url: str, examples_per_operation: int, headers: Mapping[str, str] | None = None,
         request_timeout: float = 20.0, seed: int | None = None) -> FuzzReport:
    """Fuzzes every operation of the document served at ``base_url``.

    :param examples_per_operation: hypothesis examples per operation and generation mode
        (valid, then schema-breaking); operations with few possible inputs use fewer.
    :param headers: sent with every request (e.g. an ``Authorization`` bearer token).
    :param request_timeout: seconds without an answer after which a request is a hang.
    :param seed: hypothesis seed, for a reproducible run.
    """
    schema = schemathesis.openapi.from_url(base_url + OPENAPI_PATH)
    report = FuzzReport()
    session = requests.Session()
    sent_headers = dict(headers or {})
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _fuzz_operation(operation, mode, None, base_url, examples_per_operation,
                            sent_headers, request_timeout, seed, session, report)
        if _path_names(operation):
            # random names and ids only ever reach "not found": once more on real data
            known = _seed(base_url, sent_headers, session)
            _fuzz_operation(operation, GenerationMode.POSITIVE,
                            {name: known[name] for name in _path_names(operation)},
                            base_url, examples_per_operation, sent_headers, request_timeout,
                            seed, session, report)
    return report


SEED_QUEUE = "fuzz-seeded"


def _path_names(operation) -> list[str]:
    return [parameter.name for parameter in operation.path_parameters]


def _seed(base_url: str, headers: dict[str, str], session: requests.Session) -> dict[str, str]:
    """A queue with messages, a named group holding a lease on some: real values for every
    path parameter of the document (queue, partition, group, partitionId, transactionId,
    leaseId, name)."""
    def post(path: str, body: object) -> requests.Response:
        answer = session.post(base_url + path, json=body, headers=headers, timeout=30)
        answer.raise_for_status()
        return answer

    # the fuzzer may have left maintenance on: pushes would go to the file buffer, pops 204
    post("/api/v1/system/maintenance", {"enabled": False})
    post("/api/v1/system/maintenance/pop", {"enabled": False})
    post("/api/v1/configure", {"queue": SEED_QUEUE, "options": {"retryLimit": 1}})
    pushed = post("/api/v1/push", {"items": [
        {"queue": SEED_QUEUE, "partition": "p0", "payload": {"n": n}} for n in range(10)]})
    stored = [item for item in pushed.json() if item["status"] == "queued"]
    popped = session.get(
        f"{base_url}/api/v1/pop/queue/{SEED_QUEUE}/partition/p0",
        params={"batch": 3, "consumerGroup": "fuzz-group"}, headers=headers, timeout=30)
    popped.raise_for_status()
    lease = popped.json()["leaseId"] if popped.status_code == 200 else ""
    return {"queue": SEED_QUEUE, "partition": "p0", "group": "fuzz-group",
            "partitionId": stored[0]["partition_id"] if stored else str(uuid.uuid4()),
            "transactionId": stored[0]["transaction_id"] if stored else "none",
            "leaseId": lease or str(uuid.uuid4()),
            "name": "app.js",  # a dashboard file; also a harmless trace name
            "timerKey": "fuzz-timer",
            "ns": "fuzz-ns", "key": "fuzz-key"}  # a KV namespace and key


def _fuzz_operation(operation, mode: GenerationMode, path_parameters: dict[str, str] | None,
                    base_url: str, examples: int, headers: dict[str, str],
                    request_timeout: float, seed: int | None, session: requests.Session,
                    report: FuzzReport) -> None:
    label = f"{operation.method.upper()} {operation.path} ({mode.value}"
    label += ", seeded)" if path_parameters else ")"

    @hypothesis.settings(
        max_examples=examples, deadline=None, database=None, print_blob=False,
        phases=[hypothesis.Phase.generate], report_multiple_bugs=True,
        suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode,
                                                 path_parameters=path_parameters))
    def run(case: schemathesis.Case) -> None:
        _cap_long_poll(case)
        try:
            response = case.call(base_url=base_url, session=session, headers=headers,
                                 timeout=request_timeout)
        except requests.Timeout:
            report.hangs.append(f"{label}: {case.as_curl_command(base_url=base_url)}")
            return
        report.requests += 1
        report.by_status[response.status_code] += 1
        if response.status_code >= 500:
            report.server_errors += 1
        if response.status_code in (401, 403) and mode is GenerationMode.POSITIVE:
            report.refused_valid += 1
        try:
            case.validate_response(response, checks=CHECKS, headers=headers)
        except FailureGroup as failures:
            for failure in failures.exceptions:
                report.violations.append(
                    f"{label}: {failure.title} ({response.status_code} "
                    f"{response.text[:200]!r}; {failure.message[:300]!r}) "
                    f"{case.as_curl_command(base_url=base_url)}")

    if seed is not None:
        run = hypothesis.seed(seed)(run)
    try:
        run()
    except hypothesis.errors.Unsatisfiable:
        pass  # an operation whose negative space is empty (nothing to break) sends nothing
