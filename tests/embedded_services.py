"""Servers for a test session on a machine that has none: unless FHIRQ_TEST_DATABASE_URL /
FHIRQ_TEST_REDIS_URL name them, the session runs the same embedded PostgreSQL and Redis as
`fhirq up`, in a temporary directory, started on first use and stopped at interpreter exit.

For tests/conftest.py: take the admin URL and broker URL from `session_services()` and build
per-session database URLs with `database_url()` (the embedded server's URLs carry the unix
socket directory in their query string, which a string split on "/" would cut)."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from dataclasses import dataclass

from core.services import database_url, redis_client_url

__all__ = ["SessionServices", "database_url", "redis_client_url", "session_services"]


@dataclass(frozen=True)
class SessionServices:
    admin_url: str  # PostgreSQL where the session may CREATE DATABASE
    redis_url: str  # the Celery broker URL (redis:// or redis+socket://)
    embedded: bool  # started by this session


@functools.cache
def session_services() -> SessionServices:
    admin = os.environ.get("FHIRQ_TEST_DATABASE_URL")
    broker = os.environ.get("FHIRQ_TEST_REDIS_URL")
    if admin and broker:
        return SessionServices(admin, broker, embedded=False)

    from runtime import embedded

    data_dir = tempfile.mkdtemp(prefix="fhirq-test-")
    # atexit runs last-registered first: the servers stop before their directory goes.
    atexit.register(shutil.rmtree, data_dir, ignore_errors=True)
    if not admin:
        atexit.register(embedded.stop_postgres, data_dir)
        admin, _ = embedded.start_postgres(data_dir, database="postgres")
    if not broker:
        atexit.register(embedded.stop_redis, data_dir)
        broker, _ = embedded.start_redis(data_dir)
    return SessionServices(admin, broker, embedded=True)


