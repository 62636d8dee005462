"""Per-owner quotas on async submissions: active jobs (FHIRQ_MAX_ACTIVE_JOBS) and submissions
per minute (FHIRQ_MAX_SUBMISSIONS_PER_MINUTE) answered 429 + Retry-After with an
OperationOutcome; other owners unaffected; Idempotency-Key replays allowed; exact under
concurrent submissions on separate connections (as from several API processes)."""

from __future__ import annotations

import io
import threading
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import Engine, text

from core.errors import TooManyRequests
from core.jobs import Submission, accept_job
from core.jobs.quota import Quota
from tests.jobs_helpers import *  # noqa: F403 - fixtures
from tests.jobs_helpers import job_id_of, patients_batch, scalar, submit


def _limit(client: Any, **settings: int) -> Any:
    app = client.application
    app.config["FHIRQ"] = replace(app.config["FHIRQ"], **settings)
    return client


def _is_429(r: Any) -> int:
    assert r.status_code == 429, r.get_data(as_text=True)
    assert r.json["resourceType"] == "OperationOutcome"
    assert r.json["issue"][0]["code"] == "throttled"
    return int(r.headers["Retry-After"])


def _held(engine: Engine, r: Any) -> str:
    """The accepted job's id; dated in the future, no reaper revives it (it was sent to a queue
    no worker reads): it stays active for as long as the test needs."""
    job_id = job_id_of(r)
    with engine.begin() as c:
        c.execute(text("UPDATE job SET updated_at = now() + interval '1 hour' WHERE id = :id"),
                  {"id": job_id})
    return job_id


def test_active_jobs_over_the_quota_are_429_until_one_ends(
        api: Any, clean_db: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    # Active means active: no worker of this session (or another module's) may end the jobs.
    monkeypatch.setenv("FHIRQ_QUEUE", "fhirq-test-quota-nobody")
    client = _limit(api, max_active_jobs=2, max_submissions_per_minute=0)
    first = _held(clean_db, submit(client, patients_batch(1), **{"X-Test-Owner": "etl"}))
    _held(clean_db, submit(client, patients_batch(1), **{"X-Test-Owner": "etl"}))
    retry = _is_429(submit(client, patients_batch(1), **{"X-Test-Owner": "etl"}))
    assert retry > 0
    assert "FHIRQ_MAX_ACTIVE_JOBS" in submit(client, patients_batch(1),
                                              **{"X-Test-Owner": "etl"}).json["issue"][0][
        "diagnostics"]
    # Another owner has a quota of its own.
    job_id_of(submit(client, patients_batch(1), **{"X-Test-Owner": "other"}))
    # Nothing of the refused submissions was kept.
    assert scalar(clean_db, "SELECT count(*) FROM job WHERE owner = 'etl'") == 2
    with clean_db.begin() as c:
        c.execute(text("UPDATE job SET state = 'completed' WHERE id = :id"), {"id": first})
    job_id_of(submit(client, patients_batch(1), **{"X-Test-Owner": "etl"}))


def test_submissions_per_minute_over_the_quota_are_429(api: Any) -> None:
    client = _limit(api, max_active_jobs=0, max_submissions_per_minute=3)
    for _ in range(3):
        job_id_of(submit(client, patients_batch(1), **{"X-Test-Owner": "etl"}))
    r = submit(client, patients_batch(1), **{"X-Test-Owner": "etl"})
    assert 1 <= _is_429(r) <= 60
    assert "FHIRQ_MAX_SUBMISSIONS_PER_MINUTE" in r.json["issue"][0]["diagnostics"]


def test_an_idempotent_replay_is_not_refused(api: Any) -> None:
    client = _limit(api, max_active_jobs=1, max_submissions_per_minute=1)
    body = patients_batch(1)
    job = job_id_of(submit(client, body, **{"X-Test-Owner": "etl", "Idempotency-Key": "k"}))
    again = submit(client, body, **{"X-Test-Owner": "etl", "Idempotency-Key": "k"})
    assert job_id_of(again) == job
    _is_429(submit(client, body, **{"X-Test-Owner": "etl"}))


@pytest.mark.parametrize("quota", [Quota(3, 0), Quota(0, 3)])
def test_concurrent_submissions_count_each_other_exactly(clean_db: Engine, quota: Quota) -> None:
    outcomes: list[str] = []
    start = threading.Barrier(8)

    def one() -> None:
        sub = Submission(kind="bundle", owner="etl", base_url="http://x/fhir", quota=quota)
        body = io.BytesIO(b'{"resourceType": "Bundle", "type": "batch", "entry": ['
                          + b'{"request": {"method": "GET", "url": "Patient/x"}}]}')
        start.wait()
        try:
            with clean_db.begin() as conn:
                accept_job(conn, body, sub)
            outcomes.append("accepted")
        except TooManyRequests:
            outcomes.append("429")

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(outcomes) == ["429"] * 5 + ["accepted"] * 3
    assert scalar(clean_db, "SELECT count(*) FROM job WHERE owner = 'etl'") == 3
