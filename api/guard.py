"""Refusals before routing, as OperationOutcomes: a request URI or header field over the
product's limits (414 / 431) and a control character in the path, the query or a header (400).

`guard` wraps the WSGI app, so these hold whatever server runs it. Under gunicorn, requests that
its own parser refuses (a request line or header field beyond gunicorn's larger limits, a
malformed request line) are answered by gunicorn itself: `render_server_errors` makes those
OperationOutcomes too.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import unquote

import orjson

from core.config import Settings
from core.errors import BadRequest, FhirError, HeadersTooLarge, UriTooLong, for_status
from core.fhir.outcome import STATUS_TEXT, from_error
from core.fhir.strings import check_text

__all__ = ["check_request", "guard", "render_server_errors"]

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

# Of the control characters, a header value may hold only tab (RFC 9110 field-value).
_HEADER_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_PATH_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _answer(err: FhirError, start_response: Callable[..., Any]) -> list[bytes]:
    body = orjson.dumps(from_error(err))
    status = f"{err.status} {STATUS_TEXT.get(err.status, '')}".rstrip()
    start_response(status, [
        ("Content-Type", "application/fhir+json"),
        ("Content-Length", str(len(body))),
        *err.headers.items(),
    ])
    return [body]


def _headers(environ: dict[str, Any]) -> Iterable[tuple[str, str]]:
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            yield key[5:].replace("_", "-").title(), value
        elif key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            yield key.replace("_", "-").title(), value


def _raw_uri(environ: dict[str, Any]) -> str:
    uri = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if uri:
        return str(uri)
    query = environ.get("QUERY_STRING") or ""
    path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
    return f"{path}?{query}" if query else path


def check_request(environ: dict[str, Any], settings: Settings) -> None:
    """Raise the FhirError a request deserves before any route sees it."""
    uri = _raw_uri(environ)
    if len(uri) > settings.max_uri_bytes:
        raise UriTooLong(
            f"The request URI has {len(uri)} bytes; the limit is {settings.max_uri_bytes} "
            "(FHIRQ_MAX_URI_BYTES). Send long searches as POST [type]/_search.",
            expression="url",
        )
    headers = list(_headers(environ))
    for name, value in headers:
        size = len(name) + 2 + len(value)
        if size > settings.max_header_bytes:
            raise HeadersTooLarge(
                f"The header {name} has {size} bytes; the limit is {settings.max_header_bytes} "
                "(FHIRQ_MAX_HEADER_BYTES)",
                expression=name,
            )
    # PATH_INFO is already percent-decoded (as latin-1 text of its bytes). No type, id or
    # version holds a line break or tab either: `Patient/p1%0A` is not `Patient/p1`.
    found = _PATH_CONTROL.search(environ.get("PATH_INFO", ""))
    if found:
        raise BadRequest(
            f"The request path contains the control character U+{ord(found.group()):04X}",
            code="value",
            expression="url",
        )
    for pair in (environ.get("QUERY_STRING") or "").split("&"):
        name, _, value = pair.partition("=")
        name = unquote(name.replace("+", " "))
        check_text(name, "url", "A query parameter name")
        check_text(unquote(value.replace("+", " ")), name, f"The query parameter {name!r}")
    for name, value in headers:
        found = _HEADER_CONTROL.search(value)
        if found:
            raise BadRequest(
                f"The header {name} contains the control character U+{ord(found.group()):04X}",
                code="value",
                expression=name,
            )


def guard(app: WsgiApp, settings: Settings) -> WsgiApp:
    """`app` behind `check_request`."""

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        try:
            check_request(environ, settings)
        except FhirError as err:
            return _answer(err, start_response)
        return app(environ, start_response)

    return guarded


def render_server_errors() -> None:
    """Make gunicorn answer the requests it refuses itself with an OperationOutcome.

    gunicorn writes those answers (bad request line, request line or header field beyond its
    limits) with `gunicorn.util.write_error`, an HTML page, for every worker class; this
    replaces that function in this process (and in the workers forked from it).
    """
    try:
        from gunicorn import util
    except ImportError:  # not served by gunicorn
        return

    def write_error(sock: Any, status_int: int, reason: str, mesg: str) -> None:
        body = orjson.dumps(from_error(for_status(status_int, mesg or reason)))
        head = (
            f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\n"
            f"Content-Type: application/fhir+json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        util.write_nonblock(sock, head.encode("latin-1") + body)

    util.write_error = write_error
