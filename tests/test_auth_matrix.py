"""Route × scope matrix in auth mode: every route of the app (read from its url_map, so a route
added without a row here fails), with API keys and JWTs holding each SMART scope letter, v1
words and the scrape scope. Allowed → neither 401 nor 403 (nor a 5xx); denied → 403
OperationOutcome with an `insufficient_scope` challenge; no token → 401. Also who may scrape
`/metrics`."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, text

from core.auth import api_keys
from tests.test_auth import AUDIENCE, ISSUER, Issuer, bearer, make_client

PATIENT = {"resourceType": "Patient", "identifier": [{"system": "s", "value": "v"}]}
JSON_PATCH = [{"op": "add", "path": "/active", "value": True}]
NO_JOB = str(uuid.uuid4())  # a well-formed job id nobody owns: allowed callers get 404
OPEN = None

# What each scope grants, written out by hand: (type, letter); type "*" is every resource type,
# "metrics" the scrape scope. The product's parser must agree with this table.
GRANTS: dict[str, set[tuple[str, str]]] = {
    **{f"system/Patient.{ch}": {("Patient", ch)} for ch in "cruds"},
    **{f"system/*.{ch}": {("*", ch)} for ch in "cruds"},
    "system/Patient.cruds": {("Patient", ch) for ch in "cruds"},
    "system/*.cruds": {("*", ch) for ch in "cruds"},
    "system/Patient.read": {("Patient", "r"), ("Patient", "s")},
    "system/Patient.write": {("Patient", ch) for ch in "cud"},
    "system/*.read": {("*", "r"), ("*", "s")},
    "system/*.write": {("*", ch) for ch in "cud"},
    "system/*.*": {("*", ch) for ch in "cruds"},
    "system/Observation.cruds": {("Observation", ch) for ch in "cruds"},
    "system/*.read system/*.write": {("*", ch) for ch in "cruds"},
    "system/metrics.read": {("metrics", "r")},
    "patient/*.read": set(),
}


def allowed(scope: str, need: tuple[str, str]) -> bool:
    rtype, letters = need
    have = {ch for t, ch in GRANTS[scope] if t == rtype or (t == "*" and rtype != "metrics")}
    return set(letters) <= have


@dataclass(frozen=True)
class Case:
    rule: str
    method: str
    path: str
    need: tuple[str, str] | None  # None: open to everyone
    json: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str | None = None
    data: Any = None

    @property
    def id(self) -> str:
        return f"{self.method} {self.path}" + (" +" + ",".join(self.headers) if self.headers
                                                else "")


def _both(rule: str, path: str, need: tuple[str, str] | None) -> list[Case]:
    return [Case(rule, m, path, need) for m in ("GET", "HEAD")]


BUNDLE = {"resourceType": "Bundle", "type": "batch", "entry": [
    {"resource": PATIENT, "request": {"method": "POST", "url": "Patient"}}]}
_PATCH = {"data": json.dumps(JSON_PATCH), "content_type": "application/json-patch+json"}
CASES: list[Case] = [
    Case("/fhir", "POST", "/fhir", ("*", "cruds"), json=BUNDLE),
    Case("/fhir/", "POST", "/fhir/", ("*", "cruds"), json=BUNDLE),
    Case("/fhir", "PUT", "/fhir", ("*", "cu"), json=[{"resourceType": "Patient", "id": "m-up"}]),
    Case("/fhir/", "PUT", "/fhir/", ("*", "cu"), json=[{"resourceType": "Patient", "id": "m-up"}]),
    *_both("/fhir/metadata", "/fhir/metadata", OPEN),
    *_both("/fhir/<rtype>", "/fhir/Patient?identifier=s|v", ("Patient", "s")),
    Case("/fhir/<rtype>/_search", "POST", "/fhir/Patient/_search", ("Patient", "s"),
         data={"identifier": "s|v"}, content_type="application/x-www-form-urlencoded"),
    Case("/fhir/<rtype>", "POST", "/fhir/Patient", ("Patient", "c"), json=PATIENT),
    Case("/fhir/<rtype>", "POST", "/fhir/Patient", ("Patient", "cs"), json=PATIENT,
         headers={"If-None-Exist": "identifier=s|v"}),
    Case("/fhir/<rtype>", "POST", "/fhir/Patient?identifier=s|v", ("Patient", "cs"),
         json=PATIENT),
    Case("/fhir/<rtype>", "PUT", "/fhir/Patient?identifier=s|v", ("Patient", "cus"),
         json=PATIENT),
    Case("/fhir/<rtype>", "PATCH", "/fhir/Patient?identifier=s|v", ("Patient", "us"), **_PATCH),
    Case("/fhir/<rtype>", "DELETE", "/fhir/Patient?identifier=s|v", ("Patient", "ds")),
    *_both("/fhir/<rtype>/<rid>", "/fhir/Patient/m1", ("Patient", "r")),
    Case("/fhir/<rtype>/<rid>", "PUT", "/fhir/Patient/m1", ("Patient", "cu"),
         json={**PATIENT, "id": "m1"}),
    Case("/fhir/<rtype>/<rid>", "PATCH", "/fhir/Patient/m1", ("Patient", "u"), **_PATCH),
    Case("/fhir/<rtype>/<rid>", "DELETE", "/fhir/Patient/m1", ("Patient", "d")),
    *_both("/fhir/<rtype>/<rid>/_history", "/fhir/Patient/m1/_history", ("Patient", "r")),
    *_both("/fhir/<rtype>/_history", "/fhir/Patient/_history", ("Patient", "s")),
    *_both("/fhir/<rtype>/<rid>/_history/<vid>", "/fhir/Patient/m1/_history/1",
           ("Patient", "r")),
    *_both("/fhir/_async/<job_id>", f"/fhir/_async/{NO_JOB}", ("*", "r")),
    Case("/fhir/_async/<job_id>", "DELETE", f"/fhir/_async/{NO_JOB}", ("*", "cud")),
    *_both("/jobs", "/jobs", ("*", "r")),
    *_both("/jobs/<job_id>", f"/jobs/{NO_JOB}", ("*", "r")),
    *_both("/jobs/<job_id>/entries", f"/jobs/{NO_JOB}/entries", ("*", "r")),
    Case("/jobs/<job_id>/retry", "POST", f"/jobs/{NO_JOB}/retry", ("*", "cruds")),
    *_both("/metrics", "/metrics", ("metrics", "r")),
    *_both("/healthz", "/healthz", OPEN),
    *_both("/readyz", "/readyz", OPEN),
    *_both("/ui", "/ui", OPEN),
    *_both("/openapi.json", "/openapi.json", OPEN),
    # Flask's own route: nothing listed it, so it gets the broadest need, never an open door.
    *_both("/static/<path:filename>", "/static/x.js", ("*", "r")),
]
# Every name a route may give a path argument; api.ids checks rid, vid and job_id.
PATH_ARGS = {"rtype", "rid", "vid", "job_id", "filename"}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def matrix_issuer() -> Issuer:
    return Issuer()


@pytest.fixture(scope="module")
def client(engine: Engine, matrix_issuer: Issuer, tmp_path_factory: pytest.TempPathFactory
           ) -> Any:
    jwks = tmp_path_factory.mktemp("matrix") / "jwks.json"
    jwks.write_text(json.dumps(matrix_issuer.jwks()))
    return make_client(jwks_file=str(jwks), jwt_issuer=ISSUER, jwt_audience=AUDIENCE)


@pytest.fixture(scope="module")
def tokens(engine: Engine, matrix_issuer: Issuer) -> Iterator[dict[tuple[str, str], str]]:
    """(kind, scope) → bearer token, for kind "api-key" and "jwt" and every scope of GRANTS."""
    out: dict[tuple[str, str], str] = {}
    with engine.begin() as c:
        for scope in GRANTS:
            if scope != "patient/*.read":  # a key that grants nothing cannot be created
                out["api-key", scope] = api_keys.create_key(c, "matrix", scope.split()).token
    for scope in GRANTS:
        out["jwt", scope] = matrix_issuer.token("ec-1", sub="matrix", scope=scope)
    yield out
    with engine.begin() as c:
        c.execute(text("DELETE FROM api_key WHERE owner = 'matrix'"))


def _send(client: Any, case: Case, headers: dict[str, str]) -> Any:
    kwargs: dict[str, Any] = {"method": case.method, "headers": {**case.headers, **headers},
                              "buffered": True}
    if case.json is not None:
        kwargs["json"] = case.json
    if case.data is not None:
        kwargs["data"] = case.data
        kwargs["content_type"] = case.content_type
    return client.open(case.path, **kwargs)


# --------------------------------------------------------------------------- the matrix


def test_the_matrix_lists_every_route_of_the_app() -> None:
    from api import create_app
    from core.config import Settings

    app = create_app(Settings(auth="required", database_url="postgresql://unused/x"))
    served = {(r.rule, m) for r in app.url_map.iter_rules() for m in r.methods or ()
              if m != "OPTIONS"}
    listed = {(c.rule, c.method) for c in CASES}
    assert served - listed == set(), "routes missing from the auth matrix"
    assert listed - served == set(), "matrix rows for routes the app does not serve"
    for r in app.url_map.iter_rules():
        assert r.arguments <= PATH_ARGS, f"{r.rule}: a new path argument needs an id check"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_route_by_scope(client: Any, tokens: dict[tuple[str, str], str], clean_db: Engine,
                        case: Case) -> None:
    anonymous = _send(client, case, {})
    if case.need is None:
        assert anonymous.status_code == 200, anonymous.get_data(as_text=True)
    else:
        assert anonymous.status_code == 401, anonymous.get_data(as_text=True)
        assert anonymous.headers["WWW-Authenticate"].startswith('Bearer realm="fhirq"')
    wrong = []
    for (kind, scope), token in tokens.items():
        r = _send(client, case, bearer(token))
        expected = case.need is None or allowed(scope, case.need)
        if expected:
            ok = r.status_code not in (401, 403) and r.status_code < 500
        else:
            ok = (r.status_code == 403
                  and (case.method == "HEAD" or r.json["issue"][0]["code"] == "forbidden")
                  and 'error="insufficient_scope"' in r.headers["WWW-Authenticate"])
        if not ok:
            wrong.append(f"{kind} {scope}: {r.status_code} {r.get_data(as_text=True)[:200]}")
    assert wrong == [], "\n".join(wrong)


def test_with_auth_off_every_route_is_open(clean_db: Engine) -> None:
    client = make_client(auth="off")
    for case in CASES:
        r = _send(client, case, {})
        assert r.status_code not in (401, 403) and r.status_code < 500, (case.id, r.status_code)


def test_the_scope_table_matches_the_parser() -> None:
    from core.auth.scopes import grants_metrics, parse_scopes

    for scope, grants in GRANTS.items():
        parsed = {(g.resource_type, ch) for g in parse_scopes(scope.split()) for ch in g.letters}
        if grants_metrics(scope.split()):
            parsed.add(("metrics", "r"))
        assert parsed == grants, scope


# --------------------------------------------------------------------------- /metrics


def test_metrics_takes_the_scrape_scope_or_the_metrics_token(
    clean_db: Engine, tokens: dict[tuple[str, str], str], matrix_issuer: Issuer,
    tmp_path: Path
) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(matrix_issuer.jwks()))
    client = make_client(metrics_token="s3cret-scrape", jwks_file=str(jwks),
                         jwt_issuer=ISSUER, jwt_audience=AUDIENCE)
    scrape = client.get("/metrics", headers=bearer("s3cret-scrape"), buffered=True)
    assert scrape.status_code == 200
    assert b"fhirq_jobs" in scrape.data and b"fhirq_http_request_duration_seconds" in scrape.data
    for kind in ("api-key", "jwt"):
        assert client.get("/metrics", headers=bearer(tokens[kind, "system/metrics.read"]),
                          buffered=True).status_code == 200
        # Full access to resources is not access to every owner's job counts.
        r = client.get("/metrics", headers=bearer(tokens[kind, "system/*.*"]), buffered=True)
        assert r.status_code == 403
        assert 'scope="system/metrics.read"' in r.headers["WWW-Authenticate"]
    # The scrape secret opens /metrics only, and a wrong one nothing.
    for path in ("/jobs", "/fhir/Patient"):
        assert client.get(path, headers=bearer("s3cret-scrape")).status_code == 401
    assert client.get("/metrics", headers=bearer("s3cret-scrapf")).status_code == 401
    assert client.get("/metrics").status_code == 401
    # Without FHIRQ_METRICS_TOKEN the same secret is just an unknown token.
    plain = make_client()
    assert plain.get("/metrics", headers=bearer("s3cret-scrape")).status_code == 401


def test_metrics_is_open_without_auth(clean_db: Engine) -> None:
    r = make_client(auth="off", metrics_token="unused").get("/metrics", buffered=True)
    assert r.status_code == 200 and b"fhirq_jobs" in r.data


def test_token_create_accepts_the_scrape_scope(engine: Engine) -> None:
    from cli.token_commands import token as token_cli

    r = CliRunner().invoke(token_cli, ["create", "--owner", "prometheus", "--scope",
                                       "system/metrics.read"])
    assert r.exit_code == 0, r.output
    with engine.begin() as c:
        assert c.execute(text("DELETE FROM api_key WHERE owner = 'prometheus' "
                              "RETURNING scopes")).scalar_one() == ["system/metrics.read"]


# --------------------------------------------------------------------------- a write is not a read


def test_a_write_shows_the_resource_only_to_callers_that_may_read_it(
    client: Any, tokens: dict[tuple[str, str], str], clean_db: Engine
) -> None:
    admin = bearer(tokens["api-key", "system/*.*"])
    stored = {**PATIENT, "id": "w1", "name": [{"family": "Hidden"}]}
    assert client.put("/fhir/Patient/w1", json=stored, headers=admin).status_code == 201
    patch = {"data": json.dumps(JSON_PATCH), "content_type": "application/json-patch+json"}
    for kind in ("api-key", "jwt"):
        # A PATCH answer would show elements the caller never sent (the name).
        blind = client.patch("/fhir/Patient/w1", headers=bearer(tokens[kind, "system/Patient.u"]),
                             **patch)
        assert blind.status_code == 200 and blind.data == b"", blind.get_data(as_text=True)
        assert blind.headers["ETag"].startswith('W/"')
        reader = bearer(tokens[kind, "system/Patient.cruds"])
        seen = client.patch("/fhir/Patient/w1", headers=reader, **patch)
        assert seen.status_code == 200 and seen.json["name"] == [{"family": "Hidden"}]
        created = client.post("/fhir/Patient", json=PATIENT,
                              headers=bearer(tokens[kind, "system/Patient.c"]))
        assert created.status_code == 201 and created.data == b""
        assert "/fhir/Patient/" in created.headers["Location"]
