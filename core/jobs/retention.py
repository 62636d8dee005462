"""Retention: what a finished job leaves behind is not kept forever.

The entries of a job (each one's request and result, ~1 KB a row) are deleted once the job has
been over for FHIRQ_JOB_RETENTION_DAYS (default 7); the job's summary row (state, counts,
outcome) stays until FHIRQ_JOB_SUMMARY_RETENTION_DAYS (default 90), so a status URL can still
say what happened and that the results are gone (410). Deleting is done in bounded batches,
each its own short transaction, so a purge of a 10-million-entry job never holds one long
transaction or a lock that writers wait on. The beat task and `fhirq jobs prune` both run
`prune`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, text

__all__ = ["Pruned", "prune", "prune_batch", "prune_preview"]

ENDED = "('completed', 'failed', 'cancelled')"
BATCH = 20_000
JOBS_PER_BATCH = 50


@dataclass(frozen=True)
class Pruned:
    entries: int = 0  # job_entry rows deleted
    jobs_emptied: int = 0  # jobs whose entries are now all gone
    jobs_deleted: int = 0  # summary rows deleted

    def __add__(self, other: Pruned) -> Pruned:
        return Pruned(self.entries + other.entries, self.jobs_emptied + other.jobs_emptied,
                      self.jobs_deleted + other.jobs_deleted)

    @property
    def anything(self) -> bool:
        return bool(self.entries or self.jobs_emptied or self.jobs_deleted)


def prune_batch(conn: Connection, *, entry_days: float, summary_days: float,
                batch: int = BATCH) -> Pruned:
    """One bounded step: up to `batch` entries of the oldest expired jobs, then the summaries
    of jobs past their own retention (their entries went first, long before)."""
    jobs = [r[0] for r in conn.execute(text(f"""
        SELECT id FROM job
        WHERE state IN {ENDED} AND entries_purged_at IS NULL
          AND finished_at < now() - make_interval(secs => :secs)
        ORDER BY finished_at LIMIT :n
    """), {"secs": entry_days * 86400, "n": JOBS_PER_BATCH})]
    entries = emptied = 0
    if jobs:
        # The same entries from both tables: an entry's result goes with its request.
        entries = conn.execute(text("""
            WITH doomed AS (
                SELECT job_id, idx FROM job_entry WHERE job_id = ANY(:jobs) LIMIT :batch
            ), results AS (
                DELETE FROM job_result r USING doomed d
                WHERE r.job_id = d.job_id AND r.idx = d.idx
            )
            DELETE FROM job_entry e USING doomed d WHERE e.job_id = d.job_id AND e.idx = d.idx
        """), {"jobs": jobs, "batch": batch}).rowcount
        emptied = conn.execute(text("""
            UPDATE job SET entries_purged_at = now()
            WHERE id = ANY(:jobs)
              AND NOT EXISTS (SELECT 1 FROM job_entry e WHERE e.job_id = job.id)
              AND NOT EXISTS (SELECT 1 FROM job_result r WHERE r.job_id = job.id)
        """), {"jobs": jobs}).rowcount
    deleted = conn.execute(text(f"""
        DELETE FROM job WHERE id IN (
            SELECT id FROM job
            WHERE state IN {ENDED} AND entries_purged_at IS NOT NULL
              AND finished_at < now() - make_interval(secs => :secs)
            LIMIT :n)
    """), {"secs": summary_days * 86400, "n": JOBS_PER_BATCH}).rowcount
    return Pruned(entries, emptied, deleted)


def prune(engine: Engine, *, entry_days: float, summary_days: float, batch: int = BATCH,
          max_seconds: float | None = None) -> Pruned:
    """Batches until nothing is left to purge (or `max_seconds` have passed: the beat task
    shares its worker with jobs, and the next run goes on where this one stopped)."""
    total = Pruned()
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    while True:
        with engine.begin() as conn:
            step = prune_batch(conn, entry_days=entry_days, summary_days=summary_days,
                               batch=batch)
        total += step
        if not step.anything or (deadline is not None and time.monotonic() > deadline):
            return total


def prune_preview(conn: Connection, *, entry_days: float, summary_days: float
                  ) -> dict[str, int]:
    """What `prune` would delete now, without deleting."""
    row = conn.execute(text(f"""
        SELECT
          (SELECT count(*) FROM job j WHERE state IN {ENDED} AND entries_purged_at IS NULL
             AND finished_at < now() - make_interval(secs => :e)) AS jobs,
          (SELECT count(*) FROM job_entry e JOIN job j ON j.id = e.job_id
             WHERE j.state IN {ENDED} AND j.entries_purged_at IS NULL
             AND j.finished_at < now() - make_interval(secs => :e)) AS entries,
          (SELECT count(*) FROM job j WHERE state IN {ENDED}
             AND finished_at < now() - make_interval(secs => :s)) AS summaries
    """), {"e": entry_days * 86400, "s": summary_days * 86400}).mappings().one()
    return {"jobs": row["jobs"], "entries": row["entries"], "summaries": row["summaries"]}
