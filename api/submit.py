"""Async submission (`Prefer: respond-async` on `POST [base]` / `PUT [base]`): check the
envelope, persist the job and every entry, commit, then enqueue, and answer `202 Accepted` with
the status URL in `Content-Location` and the job's progress in `X-Progress`, as every poll of a
job still at work answers (`accepted_headers`).

The body is streamed into PostgreSQL (see `core.jobs.intake`); it is never held whole in the
API's memory. Headers: `Idempotency-Key` (same key and body → the same job), `X-Callback-Url`
(POSTed the job's JSON status when it ends; see `core.jobs.callback` for what it may name).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

from flask import Request, Response, g
from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError

from api.http import base_url, fhir_response, prefer_return, settings
from core.errors import BadRequest, TooLarge
from core.fhir.outcome import informational
from core.jobs import Accepted, Submission, accept_job, get_job
from core.jobs.callback import check_callback_url
from core.jobs.control import revive_if_orphaned
from core.jobs.quota import Quota
from core.store.db import get_engine

__all__ = ["accepted_headers", "progress", "status_url", "submit_async"]

log = logging.getLogger(__name__)

T = TypeVar("T")

NDJSON_TYPES = ("application/fhir+ndjson", "application/x-ndjson", "application/ndjson")
MAX_KEY_LENGTH = 255


def status_url(base: str, job_id: str) -> str:
    return f"{base}/_async/{job_id}"


def progress(job: dict[str, Any]) -> str:
    return (f"{job['state']}: {job['done']} of {job['total']} entries done, "
            f"{job['failed']} failed")


def accepted_headers(base: str, job: dict[str, Any]) -> dict[str, str]:
    """Headers of every 202 about a job: clients that follow the FHIR async pattern (Medplum's,
    for one) take the next URL to poll from `Content-Location` of each 202, not only the first."""
    return {"Content-Location": status_url(base, job["id"]), "X-Progress": progress(job)}


def submit_async(kind: str, request: Request) -> Response:
    """Accept `request` as a job of `kind` ("bundle": batch/transaction; "upsert": array or
    NDJSON of resources). Must be called before anything reads the request body."""
    if kind not in ("bundle", "upsert"):
        raise ValueError(f"unknown submission kind {kind!r}")
    cfg = settings()
    ndjson = (request.mimetype or "").lower() in NDJSON_TYPES
    if ndjson and kind == "bundle":
        raise BadRequest("A Bundle is one JSON document, not NDJSON", code="not-supported")
    length = request.content_length
    if length is not None and length > cfg.async_max_bytes:
        raise TooLarge(
            f"The body has {length} bytes; a job takes at most {cfg.async_max_bytes} "
            "(FHIRQ_ASYNC_MAX_BYTES)."
        )
    key = request.headers.get("Idempotency-Key")
    if key is not None and not (0 < len(key.strip()) <= MAX_KEY_LENGTH):
        raise BadRequest(f"Idempotency-Key must have 1 to {MAX_KEY_LENGTH} characters")
    callback = request.headers.get("X-Callback-Url")
    if callback is not None:
        check_callback_url(callback, cfg.callback_allow)

    base = base_url(request)
    sub = Submission(
        kind=kind,  # type: ignore[arg-type]
        owner=g.get("owner", "anonymous"),
        base_url=base,
        prefer_return=prefer_return(request),
        ndjson=ndjson,
        chunk_size=cfg.chunk_size,
        max_bytes=cfg.async_max_bytes,
        inflight_chunks=cfg.inflight_chunks,
        idempotency_key=key.strip() if key else None,
        callback_url=callback,
        scopes=g.principal.scopes,
        quota=Quota(cfg.max_active_jobs, cfg.max_submissions_per_minute),
    )
    body = _Watched(request.stream)

    def accept(conn: Connection) -> tuple[Accepted, list[Any], dict[str, Any] | None]:
        accepted = accept_job(conn, body, sub)
        dispatches = accepted.dispatches
        if accepted.replayed:
            # The first submission may have died between its commit and its enqueue.
            dispatches = revive_if_orphaned(conn, accepted.job_id, cfg.inflight_chunks)
        return accepted, dispatches, get_job(conn, accepted.job_id, sub.owner)

    accepted, dispatches, job = _accept_once_more_if_lost(accept, body)
    assert job is not None
    if dispatches:
        from worker.tasks import enqueue_safely

        enqueue_safely(dispatches)

    headers = {**accepted_headers(base, job), "X-Job-Id": accepted.job_id}
    url = headers["Content-Location"]
    if accepted.replayed:
        headers["Idempotent-Replayed"] = "true"
        text = f"Job {accepted.job_id} was already submitted with this Idempotency-Key."
    else:
        text = f"Job {accepted.job_id} accepted: {accepted.total} {accepted.kind} entries."
    log.info("job %s accepted (%s, %d entries, replayed=%s)", accepted.job_id, accepted.kind,
             accepted.total, accepted.replayed)
    return fhir_response(informational(f"{text} Poll {url} for the result."), 202, headers)


class _Watched:
    """The request body, noting whether anything has read it yet."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.touched = False

    def read(self, size: int = -1) -> bytes:
        self.touched = True
        return bytes(self.stream.read(size))


def _accept_once_more_if_lost(work: Callable[[Connection], T], body: _Watched) -> T:
    """`work` in a transaction; run once more on a new connection if the pooled one turns out
    dead (a database restart) before the body was read: the API does not ping every pooled
    connection first (core.store.db). Once the body is being read it cannot be read again."""
    for attempt in (1, 2):
        try:
            with get_engine().begin() as conn:
                return work(conn)
        except DBAPIError as exc:
            if attempt == 2 or not exc.connection_invalidated or body.touched:
                raise
            log.warning("async submission: the database connection was lost (%s) before the "
                        "body was read; accepting it on a new one", type(exc.orig).__name__)
    raise AssertionError("unreachable")
