"""`/openapi.json`: a valid OpenAPI 3.1 document that describes every route the app serves."""

from __future__ import annotations

import re
from typing import Any

from openapi_spec_validator import validate

from api.openapi import ROUTES


def _app_routes(app: Any) -> set[tuple[str, str]]:
    """(path in OpenAPI's spelling, method) of every rule, trailing-slash twins and Flask's
    static route aside."""
    out = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule).rstrip("/") or "/"
        out |= {(path, m) for m in rule.methods or () if m not in ("HEAD", "OPTIONS")}
    return out


def test_every_route_is_described_and_the_document_is_valid(client: Any) -> None:
    r = client.get("/openapi.json")
    assert r.status_code == 200 and r.mimetype == "application/json"
    doc = r.get_json()
    validate(doc)  # raises on anything OpenAPI 3.1 does not allow
    assert doc["openapi"].startswith("3.1")
    described = {(path, method.upper()) for path, ops in doc["paths"].items() for method in ops}
    served = _app_routes(client.application)
    assert served - described == set(), "routes missing from /openapi.json"
    assert described - served == set(), "/openapi.json describes routes the app does not serve"
    # Each path parameter a route takes is declared on its operation.
    for route in ROUTES:
        declared = {p["name"] for p in route.params if p["in"] == "path"}
        assert declared == set(re.findall(r"{([^}]+)}", route.path)), route.path


def test_examples_are_there_for_the_bodies_people_send(client: Any) -> None:
    doc = client.get("/openapi.json").get_json()
    bundle = doc["paths"]["/fhir"]["post"]["requestBody"]["content"]["application/fhir+json"]
    assert bundle["example"]["type"] == "transaction"
    job = doc["paths"]["/jobs/{job_id}"]["get"]["responses"]["200"]["content"]
    assert job["application/json"]["example"]["counts"]["total"] == 5000


def test_it_is_open_when_authentication_is_required(clean_db: Any) -> None:
    from dataclasses import replace

    from api import create_app
    from core.config import get_settings

    app = create_app(replace(get_settings(), auth="required"))
    assert app.test_client().get("/openapi.json").status_code == 200
    assert app.test_client().get("/jobs").status_code == 401
