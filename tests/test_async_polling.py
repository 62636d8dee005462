"""The FHIR async status URL as polling clients follow it: every 202 about a job (the submit
answer and each poll while the job is at work) names the status URL in `Content-Location` and
the job's progress in `X-Progress`, with an OperationOutcome body."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Engine, text

from tests.jobs_helpers import *  # noqa: F403 - fixtures
from tests.jobs_helpers import job_id_of, patients_batch, submit


def assert_accepted(r: Any, url: str, progress: str) -> None:
    assert r.status_code == 202, r.get_data(as_text=True)
    assert r.headers["Content-Location"] == url
    assert r.headers["X-Progress"] == progress
    assert r.json["resourceType"] == "OperationOutcome"
    assert r.json["issue"][0]["severity"] == "information"


def test_submit_and_every_poll_name_the_status_url(api: Any, clean_db: Engine) -> None:
    r = submit(api, patients_batch(3))
    job_id = job_id_of(r)
    url = f"http://localhost/fhir/_async/{job_id}"
    assert_accepted(r, url, "accepted: 0 of 3 entries done, 0 failed")

    # No worker runs in this test: the job stays accepted, and polls keep answering 202.
    for _ in range(2):
        poll = api.get(f"/fhir/_async/{job_id}")
        assert_accepted(poll, url, "accepted: 0 of 3 entries done, 0 failed")
        assert int(poll.headers["Retry-After"]) >= 1
        assert "0 of 3" in poll.json["issue"][0]["diagnostics"]

    with clean_db.begin() as c:  # as a worker leaves it mid-way
        c.execute(text("UPDATE job SET state = 'running', done = 2, failed = 1 WHERE id = :id"),
                  {"id": job_id})
    assert_accepted(api.get(f"/fhir/_async/{job_id}"), url,
                    "running: 2 of 3 entries done, 1 failed")


@pytest.mark.parametrize("method", ["POST", "PUT"])
def test_replayed_submission_reports_the_jobs_own_progress(
    api: Any, clean_db: Engine, method: str
) -> None:
    body: Any = patients_batch(2) if method == "POST" else [
        {"resourceType": "Patient", "id": "a"}, {"resourceType": "Patient", "id": "b"}]
    first = submit(api, body, method=method, **{"Idempotency-Key": "k"})
    job_id = job_id_of(first)
    with clean_db.begin() as c:
        c.execute(text("UPDATE job SET state = 'running', done = 1 WHERE id = :id"),
                  {"id": job_id})
    again = submit(api, body, method=method, **{"Idempotency-Key": "k"})
    assert_accepted(again, first.headers["Content-Location"],
                    "running: 1 of 2 entries done, 0 failed")


def test_status_url_follows_the_configured_base_url(api: Any) -> None:
    from dataclasses import replace

    app = api.application
    app.config["FHIRQ"] = replace(app.config["FHIRQ"], base_url="https://fhir.example.org/r4/")
    job_id = job_id_of(submit(api, patients_batch(1)))
    url = f"https://fhir.example.org/r4/_async/{job_id}"
    poll = api.get(f"/fhir/_async/{job_id}")
    assert poll.headers["Content-Location"] == url
