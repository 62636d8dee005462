"""The searchset Bundle of a FHIR search: criteria (core.fhir.search) plus chains and `_has`
(core.fhir.search_join), one page in `_sort` order after the `_cursor` position
(core.fhir.search_page), the total, `_include` / `_revinclude` (core.fhir.search_include) and
subsets (core.fhir.search_shape).

Statements per page: one for the page and its total (two when the search has no criteria:
the primary key or sort key's index serves the page, a count the total; and a third for the
last pages of a sort by a date / number / quantity that some resources lack), one for all
includes.

Scopes: a chain or `_has` searches its other type, so it needs `s` there (403 otherwise,
before anything runs); included resources are limited to the types the caller may read (`r`),
in the statement, and the Bundle says so in an information issue whenever it does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

from sqlalchemy import ColumnElement, Connection, func, select

from core.auth.permissions import UNRESTRICTED, Permissions, denial
from core.errors import Forbidden
from core.fhir.outcome import issue, outcome
from core.fhir.resources import row_to_resource
from core.fhir.search_controls import SearchRequest, split_search
from core.fhir.search_cursor import Position, decode_cursor, encode_cursor
from core.fhir.search_include import fetch_included, include_statement
from core.fhir.search_join import join_condition
from core.fhir.search_page import (
    SLACK,
    Order,
    index_driven,
    index_walk_statement,
    order_of,
    page_statement,
)
from core.fhir.search_params import Query
from core.fhir.search_shape import subset
from core.store.schema import resource as R

__all__ = ["Criteria", "searchset", "explain_search"]

# Included resources per page, at most: a page of 1,000 Observations including their
# Patients, Encounters and Practitioners stays well within it.
MAX_INCLUDED = 5000

Criteria = Callable[[Query], list[ColumnElement[bool]]]
Fenced = Callable[[Query], bool]


def _prepare(
    resource_type: str,
    params: list[tuple[str, str]],
    strict: bool,
    conditions: Criteria,
    fenced: Fenced,
    permissions: Permissions,
    base_url: str | None = None,
) -> tuple[SearchRequest, list[ColumnElement[bool]], bool, Order]:
    req = split_search(resource_type, params, strict=strict, base_url=base_url)
    for j in req.joins:
        if not permissions.allows(j.target, "s"):
            raise Forbidden(
                denial(j.target, "s", f"The parameter '{j.text}' searches {j.target}"),
                expression=j.text,
            )
    conds = [*conditions(req.query),
             *(join_condition(resource_type, j, conditions) for j in req.joins)]
    return req, conds, fenced(req.query) or bool(req.joins), order_of(resource_type,
                                                                       req.controls.sort)


def searchset(
    conn: Connection,
    resource_type: str,
    params: list[tuple[str, str]],
    *,
    conditions: Criteria,
    fenced: Fenced,
    base_url: str,
    strict: bool = False,
    default_count: int = 50,
    max_count: int = 1000,
    permissions: Permissions = UNRESTRICTED,
) -> dict[str, Any]:
    req, conds, is_fenced, order = _prepare(resource_type, params, strict, conditions, fenced,
                                            permissions, base_url)
    c = req.controls
    count = 0 if c.summary == "count" else min(
        default_count if c.count is None else c.count, max_count
    )
    after = decode_cursor(c.cursor, order.spec, order.kinds) if c.cursor else None
    total, rows, has_next = _page(conn, resource_type, req, conds, is_fenced, order, after,
                                  count)
    base = base_url.rstrip("/")
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}
    if total is not None:
        bundle["total"] = total
    bundle["link"] = _links(base, resource_type, req, count, order, rows, has_next, after)
    entries: list[dict[str, Any]] = [
        {
            "fullUrl": f"{base}/{resource_type}/{r[1]}",
            "resource": subset(row_to_resource(r[4], r[2], r[3]), elements=c.elements,
                               summary=c.summary),
            "search": {"mode": "match"},
        }
        for r in rows
    ]
    issues: list[dict[str, Any]] = []
    if c.includes and rows:
        entries += _included(conn, resource_type, req, [r[1] for r in rows], base, permissions,
                             issues)
    if req.query.ignored:
        names = ", ".join(name for name, _ in req.query.ignored)
        issues.append(issue(
            "warning", "not-supported",
            f"Search parameters not supported for {resource_type} were ignored: {names}",
            [name for name, _ in req.query.ignored],
        ))
    if issues:
        entries.append({"resource": outcome(*issues), "search": {"mode": "outcome"}})
    if entries:
        bundle["entry"] = entries
    return bundle


def _page(
    conn: Connection,
    resource_type: str,
    req: SearchRequest,
    conds: list[ColumnElement[bool]],
    is_fenced: bool,
    order: Order,
    after: Position | None,
    count: int,
) -> tuple[int | None, list[Any], bool]:
    """(total, up to `count` rows, whether a next page follows)."""
    c = req.controls
    want_total = c.total != "none"
    # An estimate only where counting means reading the whole type: with criteria the
    # planner's guess is poor (GIN) and the count is cheap.
    mode = "accurate" if is_fenced else c.total
    total: int | None = None
    rows: list[Any] = []
    has_next = False
    if count == 0:
        total = _count(conn, conds, mode) if want_total else None
    elif index_driven(order, is_fenced, c.offset):
        rows, has_next = _index_driven_page(conn, resource_type, conds, order, after, count)
        total = _count(conn, conds, mode) if want_total else None
    else:
        fetched = conn.execute(page_statement(
            resource_type, conds, fenced=is_fenced, order=order, after=after,
            limit=count + 1, offset=c.offset, with_total=want_total,
        )).all()
        if is_fenced and want_total:
            total = fetched[0][0]
            rows = [r for r in fetched if r[1] is not None]
        else:
            rows = fetched
            total = _count(conn, conds, mode) if want_total else None
    has_next = has_next or len(rows) > count
    return total, rows[:count], has_next


def _included(
    conn: Connection,
    resource_type: str,
    req: SearchRequest,
    page_ids: list[str],
    base: str,
    permissions: Permissions,
    issues: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """The include entries of a page; what limited them is added to `issues`."""
    c = req.controls
    readable = _readable(permissions)
    included = fetch_included(conn, resource_type, page_ids, c.includes, readable=readable,
                              limit=MAX_INCLUDED)
    if readable is not None:
        issues.append(issue(
            "information", "suppressed",
            "Included resources are limited to the types the token may read: "
            + (", ".join(sorted(readable)) or "none"),
            ["_include" if any(not i.reverse for i in c.includes) else "_revinclude"],
        ))
    if len(included) >= MAX_INCLUDED:
        issues.append(issue("warning", "too-costly",
                            f"Only the first {MAX_INCLUDED} included resources are given; "
                            "ask for a smaller _count", ["_include"]))
    return [
        {
            "fullUrl": f"{base}/{rtype}/{rid}",
            "resource": row_to_resource(content, version, last_updated),
            "search": {"mode": "include"},
        }
        for rtype, rid, version, last_updated, content in included
    ]


def _index_driven_page(
    conn: Connection,
    resource_type: str,
    conds: list[ColumnElement[bool]],
    order: Order,
    after: Position | None,
    count: int,
) -> tuple[list[Any], bool]:
    """Up to `count + 1` rows walking the first key's index, then (once its values run out)
    the resources without one; and whether more may follow beyond what came back."""
    rows: list[Any] = []
    if after is None or after.keys[0] is not None:
        asked = count + 1 + SLACK
        raw = conn.execute(index_walk_statement(resource_type, conds, order, after,
                                                asked)).all()
        seen: set[str] = set()
        for r in raw:
            if r[1] not in seen:
                seen.add(r[1])
                rows.append(r)
        if len(raw) == asked:  # not run out: the next page goes on from here
            return rows[: count + 1], len(rows) <= count
    missing_after = after if after is not None and after.keys[0] is None else None
    if len(rows) <= count:
        rows += conn.execute(index_walk_statement(
            resource_type, conds, order, missing_after, count + 1 - len(rows), missing=True
        )).all()
    return rows, False


def _count(conn: Connection, conds: list[ColumnElement[bool]], mode: str) -> int:
    """The number of matches; for `_total=estimate`, the planner's estimate of it (no scan:
    what a count of a whole large type would cost is the reason to ask for an estimate)."""
    stmt = select(func.count()).select_from(R).where(*conds)
    if mode != "estimate":
        return conn.execute(stmt).scalar_one()
    rows = select(R.c.res_id).where(*conds)
    compiled = rows.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
    plan = conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + compiled.string,
                                compiled.params).scalar_one()
    return int(plan[0]["Plan"]["Plan Rows"])


def _readable(permissions: Permissions) -> frozenset[str] | None:
    """The types whose resources the caller may read; None for every type."""
    if "r" in permissions.on_any:
        return None
    return frozenset(t for t, letters in permissions.by_type.items() if "r" in letters)


def _links(
    base: str,
    resource_type: str,
    req: SearchRequest,
    count: int,
    order: Order,
    rows: list[Any],
    has_next: bool,
    after: Any,
) -> list[dict[str, str]]:
    c = req.controls
    fixed = [*req.link_params, ("_count", str(count))]

    def url(extra: list[tuple[str, str]]) -> str:
        return f"{base}/{resource_type}?{urlencode([*fixed, *extra], safe='|:/,')}"

    here: list[tuple[str, str]] = []
    if c.cursor is not None:
        here = [("_cursor", c.cursor)]
    elif c.offset:
        here = [("_offset", str(c.offset))]
    links = [{"relation": "self", "url": url(here)}, {"relation": "first", "url": url([])}]
    if c.offset and after is None:
        prev = max(0, c.offset - count)
        links.append({"relation": "previous",
                      "url": url([("_offset", str(prev))] if prev else [])})
    if has_next and rows:
        last = rows[-1]
        keys = tuple(last[5 : 5 + len(order.keys)])
        links.append({"relation": "next",
                      "url": url([("_cursor", encode_cursor(order.spec, keys, last[1]))])})
    return links


def explain_search(
    conn: Connection,
    resource_type: str,
    params: list[tuple[str, str]],
    *,
    conditions: Criteria,
    fenced: Fenced,
) -> list[Any]:
    """The statements a search page runs (page and total, count, includes), for EXPLAIN."""
    req, conds, is_fenced, order = _prepare(resource_type, params, False, conditions, fenced,
                                            UNRESTRICTED)
    c = req.controls
    want_total = c.total != "none"
    page: Any = page_statement(resource_type, conds, fenced=is_fenced, order=order, after=None,
                               limit=51, offset=c.offset, with_total=want_total)
    if index_driven(order, is_fenced, c.offset):
        page = index_walk_statement(resource_type, conds, order, None, 51 + SLACK)
    stmts: list[Any] = [page]
    if want_total:
        stmts.append(select(func.count()).select_from(R).where(*conds))
    if c.includes:
        ids = [r[1] for r in conn.execute(page) if r[1] is not None] or ["none"]
        stmts.append(include_statement(resource_type, ids, c.includes, readable=None,
                                       limit=MAX_INCLUDED))
    return stmts
