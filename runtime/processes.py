"""The command lines of fhirq's long-running processes (API, worker, beat). `fhirq api|worker|beat`
exec them; `fhirq up` spawns the same ones, so both paths run identical processes."""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = [
    "CELERY_APP",
    "WORKER_CLASS",
    "WSGI_APP",
    "api_argv",
    "beat_argv",
    "format_host",
    "gunicorn_has_setting",
    "worker_argv",
]

WSGI_APP = "api.wsgi:app"
WORKER_CLASS = "api.server.BufferingWorker"
CELERY_APP = "worker.celery_app:celery"


def format_host(host: str) -> str:
    """`host` as it appears in a URL or a gunicorn bind (IPv6 literals bracketed)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def gunicorn_has_setting(name: str) -> bool:
    """Whether the installed gunicorn knows a setting (options came and went across the
    versions pyproject allows)."""
    from gunicorn.config import KNOWN_SETTINGS

    return any(setting.name == name for setting in KNOWN_SETTINGS)


def api_argv(
    host: str, port: int, workers: int, threads: int, extra: Sequence[str] = ()
) -> list[str]:
    # gthread: a few processes with several threads each, so slow requests (a large async
    # upload, a sync transaction) do not block the others; processes give real parallelism.
    # fhirq's variant reads requests in the worker's selector before a thread takes them, so
    # clients that send slowly cannot tie up the threads (api.server).
    return [
        sys.executable, "-m", "gunicorn", WSGI_APP,
        "--bind", f"{format_host(host)}:{port}",
        "--worker-class", WORKER_CLASS,
        "--workers", str(workers),
        "--threads", str(threads),
        # Bounded so a stop never waits on a stuck request for gunicorn's default 30 s.
        "--graceful-timeout", "10",
        # gunicorn's parser limits sit above the app's (FHIRQ_MAX_URI_BYTES /
        # FHIRQ_MAX_HEADER_BYTES, answered with OperationOutcomes by api.guard); 8190 is the
        # longest request line gunicorn takes. What it refuses itself, api.wsgi renders as an
        # OperationOutcome too.
        "--limit-request-line", "8190",
        "--limit-request-field_size", "16380",
        # Import the app once in the master and fork: the FHIR schemas compiled at import are
        # shared copy-on-write and start-up costs one import, not one per process. Safe while
        # nothing opens a database connection at import time (engines are created lazily).
        "--preload",
        *extra,
    ]  # fmt: skip


def worker_argv(concurrency: int, loglevel: str, extra: Sequence[str] = ()) -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", CELERY_APP, "worker",
        "--concurrency", str(concurrency),
        "--loglevel", loglevel,
        *extra,
    ]  # fmt: skip


def beat_argv(schedule_file: str, loglevel: str, extra: Sequence[str] = ()) -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", CELERY_APP, "beat",
        "--schedule", schedule_file,
        "--loglevel", loglevel,
        *extra,
    ]  # fmt: skip
