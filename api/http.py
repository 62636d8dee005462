"""Request and response plumbing shared by the blueprints: reading FHIR JSON bodies within
limits, the Prefer header, the base URL, and turning an EntryResult into an HTTP response."""

from __future__ import annotations

from codecs import BOM_UTF8
from email.utils import format_datetime
from typing import Any

import orjson
from flask import Request, Response, current_app, request

from core.auth.permissions import Permissions
from core.config import Settings
from core.errors import BadRequest, TooLarge, UnsupportedMediaType
from core.fhir.model import Context, EntryResult, PreferReturn
from core.fhir.validation import check_json_limits, check_raw_depth

FHIR_JSON = "application/fhir+json"
JSON_TYPES = ("application/fhir+json", "application/json", "application/json-patch+json")


def settings() -> Settings:
    return current_app.config["FHIRQ"]


def base_url(req: Request | None = None) -> str:
    configured = settings().base_url
    if configured:
        return configured.rstrip("/")
    req = req or request
    return req.host_url.rstrip("/") + "/fhir"


def prefer(req: Request | None = None) -> dict[str, str]:
    """`Prefer: return=minimal, respond-async` → {"return": "minimal", "respond-async": ""}."""
    req = req or request
    out: dict[str, str] = {}
    for header in req.headers.getlist("Prefer"):
        for part in header.split(","):
            part = part.strip()
            if not part:
                continue
            key, _, value = part.partition("=")
            out[key.strip().lower()] = value.strip().strip('"')
    return out


def prefer_return(req: Request | None = None) -> PreferReturn:
    value = prefer(req).get("return", "representation")
    if value.lower() == "minimal":
        return "minimal"
    if value.lower() == "operationoutcome":
        return "OperationOutcome"
    return "representation"


def context(req: Request | None = None) -> Context:
    from flask import g

    principal = g.get("principal")
    return Context(
        base_url=base_url(req),
        prefer_return=prefer_return(req),
        strict_search=prefer(req).get("handling", "").lower() == "strict",
        owner=g.get("owner", "anonymous"),
        # A request that was not authenticated holds nothing (api.auth sets the principal).
        permissions=principal.permissions if principal is not None else Permissions(),
    )


def check_content_type(allowed: tuple[str, ...] = JSON_TYPES) -> None:
    mime = (request.mimetype or "").lower()
    if mime and mime not in allowed:
        raise UnsupportedMediaType(
            f"Content-Type '{mime}' is not supported here; use {' or '.join(allowed)}"
        )


READ_SIZE = 1 << 20


def read_body(max_bytes: int, *, hint: str = "") -> bytes:
    """The request body, at most `max_bytes` of it: a larger one is a 413 once its
    Content-Length is known or the first byte past the limit is read (a chunked body), never
    after reading it whole."""
    length = request.content_length
    if length is not None and length > max_bytes:
        raise TooLarge(f"The body has {length} bytes; the limit here is {max_bytes}.{hint}")
    stream = request.stream
    parts: list[bytes] = []
    size = 0
    while True:
        part = stream.read(min(READ_SIZE, max_bytes + 1 - size))
        if not part:
            return b"".join(parts)
        size += len(part)
        if size > max_bytes:
            raise TooLarge(f"The body exceeds the limit here of {max_bytes} bytes.{hint}")
        parts.append(part)


def read_json(max_bytes: int, *, hint: str = "") -> Any:
    """The request body as JSON, within size and nesting limits; 400/413 OperationOutcomes."""
    return parse_json(read_body(max_bytes, hint=hint))


def parse_json(raw: bytes) -> Any:
    """One JSON document; a leading UTF-8 byte-order mark is ignored (RFC 8259 §8.1 allows it,
    and files saved on Windows often start with one)."""
    raw = raw.removeprefix(BOM_UTF8)
    if not raw.strip():
        raise BadRequest("The request body is empty", code="required")
    cfg = settings()
    check_raw_depth(raw, cfg.max_json_depth)
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"The body is not valid JSON: {exc}", code="structure") from exc
    if len(raw) > cfg.max_string_bytes:
        # A smaller body holds no string longer than the limit (a string's UTF-8 is never
        # longer than its JSON text), and its depth was checked on the bytes above: walking
        # every value again would cost a sync request more than parsing it.
        check_json_limits(value, max_depth=cfg.max_json_depth,
                          max_string_bytes=cfg.max_string_bytes)
    return value


def fhir_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    payload = b"" if body is None else orjson.dumps(body)
    return Response(payload, status=status, headers=headers, mimetype=FHIR_JSON)


def result_response(
    result: EntryResult, ctx: Context, *, write: bool, head: bool = False
) -> Response:
    """An EntryResult as a plain REST answer (Location, ETag, Last-Modified, body per Prefer).

    `Prefer: return=` applies to writes; reads and searches always carry their resource.
    """
    headers: dict[str, str] = {}
    if result.location:
        headers["Location"] = f"{ctx.base_url}/{result.location}"
    if result.etag:
        headers["ETag"] = result.etag
    if result.last_modified is not None:
        headers["Last-Modified"] = format_datetime(result.last_modified, usegmt=True)
    body: Any
    if not result.ok:
        body = result.outcome
    elif not write or ctx.prefer_return == "representation":
        body = result.resource
    elif ctx.prefer_return == "OperationOutcome":
        body = result.outcome
    else:
        body = None
    if result.status == 204 or head:
        body = None
    return fhir_response(body, result.status, headers)
