"""Planning: turn Bundle entries into `Step`s — pure data, no database.

Each entry is checked and classified (read, vread, history, search, create, update, patch,
delete), its resource validated, its conditions parsed. Transaction rules that need no
database are enforced here: duplicate fullUrls, and the processing order.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from core.errors import BadRequest, FhirError, NotSupported
from core.fhir.model import EntryResult
from core.fhir.outcome import from_error
from core.fhir.search_params import parse_query
from core.fhir.urls import RequestUrl, parse_etag, parse_query_string, parse_request_url
from core.fhir.validation import known_resource_type, validate_resource

__all__ = ["Step", "plan_entry", "check_full_urls", "TRANSACTION_ORDER", "new_id", "condition_key"]

METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"}
# FHIR R4 http.html#trules: DELETE, then POST, then PUT/PATCH, then GET/HEAD.
TRANSACTION_ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 2, "GET": 3, "HEAD": 3}


def new_id() -> str:
    return str(uuid.uuid4())


def condition_key(resource_type: str, query: list[tuple[str, str]]) -> str:
    """A canonical text for a condition: same search, same key, whatever the parameter order."""
    return resource_type + "?" + "&".join(f"{k}={v}" for k, v in sorted(query))


@dataclass(slots=True)
class Step:
    """One bundle entry on its way through the engine."""

    index: int
    method: str
    kind: str  # read vread history search create update patch delete
    expr: str  # FHIRPath of the entry, e.g. "Bundle.entry[3]"
    url: RequestUrl
    resource_type: str
    id: str | None = None
    resource: dict[str, Any] | None = None
    full_url: str | None = None
    if_match: int | None = None
    if_none_exist: list[tuple[str, str]] | None = None
    condition: list[tuple[str, str]] | None = None  # conditional update/patch/delete
    head: bool = False
    # Filled while executing
    matched: bool = False  # ifNoneExist found the resource: answer with it, write nothing
    result: EntryResult | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str] | None:
        return (self.resource_type, self.id) if self.id is not None else None

    @property
    def writes(self) -> bool:
        return self.kind in ("create", "update", "patch", "delete") and not self.matched

    def fail(self, err: FhirError) -> None:
        if err.index is None:
            err.index = self.index
        self.result = EntryResult(self.index, err.status, outcome=from_error(err))


def _require_type(url: RequestUrl, expr: str) -> str:
    if url.operation:
        raise NotSupported(
            f"Operation '{url.operation}' is not supported", expression=f"{expr}.request.url"
        )
    if not url.resource_type:
        raise BadRequest("request.url names no resource type", expression=f"{expr}.request.url")
    if not known_resource_type(url.resource_type):
        raise BadRequest(
            f"'{url.resource_type}' is not a FHIR R4 resource type",
            expression=f"{expr}.request.url",
            code="not-supported",
        )
    return url.resource_type


def plan_entry(index: int, entry: Any, *, transaction: bool) -> Step:
    """Check and classify one Bundle.entry. Raises FhirError (index and expression set)."""
    expr = f"Bundle.entry[{index}]"
    try:
        return _plan(index, entry, expr, transaction)
    except FhirError as err:
        err.index = index
        raise


def _plan(index: int, entry: Any, expr: str, transaction: bool) -> Step:
    if not isinstance(entry, dict):
        raise BadRequest("Bundle entry must be an object", expression=expr)
    request = entry.get("request")
    if not isinstance(request, dict):
        raise BadRequest(
            f"{'Transaction' if transaction else 'Batch'} entries need a request",
            expression=f"{expr}.request",
            code="required",
        )
    method = request.get("method")
    if method not in METHODS:
        raise BadRequest(
            f"request.method must be one of {', '.join(sorted(METHODS))}",
            expression=f"{expr}.request.method",
            code="value",
        )
    url = parse_request_url(request.get("url"), expression=f"{expr}.request.url")
    resource_type = _require_type(url, expr)
    resource = entry.get("resource")
    full_url = entry.get("fullUrl")
    if full_url is not None and not isinstance(full_url, str):
        raise BadRequest("fullUrl must be a string", expression=f"{expr}.fullUrl")
    step = Step(index, method, "", expr, url, resource_type, full_url=full_url)
    step.if_match = parse_etag(request.get("ifMatch"), expression=f"{expr}.request.ifMatch")

    if method in ("GET", "HEAD"):
        step.head = method == "HEAD"
        if url.version is not None:
            step.kind, step.id = "vread", url.id
        elif url.history:
            step.kind, step.id = "history", url.id
        elif url.id is not None:
            step.kind, step.id = "read", url.id
        else:
            step.kind = "search"
            step.condition = url.query or []
        return step

    if method == "POST":
        if url.search:
            step.kind = "search"
            step.condition = (url.query or []) + _form_params(resource)
            return step
        if url.id is not None or url.query is not None or url.history:
            raise BadRequest(
                "POST (create) takes a resource type URL like 'Patient'",
                expression=f"{expr}.request.url",
            )
        step.kind = "create"
        step.resource = _checked_resource(resource, expr, resource_type, None, require_id=False)
        ine = request.get("ifNoneExist")
        if ine:
            if not isinstance(ine, str):
                raise BadRequest(
                    "ifNoneExist must be a string", expression=f"{expr}.request.ifNoneExist"
                )
            query = parse_query_string(ine.partition("?")[2] if "?" in ine else ine)
            if not query:
                raise BadRequest(
                    "ifNoneExist has no search parameters", expression=f"{expr}.request.ifNoneExist"
                )
            _strict(resource_type, query, f"{expr}.request.ifNoneExist")
            step.if_none_exist = query
        return step

    if url.history or url.version is not None or url.search:
        raise BadRequest(f"{method} is not allowed on this URL", expression=f"{expr}.request.url")
    if url.id is None:
        if url.query is None:
            raise BadRequest(
                f"{method} needs 'Type/id' or a conditional 'Type?params' URL",
                expression=f"{expr}.request.url",
            )
        if not url.query:
            raise BadRequest(
                "Conditional URL has no search parameters", expression=f"{expr}.request.url"
            )
        _strict(resource_type, url.query, f"{expr}.request.url")
        step.condition = url.query
    step.id = url.id

    if method == "DELETE":
        step.kind = "delete"
        return step
    if method == "PUT":
        step.kind = "update"
        step.resource = _checked_resource(
            resource, expr, resource_type, url.id, require_id=url.id is not None
        )
        if url.id is None and step.resource.get("id") is not None:
            step.extra["body_id"] = step.resource["id"]
        return step
    # PATCH
    step.kind = "patch"
    if not isinstance(resource, dict) or resource.get("resourceType") not in (
        "Binary",
        "Parameters",
    ):
        raise BadRequest(
            "PATCH entries carry a Binary (JSON Patch) or a Parameters (FHIRPath Patch) resource",
            expression=f"{expr}.resource",
        )
    step.resource = resource
    return step


def _strict(resource_type: str, query: list[tuple[str, str]], expression: str) -> None:
    try:
        parse_query(resource_type, query, strict=True)
    except FhirError as err:
        err.expression = [expression]
        raise


def _form_params(resource: Any) -> list[tuple[str, str]]:
    if isinstance(resource, dict) and resource.get("resourceType") == "Parameters":
        return [
            (p.get("name", ""), str(p.get("valueString", "")))
            for p in resource.get("parameter", [])
            if isinstance(p, dict)
        ]
    return []


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


def check_full_urls(entries: list[tuple[int, Any]]) -> None:
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
                    expression=f"Bundle.entry[{index}].fullUrl",
                    index=index,
                )
            seen[full] = index
