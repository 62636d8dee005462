"""Structural validation of R4 resources, and the JSON limits that guard everything we parse.

Owns: the FHIR id rule, the list of R4 resource types, JSON-bomb checks (on raw bytes before
parsing and on parsed values) and `validate_resource`, which checks one resource against the
R4 structure definitions and raises a `FhirError` whose `expression` names every bad element.

Which library, and its limits
    `fhir.resources` 8.x ships R5 (its root package), R4B and STU3 models, but no R4. R4B (4.3.0)
    is R4 (4.0.1) plus a technical correction: for every resource fhirq users send (Patient,
    Observation, Encounter, Claim, ExplanationOfBenefit, Slot, Schedule, ...) the two releases
    have the same elements, types and cardinalities, and where R4B differs it only adds
    optional elements (which we therefore accept). So the structure comes from
    `fhir.resources.R4B`, with two honest exceptions:
    - R4B-only resource types (SubscriptionTopic, MedicinalProductDefinition, Citation, ...) are
      not R4 types: `known_resource_type` says no, and they are rejected as unknown.
    - R4 types that R4B removed (MedicinalProduct*, Substance{NucleicAcid,...},
      EffectEvidenceSynthesis, RiskEvidenceSynthesis) or restructured (Evidence,
      EvidenceVariable) have no R4 model to check against: they are accepted after checking
      only the DomainResource elements every resource shares (id, meta, text, extension,
      contained, ...); their other elements are stored unchecked.
    Value sets (required bindings) and invariants other than "one type per choice element" are
    not checked: they are terminology and profile work, not structure.

How it validates, and why not `Model.model_validate`
    The library validates each nested element through Python callbacks (a wrap validator per
    complex element, a before- and two after-validators per model), about 185 µs per Synthea
    resource and 0.8 ms per ExplanationOfBenefit. Instead we read the library's model
    definitions once per resource type (element names, JSON names, types, cardinality,
    required elements, choice groups) and compile them into one pydantic-core schema of typed
    dicts, whose primitives are the FHIR regular expressions of datatypes.html. pydantic-core
    then checks the whole resource in Rust: 18-25 µs per Synthea resource instead of 190 µs
    (90 µs instead of 840 µs for an ExplanationOfBenefit), with Python code only for calendar
    dates, choice groups and required primitives. It is also
    stricter than the library where the library is laxer than FHIR JSON: `"true"` for a
    boolean, `"3"` for an integer, `null` for an element and empty strings are rejected.
    A resource the fast validator rejects is checked again by a second, complete validator
    (compiled per type on first need) that reports every failing element, one issue each:
    the fast one skips the choice and required-primitive rules of an object whose other
    elements already failed.

Status codes (http.html: 400 "could not be parsed or failed basic FHIR validation rules", 422
"violated applicable FHIR profiles or server business rules")
    Everything checked here is a basic FHIR validation rule of the base specification, so every
    failure is a `BadRequest` (400): code `structure` (unknown element, object/array/scalar
    mismatch, several types for one choice element), `value` (bad primitive, bad id),
    `required` (missing required element, resourceType or id), `invalid` (resource type or id
    that disagrees with the request URL), `not-supported` (unknown resource type), `too-costly`
    (JSON limits). 422 is left to business rules applied by the engine (e.g. a PATCH whose
    result is not a valid resource).
"""

from __future__ import annotations

import datetime
import re
import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from itertools import accumulate
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from fhir_core.constraints import FHIR_PRIMITIVES_MAPS
from fhir_core.fhirabstractmodel import FHIRAbstractModel
from fhir_core.types import FhirBase, FhirElementOrResourceBase
from pydantic_core import InitErrorDetails, PydanticCustomError, SchemaValidator, ValidationError
from pydantic_core import core_schema as cs

from core.errors import BadRequest

__all__ = [
    "R4_ONLY_TYPES",
    "R4_RESOURCE_TYPES",
    "RawDepthScanner",
    "check_json_limits",
    "check_raw_depth",
    "Element",
    "InvalidResource",
    "Model",
    "Problem",
    "element_repeats",
    "fhirpath_at",
    "fhirpath_of",
    "is_valid_id",
    "known_resource_type",
    "model_elements",
    "preload_validators",
    "resource_model",
    "validate_resource",
]

# --------------------------------------------------------------------------------------------
# R4 resource types
# --------------------------------------------------------------------------------------------

# Every concrete R4 (4.0.1) resource type (resourcelist.html): 146 names, Bundle, Binary and
# Parameters included; abstract Resource/DomainResource and R4B-only types excluded.
_R4_NAMES = """
Account ActivityDefinition AdverseEvent AllergyIntolerance Appointment AppointmentResponse
AuditEvent Basic Binary BiologicallyDerivedProduct BodyStructure Bundle CapabilityStatement
CarePlan CareTeam CatalogEntry ChargeItem ChargeItemDefinition Claim ClaimResponse
ClinicalImpression CodeSystem Communication CommunicationRequest CompartmentDefinition
Composition ConceptMap Condition Consent Contract Coverage CoverageEligibilityRequest
CoverageEligibilityResponse DetectedIssue Device DeviceDefinition DeviceMetric DeviceRequest
DeviceUseStatement DiagnosticReport DocumentManifest DocumentReference
EffectEvidenceSynthesis Encounter Endpoint EnrollmentRequest EnrollmentResponse
EpisodeOfCare EventDefinition Evidence EvidenceVariable ExampleScenario ExplanationOfBenefit
FamilyMemberHistory Flag Goal GraphDefinition Group GuidanceResponse HealthcareService
ImagingStudy Immunization ImmunizationEvaluation ImmunizationRecommendation
ImplementationGuide InsurancePlan Invoice Library Linkage List Location Measure
MeasureReport Media Medication MedicationAdministration MedicationDispense
MedicationKnowledge MedicationRequest MedicationStatement MedicinalProduct
MedicinalProductAuthorization MedicinalProductContraindication MedicinalProductIndication
MedicinalProductIngredient MedicinalProductInteraction MedicinalProductManufactured
MedicinalProductPackaged MedicinalProductPharmaceutical MedicinalProductUndesirableEffect
MessageDefinition MessageHeader MolecularSequence NamingSystem NutritionOrder Observation
ObservationDefinition OperationDefinition OperationOutcome Organization
OrganizationAffiliation Parameters Patient PaymentNotice PaymentReconciliation Person
PlanDefinition Practitioner PractitionerRole Procedure Provenance Questionnaire
QuestionnaireResponse RelatedPerson RequestGroup ResearchDefinition
ResearchElementDefinition ResearchStudy ResearchSubject RiskAssessment RiskEvidenceSynthesis
Schedule SearchParameter ServiceRequest Slot Specimen SpecimenDefinition StructureDefinition
StructureMap Subscription Substance SubstanceNucleicAcid SubstancePolymer SubstanceProtein
SubstanceReferenceInformation SubstanceSourceMaterial SubstanceSpecification SupplyDelivery
SupplyRequest Task TerminologyCapabilities TestReport TestScript ValueSet VerificationResult
VisionPrescription
"""
R4_RESOURCE_TYPES: frozenset[str] = frozenset(_R4_NAMES.split())

# R4 types without a usable R4B model, validated against the DomainResource base only: R4B
# removed these (replaced by MedicinalProductDefinition, SubstanceDefinition, Evidence, ...)...
R4_ONLY_TYPES = frozenset({
    "EffectEvidenceSynthesis", "MedicinalProduct", "MedicinalProductAuthorization",
    "MedicinalProductContraindication", "MedicinalProductIndication",
    "MedicinalProductIngredient", "MedicinalProductInteraction", "MedicinalProductManufactured",
    "MedicinalProductPackaged", "MedicinalProductPharmaceutical",
    "MedicinalProductUndesirableEffect", "RiskEvidenceSynthesis", "SubstanceNucleicAcid",
    "SubstancePolymer", "SubstanceProtein", "SubstanceReferenceInformation",
    "SubstanceSourceMaterial", "SubstanceSpecification",
})
# ...and restructured these two, so their R4B models would reject valid R4 instances.
_R4B_RESTRUCTURED = frozenset({"Evidence", "EvidenceVariable"})
_BASE_ONLY = R4_ONLY_TYPES | _R4B_RESTRUCTURED

_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


def is_valid_id(value: str) -> bool:
    """The FHIR id rule: 1 to 64 of A-Z a-z 0-9 - . (datatypes.html#id)."""
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def known_resource_type(name: str) -> bool:
    """True for concrete R4 resource types; False for abstract, R4B-only and unknown names."""
    return name in R4_RESOURCE_TYPES


# --------------------------------------------------------------------------------------------
# JSON limits (JSON bombs)
# --------------------------------------------------------------------------------------------

_BRACKET_STEP = [0] * 256
for _c in b"[{":
    _BRACKET_STEP[_c] = 1
for _c in b"]}":
    _BRACKET_STEP[_c] = -1
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_RAW_CHUNK = 1 << 20


class RawDepthScanner:
    """Nesting depth of JSON fed as raw byte chunks, without parsing it.

    Strings are skipped (so brackets inside them don't count) with C-speed bytes operations:
    escaped backslashes and quotes are dropped, the rest is split on quotes, and only the
    brackets outside strings are summed. Chunks may split strings and escapes anywhere. The
    input is assumed to be JSON; garbage is for the parser to reject afterwards.
    """

    def __init__(self, max_depth: int) -> None:
        self.max_depth = max_depth
        self._depth = 0
        self._in_string = False
        self._carry = b""  # trailing backslashes held back so escape pairs are never split
        self._fed = 0

    def feed(self, chunk: bytes) -> None:
        data = self._carry + bytes(chunk)
        self._fed += len(chunk)
        keep = len(data.rstrip(b"\\"))
        data, self._carry = data[:keep], data[keep:]
        if not data:
            return
        data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
        parts = data.split(b'"')
        outside = parts[1::2] if self._in_string else parts[0::2]
        if len(parts) % 2 == 0:
            self._in_string = not self._in_string
        brackets = b"".join(outside).translate(None, _NOT_BRACKETS)
        if not brackets:
            return
        peak = max(accumulate(map(_BRACKET_STEP.__getitem__, brackets), initial=self._depth))
        if peak > self.max_depth:
            raise BadRequest(
                f"The JSON is nested deeper than {self.max_depth} levels (within its first "
                f"{self._fed} bytes); the limit is set by FHIRQ_MAX_JSON_DEPTH",
                code="too-costly",
            )
        opened = brackets.count(b"[") + brackets.count(b"{")
        self._depth += opened - (len(brackets) - opened)


def check_raw_depth(body: bytes, max_depth: int) -> None:
    """Reject JSON nested deeper than `max_depth` before it is parsed (400 too-costly).

    Linear and C-speed (about 100 MB/s), bounded memory (1 MiB chunks); `orjson` would stop at
    1024 levels on its own, with a less helpful message.
    """
    if body.count(b"[") + body.count(b"{") <= max_depth:
        return  # cannot be deeper than its number of brackets
    scanner = RawDepthScanner(max_depth)
    view = memoryview(body)
    for start in range(0, len(body), _RAW_CHUNK):
        scanner.feed(view[start:start + _RAW_CHUNK])


def check_json_limits(
    value: object, *, max_depth: int, max_string_bytes: int, expression: str = ""
) -> None:
    """Reject parsed JSON nested deeper than `max_depth` or holding a string (value or name)
    longer than `max_string_bytes` UTF-8 bytes: 400 too-costly, `expression` at the culprit.

    Iterative (a 100k-deep value cannot exhaust the Python stack). The fast pass keeps no
    paths; only when something is wrong is the value walked again to name the element.
    """
    if _within_limits(value, max_depth, max_string_bytes):
        return
    path, problem = _find_violation(value, max_depth, max_string_bytes)
    root = expression or _root_name(value)
    where = fhirpath_of(root, path)
    raise BadRequest(problem, code="too-costly", expression=where or None)


def _too_long(text: str, max_bytes: int) -> bool:
    n = len(text)
    if n * 4 <= max_bytes:  # a code point is at most 4 UTF-8 bytes
        return False
    return n > max_bytes or len(text.encode("utf-8", "surrogatepass")) > max_bytes


def _within_limits(value: object, max_depth: int, max_bytes: int) -> bool:
    if isinstance(value, str):
        return not _too_long(value, max_bytes)
    if not isinstance(value, (dict, list)):
        return True
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            return False
        if type(node) is dict:
            for key in node:
                if _too_long(key, max_bytes):
                    return False
            children: Iterable[Any] = node.values()
        else:
            children = node
        for child in children:
            kind = type(child)
            if kind is str:
                if _too_long(child, max_bytes):
                    return False
            elif kind is dict or kind is list:
                stack.append((child, depth + 1))
    return True


def _find_violation(
    value: object, max_depth: int, max_bytes: int
) -> tuple[tuple[str | int, ...], str]:
    too_deep = (
        f"The JSON is nested deeper than {max_depth} levels here; the limit is set by "
        "FHIRQ_MAX_JSON_DEPTH"
    )

    def too_long(text: str, what: str) -> str:
        size = len(text.encode("utf-8", "surrogatepass"))
        return (
            f"{what} of {size} bytes is longer than the limit of {max_bytes} bytes "
            "(FHIRQ_MAX_STRING_BYTES)"
        )

    if isinstance(value, str):
        return (), too_long(value, "A string")
    stack: list[tuple[Any, int, tuple[str | int, ...]]] = [(value, 1, ())]
    while stack:
        node, depth, path = stack.pop()
        if depth > max_depth:
            return path, too_deep
        items: Iterable[tuple[str | int, Any]]
        if type(node) is dict:
            for key in node:
                if _too_long(key, max_bytes):
                    return path, too_long(key, "An element name")
            items = node.items()
        else:
            items = enumerate(node)
        for key, child in items:
            kind = type(child)
            if kind is str and _too_long(child, max_bytes):
                return (*path, key), too_long(child, "A string")
            if kind is dict or kind is list:
                stack.append((child, depth + 1, (*path, key)))
    raise AssertionError("no violation found after the fast pass reported one")


def _root_name(value: object) -> str:
    if isinstance(value, dict):
        rt = value.get("resourceType")
        if isinstance(rt, str) and len(rt) <= 64:
            return rt
    return ""


def fhirpath_of(root: str, path: Iterable[Any]) -> str:
    """FHIRPath of a JSON location: ("name", 0, "_given", 1) → Patient.name[0].given[1].

    A `_x` key holds the id/extensions of primitive `x`, which FHIRPath sees as `x` itself.
    """
    out = root
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            name = part[1:] if part.startswith("_") and len(part) > 1 else part
            out = f"{out}.{name}" if out else name
    return out


# --------------------------------------------------------------------------------------------
# validate_resource
# --------------------------------------------------------------------------------------------

_MAX_LISTED_PROBLEMS = 20  # in the summary diagnostics
_MAX_ISSUES = 100  # issues of one OperationOutcome


def validate_resource(
    resource: dict,
    *,
    expression: str = "",
    expected_type: str | None = None,
    expected_id: str | None = None,
    require_id: bool = False,
) -> None:
    """Check `resource` against the R4 structure; raise BadRequest naming every bad element.

    `expression` is where the resource sits (e.g. "Bundle.entry[3].resource"); error paths are
    built on it, or on the resource type when it is empty ("Patient.birthDate").
    `expected_type`/`expected_id` are the type and id of the request URL: the body must agree
    (http.html#update); an `expected_id` also makes the id required.
    """
    if not isinstance(resource, dict):
        raise BadRequest(
            "A resource must be a JSON object", code="structure", expression=expression or None
        )
    rtype = resource.get("resourceType")
    named = isinstance(rtype, str) and known_resource_type(rtype)
    root = expression or (rtype if named else "Resource")
    if rtype is None:
        raise BadRequest(
            "The resource has no resourceType", code="required",
            expression=f"{root}.resourceType",
        )
    if not named:
        raise BadRequest(
            f"Unknown resource type {_show(rtype)}: not an R4 resource type",
            code="not-supported", expression=f"{root}.resourceType",
        )
    if expected_type is not None and rtype != expected_type:
        raise BadRequest(
            f"The resource is a {rtype} but the request URL is for {expected_type}",
            code="invalid", expression=f"{root}.resourceType",
        )
    id_problem = _id_problem(resource.get("id"), f"{root}.id", expected_id, require_id)
    try:
        _validator(rtype).validate_python(resource)
    except ValidationError as first:
        err = first
        try:  # the fast validator stops at some problems; the complete one finds them all
            _validator(rtype, complete=True).validate_python(resource)
        except ValidationError as every:
            err = every
        raise _bad_request(err, root, resource, id_problem) from None
    if id_problem is not None:
        raise BadRequest(id_problem.text, code=id_problem.code, expression=id_problem.expression)


def _id_problem(
    rid: Any, where: str, expected_id: str | None, require_id: bool
) -> Problem | None:
    if rid is None:
        if require_id or expected_id is not None:
            return Problem(where, "required", "The resource needs an id" + (
                f" equal to the id in the request URL ({expected_id})"
                if expected_id is not None else ""
            ))
    elif not is_valid_id(rid):
        return Problem(where, "value", f"{_show(rid)} is not a valid FHIR id (1-64 of A-Z a-z "
                       "0-9 - .)")
    elif expected_id is not None and rid != expected_id:
        return Problem(where, "invalid", f"The resource id {rid!r} does not match the id in the "
                       f"request URL ({expected_id!r})")
    return None


def _show(value: object, limit: int = 60) -> str:
    # Never repr a whole (possibly huge or deeply nested) JSON value into a message.
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    text = repr(value[:limit] if isinstance(value, str) else value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_STRUCTURE_ERRORS = frozenset({
    "extra_forbidden", "dict_type", "list_type", "fhir_choice", "fhir_resource",
    "literal_error", "recursion_loop", "recursion_depth_exceeded",
})
_REQUIRED_ERRORS = frozenset({"missing", "fhir_required"})


@dataclass(frozen=True, slots=True)
class Problem:
    """One failing element: its FHIRPath, the FHIR issue code and what is wrong."""

    expression: str
    code: str
    text: str


class InvalidResource(BadRequest):
    """A resource that breaks R4 rules in one or more elements. Its OperationOutcome has one
    issue per element of `problems` (each with `expression`, `code` and `text`);
    `diagnostics` and `expression` sum them all up, for callers that report one issue."""

    def __init__(self, problems: list[Problem]) -> None:
        listed = "; ".join(f"{p.expression}: {p.text}" for p in problems[:_MAX_LISTED_PROBLEMS])
        more = len(problems) - _MAX_LISTED_PROBLEMS
        if more > 0:
            listed += f"; and {more} more"
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(
            f"The resource is not valid R4 ({len(problems)} {noun}): {listed}",
            code=problems[0].code,
            expression=list(dict.fromkeys(p.expression for p in problems)),
        )
        if len(problems) > _MAX_ISSUES:
            rest = len(problems) - _MAX_ISSUES
            problems = [*problems[:_MAX_ISSUES], Problem(
                problems[_MAX_ISSUES].expression, "too-costly",
                f"and {rest} more problems, not listed one by one",
            )]
        self.problems = problems


def _bad_request(
    err: ValidationError, root: str, resource: dict[str, Any], id_problem: Problem | None
) -> InvalidResource:
    problems: list[Problem] = [id_problem] if id_problem is not None else []
    for item in err.errors(include_url=False):
        kind = item["type"]
        loc: tuple[Any, ...] = tuple(item["loc"])
        path = fhirpath_of(root, _choice_names(resource, loc))
        if id_problem is not None and path == id_problem.expression:
            continue  # the id rule already says what is wrong with it
        if kind in _REQUIRED_ERRORS:
            code, text = "required", "required element is missing"
        elif kind in _STRUCTURE_ERRORS:
            code, text = "structure", _STRUCTURE_TEXT.get(kind) or item["msg"]
        else:
            code, text = "value", _value_text(kind, item)
        problems.append(Problem(path, code, text))
    return InvalidResource(problems)


def _value_text(kind: str, item: Any) -> str:
    given = item.get("input")
    if given is None:
        return "null is not allowed (leave the element out instead)"
    if kind == "string_pattern_mismatch":
        name = _PATTERN_NAMES.get((item.get("ctx") or {}).get("pattern", ""), "value")
        text = f"not a valid FHIR {name}"
    else:
        text = _VALUE_TEXT.get(kind) or item["msg"]
    return f"{text}, got {_show(given)}"


def fhirpath_at(root: str, resource: dict[str, Any], loc: Iterable[Any]) -> str:
    """FHIRPath of JSON location `loc` inside `resource`, choice elements named as FHIRPath
    names them: ("extension", 0, "valueReference", "reference") of a Patient →
    `{root}.extension[0].value.reference`."""
    return fhirpath_of(root, _choice_names(resource, tuple(loc)))


def _choice_names(resource: dict[str, Any], loc: tuple[Any, ...]) -> list[Any]:
    """JSON location → FHIRPath names: a choice element is named without its type
    (`valueQuantity` → `value`), as FHIRPath (and OperationOutcome.expression) name it."""
    out: list[Any] = []
    data: Any = resource
    model = resource_model(str(resource.get("resourceType")))
    for part in loc:
        if isinstance(part, int):
            out.append(part)
            data = data[part] if isinstance(data, list) and part < len(data) else None
            if isinstance(data, dict) and isinstance(data.get("resourceType"), str):
                model = resource_model(data["resourceType"])  # a contained resource
            continue
        element = _element(model, part.lstrip("_")) if model is not None else None
        out.append(element.choice if element is not None and element.choice else part)
        data = data.get(part) if isinstance(data, dict) else None
        if isinstance(data, dict) and isinstance(data.get("resourceType"), str):
            model = resource_model(data["resourceType"])
        else:
            model = element.model if element is not None else None
    return out


def _element(model: Model, key: str) -> Element | None:
    return _element_index(model).get(key)


@cache
def _element_index(model: Model) -> dict[str, Element]:
    return {e.key: e for e in model_elements(model)}


_VALUE_TEXT = {
    "string_type": "must be a JSON string",
    "bool_type": "must be JSON true or false",
    "int_type": "must be a JSON integer",
    "float_type": "must be a JSON number",
}

_STRUCTURE_TEXT = {
    "extra_forbidden": "unknown element",
    "dict_type": "must be a JSON object",
    "list_type": "must be a JSON array (the element repeats)",
    "recursion_loop": "nested too deeply",
    "recursion_depth_exceeded": "nested too deeply",
}


# --------------------------------------------------------------------------------------------
# Element definitions read from fhir.resources
# --------------------------------------------------------------------------------------------

Model = type[FHIRAbstractModel]


@dataclass(frozen=True, slots=True)
class Element:
    """One element of a model, as the JSON sees it."""

    key: str  # JSON name, e.g. "birthDate", "_birthDate", "valueQuantity"
    repeats: bool
    model: Model | None  # complex type, or None
    any_resource: bool  # contained / Bundle.entry.resource: any resource type
    primitive: str | None  # FHIR primitive type name ("date", "code", ...)
    required: bool  # min cardinality 1 of a complex element (the library requires it)
    required_primitive: bool  # min 1 of a primitive: `x` or `_x` must be present
    choice: str | None  # "value" for value[x]
    choice_required: bool


@cache
def model_elements(model: Model) -> tuple[Element, ...]:
    """Every element of `model` under its JSON names (`_x` companions included), read once."""
    out = []
    for name, field in model.model_fields.items():
        key = field.alias or name
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if name == "fhir_comments":
            # Not an R4 element; the library accepts it (it was DSTU2's JSON comments).
            out.append(Element(key, False, None, False, "fhir_comments", False, False, None,
                                False))
            continue
        annotation, repeats = _unwrap(field.annotation)
        model_type = None
        any_resource = False
        primitive = None
        if isinstance(annotation, type) and issubclass(annotation, FhirElementOrResourceBase):
            any_resource = True
        elif isinstance(annotation, type) and issubclass(annotation, FhirBase):
            model_type = annotation.get_model_klass()
        else:
            primitive = _primitive_name(annotation, f"{model.__name__}.{key}")
        out.append(Element(
            key=key,
            repeats=repeats,
            model=model_type,
            any_resource=any_resource,
            primitive=primitive,
            required=field.is_required(),
            required_primitive=bool(extra.get("element_required")) and primitive is not None,
            choice=extra.get("one_of_many"),
            choice_required=bool(extra.get("one_of_many_required")),
        ))
    return tuple(out)


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """`List[X] | None` → (X, True); `X | None` → (X, False)."""
    repeats = False
    while True:
        origin = typing.get_origin(annotation)
        if origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                raise TypeError(f"unexpected union in a FHIR model: {annotation!r}")
            annotation = args[0]
        elif origin in (list, typing.List):  # noqa: UP006 - the library spells it typing.List
            repeats = True
            annotation = typing.get_args(annotation)[0]
        else:
            return annotation, repeats


def _primitive_name(annotation: Any, where: str) -> str:
    if annotation is bool:
        return "boolean"
    candidates = [annotation]
    if typing.get_origin(annotation) is typing.Annotated:
        candidates += [type(m) for m in annotation.__metadata__]
        candidates.append(typing.get_args(annotation)[0])
    for candidate in candidates:
        try:
            name = FHIR_PRIMITIVES_MAPS.get(candidate)
        except TypeError:  # unhashable metadata
            continue
        if name:
            return name
    if getattr(typing.get_args(annotation)[0] if typing.get_args(annotation) else annotation,
               "__name__", "") == "UUID":
        return "uuid"
    raise TypeError(f"cannot map the type of {where} to a FHIR primitive: {annotation!r}")


def resource_model(rtype: str) -> Model | None:
    """The model of an R4 resource type; None for unknown types and those without an R4 model
    (`R4_ONLY_TYPES`, Evidence, EvidenceVariable)."""
    # Imported on first use: importing every R4B model up front takes over a second.
    if rtype in _BASE_ONLY or rtype not in R4_RESOURCE_TYPES:
        return None
    return get_fhir_model_class(rtype)


def element_repeats(resource_type: str, keys: Sequence[str]) -> bool | None:
    """Does the element at JSON path `keys` (names only, no indexes) of `resource_type` repeat?

    ("name",) of Patient → True, ("name", "family") → False, unknown element → None. Used by
    FHIRPath Patch to know whether `add` appends to a list or sets a single value.
    """
    model = resource_model(resource_type)
    if model is None or not keys:
        return None
    for depth, key in enumerate(keys):
        if model is None:
            return None
        found = _element(model, key)
        if found is None:
            return None
        if depth == len(keys) - 1:
            return found.repeats
        model = found.model
    return None


# --------------------------------------------------------------------------------------------
# Compilation into one pydantic-core schema per resource type
# --------------------------------------------------------------------------------------------

_YEAR = r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)"
_MONTH = r"(0[1-9]|1[0-2])"
_DAY = r"(0[1-9]|[1-2][0-9]|3[0-1])"
_TIME = r"([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?"
_ZONE = r"(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00))"

# JSON shapes of the FHIR primitives, with the regular expressions of R4 datatypes.html. Every
# string type also refuses "" (json.html: strings are never empty); base64Binary allows "/",
# which the R4 regex forgets.
_PRIMITIVE_PATTERNS = {
    "string": r"[ \r\n\t\S]+",
    "markdown": r"[ \r\n\t\S]+",
    "xhtml": r"[ \r\n\t\S]+",
    "code": r"[^\s]+(\s[^\s]+)*",
    "id": r"[A-Za-z0-9\-.]{1,64}",
    "uri": r"\S+",
    "url": r"\S+",
    "canonical": r"\S+",
    "oid": r"urn:oid:[0-2](\.(0|[1-9][0-9]*))+",
    "uuid": r"urn:uuid:[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
    "base64Binary": r"(\s*([0-9a-zA-Z+/=]){4}\s*)+",
    "integer64": r"[0]|[-+]?[1-9][0-9]*",
    "date": rf"{_YEAR}(-{_MONTH}(-{_DAY})?)?",
    "dateTime": rf"{_YEAR}(-{_MONTH}(-{_DAY}(T{_TIME}{_ZONE})?)?)?",
    "instant": rf"{_YEAR}-{_MONTH}-{_DAY}T{_TIME}{_ZONE}",
    "time": _TIME,
}
_INT32 = 2**31 - 1


def _anchored(name: str) -> str:
    return f"^(?:{_PRIMITIVE_PATTERNS[name]})$"


# Pattern → type, to name the type in error messages ("not a valid FHIR date"); types that
# share a pattern share a name.
_PATTERN_NAMES = {_anchored(name): name for name in reversed(_PRIMITIVE_PATTERNS)}


def _calendar_date(value: str) -> str:
    # The regexes allow 2023-02-30; the library rejects it, and so do we.
    if len(value) >= 10:
        try:
            datetime.date.fromisoformat(value[:10])
        except ValueError as exc:
            raise PydanticCustomError("fhir_date", "not a calendar date ({reason})",
                                      {"reason": str(exc)}) from None
    return value


@cache
def _primitive_schema(name: str) -> cs.CoreSchema:
    inner: cs.CoreSchema
    if name == "boolean":
        inner = cs.bool_schema(strict=True)
    elif name == "integer":
        inner = cs.int_schema(strict=True, ge=-_INT32 - 1, le=_INT32)
    elif name == "unsignedInt":
        inner = cs.int_schema(strict=True, ge=0, le=_INT32)
    elif name == "positiveInt":
        inner = cs.int_schema(strict=True, ge=1, le=_INT32)
    elif name == "decimal":
        inner = cs.float_schema(strict=True, allow_inf_nan=False)  # strict float takes ints too
    elif name == "fhir_comments":
        text = cs.str_schema(strict=True)
        inner = cs.union_schema([text, cs.list_schema(text)])
    elif name in _PRIMITIVE_PATTERNS:
        inner = cs.str_schema(strict=True, pattern=_anchored(name))
        if name in ("date", "dateTime", "instant"):
            inner = cs.no_info_after_validator_function(_calendar_date, inner)
    else:
        raise TypeError(f"no JSON schema for FHIR primitive {name!r}")
    return inner


def _element_rules(model: Model, complete: bool) -> Any:
    """Checks a typed dict cannot express: one type per choice element, required primitives
    (present as `x` or, with only extensions, as `_x`).

    The fast validator checks them after the typed dict (an after validator, skipped when the
    typed dict already failed). The complete one, run only to report a resource the fast one
    rejected, wraps the typed dict, so that these problems are reported together with the
    typed dict's (an Observation missing both `status` and `code` is two problems)."""
    groups: dict[str, tuple[bool, set[str]]] = {}
    required: list[str] = []
    for e in model_elements(model):
        if e.choice:
            groups.setdefault(e.choice, (e.choice_required, set()))[1].add(e.key)
        if e.required_primitive:
            required.append(e.key)
    if not groups and not required:
        return None
    frozen = [(name, needed, frozenset(keys)) for name, (needed, keys) in groups.items()]

    def broken(data: dict[str, Any]) -> list[InitErrorDetails] | None:
        out: list[InitErrorDetails] = []
        for name, needed, keys in frozen:
            present = [k for k in data if k in keys]
            if len(present) > 1:
                out.append(_rule_error(
                    "fhir_choice", f"only one type is allowed for {name}[x], got "
                    f"{', '.join(present)}", name, data,
                ))
            elif needed and not present:
                out.append(_rule_error("fhir_required", f"{name}[x] is required", name, data))
        for key in required:
            if key not in data and f"_{key}" not in data:
                out.append(_rule_error("fhir_required", f"{key} is required", key, data))
        return out or None

    def after(data: dict[str, Any]) -> dict[str, Any]:
        problems = broken(data)
        if problems is not None:
            raise ValidationError.from_exception_data("fhir", problems)
        return data

    def wrap(data: Any, handler: cs.ValidatorFunctionWrapHandler) -> Any:
        problems = broken(data) if type(data) is dict else None
        if problems is None:
            return handler(data)
        try:
            handler(data)
        except ValidationError as err:
            problems += [_reraised(item) for item in err.errors(include_url=False)]
        raise ValidationError.from_exception_data("fhir", problems)

    return wrap if complete else after


def _rule_error(kind: str, text: str, element: str, data: Any) -> InitErrorDetails:
    # Located at the element itself, so that its FHIRPath names it.
    return InitErrorDetails(type=PydanticCustomError(kind, text), loc=(element,), input=data)


def _reraised(item: Any) -> InitErrorDetails:
    """One error of a ValidationError, as it can be raised again: same type, text, location,
    input and context (the type becomes a custom one of the same name)."""
    ctx = item.get("ctx")
    kind = PydanticCustomError(item["type"], item["msg"], ctx)
    return InitErrorDetails(type=kind, loc=tuple(item["loc"]), input=item["input"])


class _SchemaBuilder:
    """Turns one model and every model it reaches into pydantic-core definitions."""

    def __init__(self, complete: bool) -> None:
        self._definitions: dict[str, cs.CoreSchema] = {}
        self._complete = complete

    def validator(self, model: Model | None, rtype: str) -> SchemaValidator:
        top = self._model_schema(model, rtype) if model is None else self._ref(model)
        return SchemaValidator(cs.definitions_schema(top, list(self._definitions.values())))

    def _ref(self, model: Model) -> cs.CoreSchema:
        ref = f"{model.__module__}.{model.__qualname__}"
        if ref not in self._definitions:
            self._definitions[ref] = cs.any_schema()  # placeholder while recursing
            self._definitions[ref] = self._model_schema(model, None, ref=ref)
        return cs.definition_reference_schema(ref)

    def _model_schema(
        self, model: Model | None, open_rtype: str | None, *, ref: str | None = None
    ) -> cs.CoreSchema:
        if model is None:
            # An R4 type without an R4 model: check what every DomainResource has, let the
            # rest through.
            base = get_fhir_model_class("DomainResource")
            fields = self._fields(base)
            fields["resourceType"] = cs.typed_dict_field(cs.literal_schema([open_rtype]))
            return cs.typed_dict_schema(fields, extra_behavior="allow", total=False)
        fields = self._fields(model)
        if model.has_resource_base():
            fields["resourceType"] = cs.typed_dict_field(
                cs.literal_schema([model.get_resource_type()])
            )
        rules = _element_rules(model, self._complete)
        if rules is None:
            return cs.typed_dict_schema(fields, extra_behavior="forbid", total=False, ref=ref)
        inner = cs.typed_dict_schema(fields, extra_behavior="forbid", total=False)
        if self._complete:
            return cs.no_info_wrap_validator_function(rules, inner, ref=ref)
        return cs.no_info_after_validator_function(rules, inner, ref=ref)

    def _fields(self, model: Model) -> dict[str, cs.TypedDictField]:
        fields: dict[str, cs.TypedDictField] = {}
        for e in model_elements(model):
            if e.any_resource:
                item: cs.CoreSchema = cs.no_info_plain_validator_function(
                    _any_complete_resource if self._complete else _any_resource
                )
            elif e.model is not None:
                item = self._ref(e.model)
            else:
                item = _primitive_schema(e.primitive or "")
            if e.repeats:
                # Primitive arrays and their `_x` companions use null to keep positions aligned.
                if e.model is None or e.key.startswith("_"):
                    item = cs.nullable_schema(item)
                item = cs.list_schema(item)
            fields[e.key] = cs.typed_dict_field(item, required=e.required)
        return fields


def _any_resource(value: Any, complete: bool = False) -> Any:
    if not isinstance(value, dict):
        raise PydanticCustomError("dict_type", "must be a JSON object")
    rtype = value.get("resourceType")
    if not isinstance(rtype, str) or not known_resource_type(rtype):
        raise PydanticCustomError(
            "fhir_resource", "must be a resource of a known R4 type, got resourceType {rtype}",
            {"rtype": _show(rtype)},
        )
    _validator(rtype, complete=complete).validate_python(value)
    return value


def _any_complete_resource(value: Any) -> Any:
    return _any_resource(value, complete=True)


_VALIDATORS: dict[tuple[str, bool], SchemaValidator] = {}


def preload_validators(resource_types: Iterable[str] = R4_RESOURCE_TYPES) -> None:
    """Compile validators now rather than on first use, e.g. in a pre-fork master so that
    workers share them (all 146 types: about 1 s and 130 MB; the 17 Synthea types: 0.2 s and
    15 MB)."""
    for rtype in resource_types:
        if known_resource_type(rtype):
            _validator(rtype)


def _validator(rtype: str, *, complete: bool = False) -> SchemaValidator:
    """The compiled validator of one resource type, built on first use (a few ms each): the
    fast one, or the `complete` one that reports every problem (see `_element_rules`)."""
    found = _VALIDATORS.get((rtype, complete))
    if found is None:
        builder = _SchemaBuilder(complete)
        found = _VALIDATORS[rtype, complete] = builder.validator(resource_model(rtype), rtype)
    return found
