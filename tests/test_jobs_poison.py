"""Poison isolation with real worker processes: an entry that makes its chunk run past the
(test-shortened) time limit, or kills the process running it, or allocates without bound, ends
with a 500 result saying why; its job ends; every other entry took effect exactly once.

The poison comes from the test-only fault hook (core.jobs.faults), enabled in this module's
worker processes only.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine

from tests.builders import patient, post, transaction
from tests.jobs_helpers import *  # noqa: F403 - fixtures
from tests.jobs_helpers import (
    WorkerProcess,
    assert_exactly_once,
    job_id_of,
    lone_worker,
    patients_batch,
    scalar,
    submit,
    wait_job,
)

POISON_ENV = {
    "FHIRQ_TEST_POISON": "1",
    "FHIRQ_CHUNK_TIME_LIMIT": "4",
    "FHIRQ_ENTRY_TIME_LIMIT": "2",
    "FHIRQ_WORKER_MEMORY_MB": "1536",
}


@pytest.fixture(scope="module")
def poison_worker(jobs_env: dict[str, str]) -> Iterator[WorkerProcess]:
    """A worker whose processes honour the poison markers."""
    with lone_worker(jobs_env, POISON_ENV, "poison") as w:
        yield w


@pytest.fixture
def poisoner(poison_worker: WorkerProcess, clean_db: Engine) -> Iterator[WorkerProcess]:
    if not poison_worker.alive:
        poison_worker.start()
    yield poison_worker


def poisoned(n: int, tag: str, poison: dict[int, str]) -> dict[str, Any]:
    body = patients_batch(n, tag)
    for i, kind in poison.items():
        body["entry"][i]["resource"]["name"][0]["family"] = f"fhirq-test-poison:{kind}"
    return body


def failures(api: Any, job_id: str) -> dict[int, dict[str, Any]]:
    page = api.get(f"/jobs/{job_id}/entries?outcome=failed&_count=100").json["entries"]
    return {e["index"]: e for e in page}


def test_an_entry_past_the_time_limit_fails_alone(api: Any, poisoner: WorkerProcess,
                                                  clean_db: Engine) -> None:
    """`hang` ignores the soft limit, so only the hard kill (SIGKILL) ends its chunk; `sleep`
    is interrupted by the soft limit. Chunks of 50, chunk limit 4 s, entry limit 2 s."""
    n = 120
    t0 = time.monotonic()
    job_id = job_id_of(submit(api, poisoned(n, "slow", {70: "hang", 110: "sleep"})))
    status = wait_job(api, job_id, timeout=120, worker=poisoner)
    elapsed = time.monotonic() - t0
    assert status["state"] == "completed", poisoner.tail()
    assert status["counts"] == {"total": n, "done": n, "succeeded": n - 2, "failed": 2,
                                "pending": 0}, (failures(api, job_id), poisoner.tail(300))
    failed = failures(api, job_id)
    assert sorted(failed) == [70, 110]
    for i in (70, 110):
        assert str(failed[i]["status"]).startswith("500")
        issue = failed[i]["outcome"]["issue"][0]
        assert issue["code"] == "timeout", issue
        assert "time limit" in issue["diagnostics"]
        assert issue["expression"] == [f"Bundle.entry[{i}]"]
    assert_exactly_once(clean_db, job_id, n - 2)
    # How long the innocent entries of the poisoned chunks waited, against a chunk's 5 s.
    waited = scalar(clean_db, "SELECT extract(epoch FROM max(e.finished_at) - j.created_at) "
                              "FROM job_result e JOIN job j ON j.id = e.job_id "
                              "WHERE e.job_id = :id AND e.status = 201 GROUP BY j.created_at",
                    id=job_id)
    print(f"time-limit poison: job of {n} done in {elapsed:.1f} s, "
          f"the last innocent entry after {float(waited):.1f} s")


def test_an_entry_that_kills_its_process_fails_alone(api: Any, poisoner: WorkerProcess,
                                                     clean_db: Engine) -> None:
    n = 120
    t0 = time.monotonic()
    job_id = job_id_of(submit(api, poisoned(n, "kill", {30: "exit", 95: "memory"})))
    status = wait_job(api, job_id, timeout=120, worker=poisoner)
    elapsed = time.monotonic() - t0
    assert status["state"] == "completed"
    assert status["counts"]["succeeded"] == n - 2 and status["counts"]["failed"] == 2
    failed = failures(api, job_id)
    assert sorted(failed) == [30, 95]
    lost = failed[30]["outcome"]["issue"][0]
    assert lost["code"] == "exception" and "lost the worker process" in lost["diagnostics"]
    # The memory cap turned the runaway allocation into an error of that entry alone.
    assert str(failed[95]["status"]).startswith("500")
    assert failed[95]["outcome"]["issue"][0]["code"] == "too-costly"
    assert_exactly_once(clean_db, job_id, n - 2)
    assert poisoner.alive
    print(f"process-lost poison: job of {n} done in {elapsed:.1f} s")


def test_a_transaction_that_kills_its_process_twice_fails(api: Any, poisoner: WorkerProcess,
                                                          clean_db: Engine) -> None:
    """A transaction is all or nothing and cannot be split: its run dies, runs once more, dies
    again, and the job fails with a 500 saying why, nothing written."""
    body = transaction(post(patient("Innocent")), post(patient("fhirq-test-poison:exit")))
    job_id = job_id_of(submit(api, body))
    status = wait_job(api, job_id, timeout=60, worker=poisoner)
    assert status["state"] == "failed"
    assert status["outcomeStatus"] == 500
    issue = status["outcome"]["issue"][0]
    assert issue["code"] == "exception" and "lost the worker process" in issue["diagnostics"]
    assert scalar(clean_db, "SELECT count(*) FROM resource") == 0
    assert scalar(clean_db, "SELECT count(*) FROM job_chunk WHERE job_id = :id", id=job_id) == 0
    assert poisoner.alive
