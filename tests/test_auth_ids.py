"""Ids first (api.ids): a path id that breaks the FHIR id rule is refused with 400 before any
view runs, so it can never turn an instance route into a search, a conditional operation or
`_search`, whatever the caller's scopes. Every route with an id argument is exercised (read from
the app's url_map), with bad ids that once were searches and conditional deletes."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Engine

from tests.test_auth import bearer, make_client
from tests.test_auth import keys as keys  # noqa: F401 - fixture

CANARY = {"resourceType": "Patient", "id": "canary",
          "identifier": [{"system": "s", "value": "v"}], "name": [{"family": "x"}]}
BAD_IDS = [
    "%3Ffamily=x",  # `Patient/?family=x`: a search
    "%3Fidentifier=s%7Cv",  # `Patient/?identifier=s|v`: a conditional update / delete / patch
    "_search",
    "_history%3Fx=1",
    "a%0A",  # the id rule's `$` must not let a newline through
    "a%00",
    "a%20b",
    "a*b",
    "%C3%A9",
    "x" * 65,
]
CONTROL = {"a%0A", "a%00"}
JOB = str(uuid.uuid4())


def _routes_with_ids() -> list[tuple[str, str]]:
    from api import create_app
    from core.config import Settings

    app = create_app(Settings(auth="required", database_url="postgresql://unused/x"))
    out = []
    for rule in app.url_map.iter_rules():
        if rule.arguments & {"rid", "vid", "job_id"}:
            out += [(rule.rule, m) for m in sorted(rule.methods or ()) if m != "OPTIONS"]
    return out


def _path(rule: str, bad: str, where: str) -> str:
    values = {"rtype": "Patient", "rid": "canary", "vid": "1", "job_id": JOB}
    values[where] = bad
    return re.sub(r"<(\w+)>", lambda m: values[m.group(1)], rule)


@pytest.fixture
def admin(clean_db: Engine, keys: Callable[..., str]) -> tuple[Any, dict[str, str]]:
    """A client, an all-powerful key, and the canary stored."""
    client = make_client()
    token = bearer(keys("ids", "system/*.*"))
    r = client.put("/fhir/Patient/canary", json=CANARY, headers=token)
    assert r.status_code in (200, 201), r.get_data(as_text=True)
    return client, token


def _assert_canary_intact(client: Any, token: dict[str, str]) -> None:
    r = client.get("/fhir/Patient/canary", headers=token)
    assert r.status_code == 200 and r.json["meta"]["versionId"] == "1", r.get_data(as_text=True)


def _body(method: str) -> dict[str, Any]:
    if method == "PUT":
        return {"json": CANARY}
    if method == "PATCH":
        return {"data": '[{"op": "add", "path": "/active", "value": true}]',
                "content_type": "application/json-patch+json"}
    return {}


@pytest.mark.parametrize(("rule", "method"), _routes_with_ids())
def test_every_id_in_every_path_is_checked_first(admin: tuple[Any, dict[str, str]], rule: str,
                                                 method: str) -> None:
    client, token = admin
    args = [a for a in ("rid", "vid", "job_id") if f"<{a}>" in rule]
    for where in args:
        for bad in BAD_IDS:
            r = client.open(_path(rule, bad, where), method=method, headers=token,
                            buffered=True, **_body(method))
            assert r.status_code == 400, (where, bad, r.status_code, r.get_data(as_text=True))
            if method == "HEAD":
                continue
            assert r.json["resourceType"] == "OperationOutcome"
            if bad not in CONTROL:  # those the HTTP layer refuses first, naming the character
                issue = r.json["issue"][0]
                assert issue["code"] == "value" and issue["expression"] == ["url"], issue
                assert "not a valid" in issue["diagnostics"]
    _assert_canary_intact(client, token)


def test_the_reported_bypasses_are_closed(clean_db: Engine, keys: Callable[..., str]) -> None:
    client = make_client()
    admin = bearer(keys("ids", "system/*.*"))
    assert client.put("/fhir/Patient/canary", json=CANARY, headers=admin).status_code == 201
    reader = bearer(keys("ids", "system/Patient.r"))
    deleter = bearer(keys("ids", "system/Patient.d"))
    updater = bearer(keys("ids", "system/Patient.cu"))
    patcher = bearer(keys("ids", "system/Patient.u"))

    # A read-only key: no search through an instance route...
    for path in ("/fhir/Patient/%3Ffamily=x", "/fhir/Patient/_search",
                 "/fhir/Patient/_search?family=x"):
        r = client.get(path, headers=reader)
        assert r.status_code == 400, (path, r.get_data(as_text=True))
        assert r.json["resourceType"] == "OperationOutcome"
    assert "POST [base]/Patient/_search" in client.get(
        "/fhir/Patient/_search", headers=reader).json["issue"][0]["diagnostics"]
    # ...and the real search routes want `s`.
    assert client.get("/fhir/Patient?family=x", headers=reader).status_code == 403
    assert client.post("/fhir/Patient/_search", data={"family": "x"},
                       headers=reader).status_code == 403
    assert client.get("/fhir/Patient/canary", headers=reader).status_code == 200

    # Keys that may write by id only: no conditional write through an instance route.
    conditional = "/fhir/Patient/%3Fidentifier=s%7Cv"
    assert client.delete(conditional, headers=deleter).status_code == 400
    assert client.put(conditional, json=CANARY, headers=updater).status_code == 400
    assert client.patch(conditional, headers=patcher, **_body("PATCH")).status_code == 400
    for key in (deleter, updater, patcher):
        for method in ("PUT", "PATCH", "DELETE"):
            r = client.open("/fhir/Patient?identifier=s|v", method=method, headers=key,
                            **_body(method))
            assert r.status_code == 403, (method, r.status_code)
    _assert_canary_intact(client, admin)
    assert client.delete("/fhir/Patient/canary", headers=deleter).status_code in (200, 204)


def test_operations_on_an_instance_route_are_not_supported(
    admin: tuple[Any, dict[str, str]]
) -> None:
    client, token = admin
    r = client.get("/fhir/Patient/$everything", headers=token)
    assert r.status_code == 501 and r.json["issue"][0]["code"] == "not-supported"


def test_ids_are_checked_with_auth_off_too(clean_db: Engine) -> None:
    client = make_client(auth="off")
    assert client.put("/fhir/Patient/canary", json=CANARY).status_code == 201
    r = client.delete("/fhir/Patient/%3Fidentifier=s%7Cv")
    assert r.status_code == 400 and r.json["issue"][0]["expression"] == ["url"]
    assert client.get("/fhir/Patient/canary").status_code == 200
    assert client.get("/jobs/%3Fstate=running").status_code == 400
    assert client.get(f"/jobs/{uuid.uuid4()}").status_code == 404
