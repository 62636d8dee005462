"""Bearer authentication of every request but the open ones, and the scope each route needs.

A `before_request` hook reads `Authorization: Bearer <token>` (an API key or a JWT, see
`core.auth`), checks the token's SMART scopes against what the route needs, and sets
`flask.g.owner` (and `g.principal`), which the job endpoints filter on. With `FHIRQ_AUTH=off`
every request runs as owner `anonymous` with every scope.

Open without a token: GET / HEAD of `/healthz`, `/readyz` (probes carry no tokens),
`/fhir/metadata` (SMART makes the CapabilityStatement public so clients can discover how to
authenticate), `/ui` (a static page: its own requests carry the token) and `/openapi.json`
(the description of the routes, no data); CORS preflights
(`OPTIONS`). `/metrics` counts the jobs of every owner, so it takes a scraper's credentials: a
token with the scope `system/metrics.read` (no other scope implies it), or the shared secret
FHIRQ_METRICS_TOKEN as the bearer token.

What a route needs (SMART v2 letters; v1 `read` = `rs`, `write` = `cud`):

| route | needs |
| --- | --- |
| `POST /fhir` (batch / transaction Bundle, sync or async) | `cruds` on `*` |
| `PUT /fhir` (batch upsert) | `cu` on `*` |
| `GET /fhir/T/id`, `…/_history/v`, `GET /fhir/T/id/_history` | `r` on T |
| `GET /fhir/T?…`, `POST /fhir/T/_search`, `GET /fhir/T/_history` | `s` on T |
| `POST /fhir/T` | `c` on T (`cs` with `If-None-Exist` or `POST /fhir/T?…`: conditional) |
| `PUT /fhir/T/id` (may create: the id is the client's) | `cu` on T |
| `PATCH /fhir/T/id` / `DELETE /fhir/T/id` | `u` / `d` on T |
| `PUT` / `PATCH` / `DELETE /fhir/T?…` (conditional) | `cus` / `us` / `ds` on T |
| job status, results, lists (`/fhir/_async/…`, `/jobs…`) | `r` on `*` |
| cancel (`DELETE /fhir/_async/…`) | `cud` on `*` |
| `POST /jobs/…/retry` (re-runs bundle entries, which may read) | `cruds` on `*` |
| `GET /metrics` | `system/metrics.read`, or FHIRQ_METRICS_TOKEN |

A Bundle is checked at its envelope: its entries may read, search and write any type, and
looking inside would mean parsing a body that an async submission streams straight to the job
store. So bundles need read and write on every type: `system/*.*` (or `system/*.read` plus
`system/*.write`), which also allows every REST call; an entry can therefore never do what the
same key could not do through REST. Batch upsert elements are PUTs by (checked) id, which `cu`
on `*` allows through REST too. Any other route needs `r` on `*` for GET/HEAD and `cud` on `*`
otherwise. Ids in paths are checked right after this hook (`api.ids`), before any view runs.

The route's check is the envelope only. The engine checks every entry again against the
caller's `Permissions` (`core.auth.permissions`, passed in the engine's Context; an async job
stores the submitter's scopes for its worker): the entry's own letters, and `s` on every type a
search of it runs on — conditions, search entries, conditional references inside written
resources (`Patient?identifier=…`, which `cu` on `*` alone does not allow).

A write is not a read: a REST write by a caller without `r` on the type is answered as with
`Prefer: return=minimal` (a PATCH's answer would otherwise show elements the caller never sent).
"""

from __future__ import annotations

import hmac
import logging

from flask import Flask, Request, Response, current_app, g, request

from api.http import fhir_response
from core.auth import ANONYMOUS, Principal, authenticate, check_settings
from core.auth.scopes import METRICS, Requirement, grants_metrics, scope_hint, v1_scopes
from core.config import Settings
from core.errors import FhirError, Forbidden, Unauthorized
from core.fhir.outcome import from_error
from core.store.db import get_engine

__all__ = ["OPEN_PATHS", "caller_may", "register", "requirement"]

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/fhir/metadata", "/ui", "/openapi.json"})
METRICS_ENDPOINT = "metrics.metrics"
REALM = "fhirq"

_R = Requirement.of
_JOB_READ = _R("*", "r")
_JOB_CONTROL = _R("*", "cud")
_BY_ENDPOINT: dict[str, Requirement] = {
    "fhir.post_bundle": _R("*", "cruds"),
    "fhir.put_upsert": _R("*", "cu"),
    "job_status.poll": _JOB_READ,
    "jobs.index": _JOB_READ,
    "jobs.show": _JOB_READ,
    "jobs.entries": _JOB_READ,
    "job_status.cancel": _JOB_CONTROL,
    "jobs.retry": _R("*", "cruds"),
}
# Per resource type (the route's `rtype`): letters by endpoint, or by method for the endpoint
# that serves several.
_BY_TYPE_ENDPOINT = {
    "fhir.read": "r",
    "fhir.vread": "r",
    "fhir.history_instance": "r",
    "fhir.search_type": "s",
    "fhir.search_post": "s",
    "fhir.history_type": "s",
    "fhir.update": "cu",
    "fhir.patch": "u",
    "fhir.delete": "d",
}
_CONDITIONAL = {"PUT": "cus", "PATCH": "us", "DELETE": "ds"}


def register(app: Flask) -> None:
    settings: Settings = app.config["FHIRQ"]
    check_settings(settings)
    if settings.auth == "off":
        log.warning("FHIRQ_AUTH=off: no authentication, every request runs as 'anonymous'")
    app.before_request(_authenticate)


def requirement(req: Request) -> Requirement | None:
    """What `req` needs, or None when any valid token will do (a URL no route serves: the
    caller gets the honest 404 or 405)."""
    endpoint = req.endpoint
    if req.url_rule is None or endpoint is None:
        return None
    fixed = _BY_ENDPOINT.get(endpoint)
    if fixed is not None:
        return fixed
    rtype = (req.view_args or {}).get("rtype")
    if rtype is not None:
        letters = _BY_TYPE_ENDPOINT.get(endpoint)
        if letters is not None:
            return _R(rtype, letters)
        if endpoint == "fhir.create":
            # `If-None-Exist`, or the search parameters on the URL: a conditional create.
            conditional = "If-None-Exist" in req.headers or bool(req.query_string)
            return _R(rtype, "cs" if conditional else "c")
        if endpoint == "fhir.conditional_write" and req.method in _CONDITIONAL:
            return _R(rtype, _CONDITIONAL[req.method])
    # A route added later without an entry here: the broadest need, never an open door.
    return _JOB_READ if req.method in ("GET", "HEAD") else _JOB_CONTROL


def caller_may(resource_type: str, letters: str) -> bool:
    """True when this request's caller holds `letters` on `resource_type` (every caller does
    with FHIRQ_AUTH=off; a request that was not authenticated holds nothing)."""
    principal: Principal | None = g.get("principal")
    return principal is not None and principal.allows(_R(resource_type, letters))


def _is_open(req: Request) -> bool:
    if req.method == "OPTIONS":
        return True
    return req.method in ("GET", "HEAD") and req.path.rstrip("/") in OPEN_PATHS


def _bearer(req: Request) -> str:
    header = req.headers.get("Authorization")
    if not header:
        raise Unauthorized("This request needs an 'Authorization: Bearer <token>' header")
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("The Authorization header must be 'Bearer <token>'")
    return token


def _quoted(text: str) -> str:
    # RFC 6750 attribute values are quoted strings; keep them to plain printable ASCII.
    clean = "".join(ch if 32 <= ord(ch) < 127 and ch not in '"\\' else "'" for ch in text)
    return f'"{clean}"'


def _challenge(err: FhirError, **attributes: str) -> Response:
    params = [f"realm={_quoted(REALM)}"] + [f"{k}={_quoted(v)}" for k, v in attributes.items()]
    headers = {"WWW-Authenticate": "Bearer " + ", ".join(params)}
    return fhir_response(from_error(err), err.status, headers)


def _authenticate() -> Response | None:
    settings: Settings = current_app.config["FHIRQ"]
    if settings.auth == "off":
        g.owner, g.principal = ANONYMOUS.owner, ANONYMOUS
        return None
    if _is_open(request):
        return None
    try:
        token = _bearer(request)
    except Unauthorized as err:
        return _challenge(err)  # no token: no `error` attribute (RFC 6750 §3.1)
    scrape = request.endpoint == METRICS_ENDPOINT
    if scrape and _is_metrics_token(token, settings):
        g.owner, g.principal = "metrics", Principal("metrics", (METRICS,), "metrics-token")
        return None
    try:
        principal: Principal = authenticate(token, settings, get_engine())
    except Unauthorized as err:
        log.info("bearer token refused: %s", err.diagnostics)
        return _challenge(err, error="invalid_token", error_description=err.diagnostics)
    if scrape:
        if not grants_metrics(principal.scopes):
            return _insufficient(principal, METRICS, [METRICS])
    else:
        need = requirement(request)
        if need is not None and not principal.allows(need):
            return _insufficient(principal, scope_hint(need), v1_scopes(need))
    g.owner, g.principal = principal.owner, principal
    return None


def _is_metrics_token(token: str, settings: Settings) -> bool:
    expected = settings.metrics_token
    if not expected:
        return False
    return hmac.compare_digest(token.encode(), expected.encode())


def _insufficient(principal: Principal, hint: str, scopes: list[str]) -> Response:
    err = Forbidden(
        f"The token's scopes ({' '.join(principal.scopes) or 'none'}) do not allow this "
        f"request; it needs {hint}"
    )
    return _challenge(err, error="insufficient_scope", scope=" ".join(scopes))
