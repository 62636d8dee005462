"""The FHIR endpoint (`/fhir`): batch/transaction bundles, batch upsert, and plain REST.

Thin by design: it reads the request, checks the envelope, calls `core.fhir.engine` inside one
database transaction, and answers. A REST interaction is run as a one-entry batch, so it gets
exactly the engine's semantics.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import orjson
from flask import Blueprint, Response, request
from sqlalchemy import Connection

from api.auth import caller_may
from api.http import (
    base_url,
    check_content_type,
    context,
    fhir_response,
    parse_json,
    prefer,
    read_body,
    read_json,
    result_response,
    settings,
)
from core.errors import BadRequest, FhirError, NotFound, TooLarge
from core.fhir.bundle import check_bundle, upsert_entry, upsert_outcome
from core.fhir.capability import capability_statement
from core.fhir.engine import execute_batch, execute_transaction, response_bundle
from core.fhir.model import EntryResult
from core.fhir.outcome import from_error
from core.fhir.strings import check_json_text
from core.fhir.validation import known_resource_type
from core.store.db import get_engine
from core.store.retry import in_transaction

log = logging.getLogger(__name__)

bp = Blueprint("fhir", __name__, url_prefix="/fhir")

T = TypeVar("T")
ASYNC_HINT = " Send it with the header 'Prefer: respond-async' to run it as a job."
NDJSON = "application/fhir+ndjson"


def _in_transaction(work: Callable[[Connection], T]) -> T:
    """Run `work(conn)` in one DB transaction, retrying deadlocks and serialization failures."""
    return in_transaction(get_engine(), work, what="request")


def _async_requested() -> bool:
    return "respond-async" in prefer()


def _submit_async(kind: str) -> Response:
    from api.submit import submit_async

    return submit_async(kind, request)


# --------------------------------------------------------------------------- bundles


@bp.post("")
@bp.post("/")
def post_bundle() -> Response:
    check_content_type()
    if _async_requested():
        return _submit_async("bundle")
    cfg = settings()
    body = read_json(cfg.sync_max_bytes, hint=ASYNC_HINT)
    kind, raw_entries = check_bundle(body, max_entries=cfg.sync_max_entries)
    ctx = context()
    entries = list(enumerate(raw_entries))
    if kind == "transaction":
        try:
            results = _in_transaction(lambda conn: execute_transaction(conn, entries, ctx))
        except FhirError as err:
            return fhir_response(from_error(err), err.status)
    else:
        chunk = cfg.chunk_size

        def run(conn: Any) -> list[EntryResult]:
            out: list[EntryResult] = []
            for start in range(0, len(entries), chunk):
                out.extend(execute_batch(conn, entries[start : start + chunk], ctx))
            return out

        results = _in_transaction(run)
    return fhir_response(response_bundle(kind, results, ctx))


@bp.put("")
@bp.put("/")
def put_upsert() -> Response:
    """Batch upsert: a JSON array (or NDJSON) of resources, each created or updated by id."""
    check_content_type((*("application/fhir+json", "application/json"), NDJSON))
    if _async_requested():
        return _submit_async("upsert")
    cfg = settings()
    if request.mimetype == NDJSON:
        raw = read_body(cfg.sync_max_bytes, hint=ASYNC_HINT)
        elements = [parse_json(line) for line in raw.splitlines() if line.strip()]
    else:
        elements = read_json(cfg.sync_max_bytes, hint=ASYNC_HINT)
        if not isinstance(elements, list):
            raise BadRequest("Batch upsert takes a JSON array of resources", expression="$")
    if len(elements) > cfg.sync_max_entries:
        raise TooLarge(
            f"{len(elements)} resources exceed the synchronous limit of "
            f"{cfg.sync_max_entries}.{ASYNC_HINT}"
        )
    ctx = context()
    entries: list[tuple[int, dict[str, Any]]] = []
    answers: dict[int, Any] = {}
    for i, element in enumerate(elements):
        try:
            entries.append((i, upsert_entry(element, i)))
        except FhirError as err:
            answers[i] = from_error(err)

    def run(conn: Any) -> list[EntryResult]:
        out: list[EntryResult] = []
        for start in range(0, len(entries), cfg.chunk_size):
            out.extend(execute_batch(conn, entries[start : start + cfg.chunk_size], ctx))
        return out

    for r in _in_transaction(run):
        answers[r.index] = r.resource if r.ok else upsert_outcome(r.outcome or {}, r.index)
    return fhir_response([answers[i] for i in range(len(elements))])


# --------------------------------------------------------------------------- REST


@bp.get("/metadata")
def metadata() -> Response:
    return fhir_response(capability_statement(base_url(), settings()))


def _rest(method: str, url: str, *, resource: Any = None, write: bool) -> Response:
    entry: dict[str, Any] = {"request": {"method": method, "url": url}}
    for header, field in (
        ("If-Match", "ifMatch"),
        ("If-None-Exist", "ifNoneExist"),
        ("If-None-Match", "ifNoneMatch"),
    ):
        if header in request.headers:
            entry["request"][field] = request.headers[header]
    if resource is not None:
        entry["resource"] = resource
    ctx = context()
    rtype = url.split("/")[0].split("?")[0]
    if write and ctx.prefer_return == "representation" and not caller_may(rtype, "r"):
        ctx.prefer_return = "minimal"  # a write is not a read (see api.auth)
    results = _in_transaction(lambda conn: execute_batch(conn, [(0, entry)], ctx))
    result = results[0]
    if not result.ok and result.outcome:
        # A FHIRPath Patch's errors are in the Parameters the client sent, not in the target.
        sent = resource.get("resourceType") if isinstance(resource, dict) else None
        _strip_entry_prefix(result.outcome, "Parameters" if sent == "Parameters" else rtype)
    return result_response(result, ctx, write=write, head=method == "HEAD")


_REST_NAMES = {
    "request.url": "url",
    "request.ifMatch": "If-Match",
    "request.ifNoneExist": "If-None-Exist",
    "request.ifNoneMatch": "If-None-Match",
}


def _strip_entry_prefix(body: dict[str, Any], resource_type: str) -> None:
    """REST callers sent no bundle: report `Patient.birthDate`, not `Bundle.entry[0]...`."""
    prefix = "Bundle.entry[0]."
    for issue in body.get("issue", []):
        out = []
        for e in issue.get("expression", []):
            if e.startswith(prefix):
                rest = e[len(prefix) :]
                if rest.startswith("resource"):
                    rest = resource_type + rest[len("resource") :]
                e = _REST_NAMES.get(rest, rest)
            out.append(e)
        issue["expression"] = out


def _url(*parts: str) -> str:
    path = "/".join(parts)
    qs = request.query_string.decode()
    return f"{path}?{qs}" if qs else path


def _check_type(resource_type: str) -> None:
    if not known_resource_type(resource_type):
        raise NotFound(f"'{resource_type}' is not a FHIR R4 resource type", code="not-supported")


def _body_resource() -> Any:
    check_content_type()
    return read_json(settings().sync_max_bytes)


@bp.route("/<rtype>", methods=["GET", "HEAD"])
def search_type(rtype: str) -> Response:
    _check_type(rtype)
    return _rest("GET", _url(rtype) if request.query_string else rtype, write=False)


@bp.post("/<rtype>/_search")
def search_post(rtype: str) -> Response:
    _check_type(rtype)
    from urllib.parse import parse_qsl, urlencode

    limit = settings().sync_max_bytes
    if (request.mimetype or "").lower() == "application/x-www-form-urlencoded":
        # Read here, within the sync limit: werkzeug's form parser cuts a longer body short
        # silently instead of refusing it.
        form = read_body(limit).decode("utf-8", "replace")
        params = parse_qsl(form, keep_blank_values=True)
    else:
        request.max_content_length = limit
        params = [(k, v) for k, vs in request.form.lists() for v in vs]
    params += [(k, v) for k, vs in request.args.lists() for v in vs]

    return _rest("GET", f"{rtype}?{urlencode(params)}", write=False)


@bp.post("/<rtype>")
def create(rtype: str) -> Response:
    _check_type(rtype)
    return _rest("POST", _url(rtype), resource=_body_resource(), write=True)


@bp.route("/<rtype>", methods=["PUT", "PATCH", "DELETE"])
def conditional_write(rtype: str) -> Response:
    _check_type(rtype)
    if not request.query_string:
        raise BadRequest(f"{request.method} on a type needs search parameters (conditional)")
    resource = None
    if request.method == "PUT":
        resource = _body_resource()
    elif request.method == "PATCH":
        resource = _patch_body()
    return _rest(request.method, _url(rtype), resource=resource, write=True)


@bp.route("/<rtype>/<rid>", methods=["GET", "HEAD"])
def read(rtype: str, rid: str) -> Response:
    _check_type(rtype)
    return _rest(request.method, _url(rtype, rid), write=False)


@bp.put("/<rtype>/<rid>")
def update(rtype: str, rid: str) -> Response:
    _check_type(rtype)
    return _rest("PUT", _url(rtype, rid), resource=_body_resource(), write=True)


@bp.patch("/<rtype>/<rid>")
def patch(rtype: str, rid: str) -> Response:
    _check_type(rtype)
    return _rest("PATCH", _url(rtype, rid), resource=_patch_body(), write=True)


@bp.delete("/<rtype>/<rid>")
def delete(rtype: str, rid: str) -> Response:
    _check_type(rtype)
    return _rest("DELETE", _url(rtype, rid), write=True)


@bp.get("/<rtype>/<rid>/_history")
def history_instance(rtype: str, rid: str) -> Response:
    _check_type(rtype)
    return _rest("GET", _url(rtype, rid, "_history"), write=False)


@bp.get("/<rtype>/_history")
def history_type(rtype: str) -> Response:
    _check_type(rtype)
    return _rest("GET", _url(rtype, "_history"), write=False)


@bp.route("/<rtype>/<rid>/_history/<vid>", methods=["GET", "HEAD"])
def vread(rtype: str, rid: str, vid: str) -> Response:
    _check_type(rtype)
    return _rest(request.method, _url(rtype, rid, "_history", vid), write=False)


def _patch_body() -> dict[str, Any]:
    """JSON Patch bodies travel to the engine as the Binary a bundle entry would carry."""
    mime = (request.mimetype or "").lower()
    if mime == "application/json-patch+json":
        ops = read_json(settings().sync_max_bytes)
        check_json_text(ops, "")  # here, so the 400 names the operation: `[0].value`
        return {
            "resourceType": "Binary",
            "contentType": "application/json-patch+json",
            "data": base64.b64encode(orjson.dumps(ops)).decode(),
        }
    check_content_type(("application/fhir+json", "application/json"))
    body = read_json(settings().sync_max_bytes)
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise BadRequest(
            "PATCH takes application/json-patch+json or a FHIRPath Patch Parameters resource"
        )
    return body
