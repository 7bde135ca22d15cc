"""The server's log output: ``LOG_LEVEL`` drops quieter events, ``LOG_FORMAT`` picks text or JSON.

twistd builds its log observer itself, after the options are parsed and after the service
tree exists, from ``--logfile``, ``--syslog`` and ``-n``.  Its one seam for choosing the
observer is the ``--logger`` option (the dotted name of an observer factory).  So
``twistd queen`` points ``--logger`` at :func:`twistd_observer` (see :func:`route_twistd`),
which builds what twistd would have built, in the format asked for, behind a level filter.
A ``--logger`` given by the operator is kept and filtered the same way.

Every event passes through the filter, Twisted's own included: at ``warn`` the
``starting up`` lines go too.  ``trace`` is ``debug`` (twisted.logger has nothing below it).

A JSON line names the process that wrote it (``worker``: ``WORKER_ID``, which each of
``NUM_WORKERS`` workers gets as ``<WORKER_ID>-<n>``) and, for an event about a request (one
with a ``request_id`` field: the access line, errors of the answer paths), that request's
``X-Request-Id`` as ``requestId``.
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LegacyLogObserverWrapper,
    LogEvent,
    LogLevel,
    PredicateResult,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
    timeFormatRFC3339,
)
from twisted.python import logfile
from twisted.python.reflect import namedAny
from zope.interface import implementer

from queen_tw.startup import refuse_to_start

LEVELS: Mapping[str, LogLevel] = {
    "trace": LogLevel.debug,
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
}
"""``LOG_LEVEL`` words and the least severe twisted.logger level each one lets through."""

TWISTD_LOGGER = f"{__name__}.twistd_observer"
"""What :func:`route_twistd` sets twistd's ``--logger`` to."""


@implementer(ILogFilterPredicate)
class AtLeast:
    """Lets through events of ``minimum`` severity or more.

    Unlike twisted's ``LogLevelFilterPredicate`` it keeps events that carry no level or
    namespace (legacy ``log.msg`` calls and the like): dropping what cannot be judged
    would hide errors.
    """

    def __init__(self, minimum: LogLevel) -> None:
        self.minimum = minimum

    def __call__(self, event: LogEvent) -> PredicateResult:
        level = event.get("log_level")
        if level is not None and level < self.minimum:
            return PredicateResult.no
        return PredicateResult.maybe


def lets_through(level: str, event_level: LogLevel) -> bool:
    """Whether ``LOG_LEVEL=level`` writes events of ``event_level`` (so a caller can skip
    building events nobody will see)."""
    return event_level >= LEVELS[level]


def filtered(observer: ILogObserver, level: str) -> ILogObserver:
    """``observer`` behind the ``LOG_LEVEL`` filter."""
    return FilteringLogObserver(observer, [AtLeast(LEVELS[level])])


def event_as_json(event: LogEvent, worker: str | None = None) -> str:
    """One log event as one line of JSON (newline included).

    ``time`` (UTC, ISO 8601), ``level``, ``namespace`` and ``message`` (the rendered text)
    come first, then ``worker`` (when given) and ``requestId`` (the event's ``request_id``
    field, when it has one); the event's other structured fields follow under ``fields``,
    so a field can never overwrite them; a failure adds ``traceback``.  Values JSON cannot
    hold (objects, NaN, dicts with non-text keys, cycles) are written as their ``str``: a
    log line is never lost to its fields.
    """
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(event.get("log_time", 0.0), UTC)
                        .isoformat(timespec="milliseconds"),
        "level": level.name if level is not None else None,
        "namespace": event.get("log_namespace"),
        "message": event_message(event),
    }
    if worker is not None:
        record["worker"] = worker
    request_id = event.get("request_id")
    if request_id is not None:
        record["requestId"] = request_id
    fields = {key: value for key, value in event.items()
              if not key.startswith("log_") and key not in _LEGACY_KEYS
              and key != "request_id"}
    if fields:
        record["fields"] = fields
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    try:
        return _dumps(record)
    except (TypeError, ValueError):
        record["fields"] = {key: str(value) for key, value in fields.items()}
        return _dumps(record)


def event_message(event: LogEvent) -> str:
    """The event's text, as :func:`twisted.logger.formatEvent` renders it, but at the speed
    of ``str.format_map`` when the format is a plain one (Twisted's own formatter costs some
    10 us per field, which an access line per request would pay).  Formats with call syntax
    (``{f()}``), flattened events and formats that fail go to ``formatEvent``.
    """
    text = event.get("log_format")
    if type(text) is str and "()" not in text and "log_flattened" not in event:
        try:
            return text.format_map(event)
        except Exception:
            pass
    return formatEvent(event)


_ENCODER = json.JSONEncoder(default=str, ensure_ascii=False, allow_nan=False)
"""One encoder for every line: ``json.dumps`` with these options would build one per call."""


def _dumps(record: dict[str, Any]) -> str:
    return _ENCODER.encode(record) + "\n"


_LEGACY_KEYS = frozenset({"message", "format", "isError", "system", "time", "why", "failure"})
"""Keys a legacy ``twisted.python.log`` event carries besides its ``log_*`` ones."""


def file_observer(out: IO[str], log_format: str, worker: str | None = None) -> ILogObserver:
    """Writes events to ``out`` as classic twistd text lines or as JSON lines (those
    naming ``worker``)."""
    if log_format == "json":
        return FileLogObserver(out, lambda event: event_as_json(event, worker))
    return FileLogObserver(out, ClassicText())


class ClassicText:
    """twistd's text line (``<time> [<namespace>#<level>] <message>``, as
    ``textFileLogObserver`` writes it), with the message rendered by :func:`event_message`
    and the time stamp made once per second."""

    def __init__(self) -> None:
        self._second: int | None = None
        self._stamp = "-"

    def __call__(self, event: LogEvent) -> str | None:
        if event.get("log_format") is not None:
            text = event_message(event).replace("{", "{{").replace("}", "}}")
            event = {key: value for key, value in event.items() if key != "log_flattened"}
            event["log_format"] = text
        return formatEventAsClassicLogText(event, self._time)

    def _time(self, when: float | None) -> str:
        if when is None:
            return "-"
        second = int(when)
        if second != self._second:
            self._second, self._stamp = second, formatTime(second, timeFormatRFC3339)
        return self._stamp


# --- twistd ------------------------------------------------------------------------------

_routed: dict[str, Any] = {}
"""What :func:`twistd_observer` builds from, set once per process by :func:`route_twistd`."""


def route_twistd(run_options: Any, level: str, log_format: str,
                 worker: str | None = None) -> None:
    """Makes twistd log through :func:`twistd_observer` with ``level`` and ``log_format``.

    Called while ``twistd queen`` parses its options (twistd resolves ``--logger`` right
    after).  ``run_options`` are twistd's own options (``--logfile``, ``-n``, ``--syslog``,
    ``--logger``); ``worker`` is written on every JSON line.  Refuses to start when the
    format cannot be honoured.
    """
    user_logger = run_options.get("logger")
    if log_format == "json" and user_logger:
        refuse_to_start("LOG_FORMAT=json cannot be combined with twistd --logger, "
                        "which picks its own format")
    if log_format == "json" and run_options.get("syslog"):
        refuse_to_start("LOG_FORMAT=json cannot be combined with twistd --syslog")
    _routed.update(options=run_options, level=level, format=log_format, worker=worker,
                   user_factory=_resolve(user_logger) if user_logger else None)
    run_options["logger"] = TWISTD_LOGGER


def twistd_observer() -> ILogObserver:
    """twistd's ``--logger`` factory: its usual output, in our format, behind our filter."""
    if not _routed:
        raise RuntimeError(f"{TWISTD_LOGGER} is set by twistd queen, not by hand")
    user_factory: Callable[[], Any] | None = _routed["user_factory"]
    inner = user_factory() if user_factory is not None else _twistd_target(
        _routed["options"], _routed["format"], _routed["worker"])
    return filtered(_as_observer(inner), _routed["level"])


def _resolve(name: str) -> Callable[[], Any]:
    try:
        return namedAny(name)
    except Exception as err:
        refuse_to_start(f"twistd --logger {name} could not be imported: {err}")


def _as_observer(observer: Any) -> ILogObserver:
    """A legacy ``twisted.python.log`` observer wrapped for twisted.logger, as twistd does."""
    if ILogObserver.providedBy(observer):
        return observer
    return LegacyLogObserverWrapper(observer)


def _twistd_target(run_options: Any, log_format: str, worker: str | None) -> Any:
    """The observer twistd builds from its own options (``UnixAppLogger``), same choices:
    ``--syslog``; stdout for ``--logfile=-`` or ``-n`` without ``--logfile``; else the
    named file (``twistd.log`` by default) that SIGUSR1 rotates."""
    if run_options.get("syslog"):
        from twisted.python import syslog

        return syslog.SyslogObserver(run_options.get("prefix", "")).emit
    name = run_options.get("logfile") or ""
    nodaemon = run_options.get("nodaemon", False)
    if name == "-" and not nodaemon:
        refuse_to_start("--logfile=- needs -n: a daemon has no stdout")
    if name == "-" or (nodaemon and not name):
        return file_observer(sys.stdout, log_format, worker)
    output = logfile.LogFile.fromFullPath(name or "twistd.log")
    if not signal.getsignal(signal.SIGUSR1):
        signal.signal(signal.SIGUSR1, lambda _signum, _frame: _rotate_soon(output))
    return file_observer(output, log_format, worker)


def _rotate_soon(output: logfile.LogFile) -> None:
    from twisted.internet import reactor

    reactor.callFromThread(output.rotate)  # type: ignore[attr-defined]

