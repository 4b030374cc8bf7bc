"""Structured logging: readable on a console, JSON lines in jobs (CROSSDIFF_LOG_JSON=1 or json=True)."""

from __future__ import annotations

import logging
import os
import sys
import threading

import structlog

_configured = False
_WRITE_LOCK = threading.Lock()  # module-level: a logger holding a lock would not pickle


class _LineLogger:
    """structlog's PrintLogger, but `file=None` means the sys.stderr of the moment of each line: a
    module-level logger made while a test runner or notebook had swapped the stream in must not
    keep writing to it once it is closed (and a logger without a stream object pickles, as Ray
    Serve does with deployment code)."""

    def __init__(self, file=None):
        self._file = file

    def msg(self, message: str) -> None:
        f = self._file or sys.stderr
        with _WRITE_LOCK:  # one write per line: threads (the background sync) never interleave
            f.write(message + "\n")
            f.flush()

    log = debug = info = warn = warning = error = err = critical = exception = fatal = failure = msg


def configure(json: bool | None = None, level: int = logging.INFO, file=None) -> None:
    """file: where lines go (default: sys.stderr, looked up per line)."""
    global _configured
    if json is None:
        json = os.environ.get("CROSSDIFF_LOG_JSON", "") not in ("", "0", "false")
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise (label jobs)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,  # e.g. the pipeline's `stage` on every line
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=lambda *args: _LineLogger(file),
        cache_logger_on_first_use=False,
    )
    _configured = True


def get_logger(name: str = "crossdiff", **bind):
    if not _configured:
        configure()
    return structlog.get_logger(name).bind(**bind)
