"""Error handlers: every failure leaves the API as a FHIR OperationOutcome, never a stack trace."""

from __future__ import annotations

import logging

import orjson
from flask import Flask, Response
from werkzeug.exceptions import HTTPException

from core.errors import FhirError, for_status
from core.fhir.outcome import from_error, internal_error

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"


def fhir_response(
    body: object, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(orjson.dumps(body), status=status, headers=headers, mimetype=FHIR_JSON)


def error_response(err: FhirError) -> Response:
    """The OperationOutcome answer for `err`, with its status and headers."""
    return fhir_response(from_error(err), err.status, err.headers or None)


def register(app: Flask) -> None:
    @app.errorhandler(FhirError)
    def _fhir_error(err: FhirError) -> Response:
        return error_response(err)

    @app.errorhandler(HTTPException)
    def _http_error(err: HTTPException) -> Response:
        # Werkzeug's own refusals (unknown route, wrong method, …) take the same path as ours.
        response = error_response(for_status(err.code or 500, err.description or err.name))
        allow = getattr(err, "valid_methods", None)
        if allow:
            response.headers["Allow"] = ", ".join(allow)
        return response

    @app.errorhandler(Exception)
    def _unexpected(err: Exception) -> Response:
        log.exception("unhandled error")
        return fhir_response(internal_error(), 500)
