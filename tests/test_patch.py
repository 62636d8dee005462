"""JSON Patch and FHIRPath Patch on plain-dict resources (no database).

FHIRPath Patch cases follow R4 fhirpatch.html: its examples (add birthDate, add an anonymous
contact, insert/delete/replace/move identifiers) and its rules (one element per path, delete
of nothing is fine, index bounds, anonymous values as parts).
"""

from __future__ import annotations

import base64
import copy
from typing import Any

import orjson
import pytest

from core.errors import BadRequest, FhirError, Unprocessable
from core.fhir.patch import apply_fhirpath_patch, apply_json_patch, decode_binary_patch


def patient() -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": "p1",
        "meta": {"versionId": "3", "lastUpdated": "2024-07-17T06:56:48.506Z"},
        "birthDate": "1974-12-25",
        "_birthDate": {"extension": [{"url": "http://x/accuracy", "valueCode": "estimated"}]},
        "name": [{"family": "Chalmers", "given": ["Peter", "James"],
                  "_given": [None, {"extension": [{"url": "http://x/nick", "valueString": "J"}]}]},
                 {"use": "nickname", "given": ["Jim"]}],
        "identifier": [
            {"system": "http://example.org/1", "value": "a"},
            {"system": "http://example.org/2", "value": "b"},
            {"system": "http://example.org/3", "value": "c"},
        ],
        "contact": [{"name": {"text": "Mum"}}],
        "contained": [{"resourceType": "Observation", "id": "o1", "status": "final",
                       "code": {"text": "x"}, "valueQuantity": {"value": 1, "unit": "kg"}}],
    }


def operation(kind: str, path: str, **parts: Any) -> dict[str, Any]:
    """One FHIRPath Patch operation: value=dict is a value part's content (`{"valueDate": ..}`,
    `{"part": [...]}` or `{"resource": ..}`); index/source/destination are integers."""
    out: list[dict[str, Any]] = [{"name": "type", "valueCode": kind},
                                 {"name": "path", "valueString": path}]
    for name, value in parts.items():
        if name == "value":
            out.append({"name": "value", **value})
        elif name in ("index", "source", "destination"):
            out.append({"name": name, "valueInteger": value})
        else:
            out.append({"name": name, "valueString": value})
    return {"name": "operation", "part": out}


def parameters(*operations: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Parameters", "parameter": list(operations)}


def ids(resource: dict[str, Any]) -> list[str]:
    return [i["value"] for i in resource.get("identifier", [])]


# --------------------------------------------------------------------------------------------
# FHIRPath Patch: what each operation does
# --------------------------------------------------------------------------------------------

FHIRPATH_CASES: list[tuple[str, list[dict[str, Any]], dict[str, Any]]] = [
    # (case, operations, expected changes: top-level key → new value, None = removed)
    ("spec: add birthDate where there is none",
     [operation("delete", "Patient.birthDate"),
      operation("add", "Patient", name="birthDate", value={"valueDate": "1930-01-01"})],
     {"birthDate": "1930-01-01", "_birthDate": None}),
    ("spec: add an anonymous element from parts",
     [operation("add", "Patient", name="contact", value={"part": [
         {"name": "name", "valueHumanName": {"text": "a name"}},
         {"name": "telecom", "valueContactPoint": {"system": "phone", "value": "555"}},
     ]})],
     {"contact": [{"name": {"text": "Mum"}},
                  {"name": {"text": "a name"},
                   "telecom": [{"system": "phone", "value": "555"}]}]}),  # telecom repeats
    ("add a choice element by its name and the value's type",
     [operation("add", "Patient", name="deceased", value={"valueBoolean": True})],
     {"deceasedBoolean": True}),
    ("add to a repeating element appends",
     [operation("add", "Patient", name="identifier",
                value={"valueIdentifier": {"system": "http://example.org/4", "value": "d"}})],
     {"identifier": [*patient()["identifier"], {"system": "http://example.org/4", "value": "d"}]}),
    ("add inside the element a path selects",
     [operation("add", "Patient.name.where(use='nickname')", name="family",
                value={"valueString": "Smith"})],
     {"name": [patient()["name"][0], {"use": "nickname", "given": ["Jim"], "family": "Smith"}]}),
    ("add into a contained resource",
     [operation("add", "Patient.contained[0]", name="note",
                value={"valueAnnotation": {"text": "n"}})],
     {"contained": [{**patient()["contained"][0], "note": [{"text": "n"}]}]}),
    ("spec: insert at the start of a list",
     [operation("insert", "Patient.identifier", index=0,
                value={"valueIdentifier": {"system": "http://example.org", "value": "value 3"}})],
     {"identifier": [{"system": "http://example.org", "value": "value 3"},
                     *patient()["identifier"]]}),
    ("insert in the middle",
     [operation("insert", "Patient.identifier", index=2,
                value={"valueIdentifier": {"value": "m"}})],
     {"identifier": [*patient()["identifier"][:2], {"value": "m"},
                     patient()["identifier"][2]]}),
    ("insert at the end (index = length)",
     [operation("insert", "Patient.identifier", index=3,
                value={"valueIdentifier": {"value": "z"}})],
     {"identifier": [*patient()["identifier"], {"value": "z"}]}),
    ("insert into an absent list",
     [operation("insert", "Patient.telecom", index=0,
                value={"valueContactPoint": {"system": "email", "value": "a@b.c"}})],
     {"telecom": [{"system": "email", "value": "a@b.c"}]}),
    ("insert into a primitive list keeps its extensions aligned",
     [operation("insert", "Patient.name[0].given", index=0, value={"valueString": "Rev"})],
     {"name": [{"family": "Chalmers", "given": ["Rev", "Peter", "James"],
                "_given": [None, None, patient()["name"][0]["_given"][1]]},
               patient()["name"][1]]}),
    ("spec: delete one list item",
     [operation("delete", "Patient.identifier[0]")],
     {"identifier": patient()["identifier"][1:]}),
    ("delete the item a where() selects",
     [operation("delete", "Patient.identifier.where(system='http://example.org/2')")],
     {"identifier": [patient()["identifier"][0], patient()["identifier"][2]]}),
    ("delete a primitive takes its extensions along",
     [operation("delete", "Patient.birthDate")],
     {"birthDate": None, "_birthDate": None}),
    ("delete a primitive list item keeps extensions aligned",
     [operation("delete", "Patient.name[0].given[0]")],
     {"name": [{"family": "Chalmers", "given": ["James"],
                "_given": [patient()["name"][0]["_given"][1]]}, patient()["name"][1]]}),
    ("delete what matches nothing does nothing",
     [operation("delete", "Patient.identifier.where(system='nope')")],
     {}),
    ("delete leaves no empty elements behind",
     [operation("delete", "Patient.contact[0].name.text")],
     {"contact": None}),
    ("spec: replace a primitive",
     [operation("replace", "Patient.birthDate", value={"valueDate": "1930-01-01"})],
     {"birthDate": "1930-01-01"}),
    ("replace a list item",
     [operation("replace", "Patient.identifier[1]", value={"valueIdentifier": {"value": "B"}})],
     {"identifier": [patient()["identifier"][0], {"value": "B"}, patient()["identifier"][2]]}),
    ("replace inside the item a where() selects",
     [operation("replace", "Patient.identifier.where(system='http://example.org/3').value",
                value={"valueString": "C"})],
     {"identifier": [*patient()["identifier"][:2],
                     {"system": "http://example.org/3", "value": "C"}]}),
    ("replace a choice element with another type",
     [operation("replace", "Patient.contained[0].value", value={"valueString": "heavy"})],
     {"contained": [{**{k: v for k, v in patient()["contained"][0].items()
                        if k != "valueQuantity"}, "valueString": "heavy"}]}),
    ("spec: move within a list",
     [operation("move", "Patient.identifier", source=0, destination=1)],
     {"identifier": [patient()["identifier"][i] for i in (1, 0, 2)]}),
    ("move to the end",
     [operation("move", "Patient.identifier", source=0, destination=2)],
     {"identifier": [patient()["identifier"][i] for i in (1, 2, 0)]}),
    ("move a primitive keeps extensions aligned",
     [operation("move", "Patient.name[0].given", source=1, destination=0)],
     {"name": [{"family": "Chalmers", "given": ["James", "Peter"],
                "_given": [patient()["name"][0]["_given"][1], None]}, patient()["name"][1]]}),
    ("operations apply in order",
     [operation("delete", "Patient.identifier[0]"),
      operation("delete", "Patient.identifier[0]"),
      operation("replace", "Patient.identifier[0].value", value={"valueString": "only"})],
     {"identifier": [{"system": "http://example.org/3", "value": "only"}]}),
]


@pytest.mark.parametrize(("case", "operations", "changes"), FHIRPATH_CASES,
                         ids=[c[0] for c in FHIRPATH_CASES])
def test_fhirpath_patch(case: str, operations: list[dict[str, Any]],
                        changes: dict[str, Any]) -> None:
    original = patient()
    result = apply_fhirpath_patch(original, parameters(*operations))
    expected = patient()
    for key, value in changes.items():
        if value is None:
            expected.pop(key, None)
        else:
            expected[key] = value
    assert result == expected
    assert original == patient()  # the input is never modified


FHIRPATH_FAILURES: list[tuple[str, Any, type[FhirError], str, list[str]]] = [
    # (case, parameters, error, code, expression)
    ("not a Parameters", {"resourceType": "Binary"}, BadRequest, "structure", ["Parameters"]),
    ("no operations", parameters(), BadRequest, "required", ["Parameters.parameter"]),
    ("parameter not named operation", parameters({"name": "op", "part": []}), BadRequest,
     "value", ["Parameters.parameter[0].name"]),
    ("unknown type", parameters(operation("upsert", "Patient")), BadRequest, "value",
     ["Parameters.parameter[0].part[0]"]),
    ("add without a name", parameters(operation("add", "Patient", value={"valueCode": "x"})),
     BadRequest, "required", ["Parameters.parameter[0]"]),
    ("replace without a value", parameters(operation("replace", "Patient.birthDate")),
     BadRequest, "required", ["Parameters.parameter[0]"]),
    ("insert without an index", parameters(operation(
        "insert", "Patient.identifier", value={"valueIdentifier": {"value": "x"}})),
     BadRequest, "required", ["Parameters.parameter[0]"]),
    ("a part the type does not take", parameters(operation(
        "delete", "Patient.birthDate", name="birthDate")), BadRequest, "structure",
     ["Parameters.parameter[0].part[2]"]),
    ("FHIRPath syntax error", parameters(operation("delete", "Patient.name.(")), BadRequest,
     "value", ["Parameters.parameter[0].part[1]"]),
    ("trailing garbage in the path", parameters(operation("delete", "Patient.name)")),
     BadRequest, "value", ["Parameters.parameter[0].part[1]"]),
    ("unknown FHIRPath function", parameters(operation("delete", "Patient.name.frob()")),
     BadRequest, "value", ["Parameters.parameter[0]"]),
    ("value with two types", parameters(operation(
        "replace", "Patient.birthDate", value={"valueDate": "2000-01-01", "valueString": "x"})),
     BadRequest, "structure", ["Parameters.parameter[0].part[2]"]),
    ("negative index", parameters(operation(
        "insert", "Patient.identifier", index=-1, value={"valueIdentifier": {"value": "x"}})),
     BadRequest, "value", ["Parameters.parameter[0].part[2]"]),
    ("add where the path matches nothing", parameters(operation(
        "add", "Patient.maritalStatus", name="text", value={"valueString": "x"})),
     Unprocessable, "processing", ["Parameters.parameter[0]"]),
    ("add where the path matches several", parameters(operation(
        "add", "Patient.name", name="text", value={"valueString": "x"})),
     Unprocessable, "processing", ["Parameters.parameter[0]"]),
    ("add an existing single element", parameters(operation(
        "add", "Patient", name="birthDate", value={"valueDate": "2000-01-01"})),
     Unprocessable, "processing", ["Parameters.parameter[0]"]),
    ("insert beyond the end", parameters(operation(
        "insert", "Patient.identifier", index=4, value={"valueIdentifier": {"value": "x"}})),
     Unprocessable, "processing", ["Parameters.parameter[0]"]),
    ("insert into a single element", parameters(operation(
        "insert", "Patient.gender", index=0, value={"valueCode": "male"})),
     Unprocessable, "processing", ["Parameters.parameter[0]"]),
    ("delete of several", parameters(operation("delete", "Patient.identifier")),
     Unprocessable, "processing", ["Parameters.parameter[0]"]),
    ("delete the resource", parameters(operation("delete", "Patient")),
     Unprocessable, "processing", ["Parameters.parameter[0]"]),
    ("replace of nothing", parameters(operation(
        "replace", "Patient.gender", value={"valueCode": "male"})),
     Unprocessable, "processing", ["Parameters.parameter[0]"]),
    ("replace of several", parameters(operation(
        "replace", "Patient.name.given", value={"valueString": "x"})),
     Unprocessable, "processing", ["Parameters.parameter[0]"]),
    ("move out of range", parameters(operation(
        "move", "Patient.identifier", source=0, destination=3)),
     Unprocessable, "processing", ["Parameters.parameter[0]"]),
    ("move of nothing", parameters(operation(
        "move", "Patient.telecom", source=0, destination=0)),
     Unprocessable, "processing", ["Parameters.parameter[0]"]),
    ("the second operation fails", parameters(
        operation("delete", "Patient.birthDate"),
        operation("replace", "Patient.birthDate", value={"valueDate": "2000-01-01"})),
     Unprocessable, "processing", ["Parameters.parameter[1]"]),
    ("change the id", parameters(operation("replace", "Patient.id", value={"valueId": "p2"})),
     Unprocessable, "processing", []),
    ("remove the id", parameters(operation("delete", "Patient.id")),
     Unprocessable, "processing", []),
]


@pytest.mark.parametrize(("case", "params", "error", "code", "expression"), FHIRPATH_FAILURES,
                         ids=[c[0] for c in FHIRPATH_FAILURES])
def test_fhirpath_patch_failures(case: str, params: Any, error: type[FhirError], code: str,
                                 expression: list[str]) -> None:
    original = patient()
    with pytest.raises(error) as caught:
        apply_fhirpath_patch(original, params)
    assert caught.value.code == code
    assert caught.value.expression == expression
    assert original == patient()


def test_fhirpath_patch_errors_sit_where_the_patch_is() -> None:
    with pytest.raises(Unprocessable) as caught:
        apply_fhirpath_patch(patient(), parameters(operation("delete", "Patient.identifier")),
                             expression="Bundle.entry[2].resource")
    assert caught.value.expression == ["Bundle.entry[2].resource.parameter[0]"]
    assert "matches 3" in caught.value.diagnostics


# --------------------------------------------------------------------------------------------
# JSON Patch
# --------------------------------------------------------------------------------------------

JSON_PATCH_CASES: list[tuple[str, list[dict[str, Any]], dict[str, Any]]] = [
    ("add", [{"op": "add", "path": "/gender", "value": "male"}], {"gender": "male"}),
    ("add to the end of a list", [{"op": "add", "path": "/name/1/given/-", "value": "J"}],
     {"name": [patient()["name"][0], {"use": "nickname", "given": ["Jim", "J"]}]}),
    ("remove", [{"op": "remove", "path": "/identifier/0"}],
     {"identifier": patient()["identifier"][1:]}),
    ("replace", [{"op": "replace", "path": "/birthDate", "value": "1930-01-01"}],
     {"birthDate": "1930-01-01"}),
    ("move", [{"op": "move", "from": "/identifier/0", "path": "/identifier/2"}],
     {"identifier": [patient()["identifier"][i] for i in (1, 2, 0)]}),
    ("copy", [{"op": "copy", "from": "/name/0/family", "path": "/name/1/family"}],
     {"name": [patient()["name"][0], {"use": "nickname", "given": ["Jim"],
                                       "family": "Chalmers"}]}),
    ("passing test, then replace",
     [{"op": "test", "path": "/birthDate", "value": "1974-12-25"},
      {"op": "replace", "path": "/birthDate", "value": "1975-01-01"}],
     {"birthDate": "1975-01-01"}),
    ("escaped pointer", [{"op": "add", "path": "/extension", "value": [
        {"url": "http://x/a~b", "valueString": "v"}]},
        {"op": "test", "path": "/extension/0/url", "value": "http://x/a~b"}],
     {"extension": [{"url": "http://x/a~b", "valueString": "v"}]}),
]


@pytest.mark.parametrize(("case", "ops", "changes"), JSON_PATCH_CASES,
                         ids=[c[0] for c in JSON_PATCH_CASES])
def test_json_patch(case: str, ops: list[dict[str, Any]], changes: dict[str, Any]) -> None:
    original = patient()
    result = apply_json_patch(original, ops)
    assert result == {**patient(), **changes}
    assert original == patient()


def test_json_patch_accepts_one_operation_as_an_object() -> None:
    result = apply_json_patch(patient(), {"op": "remove", "path": "/contact"})
    assert "contact" not in result


JSON_PATCH_FAILURES: list[tuple[str, Any, type[FhirError], str]] = [
    ("not a list", "remove /name", BadRequest, "structure"),
    ("operation not an object", ["remove"], BadRequest, "invalid"),
    ("unknown op", [{"op": "append", "path": "/name"}], BadRequest, "invalid"),
    ("missing path", [{"op": "remove"}], BadRequest, "invalid"),
    ("missing value", [{"op": "replace", "path": "/birthDate"}], BadRequest, "invalid"),
    ("missing from", [{"op": "move", "path": "/birthDate"}], BadRequest, "invalid"),
    ("pointer without a slash", [{"op": "remove", "path": "birthDate"}], BadRequest, "invalid"),
    ("bad pointer escape", [{"op": "remove", "path": "/a~2"}], BadRequest, "invalid"),
    ("test fails", [{"op": "test", "path": "/birthDate", "value": "2000-01-01"}],
     Unprocessable, "processing"),
    ("remove what is absent", [{"op": "remove", "path": "/gender"}], Unprocessable,
     "processing"),
    ("replace beyond a list", [{"op": "replace", "path": "/identifier/7", "value": {}}],
     Unprocessable, "processing"),
    ("add under a missing parent", [{"op": "add", "path": "/telecom/0/value", "value": "x"}],
     Unprocessable, "processing"),
    ("change the id", [{"op": "replace", "path": "/id", "value": "p2"}], Unprocessable,
     "processing"),
    ("change the type", [{"op": "replace", "path": "/resourceType", "value": "Person"}],
     Unprocessable, "processing"),
    ("remove the id", [{"op": "remove", "path": "/id"}], Unprocessable, "processing"),
    ("replace the whole resource", [{"op": "replace", "path": "", "value": [1]}],
     Unprocessable, "processing"),
    ("a later operation fails, nothing applies",
     [{"op": "remove", "path": "/birthDate"}, {"op": "remove", "path": "/birthDate"}],
     Unprocessable, "processing"),
]


@pytest.mark.parametrize(("case", "ops", "error", "code"), JSON_PATCH_FAILURES,
                         ids=[c[0] for c in JSON_PATCH_FAILURES])
def test_json_patch_failures(case: str, ops: Any, error: type[FhirError], code: str) -> None:
    original = patient()
    with pytest.raises(error) as caught:
        apply_json_patch(original, ops, expression="Bundle.entry[1].resource")
    assert caught.value.code == code
    assert caught.value.expression == ["Bundle.entry[1].resource"]
    assert original == patient()


def test_json_patch_errors_name_the_operation_and_element_but_not_the_data() -> None:
    ops = [{"op": "test", "path": "/birthDate", "value": "1974-12-25"},
           {"op": "replace", "path": "/name/0/suffix/3", "value": "x"}]
    with pytest.raises(Unprocessable) as caught:
        apply_json_patch(patient(), ops)
    text = caught.value.diagnostics
    assert "operation 1" in text and "Patient.name[0].suffix[3]" in text
    assert "Chalmers" not in text


# --------------------------------------------------------------------------------------------
# JSON Patch carried in a Binary
# --------------------------------------------------------------------------------------------


def binary(data: bytes | str, content_type: str | None = "application/json-patch+json"
           ) -> dict[str, Any]:
    encoded = base64.b64encode(data).decode() if isinstance(data, bytes) else data
    out: dict[str, Any] = {"resourceType": "Binary", "data": encoded}
    if content_type is not None:
        out["contentType"] = content_type
    return out


def test_decode_binary_patch() -> None:
    ops = [{"op": "replace", "path": "/birthDate", "value": "1930-01-01"}]
    assert decode_binary_patch(binary(orjson.dumps(ops))) == ops
    wrapped = base64.encodebytes(orjson.dumps(ops)).decode()  # base64 with line breaks
    assert decode_binary_patch(binary(wrapped, "application/json-patch+json; charset=utf-8")
                               ) == ops
    patched = apply_json_patch(patient(), decode_binary_patch(binary(orjson.dumps(ops))))
    assert patched["birthDate"] == "1930-01-01"


BINARY_FAILURES: list[tuple[str, Any, str, list[str]]] = [
    ("not a Binary", {"resourceType": "Parameters"}, "structure", ["Bundle.entry[0].resource"]),
    ("no contentType", binary(b"[]", None), "required",
     ["Bundle.entry[0].resource.contentType"]),
    ("other contentType", binary(b"[]", "application/json"), "value",
     ["Bundle.entry[0].resource.contentType"]),
    ("no data", {"resourceType": "Binary", "contentType": "application/json-patch+json"},
     "required", ["Bundle.entry[0].resource.data"]),
    ("bad base64", binary("not*base64"), "value", ["Bundle.entry[0].resource.data"]),
    ("not JSON", binary(b"[{]"), "structure", ["Bundle.entry[0].resource.data"]),
    ("JSON but not a list", binary(b'{"op": "remove"}'), "structure",
     ["Bundle.entry[0].resource.data"]),
    ("nested too deep", binary(b"[" * 500 + b"]" * 500), "too-costly", []),
]


@pytest.mark.parametrize(("case", "resource", "code", "expression"), BINARY_FAILURES,
                         ids=[c[0] for c in BINARY_FAILURES])
def test_decode_binary_patch_failures(case: str, resource: Any, code: str,
                                      expression: list[str]) -> None:
    with pytest.raises(BadRequest) as caught:
        decode_binary_patch(copy.deepcopy(resource), expression="Bundle.entry[0].resource")
    assert caught.value.code == code
    assert caught.value.expression == expression
