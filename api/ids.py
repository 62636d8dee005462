"""Ids in request paths are checked before any view runs, so a path segment can only ever be
an id.

Every route that takes an id names it `rid` (a resource id), `vid` (a version id) or `job_id`.
A `before_request` hook, run right after authentication and before anything builds a
`Type/{id}` URL from it, holds each of them to the FHIR id rule (1–64 of A–Z a–z 0–9 - .).
Without it, `GET /fhir/Patient/%3Ffamily=x` would become the URL `Patient/?family=x` (a search
under a read-only scope), `DELETE /fhir/Patient/%3Fidentifier=s%7Cv` a conditional delete, and
`GET /fhir/Patient/_search` a search. Failures are `400` OperationOutcomes with expression
`url`, as for any other bad request URL.
"""

from __future__ import annotations

from flask import Flask, request

from core.errors import BadRequest, NotSupported
from core.fhir.validation import is_valid_id

__all__ = ["ID_ARGS", "check_path_ids", "register"]

# View argument → what it is, in words for the diagnostics.
ID_ARGS = {"rid": "resource id", "vid": "version id", "job_id": "job id"}


def register(app: Flask) -> None:
    app.before_request(check_path_ids)


def check_path_ids() -> None:
    """Refuse the request when an id in its path breaks the FHIR id rule."""
    args = request.view_args or {}
    for name, what in ID_ARGS.items():
        value = args.get(name)
        if value is not None and not is_valid_id(value):
            raise _refusal(value, what, args.get("rtype"))


def _refusal(value: str, what: str, rtype: str | None) -> BadRequest | NotSupported:
    shown = value if len(value) <= 70 else value[:64] + "…"
    if what == "resource id" and value.startswith("$"):
        return NotSupported(f"Operation {shown!r} is not supported", expression="url")
    hint = ""
    if what == "resource id" and value == "_search":
        hint = f" To search, use GET [base]/{rtype}?… or POST [base]/{rtype}/_search."
    return BadRequest(
        f"{shown!r} is not a valid {what} (FHIR id: 1-64 of A-Z a-z 0-9 - .).{hint}",
        expression="url",
        code="value",
    )
