"""Transaction processing rules of FHIR R4 http.html#transaction, one table row per rule,
sent through the synchronous API onto real PostgreSQL."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import text

from tests.builders import (
    delete,
    get,
    ident,
    json_patch,
    patient,
    post,
    put,
    send,
    transaction,
    urn,
)

SYS = "http://example.org/mrn"


def run(client: Any, body: dict[str, Any], **headers: str) -> Any:
    return send(client, "POST", "/fhir", body, **headers)


def count(engine: Any, sql: str = "SELECT count(*) FROM resource WHERE NOT deleted") -> int:
    with engine.connect() as c:
        return c.execute(text(sql)).scalar_one()


def seed(client: Any, *resources: dict[str, Any]) -> list[str]:
    """Create resources in one transaction; return their ids."""
    r = run(client, transaction(*(post(x) for x in resources)))
    assert r.status_code == 200, r.json
    return [e["resource"]["id"] for e in r.json["entry"]]


def test_placeholders_are_rewritten_at_any_depth(client: Any, clean_db: Any) -> None:
    p, o = urn(), "urn:oid:1.2.3.4"
    enc = {
        "resourceType": "Encounter",
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": {"reference": p},
        "participant": [{"individual": {"reference": o}}],
    }
    prac = {"resourceType": "Practitioner", "name": [{"family": "Who"}]}
    r = run(
        client,
        transaction(post(enc, full_url=urn()), post(patient(), full_url=p), post(prac, full_url=o)),
    )
    assert r.status_code == 200, r.json
    assert r.json["type"] == "transaction-response"
    entries = r.json["entry"]
    assert [e["response"]["status"] for e in entries] == ["201 Created"] * 3
    pid, prac_id = entries[1]["resource"]["id"], entries[2]["resource"]["id"]
    stored = entries[0]["resource"]
    assert stored["subject"]["reference"] == f"Patient/{pid}"
    assert stored["participant"][0]["individual"]["reference"] == f"Practitioner/{prac_id}"
    assert entries[0]["response"]["location"].startswith(f"Encounter/{stored['id']}/_history/1")
    assert entries[0]["response"]["etag"] == 'W/"1"'


def test_processing_order_delete_post_put_get(client: Any, clean_db: Any) -> None:
    (old,) = seed(client, patient("Old"))
    p = urn()
    # Listed in reverse of processing order: the GET must still see the PUT's result.
    r = run(
        client,
        transaction(
            get("Patient/fixed-1"),
            put(patient("Put", id="fixed-1")),
            post(patient("New"), full_url=p),
            delete(f"Patient/{old}"),
        ),
    )
    assert r.status_code == 200, r.json
    statuses = [e["response"]["status"] for e in r.json["entry"]]
    assert statuses == ["200 OK", "201 Created", "201 Created", "204 No Content"]
    assert r.json["entry"][0]["resource"]["name"][0]["family"] == "Put"
    assert send(client, "GET", f"/fhir/Patient/{old}").status_code == 410


@pytest.mark.parametrize(
    ("name", "entries", "status", "expression"),
    [
        (
            "same resource twice",
            lambda ids: [put(patient("A", id="dup")), put(patient("B", id="dup"))],
            400,
            "Bundle.entry[1].request.url",
        ),
        (
            "ifMatch mismatch",
            lambda ids: [post(patient("Z")), put(patient("X", id=ids[0]), if_match='W/"7"')],
            412,
            "Bundle.entry[1].request.ifMatch",
        ),
        (
            "invalid resource",
            lambda ids: [post(patient("Z")), post(patient("Y", birthDate="1970-13-45"))],
            400,
            "Bundle.entry[1].resource.birthDate",
        ),
        (
            "id mismatch",
            lambda ids: [put(patient("Z", id="a"), "Patient/b")],
            400,
            "Bundle.entry[0].resource.id",
        ),
        (
            "unknown type",
            lambda ids: [{"request": {"method": "GET", "url": "Nonsense/1"}}],
            400,
            "Bundle.entry[0].request.url",
        ),
        (
            "unsupported conditional parameter",
            lambda ids: [put(patient("Z"), "Patient?shoe-size=42")],
            400,
            "Bundle.entry[0].request.url",
        ),
        (
            "conditional reference to nothing",
            lambda ids: [
                post(
                    {
                        "resourceType": "Observation",
                        "status": "final",
                        "code": {"text": "x"},
                        "subject": {"reference": f"Patient?identifier={SYS}|nobody"},
                    }
                )
            ],
            400,
            "Bundle.entry[0].resource",
        ),
        (
            "literal reference to nothing",
            lambda ids: [
                post(
                    {
                        "resourceType": "Observation",
                        "status": "final",
                        "code": {"text": "x"},
                        "subject": {"reference": "Patient/ghost"},
                    }
                )
            ],
            400,
            "Bundle.entry[0].resource",
        ),
        (
            "placeholder to nothing",
            lambda ids: [
                post(
                    {
                        "resourceType": "Observation",
                        "status": "final",
                        "code": {"text": "x"},
                        "subject": {"reference": urn()},
                    }
                )
            ],
            400,
            "Bundle.entry[0].resource",
        ),
        (
            "patch of a missing resource",
            lambda ids: [
                json_patch("Patient/nope", [{"op": "replace", "path": "/active", "value": True}])
            ],
            404,
            "Bundle.entry[0].request.url",
        ),
        (
            "duplicate fullUrl",
            lambda ids: [
                post(patient(), full_url="urn:uuid:0b2a3f64-0000-4000-8000-000000000001"),
                post(patient(), full_url="urn:uuid:0b2a3f64-0000-4000-8000-000000000001"),
            ],
            400,
            "Bundle.entry[1].fullUrl",
        ),
    ],
)
def test_a_failing_entry_fails_the_whole_transaction(
    client: Any, clean_db: Any, name: str, entries: Any, status: int, expression: str
) -> None:
    ids = seed(client, patient("Existing", identifier=ident(SYS, "e1")))
    before = (count(clean_db), count(clean_db, "SELECT count(*) FROM resource_history"))
    r = run(client, transaction(*entries(ids)))
    assert r.status_code == status, (name, r.json)
    body = r.json
    assert body["resourceType"] == "OperationOutcome"
    assert expression in body["issue"][0]["expression"], (name, body)
    after = (count(clean_db), count(clean_db, "SELECT count(*) FROM resource_history"))
    assert after == before, f"{name}: the store changed"


@pytest.mark.parametrize(
    ("existing", "status", "same_id"),
    [(0, "201 Created", False), (1, "200 OK", True)],
)
def test_if_none_exist(
    client: Any, clean_db: Any, existing: int, status: str, same_id: bool
) -> None:
    ids = [seed(client, patient("P", identifier=ident(SYS, "k")))[0] for _ in range(existing)]
    p = urn()
    obs = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "x"},
        "subject": {"reference": p},
    }
    r = run(
        client,
        transaction(
            post(
                patient("P", identifier=ident(SYS, "k")),
                full_url=p,
                if_none_exist=f"identifier={SYS}|k",
            ),
            post(obs),
        ),
    )
    assert r.status_code == 200, r.json
    first = r.json["entry"][0]
    assert first["response"]["status"] == status
    pid = first["resource"]["id"]
    assert (pid == ids[0]) if same_id else pid not in ids
    # The placeholder maps to the matched (or created) patient.
    assert r.json["entry"][1]["resource"]["subject"]["reference"] == f"Patient/{pid}"
    assert count(clean_db, "SELECT count(*) FROM resource WHERE res_type='Patient'") == 1


def test_if_none_exist_with_several_matches_is_412(client: Any, clean_db: Any) -> None:
    seed(
        client,
        patient("A", identifier=ident(SYS, "twin")),
        patient("B", identifier=ident(SYS, "twin")),
    )
    r = run(client, transaction(post(patient("C"), if_none_exist=f"identifier={SYS}|twin")))
    assert r.status_code == 412
    assert r.json["issue"][0]["code"] == "multiple-matches"


@pytest.mark.parametrize(("matches", "status"), [(0, "201 Created"), (1, "200 OK"), (2, None)])
def test_conditional_update(client: Any, clean_db: Any, matches: int, status: str | None) -> None:
    seed(client, *(patient(f"M{i}", identifier=ident(SYS, "cu")) for i in range(matches)))
    r = run(
        client,
        transaction(
            put(patient("Updated", identifier=ident(SYS, "cu")), f"Patient?identifier={SYS}|cu")
        ),
    )
    if status is None:
        assert r.status_code == 412
        return
    assert r.status_code == 200, r.json
    assert r.json["entry"][0]["response"]["status"] == status
    assert count(clean_db, "SELECT count(*) FROM resource WHERE res_type='Patient'") == max(
        1, matches
    )


def test_conditional_delete(client: Any, clean_db: Any) -> None:
    seed(client, patient("Gone", identifier=ident(SYS, "cd")))
    r = run(client, transaction(delete(f"Patient?identifier={SYS}|cd")))
    assert r.status_code == 200, r.json
    assert r.json["entry"][0]["response"]["status"] == "204 No Content"
    assert count(clean_db) == 0


def test_conditional_reference_resolves_to_the_one_match(client: Any, clean_db: Any) -> None:
    (pid,) = seed(client, patient("Ref", identifier=ident(SYS, "r1")))
    obs = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "x"},
        "subject": {"reference": f"Patient?identifier={SYS}|r1"},
    }
    r = run(client, transaction(post(obs)))
    assert r.status_code == 200, r.json
    assert r.json["entry"][0]["resource"]["subject"]["reference"] == f"Patient/{pid}"


def test_versions_and_no_op_update(client: Any, clean_db: Any) -> None:
    r1 = run(client, transaction(put(patient("V", id="v1"))))
    assert r1.json["entry"][0]["response"]["status"] == "201 Created"
    r2 = run(client, transaction(put(patient("V", id="v1"))))
    assert r2.json["entry"][0]["response"]["etag"] == 'W/"1"', "same content: no new version"
    r3 = run(client, transaction(put(patient("W", id="v1"), if_match='W/"1"')))
    assert r3.json["entry"][0]["response"]["etag"] == 'W/"2"'
    hist = send(client, "GET", "/fhir/Patient/v1/_history").json
    assert [e["resource"]["meta"]["versionId"] for e in hist["entry"]] == ["2", "1"]


def test_patch_entries(client: Any, clean_db: Any) -> None:
    (pid,) = seed(client, patient("Patchy"))
    fhirpath_patch = {
        "resource": {
            "resourceType": "Parameters",
            "parameter": [
                {
                    "name": "operation",
                    "part": [
                        {"name": "type", "valueCode": "add"},
                        {"name": "path", "valueString": "Patient"},
                        {"name": "name", "valueString": "birthDate"},
                        {"name": "value", "valueDate": "1980-01-02"},
                    ],
                }
            ],
        },
        "request": {"method": "PATCH", "url": f"Patient/{pid}"},
    }
    r = run(client, transaction(fhirpath_patch))
    assert r.status_code == 200, r.json
    assert r.json["entry"][0]["resource"]["birthDate"] == "1980-01-02"
    r = run(
        client,
        transaction(
            json_patch(
                f"Patient/{pid}", [{"op": "replace", "path": "/name/0/family", "value": "Patched"}]
            )
        ),
    )
    assert r.status_code == 200, r.json
    assert r.json["entry"][0]["resource"]["name"][0]["family"] == "Patched"
    assert r.json["entry"][0]["resource"]["meta"]["versionId"] == "3"


@pytest.mark.parametrize(
    ("prefer", "has_resource", "has_outcome"),
    [
        ("return=minimal", False, False),
        ("return=representation", True, False),
        ("return=OperationOutcome", False, True),
    ],
)
def test_prefer_return(
    client: Any, clean_db: Any, prefer: str, has_resource: bool, has_outcome: bool
) -> None:
    r = run(client, transaction(post(patient())), Prefer=prefer)
    entry = r.json["entry"][0]
    assert ("resource" in entry) is has_resource
    assert ("outcome" in entry["response"]) is has_outcome
    assert entry["response"]["location"].startswith("Patient/")
