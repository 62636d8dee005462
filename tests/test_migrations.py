"""Migrations over a store that holds data: a database at revision 0008 (content on the current
row, no index tables, nothing partitioned), filled as the product of that revision wrote it,
upgraded to head and re-indexed as the upgrade notes say (`fhirq db reindex`), still reads,
vreads, searches and lists history through the API, and takes new writes; the history is
partitioned by type and a read by (type, id) touches one of its partitions.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg2
import pytest

from core.fhir.search_index import extract_index
from tests.conftest import fresh_database

MRN = "http://hospital.example.org/mrn"


def _patient(res_id: str, family: str, mrn: str, birth: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": res_id, "birthDate": birth,
            "identifier": [{"system": MRN, "value": mrn}],
            "name": [{"family": family, "given": ["Ann"]}]}


# (content of each version, oldest first) per resource, as the 0008 store held them.
STORE: dict[tuple[str, str], list[dict[str, Any]]] = {
    ("Patient", "p1"): [_patient("p1", "Smith", "m-1", "1970-01-01"),
                        _patient("p1", "Smithers", "m-1", "1970-01-01")],
    ("Patient", "p2"): [_patient("p2", "Jones", "m-2", "1980-05-05")],
    ("Observation", "o1"): [{"resourceType": "Observation", "id": "o1", "status": "final",
                             "code": {"coding": [{"system": "http://loinc.org",
                                                  "code": "8302-2"}]},
                             "subject": {"reference": "Patient/p1"},
                             "effectiveDateTime": "2020-02-02T10:00:00Z"}],
    # A type without a partition of its own: it lands in the default partition.
    ("Basic", "b1"): [{"resourceType": "Basic", "id": "b1",
                       "code": {"coding": [{"system": "http://x", "code": "y"}]}}],
}


def _fill_0008(url: str) -> None:
    """Rows in the shape revision 0008's product wrote: content without meta on the current
    row and in every history row, tokens and string rows (dates went to columns that later
    revisions dropped: the re-index after the upgrade puts them in their tables)."""
    conn = psycopg2.connect(url)
    now = datetime.now(UTC)
    with conn, conn.cursor() as cur:
        for (rtype, rid), versions in STORE.items():
            for number, content in enumerate(versions, start=1):
                cur.execute(
                    "INSERT INTO resource_history (res_type, res_id, version, last_updated, "
                    "deleted, method, content) VALUES (%s, %s, %s, %s, false, %s, %s)",
                    (rtype, rid, number, now, "POST" if number == 1 else "PUT",
                     orjson.dumps(content).decode()))
            current = versions[-1]
            index = extract_index(current)
            cur.execute(
                "INSERT INTO resource (res_type, res_id, version, last_updated, deleted, "
                "content, tokens) VALUES (%s, %s, %s, %s, false, %s, %s)",
                (rtype, rid, len(versions), now, orjson.dumps(current).decode(),
                 list(index.tokens)))
            for param, value in index.strings:
                cur.execute("INSERT INTO resource_string (res_type, res_id, param, value) "
                            "VALUES (%s, %s, %s, %s)", (rtype, rid, param, value))
    conn.close()


@pytest.fixture(scope="module")
def upgraded() -> Iterator[str]:
    from core.store.db import get_engine
    from core.store.migrate import upgrade
    from core.store.reindex import reindex

    with fresh_database(f"fhirq_test_migrations_{os.getpid()}", "0008") as url:
        _fill_0008(url)
        upgrade(url)
        reindex(get_engine(url))
        yield url
        get_engine(url).dispose()


@pytest.fixture(scope="module")
def api(upgraded: str):  # type: ignore[no-untyped-def]
    """The API on the upgraded database (the store reads FHIRQ_DATABASE_URL: set for this
    module, then given back to the session's database)."""
    from api import create_app
    from core.config import get_settings
    from core.store.db import get_engine

    before = os.environ.get("FHIRQ_DATABASE_URL")
    os.environ["FHIRQ_DATABASE_URL"] = upgraded
    # The app's engine is cached: an earlier test's would still point at the session's db.
    get_engine.cache_clear()
    app = create_app(replace(get_settings(), auth="off", database_url=upgraded))
    app.config["TESTING"] = True
    yield app.test_client()
    if before is None:
        os.environ.pop("FHIRQ_DATABASE_URL", None)
    else:
        os.environ["FHIRQ_DATABASE_URL"] = before
    get_engine.cache_clear()  # the next tests get an engine on the session's database again


def _sql(url: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(query, params)
            return cur.fetchall()
    finally:
        conn.close()


def test_rows_moved_to_their_types_partitions(upgraded: str) -> None:
    history = _sql(upgraded, "SELECT tableoid::regclass::text, count(*) FROM resource_history "
                             "GROUP BY 1 ORDER BY 1")
    assert history == [("resource_history_observation", 1), ("resource_history_other", 1),
                       ("resource_history_patient", 3)]
    kinds = dict(_sql(upgraded, "SELECT relname, relkind::text FROM pg_class WHERE relname = ANY"
                                "(%s)", ["resource", "resource_history", "resource_string",
                                         "resource_date"]))
    assert kinds == {"resource_history": "p", "resource": "r", "resource_string": "r",
                     "resource_date": "r"}
    # Its indexes exist on every partition, not on the parent alone.
    (missing,) = _sql(upgraded, """
        SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'resource_history'::regclass AND (
            SELECT count(*) FROM pg_index x WHERE x.indrelid = c.oid) <> (
            SELECT count(*) FROM pg_index x WHERE x.indrelid = 'resource_history'::regclass)""")[0]
    assert missing == 0


def test_reads_vreads_and_history_survive(api) -> None:  # type: ignore[no-untyped-def]
    read = api.get("/fhir/Patient/p1")
    assert read.status_code == 200
    assert read.json["name"][0]["family"] == "Smithers"
    assert read.json["meta"]["versionId"] == "2"
    first = api.get("/fhir/Patient/p1/_history/1")
    assert first.status_code == 200 and first.json["name"][0]["family"] == "Smith"
    history = api.get("/fhir/Patient/p1/_history")
    assert history.status_code == 200 and history.json["total"] == 2
    assert api.get("/fhir/Basic/b1").status_code == 200


def test_searches_survive(api) -> None:  # type: ignore[no-untyped-def]
    def ids(path: str) -> set[str]:
        resp = api.get(path)
        assert resp.status_code == 200, resp.json
        return {e["resource"]["id"] for e in resp.json.get("entry", [])
                if e.get("search", {}).get("mode") == "match"}

    assert ids(f"/fhir/Patient?identifier={MRN}|m-2") == {"p2"}
    assert ids("/fhir/Patient?name=smith") == {"p1"}
    assert ids("/fhir/Patient?birthdate=lt1975") == {"p1"}
    assert ids("/fhir/Observation?subject=Patient/p1&date=2020-02-02") == {"o1"}
    assert ids("/fhir/Basic?code=http://x|y") == {"b1"}


def test_writes_after_the_upgrade(api) -> None:  # type: ignore[no-untyped-def]
    created = api.post("/fhir/Patient", json=_patient("ignored", "Newman", "m-3", "1990-01-01"),
                       headers={"Content-Type": "application/fhir+json"})
    assert created.status_code == 201, created.json
    res_id = created.json["id"]
    found = api.get(f"/fhir/Patient?identifier={MRN}|m-3")
    assert [e["resource"]["id"] for e in found.json["entry"]] == [res_id]
    updated = api.put("/fhir/Basic/b1", json={**STORE[("Basic", "b1")][0], "code": {
        "coding": [{"system": "http://x", "code": "z"}]}},
        headers={"Content-Type": "application/fhir+json"})
    assert updated.status_code == 200, updated.json
    assert api.get("/fhir/Basic/b1/_history").json["total"] == 2


def _plan(url: str, query: str, *params: Any) -> str:
    rows = _sql(url, "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) " + query, *params)
    return "\n".join(r[0] for r in rows)


def test_a_read_by_type_and_id_touches_one_partition(upgraded: str) -> None:
    plan = _plan(upgraded, "SELECT content FROM resource_history WHERE res_type = %s AND "
                           "res_id = %s AND version = %s", "Patient", "p1", 2)
    scanned = {w for w in plan.split() if w.startswith("resource_history_")}
    assert scanned <= {"resource_history_patient", "resource_history_patient_pkey"}, plan
    assert "resource_history_patient" in scanned, plan
    history = _plan(upgraded, "SELECT version FROM resource_history WHERE res_type = %s AND "
                              "res_id = %s ORDER BY version DESC", "Basic", "b1")
    scanned = {w for w in history.split() if w.startswith("resource_history_")}
    assert scanned <= {"resource_history_other", "resource_history_other_pkey"}, history


def test_the_repositorys_read_prunes_at_run_time(upgraded: str) -> None:
    """The product's read of a chunk's keys (current rows joined with their history rows,
    keys from unnest()): the history partitions of types the keys do not name are never
    executed."""
    from sqlalchemy import event

    from core.store import repository as repo
    from core.store.db import get_engine

    engine = get_engine(upgraded)
    statements: list[tuple[str, Any]] = []

    def record(conn, cursor, statement, parameters, context, executemany):  # noqa: ARG001
        statements.append((statement, parameters))

    with engine.connect() as conn:
        event.listen(conn, "before_cursor_execute", record)
        found = repo.read_current(conn, [("Patient", "p1")])
        event.remove(conn, "before_cursor_execute", record)
        assert found[("Patient", "p1")].content["name"][0]["family"] == "Smithers"
        ((statement, params),) = statements
        plan = "\n".join(r[0] for r in conn.exec_driver_sql(
            "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) " + statement, params))
    scans = [line for line in plan.splitlines() if " on resource_history_" in line]
    executed = [line for line in scans if "never executed" not in line]
    assert executed and len(executed) < len(scans), plan
    assert all("resource_history_patient" in line for line in executed), plan
