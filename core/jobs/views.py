"""Reading jobs for their owner: status JSON, job lists, pages of entry results, and the final
response (Bundle or upsert array) streamed row by row from a server-side cursor.

Every query is filtered by owner: another owner's job does not exist (the API answers 404).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import Connection, Engine, text

from core.errors import BadRequest
from core.fhir.model import EntryResult, format_instant
from core.fhir.resources import row_to_resource

__all__ = [
    "JOB_COLUMNS",
    "get_job",
    "job_json",
    "jobs_url_for",
    "list_jobs",
    "list_entries",
    "entry_json",
    "stream_response",
]

JOB_COLUMNS = """
    id, owner, kind, state, prefer_return, base_url, total, done, succeeded, failed,
    outcome, outcome_status, callback_url, callback_state, idempotency_key,
    created_at, started_at, finished_at, updated_at, dismissed_at, entries_purged_at,
    now() AS now
"""

# An entry without a `job_result` row is pending.
ENTRY_FILTERS = {
    "failed": "AND r.status >= 400",
    "succeeded": "AND r.status < 400",
    "pending": "AND r.job_id IS NULL",
    "done": "AND r.job_id IS NOT NULL",
    None: "",
}

# A result's location and ETag, which core.jobs.runner.write_results leaves out when the stored
# version it names gives them (an ETag of '' stands for none).
_RESULT_COLUMNS = """
    r.status, coalesce(r.location, r.res_type || '/' || r.res_id || '/_history/' || r.res_version)
        AS location,
    nullif(coalesce(r.etag, 'W/"' || r.res_version || '"'), '') AS etag,
    r.last_modified"""


# People copy job ids from progress bars and tables that show their first characters: any
# prefix this long that names one job of the owner stands for it.
MIN_ID_PREFIX = 6


def get_job(conn: Connection, job_id: str, owner: str) -> dict[str, Any] | None:
    """The owner's job with this id, or with an id starting with it (at least MIN_ID_PREFIX
    characters). A prefix that several jobs share is an error naming them."""
    row = conn.execute(
        text(f"SELECT {JOB_COLUMNS} FROM job WHERE id = :id AND owner = :owner"),
        {"id": job_id, "owner": owner},
    ).mappings().first()
    if row is not None or len(job_id) < MIN_ID_PREFIX:
        return dict(row) if row else None
    rows = conn.execute(
        text(
            f"SELECT {JOB_COLUMNS} FROM job WHERE owner = :owner "
            "AND left(id, length(:prefix)) = :prefix ORDER BY created_at DESC LIMIT 5"
        ),
        {"prefix": job_id, "owner": owner},
    ).mappings().all()
    if len(rows) > 1:
        shown = ", ".join(r["id"] for r in rows)
        raise BadRequest(
            f"Job id prefix '{job_id}' names several of your jobs ({shown}); give more of it",
            code="multiple-matches",
        )
    return dict(rows[0]) if rows else None


def _instant(value: datetime | None) -> str | None:
    return format_instant(value) if value is not None else None


def rate(job: dict[str, Any]) -> float | None:
    """Entries per second since the job started (until it finished)."""
    start = job.get("started_at")
    if start is None or not job["done"]:
        return None
    end = job.get("finished_at") or job.get("now") or start
    seconds = (end - start).total_seconds()
    return round(job["done"] / seconds, 1) if seconds > 0 else None


def job_json(job: dict[str, Any], *, jobs_url: str) -> dict[str, Any]:
    """The JSON status of a job; `jobs_url` is the absolute URL of `/jobs`."""
    self_url = f"{jobs_url}/{job['id']}"
    out: dict[str, Any] = {
        "id": job["id"],
        "kind": job["kind"],
        "state": job["state"],
        "counts": {
            "total": job["total"],
            "done": job["done"],
            "succeeded": job["succeeded"],
            "failed": job["failed"],
            "pending": job["total"] - job["done"],
        },
        "rate": rate(job),
        "createdAt": _instant(job["created_at"]),
        "startedAt": _instant(job["started_at"]),
        "finishedAt": _instant(job["finished_at"]),
        "updatedAt": _instant(job["updated_at"]),
        "links": {
            "self": self_url,
            "status": f"{job['base_url']}/_async/{job['id']}",
            "entries": f"{self_url}/entries",
            "failedEntries": f"{self_url}/entries?outcome=failed",
        },
    }
    if job["kind"] != "transaction":
        out["links"]["retry"] = f"{self_url}/retry"
    if job.get("outcome") is not None:
        out["outcome"] = job["outcome"]
        out["outcomeStatus"] = job["outcome_status"]
    if job.get("callback_url"):
        out["callback"] = {"url": job["callback_url"], "state": job["callback_state"]}
    if job.get("entries_purged_at") is not None:
        out["entriesPurgedAt"] = _instant(job["entries_purged_at"])
    if job.get("idempotency_key"):
        out["idempotencyKey"] = job["idempotency_key"]
    return out


def jobs_url_for(base_url: str) -> str:
    """`https://host/fhir` → `https://host/jobs` (for links built outside a request)."""
    root = base_url.rstrip("/")
    if root.endswith("/fhir"):
        root = root[: -len("/fhir")]
    return f"{root}/jobs"


def list_jobs(
    conn: Connection, owner: str, *, state: str | None = None, count: int = 50,
    offset: int = 0,
) -> list[dict[str, Any]]:
    """The owner's jobs, newest first."""
    where = "owner = :owner" + (" AND state = :state" if state else "")
    rows = conn.execute(
        text(
            f"SELECT {JOB_COLUMNS} FROM job WHERE {where} "
            "ORDER BY created_at DESC, id DESC LIMIT :count OFFSET :offset"
        ),
        {"owner": owner, "state": state, "count": count, "offset": offset},
    ).mappings().all()
    return [dict(r) for r in rows]


def list_entries(
    conn: Connection, job_id: str, *, outcome: str | None = None, count: int = 100,
    after: int = -1,
) -> list[dict[str, Any]]:
    """A page of per-entry results (keyset on the entry index), also while the job runs."""
    rows = conn.execute(
        text(
            f"SELECT e.idx, {_RESULT_COLUMNS}, r.outcome FROM job_entry e "
            "LEFT JOIN job_result r ON r.job_id = :id AND r.idx = e.idx AND r.idx > :after "
            f"WHERE e.job_id = :id AND e.idx > :after {ENTRY_FILTERS[outcome]} "
            "ORDER BY e.idx LIMIT :count"
        ),
        {"id": job_id, "after": after, "count": count},
    ).mappings().all()
    return [entry_json(r) for r in rows]


def entry_json(row: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"index": row["idx"], "status": row["status"]}
    if row["status"] is None:
        out["state"] = "pending"
        return out
    out["state"] = "failed" if row["status"] >= 400 else "succeeded"
    for key, col in (("location", "location"), ("etag", "etag"), ("outcome", "outcome")):
        if row[col] is not None:
            out[key] = row[col]
    if row["last_modified"] is not None:
        out["lastModified"] = format_instant(row["last_modified"])
    return out


# --------------------------------------------------------------------------- final response

_STREAM = """
SELECT r.idx, {columns}, r.outcome::text,
       coalesce(r.resource, {history})::text AS resource, {version}
FROM job_result r {join}
WHERE r.job_id = :id
ORDER BY r.idx
"""


def _stream_sql(with_history: bool) -> str:
    if not with_history:
        return _STREAM.format(columns=_RESULT_COLUMNS, history="NULL",
                              version="NULL AS version, NULL AS updated", join="")
    return _STREAM.format(
        columns=_RESULT_COLUMNS,
        history="h.content",
        version="h.version, h.last_updated AS updated",
        join="LEFT JOIN resource_history h ON r.resource IS NULL AND h.res_type = r.res_type "
        "AND h.res_id = r.res_id AND h.version = r.res_version AND NOT h.deleted",
    )


def stream_response(engine: Engine, job: dict[str, Any], batch_size: int = 500
                    ) -> Iterator[bytes]:
    """The job's response document, in request order, as JSON bytes.

    A `batch-response` / `transaction-response` Bundle, or for an upsert the array of stored
    resources with OperationOutcomes in place of failed elements. Rows come from a server-side
    cursor `batch_size` at a time, so memory stays flat whatever the job's size.
    """
    upsert = job["kind"] == "upsert"
    prefer = job["prefer_return"]
    base_url = job["base_url"]
    with_history = upsert or prefer == "representation"
    if upsert:
        yield b"["
    else:
        yield b'{"resourceType":"Bundle","type":"' + job["kind"].encode() + b'-response","entry":['
    first = True
    with engine.connect() as conn:
        result = conn.execution_options(stream_results=True, max_row_buffer=batch_size).execute(
            text(_stream_sql(with_history)), {"id": job["id"]}
        )
        for rows in result.partitions(batch_size):
            parts: list[bytes] = []
            for row in rows:
                res = _result(row)
                if upsert:
                    item = res.resource if res.ok and res.resource is not None else res.outcome
                else:
                    item = res.bundle_entry(prefer, base_url)  # type: ignore[arg-type]
                parts.append(orjson.dumps(item))
            if parts:
                yield (b"" if first else b",") + b",".join(parts)
                first = False
    yield b"]" if upsert else b"]}"


def _result(row: Any) -> EntryResult:
    resource = orjson.loads(row.resource) if row.resource is not None else None
    if resource is not None and row.version is not None:
        resource = row_to_resource(resource, row.version, row.updated)
    return EntryResult(
        index=row.idx,
        status=row.status,
        location=row.location,
        etag=row.etag,
        last_modified=row.last_modified,
        resource=resource,
        outcome=orjson.loads(row.outcome) if row.outcome is not None else None,
    )
