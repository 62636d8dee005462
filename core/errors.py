"""The one error hierarchy of fhirq.

Every failure a client can cause is a `FhirError`: it carries the HTTP status, the FHIR issue
code, a human diagnostic and the FHIRPath expression of the offending element. `core.fhir.outcome`
is the single place that turns one into an OperationOutcome; the API and the workers never format
errors themselves.

    FhirError
    ├── BadRequest        400  invalid / structure / value / not-supported
    ├── Unauthorized      401  login
    ├── Forbidden         403  forbidden
    ├── NotFound          404  not-found
    ├── Gone              410  deleted
    ├── Conflict          409  conflict
    ├── PreconditionFailed 412 conflict / multiple-matches
    ├── TooLarge          413  too-costly
    ├── Unprocessable     422  processing / invariant
    └── NotSupported      501  not-supported
"""

from __future__ import annotations

__all__ = [
    "FhirError",
    "BadRequest",
    "Unauthorized",
    "Forbidden",
    "NotFound",
    "Gone",
    "Conflict",
    "PreconditionFailed",
    "TooLarge",
    "Unprocessable",
    "NotSupported",
]


class FhirError(Exception):
    status: int = 500
    code: str = "exception"

    def __init__(
        self,
        diagnostics: str,
        *,
        expression: str | list[str] | None = None,
        code: str | None = None,
        status: int | None = None,
        index: int | None = None,
    ) -> None:
        super().__init__(diagnostics)
        self.diagnostics = diagnostics
        if isinstance(expression, str):
            expression = [expression]
        self.expression: list[str] = list(expression or [])
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        # Index of the bundle entry that failed, when the error belongs to one.
        self.index = index

    def at(self, index: int, prefix: str | None = None) -> FhirError:
        """Attach this error to bundle entry `index`, prefixing its expressions with `prefix`."""
        self.index = index
        if prefix:
            self.expression = [
                prefix if not e else (e if e.startswith("Bundle.") else f"{prefix}.{e}")
                for e in (self.expression or [""])
            ]
        return self


class BadRequest(FhirError):
    status = 400
    code = "invalid"


class Unauthorized(FhirError):
    status = 401
    code = "login"


class Forbidden(FhirError):
    status = 403
    code = "forbidden"


class NotFound(FhirError):
    status = 404
    code = "not-found"


class Gone(FhirError):
    status = 410
    code = "deleted"


class Conflict(FhirError):
    status = 409
    code = "conflict"


class PreconditionFailed(FhirError):
    status = 412
    code = "conflict"


class TooLarge(FhirError):
    status = 413
    code = "too-costly"


class Unprocessable(FhirError):
    status = 422
    code = "processing"


class NotSupported(FhirError):
    status = 501
    code = "not-supported"
