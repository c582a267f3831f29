"""Log output: readable lines, or one JSON object per line for log shippers.

``GRUSERVE_LOG_FORMAT=json`` makes every record, gruserve's and uvicorn's, one JSON
object: ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``, plus
``request_id`` (records about one request pass it as ``extra``) and ``exception``
(the formatted traceback) when there is one. A shipper then needs no parsing rules.

>>> import logging
>>> record = logging.LogRecord("gruserve", logging.INFO, "", 0, "ready", None, None)
>>> record.created = 0.0
>>> JsonFormatter().format(record)
'{"time":"1970-01-01T00:00:00.000000Z","level":"info","logger":"gruserve","message":"ready"}'
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import orjson

TEXT_FORMAT = "%(levelname)s %(name)s: %(message)s"
# the record attributes a JSON line carries besides the four always there
EXTRA_FIELDS = ("request_id",)


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring for the keys)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in EXTRA_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """The stderr handler :func:`configure` installs (told apart from anyone else's)."""


def configure(level: str, fmt: str) -> None:
    """Send every record at ``level`` or above to stderr in ``fmt`` (``text`` or ``json``).

    Like :func:`logging.basicConfig`, leaves a root logger that someone else has given
    handlers (a host application, pytest) alone; a second call (two apps in one process)
    replaces the handler of the first instead of printing each record twice.
    """
    root = logging.getLogger()
    ours = [h for h in root.handlers if isinstance(h, _Handler)]
    if len(ours) != len(root.handlers):
        return
    for handler in ours:
        root.removeHandler(handler)
    handler = _Handler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root.addHandler(handler)
    root.setLevel(level.upper())


def uvicorn_log_config(level: str, fmt: str) -> dict[str, Any] | None:
    """The ``log_config`` for ``uvicorn.run``: None keeps uvicorn's own text format; for
    ``json``, uvicorn's loggers and the root logger all write JSON lines to stderr."""
    if fmt != "json":
        return None
    handler = {"class": "logging.StreamHandler", "formatter": "json"}
    uvicorn_logger = {"handlers": ["json"], "level": level.upper(), "propagate": False}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": f"{__name__}.JsonFormatter"}},
        "handlers": {"json": handler},
        "loggers": {
            "uvicorn": uvicorn_logger,
            "uvicorn.error": {"level": level.upper()},  # propagates to "uvicorn"
            "uvicorn.access": uvicorn_logger,
        },
        "root": {"handlers": ["json"], "level": level.upper()},
    }
