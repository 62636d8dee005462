"""Structured logs: the log context (job id, chunk, entries, task) of the work in progress, and
the formatters that write every record as one JSON object per line, or as readable text.

The edges bind the context (a worker task binds its job id, an API job route the job in its
URL, `core.jobs` may add `chunk` / `entries`); any record logged meanwhile, a library's
included, carries it. The context is a `ContextVar`, so threads (gunicorn gthread) and tasks
never see each other's.

    {"time": "2025-01-02T03:04:05.678Z", "level": "INFO", "logger": "celery.app.trace",
     "message": "Task fhirq.chunk[…] succeeded in 0.41s: []", "job_id": "…", "task": "fhirq.chunk"}
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, TextIO

import orjson

__all__ = [
    "CONTEXT_FIELDS",
    "JsonFormatter",
    "TextFormatter",
    "bind",
    "configure_logging",
    "current",
    "log_context",
    "reset",
]

# Context keys in the order the text format prints them.
CONTEXT_FIELDS = ("job_id", "chunk", "entries", "task", "task_id")

_EMPTY: Mapping[str, Any] = MappingProxyType({})
_context: ContextVar[Mapping[str, Any]] = ContextVar("fhirq_log_context", default=_EMPTY)

# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged.
_RECORD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


def current() -> Mapping[str, Any]:
    """The log context of the running code (read-only)."""
    return _context.get()


def bind(**fields: Any) -> Token[Mapping[str, Any]]:
    """Add `fields` to the context (None values are left out) until `reset(token)`."""
    merged = {**_context.get(), **{k: v for k, v in fields.items() if v is not None}}
    return _context.set(MappingProxyType(merged))


def reset(token: Token[Mapping[str, Any]]) -> None:
    _context.reset(token)


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """`bind(**fields)` for the duration of a block."""
    token = bind(**fields)
    try:
        yield
    finally:
        reset(token)


def _stamp_context() -> None:
    """Make every LogRecord carry the context it was created in, so that a record formatted
    later or elsewhere (a QueueHandler, a test's capture) still has it. Installed once, at
    import."""
    base = logging.getLogRecordFactory()
    if getattr(base, "fhirq", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = base(*args, **kwargs)
        record._fhirq_context = _context.get()
        return record

    factory.fhirq = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


_stamp_context()


def _context_of(record: logging.LogRecord) -> Mapping[str, Any]:
    ctx = getattr(record, "_fhirq_context", None)
    return current() if ctx is None else ctx


def _instant(created: float) -> str:
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items()
            if k not in _RECORD_ATTRS and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, the log context, any `extra=`
    fields, and `exception` (the formatted traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": _instant(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update(_context_of(record))
        out.update(_extras(record))
        out["pid"] = record.process
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        # default=str: a library's `extra` may hold anything; a log line must never fail.
        return orjson.dumps(out, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


class TextFormatter(logging.Formatter):
    """`time LEVEL logger [job_id=… chunk=…] message`, for a person at a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        ctx = {**_context_of(record), **_extras(record)}
        tags = " ".join(f"{k}={ctx[k]}" for k in CONTEXT_FIELDS if k in ctx)
        line = (f"{_instant(record.created)} {record.levelname:<7} {record.name}"
                f"{f' [{tags}]' if tags else ''} {record.getMessage()}")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to the process's real stderr, looked up at each record: not a `sys.stderr` that
    someone (a test runner, Celery) swapped in and may close."""

    def __init__(self) -> None:
        super().__init__(sys.__stderr__ or sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.__stderr__ or sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


def _formatter(fmt: str) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter()
    if fmt == "text":
        return TextFormatter()
    raise ValueError(f"log format must be 'json' or 'text', not {fmt!r}")


def configure_logging(fmt: str | None = None, level: int | str | None = None) -> None:
    """Send the root logger's records to stderr in `fmt` (default: FHIRQ_LOG_FORMAT) at
    `level` (default: FHIRQ_LOG_LEVEL).

    Idempotent: one handler of ours on the root logger, whatever the number of calls; handlers
    others installed (a test runner's) stay. gunicorn's own error log, which does not propagate
    to the root, gets the same formatter, so every line an API process writes has one format.
    """
    if fmt is None or level is None:
        from core.config import get_settings

        settings = get_settings()
        fmt, level = fmt or settings.log_format, level or settings.log_level
    formatter = _formatter(fmt)
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, _StderrHandler)), None)
    if handler is None:
        handler = _StderrHandler()
        root.addHandler(handler)
    handler.setFormatter(formatter)
    root.setLevel(level)
    for h in logging.getLogger("gunicorn.error").handlers:
        if isinstance(h, logging.StreamHandler) and h.stream in (sys.stderr, sys.__stderr__):
            h.setFormatter(formatter)
