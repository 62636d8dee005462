"""Running a job's entries: batch chunks and whole transactions, inside the caller's DB
transaction (the worker's task base commits it).

A batch chunk claims up to `chunk_size` unclaimed pending entries in the chunk ledger
(core.jobs.chunks, committed at once), runs them through `execute_batch`, and writes every
result row with one COPY into the insert-only `job_result`, all in the same transaction as the
entries' effects and the deletion of its ledger row: if the task dies, nothing of the chunk is
committed, its entries are pending again and its ledger row says it died
(core.jobs.control.recover_chunks splits it until a poison entry is alone); if it is redelivered
after commit, it finds them done (an entry with a result row is not pending, and the row's
primary key refuses a second one).
Exactly-once effect on at-least-once delivery.

Each job has at most `inflight_chunks` chains of tasks: a chunk that found a full chunk of work
enqueues its successor (if it belongs to the job's current dispatch generation), so a later
job's tasks queue behind only a few chunks of an earlier one. A task given a chunk id runs that
ledger row only (a piece of a failed chunk, with its own time limit) and does not chain.

Representations are not stored twice: a result that is a stored version keeps only
(type, id, version) (its location and ETag are derived from them), and the response bundle
re-reads it from `resource_history`. Resources that are no stored version (search Bundles,
reads without a location) are kept in `job_result`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from functools import partial
from typing import Any

import orjson
from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

from core.auth.permissions import Permissions
from core.errors import BadRequest, FhirError, TooLarge
from core.fhir.bundle import Screening, screen_entries, upsert_entry, upsert_outcome
from core.fhir.engine import execute_batch, execute_transaction
from core.fhir.model import Context, EntryResult
from core.fhir.outcome import from_error, internal_error
from core.jobs import chunks, faults
from core.jobs.chunks import Side, mark_failure
from core.jobs.model import ACTIVE, Dispatch, TimeLimitExceeded
from core.logging import bind
from core.store import bulk
from core.store.retry import in_savepoint

__all__ = [
    "JobCancelled",
    "count_results",
    "fail_transaction",
    "run_chunk",
    "run_transaction_job",
    "write_results",
]

log = logging.getLogger(__name__)

def out_of_memory(index: int) -> FhirError:
    """What an entry gets that needs more memory than its worker process may have."""
    return FhirError(
        "This entry needed more memory than a worker process may use "
        "(FHIRQ_WORKER_MEMORY_MB); nothing of it was written.",
        code="too-costly", expression=f"Bundle.entry[{index}]", index=index,
    )


class JobCancelled(Exception):
    """The job was cancelled while this task ran: the task's work must be rolled back."""


_JOB = """
SELECT id, kind, state, owner, base_url, prefer_return, chunk_size, gen, scopes,
       callback_url IS NOT NULL AS has_callback
FROM job WHERE id = :id
"""

# Pending: no result row. The range is repeated on job_result so that the anti-join reads the
# chunk's results only, never all of a large job's.
_ENTRIES = """
SELECT e.idx, e.request::text AS request FROM job_entry e
WHERE e.job_id = :id AND e.idx BETWEEN :lo AND :hi
  AND NOT EXISTS (SELECT 1 FROM job_result r
                  WHERE r.job_id = :id AND r.idx = e.idx AND r.idx BETWEEN :lo AND :hi)
ORDER BY e.idx
"""

_WRITE_RESULTS = (
    "COPY job_result (job_id, idx, status, location, etag, last_modified, outcome, res_type, "
    "res_id, res_version, resource) FROM STDIN"
)

# Counters and state move together, and only while the job is active: a cancelled job's
# running chunk finds no row here and rolls back.
_COUNT = """
UPDATE job SET
    done = done + :n, succeeded = succeeded + :ok, failed = failed + :bad,
    state = CASE WHEN done + :n >= total THEN 'completed' ELSE 'running' END,
    started_at = least(started_at, :t0),
    finished_at = CASE WHEN done + :n >= total THEN clock_timestamp() ELSE finished_at END,
    updated_at = now()
WHERE id = :id AND state IN ('accepted', 'running')
RETURNING state, gen
"""


def _context(job: Any) -> Context:
    """The engine context of a job's entries: they run with the scopes it was submitted with,
    and their written versions are answered from the store (`write_results`)."""
    return Context(base_url=job["base_url"], prefer_return=job["prefer_return"],
                   owner=job["owner"], permissions=Permissions.of(job["scopes"]),
                   write_representations=False)


def run_chunk(conn: Connection, job_id: str, gen: int, side: Side,
              chunk_id: int | None = None) -> list[Dispatch]:
    """Run the next chunk of a batch or upsert job, or ledger row `chunk_id`; return the
    follow-up tasks. `side` opens a transaction that commits at once (the claim)."""
    job = conn.execute(text(_JOB), {"id": job_id}).mappings().first()
    if job is None or job["state"] not in ACTIVE or job["kind"] == "transaction":
        return []
    claim = _claim(conn, side, job_id, job["chunk_size"], chunk_id, "batch")
    if claim is None:
        return []
    t0 = datetime.now(UTC)
    rows = conn.execute(text(_ENTRIES), {"id": job_id, "lo": claim.lo, "hi": claim.hi}).all()
    bind(chunk=claim.lo, entries=len(rows))  # the task's end clears the log context
    ctx = _context(job)
    try:
        results = _run_batch(conn, job["kind"], rows, ctx)
        write_results(conn, job_id, results, job["kind"], job["prefer_return"])
        chunks.finish(conn, claim.id)
        ok = sum(1 for r in results if r.ok)
        row = count_results(conn, job_id, len(results), ok, t0)
    except TimeLimitExceeded:
        mark_failure(side, claim.id, "time limit")
        raise
    except MemoryError:
        mark_failure(side, claim.id, "memory")
        raise
    except DBAPIError as exc:
        if exc.connection_invalidated:
            _not_the_entries(side, claim.id)
        raise
    if row is None:
        raise JobCancelled(job_id)
    if row.state == "completed":
        return [Dispatch("callback", job_id)] if job["has_callback"] else []
    if chunk_id is None and len(rows) == job["chunk_size"] and gen == row.gen:
        return [Dispatch("chunk", job_id, gen)]
    return []


def _not_the_entries(side: Side, chunk_id: int) -> None:
    """The connection was lost, not the entries' fault: say so, if the database is back
    already, so that the chunk runs again as it was (when it is not, a restart shows anyway)."""
    with contextlib.suppress(DBAPIError):
        mark_failure(side, chunk_id, chunks.DATABASE_LOST)


def count_results(conn: Connection, job_id: str, n: int, ok: int, t0: datetime) -> Any:
    """Add `n` finished entries (`ok` of them succeeded) to the job's counts; the job's new
    (state, gen), or None if it is no longer active (cancelled)."""
    return conn.execute(
        text(_COUNT), {"id": job_id, "n": n, "ok": ok, "bad": n - ok, "t0": t0}
    ).first()


def _claim(conn: Connection, side: Side, job_id: str, size: int, chunk_id: int | None,
           kind: str) -> chunks.Claim | None:
    """Lock and start the ledger row this task runs: a new claim of the next `size` entries,
    or the waiting row `chunk_id`."""
    if chunk_id is None:
        new_id = chunks.lock_new(conn)
        return chunks.claim_range(side, job_id, new_id, size, chunks.piece_limit(size, size, kind))
    if not chunks.try_lock(conn, chunk_id):
        return None  # another task runs it
    return chunks.start_queued(side, job_id, chunk_id)


def run_transaction_job(conn: Connection, job_id: str, side: Side,
                        chunk_id: int | None = None) -> list[Dispatch]:
    """Run a transaction job whole: its results, or its failure and nothing written. Its
    entries are one ledger row, so a run that dies is seen, and a second death fails the job."""
    job = conn.execute(text(_JOB), {"id": job_id}).mappings().first()
    if job is None or job["state"] not in ACTIVE or job["kind"] != "transaction":
        return []
    claim = _claim(conn, side, job_id, 2**31 - 1, chunk_id, "transaction")
    if claim is None:
        return []  # a duplicate delivery: the transaction is claimed already
    with side() as status:  # committed now, before the long transaction
        mark_running(status, job_id)
    t0 = datetime.now(UTC)
    ctx = _context(job)
    rows = conn.execute(
        text("SELECT idx, request::text FROM job_entry WHERE job_id = :id ORDER BY idx"),
        {"id": job_id},
    ).all()
    chunks.finish(conn, claim.id)

    def attempt() -> None:
        entries = [(idx, _decode(idx, raw)) for idx, raw in rows]
        screening = screen_entries(rows)
        _inject_faults(entries)
        results = execute_transaction(conn, entries, ctx, screening)
        write_results(conn, job_id, results, "transaction", job["prefer_return"])
        if count_results(conn, job_id, len(results), len(results), t0) is None:
            raise JobCancelled(job_id)

    try:
        in_savepoint(conn, attempt, what=f"job {job_id}: transaction")
    except FhirError as err:
        fail_transaction(conn, job_id, err, t0)
    except DBAPIError as exc:
        if exc.connection_invalidated:
            raise  # the database went away: the task retries the whole run
        log.exception("job %s: transaction failed in the database", job_id)
        fail_transaction(conn, job_id, None, t0)
    except JobCancelled:
        raise
    except TimeLimitExceeded:
        fail_transaction(conn, job_id, TooLarge(
            "The transaction ran past its time limit (FHIRQ_TRANSACTION_TIME_LIMIT); "
            "nothing was written. Split it, or send it as a batch."), t0)
    except Exception:
        log.exception("job %s: transaction failed unexpectedly", job_id)
        fail_transaction(conn, job_id, None, t0)
    return [Dispatch("callback", job_id)] if job["has_callback"] else []


def fail_transaction(conn: Connection, job_id: str, err: FhirError | None, t0: datetime
                      ) -> None:
    """Record a failed transaction: the OperationOutcome with its status, and the failing
    entry's result row (the other entries stay without a result: none took effect)."""
    body = from_error(err) if err is not None else internal_error(
        "The transaction failed on an internal error; nothing was written."
    )
    status = err.status if err is not None else 500
    index = err.index if err is not None else None
    if index is not None:
        conn.execute(
            text(
                "INSERT INTO job_result (job_id, idx, status, outcome) "
                "VALUES (:id, :idx, :status, CAST(:outcome AS jsonb))"
            ),
            {"id": job_id, "idx": index, "status": status, "outcome": orjson.dumps(body).decode()},
        )
    row = conn.execute(
        text(
            """
            UPDATE job SET state = 'failed', outcome = CAST(:outcome AS jsonb),
                outcome_status = :status, done = :n, failed = :n,
                started_at = least(started_at, :t0), finished_at = clock_timestamp(),
                updated_at = now()
            WHERE id = :id AND state IN ('accepted', 'running')
            RETURNING id
            """
        ),
        {
            "id": job_id,
            "outcome": orjson.dumps(body).decode(),
            "status": status,
            "n": 1 if index is not None else 0,
            "t0": t0,
        },
    ).first()
    if row is None:
        raise JobCancelled(job_id)


def mark_running(conn: Connection, job_id: str) -> None:
    """Show an accepted job as running. A transaction job does all its work in one database
    transaction, so without this short one before it, pollers would see `accepted` until the
    end."""
    conn.execute(
        text(
            "UPDATE job SET state = 'running', started_at = coalesce(started_at, now()), "
            "updated_at = now() WHERE id = :id AND state = 'accepted'"
        ),
        {"id": job_id},
    )


# --------------------------------------------------------------------------- batch chunk


def _decode(index: int, raw: str | None) -> Any:
    if raw is None:
        raise BadRequest("The entry is not valid JSON", expression=f"Bundle.entry[{index}]",
                         index=index)
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # PostgreSQL accepted it; orjson refuses e.g. nesting deeper than it supports.
        raise BadRequest(f"The entry cannot be read: {exc}", code="structure",
                         expression=f"Bundle.entry[{index}]", index=index) from exc


def _run_batch(conn: Connection, kind: str, rows: Sequence[Any], ctx: Context
               ) -> list[EntryResult]:
    """Results for the claimed rows in index order; no entry can fail another."""
    results: dict[int, EntryResult] = {}
    entries: list[tuple[int, dict[str, Any]]] = []
    for idx, raw in rows:
        try:
            element = _decode(idx, raw)
            entries.append((idx, upsert_entry(element, idx) if kind == "upsert" else element))
        except FhirError as err:
            results[idx] = EntryResult(idx, err.status, outcome=from_error(err))
    if entries:
        for r in _execute(conn, entries, ctx, screen_entries(rows)):
            results[r.index] = r
    out = [results[idx] for idx, _ in rows]
    if kind == "upsert":
        for r in out:
            if r.outcome is not None and not r.ok:
                r.outcome = upsert_outcome(r.outcome, r.index)
    return out


def _execute(conn: Connection, entries: list[tuple[int, dict[str, Any]]], ctx: Context,
             screening: Screening) -> list[EntryResult]:
    """`execute_batch` in a savepoint, retried on deadlock; if it breaks on something else,
    each entry runs alone so that only the culprit gets a 500. A lost database connection is
    no entry's fault: it ends the chunk (one log line, by the task), which runs again."""
    try:
        return in_savepoint(conn, lambda: _execute_batch(conn, entries, ctx, screening),
                            what="chunk")
    except DBAPIError as exc:
        if exc.connection_invalidated:
            raise
        log.exception("chunk failed in the database; isolating its entries")
    except TimeLimitExceeded:
        raise  # the whole chunk rolls back; the ledger splits it (core.jobs.control)
    except Exception:
        log.exception("chunk failed unexpectedly; isolating its entries")
    out: list[EntryResult] = []
    failed: list[int] = []
    for index, entry in entries:
        try:
            alone = partial(_execute_batch, conn, [(index, entry)], ctx, screening)
            out.extend(in_savepoint(conn, alone, what="entry"))
        except TimeLimitExceeded:
            raise
        except MemoryError:
            failed.append(index)
            out.append(EntryResult(index, 500, outcome=from_error(out_of_memory(index))))
        except Exception as exc:
            if isinstance(exc, DBAPIError) and exc.connection_invalidated:
                raise
            failed.append(index)
            out.append(EntryResult(index, 500, outcome=internal_error(
                "This entry failed on an internal error; nothing of it was written."
            )))
    if failed:
        # One line for the chunk (the traceback of its first failure was logged above).
        log.error("%d entries of the chunk failed alone on internal errors: %s",
                  len(failed), failed[:20])
    return out


def _execute_batch(conn: Connection, entries: list[tuple[int, dict[str, Any]]], ctx: Context,
                   screening: Screening) -> list[EntryResult]:
    _inject_faults(entries)
    return execute_batch(conn, entries, ctx, screening)


def _inject_faults(entries: list[tuple[int, dict[str, Any]]]) -> None:
    if faults.ENABLED:  # tests only (FHIRQ_TEST_POISON)
        for _, entry in entries:
            faults.inject(orjson.dumps(entry).decode())


# --------------------------------------------------------------------------- result rows


def _version_ref(location: str | None) -> tuple[str, str, int] | None:
    """`Patient/1/_history/3` (possibly absolute) → ("Patient", "1", 3)."""
    if not location:
        return None
    parts = location.rstrip("/").split("/")
    if len(parts) < 4 or parts[-2] != "_history" or not parts[-1].isdigit():
        return None
    return parts[-4], parts[-3], int(parts[-1])


def write_results(conn: Connection, job_id: str, results: Sequence[EntryResult], kind: str,
                  prefer_return: str) -> None:
    """One COPY of all result rows of a chunk into `job_result` (insert-only: a result is
    never written twice)."""
    if not results:
        return
    wants_resource = kind == "upsert" or prefer_return == "representation"
    # A success's informational outcome ("Created") is only part of the answer under
    # Prefer: return=OperationOutcome; not storing it otherwise saves a JSONB per entry.
    wants_outcome = prefer_return == "OperationOutcome"
    job = bulk.text(job_id)
    lines: list[str] = []
    for r in results:
        ref = _version_ref(r.location)
        resource = r.resource
        keep: dict[str, Any] | None = None
        if resource is not None and (
            resource.get("resourceType") == "Bundle"
            or (wants_resource and (
                ref is None
                or resource.get("resourceType") != ref[0]
                or resource.get("id") != ref[1]
            ))
        ):
            keep = resource
        location, etag = r.location, r.etag
        ref_fields = (bulk.NULL,) * 3
        if ref is not None:
            ref_fields = (bulk.text(ref[0]), bulk.text(ref[1]), str(ref[2]))
            # What core.jobs.views derives from the version needs no copy here.
            if location == f"{ref[0]}/{ref[1]}/_history/{ref[2]}":
                location = None
            etag = None if etag == f'W/"{ref[2]}"' else (etag or "")
        outcome = r.outcome if (not r.ok or wants_outcome) else None
        lines.append("\t".join((
            job, str(r.index), str(r.status), bulk.text(location), bulk.text(etag),
            bulk.stamp(r.last_modified), bulk.json(outcome or None), *ref_fields,
            bulk.json(keep),
        )))
    bulk.copy_in(conn, _WRITE_RESULTS, lines)
