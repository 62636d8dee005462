"""Thin Celery tasks over `core.jobs`. Messages carry a job id and a dispatch generation only.

`JobTask` owns the database transaction: the task body gets a connection, its work commits when
the body returns and rolls back when it raises; the follow-up tasks it returns are sent only
after that commit, so no message can name uncommitted state.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from celery import Task
from celery.signals import task_postrun, task_prerun
from sqlalchemy import Connection

from core.config import get_settings
from core.jobs import (
    Dispatch,
    JobCancelled,
    claim_callback,
    finish_callback,
    get_job,
    job_json,
    jobs_url_for,
    mark_running,
    reap,
    reap_callbacks,
    run_chunk,
    run_transaction_job,
)
from core.jobs.callback import deliver, delivery_time_limit, retry_delay
from core.logging import bind, reset
from core.store.db import get_engine
from worker.celery_app import celery

__all__ = ["JobTask", "enqueue"]

log = logging.getLogger(__name__)


class JobTask(Task):
    """Runs `run(conn, *args)` in one DB transaction, then enqueues what it returned."""

    abstract = True
    typing = False  # the body takes `conn` first; Celery must not check call arguments

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        try:
            with get_engine().begin() as conn:
                dispatches = self.run(conn, *args, **kwargs)
        except JobCancelled:
            log.info("%s%r: job cancelled while running; its work was rolled back",
                     self.name, args)
            return
        enqueue(dispatches or ())


@celery.task(base=JobTask, name="fhirq.chunk", soft_time_limit=get_settings().chunk_time_limit,
             time_limit=get_settings().chunk_time_limit + 30)
def chunk(conn: Connection, job_id: str, gen: int) -> list[Dispatch]:
    return run_chunk(conn, job_id, gen)


@celery.task(base=JobTask, name="fhirq.transaction")
def transaction(conn: Connection, job_id: str, gen: int = 0) -> list[Dispatch]:
    with get_engine().begin() as status:  # committed now, before the long transaction
        mark_running(status, job_id)
    return run_transaction_job(conn, job_id)


@celery.task(base=JobTask, name="fhirq.reap")
def reaper(conn: Connection) -> list[Dispatch]:
    cfg = get_settings()
    lost_after = delivery_time_limit(cfg.callback_timeout) + cfg.stall_seconds
    return reap(conn, cfg.stall_seconds, cfg.inflight_chunks) + reap_callbacks(
        conn, cfg.stall_seconds, lost_after, cfg.callback_attempts
    )


# The time limits end an attempt that a receiver drags out (one byte at a time); the callback
# then stays `sending` and the reaper sends it again.
@celery.task(name="fhirq.callback", bind=True, max_retries=None,
             soft_time_limit=delivery_time_limit(get_settings().callback_timeout) - 5,
             time_limit=delivery_time_limit(get_settings().callback_timeout))
def callback(self: Task, job_id: str) -> None:
    """POST the job's status to its callback URL until one attempt succeeds (at least once:
    see `reap_callbacks`). Two short transactions around the HTTP call: the claim (so no other
    task sends it; it counts the attempt) and the outcome."""
    cfg = get_settings()
    with get_engine().begin() as conn:
        claim = claim_callback(conn, job_id)
        if claim is None:
            return
        job = get_job(conn, job_id, claim["owner"])
    assert job is not None
    payload = job_json(job, jobs_url=jobs_url_for(job["base_url"]))
    sent = deliver(claim["callback_url"], payload, timeout=cfg.callback_timeout,
                   allow=cfg.callback_allow, delivery_id=claim["delivery_id"])
    final = sent or claim["attempt"] >= cfg.callback_attempts
    with get_engine().begin() as conn:
        finish_callback(conn, job_id, sent=sent, final=final)
    if not final:
        raise self.retry(countdown=retry_delay(claim["attempt"]))


_TASKS = {"chunk": chunk, "transaction": transaction, "callback": callback}
# Tasks whose first argument is a job id.
_JOB_TASKS = frozenset(t.name for t in _TASKS.values())


@task_prerun.connect
def _bind_log_context(task_id: str, task: Task, args: Sequence[Any] = (), **_: Any) -> None:
    """Every record a task logs, Celery's own "succeeded in 0.4s" included (it comes before
    task_postrun), carries the job id."""
    job_id = args[0] if task.name in _JOB_TASKS and args else None
    task.request.log_token = bind(job_id=job_id, task=task.name, task_id=task_id)


@task_postrun.connect
def _reset_log_context(task: Task, **_: Any) -> None:
    token = getattr(task.request, "log_token", None)
    if token is not None:
        reset(token)


def enqueue(dispatches: Iterable[Dispatch]) -> None:
    """Send follow-up tasks. Call only after the transaction that produced them committed."""
    for d in dispatches:
        task = _TASKS[d.task]
        if d.task == "callback":
            task.apply_async((d.job_id,))
        else:
            task.apply_async((d.job_id, d.gen))


def enqueue_safely(dispatches: Sequence[Dispatch]) -> bool:
    """`enqueue` for the API: a broker outage must not fail a request whose job is committed
    (the reaper sends the job's tasks once the broker is back). False if sending failed."""
    try:
        enqueue(dispatches)
    except Exception:  # noqa: BLE001 - any broker failure; the job is safe in PostgreSQL
        log.exception("could not enqueue %d task(s); the reaper will send them", len(dispatches))
        return False
    return True


@celery.task(name="fhirq.prune")
def prune() -> dict[str, int]:
    """Retention (core.jobs.retention): purge what finished jobs left behind, in short
    transactions, for at most a minute a run (the next run goes on)."""
    from core.jobs.retention import prune as run_prune

    cfg = get_settings()
    done = run_prune(get_engine(), entry_days=cfg.job_retention_days,
                     summary_days=max(cfg.job_summary_retention_days, cfg.job_retention_days),
                     max_seconds=60)
    if done.anything:
        log.info("retention: %d entries deleted, %d jobs emptied, %d summaries deleted",
                 done.entries, done.jobs_emptied, done.jobs_deleted)
    return {"entries": done.entries, "jobsEmptied": done.jobs_emptied,
            "jobsDeleted": done.jobs_deleted}


@celery.task(base=JobTask, name="fhirq.slots")
def slots(conn: Connection) -> list[Dispatch]:
    """Weekly Slot generation (core.jobs.slots): submits a batch job of `fhirq-scheduler`."""
    from core.jobs.slots import submit_slot_job

    cfg = get_settings()
    run = submit_slot_job(conn, base_url=cfg.base_url or "", chunk_size=cfg.chunk_size,
                          inflight_chunks=cfg.inflight_chunks)
    log.info("slot generation: %s", run.summary())
    return run.accepted.dispatches if run.accepted else []
