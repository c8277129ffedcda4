"""Logging setup shared by every process: one format, the process role in every line."""

from __future__ import annotations

import logging


def setup_logging(role: str, level: str = "INFO") -> logging.Logger:
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s %(levelname)s [{role}] %(name)s: %(message)s",
        force=True,
    )
    return logging.getLogger(f"vlmserve.{role}")
