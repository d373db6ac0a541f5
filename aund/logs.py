"""Logging setup for every aund process: structlog, JSON lines when stderr is not a terminal
(journald), readable console output on a terminal, debug only with AUND_DEBUG=true.

Event names are stable (see docs/logging.md); secrets (tokens, keys, seeds, plaintext) are never
passed to a logger, and `redact` strips known secret fields as a second line of defence.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog

SECRET_KEYS = frozenset({"access_token", "refresh_token", "token", "kite_token", "private_key", "seed",
                         "encryption_seed", "password", "signature", "payload", "plaintext", "wrapped_key"})


def debug_enabled() -> bool:
    return os.environ.get("AUND_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


def redact(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    for key in SECRET_KEYS.intersection(event):
        event[key] = "<redacted>"
    return event


LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure(*, debug: bool | None = None, json_lines: bool | None = None, level_name: str = "info") -> None:
    """Structured logs on stderr at `level_name` (the config's `log_level`); AUND_DEBUG=true (or
    `debug`) means debug whatever the level says."""
    debug = debug_enabled() if debug is None else debug
    json_lines = (not sys.stderr.isatty()) if json_lines is None else json_lines
    level = logging.DEBUG if debug else LEVELS[level_name]
    renderer = structlog.processors.JSONRenderer() if json_lines else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", utc=True), redact,
                    structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
