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

from core.store.db import get_engine
from worker.broker import broker_for

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


@bp.get("/readyz")
def readyz():  # type: ignore[no-untyped-def]
    from runtime.running import down_services

    reasons: dict[str, Any] = {}
    if (error := _database_error()) is not None:
        reasons["database"] = error
    cfg = current_app.config["FHIRQ"]
    # An API given no broker URL has no broker of its own to vouch for.
    if (cfg.broker_url or cfg.redis_url) and (error := broker_for(cfg.broker).problem()):
        reasons["broker"] = error
    down = [*reasons, *(name for name in down_services() if name not in reasons)]
    if any(name in CRITICAL for name in reasons):
        return jsonify(status="unavailable", down=down, reason=reasons), 503
    if down:
        return jsonify(status="degraded", down=down)
    return jsonify(status="ok")
