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
