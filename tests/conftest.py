"""Shared fixtures: a real PostgreSQL database per test session, migrated to head.

The server comes from FHIRQ_TEST_DATABASE_URL (unset: an embedded server for the session). A fresh
database `fhirq_test_<pid>` is created on it for the session and dropped afterwards, so parallel
runs never share state.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import psycopg2
import pytest
from psycopg2 import errors as pg_errors
from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.exc import OperationalError

from tests.embedded_services import database_url, session_services

# FHIRQ_TEST_DATABASE_URL / FHIRQ_TEST_REDIS_URL when set, else embedded servers for this session.
_SERVICES = session_services()
ADMIN_URL = _SERVICES.admin_url
REDIS_URL = _SERVICES.redis_url
# The broker of the job tests' workers: FHIRQ_TEST_BROKER_URL (e.g. amqp://… for RabbitMQ), else
# the session's Redis.
BROKER_URL = os.environ.get("FHIRQ_TEST_BROKER_URL") or REDIS_URL


@contextlib.contextmanager
def fresh_database(name: str, revision: str = "head") -> Iterator[str]:
    """A new database `name` migrated to `revision`, dropped afterwards; yields its URL."""
    admin = psycopg2.connect(ADMIN_URL)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        cur.execute(f'CREATE DATABASE "{name}"')
    url = database_url(ADMIN_URL, name)
    from core.store.migrate import upgrade

    upgrade(url, revision)
    try:
        yield url
    finally:
        from core.store.db import get_engine

        get_engine.cache_clear()
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(scope="session")
def db_url() -> Iterator[str]:
    with fresh_database(f"fhirq_test_{os.getpid()}") as url:
        os.environ["FHIRQ_DATABASE_URL"] = url
        yield url


@pytest.fixture(scope="session")
def engine(db_url: str) -> Engine:
    from core.store.db import get_engine

    return get_engine(db_url)


TABLES_TO_CLEAN: list[str] = [
    "resource", "resource_history", "resource_string", "resource_date", "resource_number",
]


@pytest.fixture
def clean_db(engine: Engine) -> Iterator[Engine]:
    """Empty every data table before the test; for tests that commit. A worker's task or beat
    run still touching the job tables may deadlock with the TRUNCATE: try again."""
    from core.store.retry import retry_conflicts

    def empty() -> None:
        with engine.begin() as c:
            # A worker may hold a lock on one of its connections while its other connection
            # queues behind the TRUNCATE: a wait PostgreSQL cannot see as a deadlock. The
            # TRUNCATE gives up its place in the queue after a while and tries again.
            c.execute(text("SET LOCAL lock_timeout = '3s'"))
            existing = {
                r[0]
                for r in c.execute(
                    text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
                )
            }
            tables = [t for t in TABLES_TO_CLEAN if t in existing]
            if "job" in existing:
                tables.append("job")
            if "job_entry" in existing:
                tables.append("job_entry")
            if tables:
                c.execute(text(f"TRUNCATE {', '.join(tables)} CASCADE"))

    for attempt in range(1, 21):
        try:
            retry_conflicts(empty, attempts=5, what="emptying the test tables")
            break
        except OperationalError as exc:
            if attempt == 20 or not isinstance(exc.orig, pg_errors.LockNotAvailable):
                raise
    yield engine


@pytest.fixture
def conn(clean_db: Engine) -> Iterator[Connection]:
    """A connection inside a transaction that is rolled back after the test."""
    with clean_db.connect() as c:
        tx = c.begin()
        yield c
        tx.rollback()


def make_engine(url: str) -> Engine:
    return create_engine(url.replace("postgresql://", "postgresql+psycopg2://", 1))


@pytest.fixture
def client(clean_db: Engine):  # type: ignore[no-untyped-def]
    """A Flask test client over the real database, without authentication (owner
    "anonymous"); tests/test_auth.py covers authentication."""
    from dataclasses import replace

    from api import create_app
    from core.config import get_settings

    app = create_app(replace(get_settings(), auth="off"))
    app.config["TESTING"] = True
    return app.test_client()

