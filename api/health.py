"""Liveness and readiness probes (no authentication)."""

from __future__ import annotations

from flask import Blueprint, jsonify
from sqlalchemy import text

from core.store.db import get_engine

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():  # type: ignore[no-untyped-def]
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz():  # type: ignore[no-untyped-def]
    try:
        with get_engine().connect() as c:
            c.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - readiness reports any failure
        return jsonify(status="unavailable", reason=type(exc).__name__), 503
    return jsonify(status="ok")
