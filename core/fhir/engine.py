"""Public face of the FHIR engine: run a batch chunk, a transaction, or one REST interaction.

Stages: parse (bundle.py, urls.py) → plan (planning.py) → execute (execution.py over
store/repository.py) → respond (model.EntryResult). Callers own the database transaction:
these functions never commit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection

from core.errors import FhirError
from core.fhir.execution import run_batch, run_transaction
from core.fhir.model import Context, EntryResult
from core.fhir.outcome import from_error
from core.fhir.planning import Step, check_full_urls, plan_entry

__all__ = ["execute_batch", "execute_transaction", "response_bundle"]


def execute_batch(
    conn: Connection, entries: Sequence[tuple[int, dict[str, Any]]], ctx: Context
) -> list[EntryResult]:
    """Run independent batch entries (index, Bundle.entry dict); one result per entry, in order.

    A failing entry yields an error result and never affects the others. Safe to call for any
    slice ("chunk") of a batch, in parallel from several workers.
    """
    steps: list[Step] = []
    failed: dict[int, EntryResult] = {}
    for index, entry in entries:
        try:
            steps.append(plan_entry(index, entry, transaction=False))
        except FhirError as err:
            failed[index] = EntryResult(index, err.status, outcome=from_error(err))
    run_batch(conn, steps, ctx)
    by_index = {s.index: s.result for s in steps}
    out: list[EntryResult] = []
    for index, _ in entries:
        result = failed.get(index) or by_index.get(index)
        assert result is not None, f"entry {index} produced no result"
        out.append(result)
    return out


def execute_transaction(
    conn: Connection, entries: Sequence[tuple[int, dict[str, Any]]], ctx: Context
) -> list[EntryResult]:
    """Run a whole transaction inside the caller's DB transaction.

    Raises `FhirError` (with `.index` set to the failing entry) on failure; the caller then
    rolls back, so nothing is written.
    """
    check_full_urls(list(entries))
    steps = [plan_entry(index, entry, transaction=True) for index, entry in entries]
    run_transaction(conn, steps, ctx)
    out = []
    for s in steps:
        assert s.result is not None, f"entry {s.index} produced no result"
        out.append(s.result)
    return out


def response_bundle(kind: str, results: Sequence[EntryResult], ctx: Context) -> dict[str, Any]:
    """The `batch-response` / `transaction-response` Bundle for results in request order."""
    return {
        "resourceType": "Bundle",
        "type": f"{kind}-response",
        "entry": [r.bundle_entry(ctx.prefer_return, ctx.base_url) for r in results],
    }
