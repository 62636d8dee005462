"""Transaction processing rules of FHIR R4 http.html#transaction, one table row per rule,
sent through the synchronous API onto real PostgreSQL."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import text

from tests.builders import (
    batch,
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
            "Bundle.entry[0].resource.subject.reference",
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
            "Bundle.entry[0].resource.subject.reference",
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
            "Bundle.entry[0].resource.subject.reference",
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


# --------------------------------------------------------------------------- identity overlap


def unchanged(engine: Any) -> tuple[int, int]:
    return count(engine), count(engine, "SELECT count(*) FROM resource_history")


def cond_put(value: str = "o1") -> dict[str, Any]:
    return put(patient("Cond", identifier=ident(SYS, value)), f"Patient?identifier={SYS}|{value}")


@pytest.mark.parametrize(
    ("name", "matches", "entries"),
    [
        ("PUT and DELETE of one id", 0,
         lambda pid: [put(patient("P", id="same")), delete("Patient/same")]),
        ("PATCH and DELETE of an existing id", 1,
         lambda pid: [json_patch(f"Patient/{pid}", [{"op": "add", "path": "/active",
                                                      "value": True}]),
                      delete(f"Patient/{pid}")]),
        ("conditional update and ifNoneExist on one condition, no match", 0,
         lambda pid: [cond_put(), post(patient(identifier=ident(SYS, "o1")),
                                       if_none_exist=f"identifier={SYS}|o1")]),
        ("conditional update and ifNoneExist on one condition, one match", 1,
         lambda pid: [cond_put(), post(patient(identifier=ident(SYS, "o1")),
                                       if_none_exist=f"identifier={SYS}|o1")]),
        # Only the store knows these two are one resource: the conditional update resolves to
        # the patient the DELETE names.
        ("conditional update resolving to a deleted id", 1,
         lambda pid: [cond_put(), delete(f"Patient/{pid}")]),
        ("conditional delete resolving to an updated id", 1,
         lambda pid: [delete(f"Patient?identifier={SYS}|o1"), put(patient("U", id=pid))]),
        ("ifNoneExist resolving to a patched id", 1,
         lambda pid: [post(patient(), if_none_exist=f"identifier={SYS}|o1"),
                      json_patch(f"Patient/{pid}", [{"op": "add", "path": "/active",
                                                     "value": True}])]),
    ],
)
@pytest.mark.parametrize("reverse", [False, True])
def test_entries_touching_one_resource_fail_the_transaction(
    client: Any, clean_db: Any, name: str, matches: int, entries: Any, reverse: bool
) -> None:
    pids = [seed(client, patient("Seed", identifier=ident(SYS, "o1")))[0]
            for _ in range(matches)]
    listed = entries(pids[0] if pids else "none")
    if reverse:
        listed.reverse()
    before = unchanged(clean_db)
    r = run(client, transaction(get("Patient?name=x"), *listed))
    assert r.status_code == 400, (name, r.json)
    expressions = r.json["issue"][0]["expression"]
    assert [e.split(".request")[0].split(".resource")[0] for e in expressions] == [
        "Bundle.entry[1]", "Bundle.entry[2]"], (name, expressions)
    assert "touch" in r.json["issue"][0]["diagnostics"]
    assert unchanged(clean_db) == before, f"{name}: the store changed"


def test_a_batch_still_runs_writes_of_one_resource_in_order(client: Any, clean_db: Any) -> None:
    r = run(client, batch(put(patient("P", id="b1")), delete("Patient/b1")))
    assert [e["response"]["status"] for e in r.json["entry"]] == ["201 Created", "204 No Content"]


def test_a_bad_condition_in_a_batch_fails_only_its_entry(client: Any, clean_db: Any) -> None:
    r = run(client, batch(delete("Patient?_count=1"), cond_put("b2"),
                          post(patient(), if_none_exist="shoe-size=1")))
    assert r.status_code == 200, r.json
    assert [e["response"]["status"][:3] for e in r.json["entry"]] == ["400", "201", "400"]
    assert count(clean_db) == 1


# --------------------------------------------------------------------------- failing reads


@pytest.mark.parametrize(
    ("name", "read", "status"),
    [
        ("read of nothing", get("Patient/does-not-exist"), 404),
        ("HEAD of nothing", {"request": {"method": "HEAD", "url": "Patient/does-not-exist"}}, 404),
        ("read of a deleted resource", get("Patient/gone"), 410),
        ("vread of an unknown version", get("Patient/gone/_history/9"), 404),
        ("search with a bad value", get("Patient?birthdate=not-a-date"), 400),
    ],
)
def test_a_failing_read_fails_the_transaction(
    client: Any, clean_db: Any, name: str, read: dict[str, Any], status: int
) -> None:
    send(client, "PUT", "/fhir/Patient/gone", patient(id="gone"))
    send(client, "DELETE", "/fhir/Patient/gone")
    before = unchanged(clean_db)
    r = run(client, transaction(post(patient("New")), put(patient("Put", id="p9")), read))
    assert r.status_code == status, (name, r.json)
    assert r.json["resourceType"] == "OperationOutcome"
    assert "Bundle.entry[2].request.url" in r.json["issue"][0]["expression"], (name, r.json)
    assert unchanged(clean_db) == before, f"{name}: the store changed"


# --------------------------------------------------------------------------- ETags


@pytest.mark.parametrize(
    ("if_match", "status"),
    [('W/"1"', 200), ('W/"3a"', 412), ('W/"2"', 412), ('W/"²"', 400), (3, 400), ('"1', 400)],
)
def test_if_match_in_a_bundle_and_over_rest(
    client: Any, clean_db: Any, if_match: Any, status: int
) -> None:
    send(client, "PUT", "/fhir/Patient/e1", patient(id="e1"))
    entry = put(patient("New", id="e1"))
    entry["request"]["ifMatch"] = if_match
    r = run(client, transaction(entry))
    assert r.status_code == status, r.json
    if status != 200:
        assert r.json["issue"][0]["expression"] == ["Bundle.entry[0].request.ifMatch"]
    if isinstance(if_match, str):
        r = send(client, "PUT", "/fhir/Patient/e1", patient("Rest", id="e1"), **{
            "If-Match": if_match if status != 200 else 'W/"2"'})
        assert r.status_code == status, r.json
        if status != 200:
            assert r.json["issue"][0]["expression"] == ["If-Match"]


# --------------------------------------------------------------------------- create by query


def test_post_with_a_query_is_a_conditional_create_in_a_bundle(client: Any, clean_db: Any) -> None:
    entry = {"resource": patient("Q", identifier=ident(SYS, "q1")),
             "request": {"method": "POST", "url": f"Patient?identifier={SYS}|q1"}}
    first = run(client, transaction(entry))
    assert first.json["entry"][0]["response"]["status"] == "201 Created"
    again = run(client, batch(entry))
    assert again.json["entry"][0]["response"]["status"] == "200 OK"
    assert again.json["entry"][0]["resource"]["id"] == first.json["entry"][0]["resource"]["id"]
    assert count(clean_db) == 1


def test_post_with_a_query_is_a_conditional_create_over_rest(client: Any, clean_db: Any) -> None:
    # What fhirpy's get_or_create sends: the condition in the URL, no If-None-Exist.
    url = f"/fhir/Patient?identifier={SYS}|q2"
    body = patient("Q", identifier=ident(SYS, "q2"))
    first = send(client, "POST", url, body)
    assert first.status_code == 201, first.json
    again = send(client, "POST", url, body)
    assert again.status_code == 200, again.json
    assert again.json["id"] == first.json["id"]
    same = send(client, "POST", url, body, **{"If-None-Exist": f"identifier={SYS}|q2"})
    assert same.status_code == 200
    assert count(clean_db) == 1
    r = send(client, "POST", url, body, **{"If-None-Exist": f"identifier={SYS}|other"})
    assert r.status_code == 400, r.json
    assert r.json["issue"][0]["expression"] == ["url", "If-None-Exist"]
    r = send(client, "POST", "/fhir/Patient?shoe-size=42", body)
    assert r.status_code == 400 and r.json["issue"][0]["expression"] == ["url"]
    assert count(clean_db) == 1


@pytest.mark.parametrize(
    ("method", "url", "status"),
    [
        ("PUT", "/fhir/Patient/k1?active=true", 400),
        ("DELETE", "/fhir/Patient/k1?_cascade=delete", 400),
        ("GET", "/fhir/Patient/k1?_elements=name", 400),
        ("GET", "/fhir/Patient/k1/_history/1?x=1", 400),
        ("GET", "/fhir/Patient/k1/_history?_since=2020-01-01", 400),
        ("GET", "/fhir/Patient/k1?_format=json", 200),
        ("GET", "/fhir/Patient/k1/_history?_count=1", 200),
    ],
)
def test_a_query_is_never_silently_ignored(
    client: Any, clean_db: Any, method: str, url: str, status: int
) -> None:
    send(client, "PUT", "/fhir/Patient/k1", patient(id="k1"))
    before = unchanged(clean_db)
    r = send(client, method, url, patient("Other", id="k1") if method == "PUT" else None)
    assert r.status_code == status, r.json
    if status == 400:
        assert r.json["issue"][0]["expression"] == ["url"]
    assert unchanged(clean_db) == before
    entry = {"request": {"method": method, "url": url.removeprefix("/fhir/")}}
    if method == "PUT":
        entry["resource"] = patient("Other", id="k1")
    r = run(client, transaction(entry))
    assert r.status_code == status, r.json
    assert unchanged(clean_db) == before
