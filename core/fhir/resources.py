"""Turning a stored row back into the resource a client sees.

Stored content lacks `meta.versionId` / `meta.lastUpdated` (they live in columns, so that
equal content compares equal in SQL); every read path puts them back with `row_to_resource`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from core.fhir.model import format_instant

__all__ = ["row_to_resource"]


def row_to_resource(content: dict, version: int, last_updated: datetime) -> dict[str, Any]:
    """`content` with `meta.versionId` (string) and `meta.lastUpdated` (UTC instant) restored.

    Returns a new dict; `content` itself is not modified.
    """
    meta = dict(content.get("meta") or {})
    meta["versionId"] = str(version)
    meta["lastUpdated"] = format_instant(last_updated)  # in UTC, whatever its offset
    if "meta" in content:
        out = dict(content)
        out["meta"] = meta
        return out
    # Keep the conventional key order: resourceType, id, meta, then the rest.
    out = {k: content[k] for k in ("resourceType", "id") if k in content}
    out["meta"] = meta
    out.update(content)
    return out
