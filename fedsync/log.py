"""Structured logs: one event name, then key=value fields.

>>> format_event("round_committed", {"round": 3, "accepted": 10})
'round_committed round=3 accepted=10'
"""

from __future__ import annotations

import logging
import sys

LOG_LEVELS = ("debug", "info", "warning", "error")  # what configure, the configs and --log-level accept


def format_event(event: str, fields: dict) -> str:
    parts = [event]
    for k, v in fields.items():
        text = f"{v:.6g}" if isinstance(v, float) else str(v)
        if not text or any(c.isspace() for c in text) or '"' in text:
            text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
        parts.append(f"{k}={text}")
    return " ".join(parts)


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields) -> None:
    if logger.isEnabledFor(level):
        logger.log(level, format_event(event, fields))


def configure(level: str = "info") -> None:
    """Log to stderr as ``time level logger event k=v ...``."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
        force=True,
    )
