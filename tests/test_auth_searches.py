"""Scopes inside the engine: every search run for a caller — a conditional reference in a
written resource, a condition, a search entry — needs `s` on the searched type, and every entry
the letters its REST call would need; through REST, sync batch upsert and async jobs run by a
real worker (which knows the submitter's scopes from the job row). Refusals are 403
OperationOutcomes (`forbidden`) naming the element; nothing is written and no search runs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import Engine, event, text

from core.auth.permissions import UNRESTRICTED, Permissions
from core.errors import Forbidden
from core.fhir.access import refused
from core.fhir.engine import execute_batch, execute_transaction
from core.fhir.model import Context
from core.fhir.planning import plan_batch
from tests.jobs_helpers import *  # noqa: F403 - fixtures
from tests.jobs_helpers import WorkerProcess, job_id_of, submit, wait_job
from tests.test_auth import AUDIENCE, ISSUER, Issuer, bearer, make_client

PATIENT = {"resourceType": "Patient", "id": "p1", "identifier": [{"system": "s", "value": "v"}]}
COND_REF = "Patient?identifier=s|v"


def observation(subject: str, **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
            "subject": {"reference": subject}, **extra}


def issue(body: dict[str, Any]) -> dict[str, Any]:
    assert body["resourceType"] == "OperationOutcome", body
    return body["issue"][0]


@pytest.fixture
def keys(clean_db: Engine) -> Iterator[Any]:
    from core.auth import api_keys

    def make(*scopes: str, owner: str = "lab") -> dict[str, str]:
        with clean_db.begin() as c:
            return bearer(api_keys.create_key(c, owner, scopes).token)

    yield make
    with clean_db.begin() as c:
        c.execute(text("TRUNCATE api_key"))


@pytest.fixture
def auth_client(clean_db: Engine) -> Any:
    return make_client()


@pytest.fixture
def stored_patient(auth_client: Any, keys: Any) -> None:
    r = auth_client.put("/fhir/Patient/p1", json=PATIENT, headers=keys("system/Patient.cu"))
    assert r.status_code == 201, r.get_data(as_text=True)


def count(engine: Engine, rtype: str) -> int:
    with engine.connect() as c:
        return c.execute(
            text("SELECT count(*) FROM resource WHERE res_type = :t AND NOT deleted"),
            {"t": rtype},
        ).scalar_one()


# --------------------------------------------------------------------------- the permission object


@pytest.mark.parametrize(
    ("scopes", "rtype", "letter", "ok"),
    [
        (["system/Observation.c"], "Observation", "c", True),
        (["system/Observation.c"], "Patient", "s", False),
        (["system/Observation.c", "system/Patient.s"], "Patient", "s", True),
        (["system/*.cu"], "Patient", "s", False),
        (["system/*.read"], "Condition", "s", True),
        (["system/Patient.read"], "Patient", "r", True),
        (["system/Patient.read"], "Patient", "c", False),
        (["patient/*.read", "openid"], "Patient", "r", False),
        ([], "Patient", "r", False),
    ],
)
def test_permissions_of_scopes(scopes: list[str], rtype: str, letter: str, ok: bool) -> None:
    assert Permissions.of(scopes).allows(rtype, letter) is ok


def test_unrestricted_is_what_every_scope_on_every_type_gives() -> None:
    assert Permissions.of(["system/*.*"]).unrestricted
    assert Permissions.of(["system/*.cruds"]).unrestricted
    assert not Permissions.of(["system/*.cud", "system/Patient.rs"]).unrestricted
    assert all(UNRESTRICTED.allows("Observation", ch) for ch in "cruds")


ENTRIES = [
    {"request": {"method": "GET", "url": "Patient?identifier=s|v"}},
    {"request": {"method": "GET", "url": "Patient/1"}},
    {"request": {"method": "GET", "url": "Patient/1/_history"}},
    {"request": {"method": "GET", "url": "Patient/_history"}},
    {"resource": {"resourceType": "Patient"},
     "request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=s|v"}},
    {"resource": PATIENT, "request": {"method": "PUT", "url": "Patient/p1"}},
    {"request": {"method": "DELETE", "url": "Patient?identifier=s|v"}},
]


@pytest.mark.parametrize(
    ("scopes", "refused_at"),
    [
        (["system/Patient.cruds"], {}),
        (["system/Patient.r"], {0: "request.url", 3: "request.url", 4: "request.url",
                                5: "request.url", 6: "request.url"}),
        (["system/Patient.rs"], {4: "request.url", 5: "request.url", 6: "request.url"}),
        (["system/Patient.crud"], {0: "request.url", 3: "request.url",
                                   4: "request.ifNoneExist", 6: "request.url"}),
        (["system/Patient.cd"], {0: "request.url", 1: "request.url", 2: "request.url",
                                 3: "request.url", 4: "request.ifNoneExist", 5: "request.url",
                                 6: "request.url"}),
    ],
)
def test_each_entry_needs_the_letters_of_its_rest_call(
    scopes: list[str], refused_at: dict[int, str]
) -> None:
    plan = plan_batch(list(enumerate(ENTRIES)))
    assert not plan.failures
    denied = refused(plan.entries, Permissions.of(scopes))
    assert {i: e.expression for i, e in denied.items()} == {
        i: [f"Bundle.entry[{i}].{where}"] for i, where in refused_at.items()
    }
    assert all(isinstance(e, Forbidden) and e.index == i for i, e in denied.items())


# --------------------------------------------------------------------------- REST


def test_rest_create_with_a_conditional_reference_needs_search_on_its_type(
    auth_client: Any, keys: Any, stored_patient: None, clean_db: Engine
) -> None:
    writer = keys("system/Observation.c")
    # Refused whether a Patient matches or not: the answer tells nothing of the Patients.
    for ref in (COND_REF, "Patient?identifier=s|nobody"):
        r = auth_client.post("/fhir/Observation", json=observation(ref), headers=writer)
        assert r.status_code == 403, r.get_data(as_text=True)
        got = issue(r.json)
        assert got["code"] == "forbidden"
        assert got["expression"] == ["Observation.subject.reference"]
        assert "system/Patient.s" in got["diagnostics"]
    assert count(clean_db, "Observation") == 0

    searcher = keys("system/Observation.c", "system/Patient.s")
    r = auth_client.post("/fhir/Observation", json=observation(COND_REF), headers=searcher)
    assert r.status_code == 201, r.get_data(as_text=True)
    stored = auth_client.get(r.headers["Location"], headers=keys("system/Observation.r")).json
    assert stored["subject"]["reference"] == "Patient/p1"


def test_rest_update_and_conditional_update_check_references_too(
    auth_client: Any, keys: Any, stored_patient: None
) -> None:
    r = auth_client.put("/fhir/Observation/o1", json={**observation(COND_REF), "id": "o1"},
                        headers=keys("system/Observation.cu"))
    assert r.status_code == 403 and issue(r.json)["expression"] == [
        "Observation.subject.reference"
    ]
    # A conditional update searches its own type (the route asks for `s` on Observation), and
    # the reference in its body searches Patient: both are needed.
    r = auth_client.put("/fhir/Observation?identifier=o|1",
                        json=observation(COND_REF, identifier=[{"system": "o", "value": "1"}]),
                        headers=keys("system/Observation.cus"))
    assert r.status_code == 403 and issue(r.json)["code"] == "forbidden"
    r = auth_client.put("/fhir/Observation?identifier=o|1",
                        json=observation(COND_REF, identifier=[{"system": "o", "value": "1"}]),
                        headers=keys("system/Observation.cus", "system/Patient.s"))
    assert r.status_code == 201, r.get_data(as_text=True)


def test_a_literal_reference_is_checked_without_read_on_its_type(
    auth_client: Any, keys: Any, stored_patient: None
) -> None:
    """Referential integrity answers for a literal `Type/id` the caller names: writing an
    Observation about a Patient is normal for a key that may not read Patients."""
    writer = keys("system/Observation.c")
    r = auth_client.post("/fhir/Observation", json=observation("Patient/p1"), headers=writer)
    assert r.status_code == 201, r.get_data(as_text=True)
    r = auth_client.post("/fhir/Observation", json=observation("Patient/gone"), headers=writer)
    assert r.status_code == 400 and issue(r.json)["code"] == "not-found"


def test_rest_with_a_jwt(clean_db: Engine, stored_patient: None, tmp_path: Path) -> None:
    issuer = Issuer()
    jwks = tmp_path / "jwks.json"
    jwks.write_bytes(orjson.dumps(issuer.jwks()))
    client = make_client(jwks_file=str(jwks), jwt_issuer=ISSUER, jwt_audience=AUDIENCE)
    r = client.post("/fhir/Observation", json=observation(COND_REF),
                    headers=bearer(issuer.token(scope="system/Observation.c")))
    assert r.status_code == 403 and issue(r.json)["code"] == "forbidden"
    r = client.post("/fhir/Observation", json=observation(COND_REF),
                    headers=bearer(issuer.token(scope="system/Observation.c system/Patient.rs")))
    assert r.status_code == 201, r.get_data(as_text=True)


def test_rest_search_includes_and_chains_respect_read_and_search_scopes(
    auth_client: Any, keys: Any, stored_patient: None
) -> None:
    """An `_include` of a type the token may not read brings back none of it (the Bundle says
    the includes were limited); a chain or `_has` over a type it may not search is a 403
    before any SQL runs."""
    r = auth_client.post("/fhir/Observation", json=observation("Patient/p1"),
                         headers=keys("system/Observation.c"))
    assert r.status_code == 201, r.get_data(as_text=True)
    url = "/fhir/Observation?_include=Observation:subject"

    narrow = auth_client.get(url, headers=keys("system/Observation.rs"))
    assert narrow.status_code == 200, narrow.get_data(as_text=True)
    modes = [e["search"]["mode"] for e in narrow.json["entry"]]
    assert modes == ["match", "outcome"]
    assert "Patient" not in {e["resource"]["resourceType"] for e in narrow.json["entry"]}
    assert narrow.json["entry"][-1]["resource"]["issue"][0]["code"] == "suppressed"

    wide = auth_client.get(url, headers=keys("system/Observation.rs", "system/Patient.r"))
    assert [(e["search"]["mode"], e["resource"]["resourceType"]) for e in wide.json["entry"]
            ][:2] == [("match", "Observation"), ("include", "Patient")]

    for path, needs in (("/fhir/Observation?subject:Patient.identifier=s|v", "Patient"),
                        ("/fhir/Patient?_has:Observation:subject:status=final", "Observation")):
        rtype = path.split("/")[2].split("?")[0]
        r = auth_client.get(path, headers=keys(f"system/{rtype}.rs"))
        assert r.status_code == 403, r.get_data(as_text=True)
        assert f"system/{needs}.s" in issue(r.json)["diagnostics"]
        ok = auth_client.get(path, headers=keys(f"system/{rtype}.rs", f"system/{needs}.s"))
        assert ok.status_code == 200 and ok.json["total"] == 1, ok.get_data(as_text=True)


# --------------------------------------------------------------------------- batch upsert


def test_sync_upsert_refuses_a_conditional_reference_without_search_alone(
    auth_client: Any, keys: Any, stored_patient: None, clean_db: Engine
) -> None:
    body = [{**observation(COND_REF), "id": "o1"}, {**observation("Patient/p1"), "id": "o2"}]
    # `system/*.cu` is what `PUT [base]` asks for; it holds no `s` on any type.
    r = auth_client.put("/fhir", json=body, headers=keys("system/*.cu"))
    assert r.status_code == 200, r.get_data(as_text=True)
    first, second = r.json
    got = issue(first)
    assert (got["code"], got["expression"]) == ("forbidden", ["[0].subject.reference"])
    assert second["id"] == "o2" and second["meta"]["versionId"] == "1"
    assert count(clean_db, "Observation") == 1

    r = auth_client.put("/fhir", json=body, headers=keys("system/*.cu", "system/Patient.s"))
    assert [e["resourceType"] for e in r.json] == ["Observation", "Observation"]
    assert r.json[0]["subject"]["reference"] == "Patient/p1"


def test_async_upsert_runs_with_the_submitters_scopes(
    auth_client: Any, keys: Any, stored_patient: None, worker: WorkerProcess, clean_db: Engine
) -> None:
    body = [{**observation(COND_REF), "id": f"o{i}"} if i % 2 == 0 else
            {**observation("Patient/p1"), "id": f"o{i}"} for i in range(6)]
    narrow = keys("system/*.cu")
    reader = keys("system/*.read")  # same owner: it may poll the job
    job_id = job_id_of(submit(auth_client, body, method="PUT", **narrow))
    with clean_db.connect() as c:
        assert c.execute(text("SELECT scopes FROM job WHERE id = :id"),
                         {"id": job_id}).scalar_one() == ["system/*.cu"]
    job = wait_job(auth_client, job_id, worker=worker, **reader)
    assert (job["state"], job["counts"]["succeeded"], job["counts"]["failed"]) == (
        "completed", 3, 3)
    failed = auth_client.get(f"/jobs/{job_id}/entries?outcome=failed", headers=reader).json
    rows = failed["entries"]
    assert sorted(e["index"] for e in rows) == [0, 2, 4]
    for e in rows:
        assert e["status"] == 403
        got = issue(e["outcome"])
        assert got["code"] == "forbidden"
        assert got["expression"] == [f"[{e['index']}].subject.reference"]
    assert count(clean_db, "Observation") == 3

    wide = keys("system/*.cu", "system/Patient.s")
    job_id = job_id_of(submit(auth_client, body, method="PUT", **wide))
    job = wait_job(auth_client, job_id, worker=worker, **reader)
    assert (job["state"], job["counts"]["succeeded"], job["counts"]["failed"]) == (
        "completed", 6, 0)


# --------------------------------------------------------------------------- engine


def test_a_refused_transaction_fails_whole_at_the_first_refused_entry(conn: Any) -> None:
    entries = list(enumerate([
        {"resource": {"resourceType": "Patient"}, "request": {"method": "POST", "url": "Patient"}},
        {"resource": observation(COND_REF), "request": {"method": "POST", "url": "Observation"}},
        {"resource": observation(COND_REF), "request": {"method": "POST", "url": "Observation"}},
    ]))
    ctx = Context(permissions=Permissions.of(["system/*.c"]))
    with pytest.raises(Forbidden) as caught:
        execute_transaction(conn, entries, ctx)
    assert caught.value.index == 1
    assert caught.value.expression == ["Bundle.entry[1].resource.subject.reference"]


def test_refusals_cost_no_sql_and_a_refused_search_never_runs(conn: Any) -> None:
    """A chunk with two refused searches (a conditional reference, a search entry) sends
    exactly the statements of the same chunk without them: checking adds nothing, and what is
    refused is never searched."""
    execute_batch(conn, [(0, {"resource": PATIENT,
                              "request": {"method": "PUT", "url": "Patient/p1"}})], Context())
    plain = [(i, {"resource": {**observation("Patient/p1"), "id": f"o{i}"},
                  "request": {"method": "PUT", "url": f"Observation/o{i}"}}) for i in range(50)]
    searching = [
        (50, {"resource": observation(COND_REF),
              "request": {"method": "POST", "url": "Observation"}}),
        (51, {"request": {"method": "GET", "url": "Patient?identifier=s|v"}}),
    ]

    def run(chunk: list[tuple[int, Any]], permissions: Permissions) -> tuple[list[str], list[int]]:
        seen: list[str] = []

        def log(_c: Any, _cur: Any, statement: str, *_: Any) -> None:
            if "SAVEPOINT" not in statement:  # numbered anew each time
                seen.append(statement)

        event.listen(conn.engine, "before_cursor_execute", log)
        try:
            with conn.begin_nested() as savepoint:
                results = execute_batch(conn, chunk, Context(permissions=permissions))
                savepoint.rollback()
        finally:
            event.remove(conn.engine, "before_cursor_execute", log)
        return seen, [r.status for r in results]

    narrow = Permissions.of(["system/*.cu", "system/Observation.c"])
    baseline, status = run(plain, UNRESTRICTED)
    assert status == [201] * 50
    refusing, status = run(plain + searching, narrow)
    assert status == [201] * 50 + [403, 403]
    assert refusing == baseline
    allowed, status = run(plain + searching, UNRESTRICTED)
    assert status == [201] * 51 + [200]
    assert len(allowed) > len(baseline)  # the searches do run when they are allowed
