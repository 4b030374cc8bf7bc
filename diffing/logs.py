"""Structured logging: readable on a console, JSON lines in jobs (CROSSDIFF_LOG_JSON=1 or json=True)."""

from __future__ import annotations

import logging
import os
import sys

import structlog

_configured = False


def configure(json: bool | None = None, level: int = logging.INFO, file=None) -> None:
    """file: where lines go (default: the current sys.stderr, looked up per logger)."""
    global _configured
    if json is None:
        json = os.environ.get("CROSSDIFF_LOG_JSON", "") not in ("", "0", "false")
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=lambda *args: structlog.PrintLogger(file=file or sys.stderr),  # resolved per logger
        cache_logger_on_first_use=False,
    )
    _configured = True


def get_logger(name: str = "crossdiff", **bind):
    if not _configured:
        configure()
    return structlog.get_logger(name).bind(**bind)
