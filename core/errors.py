"""The one error hierarchy of fhirq.

Every failure a client can cause is a `FhirError`: it carries the HTTP status, the FHIR issue
code, a human diagnostic and the FHIRPath expression of the offending element. `core.fhir.outcome`
is the single place that turns one into an OperationOutcome; the API and the workers never format
errors themselves.

    FhirError                   500  exception
    ├── BadRequest              400  invalid / structure / value / not-supported
    ├── Unauthorized            401  login
    ├── Forbidden               403  forbidden
    ├── NotFound                404  not-found
    ├── MethodNotAllowed        405  not-supported
    ├── NotAcceptable           406  not-supported
    ├── Conflict                409  conflict
    ├── Gone                    410  deleted
    ├── PreconditionFailed      412  conflict / multiple-matches
    ├── TooLarge                413  too-costly
    ├── UriTooLong              414  too-long
    ├── UnsupportedMediaType    415  not-supported
    ├── Unprocessable           422  processing / invariant
    ├── TooManyRequests         429  throttled (Retry-After)
    ├── HeadersTooLarge         431  too-long
    ├── NotSupported            501  not-supported
    └── Unavailable             503  transient (Retry-After)

The status belongs to the class: there is no per-instance override, so the status a client sees
always says which kind of failure it is. `for_status` picks the class for a status produced
outside fhirq (the HTTP layer).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "FhirError",
    "BadRequest",
    "Unauthorized",
    "Forbidden",
    "NotFound",
    "MethodNotAllowed",
    "NotAcceptable",
    "Conflict",
    "Gone",
    "PreconditionFailed",
    "TooLarge",
    "UriTooLong",
    "UnsupportedMediaType",
    "Unprocessable",
    "TooManyRequests",
    "HeadersTooLarge",
    "NotSupported",
    "Unavailable",
    "for_status",
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
        index: int | None = None,
    ) -> None:
        super().__init__(diagnostics)
        self.diagnostics = diagnostics
        if isinstance(expression, str):
            expression = [expression]
        self.expression: list[str] = list(expression or [])
        if code is not None:
            self.code = code
        # Index of the bundle entry that failed, when the error belongs to one.
        self.index = index

    @property
    def headers(self) -> dict[str, str]:
        """HTTP headers the answer carries besides the OperationOutcome (e.g. Retry-After)."""
        return {}

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


class MethodNotAllowed(FhirError):
    status = 405
    code = "not-supported"


class NotAcceptable(FhirError):
    status = 406
    code = "not-supported"


class Conflict(FhirError):
    status = 409
    code = "conflict"


class Gone(FhirError):
    status = 410
    code = "deleted"


class PreconditionFailed(FhirError):
    status = 412
    code = "conflict"


class TooLarge(FhirError):
    status = 413
    code = "too-costly"


class UriTooLong(FhirError):
    status = 414
    code = "too-long"


class UnsupportedMediaType(FhirError):
    status = 415
    code = "not-supported"


class Unprocessable(FhirError):
    status = 422
    code = "processing"


class _RetryLater(FhirError):
    """A refusal the client should repeat later; `retry_after` seconds become Retry-After."""

    def __init__(self, diagnostics: str, *, retry_after: int | None = None, **kwargs: Any) -> None:
        super().__init__(diagnostics, **kwargs)
        self.retry_after = retry_after

    @property
    def headers(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}


class TooManyRequests(_RetryLater):
    status = 429
    code = "throttled"


class HeadersTooLarge(FhirError):
    status = 431
    code = "too-long"


class NotSupported(FhirError):
    status = 501
    code = "not-supported"


class Unavailable(_RetryLater):
    status = 503
    code = "transient"


def _subclasses(cls: type[FhirError]) -> list[type[FhirError]]:
    return [c for sub in cls.__subclasses__() for c in (sub, *_subclasses(sub))]


_BY_STATUS: dict[int, type[FhirError]] = {}
for _cls in _subclasses(FhirError):
    # The direct subclass owns its status; narrower subclasses of it do not replace it.
    if not _cls.__name__.startswith("_"):
        _BY_STATUS.setdefault(_cls.status, _cls)


def for_status(status: int, diagnostics: str) -> FhirError:
    """The error of the class owning `status` (any other 4xx → BadRequest, else FhirError)."""
    cls = _BY_STATUS.get(status) or (BadRequest if 400 <= status < 500 else FhirError)
    return cls(diagnostics)
