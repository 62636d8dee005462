"""Each byte written once: an entry's result is one insert-only `job_result` row (none while the
entry is pending, never a second one), a version's content is kept only in `resource_history`,
and the bulk COPY of a chunk carries any text intact. Plus the migration from 0008 with data.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg2
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import IntegrityError

from core.fhir.engine import execute_batch
from core.fhir.model import Context, EntryResult
from core.jobs import Submission, accept_job, run_chunk
from core.jobs.runner import write_results
from core.jobs.views import list_entries, stream_response
from tests.builders import ident, patient, post
from tests.conftest import fresh_database


def _accept(engine: Engine, n: int, chunk_size: int, tag: str) -> str:
    body = {"resourceType": "Bundle", "type": "batch",
            "entry": [post(patient(f"{tag}-{i}", identifier=ident("http://x", f"{tag}-{i}")))
                      for i in range(n)]}
    sub = Submission(kind="bundle", owner="o", base_url="http://x/fhir", chunk_size=chunk_size,
                     scopes=("system/*.*",))
    with engine.begin() as conn:
        return accept_job(conn, io.BytesIO(orjson.dumps(body)), sub).job_id


def _scalar(engine: Engine, sql: str, **params: Any) -> Any:
    with engine.connect() as c:
        return c.execute(text(sql), params).scalar_one()


def _run_chunk(engine: Engine, job_id: str) -> None:
    with engine.begin() as conn:
        run_chunk(conn, job_id, 0, engine.begin)


def test_pending_is_no_result_row_and_results_are_derived(clean_db: Engine) -> None:
    job_id = _accept(clean_db, 6, 3, "pend")
    _run_chunk(clean_db, job_id)
    assert _scalar(clean_db, "SELECT count(*) FROM job_result WHERE job_id = :id", id=job_id) == 3
    with clean_db.connect() as c:
        pending = list_entries(c, job_id, outcome="pending")
        done = list_entries(c, job_id, outcome="done")
        stored = c.execute(text("SELECT location, etag, res_type, res_id, res_version "
                                "FROM job_result WHERE job_id = :id ORDER BY idx"),
                           {"id": job_id}).all()
    assert [(e["index"], e["state"]) for e in pending] == [(3, "pending"), (4, "pending"),
                                                            (5, "pending")]
    assert [e["index"] for e in done] == [0, 1, 2]
    # Location and ETag of a created version are derived from the pointer, not stored.
    assert all(r.location is None and r.etag is None for r in stored)
    for entry, row in zip(done, stored, strict=True):
        assert entry["location"] == f"Patient/{row.res_id}/_history/1"
        assert entry["etag"] == 'W/"1"'
    # A partial response holds the finished entries, their representations from history.
    bundle = orjson.loads(b"".join(stream_response(clean_db, {
        "id": job_id, "kind": "batch", "prefer_return": "representation",
        "base_url": "http://x/fhir"})))
    assert [e["response"]["status"] for e in bundle["entry"]] == ["201 Created"] * 3
    assert [e["resource"]["identifier"][0]["value"] for e in bundle["entry"]] == [
        "pend-0", "pend-1", "pend-2"]
    assert all(e["resource"]["meta"]["versionId"] == "1" for e in bundle["entry"])

    _run_chunk(clean_db, job_id)
    with clean_db.connect() as c:
        assert list_entries(c, job_id, outcome="pending") == []
    assert _scalar(clean_db, "SELECT state FROM job WHERE id = :id", id=job_id) == "completed"


def test_a_redelivered_chunk_writes_nothing_twice(clean_db: Engine) -> None:
    job_id = _accept(clean_db, 10, 10, "again")
    _run_chunk(clean_db, job_id)
    _run_chunk(clean_db, job_id)  # the same task delivered again after its commit
    assert _scalar(clean_db, "SELECT count(*) FROM job_result WHERE job_id = :id", id=job_id) == 10
    assert _scalar(clean_db, "SELECT count(*) FROM resource") == 10
    assert _scalar(clean_db, "SELECT count(*) FROM resource_history") == 10
    assert _scalar(clean_db, "SELECT done FROM job WHERE id = :id", id=job_id) == 10
    # Even a writer that skipped the pending check cannot add a second result to an entry.
    with pytest.raises(IntegrityError), clean_db.begin() as conn:
        write_results(conn, job_id, [EntryResult(0, 500)], "batch", "representation")
    assert _scalar(clean_db, "SELECT status FROM job_result WHERE job_id = :id AND idx = 0",
                   id=job_id) == 201


# Every character COPY's text format or an array literal treats specially.
AWKWARD = 'tab\there, new\nline, cr\r, back\\slash, "quote", {brace}, comma, NULL, \\N'


def test_bulk_writes_carry_any_text_and_content_is_kept_once(conn: Any) -> None:
    res = patient("awk")
    res["identifier"] = [{"system": "http://x/a\\b\"c", "value": AWKWARD}]
    res["name"] = [{"family": AWKWARD, "given": ["Zoë"]}]
    [result] = execute_batch(conn, [(0, post(res))], Context())
    assert result.status == 201 and result.resource is not None
    key = ("Patient", result.resource["id"])
    stored = conn.execute(text(
        "SELECT h.content, r.tokens FROM resource r JOIN resource_history h "
        "USING (res_type, res_id, version) WHERE r.res_id = :i"), {"i": key[1]}).one()
    assert stored.content["identifier"] == res["identifier"]
    assert stored.content["name"] == res["name"]
    assert any(AWKWARD in t for t in stored.tokens), stored.tokens
    columns = {r[0] for r in conn.execute(text(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'resource'"))}
    assert "content" not in columns
    # A re-sent identical resource, keys in another order, is a no-op: no second version.
    again = dict(reversed(list(result.resource.items())))
    [same] = execute_batch(conn, [(0, {"resource": again,
                                       "request": {"method": "PUT",
                                                   "url": f"Patient/{key[1]}"}})], Context())
    assert same.status == 200 and same.etag == 'W/"1"'


# --------------------------------------------------------------------------- migration


@pytest.fixture
def db_at_0008() -> Iterator[str]:
    with fresh_database(f"fhirq_test_mig_{os.getpid()}", "0008") as url:
        yield url


def _old_rows(url: str) -> None:
    """A store and a finished job as revision 0008 held them."""
    t = datetime(2024, 5, 1, tzinfo=UTC)
    v1 = {"resourceType": "Patient", "id": "p1", "active": False}
    v2 = {"resourceType": "Patient", "id": "p1", "active": True}
    with psycopg2.connect(url) as c, c.cursor() as cur:
        cur.execute(
            "INSERT INTO resource (res_type, res_id, version, last_updated, deleted, content, "
            "tokens) VALUES ('Patient', 'p1', 2, %s, false, %s, '{active:|true}'), "
            "('Patient', 'gone', 2, %s, true, %s, '{}')",
            (t, orjson.dumps(v2).decode(), t, '{"resourceType": "Patient", "id": "gone"}'))
        cur.execute(
            "INSERT INTO resource_history (res_type, res_id, version, last_updated, deleted, "
            "method, content) VALUES ('Patient', 'p1', 1, %s, false, 'POST', %s), "
            "('Patient', 'p1', 2, %s, false, 'PUT', %s), "
            "('Patient', 'gone', 1, %s, false, 'POST', '{\"resourceType\": \"Patient\"}'), "
            "('Patient', 'gone', 2, %s, true, 'DELETE', NULL)",
            (t, orjson.dumps(v1).decode(), t, orjson.dumps(v2).decode(), t, t))
        cur.execute(
            "INSERT INTO job (id, owner, kind, state, base_url, chunk_size, total, done, "
            "succeeded, failed) VALUES ('j', 'o', 'batch', 'running', 'http://x/fhir', 10, "
            "3, 2, 1, 1)")
        cur.execute(
            "INSERT INTO job_entry (job_id, idx, request, status, location, etag, last_modified,"
            " outcome, res_type, res_id, res_version, finished_at) VALUES "
            "('j', 0, '{}', 200, 'Patient/p1/_history/2', 'W/\"2\"', %s, NULL, 'Patient', 'p1',"
            " 2, now()), ('j', 1, '{}', 404, NULL, NULL, NULL, "
            "'{\"resourceType\": \"OperationOutcome\"}', NULL, NULL, NULL, now())",
            (t,))
        cur.execute("INSERT INTO job_entry (job_id, idx, request) VALUES ('j', 2, '{}')")
    c.close()


def test_upgrade_from_0008_keeps_the_data_readable(db_at_0008: str) -> None:
    from core.store import repository as repo
    from core.store.db import get_engine
    from core.store.migrate import upgrade

    _old_rows(db_at_0008)
    upgrade(db_at_0008)
    engine = get_engine(db_at_0008)
    with engine.begin() as c:
        cur = repo.read_current(c, [("Patient", "p1"), ("Patient", "gone")])
        assert cur[("Patient", "p1")].version == 2
        assert cur[("Patient", "p1")].content == {"resourceType": "Patient", "id": "p1",
                                                  "active": True}
        assert cur[("Patient", "gone")].deleted and cur[("Patient", "gone")].content is None
        entries = list_entries(c, "j")
        # An unchanged PUT of the migrated current version is still detected as a no-op.
        row = repo.WriteRow(("Patient", "p1"), {"resourceType": "Patient", "id": "p1",
                                                "active": True}, "PUT",
                            _index({"resourceType": "Patient", "id": "p1", "active": True}))
        [written] = repo.write_resources(c, [row])
        assert (written.version, written.changed) == (2, False)
    assert [(e["index"], e["state"]) for e in entries] == [
        (0, "succeeded"), (1, "failed"), (2, "pending")]
    assert entries[0]["location"] == "Patient/p1/_history/2" and entries[0]["etag"] == 'W/"2"'
    assert entries[1]["outcome"] == {"resourceType": "OperationOutcome"}
    bundle = orjson.loads(b"".join(stream_response(engine, {
        "id": "j", "kind": "batch", "prefer_return": "representation",
        "base_url": "http://x/fhir"})))
    assert bundle["entry"][0]["resource"]["active"] is True
    assert bundle["entry"][0]["resource"]["meta"]["versionId"] == "2"
    assert bundle["entry"][1]["response"]["status"].startswith("404")
    with engine.begin() as c:  # the pending entry is still claimable
        run_chunk(c, "j", 0, engine.begin)
    with engine.connect() as c:
        assert c.execute(text("SELECT count(*) FROM job_result WHERE job_id = 'j'")
                         ).scalar_one() == 3


def _index(resource: dict[str, Any]) -> Any:
    from core.fhir.search_params import extract_index

    return extract_index(resource)


def test_bulk_creates_are_hashed_when_first_needed(clean_db: Engine) -> None:
    """A bulk create stores no content hash; the first update and a re-index compute it from
    the history row, so neither mistakes the resource for changed (or for unchanged)."""
    from core.store.reindex import reindex

    job_id = _accept(clean_db, 5, 5, "lazy")
    _run_chunk(clean_db, job_id)
    assert _scalar(clean_db, "SELECT count(content_hash) FROM resource") == 0
    assert reindex(clean_db) == 5
    with clean_db.begin() as conn:
        rid, content = conn.execute(text(
            "SELECT h.res_id, h.content FROM resource r JOIN resource_history h "
            "USING (res_type, res_id, version) ORDER BY r.res_id LIMIT 1")).one()
        put = {"resource": content, "request": {"method": "PUT", "url": f"Patient/{rid}"}}
        changed = dict(content, active=True)
        [same, other] = execute_batch(conn, [
            (0, put), (1, {"resource": changed,
                           "request": {"method": "PUT", "url": f"Patient/{rid}"}})], Context())
    assert same.status == 200 and same.etag == 'W/"1"'
    assert other.status == 200 and other.etag == 'W/"2"'
