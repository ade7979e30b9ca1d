"""Structured logging set-up for vxpu's command-line tools.

Library modules only ever do ``log = logging.getLogger(__name__)`` (child loggers per
connection or VM via :meth:`logging.Logger.getChild`) and attach context with ``extra=``.
This module configures the root handler for the CLI: human-readable ``key=value`` lines by
default, or one JSON object per line (``--log-format json``) for journald/log shippers.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from typing import Any

_STD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys()) | {"message", "asctime"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STD_ATTRS and not k.startswith("_")}


class KeyValueFormatter(logging.Formatter):
    """``2026-11-23T23:10:00.123Z INFO vxpu.x: message key=value ...``"""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        line = f"{ts} {record.levelname} {record.name}: {record.getMessage()}"
        extras = _extras(record)
        if extras:
            line += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg and every ``extra`` field."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": record.created,
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        obj.update({k: v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)
                    for k, v in _extras(record).items()})
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj)


def setup(level: str | int = "INFO", fmt: str = "text", stream: Any = None) -> None:
    """Configure the root logger for a CLI process.

    Args:
        level: a logging level name or number.
        fmt: ``"text"`` (key=value) or ``"json"``.
        stream: where to write; stderr by default.

    Raises:
        ValueError: for an unknown format or level name.
    """
    if fmt not in ("text", "json"):
        raise ValueError(f"unknown log format {fmt!r} (use 'text' or 'json')")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper() if isinstance(level, str) else level)


class LogBudget:
    """How many log lines caused by hostile input may still go out at their own level.

    A token bucket of ``capacity`` lines that regains one line every ``refill_s`` seconds
    (``None``: never). Past it, lines go to DEBUG, and ``exhausted_note`` is logged once when
    the last token goes, so a guest or peer repeating bad input in a loop cannot flood the
    host's log, while every event is still recorded at DEBUG. Thread-safe. Keep one per
    process or per server, never per connection: reconnecting must not refill it.
    """

    def __init__(self, capacity: int, refill_s: float | None = 60.0, exhausted_note: str = "") -> None:
        self.capacity = capacity
        self.refill_s = refill_s
        self.tokens = capacity
        self.exhausted_note = exhausted_note
        self._stamp = time.monotonic()
        self._lock = threading.Lock()

    def take(self) -> bool:
        """Use one token; False when none is left."""
        with self._lock:
            if self.refill_s is not None:
                now = time.monotonic()
                if self.tokens >= self.capacity:
                    self._stamp = now
                else:
                    gained = int((now - self._stamp) / self.refill_s)
                    if gained:
                        self.tokens = min(self.capacity, self.tokens + gained)
                        self._stamp += gained * self.refill_s
            if self.tokens <= 0:
                return False
            self.tokens -= 1
            return True

    def log(self, logger: logging.Logger, level: int, fmt: str, *args: Any, exc_info: bool = False) -> None:
        """Log at ``level`` while the budget lasts, else at DEBUG (with the traceback, if any)."""
        if self.take():
            logger.log(level, fmt, *args, exc_info=exc_info)
            if self.tokens == 0 and self.exhausted_note:
                logger.warning("%s", self.exhausted_note)
        else:
            logger.debug(fmt, *args, exc_info=exc_info)
