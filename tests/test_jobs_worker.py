"""End to end through API → Redis → real Celery worker processes → PostgreSQL: every
user-visible job flow, with effects checked by counting rows in SQL."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from sqlalchemy import Engine, text

from tests.builders import patient, post, transaction, urn
from tests.conftest import BROKER_URL
from tests.jobs_helpers import *  # noqa: F403 - fixtures
from tests.jobs_helpers import (
    QUEUE,
    WorkerProcess,
    job_id_of,
    patients_batch,
    scalar,
    submit,
    wait_for,
    wait_job,
)
from worker.broker import broker_for

LIVE = "SELECT count(*) FROM resource WHERE NOT deleted"


def poll(client: Any, job_id: str, timeout: float = 60) -> Any:
    """Poll the status URL as a FHIR client would, until it stops answering 202."""
    def done() -> Any:
        r = client.get(f"/fhir/_async/{job_id}")
        if r.status_code == 202:
            assert "X-Progress" in r.headers and int(r.headers["Retry-After"]) >= 1
            return None
        return r

    return wait_for(done, timeout, f"job {job_id} to finish", interval=0.2)


def bad(entry: dict[str, Any]) -> dict[str, Any]:
    entry["request"]["method"] = "FETCH"
    return entry


def test_batch_runs_in_chunks_and_answers_in_request_order(api: Any, worker: WorkerProcess,
                                                           clean_db: Engine) -> None:
    body = patients_batch(120)  # 3 chunks of 50
    for i in (7, 99):
        bad(body["entry"][i])
    job_id = job_id_of(submit(api, body))
    r = poll(api, job_id)
    assert r.status_code == 200
    bundle = r.json
    assert bundle["type"] == "batch-response"
    statuses = [e["response"]["status"] for e in bundle["entry"]]
    assert len(statuses) == 120
    assert [i for i, s in enumerate(statuses) if not s.startswith("201")] == [7, 99]
    failed = bundle["entry"][99]["response"]["outcome"]["issue"][0]
    assert failed["expression"] == ["Bundle.entry[99].request.method"]
    created = bundle["entry"][100]
    assert created["resource"]["identifier"][0]["value"] == "t-100"
    assert created["resource"]["meta"]["versionId"] == "1"
    assert created["response"]["location"].startswith(f"Patient/{created['resource']['id']}/")
    assert scalar(clean_db, LIVE) == 118

    status = api.get(f"/jobs/{job_id}").json
    assert status["state"] == "completed"
    assert status["counts"] == {"total": 120, "done": 120, "succeeded": 118, "failed": 2,
                                "pending": 0}
    page = api.get(f"/jobs/{job_id}/entries?outcome=failed&_count=1").json
    assert [e["index"] for e in page["entries"]] == [7]
    nxt = api.get(page["next"].replace("http://localhost", "")).json
    assert [e["index"] for e in nxt["entries"]] == [99]
    assert nxt["entries"][0]["status"] == 400
    listed = api.get("/jobs?state=completed").json["jobs"]
    assert [j["id"] for j in listed] == [job_id]


def test_prefer_minimal_answers_without_resources(api: Any, worker: WorkerProcess) -> None:
    job_id = job_id_of(submit(api, patients_batch(3), Prefer="respond-async, return=minimal"))
    bundle = poll(api, job_id).json
    assert [set(e) for e in bundle["entry"]] == [{"response"}] * 3


def test_transaction_job_answers_transaction_response(api: Any, worker: WorkerProcess,
                                                      clean_db: Engine) -> None:
    p = urn()
    obs = {"resourceType": "Observation", "status": "final",
           "code": {"text": "weight"}, "subject": {"reference": p}}
    job_id = job_id_of(submit(api, transaction(post(obs), post(patient("Tx"), full_url=p))))
    r = poll(api, job_id)
    assert r.status_code == 200, r.json
    assert r.json["type"] == "transaction-response"
    obs_out, pat_out = (e["resource"] for e in r.json["entry"])
    assert obs_out["subject"]["reference"] == f"Patient/{pat_out['id']}"
    assert scalar(clean_db, LIVE) == 2


def test_failed_transaction_reports_the_entry_and_writes_nothing(
    api: Any, worker: WorkerProcess, clean_db: Engine
) -> None:
    entries = [post(patient(f"P{i}")) for i in range(5)]
    entries[3]["request"]["url"] = "Observation"  # the resource is a Patient: 400
    job_id = job_id_of(submit(api, transaction(*entries)))
    r = poll(api, job_id)
    assert r.status_code == 400
    issue = r.json["issue"][0]
    assert r.json["resourceType"] == "OperationOutcome"
    assert issue["expression"][0].startswith("Bundle.entry[3]")
    assert scalar(clean_db, "SELECT count(*) FROM resource") == 0
    assert scalar(clean_db, "SELECT count(*) FROM resource_history") == 0
    status = api.get(f"/jobs/{job_id}").json
    assert status["state"] == "failed" and status["outcomeStatus"] == 400
    failed = api.get(f"/jobs/{job_id}/entries?outcome=failed").json["entries"]
    assert [e["index"] for e in failed] == [3]


def test_upsert_array_and_ndjson(api: Any, worker: WorkerProcess, clean_db: Engine) -> None:
    elements = [patient("A", id="u1"), {"resourceType": "Patient"}, patient("C", id="u3")]
    job_id = job_id_of(submit(api, elements, method="PUT", content_type="application/json"))
    r = poll(api, job_id)
    assert r.status_code == 200
    out = r.json
    assert [x["resourceType"] for x in out] == ["Patient", "OperationOutcome", "Patient"]
    assert out[0]["id"] == "u1" and out[0]["meta"]["versionId"] == "1"
    assert out[1]["issue"][0]["expression"] == ["[1].id"]

    # The same ids again as NDJSON: new versions; a line that is not JSON fails in its place.
    nd = b"\n".join([orjson.dumps(patient("A2", id="u1")), b"{oops",
                     orjson.dumps(patient("C2", id="u3"))])
    job_id = job_id_of(submit(api, nd, method="PUT", content_type="application/fhir+ndjson"))
    out = poll(api, job_id).json
    assert [x["resourceType"] for x in out] == ["Patient", "OperationOutcome", "Patient"]
    assert out[0]["meta"]["versionId"] == "2" and out[0]["name"][0]["family"] == "A2"
    assert out[1]["issue"][0]["expression"] == ["[1]"]
    assert scalar(clean_db, LIVE) == 2
    assert scalar(clean_db, "SELECT count(*) FROM resource_history") == 4


def test_sigkill_mid_batch_loses_and_duplicates_nothing(
    api: Any, worker: WorkerProcess, clean_db: Engine
) -> None:
    n = 1500
    job_id = job_id_of(submit(api, patients_batch(n, "kill")))
    wait_for(lambda: api.get(f"/jobs/{job_id}").json["counts"]["done"] >= 200, 60,
             "some progress", on_timeout=worker.tail)
    worker.kill()
    done_at_kill = api.get(f"/jobs/{job_id}").json["counts"]["done"]
    assert done_at_kill < n, "the job finished before the kill: make it bigger"
    worker.start()  # a fresh worker; the reaper finds the stalled job and revives it
    status = wait_job(api, job_id, timeout=120, worker=worker)
    assert status["state"] == "completed"
    assert status["counts"]["done"] == n and status["counts"]["succeeded"] == n
    # Exactly once: one resource and one version per entry, one result per entry.
    assert scalar(clean_db, LIVE) == n
    assert scalar(clean_db, "SELECT count(*) FROM resource_history") == n
    assert scalar(clean_db, "SELECT count(DISTINCT tokens) FROM resource") == n
    assert scalar(clean_db, "SELECT count(*) FROM job_result WHERE status = 201") == n


def test_lost_messages_are_reaped(api: Any, jobs_env: dict[str, str], worker: WorkerProcess,
                                  clean_db: Engine) -> None:
    """The broker lost the job's messages between accept and execution (Redis restarted
    empty, a queue purged): the reaper re-dispatches the job."""
    worker.stop()
    job_id = job_id_of(submit(api, patients_batch(60, "lost")))
    broker_for(BROKER_URL).purge(QUEUE)
    worker.start()
    status = wait_job(api, job_id, timeout=60, worker=worker)
    assert status["counts"]["succeeded"] == 60
    assert scalar(clean_db, LIVE) == 60


def test_cancel_mid_job_stops_pending_entries(api: Any, worker: WorkerProcess,
                                              clean_db: Engine) -> None:
    n = 1500
    job_id = job_id_of(submit(api, patients_batch(n, "cancel")))
    wait_for(lambda: api.get(f"/jobs/{job_id}").json["counts"]["done"] >= 100, 60,
             "some progress", on_timeout=worker.tail)
    r = api.delete(f"/fhir/_async/{job_id}")
    assert r.status_code == 202
    time.sleep(2)  # any chunk that was running has committed or rolled back by now
    status = api.get(f"/jobs/{job_id}").json
    assert status["state"] == "cancelled"
    assert status["counts"]["done"] < n
    assert api.get(f"/fhir/_async/{job_id}").status_code == 404
    # Finished entries stay (and are listed); the rest never ran.
    assert scalar(clean_db, LIVE) == status["counts"]["done"]
    assert scalar(clean_db, "SELECT count(*) FROM job_result") == (
        status["counts"]["done"])
    time.sleep(1)
    assert api.get(f"/jobs/{job_id}").json["counts"]["done"] == status["counts"]["done"]
    done_page = api.get(f"/jobs/{job_id}/entries?outcome=done&_count=5").json["entries"]
    assert [e["state"] for e in done_page] == ["succeeded"] * 5


def test_idempotency_key_replay_runs_once(api: Any, worker: WorkerProcess,
                                          clean_db: Engine) -> None:
    body = patients_batch(10, "idem")
    first = job_id_of(submit(api, body, **{"Idempotency-Key": "load-1"}))
    wait_job(api, first, worker=worker)
    again = submit(api, body, **{"Idempotency-Key": "load-1"})
    assert job_id_of(again) == first
    assert poll(api, first).status_code == 200
    assert scalar(clean_db, LIVE) == 10
    assert submit(api, patients_batch(11, "idem"),
                  **{"Idempotency-Key": "load-1"}).status_code == 422


def test_retry_reruns_only_failed_entries_keeping_indexes(
    api: Any, worker: WorkerProcess, clean_db: Engine
) -> None:
    body = patients_batch(6, "retry")
    for i in (1, 4):  # refer to an Organization that does not exist yet
        body["entry"][i]["resource"]["managingOrganization"] = {"reference": "Organization/o1"}
    job_id = job_id_of(submit(api, body))
    status = wait_job(api, job_id, worker=worker)
    assert status["counts"]["failed"] == 2, api.get(f"/jobs/{job_id}/entries").json
    first = poll(api, job_id).json
    created = {i: e["resource"]["id"] for i, e in enumerate(first["entry"]) if "resource" in e}

    org = {"resourceType": "Organization", "id": "o1", "name": "Acme"}
    assert api.put("/fhir/Organization/o1", json=org).status_code == 201
    r = api.post(f"/jobs/{job_id}/retry")
    assert r.status_code == 202 and r.json["retried"] == 2
    status = wait_job(api, job_id, worker=worker)
    assert status["counts"] == {"total": 6, "done": 6, "succeeded": 6, "failed": 0, "pending": 0}
    second = poll(api, job_id).json
    assert [e["response"]["status"][:3] for e in second["entry"]] == ["201"] * 6
    assert second["entry"][4]["resource"]["managingOrganization"]["reference"] == (
        "Organization/o1")
    # The four that had succeeded were not run again.
    assert {i: second["entry"][i]["resource"]["id"] for i in created} == created
    assert scalar(clean_db, "SELECT count(*) FROM resource WHERE res_type = 'Patient'") == 6
    assert api.post(f"/jobs/{job_id}/retry").json["retried"] == 0


def test_small_job_is_not_starved_by_a_big_one(api: Any, worker: WorkerProcess) -> None:
    """Without fairness all 200 chunks of the big job would be queued ahead of the small one."""
    big = job_id_of(submit(api, patients_batch(10_000, "big")))
    wait_for(lambda: api.get(f"/jobs/{big}").json["counts"]["done"] > 0, 30, "big job start")
    t0 = time.monotonic()
    small = job_id_of(submit(api, patients_batch(10, "small")))
    status = wait_job(api, small, timeout=30, worker=worker)
    latency = time.monotonic() - t0
    big_status = api.get(f"/jobs/{big}").json
    assert status["state"] == "completed"
    assert big_status["state"] == "running", big_status["counts"]
    assert latency < 10
    api.delete(f"/fhir/_async/{big}")


@pytest.fixture
def callback_server() -> Iterator[list[dict[str, Any]]]:
    calls: list[dict[str, Any]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server API
            calls.append(orjson.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    calls_url = f"http://127.0.0.1:{server.server_address[1]}/done"
    calls.append({"url": calls_url})
    yield calls
    server.shutdown()


def test_callback_is_called_once_when_the_job_ends(
    api: Any, worker: WorkerProcess, callback_server: list[dict[str, Any]]
) -> None:
    url = callback_server.pop()["url"]
    job_id = job_id_of(submit(api, patients_batch(60), **{"X-Callback-Url": url}))
    wait_for(lambda: callback_server, 30, "the callback", on_timeout=worker.tail)
    time.sleep(1.5)  # a second call would come now (reaper interval 1 s)
    assert len(callback_server) == 1
    payload = callback_server[0]
    assert payload["id"] == job_id and payload["state"] == "completed"
    assert payload["counts"]["succeeded"] == 60
    assert api.get(f"/jobs/{job_id}").json["callback"]["state"] == "sent"


def test_a_running_transaction_job_shows_running(api: Any, worker: WorkerProcess,
                                                  clean_db: Engine) -> None:
    """The whole transaction is one database transaction; its job still reads `running`
    while that transaction is open (here: held up by a row lock the test keeps)."""
    created = api.put("/fhir/Patient/held", content_type="application/fhir+json",
                      data=orjson.dumps({"resourceType": "Patient", "id": "held"}))
    assert created.status_code == 201, created.json
    with clean_db.connect() as blocker:
        tx = blocker.begin()
        blocker.execute(text("SELECT 1 FROM resource WHERE res_id = 'held' FOR UPDATE"))
        job_id = job_id_of(submit(api, transaction(
            {"resource": {"resourceType": "Patient", "id": "held", "active": True},
             "request": {"method": "PUT", "url": "Patient/held"}})))
        wait_for(lambda: scalar(clean_db, f"SELECT state FROM job WHERE id = '{job_id}'")
                 == "running", 20, "the transaction job to show running")
        tx.rollback()
    r = poll(api, job_id)
    assert r.status_code == 200, r.json
    assert scalar(clean_db, f"SELECT state FROM job WHERE id = '{job_id}'") == "completed"
