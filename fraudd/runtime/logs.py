"""Logging: JSON lines on stderr for machines, plain lines when a person watches a terminal.

Every JSON record carries ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``worker``
(``supervisor`` or the consumer name), ``event`` and ``message``, then the fields the code passed
with ``extra=`` as keys of their own, so log queries can select "every reclaim" or "every outage
of postgres" exactly. ``event`` is a stable name where the code gives one, else the message.
Logs describe batches, outages and lifecycle, never single transactions: per-entry detail is
DEBUG, and the dead-letter stream itself records every rejected entry.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime

from pythonjsonlogger.json import JsonFormatter

_process_name = "supervisor"
# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD_ATTRIBUTES = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "worker", "event"}


class _ProcessName(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = _process_name
        if not hasattr(record, "event"):
            record.event = record.getMessage()
        return True


class _JsonLines(JsonFormatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        # UTC with an offset: comparable across hosts and unambiguous, unlike local asctime.
        return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")


class _HumanLines(logging.Formatter):
    """``time level worker logger: message key=value…``: the extras are what makes a line useful."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = " ".join(f"{key}={value}" for key, value in record.__dict__.items() if key not in _STANDARD_ATTRIBUTES)
        if not extras:
            return line
        head, newline, traceback = line.partition("\n")
        return f"{head} {extras}{newline}{traceback}"


def setup(level: str, process_name: str = "supervisor") -> None:
    """Configure the root logger; called again in each forked worker to rename the process."""
    global _process_name
    _process_name = process_name
    handler = logging.StreamHandler(sys.stderr)
    if sys.stderr.isatty():
        handler.setFormatter(_HumanLines("%(asctime)s %(levelname)-7s %(worker)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(
            _JsonLines(
                "%(asctime)s %(levelname)s %(name)s %(worker)s %(event)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    handler.addFilter(_ProcessName())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
