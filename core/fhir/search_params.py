"""Search parameters: which ones each resource type supports, the index values a write stores
for them (`extract_index`), and the parsing of a search query into a `Query` (`parse_query`).

Pure: no database. `core.fhir.search` turns a `Query` into SQL over the index columns.

Index formats (this module owns them; writers store exactly what `extract_index` returns):

- `resource.tokens` (GIN), token and reference parameters:
  - a code / Coding / Identifier with system `s` and value `c`:
    `"{param}:{s}|{c}"`, `"{param}:*|{c}"`, `"{param}:{s}|"`;
    with no system: `"{param}:|{c}"`, `"{param}:*|{c}"`. Plain `code` and boolean elements
    (gender, status, active) are codes without a system.
  - a relative reference `Type/id` (a `/_history/n` suffix is dropped):
    `"{param}:Type/id"`, `"{param}:id"`. Absolute URLs, `urn:` and `#contained` references
    are not indexed.
  - a logical reference (`Reference.identifier`, e.g. Synthea's PractitionerRole):
    the Identifier forms above under `"{param}:identifier:"`, searched with `:identifier`.
  - a presence marker `"{param}:"` for every parameter that has at least one value; it is
    what `:missing` searches.
  - a token longer than 512 characters is cut and suffixed with a hash of the whole
    (`_cap`), identically on both sides, so giant identifiers cannot break the GIN index.
- `resource.date_lo` / `date_hi`: the inclusive range (microsecond precision, UTC) of the
  type's one date parameter (`DATE_PARAMS`). A value covers its precision: `1974` is
  1974-01-01T00:00:00 .. 1974-12-31T23:59:59.999999, a dateTime to the second covers that
  second. A Period with no end runs to `MAX_DT`, with no start from `MIN_DT`.
- `resource_string` rows `(param, value)`: the lower-cased, accent-stripped (NFKD) value,
  cut to 255 characters, one row per distinct pair: `name` (every part of every HumanName),
  `family`, `given` on Patient/Practitioner; `name` (name and alias) on Organization,
  Location, HealthcareService.

Query semantics (FHIR R4 search.html): comma = OR within one parameter, a repeated parameter
= AND. Strings match by prefix on the normalised value; `:contains` anywhere; `:exact` is
equality on the normalised value (index) plus a check of the original, case-sensitive value
in the stored JSON (see `EXACT_PATHS`). Dates take the prefixes eq ne lt le gt ge sa eb ap
with range semantics. `:missing` works on every parameter but `_id` / `_lastUpdated`;
tokens also take `:not`, references `:Type` and `:identifier`.

Unknown parameters are ignored (and listed in `Query.ignored`) in lenient mode and are a
400 in strict mode (conditional operations). An unsupported modifier or an unparseable value
is a 400 in both modes, as search.html requires.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from core.errors import BadRequest

__all__ = [
    "IndexValues",
    "Query",
    "TokenClause",
    "StringClause",
    "DateClause",
    "DateRange",
    "MissingClause",
    "IdClause",
    "Clause",
    "DATE_PARAMS",
    "EXACT_PATHS",
    "MIN_DT",
    "MAX_DT",
    "extract_index",
    "paging_int",
    "supported_params",
    "param_types",
    "parse_query",
    "normalize",
    "date_range",
]

MIN_DT = datetime.min.replace(tzinfo=UTC)
MAX_DT = datetime.max.replace(tzinfo=UTC)
_MICRO = timedelta(microseconds=1)
_TOKEN_MAX = 512
_STRING_MAX = 255


# --------------------------------------------------------------------------- definitions


@dataclass(frozen=True, slots=True)
class _Tok:
    """A token or reference parameter: where its values are and what they are."""

    param: str
    path: tuple[str, ...]
    kind: str  # code | coding | concept | identifier | ref
    target: str | None = None  # for kind "ref": only references to this type


@dataclass(frozen=True, slots=True)
class _TypeSpec:
    tokens: tuple[_Tok, ...]
    names: str | None  # "human" (name/family/given) | "human-name" (name) | "plain" (name)
    date_param: str | None
    date_keys: tuple[str, ...]  # tried in order; the first present one is the value
    types: dict[str, str]  # param -> FHIR search param type, for parsing and metadata


def _t(param: str, path: str, kind: str, target: str | None = None) -> _Tok:
    return _Tok(param, tuple(path.split(".")), kind, target)


def _subject(encounter: str | None = "encounter") -> list[_Tok]:
    out = [_t("subject", "subject", "ref"), _t("patient", "subject", "ref", "Patient")]
    if encounter:
        out.append(_t("encounter", encounter, "ref"))
    return out


_STRING_PARAMS = {"human": ("name", "family", "given"), "human-name": ("name",), "plain": ("name",)}


def _spec(
    tokens: list[_Tok] | tuple[()] = (),
    names: str | None = None,
    date: tuple[str, tuple[str, ...]] | None = None,
) -> _TypeSpec:
    # Every resource type we know gets `identifier`: nearly all R4 types define it.
    toks = (_t("identifier", "identifier", "identifier"), *tokens)
    types: dict[str, str] = {"_id": "token", "_lastUpdated": "date"}
    for tok in toks:
        types[tok.param] = "reference" if tok.kind == "ref" else "token"
    for p in _STRING_PARAMS.get(names or "", ()):
        types[p] = "string"
    if date:
        types[date[0]] = "date"
    return _TypeSpec(toks, names, date[0] if date else None, date[1] if date else (), types)


_EFFECTIVE = ("effectiveDateTime", "effectivePeriod", "effectiveInstant")

_SPECS: dict[str, _TypeSpec] = {
    "Patient": _spec(
        [
            _t("gender", "gender", "code"),
            _t("active", "active", "code"),
            _t("general-practitioner", "generalPractitioner", "ref"),
            _t("organization", "managingOrganization", "ref"),
        ],
        names="human",
        date=("birthdate", ("birthDate",)),
    ),
    "Practitioner": _spec(
        [_t("gender", "gender", "code"), _t("active", "active", "code")], names="human"
    ),
    "PractitionerRole": _spec(
        [
            _t("practitioner", "practitioner", "ref"),
            _t("organization", "organization", "ref"),
            _t("location", "location", "ref"),
            _t("role", "code", "concept"),
            _t("specialty", "specialty", "concept"),
            _t("active", "active", "code"),
        ]
    ),
    "RelatedPerson": _spec(
        [
            _t("patient", "patient", "ref"),
            _t("gender", "gender", "code"),
            _t("active", "active", "code"),
        ],
        names="human-name",
        date=("birthdate", ("birthDate",)),
    ),
    "Person": _spec(
        [_t("gender", "gender", "code")], names="human-name", date=("birthdate", ("birthDate",))
    ),
    "Organization": _spec(
        [
            _t("active", "active", "code"),
            _t("type", "type", "concept"),
            _t("partof", "partOf", "ref"),
        ],
        names="plain",
    ),
    "Location": _spec(
        [
            _t("status", "status", "code"),
            _t("type", "type", "concept"),
            _t("organization", "managingOrganization", "ref"),
            _t("partof", "partOf", "ref"),
        ],
        names="plain",
    ),
    "HealthcareService": _spec(
        [_t("active", "active", "code"), _t("organization", "providedBy", "ref")], names="plain"
    ),
    "Observation": _spec(
        [
            _t("code", "code", "concept"),
            _t("status", "status", "code"),
            _t("category", "category", "concept"),
            *_subject(),
        ],
        date=("date", _EFFECTIVE),
    ),
    "Condition": _spec(
        [
            _t("code", "code", "concept"),
            _t("category", "category", "concept"),
            _t("clinical-status", "clinicalStatus", "concept"),
            _t("verification-status", "verificationStatus", "concept"),
            *_subject(),
        ],
        # R4 has no Condition `date`; onset, else recording, is what users filter on.
        date=("date", ("onsetDateTime", "onsetPeriod", "recordedDate")),
    ),
    "Procedure": _spec(
        [_t("code", "code", "concept"), _t("status", "status", "code"), *_subject()],
        date=("date", ("performedDateTime", "performedPeriod")),
    ),
    "Encounter": _spec(
        [
            _t("status", "status", "code"),
            _t("class", "class", "coding"),
            _t("type", "type", "concept"),
            *_subject(encounter=None),
            _t("participant", "participant.individual", "ref"),
            _t("practitioner", "participant.individual", "ref", "Practitioner"),
            _t("service-provider", "serviceProvider", "ref"),
            _t("location", "location.location", "ref"),
        ],
        date=("date", ("period",)),
    ),
    "MedicationRequest": _spec(
        [
            _t("code", "medicationCodeableConcept", "concept"),
            _t("medication", "medicationReference", "ref"),
            _t("status", "status", "code"),
            _t("intent", "intent", "code"),
            _t("requester", "requester", "ref"),
            *_subject(),
        ],
        date=("authoredon", ("authoredOn",)),
    ),
    "MedicationAdministration": _spec(
        [
            _t("code", "medicationCodeableConcept", "concept"),
            _t("medication", "medicationReference", "ref"),
            _t("status", "status", "code"),
            *_subject(encounter="context"),
        ],
        date=("effective-time", ("effectiveDateTime", "effectivePeriod")),
    ),
    "Medication": _spec([_t("code", "code", "concept"), _t("status", "status", "code")]),
    "DiagnosticReport": _spec(
        [
            _t("code", "code", "concept"),
            _t("status", "status", "code"),
            _t("category", "category", "concept"),
            _t("result", "result", "ref"),
            *_subject(),
        ],
        date=("date", _EFFECTIVE),
    ),
    "DocumentReference": _spec(
        [
            _t("status", "status", "code"),
            _t("type", "type", "concept"),
            _t("category", "category", "concept"),
            *_subject(encounter="context.encounter"),
        ],
        date=("date", ("date",)),
    ),
    "Immunization": _spec(
        [
            _t("vaccine-code", "vaccineCode", "concept"),
            _t("status", "status", "code"),
            _t("patient", "patient", "ref"),
        ],
        date=("date", ("occurrenceDateTime",)),
    ),
    "AllergyIntolerance": _spec(
        [
            _t("code", "code", "concept"),
            _t("clinical-status", "clinicalStatus", "concept"),
            _t("patient", "patient", "ref"),
        ],
        date=("date", ("recordedDate",)),
    ),
    "CarePlan": _spec(
        [
            _t("status", "status", "code"),
            _t("category", "category", "concept"),
            *_subject(),
        ],
        date=("date", ("period",)),
    ),
    "CareTeam": _spec(
        [
            _t("status", "status", "code"),
            _t("category", "category", "concept"),
            *_subject(),
        ],
        date=("date", ("period",)),
    ),
    "ServiceRequest": _spec(
        [_t("code", "code", "concept"), _t("status", "status", "code"), *_subject()],
        date=("authored", ("authoredOn",)),
    ),
    "Goal": _spec([_t("lifecycle-status", "lifecycleStatus", "code"), *_subject(encounter=None)]),
    "ImagingStudy": _spec(
        [_t("status", "status", "code"), *_subject()], date=("started", ("started",))
    ),
    "Claim": _spec(
        [
            _t("status", "status", "code"),
            _t("use", "use", "code"),
            _t("patient", "patient", "ref"),
            _t("provider", "provider", "ref"),
        ],
        date=("created", ("created",)),
    ),
    "ExplanationOfBenefit": _spec(
        [
            _t("status", "status", "code"),
            _t("patient", "patient", "ref"),
            _t("provider", "provider", "ref"),
            _t("claim", "claim", "ref"),
        ],
        date=("created", ("created",)),
    ),
    "Coverage": _spec(
        [
            _t("status", "status", "code"),
            _t("beneficiary", "beneficiary", "ref"),
            _t("patient", "beneficiary", "ref", "Patient"),
            _t("payor", "payor", "ref"),
        ]
    ),
    "Device": _spec(
        [
            _t("type", "type", "concept"),
            _t("status", "status", "code"),
            _t("patient", "patient", "ref"),
        ]
    ),
    "Provenance": _spec(
        [_t("target", "target", "ref"), _t("patient", "target", "ref", "Patient")],
        date=("recorded", ("recorded",)),
    ),
    "Slot": _spec(
        [
            _t("schedule", "schedule", "ref"),
            _t("status", "status", "code"),
            _t("service-type", "serviceType", "concept"),
        ],
        date=("start", ("start",)),
    ),
    "Schedule": _spec(
        [
            _t("actor", "actor", "ref"),
            _t("active", "active", "code"),
            _t("service-type", "serviceType", "concept"),
        ],
        date=("date", ("planningHorizon",)),
    ),
    "Appointment": _spec(
        [
            _t("status", "status", "code"),
            _t("actor", "participant.actor", "ref"),
            _t("patient", "participant.actor", "ref", "Patient"),
            _t("practitioner", "participant.actor", "ref", "Practitioner"),
            _t("slot", "slot", "ref"),
        ],
        date=("date", ("start",)),
    ),
}
_GENERIC = _spec()

DATE_PARAMS: dict[str, str] = {t: s.date_param for t, s in _SPECS.items() if s.date_param}

# `:exact` checks the original value with these JSON paths (variable $v: the searched values).
_HUMAN_EXACT = {
    "name": "$.name[*] ? (@.family == $v || @.given[*] == $v || @.text == $v"
    " || @.prefix[*] == $v || @.suffix[*] == $v)",
    "family": "$.name[*].family ? (@ == $v)",
    "given": "$.name[*].given[*] ? (@ == $v)",
}
_PLAIN_EXACT = {"name": "$ ? (@.name == $v || @.alias[*] == $v)"}
EXACT_PATHS: dict[str, dict[str, str]] = {
    t: (_PLAIN_EXACT if s.names == "plain" else _HUMAN_EXACT) for t, s in _SPECS.items() if s.names
}


def supported_params(resource_type: str) -> list[str]:
    """Search parameters of `resource_type` (not result parameters like `_count`)."""
    return list(_SPECS.get(resource_type, _GENERIC).types)


def param_types(resource_type: str) -> dict[str, str]:
    """Search parameter name → FHIR type (token, reference, string, date), for metadata."""
    return dict(_SPECS.get(resource_type, _GENERIC).types)


# --------------------------------------------------------------------------- extraction


@dataclass(slots=True)
class IndexValues:
    tokens: list[str]
    strings: list[tuple[str, str]]  # (param, normalised value)
    date_lo: datetime | None
    date_hi: datetime | None


def extract_index(resource: dict) -> IndexValues:
    """The search index values of one resource; called for every write, so kept lean."""
    spec = _SPECS.get(resource.get("resourceType", ""), _GENERIC)
    out: dict[str, None] = {}  # a dict keeps first-seen order and dedupes
    for tok in spec.tokens:
        path = tok.path
        if len(path) == 1:
            value = resource.get(path[0])
            if value is None:
                continue
            values = value if isinstance(value, list) else (value,)
        else:
            values = _walk(resource, path)
            if not values:
                continue
        before = len(out)
        _EMIT[tok.kind](tok, values, out)
        if len(out) != before:
            out[tok.param + ":"] = None
    strings = _strings(resource, spec.names) if spec.names else []
    lo = hi = None
    for key in spec.date_keys:
        value = resource.get(key)
        if value is not None:
            rng = _value_range(value)
            if rng is not None:
                lo, hi = rng
            break
    return IndexValues(list(out), strings, lo, hi)


def _walk(node: dict, path: tuple[str, ...]) -> list[Any]:
    cur: list[Any] = [node]
    for key in path:
        nxt: list[Any] = []
        for n in cur:
            if isinstance(n, dict):
                v = n.get(key)
                if isinstance(v, list):
                    nxt.extend(v)
                elif v is not None:
                    nxt.append(v)
        if not nxt:
            return nxt
        cur = nxt
    return cur


def _cap(token: str) -> str:
    if len(token) <= _TOKEN_MAX:
        return token
    return token[:400] + "#" + hashlib.sha256(token.encode()).hexdigest()


def _put_code(prefix: str, system: Any, code: Any, out: dict[str, None]) -> None:
    if isinstance(code, bool):
        code = "true" if code else "false"
    elif not isinstance(code, str) or not code:
        return
    if isinstance(system, str) and system:
        out[_cap(f"{prefix}{system}|{code}")] = None
        out[_cap(f"{prefix}{system}|")] = None
    else:
        out[_cap(f"{prefix}|{code}")] = None
    out[_cap(f"{prefix}*|{code}")] = None


def _emit_code(tok: _Tok, values: Any, out: dict[str, None]) -> None:
    prefix = tok.param + ":"
    for v in values:
        _put_code(prefix, None, v, out)


def _emit_coding(tok: _Tok, values: Any, out: dict[str, None]) -> None:
    prefix = tok.param + ":"
    for c in values:
        if isinstance(c, dict):
            _put_code(prefix, c.get("system"), c.get("code"), out)


def _emit_concept(tok: _Tok, values: Any, out: dict[str, None]) -> None:
    prefix = tok.param + ":"
    for cc in values:
        if isinstance(cc, dict):
            for c in cc.get("coding") or ():
                if isinstance(c, dict):
                    _put_code(prefix, c.get("system"), c.get("code"), out)


def _emit_identifier(tok: _Tok, values: Any, out: dict[str, None]) -> None:
    prefix = tok.param + ":"
    for ident in values:
        if isinstance(ident, dict):
            _put_code(prefix, ident.get("system"), ident.get("value"), out)


_REF_RE = re.compile(r"([A-Z][A-Za-z]{1,63})/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?")


def _emit_ref(tok: _Tok, values: Any, out: dict[str, None]) -> None:
    param, target = tok.param, tok.target
    for ref in values:
        if not isinstance(ref, dict):
            continue
        r = ref.get("reference")
        if isinstance(r, str):
            m = _REF_RE.fullmatch(r)
            if m is not None and (target is None or m[1] == target):
                out[f"{param}:{m[1]}/{m[2]}"] = None
                out[f"{param}:{m[2]}"] = None
        ident = ref.get("identifier")
        if isinstance(ident, dict) and (target is None or ref.get("type") == target):
            _put_code(f"{param}:identifier:", ident.get("system"), ident.get("value"), out)


_EMIT = {
    "code": _emit_code,
    "coding": _emit_coding,
    "concept": _emit_concept,
    "identifier": _emit_identifier,
    "ref": _emit_ref,
}


def normalize(value: str) -> str:
    """Lower-case and strip accents (NFKD), the form `resource_string.value` holds."""
    if value.isascii():
        return value.strip().lower()
    decomposed = unicodedata.normalize("NFKD", value)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).strip().lower()


def _strings(resource: dict, names: str) -> list[tuple[str, str]]:
    out: dict[tuple[str, str], None] = {}

    def put(param: str, value: Any) -> None:
        if isinstance(value, str) and value:
            n = normalize(value)[:_STRING_MAX]
            if n:
                # `name` searches also read the family/given rows (search.NAME_PARTS), so a
                # part is stored once: half the string rows to write.
                out[(param, n)] = None

    if names == "plain":
        put("name", resource.get("name"))
        for alias in resource.get("alias") or ():
            put("name", alias)
        return list(out)
    parts = names == "human"
    hns = resource.get("name")
    for hn in hns if isinstance(hns, list) else ():
        if not isinstance(hn, dict):
            continue
        put("family" if parts else "name", hn.get("family"))
        for g in hn.get("given") or ():
            put("given" if parts else "name", g)
        put("name", hn.get("text"))
        for p in hn.get("prefix") or ():
            put("name", p)
        for s in hn.get("suffix") or ():
            put("name", s)
    return list(out)


# --------------------------------------------------------------------------- dates

_DATE_RE = re.compile(
    r"(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(\.\d+)?)?"
    r"(Z|[+-]\d{2}:\d{2})?)?)?)?"
)


def date_range(text: str) -> tuple[datetime, datetime] | None:
    """Inclusive UTC range a FHIR date / dateTime / instant covers; None if it is not one."""
    n = len(text)
    try:
        if n == 10 and text[4] == "-" and text[7] == "-":
            lo = datetime(int(text[:4]), int(text[5:7]), int(text[8:10]), tzinfo=UTC)
            return lo, _end(lo + timedelta(days=1))
        if n >= 19 and text[10] == "T" and text[13] == ":" and text[16] == ":":
            lo = _utc(datetime.fromisoformat(text))
            if n > 19 and text[19] == ".":
                return lo, lo
            return lo, lo + timedelta(microseconds=999_999)
        m = _DATE_RE.fullmatch(text)
        if m is None:
            return None
        year, month, day, hour, minute = m[1], m[2], m[3], m[4], m[5]
        if month is None:
            lo = datetime(int(year), 1, 1, tzinfo=UTC)
            return lo, _end(_add_years(lo, 1))
        if day is None:
            lo = datetime(int(year), int(month), 1, tzinfo=UTC)
            nxt = (
                _add_years(lo, 1).replace(month=1)
                if lo.month == 12
                else lo.replace(month=lo.month + 1)
            )
            return lo, _end(nxt)
        if hour is None:
            lo = datetime(int(year), int(month), int(day), tzinfo=UTC)
            return lo, _end(lo + timedelta(days=1))
        # Minute precision (search values may omit seconds).
        tz = m[8]
        lo = _utc(datetime.fromisoformat(f"{year}-{month}-{day}T{hour}:{minute}:00{tz or ''}"))
        return lo, lo + timedelta(seconds=59, microseconds=999_999)
    except (ValueError, OverflowError):
        return None


def _utc(value: datetime) -> datetime:
    # search.html: a dateTime without a zone is taken in the server's zone, which is UTC.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _add_years(value: datetime, years: int) -> datetime | None:
    try:
        return value.replace(year=value.year + years)
    except ValueError:
        return None


def _end(next_start: datetime | None) -> datetime:
    return MAX_DT if next_start is None else next_start - _MICRO


def _value_range(value: Any) -> tuple[datetime, datetime] | None:
    if isinstance(value, str):
        return date_range(value)
    if isinstance(value, dict):  # Period
        start, end = value.get("start"), value.get("end")
        lo = date_range(start) if isinstance(start, str) else None
        hi = date_range(end) if isinstance(end, str) else None
        if lo is None and hi is None:
            return None
        return (lo[0] if lo else MIN_DT), (hi[1] if hi else MAX_DT)
    return None


# --------------------------------------------------------------------------- queries


@dataclass(slots=True)
class TokenClause:
    """`tokens` holds any of `any_of` (comma = OR); with `negate`, holds none of them."""

    param: str
    any_of: list[str]
    negate: bool = False


@dataclass(slots=True)
class StringClause:
    """Normalised string match: mode prefix | contains | exact; `values` are OR-ed."""

    param: str
    mode: str
    values: list[str]  # normalised
    originals: list[str]  # as sent, for :exact


@dataclass(slots=True)
class DateRange:
    prefix: str  # eq ne lt le gt ge sa eb ap (ap: lo/hi already widened)
    lo: datetime
    hi: datetime


@dataclass(slots=True)
class DateClause:
    """`param` is `_lastUpdated` (column last_updated) or the type's date parameter."""

    param: str
    ranges: list[DateRange]  # OR


@dataclass(slots=True)
class MissingClause:
    """`:missing` on a string or date parameter (tokens use a presence-marker TokenClause)."""

    param: str
    kind: str  # string | date
    missing: bool


@dataclass(slots=True)
class IdClause:
    ids: list[str]


Clause = TokenClause | StringClause | DateClause | MissingClause | IdClause


@dataclass(slots=True)
class Query:
    """A parsed search: AND of `clauses`, plus paging and what was applied or ignored."""

    resource_type: str
    clauses: list[Clause] = field(default_factory=list)
    count: int | None = None  # `_count` as asked; None = the server default
    offset: int = 0
    total: bool = True  # `_total=none` turns the count off
    applied: list[tuple[str, str]] = field(default_factory=list)  # for the self link
    ignored: list[tuple[str, str]] = field(default_factory=list)  # lenient mode only


# Parameters that shape the result rather than select; understood by every type.
_RESULT_PARAMS = {"_count", "_offset", "_total", "_summary", "_format", "_pretty"}
_DATE_PREFIXES = {"eq", "ne", "lt", "le", "gt", "ge", "sa", "eb", "ap"}
_TYPE_MODIFIER_RE = re.compile(r"[A-Z][A-Za-z]{1,63}")


def parse_query(resource_type: str, params: list[tuple[str, str]], *, strict: bool) -> Query:
    """Parse decoded `(name, value)` pairs of a search on `resource_type`.

    strict=True (conditional operations, `Prefer: handling=strict`): any unknown or unsupported
    parameter is a `BadRequest` naming it. strict=False: such parameters are skipped and listed
    in `Query.ignored`. Bad values and unsupported modifiers are a `BadRequest` either way.
    """
    spec = _SPECS.get(resource_type, _GENERIC)
    q = Query(resource_type)
    for raw_name, value in params:
        name, _, modifier = raw_name.partition(":")
        if name in _RESULT_PARAMS:
            _result_param(q, raw_name, name, value, strict)
            continue
        kind = spec.types.get(name)
        if kind is None:
            if strict:
                raise BadRequest(
                    f"Search parameter '{raw_name}' is not supported for {resource_type}",
                    expression=raw_name,
                    code="not-supported",
                )
            q.ignored.append((raw_name, value))
            continue
        if value == "":
            # search.html: empty parameters are ignored; a conditional operation must not
            # silently widen to "everything", so strict mode refuses them.
            if strict:
                raise BadRequest(f"Search parameter '{raw_name}' has no value", expression=raw_name)
            continue
        if modifier == "missing" and name not in ("_id", "_lastUpdated"):
            q.clauses.append(_parse_missing(name, kind, raw_name, value))
        elif name == "_id":
            _no_modifier(raw_name, modifier)
            q.clauses.append(IdClause([_unescape(v) for v in _split_or(value) if v]))
        elif kind == "token":
            q.clauses.append(_parse_token(name, modifier, raw_name, value))
        elif kind == "reference":
            q.clauses.append(_parse_reference(name, modifier, raw_name, value))
        elif kind == "string":
            q.clauses.append(_parse_string(name, modifier, raw_name, value))
        else:
            _no_modifier(raw_name, modifier)
            q.clauses.append(DateClause(name, [_parse_date(raw_name, v) for v in value.split(",")]))
        q.applied.append((raw_name, value))
    return q


# FHIR's integer is 32-bit: a page size or offset beyond it is not a number we answer to.
MAX_PAGING_INT = 2**31 - 1
_DIGITS = re.compile(r"[0-9]{1,10}")


def paging_int(name: str, value: str, expression: str) -> int:
    """`_count` / `_offset` as an int from 0 to MAX_PAGING_INT; anything else is a 400."""
    n = int(value) if _DIGITS.fullmatch(value) else -1
    if not 0 <= n <= MAX_PAGING_INT:
        raise BadRequest(
            f"'{name}' must be an integer from 0 to {MAX_PAGING_INT}, got {value[:40]!r}",
            expression=expression,
        )
    return n


def _result_param(q: Query, raw_name: str, name: str, value: str, strict: bool) -> None:
    if name in ("_format", "_pretty") or value == "":
        return
    if name in ("_count", "_offset"):
        _no_modifier(raw_name, raw_name[len(name) :].lstrip(":"))
        n = paging_int(name, value, name)
        if name == "_count":
            q.count = n
        else:
            q.offset = n
        return
    if name == "_total" and value in ("none", "estimate", "accurate"):
        q.total = value != "none"
        q.applied.append((name, value))
        return
    if name == "_summary" and value in ("count", "false"):
        if value == "count":
            q.count = 0
        q.applied.append((name, value))
        return
    if strict:
        raise BadRequest(
            f"'{raw_name}={value}' is not supported", expression=raw_name, code="not-supported"
        )
    q.ignored.append((raw_name, value))


def _no_modifier(raw_name: str, modifier: str) -> None:
    if modifier:
        _bad_modifier(raw_name, modifier)


def _bad_modifier(raw_name: str, modifier: str) -> None:
    raise BadRequest(
        f"Modifier ':{modifier}' is not supported on search parameter '{raw_name}'",
        expression=raw_name,
        code="not-supported",
    )


def _bad_value(raw_name: str, value: str, why: str) -> BadRequest:
    return BadRequest(
        f"Invalid value '{value}' for search parameter '{raw_name}': {why}",
        expression=raw_name,
        code="value",
    )


def _split_or(value: str) -> list[str]:
    """Split on commas not escaped by a backslash (escapes are kept for later splits)."""
    if "\\" not in value:
        return value.split(",")
    parts, cur, i = [], [], 0
    while i < len(value):
        ch = value[i]
        if ch == "\\" and i + 1 < len(value):
            cur.append(value[i : i + 2])
            i += 2
            continue
        if ch == ",":
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return parts


def _split_pipe(value: str) -> tuple[str, bool, str]:
    """`system|code` → (system, True, code) on the first unescaped `|`."""
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "|":
            return value[:i], True, value[i + 1 :]
        i += 1
    return "", False, value


def _unescape(value: str) -> str:
    if "\\" not in value:
        return value
    return re.sub(r"\\(.)", r"\1", value)


def _parse_missing(name: str, kind: str, raw_name: str, value: str) -> Clause:
    if value not in ("true", "false"):
        raise _bad_value(raw_name, value, "expected true or false")
    missing = value == "true"
    if kind in ("token", "reference"):
        return TokenClause(name, [name + ":"], negate=missing)
    return MissingClause(name, kind, missing)


def _token_of(prefix: str, raw_name: str, v: str) -> str:
    system, bar, code = _split_pipe(v)
    system, code = _unescape(system), _unescape(code)
    if not bar:
        if not code:
            raise _bad_value(raw_name, v, "empty code")
        return _cap(f"{prefix}*|{code}")
    if not system and not code:
        raise _bad_value(raw_name, v, "expected [system]|[code]")
    return _cap(f"{prefix}{system}|{code}")


def _parse_token(name: str, modifier: str, raw_name: str, value: str) -> TokenClause:
    if modifier not in ("", "not"):
        _bad_modifier(raw_name, modifier)
    toks = [_token_of(name + ":", raw_name, v) for v in _split_or(value)]
    return TokenClause(name, toks, negate=modifier == "not")


_ABSOLUTE_REF_RE = re.compile(
    r"[a-z][a-z0-9+.\-]*://.+/([A-Z][A-Za-z]{1,63}/[A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?"
)


def _parse_reference(name: str, modifier: str, raw_name: str, value: str) -> TokenClause:
    if modifier == "identifier":
        toks = [_token_of(f"{name}:identifier:", raw_name, v) for v in _split_or(value)]
        return TokenClause(name, toks)
    if modifier and not _TYPE_MODIFIER_RE.fullmatch(modifier):
        _bad_modifier(raw_name, modifier)
    toks = []
    for v in _split_or(value):
        v = _unescape(v)
        m = _REF_RE.fullmatch(v)
        if m is None:
            # An absolute URL is matched by its trailing Type/id: only local references are
            # indexed, so a URL can only mean one of ours.
            a = _ABSOLUTE_REF_RE.fullmatch(v)
            m = _REF_RE.fullmatch(a[1]) if a else None
        if m is not None:
            if modifier and m[1] != modifier:
                raise _bad_value(raw_name, v, f"reference is not to a {modifier}")
            toks.append(f"{name}:{m[1]}/{m[2]}")
        elif re.fullmatch(r"[A-Za-z0-9\-.]{1,64}", v):
            toks.append(f"{name}:{modifier}/{v}" if modifier else f"{name}:{v}")
        else:
            raise _bad_value(raw_name, v, "expected an id, Type/id or a URL ending in Type/id")
    return TokenClause(name, toks)


def _parse_string(name: str, modifier: str, raw_name: str, value: str) -> StringClause:
    if modifier not in ("", "exact", "contains"):
        _bad_modifier(raw_name, modifier)
    originals = [_unescape(v) for v in _split_or(value)]
    values = [normalize(v)[:_STRING_MAX] for v in originals]
    if not all(values):
        raise _bad_value(raw_name, value, "empty string")
    return StringClause(name, modifier or "prefix", values, originals)


def _parse_date(raw_name: str, value: str) -> DateRange:
    prefix, text = "eq", value
    if len(value) > 2 and value[:2] in _DATE_PREFIXES:
        prefix, text = value[:2], value[2:]
    # A '+' in a query-string offset arrives decoded as a space.
    text = text.replace(" ", "+")
    rng = date_range(text)
    if rng is None:
        raise _bad_value(raw_name, value, "expected [prefix]YYYY[-MM[-DD[Thh:mm[:ss][zone]]]]")
    lo, hi = rng
    if prefix == "ap":
        # search.html leaves "approximately" to the server: 10% of the distance to now.
        now = datetime.now(UTC)
        gap = max(abs(now - lo), abs(now - hi)) / 10
        lo = lo - gap if lo - MIN_DT > gap else MIN_DT
        hi = hi + gap if MAX_DT - hi > gap else MAX_DT
    return DateRange(prefix, lo, hi)
