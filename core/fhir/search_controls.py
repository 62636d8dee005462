"""The result side of a search request: paging, totals, summaries, element subsets, sorting and
includes (`Controls`), and the joins to other types (chains and `_has`, `Join`).

`split_search` reads the decoded `(name, value)` pairs of a search, takes out everything this
module owns and hands the rest to `core.fhir.search_params.parse_query`. Pure: no database.
`core.fhir.search` turns the result into SQL.

Parameters (FHIR R4 search.html):

- `_count` (0 .. max, capped at the server's maximum), `_offset` (kept for compatibility) and
  `_cursor` (the opaque keyset position the `next` link carries, `core.fhir.search_cursor`).
- `_total=accurate|estimate|none` (an estimate is the planner's, for searches without
  criteria), `_summary=count|true|text|data|false`, `_elements=a,b` (core.fhir.search_shape).
- `_sort=a,-b`: `_id`, `_lastUpdated` and the type's string, token, reference, uri, date,
  number and quantity parameters; the resource id breaks ties.
- `_include` / `_revinclude` `=Type:param[:Target]` or `Type:*`, `:iterate`
  (one level: the included resources' own includes, no further).
- Chains `ref:Type.param=v` / `ref.param=v` (one level) and `_has:Type:ref:param=v` (one
  level); the inner `param` is any search parameter of the other type, with its modifiers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from core.errors import BadRequest, FhirError
from core.fhir.search_params import Query, paging_int, parse_query
from core.fhir.search_registry import params_for

__all__ = [
    "Controls",
    "Include",
    "Join",
    "SortKey",
    "SearchRequest",
    "index_name",
    "param_types",
    "reference_targets",
    "split_search",
]

_TYPE_RE = re.compile(r"[A-Z][A-Za-z]{1,63}")
_PARAM_RE = re.compile(r"[a-z_][a-z0-9\-_]{0,63}|[a-z][A-Za-z0-9\-]{0,63}")
_SUMMARIES = ("count", "true", "text", "data", "false")
_TOTALS = ("accurate", "estimate", "none")
# Result parameters that only change how the response is written.
_FORMAT = ("_format", "_pretty")
# Sortable beyond the type's own parameters.
_SORT_COMMON = {"_id": "token", "_lastUpdated": "date"}
_SORT_TYPES = frozenset({"string", "token", "reference", "uri", "date", "number", "quantity"})


@dataclass(frozen=True, slots=True)
class SortKey:
    param: str
    kind: str  # the parameter's FHIR search type
    descending: bool


@dataclass(frozen=True, slots=True)
class Include:
    """`_include` (`reverse` False) or `_revinclude`: resources `source` points at by `param`
    (the name its values are stored under; every reference parameter for `*`), narrowed to
    `target` when given."""

    source: str
    param: str
    target: str | None
    reverse: bool
    iterate: bool
    text: str  # as sent, for links and messages


@dataclass(slots=True)
class Join:
    """A condition on another type: a chain (`reverse` False: this type's `param` references a
    `target` resource matching `query`) or `_has` (a `target` resource matching `query`
    references this one by its `param`); `param` is the name its values are stored under."""

    param: str
    target: str
    query: Query
    reverse: bool
    text: str  # the parameter as sent


@dataclass(slots=True)
class Controls:
    count: int | None = None
    offset: int = 0
    cursor: str | None = None
    total: str = "accurate"
    summary: str | None = None
    elements: list[str] | None = None
    sort: list[SortKey] = field(default_factory=list)
    includes: list[Include] = field(default_factory=list)


@dataclass(slots=True)
class SearchRequest:
    query: Query
    controls: Controls
    joins: list[Join]
    # Everything but paging, as sent, for the self / first / next links.
    link_params: list[tuple[str, str]]


def param_types(resource_type: str) -> dict[str, str]:
    """Supported search parameter name → FHIR type, from the R4 registry."""
    return {name: p.type for name, p in params_for(resource_type).items() if p.supported}


def reference_targets(resource_type: str, param: str) -> tuple[str, ...]:
    """The resource types reference parameter `param` of `resource_type` may point at."""
    p = params_for(resource_type).get(param)
    return p.targets if p is not None else ()


def index_name(resource_type: str, param: str) -> str:
    """The name `param`'s values are stored under (parameters with the same paths share)."""
    p = params_for(resource_type).get(param)
    return (p.index_name or param) if p is not None else param


def split_search(
    resource_type: str, params: list[tuple[str, str]], *, strict: bool,
    base_url: str | None = None,
) -> SearchRequest:
    """Parse a search on `resource_type`; bad result parameters are a `BadRequest` naming
    them, in either mode (they are not criteria a lenient search could drop). `base_url`:
    this server's, so that a reference given as one of its URLs is a local one."""
    controls = Controls()
    joins: list[Join] = []
    filters: list[tuple[str, str]] = []
    links: list[tuple[str, str]] = []
    types = param_types(resource_type)
    for raw_name, value in params:
        name, _, modifier = raw_name.partition(":")
        if name in _FORMAT:
            continue
        if name in ("_count", "_offset", "_cursor"):
            _paging(controls, raw_name, name, modifier, value)
            continue
        if name in _CONTROLS:
            if value != "":
                _CONTROLS[name](controls, resource_type, raw_name, modifier, value)
                links.append((raw_name, value))
            continue
        if name == "_has":
            joins.append(_has(resource_type, raw_name, value))
            links.append((raw_name, value))
            continue
        chain = _chain_parts(name, modifier)
        if chain is not None and types.get(chain[0]) == "reference":
            joins.append(_chain(resource_type, raw_name, value, *chain))
            links.append((raw_name, value))
            continue
        filters.append((raw_name, value))
    query = parse_query(resource_type, filters, strict=strict, base_url=base_url)
    links[:0] = query.applied
    return SearchRequest(query, controls, joins, links)


# --------------------------------------------------------------------------- paging


def _paging(c: Controls, raw_name: str, name: str, modifier: str, value: str) -> None:
    if modifier:
        raise _bad(raw_name, f"'{name}' takes no modifier")
    if value == "":
        return
    if name == "_cursor":
        c.cursor = value
    elif name == "_count":
        c.count = paging_int(name, value, name)
    else:
        c.offset = paging_int(name, value, name)
    if c.cursor is not None and c.offset:
        raise _bad(raw_name, "'_cursor' and '_offset' cannot be combined: the cursor is the "
                   "position")


# --------------------------------------------------------------------------- shaping


def _total(c: Controls, _t: str, raw_name: str, modifier: str, value: str) -> None:
    _no_modifier(raw_name, modifier)
    if value not in _TOTALS:
        raise _bad(raw_name, f"expected one of {', '.join(_TOTALS)}, got {value[:40]!r}")
    c.total = value


def _summary(c: Controls, _t: str, raw_name: str, modifier: str, value: str) -> None:
    _no_modifier(raw_name, modifier)
    if value not in _SUMMARIES:
        raise _bad(raw_name, f"expected one of {', '.join(_SUMMARIES)}, got {value[:40]!r}")
    c.summary = None if value == "false" else value


_ELEMENT_RE = re.compile(r"(?:[A-Z][A-Za-z]{1,63}\.)?([a-z][A-Za-z0-9]{0,63})(?:\[x\])?")


def _elements(c: Controls, resource_type: str, raw_name: str, modifier: str, value: str) -> None:
    _no_modifier(raw_name, modifier)
    names: list[str] = []
    for part in value.split(","):
        m = _ELEMENT_RE.fullmatch(part.strip())
        if m is None:
            raise _bad(raw_name, f"{part[:64]!r} is not an element name")
        qualified, _, _ = part.strip().partition(".")
        if "." in part and qualified != resource_type:
            continue  # `Observation.code` on a Patient search names nothing of Patient
        names.append(m[1])
    c.elements = [*(c.elements or ()), *names]


def _sort(c: Controls, resource_type: str, raw_name: str, modifier: str, value: str) -> None:
    _no_modifier(raw_name, modifier)
    types = {**_SORT_COMMON, **param_types(resource_type)}
    for part in value.split(","):
        descending = part.startswith("-")
        param = part[1:] if descending else part
        kind = types.get(param)
        if kind is None or kind not in _SORT_TYPES:
            raise BadRequest(
                f"'_sort' on {param[:64]!r} is not supported for {resource_type}"
                + ("" if kind is None else f" (a {kind} parameter)"),
                expression=raw_name,
                code="not-supported",
            )
        if any(k.param == param for k in c.sort):
            raise _bad(raw_name, f"{param!r} is sorted on twice")
        c.sort.append(SortKey(param, kind, descending))


def _include(c: Controls, resource_type: str, raw_name: str, modifier: str, value: str) -> None:
    name = raw_name.partition(":")[0]
    reverse = name == "_revinclude"
    if modifier not in ("", "iterate", "recurse"):
        raise _bad(raw_name, f"unknown modifier ':{modifier}'")
    iterate = modifier != ""
    parts = value.split(":")
    if len(parts) not in (2, 3) or not _TYPE_RE.fullmatch(parts[0]):
        raise _bad(raw_name, f"expected Type:param[:Target], got {value[:80]!r}")
    source, param = parts[0], parts[1]
    target = parts[2] if len(parts) == 3 else None
    if target is not None and not _TYPE_RE.fullmatch(target):
        raise _bad(raw_name, f"{target[:64]!r} is not a resource type")
    if param == "*" and reverse:
        # Every reference parameter of the source that may point at what it starts from.
        names = [n for n, kind in param_types(source).items() if kind == "reference"
                 and (iterate or not (ts := reference_targets(source, n)) or resource_type in ts)]
        for n in names:
            c.includes.append(Include(source, index_name(source, n), target, True, iterate,
                                      value))
        return
    if param != "*" and param_types(source).get(param) != "reference":
        raise _bad(raw_name, f"{param[:64]!r} is not a reference parameter of {source}")
    # Without :iterate an include starts from the matches only, so its side must be the
    # searched type (the source of an _include, the target of a _revinclude).
    if not iterate:
        if not reverse and source != resource_type:
            raise _bad(raw_name, f"'{value}' does not start from {resource_type}; "
                       "add ':iterate' to start from included resources")
        if reverse and target is not None and target != resource_type:
            raise _bad(raw_name, f"'{value}' does not point at {resource_type}")
    stored = param if param == "*" else index_name(source, param)
    c.includes.append(Include(source, stored, target, reverse, iterate, value))


def _no_modifier(raw_name: str, modifier: str) -> None:
    if modifier:
        raise BadRequest(
            f"Modifier ':{modifier}' is not supported on '{raw_name.partition(':')[0]}'",
            expression=raw_name,
            code="not-supported",
        )


def _bad(raw_name: str, why: str) -> BadRequest:
    return BadRequest(f"Invalid '{raw_name}': {why}", expression=raw_name, code="value")


_CONTROLS = {
    "_total": _total,
    "_summary": _summary,
    "_elements": _elements,
    "_sort": _sort,
    "_include": _include,
    "_revinclude": _include,
}


# --------------------------------------------------------------------------- joins


def _chain_parts(name: str, modifier: str) -> tuple[str, str | None, str] | None:
    """`subject.name` → ("subject", None, "name"); `subject:Patient.name:exact` → ("subject",
    "Patient", "name:exact"); None when the name is no chain."""
    if "." in name:
        ref, _, rest = name.partition(".")
        return ref, None, rest + (":" + modifier if modifier else "")
    target, dot, rest = modifier.partition(".")
    if dot and _TYPE_RE.fullmatch(target):
        return name, target, rest
    return None


def _chain(
    resource_type: str, raw_name: str, value: str, ref: str, target: str | None, inner: str
) -> Join:
    if "." in inner.partition(":")[0] or inner.startswith("_has"):
        raise BadRequest(f"'{raw_name}': chains go one level deep",
                         expression=raw_name, code="not-supported")
    targets = reference_targets(resource_type, ref)
    if target is None:
        # Unambiguous when one target type defines the parameter (search.html: the server
        # must otherwise refuse rather than guess).
        inner_name = inner.partition(":")[0]
        having = [t for t in targets if inner_name in param_types(t)]
        if len(having) != 1:
            raise BadRequest(
                f"'{raw_name}' is ambiguous: name the type, e.g. "
                f"'{ref}:{having[0]}.{inner}' ({', '.join(having)} all have '{inner_name}')"
                if having
                else f"'{raw_name}': no type that '{ref}' points at has '{inner_name}'",
                expression=raw_name,
                code="invalid",
            )
        target = having[0]
    elif targets and target not in targets:
        raise _bad(raw_name, f"'{ref}' of {resource_type} does not point at {target}")
    q = _inner_query(target, inner, value, raw_name)
    return Join(index_name(resource_type, ref), target, q, reverse=False, text=raw_name)


def _has(resource_type: str, raw_name: str, value: str) -> Join:
    parts = raw_name.split(":", 3)
    if len(parts) != 4 or not _TYPE_RE.fullmatch(parts[1]) or not parts[2] or not parts[3]:
        raise _bad(raw_name, "expected _has:Type:reference:parameter=value")
    _, source, ref, inner = parts
    if inner.startswith("_has") or "." in inner.partition(":")[0]:
        raise BadRequest(f"'{raw_name}': _has goes one level deep",
                         expression=raw_name, code="not-supported")
    if param_types(source).get(ref) != "reference":
        raise _bad(raw_name, f"{ref!r} is not a reference parameter of {source}")
    targets = reference_targets(source, ref)
    if targets and resource_type not in targets:
        raise _bad(raw_name, f"'{ref}' of {source} does not point at {resource_type}")
    q = _inner_query(source, inner, value, raw_name)
    return Join(index_name(source, ref), source, q, reverse=True, text=raw_name)


def _inner_query(resource_type: str, inner: str, value: str, raw_name: str) -> Query:
    # Strict: an unknown inner parameter cannot be dropped without widening the join.
    try:
        q = parse_query(resource_type, [(inner, value)], strict=True)
    except FhirError as err:
        err.expression = [raw_name]
        raise
    if not q.clauses:  # `subject:Patient._count=1` would join every Patient
        raise _bad(raw_name, f"'{inner}' is not a search criterion of {resource_type}")
    return q
