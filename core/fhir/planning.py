"""Planning: Bundle entries → a plan, pure data, no database.

`plan_transaction` and `plan_batch` check and classify every entry (read, vread, history,
search, create, update, patch, delete), validate its resource, parse its conditions, and
decide everything that needs no stored data: the processing order (R4 http.html#trules:
DELETE, POST, PUT/PATCH, GET/HEAD), the ids of new resources, which entry each `fullUrl`
names, the conditions to look up, and the identities each write touches. A transaction whose
entries touch one resource twice fails here when that shows without the database (same
literal id, same condition); `check_overlap` runs again at execution on the identities the
conditions resolved to.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from core.errors import BadRequest, FhirError, NotSupported, TooLarge
from core.fhir.bundle import NOT_SCREENED, Screening, check_entry
from core.fhir.search_params import parse_query
from core.fhir.urls import RequestUrl, parse_etag, parse_query_string, parse_request_url
from core.fhir.validation import known_resource_type, validate_resource

__all__ = [
    "Condition",
    "PlannedEntry",
    "TransactionPlan",
    "BatchPlan",
    "plan_transaction",
    "plan_batch",
    "check_overlap",
    "touch_at",
    "condition_key",
    "new_id",
]

Kind = Literal["read", "vread", "history", "search", "create", "update", "patch", "delete"]
Query = tuple[tuple[str, str], ...]
IdFactory = Callable[[], str]

METHODS = ("DELETE", "GET", "HEAD", "PATCH", "POST", "PUT")
# R4 http.html#trules: deletes, then creates, then updates and patches, then reads.
PHASE = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 2, "GET": 3, "HEAD": 3}
WRITE_PHASES = 3  # phases 0-2 are R4's "steps 1-3": their identities must not overlap
# Parameters that change only how a response is written: accepted on every interaction.
_FORMAT_PARAMS = frozenset({"_format", "_pretty"})
_HISTORY_PARAMS = frozenset({"_count", "_offset"}) | _FORMAT_PARAMS
_JSON_FORMATS = frozenset({"json", "application/json", "application/fhir+json"})


def new_id() -> str:
    """A random (version 4) UUID as text, as str(uuid.uuid4()) writes it, without building the
    UUID object (a third of the cost; one per create)."""
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"


# The high hex digit of the clock_seq byte, with the RFC 4122 variant bits (10xx) set.
_VARIANT = {d: "89ab"[int(d, 16) & 3] for d in "0123456789abcdef"}


def condition_key(resource_type: str, query: Iterable[tuple[str, str]]) -> str:
    """A canonical text for a condition: same search, same key, whatever the parameter order."""
    return resource_type + "?" + "&".join(f"{k}={v}" for k, v in sorted(query))


@dataclass(frozen=True, slots=True)
class Condition:
    """A search that picks the resource a conditional create/update/patch/delete writes."""

    resource_type: str
    query: Query
    key: str  # condition_key(): also the identity the entry touches

    @classmethod
    def of(cls, resource_type: str, query: Iterable[tuple[str, str]]) -> Condition:
        q = tuple(query)
        return cls(resource_type, q, condition_key(resource_type, q))


@dataclass(frozen=True, slots=True)
class PlannedEntry:
    """One checked Bundle entry: what it does, to what, and where its errors point."""

    index: int
    method: str
    kind: Kind
    expr: str  # FHIRPath of the entry, e.g. "Bundle.entry[3]"
    url: RequestUrl
    resource_type: str
    # The id this entry reads or writes: the URL's, a new one for a create, the body's (or a
    # new one) for a conditional update that matches nothing. Execution replaces it with the
    # match of a condition; None for a conditional patch/delete until resolved.
    id: str | None = None
    resource: dict[str, Any] | None = None
    full_url: str | None = None
    if_match: str | None = None  # a version id (ETag W/"…" without its wrapping)
    condition: Condition | None = None  # ifNoneExist, or a conditional update/patch/delete URL
    condition_at: str = ""  # where the condition was written: `….request.url` / `ifNoneExist`
    body_id: str | None = None  # a conditional update's resource.id
    search: Query | None = None  # the parameters of a search
    # The identities this write touches before any condition is resolved: "Type/id" for a
    # literal id, the condition's key for a conditional one.
    touches: tuple[str, ...] = ()
    # False when the entry's text showed no `reference` key (core.fhir.bundle.Screening).
    may_reference: bool = True

    @property
    def phase(self) -> int:
        return PHASE[self.method]

    @property
    def head(self) -> bool:
        return self.method == "HEAD"

    @property
    def writes(self) -> bool:
        return self.kind in ("create", "update", "patch", "delete")


@dataclass(frozen=True, slots=True)
class TransactionPlan:
    """Everything a transaction's execution needs that the entries alone decide."""

    entries: tuple[PlannedEntry, ...]  # request order
    order: tuple[int, ...]  # entry indexes in processing order
    placeholders: Mapping[str, int]  # fullUrl → index of the entry whose resource it names
    conditions: tuple[Condition, ...]  # distinct conditions of conditional writes, to look up
    locks: tuple[str, ...]  # condition keys of conditional creates/updates: serialised writers


@dataclass(frozen=True, slots=True)
class BatchPlan:
    """A batch chunk: its planned entries and, apart, the entries that failed planning."""

    entries: tuple[PlannedEntry, ...]
    failures: Mapping[int, FhirError]  # index → the error that entry answers with
    indexes: tuple[int, ...]  # request order of all entries, planned or failed
    conditions: tuple[Condition, ...]
    locks: tuple[str, ...]


# --------------------------------------------------------------------------- plans


def plan_transaction(
    entries: Sequence[tuple[int, Any]],
    *,
    max_entries: int | None = None,
    make_id: IdFactory = new_id,
    screening: Screening = NOT_SCREENED,
) -> TransactionPlan:
    """Plan a transaction (index, Bundle.entry) list. Raises the first FhirError (index set):
    one bad entry fails the transaction."""
    if max_entries is not None and len(entries) > max_entries:
        raise TooLarge(
            f"This transaction has {len(entries)} entries; at most {max_entries} are accepted",
            expression="Bundle.entry",
        )
    _check_full_urls(entries)
    planned = tuple(plan_entry(i, e, transaction=True, make_id=make_id, screening=screening)
                    for i, e in entries)
    check_overlap(
        (p.index, touch_at(p, t), t) for p in planned if p.phase < WRITE_PHASES for t in p.touches
    )
    order = tuple(p.index for p in sorted(planned, key=lambda p: (p.phase, p.index)))
    placeholders = {
        p.full_url: p.index
        for p in planned
        if p.full_url and p.kind in ("create", "update", "patch")
    }
    return TransactionPlan(planned, order, placeholders, *_conditions(planned))


def plan_batch(entries: Sequence[tuple[int, Any]], *, make_id: IdFactory = new_id,
               screening: Screening = NOT_SCREENED) -> BatchPlan:
    """Plan a batch chunk: each entry on its own, a bad one recorded in `failures`."""
    planned: list[PlannedEntry] = []
    failures: dict[int, FhirError] = {}
    for index, entry in entries:
        try:
            planned.append(plan_entry(index, entry, transaction=False, make_id=make_id,
                                      screening=screening))
        except FhirError as err:
            failures[index] = err
    return BatchPlan(
        tuple(planned), failures, tuple(i for i, _ in entries), *_conditions(planned)
    )


def _conditions(planned: Iterable[PlannedEntry]) -> tuple[tuple[Condition, ...], tuple[str, ...]]:
    conditions: dict[str, Condition] = {}
    locks: list[str] = []
    for p in planned:
        if p.condition is not None:
            conditions.setdefault(p.condition.key, p.condition)
            if p.kind in ("create", "update"):
                locks.append(p.condition.key)
    return tuple(conditions.values()), tuple(locks)


def check_overlap(touches: Iterable[tuple[int, str, str]]) -> None:
    """(entry index, expression, identity) triples of steps 1-3 → 400 if two entries share an
    identity, naming both; the pair reported is the lowest one, whatever the entries' order."""
    first: dict[str, tuple[int, str]] = {}
    for index, where, identity in sorted(touches):
        seen = first.setdefault(identity, (index, where))
        if seen[0] != index:
            what = (
                f"the resource matching {identity}" if "?" in identity else identity
            )
            raise BadRequest(
                f"Entries {seen[0]} and {index} both touch {what}; a transaction may touch a "
                "resource once in its deletes, creates, updates and patches",
                expression=[seen[1], where],
                index=index,
            )


def touch_at(p: PlannedEntry, identity: str) -> str:
    """The expression of where entry `p` names `identity`."""
    if p.condition is not None and identity == p.condition.key:
        return p.condition_at
    if p.body_id is not None and identity.endswith("/" + p.body_id) and p.url.id is None:
        return f"{p.expr}.resource.id"
    return f"{p.expr}.request.url"


def _check_full_urls(entries: Sequence[tuple[int, Any]]) -> None:
    """A transaction's fullUrls must be unique (a placeholder must mean one thing)."""
    seen: dict[str, int] = {}
    for index, entry in entries:
        if not isinstance(entry, dict):
            continue
        full = entry.get("fullUrl")
        if isinstance(full, str) and full:
            if full in seen:
                raise BadRequest(
                    f"fullUrl '{full}' appears in entries {seen[full]} and {index}",
                    expression=[f"Bundle.entry[{seen[full]}].fullUrl",
                                f"Bundle.entry[{index}].fullUrl"],
                    index=index,
                )
            seen[full] = index


# --------------------------------------------------------------------------- one entry


def plan_entry(
    index: int, entry: Any, *, transaction: bool, make_id: IdFactory = new_id,
    screening: Screening = NOT_SCREENED,
) -> PlannedEntry:
    """Check and classify one Bundle.entry. Raises FhirError (index and expression set).
    `screening`: what the entry's JSON text showed already (core.fhir.bundle.Screening)."""
    try:
        return _plan(index, entry, f"Bundle.entry[{index}]", transaction, make_id, screening)
    except FhirError as err:
        err.index = index
        raise


def _plan(
    index: int, entry: Any, expr: str, transaction: bool, make_id: IdFactory,
    screening: Screening,
) -> PlannedEntry:
    check_entry(entry, expr, plain=index in screening.plain)
    request = entry.get("request")
    if not isinstance(request, dict):
        raise BadRequest(
            f"{'Transaction' if transaction else 'Batch'} entries need a request",
            expression=f"{expr}.request",
            code="required",
        )
    method = request.get("method")
    if method not in PHASE:
        raise BadRequest(
            f"request.method must be one of {', '.join(METHODS)}",
            expression=f"{expr}.request.method",
            code="value",
        )
    at_url = f"{expr}.request.url"
    url = parse_request_url(request.get("url"), expression=at_url)
    rtype = _require_type(url, at_url)
    resource = entry.get("resource")
    full_url = entry.get("fullUrl")
    if full_url is not None and not isinstance(full_url, str):
        raise BadRequest("fullUrl must be a string", expression=f"{expr}.fullUrl")
    if_match = parse_etag(request.get("ifMatch"), expression=f"{expr}.request.ifMatch")
    base = {"index": index, "method": method, "expr": expr, "url": url, "resource_type": rtype,
            "full_url": full_url, "if_match": if_match,
            "may_reference": index not in screening.unreferenced}

    if method in ("GET", "HEAD"):
        return PlannedEntry(**base, **_plan_read(url, at_url))
    if method == "POST":
        if url.search:
            return PlannedEntry(
                **base, kind="search", search=(url.query or ()) + _form_params(resource)
            )
        return _plan_create(base, url, request, resource, expr, make_id)

    if url.history or url.version is not None or url.search:
        raise BadRequest(f"{method} is not allowed on this URL", expression=at_url)
    condition: Condition | None = None
    if url.id is None:
        if url.query is None:
            raise BadRequest(
                f"{method} needs 'Type/id' or a conditional 'Type?params' URL", expression=at_url
            )
        condition = _condition(rtype, url.query, at_url)
    else:
        _no_query(url, _FORMAT_PARAMS, at_url, method)
    touches = (condition.key,) if condition else (f"{rtype}/{url.id}",)
    cond = {"condition": condition, "condition_at": at_url if condition else ""}

    if method == "DELETE":
        return PlannedEntry(**base, **cond, kind="delete", id=url.id, touches=touches)
    if method == "PUT":
        body = _checked_resource(resource, expr, rtype, url.id, require_id=url.id is not None)
        body_id = body.get("id") if condition is not None else None
        if body_id is not None:
            touches += (f"{rtype}/{body_id}",)
        return PlannedEntry(
            **base, **cond, kind="update", resource=body, body_id=body_id, touches=touches,
            id=url.id if condition is None else (body_id or make_id()),
        )
    if not isinstance(resource, dict) or resource.get("resourceType") not in (
        "Binary",
        "Parameters",
    ):
        raise BadRequest(
            "PATCH entries carry a Binary (JSON Patch) or a Parameters (FHIRPath Patch) resource",
            expression=f"{expr}.resource",
        )
    return PlannedEntry(**base, **cond, kind="patch", id=url.id, resource=resource,
                        touches=touches)


def _plan_read(url: RequestUrl, at_url: str) -> dict[str, Any]:
    if url.version is not None:
        _no_query(url, _FORMAT_PARAMS, at_url, "vread")
        return {"kind": "vread", "id": url.id}
    if url.history:
        _no_query(url, _HISTORY_PARAMS, at_url, "history")
        return {"kind": "history", "id": url.id}
    if url.id is not None:
        _no_query(url, _FORMAT_PARAMS, at_url, "read")
        return {"kind": "read", "id": url.id}
    return {"kind": "search", "search": url.query or ()}


def _plan_create(
    base: dict[str, Any],
    url: RequestUrl,
    request: dict[str, Any],
    resource: Any,
    expr: str,
    make_id: IdFactory,
) -> PlannedEntry:
    at_url = f"{expr}.request.url"
    if url.id is not None or url.history:
        raise BadRequest("POST (create) takes a resource type URL like 'Patient'",
                         expression=at_url)
    rtype = base["resource_type"]
    body = _checked_resource(resource, expr, rtype, None, require_id=False)
    at_ine = f"{expr}.request.ifNoneExist"
    ine = request.get("ifNoneExist")
    from_header = None
    if ine not in (None, ""):
        if not isinstance(ine, str):
            raise BadRequest("ifNoneExist must be a string", expression=at_ine)
        # Clients send both `identifier=s|v` and `Patient?identifier=s|v`.
        query = ine.partition("?")[2] if "?" in ine else ine
        from_header = _condition(rtype, parse_query_string(query, expression=at_ine), at_ine)
    # `POST Type?params` (fhirpy's get_or_create) is a conditional create on those params.
    from_url = _condition(rtype, url.query, at_url) if url.query is not None else None
    if from_url and from_header and from_url.key != from_header.key:
        raise BadRequest(
            f"The URL's conditions ({from_url.key}) differ from ifNoneExist ({from_header.key});"
            " send one of them",
            expression=[at_url, at_ine],
        )
    condition = from_header or from_url
    at = at_ine if from_header else at_url
    return PlannedEntry(
        **base, kind="create", id=make_id(), resource=body, condition=condition,
        condition_at=at if condition else "", touches=(condition.key,) if condition else (),
    )


def _condition(rtype: str, query: Iterable[tuple[str, str]], where: str) -> Condition:
    params = list(query)
    if not params:
        raise BadRequest("The condition has no search parameters", expression=where)
    try:
        query = parse_query(rtype, params, strict=True)
    except FhirError as err:
        err.expression = [where]
        raise
    if not query.clauses:  # `_count=1` alone would match everything
        raise BadRequest(
            "A condition needs at least one search criterion, not only result parameters",
            expression=where,
        )
    return Condition.of(rtype, params)


def _no_query(url: RequestUrl, allowed: frozenset[str], where: str, what: str) -> None:
    """A parameter this interaction does not use is refused, never silently dropped."""
    unused = sorted({k for k, _ in url.query or () if k not in allowed})
    formats = {v for k, v in url.query or () if k == "_format"} - _JSON_FORMATS
    if formats:
        raise NotSupported(
            f"_format {', '.join(sorted(formats))} is not supported: this server speaks FHIR JSON",
            expression=where,
        )
    if unused:
        raise BadRequest(
            f"{what} takes no parameter {', '.join(unused)}"
            + (f" (it takes {', '.join(sorted(allowed))})" if allowed else ""),
            expression=where,
            code="not-supported",
        )


def _require_type(url: RequestUrl, where: str) -> str:
    if url.operation:
        raise NotSupported(f"Operation '{url.operation}' is not supported", expression=where)
    if not url.resource_type:
        raise BadRequest("request.url names no resource type", expression=where)
    if not known_resource_type(url.resource_type):
        raise BadRequest(
            f"'{url.resource_type}' is not a FHIR R4 resource type",
            expression=where,
            code="not-supported",
        )
    return url.resource_type


def _form_params(resource: Any) -> Query:
    if isinstance(resource, dict) and resource.get("resourceType") == "Parameters":
        return tuple(
            (p.get("name", ""), str(p.get("valueString", "")))
            for p in resource.get("parameter", [])
            if isinstance(p, dict)
        )
    return ()


def _checked_resource(
    resource: Any, expr: str, resource_type: str, url_id: str | None, *, require_id: bool
) -> dict[str, Any]:
    if not isinstance(resource, dict):
        raise BadRequest(
            "This entry needs a resource", expression=f"{expr}.resource", code="required"
        )
    validate_resource(
        resource,
        expression=f"{expr}.resource",
        expected_type=resource_type,
        expected_id=url_id,
        require_id=require_id,
    )
    return resource
