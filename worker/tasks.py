"""Thin Celery tasks over `core.jobs`. Messages carry a job id and a dispatch generation only.

`JobTask` owns the database transaction: the task body gets a connection, its work commits when
the body returns and rolls back when it raises; the follow-up tasks it returns are sent only
after that commit, so no message can name uncommitted state.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import psycopg2
from billiard import pool as billiard_pool
from celery import Task
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import task_postrun, task_prerun
from psycopg2 import errors as pg_errors
from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError

from core.config import get_settings
from core.jobs import (
    Dispatch,
    JobCancelled,
    TimeLimitExceeded,
    claim_callback,
    finish_callback,
    get_job,
    job_json,
    jobs_url_for,
    reap,
    reap_callbacks,
    run_chunk,
    run_transaction_job,
)
from core.jobs.callback import deliver, delivery_time_limit, retry_delay
from core.jobs.control import recover_chunks
from core.logging import bind, reset
from core.store.db import get_engine
from worker.broker import broker_for
from worker.celery_app import celery

__all__ = ["JobTask", "enqueue"]

log = logging.getLogger(__name__)


class JobTask(Task):
    """Runs `run(conn, *args)` in one DB transaction, then enqueues what it returned.

    A lost database (restart, failover) ends the task with one log line and a retry after a
    short backoff, so its chain resumes within seconds of the database being back. A soft time
    limit rolls the work back and has the ledger split the chunk at once (core.jobs.control).
    """

    abstract = True
    typing = False  # the body takes `conn` first; Celery must not check call arguments
    retry_on_disconnect = True

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        try:
            with get_engine().begin() as conn:
                dispatches = self.run(conn, *args, **kwargs)
        except JobCancelled:
            log.info("%s%r: job cancelled while running; its work was rolled back",
                     self.name, args)
            return
        except TimeLimitExceeded:
            log.warning("%s%r: time limit reached; the chunk was rolled back", self.name, args)
            _recover(args[0])
            return
        except MemoryError:
            # Celery would take a MemoryError for the worker's own and stop the whole worker.
            log.error("%s%r: out of memory (FHIRQ_WORKER_MEMORY_MB); the chunk was rolled back",
                      self.name, args)
            _recover(args[0])
            return
        except DBAPIError as exc:
            if not database_lost(exc):
                raise
            self._database_lost(exc, args)
            return
        enqueue(dispatches or ())

    def _database_lost(self, exc: DBAPIError, args: Sequence[Any]) -> None:
        first_line = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
        if not self.retry_on_disconnect or self.request.called_directly:
            log.warning("%s%r: the database is unavailable (%s)", self.name, args, first_line)
            return
        countdown = min(5, 1 + self.request.retries)
        log.warning("%s%r: the database is unavailable (%s); retrying in %d s", self.name, args,
                    first_line, countdown)
        raise self.retry(countdown=countdown, max_retries=None)


# Errors that say the database connection is gone (not that this work is wrong).
_LOST = (pg_errors.AdminShutdown, pg_errors.CrashShutdown, pg_errors.CannotConnectNow,
         psycopg2.InterfaceError)


def database_lost(exc: DBAPIError) -> bool:
    return bool(exc.connection_invalidated) or isinstance(exc.orig, _LOST) or (
        type(exc.orig) is psycopg2.OperationalError  # cannot connect, server closed the line
    )


def _side() -> AbstractContextManager[Connection]:
    """A transaction of its own that commits at once (a chunk's claim)."""
    return get_engine().begin()


def _recover(job_id: str) -> None:
    """Split the job's dead chunks now, rather than at the reaper's next round."""
    with get_engine().begin() as conn:
        dispatches = recover_chunks(conn, get_settings().inflight_chunks, job_id)
    enqueue(dispatches)


def time_limits(seconds: int) -> tuple[int, int]:
    """(soft, hard) Celery limits for work allowed `seconds`: the soft one interrupts Python
    code, the hard one (SIGKILL) whatever ignores it."""
    return seconds, seconds + max(1, min(30, seconds // 4))


_CHUNK_SOFT, _CHUNK_HARD = time_limits(get_settings().chunk_time_limit)


@celery.task(base=JobTask, name="fhirq.chunk", soft_time_limit=_CHUNK_SOFT,
             time_limit=_CHUNK_HARD)
def chunk(conn: Connection, job_id: str, gen: int, chunk_id: int | None = None
          ) -> list[Dispatch]:
    _recover(job_id)
    return run_chunk(conn, job_id, gen, _side, chunk_id)


@celery.task(base=JobTask, name="fhirq.transaction")
def transaction(conn: Connection, job_id: str, gen: int = 0, chunk_id: int | None = None
                ) -> list[Dispatch]:
    _recover(job_id)
    return run_transaction_job(conn, job_id, _side, chunk_id)


@celery.task(base=JobTask, name="fhirq.reap")
def reaper(conn: Connection, starting: bool = False) -> list[Dispatch]:
    """`starting`: sent by a worker as it starts (after a crash, a deploy, a broker restart),
    when a job with nothing running and nothing queued needs no further wait."""
    cfg = get_settings()
    lost_after = delivery_time_limit(cfg.callback_timeout) + cfg.stall_seconds
    orphan = 0 if starting else cfg.orphan_seconds
    return reap(conn, cfg.stall_seconds, cfg.inflight_chunks,
                orphan_seconds=orphan, queue_empty=queue_empty()
                ) + reap_callbacks(conn, cfg.stall_seconds, lost_after, cfg.callback_attempts)


reaper.retry_on_disconnect = False  # the next round comes anyway


def queue_empty() -> bool:
    """True if the job queue holds no message (no task can be waiting there for a job); False
    when the broker cannot tell."""
    cfg = get_settings()
    try:
        return broker_for(cfg.broker).queue_stats(cfg.queue).waiting == 0
    except Exception:  # noqa: BLE001 - any broker trouble: assume busy, wait for the stall
        log.warning("could not read the depth of queue %s", cfg.queue, exc_info=True)
        return False


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


class SoftTimeLimit(SoftTimeLimitExceeded, TimeLimitExceeded):
    """Celery's soft time limit as `core` knows it: code in `core` catches `TimeLimitExceeded`,
    Celery's own handling sees its `SoftTimeLimitExceeded`."""


def _raise_soft_time_limit(signum: int, frame: Any) -> None:
    raise SoftTimeLimit()


@task_prerun.connect
def translate_time_limits(**_: Any) -> None:
    """In a pool process, make the soft time limit raise `SoftTimeLimit`. The pool installs
    its own handler of the signal after `worker_process_init`, so this runs as a task starts;
    elsewhere (the worker's main process, a solo pool) the signal means something else and
    keeps its handler."""
    sig = billiard_pool.SIG_SOFT_TIMEOUT
    if sig is not None and signal.getsignal(sig) is billiard_pool.soft_timeout_sighandler:
        signal.signal(sig, _raise_soft_time_limit)


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
    cfg = get_settings()
    for d in dispatches:
        task = _TASKS[d.task]
        if d.task == "callback":
            task.apply_async((d.job_id,), queue=cfg.queue)
        elif d.chunk is None:
            # No limits in the message: the worker's own settings apply (a message otherwise
            # carries the limits of whichever process sent it).
            task.apply_async((d.job_id, d.gen), queue=cfg.queue, time_limit=None,
                             soft_time_limit=None)
        else:
            soft, hard = time_limits(d.time_limit or cfg.chunk_time_limit)
            task.apply_async((d.job_id, d.gen, d.chunk), queue=cfg.queue,
                             soft_time_limit=soft, time_limit=hard)


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
