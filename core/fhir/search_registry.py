"""The search parameters of every R4 resource type, compiled once at import from HL7's table.

Source: `core.fhir.r4.search_parameters()` (HL7's R4 SearchParameter resources: code, type,
FHIRPath expression, reference targets), resolved against the R4 element definitions
(`core.fhir.r4.types()`) so that each expression becomes a few plain JSON paths with the FHIR
type of the values they reach. Nothing evaluates FHIRPath at run time.

Public API (stable; `core.fhir.search_*` and the CapabilityStatement build on it):

- `params_for(resource_type) -> Mapping[str, SearchParam]`: every parameter of the type, the
  `Resource`-level ones (`_id`, `_lastUpdated`, `_tag`, `_profile`, `_security`, `_source`)
  included; unsupported ones are present with `supported=False` and a `reason`. An unknown
  type gets the `Resource`-level parameters only.
- `supported_params(resource_type) -> list[str]`: the names with `supported=True`, sorted.
- `unsupported() -> list[tuple[str, str, str]]`: (type, name, reason) of every R4 parameter
  that is not searchable here, for documentation and tests.
- `SearchParam`: `name`, `type` (token reference string date uri number quantity composite
  special), `expression` (HL7's FHIRPath), `paths` (compiled `ElementPath`s), `targets` (the
  resource types a reference parameter may point to; empty otherwise), `supported`,
  `reason` (why not, or which parts of the expression are not indexed), `column` (`_id`:
  "res_id", `_lastUpdated`: "last_updated"; no index rows) and `index_names`: the names its
  values are stored under, usually `(name,)`. Parameters with identical paths (Patient
  `name` and `phonetic`) share one set of index rows; a union of other parameters' paths
  (Observation `combo-code` = `code` | `component-code`) reads theirs. `extracted` says
  whether writes store values under the parameter's own name.
- `ElementPath`: `steps` (JSON keys from the resource root, each with an optional
  `(element, value)` filter from `.where(element='value')`), `leaf` (the FHIR type code of
  the values reached, e.g. `CodeableConcept`, `dateTime`, `Reference`) and `ref_type`
  (from `.where(resolve() is Type)`: only references to that type count).
  `ElementPath.values(resource)` returns the values it reaches.

The compiled FHIRPath subset: `Type.a.b.c`, `|` unions, `(x as T)`, `x.as(T)`, `x.ofType(T)`
on choice elements (`Observation.value as Quantity` → `valueQuantity`; a choice element
without a cast reaches each of its types), `.where(resolve() is T)`, `.where(e='v')`.
Anything else (`exists()`, indexing, extensions, composite and special parameters) marks the
parameter unsupported; a union keeps the parts that compile and lists the others in `reason`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from types import MappingProxyType
from typing import Any

from core.fhir import r4

__all__ = [
    "ElementPath",
    "SearchParam",
    "LEAF_TYPES",
    "STRING_PARTS",
    "params_for",
    "resource_types",
    "supported_params",
    "unsupported",
    "walk",
]

# The FHIR types each kind of search parameter can index, by the value's type.
LEAF_TYPES: dict[str, frozenset[str]] = {
    "token": frozenset({
        "code", "boolean", "string", "id", "uri", "url", "canonical", "oid", "uuid",
        "Coding", "CodeableConcept", "Identifier", "ContactPoint",
    }),
    "reference": frozenset({"Reference", "canonical", "uri", "url"}),
    "string": frozenset({"string", "markdown", "code", "id", "uri", "HumanName", "Address"}),
    "date": frozenset({"date", "dateTime", "instant", "Period", "Timing"}),
    "uri": frozenset({"uri", "url", "canonical", "oid", "uuid"}),
    "number": frozenset({"integer", "decimal", "positiveInt", "unsignedInt"}),
    "quantity": frozenset({
        "Quantity", "Age", "Duration", "Distance", "Count", "SimpleQuantity", "Money", "Range",
    }),
}

# Token values without a system: a bare `value` and `|value` are the same search on them.
SYSTEMLESS_LEAVES = frozenset({
    "code", "boolean", "string", "id", "uri", "url", "canonical", "oid", "uuid", "ContactPoint",
})

# The parts of a complex value a string parameter reads.
STRING_PARTS: dict[str, tuple[str, ...]] = {
    "HumanName": ("family", "given", "text", "prefix", "suffix"),
    "Address": ("line", "city", "district", "state", "postalCode", "country", "text"),
}

# Parameters that are not element paths: `_id` is the primary key, `_lastUpdated` a column.
_COLUMN_PARAMS = {"_id": "res_id", "_lastUpdated": "last_updated"}


@dataclass(frozen=True, slots=True)
class ElementPath:
    steps: tuple[tuple[str, tuple[str, str] | None], ...]
    leaf: str
    ref_type: str | None = None

    def values(self, resource: dict[str, Any]) -> list[Any]:
        """The values this path reaches in `resource` (arrays flattened, filters applied)."""
        return walk([resource], self.steps)


def walk(cur: list[Any], steps: tuple[tuple[str, tuple[str, str] | None], ...]) -> list[Any]:
    """Follow `steps` (see `ElementPath`) from the nodes `cur`."""
    for key, where in steps:
        nxt: list[Any] = []
        for node in cur:
            if isinstance(node, dict):
                v = node.get(key)
                if isinstance(v, list):
                    nxt.extend(v)
                elif v is not None:
                    nxt.append(v)
        if where is not None:
            k, want = where
            nxt = [n for n in nxt if isinstance(n, dict) and n.get(k) == want]
        if not nxt:
            return nxt
        cur = nxt
    return cur


@dataclass(frozen=True, slots=True)
class SearchParam:
    name: str
    type: str
    expression: str
    paths: tuple[ElementPath, ...] = ()
    targets: tuple[str, ...] = ()
    supported: bool = True
    reason: str | None = None
    index_names: tuple[str, ...] = ()
    column: str | None = None  # `_id` → "res_id", `_lastUpdated` → "last_updated"
    # A HumanName / Address string parameter: the parts stored under its own name (the others
    # are read from the parameters that index them already); empty: all of STRING_PARTS.
    parts: tuple[str, ...] = ()

    @property
    def index_name(self) -> str:
        """The (first) name this parameter's values are stored under."""
        return self.index_names[0]

    @property
    def systemless(self) -> bool:
        """A token parameter whose values never carry a system (code, boolean, string,
        ContactPoint, uri...): stored as `name:|value` only, which `value` and `|value` both
        search."""
        return self.type == "token" and bool(self.paths) and all(
            p.leaf in SYSTEMLESS_LEAVES for p in self.paths)

    @property
    def extracted(self) -> bool:
        """Whether writes store values under this parameter's own name."""
        return self.supported and self.column is None and self.index_names[0] == self.name


class _NotCompiled(Exception):
    """An expression (part) outside the compiled subset; the message says what."""


# --------------------------------------------------------------------------- compiling

_CAST_RE = re.compile(r"^(.*\S)\s+as\s+([A-Za-z]+)$")
_FN_RE = re.compile(r"^(as|ofType|where)\((.*)\)$")
_RESOLVE_RE = re.compile(r"^resolve\(\)\s+is\s+([A-Z][A-Za-z]+)$")
_FILTER_RE = re.compile(r"^([a-z][A-Za-z]*)\s*=\s*'([^']*)'$")
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9]*$")


def _split_top(text: str, sep: str) -> list[str]:
    """Split on `sep` outside parentheses and quotes."""
    parts, depth, quoted, start = [], 0, False, 0
    for i, ch in enumerate(text):
        if ch == "'":
            quoted = not quoted
        elif quoted:
            continue
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts]


def _strip_parens(text: str) -> str:
    """`(a.b)` → `a.b`, but `(a) | (b)` stays: only parentheses around the whole."""
    while text.startswith("(") and _closing(text) == len(text) - 1:
        text = text[1:-1].strip()
    return text


def _closing(text: str) -> int:
    """Index of the parenthesis closing the one at text[0]."""
    depth = 0
    for i, ch in enumerate(text):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            return i
    return -1


def _elements(type_name: str) -> dict[str, list[str]]:
    t = r4.types().get(type_name)
    if t is None:
        raise _NotCompiled(f"no definition of {type_name}")
    return {row[0]: [c.lstrip("@") for c in row[3]] for row in t["elements"]}


def _compile_term(term: str, base: str, own_type: str) -> list[ElementPath]:
    raw, ref_type = _raw_steps(term, base)
    return _resolve(raw, ref_type, own_type)


def _raw_steps(term: str, base: str) -> tuple[list[list[Any]], str | None]:
    """The steps of one union term as [element name, cast, filter], and its `resolve() is`."""
    term = _strip_parens(term)
    if term[:1].islower():  # "name | alias" (InsurancePlan): elements of the base
        term = f"{base}.{term}"
    cast: str | None = None
    m = _CAST_RE.match(term)
    if m:
        term, cast = _strip_parens(m[1]), m[2]
    segments = _split_top(term, ".")
    raw: list[list[Any]] = []
    ref_type: str | None = None
    if segments[0].startswith("("):  # "(Observation.value as CodeableConcept).text"
        raw, ref_type = _raw_steps(segments[0], base)
    elif segments[0] not in (base, "Resource", "DomainResource"):
        raise _NotCompiled(f"'{term}' does not start at {base}")
    for seg in segments[1:]:
        fn = _FN_RE.match(seg)
        if fn is None:
            if not _NAME_RE.match(seg) or ref_type is not None:
                raise _NotCompiled(f"'{seg}' in '{term}'")
            raw.append([seg, None, None])
            continue
        if not raw:
            raise _NotCompiled(f"'{seg}' at the root")
        name, arg = fn[1], fn[2].strip()
        if name in ("as", "ofType"):
            if not _NAME_RE.match(arg) or raw[-1][1] is not None:
                raise _NotCompiled(f"'{seg}' in '{term}'")
            raw[-1][1] = arg
        elif (r := _RESOLVE_RE.match(arg)) is not None:
            ref_type = r[1]
        elif (f := _FILTER_RE.match(arg)) is not None and raw[-1][2] is None:
            raw[-1][2] = (f[1], f[2])
        else:
            raise _NotCompiled(f"'{seg}' in '{term}'")
    if cast is not None:
        if not raw or raw[-1][1] is not None:
            raise _NotCompiled(f"'as {cast}' in '{term}'")
        raw[-1][1] = cast
    if not raw:
        raise _NotCompiled(f"'{term}' names no element")
    return raw, ref_type


def _resolve(raw: list[list[Any]], ref_type: str | None, own_type: str) -> list[ElementPath]:
    # Resolve against the definitions; a choice without a cast branches into its types.
    branches: list[tuple[tuple[tuple[str, tuple[str, str] | None], ...], str]] = [((), own_type)]
    for name, want, where in raw:
        nxt = []
        for steps, type_name in branches:
            elements = _elements(type_name)
            if name in elements:
                types = elements[name]
                if want is not None and want not in types:
                    raise _NotCompiled(f"{type_name}.{name} is not a {want}")
                for t in [want] if want else types:
                    nxt.append(((*steps, (name, where)), t))
            elif name + "[x]" in elements:
                types = elements[name + "[x]"]
                if want is not None and want not in types:
                    raise _NotCompiled(f"{type_name}.{name}[x] has no {want}")
                for t in [want] if want else types:
                    key = name + t[0].upper() + t[1:]
                    nxt.append(((*steps, (key, where)), t))
            else:
                raise _NotCompiled(f"{type_name} has no element '{name}'")
        branches = nxt
    return [ElementPath(steps, leaf, ref_type) for steps, leaf in branches]


def _compile(
    code: str, kind: str, expression: str, base: str, own_type: str, targets: tuple[str, ...]
) -> SearchParam:
    if code in _COLUMN_PARAMS:
        return SearchParam(code, kind, expression, index_names=(code,), column=_COLUMN_PARAMS[code])
    if kind not in LEAF_TYPES:
        return SearchParam(code, kind, expression, supported=False, index_names=(code,),
                           reason=f"{kind} parameters are not supported")
    if not expression:
        return SearchParam(code, kind, expression, supported=False, index_names=(code,),
                           reason="no FHIRPath expression")
    paths: list[ElementPath] = []
    skipped: list[str] = []
    for term in _split_top(expression, "|"):
        try:
            compiled = _compile_term(term, base, own_type)
        except _NotCompiled as exc:
            skipped.append(str(exc))
            continue
        for p in compiled:
            if p.leaf in LEAF_TYPES[kind]:
                paths.append(p)
            else:
                skipped.append(f"{'.'.join(k for k, _ in p.steps)} ({p.leaf})")
    if not paths:
        return SearchParam(code, kind, expression, targets=targets, supported=False,
                           index_names=(code,), reason="not indexed: " + "; ".join(skipped))
    return SearchParam(code, kind, expression, tuple(dict.fromkeys(paths)), targets,
                       reason=("not indexed: " + "; ".join(skipped)) if skipped else None,
                       index_names=(code,))


def _build() -> dict[str, dict[str, SearchParam]]:
    table = r4.search_parameters()
    targets = r4.search_targets()
    common = [("Resource", row) for row in table.get("Resource", ())] + [
        ("DomainResource", row) for row in table.get("DomainResource", ())
    ]
    out: dict[str, dict[str, SearchParam]] = {}
    for name in resource_types():
        params: dict[str, SearchParam] = {}
        by_paths: dict[tuple[str, tuple[ElementPath, ...]], str] = {}
        rows = [*common, *((name, row) for row in table.get(name, ()))]
        for base, (code, kind, expression) in rows:
            t = targets.get(base, {}).get(code, ())
            p = _compile(code, kind, expression, base, name, t)
            if p.supported and p.paths:
                # Same kind and paths as an earlier parameter: store the values once.
                first = by_paths.setdefault((p.type, p.paths), code)
                if first != code:
                    p = _stored_as(p, (first,))
            params[code] = p
        out[name] = _share_parts(_share_unions(params))
    return out


def _stored_as(p: SearchParam, names: tuple[str, ...]) -> SearchParam:
    return SearchParam(p.name, p.type, p.expression, p.paths, p.targets, reason=p.reason,
                       index_names=names)


def _share_unions(params: dict[str, SearchParam]) -> dict[str, SearchParam]:
    """A union parameter whose paths are exactly those of other parameters of its kind
    (Observation `combo-code` = `code` | `component-code`) reads their index values instead
    of storing its own copy."""
    own = {
        (p.type, path): n for n, p in params.items() if p.extracted and len(p.paths) == 1
        for path in p.paths
    }
    out = dict(params)
    for n, p in params.items():
        if p.extracted and len(p.paths) > 1:
            names = [own.get((p.type, path)) for path in p.paths]
            if all(names) and n not in names:
                out[n] = _stored_as(p, tuple(dict.fromkeys(x for x in names if x)))
    return dict(sorted(out.items()))


def _share_parts(params: dict[str, SearchParam]) -> dict[str, SearchParam]:
    """A HumanName / Address string parameter (Patient `name`, `address`) whose parts other
    parameters index already (`family` = name.family, `address-city` = address.city) stores
    only the remaining parts and reads the others' rows too: half the string rows a Patient
    writes."""
    single = {
        p.paths[0]: n for n, p in params.items()
        if p.type == "string" and p.extracted and len(p.paths) == 1
    }
    out = dict(params)
    for n, p in params.items():
        if p.type != "string" or not p.extracted or len(p.paths) != 1:
            continue
        (path,) = p.paths
        parts = STRING_PARTS.get(path.leaf)
        if parts is None:
            continue
        covered = {
            part: single[q] for part in parts
            if (q := ElementPath((*path.steps, (part, None)), "string", path.ref_type)) in single
        }
        if covered:
            out[n] = SearchParam(
                p.name, p.type, p.expression, p.paths, p.targets, reason=p.reason,
                index_names=(n, *dict.fromkeys(covered.values())),
                parts=tuple(x for x in parts if x not in covered),
            )
    # Parameters sharing another's rows (`phonetic` → `name`) read everything it reads.
    for n, p in params.items():
        first = p.index_names[0] if p.index_names else n
        if first != n and first in out and len(out[first].index_names) > 1:
            out[n] = _stored_as(p, out[first].index_names)
    return out


@cache
def resource_types() -> tuple[str, ...]:
    """Every concrete R4 resource type, sorted."""
    return tuple(sorted(
        n for n, t in r4.types().items() if t["kind"] == "resource" and not t["abstract"]
    ))


_REGISTRY: dict[str, Mapping[str, SearchParam]] = {
    t: MappingProxyType(p) for t, p in _build().items()
}


@cache
def _generic() -> Mapping[str, SearchParam]:
    """For a type R4 does not define: the `Resource`-level parameters, compiled on Resource."""
    params = {}
    for code, kind, expression in r4.search_parameters().get("Resource", ()):
        params[code] = _compile(code, kind, expression, "Resource", "Resource", ())
    return MappingProxyType(dict(sorted(params.items())))


def params_for(resource_type: str) -> Mapping[str, SearchParam]:
    """All search parameters of `resource_type` by name (see the module docstring)."""
    return _REGISTRY.get(resource_type) or _generic()


def supported_params(resource_type: str) -> list[str]:
    """The names of the parameters `resource_type` can be searched by, sorted."""
    return [n for n, p in params_for(resource_type).items() if p.supported]


def unsupported() -> list[tuple[str, str, str]]:
    """(type, parameter, reason) for every R4 parameter that is not searchable here."""
    return [
        (t, n, p.reason or "")
        for t, params in _REGISTRY.items()
        for n, p in params.items()
        if not p.supported
    ]
