"""Operator-facing logs: one line per event, human on a terminal, JSON when asked, repeated errors rate-limited.

Events carry their subject as `extra` fields (gateway, device, reason, ...): the text format prints them as
key=value after the message, the JSON format as top-level keys, so a log pipeline can filter on them.

Under systemd, stderr is a stream to the journal ($JOURNAL_STREAM names its device and inode, systemd.exec(5)):
each line then starts with its syslog priority, "<3>" for an error (sd-daemon(3)), which journald strips and
stores, so `journalctl -p err -u edge-agent` shows the errors and nothing else.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import Any, Literal

LogFormat = Literal["text", "json"]

_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS and not k.startswith("_")}


def _timestamp(record: logging.LogRecord) -> str:
    base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{base}.{int(record.msecs):03d}Z"


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        line = f"{_timestamp(record)} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if extras:
            line += f"  [{extras}]"
        if record.exc_info:
            # Only for programming errors: a user's mistake is reported without a traceback.
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update(_extras(record))
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, ensure_ascii=False)


# sd-daemon(3) SD_CRIT .. SD_DEBUG: the syslog severities of RFC 5424 §6.2.1 (Python has no NOTICE level).
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


def priority(level: int) -> int:
    """The syslog priority of a logging level (a custom level takes the next standard one at or below it)."""
    for threshold in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if level >= threshold:
            return _PRIORITY[threshold]
    return _PRIORITY[logging.DEBUG]


class JournalPriority(logging.Formatter):
    """Another formatter's lines, each prefixed with the record's syslog priority: journald takes every line of a
    stream as an entry of its own, so a traceback's lines carry the priority of the record too."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in self.inner.format(record).split("\n"))


def is_journal(stream: Any, environ: Mapping[str, str] | None = None) -> bool:
    """Whether `stream` is the journal stream systemd connected (its device:inode equals $JOURNAL_STREAM). Not
    merely "JOURNAL_STREAM is set": a program started from a service and writing elsewhere inherits it."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):  # no file descriptor (a StringIO), or closed
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def setup_logging(fmt: LogFormat = "text", level: str = "info", stream: Any = None,
                  environ: Mapping[str, str] | None = None) -> None:
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    formatter: logging.Formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    handler.setFormatter(JournalPriority(formatter) if is_journal(stream, environ) else formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Libraries speak only when something is wrong; our own modules say what matters.
    for noisy in ("pymodbus", "urllib3", "influxdb_client", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class RateLimitedLog:
    """Logs the first event per key, then at most one per `interval` seconds, saying how many were suppressed.

    Keys are the source of the trouble (e.g. ("reject", gateway, reason)), so one noisy gateway cannot drown
    the log while a different gateway's first error still shows at once.
    """

    def __init__(self, logger: logging.Logger, interval: float = 60.0, max_keys: int = 10_000) -> None:
        self.logger = logger
        self.interval = interval
        self.max_keys = max_keys
        self._state: dict[Any, list[float | int]] = {}  # key -> [last_logged_monotonic, suppressed]

    def log(self, level: int, key: Any, msg: str, *args: Any, **extra: Any) -> bool:
        now = time.monotonic()
        state = self._state.get(key)
        if state is not None and now - state[0] < self.interval:
            state[1] += 1
            return False
        suppressed = int(state[1]) if state else 0
        if state is None and len(self._state) >= self.max_keys:
            self._state.clear()  # bounded memory beats perfect suppression counts
        self._state[key] = [now, 0]
        if suppressed:
            extra["suppressed"] = suppressed
            msg += " (%d similar suppressed in the last %ds)"
            args = (*args, suppressed, int(self.interval))
        self.logger.log(level, msg, *args, extra=extra)
        return True

    def warning(self, key: Any, msg: str, *args: Any, **extra: Any) -> bool:
        return self.log(logging.WARNING, key, msg, *args, **extra)

    def error(self, key: Any, msg: str, *args: Any, **extra: Any) -> bool:
        return self.log(logging.ERROR, key, msg, *args, **extra)
