"""Retention: a finished job's entries are purged after FHIRQ_JOB_RETENTION_DAYS in bounded
batches (beat task and `fhirq jobs prune`), its summary after FHIRQ_JOB_SUMMARY_RETENTION_DAYS;
a purged job's status URL says so with 410."""

from __future__ import annotations

from typing import Any

import orjson
from click.testing import CliRunner
from sqlalchemy import Engine, text

from cli.main import cli
from core.jobs.retention import prune
from tests.jobs_helpers import *  # noqa: F403 - fixtures
from tests.jobs_helpers import (
    WorkerProcess,
    job_id_of,
    patients_batch,
    scalar,
    submit,
    wait_for,
    wait_job,
)


def _age(engine: Engine, job_id: str, days: float) -> None:
    with engine.begin() as c:
        c.execute(text("UPDATE job SET finished_at = now() - make_interval(days => :d) "
                       "WHERE id = :id"), {"d": days, "id": job_id})


def _entries(engine: Engine, job_id: str) -> int:
    return scalar(engine, "SELECT count(*) FROM job_entry WHERE job_id = :id", id=job_id)


def test_entries_are_purged_in_batches_then_the_summary(api: Any, worker: WorkerProcess,
                                                        clean_db: Engine) -> None:
    old = job_id_of(submit(api, patients_batch(120, "old")))
    recent = job_id_of(submit(api, patients_batch(10, "recent")))
    wait_job(api, old, worker=worker)
    wait_job(api, recent, worker=worker)
    _age(clean_db, old, 8)

    done = prune(clean_db, entry_days=7, summary_days=90, batch=50)
    assert (done.entries, done.jobs_emptied, done.jobs_deleted) == (120, 1, 0)
    assert _entries(clean_db, old) == 0 and _entries(clean_db, recent) == 10
    # The resources the job wrote are the store's, not the job's: all still there.
    assert scalar(clean_db, "SELECT count(*) FROM resource") == 130

    r = api.get(f"/fhir/_async/{old}")
    assert r.status_code == 410
    issue = r.get_json()["issue"][0]
    assert issue["code"] == "deleted" and "purged" in issue["diagnostics"]
    assert api.get(f"/jobs/{old}/entries").status_code == 410
    assert api.post(f"/jobs/{old}/retry").status_code == 410
    status = api.get(f"/jobs/{old}").get_json()
    assert status["state"] == "completed" and status["counts"]["succeeded"] == 120
    assert "entriesPurgedAt" in status
    assert api.get(f"/fhir/_async/{recent}").status_code == 200

    # Nothing left to do: a second run deletes nothing.
    assert not prune(clean_db, entry_days=7, summary_days=90).anything

    _age(clean_db, old, 91)
    done = prune(clean_db, entry_days=7, summary_days=90)
    assert done.jobs_deleted == 1
    assert api.get(f"/jobs/{old}").status_code == 404
    assert api.get(f"/jobs/{recent}").status_code == 200


def test_fhirq_jobs_prune_and_its_dry_run(api: Any, worker: WorkerProcess, clean_db: Engine,
                                          db_url: str) -> None:
    job = job_id_of(submit(api, patients_batch(30, "cli")))
    wait_job(api, job, worker=worker)
    _age(clean_db, job, 3)
    env = {"FHIRQ_DATABASE_URL": db_url}

    r = CliRunner().invoke(cli, ["jobs", "prune", "--dry-run"], env=env)
    assert r.exit_code == 0, r.output
    assert orjson.loads(r.stdout) == {"dryRun": True, "jobs": 0, "entries": 0, "summaries": 0}
    r = CliRunner().invoke(cli, ["jobs", "prune", "--days", "2", "--dry-run"], env=env)
    assert orjson.loads(r.stdout)["entries"] == 30
    assert _entries(clean_db, job) == 30  # a dry run deletes nothing

    r = CliRunner().invoke(cli, ["jobs", "prune", "--days", "2"], env=env)
    assert r.exit_code == 0, r.output
    assert orjson.loads(r.stdout)["entriesDeleted"] == 30
    assert _entries(clean_db, job) == 0


def test_the_beat_task_runs_on_a_real_worker(api: Any, worker: WorkerProcess,
                                             clean_db: Engine) -> None:
    from worker.celery_app import celery

    job = job_id_of(submit(api, patients_batch(20, "beat")))
    wait_job(api, job, worker=worker)
    _age(clean_db, job, 30)
    celery.send_task("fhirq.prune")  # what beat sends every FHIRQ_RETENTION_INTERVAL
    wait_for(lambda: scalar(clean_db, "SELECT entries_purged_at IS NOT NULL FROM job "
                            "WHERE id = :id", id=job), 30, "the worker to purge the job",
             on_timeout=worker.tail)
    assert _entries(clean_db, job) == 0
