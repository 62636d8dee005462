"""Error handlers: every failure leaves the API as a FHIR OperationOutcome, never a stack trace."""

from __future__ import annotations

import logging

import orjson
from flask import Flask, Response
from werkzeug.exceptions import HTTPException

from core.errors import BadRequest, FhirError, for_status
from core.fhir.outcome import from_error, internal_error

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"


def fhir_response(
    body: object, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(orjson.dumps(body), status=status, headers=headers, mimetype=FHIR_JSON)


def _body_framing_errors() -> tuple[type[Exception], ...]:
    """gunicorn's errors for a request body whose framing is broken (none without gunicorn)."""
    try:
        from gunicorn.http import errors
    except ImportError:
        return ()
    return (errors.InvalidChunkSize, errors.ChunkMissingTerminator,
            errors.InvalidChunkExtension, errors.NoMoreData)


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

    for framing in _body_framing_errors():

        @app.errorhandler(framing)
        def _bad_framing(err: Exception) -> Response:
            # The server reads a body lazily, as the app asks for it: a broken chunked body or
            # a client gone mid-body surfaces here, and it is the client's fault, not ours.
            return error_response(BadRequest(f"The request body cannot be read: {err}"))

    @app.errorhandler(Exception)
    def _unexpected(err: Exception) -> Response:
        log.exception("unhandled error")
        return fhir_response(internal_error(), 500)
