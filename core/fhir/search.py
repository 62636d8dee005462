"""Index-backed search over the resource store: searchset Bundles for GET, and id lookups for
conditional create / update / delete / patch and conditional references.

Every function receives a live SQLAlchemy `Connection` and never commits. All values are
bound parameters. Each clause of a `Query` maps onto an index: tokens → GIN `@>` / `&&` on
`resource.tokens`; strings → a btree range (`LIKE 'abc%'`, "C" collation) on
`resource_string`; dates → btree on `(res_type, date_lo | date_hi | last_updated)`;
`_id` → the primary key. Deleted resources never match.

The searchset itself (order, keyset paging, total, includes, chains) is core.fhir.search_results,
which builds on `_conditions` here. The statements are shaped so that the planner's
fixed ~0.5% guess for rare GIN tokens cannot lead it to a scan of the whole type (see the notes
at `_matches`, `_type_is` and `_find_by_token_sets`).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from sqlalchemy import (
    ColumnElement,
    Connection,
    Integer,
    Select,
    Text,
    and_,
    bindparam,
    cast,
    false,
    func,
    literal,
    not_,
    or_,
    select,
    true,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, JSONPATH

from core.auth.permissions import UNRESTRICTED, Permissions
from core.errors import BadRequest, FhirError
from core.fhir.resources import row_to_resource
from core.fhir.search_params import (
    EXACT_PATHS,
    DateClause,
    DateRange,
    IdClause,
    MissingClause,
    Query,
    StringClause,
    TokenClause,
    parse_query,
)
from core.store.repository import content_of
from core.store.schema import resource as R
from core.store.schema import resource_string as S

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


# --------------------------------------------------------------------------- SQL clauses


def _type_is(resource_type: str, *, gin_driven: bool) -> ColumnElement[bool]:
    if gin_driven:
        # Deliberately not index-matchable (yet estimated like the plain comparison). GIN
        # statistics guess ~0.5% for any rare token, so the planner likes to AND the token
        # bitmap with a bitmap of every row of the type from a (res_type, ...) btree: cheap
        # at 1,000 rows, tens of milliseconds at a million. When a token condition is present
        # it is the selective path; the type is only a recheck.
        return (R.c.res_type == resource_type).is_(True)
    return R.c.res_type == resource_type


def _conditions(q: Query) -> list[ColumnElement[bool]]:
    gin_driven = any(isinstance(c, TokenClause) and not c.negate for c in q.clauses)
    conds: list[ColumnElement[bool]] = [
        _type_is(q.resource_type, gin_driven=gin_driven),
        R.c.deleted == false(),
    ]
    # Single-value token clauses AND-ed together fold into one `tokens @> ARRAY[...]`: one
    # GIN probe instead of several.
    required: list[str] = []
    for c in q.clauses:
        if isinstance(c, TokenClause):
            if c.negate:
                conds.append(not_(R.c.tokens.overlap(_text_array(c.any_of))))
            elif len(c.any_of) == 1:
                required.append(c.any_of[0])
            else:
                conds.append(R.c.tokens.overlap(_text_array(c.any_of)))
        elif isinstance(c, IdClause):
            conds.append(R.c.res_id.in_(c.ids))
        elif isinstance(c, DateClause):
            conds.append(or_(*(_date_condition(c.param, r) for r in c.ranges)))
        elif isinstance(c, StringClause):
            conds.extend(_string_conditions(q.resource_type, c))
        elif isinstance(c, MissingClause):
            conds.append(_missing_condition(q.resource_type, c))
    if required:
        conds.append(R.c.tokens.contains(_text_array(list(dict.fromkeys(required)))))
    return conds


def _text_array(values: list[str]) -> ColumnElement[Any]:
    return cast(literal(values, ARRAY(Text)), ARRAY(Text))


def _date_condition(param: str, r: DateRange) -> ColumnElement[bool]:
    pl, ph = r.lo, r.hi
    if param == "_lastUpdated":
        # A point in time: the range prefixes reduce to plain comparisons on one column.
        t = R.c.last_updated
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
    lo, hi = R.c.date_lo, R.c.date_hi
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


def _string_conditions(resource_type: str, c: StringClause) -> list[ColumnElement[bool]]:
    if c.mode == "prefix":
        match = or_(*(S.c.value.like(_like_escape(v) + "%") for v in c.values))
    elif c.mode == "contains":
        match = or_(*(S.c.value.like("%" + _like_escape(v) + "%") for v in c.values))
    else:
        match = S.c.value.in_(c.values)
    sub = select(S.c.res_id).where(S.c.res_type == resource_type, _param_is(c.param), match)
    conds: list[ColumnElement[bool]] = [R.c.res_id.in_(sub)]
    if c.mode == "exact":
        path = EXACT_PATHS.get(resource_type, {}).get(c.param)
        if path is None:  # a type with string params always has its paths; guard anyway
            raise BadRequest(
                f"':exact' is not supported on '{c.param}' for {resource_type}",
                expression=f"{c.param}:exact",
                code="not-supported",
            )
        conds.append(
            func.jsonb_path_exists(
                content_of(R),
                cast(literal(path), JSONPATH),
                cast(literal({"v": c.originals}, JSONB), JSONB),
            )
        )
    return conds


# HumanName parts are stored under their own parameter only; `name` matches any of them.
NAME_PARTS = ("name", "family", "given")


def _param_is(param: str) -> ColumnElement[bool]:
    return S.c.param.in_(NAME_PARTS) if param == "name" else S.c.param == param


def _like_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _missing_condition(resource_type: str, c: MissingClause) -> ColumnElement[bool]:
    if c.kind == "date":
        return R.c.date_lo.is_(None) if c.missing else R.c.date_lo.is_not(None)
    present = R.c.res_id.in_(
        select(S.c.res_id).where(S.c.res_type == resource_type, _param_is(c.param))
    )
    return not_(present) if c.missing else present
