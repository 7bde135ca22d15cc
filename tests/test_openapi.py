"""The OpenAPI document: it agrees with the router both ways, it is valid OpenAPI 3.1, and
the live server serves it publicly at /api/v1/openapi.json."""

from __future__ import annotations

import re
from typing import Any, cast

import httpx
import jsonschema_rs
import pytest
import schemathesis

from queen_tw.auth.levels import ROUTE_LEVELS, Level
from queen_tw.http.messaging import PopDefaults
from queen_tw.http.openapi import OPENAPI_PATH, openapi_document
from queen_tw.http.routes import route_sets

from support import ServerProcess

_WERKZEUG_VARIABLE = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")
_OPENAPI_VARIABLE = re.compile(r"\{[^{}]+\}")
_METHODS = ("get", "post", "put", "delete", "patch")


def _shape(path: str) -> str:
    """The path with every variable as ``{}``: the router and the document name them apart
    (``<lease_id>`` and ``{leaseId}``), their positions must agree."""
    return _OPENAPI_VARIABLE.sub("{}", _WERKZEUG_VARIABLE.sub("{}", path))


def _routed() -> set[tuple[str, str]]:
    """Every (path shape, method) the site's Klein apps route (HEAD and OPTIONS are
    answered for any path by werkzeug and the site, not by a route)."""
    sets = route_sets(cast(Any, None), "openapi-test", PopDefaults(1, 1000, "all"))
    routed = set()
    for route_set in sets:
        for rule in route_set.app.url_map.iter_rules():
            for method in rule.methods or ():
                if method not in ("HEAD", "OPTIONS"):
                    routed.add((_shape(rule.rule), method.lower()))
    return routed


def _documented() -> set[tuple[str, str]]:
    return {(_shape(path), method)
            for path, item in openapi_document()["paths"].items()
            for method in item if method in _METHODS}


def test_every_routed_path_and_method_is_documented():
    missing = _routed() - _documented()
    assert not missing, f"routed but not in the OpenAPI document: {sorted(missing)}"


def test_every_documented_path_and_method_is_routed():
    extra = _documented() - _routed()
    assert not extra, f"documented but not routed: {sorted(extra)}"


def test_the_router_is_not_empty():
    # guards the two tests above against a router read that finds nothing on both sides
    assert ("/api/v1/pop/queue/{}/partition/{}", "get") in _routed()
    assert len(_routed()) >= 40


def test_document_is_valid_openapi_3_1():
    document = openapi_document()
    assert document["openapi"].startswith("3.1")
    schema = schemathesis.openapi.from_dict(document)
    schema.validate()  # the OpenAPI 3.1 meta-schema; raises on any violation
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == len(_documented())


def test_invalid_document_is_refused_by_the_validator():
    # the validation above can fail: a path item with a wrongly typed operation is refused
    broken = {**openapi_document(), "paths": {"/x": {"get": {"responses": "none"}}}}
    with pytest.raises(jsonschema_rs.ValidationError):
        schemathesis.openapi.from_dict(broken).validate()


def test_path_variables_are_declared_as_path_parameters():
    for path, item in openapi_document()["paths"].items():
        named = set(re.findall(r"\{([^{}]+)\}", path))
        for method, operation in item.items():
            declared = {p["name"] for p in operation.get("parameters", ()) if p["in"] == "path"}
            assert declared == named, f"{method.upper()} {path}"


def test_every_operation_has_a_level_and_errors_as_json():
    levels = {level.name for level in Level}
    for path, item in openapi_document()["paths"].items():
        for method, operation in item.items():
            assert operation["x-queen-level"] in levels, f"{method.upper()} {path}"
            if operation["x-queen-level"] == "PUBLIC":
                assert operation["security"] == []
            else:
                assert {"401", "403"} <= set(operation["responses"]), f"{method} {path}"
    error = openapi_document()["components"]["responses"]["E400"]
    assert error["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Error"}


def test_levels_are_the_auth_gates_levels():
    # x-queen-level is read from the table the gate enforces, for every route it names
    documented = {(_shape(path), method): operation["x-queen-level"]
                  for path, item in openapi_document()["paths"].items()
                  for method, operation in item.items()}
    compared = 0
    for method, rule, level in ROUTE_LEVELS:
        key = (_shape(rule), method.lower())
        if key in documented:
            assert documented[key] == level.name, key
            compared += 1
    assert compared == len(documented)
    paths = openapi_document()["paths"]
    assert paths["/health"]["get"]["x-queen-level"] == "PUBLIC"
    assert paths[OPENAPI_PATH]["get"]["x-queen-level"] == "PUBLIC"
    assert paths["/api/v1/resources/queues/{queue}"]["delete"]["x-queen-level"] == "ADMIN"


def test_pop_parameters_carry_the_bounds_the_server_enforces():
    params = {p["name"]: p["schema"]
              for p in openapi_document()["paths"]["/api/v1/pop/queue/{queue}"]["get"]
              ["parameters"]}
    assert params["batch"]["minimum"] == 1
    assert params["partitions"]["minimum"] == 1
    assert "enum" not in params["subscriptionMode"]  # any other value is all (2.3.1)
    assert params["queue"]["maxLength"] == 255
    popped = openapi_document()["paths"]["/api/v1/pop/queue/{queue}"]["get"]["responses"]
    assert "204" in popped and "content" not in popped["204"]


def test_live_server_serves_the_document_without_a_token(server: ServerProcess):
    answer = httpx.get(server.url + OPENAPI_PATH, timeout=10)
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/json"
    assert answer.json() == openapi_document()
