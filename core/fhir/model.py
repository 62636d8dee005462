"""Plain data passed between the engine's stages: the execution context and per-entry results.

FHIR JSON itself stays as plain dicts (camelCase keys) on the hot path; these small dataclasses
carry only what the engine adds around it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from core.auth.permissions import UNRESTRICTED, Permissions
from core.fhir.outcome import status_line

PreferReturn = Literal["minimal", "representation", "OperationOutcome"]


@dataclass(slots=True)
class Context:
    """What a request brings to the engine besides its entries."""

    base_url: str = ""  # e.g. "http://127.0.0.1:8080/fhir" — used for absolute links
    prefer_return: PreferReturn = "representation"
    owner: str = "anonymous"
    # What the caller may do. The edges that act for a caller (the API, the job runner) always
    # set it from the caller's scopes; in-process callers (the server's own work) hold all.
    permissions: Permissions = UNRESTRICTED
    # Whether the result of a create or update carries the written resource. A job answers
    # from the store (its response re-reads each version from resource_history), so its
    # runner turns this off and no representation is built per entry only to be dropped.
    write_representations: bool = True
    # `Prefer: handling=strict`: an unknown or unsupported search parameter is a 400, not a
    # warning in the searchset.
    strict_search: bool = False


@dataclass(slots=True)
class EntryResult:
    """The outcome of one bundle entry (or one REST interaction).

    `resource` is the full resource with meta (for `return=representation`, reads and searches);
    `outcome` is an OperationOutcome for errors and informational answers.
    """

    index: int
    status: int
    location: str | None = None  # "Patient/123/_history/2"
    etag: str | None = None  # 'W/"2"'
    last_modified: datetime | None = None
    resource: dict[str, Any] | None = None
    outcome: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.status < 400

    def response(self) -> dict[str, Any]:
        """Bundle.entry.response of this result."""
        out: dict[str, Any] = {"status": status_line(self.status)}
        if self.location:
            out["location"] = self.location
        if self.etag:
            out["etag"] = self.etag
        if self.last_modified is not None:
            out["lastModified"] = format_instant(self.last_modified)
        if self.outcome is not None and (not self.ok):
            out["outcome"] = self.outcome
        return out

    def bundle_entry(self, prefer: PreferReturn, base_url: str = "") -> dict[str, Any]:
        """The response-bundle entry for this result, honouring `Prefer: return=`."""
        entry: dict[str, Any] = {}
        if self.resource is not None and self.resource.get("id") and base_url:
            entry["fullUrl"] = f"{base_url}/{self.resource['resourceType']}/{self.resource['id']}"
        response = self.response()
        if self.ok:
            if prefer == "representation" and self.resource is not None:
                entry["resource"] = self.resource
            elif prefer == "OperationOutcome" and self.outcome is not None:
                response["outcome"] = self.outcome
            elif self.resource is not None and self.resource.get("resourceType") == "Bundle":
                # Search results are the answer itself, whatever the Prefer header says.
                entry["resource"] = self.resource
        entry["response"] = response
        return entry


def format_instant(value: datetime) -> str:
    """FHIR instant with millisecond precision in UTC, e.g. 2024-07-17T06:56:48.506Z.

    A naive datetime is taken to be UTC already.
    """
    if value.tzinfo is not None and value.utcoffset():
        value = value.astimezone(UTC)
    # isoformat is C and truncates to milliseconds; its first 23 characters are the local
    # part (a 4-digit year always), without the offset. Every written version formats one.
    return value.isoformat(timespec="milliseconds")[:23] + "Z"
