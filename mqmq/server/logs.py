"""How the server's log is written: text or JSON lines, info and above by default.

``twistd mqmq`` keeps twistd's own choice of where the log goes (``--logfile``,
standard output with ``-n``, ``--syslog``) and its rotation on SIGUSR1: the
observer twistd would make is wrapped, formatted as asked and filtered by
level.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from typing import IO, Any, Optional

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LegacyLogObserverWrapper,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
)
from twisted.python import log as legacy_log
from twisted.python.failure import Failure

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warn", "error", "critical")

# Keys of events from Twisted's legacy log and of twisted.logger's own
# bookkeeping, which a JSON line does not repeat as fields.
_NOT_FIELDS = frozenset(("message", "format", "isError", "system", "why", "failure", "time"))


def _field(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)  # strict JSON has no NaN
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    try:
        return str(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"


def json_line(event: dict[str, Any]) -> str:
    """One event as one line of JSON: time, level, namespace, message, then
    the event's own fields (``{peer}`` and the like), and a failure's traceback."""
    level = event.get("log_level")
    line: dict[str, Any] = {
        "time": datetime.fromtimestamp(event.get("log_time", 0), timezone.utc).isoformat(timespec="microseconds"),
        "level": level.name if isinstance(level, type(LogLevel.info)) else "info",
        "namespace": event.get("log_namespace", "-"),
        "message": formatEvent(event),
    }
    for key, value in event.items():
        if not key.startswith("log_") and key not in _NOT_FIELDS and key not in line:
            line[key] = _field(value)
    failure = event.get("log_failure") or event.get("failure")  # (legacy log.err gives "failure")
    if isinstance(failure, Failure):
        line["traceback"] = failure.getTraceback()
    return json.dumps(line, ensure_ascii=False) + "\n"


def json_observer(out: IO[str]) -> ILogObserver:
    """Writes each event to ``out`` as one line of JSON (no record separator)."""
    return FileLogObserver(out, json_line)


def at_level(observer: ILogObserver, level: str) -> ILogObserver:
    """``observer``, given only events at ``level`` or above."""
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(level))
    return FilteringLogObserver(observer, [predicate])


# What twistd_observer makes: twistd names its log observer factory by its
# dotted name (its --logger option), so the settings wait here.
_twistd_settings: Optional[tuple[Any, str, str]] = None


def log_through_twistd(twistd_options: Any, log_format: str, level: str) -> str:
    """The value of twistd's ``logger`` option that makes twistd log as asked:
    the observer twistd would make from its options, in ``log_format``, at
    ``level`` and above."""
    global _twistd_settings
    _twistd_settings = (twistd_options, log_format, level)
    return f"{__name__}.twistd_observer"


def twistd_observer() -> ILogObserver:
    """The observer :func:`log_through_twistd` describes (called by twistd)."""
    from twisted.scripts._twistd_unix import UnixAppLogger

    assert _twistd_settings is not None, "log_through_twistd first"
    twistd_options, log_format, level = _twistd_settings
    made: Any = UnixAppLogger(twistd_options)._getLogObserver()
    out: Optional[IO[str]] = getattr(made, "_outFile", None)
    if log_format == "json" and out is not None:  # (not to syslog: refused with the options)
        observer = json_observer(out)
    else:
        observer = _observer(made)
    return at_level(observer, level)


def _observer(made: Any) -> ILogObserver:
    if ILogObserver.providedBy(made):
        return made  # type: ignore[no-any-return]
    assert legacy_log.ILogObserver.providedBy(made) or callable(made)
    return LegacyLogObserverWrapper(made)
