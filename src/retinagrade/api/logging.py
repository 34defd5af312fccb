"""Structured JSON logs, one object per line (CloudWatch, Loki and friends parse them as they come).

Log records never carry image bytes or patient identifiers: the access line names the request, its route
template (not its URL), status and latency. Three more doors are closed, because a DICOM header's values end up
in other people's messages: pydicom and highdicom log and warn with the values they read (a birth date, a
patient's name, UIDs), so their loggers are silenced; an exception's message is logged only when retinagrade
wrote it (or it is the audit store's database or file error), any other is withheld and its type and traceback
kept; and uvicorn's own error lines go through the same formatter.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
import traceback
from types import TracebackType
from typing import Any, Final

from retinagrade.errors import RetinagradeError

#: Loggers of the DICOM libraries, whose messages quote the values they read from a file.
IDENTIFYING_LOGGERS: Final = ("pydicom", "highdicom")
#: Exceptions whose messages are retinagrade's own, or describe the audit store (a database or file error).
_SAFE_MESSAGES: Final = (RetinagradeError, sqlite3.Error, OSError)
WITHHELD: Final = "(message withheld: it may quote the input)"

#: Attributes every LogRecord has; anything else was passed through ``extra=`` and is logged as a field.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            # Stack traces go to the log (for operators), never into a response.
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)

    def formatException(
        self, ei: tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]
    ) -> str:
        """The traceback (frames and exception types) with the messages only of exceptions safe to show."""
        exc = ei[1]
        chain: list[BaseException] = []
        while exc is not None and exc not in chain:
            chain.append(exc)
            exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
        parts: list[str] = []
        for link in reversed(chain):
            if parts:
                parts.append("\nDuring handling of the above exception, another exception occurred:\n\n")
            parts.append("Traceback (most recent call last):\n")
            parts.extend(traceback.format_tb(link.__traceback__))
            message = str(link) if isinstance(link, _SAFE_MESSAGES) else WITHHELD
            parts.append(f"{type(link).__module__}.{type(link).__qualname__}: {message}")
        return "".join(parts)


def silence_identifying_loggers() -> None:
    """Keep the DICOM libraries' log lines (which quote header values) out of every log. Idempotent."""
    for name in IDENTIFYING_LOGGERS:
        library = logging.getLogger(name)
        library.propagate = False
        if not any(isinstance(h, logging.NullHandler) for h in library.handlers):
            library.addHandler(logging.NullHandler())


def configure_logging(level: str) -> None:
    """Send ``retinagrade.*`` logs, and uvicorn's warnings and errors, to stderr as JSON lines; silence the DICOM
    libraries. Idempotent (tests create many apps)."""
    silence_identifying_loggers()
    logger = logging.getLogger("retinagrade")
    logger.setLevel(level)
    for name in ("retinagrade", "uvicorn"):
        # uvicorn logs a failed request's traceback itself ("Exception in ASGI application"); through this
        # formatter its exception message is withheld too. Its level stays as configured (warnings by default).
        target = logging.getLogger(name)
        for handler in list(target.handlers):
            if getattr(handler, "_retinagrade_json", False):
                target.removeHandler(handler)
        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter())
        handler._retinagrade_json = True  # type: ignore[attr-defined]
        target.addHandler(handler)
        target.propagate = False
