"""Engine creation. Transactions are opened and committed only at the edges (API request,
worker task); `core` functions receive a live `Connection` and never commit."""

from __future__ import annotations

import time
from functools import lru_cache
from typing import Any

import orjson
import psycopg2
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DisconnectionError

from core.config import get_settings
from core.store.repository import prepare_session


def _json_dumps(value: object) -> str:
    return orjson.dumps(value).decode()


# A peer cut off by the network (a host's link down, a partition) sends no FIN or RST: without
# keepalives PostgreSQL keeps its session, idle in transaction and holding its chunk's lock,
# for hours (the kernel's default), so that chunk never runs again elsewhere. Both ends probe
# an idle connection after 5 s and give up after 3 unanswered probes 2 s apart (~11 s), or
# after 15 s of unacknowledged data; a live peer's kernel answers probes however busy it is.
# Ignored on unix sockets.
_DEAD_PEER_SERVER = ("-c tcp_keepalives_idle=5 -c tcp_keepalives_interval=2 "
                     "-c tcp_keepalives_count=3 -c tcp_user_timeout=15000")
_DEAD_PEER_CLIENT = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2,
                     "keepalives_count": 3, "tcp_user_timeout": 15000}


# A pooled connection idle longer than this is pinged before use (see _ping_if_idle): 0 pings
# every reuse (as SQLAlchemy's pool_pre_ping would), what workers keep (one ping per chunk is
# nothing, and it spares a task retry after a database restart); the API process sets 1 s.
PING_AFTER_IDLE_SECONDS = 0.0


def ping_only_after_idle(seconds: float) -> None:
    """Ping pooled connections of this process only when they were idle `seconds` or more."""
    global PING_AFTER_IDLE_SECONDS
    PING_AFTER_IDLE_SECONDS = seconds


@lru_cache(maxsize=4)
def get_engine(url: str | None = None) -> Engine:
    settings = get_settings()
    url = url or settings.database_url
    if not url:
        raise RuntimeError("FHIRQ_DATABASE_URL is not set (fhirq up sets it for you)")
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg2://" + url[len("postgresql://") :]
    # Rare-token estimates cross the JIT cost threshold and JIT compilation then costs more
    # than the millisecond queries it is meant to speed up.
    options = "-c jit=off " + _DEAD_PEER_SERVER
    if settings.synchronous_commit == "off":
        options += " -c synchronous_commit=off"
    engine = create_engine(
        url,
        pool_size=10,
        max_overflow=20,
        # The most recently returned connection first: under load the same few stay busy
        # (and never idle long enough to need a ping); the rest age out of use.
        pool_use_lifo=True,
        connect_args={"options": options, **_DEAD_PEER_CLIENT},
        json_serializer=_json_dumps,
        json_deserializer=orjson.loads,
    )
    # Each session gets the staging table that bulk writes COPY into, once (core.store.repository).
    event.listen(engine, "connect", lambda dbapi, record: prepare_session(dbapi, record.info))
    event.listen(engine.pool, "checkin", _note_idle)
    event.listen(engine.pool, "checkout", _ping_if_idle)
    return engine


# Pessimistic disconnect handling, for connections that may have gone stale. SQLAlchemy's
# pool_pre_ping sends a `SELECT 1` before every use: for the API a round trip through a busy
# server per request (15 % of an API process's wall-clock samples at W5's peak, waiting). With
# a threshold, a connection back in the pool within it is used as it is; one idle longer (long
# enough for a database restart or a dropped link to have gone unseen) is pinged first and
# replaced if the ping fails. A connection that turns out dead in use fails its statement, and
# SQLAlchemy discards it and every pooled connection older than it; the API's request
# transactions then run once more on a new one (core.store.retry.in_transaction).

def _note_idle(dbapi_conn: Any, record: Any) -> None:
    record.info["idle_since"] = time.monotonic()


def _ping_if_idle(dbapi_conn: Any, record: Any, proxy: Any) -> None:
    since = record.info.get("idle_since")
    if since is None:
        return  # just connected
    if PING_AFTER_IDLE_SECONDS and time.monotonic() - since < PING_AFTER_IDLE_SECONDS:
        return  # back in the pool a moment ago
    try:
        with dbapi_conn.cursor() as cur:
            cur.execute("SELECT 1")
        # The ping opened a transaction (psycopg2 is not in autocommit); end it, so that the
        # caller's BEGIN starts from a clean connection.
        dbapi_conn.rollback()
    except psycopg2.Error as exc:
        # The pool discards this connection and checks out another (a fresh one if need be).
        raise DisconnectionError(f"stale pooled connection: {exc}") from exc
