"""Execution: run a plan (core.fhir.planning) against the store, set-based.

A chunk of steps costs a handful of statements whatever its size: one for advisory locks on
conditions, one per resource type to resolve conditions and conditional references, one to
check reference targets, one row-lock read for patches / ifMatch, one upsert statement for all
creates and updates (resource + history + string index), one for all deletes, one to fetch
matched resources. Reads and searches (GET entries) run one by one.

Batch mode records each failure on its step and goes on; transaction mode raises the first
failure (the caller rolls back).
"""

from __future__ import annotations

import copy
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from core.auth.permissions import Permissions, denial
from core.config import get_settings
from core.errors import (
    BadRequest,
    FhirError,
    Forbidden,
    Gone,
    NotFound,
    PreconditionFailed,
    Unprocessable,
)
from core.fhir import outcome as oo
from core.fhir.access import refused
from core.fhir.model import Context, EntryResult, format_instant
from core.fhir.patch import apply_fhirpath_patch, apply_json_patch, decode_binary_patch
from core.fhir.planning import (
    WRITE_PHASES,
    BatchPlan,
    Condition,
    PlannedEntry,
    TransactionPlan,
    check_overlap,
    touch_at,
)
from core.fhir.references import (
    ReferenceScan,
    is_conditional_reference,
    is_placeholder,
    literal_target,
    reference_expressions,
    rewrite_references,
    scan_references,
)
from core.fhir.resources import row_to_resource
from core.fhir.search import find_ids_many, search
from core.fhir.search_params import extract_index, paging_int, parse_query
from core.fhir.urls import parse_query_string
from core.fhir.validation import validate_resource
from core.store import repository as repo

__all__ = ["Step", "run_batch", "run_transaction", "stored_form"]

Key = tuple[str, str]


def stored_form(resource: dict[str, Any], resource_type: str, res_id: str) -> dict[str, Any]:
    """What the store keeps: id set, server-owned meta removed."""
    out = dict(resource)
    out["resourceType"] = resource_type
    out["id"] = res_id
    meta = out.get("meta")
    if isinstance(meta, dict) and ("versionId" in meta or "lastUpdated" in meta):
        meta = {k: v for k, v in meta.items() if k not in ("versionId", "lastUpdated")}
        if meta:
            out["meta"] = meta
        else:
            del out["meta"]
    return out


@dataclass(slots=True)
class Step:
    """A planned entry while it runs: the id it ended up with, its (rewritten or patched)
    resource, the references found in it, and its result."""

    entry: PlannedEntry
    index: int
    kind: str
    expr: str
    resource_type: str
    id: str | None
    resource: dict[str, Any] | None
    matched: bool = False  # ifNoneExist found the resource: answer with it, write nothing
    scan: ReferenceScan | None = None
    refs: list[str] = field(default_factory=list)
    result: EntryResult | None = None

    @classmethod
    def of(cls, entry: PlannedEntry) -> Step:
        return cls(entry, entry.index, entry.kind, entry.expr, entry.resource_type, entry.id,
                   entry.resource)

    @property
    def key(self) -> Key | None:
        return (self.resource_type, self.id) if self.id is not None else None

    @property
    def writes(self) -> bool:
        return self.kind in _WRITES and not self.matched

    def fail(self, err: FhirError) -> None:
        if err.index is None:
            err.index = self.index
        self.result = EntryResult(self.index, err.status, outcome=oo.from_error(err))


_WRITES = frozenset({"create", "update", "patch", "delete"})


class _Failures:
    """Where a step's error goes: recorded (batch) or raised (transaction)."""

    def __init__(self, transaction: bool) -> None:
        self.transaction = transaction

    def __call__(self, step: Step, err: FhirError) -> None:
        err.index = step.index
        if self.transaction:
            raise err
        step.fail(err)


# --------------------------------------------------------------------------- public entry points


def run_batch(conn: Connection, plan: BatchPlan, ctx: Context) -> list[EntryResult]:
    """Run a batch chunk's independent entries; one result per entry, in request order.
    A failing entry gets an error result and never affects the others."""
    fail = _Failures(transaction=False)
    live = [Step.of(e) for e in plan.entries]
    _authorize(live, ctx, fail)
    repo.lock_conditions(conn, plan.locks)
    _resolve_conditions(conn, [s for s in live if _is_conditional(s)], fail)
    writers = [s for s in live if s.result is None and s.writes]
    _resolve_references(conn, writers, None, fail, ctx.permissions)
    _check_targets(conn, [s for s in writers if s.result is None], fail)
    # Entries touching the same resource run in request order, one wave each.
    seen: Counter[Key] = Counter()
    waves: dict[int, list[Step]] = defaultdict(list)
    for s in writers:
        if s.result is None and s.key is not None:
            waves[seen[s.key]].append(s)
            seen[s.key] += 1
    for wave in (waves[n] for n in sorted(waves)):
        _write(conn, [s for s in wave if s.kind == "delete"], fail, ctx)
        _write(conn, [s for s in wave if s.kind != "delete"], fail, ctx)
    _answer_matches(conn, [s for s in live if s.matched and s.result is None])
    for s in live:
        if s.result is None:
            _read(conn, s, fail, ctx)
    results = {s.index: s.result for s in live}
    out: list[EntryResult] = []
    for index in plan.indexes:
        err = plan.failures.get(index)
        result = EntryResult(index, err.status, outcome=oo.from_error(err)) if err else (
            results.get(index))
        assert result is not None, f"entry {index} produced no result"
        out.append(result)
    return out


def run_transaction(conn: Connection, plan: TransactionPlan, ctx: Context) -> list[EntryResult]:
    """Run a transaction's plan atomically in the caller's DB transaction; one result per
    entry in request order. Raises the first FhirError (the caller rolls back)."""
    fail = _Failures(transaction=True)
    steps = {e.index: Step.of(e) for e in plan.entries}
    ordered = [steps[i] for i in plan.order]
    writers = [s for s in ordered if s.entry.phase < WRITE_PHASES]
    _authorize(list(steps.values()), ctx, fail)
    repo.lock_conditions(conn, plan.locks)
    # Every condition is looked up in the store as it was before this transaction, so what one
    # entry resolves to never depends on another entry's effect (they may not overlap anyway).
    _resolve_conditions(conn, [s for s in writers if _is_conditional(s)], fail)
    check_overlap(_touches(writers))
    _write(conn, [s for s in writers if s.kind == "delete"], fail, ctx)
    others = [s for s in writers if s.kind != "delete"]
    placeholders = {}
    for full_url, index in plan.placeholders.items():
        target = steps[index]
        if target.id is not None:
            placeholders[full_url] = f"{target.resource_type}/{target.id}"
    live = [s for s in others if s.writes]
    _resolve_references(conn, live, placeholders, fail, ctx.permissions)
    _check_targets(conn, live, fail)
    _write(conn, live, fail, ctx)
    _answer_matches(conn, [s for s in others if s.matched])
    # Accept all or reject all: a read that fails fails the transaction too.
    for s in ordered[len(writers):]:
        _read(conn, s, fail, ctx)
    out = []
    for e in plan.entries:
        result = steps[e.index].result
        assert result is not None, f"entry {e.index} produced no result"
        out.append(result)
    return out


def _authorize(steps: list[Step], ctx: Context, fail: _Failures) -> None:
    """Refuse, before anything runs, the steps whose interaction or condition the caller's
    scopes do not allow (a transaction fails on the first, in request order)."""
    denied = refused([s.entry for s in steps], ctx.permissions)
    for s in steps:
        err = denied.get(s.index)
        if err is not None:
            fail(s, err)


def _touches(writers: list[Step]) -> Iterable[tuple[int, str, str]]:
    """The identities of steps 1-3 once conditions are resolved: the plan's (literal ids,
    condition keys) and every resolved target."""
    for s in writers:
        e = s.entry
        for identity in e.touches:
            yield s.index, touch_at(e, identity), identity
        if e.condition is not None and s.id is not None:
            yield s.index, e.condition_at, f"{s.resource_type}/{s.id}"


# --------------------------------------------------------------------------- conditions


def _is_conditional(step: Step) -> bool:
    return step.entry.condition is not None and step.result is None


def _resolve_conditions(conn: Connection, steps: list[Step], fail: _Failures) -> None:
    """Give each conditional step its target id (or none), per FHIR http.html#cond-update.
    Only the conditions of `steps` are searched: a refused entry's condition never runs."""
    if not steps:
        return
    by_type: dict[str, dict[str, Condition]] = defaultdict(dict)
    for s in steps:
        c = s.entry.condition
        assert c is not None
        by_type[c.resource_type].setdefault(c.key, c)
    found: dict[str, list[str]] = {}
    for resource_type, distinct in by_type.items():
        conditions = list(distinct.values())
        ids = find_ids_many(conn, resource_type, [list(c.query) for c in conditions])
        found.update(zip((c.key for c in conditions), ids, strict=True))
    leaders: dict[str, Step] = {}
    for s in steps:
        cond = s.entry.condition
        assert cond is not None
        ids = found[cond.key]
        # A create and an update on one condition stay two writes; only the same kind twice
        # (possible in a batch only) shares the first one's target.
        key = s.kind + " " + cond.key
        try:
            _apply_match(s, ids, leaders.get(key))
        except FhirError as err:
            fail(s, err)
            continue
        if not ids and s.kind in ("create", "update") and key not in leaders:
            leaders[key] = s


def _apply_match(s: Step, ids: list[str], leader: Step | None) -> None:
    where = s.entry.condition_at
    if len(ids) > 1:
        raise PreconditionFailed(
            f"The condition matches {len(ids)} resources; it must match one at most",
            expression=where,
            code="multiple-matches",
        )
    if s.kind == "create":
        if ids:
            s.id, s.matched = ids[0], True
        elif leader is not None:  # same condition earlier in this chunk: that one creates
            s.id, s.matched = leader.id, True
        # else: the id the plan assigned
    elif s.kind == "update":
        body_id = s.entry.body_id
        if ids:
            if body_id is not None and body_id != ids[0]:
                raise BadRequest(
                    f"Resource id '{body_id}' differs from the matched resource '{ids[0]}'",
                    expression=f"{s.expr}.resource.id",
                )
            s.id = ids[0]
        elif leader is not None:
            s.id = leader.id
        # else: the body's id, or the one the plan assigned
    elif s.kind == "patch":
        if not ids:
            raise NotFound("No resource matches the conditional patch", expression=where)
        s.id = ids[0]
    elif s.kind == "delete":
        if ids:
            s.id = ids[0]
        else:  # nothing to delete is a successful delete
            s.result = EntryResult(s.index, 204, outcome=oo.informational("No match to delete"))


# --------------------------------------------------------------------------- references


def _resolve_references(
    conn: Connection,
    steps: list[Step],
    placeholders: dict[str, str] | None,
    fail: _Failures,
    permissions: Permissions,
) -> None:
    """Rewrite placeholders and conditional references in the resources of write steps. A
    conditional reference is a search of its type: without `s` on that type it is refused
    (403) and not searched, so a write cannot tell whether a resource matches."""
    conditional: dict[str, list[Step]] = defaultdict(list)
    for s in steps:
        if s.result is None and s.resource is not None and s.kind != "patch":
            # One scan per resource: the references found here serve every later check.
            try:
                scan = scan_references(s.resource, expression=f"{s.expr}.resource",
                                       uris=placeholders is not None,
                                       may_reference=s.entry.may_reference)
            except FhirError as err:
                fail(s, err)
                continue
            s.scan, s.refs = scan, scan.references
            for ref in s.refs:
                if is_conditional_reference(ref):
                    conditional[ref].append(s)
    resolved: dict[str, str] = {}
    by_type: dict[str, list[tuple[str, list[tuple[str, str]]]]] = defaultdict(list)
    for ref in conditional:
        rtype, _, qs = ref.partition("?")
        by_type[rtype].append((ref, parse_query_string(qs)))
    for rtype, items in by_type.items():
        if not permissions.allows(rtype, "s"):
            for ref, _ in items:
                denied = Forbidden(denial(
                    rtype, "s", f"Conditional reference '{ref}' is resolved by a search of {rtype}"
                ))
                for s in conditional[ref]:
                    _fail_ref(s, denied, ref, fail)
            continue
        valid: list[tuple[str, list[tuple[str, str]]]] = []
        for ref, query in items:
            try:
                parse_query(rtype, query, strict=True)
                valid.append((ref, query))
            except FhirError as err:
                for s in conditional[ref]:
                    _fail_ref(s, err, ref, fail)
        found = find_ids_many(conn, rtype, [q for _, q in valid]) if valid else []
        for (ref, _), ids in zip(valid, found, strict=True):
            if len(ids) == 1:
                resolved[ref] = f"{rtype}/{ids[0]}"
                continue
            err: FhirError
            if ids:
                err = PreconditionFailed(
                    f"Conditional reference '{ref}' matches several resources",
                    code="multiple-matches",
                )
            else:  # a reference to nothing is invalid content: 400, as for literal ones
                err = BadRequest(
                    f"Conditional reference '{ref}' matches no resource", code="not-found"
                )
            for s in conditional[ref]:
                _fail_ref(s, err, ref, fail)

    mapping = dict(placeholders or {})
    mapping.update(resolved)
    for s in steps:
        if s.result is None and s.resource is not None and s.kind != "patch":
            assert s.scan is not None
            rewritten = rewrite_references(s.scan, mapping)
            s.scan = None
            if rewritten is not None:
                s.resource = rewritten
                s.refs = [mapping.get(r, r) for r in s.refs]
            if placeholders is None:  # batch: placeholders between entries are not resolved
                continue
            stray = [ref for ref in dict.fromkeys(s.refs) if is_placeholder(ref)]
            if stray:
                fail(
                    s,
                    BadRequest(
                        f"{_quoted('Reference', stray)} "
                        f"{'names' if len(stray) == 1 else 'name'} no entry of this transaction",
                        expression=_where(s, stray),
                    ),
                )


def _fail_ref(step: Step, err: FhirError, ref: str, fail: _Failures) -> None:
    if step.result is not None:
        return
    clone = copy.copy(err)
    clone.expression = _where(step, [ref])
    fail(step, clone)


def _where(step: Step, refs: list[str]) -> list[str]:
    """The FHIRPaths of the Reference.reference elements of `step` holding `refs`."""
    root = f"{step.expr}.resource"
    assert step.resource is not None
    return list(dict.fromkeys(
        e for ref in refs for e in reference_expressions(step.resource, ref, root=root)
    ))


def _quoted(noun: str, refs: list[str]) -> str:
    return f"{noun} '{refs[0]}'" if len(refs) == 1 else f"{noun}s " + ", ".join(
        f"'{r}'" for r in refs
    )


def _check_targets(conn: Connection, steps: list[Step], fail: _Failures) -> None:
    """Literal references must point at existing resources (or ones written in this run)."""
    if not get_settings().referential_integrity:
        return
    written = {s.key for s in steps if s.result is None and s.key is not None}
    wanted: dict[Key, list[tuple[Step, str]]] = defaultdict(list)
    for s in steps:
        if s.result is not None or s.resource is None or s.kind == "patch":
            continue
        for ref in s.refs:
            target = literal_target(ref)
            if target is not None and target not in written:
                wanted[target].append((s, ref))
    if not wanted:
        return
    present = repo.existing_keys(conn, list(wanted))
    missing: dict[int, tuple[Step, list[str]]] = {}
    for target, users in wanted.items():
        if target not in present:
            for s, ref in users:
                missing.setdefault(s.index, (s, []))[1].append(ref)
    for index in sorted(missing):  # a transaction fails on its first entry, whatever the order
        s, refs = missing[index]
        refs = list(dict.fromkeys(refs))
        if s.result is None:
            fail(
                s,
                BadRequest(
                    f"{_quoted('Reference', refs)} "
                    f"{'points' if len(refs) == 1 else 'point'} to no existing resource",
                    expression=_where(s, refs),
                    code="not-found",
                ),
            )


# --------------------------------------------------------------------------- writes


def _write(conn: Connection, steps: list[Step], fail: _Failures, ctx: Context) -> None:
    steps = [s for s in steps if s.result is None and s.writes]
    if not steps:
        return
    needs_state = [s for s in steps if s.kind == "patch" or s.entry.if_match is not None]
    if needs_state:
        current = repo.lock_current(
            conn,
            [s.key for s in needs_state if s.key],
            content=any(s.kind == "patch" for s in needs_state),
        )
        for s in needs_state:
            try:
                _check_state(s, current.get(s.key) if s.key else None)
            except FhirError as err:
                fail(s, err)
    deletes = [s for s in steps if s.result is None and s.kind == "delete"]
    if deletes:
        done = repo.delete_resources(conn, [s.key for s in deletes if s.key])
        for s in deletes:
            hit = done.get(s.key) if s.key else None
            if hit:
                version, when = hit
                s.result = EntryResult(
                    s.index,
                    204,
                    etag=f'W/"{version}"',
                    last_modified=when,
                    outcome=oo.informational("Deleted"),
                )
            else:
                s.result = EntryResult(s.index, 204, outcome=oo.informational("Already absent"))
    rows: list[tuple[Step, repo.WriteRow]] = []
    for s in steps:
        if s.result is not None or s.kind == "delete" or s.key is None:
            continue
        content = stored_form(s.resource or {}, s.resource_type, s.key[1])
        rows.append((s, repo.WriteRow(s.key, content, s.entry.method, extract_index(content))))
    if not rows:
        return
    written = repo.write_resources(conn, [r for _, r in rows])
    for (s, row), w in zip(rows, written, strict=True):
        status = 201 if w.created else 200
        text = "Created" if w.created else ("Updated" if w.changed else "Unchanged: no new version")
        # A stored Bundle is kept whole in a job's results, like a search's (write_results).
        if ctx.write_representations or s.resource_type == "Bundle":
            s.result = _resource_result(
                s.index, status, row_to_resource(row.content, w.version, w.last_updated)
            )
        else:
            s.result = _version_result(s.index, status, *row.key, w.version,
                                       format_instant(w.last_updated))
        s.result.outcome = _informational(text)


_INFORMATIONAL: dict[str, dict[str, Any]] = {}


def _informational(text: str) -> dict[str, Any]:
    # One shared OperationOutcome per message: thousands of writes say the same few things.
    if text not in _INFORMATIONAL:
        _INFORMATIONAL[text] = oo.informational(text)
    return _INFORMATIONAL[text]


def _check_state(s: Step, cur: repo.Current | None) -> None:
    exists = cur is not None and not cur.deleted
    want = s.entry.if_match
    if want is not None and (not exists or cur is None or str(cur.version) != want):
        have = "no current version" if not exists or cur is None else f'W/"{cur.version}"'
        raise PreconditionFailed(
            f'ifMatch W/"{want}" does not match the current version ({have})',
            expression=f"{s.expr}.request.ifMatch",
        )
    if s.kind != "patch":
        return
    if cur is None:
        raise NotFound(
            f"{s.resource_type}/{s.id} does not exist", expression=f"{s.expr}.request.url"
        )
    if cur.deleted:
        raise Gone(f"{s.resource_type}/{s.id} is deleted", expression=f"{s.expr}.request.url")
    s.resource = _patched(s, cur.content or {})


def _patched(s: Step, content: dict[str, Any]) -> dict[str, Any]:
    body = s.resource or {}
    where = f"{s.expr}.resource"
    if body.get("resourceType") == "Binary":
        ops = decode_binary_patch(body, expression=where)
        new = apply_json_patch(content, ops, expression=where)
    else:
        new = apply_fhirpath_patch(content, body, expression=where)
    try:
        validate_resource(
            new,
            expression=s.resource_type,
            expected_type=s.resource_type,
            expected_id=s.id,
            require_id=True,
        )
    except FhirError as err:
        raise Unprocessable(
            f"The patched resource is not valid: {err.diagnostics}",
            expression=err.expression or [where],
        ) from err
    return new


def _resource_result(index: int, status: int, resource: dict[str, Any]) -> EntryResult:
    meta = resource["meta"]
    result = _version_result(index, status, resource["resourceType"], resource["id"],
                             meta["versionId"], meta["lastUpdated"])
    result.resource = resource
    return result


def _version_result(index: int, status: int, resource_type: str, res_id: str,
                    version: int | str, last_updated: str) -> EntryResult:
    """The answer naming a stored version; `last_updated` as `meta.lastUpdated` shows it."""
    return EntryResult(
        index,
        status,
        location=f"{resource_type}/{res_id}/_history/{version}",
        etag=f'W/"{version}"',
        last_modified=_parse_instant(last_updated),
    )


def _parse_instant(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _answer_matches(conn: Connection, steps: list[Step]) -> None:
    """ifNoneExist found the resource: answer 200 with it (FHIR http.html#ccreate)."""
    todo = [s for s in steps if s.result is None and s.key is not None]
    if not todo:
        return
    current = repo.read_current(conn, [s.key for s in todo if s.key])
    for s in todo:
        cur = current.get(s.key) if s.key else None
        if cur is None or cur.content is None:
            s.result = EntryResult(s.index, 500, outcome=oo.internal_error("match vanished"))
            continue
        s.result = _resource_result(
            s.index, 200, row_to_resource(cur.content, cur.version, cur.last_updated)
        )
        s.result.outcome = oo.informational("Matched an existing resource (ifNoneExist)")


# --------------------------------------------------------------------------- reads


def _read(conn: Connection, s: Step, fail: _Failures, ctx: Context) -> None:
    try:
        s.result = _READERS[s.kind](conn, s, ctx)
    except FhirError as err:
        fail(s, err)
        return
    if s.entry.head and s.result is not None:
        s.result.resource = None


def _read_one(conn: Connection, s: Step, ctx: Context) -> EntryResult:
    assert s.key is not None
    cur = repo.read_current(conn, [s.key]).get(s.key)
    if cur is None:
        raise NotFound(f"{s.key[0]}/{s.key[1]} is not known", expression=f"{s.expr}.request.url")
    if cur.deleted:
        raise Gone(f"{s.key[0]}/{s.key[1]} was deleted", expression=f"{s.expr}.request.url")
    return _resource_result(
        s.index, 200, row_to_resource(cur.content or {}, cur.version, cur.last_updated)
    )


def _vread(conn: Connection, s: Step, ctx: Context) -> EntryResult:
    version = s.entry.url.version
    assert s.key is not None and version is not None
    if not version.isdigit():
        raise NotFound(f"Version '{version}' is not known", expression=f"{s.expr}.request.url")
    cur = repo.read_version(conn, s.key, int(version))
    if cur is None:
        raise NotFound(
            f"{s.key[0]}/{s.key[1]}/_history/{version} is not known",
            expression=f"{s.expr}.request.url",
        )
    if cur.deleted:
        raise Gone(
            f"{s.key[0]}/{s.key[1]} version {cur.version} is a deletion",
            expression=f"{s.expr}.request.url",
        )
    return _resource_result(
        s.index, 200, row_to_resource(cur.content or {}, cur.version, cur.last_updated)
    )


def _history(conn: Connection, s: Step, ctx: Context) -> EntryResult:
    settings = get_settings()
    params = dict(s.entry.url.query or ())
    where = f"{s.expr}.request.url"
    count = min(
        paging_int("_count", params.get("_count", str(settings.search_default_count)), where),
        settings.search_max_count,
    )
    offset = paging_int("_offset", params.get("_offset", "0"), where)
    total, rows = repo.read_history(conn, s.resource_type, s.id, count=count, offset=offset)
    entries = []
    for rtype, rid, cur, method in rows:
        entry: dict[str, Any] = {"fullUrl": f"{ctx.base_url}/{rtype}/{rid}"}
        if cur.content is not None and not cur.deleted:
            entry["resource"] = row_to_resource(cur.content, cur.version, cur.last_updated)
        entry["request"] = {
            "method": method,
            "url": f"{rtype}/{rid}" if method != "POST" else rtype,
        }
        entry["response"] = {
            "status": "204" if cur.deleted else ("201" if cur.version == 1 else "200"),
            "etag": f'W/"{cur.version}"',
        }
        entries.append(entry)
    bundle = {"resourceType": "Bundle", "type": "history", "total": total, "entry": entries}
    path = f"{s.resource_type}/{s.id}/_history" if s.id else f"{s.resource_type}/_history"
    links = [{"relation": "self", "url": f"{ctx.base_url}/{path}?_count={count}&_offset={offset}"}]
    if offset + count < total:
        links.append(
            {
                "relation": "next",
                "url": f"{ctx.base_url}/{path}?_count={count}&_offset={offset + count}",
            }
        )
    bundle["link"] = links
    if s.id is not None and total == 0:
        raise NotFound(f"{s.resource_type}/{s.id} is not known", expression=f"{s.expr}.request.url")
    return EntryResult(s.index, 200, resource=bundle)


def _search(conn: Connection, s: Step, ctx: Context) -> EntryResult:
    try:
        settings = get_settings()
        bundle = search(
            conn, s.resource_type, list(s.entry.search or ()), base_url=ctx.base_url,
            strict=ctx.strict_search, permissions=ctx.permissions,
            default_count=settings.search_default_count, max_count=settings.search_max_count,
        )
    except FhirError as err:  # the parameter is named in the diagnostics; point at the URL
        err.expression = [f"{s.expr}.request.url"]
        raise
    return EntryResult(s.index, 200, resource=bundle)


_READERS: dict[str, Callable[[Connection, Step, Context], EntryResult]] = {
    "read": _read_one,
    "vread": _vread,
    "history": _history,
    "search": _search,
}
