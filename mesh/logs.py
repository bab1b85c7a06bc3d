"""Structured logs: one JSON object per line for machines, logfmt for a person
at a terminal; each line carries peer, run id, epoch and trace id when known.

The trace id is the W3C one: taken from an incoming request's ``traceparent``
(so a client's trace continues into the peer's log lines), from the run's
trace while a traced attempt runs (mesh/tracing.py), else the run's id, which
is already 32 hex digits: every peer's lines about one run share it.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
from typing import Any

_CONTEXT_KEYS = ("run_id", "epoch", "peer", "term", "trace_id")
LOG_FORMATS = ("auto", "json", "logfmt")

trace_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("trace_id", default=None)

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")
_BARE = re.compile(r"^[A-Za-z0-9_./:@-]+$")


def trace_id_from(traceparent: str | None) -> str | None:
    """The trace id of a W3C ``traceparent`` header; None if absent or malformed."""
    match = _TRACEPARENT.match((traceparent or "").strip().lower())
    return match.group(1) if match and match.group(1) != "0" * 32 else None


def _fields(record: logging.LogRecord, peer_id: str) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "ts": round(record.created, 3),
        "level": record.levelname.lower(),
        "logger": record.name,
        "peer": peer_id,
        "msg": record.getMessage(),
    }
    for key in _CONTEXT_KEYS:
        value = record.__dict__.get(key)
        if value is not None:
            entry[key] = value
    if "trace_id" not in entry:
        current = trace_id.get()
        if current is not None:
            entry["trace_id"] = current
        elif isinstance(entry.get("run_id"), str):
            entry["trace_id"] = entry["run_id"]
    return entry


class JSONFormatter(logging.Formatter):
    def __init__(self, peer_id: str) -> None:
        super().__init__()
        self.peer_id = peer_id

    def format(self, record: logging.LogRecord) -> str:
        entry = _fields(record, self.peer_id)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class LogfmtFormatter(logging.Formatter):
    """``key=value`` pairs, time first and readable, for eyes at a terminal."""

    def __init__(self, peer_id: str) -> None:
        super().__init__()
        self.peer_id = peer_id

    def format(self, record: logging.LogRecord) -> str:
        entry = _fields(record, self.peer_id)
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        entry["ts"] = f"{stamp}.{int(record.msecs):03d}"
        line = " ".join(f"{k}={_logfmt_value(v)}" for k, v in entry.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _logfmt_value(value: Any) -> str:
    text = str(value)
    if text and _BARE.match(text):
        return text
    return json.dumps(text)


def formatter_for(fmt: str, peer_id: str, is_tty: bool) -> logging.Formatter:
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {fmt!r}")
    if fmt == "logfmt" or (fmt == "auto" and is_tty):
        return LogfmtFormatter(peer_id)
    return JSONFormatter(peer_id)


def configure(peer_id: str, level: str, fmt: str = "auto") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter_for(fmt, peer_id, sys.stderr.isatty()))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pysyncobj logs benign divergence notices at every leader change when
    # batching is off; its warnings and errors still come through.
    logging.getLogger("pysyncobj").setLevel(logging.ERROR)
