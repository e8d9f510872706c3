"""Structured logs: one JSON object a line, carrying job ids, users and models where known.

The service logs job events with `extra={"job_id": ..., "user": ..., "model": ...}`; the JSON
formatter puts those fields beside the message, so a log pipeline can follow one job.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

__all__ = ["JsonFormatter", "TextFormatter", "configure", "escape_controls"]

_FIELDS = ("job_id", "user", "model", "seconds")
# Line breaks and other control characters a client can put in a message (a node's `where`, a model
# name): in a text log they would forge whole lines. JSON logs escape them by construction.
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_controls(text: str) -> str:
    """`text` with every control character written as its escape (`\\n`, `\\x1b`, `\\u2028`)."""
    return _CONTROLS.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in _FIELDS:
            if hasattr(record, name):
                entry[name] = getattr(record, name)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """One line per record (a traceback, the server's own, aside), whatever the message holds."""

    def format(self, record: logging.LogRecord) -> str:
        safe = logging.makeLogRecord({**record.__dict__, "msg": escape_controls(record.getMessage()), "args": None})
        text = super().format(safe)
        fields = " ".join(f"{n}={escape_controls(str(getattr(record, n)))}" for n in _FIELDS if getattr(record, n, ""))
        return f"{text} [{fields}]" if fields else text


def configure(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
