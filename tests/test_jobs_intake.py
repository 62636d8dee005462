"""Accepting jobs: the body streamed into PostgreSQL and split into entries, envelope errors
with the element at fault, NDJSON, limits, and Idempotency-Key. No worker needed."""

from __future__ import annotations

import io
from typing import Any

import orjson
import pytest
from sqlalchemy import Engine, text

from core.errors import FhirError
from core.jobs import Submission, accept_job
from core.jobs.model import Dispatch
from tests.jobs_helpers import *  # noqa: F403 - fixtures
from tests.jobs_helpers import job_id_of, patients_batch, scalar, submit
from tests.store_sql import ENTRIES


def accept(engine: Engine, body: bytes, **kw: Any) -> Any:
    sub = Submission(kind=kw.pop("kind", "bundle"), owner=kw.pop("owner", "alice"),
                     base_url="http://x/fhir", chunk_size=kw.pop("chunk_size", 2),
                     inflight_chunks=kw.pop("inflight", 2), **kw)
    with engine.begin() as conn:
        return accept_job(conn, io.BytesIO(body), sub)


def entries(engine: Engine, job_id: str) -> list[Any]:
    with engine.connect() as c:
        return c.execute(
            text(f"SELECT idx, request::text, status, outcome FROM {ENTRIES} e "
                 "WHERE job_id = :id ORDER BY idx"), {"id": job_id}
        ).all()


def test_bundle_entries_are_stored_in_order_with_their_exact_content(clean_db: Engine) -> None:
    body = patients_batch(5)
    body["entry"][3]["request"]["url"] = 'Patient?name=a\tb\\c"\n'  # COPY escapes survive
    acc = accept(clean_db, orjson.dumps(body, option=orjson.OPT_INDENT_2))
    assert (acc.kind, acc.total, acc.replayed) == ("batch", 5, False)
    assert acc.dispatches == [Dispatch("chunk", acc.job_id, 0)] * 2  # 3 chunks, 2 in flight
    rows = entries(clean_db, acc.job_id)
    assert [r.idx for r in rows] == [0, 1, 2, 3, 4]
    assert [orjson.loads(r.request) for r in rows] == body["entry"]
    assert all(r.status is None for r in rows)
    assert scalar(clean_db, "SELECT count(*) FROM job_upload") == 0
    with clean_db.connect() as c:
        job = dict(c.execute(text("SELECT * FROM job WHERE id = :id"), {"id": acc.job_id})
                   .mappings().one())
    assert (job["state"], job["total"], job["done"], job["owner"]) == ("accepted", 5, 0, "alice")


def test_transaction_gets_one_task_and_empty_bundle_completes_at_once(clean_db: Engine) -> None:
    tx = accept(clean_db, orjson.dumps({"resourceType": "Bundle", "type": "transaction",
                                        "entry": patients_batch(3)["entry"]}))
    assert (tx.kind, tx.total, tx.dispatches) == (
        "transaction", 3, [Dispatch("transaction", tx.job_id, 0)])
    empty = accept(clean_db, b'{"resourceType": "Bundle", "type": "batch"}')
    assert (empty.total, empty.dispatches) == (0, [])
    assert scalar(clean_db, "SELECT state FROM job WHERE id = :id", id=empty.job_id) == "completed"


def test_upsert_array_and_ndjson(clean_db: Engine) -> None:
    arr = accept(clean_db, b'[{"resourceType": "Patient", "id": "a"}, 7]', kind="upsert")
    assert (arr.kind, arr.total) == ("upsert", 2)
    assert [orjson.loads(r.request) for r in entries(clean_db, arr.job_id)] == [
        {"resourceType": "Patient", "id": "a"}, 7]

    nd = b'{"resourceType": "Patient", "id": "a"}\n\n  \r\n{"resourceType": "Pat\n[1]\r\n'
    acc = accept(clean_db, nd, kind="upsert", ndjson=True)
    assert acc.total == 3
    rows = entries(clean_db, acc.job_id)
    assert [r.status for r in rows] == [None, 400, None]
    assert rows[1].request is None
    assert rows[1].outcome["issue"][0]["expression"] == ["[1]"]
    assert scalar(clean_db, "SELECT done FROM job WHERE id = :id", id=acc.job_id) == 1


BAD = [
    # (body, kind, status, expression or None, words in the diagnostics)
    (b"", "bundle", 400, None, "empty"),
    (b"  \n ", "bundle", 400, None, "empty"),
    (b"[1]", "bundle", 400, ["$"], "Bundle"),
    (b'{"resourceType": "Patient"}', "bundle", 400, ["Bundle.resourceType"], "Patient"),
    (b'{"resourceType": "Bundle", "type": "searchset", "entry": []}', "bundle", 400,
     ["Bundle.type"], "searchset"),
    (b'{"resourceType": "Bundle", "type": "batch", "entry": {}}', "bundle", 400,
     ["Bundle.entry"], "array"),
    (b'{"resourceType": "Bundle", "type": "batch", "entry": [1,', "bundle", 400, None,
     "not valid JSON"),
    (b'{"resourceType": "Bundle", "type": "batch", "entry": [], "entry": []}', "bundle", 400,
     ["Bundle"], "repeats"),
    (b'{"resourceType": "Patient"}', "upsert", 400, ["$"], "array"),
    (b'[{"a": 1}, }', "upsert", 400, None, "not valid JSON"),
    (b"[" + b"[" * 100_000 + b"]" * 100_000 + b"]", "upsert", 400, None, "deeply"),
]


@pytest.mark.parametrize(("body", "kind", "status", "expression", "words"), BAD)
def test_bad_bodies_are_refused_saying_where_and_leave_nothing(
    clean_db: Engine, body: bytes, kind: str, status: int, expression: list[str] | None,
    words: str,
) -> None:
    with pytest.raises(FhirError) as info:
        accept(clean_db, body, kind=kind)
    err = info.value
    assert err.status == status
    if expression is not None:
        assert err.expression == expression
    assert words in err.diagnostics
    assert scalar(clean_db, "SELECT count(*) FROM job") == 0
    assert scalar(clean_db, "SELECT count(*) FROM job_entry") == 0


def test_body_over_the_limit_is_413(clean_db: Engine) -> None:
    body = orjson.dumps(patients_batch(2000))
    with pytest.raises(FhirError) as info:
        accept(clean_db, body, max_bytes=len(body) - 1)
    assert info.value.status == 413
    assert scalar(clean_db, "SELECT count(*) FROM job") == 0


def test_idempotency_key_same_body_same_job_other_body_422(clean_db: Engine) -> None:
    body = orjson.dumps(patients_batch(3))
    first = accept(clean_db, body, idempotency_key="k1")
    again = accept(clean_db, body, idempotency_key="k1")
    assert (again.job_id, again.replayed, again.dispatches) == (first.job_id, True, [])
    other_owner = accept(clean_db, body, idempotency_key="k1", owner="bob")
    assert other_owner.job_id != first.job_id and not other_owner.replayed
    with pytest.raises(FhirError) as info:
        accept(clean_db, orjson.dumps(patients_batch(4)), idempotency_key="k1")
    assert info.value.status == 422
    assert scalar(clean_db, "SELECT count(*) FROM job") == 2
    assert scalar(clean_db, "SELECT count(*) FROM job_entry") == 6


# --------------------------------------------------------------------------- through the API


def test_submit_answers_202_with_absolute_status_url_and_outcome(api: Any) -> None:
    r = submit(api, patients_batch(3))
    job_id = job_id_of(r)
    assert r.headers["Content-Location"] == f"http://localhost/fhir/_async/{job_id}"
    assert r.json["resourceType"] == "OperationOutcome"
    assert job_id in r.json["issue"][0]["diagnostics"]
    assert r.json["issue"][0]["severity"] == "information"
    status = api.get(f"/jobs/{job_id}").json
    assert status["kind"] == "batch" and status["counts"]["total"] == 3
    assert status["links"]["status"] == r.headers["Content-Location"]


@pytest.mark.parametrize(("method", "body", "ctype", "status", "expression"), [
    ("POST", b'{"resourceType": "Bundle", "type": "history"}', "application/fhir+json", 400,
     ["Bundle.type"]),
    ("POST", b"{}", "application/fhir+ndjson", 415, None),  # the FHIR endpoint refuses it
    ("PUT", b'{"resourceType": "Patient", "id": "x"}', "application/json", 400, ["$"]),
])
def test_submit_refuses_bad_envelopes(api: Any, method: str, body: bytes, ctype: str,
                                      status: int, expression: list[str] | None) -> None:
    r = submit(api, body, method=method, content_type=ctype)
    assert r.status_code == status, r.json
    assert r.json["resourceType"] == "OperationOutcome"
    if expression:
        assert r.json["issue"][0]["expression"] == expression


def test_submit_checks_idempotency_key_and_callback_headers(api: Any) -> None:
    body = patients_batch(2)
    a = submit(api, body, **{"Idempotency-Key": "abc"})
    b = submit(api, body, **{"Idempotency-Key": "abc"})
    assert job_id_of(a) == job_id_of(b) and b.headers["Idempotent-Replayed"] == "true"
    c = submit(api, patients_batch(3), **{"Idempotency-Key": "abc"})
    assert c.status_code == 422 and c.json["resourceType"] == "OperationOutcome"
    d = submit(api, body, **{"X-Callback-Url": "file:///etc/passwd"})
    assert d.status_code == 400


def test_jobs_are_visible_to_their_owner_only(api: Any) -> None:
    job_id = job_id_of(submit(api, patients_batch(2), **{"X-Test-Owner": "alice"}))
    mallory = {"X-Test-Owner": "mallory"}
    for method, url in [("GET", f"/jobs/{job_id}"), ("GET", f"/jobs/{job_id}/entries"),
                        ("GET", f"/fhir/_async/{job_id}"), ("DELETE", f"/fhir/_async/{job_id}"),
                        ("POST", f"/jobs/{job_id}/retry")]:
        r = api.open(url, method=method, headers=mallory)
        assert r.status_code == 404, (method, url)
        assert r.json["resourceType"] == "OperationOutcome"
    assert api.get("/jobs", headers=mallory).json["jobs"] == []
    mine = api.get("/jobs", headers={"X-Test-Owner": "alice"}).json["jobs"]
    assert [j["id"] for j in mine] == [job_id]
    assert api.get("/jobs?state=bogus").status_code == 400


def test_postgresql_memory_does_not_grow_with_the_body(clean_db: Engine) -> None:
    """The backend accepting a 40 MB bundle stays far below the body's size in private memory
    (splitting the body in one statement took about 7× the body)."""
    import threading
    import time

    import psutil

    entry = orjson.dumps(patients_batch(1)["entry"][0])
    n = 40_000_000 // len(entry)
    body = b'{"resourceType": "Bundle", "type": "batch", "entry": [' + b", ".join(
        [entry] * n) + b"]}"
    sub = Submission(kind="bundle", owner="alice", base_url="http://x/fhir",
                     max_bytes=len(body) + 1)
    with clean_db.connect() as conn:
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        conn.commit()
        try:
            backend = psutil.Process(pid)
            start_uss = backend.memory_full_info().uss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pytest.skip("the PostgreSQL server runs elsewhere or as another user")
        peak = [start_uss]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], backend.memory_full_info().uss)
                time.sleep(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            with conn.begin():
                accepted = accept_job(conn, io.BytesIO(body), sub)
        finally:
            done.set()
            sampler.join()
    assert accepted.total == n
    growth = peak[0] - start_uss
    assert growth < len(body) // 2, f"the backend grew by {growth >> 20} MiB"

