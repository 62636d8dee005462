"""Set-based SQL over the resource store. Every function takes a whole chunk of rows and costs
one round trip, whatever the chunk size; nothing here commits.

Content is stored without `meta.versionId` / `meta.lastUpdated` (they live in columns), so the
upsert can skip a no-op update by comparing stored JSONB with the new one in SQL.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import Connection

from core.fhir.search_params import IndexValues

__all__ = [
    "Key",
    "Current",
    "WriteRow",
    "Written",
    "lock_conditions",
    "read_current",
    "lock_current",
    "write_resources",
    "delete_resources",
    "read_version",
    "read_history",
    "existing_keys",
]

Key = tuple[str, str]  # (resource type, id)

# Separator for the per-row token list sent as one string (FHIR strings exclude control chars).
_SEP = "\x1f"


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


def _select_current(
    conn: Connection, keys: Sequence[Key], *, lock: bool, content: bool
) -> dict[Key, Current]:
    if not keys:
        return {}
    cols = "r.res_type, r.res_id, r.version, r.last_updated, r.deleted"
    if content:
        cols += ", r.content::text"
    sql = (
        f"SELECT {cols} FROM resource r "
        "JOIN unnest(%(t)s::text[], %(i)s::text[]) AS x(res_type, res_id) "
        "USING (res_type, res_id) ORDER BY r.res_type, r.res_id"
    )
    if lock:
        sql += " FOR UPDATE OF r"
    out: dict[Key, Current] = {}
    for row in conn.exec_driver_sql(sql, _keys_params(keys)):
        out[(row[0], row[1])] = Current(
            version=row[2],
            last_updated=row[3],
            deleted=row[4],
            content=orjson.loads(row[5]) if content else None,
        )
    return out


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


_UPSERT = """
WITH input AS (
    SELECT * FROM unnest(%(t)s::text[], %(i)s::text[], %(c)s::jsonb[], %(tok)s::text[],
                         %(lo)s::timestamptz[], %(hi)s::timestamptz[], %(m)s::text[])
        AS x(res_type, res_id, content, tok, date_lo, date_hi, method)
),
prior AS (
    SELECT r.res_type, r.res_id, r.deleted FROM resource r JOIN input USING (res_type, res_id)
),
up AS (
    INSERT INTO resource AS r
        (res_type, res_id, version, last_updated, deleted, content, tokens, date_lo, date_hi)
    SELECT res_type, res_id, 1, clock_timestamp(), false, content,
           CASE WHEN tok = '' THEN '{}'::text[] ELSE string_to_array(tok, E'\\x1f') END,
           date_lo, date_hi
    FROM input
    ON CONFLICT (res_type, res_id) DO UPDATE SET
        version = r.version + 1, last_updated = EXCLUDED.last_updated, deleted = false,
        content = EXCLUDED.content, tokens = EXCLUDED.tokens,
        date_lo = EXCLUDED.date_lo, date_hi = EXCLUDED.date_hi
    WHERE r.deleted OR r.content IS DISTINCT FROM EXCLUDED.content
    RETURNING r.res_type, r.res_id, r.version, r.last_updated, r.content
),
hist AS (
    INSERT INTO resource_history (res_type, res_id, version, last_updated, deleted, method, content)
    SELECT up.res_type, up.res_id, up.version, up.last_updated, false, input.method, up.content
    FROM up JOIN input USING (res_type, res_id)
),
strings_gone AS (
    DELETE FROM resource_string s USING up
    WHERE s.res_type = up.res_type AND s.res_id = up.res_id
),
strings_new AS (
    INSERT INTO resource_string (res_type, res_id, param, value)
    SELECT s.res_type, s.res_id, s.param, s.value
    FROM unnest(%(st)s::text[], %(si)s::text[], %(sp)s::text[], %(sv)s::text[])
        AS s(res_type, res_id, param, value)
    JOIN up ON up.res_type = s.res_type AND up.res_id = s.res_id
)
SELECT up.res_type, up.res_id, up.version, up.last_updated,
       (prior.res_id IS NULL OR prior.deleted) AS created
FROM up LEFT JOIN prior USING (res_type, res_id)
"""


def write_resources(conn: Connection, rows: Sequence[WriteRow]) -> list[Written]:
    """Create or update every row in one statement (resource, history and string index).

    Keys must be distinct within one call (callers split repeated keys into waves). Concurrent
    writers of the same key are serialised by the row lock of ON CONFLICT, so versions stay
    consecutive.
    """
    if not rows:
        return []
    params: dict[str, list[Any]] = {
        "t": [],
        "i": [],
        "c": [],
        "tok": [],
        "lo": [],
        "hi": [],
        "m": [],
        "st": [],
        "si": [],
        "sp": [],
        "sv": [],
    }
    for row in rows:
        t, i = row.key
        params["t"].append(t)
        params["i"].append(i)
        params["c"].append(_dumps(row.content))
        params["tok"].append(_SEP.join(row.index.tokens))
        params["lo"].append(row.index.date_lo)
        params["hi"].append(row.index.date_hi)
        params["m"].append(row.method)
        for param, value in row.index.strings:
            params["st"].append(t)
            params["si"].append(i)
            params["sp"].append(param)
            params["sv"].append(value)
    written: dict[Key, Written] = {}
    for r in conn.exec_driver_sql(_UPSERT, params):
        written[(r[0], r[1])] = Written(r[2], r[3], created=r[4], changed=True)
    missing = [row.key for row in rows if row.key not in written]
    if missing:  # unchanged content: report the current version
        for key, cur in read_current(conn, missing, content=False).items():
            written[key] = Written(cur.version, cur.last_updated, created=False, changed=False)
    return [written[row.key] for row in rows]


_DELETE = """
WITH input AS (
    SELECT * FROM unnest(%(t)s::text[], %(i)s::text[]) AS x(res_type, res_id)
),
up AS (
    UPDATE resource r SET version = r.version + 1, last_updated = clock_timestamp(),
        deleted = true, tokens = '{}', date_lo = NULL, date_hi = NULL
    FROM input
    WHERE r.res_type = input.res_type AND r.res_id = input.res_id AND NOT r.deleted
    RETURNING r.res_type, r.res_id, r.version, r.last_updated
),
hist AS (
    INSERT INTO resource_history (res_type, res_id, version, last_updated, deleted, method, content)
    SELECT res_type, res_id, version, last_updated, true, 'DELETE', NULL FROM up
),
strings_gone AS (
    DELETE FROM resource_string s USING up
    WHERE s.res_type = up.res_type AND s.res_id = up.res_id
)
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
