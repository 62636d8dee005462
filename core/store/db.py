"""Engine creation. Transactions are opened and committed only at the edges (API request,
worker task); `core` functions receive a live `Connection` and never commit."""

from __future__ import annotations

from functools import lru_cache

import orjson
from sqlalchemy import Engine, create_engine

from core.config import get_settings


def _json_dumps(value: object) -> str:
    return orjson.dumps(value).decode()


@lru_cache(maxsize=4)
def get_engine(url: str | None = None) -> Engine:
    url = url or get_settings().database_url
    if not url:
        raise RuntimeError("FHIRQ_DATABASE_URL is not set (fhirq up sets it for you)")
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg2://" + url[len("postgresql://") :]
    return create_engine(
        url,
        pool_size=10,
        max_overflow=20,
        pool_pre_ping=True,
        # Rare-token estimates cross the JIT cost threshold and JIT compilation then costs more
        # than the millisecond queries it is meant to speed up.
        connect_args={"options": "-c jit=off"},
        json_serializer=_json_dumps,
        json_deserializer=orjson.loads,
    )
