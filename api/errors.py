"""Error handlers: every failure leaves the API as a FHIR OperationOutcome, never a stack trace."""

from __future__ import annotations

import logging

import orjson
from flask import Flask, Response
from werkzeug.exceptions import HTTPException

from core.errors import FhirError
from core.fhir.outcome import from_error, internal_error, issue, outcome

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"


def fhir_response(
    body: object, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(orjson.dumps(body), status=status, headers=headers, mimetype=FHIR_JSON)


def register(app: Flask) -> None:
    @app.errorhandler(FhirError)
    def _fhir_error(err: FhirError) -> Response:
        return fhir_response(from_error(err), err.status)

    @app.errorhandler(HTTPException)
    def _http_error(err: HTTPException) -> Response:
        code = {404: "not-found", 405: "not-supported", 413: "too-costly"}.get(
            err.code or 500, "invalid"
        )
        body = outcome(issue("error", code, err.description or err.name))
        return fhir_response(body, err.code or 500)

    @app.errorhandler(Exception)
    def _unexpected(err: Exception) -> Response:
        log.exception("unhandled error")
        return fhir_response(internal_error(), 500)
