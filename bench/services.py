"""The servers a benchmark runs against: a dedicated PostgreSQL database and a Redis broker.

PostgreSQL: the server of FHIRQ_BENCH_DATABASE_URL, else the local default server if it answers,
else the embedded PostgreSQL of `fhirq up` (runtime/embedded.py) in a temporary directory. On it the
benchmark (re)creates its own database (`fhirq_bench`) and migrates it to head.

Redis: FHIRQ_BENCH_REDIS_URL, else the local default server on a dedicated db number if it
answers, else the embedded Redis. The benchmark's tasks go to a queue of their own, so a shared
Redis is never flushed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg2
from psycopg2 import sql

from core.services import database_url, redis_client_url

__all__ = [
    "DEFAULT_DATABASE",
    "DEFAULT_POSTGRES",
    "DEFAULT_REDIS",
    "Services",
    "bench_services",
    "database_url",
    "redis_client_url",
]

DEFAULT_POSTGRES = "postgresql://root@127.0.0.1:5432/test"
DEFAULT_REDIS = "redis://127.0.0.1:6379/14"
DEFAULT_DATABASE = "fhirq_bench"


@dataclass(frozen=True)
class Services:
    admin_url: str  # the PostgreSQL server, on a database that is not ours
    database_url: str  # our benchmark database, migrated
    database: str
    broker_url: str  # Celery's spelling (redis:// or redis+socket://)
    origin: str  # where each came from, for the report: "FHIRQ_BENCH_*", "local", "embedded"
    token: str  # an API key of owner "bench" with system/*.*: the client authenticates as any


def _postgres_answers(url: str) -> bool:
    try:
        psycopg2.connect(url, connect_timeout=2).close()
    except psycopg2.Error:
        return False
    return True


def _redis_answers(url: str) -> bool:
    from worker.broker import broker_for

    return broker_for(url).problem() is None


def _admin(admin_url: str, statement: str, database: str) -> None:
    """Run one database-level statement (`{}` = the quoted database name) outside a
    transaction, as CREATE / DROP DATABASE require."""
    conn = psycopg2.connect(admin_url)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql.SQL(statement).format(sql.Identifier(database)))
    finally:
        conn.close()


def _recreate(admin_url: str, database: str) -> None:
    drop_database(admin_url, database)
    _admin(admin_url, "CREATE DATABASE {}", database)


def drop_database(admin_url: str, database: str) -> None:
    _admin(admin_url, "DROP DATABASE IF EXISTS {} WITH (FORCE)", database)


def _api_key(url: str) -> str:
    """A key for the benchmark's client: requests pay for authentication as a real client's
    would."""
    from core.auth.api_keys import create_key
    from core.store.db import get_engine

    engine = get_engine(url)
    with engine.begin() as conn:
        token = create_key(conn, "bench", ["system/*.*"], name="fhirq bench").token
    engine.dispose()
    return token


@contextlib.contextmanager
def bench_services(database: str = DEFAULT_DATABASE, *, keep: bool = False
                   ) -> Iterator[Services]:
    """A fresh, migrated benchmark database and a broker for the duration of the block.
    Embedded servers started here are stopped on exit; the database is dropped unless `keep`."""
    from core.store.migrate import upgrade
    from runtime import embedded

    with contextlib.ExitStack() as stack:
        data_dir: str | None = None

        def scratch_dir() -> str:
            nonlocal data_dir
            if data_dir is None:
                data_dir = tempfile.mkdtemp(prefix="fhirq-bench-")
                # Callbacks run last-in first-out: the servers stop before the directory goes.
                stack.callback(shutil.rmtree, data_dir, ignore_errors=True)
            return data_dir

        origins: list[str] = []
        admin = os.environ.get("FHIRQ_BENCH_DATABASE_URL")
        if admin:
            origins.append("PostgreSQL: FHIRQ_BENCH_DATABASE_URL")
        elif _postgres_answers(DEFAULT_POSTGRES):
            admin = DEFAULT_POSTGRES
            origins.append("PostgreSQL: local server")
        else:
            where = scratch_dir()
            stack.callback(embedded.stop_postgres, where)
            admin, _ = embedded.start_postgres(where, database="postgres")
            origins.append("PostgreSQL: embedded")

        broker = os.environ.get("FHIRQ_BENCH_REDIS_URL")
        if broker:
            origins.append("Redis: FHIRQ_BENCH_REDIS_URL")
        elif _redis_answers(DEFAULT_REDIS):
            broker = DEFAULT_REDIS
            origins.append("Redis: local server")
        else:
            where = scratch_dir()
            stack.callback(embedded.stop_redis, where)
            broker, _ = embedded.start_redis(where)
            origins.append("Redis: embedded")

        _recreate(admin, database)
        if not keep:
            stack.callback(drop_database, admin, database)
        url = database_url(admin, database)
        upgrade(url)
        yield Services(admin, url, database, broker, "; ".join(origins), _api_key(url))
