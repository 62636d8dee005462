"""The CapabilityStatement says what the server enforces: `referencePolicy` carries `enforced`
exactly while referential integrity is on, and the server behaves as the statement says."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import Engine

from tests.builders import send

OBSERVATION = {
    "resourceType": "Observation",
    "status": "final",
    "code": {"text": "weight"},
    "subject": {"reference": "Patient/nobody-here"},
}


@pytest.fixture(params=[True, False], ids=["integrity-on", "integrity-off"])
def server(request: pytest.FixtureRequest, clean_db: Engine,
           monkeypatch: pytest.MonkeyPatch) -> tuple[Any, bool]:
    from api import create_app
    from core.config import get_settings

    on: bool = request.param
    # The engine reads the process settings, the statement the app's: set both alike.
    monkeypatch.setenv("FHIRQ_REFERENTIAL_INTEGRITY", "true" if on else "false")
    app = create_app(replace(get_settings(), auth="off"))
    app.config["TESTING"] = True
    return app.test_client(), on


def test_reference_policy_says_what_is_enforced(server: tuple[Any, bool]) -> None:
    client, on = server
    cap = send(client, "GET", "/fhir/metadata").json
    policies = {tuple(r["referencePolicy"]) for r in cap["rest"][0]["resource"]}
    expected = ("literal", "local", "enforced") if on else ("literal", "local")
    assert policies == {expected}
    assert ("must name an existing resource" in cap["rest"][0]["documentation"]) is on

    # ... and the server does what the statement says.
    r = send(client, "POST", "/fhir/Observation", OBSERVATION)
    if on:
        assert r.status_code == 400, r.json
        assert r.json["issue"][0]["code"] == "not-found"
    else:
        assert r.status_code == 201, r.json
