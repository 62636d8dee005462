"""Accepting a submission: the job row and all its entries, persisted with bounded memory.

A JSON body (a Bundle, or an upsert array) is walked as it arrives (`core.jobs.jsonstream`):
each entry is cut out as its exact text, checked by orjson, and COPied straight into `job_entry`;
the envelope (resourceType, type, entry) is checked on the way. Neither the API nor PostgreSQL
ever holds the whole body: API memory is one read buffer and one entry, PostgreSQL's is that of
a COPY of small rows, whatever the body size.
NDJSON is streamed line by line: each line is checked with orjson and COPied as one entry; a line
that is not JSON becomes a 400 result in its place at once.

`Idempotency-Key`: the same owner, key and body (SHA-256 of kind + body) give back the first job
without a second run; another body under the same key is a 422.
"""

from __future__ import annotations

import hashlib
import math
import tempfile
import uuid
from codecs import BOM_UTF8
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Literal

import orjson
from psycopg2 import errors as pg_errors
from sqlalchemy import Connection, text
from sqlalchemy.exc import IntegrityError

from core.errors import BadRequest, FhirError, TooLarge, Unprocessable
from core.fhir.outcome import from_error
from core.jobs import quota
from core.jobs.jsonstream import JsonStream
from core.jobs.model import Dispatch, JobKind

__all__ = ["Accepted", "Submission", "accept_job", "initial_dispatches"]

READ_SIZE = 1 << 20
# The 400 results of NDJSON lines that are not JSON stay in memory up to this size, then spill
# to a temporary file (a body of garbage lines must not cost memory in proportion).
FAILURE_SPOOL = 8 << 20
WHITESPACE = b" \t\r\n"


@dataclass(slots=True)
class Submission:
    """What the API learnt from the request, besides the body stream."""

    kind: Literal["bundle", "upsert"]
    owner: str
    base_url: str
    prefer_return: str = "representation"
    ndjson: bool = False
    chunk_size: int = 500
    max_bytes: int = 250_000_000
    inflight_chunks: int = 4
    idempotency_key: str | None = None
    callback_url: str | None = None
    # The submitter's SMART scopes, stored with the job: its entries run with exactly these
    # (none: every entry is refused). The server's own jobs hold `system/*.*`.
    scopes: tuple[str, ...] = ()
    quota: quota.Quota = field(default_factory=lambda: quota.Quota(0, 0))


@dataclass(slots=True)
class Accepted:
    job_id: str
    kind: JobKind
    total: int
    replayed: bool = False  # an Idempotency-Key replay: the existing job, nothing new queued
    dispatches: list[Dispatch] = field(default_factory=list)


# Jobs at least this large refresh job_entry's planner statistics when accepted.
ANALYZE_ABOVE = 5000


def accept_job(conn: Connection, body: BinaryIO, sub: Submission) -> Accepted:
    """Persist a job and all its entries from `body`; return what to enqueue after commit.

    Raises BadRequest / TooLarge / Unprocessable for a body that cannot become a job; the caller
    rolls back, so nothing of it remains.
    """
    job_id = str(uuid.uuid4())
    if sub.idempotency_key:
        existing = _claim_idempotency_key(conn, job_id, sub)
        if existing is not None:
            return _replay(conn, existing, body, sub)
    else:
        _insert_job(conn, job_id, sub)
    # Before reading the body: a submission over the owner's quota costs no upload.
    quota.check(conn, sub.owner, sub.quota, final=False)

    source = _BodySource(body, sub.max_bytes, hashing=bool(sub.idempotency_key), kind=sub.kind)
    if sub.ndjson:
        total, prefailed = _load_ndjson(conn, job_id, source)
        kind: JobKind = "upsert"
    else:
        envelope = _load_json(conn, job_id, source, sub.kind)
        kind = _check_bundle(envelope) if sub.kind == "bundle" else "upsert"
        total, prefailed = envelope.total, 0
    if total >= ANALYZE_ABOVE:
        # A big job just added rows the planner knows nothing of: without statistics it claims
        # chunks with a bitmap scan and a sort of every pending entry (~290 ms per claim at
        # 100k entries instead of ~0.5 ms). ANALYZE sees this transaction's own rows.
        conn.execute(text("ANALYZE job_entry"))

    finished = total == prefailed
    conn.execute(
        text(
            """
            UPDATE job SET kind = :kind, total = :total, done = :pre, failed = :pre,
                body_hash = :hash,
                prefer_return = CASE WHEN :kind = 'upsert' THEN 'representation'
                                     ELSE prefer_return END,
                state = CASE WHEN :finished THEN 'completed' ELSE state END,
                started_at = CASE WHEN :finished THEN now() END,
                finished_at = CASE WHEN :finished THEN now() END,
                updated_at = now()
            WHERE id = :id
            """
        ),
        {
            "id": job_id,
            "kind": kind,
            "total": total,
            "pre": prefailed,
            "hash": source.hexdigest(),
            "finished": finished,
        },
    )
    quota.check(conn, sub.owner, sub.quota, final=True)
    if finished:
        dispatches = [Dispatch("callback", job_id)] if sub.callback_url else []
    else:
        dispatches = initial_dispatches(
            job_id, kind, total - prefailed, sub.chunk_size, sub.inflight_chunks
        )
    return Accepted(job_id, kind, total, dispatches=dispatches)


def initial_dispatches(
    job_id: str, kind: JobKind, pending: int, chunk_size: int, inflight: int, gen: int = 0
) -> list[Dispatch]:
    """The first tasks of a job: the transaction, or up to `inflight` chunk chains."""
    if pending <= 0:
        return []
    if kind == "transaction":
        return [Dispatch("transaction", job_id, gen)]
    chains = max(1, min(inflight, math.ceil(pending / max(1, chunk_size))))
    return [Dispatch("chunk", job_id, gen)] * chains


# --------------------------------------------------------------------------- job row


def _insert_job(conn: Connection, job_id: str, sub: Submission) -> None:
    conn.execute(
        text(
            """
            INSERT INTO job (id, owner, kind, prefer_return, base_url, chunk_size,
                             idempotency_key, callback_url, callback_state, scopes)
            VALUES (:id, :owner, :kind, :prefer, :base, :chunk, :key, :cb,
                    CASE WHEN :cb IS NULL THEN NULL ELSE 'pending' END, :scopes)
            """
        ),
        {
            "id": job_id,
            "owner": sub.owner,
            "kind": "batch" if sub.kind == "bundle" else "upsert",
            "prefer": sub.prefer_return,
            "base": sub.base_url,
            "chunk": max(1, sub.chunk_size),
            "key": sub.idempotency_key,
            "cb": sub.callback_url,
            "scopes": list(sub.scopes),
        },
    )


def _find_by_key(conn: Connection, sub: Submission) -> dict[str, Any] | None:
    row = conn.execute(
        text(
            "SELECT id, kind, total, body_hash FROM job "
            "WHERE owner = :owner AND idempotency_key = :key"
        ),
        {"owner": sub.owner, "key": sub.idempotency_key},
    ).mappings().first()
    return dict(row) if row else None


def _claim_idempotency_key(
    conn: Connection, job_id: str, sub: Submission
) -> dict[str, Any] | None:
    """Insert the job under its key, or return the job that already holds the key.

    The unique index makes a concurrent submission with the same key wait for ours to commit,
    then fail here and be answered with our job.
    """
    existing = _find_by_key(conn, sub)
    if existing is not None:
        return existing
    try:
        with conn.begin_nested():
            _insert_job(conn, job_id, sub)
    except IntegrityError:
        existing = _find_by_key(conn, sub)
        if existing is None:  # pragma: no cover - the holder vanished between two statements
            raise
        return existing
    return None


def _replay(conn: Connection, existing: dict[str, Any], body: BinaryIO, sub: Submission
            ) -> Accepted:
    source = _BodySource(body, sub.max_bytes, hashing=True, kind=sub.kind)
    for _ in source.chunks():
        pass
    if source.hexdigest() != existing["body_hash"]:
        raise Unprocessable(
            f"Idempotency-Key '{sub.idempotency_key}' was already used for another request "
            f"body (job {existing['id']}); use a new key for a new submission.",
            code="business-rule",
        )
    return Accepted(existing["id"], existing["kind"], existing["total"], replayed=True)


# --------------------------------------------------------------------------- body streaming


class _BodySource:
    """The request body, read in bounded chunks, counted against the limit and hashed."""

    def __init__(self, stream: BinaryIO, max_bytes: int, *, hashing: bool, kind: str) -> None:
        self.stream = stream
        self.max_bytes = max_bytes
        self.size = 0
        self._hash = hashlib.sha256(kind.encode() + b"\n") if hashing else None

    def chunks(self) -> Iterator[bytes]:
        """The body's bytes, without a leading UTF-8 byte-order mark (RFC 8259 §8.1 lets a
        parser ignore it; PostgreSQL's JSON parser would not)."""
        head: bytes | None = b""  # the first bytes, until a mark can be told apart
        while True:
            chunk = self.stream.read(READ_SIZE)
            self.size += len(chunk)
            if self.size > self.max_bytes:
                raise TooLarge(
                    f"The body exceeds the limit of {self.max_bytes} bytes for a job "
                    "(FHIRQ_ASYNC_MAX_BYTES)."
                )
            end = not chunk
            if head is not None:
                head += chunk
                if not end and len(head) < len(BOM_UTF8):
                    continue  # a short first read: the mark may still be arriving
                chunk, head = head.removeprefix(BOM_UTF8), None
            if chunk:
                if self._hash is not None:
                    self._hash.update(chunk)
                yield chunk
            if end:
                return

    def hexdigest(self) -> str | None:
        return self._hash.hexdigest() if self._hash is not None else None


class _CopyReader:
    """A file-like object for `copy_expert`: COPY text rows produced by a byte iterator.

    psycopg2 swallows exceptions raised in `read()` (they surface as QueryCanceled); the
    original is kept in `.error` so that the caller can re-raise the real cause.
    """

    def __init__(self, rows: Iterator[bytes]) -> None:
        self.rows = rows
        self.error: BaseException | None = None

    def read(self, size: int = -1) -> bytes:
        try:
            return next(self.rows, b"")
        except BaseException as exc:
            self.error = exc
            raise


def _copy_escape(data: bytes) -> bytes:
    """Escape for COPY's text format; JSON has no raw control characters but these."""
    return (
        data.replace(b"\\", b"\\\\")
        .replace(b"\n", b"\\n")
        .replace(b"\r", b"\\r")
        .replace(b"\t", b"\\t")
    )


def _copy(conn: Connection, sql: str, rows: Iterator[bytes]) -> None:
    reader = _CopyReader(rows)
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.copy_expert(sql, reader, size=READ_SIZE)
    except Exception as exc:
        if isinstance(reader.error, FhirError):
            raise reader.error from None
        if reader.error is not None:
            raise reader.error from exc
        raise _body_error(exc) from exc
    finally:
        cursor.close()


def _body_error(exc: Exception) -> FhirError:
    orig = getattr(exc, "orig", exc)
    diag = getattr(orig, "diag", None)
    message = (getattr(diag, "message_primary", None) or str(orig)).strip()
    detail = getattr(diag, "message_detail", None)
    if detail:
        message = f"{message}: {detail}"
    if isinstance(orig, pg_errors.StatementTooComplex):
        return BadRequest("The body is nested too deeply", code="structure")
    if isinstance(orig, pg_errors.ProgramLimitExceeded):
        return TooLarge(f"The body is too large to be split: {message}")
    if isinstance(orig, pg_errors.DataError):
        return BadRequest(f"The body is not valid JSON ({message})", code="structure")
    return exc if isinstance(exc, FhirError) else BadRequest(message, code="structure")


# Entries are COPied in batches of about this many bytes.
COPY_BATCH = 1 << 20


@dataclass(slots=True)
class _Envelope:
    """The top-level members of a Bundle that decide whether it can become a job."""

    resource_type: Any = None
    bundle_type: Any = None
    entry_type: str | None = None
    repeated: bool = False
    total: int = 0


def _load_json(conn: Connection, job_id: str, source: _BodySource, kind: str) -> _Envelope:
    """COPY the entries of a Bundle (`kind` "bundle") or the elements of an upsert array into
    job_entry as they arrive, each one its exact JSON text. PostgreSQL receives ordinary rows,
    so its memory does not depend on the body's size."""
    envelope = _Envelope()
    prefix = job_id.encode() + b"\t"

    def rows() -> Iterator[bytes]:
        doc = JsonStream(source.chunks())
        batch: list[bytes] = []
        size = 0
        for raw in _elements(doc, kind, envelope):
            row = prefix + str(envelope.total).encode() + b"\t" + _copy_escape(raw) + b"\n"
            envelope.total += 1
            batch.append(row)
            size += len(row)
            if size >= COPY_BATCH:
                yield b"".join(batch)
                batch, size = [], 0
        if batch:
            yield b"".join(batch)

    _copy(conn, "COPY job_entry (job_id, idx, request) FROM STDIN", rows())
    return envelope


def _elements(doc: JsonStream, kind: str, envelope: _Envelope) -> Iterator[bytes]:
    """The raw entries of the body; the envelope's members are noted on the way."""
    first = doc.peek()
    if first is None:
        raise BadRequest("The request body is empty", code="required")
    if kind == "upsert":
        if first != ord("["):
            raise BadRequest("The body must be a JSON array of resources", code="structure",
                             expression="$")
        yield from _array(doc)
        doc.end()
        return
    if first != ord("{"):
        raise BadRequest("The body must be a Bundle (JSON object)", code="structure",
                         expression="$")
    doc.expect(b"{")
    seen: set[str] = set()
    while not doc.take(b"}"):
        if seen:
            doc.expect(b",")
        key = orjson.loads(doc.value())
        if not isinstance(key, str):
            raise BadRequest("The body is not valid JSON (an object key must be a string)",
                             code="structure")
        doc.expect(b":")
        envelope.repeated |= key in seen and key in ("resourceType", "type", "entry")
        seen.add(key)
        if key == "entry" and doc.peek() == ord("["):
            envelope.entry_type = "array"
            yield from _array(doc)
            continue
        raw = doc.value()
        if key == "resourceType":
            envelope.resource_type = orjson.loads(raw)
        elif key == "type":
            envelope.bundle_type = orjson.loads(raw)
        elif key == "entry":
            envelope.entry_type = "other"
    doc.end()


def _array(doc: JsonStream) -> Iterator[bytes]:
    doc.expect(b"[")
    if doc.take(b"]"):
        return
    while True:
        yield doc.value()
        if doc.take(b"]"):
            return
        doc.expect(b",")


def _check_bundle(envelope: _Envelope) -> JobKind:
    if envelope.resource_type != "Bundle":
        raise BadRequest(
            f"Expected a Bundle, got resourceType '{envelope.resource_type}'",
            expression="Bundle.resourceType",
        )
    if envelope.bundle_type not in ("batch", "transaction"):
        raise BadRequest(
            f"Bundle.type must be 'batch' or 'transaction', not '{envelope.bundle_type}'",
            expression="Bundle.type",
            code="value",
        )
    if envelope.repeated:
        raise BadRequest(
            "The Bundle repeats a property (resourceType, type or entry)",
            expression="Bundle",
            code="structure",
        )
    if envelope.entry_type not in (None, "array"):
        raise BadRequest("Bundle.entry must be an array", expression="Bundle.entry")
    return envelope.bundle_type  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- NDJSON


def _load_ndjson(conn: Connection, job_id: str, source: _BodySource) -> tuple[int, int]:
    """COPY one entry per non-blank line; a line that is not JSON is a 400 result at once
    (its `job_result` rows wait in a spooled file and follow in a second COPY)."""
    counts = {"total": 0, "failed": 0}
    prefix = job_id.encode() + b"\t"
    failures = tempfile.SpooledTemporaryFile(max_size=FAILURE_SPOOL)  # noqa: SIM115

    def lines() -> Iterator[bytes]:
        rest = b""
        for chunk in source.chunks():
            parts = (rest + chunk).split(b"\n")
            rest = parts.pop()
            yield from parts
        yield rest

    def rows() -> Iterator[bytes]:
        batch: list[bytes] = []
        for line in lines():
            line = line.strip(WHITESPACE)
            if not line:
                continue
            index = counts["total"]
            counts["total"] += 1
            try:
                orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                counts["failed"] += 1
                err = BadRequest(
                    f"Line {index + 1} is not valid JSON: {exc}",
                    expression=f"[{index}]",
                    code="structure",
                )
                failures.write(prefix + str(index).encode() + b"\t400\t"
                               + _copy_escape(orjson.dumps(from_error(err))) + b"\n")
                row = b"\\N"
            else:
                row = _copy_escape(line)
            batch.append(prefix + str(index).encode() + b"\t" + row + b"\n")
            if len(batch) >= 256:
                yield b"".join(batch)
                batch = []
        if batch:
            yield b"".join(batch)

    with failures:
        _copy(conn, "COPY job_entry (job_id, idx, request) FROM STDIN", rows())
        if counts["failed"]:
            failures.seek(0)
            _copy(conn, "COPY job_result (job_id, idx, status, outcome) FROM STDIN",
                  iter(lambda: failures.read(READ_SIZE), b""))
    return counts["total"], counts["failed"]
