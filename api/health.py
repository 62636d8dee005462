"""Liveness and readiness probes (no authentication).

`/healthz` answers while the process serves. `/readyz` says what is down: 503 while the
database or the broker cannot be reached (nothing can be accepted or enqueued), 200 with
`"status": "degraded"` while `fhirq up` is restarting another of its processes (a worker, beat)
— requests are still accepted; jobs wait for the worker.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, jsonify
from sqlalchemy import text

from core.services import redis_client_url
from core.store.db import get_engine

bp = Blueprint("health", __name__)

CRITICAL = ("database", "broker")


@bp.get("/healthz")
def healthz():  # type: ignore[no-untyped-def]
    return jsonify(status="ok")


def _database_error() -> str | None:
    try:
        with get_engine().connect() as c:
            c.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - readiness reports any failure
        return type(exc).__name__
    return None


def _broker_error(url: str | None) -> str | None:
    if not url or not url.startswith(("redis", "unix", "socket")):
        return None  # another broker: its client reconnects on its own
    import redis

    client = redis.Redis.from_url(redis_client_url(url), socket_timeout=1,
                                  socket_connect_timeout=1)
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        return type(exc).__name__
    finally:
        client.close()
    return None


@bp.get("/readyz")
def readyz():  # type: ignore[no-untyped-def]
    from runtime.running import down_services

    reasons: dict[str, Any] = {}
    if (error := _database_error()) is not None:
        reasons["database"] = error
    if (error := _broker_error(current_app.config["FHIRQ"].redis_url)) is not None:
        reasons["broker"] = error
    down = [*reasons, *(name for name in down_services() if name not in reasons)]
    if any(name in CRITICAL for name in reasons):
        return jsonify(status="unavailable", down=down, reason=reasons), 503
    if down:
        return jsonify(status="degraded", down=down)
    return jsonify(status="ok")
