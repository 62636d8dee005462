"""Every kind of search parameter, its modifiers and prefixes, on real PostgreSQL: a Synthea
patient's resources as the writer stores them (placeholders resolved, every index table
filled by `extract_index`), checked against answers computed here from the same JSON."""

from __future__ import annotations

import os
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import Engine, text

from bench.baseline import resolve_placeholders
from core.errors import BadRequest
from core.fhir.search import find_ids, search
from core.fhir.search_index import date_range, extract_index
from core.store.reindex import reindex
from core.store.repository import WriteRow, write_resources

DATA = Path(os.environ.get("FHIRQ_SYNTHEA_DIR", Path(__file__).parents[2] / "shared/data/synthea"))
BUNDLE = "Assunta351_Dickens475_3d195286-ce77-f5b3-b64f-3eacfb9c273e.json"
BASE = "http://fhirq.test/fhir"
UCUM = "http://unitsofmeasure.org"
US_CORE = "http://hl7.org/fhir/us/core/StructureDefinition/"

pytestmark = pytest.mark.skipif(not (DATA / BUNDLE).is_file(), reason="Synthea data not present")

# Resources the Synthea patient does not have, for the number, uri and a few other cases.
EXTRA: list[dict[str, Any]] = [
    {"resourceType": "RiskAssessment", "id": "risk1", "status": "final",
     "prediction": [{"probabilityDecimal": 0.25}, {"probabilityDecimal": 0.8}]},
    {"resourceType": "RiskAssessment", "id": "risk2", "status": "final",
     "prediction": [{"probabilityDecimal": 0.5}]},
    {"resourceType": "RiskAssessment", "id": "risk3", "status": "final",
     "prediction": [{"probabilityRange": {"low": {"value": 0.1}}}]},  # a Range: not indexed
    {"resourceType": "ValueSet", "id": "vs1", "status": "active",
     "url": "http://acme.org/fhir/ValueSet/colours", "version": "2"},
    {"resourceType": "ValueSet", "id": "vs2", "status": "draft",
     "url": "http://acme.org/fhir/ValueSet/colours/warm"},
    {"resourceType": "ValueSet", "id": "vs3", "status": "active",
     "url": "urn:oid:1.2.3"},
    {"resourceType": "Observation", "id": "range-obs", "status": "final",
     "code": {"coding": [{"system": "http://loinc.org", "code": "x"}], "text": "Größe"},
     "valueRange": {"low": {"value": 5, "unit": "mg"}, "high": {"value": 9, "unit": "mg"}},
     "component": [{"code": {"text": "c"}, "valueQuantity": {"value": 120, "system": UCUM,
                                                              "code": "mm[Hg]", "unit": "mmHg"}}]},
]


@pytest.fixture(scope="module")
def store(engine: Engine) -> Iterator[dict[str, Any]]:
    """The patient's resources written once for the module (and removed after it)."""
    entries = orjson.loads((DATA / BUNDLE).read_bytes())["entry"]
    resources = resolve_placeholders(entries) + EXTRA
    with engine.begin() as c:
        c.execute(text("TRUNCATE resource, resource_history, resource_string, resource_date,"
                       " resource_number"))
        for start in range(0, len(resources), 200):
            write_resources(c, [
                WriteRow((r["resourceType"], r["id"]), r, "PUT", extract_index(r))
                for r in resources[start:start + 200]
            ])
    by_type: dict[str, list[dict[str, Any]]] = {}
    for r in resources:
        by_type.setdefault(r["resourceType"], []).append(r)
    yield {"engine": engine, "by_type": by_type}
    with engine.begin() as c:
        c.execute(text("TRUNCATE resource, resource_history, resource_string, resource_date,"
                       " resource_number"))


def found(store: dict[str, Any], rtype: str, params: list[tuple[str, str]]) -> set[str]:
    with store["engine"].connect() as c:
        bundle = search(c, rtype, [*params, ("_count", "1000")], base_url=BASE)
        ids = {e["resource"]["id"] for e in bundle.get("entry", ())
               if e["search"]["mode"] == "match"}
        assert bundle.get("total", len(ids)) == len(ids)
        if ids:  # the same criteria answer conditional operations
            assert set(find_ids(c, rtype, params, limit=len(ids) + 1)) == ids
    return ids


def where(store: dict[str, Any], rtype: str, test: Any) -> set[str]:
    return {r["id"] for r in store["by_type"].get(rtype, ()) if test(r)}


def quantity(r: dict[str, Any]) -> tuple[Decimal, str] | None:
    q = r.get("valueQuantity")
    return (Decimal(repr(q["value"])), q.get("code", "")) if q else None


# --------------------------------------------------------------------------- token


def test_token(store: dict[str, Any]) -> None:
    obs = store["by_type"]["Observation"]
    code = obs[0]["code"]["coding"][0]
    same = where(store, "Observation",
                 lambda r: any(c.get("code") == code["code"] for c in r["code"]["coding"]))
    assert same and found(store, "Observation", [("code", f"{code['system']}|{code['code']}")]) \
        == same
    assert found(store, "Observation", [("code", code["code"])]) == same
    assert found(store, "Observation", [("code", f"|{code['code']}")]) == set()  # has a system
    loinc = where(store, "Observation", lambda r: any(
        c.get("system") == "http://loinc.org" for c in r["code"]["coding"]))
    assert found(store, "Observation", [("code", "http://loinc.org|")]) == loinc
    everything = where(store, "Observation", lambda r: True)
    assert found(store, "Observation", [("code:not", code["code"])]) == everything - same
    # combo-code reads both code and component.code.
    assert found(store, "Observation", [("combo-code", "c")]) == set()
    assert "range-obs" in found(store, "Observation", [("combo-code", "x")])
    # :text: the start of CodeableConcept.text or a Coding's display, any case.
    text_of = obs[0]["code"]["text"]
    by_text = where(store, "Observation", lambda r: r["code"].get("text", "").lower().startswith(
        text_of[:3].lower()) or any(c.get("display", "").lower().startswith(text_of[:3].lower())
                                    for c in r["code"]["coding"]))
    assert found(store, "Observation", [("code:text", text_of[:3].upper())]) == by_text
    assert found(store, "Observation", [("code:text", "größ")]) == {"range-obs"}
    # Patient gender (a code), telecom (ContactPoint value), Resource-level _tag absent.
    (patient,) = store["by_type"]["Patient"]
    assert found(store, "Patient", [("gender", patient["gender"])]) == {patient["id"]}
    phone = patient["telecom"][0]["value"]
    assert found(store, "Patient", [("phone", phone)]) == {patient["id"]}
    assert found(store, "Patient", [("email", phone)]) == set()  # where(system='email')
    assert found(store, "Patient", [("_tag:missing", "true")]) == {patient["id"]}
    assert found(store, "Immunization", [("vaccine-code:missing", "false")]) == where(
        store, "Immunization", lambda r: True)


# --------------------------------------------------------------------------- reference


def test_reference(store: dict[str, Any]) -> None:
    (patient,) = store["by_type"]["Patient"]
    pid = patient["id"]
    mine = where(store, "Observation",
                 lambda r: r.get("subject", {}).get("reference") == f"Patient/{pid}")
    assert mine
    assert found(store, "Observation", [("subject", f"Patient/{pid}")]) == mine
    assert found(store, "Observation", [("subject", pid)]) == mine
    assert found(store, "Observation", [("subject:Patient", pid)]) == mine
    assert found(store, "Observation", [("patient", pid)]) == mine
    assert found(store, "Observation", [("subject", f"{BASE}/Patient/{pid}")]) == mine
    # Another server's URL is not a reference to ours (only an absolute one stored as such).
    with store["engine"].connect() as c:
        other = search(c, "Observation", [("subject", f"http://elsewhere.org/fhir/Patient/{pid}")],
                       base_url=BASE)
    assert "entry" not in other
    assert found(store, "Observation", [("subject:Group", pid)]) == set()
    enc = store["by_type"]["Encounter"][0]["id"]
    assert found(store, "Observation", [("encounter", f"Encounter/{enc}")]) == where(
        store, "Observation", lambda r: r.get("encounter", {}).get("reference")
        == f"Encounter/{enc}")
    assert found(store, "Observation", [("subject:missing", "true")]) == {"range-obs"}
    with pytest.raises(BadRequest):  # Observation.encounter never refers to a Patient
        found(store, "Observation", [("encounter:Patient", pid)])
    # A logical reference: Synthea's Encounter.participant.individual is resolved here, its
    # serviceProvider a conditional reference by identifier that the writer left as it is.
    npi = [r for r in store["by_type"]["Encounter"] if "identifier" in
           r.get("serviceProvider", {})]
    if npi:
        ident = npi[0]["serviceProvider"]["identifier"]
        assert npi[0]["id"] in found(store, "Encounter", [
            ("service-provider:identifier", f"{ident['system']}|{ident['value']}")])


# --------------------------------------------------------------------------- string


def test_string(store: dict[str, Any]) -> None:
    (patient,) = store["by_type"]["Patient"]
    pid = {patient["id"]}
    family = patient["name"][0]["family"]
    given = patient["name"][0]["given"][0]
    assert found(store, "Patient", [("family", family[:3].lower())]) == pid
    assert found(store, "Patient", [("name", given[:4].upper())]) == pid  # any part
    assert found(store, "Patient", [("given", family)]) == set()
    assert found(store, "Patient", [("family:exact", family)]) == pid
    assert found(store, "Patient", [("family:exact", family.lower())]) == set()
    assert found(store, "Patient", [("family:contains", family[2:5])]) == pid
    assert found(store, "Patient", [("family:contains", "zzz")]) == set()
    city = patient["address"][0]["city"]
    assert found(store, "Patient", [("address-city", city[:4])]) == pid
    assert found(store, "Patient", [("address", city)]) == pid  # an Address reaches its city
    assert found(store, "Patient", [("address:exact", city)]) == pid
    assert found(store, "Patient", [("phonetic", family[:3])]) == pid  # shares `name` rows
    assert found(store, "Patient", [("address-state:missing", "false")]) == pid
    assert found(store, "Observation", [("value-string:missing", "false")]) == where(
        store, "Observation", lambda r: "valueString" in r or "text" in r.get(
            "valueCodeableConcept", {}))


# --------------------------------------------------------------------------- date


def _in(r: dict[str, Any], key: str) -> tuple[Any, Any] | None:
    v = r.get(key)
    return date_range(v) if isinstance(v, str) else None


def test_date(store: dict[str, Any]) -> None:
    obs = [(r["id"], _in(r, "effectiveDateTime")) for r in store["by_type"]["Observation"]]
    obs = [(i, rng) for i, rng in obs if rng]
    day = obs[0][1][0].date().isoformat()
    on_day = {i for i, (lo, _) in obs if lo.date().isoformat() == day}
    assert found(store, "Observation", [("date", day)]) == on_day
    assert found(store, "Observation", [("date", f"eq{day}")]) == on_day
    year = day[:4]
    in_year = {i for i, (lo, _) in obs if str(lo.year) == year}
    assert found(store, "Observation", [("date", year)]) == in_year
    after = {i for i, (lo, _) in obs if str(lo.year) > year}
    before = {i for i, (lo, _) in obs if str(lo.year) < year}
    assert found(store, "Observation", [("date", f"gt{year}")]) == after
    assert found(store, "Observation", [("date", f"sa{year}")]) == after
    assert found(store, "Observation", [("date", f"lt{year}")]) == before
    assert found(store, "Observation", [("date", f"eb{year}")]) == before
    assert found(store, "Observation", [("date", f"ge{year}")]) == after | in_year
    assert found(store, "Observation", [("date", f"le{year}")]) == before | in_year
    assert found(store, "Observation", [("date", f"ne{year}")]) == after | before
    assert found(store, "Observation", [("date", f"ge{year}"), ("date", f"le{year}")]) == in_year
    assert on_day <= found(store, "Observation", [("date", f"ap{day}")])
    # A Period: an Encounter on its day; `date` on Encounter is its period.
    enc = store["by_type"]["Encounter"][0]
    start = enc["period"]["start"][:10]
    assert enc["id"] in found(store, "Encounter", [("date", f"ge{start}")])
    assert enc["id"] not in found(store, "Encounter", [("date", f"lt{start}")])
    # Two date parameters of one type are kept apart.
    (cond,) = store["by_type"]["Condition"]
    onset = cond["onsetDateTime"][:10]
    assert found(store, "Condition", [("onset-date", onset)]) == {cond["id"]}
    assert found(store, "Condition", [("abatement-date", onset)]) == set()
    assert found(store, "Condition", [("abatement-date:missing", "true")]) == (
        set() if "abatementDateTime" in cond else {cond["id"]})
    (patient,) = store["by_type"]["Patient"]
    assert found(store, "Patient", [("birthdate", patient["birthDate"])]) == {patient["id"]}


# --------------------------------------------------------------------------- number


def test_number(store: dict[str, Any]) -> None:
    assert found(store, "RiskAssessment", [("probability", "0.5")]) == {"risk2"}
    assert found(store, "RiskAssessment", [("probability", "0.50")]) == {"risk2"}
    # `0.3` stands for [0.25, 0.35): 0.25 is in, `0.30` ([0.295, 0.305)) is not.
    assert found(store, "RiskAssessment", [("probability", "0.3")]) == {"risk1"}
    assert found(store, "RiskAssessment", [("probability", "0.30")]) == set()
    assert found(store, "RiskAssessment", [("probability", "gt0.6")]) == {"risk1"}
    assert found(store, "RiskAssessment", [("probability", "lt0.3")]) == {"risk1"}
    assert found(store, "RiskAssessment", [("probability", "ge0.5")]) == {"risk1", "risk2"}
    assert found(store, "RiskAssessment", [("probability", "le0.5")]) == {"risk1", "risk2"}
    assert found(store, "RiskAssessment", [("probability", "ne0.5")]) == {"risk1"}
    assert found(store, "RiskAssessment", [("probability", "sa0.4")]) == {"risk1", "risk2"}
    assert found(store, "RiskAssessment", [("probability", "eb0.3")]) == {"risk1"}
    assert found(store, "RiskAssessment", [("probability", "ap0.52")]) == {"risk2"}
    # `5e-1` is 0.5 with one significant digit: [0.45, 0.55).
    assert found(store, "RiskAssessment", [("probability", "5e-1")]) == {"risk2"}
    assert found(store, "RiskAssessment", [("probability", "0.25,0.8"),
                                           ("probability", "gt0.7")]) == {"risk1"}
    assert found(store, "RiskAssessment", [("probability:missing", "true")]) == {"risk3"}


# --------------------------------------------------------------------------- quantity


def test_quantity(store: dict[str, Any]) -> None:
    values = {r["id"]: quantity(r) for r in store["by_type"]["Observation"] if quantity(r)}
    kg = {i: v for i, (v, code) in values.items() if code == "kg"}
    some, value = next(iter(kg.items()))
    assert found(store, "Observation", [("value-quantity", str(value))]) >= {some}
    # The precision of the value as written: 63.877 matches 63.88, 63.9 and 64.
    for shorter in (f"{value:.2f}", f"{value:.1f}", f"{value:.0f}"):
        lo = Decimal(shorter) - Decimal(5).scaleb(Decimal(shorter).as_tuple().exponent - 1)
        hi = Decimal(shorter) + Decimal(5).scaleb(Decimal(shorter).as_tuple().exponent - 1)
        expected = {i for i, (v, _) in values.items() if lo <= v < hi}
        assert found(store, "Observation", [("value-quantity", shorter)]) == expected
    heavy = {i for i, v in kg.items() if v > 60}
    assert found(store, "Observation", [("value-quantity", f"gt60|{UCUM}|kg")]) == heavy
    assert found(store, "Observation", [("value-quantity", "gt60||kg")]) == heavy
    assert found(store, "Observation", [("value-quantity", f"gt60|{UCUM}|g")]) == set()
    assert found(store, "Observation", [("value-quantity", "le60||kg")]) == {
        i for i, v in kg.items() if v <= 60}
    # A unit that differs from the code is found as `value||unit`.
    assert found(store, "Observation", [("component-value-quantity", "120||mmHg")]) == {
        "range-obs"}
    assert found(store, "Observation", [("component-value-quantity", f"120|{UCUM}|mm[Hg]")]) \
        == {"range-obs"}
    assert "range-obs" in found(store, "Observation", [("combo-value-quantity", "120")])
    assert found(store, "Observation", [("value-quantity:missing", "true")]) == where(
        store, "Observation", lambda r: "valueQuantity" not in r)


# --------------------------------------------------------------------------- uri


def test_uri(store: dict[str, Any]) -> None:
    (patient,) = store["by_type"]["Patient"]
    profile = patient["meta"]["profile"][0]
    assert profile.startswith(US_CORE)
    assert found(store, "Patient", [("_profile", profile)]) == {patient["id"]}
    assert found(store, "Patient", [("_profile:below", US_CORE)]) == {patient["id"]}
    assert found(store, "Patient", [("_profile:below", "http://hl7.org/fhir/us/core%")]) == set()
    assert found(store, "ValueSet", [("url", "http://acme.org/fhir/ValueSet/colours")]) == {"vs1"}
    assert found(store, "ValueSet", [("url:below", "http://acme.org/fhir/ValueSet/colours")]) \
        == {"vs1", "vs2"}
    assert found(store, "ValueSet", [("url:above", "http://acme.org/fhir/ValueSet/colours/warm/x")
                                     ]) == {"vs1", "vs2"}
    assert found(store, "ValueSet", [("url", "urn:oid:1.2.3")]) == {"vs3"}
    assert found(store, "ValueSet", [("url:missing", "false")]) == {"vs1", "vs2", "vs3"}


# --------------------------------------------------------------------------- strictness


def test_unsupported_parameters(store: dict[str, Any]) -> None:
    with store["engine"].connect() as c:
        bundle = search(c, "Observation", [("code-value-quantity", "x$1"), ("status", "final")],
                        base_url=BASE)
        outcome = [e for e in bundle["entry"] if e["search"]["mode"] == "outcome"]
        assert "code-value-quantity" in outcome[0]["resource"]["issue"][0]["diagnostics"]
        with pytest.raises(BadRequest) as info:
            search(c, "Observation", [("code-value-quantity", "x$1")], base_url=BASE,
                   strict=True)
        assert info.value.code == "not-supported"
        assert "composite" in info.value.diagnostics
        with pytest.raises(BadRequest):  # conditional operations are strict
            find_ids(c, "Patient", [("deceased", "true")])


def test_reindex_restores_a_lost_index(store: dict[str, Any]) -> None:
    engine = store["engine"]
    (patient,) = store["by_type"]["Patient"]
    before = found(store, "Observation", [("value-quantity", "gt60||kg")])
    with engine.begin() as c:
        c.execute(text("UPDATE resource SET tokens = '{}'"))
        for table in ("resource_string", "resource_date", "resource_number"):
            c.execute(text(f"DELETE FROM {table}"))
    assert found(store, "Patient", [("family", patient["name"][0]["family"])]) == set()
    seen: list[int] = []
    total = reindex(engine, batch=100, progress=lambda n, _: seen.append(n))
    assert total == sum(len(v) for v in store["by_type"].values())
    assert seen == sorted(seen) and len(seen) == -(-total // 100)
    assert found(store, "Patient", [("family", patient["name"][0]["family"])]) == {patient["id"]}
    assert found(store, "Observation", [("value-quantity", "gt60||kg")]) == before


def test_prefer_handling_strict_over_http(client: Any) -> None:
    lenient = client.get("/fhir/Patient?foo=1")
    assert lenient.status_code == 200
    assert any(e["search"]["mode"] == "outcome" for e in lenient.json.get("entry", ()))
    strict = client.get("/fhir/Patient?foo=1", headers={"Prefer": "handling=strict"})
    assert strict.status_code == 400
    assert strict.json["issue"][0]["code"] == "not-supported"
    assert "foo" in strict.json["issue"][0]["diagnostics"]
