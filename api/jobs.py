"""Job endpoints: the FHIR async status URL (`/fhir/_async/<id>`) and the JSON job API
(`/jobs`, `/jobs/<id>`, `/jobs/<id>/entries`, `POST /jobs/<id>/retry`).

A job is visible only to its owner (`flask.g.owner`); anyone else gets 404, as for a job that
does not exist.
"""

from __future__ import annotations

from typing import Any

import orjson
from flask import Blueprint, Flask, Response, g, request

from api.http import base_url, fhir_response
from api.submit import accepted_headers, progress
from core.config import get_settings
from core.errors import BadRequest, Gone, NotFound
from core.fhir.outcome import informational
from core.jobs import (
    ACTIVE,
    cancel_job,
    get_job,
    job_json,
    jobs_url_for,
    list_entries,
    list_jobs,
    retry_failed,
    stream_response,
)
from core.jobs.views import ENTRY_FILTERS
from core.store.db import get_engine
from core.store.retry import in_transaction

__all__ = ["register", "status_bp", "jobs_bp"]

status_bp = Blueprint("job_status", __name__, url_prefix="/fhir")
jobs_bp = Blueprint("jobs", __name__, url_prefix="/jobs")

STATES = ("accepted", "running", "completed", "failed", "cancelled")
MAX_COUNT = 1000


def register(app: Flask) -> None:
    app.register_blueprint(status_bp)
    app.register_blueprint(jobs_bp)


def _owner() -> str:
    return g.get("owner", "anonymous")


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status=status, headers=headers,
                    mimetype="application/json")


def _jobs_url() -> str:
    """Absolute `/jobs` URL, beside the FHIR base (FHIRQ_BASE_URL when set)."""
    return jobs_url_for(base_url(request))


def _load(job_id: str) -> dict[str, Any]:
    # Polls are read-only: a pooled connection that a database restart ended is replaced
    # and the read runs again, instead of a 503 to every client polling at that moment.
    owner = _owner()
    job = in_transaction(get_engine(), lambda conn: get_job(conn, job_id, owner), what="job read")
    if job is None:
        raise NotFound(f"No job '{job_id}'")
    return job


def _kept(job: dict[str, Any]) -> str:
    """The job's id, or 410 once retention purged its entries (its summary stays a while)."""
    if job.get("entries_purged_at") is not None:
        raise Gone(
            f"Job {job['id']} ended at {job['finished_at']:%Y-%m-%d %H:%M} UTC; its entries and "
            f"results were purged after FHIRQ_JOB_RETENTION_DAYS "
            f"({get_settings().job_retention_days:g} days). GET /jobs/{job['id']} still shows "
            "its summary."
        )
    return str(job["id"])


def _int_arg(name: str, default: int, lo: int, hi: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be an integer", code="value") from None
    if not lo <= value <= hi:
        raise BadRequest(f"{name} must be between {lo} and {hi}", code="value")
    return value


# --------------------------------------------------------------------------- FHIR async


def _retry_after(job: dict[str, Any]) -> int:
    """Seconds until a poll is worth it: a tenth of the estimated time left, 1 to 10 s."""
    from core.jobs.views import rate

    speed = rate(job)
    if not speed:
        return 1 if job["total"] <= 1000 else 2
    left = (job["total"] - job["done"]) / speed
    return int(max(1, min(10, left / 10)))


@status_bp.get("/_async/<job_id>")
def poll(job_id: str) -> Response:
    """202 + Content-Location (this URL) + X-Progress + Retry-After while the job is at work;
    the response document when done; the OperationOutcome and its status for a failed
    transaction; 404 once cancelled or dismissed."""
    job = _load(job_id)
    job_id = job["id"]
    if job["dismissed_at"] is not None or job["state"] == "cancelled":
        raise NotFound(f"Job '{job_id}' was cancelled")
    if job["state"] in ACTIVE:
        headers = {**accepted_headers(base_url(request), job),
                   "Retry-After": str(_retry_after(job))}
        return fhir_response(informational(progress(job)), 202, headers)
    if job["state"] == "failed":
        return fhir_response(job["outcome"], job["outcome_status"] or 500)
    _kept(job)
    mimetype = "application/json" if job["kind"] == "upsert" else "application/fhir+json"
    return Response(stream_response(get_engine(), job), status=200, mimetype=mimetype)


@status_bp.delete("/_async/<job_id>")
def cancel(job_id: str) -> Response:
    job_id = _load(job_id)["id"]
    with get_engine().begin() as conn:
        state, dispatches = cancel_job(conn, job_id, _owner())
    if dispatches:
        from worker.tasks import enqueue_safely

        enqueue_safely(dispatches)
    text = (f"Job {job_id} cancelled: entries not yet run will not run."
            if state == "cancelled" else f"Job {job_id} ({state}) dismissed.")
    return fhir_response(informational(text), 202)


# --------------------------------------------------------------------------- JSON job API


@jobs_bp.get("")
def index() -> Response:
    state = request.args.get("state")
    if state is not None and state not in STATES:
        raise BadRequest(f"state must be one of {', '.join(STATES)}", code="value")
    count = _int_arg("_count", 50, 1, MAX_COUNT)
    offset = _int_arg("_offset", 0, 0, 10**9)
    owner = _owner()
    jobs = in_transaction(get_engine(), lambda conn: list_jobs(
        conn, owner, state=state, count=count, offset=offset), what="job list")
    url = _jobs_url()
    body: dict[str, Any] = {"jobs": [job_json(j, jobs_url=url) for j in jobs], "next": None}
    if len(jobs) == count:
        query = f"_count={count}&_offset={offset + count}" + (f"&state={state}" if state else "")
        body["next"] = f"{url}?{query}"
    return _json(body)


@jobs_bp.get("/<job_id>")
def show(job_id: str) -> Response:
    return _json(job_json(_load(job_id), jobs_url=_jobs_url()))


@jobs_bp.get("/<job_id>/entries")
def entries(job_id: str) -> Response:
    outcome = request.args.get("outcome")
    if outcome not in ENTRY_FILTERS:
        allowed = ", ".join(k for k in ENTRY_FILTERS if k)
        raise BadRequest(f"outcome must be one of {allowed}", code="value")
    count = _int_arg("_count", 100, 1, MAX_COUNT)
    after = _int_arg("_after", -1, -1, 2**31 - 1)
    job_id = _kept(_load(job_id))
    page = in_transaction(get_engine(), lambda conn: list_entries(
        conn, job_id, outcome=outcome, count=count, after=after), what="job entries read")
    body: dict[str, Any] = {"job": job_id, "entries": page, "next": None}
    if len(page) == count:
        query = f"_count={count}&_after={page[-1]['index']}"
        if outcome:
            query += f"&outcome={outcome}"
        body["next"] = f"{_jobs_url()}/{job_id}/entries?{query}"
    return _json(body)


@jobs_bp.post("/<job_id>/retry")
def retry(job_id: str) -> Response:
    job_id = _kept(_load(job_id))
    with get_engine().begin() as conn:
        n, dispatches = retry_failed(conn, job_id, _owner(), get_settings().inflight_chunks)
        job = get_job(conn, job_id, _owner())
    assert job is not None
    if dispatches:
        from worker.tasks import enqueue_safely

        enqueue_safely(dispatches)
    body = {"retried": n, "job": job_json(job, jobs_url=_jobs_url())}
    if n == 0:
        return _json(body)
    return _json(body, 202, accepted_headers(base_url(request), job))
