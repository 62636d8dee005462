"""Plain data of the job machinery: states, kinds, the follow-up work (`Dispatch`) that
`core.jobs` functions return for the edge to enqueue once their transaction has committed, and
the interruption (`TimeLimitExceeded`) by which the edge ends work that ran too long."""

from __future__ import annotations

from typing import Literal, NamedTuple

__all__ = ["ACTIVE", "TERMINAL", "Dispatch", "JobKind", "JobState", "TimeLimitExceeded"]

JobKind = Literal["batch", "transaction", "upsert"]
JobState = Literal["accepted", "running", "completed", "failed", "cancelled"]

ACTIVE = ("accepted", "running")
TERMINAL = ("completed", "failed", "cancelled")


class Dispatch(NamedTuple):
    """A task to send after commit. Carries ids only: entries stay in PostgreSQL.

    `chunk` names a ledger row (core.jobs.chunks) the task runs, within `time_limit` seconds;
    without it, a chunk task claims the next entries and chains, within the chunk time limit.
    """

    task: Literal["chunk", "transaction", "callback"]
    job_id: str
    gen: int = 0
    chunk: int | None = None
    time_limit: int | None = None


class TimeLimitExceeded(Exception):
    """Raised into running work when its (soft) time limit is reached: the work rolls back and
    reports why. Whatever enforces the limits raises it: the worker translates its task
    queue's own signal (worker.tasks), so that `core` never depends on the task queue."""
