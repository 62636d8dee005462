"""Reference rewriting by element type (FHIR R4 http.html#trules): placeholders and bundle
fullUrls are replaced in `Reference.reference` and in uri / url / canonical / oid / uuid
elements, at any depth, and nowhere else. Table tests call `core.fhir.references` directly
(no database); the end-to-end tests send transactions through the API onto PostgreSQL."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest

from core.fhir.element_types import LINK, REFERENCE, RESOURCE, resource_links
from core.fhir.references import reference_expressions, rewrite_references, scan_references
from tests.builders import patient, post, send, transaction

PAT = "urn:uuid:6a1a6f1c-0000-4000-8000-000000000001"
ENC = "urn:uuid:6a1a6f1c-0000-4000-8000-000000000002"
OID = "urn:oid:1.2.840.99999.1"
BIN = "http://example.org/fhir/Binary/b1"
COND = "Patient?identifier=http://example.org/mrn|42"
MAPPING = {
    PAT: "Patient/p1",
    ENC: "Encounter/e1",
    OID: "Practitioner/d1",
    BIN: "Binary/b9",
    COND: "Patient/p2",
}


def obs(**extra: Any) -> dict[str, Any]:
    return {"resourceType": "Observation", "status": "final", "code": {"text": "x"}, **extra}


def docref(**extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "DocumentReference",
        "status": "current",
        "content": [{"attachment": {"contentType": "text/plain"}}],
        **extra,
    }


# Each row: a resource, what it should become (None: unchanged).
CASES = [
    pytest.param(
        obs(subject={"reference": PAT}, encounter={"reference": ENC}),
        obs(subject={"reference": "Patient/p1"}, encounter={"reference": "Encounter/e1"}),
        id="Reference.reference",
    ),
    pytest.param(
        obs(performer=[{"reference": OID}]),
        obs(performer=[{"reference": "Practitioner/d1"}]),
        id="urn:oid placeholder in a repeating Reference",
    ),
    pytest.param(
        obs(subject={"reference": COND}),
        obs(subject={"reference": "Patient/p2"}),
        id="conditional reference",
    ),
    pytest.param(
        docref(identifier=[{"system": "urn:ietf:rfc:3986", "value": PAT}]),
        None,
        id="urn:uuid in Identifier.value (a string) is kept",
    ),
    pytest.param(
        obs(note=[{"text": PAT}], valueString=PAT),
        None,
        id="placeholder text in string and markdown elements is kept",
    ),
    pytest.param(
        obs(
            text={
                "status": "generated",
                "div": f'<div xmlns="http://www.w3.org/1999/xhtml">{PAT}</div>',
            }
        ),
        None,
        id="narrative is kept",
    ),
    pytest.param(
        docref(content=[{"attachment": {"contentType": "text/plain", "url": BIN}}]),
        docref(content=[{"attachment": {"contentType": "text/plain", "url": "Binary/b9"}}]),
        id="absolute fullUrl in Attachment.url (url)",
    ),
    pytest.param(
        docref(content=[{"attachment": {"contentType": "text/plain", "url": PAT}}]),
        docref(content=[{"attachment": {"contentType": "text/plain", "url": "Patient/p1"}}]),
        id="urn:uuid in Attachment.url",
    ),
    pytest.param(
        obs(subject={"reference": BIN}),
        obs(subject={"reference": "Binary/b9"}),
        id="absolute fullUrl in Reference.reference",
    ),
    pytest.param(
        patient(extension=[{"url": "http://example.org/x", "valueUri": PAT}]),
        patient(extension=[{"url": "http://example.org/x", "valueUri": "Patient/p1"}]),
        id="extension valueUri",
    ),
    pytest.param(
        patient(extension=[{"url": "http://example.org/x", "valueString": PAT}]),
        None,
        id="extension valueString is kept",
    ),
    pytest.param(
        patient(
            extension=[
                {
                    "url": "http://example.org/a",
                    "extension": [
                        {"url": "b", "valueReference": {"reference": ENC}},
                        {"url": "c", "valueUuid": PAT},
                        {"url": "d", "valueOid": OID},
                        {"url": "e", "valueCanonical": BIN},
                    ],
                }
            ]
        ),
        patient(
            extension=[
                {
                    "url": "http://example.org/a",
                    "extension": [
                        {"url": "b", "valueReference": {"reference": "Encounter/e1"}},
                        {"url": "c", "valueUuid": "Patient/p1"},
                        {"url": "d", "valueOid": "Practitioner/d1"},
                        {"url": "e", "valueCanonical": "Binary/b9"},
                    ],
                }
            ]
        ),
        id="nested extensions: valueReference, valueUuid, valueOid, valueCanonical",
    ),
    pytest.param(
        patient(
            _birthDate={"extension": [{"url": "x", "valueReference": {"reference": PAT}}]},
            birthDate="1970-01-01",
        ),
        patient(
            _birthDate={"extension": [{"url": "x", "valueReference": {"reference": "Patient/p1"}}]},
            birthDate="1970-01-01",
        ),
        id="extension on a primitive (_birthDate)",
    ),
    pytest.param(
        obs(meta={"profile": [BIN, "http://hl7.org/fhir/StructureDefinition/vitalsigns"]}),
        obs(meta={"profile": ["Binary/b9", "http://hl7.org/fhir/StructureDefinition/vitalsigns"]}),
        id="repeating canonical (Meta.profile)",
    ),
    pytest.param(
        {
            "resourceType": "QuestionnaireResponse",
            "status": "completed",
            "questionnaire": BIN,
            "item": [
                {
                    "linkId": "1",
                    "item": [
                        {
                            "linkId": "1.1",
                            "answer": [
                                {"valueReference": {"reference": PAT}},
                                {"valueString": PAT},
                            ],
                        }
                    ],
                }
            ],
        },
        {
            "resourceType": "QuestionnaireResponse",
            "status": "completed",
            "questionnaire": "Binary/b9",
            "item": [
                {
                    "linkId": "1",
                    "item": [
                        {
                            "linkId": "1.1",
                            "answer": [
                                {"valueReference": {"reference": "Patient/p1"}},
                                {"valueString": PAT},
                            ],
                        }
                    ],
                }
            ],
        },
        id="canonical and recursive backbone elements",
    ),
    pytest.param(
        {
            "resourceType": "ExplanationOfBenefit",
            "contained": [
                {
                    "resourceType": "Coverage",
                    "id": "c",
                    "status": "active",
                    "beneficiary": {"reference": PAT},
                    "payor": [{"display": PAT}],
                    "identifier": [{"value": PAT}],
                }
            ],
        },
        {
            "resourceType": "ExplanationOfBenefit",
            "contained": [
                {
                    "resourceType": "Coverage",
                    "id": "c",
                    "status": "active",
                    "beneficiary": {"reference": "Patient/p1"},
                    "payor": [{"display": PAT}],
                    "identifier": [{"value": PAT}],
                }
            ],
        },
        id="contained resource, by its own type",
    ),
    pytest.param(
        {
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [{"fullUrl": PAT, "resource": obs(subject={"reference": ENC})}],
        },
        {
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [
                {"fullUrl": "Patient/p1", "resource": obs(subject={"reference": "Encounter/e1"})}
            ],
        },
        id="a Bundle resource: its entries' resources and fullUrls (uri)",
    ),
    pytest.param(
        obs(identifier=[{"system": OID, "value": "1"}], code={"coding": [{"system": PAT}]}),
        obs(
            identifier=[{"system": "Practitioner/d1", "value": "1"}],
            code={"coding": [{"system": "Patient/p1"}]},
        ),
        id="uri elements deep in datatypes (Identifier.system, Coding.system)",
    ),
    pytest.param(
        patient(extension=[{"url": "x", "valueUri": COND}]),
        None,
        id="a conditional reference is a link of Reference.reference only",
    ),
    pytest.param(
        {
            "resourceType": "MedicinalProduct",
            "crossReference": [{"value": PAT}],
            "attachedDocument": [{"reference": PAT}],
        },
        {
            "resourceType": "MedicinalProduct",
            "crossReference": [{"value": PAT}],
            "attachedDocument": [{"reference": "Patient/p1"}],
        },
        id="an R4 type that R4B removed: typed from the R4 definitions like any other",
    ),
    pytest.param(
        obs(subject={"reference": "Patient/kept"}, valueString="urn:uuid:not-in-the-bundle"),
        None,
        id="nothing in the mapping",
    ),
]


@pytest.mark.parametrize(("resource", "expected"), CASES)
def test_rewriting_by_element_type(resource: dict[str, Any], expected: Any) -> None:
    before = copy.deepcopy(resource)
    got = rewrite_references(scan_references(resource), MAPPING)
    assert got == expected
    assert resource == before, "the caller's resource is never modified"


def test_untouched_parts_are_shared_not_copied() -> None:
    resource = obs(subject={"reference": PAT}, code={"coding": [{"code": "1"}]})
    got = rewrite_references(scan_references(resource), MAPPING)
    assert got is not None and got["code"] is resource["code"]
    assert got["subject"] is not resource["subject"]


def test_scan_lists_references_by_type_not_by_name() -> None:
    # DetectedIssue.reference is a uri, not a Reference: a link, but not a reference.
    issue = {
        "resourceType": "DetectedIssue",
        "status": "final",
        "reference": "Patient/1",
        "patient": {"reference": "Patient/2"},
        "implicated": [{"reference": "Patient/3"}],
    }
    scan = scan_references(issue)
    assert scan.references == ["Patient/2", "Patient/3"]
    assert scan.links == ["Patient/1"]


def test_link_tree_comes_from_the_definitions() -> None:
    tree = resource_links("Observation")
    assert tree is not None
    assert tree["subject"]["reference"] is REFERENCE
    assert "display" not in tree["subject"]
    assert tree["implicitRules"] is LINK
    assert tree["contained"] is RESOURCE
    assert "valueString" not in tree and "status" not in tree
    assert tree["extension"]["valueUri"] is LINK
    assert tree["extension"]["extension"] is tree["extension"], "recursive types share a tree"
    patient_tree = resource_links("Patient")
    assert patient_tree is not None
    assert patient_tree["managingOrganization"] is tree["subject"], "one tree per datatype"
    product = resource_links("MedicinalProduct")  # R4 only: R4B removed it
    assert product is not None and product["attachedDocument"] is tree["subject"]
    assert resource_links("SubscriptionTopic") is None  # R4B only
    assert resource_links("NotAType") is None


@pytest.mark.parametrize(
    ("resource", "value", "expected"),
    [
        (obs(subject={"reference": PAT}), PAT, ["R.subject.reference"]),
        (
            obs(performer=[{"reference": "a"}, {"reference": PAT}], focus=[{"reference": PAT}]),
            PAT,
            ["R.performer[1].reference", "R.focus[0].reference"],
        ),
        (
            patient(extension=[{"url": "x", "valueReference": {"reference": PAT}}]),
            PAT,
            ["R.extension[0].value.reference"],
        ),
        (
            {
                "resourceType": "ExplanationOfBenefit",
                "contained": [{"resourceType": "Coverage", "beneficiary": {"reference": PAT}}],
            },
            PAT,
            ["R.contained[0].beneficiary.reference"],
        ),
        (obs(valueString=PAT), PAT, ["R"]),
    ],
)
def test_reference_expressions(resource: dict[str, Any], value: str, expected: list[str]) -> None:
    assert reference_expressions(resource, value, root="R") == expected


# --------------------------------------------------------------------------- end to end


def run(client: Any, body: dict[str, Any]) -> Any:
    return send(client, "POST", "/fhir", body)


def test_transaction_rewrites_links_by_type(client: Any, clean_db: Any) -> None:
    pat, binary = (
        "urn:uuid:0c0ffee0-0000-4000-8000-000000000001",
        "http://example.org/fhir/Binary/b1",
    )
    doc = docref(
        identifier=[{"system": "urn:ietf:rfc:3986", "value": pat}],
        subject={"reference": pat},
        content=[{"attachment": {"contentType": "text/plain", "url": binary}}],
        extension=[
            {"url": "http://example.org/source", "valueUri": pat},
            {"url": "http://example.org/note", "valueString": pat},
        ],
        contained=[
            {
                "resourceType": "Provenance",
                "id": "prov",
                "recorded": "2024-01-01T00:00:00Z",
                "agent": [{"who": {"display": "x"}}],
                "target": [{"reference": pat}],
            }
        ],
    )
    r = run(
        client,
        transaction(
            post(doc, full_url="urn:uuid:0c0ffee0-0000-4000-8000-000000000002"),
            post(
                {"resourceType": "Binary", "contentType": "text/plain", "data": "aGVsbG8="},
                full_url=binary,
            ),
            post(patient(), full_url=pat),
        ),
    )
    assert r.status_code == 200, r.json
    stored, bin_id, pat_id = (
        r.json["entry"][0]["resource"],
        r.json["entry"][1]["resource"]["id"],
        r.json["entry"][2]["resource"]["id"],
    )
    assert stored["identifier"][0]["value"] == pat, "a business identifier keeps its text"
    assert stored["subject"]["reference"] == f"Patient/{pat_id}"
    assert stored["content"][0]["attachment"]["url"] == f"Binary/{bin_id}"
    assert stored["extension"][0]["valueUri"] == f"Patient/{pat_id}"
    assert stored["extension"][1]["valueString"] == pat
    assert stored["contained"][0]["target"][0]["reference"] == f"Patient/{pat_id}"
    # What is read back is what was answered.
    read = send(client, "GET", f"/fhir/DocumentReference/{stored['id']}")
    assert orjson.loads(read.data)["content"][0]["attachment"]["url"] == f"Binary/{bin_id}"


def test_unresolved_placeholder_only_fails_in_a_reference(client: Any, clean_db: Any) -> None:
    stray = "urn:uuid:0c0ffee0-0000-4000-8000-0000000000ff"
    ok = run(
        client,
        transaction(
            post(
                patient(
                    identifier=[{"system": "urn:ietf:rfc:3986", "value": stray}],
                    extension=[{"url": "http://example.org/x", "valueUri": stray}],
                )
            )
        ),
    )
    assert ok.status_code == 200, ok.json
    bad = run(
        client, transaction(post(obs(), full_url=PAT), post(obs(subject={"reference": stray})))
    )
    assert bad.status_code == 400
    assert bad.json["issue"][0]["expression"] == ["Bundle.entry[1].resource.subject.reference"]


# --------------------------------------------------------------------------- precise outcomes


def observation_to(*refs: str) -> dict[str, Any]:
    extra: dict[str, Any] = {"subject": {"reference": refs[0]}}
    if len(refs) > 1:
        extra["performer"] = [{"display": "x"}, *({"reference": r} for r in refs[1:])]
    return obs(**extra)


@pytest.mark.parametrize(
    ("case", "refs", "status", "code", "expressions"),
    [
        (
            "literal reference to nothing",
            ["Patient/ghost"],
            400,
            "not-found",
            ["Bundle.entry[1].resource.subject.reference"],
        ),
        (
            "two references to nothing",
            ["Patient/ghost", "Practitioner/ghost"],
            400,
            "not-found",
            [
                "Bundle.entry[1].resource.subject.reference",
                "Bundle.entry[1].resource.performer[1].reference",
            ],
        ),
        (
            "placeholder naming no entry",
            [PAT],
            400,
            "invalid",
            ["Bundle.entry[1].resource.subject.reference"],
        ),
        (
            "conditional reference matching nothing",
            ["Patient?identifier=http://x|nobody"],
            400,
            "not-found",
            ["Bundle.entry[1].resource.subject.reference"],
        ),
        (
            "conditional reference matching several",
            ["Patient?family=Twin"],
            412,
            "multiple-matches",
            ["Bundle.entry[1].resource.subject.reference"],
        ),
        (
            "bad conditional reference",
            ["Patient?shoe-size=42", ENC],
            400,
            "not-supported",
            ["Bundle.entry[1].resource.subject.reference"],
        ),
    ],
)
def test_reference_errors_name_the_element(
    client: Any,
    clean_db: Any,
    case: str,
    refs: list[str],
    status: int,
    code: str,
    expressions: list[str],
) -> None:
    seeded = run(client, transaction(post(patient("Twin")), post(patient("Twin"))))
    assert seeded.status_code == 200, seeded.json
    r = run(client, transaction(post(patient(), full_url=ENC), post(observation_to(*refs))))
    assert r.status_code == status, r.json
    (issue,) = r.json["issue"]
    assert issue["expression"] == expressions
    assert issue["code"] == code


def test_reference_errors_in_a_batch_name_the_element(client: Any, clean_db: Any) -> None:
    r = run(
        client,
        {
            "resourceType": "Bundle",
            "type": "batch",
            "entry": [post(patient()), post(observation_to("Patient/ghost"))],
        },
    )
    assert r.status_code == 200, r.json
    outcome = r.json["entry"][1]["response"]["outcome"]
    assert outcome["issue"][0]["expression"] == ["Bundle.entry[1].resource.subject.reference"]


def test_a_batch_scan_skips_resources_without_any_reference_key() -> None:
    from core.fhir.references import scan_references

    plain = {"resourceType": "Patient", "name": [{"family": "reference"}],
             "identifier": [{"value": "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a"}]}
    assert scan_references(plain, uris=False).references == []
    linked = {"resourceType": "Patient", "contained": [{
        "resourceType": "Observation", "status": "final", "code": {"text": "x"},
        "subject": {"reference": "Patient?identifier=s|v"}}],
        "managingOrganization": {"reference": "Organization/o1"}}
    assert sorted(scan_references(linked, uris=False).references) == sorted(
        scan_references(linked).references) == ["Organization/o1", "Patient?identifier=s|v"]
