"""The search parameter registry compiled from HL7's R4 SearchParameter table."""

from __future__ import annotations

from core.fhir import r4
from core.fhir.search_registry import (
    ElementPath,
    params_for,
    resource_types,
    supported_params,
    unsupported,
)


def paths(resource_type: str, name: str) -> list[tuple[str, str, str | None]]:
    return [
        (".".join(k for k, _ in p.steps), p.leaf, p.ref_type)
        for p in params_for(resource_type)[name].paths
    ]


def test_every_r4_parameter_of_a_searchable_type_is_in_the_registry() -> None:
    table = r4.search_parameters()
    kinds = {"token", "reference", "string", "date", "uri", "number", "quantity"}
    for t in resource_types():
        params = params_for(t)
        for code, kind, _ in table.get(t, ()):
            assert params[code].type == kind
        own = [c for c, k, e in table.get(t, ()) if k in kinds and e]
        # All but a handful compile (listed by `unsupported()`).
        missing = [c for c in own if not params[c].supported]
        assert len(missing) <= 2, (t, missing)


def test_expressions_compile_to_element_paths() -> None:
    assert paths("Patient", "family") == [("name.family", "string", None)]
    assert paths("Patient", "name") == [("name", "HumanName", None)]
    assert paths("Observation", "patient") == [("subject", "Reference", "Patient")]
    assert paths("Observation", "value-quantity") == [("valueQuantity", "Quantity", None)]
    assert paths("Observation", "date") == [
        ("effectiveDateTime", "dateTime", None), ("effectivePeriod", "Period", None),
        ("effectiveTiming", "Timing", None), ("effectiveInstant", "instant", None),
    ]
    assert paths("Observation", "value-string") == [
        ("valueString", "string", None), ("valueCodeableConcept.text", "string", None),
    ]
    assert paths("Condition", "onset-date") == [
        ("onsetDateTime", "dateTime", None), ("onsetPeriod", "Period", None),
    ]
    assert paths("Encounter", "practitioner") == [
        ("participant.individual", "Reference", "Practitioner")
    ]
    assert paths("Patient", "_tag") == [("meta.tag", "Coding", None)]
    (email,) = params_for("Patient")["email"].paths
    assert email.steps == (("telecom", ("system", "email")),)
    assert email.values({"telecom": [{"system": "phone", "value": "1"},
                                     {"system": "email", "value": "a@b"}]}) == [
        {"system": "email", "value": "a@b"}]
    assert paths("InsurancePlan", "name") == [("name", "string", None), ("alias", "string", None)]


def test_reference_targets_and_shared_index_names() -> None:
    assert params_for("Observation")["subject"].targets == (
        "Device", "Group", "Location", "Patient")
    assert params_for("Patient")["phonetic"].index_name == "name"
    assert params_for("Patient")["name"].index_name == "name"
    # `name` stores the parts that `family` and `given` do not, and reads all three.
    name = params_for("Patient")["name"]
    assert name.index_names == ("name", "family", "given")
    assert name.parts == ("text", "prefix", "suffix")
    assert params_for("Patient")["phonetic"].index_names == name.index_names
    assert params_for("Patient")["address"].parts == ("line", "district", "text")
    # Tokens that never carry a system are stored once (`|value`).
    assert params_for("Patient")["gender"].systemless
    assert params_for("Patient")["telecom"].systemless
    assert not params_for("Patient")["identifier"].systemless
    assert not params_for("Observation")["code"].systemless
    assert params_for("Patient")["_id"].column == "res_id"


def test_unsupported_parameters_are_listed_with_a_reason() -> None:
    listed = {(t, n): why for t, n, why in unsupported()}
    assert "composite" in listed[("Observation", "code-value-quantity")]
    assert ("Patient", "deceased") in listed
    assert not params_for("Observation")["code-value-quantity"].supported
    assert "code-value-quantity" not in supported_params("Observation")
    # A partly compiled union is supported, with the rest named.
    vq = params_for("Observation")["value-quantity"]
    assert vq.supported and "SampledData" in (vq.reason or "")


def test_unknown_type_gets_the_resource_level_parameters() -> None:
    assert supported_params("NotAType") == [
        "_id", "_lastUpdated", "_profile", "_security", "_source", "_tag"]
    assert isinstance(params_for("NotAType")["_tag"].paths[0], ElementPath)
