"""Error handlers: every failure leaves the API as a FHIR OperationOutcome, never a stack trace."""

from __future__ import annotations

import logging

import orjson
import psycopg2
from flask import Flask, Response
from sqlalchemy.exc import OperationalError
from werkzeug.exceptions import HTTPException

from core.errors import BadRequest, FhirError, Unavailable, for_status
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


# SQLSTATE classes of a database that is briefly unable to serve, whatever the request:
# connection exception, insufficient resources (too many connections), operator intervention
# (shutting down, starting up), transaction rollback (deadlock, serialization) left after retries.
_TRANSIENT_SQLSTATES = ("08", "53", "57P", "40")


def _transient(err: Exception) -> bool:
    orig = getattr(err, "orig", err)
    code = getattr(orig, "pgcode", None)
    # No SQLSTATE: the connection itself failed (refused, too many clients, server gone).
    return code is None or code.startswith(_TRANSIENT_SQLSTATES)


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

    @app.errorhandler(OperationalError)
    @app.errorhandler(psycopg2.OperationalError)
    def _database(err: Exception) -> Response:
        if not _transient(err):
            return _unexpected(err)
        log.warning("database unavailable: %s", str(err).splitlines()[0])
        return error_response(Unavailable(
            "The database is unavailable for a moment; retry the request", retry_after=1))

    @app.errorhandler(Exception)
    def _unexpected(err: Exception) -> Response:
        log.exception("unhandled error")
        return fhir_response(internal_error(), 500)
