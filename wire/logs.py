"""Operator-facing logs: one line per event, human on a terminal, JSON when asked, repeated errors rate-limited.

Events carry their subject as `extra` fields (gateway, device, reason, ...): the text format prints them as
key=value after the message, the JSON format as top-level keys, so a log pipeline can filter on them.
"""

from __future__ import annotations

import json
import logging
import sys
import time
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


def setup_logging(fmt: LogFormat = "text", level: str = "info", stream: Any = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
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
