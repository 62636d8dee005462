"""The Flask app factory. The API is thin: parse, authenticate, check the envelope, call `core`,
answer. Each concern is one blueprint; `api.errors` turns every failure into an
OperationOutcome."""

from __future__ import annotations

from flask import Flask

from core.config import Settings, get_settings


def create_app(settings: Settings | None = None) -> Flask:
    app = Flask(__name__)
    app.config["FHIRQ"] = settings or get_settings()
    from core.store.db import ping_only_after_idle

    # No `SELECT 1` round trip before every request's transaction: only a connection idle for
    # a second is checked first (core.store.db); the request transactions survive a dead one.
    ping_only_after_idle(1.0)

    from api import auth, errors, fhir, health, ids, jobs, metrics, openapi, ui
    from api.guard import guard

    errors.register(app)
    auth.register(app)  # first of the before_request hooks: everything after knows g.owner
    ids.register(app)  # then path ids, before any view or hook uses one
    app.register_blueprint(health.bp)
    app.register_blueprint(fhir.bp)
    jobs.register(app)
    # Inside the metrics wrapper, so refusals before routing are counted and logged too.
    app.wsgi_app = guard(app.wsgi_app, app.config["FHIRQ"])  # type: ignore[method-assign]
    metrics.register(app)  # /metrics, request latency and access log, job id in log context
    app.register_blueprint(ui.bp)
    app.register_blueprint(openapi.bp)
    return app
