"""Search queries: the parsing of a search into a `Query` of clauses (`parse_query`), for every
parameter the registry (`core.fhir.search_registry`, HL7's R4 table) supports.

Pure: no database. `core.fhir.search` turns a `Query` into SQL over the index that
`core.fhir.search_index.extract_index` fills at write time (formats documented there; the
names below are re-exported for the callers that import them from here).

Query semantics (FHIR R4 search.html): comma = OR within one parameter, a repeated parameter
= AND.
- token: `code`, `system|code`, `|code`, `system|`; `:not`, `:missing`; `:text` matches the
  start of CodeableConcept.text / Coding.display (case-insensitive; read from the stored JSON,
  so it narrows other criteria rather than driving a search alone).
- reference: `Type/id`, `id`, an absolute URL (one of this server's is its `Type/id`, any
  URL is also matched as written, which is how canonicals are found); `:Type`,
  `:identifier`, `:missing`.
- string: prefix of the normalised value by default, `:contains` anywhere, `:exact` equality
  of the value as sent (normalised via the index, then checked case- and accent-sensitively
  against the stored JSON), `:missing`.
- date: prefixes eq ne lt le gt ge sa eb ap with range semantics on the value's precision.
- number / quantity: the same prefixes; `eq` (no prefix) means within the implicit precision
  of the value as written (`100` is [99.5, 100.5), `1e2` is [50, 150)); a quantity is
  `[prefix]value|system|code` or `value||code` (code or unit).
- uri: equality; `:below` (stored URL starts with the value), `:above` (the value starts
  with the stored URL, on path boundaries); `:missing`.

Unknown and unsupported parameters are ignored (and listed in `Query.ignored`) in lenient mode
and are a 400 in strict mode (conditional operations, `Prefer: handling=strict`). An
unsupported modifier or an unparseable value is a 400 in both modes, as search.html requires.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation

from core.errors import BadRequest
from core.fhir.search_index import (
    MAX_DT,
    MIN_DT,
    REF_RE,
    STRING_MAX,
    STRING_PARTS,
    IndexValues,
    cap,
    date_range,
    extract_index,
    normalize,
)
from core.fhir.search_registry import ElementPath, SearchParam, params_for
from core.fhir.search_registry import supported_params as supported_params

__all__ = [
    "IndexValues",
    "Query",
    "TokenClause",
    "StringClause",
    "DateClause",
    "DateRange",
    "NumberClause",
    "NumberRange",
    "UriBelowClause",
    "TextClause",
    "MissingClause",
    "IdClause",
    "Clause",
    "MIN_DT",
    "MAX_DT",
    "extract_index",
    "paging_int",
    "supported_params",
    "param_types",
    "parse_query",
    "normalize",
    "date_range",
    "exact_paths",
]


def param_types(resource_type: str) -> dict[str, str]:
    """Supported search parameter name → FHIR search type (token, reference, string, ...)."""
    return {n: p.type for n, p in params_for(resource_type).items() if p.supported}


# --------------------------------------------------------------------------- queries


@dataclass(slots=True)
class TokenClause:
    """`tokens` holds any of `any_of` (comma = OR); with `negate`, holds none of them."""

    param: str
    any_of: list[str]
    negate: bool = False


@dataclass(slots=True)
class StringClause:
    """Normalised string match: mode prefix | contains | exact; `values` are OR-ed.
    `names`: the index names of the parameter's `resource_string` rows."""

    param: str
    mode: str
    values: list[str]  # normalised
    originals: list[str]  # as sent, for :exact
    names: tuple[str, ...] = ()
    exact_paths: list[str] = field(default_factory=list)  # jsonpath checks for :exact


@dataclass(slots=True)
class DateRange:
    prefix: str  # eq ne lt le gt ge sa eb ap (ap: lo/hi already widened)
    lo: datetime
    hi: datetime


@dataclass(slots=True)
class DateClause:
    """`param` `_lastUpdated` is the column last_updated; any other reads `resource_date`
    rows of `names`."""

    param: str
    ranges: list[DateRange]  # OR
    names: tuple[str, ...] = ()


@dataclass(slots=True)
class NumberRange:
    """One number or quantity value: `lo` .. `hi` (half-open) is the implicit precision of
    `value` (widened for ap); `system` / `code` restrict a quantity's unit when not None."""

    prefix: str
    value: Decimal
    lo: Decimal
    hi: Decimal
    system: str | None = None
    code: str | None = None


@dataclass(slots=True)
class NumberClause:
    """Number and quantity parameters, on `resource_number` rows of `names`."""

    param: str
    ranges: list[NumberRange]  # OR
    names: tuple[str, ...] = ()


@dataclass(slots=True)
class UriBelowClause:
    """uri `:below`: a stored `{name}:{uri}` token starts with one of `prefixes`."""

    param: str
    prefixes: list[str]  # full token prefixes, "{name}:{value}"


@dataclass(slots=True)
class TextClause:
    """token `:text`: a CodeableConcept.text / Coding.display at `paths` (jsonpath) starts
    with one of `values` (case-insensitive)."""

    param: str
    paths: list[str]
    values: list[str]


@dataclass(slots=True)
class MissingClause:
    """`:missing` on a string, date or number parameter (token, reference and uri
    parameters use a presence-marker TokenClause)."""

    param: str
    kind: str  # string | date | number
    missing: bool
    names: tuple[str, ...] = ()


@dataclass(slots=True)
class IdClause:
    ids: list[str]


Clause = (
    TokenClause | StringClause | DateClause | NumberClause | UriBelowClause | TextClause
    | MissingClause | IdClause
)


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
_PREFIXES = {"eq", "ne", "lt", "le", "gt", "ge", "sa", "eb", "ap"}
_DATE_PREFIXES = _PREFIXES
_TYPE_MODIFIER_RE = re.compile(r"[A-Z][A-Za-z]{1,63}")
_MODIFIERS = {
    "token": ("", "not", "text"),
    "reference": ("", "identifier"),
    "string": ("", "exact", "contains"),
    "uri": ("", "below", "above"),
    "date": ("",),
    "number": ("",),
    "quantity": ("",),
}


def _not_supported(resource_type: str, raw_name: str, why: str = "") -> BadRequest:
    return BadRequest(
        f"Search parameter '{raw_name}' is not supported for {resource_type}{why}",
        expression=raw_name,
        code="not-supported",
    )


def parse_query(
    resource_type: str,
    params: list[tuple[str, str]],
    *,
    strict: bool,
    base_url: str | None = None,
) -> Query:
    """Parse decoded `(name, value)` pairs of a search on `resource_type`.

    strict=True (conditional operations, `Prefer: handling=strict`): any unknown or unsupported
    parameter is a `BadRequest` naming it. strict=False: such parameters are skipped and listed
    in `Query.ignored`. Bad values and unsupported modifiers are a `BadRequest` either way.
    `base_url`, when known, is this server's: absolute references under it are local ones.
    """
    registry = params_for(resource_type)
    q = Query(resource_type)
    for raw_name, value in params:
        name, _, modifier = raw_name.partition(":")
        if name in _RESULT_PARAMS:
            _result_param(q, raw_name, name, value, strict)
            continue
        p = registry.get(name)
        if p is None or not p.supported:
            if strict:
                why = f" ({p.reason})" if p is not None and p.reason else ""
                raise _not_supported(resource_type, raw_name, why)
            q.ignored.append((raw_name, value))
            continue
        if value == "":
            # search.html: empty parameters are ignored; a conditional operation must not
            # silently widen to "everything", so strict mode refuses them.
            if strict:
                raise BadRequest(f"Search parameter '{raw_name}' has no value", expression=raw_name)
            continue
        q.clauses.append(parse_clause(p, modifier, raw_name, value, base_url=base_url))
        q.applied.append((raw_name, value))
    return q


def parse_clause(
    p: SearchParam, modifier: str, raw_name: str, value: str, *, base_url: str | None = None
) -> Clause:
    """One `name[:modifier]=value` of a supported parameter `p` as a clause (chains and `_has`
    parse their inner parameter with this too)."""
    if modifier == "missing" and p.column is None:
        return _parse_missing(p, raw_name, value)
    if p.name == "_id":
        _no_modifier(raw_name, modifier)
        return IdClause([_unescape(v) for v in _split_or(value) if v])
    if p.name == "_lastUpdated":
        _no_modifier(raw_name, modifier)
        return DateClause(p.name, [_parse_date(raw_name, v) for v in value.split(",")])
    kind = p.type
    if kind == "reference":
        if modifier != "identifier" and modifier and not _TYPE_MODIFIER_RE.fullmatch(modifier):
            _bad_modifier(raw_name, modifier)
        if modifier and modifier != "identifier" and p.targets and modifier not in p.targets:
            raise _bad_value(raw_name, modifier, f"'{p.name}' does not refer to {modifier}")
        return _parse_reference(p, modifier, raw_name, value, base_url)
    if modifier not in _MODIFIERS[kind]:
        _bad_modifier(raw_name, modifier)
    if kind == "token":
        if modifier == "text":
            return _parse_text(p, raw_name, value)
        return _parse_token(p, modifier, raw_name, value)
    if kind == "string":
        return _parse_string(p, modifier, raw_name, value)
    if kind == "uri":
        return _parse_uri(p, modifier, raw_name, value)
    if kind == "date":
        return DateClause(p.name, [_parse_date(raw_name, v) for v in value.split(",")],
                          p.index_names)
    return NumberClause(
        p.name, [_parse_number(raw_name, v, kind == "quantity") for v in _split_or(value)],
        p.index_names,
    )


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


def _parse_missing(p: SearchParam, raw_name: str, value: str) -> Clause:
    if value not in ("true", "false"):
        raise _bad_value(raw_name, value, "expected true or false")
    missing = value == "true"
    if p.type in ("token", "reference", "uri"):
        return TokenClause(p.name, [n + ":" for n in p.index_names], negate=missing)
    kind = "number" if p.type in ("number", "quantity") else p.type
    return MissingClause(p.name, kind, missing, p.index_names)


def _token_of(prefix: str, raw_name: str, v: str, systemless: bool = False) -> str:
    system, bar, code = _split_pipe(v)
    system, code = _unescape(system), _unescape(code)
    if not bar:
        if not code:
            raise _bad_value(raw_name, v, "empty code")
        # Values without a system are stored as `|code` only (see the index formats).
        return cap(f"{prefix}|{code}" if systemless else f"{prefix}*|{code}")
    if not system and not code:
        raise _bad_value(raw_name, v, "expected [system]|[code]")
    return cap(f"{prefix}{system}|{code}")


def _parse_token(p: SearchParam, modifier: str, raw_name: str, value: str) -> TokenClause:
    toks = [
        _token_of(n + ":", raw_name, v, p.systemless)
        for v in _split_or(value) for n in p.index_names
    ]
    return TokenClause(p.name, toks, negate=modifier == "not")


_ABSOLUTE_REF_RE = re.compile(
    r"[a-z][a-z0-9+.\-]*://.+/([A-Z][A-Za-z]{1,63}/[A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?"
)
_ID_RE = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_URL_RE = re.compile(r"[a-z][a-z0-9+.\-]*:\S+")


def _parse_reference(
    p: SearchParam, modifier: str, raw_name: str, value: str, base_url: str | None
) -> TokenClause:
    names = p.index_names
    if modifier == "identifier":
        toks = [_token_of(f"{n}:identifier:", raw_name, v) for v in _split_or(value) for n in names]
        return TokenClause(p.name, toks)
    toks = []
    base = base_url.rstrip("/") + "/" if base_url else None
    for v in _split_or(value):
        v = _unescape(v)
        forms = _reference_forms(v, modifier, raw_name, base)
        toks.extend(cap(f"{n}:{f}") for f in forms for n in names)
    return TokenClause(p.name, toks)


def _reference_forms(v: str, modifier: str, raw_name: str, base: str | None) -> list[str]:
    """The stored token suffixes that `v` may match (see the reference format)."""
    m = REF_RE.fullmatch(v)
    if m is not None:
        if modifier and m[1] != modifier:
            raise _bad_value(raw_name, v, f"reference is not to a {modifier}")
        return [f"{m[1]}/{m[2]}"]
    if _ID_RE.fullmatch(v):
        return [f"{modifier}/{v}" if modifier else v]
    if _URL_RE.fullmatch(v):
        forms = [v]
        # A URL of this server (or, when the server's base is not known, any URL ending in
        # Type/id) is a local reference too.
        a = _ABSOLUTE_REF_RE.fullmatch(v)
        if a is not None and (base is None or v.startswith(base)):
            local = REF_RE.fullmatch(a[1])
            if local is not None and not (modifier and local[1] != modifier):
                forms.insert(0, f"{local[1]}/{local[2]}")
        return forms
    raise _bad_value(raw_name, v, "expected an id, Type/id or a URL")


def _parse_string(p: SearchParam, modifier: str, raw_name: str, value: str) -> StringClause:
    originals = [_unescape(v) for v in _split_or(value)]
    values = [normalize(v)[:STRING_MAX] for v in originals]
    if not all(values):
        raise _bad_value(raw_name, value, "empty string")
    paths = exact_paths(p) if modifier == "exact" else []
    return StringClause(p.name, modifier or "prefix", values, originals, p.index_names, paths)


def _jsonpath(path: ElementPath) -> str:
    """`path` as a lax-mode SQL/JSON path (arrays on the way are unwrapped by lax mode)."""
    out = "$"
    for key, where in path.steps:
        out += f'."{key}"'
        if where is not None:
            out += f' ? (@."{where[0]}" == "{where[1]}")'
    return out


def exact_paths(p: SearchParam) -> list[str]:
    """jsonpath predicates (variable `$v`: the values sent) that hold when the stored JSON has
    one of the values, exactly, where string parameter `p` reads."""
    out = []
    for path in p.paths:
        parts = STRING_PARTS.get(path.leaf)
        if parts is None:
            out.append(_jsonpath(path) + " ? (@ == $v)")
        else:
            test = " || ".join(f'@."{k}" == $v' for k in parts)
            out.append(f"{_jsonpath(path)} ? ({test})")
    return out


def _parse_text(p: SearchParam, raw_name: str, value: str) -> TextClause:
    paths = []
    for path in p.paths:
        base = _jsonpath(path)
        if path.leaf == "CodeableConcept":
            paths += [base + '."text"', base + '."coding"."display"']
        elif path.leaf == "Coding":
            paths.append(base + '."display"')
    if not paths:
        _bad_modifier(raw_name, "text")
    values = [_unescape(v) for v in _split_or(value)]
    if not all(values):
        raise _bad_value(raw_name, value, "empty text")
    return TextClause(p.name, paths, values)


def _parse_uri(p: SearchParam, modifier: str, raw_name: str, value: str) -> Clause:
    values = [_unescape(v) for v in _split_or(value)]
    if not all(values):
        raise _bad_value(raw_name, value, "empty uri")
    names = p.index_names
    if modifier == "below":
        return UriBelowClause(p.name, [f"{n}:{v}" for v in values for n in names])
    if modifier == "above":
        # Every ancestor of the value on a path boundary, the value itself included.
        toks = []
        for v in values:
            scheme_end = v.find("://")
            start = scheme_end + 3 if scheme_end >= 0 else 0
            cuts = [i for i in range(start, len(v)) if v[i] == "/"]
            toks += [cap(f"{n}:{v[:i]}") for i in cuts for n in names]
            toks += [cap(f"{n}:{v}") for n in names]
        return TokenClause(p.name, list(dict.fromkeys(toks)))
    return TokenClause(p.name, [cap(f"{n}:{v}") for v in values for n in names])


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


_NUMBER_RE = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


def _parse_number(raw_name: str, value: str, quantity: bool) -> NumberRange:
    text = value
    system: str | None = None
    code: str | None = None
    if quantity:
        number, bar, rest = _split_pipe(value)
        if bar:
            text = number
            sys_part, bar2, code_part = _split_pipe(rest)
            if not bar2:
                raise _bad_value(raw_name, value, "expected [prefix]value[|system|code]")
            system = _unescape(sys_part) or None
            code = _unescape(code_part) or None
    elif "|" in value:
        raise _bad_value(raw_name, value, "a number has no unit")
    prefix = "eq"
    if len(text) > 2 and text[:2] in _PREFIXES:
        prefix, text = text[:2], text[2:]
    if not _NUMBER_RE.fullmatch(text):
        raise _bad_value(raw_name, value, "expected [prefix]number")
    try:
        d = Decimal(text)
    except InvalidOperation:
        raise _bad_value(raw_name, value, "expected [prefix]number") from None
    if not d.is_finite():
        raise _bad_value(raw_name, value, "expected a finite number")
    # search.html: the precision of the value as written is the range it stands for
    # (`100` is 99.5 .. 100.5, `100.00` is 99.995 .. 100.005, `1e2` is 50 .. 150).
    half = Decimal(5).scaleb(d.as_tuple().exponent - 1)
    lo, hi = d - half, d + half
    if prefix == "ap":  # "approximately": 10% of the value
        gap = max(abs(d) / 10, half)
        lo, hi = d - gap, d + gap
    return NumberRange(prefix, d, lo, hi, system, code)
