"""The Celery application. Broker: Redis (FHIRQ_REDIS_URL). Results live in PostgreSQL, so no
result backend is configured."""

from __future__ import annotations

from celery import Celery

from core.config import get_settings

settings = get_settings()

celery = Celery("fhirq", broker=settings.redis_url or "redis://127.0.0.1:6379/0")
celery.conf.update(
    task_ignore_result=True,
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    task_serializer="json",
    accept_content=["json"],
)
