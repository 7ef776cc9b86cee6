"""Structured logs: one JSON object per line, allow-listed extra fields, and a redaction net for secrets."""

from __future__ import annotations

import json
import logging
import re
import sys
from contextvars import ContextVar
from datetime import datetime, timezone

#: The id of the request being served; every log line written while serving it (provider and Sage calls
#: included) carries it, so one request can be followed through the logs.
request_id: ContextVar[str] = ContextVar("request_id", default="")

# Extra fields a log call may carry; anything else passed as ``extra`` is dropped, so a careless call can't leak.
ALLOWED = {
    "journey", "kind", "provider", "code", "reason", "path", "status", "error", "origin", "notification",
    "bank", "bank_account", "consent", "accounts", "caller", "request_id", "attempt", "statement", "feed_state",
    "count", "seconds",
}
_SECRETISH = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+|eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9._-]+")


def redact(text: str) -> str:
    return _SECRETISH.sub(lambda m: (m.group(1) or "") + "[redacted]", text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        for key in ALLOWED:
            if key in record.__dict__:
                entry[key] = record.__dict__[key]
        if "request_id" not in entry and request_id.get():
            entry["request_id"] = request_id.get()
        if record.exc_info and record.exc_info[0] is not None:
            # The type and message only: tracebacks carry locals' reprs in some tools, and paths are noise here.
            entry["exception"] = f"{record.exc_info[0].__name__}: {redact(str(record.exc_info[1]))[:300]}"
        return json.dumps(entry, default=str)


#: Libraries whose DEBUG lines carry SQL parameters or HTTP bodies (handles, states, ciphertexts): they log at
#: WARNING at most, whatever the configured level.
QUIET_LIBRARIES = ("tortoise", "aiosqlite", "asyncpg", "db_client", "aiohttp.client", "pypika")


def quiet_libraries() -> None:
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)


def setup_logging(level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    quiet_libraries()
    for name in ("sanic.root", "sanic.error", "sanic.access", "sanic.server"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
