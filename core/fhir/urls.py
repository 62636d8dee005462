"""Parsing of request URLs (`Bundle.entry.request.url` and REST paths) into what they address.

Patient                     type-level: create, search, type history
Patient/123                 instance: read, update, patch, delete
Patient/123/_history/2      vread
Patient/123/_history        instance history
Patient?identifier=a|b      conditional (update / delete / patch) or search
Patient/_search             search by POST
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit

from core.errors import BadRequest

__all__ = ["RequestUrl", "parse_request_url", "parse_query_string", "parse_etag"]

_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_TYPE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")


@dataclass(slots=True)
class RequestUrl:
    resource_type: str | None = None
    id: str | None = None
    version: str | None = None
    history: bool = False
    search: bool = False  # `Type/_search`
    operation: str | None = None  # `$lookup` and friends (not supported)
    query: list[tuple[str, str]] | None = None  # present when the URL has `?`
    extra: list[str] = field(default_factory=list)

    @property
    def is_conditional(self) -> bool:
        return self.id is None and self.query is not None


def parse_query_string(qs: str) -> list[tuple[str, str]]:
    """`a=1&b=x%7Cy` → [("a","1"), ("b","x|y")]; blank values are kept (they are errors later)."""
    return parse_qsl(qs, keep_blank_values=True)


def parse_request_url(url: str, *, expression: str = "url") -> RequestUrl:
    """Parse a relative (or absolute, [base]-prefixed) request URL. Raises BadRequest."""
    if not isinstance(url, str) or not url.strip():
        raise BadRequest("request.url is required", expression=expression, code="required")
    url = url.strip()
    query: list[tuple[str, str]] | None = None
    if url.startswith(("http://", "https://")):
        parts = urlsplit(url)
        path, qs = parts.path, parts.query
        has_query = "?" in url
    else:
        path, sep, qs = url.partition("?")
        has_query = bool(sep)
    if has_query:
        query = parse_query_string(qs)
    segments = [s for s in path.split("/") if s]
    # An absolute URL carries the base path before the resource type: drop it.
    while segments and not (_TYPE.match(segments[0]) or segments[0].startswith("$")):
        segments.pop(0)
    out = RequestUrl(query=query)
    if not segments:
        if query is not None:
            raise BadRequest(
                "A search or conditional URL needs a resource type", expression=expression
            )
        return out
    head = segments[0]
    if head.startswith("$"):
        out.operation = head
        return out
    out.resource_type = head
    rest = segments[1:]
    if not rest:
        return out
    if rest[0] == "_search" and len(rest) == 1:
        out.search = True
        return out
    if rest[0] == "_history":
        if len(rest) != 1:
            raise BadRequest(f"Unsupported URL '{url}'", expression=expression)
        out.history = True
        return out
    if rest[0].startswith("$"):
        out.operation = rest[0]
        return out
    if not _ID.match(rest[0]):
        raise BadRequest(
            f"'{rest[0]}' is not a valid resource id", expression=expression, code="value"
        )
    out.id = rest[0]
    rest = rest[1:]
    if not rest:
        return out
    if rest[0].startswith("$") and len(rest) == 1:
        out.operation = rest[0]
        return out
    if rest[0] != "_history" or len(rest) > 2:
        raise BadRequest(f"Unsupported URL '{url}'", expression=expression)
    if len(rest) == 1:
        out.history = True
        return out
    if not _ID.match(rest[1]):
        raise BadRequest(f"'{rest[1]}' is not a valid version id", expression=expression)
    out.version = rest[1]
    return out


def parse_etag(value: str | None, *, expression: str = "ifMatch") -> int | None:
    """`W/"3"` (or `"3"`, `3`) → 3. Raises BadRequest for anything else."""
    if value is None or value == "":
        return None
    raw = value.strip()
    if raw.startswith("W/"):
        raw = raw[2:]
    raw = raw.strip('"')
    if not raw.isdigit():
        raise BadRequest(f"'{value}' is not a valid version ETag", expression=expression)
    return int(raw)
