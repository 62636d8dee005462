"""Public face of the FHIR engine: run a batch chunk, a transaction, or one REST interaction.

Stages: parse (bundle.py, urls.py) → plan (planning.py) → execute (execution.py over
store/repository.py) → respond (model.EntryResult). Callers own the database transaction:
these functions never commit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection

from core.fhir.bundle import NOT_SCREENED, Screening
from core.fhir.execution import run_batch, run_transaction
from core.fhir.model import Context, EntryResult
from core.fhir.planning import plan_batch, plan_transaction

__all__ = ["execute_batch", "execute_transaction", "response_bundle"]


def execute_batch(
    conn: Connection, entries: Sequence[tuple[int, dict[str, Any]]], ctx: Context,
    screening: Screening = NOT_SCREENED,
) -> list[EntryResult]:
    """Run independent batch entries (index, Bundle.entry dict); one result per entry, in order.

    A failing entry yields an error result and never affects the others. Safe to call for any
    slice ("chunk") of a batch, in parallel from several workers. `screening`: what the
    caller found in the entries' JSON text (core.fhir.bundle.screen_entries), if it has it.
    """
    return run_batch(conn, plan_batch(entries, screening=screening), ctx)


def execute_transaction(
    conn: Connection, entries: Sequence[tuple[int, dict[str, Any]]], ctx: Context,
    screening: Screening = NOT_SCREENED,
) -> list[EntryResult]:
    """Run a whole transaction inside the caller's DB transaction.

    Raises `FhirError` (with `.index` set to the failing entry) on failure; the caller then
    rolls back, so nothing is written.
    """
    return run_transaction(conn, plan_transaction(entries, screening=screening), ctx)


def response_bundle(kind: str, results: Sequence[EntryResult], ctx: Context) -> dict[str, Any]:
    """The `batch-response` / `transaction-response` Bundle for results in request order."""
    return {
        "resourceType": "Bundle",
        "type": f"{kind}-response",
        "entry": [r.bundle_entry(ctx.prefer_return, ctx.base_url) for r in results],
    }
