"""LOG_LEVEL drops quieter events; LOG_FORMAT=json writes one JSON object per line."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.logger import LogLevel, PredicateResult
from twisted.python.failure import Failure

from queen_tw import logs
from queen_tw.logs import AtLeast, event_as_json

from support import ServerProcess

IGNORED_SETTING = {"POLL_WORKER_INTERVAL": "100"}
"""Makes every server start log one warn line (an upstream setting that is ignored)."""


def event(level: LogLevel | None, text: str = "hello {who}", **fields: Any) -> dict[str, Any]:
    """A log event as twisted.logger.Logger would emit it."""
    made: dict[str, Any] = {"log_format": text, "log_namespace": "queen_tw.test",
                            "log_time": 0.25, **fields}
    if level is not None:
        made["log_level"] = level
    return made


def test_at_least_warn_drops_info_and_keeps_warn_error_and_unlevelled_events() -> None:
    keep = AtLeast(LogLevel.warn)
    assert keep(event(LogLevel.info, who="x")) is PredicateResult.no
    assert keep(event(LogLevel.debug, who="x")) is PredicateResult.no
    assert keep(event(LogLevel.warn, who="x")) is PredicateResult.maybe
    assert keep(event(LogLevel.error, who="x")) is PredicateResult.maybe
    assert keep(event(None, who="x")) is PredicateResult.maybe


def test_json_line_has_time_level_namespace_message_and_fields() -> None:
    line = event_as_json(event(LogLevel.info, who="world", count=3, thing=object()))

    assert line.endswith("\n") and line.count("\n") == 1
    record = json.loads(line)
    assert record["time"] == "1970-01-01T00:00:00.250+00:00"
    assert (record["level"], record["namespace"], record["message"]) == (
        "info", "queen_tw.test", "hello world")
    assert record["fields"]["who"] == "world" and record["fields"]["count"] == 3
    assert record["fields"]["thing"].startswith("<object object")  # kept as its str


def test_json_line_survives_fields_json_cannot_hold() -> None:
    looped: list[Any] = []
    looped.append(looped)

    line = event_as_json(event(LogLevel.warn, who="x", ratio=float("nan"), by_pair={(1, 2): 3},
                               looped=looped))

    fields = json.loads(line)["fields"]
    assert fields == {"who": "x", "ratio": "nan", "by_pair": "{(1, 2): 3}", "looped": "[[...]]"}


def test_json_line_of_a_failure_carries_its_traceback() -> None:
    try:
        raise ValueError("broken on purpose")
    except ValueError:
        failure = Failure()

    record = json.loads(event_as_json(event(LogLevel.critical, "it broke", log_failure=failure)))

    assert record["level"] == "critical" and record["message"] == "it broke"
    assert "ValueError: broken on purpose" in record["traceback"]
    assert "fields" not in record


@pytest.fixture
def twistd_routing() -> Iterator[None]:
    """Lets a test route twistd's logging, and forgets the route afterwards."""
    yield
    logs._routed.clear()


def test_twistd_log_file_gets_json_lines_at_the_chosen_level(
        tmp_path: Path, twistd_routing: None) -> None:
    run_options: dict[str, Any] = {"logfile": str(tmp_path / "queen.log"), "nodaemon": False,
                                   "syslog": False, "logger": None}
    logs.route_twistd(run_options, "warn", "json")
    assert run_options["logger"] == "queen_tw.logs.twistd_observer"
    observer = logs.twistd_observer()

    observer(event(LogLevel.info, who="quiet"))
    observer(event(LogLevel.error, who="loud"))

    lines = (tmp_path / "queen.log").read_text().splitlines()
    assert [json.loads(line)["message"] for line in lines] == ["hello loud"]


def test_an_operators_own_logger_is_kept_behind_the_level_filter(twistd_routing: None) -> None:
    run_options: dict[str, Any] = {"logger": f"{__name__}.collecting_observer", "nodaemon": True}
    logs.route_twistd(run_options, "error", "text")
    observer = logs.twistd_observer()

    observer(event(LogLevel.warn, who="quiet"))
    observer(event(LogLevel.critical, who="loud"))

    assert [seen["who"] for seen in COLLECTED] == ["loud"]


COLLECTED: list[dict[str, Any]] = []


def collecting_observer() -> Callable[[dict[str, Any]], None]:
    """An operator's ``--logger`` factory (a legacy-style observer)."""
    COLLECTED.clear()
    return lambda legacy_event: COLLECTED.append(legacy_event)


def test_stdout_for_a_daemon_is_refused(twistd_routing: None) -> None:
    logs.route_twistd({"logfile": "-", "nodaemon": False, "logger": None}, "info", "text")
    with pytest.raises(SystemExit, match="^queen-tw: --logfile=- needs -n"):
        logs.twistd_observer()


def started_and_stopped(make_server: Callable[..., ServerProcess], **env: str) -> str:
    """The whole log of a server that started (answered /health) and then stopped."""
    server = make_server(**IGNORED_SETTING, **env)
    server.stop()
    return server.log_text()


def test_log_level_warn_drops_info_lines_and_keeps_warnings(
        make_server: Callable[..., ServerProcess]) -> None:
    text = started_and_stopped(make_server, LOG_LEVEL="warn")

    assert "POLL_WORKER_INTERVAL is an upstream setting queen-tw accepts and ignores" in text
    assert "starting up" not in text  # twistd's own info line


def test_log_level_info_keeps_info_lines(make_server: Callable[..., ServerProcess]) -> None:
    text = started_and_stopped(make_server, LOG_LEVEL="info")

    assert "POLL_WORKER_INTERVAL is an upstream setting queen-tw accepts and ignores" in text
    assert "starting up" in text


def test_log_format_json_writes_only_json_lines(make_server: Callable[..., ServerProcess]) -> None:
    text = started_and_stopped(make_server, LOG_FORMAT="json")

    records = [json.loads(line) for line in text.splitlines()]
    assert records and all({"time", "level", "namespace", "message"} <= set(r) for r in records)
    [warning] = [r for r in records if "POLL_WORKER_INTERVAL" in r["message"]]
    assert warning["level"] == "warn" and warning["namespace"].startswith("queen_tw.")
    assert warning["fields"]["warning"] == warning["message"]
    assert any(r["level"] == "info" and "starting up" in r["message"] for r in records)

