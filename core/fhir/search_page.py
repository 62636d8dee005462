"""One page of a search in a stable order: the sort keys of `_sort` (then the id), the keyset
condition that starts a page after a cursor's position, and the statements that fetch a page
(with or without the total).

Order: each key ascending or descending with missing values last either way, then `res_id`
(ascending, or descending for `_sort=-_id`) so that the order is total and a cursor names one
place in it. Keys: `_lastUpdated` is the `last_updated` column (btree `(res_type,
last_updated)`); a date, number or quantity parameter the least start of its values (for a
descending sort: the greatest end); a string parameter the least (greatest) normalised value;
a token the least (greatest) code, a reference its `Type/id`, a uri the uri.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Select,
    and_,
    false,
    func,
    literal,
    or_,
    select,
    true,
)

from core.fhir.search_controls import SortKey, index_name
from core.fhir.search_cursor import Position
from core.fhir.search_registry import params_for
from core.store import schema
from core.store.repository import content_of
from core.store.schema import resource as R
from core.store.schema import resource_string as S

__all__ = [
    "Order",
    "SLACK",
    "index_driven",
    "index_walk_statement",
    "order_of",
    "page_statement",
]

# The content lives in the history row of the current version (core.store.repository).
_CONTENT = (R.c.res_id, R.c.version, R.c.last_updated, content_of(R).label("content"))


@dataclass(slots=True)
class _Key:
    expr: ColumnElement[Any]
    descending: bool
    nullable: bool
    kind: str  # ts | text | number: how a cursor carries its value
    # A key kept in an index table (date / number / quantity ranges, strings): the table, the
    # parameter name its values are under, and the columns an ascending / descending key
    # takes (`lo` / `hi`; `value` both ways for strings).
    table: Any = None
    param: str | None = None
    columns: tuple[str, str] = ("lo", "hi")


@dataclass(slots=True)
class Order:
    keys: list[_Key]
    id_descending: bool
    spec: str  # the `_sort` value it came from, normalised; what a cursor is made for

    @property
    def kinds(self) -> list[str]:
        return [k.kind for k in self.keys]


def order_of(resource_type: str, sort: list[SortKey]) -> Order:
    keys: list[_Key] = []
    id_descending = False
    for s in sort:
        if s.param == "_id":
            id_descending = s.descending
            break  # the id is unique: later keys never decide anything
        keys.append(_key(resource_type, s))
    spec = ",".join(("-" if s.descending else "") + s.param for s in sort)
    return Order(keys, id_descending, spec)


def _key(resource_type: str, s: SortKey) -> _Key:
    if s.param == "_lastUpdated":
        return _Key(R.c.last_updated, s.descending, False, "ts")
    name = index_name(resource_type, s.param)
    agg = func.max if s.descending else func.min
    if s.kind in ("date", "number", "quantity"):
        return _range_key(resource_type, s, name)
    if s.kind == "string":
        names = _stored_under(resource_type, s.param, name)
        sub = (
            select(agg(S.c.value))
            .where(S.c.res_type == R.c.res_type, S.c.res_id == R.c.res_id,
                   S.c.param.in_(names))
            .correlate(R)
            .scalar_subquery()
        )
        if len(names) > 1:  # values under several names: no one index range is in order
            return _Key(sub, s.descending, True, "text")
        return _Key(sub, s.descending, True, "text", S, names[0], ("value", "value"))
    # token / reference / uri: the value part of the parameter's tokens (`*|code`, or `|code`
    # for one without systems), `Type/id`
    # or the uri (the bare presence marker `name:` is no value).
    prefix = f"{name}:" if s.kind != "token" else (
        f"{name}:|" if _systemless(resource_type, s.param) else f"{name}:*|")
    toks = func.unnest(R.c.tokens).table_valued("tok").render_derived()
    cond = and_(func.starts_with(toks.c.tok, prefix), func.length(toks.c.tok) > len(prefix))
    if s.kind == "reference":
        cond = and_(cond, toks.c.tok.op("~")(f"^{re.escape(name)}:[A-Z][A-Za-z]*/"))
    sub = (
        select(agg(func.substr(toks.c.tok, len(prefix) + 1)))
        .select_from(toks)
        .where(cond)
        .scalar_subquery()
    )
    return _Key(sub, s.descending, True, "text")


def _systemless(resource_type: str, param: str) -> bool:
    p = params_for(resource_type).get(param)
    return p is not None and p.systemless


def _stored_under(resource_type: str, param: str, name: str) -> tuple[str, ...]:
    """Every index name a string parameter's values are under (Patient `name`: its own rows,
    `family`'s and `given`'s; core.fhir.search_registry)."""
    p = params_for(resource_type).get(param)
    return p.index_names if p is not None and p.index_names else (name,)


def _range_key(resource_type: str, s: SortKey, name: str) -> _Key:
    """Ascending by the least start of the parameter's values, descending by the greatest end."""
    table = schema.resource_date if s.kind == "date" else schema.resource_number
    kind = "ts" if s.kind == "date" else "number"
    col = func.max(table.c.hi) if s.descending else func.min(table.c.lo)
    sub = (
        select(col)
        .where(table.c.res_type == R.c.res_type, table.c.res_id == R.c.res_id,
               table.c.param == name)
        .correlate(R)
        .scalar_subquery()
    )
    return _Key(sub, s.descending, True, kind, table, name)


def _ordering(keys: list[ColumnElement[Any]], order: Order, res_id: ColumnElement[Any]) -> list:
    # NULLS LAST only where a key can be missing: on a NOT NULL column the plain direction
    # keeps the order an index gives (a backward scan is DESC NULLS FIRST).
    out = []
    for k, o in zip(keys, order.keys, strict=True):
        term = k.desc() if o.descending else k.asc()
        out.append(term.nulls_last() if o.nullable else term)
    out.append(res_id.desc() if order.id_descending else res_id.asc())
    return out


def _after(
    keys: list[ColumnElement[Any]], order: Order, res_id: ColumnElement[Any], pos: Position
) -> ColumnElement[bool]:
    """Rows strictly after `pos` in `order` (lexicographic over the keys, then the id)."""
    def beyond(k: ColumnElement[Any], key: _Key, v: Any) -> ColumnElement[bool]:
        if v is None:
            return false()  # missing values come last: nothing lies beyond them in this key
        cmp = k < v if key.descending else k > v
        return or_(cmp, k.is_(None)) if key.nullable else cmp

    def same(k: ColumnElement[Any], v: Any) -> ColumnElement[bool]:
        return k.is_(None) if v is None else k == v

    branches: list[ColumnElement[bool]] = []
    equal: list[ColumnElement[bool]] = []
    for k, key, v in zip(keys, order.keys, pos.keys, strict=True):
        branches.append(and_(*equal, beyond(k, key, v)))
        equal.append(same(k, v))
    last = res_id < pos.res_id if order.id_descending else res_id > pos.res_id
    branches.append(and_(*equal, last))
    cond = or_(*branches)
    # A bound on the first key that an index range scan can use (the OR hides it).
    if keys and not order.keys[0].nullable:
        first = order.keys[0]
        v0 = pos.keys[0]
        cond = and_(keys[0] <= v0 if first.descending else keys[0] >= v0, cond)
    elif not keys:
        cond = last
    return cond


def page_statement(
    resource_type: str,
    conds: list[ColumnElement[bool]],
    *,
    fenced: bool,
    order: Order,
    after: Position | None,
    limit: int,
    offset: int,
    with_total: bool,
) -> Select[Any]:
    """Rows `(total, res_id, version, last_updated, content, key0, key1, ...)` of one page.

    `total` is NULL unless `with_total` and `fenced`; then a page past the end is one row of
    the total with NULLs, so one pass over the matches answers both."""
    exprs = [k.expr for k in order.keys]
    if not fenced:
        # No criteria but the type (or by id): walk the primary key or the sort key's index;
        # the caller counts apart (a count of the whole type must not hold up the page).
        where = [*conds]
        if after is not None:
            where.append(_after(exprs, order, R.c.res_id, after))
        return (
            select(literal(None).label("total"), *_CONTENT,
                   *(e.label(f"k{i}") for i, e in enumerate(exprs)))
            .where(*where)
            .order_by(*_ordering(exprs, order, R.c.res_id))
            .limit(limit)
            .offset(offset)
        )
    # Why the MATERIALIZED CTE: see core.fhir.search (the planner's guess for rare tokens).
    m = (
        select(R.c.res_id, *(e.label(f"k{i}") for i, e in enumerate(exprs)))
        .where(*conds)
        .cte("matches")
        .prefix_with("MATERIALIZED")
    )
    mkeys = [m.c[f"k{i}"] for i in range(len(exprs))]
    page_where = [] if after is None else [_after(mkeys, order, m.c.res_id, after)]
    ordering = _ordering(mkeys, order, m.c.res_id)
    page = (
        select(m.c.res_id, *mkeys, func.row_number().over(order_by=ordering).label("pos"))
        .where(*page_where)
        .order_by(*ordering)
        .limit(limit)
        .offset(offset)
        .subquery("page")
    )
    rows = (
        select(*_CONTENT, *(page.c[f"k{i}"] for i in range(len(exprs))), page.c.pos)
        .join_from(page, R, and_(R.c.res_type == resource_type, R.c.res_id == page.c.res_id))
        .subquery("p")
    )
    cols = (rows.c.res_id, rows.c.version, rows.c.last_updated, rows.c.content,
            *(rows.c[f"k{i}"] for i in range(len(exprs))))
    if not with_total:
        return select(literal(None).label("total"), *cols).order_by(rows.c.pos)
    t = select(func.count().label("total")).select_from(m).subquery("t")
    return select(t.c.total, *cols).select_from(t.outerjoin(rows, true())).order_by(rows.c.pos)


# --------------------------------------------------------------------------- index-driven sort
#
# Without criteria, a leading date / number / quantity / string key would otherwise cost a
# subquery per resource of the type and a sort of them all. Its btree (`(res_type, param, lo)`,
# `hi` descending, `value` for strings) is in key order already: the page walks it, keeping of
# each resource the row that carries its key (its least start or value, or greatest end or
# value), and stops at the page's end.
# Resources without a value come last; they are read only once the values run out.

# Extra rows asked of the index walk: a resource with two rows at its key (a quantity stored
# by code and by unit) comes back twice and is counted once.
SLACK = 8


def index_driven(order: Order, fenced: bool, offset: int) -> bool:
    return not fenced and not offset and bool(order.keys) and order.keys[0].table is not None


def index_walk_statement(
    resource_type: str,
    conds: list[ColumnElement[bool]],
    order: Order,
    after: Position | None,
    limit: int,
    *,
    missing: bool = False,
) -> Select[Any]:
    """The page's resources that have a value for the first key, walking its index; with
    `missing`, those without one, in the order of the other keys."""
    first = order.keys[0]
    t = first.table
    if missing:
        walk = Order(order.keys[1:], order.id_descending, order.spec)
        exprs: list[ColumnElement[Any]] = [k.expr for k in walk.keys]
        has_value = (
            select(t.c.res_id)
            .where(t.c.res_type == R.c.res_type, t.c.res_id == R.c.res_id,
                   t.c.param == first.param)
            .exists()
        )
        where = [*conds, ~has_value]
        if after is not None:
            where.append(_after(exprs, walk, R.c.res_id, Position(after.keys[1:], after.res_id)))
        labels = [literal(None).label("k0"), *(e.label(f"k{i + 1}") for i, e in enumerate(exprs))]
        source: Any = R
    else:
        d, other = t.alias("d"), t.alias("d2")
        lo, hi = first.columns
        col = d.c[hi] if first.descending else d.c[lo]
        best = func.max(other.c[hi]) if first.descending else func.min(other.c[lo])
        carried = (
            select(best)
            .where(other.c.res_type == d.c.res_type, other.c.res_id == d.c.res_id,
                   other.c.param == first.param)
            .scalar_subquery()
        )
        # Within this walk the first key is never missing: a plain key, index-range bounded.
        walk = Order([_Key(col, first.descending, False, first.kind), *order.keys[1:]],
                     order.id_descending, order.spec)
        exprs = [col, *(k.expr for k in order.keys[1:])]
        where = [d.c.res_type == resource_type, d.c.param == first.param, col == carried,
                 *conds]
        if after is not None:
            where.append(_after(exprs, walk, R.c.res_id, after))
        labels = [e.label(f"k{i}") for i, e in enumerate(exprs)]
        source = d.join(R, and_(R.c.res_type == d.c.res_type, R.c.res_id == d.c.res_id))
    return (
        select(literal(None).label("total"), *_CONTENT, *labels)
        .select_from(source)
        .where(*where)
        .order_by(*_ordering(exprs, walk, R.c.res_id))
        .limit(limit)
    )
