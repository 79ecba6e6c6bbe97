"""What ``mssante serve`` writes to its standard error (``log`` settings).

- ``json``: one JSON object per line, for a log collector: ``ts`` (RFC 3339,
  UTC, milliseconds), ``level``, ``logger``, ``msg``, ``pid``, the record's
  ``fields`` merged in, ``exc`` for a traceback;
- ``text``: the human format of a terminal, with the fields appended as
  ``key=value``.

Structured lines carry their data in ``extra={"fields": {...}}``
(``log.info("smtp transaction", extra={"fields": {"event": ...}})``): the
SMTP transaction line (smtp/transaction.py), the admin API's actions.  Only
pseudonyms, ids and counts go there: never an INS, an address of a
patient, a subject, a body or a file name (THREAT_MODEL.md).
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from mssante.settings import LogSettings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
# smtp.workers > 1: several processes write to the same stream.
TEXT_FORMAT_PROCESS = "%(asctime)s %(levelname)s [%(process)d] %(name)s %(message)s"
# Keys of every JSON line; a field of the same name does not replace them.
_CORE = ("ts", "level", "logger", "msg", "pid")
# A text value written as is; anything else as JSON (quoted, escaped).
_BARE = re.compile(r"[^\s\"'=]+")


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, dict) else {}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        for key, value in fields_of(record).items():
            if key not in _CORE:
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """The usual one-line format, then the fields as ``key=value``."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        fields = fields_of(record)
        if not fields:
            return text
        return text + "".join(f" {key}={_text(value)}" for key, value in fields.items())


def _text(value: object) -> str:
    # The frequent cases without json.dumps (one transaction line per message).
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str) and _BARE.fullmatch(value):
        return value
    return json.dumps(value, ensure_ascii=False, default=str, separators=(",", ":"))


class _Handler(logging.StreamHandler[TextIO]):
    """The handler :func:`configure_logging` installs (and replaces when called again)."""


def configure_logging(
    settings: LogSettings, *, process_id: bool = False, stream: TextIO | None = None
) -> logging.Handler:
    """Send the root logger's records to ``stream`` (stderr) in ``settings.format``.

    ``process_id``: the text format names the process (``smtp.workers > 1``;
    JSON lines always have ``pid``).  Loggers keep their own levels
    (app.QUIET_LOGGERS stay at WARNING); uvicorn's propagate here too (the
    servers are built with ``log_config=None``).
    """
    handler = _Handler(stream if stream is not None else sys.stderr)
    if settings.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter(TEXT_FORMAT_PROCESS if process_id else TEXT_FORMAT))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.level)
    # Python's warnings too, as records: stderr holds JSON lines only.
    logging.captureWarnings(settings.format == "json")
    return handler
