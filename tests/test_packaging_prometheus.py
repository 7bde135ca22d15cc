"""packaging/prometheus and packaging/grafana: valid for promtool, tested alerts, and written
only over metric families the server serves.

promtool (Debian's ``prometheus`` package, installed by .ci/run) checks the scrape config
(which also checks the rule file it names; neither needs the network), the rules, and runs
the rules' unit tests. promtool has no command that checks a bare expression, so every
Grafana panel's query is checked as a recording rule of a temporary rule file.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from support import REPO_ROOT, ServerProcess

PROMETHEUS = REPO_ROOT / "packaging" / "prometheus"
SCRAPE_CONFIG = PROMETHEUS / "prometheus.yml"
ALERTS = PROMETHEUS / "queen-alerts.yml"
ALERT_TESTS = PROMETHEUS / "queen-alerts.test.yml"
DASHBOARD = REPO_ROOT / "packaging" / "grafana" / "queen-tw.json"

GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$instance": ".*",
                     "$queue": ".*"}
"""What each Grafana variable of the dashboard's queries stands for when promtool checks
them."""

METRIC_NAME = re.compile(r"\bqueen_[a-z0-9_]+\b")
SEVERITIES = {"critical", "warning"}


def promtool(*args: str, cwd: Path = PROMETHEUS) -> subprocess.CompletedProcess[str]:
    """``promtool args…``; skips the test where promtool is not installed."""
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool is not installed (Debian package prometheus; .ci/run installs it)")
    return subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, check=False)


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"{result.args}:\n{result.stdout}\n{result.stderr}"


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(document: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    for panel in document["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query of every panel."""
    return [(panel["title"], target["expr"]) for panel in panels(dashboard())
            for target in panel.get("targets", [])]


# --- promtool ----------------------------------------------------------------------------


def test_the_scrape_config_and_the_rule_file_it_names_are_valid() -> None:
    result = promtool("check", "config", SCRAPE_CONFIG.name)

    assert_ok(result)
    assert "1 rule files found" in result.stdout  # the alert rules were checked with it


def test_the_alert_rules_are_valid() -> None:
    assert_ok(promtool("check", "rules", ALERTS.name))


def test_the_alert_rules_unit_tests_pass() -> None:
    assert_ok(promtool("test", "rules", ALERT_TESTS.name))


def test_the_scrape_config_scrapes_the_prometheus_path() -> None:
    [job] = yaml.safe_load(SCRAPE_CONFIG.read_text())["scrape_configs"]

    assert job["metrics_path"] == "/metrics/prometheus"
    assert all(target.endswith(":6632") for group in job["static_configs"]
               for target in group["targets"])


# --- what the alerts say and how they are tested -------------------------------------------


def test_every_alert_waits_and_carries_a_severity_a_summary_and_a_description() -> None:
    rules = alert_rules()

    assert {rule["alert"] for rule in rules} >= {
        "QueenInstanceDown", "QueenPostgresDisconnected", "QueenFileBufferGrowing",
        "QueenFileBufferFailed", "QueenDeadLetterGrowth", "QueenPopLagHigh",
        "QueenDatabaseErrors", "QueenAckFailureRatioHigh"}
    for rule in rules:
        assert "for" in rule, rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_every_alert_has_a_case_that_fires_it_and_one_that_does_not() -> None:
    cases = [case for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
             for case in test["alert_rule_test"]]

    for rule in alert_rules():
        mine = [case for case in cases if case["alertname"] == rule["alert"]]
        assert any(case["exp_alerts"] for case in mine), f"{rule['alert']} never fires"
        assert any(not case["exp_alerts"] for case in mine), f"{rule['alert']} always fires"


# --- the Grafana dashboard ---------------------------------------------------------------


def test_the_dashboard_picks_its_data_source_and_instances() -> None:
    document = dashboard()
    variables = {variable["name"]: variable for variable in document["templating"]["list"]}

    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert variables["instance"]["multi"] and variables["instance"]["includeAll"]
    for panel in panels(document):
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            assert panel["targets"], panel["title"]


def test_the_dashboard_shows_the_figures_operators_look_at() -> None:
    queries = " ".join(expr for _, expr in dashboard_queries())

    for wanted in ("rate(queen_cluster_push_messages_total", "queen_queue_pop_lag_milliseconds",
                   "queen_dlq_depth", "queen_file_buffer_pending", "queen_db_pool_active",
                   "queen_worker_event_loop_lag_milliseconds",
                   "histogram_quantile(0.99, sum by (le, op) "
                   "(rate(queen_request_duration_seconds_bucket",
                   "queen_queue_push_messages_per_minute"):
        assert wanted in queries, wanted


def as_promql(expr: str) -> str:
    """``expr`` with each Grafana variable replaced by a value of the right kind."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"a Grafana variable the check does not know: {expr}"
    return expr


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    queries = dashboard_queries()
    rules = [{"record": f"dashboard:query_{n}", "expr": as_promql(expr)}
             for n, (_, expr) in enumerate(queries)]
    (tmp_path / "dashboard-queries.yml").write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))

    result = promtool("check", "rules", "dashboard-queries.yml", cwd=tmp_path)

    assert_ok(result)
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout


def test_a_broken_query_is_refused_by_the_same_check(tmp_path: Path) -> None:
    rule = {"record": "dashboard:broken", "expr": as_promql(
        "histogram_quantile(0.5, sum by (le) (rate(queen_request_duration_seconds_bucket"
        "[$__rate_interval]))")}
    (tmp_path / "broken.yml").write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": [rule]}]}))

    assert promtool("check", "rules", "broken.yml", cwd=tmp_path).returncode != 0


# --- metric names ------------------------------------------------------------------------


def names_used() -> dict[str, set[str]]:
    """Every ``queen_*`` series name the alert rules and the dashboard query, by file."""
    alerts = {name for rule in alert_rules() for name in METRIC_NAME.findall(rule["expr"])}
    grafana = {name for _, expr in dashboard_queries() for name in METRIC_NAME.findall(expr)}
    grafana |= {name for variable in dashboard()["templating"]["list"]
                for name in METRIC_NAME.findall(variable.get("definition", ""))}
    return {ALERTS.name: alerts, DASHBOARD.name: grafana}


def series_names(exposition: str) -> set[str]:
    """The series names a Prometheus text exposition can hold, from its ``# TYPE`` lines
    (a family without samples yet, such as a per-queue gauge before any queue, still has
    one): a histogram's ``_bucket``, ``_sum`` and ``_count``, a counter's ``_total``."""
    suffixes = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count"),
                "counter": ("_total",)}
    names: set[str] = set()
    for line in exposition.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[:2] == ["#", "TYPE"]:
            family, kind = parts[2], parts[3]
            names.add(family)
            names.update(family.removesuffix("_total") + suffix
                         for suffix in suffixes.get(kind, ()))
    return names


@pytest.fixture
def served_series(make_server: Callable[..., ServerProcess]) -> set[str]:
    """The series names a real server's ``GET /metrics/prometheus`` declares."""
    server = make_server()
    answer = httpx.get(f"{server.url}/metrics/prometheus", timeout=30)
    assert answer.status_code == 200, answer.text[:300]
    return series_names(answer.text)


def test_every_metric_the_rules_and_dashboard_use_is_served(served_series: set[str]) -> None:
    used = names_used()
    assert len(used[ALERTS.name]) >= 6 and len(used[DASHBOARD.name]) >= 30  # the regex works
    assert "queen_request_duration_seconds_bucket" in served_series  # so does series_names

    missing = {file: sorted(names - served_series) for file, names in used.items()
               if names - served_series}

    assert not missing, f"names the server does not serve: {missing}"
