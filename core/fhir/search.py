"""Index-backed search over the resource store: searchset Bundles for GET, and id lookups for
conditional create / update / delete / patch and conditional references.

Every function receives a live SQLAlchemy `Connection` and never commits. All values are
bound parameters. Each clause of a `Query` maps onto an index (`core.fhir.search_sql`):
tokens, references and uris → GIN on `resource.tokens`; strings, dates, numbers and quantities
→ btree ranges on `resource_string`, `resource_date`, `resource_number`; `_id` → the primary
key. Deleted resources never match.

The searchset itself (order, keyset paging, total, includes, chains) is core.fhir.search_results,
which builds on `_conditions` here. The statements are shaped so that the planner's
fixed ~0.5% guess for rare GIN tokens cannot lead it to a scan of the whole type (see the notes
at `_matches`, `_type_is` and `_find_by_token_sets`).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from sqlalchemy import (
    Connection,
    Integer,
    Select,
    Text,
    and_,
    bindparam,
    cast,
    false,
    func,
    select,
    true,
)
from sqlalchemy.dialects.postgresql import ARRAY

from core.auth.permissions import UNRESTRICTED, Permissions
from core.errors import BadRequest, FhirError
from core.fhir.resources import row_to_resource
from core.fhir.search_params import IdClause, Query, TokenClause, parse_query
from core.fhir.search_sql import conditions as _conditions
from core.fhir.search_sql import type_is as _type_is
from core.store.repository import content_of
from core.store.schema import resource as R

__all__ = ["find_ids", "find_ids_many", "search", "explain", "row_to_resource"]


def find_ids(
    conn: Connection, resource_type: str, params: list[tuple[str, str]], limit: int = 2
) -> list[str]:
    """Ids of up to `limit` current resources matching `params`, parsed strictly.

    For conditional operations: any unsupported parameter is a `BadRequest`, and so is a query
    without a single criterion (it would match everything).
    """
    q = parse_query(resource_type, params, strict=True)
    _require_criteria(q, params)
    return list(conn.execute(_lookup(q, limit)).scalars())


def find_ids_many(
    conn: Connection, resource_type: str, queries: list[list[tuple[str, str]]]
) -> list[list[str]]:
    """`find_ids` (limit 2) for many queries at once; one list of ids per query, in order.

    When every query is made only of single-value token / reference conditions
    (`identifier=sys|val`, `subject=Patient/1`, also several AND-ed) the whole set resolves in
    ONE statement; otherwise each query runs on its own. An invalid query raises its
    `BadRequest` with `.index` = its position in `queries` (callers wanting per-entry errors
    validate each with `parse_query(..., strict=True)` first).
    """
    parsed: list[Query] = []
    for i, params in enumerate(queries):
        try:
            q = parse_query(resource_type, params, strict=True)
            _require_criteria(q, params)
        except FhirError as err:
            err.index = i
            raise
        parsed.append(q)
    token_sets = [_token_set(q) for q in parsed]
    if not parsed or any(t is None for t in token_sets):
        return [list(conn.execute(_lookup(q, 2)).scalars()) for q in parsed]
    return _find_by_token_sets(conn, resource_type, [t for t in token_sets if t is not None])


def _find_by_token_sets(
    conn: Connection, resource_type: str, token_sets: list[list[str]]
) -> list[list[str]]:
    # One statement. The queries arrive as (ordinal, token) pairs, regrouped into one token
    # array per query; each array probes the GIN index from a LATERAL subquery. Two fences
    # keep that a per-query index probe whatever the statistics say:
    # - OFFSET 0 stops the planner from flattening the subquery into a plain join, which it
    #   may then run as "materialise every row of the type, test each against each query";
    # - no LIMIT inside: under a LIMIT it prefers a sequential scan hoping to stop early,
    #   which for a query matching nothing reads the whole table once per query.
    # The type check is the non-indexable form (see `_type_is`).
    ords = [i for i, toks in enumerate(token_sets) for _ in toks]
    flat = [t for toks in token_sets for t in toks]
    pairs = select(
        func.unnest(cast(bindparam("ords", ords), ARRAY(Integer))).label("ord"),
        func.unnest(cast(bindparam("toks", flat), ARRAY(Text))).label("tok"),
    ).subquery("pairs")
    wanted = (
        select(pairs.c.ord, func.array_agg(pairs.c.tok).label("toks"))
        .group_by(pairs.c.ord)
        .subquery("q")
    )
    match = (
        select(R.c.res_id)
        .where(
            _type_is(resource_type, gin_driven=True),
            R.c.deleted == false(),
            R.c.tokens.contains(wanted.c.toks),
        )
        .offset(0)
        .lateral("m")
    )
    ranked = (
        select(
            wanted.c.ord,
            match.c.res_id,
            func.row_number().over(partition_by=wanted.c.ord, order_by=match.c.res_id).label("n"),
        )
        .select_from(wanted.join(match, true()))
        .subquery("ranked")
    )
    found: list[list[str]] = [[] for _ in token_sets]
    for ord_, res_id in conn.execute(select(ranked.c.ord, ranked.c.res_id).where(ranked.c.n <= 2)):
        found[ord_].append(res_id)
    return [sorted(ids) for ids in found]


def _token_set(q: Query) -> list[str] | None:
    """The tokens a query needs all of, if it is nothing but single-value token clauses."""
    toks: list[str] = []
    for c in q.clauses:
        if not isinstance(c, TokenClause) or c.negate or len(c.any_of) != 1:
            return None
        toks.append(c.any_of[0])
    return toks or None


def _require_criteria(q: Query, params: list[tuple[str, str]]) -> None:
    if not q.clauses:
        raise BadRequest(
            "A conditional operation needs at least one search criterion, got "
            f"'{urlencode(params) or '(none)'}'",
            expression=[p for p, _ in params] or None,
        )


def search(
    conn: Connection,
    resource_type: str,
    params: list[tuple[str, str]],
    *,
    base_url: str,
    strict: bool = False,
    default_count: int = 50,
    max_count: int = 1000,
    permissions: Permissions = UNRESTRICTED,
) -> dict[str, Any]:
    """A FHIR searchset Bundle for `GET [base]/resource_type?params` (see
    core.fhir.search_results): `total` (unless `_total=none`), links self / first / next
    (a keyset `_cursor`) as absolute URLs under `base_url`, matches (search.mode "match") and
    included resources ("include"), and an OperationOutcome entry ("outcome") with a warning
    naming the parameters a lenient search ignored.
    """
    # Imported here: the result side builds on this module's conditions.
    from core.fhir.search_results import searchset

    return searchset(
        conn, resource_type, params, conditions=_conditions, fenced=_fenced,
        base_url=base_url, strict=strict, default_count=default_count, max_count=max_count,
        permissions=permissions,
    )


def explain(conn: Connection, resource_type: str, params: list[tuple[str, str]]) -> str:
    """EXPLAIN output of the statements a search may run (page with total, count, includes,
    lookup for conditional operations); for tests and operators checking index use."""
    from core.fhir.search_controls import split_search
    from core.fhir.search_results import explain_search

    stmts = explain_search(conn, resource_type, params, conditions=_conditions, fenced=_fenced)
    q = split_search(resource_type, params, strict=False).query
    if q.clauses:  # conditional operations refuse a query without criteria
        stmts.append(_lookup(q, 2))
    plans = []
    for stmt in stmts:
        compiled = stmt.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
        result = conn.exec_driver_sql("EXPLAIN " + compiled.string, compiled.params)
        plans.append("\n".join(row[0] for row in result))
    return "\n\n".join(plans)


# --------------------------------------------------------------------------- statements
#
# Why the MATERIALIZED CTE: GIN statistics cannot tell a unique identifier token from a
# common one, so the planner guesses ~0.5% of the rows. Under a small LIMIT it then prefers
# walking the table (or the primary key, in id order) hoping to stop early, which for a
# condition that matches nothing means reading every row of the type. A materialized CTE is
# planned for full retrieval (so the indexes drive it) yet still runs lazily under LIMIT.
# The count needs every match anyway, so a page costs no more than its total.


def _matches(q: Query) -> Any:
    return select(R.c.res_id).where(*_conditions(q)).cte("matches").prefix_with("MATERIALIZED")


def _fenced(q: Query) -> bool:
    # Without criteria (or by _id only) the primary key is the right path; no fence needed.
    return any(not isinstance(c, IdClause) for c in q.clauses)


def _lookup(q: Query, limit: int) -> Select[Any]:
    if not _fenced(q):
        return select(R.c.res_id).where(*_conditions(q)).limit(limit)
    m = _matches(q)
    return select(m.c.res_id).limit(limit)


def _page(q: Query, limit: int, offset: int) -> Select[Any]:
    cols = (R.c.res_id, R.c.version, R.c.last_updated, content_of(R).label("content"))
    if not _fenced(q):
        return select(*cols).where(*_conditions(q)).order_by(R.c.res_id).limit(limit).offset(offset)
    m = _matches(q)
    page = select(m.c.res_id).order_by(m.c.res_id).limit(limit).offset(offset).subquery("page")
    return (
        select(*cols)
        .join_from(page, R, and_(R.c.res_type == q.resource_type, R.c.res_id == page.c.res_id))
        .order_by(R.c.res_id)
    )


def _page_and_total(q: Query, limit: int, offset: int) -> Select[Any]:
    """The page's rows, each carrying the total; a single (total, NULL...) row when empty."""
    m = _matches(q)
    total = select(func.count().label("total")).select_from(m).subquery("t")
    page = select(m.c.res_id).order_by(m.c.res_id).limit(limit).offset(offset).subquery("page")
    rows = (
        select(R.c.res_id, R.c.version, R.c.last_updated, content_of(R).label("content"))
        .join_from(page, R, and_(R.c.res_type == q.resource_type, R.c.res_id == page.c.res_id))
        .subquery("p")
    )
    return (
        select(total.c.total, rows.c.res_id, rows.c.version, rows.c.last_updated, rows.c.content)
        .select_from(total.outerjoin(rows, true()))
        .order_by(rows.c.res_id)
    )


def _page_url(base: str, q: Query, count: int, offset: int) -> str:
    pairs = [*q.applied, ("_count", str(count))]
    if offset:
        pairs.append(("_offset", str(offset)))
    return f"{base}/{q.resource_type}?{urlencode(pairs, safe='|:/')}"
