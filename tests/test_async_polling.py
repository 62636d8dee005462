"""The FHIR async status URL as polling clients follow it: every 202 about a job (the submit
answer and each poll while the job is at work) names the status URL in `Content-Location` and
the job's progress in `X-Progress`, with an OperationOutcome body."""

from __future__ import annotations

import io
from typing import Any

import orjson
import pytest
from sqlalchemy import Connection, Engine, text

from core.jobs import Submission, accept_job
from tests.jobs_helpers import *  # noqa: F403 - fixtures
from tests.jobs_helpers import WorkerProcess, job_id_of, patients_batch, submit, wait_job


def assert_accepted(r: Any, url: str, progress: str) -> None:
    assert r.status_code == 202, r.get_data(as_text=True)
    assert r.headers["Content-Location"] == url
    assert r.headers["X-Progress"] == progress
    assert r.json["resourceType"] == "OperationOutcome"
    assert r.json["issue"][0]["severity"] == "information"


def idle_job(engine: Engine, n: int) -> str:
    """A job accepted and never sent to a worker; the reaper leaves it be (its last progress
    is dated in the future), so it stays exactly as the test sets it."""
    sub = Submission(kind="bundle", owner="anonymous", base_url="http://localhost/fhir")
    with engine.begin() as conn:
        job_id = accept_job(conn, io.BytesIO(orjson.dumps(patients_batch(n))), sub).job_id
        set_job(conn, job_id, "accepted", 0, 0)
    return job_id


def set_job(conn: Connection, job_id: str, state: str, done: int, failed: int) -> None:
    conn.execute(text("UPDATE job SET state = :state, done = :done, failed = :failed, "
                      "updated_at = now() + interval '1 hour' WHERE id = :id"),
                 {"id": job_id, "state": state, "done": done, "failed": failed})


def test_submit_answer_names_the_status_url_and_progress(api: Any) -> None:
    r = submit(api, patients_batch(3))
    job_id = job_id_of(r)
    # The progress is the job's as committed, before any worker had it.
    assert_accepted(r, f"http://localhost/fhir/_async/{job_id}",
                    "accepted: 0 of 3 entries done, 0 failed")
    assert job_id in r.json["issue"][0]["diagnostics"]


def test_every_poll_while_at_work_names_the_status_url(api: Any, clean_db: Engine) -> None:
    job_id = idle_job(clean_db, 3)
    url = f"http://localhost/fhir/_async/{job_id}"
    for _ in range(2):
        poll = api.get(f"/fhir/_async/{job_id}")
        assert_accepted(poll, url, "accepted: 0 of 3 entries done, 0 failed")
        assert int(poll.headers["Retry-After"]) >= 1
        assert "0 of 3" in poll.json["issue"][0]["diagnostics"]

    with clean_db.begin() as c:  # as a worker leaves it mid-way
        set_job(c, job_id, "running", 2, 1)
    assert_accepted(api.get(f"/fhir/_async/{job_id}"), url,
                    "running: 2 of 3 entries done, 1 failed")


@pytest.mark.parametrize("method", ["POST", "PUT"])
def test_replayed_submission_reports_the_jobs_own_progress(
    api: Any, worker: WorkerProcess, method: str
) -> None:
    body: Any = patients_batch(2) if method == "POST" else [
        {"resourceType": "Patient", "id": "a"}, {"resourceType": "Patient", "id": "b"}]
    first = submit(api, body, method=method, **{"Idempotency-Key": "k"})
    wait_job(api, job_id_of(first), worker=worker)
    again = submit(api, body, method=method, **{"Idempotency-Key": "k"})
    assert again.headers["Idempotent-Replayed"] == "true"
    assert_accepted(again, first.headers["Content-Location"],
                    "completed: 2 of 2 entries done, 0 failed")


def test_status_url_follows_the_configured_base_url(api: Any, clean_db: Engine) -> None:
    from dataclasses import replace

    app = api.application
    app.config["FHIRQ"] = replace(app.config["FHIRQ"], base_url="https://fhir.example.org/r4/")
    submitted = submit(api, patients_batch(1))
    assert submitted.headers["Content-Location"] == (
        f"https://fhir.example.org/r4/_async/{job_id_of(submitted)}")
    job_id = idle_job(clean_db, 1)
    poll = api.get(f"/fhir/_async/{job_id}")
    assert poll.headers["Content-Location"] == f"https://fhir.example.org/r4/_async/{job_id}"
