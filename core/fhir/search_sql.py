"""The SQL condition of each parsed search clause, over the index of `core.fhir.search_index`.

- tokens, references, uris → GIN `@>` / `&&` on `resource.tokens` (uri `:below`: a LIKE over
  the row's tokens, a recheck);
- strings → a btree range (`LIKE 'abc%'`, "C" collation) on `resource_string`;
- dates → btree ranges on `resource_date (res_type, param, lo | hi)`, `_lastUpdated` on
  `resource (res_type, last_updated)`;
- numbers and quantities → btree ranges on `resource_number (res_type, param, lo | hi)`;
- `_id` → the primary key; `:exact` and `:text` recheck the stored JSON.

`conditions(q)` is the AND of a whole query (type, not deleted, every clause);
`clause_condition(resource_type, clause)` is one clause, for callers that compose (chains,
`_has`). Both take `table`, the alias of `resource` the conditions are about, so that a
condition can sit in a subquery over another alias. All values are bound parameters.
"""

from __future__ import annotations

import json
import re
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Table,
    Text,
    and_,
    cast,
    exists,
    false,
    func,
    literal,
    not_,
    or_,
    select,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, JSONPATH
from sqlalchemy.sql.expression import FromClause

from core.fhir.search_params import (
    Clause,
    DateClause,
    DateRange,
    IdClause,
    MissingClause,
    NumberClause,
    NumberRange,
    Query,
    StringClause,
    TextClause,
    TokenClause,
    UriBelowClause,
)
from core.store.repository import content_of
from core.store.schema import resource as R
from core.store.schema import resource_date as D
from core.store.schema import resource_number as N
from core.store.schema import resource_string as S

__all__ = ["clause_condition", "conditions", "type_is"]

Resource = Table | FromClause


def type_is(
    resource_type: str, *, gin_driven: bool, table: Resource = R
) -> ColumnElement[bool]:
    if gin_driven:
        # Deliberately not index-matchable (yet estimated like the plain comparison). GIN
        # statistics guess ~0.5% for any rare token, so the planner likes to AND the token
        # bitmap with a bitmap of every row of the type from a (res_type, ...) btree: cheap
        # at 1,000 rows, tens of milliseconds at a million. When a token condition is present
        # it is the selective path; the type is only a recheck.
        return (table.c.res_type == resource_type).is_(True)
    return table.c.res_type == resource_type


def conditions(q: Query, table: Resource = R) -> list[ColumnElement[bool]]:
    """The WHERE conditions of query `q` on `table` (an alias of `resource`)."""
    gin_driven = any(isinstance(c, TokenClause) and not c.negate for c in q.clauses)
    conds: list[ColumnElement[bool]] = [
        type_is(q.resource_type, gin_driven=gin_driven, table=table),
        table.c.deleted == false(),
    ]
    # Single-value token clauses AND-ed together fold into one `tokens @> ARRAY[...]`: one
    # GIN probe instead of several.
    required: list[str] = []
    for c in q.clauses:
        if isinstance(c, TokenClause) and not c.negate and len(c.any_of) == 1:
            required.append(c.any_of[0])
        else:
            conds.append(clause_condition(q.resource_type, c, table))
    if required:
        conds.append(table.c.tokens.contains(_text_array(list(dict.fromkeys(required)))))
    return conds


def clause_condition(resource_type: str, c: Clause, table: Resource = R) -> ColumnElement[bool]:
    """The condition that one clause of a search on `resource_type` puts on `table`."""
    if isinstance(c, TokenClause):
        if c.negate:
            return not_(table.c.tokens.overlap(_text_array(c.any_of)))
        if len(c.any_of) == 1:
            return table.c.tokens.contains(_text_array(c.any_of))
        return table.c.tokens.overlap(_text_array(c.any_of))
    if isinstance(c, IdClause):
        return table.c.res_id.in_(c.ids)
    if isinstance(c, DateClause):
        if c.param == "_lastUpdated":
            return or_(*(_last_updated(table, r) for r in c.ranges))
        sub = select(D.c.res_id).where(
            D.c.res_type == resource_type, _param_in(D, c.names),
            or_(*(_date_range(r) for r in c.ranges)),
        )
        return table.c.res_id.in_(sub)
    if isinstance(c, NumberClause):
        sub = select(N.c.res_id).where(
            N.c.res_type == resource_type, _param_in(N, c.names),
            or_(*(_number_range(r) for r in c.ranges)),
        )
        return table.c.res_id.in_(sub)
    if isinstance(c, StringClause):
        return _string_condition(resource_type, c, table)
    if isinstance(c, MissingClause):
        index = {"string": S, "date": D, "number": N}[c.kind]
        present = table.c.res_id.in_(
            select(index.c.res_id).where(index.c.res_type == resource_type,
                                         _param_in(index, c.names))
        )
        return not_(present) if c.missing else present
    if isinstance(c, UriBelowClause):
        tok = func.unnest(table.c.tokens).table_valued("t").render_derived(name="tok")
        return exists(
            select(literal(1)).select_from(tok)
            .where(or_(*(tok.c.t.like(_like_escape(p) + "%") for p in c.prefixes)))
        )
    if isinstance(c, TextClause):
        # The content is the current version's history row (see repository.content_of).
        return or_(*(
            func.jsonb_path_exists(content_of(table), cast(literal(_text_path(path, v)), JSONPATH))
            for path in c.paths for v in c.values
        ))
    raise TypeError(f"not a search clause: {c!r}")


def _text_array(values: list[str]) -> ColumnElement[Any]:
    return cast(literal(values, ARRAY(Text)), ARRAY(Text))


def _param_in(index: Table, names: tuple[str, ...]) -> ColumnElement[bool]:
    return index.c.param == names[0] if len(names) == 1 else index.c.param.in_(names)


def _last_updated(table: Resource, r: DateRange) -> ColumnElement[bool]:
    # A point in time: the range prefixes reduce to plain comparisons on one column.
    t, pl, ph = table.c.last_updated, r.lo, r.hi
    return {
        "eq": and_(t >= pl, t <= ph),
        "ne": or_(t < pl, t > ph),
        "gt": t > ph,
        "sa": t > ph,
        "lt": t < pl,
        "eb": t < pl,
        "ge": t >= pl,
        "le": t <= ph,
        "ap": and_(t >= pl, t <= ph),
    }[r.prefix]


def _date_range(r: DateRange) -> ColumnElement[bool]:
    """A stored range lo..hi (inclusive) against the searched one (search.html, dates)."""
    pl, ph = r.lo, r.hi
    lo, hi = D.c.lo, D.c.hi
    # The redundant bounds (lo <= hi always) give each btree a closed range to scan.
    within = and_(lo >= pl, lo <= ph, hi <= ph, hi >= pl)
    match r.prefix:
        case "eq":
            return within
        case "ne":
            return or_(lo < pl, hi > ph)
        case "gt":
            return hi > ph
        case "lt":
            return lo < pl
        case "ge":
            return or_(hi > ph, within)
        case "le":
            return or_(lo < pl, within)
        case "sa":
            return lo > ph
        case "eb":
            return hi < pl
        case _:  # ap: overlaps the widened range
            return and_(lo <= ph, hi >= pl)


def _number_range(r: NumberRange) -> ColumnElement[bool]:
    """A stored lo..hi (a single value has lo = hi) against the searched value: `eq` is
    within the value's implicit precision [r.lo, r.hi), the other prefixes compare with the
    value itself (search.html, number and quantity)."""
    lo, hi, v = N.c.lo, N.c.hi, r.value
    match r.prefix:
        case "eq":
            cond = and_(lo >= r.lo, lo < r.hi, hi >= r.lo, hi < r.hi)
        case "ne":
            cond = or_(lo < r.lo, hi >= r.hi)
        case "gt":
            cond = hi > v
        case "lt":
            cond = lo < v
        case "ge":
            cond = hi >= v
        case "le":
            cond = lo <= v
        case "sa":
            cond = lo > v
        case "eb":
            cond = hi < v
        case _:  # ap: overlaps value ± 10%
            cond = and_(lo <= r.hi, hi >= r.lo)
    if r.code is not None:
        cond = and_(cond, N.c.code == r.code)
    if r.system is not None:
        cond = and_(cond, N.c.system == r.system)
    return cond


def _string_condition(resource_type: str, c: StringClause, table: Resource) -> ColumnElement[bool]:
    if c.mode == "prefix":
        match = or_(*(S.c.value.like(_like_escape(v) + "%") for v in c.values))
    elif c.mode == "contains":
        match = or_(*(S.c.value.like("%" + _like_escape(v) + "%") for v in c.values))
    else:
        match = S.c.value.in_(c.values)
    sub = select(S.c.res_id).where(S.c.res_type == resource_type, _param_in(S, c.names), match)
    cond = table.c.res_id.in_(sub)
    if c.mode == "exact":
        # The index matched the normalised value; the stored JSON must hold it as sent.
        values = cast(literal(json.dumps({"v": c.originals})), JSONB)
        cond = and_(cond, or_(*(
            func.jsonb_path_exists(content_of(table), cast(literal(p), JSONPATH), values)
            for p in c.exact_paths
        )))
    return cond


def _like_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _text_path(path: str, value: str) -> str:
    """jsonpath: a string at `path` that starts with `value`, ignoring case. like_regex
    takes no variables, so the value is escaped into the pattern (regex, then jsonpath)."""
    pattern = "^" + re.escape(value)
    quoted = pattern.replace("\\", "\\\\").replace('"', '\\"')
    return f'{path} ? (@ like_regex "{quoted}" flag "i")'
