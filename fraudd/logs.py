"""Logging: JSON lines on stderr for machines, plain lines when a person watches a terminal.

Every record carries ``worker`` (``supervisor`` or the consumer name) and, where the code passes
one, an ``event`` name, so log queries can select "every reclaim" or "every outage" exactly.
"""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter

_process_name = "supervisor"


class _ProcessName(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = _process_name
        if not hasattr(record, "event"):
            record.event = record.getMessage()
        return True


def setup(level: str, process_name: str = "supervisor") -> None:
    """Configure the root logger; called again in each forked worker to rename the process."""
    global _process_name
    _process_name = process_name
    handler = logging.StreamHandler(sys.stderr)
    if sys.stderr.isatty():
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(worker)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(worker)s %(event)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
                timestamp=False,
            )
        )
    handler.addFilter(_ProcessName())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
