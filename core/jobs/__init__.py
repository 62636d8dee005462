"""Async jobs: accepting a submission, running its entries with exactly-once effect, and
reading its progress and results. Everything here runs inside the caller's DB transaction and
returns the tasks (`Dispatch`) that the edge enqueues after commit; nothing here commits or
talks to Redis.

    intake   accept_job: body → job + job_entry rows (COPY, split in SQL), Idempotency-Key
    runner   run_chunk / run_transaction_job: the worker side
    control  cancel_job, retry_failed, reap, reap_callbacks, claim_callback / finish_callback
    views    get_job, job_json, list_jobs, list_entries, stream_response
"""

from core.jobs.control import (
    cancel_job,
    claim_callback,
    finish_callback,
    reap,
    reap_callbacks,
    retry_failed,
)
from core.jobs.intake import Accepted, Submission, accept_job
from core.jobs.model import ACTIVE, TERMINAL, Dispatch, JobKind, JobState, TimeLimitExceeded
from core.jobs.runner import JobCancelled, mark_running, run_chunk, run_transaction_job
from core.jobs.views import (
    get_job,
    job_json,
    jobs_url_for,
    list_entries,
    list_jobs,
    stream_response,
)

__all__ = [
    "ACTIVE",
    "TERMINAL",
    "Accepted",
    "Dispatch",
    "JobCancelled",
    "JobKind",
    "JobState",
    "Submission",
    "TimeLimitExceeded",
    "accept_job",
    "cancel_job",
    "claim_callback",
    "finish_callback",
    "get_job",
    "job_json",
    "jobs_url_for",
    "list_entries",
    "list_jobs",
    "mark_running",
    "reap",
    "reap_callbacks",
    "retry_failed",
    "run_chunk",
    "run_transaction_job",
    "stream_response",
]
