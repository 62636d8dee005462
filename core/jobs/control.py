"""Changing a job's course: cancel, dismiss, retry failed entries, the reaper that revives jobs
whose tasks were lost, and the once-only completion callback.

Each function runs in the caller's transaction and returns the tasks to enqueue after commit.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import Connection, text

from core.errors import Conflict, NotFound
from core.jobs.callback import MAX_RETRY_DELAY
from core.jobs.intake import initial_dispatches
from core.jobs.model import Dispatch

__all__ = [
    "cancel_job",
    "retry_failed",
    "reap",
    "reap_callbacks",
    "claim_callback",
    "finish_callback",
]

log = logging.getLogger(__name__)


def cancel_job(conn: Connection, job_id: str, owner: str) -> tuple[str, list[Dispatch]]:
    """DELETE on the status URL: cancel an active job, or dismiss a finished one.

    Pending entries of a cancelled job never run (a chunk running at this moment rolls back);
    finished entries stay and are reported by `/jobs/{id}/entries`. Either way the status URL
    answers 404 from now on. Returns the job's state and the tasks to send.
    """
    row = conn.execute(
        text(
            """
            UPDATE job SET
                state = CASE WHEN state IN ('accepted', 'running') THEN 'cancelled' ELSE state END,
                finished_at = coalesce(finished_at, now()),
                dismissed_at = now(), updated_at = now()
            WHERE id = :id AND owner = :owner AND dismissed_at IS NULL
            RETURNING state, callback_state = 'pending' AND state = 'cancelled' AS call
            """
        ),
        {"id": job_id, "owner": owner},
    ).first()
    if row is None:
        raise NotFound(f"No job '{job_id}'")
    return row.state, [Dispatch("callback", job_id)] if row.call else []


def retry_failed(
    conn: Connection, job_id: str, owner: str, inflight: int
) -> tuple[int, list[Dispatch]]:
    """Make a finished batch's failed entries pending again (same indexes) and restart it.

    Returns how many entries will run again. NDJSON lines that were not JSON cannot succeed on
    a retry and stay failed.
    """
    job = conn.execute(
        text(
            "SELECT kind, state, chunk_size, gen, dismissed_at FROM job "
            "WHERE id = :id AND owner = :owner FOR UPDATE"
        ),
        {"id": job_id, "owner": owner},
    ).mappings().first()
    if job is None:
        raise NotFound(f"No job '{job_id}'")
    if job["kind"] == "transaction":
        raise Conflict(
            "A transaction is all or nothing: submit it again instead of retrying entries",
            code="business-rule",
        )
    if job["state"] != "completed" or job["dismissed_at"] is not None:
        raise Conflict(
            f"Only a completed job can be retried; this one is {job['state']}",
            code="business-rule",
        )
    n = conn.execute(
        text(
            """
            UPDATE job_entry SET status = NULL, location = NULL, etag = NULL,
                last_modified = NULL, outcome = NULL, res_type = NULL, res_id = NULL,
                res_version = NULL, resource = NULL, finished_at = NULL
            WHERE job_id = :id AND status >= 400 AND request IS NOT NULL
            """
        ),
        {"id": job_id},
    ).rowcount
    if n == 0:
        return 0, []
    gen = job["gen"] + 1
    conn.execute(
        text(
            """
            UPDATE job SET state = 'running', done = done - :n, failed = failed - :n,
                gen = :gen, finished_at = NULL, updated_at = now(),
                callback_state = CASE WHEN callback_url IS NULL THEN NULL ELSE 'pending' END,
                callback_attempts = 0, callback_claimed_at = NULL
            WHERE id = :id
            """
        ),
        {"id": job_id, "n": n, "gen": gen},
    )
    return n, initial_dispatches(job_id, job["kind"], n, job["chunk_size"], inflight, gen)


def mark_running(conn: Connection, job_id: str) -> None:
    """Show an accepted job as running. A transaction job does all its work in one database
    transaction, so without this short one before it, pollers would see `accepted` until the
    end."""
    conn.execute(
        text(
            "UPDATE job SET state = 'running', started_at = coalesce(started_at, now()), "
            "updated_at = now() WHERE id = :id AND state = 'accepted'"
        ),
        {"id": job_id},
    )


def reap(conn: Connection, stall_seconds: float, inflight: int) -> list[Dispatch]:
    """Revive active jobs that made no progress for `stall_seconds` (their tasks were lost:
    a worker was killed, Redis was flushed). `reap_callbacks` does the same for callbacks.

    A revived job gets a new dispatch generation: whatever old tasks still exist finish their
    chunk but no longer chain, so the number of tasks per job stays bounded. What runs is
    exactly what is missing, since tasks claim only pending entries.
    """
    stalled = conn.execute(
        text(
            """
            UPDATE job j SET gen = gen + 1, updated_at = now()
            WHERE state IN ('accepted', 'running')
              AND updated_at < now() - make_interval(secs => :stall)
            RETURNING id, kind, gen, chunk_size,
                (SELECT count(*) FROM job_entry e
                 WHERE e.job_id = j.id AND e.status IS NULL) AS pending
            """
        ),
        {"stall": stall_seconds},
    ).mappings().all()
    out: list[Dispatch] = []
    for job in stalled:
        log.warning("job %s made no progress for %ss: re-dispatching %d pending entries",
                    job["id"], stall_seconds, job["pending"])
        out += initial_dispatches(job["id"], job["kind"], job["pending"], job["chunk_size"],
                                  inflight, job["gen"])
        if job["pending"] == 0 and job["kind"] != "transaction":
            # Every entry is done but the last chunk died before counting: recount.
            _recount(conn, job["id"])
    return out


def _recount(conn: Connection, job_id: str) -> None:
    conn.execute(
        text(
            """
            UPDATE job j SET done = c.done, succeeded = c.ok, failed = c.done - c.ok,
                state = CASE WHEN c.done >= j.total THEN 'completed' ELSE j.state END,
                finished_at = CASE WHEN c.done >= j.total THEN now() ELSE j.finished_at END
            FROM (SELECT count(status) AS done, count(*) FILTER (WHERE status < 400) AS ok
                  FROM job_entry WHERE job_id = :id) c
            WHERE j.id = :id
            """
        ),
        {"id": job_id},
    )


def reap_callbacks(
    conn: Connection, stall_seconds: float, lost_after: float, attempts: int
) -> list[Dispatch]:
    """Send again the callbacks whose task was lost (delivery is at least once).

    - `pending` for `stall_seconds` after the job ended and not waiting for a retry: its task
      never ran (the broker lost it).
    - `sending` for longer than `lost_after` (one attempt's time limit, and then some): the
      worker died while sending. Resent unless all `attempts` were made (then `failed`).
    A receiver may see one ending twice; `X-Fhirq-Delivery-Id` tells it so.
    """
    resent = conn.execute(
        text(
            """
            UPDATE job SET callback_state =
                CASE WHEN callback_attempts >= :attempts THEN 'failed' ELSE 'pending' END
            WHERE callback_state = 'sending'
              AND callback_claimed_at < now() - make_interval(secs => :lost)
            RETURNING id, callback_state
            """
        ),
        {"lost": lost_after, "attempts": attempts},
    ).mappings().all()
    for row in resent:
        log.warning("job %s: callback delivery lost its worker; %s", row["id"],
                    "sending again" if row["callback_state"] == "pending" else "giving up")
    waiting = conn.execute(
        text(
            """
            SELECT id FROM job
            WHERE callback_state = 'pending' AND state IN ('completed', 'failed', 'cancelled')
              AND finished_at < now() - make_interval(secs => :stall)
              AND (callback_claimed_at IS NULL
                   OR callback_claimed_at < now() - make_interval(secs => :retry))
            """
        ),
        {"stall": stall_seconds, "retry": lost_after + MAX_RETRY_DELAY},
    ).scalars().all()
    ids = dict.fromkeys([r["id"] for r in resent if r["callback_state"] == "pending"] + waiting)
    return [Dispatch("callback", job_id) for job_id in ids]


def claim_callback(conn: Connection, job_id: str) -> dict[str, Any] | None:
    """Take the job's pending callback (so that no other task sends it) and count the attempt;
    None if there is nothing to send."""
    row = conn.execute(
        text(
            """
            UPDATE job SET callback_state = 'sending', callback_claimed_at = now(),
                callback_attempts = callback_attempts + 1
            WHERE id = :id AND callback_state = 'pending'
              AND state IN ('completed', 'failed', 'cancelled')
            RETURNING id, owner, callback_url, gen, callback_attempts AS attempt
            """
        ),
        {"id": job_id},
    ).mappings().first()
    if row is None:
        return None
    # One ending of the job (a retry of failed entries starts a new generation, and ends anew).
    return {**row, "delivery_id": f"{job_id}.{row['gen']}"}


def finish_callback(conn: Connection, job_id: str, *, sent: bool, final: bool) -> None:
    """Record a delivery attempt: sent, given up (`final`), or pending again for a retry."""
    state = "sent" if sent else ("failed" if final else "pending")
    conn.execute(
        text(
            "UPDATE job SET callback_state = :state "
            "WHERE id = :id AND callback_state = 'sending'"
        ),
        {"id": job_id, "state": state},
    )
