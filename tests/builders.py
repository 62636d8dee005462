"""Bundle builders so a test reads like the bundle it sends."""

from __future__ import annotations

import uuid
from typing import Any


def patient(family: str = "Chalmers", *, id: str | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"resourceType": "Patient", "name": [{"family": family}]}
    if id is not None:
        body["id"] = id
    body.update(extra)
    return body


def ident(system: str, value: str) -> list[dict[str, str]]:
    return [{"system": system, "value": value}]


def urn() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


def post(
    resource: dict[str, Any], *, full_url: str | None = None, if_none_exist: str | None = None
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "resource": resource,
        "request": {"method": "POST", "url": resource["resourceType"]},
    }
    if full_url:
        entry["fullUrl"] = full_url
    if if_none_exist:
        entry["request"]["ifNoneExist"] = if_none_exist
    return entry


def put(
    resource: dict[str, Any],
    url: str | None = None,
    *,
    if_match: str | None = None,
    full_url: str | None = None,
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "resource": resource,
        "request": {"method": "PUT", "url": url or f"{resource['resourceType']}/{resource['id']}"},
    }
    if if_match:
        entry["request"]["ifMatch"] = if_match
    if full_url:
        entry["fullUrl"] = full_url
    return entry


def delete(url: str) -> dict[str, Any]:
    return {"request": {"method": "DELETE", "url": url}}


def get(url: str) -> dict[str, Any]:
    return {"request": {"method": "GET", "url": url}}


def json_patch(url: str, ops: list[dict[str, Any]]) -> dict[str, Any]:
    import base64
    import json

    return {
        "resource": {
            "resourceType": "Binary",
            "contentType": "application/json-patch+json",
            "data": base64.b64encode(json.dumps(ops).encode()).decode(),
        },
        "request": {"method": "PATCH", "url": url},
    }


def bundle(kind: str, *entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


def transaction(*entries: dict[str, Any]) -> dict[str, Any]:
    return bundle("transaction", *entries)


def batch(*entries: dict[str, Any]) -> dict[str, Any]:
    return bundle("batch", *entries)


FHIR = "application/fhir+json"


def send(client: Any, method: str, url: str, body: object = None, **headers: str) -> Any:
    """Send FHIR JSON with the Flask test client."""
    import orjson

    data = None if body is None else orjson.dumps(body)
    return client.open(url, method=method, data=data, content_type=FHIR, headers=headers)
