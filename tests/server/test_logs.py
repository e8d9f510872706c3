"""Text logs keep one record a line whatever a client put in a message; JSON logs stay parseable."""

from __future__ import annotations

import json
import logging
import sys

from farscope.server.logs import JsonFormatter, TextFormatter, escape_controls


def _record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("farscope.test", logging.INFO, __file__, 1, message, args, None)
    record.__dict__.update(extra)
    return record


def test_control_characters_are_escaped() -> None:
    assert escape_controls("a\nb\r\tc\x1b[31m\u2028d") == "a\\nb\\r\\tc\\x1b[31m\\u2028d"
    assert escape_controls("plain ü text") == "plain ü text"


def test_a_forged_line_in_a_message_stays_on_its_line() -> None:
    where = "exp.py:3\n2026-12-01 00:00:00 ERROR farscope.server: admin key leaked"
    text = TextFormatter("%(levelname)s %(name)s: %(message)s").format(
        _record("request rejected: node at %s", where, user="eve\nroot", job_id="j1"))
    assert "\n" not in text
    assert text == ("INFO farscope.test: request rejected: node at exp.py:3\\n2026-12-01 00:00:00 ERROR "
                    "farscope.server: admin key leaked [job_id=j1 user=eve\\nroot]")


def test_the_server_s_own_traceback_keeps_its_lines() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("farscope.test", logging.ERROR, __file__, 1, "failed\nhere", (),
                                   exc_info=sys.exc_info())
    text = TextFormatter("%(message)s").format(record)
    first, *rest = text.split("\n")
    assert first == "failed\\nhere"
    assert rest[0].startswith("Traceback") and rest[-1] == "ValueError: boom"


def test_json_logs_round_trip_the_message_exactly() -> None:
    line = JsonFormatter().format(_record("a\nb", user="u"))
    assert "\n" not in line
    assert json.loads(line)["message"] == "a\nb" and json.loads(line)["user"] == "u"
