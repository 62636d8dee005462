"""OperationOutcome construction: the only place errors become FHIR resources."""

from __future__ import annotations

from typing import Any

from core.errors import FhirError

STATUS_TEXT = {
    200: "OK",
    201: "Created",
    202: "Accepted",
    204: "No Content",
    304: "Not Modified",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    406: "Not Acceptable",
    409: "Conflict",
    410: "Gone",
    412: "Precondition Failed",
    413: "Payload Too Large",
    414: "URI Too Long",
    415: "Unsupported Media Type",
    422: "Unprocessable Entity",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
}


def status_line(status: int) -> str:
    """`201` → `"201 Created"`, the form Bundle.entry.response.status uses."""
    text = STATUS_TEXT.get(status)
    return f"{status} {text}" if text else str(status)


def issue(
    severity: str, code: str, diagnostics: str, expression: list[str] | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = {"severity": severity, "code": code, "diagnostics": diagnostics}
    if expression:
        out["expression"] = expression
    return out


def outcome(*issues: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": list(issues)}


def from_error(err: FhirError) -> dict[str, Any]:
    """One issue; or one per problem of an error that stands for several (a resource invalid
    in several elements: its `problems` each have an `expression`, a `code` and a `text`)."""
    severity = "error" if err.status >= 400 else "information"
    problems = getattr(err, "problems", None)
    if problems:
        return outcome(*(
            issue(severity, p.code, f"{p.expression}: {p.text}", [p.expression])
            for p in problems
        ))
    return outcome(issue(severity, err.code, err.diagnostics, err.expression))


def informational(diagnostics: str, code: str = "informational") -> dict[str, Any]:
    return outcome(issue("information", code, diagnostics))


def internal_error(diagnostics: str = "Internal server error") -> dict[str, Any]:
    return outcome(issue("fatal", "exception", diagnostics))
