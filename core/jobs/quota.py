"""Per-owner quotas on async submissions: at most `max_active` jobs accepted or running at once
and at most `per_minute` jobs accepted in any 60 seconds; beyond either, 429 with Retry-After.

Both are counted in PostgreSQL from the `job` table, so they hold across every API process.
`check` runs twice in the accepting transaction: before the body is read (a submission over the
quota costs no upload) and again just before commit under a per-owner advisory lock, which makes
concurrent submissions of one owner count each other exactly; the lock is held only from there
to the commit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sqlalchemy import Connection, text

from core.errors import TooManyRequests

__all__ = ["Quota", "check"]

WINDOW_SECONDS = 60
# A job ends at the owner's pace: suggest a poll interval, not a promise.
ACTIVE_RETRY_AFTER = 10


@dataclass(frozen=True, slots=True)
class Quota:
    max_active: int  # 0: unlimited
    per_minute: int  # 0: unlimited

    @property
    def unlimited(self) -> bool:
        return self.max_active <= 0 and self.per_minute <= 0


_COUNTS = text(
    f"""
    SELECT
        (SELECT count(*) FROM job WHERE owner = :owner AND state IN ('accepted', 'running'))
            AS active,
        count(*) AS recent,
        -- when the oldest job of the window leaves it
        extract(epoch FROM min(created_at) + interval '{WINDOW_SECONDS} seconds'
                - clock_timestamp()) AS frees_in
    FROM job
    WHERE owner = :owner AND created_at > clock_timestamp() - interval '{WINDOW_SECONDS} seconds'
    """
)


def check(conn: Connection, owner: str, quota: Quota, *, final: bool) -> None:
    """Raise TooManyRequests if the owner's jobs, the one being accepted included (its row is
    already inserted in this transaction), exceed the quota. `final`: serialise with the
    owner's other accepting transactions first (call it last before commit)."""
    if quota.unlimited:
        return
    if final:
        conn.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"),
                     {"key": f"fhirq.quota:{owner}"})
    row = conn.execute(_COUNTS, {"owner": owner}).mappings().one()
    if 0 < quota.max_active < row["active"]:
        raise TooManyRequests(
            f"Owner '{owner}' already has {row['active'] - 1} active jobs, the most allowed "
            f"(FHIRQ_MAX_ACTIVE_JOBS={quota.max_active}); submit again when one has ended.",
            retry_after=ACTIVE_RETRY_AFTER,
        )
    if 0 < quota.per_minute < row["recent"]:
        wait = max(1, math.ceil(float(row["frees_in"] or WINDOW_SECONDS)))
        raise TooManyRequests(
            f"Owner '{owner}' submitted {row['recent'] - 1} jobs in the last {WINDOW_SECONDS} "
            f"seconds, the most allowed (FHIRQ_MAX_SUBMISSIONS_PER_MINUTE={quota.per_minute}).",
            retry_after=wait,
        )
