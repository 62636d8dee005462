"""The Celery application. Broker: Redis by default (FHIRQ_REDIS_URL), RabbitMQ for brokers
that must not lose messages (FHIRQ_BROKER_URL=amqp://…). Results live in PostgreSQL, so no
result backend is configured.

Delivery is at-least-once (`acks_late`; a task that dies is delivered again) and every task is
idempotent against PostgreSQL. Time limits stay below the broker's redelivery timeout (Redis's
visibility timeout, RabbitMQ's consumer timeout), so a slow task is never handed to a second
worker while it still runs. A task that dies is seen in PostgreSQL (core.jobs.chunks), and the
reaper (beat, and each worker as it starts) splits its chunk to isolate a poison entry and
revives jobs whose messages were lost altogether.

On RabbitMQ the job queue is a durable quorum queue (replicated, a message is confirmed to the
publisher once a majority of nodes hold it: `confirm_publish`), bound to a topic exchange so
that Celery's native delayed delivery carries countdown retries. Quorum queues have no message
priorities; fhirq uses none.
"""

from __future__ import annotations

import logging
import resource
from typing import Any

from celery import Celery
from celery.signals import setup_logging, worker_init, worker_process_init, worker_ready
from kombu import Exchange, Queue

from core.config import Settings, get_settings
from core.logging import configure_logging
from worker.broker import kind_of
from worker.heap import settle_heap

log = logging.getLogger(__name__)

settings = jobs = get_settings()


def broker_conf(cfg: Settings) -> dict[str, Any]:
    """The Celery settings that follow from the broker and the queue (FHIRQ_BROKER_URL or
    FHIRQ_REDIS_URL, FHIRQ_QUEUE, FHIRQ_CELERY_VISIBILITY_TIMEOUT)."""
    redelivery = cfg.visibility_timeout
    conf: dict[str, Any] = {
        "broker_url": cfg.broker,
        "task_default_queue": cfg.queue,
        "task_soft_time_limit": min(cfg.transaction_time_limit, redelivery - 120),
        "task_time_limit": min(cfg.transaction_time_limit + 60, redelivery - 60),
    }
    if kind_of(cfg.broker) != "rabbitmq":
        return {**conf, "task_queues": None,
                "broker_transport_options": {"visibility_timeout": redelivery}}
    queue = Queue(
        cfg.queue, Exchange(cfg.queue, type="topic", durable=True), routing_key=cfg.queue,
        durable=True, queue_arguments={"x-queue-type": "quorum"},
        # RabbitMQ (3.11.15 and later) takes a delivery unacknowledged for this long for a
        # stuck consumer and closes its channel; its own default is 30 minutes, shorter than
        # a transaction may run (FHIRQ_TRANSACTION_TIME_LIMIT).
        consumer_arguments={"x-consumer-timeout": redelivery * 1000},
    )
    return {
        **conf,
        "task_queues": (queue,),
        "task_default_exchange": cfg.queue,
        "task_default_exchange_type": "topic",
        "task_default_routing_key": cfg.queue,
        "task_default_queue_type": "quorum",
        # A queue named in a message but not configured here (another FHIRQ_QUEUE) likewise.
        "task_create_missing_queue_type": "quorum",
        "task_create_missing_queue_exchange_type": "topic",
        "broker_transport_options": {"confirm_publish": True},
    }


celery = Celery("fhirq", include=["worker.tasks"])
celery.conf.update(
    task_ignore_result=True,
    task_acks_late=True,
    # A worker process killed mid-task (OOM, SIGKILL) leaves its message to be delivered again.
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_serializer="json",
    accept_content=["json"],
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
    **broker_conf(settings),
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
    settle_heap()


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
    settle_heap()


@worker_ready.connect
def _reap_on_start(sender: Any, **_: Any) -> None:
    """A worker that starts (after a crash, a deploy, a broker restart) heals jobs at once
    instead of at the reaper's next round."""
    sender.app.send_task("fhirq.reap", kwargs={"starting": True}, queue=jobs.queue)


# The first RabbitMQ that honours a consumer's own `x-consumer-timeout`.
CONSUMER_TIMEOUT_SINCE = (3, 11, 15)


@worker_ready.connect
def _check_consumer_timeout(sender: Any, **_: Any) -> None:
    """An older RabbitMQ ignores the queue's `x-consumer-timeout` and applies its server-wide
    `consumer_timeout` (30 minutes unless configured): a task running longer has its channel
    closed and is delivered again. Say so once, at start, with what to set."""
    if kind_of(sender.app.conf.broker_url) != "rabbitmq":
        return
    try:
        with sender.app.connection_for_read() as conn:
            conn.connect()
            raw = conn.connection.server_properties.get("version", "")
    except Exception:  # noqa: BLE001 - the worker's own connection reports broker trouble
        return
    version = raw.decode() if isinstance(raw, bytes) else str(raw)
    try:
        parts = tuple(int(p) for p in version.split(".")[:3])
    except ValueError:
        return
    if parts < CONSUMER_TIMEOUT_SINCE:
        log.warning(
            "RabbitMQ %s ignores the job queue's x-consumer-timeout: set consumer_timeout = %d "
            "in its rabbitmq.conf (FHIRQ_CELERY_VISIBILITY_TIMEOUT in ms), or a task running "
            "past its consumer_timeout (30 minutes by default) is delivered again",
            version, get_settings().visibility_timeout * 1000,
        )


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
