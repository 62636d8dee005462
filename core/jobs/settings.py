"""Knobs of the job machinery, read from `FHIRQ_JOB_*` / `FHIRQ_QUEUE` / `FHIRQ_CELERY_*`.

Kept beside the jobs code until they move into `core.config.Settings` (one table for all).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

__all__ = ["JobSettings", "job_settings"]


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return int(raw) if raw not in (None, "") else default


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return float(raw) if raw not in (None, "") else default


@dataclass(frozen=True)
class JobSettings:
    # Chunk tasks of one job in the queue or running at once. The queue is FIFO, so a job
    # submitted later waits behind at most this many chunks of each earlier job (fairness).
    inflight_chunks: int = field(default_factory=lambda: _int("FHIRQ_JOB_INFLIGHT", 4))
    # An active job with no progress for this long is presumed to have lost its tasks.
    stall_seconds: float = field(default_factory=lambda: _float("FHIRQ_JOB_STALL_SECONDS", 120))
    reaper_interval: float = field(default_factory=lambda: _float("FHIRQ_REAPER_INTERVAL", 30))
    queue: str = field(default_factory=lambda: os.environ.get("FHIRQ_QUEUE", "fhirq"))
    # Redis re-delivers an unacked message after this; every task limit stays below it.
    visibility_timeout: int = field(
        default_factory=lambda: _int("FHIRQ_CELERY_VISIBILITY_TIMEOUT", 7200)
    )
    chunk_time_limit: int = field(default_factory=lambda: _int("FHIRQ_CHUNK_TIME_LIMIT", 900))
    transaction_time_limit: int = field(
        default_factory=lambda: _int("FHIRQ_TRANSACTION_TIME_LIMIT", 3600)
    )
    callback_timeout: float = field(
        default_factory=lambda: _float("FHIRQ_CALLBACK_TIMEOUT", 10)
    )
    callback_attempts: int = field(default_factory=lambda: _int("FHIRQ_CALLBACK_ATTEMPTS", 5))


def job_settings() -> JobSettings:
    return JobSettings()
