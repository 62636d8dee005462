"""The search index values of a resource, extracted at write time from the registry's compiled
paths (`core.fhir.search_registry`) in one pass over the resource's top-level keys.

Pure: no database. Writers (`core.store.repository.write_resources`) store exactly what
`extract_index` returns; `core.fhir.search_params` parses queries into the same formats.

Index formats (this module owns them):

- `resource.tokens` (GIN), token, reference and uri parameters (`name` below is the
  parameter's name, or the one it shares its values with: `SearchParam.index_names`):
  - a Coding / Identifier with system `s` and value `c`:
    `"{name}:{s}|{c}"`, `"{name}:*|{c}"`, `"{name}:{s}|"`; with no system: `"{name}:|{c}"`,
    `"{name}:*|{c}"`.
  - a parameter whose values never have a system (`SearchParam.systemless`: plain `code`,
    `string`, `boolean` elements such as gender, status, active, and ContactPoint values,
    whose `system` is no URI): `"{name}:|{c}"` alone, which `c` and `|c` both search.
  - a relative reference `Type/id` (a `/_history/n` suffix is dropped):
    `"{name}:Type/id"`, `"{name}:id"`; an absolute URL or a canonical as it is written,
    `"{name}:{url}"` (a canonical also without its `|version`). `urn:` and `#contained`
    references are not indexed. `.where(resolve() is T)` keeps references to T only.
  - a logical reference (`Reference.identifier`): the Identifier forms above under
    `"{name}:identifier:"`, searched with `:identifier`.
  - a uri: `"{name}:{uri}"`.
  - a presence marker `"{name}:"` for every parameter with at least one value; `:missing`
    searches it.
  - a token longer than 512 characters is cut and suffixed with a hash of the whole
    (`cap`), identically on both sides, so giant identifiers cannot break the GIN index.
- `resource_string` rows `(param, value)`: the lower-cased, accent-stripped (NFKD) value, cut
  to 255 characters, one row per distinct pair. A HumanName contributes family, given, text,
  prefix and suffix; an Address line, city, district, state, postalCode, country and text;
  except the parts another parameter of the type indexes already (Patient `name` stores
  text, prefix and suffix, and is searched over its own, `family` and `given` rows:
  `SearchParam.parts`, `index_names`).
- `resource_date` rows `(param, lo, hi)`: the inclusive UTC range (microsecond precision) of
  each value. A value covers its precision: `1974` is 1974-01-01T00:00:00 ..
  1974-12-31T23:59:59.999999; a dateTime to the second covers that second. A Period with no
  end runs to `MAX_DT`, with no start from `MIN_DT`; a Timing gives one row per event.
- `resource_number` rows `(param, system, code, lo, hi)`: numbers (system and code `""`),
  quantities (`system`, and `code`, else the `unit`; a quantity whose `unit` differs from its
  `code` gets a second row with system `""` and the unit as code, so that `value||unit`
  finds it), Money (`urn:iso:std:iso:4217` and the currency) and Range (low .. high, an open
  end at ±`NUM_INF`). A single value is stored as lo = hi = value.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Any

from core.fhir.search_registry import STRING_PARTS, params_for, resource_types, walk

__all__ = [
    "IndexValues",
    "MIN_DT",
    "MAX_DT",
    "NUM_INF",
    "REF_RE",
    "cap",
    "date_range",
    "extract_index",
    "normalize",
    "STRING_MAX",
    "STRING_PARTS",
]

MIN_DT = datetime.min.replace(tzinfo=UTC)
MAX_DT = datetime.max.replace(tzinfo=UTC)
# An open end of a Range (numeric columns hold it; no FHIR decimal comes near it).
NUM_INF = Decimal("1e38")
_MICRO = timedelta(microseconds=1)
_TOKEN_MAX = 512
STRING_MAX = 255
REF_RE = re.compile(r"([A-Z][A-Za-z]{1,63})/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?")
_ABSOLUTE_RE = re.compile(r"[a-z][a-z0-9+.\-]*://\S+")


@dataclass(slots=True)
class IndexValues:
    tokens: list[str]
    strings: list[tuple[str, str]]  # (param, normalised value)
    dates: list[tuple[str, datetime, datetime]]  # (param, lo, hi)
    numbers: list[tuple[str, str, str, Decimal, Decimal]]  # (param, system, code, lo, hi)


class _Sink:
    __slots__ = ("tokens", "strings", "dates", "numbers")

    def __init__(self) -> None:
        self.tokens: dict[str, None] = {}  # dicts keep first-seen order and dedupe
        self.strings: dict[tuple[str, str], None] = {}
        self.dates: dict[tuple[str, datetime, datetime], None] = {}
        self.numbers: dict[tuple[str, str, str, Decimal, Decimal], None] = {}


Emit = Callable[[str, list[Any], str | None, _Sink], None]


# --------------------------------------------------------------------------- primitives


def cap(token: str) -> str:
    if len(token) <= _TOKEN_MAX:
        return token
    return token[:400] + "#" + hashlib.sha256(token.encode()).hexdigest()


def normalize(value: str) -> str:
    """Lower-case and strip accents (NFKD), the form `resource_string.value` holds."""
    if value.isascii():
        return value.strip().lower()
    decomposed = unicodedata.normalize("NFKD", value)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).strip().lower()


def _put_code(prefix: str, system: Any, code: Any, out: dict[str, None]) -> None:
    if isinstance(code, bool):
        code = "true" if code else "false"
    elif not isinstance(code, str) or not code:
        return
    # `cap` only when needed: this runs for every code of every write.
    if isinstance(system, str) and system:
        t = f"{prefix}{system}|{code}"
        out[t if len(t) <= _TOKEN_MAX else cap(t)] = None
        t = f"{prefix}{system}|"
        out[t if len(t) <= _TOKEN_MAX else cap(t)] = None
    else:
        t = f"{prefix}|{code}"
        out[t if len(t) <= _TOKEN_MAX else cap(t)] = None
    t = f"{prefix}*|{code}"
    out[t if len(t) <= _TOKEN_MAX else cap(t)] = None


# --------------------------------------------------------------------------- tokens


def _tok_code(name: str, values: list[Any], _: str | None, sink: _Sink) -> None:
    prefix, out = name + ":", sink.tokens
    for v in values:
        _put_code(prefix, None, v, out)


def _tok_plain(name: str, values: list[Any], _: str | None, sink: _Sink) -> None:
    """A parameter whose values never have a system: `name:|value` alone serves `value` and
    `|value` (one token per value instead of two)."""
    out = sink.tokens
    for v in values:
        if isinstance(v, dict):  # ContactPoint
            v = v.get("value")
        if isinstance(v, bool):
            v = "true" if v else "false"
        elif not isinstance(v, str) or not v:
            continue
        t = f"{name}:|{v}"
        out[t if len(t) <= _TOKEN_MAX else cap(t)] = None


def _tok_pair(system_key: str | None, code_key: str) -> Emit:
    """Tokens of elements carrying a system (or none) and a code: Coding (system, code),
    Identifier (system, value), ContactPoint (its `system` is no URI: value only)."""

    def emit(name: str, values: list[Any], _: str | None, sink: _Sink) -> None:
        prefix, out = name + ":", sink.tokens
        for v in values:
            if isinstance(v, dict):
                _put_code(prefix, v.get(system_key) if system_key else None, v.get(code_key),
                          out)

    return emit


def _tok_concept(name: str, values: list[Any], _: str | None, sink: _Sink) -> None:
    prefix, out = name + ":", sink.tokens
    for cc in values:
        if isinstance(cc, dict):
            for c in cc.get("coding") or ():
                if isinstance(c, dict):
                    _put_code(prefix, c.get("system"), c.get("code"), out)


def _ref(name: str, values: list[Any], ref_type: str | None, sink: _Sink) -> None:
    out = sink.tokens
    for ref in values:
        if isinstance(ref, str):  # canonical / uri
            _url(name, ref, out)
            continue
        if not isinstance(ref, dict):
            continue
        r = ref.get("reference")
        if isinstance(r, str):
            m = REF_RE.fullmatch(r)
            if m is not None:
                if ref_type is None or m[1] == ref_type:
                    out[f"{name}:{m[1]}/{m[2]}"] = None
                    out[f"{name}:{m[2]}"] = None
            elif ref_type is None and _ABSOLUTE_RE.fullmatch(r):
                out[cap(f"{name}:{r}")] = None
        ident = ref.get("identifier")
        if isinstance(ident, dict) and (ref_type is None or ref.get("type") == ref_type):
            _put_code(f"{name}:identifier:", ident.get("system"), ident.get("value"), out)


def _url(name: str, value: str, out: dict[str, None]) -> None:
    if value and not value.startswith("#"):
        out[cap(f"{name}:{value}")] = None
        if "|" in value:  # canonical|version: also found without the version
            out[cap(f"{name}:{value.partition('|')[0]}")] = None


def _uri(name: str, values: list[Any], _: str | None, sink: _Sink) -> None:
    for v in values:
        if isinstance(v, str):
            _url(name, v, sink.tokens)


# --------------------------------------------------------------------------- strings



def _put_string(name: str, value: Any, out: dict[tuple[str, str], None]) -> None:
    if isinstance(value, str) and value:
        n = normalize(value)[:STRING_MAX]
        if n:
            out[(name, n)] = None


def _str_plain(name: str, values: list[Any], _: str | None, sink: _Sink) -> None:
    out = sink.strings
    for v in values:
        _put_string(name, v, out)


def _parts(keys: tuple[str, ...]) -> Emit:
    def emit(name: str, values: list[Any], _: str | None, sink: _Sink) -> None:
        out = sink.strings
        for v in values:
            if not isinstance(v, dict):
                continue
            for k in keys:
                part = v.get(k)
                if isinstance(part, list):
                    for p in part:
                        _put_string(name, p, out)
                else:
                    _put_string(name, part, out)

    return emit


# --------------------------------------------------------------------------- dates

_DATE_RE = re.compile(
    r"(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(\.\d+)?)?"
    r"(Z|[+-]\d{2}:\d{2})?)?)?)?"
)


@lru_cache(maxsize=8192)
def date_range(text: str) -> tuple[datetime, datetime] | None:
    """Inclusive UTC range a FHIR date / dateTime / instant covers; None if it is not one.
    Cached: a patient's resources repeat the same instants (encounter, claim, report...)."""
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


def _date_point(name: str, values: list[Any], _: str | None, sink: _Sink) -> None:
    for v in values:
        if isinstance(v, str):
            rng = date_range(v)
            if rng is not None:
                sink.dates[(name, rng[0], rng[1])] = None


def _date_period(name: str, values: list[Any], _: str | None, sink: _Sink) -> None:
    for v in values:
        if not isinstance(v, dict):
            continue
        start, end = v.get("start"), v.get("end")
        lo = date_range(start) if isinstance(start, str) else None
        hi = date_range(end) if isinstance(end, str) else None
        if lo is not None or hi is not None:
            sink.dates[(name, lo[0] if lo else MIN_DT, hi[1] if hi else MAX_DT)] = None


def _date_timing(name: str, values: list[Any], _: str | None, sink: _Sink) -> None:
    for v in values:
        if isinstance(v, dict) and isinstance(v.get("event"), list):
            _date_point(name, v["event"], None, sink)


# --------------------------------------------------------------------------- numbers


def _decimal(value: Any) -> Decimal | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        d = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    except InvalidOperation:
        return None
    return d if d.is_finite() and abs(d) < NUM_INF else None


def _num(name: str, values: list[Any], _: str | None, sink: _Sink) -> None:
    for v in values:
        d = _decimal(v)
        if d is not None:
            sink.numbers[(name, "", "", d, d)] = None


def _put_quantity(name: str, q: dict[str, Any], lo: Decimal, hi: Decimal, sink: _Sink) -> None:
    system, code, unit = q.get("system"), q.get("code"), q.get("unit")
    system = system if isinstance(system, str) else ""
    code = code if isinstance(code, str) and code else None
    unit = unit if isinstance(unit, str) and unit else None
    sink.numbers[(name, system, code or unit or "", lo, hi)] = None
    if unit is not None and code is not None and unit != code:
        sink.numbers[(name, "", unit, lo, hi)] = None


def _quantity(name: str, values: list[Any], _: str | None, sink: _Sink) -> None:
    for q in values:
        if isinstance(q, dict):
            d = _decimal(q.get("value"))
            if d is not None:
                _put_quantity(name, q, d, d, sink)


def _money(name: str, values: list[Any], _: str | None, sink: _Sink) -> None:
    for m in values:
        if isinstance(m, dict):
            d = _decimal(m.get("value"))
            if d is not None:
                currency = m.get("currency")
                code = currency if isinstance(currency, str) else ""
                sink.numbers[(name, "urn:iso:std:iso:4217" if code else "", code, d, d)] = None


def _range(name: str, values: list[Any], _: str | None, sink: _Sink) -> None:
    for r in values:
        if not isinstance(r, dict):
            continue
        low, high = r.get("low"), r.get("high")
        low = low if isinstance(low, dict) else {}
        high = high if isinstance(high, dict) else {}
        lo, hi = _decimal(low.get("value")), _decimal(high.get("value"))
        if lo is not None or hi is not None:
            _put_quantity(name, low if lo is not None else high,
                          -NUM_INF if lo is None else lo, NUM_INF if hi is None else hi, sink)


# --------------------------------------------------------------------------- the plan

_TOKEN_EMIT: dict[str, Emit] = {
    "Coding": _tok_pair("system", "code"),
    "CodeableConcept": _tok_concept,
    "Identifier": _tok_pair("system", "value"),
    "ContactPoint": _tok_pair(None, "value"),
}
_STRING_EMIT: dict[str, Emit] = {t: _parts(keys) for t, keys in STRING_PARTS.items()}
_DATE_EMIT: dict[str, Emit] = {"Period": _date_period, "Timing": _date_timing}
_QUANTITY_EMIT: dict[str, Emit] = {"Money": _money, "Range": _range}


def _emitter(kind: str, leaf: str, parts: tuple[str, ...] = (), systemless: bool = False
             ) -> Emit:
    if kind == "token":
        return _tok_plain if systemless else _TOKEN_EMIT.get(leaf, _tok_code)
    if kind == "reference":
        return _ref
    if kind == "uri":
        return _uri
    if kind == "string":
        if parts:  # the other parts are stored by the parameters that index them
            return _parts(parts)
        return _STRING_EMIT.get(leaf, _str_plain)
    if kind == "date":
        return _DATE_EMIT.get(leaf, _date_point)
    if kind == "number":
        return _num
    return _QUANTITY_EMIT.get(leaf, _quantity)


# One entry per compiled path: (index name, filter of the first step, the remaining steps,
# ref_type, emit, whether a presence marker goes into `tokens`).
_Entry = tuple[str, tuple[str, str] | None, tuple[Any, ...], str | None, Emit, bool]
_MARKED = frozenset({"token", "reference", "uri"})


def _plan(resource_type: str) -> dict[str, tuple[_Entry, ...]]:
    by_key: dict[str, list[_Entry]] = {}
    seen: set[tuple[str, Any]] = set()
    for p in params_for(resource_type).values():
        if not p.extracted:
            continue  # columns need no extraction; shared index values are extracted once
        for path in p.paths:
            if (p.index_name, path) in seen:
                continue
            seen.add((p.index_name, path))
            (key, where), *rest = path.steps
            by_key.setdefault(key, []).append(
                (p.index_name, where, tuple(rest), path.ref_type,
                 _emitter(p.type, path.leaf, p.parts, p.systemless), p.type in _MARKED)
            )
    return {k: tuple(v) for k, v in by_key.items()}


_PLANS: dict[str, dict[str, tuple[_Entry, ...]]] = {t: _plan(t) for t in resource_types()}
_GENERIC_PLAN = _plan("")


def _walk(cur: list[Any], where: tuple[str, str] | None, rest: tuple[Any, ...]) -> list[Any]:
    if where is not None:
        k, want = where
        cur = [n for n in cur if isinstance(n, dict) and n.get(k) == want]
    return walk(cur, rest) if rest and cur else cur


def extract_index(resource: dict[str, Any]) -> IndexValues:
    """The search index values of one resource; called for every write, so kept lean: only
    the resource's own top-level keys are looked at, each against the paths starting there."""
    rt = resource.get("resourceType")
    plan = _PLANS.get(rt, _GENERIC_PLAN) if isinstance(rt, str) else _GENERIC_PLAN
    sink = _Sink()
    tokens = sink.tokens
    for key, value in resource.items():
        entries = plan.get(key)
        if entries is None or value is None:
            continue
        listed = value if isinstance(value, list) else [value]
        for name, where, rest, ref_type, emit, marked in entries:
            values = _walk(listed, where, rest) if (where or rest) else listed
            if not values:
                continue
            if marked:
                before = len(tokens)
                emit(name, values, ref_type, sink)
                if len(tokens) != before:
                    tokens[name + ":"] = None
            else:
                emit(name, values, ref_type, sink)
    return IndexValues(list(tokens), list(sink.strings), list(sink.dates), list(sink.numbers))
