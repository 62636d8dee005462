"""Execution: run planned `Step`s against the store, set-based.

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
from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from core.config import get_settings
from core.errors import BadRequest, FhirError, Gone, NotFound, PreconditionFailed, Unprocessable
from core.fhir import outcome as oo
from core.fhir.model import Context, EntryResult
from core.fhir.patch import apply_fhirpath_patch, apply_json_patch, decode_binary_patch
from core.fhir.planning import Step, condition_key, new_id
from core.fhir.references import (
    is_conditional_reference,
    is_placeholder,
    literal_target,
    rewrite_references,
    scan_references,
)
from core.fhir.resources import row_to_resource
from core.fhir.search import find_ids_many, search
from core.fhir.search_params import extract_index, parse_query
from core.fhir.urls import parse_query_string
from core.fhir.validation import validate_resource
from core.store import repository as repo

__all__ = ["run_batch", "run_transaction", "stored_form"]

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


def run_batch(conn: Connection, steps: list[Step], ctx: Context) -> None:
    """Run independent steps; failures are recorded on the steps."""
    fail = _Failures(transaction=False)
    live = [s for s in steps if s.result is None]
    repo.lock_conditions(conn, _conditions(live))
    _resolve_conditions(conn, [s for s in live if _is_conditional(s)], fail, transaction=False)
    for s in live:
        if s.kind == "create" and s.id is None and s.result is None:
            s.id = new_id()
    writers = [s for s in live if s.result is None and s.writes]
    _resolve_references(conn, writers, None, fail)
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


def run_transaction(conn: Connection, steps: list[Step], ctx: Context) -> None:
    """Run all steps atomically in the caller's transaction; raises the first FhirError."""
    fail = _Failures(transaction=True)
    repo.lock_conditions(conn, _conditions(steps))
    by_method: dict[str, list[Step]] = defaultdict(list)
    for s in steps:
        by_method[s.method].append(s)
    deletes = by_method["DELETE"]
    _resolve_conditions(conn, [s for s in deletes if s.condition is not None], fail, True)
    _check_overlap([s for s in deletes if s.result is None])
    _write(conn, [s for s in deletes if s.result is None], fail, ctx)

    others = by_method["POST"] + by_method["PUT"] + by_method["PATCH"]
    _resolve_conditions(conn, [s for s in others if _is_conditional(s)], fail, True)
    for s in others:
        if s.id is None:  # plain create
            s.id = new_id()
    _check_overlap([s for s in deletes + others if s.writes and s.result is None])
    placeholders = {
        s.full_url: f"{s.resource_type}/{s.id}" for s in others if s.full_url and s.id is not None
    }
    writers = [s for s in others if s.writes]
    _resolve_references(conn, writers, placeholders, fail)
    _check_targets(conn, writers, fail)
    _write(conn, writers, fail, ctx)
    _answer_matches(conn, [s for s in others if s.matched])
    # Reads change nothing, so a failed read is reported in its entry and does not fail the
    # transaction (as the FHIR spec's example transaction notes).
    for s in by_method["GET"] + by_method["HEAD"]:
        _read(conn, s, _Failures(transaction=False), ctx)


# --------------------------------------------------------------------------- conditions


def _is_conditional(step: Step) -> bool:
    return step.if_none_exist is not None or (step.condition is not None and step.writes)


def _query_of(step: Step) -> list[tuple[str, str]]:
    return step.if_none_exist if step.if_none_exist is not None else (step.condition or [])


def _conditions(steps: Iterable[Step]) -> list[str]:
    return [
        condition_key(s.resource_type, _query_of(s))
        for s in steps
        if s.result is None and _is_conditional(s) and s.kind in ("create", "update")
    ]


def _resolve_conditions(
    conn: Connection, steps: list[Step], fail: _Failures, transaction: bool
) -> None:
    """Give each conditional step its target id (or none), per FHIR http.html#cond-update."""
    by_type: dict[str, list[Step]] = defaultdict(list)
    for s in steps:
        if s.result is None:
            by_type[s.resource_type].append(s)
    leaders: dict[str, Step] = {}
    for resource_type, group in by_type.items():
        found = find_ids_many(conn, resource_type, [_query_of(s) for s in group])
        for s, ids in zip(group, found, strict=True):
            # A create and an update on one condition stay two writes; only the same kind twice
            # shares the first one's target.
            key = s.kind + " " + condition_key(resource_type, _query_of(s))
            try:
                _apply_match(s, ids, leaders.get(key))
            except FhirError as err:
                fail(s, err)
                continue
            if not ids and s.kind in ("create", "update") and key not in leaders:
                leaders[key] = s


def _apply_match(s: Step, ids: list[str], leader: Step | None) -> None:
    where = f"{s.expr}.request.{'ifNoneExist' if s.if_none_exist is not None else 'url'}"
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
        else:
            s.id = new_id()
    elif s.kind == "update":
        body_id = s.extra.get("body_id")
        if ids:
            if body_id is not None and body_id != ids[0]:
                raise BadRequest(
                    f"Resource id '{body_id}' differs from the matched resource '{ids[0]}'",
                    expression=f"{s.expr}.resource.id",
                )
            s.id = ids[0]
        else:
            s.id = leader.id if leader is not None else (body_id or new_id())
    elif s.kind == "patch":
        if not ids:
            raise NotFound("No resource matches the conditional patch", expression=where)
        s.id = ids[0]
    elif s.kind == "delete":
        if ids:
            s.id = ids[0]
        else:  # nothing to delete is a successful delete
            s.result = EntryResult(s.index, 204, outcome=oo.informational("No match to delete"))


def _check_overlap(steps: list[Step]) -> None:
    seen: dict[Key, Step] = {}
    for s in sorted(steps, key=lambda x: x.index):
        if s.key is None:
            continue
        if s.key in seen:
            raise BadRequest(
                f"{s.key[0]}/{s.key[1]} is touched by entries {seen[s.key].index} and {s.index};"
                " a transaction may touch a resource once",
                expression=f"{s.expr}.request.url",
                index=s.index,
            )
        seen[s.key] = s


# --------------------------------------------------------------------------- references


def _resolve_references(
    conn: Connection, steps: list[Step], placeholders: dict[str, str] | None, fail: _Failures
) -> None:
    """Rewrite placeholders and conditional references in the resources of write steps."""
    conditional: dict[str, list[Step]] = defaultdict(list)
    for s in steps:
        if s.result is None and s.resource is not None and s.kind != "patch":
            # One scan per resource: the references found here serve every later check.
            try:
                scan = scan_references(s.resource, expression=f"{s.expr}.resource")
            except FhirError as err:
                fail(s, err)
                continue
            s.extra["scan"] = scan
            refs = s.extra["refs"] = scan.references
            for ref in refs:
                if is_conditional_reference(ref):
                    conditional[ref].append(s)
    resolved: dict[str, str] = {}
    by_type: dict[str, list[tuple[str, list[tuple[str, str]]]]] = defaultdict(list)
    for ref in conditional:
        rtype, _, qs = ref.partition("?")
        by_type[rtype].append((ref, parse_query_string(qs)))
    for rtype, items in by_type.items():
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
            refs = s.extra["refs"]
            rewritten = rewrite_references(s.extra.pop("scan"), mapping)
            if rewritten is not None:
                s.resource = rewritten
                refs = s.extra["refs"] = [mapping.get(r, r) for r in refs]
            if placeholders is None:  # batch: placeholders between entries are not resolved
                continue
            for ref in refs:
                if is_placeholder(ref):
                    fail(
                        s,
                        BadRequest(
                            f"Reference '{ref}' names no entry of this transaction",
                            expression=f"{s.expr}.resource",
                        ),
                    )
                    break


def _fail_ref(step: Step, err: FhirError, ref: str, fail: _Failures) -> None:
    if step.result is not None:
        return
    clone = copy.copy(err)
    clone.expression = [f"{step.expr}.resource"]
    fail(step, clone)


def _check_targets(conn: Connection, steps: list[Step], fail: _Failures) -> None:
    """Literal references must point at existing resources (or ones written in this run)."""
    if not get_settings().referential_integrity:
        return
    written = {s.key for s in steps if s.result is None and s.key is not None}
    wanted: dict[Key, list[Step]] = defaultdict(list)
    for s in steps:
        if s.result is not None or s.resource is None or s.kind == "patch":
            continue
        for ref in s.extra.get("refs", ()):
            target = literal_target(ref)
            if target is not None and target not in written:
                wanted[target].append(s)
    if not wanted:
        return
    present = repo.existing_keys(conn, list(wanted))
    for target, users in wanted.items():
        if target in present:
            continue
        for s in users:
            if s.result is None:
                fail(
                    s,
                    BadRequest(
                        f"Reference '{target[0]}/{target[1]}' points to no existing resource",
                        expression=f"{s.expr}.resource",
                        code="not-found",
                    ),
                )


# --------------------------------------------------------------------------- writes


def _write(conn: Connection, steps: list[Step], fail: _Failures, ctx: Context) -> None:
    steps = [s for s in steps if s.result is None and s.writes]
    if not steps:
        return
    needs_state = [s for s in steps if s.kind == "patch" or s.if_match is not None]
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
        rows.append((s, repo.WriteRow(s.key, content, s.method, extract_index(content))))
    if not rows:
        return
    written = repo.write_resources(conn, [r for _, r in rows])
    for (s, row), w in zip(rows, written, strict=True):
        status = 201 if w.created else 200
        text = "Created" if w.created else ("Updated" if w.changed else "Unchanged: no new version")
        s.result = _resource_result(
            s.index, status, row_to_resource(row.content, w.version, w.last_updated)
        )
        s.result.outcome = _informational(text)


_INFORMATIONAL: dict[str, dict[str, Any]] = {}


def _informational(text: str) -> dict[str, Any]:
    # One shared OperationOutcome per message: thousands of writes say the same few things.
    if text not in _INFORMATIONAL:
        _INFORMATIONAL[text] = oo.informational(text)
    return _INFORMATIONAL[text]


def _check_state(s: Step, cur: repo.Current | None) -> None:
    exists = cur is not None and not cur.deleted
    if s.if_match is not None and (not exists or cur is None or cur.version != s.if_match):
        have = "no current version" if not exists or cur is None else f'W/"{cur.version}"'
        raise PreconditionFailed(
            f'ifMatch W/"{s.if_match}" does not match the current version ({have})',
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
    version = meta["versionId"]
    return EntryResult(
        index,
        status,
        location=f"{resource['resourceType']}/{resource['id']}/_history/{version}",
        etag=f'W/"{version}"',
        last_modified=_parse_instant(meta["lastUpdated"]),
        resource=resource,
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
    if s.head and s.result is not None:
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
    assert s.key is not None and s.url.version is not None
    if not s.url.version.isdigit():
        raise NotFound(
            f"Version '{s.url.version}' is not known", expression=f"{s.expr}.request.url"
        )
    cur = repo.read_version(conn, s.key, int(s.url.version))
    if cur is None:
        raise NotFound(
            f"{s.key[0]}/{s.key[1]}/_history/{s.url.version} is not known",
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
    params = dict(s.url.query or [])
    try:
        count = min(
            int(params.get("_count", settings.search_default_count)), settings.search_max_count
        )
        offset = int(params.get("_offset", 0))
    except ValueError as exc:
        raise BadRequest(
            "_count and _offset must be integers", expression=f"{s.expr}.request.url"
        ) from exc
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
    bundle = search(conn, s.resource_type, s.condition or [], base_url=ctx.base_url, strict=False)
    return EntryResult(s.index, 200, resource=bundle)


_READERS: dict[str, Callable[[Connection, Step, Context], EntryResult]] = {
    "read": _read_one,
    "vread": _vread,
    "history": _history,
    "search": _search,
}
