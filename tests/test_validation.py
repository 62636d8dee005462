"""Structural validation, the FHIR id rule, R4 types and JSON-bomb limits (no database but in
the last tests, which send invalid resources through the API)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import orjson
import pytest
from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from core.errors import BadRequest, FhirError
from core.fhir.outcome import from_error
from core.fhir.validation import (
    R4_RESOURCE_TYPES,
    RawDepthScanner,
    _binding_check,
    _validator,
    check_json_limits,
    check_raw_depth,
    element_repeats,
    is_valid_id,
    known_resource_type,
    preload_validators,
    validate_resource,
)
from tests.builders import post, send, transaction

SYNTHEA = Path(
    os.environ.get("FHIRQ_SYNTHEA_DIR", Path(__file__).resolve().parents[2] / "shared/data/synthea")
)


def _error(resource: Any, **kwargs: Any) -> FhirError:
    with pytest.raises(FhirError) as caught:
        validate_resource(resource, **kwargs)
    return caught.value


CONDITION_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"


def obs(**extra: Any) -> dict[str, Any]:
    return {"resourceType": "Observation", "status": "final", "code": {"text": "x"}, **extra}


# --------------------------------------------------------------------------------------------
# Ids and types
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "ok"), [
    ("a", True),
    ("Patient-1.2", True),
    ("0" * 64, True),
    ("0" * 65, False),
    ("", False),
    ("a b", False),
    ("a_b", False),
    ("a/b", False),
    ("é", False),
    ("abc\n", False),
])
def test_id_rule(value: str, ok: bool) -> None:
    assert is_valid_id(value) is ok


@pytest.mark.parametrize(("name", "ok"), [
    ("Patient", True),
    ("Observation", True),
    ("Bundle", True),
    ("Binary", True),
    ("Parameters", True),
    ("Slot", True),
    ("MedicinalProduct", True),  # R4 only (R4B removed it)
    ("EffectEvidenceSynthesis", True),
    ("SubscriptionTopic", False),  # R4B only
    ("MedicinalProductDefinition", False),
    ("Resource", False),  # abstract
    ("DomainResource", False),
    ("patient", False),
    ("Foo", False),
    ("", False),
])
def test_known_resource_type(name: str, ok: bool) -> None:
    assert known_resource_type(name) is ok


# Concrete R4B types that R4 does not have (R4B release notes).
R4B_ONLY = {
    "AdministrableProductDefinition", "Citation", "ClinicalUseDefinition", "EvidenceReport",
    "Ingredient", "ManufacturedItemDefinition", "MedicinalProductDefinition", "NutritionProduct",
    "PackagedProductDefinition", "RegulatedAuthorization", "SubscriptionStatus",
    "SubscriptionTopic", "SubstanceDefinition",
}


# R4 types that R4B removed (replaced by MedicinalProductDefinition, SubstanceDefinition, ...).
R4_ONLY = {
    "EffectEvidenceSynthesis", "MedicinalProduct", "MedicinalProductAuthorization",
    "MedicinalProductContraindication", "MedicinalProductIndication",
    "MedicinalProductIngredient", "MedicinalProductInteraction", "MedicinalProductManufactured",
    "MedicinalProductPackaged", "MedicinalProductPharmaceutical",
    "MedicinalProductUndesirableEffect", "RiskEvidenceSynthesis", "SubstanceNucleicAcid",
    "SubstancePolymer", "SubstanceProtein", "SubstanceReferenceInformation",
    "SubstanceSourceMaterial", "SubstanceSpecification",
}


def test_r4_types_are_the_library_r4b_types_adjusted() -> None:
    # Two independent sources agree: HL7's R4 definitions (our tables) and the R4B release
    # (the fhir.resources library) with R4B's additions and removals undone.
    import importlib
    import pkgutil

    import fhir.resources.R4B as r4b
    from fhir.resources.R4B.resource import Resource

    library = set()
    for module in pkgutil.iter_modules(r4b.__path__):
        loaded = importlib.import_module(f"fhir.resources.R4B.{module.name}")
        for name, value in vars(loaded).items():
            if (isinstance(value, type) and issubclass(value, Resource)
                    and value.__module__ == loaded.__name__
                    and value.get_resource_type() == name):
                library.add(name)
    library -= {"Resource", "DomainResource"}
    assert len(R4_RESOURCE_TYPES) == 146
    assert (library - R4B_ONLY) | R4_ONLY == R4_RESOURCE_TYPES
    assert not R4_ONLY & library


def test_every_r4_type_compiles_and_accepts_a_minimal_instance() -> None:
    preload_validators()
    assert all(_validator(rtype) for rtype in R4_RESOURCE_TYPES)
    assert all(_validator(rtype, complete=True) for rtype in ("Observation", "Bundle", "Claim"))
    validate_resource({"resourceType": "Basic", "code": {"text": "x"}})
    validate_resource({"resourceType": "Binary", "contentType": "text/plain", "data": "aGk="})
    validate_resource({"resourceType": "Parameters", "parameter": [{"name": "a",
                                                                    "valueInteger": 1}]})


@pytest.mark.parametrize(("rtype", "keys", "expected"), [
    ("Patient", ["name"], True),
    ("Patient", ["name", "family"], False),
    ("Patient", ["name", "given"], True),
    ("Patient", ["contact", "telecom"], True),
    ("Patient", ["birthDate"], False),
    ("Patient", ["deceasedBoolean"], False),
    ("Patient", ["deceased"], None),
    ("Patient", ["nosuch"], None),
    ("Observation", ["component", "valueQuantity", "value"], False),
    ("MedicinalProduct", ["name"], True),  # R4 only
    ("MedicinalProduct", ["name", "productName"], False),
    ("SubscriptionTopic", ["url"], None),  # R4B only
])
def test_element_repeats(rtype: str, keys: list[str], expected: bool | None) -> None:
    assert element_repeats(rtype, keys) is expected


# --------------------------------------------------------------------------------------------
# validate_resource: what is rejected, with which code and where
# --------------------------------------------------------------------------------------------

INVALID: list[tuple[str, Any, dict[str, Any], str, list[str]]] = [
    # (case, resource, kwargs, code, expression)
    ("not an object", ["Patient"], {}, "structure", []),
    ("no resourceType", {"id": "a"}, {}, "required", ["Resource.resourceType"]),
    ("unknown type", {"resourceType": "Foo"}, {}, "not-supported", ["Resource.resourceType"]),
    ("R4B-only type", {"resourceType": "SubscriptionTopic"}, {}, "not-supported",
     ["Resource.resourceType"]),
    ("type differs from URL", {"resourceType": "Patient"}, {"expected_type": "Observation"},
     "invalid", ["Patient.resourceType"]),
    ("bad id", {"resourceType": "Patient", "id": "a b"}, {}, "value", ["Patient.id"]),
    ("id too long", {"resourceType": "Patient", "id": "x" * 65}, {}, "value", ["Patient.id"]),
    ("id differs from URL", {"resourceType": "Patient", "id": "a"}, {"expected_id": "b"},
     "invalid", ["Patient.id"]),
    ("id missing, URL has one", {"resourceType": "Patient"}, {"expected_id": "b"}, "required",
     ["Patient.id"]),
    ("id required", {"resourceType": "Patient"}, {"require_id": True}, "required",
     ["Patient.id"]),
    ("unknown element", {"resourceType": "Patient", "nickname": "x"}, {}, "structure",
     ["Patient.nickname"]),
    ("unknown nested element", {"resourceType": "Patient", "name": [{"given": ["a"]},
                                                                  {"first": "x"}]},
     {}, "structure", ["Patient.name[1].first"]),
    ("bad date", {"resourceType": "Patient", "birthDate": "1990-13-01"}, {}, "value",
     ["Patient.birthDate"]),
    ("not a calendar date", {"resourceType": "Patient", "birthDate": "2023-02-30"}, {}, "value",
     ["Patient.birthDate"]),
    ("dateTime without zone", obs(effectiveDateTime="2020-01-01T10:00:00"), {}, "value",
     ["Observation.effective"]),
    ("instant without time", {"resourceType": "Patient", "meta": {"lastUpdated": "2024-01-01"}},
     {}, "value", ["Patient.meta.lastUpdated"]),
    ("string for boolean", {"resourceType": "Patient", "active": "true"}, {}, "value",
     ["Patient.active"]),
    ("string for integer", {"resourceType": "Patient", "multipleBirthInteger": "3"}, {},
     "value", ["Patient.multipleBirth"]),
    ("bool for decimal", obs(valueQuantity={"value": True}), {}, "value",
     ["Observation.value.value"]),
    ("negative unsignedInt", {"resourceType": "Questionnaire", "status": "draft",
                              "item": [{"linkId": "1", "type": "string",
                                        "maxLength": 0.5}]}, {}, "value",
     ["Questionnaire.item[0].maxLength"]),
    ("null element", {"resourceType": "Patient", "gender": None}, {}, "value",
     ["Patient.gender"]),
    ("null in complex array", {"resourceType": "Patient", "name": [None]}, {}, "structure",
     ["Patient.name[0]"]),
    ("empty string", {"resourceType": "Patient", "gender": ""}, {}, "value", ["Patient.gender"]),
    ("object for array", {"resourceType": "Patient", "name": {"family": "x"}}, {}, "structure",
     ["Patient.name"]),
    ("array for object", {"resourceType": "Patient", "maritalStatus": [{"text": "x"}]}, {},
     "structure", ["Patient.maritalStatus"]),
    ("two types for value[x]", obs(valueString="a", valueBoolean=True), {}, "structure",
     ["Observation.value"]),
    ("missing required primitive", {"resourceType": "Observation", "code": {"text": "x"}}, {},
     "required", ["Observation.status"]),
    ("missing required complex", {"resourceType": "Observation", "status": "final"}, {},
     "required", ["Observation.code"]),
    ("extension without url", {"resourceType": "Patient", "extension": [{"valueString": "a"}]},
     {}, "required", ["Patient.extension[0].url"]),
    ("bad primitive extension", {"resourceType": "Patient", "_birthDate": {"extension": [
        {"url": "http://x", "valueString": "a", "valueCode": "b"}]}}, {}, "structure",
     ["Patient.birthDate.extension[0].value"]),
    ("bad contained resource", {"resourceType": "Patient", "contained": [
        {"resourceType": "Observation", "status": "final"}]}, {}, "required",
     ["Patient.contained[0].code"]),
    ("unknown contained type", {"resourceType": "Patient", "contained": [{"resourceType": "X"}]},
     {}, "structure", ["Patient.contained[0]"]),
    ("bad resource in a Bundle", {"resourceType": "Bundle", "type": "collection", "entry": [
        {"resource": {"resourceType": "Patient", "birthDate": "x"}}]}, {}, "value",
     ["Bundle.entry[0].resource.birthDate"]),
    ("R4-only type: base elements checked", {"resourceType": "MedicinalProduct",
                                             "name": [{"productName": "x"}],
                                             "meta": {"versionId": 1}}, {}, "value",
     ["MedicinalProduct.meta.versionId"]),
    ("R4-only type: unknown element", {"resourceType": "MedicinalProduct",
                                       "name": [{"productName": "x", "nickname": "y"}]}, {},
     "structure", ["MedicinalProduct.name[0].nickname"]),
    ("R4-only type: required element", {"resourceType": "MedicinalProduct", "name": [{}]}, {},
     "required", ["MedicinalProduct.name[0].productName"]),
    ("R4-only type: cardinality", {"resourceType": "SubstanceProtein",
                                   "sequenceType": [{"text": "x"}]}, {}, "structure",
     ["SubstanceProtein.sequenceType"]),
    ("R4 Evidence (R4B restructured it)", {"resourceType": "Evidence", "status": "draft",
                                           "exposureBackground": {"reference": "x"},
                                           "statistic": []}, {}, "structure",
     ["Evidence.statistic"]),
    ("R4 element R4B dropped from Evidence is still required",
     {"resourceType": "Evidence", "status": "draft"}, {}, "required",
     ["Evidence.exposureBackground"]),
    ("contained R4B-only type", {"resourceType": "Patient", "contained": [
        {"resourceType": "SubscriptionTopic"}]}, {}, "structure", ["Patient.contained[0]"]),
    ("code outside its required value set", {"resourceType": "Patient", "gender": "robot"}, {},
     "code-invalid", ["Patient.gender"]),
    ("code of a datatype outside its value set", obs(valueQuantity={"comparator": "=="}), {},
     "code-invalid", ["Observation.value.comparator"]),
    ("repeating code outside its value set", {
        "resourceType": "Patient", "name": [{"family": "x"}],
        "telecom": [{"system": "phone"}, {"system": "beeper"}]}, {}, "code-invalid",
     ["Patient.telecom[1].system"]),
    ("CodeableConcept coding of another system",
     {"resourceType": "Condition", "subject": {"reference": "Patient/1"},
      "clinicalStatus": {"coding": [{"system": "http://example.org", "code": "active"}]}}, {},
     "code-invalid", ["Condition.clinicalStatus"]),
    ("CodeableConcept with a wrong code",
     {"resourceType": "Condition", "subject": {"reference": "Patient/1"},
      "clinicalStatus": {"coding": [{"system": CONDITION_CLINICAL, "code": "sleeping"}]}}, {},
     "code-invalid", ["Condition.clinicalStatus"]),
    ("CodeableConcept with text only",
     {"resourceType": "Condition", "subject": {"reference": "Patient/1"},
      "clinicalStatus": {"text": "active"}}, {}, "code-invalid", ["Condition.clinicalStatus"]),
]


@pytest.mark.parametrize(("case", "resource", "kwargs", "code", "expression"), INVALID,
                         ids=[c[0] for c in INVALID])
def test_invalid_resources(case: str, resource: Any, kwargs: dict[str, Any], code: str,
                           expression: list[str]) -> None:
    err = _error(resource, **kwargs)
    assert isinstance(err, BadRequest)
    assert err.status == 400
    assert err.code == code
    assert err.expression == expression
    assert err.diagnostics


def test_expression_prefix_and_every_problem_listed() -> None:
    patient = {"resourceType": "Patient", "birthDate": "x", "gender": 1, "name": [{"foo": 1}]}
    err = _error(patient, expression="Bundle.entry[3].resource")
    assert sorted(err.expression) == [
        "Bundle.entry[3].resource.birthDate",
        "Bundle.entry[3].resource.gender",
        "Bundle.entry[3].resource.name[0].foo",
    ]
    assert "3 problems" in err.diagnostics
    assert "Bundle.entry[3].resource.name[0].foo: unknown element" in err.diagnostics


def test_error_diagnostics_cap_the_list() -> None:
    patient = {"resourceType": "Patient", **{f"x{i}": i for i in range(50)}}
    err = _error(patient)
    assert len(err.expression) == 50
    assert "and 30 more" in err.diagnostics


# Resources that break several rules at once: every failing element is reported, each as an
# OperationOutcome issue of its own, whichever check finds it (the typed structure, choice and
# required-primitive rules, the id rule).
SEVERAL: list[tuple[str, Any, dict[str, Any], list[tuple[str, str]]]] = [
    # (case, resource, kwargs, [(expression, code), ...] in the order reported)
    ("missing status and code", {"resourceType": "Observation"}, {},
     [("Observation.status", "required"), ("Observation.code", "required")]),
    ("two value types, no status, a bad reference",
     {"resourceType": "Observation", "code": {"text": "x"}, "valueString": "a",
      "valueInteger": 1, "subject": {"reference": 1}}, {},
     [("Observation.value", "structure"), ("Observation.status", "required"),
      ("Observation.subject.reference", "value")]),
    ("rules inside a repeating backbone element",
     obs(component=[{"code": {"text": "a"}}, {"valueString": "x", "valueInteger": 2}]), {},
     [("Observation.component[1].value", "structure"),
      ("Observation.component[1].code", "required")]),
    ("bad id and missing status", {"resourceType": "Observation", "id": "a b",
                                   "code": {"text": "x"}}, {},
     [("Observation.id", "value"), ("Observation.status", "required")]),
    ("id missing for the URL, unknown element",
     {"resourceType": "Patient", "nickname": "x"}, {"expected_id": "p1"},
     [("Patient.id", "required"), ("Patient.nickname", "structure")]),
    ("contained resource missing both",
     {"resourceType": "Patient", "contained": [{"resourceType": "Observation", "id": "o"}]}, {},
     [("Patient.contained[0].status", "required"), ("Patient.contained[0].code", "required")]),
]


@pytest.mark.parametrize(("case", "resource", "kwargs", "expected"), SEVERAL,
                         ids=[c[0] for c in SEVERAL])
def test_every_failing_element_is_an_issue(case: str, resource: Any, kwargs: dict[str, Any],
                                           expected: list[tuple[str, str]]) -> None:
    err = _error(resource, **kwargs)
    issues = from_error(err)["issue"]
    assert [(i["expression"], i["code"]) for i in issues] == [([e], c) for e, c in expected]
    assert all(i["severity"] == "error" and i["expression"][0] in i["diagnostics"]
               for i in issues)
    assert err.expression == [e for e, _ in expected]  # the summary names them all too
    assert f"{len(expected)} problems" in err.diagnostics


def test_a_single_problem_is_a_single_issue() -> None:
    issues = from_error(_error({"resourceType": "Patient", "id": "a b"}))["issue"]
    assert [(i["code"], i["expression"]) for i in issues] == [("value", ["Patient.id"])]
    issues = from_error(_error(obs(status=None)))["issue"]
    assert [i["expression"] for i in issues] == [["Observation.status"]]


def test_issues_are_capped() -> None:
    err = _error({"resourceType": "Patient", **{f"x{i}": i for i in range(150)}})
    issues = from_error(err)["issue"]
    assert len(issues) == 101
    assert issues[-1]["code"] == "too-costly" and "50 more problems" in issues[-1]["diagnostics"]
    assert len(err.expression) == 150


VALID: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("minimal", {"resourceType": "Patient"}, {}),
    ("with our own meta", {"resourceType": "Patient", "id": "p1", "meta": {
        "versionId": "12", "lastUpdated": "2024-07-17T06:56:48.506Z"}},
     {"expected_type": "Patient", "expected_id": "p1", "require_id": True}),
    ("choice type", obs(valueQuantity={"value": 1.5, "unit": "mg"}), {}),
    ("integer is a valid decimal", obs(valueQuantity={"value": 2}), {}),
    ("required primitive given by extension only",
     {"resourceType": "Observation", "code": {"text": "x"},
      "_status": {"extension": [{"url": "http://x", "valueString": "unknown"}]}}, {}),
    ("primitive array with aligned extensions",
     {"resourceType": "Patient", "name": [{"given": ["a", "b"], "_given": [None, {
         "extension": [{"url": "http://x", "valueCode": "c"}]}]}]}, {}),
    ("partial dates", {"resourceType": "Patient", "birthDate": "1970-02"}, {}),
    ("leap day", {"resourceType": "Patient", "birthDate": "2024-02-29"}, {}),
    ("dateTime with zone", obs(effectiveDateTime="2020-01-01T10:00:00+14:00"), {}),
    ("contained resource", {"resourceType": "Patient", "contained": [obs(id="o1")]}, {}),
    ("R4-only type", {"resourceType": "MedicinalProduct", "id": "m",
                      "name": [{"productName": "x", "countryLanguage": [{
                          "country": {"text": "NL"}, "language": {"text": "nl"}}]}]}, {}),
    ("R4 Evidence", {"resourceType": "Evidence", "status": "active",
                     "exposureBackground": {"reference": "EvidenceVariable/e"}}, {}),
    ("codes from their required value sets", {
        "resourceType": "Patient", "gender": "unknown",
        "telecom": [{"system": "phone", "use": "mobile"}]}, {}),
    ("CodeableConcept with one coding from the value set among others",
     {"resourceType": "Condition", "subject": {"reference": "Patient/1"},
      "clinicalStatus": {"text": "x", "coding": [
          {"system": "http://example.org", "code": "on"},
          {"system": CONDITION_CLINICAL, "code": "active"}]}}, {}),
    ("CodeableConcept coding nothing (extensions only)",
     {"resourceType": "Condition", "subject": {"reference": "Patient/1"},
      "clinicalStatus": {"extension": [{"url": "http://x", "valueCode": "unknown"}]}}, {}),
    ("code given by extension only", {"resourceType": "Patient", "_gender": {
        "extension": [{"url": "http://x", "valueString": "robot"}]}}, {}),
    ("not-enumerable required value set left unchecked",
     {"resourceType": "Binary", "contentType": "application/x-anything"}, {}),
    ("unicode text", {"resourceType": "Patient", "name": [{"text": "Zoë 李"}]}, {}),
]


@pytest.mark.parametrize(("case", "resource", "kwargs"), VALID, ids=[c[0] for c in VALID])
def test_valid_resources(case: str, resource: dict[str, Any], kwargs: dict[str, Any]) -> None:
    validate_resource(resource, **kwargs)


def test_validation_does_not_modify_the_resource() -> None:
    resource = obs(valueQuantity={"value": 2}, effectiveDateTime="2020-01-01T10:00:00Z")
    before = json.dumps(resource, sort_keys=True)
    validate_resource(resource)
    assert json.dumps(resource, sort_keys=True) == before


# --------------------------------------------------------------------------------------------
# Required bindings: the 400 names the element and lists the allowed codes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("resource", "where", "allowed"), [
    ({"resourceType": "Patient", "gender": "robot"}, "Patient.gender",
     "female, male, other, unknown"),
    ({"resourceType": "Observation", "status": "done", "code": {"text": "x"}},
     "Observation.status", "amended, cancelled, corrected, entered-in-error, final"),
    ({"resourceType": "Bundle", "type": "pile"}, "Bundle.type",
     "batch, batch-response, collection, document, history, message, searchset"),
])
def test_required_code_binding(resource: dict[str, Any], where: str, allowed: str) -> None:
    err = _error(resource)
    assert err.status == 400 and err.code == "code-invalid"
    assert err.expression == [where]
    assert allowed in err.diagnostics
    [issue] = from_error(err)["issue"]
    assert issue["code"] == "code-invalid" and allowed in issue["diagnostics"]


def test_required_binding_lists_a_long_value_set_briefly() -> None:
    search_parameter = {"resourceType": "SearchParameter", "url": "http://x", "name": "x",
                        "status": "draft", "description": "x", "code": "x", "type": "token",
                        "base": ["Patient", "Nope"]}
    err = _error(search_parameter)
    assert err.expression == ["SearchParameter.base[1]"]
    assert "Account, ActivityDefinition, AdverseEvent" in err.diagnostics
    assert "more)" in err.diagnostics and len(err.diagnostics) < 1200


def test_required_coding_binding() -> None:
    # No Coding element of the R4 base resources has a required binding, so the rule is tested
    # on the compiled check itself, with a real R4 value set.
    check = _binding_check("http://hl7.org/fhir/ValueSet/administrative-gender", "Coding")
    system = "http://hl7.org/fhir/administrative-gender"
    assert check({"system": system, "code": "male"})
    assert check({"display": "nothing coded"})
    for wrong in ({"system": system, "code": "robot"}, {"system": "http://x", "code": "male"},
                  {"code": "male"}):
        with pytest.raises(Exception, match="female, male, other, unknown"):
            check(wrong)


def test_every_bound_element_of_a_resource_is_reported() -> None:
    err = _error({"resourceType": "Patient", "gender": "robot", "birthDate": "x",
                  "name": [{"use": "nick"}]})
    assert sorted(err.expression) == ["Patient.birthDate", "Patient.gender", "Patient.name[0].use"]


def test_required_binding_through_the_api(client: Any, clean_db: Any) -> None:
    r = send(client, "POST", "/fhir/Patient", {"resourceType": "Patient", "gender": "robot"})
    assert r.status_code == 400, r.json
    [issue] = r.json["issue"]
    assert issue["code"] == "code-invalid" and issue["expression"] == ["Patient.gender"]
    assert "female, male, other, unknown" in issue["diagnostics"]
    r = send(client, "POST", "/fhir/Patient", {"resourceType": "Patient", "gender": "female"})
    assert r.status_code == 201, r.json


# Cases where fhirq is deliberately stricter than fhir.resources (FHIR JSON forbids them, the
# library coerces or allows them).
STRICTER_THAN_LIBRARY = {
    "string for boolean", "string for integer", "null element",
    "id too long",  # the library allows 255 characters
    # required bindings: the library checks structure only
    "code outside its required value set", "code of a datatype outside its value set",
    "repeating code outside its value set", "CodeableConcept coding of another system",
    "CodeableConcept with a wrong code", "CodeableConcept with text only",
    # R4 rules where R4B (the library's release) differs
    "R4 element R4B dropped from Evidence is still required",
    "R4 Evidence (R4B restructured it)",
}


@pytest.mark.parametrize(("case", "resource"), [
    (c[0], c[1]) for c in INVALID
    if isinstance(c[1], dict) and not c[2] and c[0] not in STRICTER_THAN_LIBRARY
    and known_resource_type(str(c[1].get("resourceType")))
    and c[1].get("resourceType") not in R4_ONLY  # no model in the library
], ids=lambda v: v if isinstance(v, str) else "")
def test_library_agrees_with_our_rejections(case: str, resource: dict[str, Any]) -> None:
    # The compiled schema invents no rules: apart from the documented stricter JSON checks,
    # what we reject the library rejects too (and the Synthea test shows we accept what it
    # accepts).
    with pytest.raises((ValidationError, ValueError, KeyError)):
        get_fhir_model_class(resource["resourceType"]).model_validate(resource)


@pytest.mark.parametrize(("case", "resource"), [
    ("string for boolean", {"resourceType": "Patient", "active": "true"}),
    ("null element", {"resourceType": "Patient", "gender": None}),
])
def test_library_is_laxer_on_json_types(case: str, resource: dict[str, Any]) -> None:
    get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    with pytest.raises(BadRequest):
        validate_resource(resource)


# --------------------------------------------------------------------------------------------
# Real Synthea data
# --------------------------------------------------------------------------------------------


def _smallest_synthea_bundles(count: int) -> list[Path]:
    if not SYNTHEA.is_dir():
        pytest.skip(f"Synthea sample data not found at {SYNTHEA}")
    files = sorted(SYNTHEA.glob("*.json"), key=lambda p: p.stat().st_size)
    return files[:count]


def test_synthea_resources_validate() -> None:
    resources = []
    for path in _smallest_synthea_bundles(3):
        bundle = orjson.loads(path.read_bytes())
        validate_resource(bundle)  # the whole transaction Bundle, every entry's resource inside
        resources += [e["resource"] for e in bundle["entry"]]
    assert len(resources) > 500
    for i, resource in enumerate(resources):
        validate_resource(resource, expression=f"entry[{i}]")
    # ...and the library agrees on a sample, type by type.
    seen: set[str] = set()
    for resource in resources:
        if resource["resourceType"] not in seen:
            seen.add(resource["resourceType"])
            get_fhir_model_class(resource["resourceType"]).model_validate(resource)


def test_mutated_synthea_resources_are_rejected_where_broken() -> None:
    path = _smallest_synthea_bundles(1)[0]
    bundle = orjson.loads(path.read_bytes())
    patient = next(e["resource"] for e in bundle["entry"]
                   if e["resource"]["resourceType"] == "Patient")
    patient["name"][0]["given"].append(7)
    patient["address"][0]["unknownThing"] = "x"
    err = _error(patient, expression="Bundle.entry[0].resource")
    given = len(patient["name"][0]["given"]) - 1
    assert sorted(err.expression) == [
        "Bundle.entry[0].resource.address[0].unknownThing",
        f"Bundle.entry[0].resource.name[0].given[{given}]",
    ]


# --------------------------------------------------------------------------------------------
# JSON bombs
# --------------------------------------------------------------------------------------------


def _nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(("value", "ok"), [
    ({"a": 1}, True),
    (_nested(10), True),
    (_nested(11), False),
    ({"a": {"b": {"c": _nested(7)}}}, True),
    ({"a": {"b": {"c": _nested(8)}}}, False),
    ("x" * 100, True),
    ("x" * 101, False),
    ("é" * 50, True),  # 100 UTF-8 bytes
    ("é" * 51, False),  # 102 bytes although 51 characters
    ({"k" * 101: 1}, False),  # names count too
    (12345678901234567890, True),
])
def test_json_limits(value: Any, ok: bool) -> None:
    if ok:
        check_json_limits(value, max_depth=10, max_string_bytes=100)
    else:
        with pytest.raises(BadRequest) as caught:
            check_json_limits(value, max_depth=10, max_string_bytes=100)
        assert caught.value.code == "too-costly"


def test_json_limits_point_at_the_culprit() -> None:
    bundle = {"resourceType": "Bundle", "entry": [
        {"resource": {"resourceType": "Patient"}},
        {"resource": {"resourceType": "Patient", "name": [{"given": ["ok", "x" * 500]}]}},
    ]}
    with pytest.raises(BadRequest) as caught:
        check_json_limits(bundle, max_depth=64, max_string_bytes=100)
    assert caught.value.expression == ["Bundle.entry[1].resource.name[0].given[1]"]
    assert "500 bytes" in caught.value.diagnostics

    deep = {"resourceType": "Patient", "extension": [{"extension": [{"extension": [{}]}]}]}
    with pytest.raises(BadRequest) as caught:
        check_json_limits(deep, max_depth=5, max_string_bytes=100, expression="Bundle.entry[0]")
    assert caught.value.expression == ["Bundle.entry[0].extension[0].extension[0].extension"]


def test_json_limits_survive_a_100k_deep_value() -> None:
    value = _nested(100_000)
    with pytest.raises(BadRequest):
        check_json_limits(value, max_depth=64, max_string_bytes=1000)


def _true_depth(value: Any) -> int:
    depth, stack = 0, [(value, 1)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, (dict, list)):
            depth = max(depth, d)
            stack.extend((c, d + 1) for c in (node.values() if isinstance(node, dict) else node))
    return depth


RAW_CASES = [
    b'{"a": [1, 2, {"b": [[]]}]}',
    b'{"s": "[[[[[[[[[[[[[[[[[[[[[[[[[["}',  # brackets in strings do not count
    b'{"s": "]]]]]]]]]]]]]]]]]]]]]]]", "t": [[[[[[1]]]]]]}',
    b'{"s": "quote \\" [[[[[[[[[[[[[[[[[[[[[ still in string"}',
    b'{"s": "backslash \\\\", "t": [[[[[[[[[[[[1]]]]]]]]]]]]}',  # \\" ends the string
    b'{"s": "\\\\\\" [[[[[[[[[[[[[[ escaped quote after backslash"}',
    b'{"s": "\\u005b\\u005b\\u005b", "k\\"[": [[[1]]]}',
    b'[]',
    b'"just a string with [[[["',
]


@pytest.mark.parametrize("raw", RAW_CASES)
def test_raw_depth_matches_parsed_depth(raw: bytes) -> None:
    depth = _true_depth(json.loads(raw))
    check_raw_depth(raw, depth)
    if depth:
        with pytest.raises(BadRequest):
            check_raw_depth(raw, depth - 1)


@pytest.mark.parametrize("raw", RAW_CASES)
def test_raw_depth_scanner_handles_any_chunking(raw: bytes) -> None:
    depth = _true_depth(json.loads(raw))
    for size in (1, 2, 3, 7):
        scanner = RawDepthScanner(depth)
        for start in range(0, len(raw), size):
            scanner.feed(raw[start:start + size])
        if depth:
            tight = RawDepthScanner(depth - 1)
            with pytest.raises(BadRequest):
                for start in range(0, len(raw), size):
                    tight.feed(raw[start:start + size])


def test_raw_depth_on_random_documents() -> None:
    rng = random.Random(7)
    alphabet = ['"', "\\", "[", "]", "{", "}", "a", " ", "é"]

    def text() -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))

    def build(level: int) -> Any:
        if level > 12 or rng.random() < 0.3:
            return text()
        if rng.random() < 0.5:
            return [build(level + 1) for _ in range(rng.randint(0, 3))]
        return {text(): build(level + 1) for _ in range(rng.randint(0, 3))}

    for _ in range(200):
        value = build(0)
        raw = json.dumps(value, ensure_ascii=rng.random() < 0.5).encode()
        depth = _true_depth(value)
        check_raw_depth(raw, depth)
        if depth:
            with pytest.raises(BadRequest):
                check_raw_depth(raw, depth - 1)


def test_raw_depth_rejects_a_100k_deep_body_quickly() -> None:
    raw = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(BadRequest) as caught:
        check_raw_depth(raw, 64)
    assert caught.value.code == "too-costly"
    assert "64" in caught.value.diagnostics


def test_validation_survives_absurd_nesting_without_json_limits() -> None:
    extension: dict[str, Any] = {"url": "http://x", "valueString": "leaf"}
    for _ in range(20_000):
        extension = {"url": "http://x", "extension": [extension]}
    err = _error({"resourceType": "Patient", "extension": [extension]})
    assert err.code == "structure" and "nested too deeply" in err.diagnostics
    assert len(err.diagnostics) < 10_000


def test_messages_quote_values_briefly() -> None:
    err = _error({"resourceType": "Patient", "birthDate": "x" * 100_000})
    assert len(err.diagnostics) < 300


# --------------------------------------------------------------------------------------------
# Through the API: one issue per failing element, named from the bundle or the REST resource
# --------------------------------------------------------------------------------------------


def test_transaction_reports_each_failing_element(client: Any, clean_db: Any) -> None:
    bad = {"resourceType": "Observation", "id": "a b"}
    body = transaction(post({"resourceType": "Patient"}), post(bad))
    r = send(client, "POST", "/fhir", body)
    assert r.status_code == 400, r.json
    assert [(i["expression"], i["code"]) for i in r.json["issue"]] == [
        (["Bundle.entry[1].resource.id"], "value"),
        (["Bundle.entry[1].resource.status"], "required"),
        (["Bundle.entry[1].resource.code"], "required"),
    ]


def test_rest_create_reports_each_failing_element(client: Any, clean_db: Any) -> None:
    r = send(client, "POST", "/fhir/Observation", {"resourceType": "Observation"})
    assert r.status_code == 400, r.json
    assert [i["expression"] for i in r.json["issue"]] == [
        ["Observation.status"], ["Observation.code"]
    ]
    r = send(client, "POST", "/fhir/Observation",
             obs(subject={"reference": "Patient/ghost"}))
    assert r.status_code == 400, r.json
    assert r.json["issue"][0]["expression"] == ["Observation.subject.reference"]
