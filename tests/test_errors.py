"""The error hierarchy: each status is its own FhirError subclass, and every refusal — ours or
the HTTP layer's — leaves the API as an OperationOutcome with that status."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

import core.errors as errors
from core.errors import FhirError, TooManyRequests, Unavailable, for_status

STATUSES = {
    "BadRequest": 400,
    "Unauthorized": 401,
    "Forbidden": 403,
    "NotFound": 404,
    "MethodNotAllowed": 405,
    "NotAcceptable": 406,
    "Conflict": 409,
    "Gone": 410,
    "PreconditionFailed": 412,
    "TooLarge": 413,
    "UriTooLong": 414,
    "UnsupportedMediaType": 415,
    "Unprocessable": 422,
    "TooManyRequests": 429,
    "HeadersTooLarge": 431,
    "NotSupported": 501,
    "Unavailable": 503,
}


@pytest.mark.parametrize(("name", "status"), STATUSES.items())
def test_each_status_has_its_own_class(name: str, status: int) -> None:
    cls = getattr(errors, name)
    assert issubclass(cls, FhirError) and name in errors.__all__
    assert cls("x").status == status
    assert type(for_status(status, "x")) is cls


def test_status_cannot_be_overridden() -> None:
    assert "status" not in inspect.signature(FhirError.__init__).parameters
    with pytest.raises(TypeError):
        errors.BadRequest("x", status=500)  # type: ignore[call-arg]


def test_unknown_statuses_stay_in_their_class() -> None:
    assert type(for_status(418, "teapot")) is errors.BadRequest
    assert type(for_status(502, "upstream")) is FhirError


def test_retry_after_header() -> None:
    assert TooManyRequests("slow down", retry_after=30).headers == {"Retry-After": "30"}
    assert Unavailable("later").headers == {}


def test_http_layer_refusals_are_outcomes(client: Any) -> None:
    r = client.get("/no/such/route")
    assert r.status_code == 404 and r.json["resourceType"] == "OperationOutcome"
    assert r.json["issue"][0]["code"] == "not-found"
    r = client.delete("/healthz")
    assert r.status_code == 405 and r.json["issue"][0]["code"] == "not-supported"
    assert "GET" in r.headers["Allow"]


def test_unsupported_media_type(client: Any) -> None:
    r = client.post("/fhir/Patient", data="<Patient/>", content_type="application/xml")
    assert r.status_code == 415 and r.json["issue"][0]["code"] == "not-supported"


def test_an_unreachable_database_is_a_503_to_retry(
    client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.store.db import get_engine

    # Nothing listens on port 1: every connection attempt is refused.
    monkeypatch.setenv("FHIRQ_DATABASE_URL", "postgresql://fhirq@127.0.0.1:1/none")
    get_engine.cache_clear()  # the app's engine is cached: make it come from the setting above
    try:
        r = client.get("/fhir/Patient/p1")
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        assert r.json["issue"][0]["code"] == "transient"
    finally:
        get_engine.cache_clear()  # the next test gets an engine on the real database again
