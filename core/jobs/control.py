"""Changing a job's course: cancel, dismiss, retry failed entries, the reaper that revives jobs
whose tasks were lost and isolates poison entries, and the once-only completion callback.

Each function runs in the caller's transaction and returns the tasks to enqueue after commit.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from itertools import pairwise
from typing import Any

from sqlalchemy import Connection, text

from core.errors import Conflict, FhirError, NotFound
from core.fhir.bundle import upsert_outcome
from core.fhir.model import EntryResult
from core.fhir.outcome import from_error
from core.jobs import chunks
from core.jobs.callback import MAX_RETRY_DELAY
from core.jobs.chunks import LIVE
from core.jobs.intake import initial_dispatches
from core.jobs.model import Dispatch
from core.jobs.runner import count_results, fail_transaction, write_results

__all__ = [
    "cancel_job",
    "retry_failed",
    "reap",
    "reap_callbacks",
    "recover_chunks",
    "revive",
    "revive_if_orphaned",
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
            DELETE FROM job_result r USING job_entry e
            WHERE r.job_id = :id AND r.status >= 400
              AND e.job_id = r.job_id AND e.idx = r.idx AND e.request IS NOT NULL
            """
        ),
        {"id": job_id},
    ).rowcount
    if n == 0:
        return 0, []
    conn.execute(text("DELETE FROM job_chunk WHERE job_id = :id"), {"id": job_id})
    gen = job["gen"] + 1
    conn.execute(
        text(
            """
            UPDATE job SET state = 'running', done = done - :n, failed = failed - :n,
                gen = :gen, finished_at = NULL, updated_at = now(), claimed_upto = 0,
                callback_state = CASE WHEN callback_url IS NULL THEN NULL ELSE 'pending' END,
                callback_attempts = 0, callback_claimed_at = NULL
            WHERE id = :id
            """
        ),
        {"id": job_id, "n": n, "gen": gen},
    )
    return n, initial_dispatches(job_id, job["kind"], n, job["chunk_size"], inflight, gen)


def reap(conn: Connection, stall_seconds: float, inflight: int, *,
         orphan_seconds: float | None = None, queue_empty: bool = False) -> list[Dispatch]:
    """Heal active jobs, and send callbacks that were never sent.

    First the chunks whose task died (`recover_chunks`). Then jobs left with no live chunk and
    no progress (their messages were lost: Redis restarted empty, the API died between commit
    and enqueue): after `orphan_seconds` when the queue is empty, since no message can then be
    waiting for them, and after `stall_seconds` however busy the queue is. A revived job gets a
    new dispatch generation: whatever old tasks still exist finish their chunk but no longer
    chain, so the number of tasks per job stays bounded. What runs is exactly what is missing.
    `reap_callbacks` does the same for callbacks.
    """
    out = recover_chunks(conn, inflight)
    quick = orphan_seconds if queue_empty and orphan_seconds is not None else stall_seconds
    stalled = conn.execute(
        text(
            f"""
            SELECT id FROM job j
            WHERE state IN ('accepted', 'running')
              AND updated_at < now() - make_interval(secs => :quick)
              AND NOT EXISTS (SELECT 1 FROM job_chunk c WHERE c.job_id = j.id AND {LIVE})
            FOR UPDATE SKIP LOCKED
            """
        ),
        {"quick": min(quick, stall_seconds)},
    ).scalars().all()
    for job_id in stalled:
        dispatches = revive(conn, job_id, inflight)
        log.warning("job %s made no progress and has no live task: re-dispatched %d task(s)",
                    job_id, len(dispatches))
        out += dispatches
    # Ledger rows of jobs that ended meanwhile (cancelled while a chunk ran).
    conn.execute(text(
        f"DELETE FROM job_chunk c USING job j WHERE j.id = c.job_id "
        f"AND j.state NOT IN ('accepted', 'running') AND NOT {LIVE}"
    ))
    return out


def revive(conn: Connection, job_id: str, inflight: int, *, recount: bool = True
           ) -> list[Dispatch]:
    """Send an active job's tasks again, under a new dispatch generation: its waiting ledger
    rows, and chains for its unclaimed entries. Harmless if its old tasks were alive after all:
    they finish what they run and stop chaining."""
    job = conn.execute(
        text(
            """
            UPDATE job SET gen = gen + 1, updated_at = now()
            WHERE id = :id AND state IN ('accepted', 'running')
            RETURNING kind, gen, chunk_size, claimed_upto
            """
        ),
        {"id": job_id},
    ).mappings().first()
    if job is None:
        return []
    task = "transaction" if job["kind"] == "transaction" else "chunk"
    queued = conn.execute(
        text("SELECT id, time_limit FROM job_chunk WHERE job_id = :id AND state = 'queued'"),
        {"id": job_id},
    ).all()
    out = [Dispatch(task, job_id, job["gen"], c.id, c.time_limit) for c in queued]
    unclaimed = _unclaimed(conn, job_id, job["claimed_upto"], job["chunk_size"] * inflight)
    out += initial_dispatches(job_id, job["kind"], unclaimed, job["chunk_size"], inflight,
                              job["gen"])
    if recount and not out and job["kind"] != "transaction":
        # Every entry is done but the last chunk died before counting: recount.
        _recount(conn, job_id)
    return out


def revive_if_orphaned(conn: Connection, job_id: str, inflight: int) -> list[Dispatch]:
    """For an Idempotency-Key replay: re-dispatch the job if it is active and nothing of it
    runs (it may never have been enqueued)."""
    live = conn.execute(
        text(
            f"""
            SELECT j.state IN ('accepted', 'running') AS active,
                   EXISTS (SELECT 1 FROM job_chunk c WHERE c.job_id = j.id AND {LIVE}) AS live
            FROM job j WHERE j.id = :id
            """
        ),
        {"id": job_id},
    ).first()
    if live is None or not live.active or live.live:
        return []
    return revive(conn, job_id, inflight)


def _unclaimed(conn: Connection, job_id: str, cursor: int, at_most: int) -> int:
    """Pending entries no ledger row covers yet (counted up to `at_most`)."""
    return conn.execute(
        text(
            """
            SELECT count(*) FROM (
                SELECT 1 FROM job_entry e
                WHERE e.job_id = :id AND e.idx >= :cursor AND NOT EXISTS (
                    SELECT 1 FROM job_result r
                    WHERE r.job_id = :id AND r.idx = e.idx AND r.idx >= :cursor)
                LIMIT :n
            ) e
            """
        ),
        {"id": job_id, "cursor": cursor, "n": max(1, at_most)},
    ).scalar_one()


# --------------------------------------------------------------------------- poison isolation

# A failed chunk is split into this many pieces, so a culprit is alone after a few rounds.
SPLIT = 8

_ABANDONED = f"""
SELECT c.id, c.job_id, c.lo, c.hi, c.attempts, c.failure,
       c.started_at < pg_postmaster_start_time() AS restarted,
       c.deadline_at <= now() AS overran, c.time_limit,
       j.kind, j.chunk_size, j.prefer_return, j.callback_url IS NOT NULL AS has_callback
FROM job_chunk c JOIN job j ON j.id = c.job_id
WHERE c.state = 'running' AND j.state IN ('accepted', 'running')
  AND (CAST(:job AS text) IS NULL OR c.job_id = :job)
  AND NOT {LIVE}
ORDER BY c.id
FOR UPDATE OF c SKIP LOCKED
"""


def recover_chunks(conn: Connection, inflight: int, job_id: str | None = None
                   ) -> list[Dispatch]:
    """Deal with the chunks whose run died (of one job, or of all): a chunk of several pending
    entries is split into pieces, each with a time limit in proportion to its size; a single
    entry runs alone once more, and gets a 500 result saying why when it dies alone twice; a
    transaction that died twice fails. A run cut off by a PostgreSQL restart is not counted
    and runs again as it was, and so does one that lost its database connection. Logs one line
    per failed chunk."""
    rows = conn.execute(text(_ABANDONED), {"job": job_id}).all()
    out: list[Dispatch] = []
    jobs: set[str] = set()
    for c in rows:
        if not chunks.try_lock(conn, c.id):
            continue
        jobs.add(c.job_id)
        pending = conn.execute(
            text(
                "SELECT e.idx FROM job_entry e WHERE e.job_id = :job "
                "AND e.idx BETWEEN :lo AND :hi AND NOT EXISTS (SELECT 1 FROM job_result r "
                "WHERE r.job_id = :job AND r.idx = e.idx AND r.idx BETWEEN :lo AND :hi) "
                "ORDER BY e.idx"
            ),
            {"job": c.job_id, "lo": c.lo, "hi": c.hi},
        ).scalars().all()
        task = "transaction" if c.kind == "transaction" else "chunk"
        reason = c.failure or ("time limit" if c.overran else "process lost")
        where = f"job {c.job_id}: chunk of {len(pending)} entries ({c.lo}..{c.hi})"
        if not pending:
            chunks.finish(conn, c.id)
        elif c.restarted or c.failure == chunks.DATABASE_LOST:
            log.warning("%s lost its database connection; running it again", where)
            out.append(_requeue(conn, c, task, c.time_limit, None, uncount=True))
        elif c.attempts >= 2 and (len(pending) == 1 or c.kind == "transaction"):
            log.error("%s failed alone twice (%s): it gets a 500 result", where, reason)
            out += _give_up(conn, c, pending, reason)
        elif len(pending) == 1 or c.kind == "transaction":
            log.warning("%s failed (%s); running it once more", where, reason)
            limit = chunks.piece_limit(1, c.chunk_size, c.kind)
            out.append(_requeue(conn, c, task, limit, reason))
        else:
            pieces = _split(pending, SPLIT)
            log.warning("%s failed (%s); split into %d pieces", where, reason, len(pieces))
            chunks.finish(conn, c.id)
            for lo, hi, size in pieces:
                limit = chunks.piece_limit(size, c.chunk_size, c.kind)
                piece = conn.execute(
                    text(
                        "INSERT INTO job_chunk (job_id, lo, hi, state, time_limit, failure) "
                        "VALUES (:job, :lo, :hi, 'queued', :limit, :why) RETURNING id"
                    ),
                    {"job": c.job_id, "lo": lo, "hi": hi, "limit": limit, "why": reason},
                ).scalar_one()
                out.append(Dispatch("chunk", c.job_id, 0, piece, limit))
    for job in jobs:
        # The chain that ran the dead chunk may be gone with it (a time limit acks its
        # message): give the job fresh chains for what nobody has claimed yet.
        out += [d for d in revive(conn, job, inflight, recount=False) if d.chunk is None]
    return out


def _split(pending: list[int], parts: int) -> list[tuple[int, int, int]]:
    """Contiguous (lo, hi, size) groups of the pending indexes, as even as possible."""
    n = len(pending)
    parts = min(parts, n)
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [(pending[a], pending[b - 1], b - a) for a, b in pairwise(bounds) if b > a]


def _requeue(conn: Connection, c: Any, task: str, limit: int, reason: str | None, *,
             uncount: bool = False) -> Dispatch:
    conn.execute(
        text(
            "UPDATE job_chunk SET state = 'queued', time_limit = :limit, failure = :why, "
            "attempts = attempts - CASE WHEN :uncount THEN 1 ELSE 0 END WHERE id = :id"
        ),
        {"id": c.id, "limit": limit, "why": reason, "uncount": uncount},
    )
    return Dispatch(task, c.job_id, 0, c.id, limit)  # type: ignore[arg-type]


_WHY = {
    "time limit": ("timeout", "did not finish within its time limit ({limit} s)"),
    "process lost": ("exception", "lost the worker process running it (killed, out of memory "
                                  "or crashed)"),
    "memory": ("too-costly", "needed more memory than a worker process may use "
                             "(FHIRQ_WORKER_MEMORY_MB)"),
}


def _give_up(conn: Connection, c: Any, pending: list[int], reason: str) -> list[Dispatch]:
    """The poison's end: a 500 result for the entry (or the transaction) saying why."""
    code, what = _WHY.get(reason, _WHY["process lost"])
    what = what.format(limit=c.time_limit)
    now = datetime.now(UTC)
    chunks.finish(conn, c.id)
    if c.kind == "transaction":
        err = FhirError(f"The transaction {what}, twice; nothing was written.", code=code)
        fail_transaction(conn, c.job_id, err, now)
        return [Dispatch("callback", c.job_id)] if c.has_callback else []
    idx = pending[0]
    err = FhirError(
        f"This entry {what}, twice while it ran alone; it was stopped and nothing of it was "
        "written. The other entries of the job were not affected.",
        code=code, expression=f"Bundle.entry[{idx}]", index=idx,
    )
    body = from_error(err)
    if c.kind == "upsert":
        body = upsert_outcome(body, idx)
    write_results(conn, c.job_id, [EntryResult(idx, 500, outcome=body)], c.kind,
                  c.prefer_return)
    row = count_results(conn, c.job_id, 1, 0, now)
    if row is not None and row.state == "completed" and c.has_callback:
        return [Dispatch("callback", c.job_id)]
    return []


def _recount(conn: Connection, job_id: str) -> None:
    conn.execute(
        text(
            """
            UPDATE job j SET done = c.done, succeeded = c.ok, failed = c.done - c.ok,
                state = CASE WHEN c.done >= j.total THEN 'completed' ELSE j.state END,
                finished_at = CASE WHEN c.done >= j.total THEN now() ELSE j.finished_at END
            FROM (SELECT count(*) AS done, count(*) FILTER (WHERE status < 400) AS ok
                  FROM job_result WHERE job_id = :id) c
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
