"""The store's connection pool against real PostgreSQL: a pooled connection whose server session
died is found by a ping and replaced before anyone uses it (on every reuse by default, as the
workers run; after a second idle in the API); one back in the pool a moment ago is then used
without that round trip (a dead one fails its statement and is discarded, and a request
transaction runs once more on a new connection); FHIRQ_SYNCHRONOUS_COMMIT=off reaches the
session."""

from __future__ import annotations

import time
from collections.abc import Iterator

import psycopg2
import pytest
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError

from core.store import db
from core.store.retry import in_transaction


@pytest.fixture
def pool_engine(db_url: str) -> Iterator[Engine]:
    """An engine of its own (get_engine caches one per URL): a distinct application_name."""
    url = f"{db_url}?application_name=fhirq_pool_probe_{time.monotonic_ns()}"
    engine = db.get_engine(url)
    yield engine
    engine.dispose()
    db.get_engine.cache_clear()


def _backend(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


def _terminate(db_url: str, pid: int) -> None:
    admin = psycopg2.connect(db_url)
    try:
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))
            assert cur.fetchone()[0] is True
    finally:
        admin.close()


def test_an_idle_connection_whose_session_died_is_replaced_before_use(
    pool_engine: Engine, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db, "PING_AFTER_IDLE_SECONDS", 0.2)
    first = _backend(pool_engine)  # the connection goes back to the pool
    _terminate(db_url, first)  # as a database restart or a dropped link would
    time.sleep(0.3)
    second = _backend(pool_engine)  # no error: the ping found it dead, a new one answered
    assert second != first
    assert _backend(pool_engine) == second  # and that one is kept


def test_by_default_every_reuse_is_pinged(pool_engine: Engine, db_url: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(db, "PING_AFTER_IDLE_SECONDS", 0.0)
    first = _backend(pool_engine)
    _terminate(db_url, first)
    assert _backend(pool_engine) != first  # at once: no error


def test_the_api_pings_only_connections_idle_for_a_second(db_url: str) -> None:
    from api import create_app

    saved = db.PING_AFTER_IDLE_SECONDS
    try:
        create_app()
        assert db.PING_AFTER_IDLE_SECONDS == 1.0
    finally:
        db.ping_only_after_idle(saved)


def test_a_request_transaction_survives_a_dead_pooled_connection(
    pool_engine: Engine, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db, "PING_AFTER_IDLE_SECONDS", 60.0)
    first = _backend(pool_engine)
    _terminate(db_url, first)
    backends: list[int] = []

    def work(conn: Connection) -> int:
        backends.append(int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one()))
        return backends[-1]

    # The first run's statement met the dead session; nothing was committed, so it ran again.
    assert in_transaction(pool_engine, work) != first
    assert len(backends) == 1  # the failed statement never returned a pid


def test_a_connection_just_returned_is_used_without_a_ping(
    pool_engine: Engine, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db, "PING_AFTER_IDLE_SECONDS", 60.0)
    first = _backend(pool_engine)
    _terminate(db_url, first)
    # No ping went out, so the dead session shows only when the statement is sent: this is
    # the round trip a busy API no longer pays on every request.
    with pytest.raises(DBAPIError) as caught, pool_engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    assert caught.value.connection_invalidated
    assert _backend(pool_engine) != first  # discarded; the next checkout connects afresh


@pytest.mark.parametrize(("setting", "expected"), [(None, "on"), ("off", "off"), ("on", "on")])
def test_synchronous_commit_is_opt_in(
    db_url: str, monkeypatch: pytest.MonkeyPatch, setting: str | None, expected: str
) -> None:
    if setting is None:
        monkeypatch.delenv("FHIRQ_SYNCHRONOUS_COMMIT", raising=False)
    else:
        monkeypatch.setenv("FHIRQ_SYNCHRONOUS_COMMIT", setting)
    engine = db.get_engine(f"{db_url}?application_name=fhirq_commit_{setting}")
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SHOW synchronous_commit")).scalar_one() == expected
    finally:
        engine.dispose()
        db.get_engine.cache_clear()


def test_a_misspelt_synchronous_commit_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from core.config import get_settings

    monkeypatch.setenv("FHIRQ_SYNCHRONOUS_COMMIT", "offf")
    with pytest.raises(ValueError, match="FHIRQ_SYNCHRONOUS_COMMIT"):
        get_settings()


def _kill_next_pooled_connection(db_url: str) -> None:
    """End the server session of the connection the app's pool hands out next (LIFO: the one
    just returned), as a database restart would."""
    with db.get_engine().connect() as conn:
        pid = int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())
    _terminate(db_url, pid)


def _batch() -> bytes:
    import orjson

    return orjson.dumps({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "POST", "url": "Patient"},
         "resource": {"resourceType": "Patient", "name": [{"family": "Pool"}]}}]})


def test_an_async_submission_survives_a_dead_pooled_connection(
    client, db_url: str, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    """The API pings no connection back in the pool within the second; its first statement
    (before the body is read) meets the dead session and the submission is accepted on a new
    connection instead of answering 503."""
    headers = {"Content-Type": "application/fhir+json", "Prefer": "respond-async"}
    assert client.post("/fhir", data=_batch(), headers=headers).status_code == 202
    monkeypatch.setattr(db, "PING_AFTER_IDLE_SECONDS", 60.0)
    _kill_next_pooled_connection(db_url)
    resp = client.post("/fhir", data=_batch(), headers=headers)
    assert resp.status_code == 202, resp.get_data(as_text=True)


def test_an_api_key_lookup_survives_a_dead_pooled_connection(
    clean_db: Engine, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dataclasses import replace

    from api import create_app
    from core.auth.api_keys import create_key
    from core.config import get_settings

    with clean_db.begin() as conn:
        token = create_key(conn, "pool-probe", ["system/*.read"]).token
    app = create_app(replace(get_settings(), auth="required", api_key_cache_seconds=0))
    client = app.test_client()
    headers = {"Authorization": f"Bearer {token}"}
    assert client.get("/jobs", headers=headers).status_code == 200
    monkeypatch.setattr(db, "PING_AFTER_IDLE_SECONDS", 60.0)
    _kill_next_pooled_connection(db_url)
    resp = client.get("/jobs", headers=headers)  # the lookup runs again on a new connection
    assert resp.status_code == 200, resp.get_data(as_text=True)
