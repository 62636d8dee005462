"""Bad input of every kind gets a 4xx OperationOutcome naming the element, never a 500: control
characters (FHIR text excludes those below U+0020 but tab, CR and LF) in resources, patches,
search values, ids and headers; wrong JSON types anywhere in a request; out-of-range integers."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest

from core.errors import BadRequest
from core.fhir.strings import check_json_text
from tests.jobs_helpers import *  # noqa: F403 - fixtures
from tests.jobs_helpers import job_id_of, wait_job

JSON_PATCH = "application/json-patch+json"


def _send(client: Any, method: str, url: str, body: Any = None,
          ctype: str = "application/fhir+json", **headers: str) -> Any:
    data = body if body is None or isinstance(body, bytes) else orjson.dumps(body)
    return client.open(url, method=method, data=data, content_type=ctype, headers=headers)


def _bundle(*entries: Any, kind: str = "batch") -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


def _issue(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.get_data(as_text=True)[:400]
    body = r.json
    assert body["resourceType"] == "OperationOutcome"
    return body["issue"][0]


@pytest.fixture
def stored(client: Any) -> Any:
    r = _send(client, "PUT", "/fhir/Patient/p1", {"resourceType": "Patient", "id": "p1"})
    assert r.status_code == 201
    return client


def test_json_text_check_names_the_element() -> None:
    check_json_text({"a": ["fine\t\r\n", {"b": "ok"}]}, "X")
    with pytest.raises(BadRequest) as err:
        check_json_text({"name": [{"given": ["a", "b\x1fc"]}]}, "Patient")
    assert err.value.expression == ["Patient.name[0].given[1]"]
    assert "U+001F" in err.value.diagnostics
    with pytest.raises(BadRequest) as err:
        check_json_text({"name": [{"fa\x00mily": "x"}]}, "Patient")
    assert err.value.expression == ["Patient.name[0]"]
    check_json_text({"text": "a backslash and b: \\b, \\u0000"}, "X")  # escapes, not characters
    check_json_text({"big": 10**30}, "X")  # beyond orjson's integers: walked instead


@pytest.mark.parametrize("char", ["\x00", "\x01", "\x08", "\x0b", "\x0c", "\x1f"])
def test_control_characters_in_resources(stored: Any, char: str) -> None:
    body = {"resourceType": "Patient", "name": [{"family": f"a{char}b"}]}
    issue = _issue(_send(stored, "POST", "/fhir/Patient", body), 400)
    assert issue["code"] == "value" and issue["expression"] == ["Patient.name[0].family"]
    body = {"resourceType": "Patient", "id": "p1", "name": [{"family": f"a{char}b"}]}
    issue = _issue(_send(stored, "PUT", "/fhir/Patient/p1", body), 400)
    assert issue["expression"] == ["Patient.name[0].family"]


def test_tab_cr_lf_are_text(stored: Any) -> None:
    body = {"resourceType": "Patient", "name": [{"text": "a\tb\r\nc"}]}
    assert _send(stored, "POST", "/fhir/Patient", body).status_code == 201


def test_control_characters_in_bundles(stored: Any) -> None:
    bad = {"resourceType": "Patient", "name": [{"family": "\x00"}]}
    good = {"resourceType": "Patient"}
    entries = [
        {"resource": good, "request": {"method": "POST", "url": "Patient"}},
        {"resource": bad, "request": {"method": "POST", "url": "Patient"}},
        {"request": {"method": "GET", "url": "Patient?family=a%00"}},
        {"request": {"method": "GET", "url": "Patient?family=a\x02"}},
        {"resource": good, "request": {"method": "POST", "url": "Patient",
                                       "ifNoneExist": "family=%01"}},
    ]
    r = _send(stored, "POST", "/fhir", _bundle(*entries))
    assert r.status_code == 200
    statuses = [e["response"]["status"][:3] for e in r.json["entry"]]
    assert statuses == ["201", "400", "400", "400", "400"]
    where = [e["response"].get("outcome", {}).get("issue", [{}])[0].get("expression")
             for e in r.json["entry"]]
    assert where[1:] == [
        ["Bundle.entry[1].resource.name[0].family"],
        ["Bundle.entry[2].request.url"],
        ["Bundle.entry[3].request.url"],
        ["Bundle.entry[4].request.ifNoneExist"],
    ]
    issue = _issue(_send(stored, "POST", "/fhir", _bundle(*entries[:2], kind="transaction")), 400)
    assert issue["expression"] == ["Bundle.entry[1].resource.name[0].family"]


def test_control_characters_in_upserts(stored: Any) -> None:
    rows = [{"resourceType": "Patient", "id": "u1", "gender": "\x00"},
            {"resourceType": "Patient", "id": "u2"}]
    r = _send(stored, "PUT", "/fhir", rows)
    assert r.status_code == 200
    assert r.json[0]["issue"][0]["expression"] == ["[0].gender"]
    assert r.json[1]["id"] == "u2"
    ndjson = b"\n".join(orjson.dumps(x) for x in rows)
    r = _send(stored, "PUT", "/fhir", ndjson, "application/fhir+ndjson")
    assert r.json[0]["resourceType"] == "OperationOutcome" and r.json[1]["id"] == "u2"


def test_control_characters_in_patches(stored: Any) -> None:
    ops = [{"op": "add", "path": "/gender", "value": "ma\x00le"}]
    issue = _issue(_send(stored, "PATCH", "/fhir/Patient/p1", ops, JSON_PATCH), 400)
    assert issue["code"] == "value" and issue["expression"] == ["[0].value"]
    params = {"resourceType": "Parameters", "parameter": [{"name": "operation", "part": [
        {"name": "type", "valueCode": "add"}, {"name": "path", "valueString": "Patient"},
        {"name": "name", "valueString": "gender"}, {"name": "value", "valueCode": "x\x03"}]}]}
    issue = _issue(_send(stored, "PATCH", "/fhir/Patient/p1", params), 400)
    # A REST answer names the element under the URL's type (the Parameters is not stored).
    assert issue["expression"][0].endswith(".parameter[0].part[3].valueCode")
    binary = {"resourceType": "Binary", "contentType": JSON_PATCH,
              "data": base64.b64encode(orjson.dumps(ops)).decode()}
    r = _send(stored, "POST", "/fhir", _bundle(
        {"resource": binary, "request": {"method": "PATCH", "url": "Patient/p1"}}))
    outcome = r.json["entry"][0]["response"]["outcome"]["issue"][0]
    assert outcome["expression"] == ["Bundle.entry[0].resource.data[0].value"]
    assert _send(stored, "GET", "/fhir/Patient/p1").json["meta"]["versionId"] == "1"


@pytest.mark.parametrize(
    ("url", "where"),
    [
        ("/fhir/Patient?family=a%00b", "family"),
        ("/fhir/Patient?_id=%00", "_id"),
        ("/fhir/Patient?identifier=%00|%00", "identifier"),
        ("/fhir/Patient/_history?_since=%00", "_since"),
        ("/fhir/Patient/a%00b", "url"),
        ("/fhir/Patient/p1%0A", "url"),
        ("/fhir/Patient/p1%09/_history", "url"),
        ("/jobs/%00", "url"),
        ("/fhir/_async/%00", "url"),
    ],
)
def test_control_characters_in_urls(stored: Any, url: str, where: str) -> None:
    issue = _issue(_send(stored, "GET", url), 400)
    assert issue["code"] == "value" and issue["expression"] == [where]


def test_control_characters_in_headers(stored: Any) -> None:
    for header, value in (("If-None-Exist", "family=a\x01"), ("Idempotency-Key", "k\x00"),
                          ("Prefer", "return=minimal\x7f")):
        issue = _issue(_send(stored, "POST", "/fhir/Patient", {"resourceType": "Patient"},
                             **{header: value}), 400)
        assert issue["expression"] == [header]
    issue = _issue(_send(stored, "POST", "/fhir/Patient", {"resourceType": "Patient"},
                         **{"If-None-Exist": "family=a%00"}), 400)
    assert issue["expression"] == ["If-None-Exist"]


RESOURCE = {"resourceType": "Patient", "id": "p1"}


@pytest.mark.parametrize(
    ("entry", "where"),
    [
        ({"request": {"method": ["GET"], "url": "Patient"}}, "request.method"),
        ({"request": {"method": {"GET": 1}, "url": "Patient"}}, "request.method"),
        ({"request": {"method": "GET", "url": ["Patient"]}}, "request.url"),
        ({"request": {"method": "PUT", "url": "Patient/p1", "ifMatch": 1}, "resource": RESOURCE},
         "request.ifMatch"),
        ({"request": {"method": "PUT", "url": "Patient/p1", "ifMatch": 'W/"²"'},
          "resource": RESOURCE}, "request.ifMatch"),
        ({"request": {"method": "GET", "url": "Patient", "ifNoneMatch": 5}}, "request.ifNoneMatch"),
        ({"request": {"method": "POST", "url": "Patient", "ifNoneExist": ["x"]},
          "resource": RESOURCE}, "request.ifNoneExist"),
        ({"request": "GET Patient"}, "request"),
        ({"request": {"method": "GET", "url": "Patient"}, "fullUrl": 5}, "fullUrl"),
        ({"request": {"method": "POST", "url": "Patient"}, "resource": ["x"]}, "resource"),
    ],
)
@pytest.mark.parametrize("kind", ["batch", "transaction"])
def test_wrong_json_types_in_entries(stored: Any, entry: Any, where: str, kind: str) -> None:
    r = _send(stored, "POST", "/fhir", _bundle(entry, kind=kind))
    if kind == "batch":
        assert r.status_code == 200
        response = r.json["entry"][0]["response"]
        assert response["status"].startswith("400"), response
        issue = response["outcome"]["issue"][0]
    else:
        issue = _issue(r, 400)
    assert issue["expression"] == [f"Bundle.entry[0].{where}"]


def test_wrong_json_types_in_patches(stored: Any) -> None:
    ops = [{"op": ["add"], "path": "/gender", "value": "male"}]
    _issue(_send(stored, "PATCH", "/fhir/Patient/p1", ops, JSON_PATCH), 400)
    params = {"resourceType": "Parameters", "parameter": [
        {"name": "operation", "part": [{"name": "type", "valueCode": ["add"]}]}]}
    _issue(_send(stored, "PATCH", "/fhir/Patient/p1", params), 400)
    issue = _issue(_send(stored, "PUT", "/fhir/Patient/p1", RESOURCE, **{"If-Match": 'W/"²"'}),
                   400)
    assert issue["expression"] == ["If-Match"]


@pytest.mark.parametrize(
    "url",
    [
        "/fhir/Patient?_offset=9223372036854775808",
        "/fhir/Patient?_offset=2147483648",
        "/fhir/Patient?_count=9223372036854775808",
        "/fhir/Patient?_count=-1",
        "/fhir/Patient?_count=" + "9" * 5000,
        "/fhir/Patient/_history?_offset=99999999999999999999999",
        "/fhir/Patient/p1/_history?_count=99999999999999999999",
    ],
)
def test_paging_integers_are_bounded(stored: Any, url: str) -> None:
    _issue(_send(stored, "GET", url), 400)


def test_paging_integers_in_range(stored: Any) -> None:
    r = _send(stored, "GET", "/fhir/Patient?_offset=2147483647&_count=2147483647")
    assert r.status_code == 200 and r.json.get("entry", []) == []


def test_limits_before_routing(client: Any) -> None:
    issue = _issue(client.get("/fhir/Patient?family=" + "a" * 9000), 414)
    assert issue["code"] == "too-long"
    issue = _issue(client.get("/fhir/metadata", headers={"X-Big": "b" * 9000}), 431)
    assert issue["expression"] == ["X-Big"]


def test_nul_in_an_async_body_fails_its_entry_only(api: Any, worker: Any) -> None:
    body = (b'{"resourceType":"Bundle","type":"batch","entry":[{"request":{"method":"POST",'
            b'"url":"Patient"},"resource":{"resourceType":"Patient","gender":"\\u0000"}},'
            b'{"request":{"method":"POST","url":"Patient"},"resource":{"resourceType":"Patient"}}]}')
    r = api.post("/fhir", data=body, content_type="application/fhir+json",
                 headers={"Prefer": "respond-async"})
    job = wait_job(api, job_id_of(r), worker=worker)
    assert (job["state"], job["counts"]["failed"]) == ("completed", 1)
    first, second = api.get(f"/fhir/_async/{job['id']}").json["entry"]
    issue = first["response"]["outcome"]["issue"][0]
    assert first["response"]["status"].startswith("400") and "U+0000" in issue["diagnostics"]
    assert issue["expression"] == ["Bundle.entry[0].resource.gender"]
    assert second["response"]["status"].startswith("201")
