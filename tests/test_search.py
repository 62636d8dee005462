"""Search: index extraction, query parsing, search semantics on real rows, and index use.

Rows are inserted with plain SQL (the values coming from `extract_index`, as a writer stores
them), so these tests depend on nothing but the schema.
"""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from sqlalchemy import Connection, event, text

from core.errors import BadRequest
from core.fhir.resources import row_to_resource
from core.fhir.search import explain, find_ids, find_ids_many, search
from core.fhir.search_params import (
    MAX_DT,
    MIN_DT,
    extract_index,
    parse_query,
    supported_params,
)
from core.store.repository import WriteRow, delete_resources, write_resources

BASE = "http://fhirq.test/fhir"
T0 = datetime(2024, 1, 1, tzinfo=UTC)


def dt(value: str) -> datetime:
    return datetime.fromisoformat(value).replace(tzinfo=UTC)


# --------------------------------------------------------------------------- extraction

EXTRACTION_CASES: list[tuple[str, dict[str, Any], set[str], set[tuple[str, str]], Any]] = [
    (
        "patient",
        {
            "resourceType": "Patient",
            "id": "p1",
            "identifier": [
                {"system": "http://hospital/mrn", "value": "123"},
                {"value": "no-system"},
            ],
            "gender": "female",
            "active": True,
            "birthDate": "1974-12",
            "name": [
                {"family": "Müller", "given": ["Zoë", "Anne"], "prefix": ["Dr."]},
                {"text": "Zoe Mueller"},
            ],
            "managingOrganization": {"reference": "Organization/o1"},
        },
        {
            "identifier:http://hospital/mrn|123",
            "identifier:*|123",
            "identifier:http://hospital/mrn|",
            "identifier:|no-system",
            "identifier:*|no-system",
            "identifier:",
            "gender:|female",
            "gender:",
            "active:|true",
            "active:",
            "organization:Organization/o1",
            "organization:o1",
            "organization:",
        },
        {
            ("family", "muller"),
            ("given", "zoe"),
            ("given", "anne"),
            ("name", "dr."),
            ("name", "zoe mueller"),
        },
        {("birthdate", dt("1974-12-01T00:00:00"), dt("1974-12-31T23:59:59.999999"))},
    ),
    (
        "observation with valueQuantity and effectiveDateTime",
        {
            "resourceType": "Observation",
            "id": "o1",
            "status": "final",
            "code": {
                "coding": [
                    {"system": "http://loinc.org", "code": "29463-7"},
                    {"code": "weight"},
                ],
                "text": "Body weight",
            },
            "subject": {"reference": "Patient/p1/_history/3"},
            "encounter": {"reference": "Encounter/e1"},
            "effectiveDateTime": "2014-06-04T09:49:30+02:00",
            "valueQuantity": {"value": 63.8, "unit": "kg", "system": "http://unitsofmeasure.org"},
        },
        {
            "code:http://loinc.org|29463-7",
            "code:http://loinc.org|",
            "code:*|29463-7",
            "code:|weight",
            "code:*|weight",
            "code:",
            "status:|final",
            "status:",
            "subject:Patient/p1",
            "subject:p1",
            "subject:",
            "patient:Patient/p1",
            "patient:p1",
            "patient:",
            "encounter:Encounter/e1",
            "encounter:e1",
            "encounter:",
        },
        set(),
        {("date", dt("2014-06-04T07:49:30"), dt("2014-06-04T07:49:30.999999"))},
    ),
    (
        "observation about a group: subject but no patient; an absolute reference as written",
        {
            "resourceType": "Observation",
            "id": "o2",
            "subject": {"reference": "Group/g1"},
            "encounter": {"reference": "http://elsewhere/fhir/Encounter/e9"},
            "effectivePeriod": {"start": "2020-01-01T10:00:00.250Z"},
        },
        {
            "subject:Group/g1",
            "subject:g1",
            "subject:",
            "encounter:http://elsewhere/fhir/Encounter/e9",
            "encounter:",
        },
        set(),
        {("date", dt("2020-01-01T10:00:00.250"), MAX_DT)},
    ),
    (
        "encounter period",
        {
            "resourceType": "Encounter",
            "id": "e1",
            "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "subject": {"reference": "Patient/p1"},
            "participant": [{"individual": {"reference": "Practitioner/dr1"}}],
            "period": {"start": "2015-03-01", "end": "2015-03-02T12:00:00Z"},
        },
        {
            "status:|finished",
            "status:",
            "class:http://terminology.hl7.org/CodeSystem/v3-ActCode|AMB",
            "class:http://terminology.hl7.org/CodeSystem/v3-ActCode|",
            "class:*|AMB",
            "class:",
            "subject:Patient/p1",
            "subject:p1",
            "subject:",
            "patient:Patient/p1",
            "patient:p1",
            "patient:",
            "participant:Practitioner/dr1",
            "participant:dr1",
            "participant:",
            "practitioner:Practitioner/dr1",
            "practitioner:dr1",
            "practitioner:",
        },
        set(),
        {("date", dt("2015-03-01T00:00:00"), dt("2015-03-02T12:00:00.999999"))},
    ),
    (
        "slot",
        {
            "resourceType": "Slot",
            "id": "s1",
            "schedule": {"reference": "Schedule/sch1"},
            "status": "free",
            "start": "2025-02-03T09:00:00Z",
            "end": "2025-02-03T09:30:00Z",
        },
        {
            "schedule:Schedule/sch1",
            "schedule:sch1",
            "schedule:",
            "status:|free",
            "status:",
        },
        set(),
        {("start", dt("2025-02-03T09:00:00"), dt("2025-02-03T09:00:00.999999"))},
    ),
    (
        "schedule",
        {
            "resourceType": "Schedule",
            "id": "sch1",
            "identifier": [{"system": "urn:sched", "value": "A"}],
            "active": False,
            "actor": [
                {"reference": "PractitionerRole/r1"},
                {"reference": "Location/l1"},
            ],
        },
        {
            "identifier:urn:sched|A",
            "identifier:urn:sched|",
            "identifier:*|A",
            "identifier:",
            "active:|false",
            "active:",
            "actor:PractitionerRole/r1",
            "actor:r1",
            "actor:Location/l1",
            "actor:l1",
            "actor:",
        },
        set(),
        None,
    ),
    (
        "condition: onset and recordedDate are two parameters",
        {
            "resourceType": "Condition",
            "id": "c1",
            "clinicalStatus": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                        "code": "active",
                    }
                ]
            },
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]},
            "subject": {"reference": "Patient/p1"},
            "onsetDateTime": "2001",
            "recordedDate": "2003-04-05",
        },
        {
            "clinical-status:http://terminology.hl7.org/CodeSystem/condition-clinical|active",
            "clinical-status:http://terminology.hl7.org/CodeSystem/condition-clinical|",
            "clinical-status:*|active",
            "clinical-status:",
            "code:http://snomed.info/sct|44054006",
            "code:http://snomed.info/sct|",
            "code:*|44054006",
            "code:",
            "subject:Patient/p1",
            "subject:p1",
            "subject:",
            "patient:Patient/p1",
            "patient:p1",
            "patient:",
        },
        set(),
        {
            ("onset-date", dt("2001-01-01T00:00:00"), dt("2001-12-31T23:59:59.999999")),
            ("recorded-date", dt("2003-04-05T00:00:00"), dt("2003-04-05T23:59:59.999999")),
        },
    ),
    (
        "condition: unresolved references are not indexed",
        {
            "resourceType": "Condition",
            "id": "c2",
            "subject": {"reference": "urn:uuid:1a2b"},
            "encounter": {"reference": "#contained"},
            "recordedDate": "2003-04-05",
        },
        set(),
        set(),
        {("recorded-date", dt("2003-04-05T00:00:00"), dt("2003-04-05T23:59:59.999999"))},
    ),
    (
        "practitioner role with logical (identifier) references, as Synthea writes them",
        {
            "resourceType": "PractitionerRole",
            "id": "r1",
            "practitioner": {
                "identifier": {"system": "http://hl7.org/fhir/sid/us-npi", "value": "9"}
            },
        },
        {
            "practitioner:identifier:http://hl7.org/fhir/sid/us-npi|9",
            "practitioner:identifier:http://hl7.org/fhir/sid/us-npi|",
            "practitioner:identifier:*|9",
            "practitioner:",
        },
        set(),
        None,
    ),
    (
        "organization name and alias",
        {"resourceType": "Organization", "id": "org", "name": "Hôpital Général", "alias": ["HG"]},
        set(),
        {("name", "hopital general"), ("name", "hg"), ("phonetic", "hopital general")},
        None,
    ),
    (
        "bad and odd values are skipped, never raised",
        {
            "resourceType": "Patient",
            "id": "odd",
            "gender": 7,
            "birthDate": "not-a-date",
            "identifier": "oops",
            "name": [{"family": ""}, "x"],
        },
        set(),
        set(),
        None,
    ),
]


@pytest.mark.parametrize(
    "resource,tokens,strings,dates",
    [c[1:] for c in EXTRACTION_CASES],
    ids=[c[0] for c in EXTRACTION_CASES],
)
def test_extract_index(resource, tokens, strings, dates) -> None:
    iv = extract_index(resource)
    assert set(iv.tokens) == tokens
    assert len(iv.tokens) == len(set(iv.tokens)), "tokens are distinct"
    assert set(iv.strings) == strings
    assert len(iv.strings) == len(set(iv.strings))
    assert set(iv.dates) == (dates or set())
    assert len(iv.dates) == len(set(iv.dates))


def test_period_without_start_runs_from_min() -> None:
    iv = extract_index({"resourceType": "Encounter", "period": {"end": "2020"}})
    assert iv.dates == [("date", MIN_DT, dt("2020-12-31T23:59:59.999999"))]


def test_giant_identifier_is_capped_the_same_way_on_both_sides() -> None:
    value = "x" * 5000
    iv = extract_index({"resourceType": "Patient", "identifier": [{"system": "s", "value": value}]})
    assert all(len(t) < 600 for t in iv.tokens)
    q = parse_query("Patient", [("identifier", f"s|{value}")], strict=True)
    assert q.clauses[0].any_of[0] in iv.tokens


def test_supported_params() -> None:
    assert {"_id", "_lastUpdated", "identifier", "name", "family", "given", "birthdate"} <= set(
        supported_params("Patient")
    )
    assert {"gender"} <= set(supported_params("Patient"))
    assert {"code", "subject", "patient", "date", "status"} <= set(supported_params("Observation"))
    assert {"schedule", "start", "status"} <= set(supported_params("Slot"))
    assert {"actor"} <= set(supported_params("Schedule"))
    assert {"code", "patient"} <= set(supported_params("MedicationRequest"))
    assert {"_id", "_lastUpdated", "_tag", "identifier", "code", "author"} <= set(
        supported_params("Basic"))
    assert {"value-quantity", "combo-code", "_profile"} <= set(supported_params("Observation"))


# --------------------------------------------------------------------------- parsing

STRICT_ERRORS = [
    ("unknown parameter", "Patient", [("foo", "1")], "foo", "not-supported"),
    ("parameter of another type", "Patient", [("code", "x")], "code", "not-supported"),
    ("chained parameter", "Observation", [("subject.name", "x")], "subject.name", "not-supported"),
    ("unsupported result parameter", "Patient", [("_sort", "name")], "_sort", "not-supported"),
    ("composite parameter", "Observation", [("code-value-quantity", "x$1")],
     "code-value-quantity", "not-supported"),
    ("bad number", "RiskAssessment", [("probability", "gt0.5x")], "probability", "value"),
    ("number with unit", "RiskAssessment", [("probability", "0.5|s|c")], "probability", "value"),
    ("bad quantity", "Observation", [("value-quantity", "5.4|mg")], "value-quantity", "value"),
    ("reference target mismatch", "Observation", [("encounter:Patient", "1")],
     "encounter:Patient", "value"),
    ("modifier on a quantity", "Observation", [("value-quantity:exact", "1")],
     "value-quantity:exact", "not-supported"),
    ("bad uri modifier", "ValueSet", [("url:contains", "http://x")], "url:contains",
     "not-supported"),
    ("bad date", "Patient", [("birthdate", "ge1974-13")], "birthdate", "value"),
    ("bad date prefix", "Patient", [("birthdate", "xx1974")], "birthdate", "value"),
    ("bad _lastUpdated", "Patient", [("_lastUpdated", "yesterday")], "_lastUpdated", "value"),
    ("bad token modifier", "Patient", [("gender:below", "male")], "gender:below", "not-supported"),
    ("text on a plain code", "Patient", [("gender:text", "male")], "gender:text", "not-supported"),
    ("bad string modifier", "Patient", [("name:below", "a")], "name:below", "not-supported"),
    (
        "modifier on a date",
        "Patient",
        [("birthdate:exact", "2000")],
        "birthdate:exact",
        "not-supported",
    ),
    ("bad :missing value", "Patient", [("gender:missing", "maybe")], "gender:missing", "value"),
    ("empty token", "Patient", [("identifier", "|")], "identifier", "value"),
    ("empty value", "Patient", [("identifier", "")], "identifier", "invalid"),
    ("bad reference", "Observation", [("subject", "not a ref")], "subject", "value"),
    (
        "reference type mismatch",
        "Observation",
        [("subject:Patient", "Group/1")],
        "subject:Patient",
        "value",
    ),
    ("bad _count", "Patient", [("_count", "-1")], "_count", "invalid"),
]


@pytest.mark.parametrize(
    "resource_type,params,expression,code",
    [c[1:] for c in STRICT_ERRORS],
    ids=[c[0] for c in STRICT_ERRORS],
)
def test_parse_query_strict_errors(resource_type, params, expression, code) -> None:
    with pytest.raises(BadRequest) as info:
        parse_query(resource_type, params, strict=True)
    assert info.value.expression == [expression]
    assert info.value.code == code
    assert info.value.status == 400
    assert expression.split(":")[0] in info.value.diagnostics


def test_parse_query_lenient_ignores_unknown_but_not_bad_values() -> None:
    q = parse_query("Patient", [("foo", "1"), ("_sort", "x"), ("gender", "male")], strict=False)
    assert q.ignored == [("foo", "1"), ("_sort", "x")]
    assert q.applied == [("gender", "male")]
    with pytest.raises(BadRequest):
        parse_query("Patient", [("birthdate", "nope")], strict=False)
    with pytest.raises(BadRequest):
        parse_query("Patient", [("gender:text", "male")], strict=False)


@pytest.mark.parametrize(
    "value,expected",
    [
        ("male", ["gender:|male"]),  # gender never has a system: `|male` is stored
        ("|male", ["gender:|male"]),
        ("http://s|male", ["gender:http://s|male"]),
        ("http://s|", ["gender:http://s|"]),
        ("male,female", ["gender:|male", "gender:|female"]),
        (r"a\,b", ["gender:|a,b"]),
        (r"s\|x|c", ["gender:s|x|c"]),
    ],
)
def test_token_values(value, expected) -> None:
    q = parse_query("Patient", [("gender", value)], strict=True)
    assert q.clauses[0].any_of == expected


@pytest.mark.parametrize(
    "name,value,expected",
    [
        ("subject", "Patient/1", ["subject:Patient/1"]),
        ("subject", "1", ["subject:1"]),
        ("subject:Patient", "1", ["subject:Patient/1"]),
        ("subject", "http://x.org/fhir/Patient/1/_history/2",
         ["subject:Patient/1", "subject:http://x.org/fhir/Patient/1/_history/2"]),
        ("patient", "1,2", ["patient:1", "patient:2"]),
        ("subject:identifier", "sys|9", ["subject:identifier:sys|9"]),
    ],
)
def test_reference_values(name, value, expected) -> None:
    q = parse_query("Observation", [(name, value)], strict=True)
    assert q.clauses[0].any_of == expected


# --------------------------------------------------------------------------- rows


def insert(
    conn: Connection,
    res: dict[str, Any],
    *,
    version: int = 1,
    at: datetime = T0,
    deleted: bool = False,
) -> None:
    """Store `res` as the writers do (content without meta versionId/lastUpdated, its index
    in every index table), then date it `at`."""
    key = (res["resourceType"], res["id"])
    write_resources(conn, [WriteRow(key, res, "PUT", extract_index(res))])
    if deleted:
        delete_resources(conn, [key])
        return
    for table in ("resource", "resource_history"):
        conn.execute(
            text(f"UPDATE {table} SET version = :v, last_updated = :lu WHERE res_type = :t"
                 " AND res_id = :id"),
            {"t": key[0], "id": key[1], "v": version, "lu": at},
        )


def patient(
    pid: str,
    family: str,
    given: str,
    gender: str,
    birth: str,
    mrn: str,
    system: str = "http://hospital/mrn",
) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": pid,
        "identifier": [{"system": system, "value": mrn}],
        "name": [{"family": family, "given": [given]}],
        "gender": gender,
        "birthDate": birth,
    }


def observation(oid: str, subject: str, code: str, when: str, status: str = "final") -> dict:
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": status,
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": subject},
        "effectiveDateTime": when,
        "valueQuantity": {"value": 1.0, "unit": "kg"},
    }


@pytest.fixture
def people(conn: Connection) -> Connection:
    for i, res in enumerate(
        [
            patient("p1", "Smith", "John", "male", "1974", "100"),
            patient("p2", "Smithers", "Ann", "female", "1974-12-15", "200"),
            patient("p3", "Müller", "Zoë", "female", "1980-06", "300", system="http://other/ids"),
            patient("p4", "Jones", "Bob", "male", "1990-01-01", "400"),
            patient("p5", "Smit_h", "Ed", "other", "2001-02-03", "500"),
            patient("p6", "MÜLLER", "Max", "male", "1975-01-01", "600"),
        ]
    ):
        insert(conn, res, at=T0 + timedelta(days=i))
    insert(conn, patient("gone", "Smith", "Deleted", "male", "1974", "100"), deleted=True)
    insert(conn, observation("o1", "Patient/p1", "29463-7", "2014-06-04T09:49:30Z"))
    insert(conn, observation("o2", "Patient/p1", "8302-2", "2015-01-01T00:00:00Z"))
    insert(conn, observation("o3", "Patient/p2", "29463-7", "2014-06-05T10:00:00Z", "amended"))
    insert(conn, {"resourceType": "Observation", "id": "o4", "status": "final"})
    insert(conn, {"resourceType": "Practitioner", "id": "dr1", "name": [{"family": "Who"}]})
    insert(conn, {"resourceType": "Practitioner", "id": "dr2", "gender": "female"})
    for sid, schedule, status, start in [
        ("s1", "sch1", "free", "2025-02-03T09:00:00Z"),
        ("s2", "sch1", "busy", "2025-02-03T10:00:00Z"),
        ("s3", "sch2", "free", "2025-02-04T09:00:00+01:00"),
    ]:
        insert(
            conn,
            {
                "resourceType": "Slot",
                "id": sid,
                "schedule": {"reference": f"Schedule/{schedule}"},
                "status": status,
                "start": start,
                "end": start.replace(":00:00", ":30:00"),
            },
        )
    insert(
        conn,
        {"resourceType": "Schedule", "id": "sch1", "actor": [{"reference": "PractitionerRole/r1"}]},
    )
    insert(
        conn,
        {"resourceType": "Schedule", "id": "sch2", "actor": [{"reference": "Practitioner/dr1"}]},
    )
    return conn


def ids(bundle: dict[str, Any]) -> set[str]:
    return {e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == "match"}


SEMANTICS = [
    # tokens: with / without system, |code, system|, OR, AND
    ("Patient", [("identifier", "100")], {"p1"}),
    ("Patient", [("identifier", "http://hospital/mrn|100")], {"p1"}),
    ("Patient", [("identifier", "http://other/ids|100")], set()),
    ("Patient", [("identifier", "|100")], set()),
    ("Patient", [("identifier", "http://other/ids|")], {"p3"}),
    ("Patient", [("gender", "|female")], {"p2", "p3"}),
    ("Patient", [("gender", "female,other")], {"p2", "p3", "p5"}),
    ("Patient", [("gender", "male"), ("identifier", "400,600")], {"p4", "p6"}),
    ("Patient", [("gender", "male"), ("gender", "female")], set()),
    ("Patient", [("gender:not", "male")], {"p2", "p3", "p5"}),
    ("Patient", [("_id", "p1,p3,gone")], {"p1", "p3"}),
    ("Observation", [("code:missing", "true")], {"o4"}),
    ("Observation", [("code:missing", "false")], {"o1", "o2", "o3"}),
    # references
    ("Observation", [("subject", "Patient/p1")], {"o1", "o2"}),
    ("Observation", [("patient", "p1")], {"o1", "o2"}),
    ("Observation", [("subject:Patient", "p2")], {"o3"}),
    ("Observation", [("subject", f"{BASE}/Patient/p2")], {"o3"}),
    ("Observation", [("patient", "p1"), ("code", "http://loinc.org|29463-7")], {"o1"}),
    ("Observation", [("status", "final,amended"), ("code", "29463-7")], {"o1", "o3"}),
    # strings: prefix, accents, case, exact, contains, LIKE wildcards are literal
    ("Patient", [("family", "smi")], {"p1", "p2", "p5"}),
    ("Patient", [("family", "SMITH")], {"p1", "p2"}),
    ("Patient", [("name", "john")], {"p1"}),
    ("Patient", [("name", "mull")], {"p3", "p6"}),
    ("Patient", [("name", "Mül")], {"p3", "p6"}),
    ("Patient", [("given", "zoe")], {"p3"}),
    ("Patient", [("family", "smit_")], {"p5"}),
    ("Patient", [("family", "jones,zz")], {"p4"}),
    ("Patient", [("family", "smi"), ("given", "an")], {"p2"}),
    ("Patient", [("family:exact", "Müller")], {"p3"}),
    ("Patient", [("family:exact", "Muller")], set()),
    ("Patient", [("family:exact", "Smith")], {"p1"}),
    ("Patient", [("name:exact", "MÜLLER,John")], {"p6", "p1"}),
    ("Patient", [("family:contains", "ther")], {"p2"}),
    # dates on partial dates (p1 born "1974": the whole year; p2 "1974-12-15")
    ("Patient", [("birthdate", "1974")], {"p1", "p2"}),
    ("Patient", [("birthdate", "1974-12")], {"p2"}),
    ("Patient", [("birthdate", "eq1974-12-15")], {"p2"}),
    ("Patient", [("birthdate", "ne1974")], {"p3", "p4", "p5", "p6"}),
    ("Patient", [("birthdate", "gt1974-06-01")], {"p1", "p2", "p3", "p4", "p5", "p6"}),
    ("Patient", [("birthdate", "ge1974-12-15")], {"p1", "p2", "p3", "p4", "p5", "p6"}),
    ("Patient", [("birthdate", "lt1974-06-01")], {"p1"}),
    ("Patient", [("birthdate", "le1974")], {"p1", "p2"}),
    ("Patient", [("birthdate", "sa1974")], {"p3", "p4", "p5", "p6"}),
    ("Patient", [("birthdate", "eb1975-01-01")], {"p1", "p2"}),
    ("Patient", [("birthdate", "ge1975"), ("birthdate", "lt1990")], {"p3", "p6"}),
    ("Patient", [("birthdate", "1980,1990")], {"p3", "p4"}),
    ("Patient", [("birthdate", "ap1990-01-01")], {"p4"}),
    ("Patient", [("birthdate:missing", "false")], {"p1", "p2", "p3", "p4", "p5", "p6"}),
    ("Observation", [("date", "2014-06-04")], {"o1"}),
    ("Observation", [("date", "2014-06-04T09:49:30Z")], {"o1"}),
    ("Observation", [("date", "2014-06-04T11:49+02:00")], {"o1"}),
    ("Observation", [("date", "ge2014-06-05")], {"o2", "o3"}),
    ("Observation", [("date:missing", "true")], {"o4"}),
    ("Practitioner", [("name:missing", "true")], {"dr2"}),
    ("Practitioner", [("family:missing", "false")], {"dr1"}),
    # Slot and Schedule, as the weekly slot generation looks them up
    ("Slot", [("schedule", "Schedule/sch1"), ("status", "free")], {"s1"}),
    ("Slot", [("schedule", "sch2")], {"s3"}),
    ("Slot", [("start", "2025-02-03")], {"s1", "s2"}),
    ("Slot", [("start", "ge2025-02-03T09:30:00Z")], {"s2", "s3"}),
    ("Slot", [("start", "lt2025-02-04T09:00:00Z")], {"s1", "s2", "s3"}),
    ("Slot", [("start", "eq2025-02-04T08:00:00Z")], {"s3"}),
    ("Schedule", [("actor", "PractitionerRole/r1")], {"sch1"}),
    ("Schedule", [("actor", "dr1")], {"sch2"}),
    ("Schedule", [("actor:Practitioner", "dr1,r1")], {"sch2"}),
    # _lastUpdated (p1 .. p6 at T0 + 0..5 days)
    ("Patient", [("_lastUpdated", "2024-01-02")], {"p2"}),
    ("Patient", [("_lastUpdated", "gt2024-01-04")], {"p5", "p6"}),
    ("Patient", [("_lastUpdated", "ge2024-01-04")], {"p4", "p5", "p6"}),
    ("Patient", [("_lastUpdated", "lt2024-01-02T00:00:00Z")], {"p1"}),
    ("Patient", [("_lastUpdated", "le2024-01-02")], {"p1", "p2"}),
]


@pytest.mark.parametrize("resource_type,params,expected", SEMANTICS, ids=lambda v: str(v))
def test_search_semantics(people: Connection, resource_type, params, expected) -> None:
    bundle = search(people, resource_type, params, base_url=BASE)
    assert ids(bundle) == expected
    assert bundle["total"] == len(expected)
    if expected:
        # The same criteria work for conditional operations.
        assert set(find_ids(people, resource_type, params, limit=100)) == expected


def test_searchset_bundle_shape(people: Connection) -> None:
    bundle = search(people, "Patient", [("_id", "p1")], base_url=BASE + "/")
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
    (entry,) = bundle["entry"]
    assert entry["fullUrl"] == f"{BASE}/Patient/p1"
    assert entry["search"] == {"mode": "match"}
    assert entry["resource"]["meta"] == {
        "versionId": "1",
        "lastUpdated": "2024-01-01T00:00:00.000Z",
    }
    assert entry["resource"]["name"][0]["family"] == "Smith"
    assert bundle["link"][0] == {"relation": "self", "url": f"{BASE}/Patient?_id=p1&_count=50"}


def test_paging_links_and_count(people: Connection) -> None:
    params = [("family", "smi"), ("_count", "2")]
    page1 = search(people, "Patient", params, base_url=BASE)
    assert page1["total"] == 3 and len(page1["entry"]) == 2
    links = {link["relation"]: link["url"] for link in page1["link"]}
    assert "previous" not in links
    nxt = urlsplit(links["next"])
    assert f"{nxt.scheme}://{nxt.netloc}{nxt.path}" == f"{BASE}/Patient"
    next_params = parse_qsl(nxt.query)
    # The next page starts after the last resource of this one: a keyset cursor, not an offset.
    assert next_params[:2] == [("family", "smi"), ("_count", "2")]
    assert [name for name, _ in next_params[2:]] == ["_cursor"]
    page2 = search(people, "Patient", next_params, base_url=BASE)
    links2 = {link["relation"]: link["url"] for link in page2["link"]}
    assert "next" not in links2 and "previous" not in links2
    assert page2["total"] == 3
    assert ids(page1) | ids(page2) == {"p1", "p2", "p5"}
    assert not ids(page1) & ids(page2)
    # Ordered by id, so pages are stable.
    assert [e["resource"]["id"] for e in page1["entry"]] == ["p1", "p2"]
    # `_offset` still works, for clients that build their own page links.
    by_offset = search(people, "Patient", [*params, ("_offset", "2")], base_url=BASE)
    assert ids(by_offset) == ids(page2)
    links3 = {link["relation"]: link["url"] for link in by_offset["link"]}
    assert parse_qsl(urlsplit(links3["previous"]).query)[-1] == ("_count", "2")


def test_count_limits_and_summary(people: Connection) -> None:
    only_total = search(people, "Patient", [("_summary", "count")], base_url=BASE)
    assert only_total["total"] == 6 and "entry" not in only_total
    capped = search(people, "Patient", [("_count", "5000")], base_url=BASE, max_count=4)
    assert len(capped["entry"]) == 4
    default = search(people, "Patient", [], base_url=BASE, default_count=3)
    assert len(default["entry"]) == 3 and default["total"] == 6
    beyond = search(people, "Patient", [("gender", "male"), ("_offset", "10")], base_url=BASE)
    assert beyond["total"] == 3 and "entry" not in beyond
    assert "next" not in {link["relation"] for link in beyond["link"]}
    no_total = search(people, "Patient", [("_total", "none"), ("_count", "6")], base_url=BASE)
    assert "total" not in no_total and len(no_total["entry"]) == 6
    assert "next" not in {link["relation"] for link in no_total["link"]}


def test_lenient_search_warns_about_ignored_params(people: Connection) -> None:
    bundle = search(people, "Patient", [("gender", "male"), ("foo", "bar")], base_url=BASE)
    assert ids(bundle) == {"p1", "p4", "p6"}
    outcome = [e for e in bundle["entry"] if e["search"]["mode"] == "outcome"]
    assert outcome[0]["resource"]["issue"][0]["severity"] == "warning"
    assert "foo" in outcome[0]["resource"]["issue"][0]["diagnostics"]
    assert "foo" not in bundle["link"][0]["url"]
    with pytest.raises(BadRequest):
        search(people, "Patient", [("foo", "bar")], base_url=BASE, strict=True)


def test_find_ids_refuses_criterion_less_queries(people: Connection) -> None:
    with pytest.raises(BadRequest):
        find_ids(people, "Patient", [("_count", "1")])
    with pytest.raises(BadRequest):
        find_ids(people, "Patient", [("unknown", "1")])
    assert len(find_ids(people, "Patient", [("gender", "male")])) == 2  # default limit


def test_find_ids_many_agrees_with_find_ids(people: Connection) -> None:
    insert(people, patient("p7", "Twin", "A", "male", "2000", "dup"))
    insert(people, patient("p8", "Twin", "B", "male", "2000", "dup"))
    insert(people, patient("p9", "Twin", "C", "male", "2000", "dup"))
    queries = [
        [("identifier", "http://hospital/mrn|100")],
        [("identifier", "http://hospital/mrn|dup")],  # three matches: up to 2 back
        [("identifier", "http://hospital/mrn|404")],
        [("identifier", "http://other/ids|300")],
        [("identifier", "http://hospital/mrn|100")],  # the same condition twice
        [("identifier", "500")],
    ]
    many = find_ids_many(people, "Patient", queries)
    single = [sorted(find_ids(people, "Patient", q)) for q in queries]
    assert [len(m) for m in many] == [len(s) for s in single] == [1, 2, 0, 1, 1, 1]
    for m, one in zip(many, single, strict=True):
        if len(m) < 2:
            assert m == one
        else:  # more matches than asked for: any two of them
            assert set(m) | set(one) <= {"p7", "p8", "p9"}
    # Mixed shapes fall back to one query each and still agree.
    mixed = [*queries, [("family", "smith"), ("gender", "male")]]
    many_mixed = find_ids_many(people, "Patient", mixed)
    assert many_mixed[-1] == ["p1"]
    assert [len(m) for m in many_mixed[:-1]] == [len(m) for m in many]
    with pytest.raises(BadRequest) as info:
        find_ids_many(people, "Patient", [[("identifier", "1")], [("bogus", "1")]])
    assert info.value.index == 1


def test_row_to_resource_restores_meta_without_touching_content() -> None:
    content = {"resourceType": "Patient", "id": "x", "gender": "male"}
    out = row_to_resource(content, 3, datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC))
    assert list(out) == ["resourceType", "id", "meta", "gender"]
    assert out["meta"] == {"versionId": "3", "lastUpdated": "2024-05-06T07:08:09.123Z"}
    assert "meta" not in content
    with_meta = {"resourceType": "Patient", "id": "x", "meta": {"profile": ["p"]}}
    out = row_to_resource(with_meta, 1, T0)
    assert out["meta"]["profile"] == ["p"] and with_meta["meta"] == {"profile": ["p"]}


# --------------------------------------------------------------------------- index use

N_PATIENTS = 100_000
N_OBSERVATIONS = 880_000
N_RISKS = 20_000  # one million resources in all

LOAD_SQL = [
    # Patients: identifier, gender, a profile (uri), lastUpdated spread out.
    f"""
    INSERT INTO resource (res_type, res_id, version, last_updated, content_hash, tokens)
    SELECT 'Patient', 'p' || i, 1, timestamptz '2020-01-01' + i * interval '1 minute',
           md5(jsonb_build_object('resourceType', 'Patient', 'id', 'p' || i)::text)::uuid,
           ARRAY['identifier:http://hospital/mrn|' || i, 'identifier:*|' || i,
                 'identifier:http://hospital/mrn|', 'identifier:',
                 'gender:|' || g, 'gender:',
                 '_profile:http://example.org/sd/patient-' || (i % 100), '_profile:']
    FROM generate_series(1, {N_PATIENTS}) AS i,
         LATERAL (SELECT CASE i % 2 WHEN 0 THEN 'male' ELSE 'female' END AS g) x
    """,
    f"""
    INSERT INTO resource_date (res_type, res_id, param, lo, hi)
    SELECT 'Patient', 'p' || i, 'birthdate', d, d + interval '1 day' - interval '1 microsecond'
    FROM generate_series(1, {N_PATIENTS}) AS i,
         LATERAL (SELECT timestamptz '1930-01-01' + (i * 7919 % 30000) * interval '1 day'
                  AS d) x
    """,
    # Observations: subject/patient references, 50 codes, effective dates, a weight.
    f"""
    INSERT INTO resource (res_type, res_id, version, last_updated, content_hash, tokens)
    SELECT 'Observation', 'o' || i, 1, timestamptz '2021-01-01' + i * interval '1 minute',
           md5(jsonb_build_object('resourceType', 'Observation', 'id', 'o' || i)::text)::uuid,
           ARRAY['subject:Patient/p' || p, 'subject:p' || p, 'subject:',
                 'patient:Patient/p' || p, 'patient:p' || p, 'patient:',
                 'code:http://loinc.org|' || c, 'code:*|' || c, 'code:http://loinc.org|',
                 'code:', 'status:|final', 'status:']
    FROM generate_series(1, {N_OBSERVATIONS}) AS i,
         LATERAL (SELECT i % {N_PATIENTS} + 1 AS p, 'c' || (i % 50) AS c) x
    """,
    f"""
    INSERT INTO resource_date (res_type, res_id, param, lo, hi)
    SELECT 'Observation', 'o' || i, 'date', d, d + interval '999999 microseconds'
    FROM generate_series(1, {N_OBSERVATIONS}) AS i,
         LATERAL (SELECT timestamptz '2000-01-01'
                         + (i::bigint * 104729 % 700000) * interval '7 minutes' AS d) x
    """,
    f"""
    INSERT INTO resource_number (res_type, res_id, param, system, code, lo, hi)
    SELECT 'Observation', 'o' || i, 'value-quantity', 'http://unitsofmeasure.org', 'kg', v, v
    FROM generate_series(1, {N_OBSERVATIONS}) AS i,
         LATERAL (SELECT (i * 7 % 20000) / 100.0 AS v) x
    """,
    # Risk assessments: a probability (a number parameter).
    f"""
    INSERT INTO resource (res_type, res_id, version, last_updated, content_hash, tokens)
    SELECT 'RiskAssessment', 'r' || i, 1, timestamptz '2022-01-01' + i * interval '1 minute',
           md5(jsonb_build_object('resourceType', 'RiskAssessment', 'id', 'r' || i)::text)::uuid,
           ARRAY['status:|final', 'status:']
    FROM generate_series(1, {N_RISKS}) AS i
    """,
    f"""
    INSERT INTO resource_number (res_type, res_id, param, system, code, lo, hi)
    SELECT 'RiskAssessment', 'r' || i, 'probability', '', '', v, v
    FROM generate_series(1, {N_RISKS}) AS i, LATERAL (SELECT (i % 1000) / 1000.0 AS v) x
    """,
    f"""
    INSERT INTO resource_string (res_type, res_id, param, value)
    SELECT 'Patient', 'p' || i, param, value
    FROM generate_series(1, {N_PATIENTS}) AS i,
         LATERAL (SELECT substr(md5(i::text), 1, 8) AS fam,
                         substr(md5((-i)::text), 1, 6) AS giv) n,
         LATERAL (VALUES ('family', fam), ('name', fam), ('given', giv), ('name', giv))
                 AS v(param, value)
    """,
    # Content (in history) only where a test reads it back: every Patient and RiskAssessment
    # and the Observations of p77; the plans do not depend on it.
    f"""
    INSERT INTO resource_history (res_type, res_id, version, last_updated, deleted, method, content)
    SELECT res_type, res_id, version, last_updated, false, 'POST',
           jsonb_build_object('resourceType', res_type, 'id', res_id)
    FROM resource
    WHERE res_type <> 'Observation' OR substr(res_id, 2)::int % {N_PATIENTS} + 1 = 77
    """,
]
INDEXED_TABLES = (
    "resource", "resource_history", "resource_string", "resource_date", "resource_number",
)

INDEXED_QUERIES = [
    ("token: identifier", "Patient", [("identifier", "http://hospital/mrn|4242")]),
    ("token: identifier without system", "Patient", [("identifier", "4242")]),
    ("token: gender", "Patient", [("gender", "male")]),
    ("token: code", "Observation", [("code", "http://loinc.org|c27")]),
    ("reference: subject", "Observation", [("subject", "Patient/p77")]),
    ("reference and token", "Observation", [("patient", "p77"), ("code", "c27")]),
    ("string: name prefix", "Patient", [("name", "ab")]),
    ("string: family prefix", "Patient", [("family", "abc1")]),
    ("string: exact", "Patient", [("family:exact", "abc1")]),
    ("date: birthdate range", "Patient",
     [("birthdate", "ge1970-01-01"), ("birthdate", "lt1970-03-01")]),
    ("date: birthdate eq", "Patient", [("birthdate", "1970-02")]),
    ("date: Observation date", "Observation", [("date", "2003-05-06")]),
    ("date: _lastUpdated", "Patient", [("_lastUpdated", "gt2020-01-10T00:00:00Z")]),
    ("number: probability", "RiskAssessment", [("probability", "gt0.998")]),
    ("number: eq", "RiskAssessment", [("probability", "0.5")]),
    ("quantity", "Observation", [("value-quantity", "gt199.9|http://unitsofmeasure.org|kg")]),
    ("quantity: eq, any unit", "Observation", [("value-quantity", "100.5")]),
    ("uri: _profile", "Patient", [("_profile", "http://example.org/sd/patient-42")]),
    ("_id", "Observation", [("_id", "o5,o6")]),
    # The result side: sort keys, keyset pages and includes.
    ("_sort by criteria", "Observation", [("subject", "Patient/p77"), ("_sort", "-date,code")]),
    ("_sort, no criteria", "Patient", [("_sort", "-_lastUpdated"), ("_total", "none")]),
    ("_sort by a date, no criteria", "Observation", [("_sort", "-date"), ("_total", "none")]),
    ("_sort by a quantity, no criteria", "Observation",
     [("_sort", "value-quantity"), ("_total", "none")]),
    ("_sort by a string, no criteria", "Patient", [("_sort", "-family"), ("_total", "none")]),
    ("_include", "Observation", [("patient", "p77"), ("_include", "Observation:subject")]),
    ("_revinclude", "Patient", [("_id", "p77,p78"), ("_revinclude", "Observation:subject")]),
    ("_include:iterate", "Observation", [("code", "c3"), ("_count", "10"),
                                         ("_include", "Observation:patient"),
                                         ("_revinclude:iterate", "Observation:subject")]),
    ("chain", "Observation", [("subject:Patient.identifier", "http://hospital/mrn|77")]),
    ("_has", "Patient", [("_has:Observation:patient:_id", "o77")]),
]


@pytest.fixture
def big_store(conn: Connection) -> Connection:
    """One million resources, loaded in SQL. The secondary indexes are dropped for the load
    and built again after it (the transaction is rolled back after the test, which brings
    them back anyway): building an index is several times faster than maintaining it row by
    row."""
    started = time.perf_counter()
    conn.execute(text("SET LOCAL maintenance_work_mem = '256MB'"))
    indexes = conn.execute(text(
        "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = ANY(:t)"
        " AND indexname NOT IN (SELECT conname FROM pg_constraint)"
    ), {"t": list(INDEXED_TABLES)}).all()
    for name, _ in indexes:
        conn.execute(text(f'DROP INDEX "{name}"'))
    for sql in LOAD_SQL:
        conn.execute(text(sql))
    for _, definition in indexes:
        # A partitioned table's index reads `ON ONLY` (the parent alone): build it on every
        # partition too.
        conn.execute(text(definition.replace(" ON ONLY ", " ON ", 1)))
    for table in INDEXED_TABLES:
        conn.execute(text(f"ANALYZE {table}"))
    elapsed = time.perf_counter() - started
    print(f"big_store: {N_PATIENTS + N_OBSERVATIONS + N_RISKS:,} resources in {elapsed:.0f} s")
    assert elapsed < 240
    return conn


def short(plan: str) -> str:
    """A plan with its long array literals elided, for readable failure messages."""
    return re.sub(r"'\{[^}]{80,}\}'", "'{...}'", plan)


def assert_index_backed(plan: str, label: str) -> None:
    # A partition of a few rows (another type's, reached by a join on the partition key and
    # pruned at run time) is rightly read whole: only a scan that costs something counts.
    scans = [line for line in plan.splitlines() if "Seq Scan" in line
             and float(re.search(r"cost=[\d.]+\.\.([\d.]+)", line).group(1)) > 10]  # type: ignore[union-attr]
    assert not scans, f"{label}\n{short(plan)}"
    assert "Index Scan" in plan or "Index Only Scan" in plan, f"{label}\n{short(plan)}"


def test_queries_are_index_backed(big_store: Connection) -> None:
    for label, resource_type, params in INDEXED_QUERIES:
        assert_index_backed(explain(big_store, resource_type, params), f"{label}: {params}")
    # A sort without criteria walks the sort key's index instead of sorting the type.
    plan = explain(big_store, "Patient", [("_sort", "-_lastUpdated"), ("_total", "none")])
    assert "ix_resource_type_updated" in plan, short(plan)
    plan = explain(big_store, "Observation", [("_sort", "-date"), ("_total", "none")])
    assert "Index Only Scan Backward using ix_date_hi" in plan, short(plan)
    youngest = search(big_store, "Patient", [("_sort", "-birthdate"), ("_count", "3")],
                      base_url=BASE)
    assert len(youngest["entry"]) == 3 and youngest["total"] == N_PATIENTS
    starts = big_store.execute(text(
        "SELECT res_id FROM resource_date WHERE res_type = 'Patient' AND param = 'birthdate'"
        " ORDER BY hi DESC, res_id LIMIT 3")).scalars().all()
    assert [e["resource"]["id"] for e in youngest["entry"]] == starts
    # And they answer something sensible on that data.
    hit = search(big_store, "Patient", [("identifier", "http://hospital/mrn|4242")], base_url=BASE)
    assert ids(hit) == {"p4242"}
    by_subject = search(big_store, "Observation", [("subject", "Patient/p77")], base_url=BASE)
    assert by_subject["total"] == sum(
        1 for i in range(1, N_OBSERVATIONS + 1) if i % N_PATIENTS + 1 == 77)
    heavy = search(big_store, "Observation",
                   [("value-quantity", "gt199.9|http://unitsofmeasure.org|kg"), ("_count", "0")],
                   base_url=BASE)
    assert heavy["total"] == sum(1 for i in range(1, N_OBSERVATIONS + 1) if i * 7 % 20000 > 19990)
    likely = search(big_store, "RiskAssessment", [("probability", "ge0.998")], base_url=BASE)
    assert likely["total"] == 2 * N_RISKS // 1000

    # find_ids_many: one statement for 500 conditions, GIN-probed.
    queries = [[("identifier", f"http://hospital/mrn|{i}")] for i in range(1, 1001, 2)]
    queries.append([("identifier", "http://hospital/mrn|nope")])
    statements: list[tuple[str, Any]] = []

    def record(conn, cursor, statement, parameters, context, executemany):  # noqa: ARG001
        statements.append((statement, parameters))

    event.listen(big_store, "before_cursor_execute", record)
    try:
        found = find_ids_many(big_store, "Patient", queries)
    finally:
        event.remove(big_store, "before_cursor_execute", record)
    assert len(statements) == 1
    assert found[:3] == [["p1"], ["p3"], ["p5"]] and found[-1] == []
    statement, parameters = statements[0]
    plan = "\n".join(r[0] for r in big_store.exec_driver_sql("EXPLAIN " + statement, parameters))
    assert_index_backed(plan, "find_ids_many")
    assert "ix_resource_tokens" in plan, short(plan)


def test_extract_index_speed_on_synthea() -> None:
    """Not a timing assertion beyond a generous bound: prints µs per resource for the report."""
    folder = Path(__file__).resolve().parents[2] / "shared" / "data" / "synthea"
    files = sorted(folder.glob("*.json"))[:3] if folder.exists() else []
    if not files:
        pytest.skip("Synthea sample bundles not present")
    resources = [e["resource"] for f in files for e in json.loads(f.read_text())["entry"]]
    started = time.perf_counter()
    for res in resources:
        extract_index(res)
    per = (time.perf_counter() - started) / len(resources) * 1e6
    print(f"extract_index: {per:.1f} µs per Synthea resource ({len(resources)} resources)")
    assert per < 500
