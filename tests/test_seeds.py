"""Every example of the seed documents (../shared/seeds/), sent as written, answered as its page
documents. DSTU2-only syntax in the FHIR example (seed 004) is adapted to R4."""

from __future__ import annotations

from typing import Any

from tests.builders import send


def test_seed_000_batch_upsert(client: Any) -> None:
    body = [
        {"name": [{"given": ["Bob"]}], "active": True, "resourceType": "Patient", "id": "30405060"},
        {
            "name": [{"given": ["Charles"]}],
            "active": False,
            "resourceType": "Patient",
            "id": "40506070",
        },
        {
            "name": [{"given": ["Christy"]}],
            "active": False,
            "resourceType": "Patient",
            "id": "50607080",
        },
    ]
    r = send(client, "PUT", "/fhir", body)
    assert r.status_code == 200, r.json
    out = r.json
    assert [x["id"] for x in out] == ["30405060", "40506070", "50607080"]
    for sent, got in zip(body, out, strict=True):
        assert got["name"] == sent["name"] and got["active"] == sent["active"]
        assert got["meta"]["versionId"] == "1"
        assert got["meta"]["lastUpdated"].endswith("Z")
    # Upsert again with a change: the changed one gets a new version, the others don't.
    body[1]["active"] = True
    again = send(client, "PUT", "/fhir", body).json
    assert [x["meta"]["versionId"] for x in again] == ["1", "2", "1"]
    assert again[1]["active"] is True


def test_seed_000_a_bad_element_is_reported_in_its_place(client: Any) -> None:
    body = [
        {"resourceType": "Patient", "id": "ok-1"},
        {"resourceType": "Patient"},
        {"resourceType": "Patient", "id": "ok-2", "birthDate": "not-a-date"},
        {"resourceType": "Patient", "id": "ok-3"},
    ]
    out = send(client, "PUT", "/fhir", body).json
    assert [x["resourceType"] for x in out] == [
        "Patient",
        "OperationOutcome",
        "OperationOutcome",
        "Patient",
    ]
    assert out[1]["issue"][0]["expression"] == ["[1].id"]
    assert "[2].birthDate" in out[2]["issue"][0]["expression"]
    assert send(client, "GET", "/fhir/Patient/ok-3").status_code == 200


BATCH_UPDATE = {
    "resourceType": "Bundle",
    "type": "batch",
    "entry": [
        {
            "resource": {
                "resourceType": "Patient",
                "id": "patient-1",
                "name": [{"family": "Smith"}],
            },
            "request": {"method": "PUT", "url": "Patient/patient-1"},
        },
        {
            "resource": {
                "resourceType": "Patient",
                "id": "patient-2",
                "name": [{"family": "Jones"}],
            },
            "request": {"method": "PUT", "url": "Patient/patient-2"},
        },
    ],
}


def test_seed_001_batch_update_create_delete_mixed(client: Any) -> None:
    # Update: the page shows 200s, i.e. the patients already exist.
    send(
        client,
        "PUT",
        "/fhir",
        [
            {"resourceType": "Patient", "id": "patient-1"},
            {"resourceType": "Patient", "id": "patient-2"},
        ],
    )
    r = send(client, "POST", "/fhir", BATCH_UPDATE)
    assert r.status_code == 200
    assert r.json["type"] == "batch-response"
    assert [e["response"]["status"] for e in r.json["entry"]] == ["200 OK", "200 OK"]
    assert r.json["entry"][0]["resource"]["name"] == [{"family": "Smith"}]

    create = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {
                "resource": {"resourceType": "Patient", "name": [{"family": "Smith"}]},
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                "resource": {"resourceType": "Patient", "name": [{"family": "Jones"}]},
                "request": {"method": "POST", "url": "Patient"},
            },
        ],
    }
    r = send(client, "POST", "/fhir", create)
    entries = r.json["entry"]
    assert [e["response"]["status"] for e in entries] == ["201 Created", "201 Created"]
    ids = [e["resource"]["id"] for e in entries]
    assert len(set(ids)) == 2 and all(len(i) == 36 for i in ids), "server-generated ids"

    delete = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"request": {"method": "DELETE", "url": "Patient/patient-1"}},
            {"request": {"method": "DELETE", "url": "Patient/patient-2"}},
        ],
    }
    r = send(client, "POST", "/fhir", delete)
    assert [e["response"]["status"] for e in r.json["entry"]] == ["204 No Content"] * 2
    assert send(client, "GET", "/fhir/Patient/patient-1").status_code == 410

    send(
        client,
        "PUT",
        "/fhir",
        [
            {"resourceType": "Patient", "id": "existing-patient"},
            {"resourceType": "Patient", "id": "patient-to-delete"},
        ],
    )
    mixed = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {
                "resource": {"resourceType": "Patient", "name": [{"family": "NewPatient"}]},
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                "resource": {
                    "resourceType": "Patient",
                    "id": "existing-patient",
                    "name": [{"family": "UpdatedName"}],
                },
                "request": {"method": "PUT", "url": "Patient/existing-patient"},
            },
            {"request": {"method": "DELETE", "url": "Patient/patient-to-delete"}},
        ],
    }
    r = send(client, "POST", "/fhir", mixed)
    assert [e["response"]["status"] for e in r.json["entry"]] == [
        "201 Created",
        "200 OK",
        "204 No Content",
    ]


def test_seed_002_transaction_is_atomic(client: Any) -> None:
    ok = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": {
                    "resourceType": "Patient",
                    "identifier": [{"system": "http://example.org/mrn", "value": "12345"}],
                },
                "request": {
                    "method": "PUT",
                    "url": "Patient?identifier=http://example.org/mrn|12345",
                },
            },
            {
                "request": {
                    "method": "GET",
                    "url": "Patient?identifier=http://example.org/mrn|12345",
                }
            },
        ],
    }
    r = send(client, "POST", "/fhir", ok)
    assert r.status_code == 200 and r.json["type"] == "transaction-response"
    assert r.json["entry"][0]["response"]["status"] == "201 Created"
    assert r.json["entry"][1]["resource"]["total"] == 1
    bad = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": {"resourceType": "Patient"},
                "request": {"method": "POST", "url": "Patient"},
            },
            {"request": {"method": "DELETE", "url": "Patient/x/y/z"}},
        ],
    }
    r = send(client, "POST", "/fhir", bad)
    assert r.status_code == 400 and r.json["resourceType"] == "OperationOutcome"
    assert send(client, "GET", "/fhir/Patient").json["total"] == 1, "rolled back"


def test_seed_003_slot_batch(client: Any) -> None:
    send(
        client,
        "PUT",
        "/fhir",
        [
            {
                "resourceType": "Schedule",
                "id": "6bbdbadf-4f60-4bdd-8c54-b37970c584b2",
                "actor": [{"display": "Dr. Who"}],
            }
        ],
    )
    slots = [
        ("2023-12-15T10:00:00Z", "2023-12-15T10:30:00Z"),
        ("2023-12-15T10:30:00Z", "2023-12-15T11:00:00Z"),
    ]
    body = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {
                "request": {"method": "POST", "url": "/Slot"},
                "resource": {
                    "resourceType": "Slot",
                    "status": "free",
                    "start": s,
                    "end": e,
                    "schedule": {"reference": "Schedule/6bbdbadf-4f60-4bdd-8c54-b37970c584b2"},
                },
            }
            for s, e in slots
        ],
    }
    r = send(client, "POST", "/fhir", body, Prefer="return=representation")
    assert r.status_code == 200
    for entry, (start, _) in zip(r.json["entry"], slots, strict=True):
        assert entry["response"]["status"] == "201 Created"
        assert entry["response"]["location"].startswith(f"Slot/{entry['resource']['id']}")
        assert entry["resource"]["start"] == start
        assert entry["resource"]["meta"]["versionId"] == "1"
    found = send(
        client,
        "GET",
        "/fhir/Slot?schedule=Schedule/6bbdbadf-4f60-4bdd-8c54-b37970c584b2&status=free",
    ).json
    assert found["total"] == 2


def _seed_004_r4() -> dict[str, Any]:
    """The FHIR example transaction (DSTU2) in R4 form: fhir_comments and `_x` comment
    elements dropped, HumanName.family a string. The `ValueSet/$lookup` entry is left out:
    operations are not supported (tested below)."""
    name = [{"use": "official", "family": "Chalmers", "given": ["Peter", "James"]}]
    person = {
        "resourceType": "Patient",
        "text": {
            "status": "generated",
            "div": '<div xmlns="http://www.w3.org/1999/xhtml">Some narrative</div>',
        },
        "active": True,
        "name": name,
        "gender": "male",
        "birthDate": "1974-12-25",
    }
    return {
        "resourceType": "Bundle",
        "id": "bundle-transaction",
        "type": "transaction",
        "meta": {"lastUpdated": "2014-08-18T01:43:30Z"},
        "entry": [
            {
                "fullUrl": "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a",
                "resource": dict(person),
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                "fullUrl": "urn:uuid:88f151c0-a954-468a-88bd-5ae15c08e059",
                "resource": dict(person),
                "request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=234234"},
            },
            {
                "fullUrl": "http://example.org/fhir/Patient/123",
                "resource": {**person, "id": "123"},
                "request": {"method": "PUT", "url": "Patient/123"},
            },
            {
                "fullUrl": "urn:uuid:74891afc-ed52-42a2-bcd7-f13d9b60f096",
                "resource": dict(person),
                "request": {"method": "PUT", "url": "Patient?identifier=234234"},
            },
            {
                "fullUrl": "http://example.org/fhir/Patient/123a",
                "resource": {**person, "id": "123a"},
                "request": {"method": "PUT", "url": "Patient/123a", "ifMatch": 'W/"2"'},
            },
            {"request": {"method": "DELETE", "url": "Patient/234"}},
            {"request": {"method": "DELETE", "url": "Patient?identifier=123456"}},
            {"request": {"method": "GET", "url": "Patient?name=peter"}},
            {
                "request": {
                    "method": "GET",
                    "url": "Patient/12334",
                    "ifNoneMatch": 'W/"4"',
                    "ifModifiedSince": "2015-08-31T08:14:33+10:00",
                }
            },
        ],
    }


def _count_patients(client: Any) -> int:
    return send(client, "GET", "/fhir/Patient?_summary=count").json["total"]


def test_seed_004_fhir_example_transaction(client: Any) -> None:
    # Patient/123a must be at version 2 for the ifMatch entry to apply.
    send(client, "PUT", "/fhir/Patient/123a", {"resourceType": "Patient", "id": "123a"})
    send(
        client,
        "PUT",
        "/fhir/Patient/123a",
        {"resourceType": "Patient", "id": "123a", "active": False},
    )
    before = _count_patients(client)
    # As published, the example breaks two R4 rules, each failing the whole transaction:
    # entries 1 (ifNoneExist identifier=234234) and 3 (PUT Patient?identifier=234234) touch
    # one resource, and entry 8 reads a patient that does not exist.
    example = _seed_004_r4()
    r = send(client, "POST", "/fhir", example)
    assert r.status_code == 400, r.json
    assert r.json["issue"][0]["expression"] == [
        "Bundle.entry[1].request.ifNoneExist",
        "Bundle.entry[3].request.url",
    ]
    example["entry"][3]["request"]["url"] = "Patient?identifier=234235"
    r = send(client, "POST", "/fhir", example)
    assert r.status_code == 404, r.json
    assert r.json["issue"][0]["expression"] == ["Bundle.entry[8].request.url"]
    assert _count_patients(client) == before, "nothing written"

    send(client, "PUT", "/fhir/Patient/12334", {"resourceType": "Patient", "id": "12334"})
    r = send(client, "POST", "/fhir", example)
    assert r.status_code == 200, r.json
    statuses = [e["response"]["status"] for e in r.json["entry"]]
    assert statuses == [
        "201 Created",
        "201 Created",
        "201 Created",
        "201 Created",
        "200 OK",
        "204 No Content",
        "204 No Content",
        "200 OK",
        "200 OK",
    ]
    search = r.json["entry"][7]["resource"]
    assert search["type"] == "searchset" and search["total"] == 5  # all five Peters
    assert r.json["entry"][4]["response"]["etag"] == 'W/"3"'


def test_seed_004_operation_entries_are_refused_clearly(client: Any) -> None:
    body = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": {
                    "resourceType": "Parameters",
                    "parameter": [
                        {
                            "name": "coding",
                            "valueCoding": {"system": "http://loinc.org", "code": "1963-8"},
                        }
                    ],
                },
                "request": {"method": "POST", "url": "ValueSet/$lookup"},
            }
        ],
    }
    r = send(client, "POST", "/fhir", body)
    assert r.status_code == 501
    assert r.json["issue"][0]["code"] == "not-supported"
    assert r.json["issue"][0]["expression"] == ["Bundle.entry[0].request.url"]
