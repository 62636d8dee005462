"""Set-based SQL over the resource store. Every function takes a whole chunk of rows and costs
one round trip, whatever the chunk size; nothing here commits.

Content is stored without `meta.versionId` / `meta.lastUpdated` (they live in columns), once per
version, in `resource_history`; `resource` names it by its version. The upsert skips a no-op
update by comparing the hash of the new JSONB with the current one's, in SQL.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import Connection, and_, select

from core.fhir.search_index import IndexValues
from core.store import bulk
from core.store.schema import resource_history as H

__all__ = [
    "Key",
    "Current",
    "WriteRow",
    "Written",
    "lock_conditions",
    "read_current",
    "lock_current",
    "write_resources",
    "reindex_resources",
    "delete_resources",
    "read_version",
    "read_history",
    "existing_keys",
    "content_of",
    "prepare_session",
]

Key = tuple[str, str]  # (resource type, id)


@dataclass(slots=True)
class Current:
    version: int
    last_updated: datetime
    deleted: bool
    content: dict[str, Any] | None = None


@dataclass(slots=True)
class WriteRow:
    key: Key
    content: dict[str, Any]  # stored form: id set, meta.versionId/lastUpdated removed
    method: str  # POST / PUT / PATCH: recorded in history
    index: IndexValues


@dataclass(slots=True)
class Written:
    version: int
    last_updated: datetime
    created: bool  # a new resource (or re-created after delete)
    changed: bool  # False when the content equalled the current version: no new version


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _keys_params(keys: Sequence[Key]) -> dict[str, list[str]]:
    return {"t": [k[0] for k in keys], "i": [k[1] for k in keys]}


def lock_conditions(conn: Connection, conditions: Sequence[str]) -> None:
    """Serialise conditional creates/updates on the same condition across workers.

    A transaction-scoped advisory lock per condition, taken in sorted order (no deadlock between
    two chunks), makes "search, then create if none" race-free: the second caller waits, then
    sees the first one's committed resource.
    """
    if not conditions:
        return
    keys = sorted(
        {
            int.from_bytes(hashlib.blake2b(c.encode(), digest_size=8).digest(), "big", signed=True)
            for c in conditions
        }
    )
    conn.exec_driver_sql(
        "SELECT pg_advisory_xact_lock(k) FROM unnest(%(k)s::bigint[]) AS k ORDER BY k",
        {"k": keys},
    )


_SELECT = """
SELECT r.res_type, r.res_id, r.version, r.last_updated, r.deleted{content} FROM resource r
JOIN unnest(%(t)s::text[], %(i)s::text[]) AS x(res_type, res_id) USING (res_type, res_id){join}
ORDER BY r.res_type, r.res_id{lock}
"""

# The content of each current version, from the history row its version names.
_CONTENT_JOIN = """
LEFT JOIN resource_history h ON NOT r.deleted AND h.res_type = r.res_type
    AND h.res_id = r.res_id AND h.version = r.version"""


def _select_current(
    conn: Connection, keys: Sequence[Key], *, lock: bool, content: bool
) -> dict[Key, Current]:
    if not keys:
        return {}
    # A locking read takes the row locks first and reads the content in a second statement:
    # after waiting for a concurrent writer, FOR UPDATE re-checks only the locked row, so a
    # joined history row would still be the old version's.
    join = content and not lock
    sql = _SELECT.format(content=", h.content::text" if join else "",
                         join=_CONTENT_JOIN if join else "",
                         lock=" FOR UPDATE OF r" if lock else "")
    out: dict[Key, Current] = {}
    for row in conn.exec_driver_sql(sql, _keys_params(keys)):
        out[(row[0], row[1])] = Current(
            version=row[2],
            last_updated=row[3],
            deleted=row[4],
            content=orjson.loads(row[5]) if join and row[5] is not None else None,
        )
    if content and lock:
        live = [k for k, cur in out.items() if not cur.deleted]
        for key, body in _read_contents(conn, [(k, out[k].version) for k in live]).items():
            out[key].content = body
    return out


def _read_contents(conn: Connection, versions: Sequence[tuple[Key, int]]
                   ) -> dict[Key, dict[str, Any]]:
    if not versions:
        return {}
    rows = conn.exec_driver_sql(
        "SELECT h.res_type, h.res_id, h.content::text FROM resource_history h "
        "JOIN unnest(%(t)s::text[], %(i)s::text[], %(v)s::int[]) AS x(res_type, res_id, version) "
        "USING (res_type, res_id, version)",
        {"t": [k[0] for k, _ in versions], "i": [k[1] for k, _ in versions],
         "v": [v for _, v in versions]},
    )
    return {(r[0], r[1]): orjson.loads(r[2]) for r in rows if r[2] is not None}


def read_current(
    conn: Connection, keys: Sequence[Key], *, content: bool = True
) -> dict[Key, Current]:
    """Current state of each key that exists (deleted ones included, flagged)."""
    return _select_current(conn, keys, lock=False, content=content)


def lock_current(
    conn: Connection, keys: Sequence[Key], *, content: bool = False
) -> dict[Key, Current]:
    """Like read_current, but row-locks them until the caller's transaction ends."""
    return _select_current(conn, keys, lock=True, content=content)


# --------------------------------------------------------------------------- bulk writes
# A chunk's rows reach PostgreSQL as one COPY into a session-private staging table, then one
# statement moves them into the store: no statement text that grows with the chunk, no
# parameter adaptation. The statement consumes what it moves (DELETE ... RETURNING), so
# several writes in one transaction never see each other's rows; ON COMMIT DELETE ROWS empties
# it at the end whatever happened. A resource's index rows travel as parallel arrays.

STAGE_DDL = """
CREATE TEMP TABLE IF NOT EXISTS resource_stage (
    res_type text NOT NULL, res_id text NOT NULL, content jsonb NOT NULL,
    tokens text[] NOT NULL, method text NOT NULL,
    string_params text[] NOT NULL, string_values text[] NOT NULL,
    date_params text[] NOT NULL, date_lo timestamptz[] NOT NULL, date_hi timestamptz[] NOT NULL,
    number_params text[] NOT NULL, number_systems text[] NOT NULL,
    number_codes text[] NOT NULL, number_lo numeric[] NOT NULL, number_hi numeric[] NOT NULL
) ON COMMIT DELETE ROWS
"""

_STAGE_COPY = (
    "COPY resource_stage (res_type, res_id, content, tokens, method, string_params, "
    "string_values, date_params, date_lo, date_hi, number_params, number_systems, "
    "number_codes, number_lo, number_hi) FROM STDIN"
)

# Set on a DBAPI connection (in its `info`) whose session has the staging table for good.
STAGED = "fhirq_resource_stage"

_STAGED_ROWS = """
input AS (
    DELETE FROM resource_stage RETURNING res_type, res_id, content, {hash} AS content_hash,
        tokens, method, string_params, string_values, date_params, date_lo, date_hi,
        number_params, number_systems, number_codes, number_lo, number_hi
)"""

# The index rows of the staged resources: each index table in its own CTE, from the row's
# parallel arrays (`{rows}`: the staged rows to index, with the alias `i`).
_INDEX_NEW = """
strings_new AS (
    INSERT INTO resource_string (res_type, res_id, param, value)
    SELECT i.res_type, i.res_id, s.param, s.value
    FROM {rows}, unnest(i.string_params, i.string_values) AS s(param, value)
),
dates_new AS (
    INSERT INTO resource_date (res_type, res_id, param, lo, hi)
    SELECT i.res_type, i.res_id, d.param, d.lo, d.hi
    FROM {rows}, unnest(i.date_params, i.date_lo, i.date_hi) AS d(param, lo, hi)
),
numbers_new AS (
    INSERT INTO resource_number (res_type, res_id, param, system, code, lo, hi)
    SELECT i.res_type, i.res_id, n.param, n.system, n.code, n.lo, n.hi
    FROM {rows}, unnest(i.number_params, i.number_systems, i.number_codes, i.number_lo,
                        i.number_hi) AS n(param, system, code, lo, hi)
)"""

# The old index rows of the resources a statement rewrote (CTE `up`).
_INDEX_GONE = """
strings_gone AS (
    DELETE FROM resource_string s USING up
    WHERE s.res_type = up.res_type AND s.res_id = up.res_id
),
dates_gone AS (
    DELETE FROM resource_date d USING up
    WHERE d.res_type = up.res_type AND d.res_id = up.res_id
),
numbers_gone AS (
    DELETE FROM resource_number n USING up
    WHERE n.res_type = up.res_type AND n.res_id = up.res_id
)"""

_REWRITTEN = "input i JOIN up USING (res_type, res_id)"

# Every row a create with a server-assigned id (a fresh UUID): nothing can conflict, so
# plain INSERTs, and one timestamp for the chunk. No content hash: hashing a resource's JSONB
# text costs PostgreSQL about as much as writing its history row, and most resources are never
# updated; the first update computes it (see _UPSERT).
_CREATE = f"""
WITH {_STAGED_ROWS.format(hash="NULL::uuid")},
ts AS (SELECT clock_timestamp() AS at),
up AS (
    INSERT INTO resource
        (res_type, res_id, version, last_updated, deleted, content_hash, tokens)
    SELECT res_type, res_id, 1, ts.at, false, content_hash, tokens
    FROM input, ts
),
hist AS (
    INSERT INTO resource_history (res_type, res_id, version, last_updated, deleted, method, content)
    SELECT res_type, res_id, 1, ts.at, false, method, content FROM input, ts
),
{_INDEX_NEW.format(rows="input i")}
SELECT at FROM ts
"""

# The hash of the current version: a version without one yet (created by _CREATE) is hashed
# from its history row when an update or a re-index meets it.
_CURRENT_HASH = """coalesce(r.content_hash, (
        SELECT md5(h.content::text)::uuid FROM resource_history h
        WHERE h.res_type = r.res_type AND h.res_id = r.res_id AND h.version = r.version))"""

_UPSERT = f"""
WITH {_STAGED_ROWS.format(hash="md5(content::text)::uuid")},
prior AS (
    SELECT r.res_type, r.res_id, r.deleted FROM resource r JOIN input USING (res_type, res_id)
),
up AS (
    INSERT INTO resource AS r
        (res_type, res_id, version, last_updated, deleted, content_hash, tokens)
    SELECT res_type, res_id, 1, clock_timestamp(), false, content_hash, tokens
    FROM input
    ON CONFLICT (res_type, res_id) DO UPDATE SET
        version = r.version + 1, last_updated = EXCLUDED.last_updated, deleted = false,
        content_hash = EXCLUDED.content_hash, tokens = EXCLUDED.tokens
    WHERE r.deleted OR EXCLUDED.content_hash IS DISTINCT FROM {_CURRENT_HASH}
    RETURNING r.res_type, r.res_id, r.version, r.last_updated
),
hist AS (
    INSERT INTO resource_history (res_type, res_id, version, last_updated, deleted, method, content)
    SELECT up.res_type, up.res_id, up.version, up.last_updated, false, input.method, input.content
    FROM up JOIN input USING (res_type, res_id)
),
{_INDEX_GONE},
{_INDEX_NEW.format(rows=_REWRITTEN)}
SELECT up.res_type, up.res_id, up.version, up.last_updated,
       (prior.res_id IS NULL OR prior.deleted) AS created
FROM up LEFT JOIN prior USING (res_type, res_id)
"""


def _stage(conn: Connection, rows: Sequence[WriteRow]) -> None:
    lines = []
    for row in rows:
        t, i = row.key
        index = row.index
        dates, numbers = index.dates, index.numbers
        lines.append("\t".join((
            bulk.text(t), bulk.text(i), bulk.json(row.content), bulk.array(index.tokens),
            row.method,
            bulk.array([p for p, _ in index.strings]), bulk.array([v for _, v in index.strings]),
            bulk.array([d[0] for d in dates]), bulk.array([d[1].isoformat() for d in dates]),
            bulk.array([d[2].isoformat() for d in dates]),
            bulk.array([n[0] for n in numbers]), bulk.array([n[1] for n in numbers]),
            bulk.array([n[2] for n in numbers]), bulk.array([str(n[3]) for n in numbers]),
            bulk.array([str(n[4]) for n in numbers]),
        )))
    # An engine not made by core.store.db has no staging table yet: create it every time.
    before = None if conn.connection.info.get(STAGED) else STAGE_DDL
    bulk.copy_in(conn, _STAGE_COPY, lines, before=before)


def write_resources(conn: Connection, rows: Sequence[WriteRow]) -> list[Written]:
    """Create or update every row: one COPY and one statement (resource, history and the
    index tables).

    Keys must be distinct within one call (callers split repeated keys into waves). Concurrent
    writers of the same key are serialised by the row lock of ON CONFLICT, so versions stay
    consecutive. When every row is a POST (a create under a server-assigned UUID), plain
    INSERTs do.
    """
    if not rows:
        return []
    _stage(conn, rows)
    if all(row.method == "POST" for row in rows):
        at = conn.exec_driver_sql(_CREATE).scalar_one()
        return [Written(1, at, created=True, changed=True) for _ in rows]
    written: dict[Key, Written] = {}
    for r in conn.exec_driver_sql(_UPSERT):
        written[(r[0], r[1])] = Written(r[2], r[3], created=r[4], changed=True)
    missing = [row.key for row in rows if row.key not in written]
    if missing:  # unchanged content: report the current version
        for key, cur in read_current(conn, missing, content=False).items():
            written[key] = Written(cur.version, cur.last_updated, created=False, changed=False)
    return [written[row.key] for row in rows]


# Re-indexing: the staged rows carry the content as read; a resource whose content changed
# since (another hash) was re-indexed by its writer and is left alone.
_REINDEX = f"""
WITH {_STAGED_ROWS.format(hash="md5(content::text)::uuid")},
up AS (
    UPDATE resource r SET tokens = input.tokens
    FROM input
    WHERE r.res_type = input.res_type AND r.res_id = input.res_id AND NOT r.deleted
      AND {_CURRENT_HASH} = input.content_hash
    RETURNING r.res_type, r.res_id
),
{_INDEX_GONE},
{_INDEX_NEW.format(rows=_REWRITTEN)}
SELECT count(*) FROM up
"""


def reindex_resources(conn: Connection, rows: Sequence[WriteRow]) -> int:
    """Replace the index values of stored resources (`content` as stored, `index` the new
    values): one COPY and one statement. Returns how many were re-indexed."""
    if not rows:
        return 0
    _stage(conn, rows)
    return conn.exec_driver_sql(_REINDEX).scalar_one()


_DELETE = f"""
WITH input AS (
    SELECT * FROM unnest(%(t)s::text[], %(i)s::text[]) AS x(res_type, res_id)
),
up AS (
    UPDATE resource r SET version = r.version + 1, last_updated = clock_timestamp(),
        deleted = true, content_hash = NULL, tokens = '{{}}'
    FROM input
    WHERE r.res_type = input.res_type AND r.res_id = input.res_id AND NOT r.deleted
    RETURNING r.res_type, r.res_id, r.version, r.last_updated
),
hist AS (
    INSERT INTO resource_history (res_type, res_id, version, last_updated, deleted, method, content)
    SELECT res_type, res_id, version, last_updated, true, 'DELETE', NULL FROM up
),
{_INDEX_GONE}
SELECT res_type, res_id, version, last_updated FROM up
"""


def delete_resources(conn: Connection, keys: Sequence[Key]) -> dict[Key, tuple[int, datetime]]:
    """Delete (as a new, deleted version) every key that exists and isn't deleted yet."""
    if not keys:
        return {}
    return {(r[0], r[1]): (r[2], r[3]) for r in conn.exec_driver_sql(_DELETE, _keys_params(keys))}


def read_version(conn: Connection, key: Key, version: int) -> Current | None:
    row = conn.exec_driver_sql(
        "SELECT version, last_updated, deleted, content::text FROM resource_history "
        "WHERE res_type = %(t)s AND res_id = %(i)s AND version = %(v)s",
        {"t": key[0], "i": key[1], "v": version},
    ).first()
    if row is None:
        return None
    return Current(row[0], row[1], row[2], orjson.loads(row[3]) if row[3] else None)


def read_history(
    conn: Connection, resource_type: str, res_id: str | None, *, count: int, offset: int
) -> tuple[int, list[tuple[str, str, Current, str]]]:
    """(total, [(type, id, version-state, method)]) newest first."""
    where = "res_type = %(t)s" + (" AND res_id = %(i)s" if res_id is not None else "")
    params = {"t": resource_type, "i": res_id, "n": count, "o": offset}
    total = conn.exec_driver_sql(
        f"SELECT count(*) FROM resource_history WHERE {where}", params
    ).scalar_one()
    rows = conn.exec_driver_sql(
        "SELECT res_type, res_id, version, last_updated, deleted, method, content::text "
        f"FROM resource_history WHERE {where} "
        "ORDER BY last_updated DESC, version DESC LIMIT %(n)s OFFSET %(o)s",
        params,
    )
    out = [
        (r[0], r[1], Current(r[2], r[3], r[4], orjson.loads(r[6]) if r[6] else None), r[5])
        for r in rows
    ]
    return total, out


def existing_keys(conn: Connection, keys: Sequence[Key]) -> set[Key]:
    """The keys that name a current, non-deleted resource."""
    if not keys:
        return set()
    rows = conn.exec_driver_sql(
        "SELECT r.res_type, r.res_id FROM resource r "
        "JOIN unnest(%(t)s::text[], %(i)s::text[]) AS x(res_type, res_id) "
        "USING (res_type, res_id) WHERE NOT r.deleted",
        _keys_params(keys),
    )
    return {(r[0], r[1]) for r in rows}


def content_of(resource_table: Any) -> Any:
    """The content of `resource_table`'s current row, as a SQLAlchemy expression (a scalar
    subquery on the history row its version names), for queries built with SQLAlchemy."""
    return (
        select(H.c.content)
        .where(and_(H.c.res_type == resource_table.c.res_type,
                    H.c.res_id == resource_table.c.res_id,
                    H.c.version == resource_table.c.version))
        .scalar_subquery()
    )


def prepare_session(dbapi_connection: Any, info: dict[str, Any]) -> None:
    """Give a new database session its staging table (committed, so it lasts the session)."""
    with dbapi_connection.cursor() as cur:
        cur.execute(STAGE_DDL)
    dbapi_connection.commit()
    info[STAGED] = True
