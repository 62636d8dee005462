"""The chunk ledger (`job_chunk`): which entries each chunk of a job covers, how often it was
started, and whether the task running it is alive.

A chunk is claimed in a short transaction of its own that commits at once (`side`), while the
task's long transaction, which writes the entries' effects and results, holds the chunk's
advisory lock. The long transaction deletes the chunk's row when it commits. So PostgreSQL
itself tells a dead chunk from a slow one, with no heartbeat to wait for: a row in `running`
whose lock nobody holds belongs to a task that died (time limit, lost worker, OOM kill,
PostgreSQL restart) and rolled back; its start is counted all the same.

`job.claimed_upto` is the claim cursor: every pending entry below it belongs to a ledger row,
so the entries of a dead chunk are run again only through that row (split, see
core.jobs.control.recover_chunks), never by another chain picking them up whole.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import NamedTuple

from sqlalchemy import Connection, text

from core.config import get_settings

__all__ = [
    "DATABASE_LOST",
    "LOCK_CLASS",
    "Claim",
    "Side",
    "LIVE",
    "claim_range",
    "finish",
    "lock_new",
    "mark_failure",
    "piece_limit",
    "start_queued",
    "try_lock",
]

# A transaction of its own that commits when the block ends (the edge provides it).
Side = Callable[[], AbstractContextManager[Connection]]

# `failure` of a run whose database connection was lost: no fault of its entries.
DATABASE_LOST = "database connection lost"

# Advisory locks of chunk runs use the two-key form (LOCK_CLASS, chunk id).
LOCK_CLASS = 0x6671

# SQL condition: chunk row `c` has a live run (its advisory lock is held).
LIVE = f"""EXISTS (
    SELECT 1 FROM pg_locks l
    WHERE l.locktype = 'advisory' AND l.classid = {LOCK_CLASS} AND l.objsubid = 2
      AND l.objid::bigint = c.id AND l.granted
)"""


class Claim(NamedTuple):
    """A chunk this task now runs: entries lo..hi (the pending ones), within `time_limit`."""

    id: int
    lo: int
    hi: int
    time_limit: int


def lock_new(conn: Connection) -> int:
    """A fresh chunk id, locked by `conn`'s transaction before any row names it, so that no one
    can ever see its row without a live lock while its run is alive."""
    return conn.execute(text(
        "SELECT id, pg_advisory_xact_lock(:k, id) FROM "
        "(SELECT nextval(pg_get_serial_sequence('job_chunk', 'id'))::int AS id) s"
    ), {"k": LOCK_CLASS}).scalar_one()


def try_lock(conn: Connection, chunk_id: int) -> bool:
    return conn.execute(text("SELECT pg_try_advisory_xact_lock(:k, :id)"),
                        {"k": LOCK_CLASS, "id": chunk_id}).scalar_one()


# The cursor is a scalar subquery, so that the scan of job_entry starts at it (an index
# condition) instead of walking every finished entry before it; no active job: NULL, no rows.
_CLAIM = """
WITH j AS (
    SELECT claimed_upto FROM job WHERE id = :job AND state IN ('accepted', 'running')
    FOR UPDATE
), r AS (
    SELECT min(e.idx) AS lo, max(e.idx) AS hi FROM (
        SELECT e.idx FROM job_entry e
        WHERE e.job_id = :job AND e.idx >= (SELECT claimed_upto FROM j)
          AND NOT EXISTS (SELECT 1 FROM job_result r WHERE r.job_id = :job AND r.idx = e.idx
                          AND r.idx >= (SELECT claimed_upto FROM j))
        ORDER BY e.idx LIMIT :n
    ) e
), u AS (
    UPDATE job SET claimed_upto = r.hi + 1 FROM r
    WHERE job.id = :job AND r.hi IS NOT NULL
    RETURNING r.lo, r.hi
)
INSERT INTO job_chunk (id, job_id, lo, hi, state, attempts, time_limit, started_at, deadline_at)
SELECT :id, :job, lo, hi, 'running', 1, :limit, now(), now() + make_interval(secs => :limit)
FROM u
RETURNING lo, hi
"""


def claim_range(side: Side, job_id: str, chunk_id: int, n: int, time_limit: int
                ) -> Claim | None:
    """Claim the next `n` unclaimed pending entries as chunk `chunk_id` (locked by the caller)
    and commit the claim; None when every pending entry is claimed already."""
    with side() as s:
        # Losing this commit in a crash loses nothing: the run's own commit, later, flushes it.
        s.execute(text("SET LOCAL synchronous_commit = off"))
        row = s.execute(text(_CLAIM), {"job": job_id, "id": chunk_id, "n": n,
                                       "limit": time_limit}).first()
    return Claim(chunk_id, row.lo, row.hi, time_limit) if row else None


def start_queued(side: Side, job_id: str, chunk_id: int) -> Claim | None:
    """Start a run of a waiting chunk (locked by the caller); the start counts even if the
    run dies. None if the chunk is not waiting (done, split, or run by another task)."""
    with side() as s:
        row = s.execute(text(
            """
            UPDATE job_chunk SET state = 'running', attempts = attempts + 1, started_at = now(),
                deadline_at = now() + make_interval(secs => time_limit)
            WHERE id = :id AND job_id = :job AND state = 'queued'
            RETURNING lo, hi, time_limit
            """
        ), {"id": chunk_id, "job": job_id}).first()
    return Claim(chunk_id, row.lo, row.hi, row.time_limit) if row else None


def finish(conn: Connection, chunk_id: int) -> None:
    """In the run's own transaction: the chunk's entries all have results now."""
    conn.execute(text("DELETE FROM job_chunk WHERE id = :id"), {"id": chunk_id})


def mark_failure(side: Side, chunk_id: int, reason: str) -> None:
    """Say why a run ended unfinished, when the run lived to tell (e.g. its soft time limit)."""
    with side() as s:
        s.execute(text("UPDATE job_chunk SET failure = :why WHERE id = :id"),
                  {"id": chunk_id, "why": reason})


def piece_limit(size: int, chunk_size: int, kind: str) -> int:
    """The time limit of a chunk of `size` entries: a full chunk's limit in proportion, at least
    the entry limit, so that the pieces a failed chunk is split into fail fast."""
    cfg = get_settings()
    if kind == "transaction":
        return cfg.transaction_time_limit
    full = cfg.chunk_time_limit
    return min(full, max(cfg.entry_time_limit, math.ceil(full * size / max(1, chunk_size))))
