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
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from core.errors import BadRequest
from core.fhir.strings import check_text

__all__ = ["RequestUrl", "parse_request_url", "parse_query_string", "parse_etag"]

_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_TYPE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
# W/"vid", "vid" or a bare vid; vid has the FHIR id form (ASCII only: `\d` would take "²").
_ETAG = re.compile(r'^(?:W/)?"([A-Za-z0-9\-.]{1,64})"$|^([A-Za-z0-9\-.]{1,64})$')


@dataclass(frozen=True, slots=True)
class RequestUrl:
    """What a request URL addresses; `query` is None when the URL has no `?` at all."""

    resource_type: str | None = None
    id: str | None = None
    version: str | None = None
    history: bool = False
    search: bool = False  # `Type/_search`
    operation: str | None = None  # `$lookup` and friends (not supported)
    query: tuple[tuple[str, str], ...] | None = None

    @property
    def is_conditional(self) -> bool:
        return self.id is None and self.query is not None


def parse_query_string(qs: str, *, expression: str = "url") -> list[tuple[str, str]]:
    """`a=1&b=x%7Cy` → [("a","1"), ("b","x|y")]; blank values are kept (they are errors later).

    A control character in a decoded name or value is a 400 at `expression`."""
    pairs = parse_qsl(qs, keep_blank_values=True)
    for name, value in pairs:
        check_text(name, expression, "A search parameter name")
        check_text(value, expression, f"The value of search parameter {name!r}")
    return pairs


# Parsed URLs by their text: the entries of a load share a few (`Patient`, `Observation`), and a
# RequestUrl is immutable. Only successes are kept (an error names its entry), and only short
# URLs; the whole map is dropped when full, which a load of distinct URLs reaches rarely.
_PARSED: dict[str, RequestUrl] = {}
_PARSED_MAX = 4096
_PARSED_KEY_MAX = 256


def parse_request_url(url: str, *, expression: str = "url") -> RequestUrl:
    """Parse a relative (or absolute, [base]-prefixed) request URL. Raises BadRequest."""
    found = _PARSED.get(url) if type(url) is str else None
    if found is not None:
        return found
    parsed = _parse_request_url(url, expression)
    if len(url) <= _PARSED_KEY_MAX:
        if len(_PARSED) >= _PARSED_MAX:
            _PARSED.clear()
        _PARSED[url] = parsed
    return parsed


def _parse_request_url(url: str, expression: str) -> RequestUrl:
    if not isinstance(url, str) or not url.strip():
        raise BadRequest("request.url is required", expression=expression, code="required")
    url = url.strip()
    query: tuple[tuple[str, str], ...] | None = None
    if url.startswith(("http://", "https://")):
        parts = urlsplit(url)
        path, qs = parts.path, parts.query
        has_query = "?" in url
    else:
        path, sep, qs = url.partition("?")
        has_query = bool(sep)
    if has_query:
        query = tuple(parse_query_string(qs, expression=expression))
    segments = [s for s in path.split("/") if s]
    # An absolute URL carries the base path before the resource type: drop it.
    while segments and not (_TYPE.match(segments[0]) or segments[0].startswith("$")):
        segments.pop(0)
    if not segments:
        if query is not None:
            raise BadRequest(
                "A search or conditional URL needs a resource type", expression=expression
            )
        return RequestUrl(query=query)
    head = segments[0]
    if head.startswith("$"):
        return RequestUrl(operation=head, query=query)
    rest = segments[1:]
    if not rest:
        return RequestUrl(head, query=query)
    if rest[0] == "_search" and len(rest) == 1:
        return RequestUrl(head, search=True, query=query)
    if rest[0] == "_history":
        if len(rest) != 1:
            raise BadRequest(f"Unsupported URL '{url}'", expression=expression)
        return RequestUrl(head, history=True, query=query)
    if rest[0].startswith("$"):
        return RequestUrl(head, operation=rest[0], query=query)
    if not _ID.match(rest[0]):
        raise BadRequest(
            f"'{rest[0]}' is not a valid resource id", expression=expression, code="value"
        )
    rid, rest = rest[0], rest[1:]
    if not rest:
        return RequestUrl(head, rid, query=query)
    if rest[0].startswith("$") and len(rest) == 1:
        return RequestUrl(head, rid, operation=rest[0], query=query)
    if rest[0] != "_history" or len(rest) > 2:
        raise BadRequest(f"Unsupported URL '{url}'", expression=expression)
    if len(rest) == 1:
        return RequestUrl(head, rid, history=True, query=query)
    if not _ID.match(rest[1]):
        raise BadRequest(f"'{rest[1]}' is not a valid version id", expression=expression)
    return RequestUrl(head, rid, version=rest[1], query=query)


def parse_etag(value: object, *, expression: str = "ifMatch") -> str | None:
    """`W/"3"` (or `"3"`, `3`) → "3": the version id an ETag names. None when absent.

    Any id-form version (`W/"3a"`) is well formed: it simply matches no version this server
    wrote, which is a failed precondition (412), not a bad request. Anything else — a JSON
    number, a non-id character such as `²`, stray quotes — is a 400.
    """
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise BadRequest(
            f"An ETag is a string such as 'W/\"1\"', not {type(value).__name__} {value!r}",
            expression=expression,
            code="value",
        )
    m = _ETAG.match(value.strip())
    if m is None:
        raise BadRequest(f"'{value}' is not a valid version ETag", expression=expression,
                         code="value")
    return m.group(1) or m.group(2)
