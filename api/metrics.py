"""`GET /metrics` for Prometheus, and the API's own instrumentation: the request latency
histogram, one log line per request (the access log), and the job id of job routes in the log
context.

Jobs, entries, throughput and queue depth are computed at scrape time from PostgreSQL and the
broker (`core.metrics`, `worker.broker`), so every API process answers the same. The latency
histogram is measured in each process: with `PROMETHEUS_MULTIPROC_DIR` set (an empty directory,
wiped at each start, shared by the API processes of a host), prometheus_client's multiprocess
mode sums it over all of them; without it, a scrape sees the histogram of the one process that
answered it.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterable
from typing import Any

from flask import Blueprint, Flask, Response, current_app, g, request
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.process_collector import ProcessCollector
from werkzeug.wsgi import ClosingIterator

from core.config import Settings
from core.logging import bind, reset
from core.metrics import JobsCollector
from core.store.db import get_engine
from worker.broker import broker_for

__all__ = ["REQUEST_SECONDS", "bp", "register"]

access_log = logging.getLogger("api.access")

REQUEST_SECONDS = Histogram(
    "fhirq_http_request_duration_seconds",
    "Time from request to the last byte of the response, by route template",
    ["method", "route", "status"],
    # Up to a minute: an async submission of 200 MB is one request.
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=None,
)

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Probes and scrapes come every few seconds; at INFO they would drown the requests that matter.
_QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
_ASYNC_URL = re.compile(r"/_async/([^/?#]+)$")
_EXT = "fhirq.metrics"

bp = Blueprint("metrics", __name__)


def register(app: Flask) -> None:
    settings: Settings = app.config["FHIRQ"]
    app.extensions[_EXT] = _registry(settings)
    app.register_blueprint(bp)
    app.before_request(_bind_job)
    app.after_request(_note_route)
    app.teardown_request(_unbind_job)
    app.wsgi_app = _Timed(app.wsgi_app)  # type: ignore[method-assign]


def _registry(settings: Settings) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(JobsCollector(settings, get_engine, broker_for(settings.broker)))
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        MultiProcessCollector(registry)
    else:
        registry.register(REQUEST_SECONDS)
        ProcessCollector(registry=registry)
    return registry


@bp.get("/metrics")
def metrics() -> Response:
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    body = encoder(current_app.extensions[_EXT])
    return Response(body, content_type=content_type, headers={"Cache-Control": "no-store"})


# --------------------------------------------------------------------------- request hooks


def _bind_job() -> None:
    job_id = (request.view_args or {}).get("job_id")
    if job_id is not None:
        g._fhirq_log_token = bind(job_id=job_id)


def _unbind_job(_exc: BaseException | None) -> None:
    token = g.pop("_fhirq_log_token", None)
    if token is not None:
        reset(token)


def _note_route(response: Response) -> Response:
    """Tell the WSGI wrapper, which outlives the request context, what it needs to record."""
    env = request.environ
    env["fhirq.route"] = request.url_rule.rule if request.url_rule is not None else "unmatched"
    job_id = (request.view_args or {}).get("job_id")
    if job_id is None and response.status_code == 202:  # a submission: its new job
        match = _ASYNC_URL.search(response.headers.get("Content-Location", ""))
        job_id = match.group(1) if match else None
    env["fhirq.job_id"] = job_id
    return response


class _Timed:
    """WSGI wrapper: times each request to its last byte (job results are streamed long after
    the view returned), then records the histogram and the access log line."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]
                 ) -> Iterable[bytes]:
        start = time.perf_counter()
        status = ["500"]

        def _start_response(line: str, headers: list[tuple[str, str]], *exc: Any) -> Any:
            status[0] = line.split(" ", 1)[0]
            return start_response(line, headers, *exc)

        def _done() -> None:
            _record(environ, status[0], time.perf_counter() - start)

        try:
            body = self.app(environ, _start_response)
        except BaseException:
            _done()
            raise
        return ClosingIterator(body, [_done])


def _record(environ: dict[str, Any], status: str, seconds: float) -> None:
    method = environ.get("REQUEST_METHOD", "")
    route = environ.get("fhirq.route", "unmatched")
    REQUEST_SECONDS.labels(method if method in _METHODS else "other", route, status).observe(
        seconds
    )
    path = environ.get("PATH_INFO", "")
    fields = {"method": method, "path": path, "route": route, "status": int(status),
              "duration_ms": round(seconds * 1000, 2)}
    if environ.get("fhirq.job_id"):
        fields["job_id"] = environ["fhirq.job_id"]
    # The path only: a search's query string can hold names and identifiers of patients.
    access_log.log(logging.DEBUG if path in _QUIET_PATHS else logging.INFO,
                   "%s %s %s %.1f ms", method, path, status, seconds * 1000, extra=fields)
