"""Structured logs: one JSON object per line, carrying run id and epoch when known."""

from __future__ import annotations

import json
import logging
import sys
import time

_CONTEXT_KEYS = ("run_id", "epoch", "peer", "term")


class JSONFormatter(logging.Formatter):
    def __init__(self, peer_id: str) -> None:
        super().__init__()
        self.peer_id = peer_id

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(time.time(), 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "peer": self.peer_id,
            "msg": record.getMessage(),
        }
        for key in _CONTEXT_KEYS:
            value = record.__dict__.get(key)
            if value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(peer_id: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter(peer_id))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pysyncobj logs benign divergence notices at every leader change when
    # batching is off; its warnings and errors still come through.
    logging.getLogger("pysyncobj").setLevel(logging.ERROR)
