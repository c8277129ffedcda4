"""Logging setup shared by every process: one format, the process role in every line.

`text` writes readable lines; `json` writes one JSON object per line (time, level, role,
logger, message, and any structured fields a caller passes as `extra={"fields": {...}}`),
which log shippers (journald, Loki, Elasticsearch) take without parsing rules.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    """One JSON object per record; a traceback stays inside the object, never its own lines."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "role": self.role,
            "pid": record.process,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def make_formatter(role: str, fmt: str = "text") -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter(role)
    return logging.Formatter(f"%(asctime)s %(levelname)s [{role}] %(name)s: %(message)s")


def setup_logging(role: str, level: str = "INFO", fmt: str = "text") -> logging.Logger:
    """Configure the root logger of this process as `role`; return its `vlmserve.ROLE` logger.

    In json mode every line the process writes must be JSON, so libraries that bring their
    own console handler (transformers does) are routed through the root one, Python warnings
    become log records, and an uncaught exception is logged rather than printed.
    """
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {FORMATS}, got {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(make_formatter(role, fmt))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    if fmt == "json":
        route_library_handlers()
        logging.captureWarnings(True)
        sys.excepthook = _log_uncaught
        # transformers checks this before printing its advisory warnings to stderr itself.
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    return logging.getLogger(f"vlmserve.{role}")


def route_library_handlers() -> None:
    """Remove console handlers that libraries put on their own loggers, and let those loggers
    propagate to the root handler instead (called again after late imports)."""
    for logger in list(logging.root.manager.loggerDict.values()):
        if not isinstance(logger, logging.Logger) or logger.name.startswith("gunicorn"):
            continue
        for h in list(logger.handlers):
            if type(h) is logging.StreamHandler:
                logger.removeHandler(h)
                logger.propagate = True


def _log_uncaught(kind: type[BaseException], exc: BaseException, tb: object) -> None:
    logging.getLogger("vlmserve").critical("uncaught exception", exc_info=(kind, exc, tb))
