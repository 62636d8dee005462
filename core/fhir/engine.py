"""Public face of the FHIR engine: run a batch chunk, a transaction, or an upsert array.

Stages (see the sibling modules): parse (bundle.py, urls.py) → plan (planning.py) → execute
(execution.py, store/repository.py) → respond (model.EntryResult). Callers own the database
transaction: these functions never commit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection

from core.fhir.model import Context, EntryResult

__all__ = ["execute_batch", "execute_transaction"]


def execute_batch(
    conn: Connection, entries: Sequence[tuple[int, dict[str, Any]]], ctx: Context
) -> list[EntryResult]:
    """Run independent batch entries (index, Bundle.entry dict); one result per entry, in order.

    A failing entry yields an error result and never affects the others. Safe to call for any
    slice ("chunk") of a batch, in parallel from several workers.
    """
    raise NotImplementedError


def execute_transaction(
    conn: Connection, entries: Sequence[tuple[int, dict[str, Any]]], ctx: Context
) -> list[EntryResult]:
    """Run a whole transaction inside the caller's DB transaction.

    Raises `FhirError` (with `.index` set to the failing entry) on failure; the caller then
    rolls back, so nothing is written.
    """
    raise NotImplementedError
