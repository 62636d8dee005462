"""`_include` and `_revinclude` for one page of matches: ONE statement, whatever the number of
matches and include parameters.

The page is a CTE of its ids. Level 1 is every include applied to the page; level 2 the
`:iterate` ones applied to level 1 (one level, no further). A forward include reads the
source rows' reference tokens (`"{param}:Type/id"`, core.fhir.search_params) by primary key
and fetches their targets by primary key; a reverse include probes the GIN index on `tokens`
with the page's own reference tokens. What the caller may not read (`readable`) is filtered
in the statement, so an include never brings back a type the caller's scopes do not cover.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Select,
    Text,
    and_,
    cast,
    false,
    func,
    literal,
    select,
    true,
    tuple_,
    union,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.sql.selectable import CTE

from core.fhir.search_controls import Include
from core.store.repository import content_of
from core.store.schema import resource as R

__all__ = ["include_statement", "fetch_included"]

_ID = r"[A-Za-z0-9\-.]{1,64}"
_TYPE = r"[A-Z][A-Za-z]{1,63}"


def fetch_included(
    conn: Connection,
    resource_type: str,
    page_ids: Sequence[str],
    includes: Sequence[Include],
    *,
    readable: Collection[str] | None,
    limit: int,
) -> list[Any]:
    """Rows `(res_type, res_id, version, last_updated, content)` that the page's includes
    bring in (none of the page itself, none deleted), at most `limit`."""
    if not page_ids or not includes or (readable is not None and not readable):
        return []
    return list(conn.execute(include_statement(resource_type, page_ids, includes,
                                               readable=readable, limit=limit)))


def include_statement(
    resource_type: str,
    page_ids: Sequence[str],
    includes: Sequence[Include],
    *,
    readable: Collection[str] | None,
    limit: int,
) -> Select[Any]:
    page = select(
        literal(resource_type, Text).label("res_type"),
        func.unnest(cast(list(page_ids), ARRAY(Text))).label("res_id"),
    ).cte("page")
    level1 = _level(page, includes, "level1", readable)
    iterating = [i for i in includes if i.iterate]
    found: Any = level1
    if iterating:
        level2 = _level(level1, iterating, "level2", readable)
        found = union(select(level1.c.res_type, level1.c.res_id),
                      select(level2.c.res_type, level2.c.res_id)).subquery("found")
    conds: list[ColumnElement[bool]] = [
        R.c.res_type == found.c.res_type,
        R.c.res_id == found.c.res_id,
        R.c.deleted == false(),
    ]
    if readable is not None:
        conds.append(R.c.res_type.in_(sorted(readable)))
    # One primary key probe per reached resource. OFFSET 0 keeps the subquery a per-row
    # probe: flattened into a join, the planner's guess for GIN matches (thousands of rows)
    # leads it to hash-join against the whole table.
    row = (
        select(R.c.res_type, R.c.res_id, R.c.version, R.c.last_updated,
               content_of(R).label("content"))
        .where(*conds)
        .offset(0)
        .lateral("r")
    )
    return (
        select(row.c.res_type, row.c.res_id, row.c.version, row.c.last_updated,
               row.c.content)
        .select_from(found.join(row, true()))
        .where(tuple_(found.c.res_type, found.c.res_id).not_in(
            select(page.c.res_type, page.c.res_id)))
        .order_by(row.c.res_type, row.c.res_id)
        .limit(limit)
    )


def _level(
    start: CTE, includes: Sequence[Include], name: str, readable: Collection[str] | None
) -> CTE:
    """The (res_type, res_id) that `includes` reach from the rows of `start`, of the types
    the caller may read: what it may not read must not lead an `:iterate` on either (the
    Practitioner of an Observation it cannot see would tell that the Observation exists)."""
    parts = [(_reverse if i.reverse else _forward)(start, i) for i in includes]
    reached = (union(*parts) if len(parts) > 1 else parts[0].distinct()).subquery(name + "_all")
    out = select(reached.c.res_type, reached.c.res_id)
    if readable is not None:
        out = out.where(reached.c.res_type.in_(sorted(readable)))
    return out.cte(name)


def _forward(start: CTE, inc: Include) -> Select[Any]:
    src = R.alias("src")
    tok = func.unnest(src.c.tokens).table_valued("tok").render_derived(name="t")
    param = r"[a-z][A-Za-z0-9\-]{0,63}" if inc.param == "*" else _re_escape(inc.param)
    target = _re_escape(inc.target) if inc.target else _TYPE
    ref = func.substring(tok.c.tok, f"^{param}:({target}/{_ID})$")
    refs = (
        select(ref.label("ref"))
        .select_from(src.join(start, and_(src.c.res_type == start.c.res_type,
                                          src.c.res_id == start.c.res_id)))
        .join(tok, literal(True))
        .where(src.c.res_type == inc.source, src.c.deleted == false())
        .subquery("refs")
    )
    return select(
        func.split_part(refs.c.ref, "/", 1).label("res_type"),
        func.split_part(refs.c.ref, "/", 2).label("res_id"),
    ).where(refs.c.ref.is_not(None))


def _reverse(start: CTE, inc: Include) -> Select[Any]:
    rev = R.alias("rev")
    wanted = select(
        func.array_agg(literal(f"{inc.param}:") + start.c.res_type + "/" + start.c.res_id)
    ).select_from(start)
    if inc.target:
        wanted = wanted.where(start.c.res_type == inc.target)
    return select(rev.c.res_type, rev.c.res_id).where(
        # Deliberately not index-matchable: the GIN probe is the selective path (see
        # core.fhir.search._type_is).
        (rev.c.res_type == inc.source).is_(True),
        rev.c.deleted == false(),
        rev.c.tokens.overlap(wanted.scalar_subquery()),
    )


def _re_escape(text: str) -> str:
    # Parameter and type names are letters, digits and '-' (checked when parsed).
    return text.replace("-", r"\-")
