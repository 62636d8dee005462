"""Table definitions of the resource store (SQLAlchemy Core; Alembic migrations mirror them).

- `resource`: the current version of every resource: its metadata and the search index columns
  that the supported search parameters need (`tokens` GIN for token / reference / uri,
  `last_updated`). Not its content: (res_type, res_id, version) names the `resource_history`
  row that holds it, so each version's JSON is written once.
- `resource_history`: every version ever written, current one included, with its content
  (read, vread, search pages, _history).
- `resource_string`: normalised string search values, one row per value, so that prefix
  search is a btree range scan.
- `resource_date`, `resource_number`: the value ranges of every date, number and quantity
  search parameter, one row per value (formats: `core.fhir.search_index`).
- `job`, `job_entry`, `job_result`, `job_chunk`: async jobs, their entries and per-entry
  results (core.jobs).

Content is stored without `meta.versionId` / `meta.lastUpdated`: those live in columns and are
put back on read, so that equal content is equal JSONB; `resource.content_hash` (the MD5 of the
current version's canonical JSONB text) lets an update detect a no-op in SQL without reading it.

`resource_history`, the largest table (every version's content), is partitioned by resource
type (LIST (res_type)): a partition for each type that holds most of a clinical store and a
default one for the rest. Every statement reading it names the type, so the planner keeps that
type's partition. Migration 0011 names the partitions and says why the other tables stay whole.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    Numeric,
    PrimaryKeyConstraint,
    Table,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID

metadata = MetaData()

resource = Table(
    "resource",
    metadata,
    Column("res_type", Text, nullable=False),
    Column("res_id", Text, nullable=False),
    Column("version", Integer, nullable=False),
    Column("last_updated", DateTime(timezone=True), nullable=False),
    Column("deleted", Boolean, nullable=False, server_default="false"),
    # md5(content::text)::uuid of the current version: an update whose new content hashes the
    # same is a no-op (JSONB's text form is canonical: keys sorted). NULL when deleted, or not
    # computed yet (a bulk create leaves it to the first update: core.store.repository).
    Column("content_hash", UUID),
    # Token and reference search values, e.g. "identifier:http://x|123", "gender:*|male",
    # "subject:Patient/1". Format owned by core.fhir.search_index.
    Column("tokens", ARRAY(Text), nullable=False, server_default="{}"),
    PrimaryKeyConstraint("res_type", "res_id"),
    Index("ix_resource_tokens", "tokens", postgresql_using="gin"),
    Index("ix_resource_type_updated", "res_type", "last_updated"),
)

resource_history = Table(
    "resource_history",
    metadata,
    Column("res_type", Text, nullable=False),
    Column("res_id", Text, nullable=False),
    Column("version", Integer, nullable=False),
    Column("last_updated", DateTime(timezone=True), nullable=False),
    Column("deleted", Boolean, nullable=False, server_default="false"),
    Column("method", Text, nullable=False),
    Column("content", JSONB),
    PrimaryKeyConstraint("res_type", "res_id", "version"),
    Index("ix_history_type_updated", "res_type", "last_updated"),
    postgresql_partition_by="LIST (res_type)",
)

resource_string = Table(
    "resource_string",
    metadata,
    Column("res_type", Text, nullable=False),
    Column("res_id", Text, nullable=False),
    Column("param", Text, nullable=False),
    # Lower-cased, accent-stripped value; "C" collation so LIKE 'abc%' uses the btree.
    Column("value", Text(collation="C"), nullable=False),
    Index("ix_string_lookup", "res_type", "param", "value"),
    Index("ix_string_owner", "res_type", "res_id"),
)

# One row per value of a date parameter: its inclusive UTC range. The INCLUDE columns let a
# range query answer from the index alone.
resource_date = Table(
    "resource_date",
    metadata,
    Column("res_type", Text, nullable=False),
    Column("res_id", Text, nullable=False),
    Column("param", Text, nullable=False),
    Column("lo", DateTime(timezone=True), nullable=False),
    Column("hi", DateTime(timezone=True), nullable=False),
    Index("ix_date_lo", "res_type", "param", "lo", postgresql_include=["hi", "res_id"]),
    Index("ix_date_hi", "res_type", "param", "hi", postgresql_include=["lo", "res_id"]),
    Index("ix_date_owner", "res_type", "res_id"),
)

# One row per value of a number or quantity parameter (system and code "" for numbers).
resource_number = Table(
    "resource_number",
    metadata,
    Column("res_type", Text, nullable=False),
    Column("res_id", Text, nullable=False),
    Column("param", Text, nullable=False),
    Column("system", Text, nullable=False),
    Column("code", Text, nullable=False),
    Column("lo", Numeric, nullable=False),
    Column("hi", Numeric, nullable=False),
    Index("ix_number_lo", "res_type", "param", "lo", postgresql_include=["hi", "res_id"]),
    Index("ix_number_hi", "res_type", "param", "hi", postgresql_include=["lo", "res_id"]),
    Index("ix_number_owner", "res_type", "res_id"),
)

# --------------------------------------------------------------------------- jobs
# Owned by core.jobs. A job is one async submission; each entry of it is one row of
# `job_entry`, written at accept time (request), and one row of `job_result`, inserted when the
# entry ran, in the same DB transaction as the entry's effect.

job = Table(
    "job",
    metadata,
    Column("id", Text, primary_key=True),
    Column("owner", Text, nullable=False),
    Column("kind", Text, nullable=False),  # batch | transaction | upsert
    Column("state", Text, nullable=False, server_default="accepted"),
    Column("prefer_return", Text, nullable=False, server_default="representation"),
    Column("base_url", Text, nullable=False),
    Column("chunk_size", Integer, nullable=False),
    Column("total", Integer, nullable=False, server_default="0"),
    Column("done", Integer, nullable=False, server_default="0"),
    Column("succeeded", Integer, nullable=False, server_default="0"),
    Column("failed", Integer, nullable=False, server_default="0"),
    # Dispatch generation: only chunk tasks of the current generation enqueue a successor, so
    # re-dispatching (reaper, retry) never multiplies the tasks in flight.
    Column("gen", Integer, nullable=False, server_default="0"),
    # Claim cursor: every pending entry below it belongs to a `job_chunk` row.
    Column("claimed_upto", Integer, nullable=False, server_default="0"),
    Column("outcome", JSONB),  # a failed transaction's OperationOutcome
    Column("outcome_status", Integer),
    Column("idempotency_key", Text),
    Column("body_hash", Text),
    Column("callback_url", Text),
    Column("callback_state", Text),  # NULL (none) | pending | sending | sent | failed
    # Delivery attempts so far, and when the last one began (a `sending` callback claimed
    # long ago lost its worker: the reaper sends it again).
    Column("callback_attempts", Integer, nullable=False, server_default="0"),
    Column("callback_claimed_at", DateTime(timezone=True)),
    # The submitter's SMART scopes: the worker runs the entries with exactly these.
    Column("scopes", ARRAY(Text), nullable=False, server_default="{}"),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("dismissed_at", DateTime(timezone=True)),  # DELETE on the status URL after the end
    # Retention (core.jobs.retention) deleted the entries; the summary row stays a while.
    Column("entries_purged_at", DateTime(timezone=True)),
    CheckConstraint(
        "state IN ('accepted', 'running', 'completed', 'failed', 'cancelled')",
        name="ck_job_state",
    ),
    CheckConstraint("kind IN ('batch', 'transaction', 'upsert')", name="ck_job_kind"),
    Index("ix_job_owner_created", "owner", "created_at"),
    Index(
        "ux_job_idempotency",
        "owner",
        "idempotency_key",
        unique=True,
        postgresql_where=text("idempotency_key IS NOT NULL"),
    ),
    Index(
        "ix_job_finished_kept",
        "finished_at",
        postgresql_where=text(
            "state IN ('completed', 'failed', 'cancelled') AND entries_purged_at IS NULL"
        ),
    ),
    Index(
        "ix_job_active",
        "updated_at",
        postgresql_where=text("state IN ('accepted', 'running')"),
    ),
)

job_entry = Table(
    "job_entry",
    metadata,
    Column("job_id", Text, ForeignKey("job.id", ondelete="CASCADE"), nullable=False),
    Column("idx", Integer, nullable=False),
    # The entry as sent (`json`, not `jsonb`: its text as cut from the body, not re-encoded).
    # NULL for an NDJSON line that was not JSON; its 400 result is written at accept time.
    # Written once, at accept: the result goes to `job_result`.
    Column("request", JSON),
    PrimaryKeyConstraint("job_id", "idx"),
)

# An entry's result, inserted once in the transaction that ran it (never updated): an entry
# without a row here is pending. Narrow on purpose: a stored version's location and ETag are
# derived from (res_type, res_id, res_version) when they read `Type/id/_history/v` and `W/"v"`
# (location and etag are NULL then), and its representation is re-read from resource_history.
job_result = Table(
    "job_result",
    metadata,
    Column("job_id", Text, ForeignKey("job.id", ondelete="CASCADE"), nullable=False),
    Column("idx", Integer, nullable=False),
    Column("status", Integer, nullable=False),
    Column("location", Text),  # only when it is not the derived `Type/id/_history/v`
    Column("etag", Text),  # only when it is not the derived `W/"v"`
    Column("last_modified", DateTime(timezone=True)),
    Column("outcome", JSONB),  # failures, and successes under Prefer: return=OperationOutcome
    Column("res_type", Text),
    Column("res_id", Text),
    Column("res_version", Integer),
    # The resource itself when it is not a stored version (search Bundles, reads).
    Column("resource", JSONB),
    Column("finished_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("job_id", "idx"),
    Index("ix_job_result_failed", "job_id", "idx", postgresql_where=text("status >= 400")),
    # Entries finished lately, for the entries/s of /metrics (core.metrics).
    Index("ix_job_result_finished", "finished_at"),
)

# The chunk ledger (core.jobs.chunks): a row per chunk that runs or waits for a task, deleted in
# the transaction that writes its results. A `running` row whose advisory lock nobody holds is a
# chunk whose task died.
job_chunk = Table(
    "job_chunk",
    metadata,
    Column("id", Integer, Identity(cycle=True), primary_key=True),
    Column("job_id", Text, ForeignKey("job.id", ondelete="CASCADE"), nullable=False),
    Column("lo", Integer, nullable=False),  # entry indexes lo..hi (only pending ones run)
    Column("hi", Integer, nullable=False),
    Column("state", Text, nullable=False),  # queued | running
    Column("attempts", Integer, nullable=False, server_default="0"),  # runs started
    Column("time_limit", Integer, nullable=False),  # seconds its task may run
    Column("failure", Text),  # why its last run ended unfinished, when the run could tell
    Column("started_at", DateTime(timezone=True)),
    Column("deadline_at", DateTime(timezone=True)),  # started_at + time_limit
    CheckConstraint("state IN ('queued', 'running')", name="ck_job_chunk_state"),
    Index("ix_job_chunk_job", "job_id"),
)

# Unlogged staging that earlier versions split bodies from in SQL. Nothing writes it any more:
# the intake COPies entries straight into `job_entry` (core.jobs.intake).
job_upload = Table(
    "job_upload",
    metadata,
    Column("job_id", Text, primary_key=True),
    Column("body", Text, nullable=False),
    prefixes=["UNLOGGED"],
)

# --------------------------------------------------------------------------- authentication
# Owned by core.auth.api_keys. A static API key `fhq_<id>_<secret>` is stored as the SHA-256 of
# the whole token, never the token itself; it is looked up by id, then the hash is compared.

api_key = Table(
    "api_key",
    metadata,
    Column("id", Text, primary_key=True),
    Column("owner", Text, nullable=False),
    Column("name", Text),
    Column("key_hash", Text, nullable=False),  # hex SHA-256 of the token
    Column("scopes", ARRAY(Text), nullable=False, server_default="{}"),  # SMART system scopes
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("revoked_at", DateTime(timezone=True)),
    Index("ix_api_key_owner", "owner"),
)
