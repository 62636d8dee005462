"""Plain REST on the same store: create, read, vread, update, patch, delete, history, search,
metadata — and the answers to bad input."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from tests.builders import patient, send


def test_crud_and_history(client: Any) -> None:
    r = send(client, "POST", "/fhir/Patient", patient("Rest"))
    assert r.status_code == 201, r.json
    pid = r.json["id"]
    assert r.headers["Location"].endswith(f"/fhir/Patient/{pid}/_history/1")
    assert r.headers["ETag"] == 'W/"1"'
    assert "Last-Modified" in r.headers

    r = send(client, "GET", f"/fhir/Patient/{pid}")
    assert r.status_code == 200 and r.json["name"][0]["family"] == "Rest"

    r = send(
        client, "PUT", f"/fhir/Patient/{pid}", patient("Rest2", id=pid), **{"If-Match": 'W/"1"'}
    )
    assert r.status_code == 200 and r.json["meta"]["versionId"] == "2"

    r = send(
        client, "PUT", f"/fhir/Patient/{pid}", patient("Rest3", id=pid), **{"If-Match": 'W/"1"'}
    )
    assert r.status_code == 412

    r = client.patch(
        f"/fhir/Patient/{pid}",
        data=orjson.dumps([{"op": "add", "path": "/gender", "value": "female"}]),
        content_type="application/json-patch+json",
    )
    assert r.status_code == 200 and r.json["gender"] == "female"

    assert (
        send(client, "GET", f"/fhir/Patient/{pid}/_history/1").json["name"][0]["family"] == "Rest"
    )
    hist = send(client, "GET", f"/fhir/Patient/{pid}/_history").json
    assert hist["type"] == "history" and hist["total"] == 3

    r = send(client, "DELETE", f"/fhir/Patient/{pid}")
    assert r.status_code == 204
    assert send(client, "GET", f"/fhir/Patient/{pid}").status_code == 410
    assert send(client, "GET", f"/fhir/Patient/{pid}/_history").json["total"] == 4
    assert send(client, "GET", "/fhir/Patient/nobody").status_code == 404
    assert client.head(f"/fhir/Patient/{pid}/_history/1").status_code == 200


def test_conditional_create_by_header(client: Any) -> None:
    body = patient("Cond", identifier=[{"system": "s", "value": "1"}])
    first = send(client, "POST", "/fhir/Patient", body, **{"If-None-Exist": "identifier=s|1"})
    again = send(client, "POST", "/fhir/Patient", body, **{"If-None-Exist": "identifier=s|1"})
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json["id"] == again.json["id"]


def test_search_and_metadata(client: Any) -> None:
    send(
        client, "PUT", "/fhir", [patient("Searchable", id=f"s{i}", gender="male") for i in range(3)]
    )
    r = send(client, "GET", "/fhir/Patient?family=search&gender=male&_count=2")
    assert r.status_code == 200
    assert r.json["total"] == 3 and len(r.json["entry"]) == 2
    assert any(link["relation"] == "next" for link in r.json["link"])
    # The next link, followed as given (a keyset cursor in its query), ends the search.
    seen = [e["resource"]["id"] for e in r.json["entry"]]
    nxt = next(link["url"] for link in r.json["link"] if link["relation"] == "next")
    r = send(client, "GET", nxt.replace("http://localhost", ""))
    assert r.status_code == 200, r.json
    seen += [e["resource"]["id"] for e in r.json["entry"]]
    assert sorted(seen) == ["s0", "s1", "s2"]
    assert not any(link["relation"] == "next" for link in r.json["link"])
    bad = send(client, "GET", "/fhir/Patient?_cursor=not-one")
    assert bad.status_code == 400 and "_cursor" in bad.json["issue"][0]["diagnostics"]
    cap = send(client, "GET", "/fhir/metadata").json
    assert cap["resourceType"] == "CapabilityStatement" and cap["fhirVersion"] == "4.0.1"
    patient_caps = next(x for x in cap["rest"][0]["resource"] if x["type"] == "Patient")
    assert {"identifier", "birthdate", "name"} <= {p["name"] for p in patient_caps["searchParam"]}
    assert "Patient:organization" in patient_caps["searchInclude"]
    assert "Observation:subject" in patient_caps["searchRevInclude"]


@pytest.mark.parametrize(
    ("method", "url", "body", "content_type", "status", "expression"),
    [
        ("POST", "/fhir", b"{not json", "application/fhir+json", 400, None),
        (
            "POST",
            "/fhir",
            b'{"resourceType": "Bundle", "type": "document"}',
            "application/fhir+json",
            400,
            "Bundle.type",
        ),
        (
            "POST",
            "/fhir",
            b'{"resourceType": "Patient"}',
            "application/fhir+json",
            400,
            "Bundle.resourceType",
        ),
        ("POST", "/fhir", b'{"resourceType": "Bundle", "type": "batch"}', "text/plain", 415, None),
        (
            "POST",
            "/fhir/Patient",
            b'{"resourceType": "Observation"}',
            "application/fhir+json",
            400,
            None,
        ),
        (
            "PUT",
            "/fhir/Patient/a",
            b'{"resourceType": "Patient", "id": "b"}',
            "application/fhir+json",
            400,
            "Patient.id",
        ),
        (
            "PUT",
            "/fhir/Patient/a",
            b'{"resourceType": "Patient", "id": "a", "gender": 7}',
            "application/fhir+json",
            400,
            "Patient.gender",
        ),
        ("GET", "/fhir/Nonsense/1", None, None, 404, None),
        ("POST", "/fhir", b"[" * 5000 + b"]" * 5000, "application/fhir+json", 400, None),
    ],
)
def test_bad_input_gets_an_operation_outcome(
    client: Any,
    method: str,
    url: str,
    body: bytes | None,
    content_type: str | None,
    status: int,
    expression: str | None,
) -> None:
    r = client.open(url, method=method, data=body, content_type=content_type)
    assert r.status_code == status, r.get_data(as_text=True)
    out = r.json
    assert out["resourceType"] == "OperationOutcome"
    if expression:
        assert any(expression in e for e in out["issue"][0].get("expression", [])), out


def test_sync_limit_answers_413_pointing_to_async(client: Any, monkeypatch: Any) -> None:
    app = client.application
    from dataclasses import replace

    app.config["FHIRQ"] = replace(app.config["FHIRQ"], sync_max_entries=2)
    body = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [{"request": {"method": "GET", "url": "Patient/x"}}] * 3,
    }
    r = send(client, "POST", "/fhir", body)
    assert r.status_code == 413
    assert "respond-async" in r.json["issue"][0]["diagnostics"]
