"""Logging: JSON lines (the default off a terminal, as in a container) or plain text, uvicorn's loggers routed
through the same handler, the request id on every line logged while a request is served, and the access line.

The access line carries counts and times only; request text appears in it only with `log_request_text`.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import uuid
from datetime import datetime, timezone
from typing import Any, Literal, TextIO

ACCESS_LOGGER = "rankserve.access"
# Fields of a LogRecord itself: anything else on a record came in through `extra=` and is printed.
_RECORD_FIELDS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName", "color_message"}

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("rankserve_request_id", default=None)

# An incoming X-Request-ID is echoed and logged only if it is short and plain (it ends up in log lines).
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")


def request_id(incoming: str | None) -> str:
    """The client's `X-Request-ID` when it is a plain token of at most 128 characters, else a new one."""
    if incoming is not None and _REQUEST_ID.fullmatch(incoming):
        return incoming
    return uuid.uuid4().hex


class _RequestIdFilter(logging.Filter):
    """Adds the id of the request being served (if any) to every record logged in its context."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            rid = request_id_var.get()
            if rid is not None:
                record.request_id = rid
        return True


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    """What came in through `extra=`, in the order given (the request id, added by the filter, last)."""
    return {k: v for k, v in vars(record).items() if k not in _RECORD_FIELDS and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: `ts` (UTC, ISO 8601), `level`, `logger`, `message`, then the record's extras."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update(_extras(record))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """`time level logger: message key=value ...` (values with spaces are JSON-quoted)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        pairs = [f"{k}={_text_value(v)}" for k, v in _extras(record).items()]
        return " ".join([line, *pairs]) if pairs else line


def _text_value(value: Any) -> str:
    if isinstance(value, str) and value and not any(c.isspace() or c in '"=' for c in value):
        return value
    if isinstance(value, float):
        return f"{value:g}"
    return json.dumps(value, ensure_ascii=False, default=str)


def resolve_format(log_format: Literal["auto", "json", "text"], stream: TextIO | None = None) -> str:
    """`auto` → `json` unless the stream (stderr) is a terminal."""
    if log_format != "auto":
        return log_format
    stream = stream or sys.stderr
    isatty = getattr(stream, "isatty", None)
    return "text" if isatty is not None and isatty() else "json"


def setup_logging(level: str, log_format: Literal["auto", "json", "text"] = "auto") -> str:
    """Configure the root logger (one stderr handler) and send uvicorn's loggers through it. Returns the format."""
    fmt = resolve_format(log_format)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_RequestIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    return fmt
