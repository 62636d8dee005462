"""Index-backed search over the resource store: searchset Bundles for GET, and id lookups for
conditional create / update / delete / patch and conditional references.

Every function receives a live SQLAlchemy `Connection` and never commits. All values are
bound parameters. Each clause of a `Query` maps onto an index: tokens → GIN `@>` / `&&` on
`resource.tokens`; strings → a btree range (`LIKE 'abc%'`, "C" collation) on
`resource_string`; dates → btree on `(res_type, date_lo | date_hi | last_updated)`;
`_id` → the primary key. Deleted resources never match.

Results are ordered by id (stable under updates); paging is `_offset` based, and one pass over
the matches yields both `total` and the page. The statements are shaped so that the planner's
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

from core.errors import BadRequest, FhirError
from core.fhir.outcome import issue, outcome
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
) -> dict[str, Any]:
    """A FHIR searchset Bundle for `GET [base]/resource_type?params`.

    `total` (unless `_total=none`), links self / first / previous / next as absolute URLs under
    `base_url`, entries with fullUrl, the resource with its meta restored, search.mode "match".
    Parameters ignored in lenient mode are reported by an OperationOutcome entry
    (search.mode "outcome") with a warning naming them.
    """
    q = parse_query(resource_type, params, strict=strict)
    count = min(default_count if q.count is None else q.count, max_count)
    total: int | None = None
    rows: list[Any] = []
    if count == 0:
        total = conn.execute(_count(q)).scalar_one() if q.total else None
    elif q.total and _fenced(q):
        # One pass over the matches serves both the total and the page.
        fetched = conn.execute(_page_and_total(q, count + 1, q.offset)).all()
        total = fetched[0][0]
        rows = [r[1:] for r in fetched if r[1] is not None]
    else:
        total = conn.execute(_count(q)).scalar_one() if q.total else None
        if total is None or q.offset < total:
            rows = list(conn.execute(_page(q, count + 1, q.offset)))
    has_next = len(rows) > count
    del rows[count:]

    base = base_url.rstrip("/")
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}
    if total is not None:
        bundle["total"] = total
    links = [("self", q.offset), ("first", 0)]
    if q.offset > 0:
        links.append(("previous", max(0, q.offset - count)))
    if has_next:
        links.append(("next", q.offset + count))
    bundle["link"] = [
        {"relation": rel, "url": _page_url(base, q, count, off)} for rel, off in links
    ]
    entries: list[dict[str, Any]] = [
        {
            "fullUrl": f"{base}/{resource_type}/{res_id}",
            "resource": row_to_resource(content, version, last_updated),
            "search": {"mode": "match"},
        }
        for res_id, version, last_updated, content in rows
    ]
    if q.ignored:
        names = ", ".join(name for name, _ in q.ignored)
        entries.append(
            {
                "resource": outcome(
                    issue(
                        "warning",
                        "not-supported",
                        f"Search parameters not supported for {resource_type} were ignored: "
                        f"{names}",
                        [name for name, _ in q.ignored],
                    )
                ),
                "search": {"mode": "outcome"},
            }
        )
    if entries:
        bundle["entry"] = entries
    return bundle


def explain(conn: Connection, resource_type: str, params: list[tuple[str, str]]) -> str:
    """EXPLAIN output of the statements a search may run (count, first page, lookup for
    conditional operations, page with total); for tests and operators checking index use."""
    q = parse_query(resource_type, params, strict=False)
    plans = []
    stmts = [_count(q), _page(q, 51, q.offset), _lookup(q, 2)]
    if _fenced(q):
        stmts.append(_page_and_total(q, 51, q.offset))
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


def _count(q: Query) -> Select[Any]:
    return select(func.count()).select_from(R).where(*_conditions(q))


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
