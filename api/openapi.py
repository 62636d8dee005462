"""`GET /openapi.json`: an OpenAPI 3.1 description of every route, for people and tools.

The document is built once from the table below: each route's summary, parameters, request
example and answers. A test checks that every route of the app appears here, so a new route
cannot ship undocumented. FHIR payloads are described by example, not by schema: the FHIR
specification (and `GET /fhir/metadata`) is their definition.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import orjson
from flask import Blueprint, Response

__all__ = ["bp", "ROUTES", "document"]

bp = Blueprint("openapi", __name__)

FHIR_JSON = "application/fhir+json"

_PATIENT = {"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": "12345"}],
            "name": [{"family": "Chalmers", "given": ["Peter"]}], "gender": "male"}
_TRANSACTION = {
    "resourceType": "Bundle", "type": "transaction",
    "entry": [{"fullUrl": "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a", "resource": _PATIENT,
               "request": {"method": "POST", "url": "Patient",
                           "ifNoneExist": "identifier=urn:mrn|12345"}}],
}
_OUTCOME = {"resourceType": "OperationOutcome", "issue": [{
    "severity": "error", "code": "invalid", "diagnostics": "birthDate: not a FHIR date",
    "expression": ["Bundle.entry[0].resource.birthDate"]}]}
_PROGRESS = {"resourceType": "OperationOutcome", "issue": [{
    "severity": "information", "code": "informational",
    "diagnostics": "running: 1200 of 5000 entries done, 3 failed"}]}
_JOB = {
    "id": "5ae19a4b-0c1f-4a5e-9d51-0b7a8b3f2c11", "kind": "batch", "state": "running",
    "counts": {"total": 5000, "done": 1200, "succeeded": 1197, "failed": 3, "pending": 3800},
    "rate": 2400.0, "createdAt": "2026-12-01T20:31:07.123+00:00",
    "startedAt": "2026-12-01T20:31:07.456+00:00", "finishedAt": None,
    "updatedAt": "2026-12-01T20:31:08.001+00:00",
    "links": {"self": "http://127.0.0.1:8080/jobs/5ae19a4b-0c1f-4a5e-9d51-0b7a8b3f2c11",
              "status": "http://127.0.0.1:8080/fhir/_async/5ae19a4b-0c1f-4a5e-9d51-0b7a8b3f2c11",
              "entries": "http://127.0.0.1:8080/jobs/5ae19a4b-0c1f-4a5e-9d51-0b7a8b3f2c11/entries",
              "failedEntries": "http://127.0.0.1:8080/jobs/5ae19a4b-0c1f-4a5e-9d51-0b7a8b3f2c11"
                               "/entries?outcome=failed"},
}
_ENTRY = {"index": 42, "status": 400, "outcome": _OUTCOME}

_ASYNC = {"name": "Prefer", "in": "header", "schema": {"type": "string"},
          "description": "`respond-async` makes the request a job (202 and a status URL); "
                         "`return=minimal|representation|OperationOutcome` picks entry bodies.",
          "example": "respond-async"}
_JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"},
           "description": "A job id, or a prefix of at least 6 characters naming one job."}
_RTYPE = {"name": "rtype", "in": "path", "required": True, "schema": {"type": "string"},
          "description": "An R4 resource type.", "example": "Patient"}
_RID = {"name": "rid", "in": "path", "required": True,
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9\\-.]{1,64}$"}}
_VID = {"name": "vid", "in": "path", "required": True,
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9\\-.]{1,64}$"}}
_COUNT = {"name": "_count", "in": "query", "schema": {"type": "integer", "minimum": 1}}


def _query(name: str, description: str, example: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "in": "query", "schema": {"type": "string"},
                           "description": description}
    if example is not None:
        out["example"] = example
    return out


# The result parameters of a search (core.fhir.search_controls); criteria are the type's own
# search parameters, listed per type in the CapabilityStatement.
_SEARCH_RESULTS = (
    _query("_cursor", "Where the page starts: copy it from the `next` link, never build it."),
    _query("_sort", "Sort keys, `-` for descending; ties by id.", "-date,code"),
    _query("_include", "Type:param[:Target] or Type:*; `_include:iterate` one level.",
           "Observation:subject"),
    _query("_revinclude", "Type:param[:Target] or Type:*; `_revinclude:iterate` one level.",
           "Observation:subject"),
    _query("_total", "accurate (default), estimate or none.", "none"),
    _query("_summary", "count, true, text, data or false.", "count"),
    _query("_elements", "Top-level elements to keep (mandatory ones stay).", "name,gender"),
)


@dataclass(frozen=True)
class Route:
    path: str
    method: str
    summary: str
    tag: str
    params: tuple[dict[str, Any], ...] = ()
    body: Any = None  # an example request body
    body_type: str = FHIR_JSON
    answers: dict[str, tuple[str, Any]] = field(default_factory=dict)  # status: (what, example)
    open: bool = False  # no bearer token needed


def _fhir_errors() -> dict[str, tuple[str, Any]]:
    return {"400": ("Bad input: an OperationOutcome naming the element", _OUTCOME),
            "401": ("No or bad bearer token", None), "403": ("Scope does not allow it", None)}


ROUTES: tuple[Route, ...] = (
    Route("/fhir", "POST", "Process a batch or transaction Bundle (sync, or a job with "
          "Prefer: respond-async)", "FHIR", (_ASYNC,), _TRANSACTION,
          answers={"200": ("The batch-response / transaction-response Bundle", None),
                   "202": ("Accepted as a job; Content-Location is its status URL", _PROGRESS),
                   "413": ("Above the sync limits: use Prefer: respond-async", None),
                   **_fhir_errors()}),
    Route("/fhir", "PUT", "Batch upsert: a JSON array (or NDJSON) of resources with ids",
          "FHIR", (_ASYNC,), [{**_PATIENT, "id": "p1"}], "application/json",
          answers={"200": ("The stored resources in the same order", None),
                   "202": ("Accepted as a job", _PROGRESS), **_fhir_errors()}),
    Route("/fhir/metadata", "GET", "The CapabilityStatement", "FHIR", open=True,
          answers={"200": ("CapabilityStatement", None)}),
    Route("/fhir/{rtype}", "GET", "Search", "FHIR", (_RTYPE, _COUNT, *_SEARCH_RESULTS),
          answers={"200": ("A searchset Bundle", None), **_fhir_errors()}),
    Route("/fhir/{rtype}", "POST", "Create (If-None-Exist or ?params: conditional create)",
          "FHIR", (_RTYPE,), _PATIENT,
          answers={"201": ("Created", _PATIENT), "200": ("Matched an existing one", None),
                   "412": ("Several matches", None), **_fhir_errors()}),
    Route("/fhir/{rtype}", "PUT", "Conditional update (Type?params)", "FHIR", (_RTYPE,),
          _PATIENT, answers={"200": ("Updated", None), "201": ("Created", None),
                             "412": ("Several matches", None), **_fhir_errors()}),
    Route("/fhir/{rtype}", "PATCH", "Conditional patch (Type?params)", "FHIR", (_RTYPE,),
          [{"op": "replace", "path": "/gender", "value": "female"}],
          "application/json-patch+json",
          answers={"200": ("Patched", None), "412": ("Several matches", None),
                   **_fhir_errors()}),
    Route("/fhir/{rtype}", "DELETE", "Conditional delete (Type?params)", "FHIR", (_RTYPE,),
          answers={"204": ("Deleted", None), **_fhir_errors()}),
    Route("/fhir/{rtype}/_search", "POST", "Search with form parameters", "FHIR", (_RTYPE,),
          "identifier=urn:mrn|12345", "application/x-www-form-urlencoded",
          answers={"200": ("A searchset Bundle", None), **_fhir_errors()}),
    Route("/fhir/{rtype}/_history", "GET", "History of a type", "FHIR", (_RTYPE, _COUNT),
          answers={"200": ("A history Bundle", None), **_fhir_errors()}),
    Route("/fhir/{rtype}/{rid}", "GET", "Read", "FHIR", (_RTYPE, _RID),
          answers={"200": ("The resource", _PATIENT), "404": ("Unknown", None),
                   "410": ("Deleted", None), **_fhir_errors()}),
    Route("/fhir/{rtype}/{rid}", "PUT", "Update (or create with this id)", "FHIR",
          (_RTYPE, _RID), {**_PATIENT, "id": "p1"},
          answers={"200": ("Updated", None), "201": ("Created", None),
                   "412": ("If-Match does not match", None), **_fhir_errors()}),
    Route("/fhir/{rtype}/{rid}", "PATCH", "JSON Patch or FHIRPath Patch", "FHIR",
          (_RTYPE, _RID), [{"op": "replace", "path": "/gender", "value": "female"}],
          "application/json-patch+json",
          answers={"200": ("Patched", None), "404": ("Unknown", None), **_fhir_errors()}),
    Route("/fhir/{rtype}/{rid}", "DELETE", "Delete", "FHIR", (_RTYPE, _RID),
          answers={"204": ("Deleted", None), **_fhir_errors()}),
    Route("/fhir/{rtype}/{rid}/_history", "GET", "History of a resource", "FHIR",
          (_RTYPE, _RID, _COUNT), answers={"200": ("A history Bundle", None),
                                           **_fhir_errors()}),
    Route("/fhir/{rtype}/{rid}/_history/{vid}", "GET", "Read a version", "FHIR",
          (_RTYPE, _RID, _VID), answers={"200": ("The version", None),
                                         "404": ("Unknown", None), **_fhir_errors()}),
    Route("/fhir/_async/{job_id}", "GET", "Poll a job (FHIR async pattern)", "Jobs",
          (_JOB_ID,),
          answers={"202": ("Still at work: Content-Location, X-Progress, Retry-After",
                           _PROGRESS),
                   "200": ("The final response Bundle (or upsert array), streamed", None),
                   "404": ("Unknown, another owner's, or cancelled", None)}),
    Route("/fhir/_async/{job_id}", "DELETE", "Cancel a job", "Jobs", (_JOB_ID,),
          answers={"202": ("Cancelled (or dismissed, when it had ended)", None),
                   "404": ("Unknown", None)}),
    Route("/jobs", "GET", "Your jobs, newest first", "Jobs",
          ({"name": "state", "in": "query", "schema": {"type": "string", "enum": [
              "accepted", "running", "completed", "failed", "cancelled"]}}, _COUNT),
          answers={"200": ("Jobs and a next link", {"jobs": [_JOB], "next": None})}),
    Route("/jobs/{job_id}", "GET", "A job's JSON status", "Jobs", (_JOB_ID,),
          answers={"200": ("State, counts, rate, timestamps, links", _JOB),
                   "404": ("Unknown or another owner's", None)}),
    Route("/jobs/{job_id}/entries", "GET", "Per-entry results, paged, also while running",
          "Jobs", (_JOB_ID, _COUNT, {"name": "outcome", "in": "query", "schema": {
              "type": "string", "enum": ["failed", "succeeded", "done"]}}),
          answers={"200": ("A page of results", {"job": _JOB["id"], "entries": [_ENTRY],
                                                 "next": None})}),
    Route("/jobs/{job_id}/retry", "POST", "Run a batch's failed entries again", "Jobs",
          (_JOB_ID,), answers={"202": ("Retrying", None), "200": ("Nothing failed", None)}),
    Route("/healthz", "GET", "Liveness", "Operations", open=True,
          answers={"200": ("Alive", None)}),
    Route("/readyz", "GET", "Readiness: database and broker reachable", "Operations",
          open=True, answers={"200": ("Ready", None), "503": ("What is down", None)}),
    Route("/metrics", "GET", "Prometheus metrics (a scrape token when auth is required)",
          "Operations", answers={"200": ("text/plain exposition", None)}),
    Route("/ui", "GET", "The jobs page", "Operations", open=True,
          answers={"200": ("HTML", None)}),
    Route("/openapi.json", "GET", "This document", "Operations", open=True,
          answers={"200": ("OpenAPI 3.1", None)}),
)


def _operation(route: Route) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": route.summary, "tags": [route.tag],
                          "operationId": f"{route.method.lower()}{route.path}".replace(
                              "/", "_").replace("{", "").replace("}", ""),
                          "responses": {}}
    if route.params:
        op["parameters"] = list(route.params)
    if route.body is not None:
        op["requestBody"] = {"content": {route.body_type: {"example": route.body}}}
    for status, (what, example) in route.answers.items():
        answer: dict[str, Any] = {"description": what}
        if example is not None:
            kind = FHIR_JSON if isinstance(example, dict) and "resourceType" in example else (
                "application/json")
            answer["content"] = {kind: {"example": example}}
        op["responses"][status] = answer
    if route.open:
        op["security"] = []
    return op


@cache
def document() -> dict[str, Any]:
    try:
        release = version("fhirq")
    except PackageNotFoundError:
        release = "0"
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {"title": "fhirq", "version": release,
                 "description": "Asynchronous FHIR R4 batch & transaction processor: FHIR "
                                "routes under /fhir, the job API under /jobs."},
        "servers": [{"url": "/"}],
        "components": {"securitySchemes": {"bearer": {
            "type": "http", "scheme": "bearer",
            "description": "An API key (fhq_…) or a JWT with SMART system/ scopes."}}},
        "security": [{"bearer": []}],
        "tags": [{"name": "FHIR"}, {"name": "Jobs"}, {"name": "Operations"}],
        "paths": paths,
    }


@bp.get("/openapi.json")
def openapi() -> Response:
    return Response(orjson.dumps(document()), mimetype="application/json",
                    headers={"Cache-Control": "no-cache"})
