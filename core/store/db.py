"""Engine creation. Transactions are opened and committed only at the edges (API request,
worker task); `core` functions receive a live `Connection` and never commit."""

from __future__ import annotations

from functools import lru_cache

import orjson
from sqlalchemy import Engine, create_engine, event

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


@lru_cache(maxsize=4)
def get_engine(url: str | None = None) -> Engine:
    url = url or get_settings().database_url
    if not url:
        raise RuntimeError("FHIRQ_DATABASE_URL is not set (fhirq up sets it for you)")
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg2://" + url[len("postgresql://") :]
    engine = create_engine(
        url,
        pool_size=10,
        max_overflow=20,
        pool_pre_ping=True,
        connect_args={
            # Rare-token estimates cross the JIT cost threshold and JIT compilation then costs
            # more than the millisecond queries it is meant to speed up.
            "options": "-c jit=off " + _DEAD_PEER_SERVER,
            **_DEAD_PEER_CLIENT,
        },
        json_serializer=_json_dumps,
        json_deserializer=orjson.loads,
    )
    # Each session gets the staging table that bulk writes COPY into, once (core.store.repository).
    event.listen(engine, "connect", lambda dbapi, record: prepare_session(dbapi, record.info))
    return engine
