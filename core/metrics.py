"""Prometheus metrics computed at scrape time from PostgreSQL and the broker, so they are the
same whichever API process answers the scrape and however many workers there are.

All gauges:

| metric | what |
| --- | --- |
| `fhirq_jobs{state}` | jobs by state |
| `fhirq_job_entries{state}` | entries `succeeded`, `failed` (all jobs), `pending` (active jobs) |
| `fhirq_entries_per_second` | entries finished per second over the last minute |
| `fhirq_job_oldest_active_seconds` | age of the oldest accepted or running job |
| `fhirq_queue_depth{queue}` | Celery tasks waiting in the job queue |
| `fhirq_queue_unacked` | tasks handed to workers and not yet acknowledged (Redis only) |
| `fhirq_metrics_source_up{source}` | 1 if `postgresql` / the broker (`redis`, `rabbitmq`) replied |

Each scrape costs a few milliseconds: one aggregate over `job` (a row per job, not per entry),
and at most `RATE_SAMPLE` index entries of `ix_job_result_finished`; the broker is asked by the
`QueueReader` the edge passes in (worker.broker: list lengths in Redis, a passive queue declare
in RabbitMQ), so this module knows no broker. A source that fails is reported by
`fhirq_metrics_source_up` and leaves its metrics out, never the whole scrape.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import NamedTuple, Protocol

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine, text

from core.config import Settings
from core.jobs.model import ACTIVE, TERMINAL

__all__ = ["RATE_SAMPLE", "RATE_WINDOW", "JobsCollector", "QueueReader", "QueueStats"]

log = logging.getLogger(__name__)

STATES = (*ACTIVE, *TERMINAL)
RATE_WINDOW = 60  # seconds
# The rate counts at most this many of the latest entries: past it (above ~170 entries/s) the
# window shrinks to the time they took, so the cost of a scrape stays flat whatever the load.
RATE_SAMPLE = 10_000
TIMEOUT_MS = 2000

_JOBS = """
SELECT state, count(*) AS jobs, sum(succeeded) AS succeeded, sum(failed) AS failed,
       sum(total - done) AS pending,
       extract(epoch FROM now() - min(created_at)) AS oldest
FROM job GROUP BY state
"""

# Backward over ix_job_result_finished from now.
_RECENT = """
SELECT count(*) AS n, extract(epoch FROM now() - min(finished_at)) AS span
FROM (SELECT finished_at FROM job_result
      WHERE finished_at > now() - make_interval(secs => :window)
      ORDER BY finished_at DESC LIMIT :sample) recent
"""

class QueueStats(NamedTuple):
    """What the broker says of a queue."""

    waiting: int  # messages ready for a worker
    unacked: int | None = None  # delivered, not yet acknowledged; None: the broker does not say


class QueueReader(Protocol):
    """The broker, as the metrics need it."""

    kind: str  # its name in `fhirq_metrics_source_up`

    def queue_stats(self, queue: str) -> QueueStats: ...


class JobsCollector(Collector):
    """Jobs, entries, throughput and the task queue, read at each scrape."""

    def __init__(self, settings: Settings, engine: Callable[[], Engine],
                 broker: QueueReader) -> None:
        self.settings = settings
        self.engine = engine
        self.broker = broker

    def describe(self) -> list[Metric]:
        # Declared without values, so registering the collector does not query anything.
        return []

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("fhirq_metrics_source_up",
                               "1 if the source answered this scrape, else 0", labels=["source"])
        try:
            yield from self._from_postgres()
            up.add_metric(["postgresql"], 1)
        except Exception:  # noqa: BLE001 - any failure: report the source down, keep scraping
            log.warning("metrics: PostgreSQL did not answer", exc_info=True)
            up.add_metric(["postgresql"], 0)
        try:
            yield from self._from_broker()
            up.add_metric([self.broker.kind], 1)
        except Exception:  # noqa: BLE001
            log.warning("metrics: the broker (%s) did not answer", self.broker.kind,
                        exc_info=True)
            up.add_metric([self.broker.kind], 0)
        yield up

    def _from_postgres(self) -> list[Metric]:
        # Read everything first: a failure halfway must not yield half the families.
        with self.engine().begin() as conn:
            conn.execute(text(f"SET LOCAL statement_timeout = {TIMEOUT_MS}"))
            rows = {r.state: r for r in conn.execute(text(_JOBS))}
            recent = conn.execute(
                text(_RECENT), {"window": RATE_WINDOW, "sample": RATE_SAMPLE}
            ).one()

        jobs = GaugeMetricFamily("fhirq_jobs", "Jobs by state", labels=["state"])
        for state in STATES:
            jobs.add_metric([state], rows[state].jobs if state in rows else 0)

        entries = GaugeMetricFamily(
            "fhirq_job_entries",
            "Entries of all jobs that succeeded or failed, and entries of active jobs pending",
            labels=["state"],
        )
        for label in ("succeeded", "failed"):
            entries.add_metric([label], sum(getattr(r, label) or 0 for r in rows.values()))
        entries.add_metric(["pending"], sum(rows[s].pending or 0 for s in ACTIVE if s in rows))

        oldest = [float(rows[s].oldest) for s in ACTIVE if s in rows]
        age = GaugeMetricFamily(
            "fhirq_job_oldest_active_seconds",
            "Age of the oldest accepted or running job (0 when there is none)",
            value=max(oldest, default=0.0),
        )

        rate = GaugeMetricFamily(
            "fhirq_entries_per_second",
            f"Entries finished per second over the last {RATE_WINDOW} s (over the latest "
            f"{RATE_SAMPLE} entries when more finished in that time)",
            value=_rate(recent.n, recent.span),
        )
        return [jobs, entries, rate, age]

    def _from_broker(self) -> list[Metric]:
        queue = self.settings.queue
        stats = self.broker.queue_stats(queue)
        depth = GaugeMetricFamily("fhirq_queue_depth",
                                  "Celery tasks waiting in the queue", labels=["queue"])
        depth.add_metric([queue], stats.waiting)
        if stats.unacked is None:
            return [depth]
        return [
            depth,
            GaugeMetricFamily(
                "fhirq_queue_unacked",
                "Tasks handed to workers and not yet acknowledged (running or reserved), "
                "over every queue of the broker's Redis database",
                value=stats.unacked,
            ),
        ]


def _rate(n: int, span: float | None) -> float:
    """Entries per second from the latest `n` entries, the oldest `span` seconds old."""
    if n < RATE_SAMPLE or not span:
        return n / RATE_WINDOW
    return n / max(float(span), 1.0)
