"""Recovery in seconds, with the production defaults of the stall and the reaper (so that a
short stall cannot be what heals): a job whose task messages were lost, a job that was never
enqueued, and a job whose database connections were cut, each resumes within seconds and takes
effect exactly once; a lost connection logs a line per chunk, not per entry."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from sqlalchemy import Engine, text

from core.jobs import Submission, accept_job
from tests.conftest import BROKER_URL
from tests.jobs_helpers import *  # noqa: F403 - fixtures
from tests.jobs_helpers import (
    WorkerProcess,
    assert_exactly_once,
    job_id_of,
    lone_worker,
    patients_batch,
    submit,
    wait_for,
    wait_job,
)
from worker.broker import broker_for

# The defaults of core.config, spelled out: what heals here is not a short stall.
DEFAULTS = {
    "FHIRQ_JOB_STALL_SECONDS": "120",
    "FHIRQ_JOB_ORPHAN_SECONDS": "3",
    "FHIRQ_REAPER_INTERVAL": "3",
}
BOUND = 15  # seconds from the servers being back to the job completed


@pytest.fixture
def recovering(jobs_env: dict[str, str], clean_db: Engine) -> Iterator[WorkerProcess]:
    with lone_worker(jobs_env, DEFAULTS, "recovery") as w:
        yield w


def done(api: Any, job_id: str) -> int:
    return api.get(f"/jobs/{job_id}").json["counts"]["done"]


def test_lost_queue_messages_resume_within_seconds(api: Any, recovering: WorkerProcess,
                                                   clean_db: Engine) -> None:
    """The worker stops (its running chunks finish and send their successors), then the queue
    is deleted, as when Redis restarts without persistence: every chain of the job is gone."""
    n = 5000  # big enough that a fast worker is still running it when it stops
    job_id = job_id_of(submit(api, patients_batch(n, "lost")))
    wait_for(lambda: done(api, job_id) >= 300, 60, "some progress", on_timeout=recovering.tail)
    recovering.stop()
    broker_for(BROKER_URL).delete(recovering.env["FHIRQ_QUEUE"])
    assert done(api, job_id) < n, "the job finished before the fault: make it bigger"
    recovering.start()
    back = time.monotonic()
    status = wait_job(api, job_id, timeout=60, worker=recovering)
    elapsed = time.monotonic() - back
    assert status["state"] == "completed" and status["counts"]["succeeded"] == n
    assert_exactly_once(clean_db, job_id, n)
    assert elapsed < BOUND, f"took {elapsed:.1f} s"
    print(f"lost messages: completed {elapsed:.1f} s after the worker was back")


def test_replay_of_a_job_never_enqueued_dispatches_it(api: Any, jobs_env: dict[str, str],
                                                      clean_db: Engine) -> None:
    """As if the API died between its commit and its enqueue. No beat runs here, so nothing
    but the replay can send the job."""
    body = patients_batch(60, "replay")
    with lone_worker(jobs_env, DEFAULTS, "replay", beat=False) as w:
        # The worker's own reap as it starts must be over before the job exists.
        wait_for(lambda: any(b"fhirq.reap[" in x and b"succeeded" in x
                             for x in w.log.read_bytes().splitlines()), 30, "the start reap")
        sub = Submission(kind="bundle", owner="anonymous", base_url="http://localhost/fhir",
                         chunk_size=50, idempotency_key="never-sent", scopes=("system/*.*",))
        with clean_db.begin() as conn:
            job_id = accept_job(conn, io.BytesIO(orjson.dumps(body)), sub).job_id
        time.sleep(2)
        assert api.get(f"/jobs/{job_id}").json["state"] == "accepted"
        again = submit(api, body, **{"Idempotency-Key": "never-sent"})
        assert job_id_of(again) == job_id
        status = wait_job(api, job_id, timeout=BOUND, worker=w)
    assert status["state"] == "completed" and status["counts"]["succeeded"] == 60
    assert_exactly_once(clean_db, job_id, 60)


def test_lost_database_connections_log_a_line_per_chunk(api: Any, recovering: WorkerProcess,
                                                        clean_db: Engine) -> None:
    """Every connection of the workers is cut (as a PostgreSQL restart does) three times
    mid-job; chunks of 50 entries were running each time."""
    n = 5000
    job_id = job_id_of(submit(api, patients_batch(n, "cut")))
    wait_for(lambda: done(api, job_id) >= 200, 60, "some progress", on_timeout=recovering.tail)
    mark = recovering.log.stat().st_size
    assert done(api, job_id) < n - 1000, "the job is nearly done before the fault: make it bigger"
    for _ in range(3):
        with clean_db.connect() as c:
            c.execute(text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ))
        time.sleep(0.3)
    back = time.monotonic()
    status = wait_job(api, job_id, timeout=90, worker=recovering)
    elapsed = time.monotonic() - back
    assert status["state"] == "completed" and status["counts"]["succeeded"] == n
    assert_exactly_once(clean_db, job_id, n)
    with open(recovering.log, "rb") as f:
        f.seek(mark)
        lines = [orjson.loads(line) for line in f if line.startswith(b"{")]
    complaints = [x for x in lines if x["level"] in ("WARNING", "ERROR", "CRITICAL")]
    assert any("database is unavailable" in x["message"] for x in complaints), complaints
    # A few lines per cut chunk (the task's, the ledger's), never one per entry.
    assert len(complaints) <= 3 * 2 * 4, [x["message"] for x in complaints]
    assert elapsed < BOUND, f"took {elapsed:.1f} s"
    print(f"cut connections: {len(complaints)} log lines; completed in {elapsed:.1f} s")
