"""The Celery application. Broker: Redis (FHIRQ_REDIS_URL). Results live in PostgreSQL, so no
result backend is configured.

Delivery is at-least-once (`acks_late`; a task that dies is delivered again) and every task is
idempotent against PostgreSQL. Time limits stay below the broker's visibility timeout, so a slow
task is never handed to a second worker while it still runs. A task that dies is seen in
PostgreSQL (core.jobs.chunks), and the reaper (beat, and each worker as it starts) splits its
chunk to isolate a poison entry and revives jobs whose messages were lost altogether.
"""

from __future__ import annotations

import gc
import resource
from typing import Any

from celery import Celery
from celery.signals import setup_logging, worker_init, worker_process_init, worker_ready

from core.config import get_settings
from core.logging import configure_logging

settings = jobs = get_settings()

celery = Celery(
    "fhirq",
    broker=settings.redis_url or "redis://127.0.0.1:6379/0",
    include=["worker.tasks"],
)
celery.conf.update(
    task_ignore_result=True,
    task_acks_late=True,
    # A worker process killed mid-task (OOM, SIGKILL) leaves its message to be delivered again.
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_serializer="json",
    accept_content=["json"],
    task_default_queue=jobs.queue,
    broker_transport_options={"visibility_timeout": jobs.visibility_timeout},
    task_soft_time_limit=min(jobs.transaction_time_limit, jobs.visibility_timeout - 120),
    task_time_limit=min(jobs.transaction_time_limit + 60, jobs.visibility_timeout - 60),
    broker_connection_retry_on_startup=True,
    # A pool process that grew past half its address-space cap is replaced after its task.
    worker_max_memory_per_child=(jobs.worker_memory_mb * 1024 // 2) or None,
    beat_schedule={
        "fhirq-reap-stalled-jobs": {
            "task": "fhirq.reap",
            "schedule": jobs.reaper_interval,
            # A reap that waited longer than its interval is superseded by the next one.
            "options": {"expires": jobs.reaper_interval},
        },
        "fhirq-retention": {
            "task": "fhirq.prune",
            "schedule": jobs.retention_interval,
            "options": {"expires": jobs.retention_interval},
        },
    },
)


@setup_logging.connect
def _logging(loglevel: int | None = None, **_: Any) -> None:
    """Worker and beat log like the API (FHIRQ_LOG_FORMAT) instead of in Celery's own format;
    a receiver here tells Celery to leave logging alone."""
    configure_logging(level=loglevel or "INFO")


# Validators of these types are compiled before forking (~0.4 s, ~30 MB shared); others are
# compiled on first use in each child (all 146 up front would cost ~230 MB).
COMMON_TYPES = (
    "Patient", "Practitioner", "PractitionerRole", "Organization", "Location", "Encounter",
    "Observation", "Condition", "Procedure", "MedicationRequest", "Medication",
    "MedicationAdministration", "Immunization", "DiagnosticReport", "DocumentReference",
    "Claim", "ExplanationOfBenefit", "CarePlan", "CareTeam", "AllergyIntolerance", "Device",
    "ImagingStudy", "Provenance", "SupplyDelivery", "Goal", "Schedule", "Slot", "Appointment",
)


@worker_init.connect
def _warm(**_: Any) -> None:
    """In the worker's main process, before the pool forks: compile the FHIR validators once so
    every child shares them, and move everything loaded so far out of the garbage collector's
    reach. A worker's heap is large and long-lived; without this, collections were ~13% of a
    chunk's time (bench.inprocess), with it ~2%."""
    from core.fhir.validation import preload_validators

    preload_validators(COMMON_TYPES)
    gc.freeze()


@worker_process_init.connect
def _child(**_: Any) -> None:
    """In each pool process: cap its address space (FHIRQ_WORKER_MEMORY_MB), so that an entry
    that allocates without bound gets a MemoryError (a 500 for that entry alone) instead of
    taking the machine; and keep the inherited heap out of the garbage collector's reach."""
    limit = get_settings().worker_memory_mb << 20
    if limit > 0:
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    gc.freeze()


@worker_ready.connect
def _reap_on_start(sender: Any, **_: Any) -> None:
    """A worker that starts (after a crash, a deploy, a broker restart) heals jobs at once
    instead of at the reaper's next round."""
    sender.app.send_task("fhirq.reap", kwargs={"starting": True}, queue=jobs.queue)



def _weekly_slots() -> dict[str, Any]:
    """Slot generation (core.jobs.slots) on Mondays at 00:05 in FHIRQ_SLOT_TIMEZONE: crontab
    fields are read in the schedule's `tz`, which is the app's (UTC) unless set here."""
    from zoneinfo import ZoneInfo

    from celery.schedules import crontab

    from core.jobs.slots import SlotSettings

    monday = crontab(minute=5, hour=0, day_of_week="mon")
    monday.tz = ZoneInfo(SlotSettings().timezone)
    # A run that waited a day for a worker is still wanted; a week-old one is superseded.
    return {"task": "fhirq.slots", "schedule": monday, "options": {"expires": 6 * 24 * 3600}}


celery.conf.beat_schedule["fhirq-weekly-slots"] = _weekly_slots()
