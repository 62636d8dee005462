"""Settings read from the environment (`FHIRQ_*`); the one place configuration is defined."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return int(raw) if raw not in (None, "") else default



def _choice(name: str, choices: tuple[str, ...], default: str) -> str:
    raw = (os.environ.get(name) or default).strip().lower()
    if raw not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, not {raw!r}")
    return raw


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return float(raw) if raw not in (None, "") else default


@dataclass(frozen=True)
class Settings:
    """Every knob fhirq has. README's configuration table mirrors this class."""

    database_url: str | None = field(default_factory=lambda: os.environ.get("FHIRQ_DATABASE_URL"))
    redis_url: str | None = field(default_factory=lambda: os.environ.get("FHIRQ_REDIS_URL"))
    # The broker when it is not Redis (`amqp://…`: RabbitMQ); it wins over FHIRQ_REDIS_URL.
    broker_url: str | None = field(
        default_factory=lambda: os.environ.get("FHIRQ_BROKER_URL") or None
    )
    data_dir: str = field(default_factory=lambda: os.environ.get("FHIRQ_DATA_DIR", ".fhirq"))
    # Public base URL used in Location / Content-Location headers; derived from the request
    # when unset.
    base_url: str | None = field(default_factory=lambda: os.environ.get("FHIRQ_BASE_URL"))
    sync_max_entries: int = field(default_factory=lambda: _int("FHIRQ_SYNC_MAX_ENTRIES", 1000))
    sync_max_bytes: int = field(default_factory=lambda: _int("FHIRQ_SYNC_MAX_BYTES", 10_000_000))
    async_max_bytes: int = field(default_factory=lambda: _int("FHIRQ_ASYNC_MAX_BYTES", 250_000_000))
    # Slow clients (api.server): a request head must arrive within this many seconds, and a
    # body may pause at most this long, or the connection is dropped.
    http_header_timeout: float = field(
        default_factory=lambda: _float("FHIRQ_HTTP_HEADER_TIMEOUT", 30)
    )
    http_body_timeout: float = field(default_factory=lambda: _float("FHIRQ_HTTP_BODY_TIMEOUT", 30))
    max_json_depth: int = field(default_factory=lambda: _int("FHIRQ_MAX_JSON_DEPTH", 64))
    max_string_bytes: int = field(default_factory=lambda: _int("FHIRQ_MAX_STRING_BYTES", 1_000_000))
    # CPU seconds one entry may spend evaluating client-written FHIRPath (core.fhir.fhirpath).
    entry_time_budget: float = field(
        default_factory=lambda: _float("FHIRQ_ENTRY_TIME_BUDGET", 2)
    )
    # Refused before routing with 414 / 431 (gunicorn's own limits sit above these).
    max_uri_bytes: int = field(default_factory=lambda: _int("FHIRQ_MAX_URI_BYTES", 8000))
    max_header_bytes: int = field(default_factory=lambda: _int("FHIRQ_MAX_HEADER_BYTES", 8000))
    chunk_size: int = field(default_factory=lambda: _int("FHIRQ_CHUNK_SIZE", 500))
    # Literal references (`Patient/1`) in written resources must name existing resources.
    # Turn off for loads whose referenced resources arrive later.
    referential_integrity: bool = field(
        default_factory=lambda: os.environ.get("FHIRQ_REFERENTIAL_INTEGRITY", "true").lower()
        not in ("0", "false", "no", "off")
    )
    # `off` answers a write once PostgreSQL has it in memory, before its WAL reaches the disk
    # (a database crash can lose the last ~0.6 s of acknowledged writes; README, Performance).
    # Opt-in, per process: the default waits for the flush.
    synchronous_commit: str = field(
        default_factory=lambda: _choice("FHIRQ_SYNCHRONOUS_COMMIT", ("on", "off"), "on")
    )
    search_default_count: int = field(default_factory=lambda: _int("FHIRQ_SEARCH_COUNT", 50))
    search_max_count: int = field(default_factory=lambda: _int("FHIRQ_SEARCH_MAX_COUNT", 1000))

    # Weekly Slot generation (core.jobs.slots).
    slot_minutes: int = field(default_factory=lambda: _int("FHIRQ_SLOT_MINUTES", 30))
    slot_weeks: int = field(default_factory=lambda: _int("FHIRQ_SLOT_WEEKS", 1))
    slot_timezone: str = field(
        default_factory=lambda: os.environ.get("FHIRQ_SLOT_TIMEZONE") or "UTC"
    )
    # Async jobs and their workers.
    # Chunk tasks of one job in the queue or running at once. The queue is FIFO, so a job
    # submitted later waits behind at most this many chunks of each earlier job (fairness).
    inflight_chunks: int = field(default_factory=lambda: _int("FHIRQ_JOB_INFLIGHT", 4))
    # Retention (core.jobs.retention): a finished job's entries are deleted after this many
    # days, its summary row after the second number (at least the first).
    job_retention_days: float = field(
        default_factory=lambda: _float("FHIRQ_JOB_RETENTION_DAYS", 7)
    )
    job_summary_retention_days: float = field(
        default_factory=lambda: _float("FHIRQ_JOB_SUMMARY_RETENTION_DAYS", 90)
    )
    # How often the beat task runs a purge, in seconds.
    retention_interval: float = field(
        default_factory=lambda: _float("FHIRQ_RETENTION_INTERVAL", 3600)
    )
    # Per-owner quotas on async submissions (core.jobs.quota); 0: unlimited.
    max_active_jobs: int = field(default_factory=lambda: _int("FHIRQ_MAX_ACTIVE_JOBS", 100))
    max_submissions_per_minute: int = field(
        default_factory=lambda: _int("FHIRQ_MAX_SUBMISSIONS_PER_MINUTE", 600)
    )
    # An active job with no chunk running and no progress for this long is presumed to have
    # lost its tasks, however busy the queue is...
    stall_seconds: float = field(default_factory=lambda: _float("FHIRQ_JOB_STALL_SECONDS", 120))
    # ...and after only this long when the queue is empty (no message can be waiting for it).
    orphan_seconds: float = field(default_factory=lambda: _float("FHIRQ_JOB_ORPHAN_SECONDS", 3))
    reaper_interval: float = field(default_factory=lambda: _float("FHIRQ_REAPER_INTERVAL", 3))
    queue: str = field(default_factory=lambda: os.environ.get("FHIRQ_QUEUE", "fhirq"))
    # The broker re-delivers an unacknowledged message after this (Redis's visibility timeout;
    # with RabbitMQ, the consumers' `x-consumer-timeout`); every task limit stays below it.
    visibility_timeout: int = field(
        default_factory=lambda: _int("FHIRQ_CELERY_VISIBILITY_TIMEOUT", 7200)
    )
    chunk_time_limit: int = field(default_factory=lambda: _int("FHIRQ_CHUNK_TIME_LIMIT", 900))
    # A piece of a chunk that failed gets the chunk's limit in proportion to its size, but at
    # least this (a single entry that runs past it twice gets a 500 result).
    entry_time_limit: int = field(default_factory=lambda: _int("FHIRQ_ENTRY_TIME_LIMIT", 60))
    # Address space of each worker process (MB; 0: unlimited): an entry that needs more fails
    # alone instead of taking the machine. A process that grew past half of it is replaced.
    worker_memory_mb: int = field(default_factory=lambda: _int("FHIRQ_WORKER_MEMORY_MB", 4096))
    transaction_time_limit: int = field(
        default_factory=lambda: _int("FHIRQ_TRANSACTION_TIME_LIMIT", 3600)
    )
    callback_timeout: float = field(
        default_factory=lambda: _float("FHIRQ_CALLBACK_TIMEOUT", 10)
    )
    callback_attempts: int = field(default_factory=lambda: _int("FHIRQ_CALLBACK_ATTEMPTS", 5))
    # Hosts (names, IP addresses or networks) a callback may reach although they are not
    # public, over http too: trusted internal hooks (core.jobs.callback).
    callback_allow: tuple[str, ...] = field(
        default_factory=lambda: tuple(
            h for h in os.environ.get("FHIRQ_CALLBACK_ALLOW", "").replace(",", " ").split() if h
        )
    )

    # Test-only (core.jobs.faults): entries carrying a poison marker misbehave. Never in
    # production.
    test_poison: bool = field(
        default_factory=lambda: os.environ.get("FHIRQ_TEST_POISON", "") == "1"
    )

    # Logs (core.logging): `json`, one object per line with the job id when known, for log
    # shippers; `text` for people (`fhirq up` chooses it for its foreground output).
    log_format: str = field(
        default_factory=lambda: _choice("FHIRQ_LOG_FORMAT", ("json", "text"), "json")
    )
    # The API's level; a worker takes Celery's `--loglevel`.
    log_level: str = field(
        default_factory=lambda: _choice(
            "FHIRQ_LOG_LEVEL", ("debug", "info", "warning", "error"), "info"
        ).upper()
    )

    # Authentication (core.auth, api.auth). `off` runs every request as owner "anonymous":
    # `fhirq up` chooses it on loopback only.
    auth: str = field(
        default_factory=lambda: _choice("FHIRQ_AUTH", ("required", "off"), "required")
    )
    # A verified API key is trusted for this long in each API process, so that requests do not
    # each pay a database round trip; revoking a key takes effect within it. 0: every request
    # looks the key up.
    api_key_cache_seconds: float = field(
        default_factory=lambda: _float("FHIRQ_API_KEY_CACHE_SECONDS", 5)
    )
    # JWT bearer tokens are accepted when a JWKS is configured (a URL, fetched and cached, or a
    # file); issuer and audience are then required too, so a token minted for another service
    # is never accepted here.
    jwks_url: str | None = field(default_factory=lambda: os.environ.get("FHIRQ_JWKS_URL") or None)
    jwks_file: str | None = field(
        default_factory=lambda: os.environ.get("FHIRQ_JWKS_FILE") or None
    )
    jwt_issuer: str | None = field(
        default_factory=lambda: os.environ.get("FHIRQ_JWT_ISSUER") or None
    )
    jwt_audience: str | None = field(
        default_factory=lambda: os.environ.get("FHIRQ_JWT_AUDIENCE") or None
    )
    # With authentication required, `/metrics` (it counts every owner's jobs) answers a token
    # with the scope `system/metrics.read`, or this shared secret sent as the bearer token
    # (what a Prometheus scrape config holds).
    metrics_token: str | None = field(
        default_factory=lambda: os.environ.get("FHIRQ_METRICS_TOKEN") or None, repr=False
    )

    @property
    def broker(self) -> str:
        """Celery's broker URL: FHIRQ_BROKER_URL, else FHIRQ_REDIS_URL, else a local Redis."""
        return self.broker_url or self.redis_url or DEFAULT_BROKER


DEFAULT_BROKER = "redis://127.0.0.1:6379/0"


def get_settings() -> Settings:
    return Settings()
