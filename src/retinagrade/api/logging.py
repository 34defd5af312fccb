"""Structured JSON logs, one object per line (CloudWatch, Loki and friends parse them as they come).

Log records never carry image bytes or patient identifiers: the access line names the request, its route
template (not its URL), status and latency.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

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


def configure_logging(level: str) -> None:
    """Send ``retinagrade.*`` logs to stderr as JSON lines. Idempotent (tests create many apps)."""
    logger = logging.getLogger("retinagrade")
    logger.setLevel(level)
    for handler in list(logger.handlers):
        if getattr(handler, "_retinagrade_json", False):
            logger.removeHandler(handler)
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    handler._retinagrade_json = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.propagate = False
