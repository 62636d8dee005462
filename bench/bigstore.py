"""W7's large store: a database that already holds N resources, built in minutes instead of the
hours the API would take, and kept between benchmark runs.

How it is built, so that the stored format stays the product's whatever its tables look like:

1. A few thousand distinct Synthea-like resources (Patients, Encounters, Observations with
   subject and encounter references, Conditions, reports…) are written once through the
   product itself (a batch upsert with client ids, run by the real API and worker), so every
   row of every store table — content, search columns, index tables — is the product's own.
2. Every id and identifier value of that seed ends in `MARK`. Each store table (every table
   with `res_type` / `res_id` that the seed filled) is then multiplied server-side, copy `g`
   rewriting `MARK` to `w7c<g>` in every text, text[] and JSON(B) column — ids, references,
   tokens and identifiers stay consistent and unique — by `INSERT … SELECT … generate_series`,
   with the tables' indexes dropped meanwhile and rebuilt after (as a bulk load would).
3. A marker row records the schema head, the seed's version, the size and when the build
   ended; a later run reuses the database when all of them match, and removes what earlier
   runs loaded into it (everything updated after the build) before measuring.

What differs from a store grown through the API: the copies share the seed's dates and
last_updated (so date and _lastUpdated searches match in bulk, a day of dates ~N/3,650
resources), and freshly built indexes are denser than ones grown by random inserts.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg2
from psycopg2 import sql

from bench import data

__all__ = ["MARK", "BigStore", "Seed", "copy_mark", "make_seed", "open_store", "prepare_store"]

MARK = "w7c0000000"
SEED_VERSION = "1"  # bump when the seed's resources change
SEED_SIZE = 4_000
MARKER = "bench_w7_store"
COPIES_PER_STATEMENT = 100
Say = Callable[[str], None]


def copy_mark(g: int) -> str:
    """What `MARK` reads as in copy `g` (copy 0 is the seed itself)."""
    return f"w7c{g:07d}"


@dataclass(frozen=True)
class Seed:
    resources: list[dict[str, Any]]  # with ids, every reference resolved to Type/id

    @property
    def types(self) -> list[str]:
        return sorted({r["resourceType"] for r in self.resources})

    def waves(self) -> list[list[dict[str, Any]]]:
        """The seed in the order its references need (the product refuses a reference to a
        resource that does not exist yet, and a job's chunks run in parallel): patients,
        encounters, what points at both, reports (which point at observations)."""
        level = {"Patient": 0, "Encounter": 1, "DiagnosticReport": 3}
        waves: list[list[dict[str, Any]]] = [[], [], [], []]
        for r in self.resources:
            waves[level.get(r["resourceType"], 2)].append(r)
        return [w for w in waves if w]

    def identifiers(self) -> list[tuple[str, str]]:
        """(system, value) of the seed's Patient identifiers (MRNs)."""
        return [(i["system"], i["value"]) for r in self.resources
                if r["resourceType"] == "Patient" for i in r.get("identifier", [])
                if i.get("system", "").endswith("/mrn")]

    def dates(self) -> list[str]:
        """The days of the seed's Observations."""
        return sorted({r["effectiveDateTime"][:10] for r in self.resources
                       if r["resourceType"] == "Observation" and "effectiveDateTime" in r})


def make_seed(size: int) -> Seed:
    """`size` distinct Synthea-like resources (whole patients' bundles, the last one cut: its
    references only point backwards, so none dangles), ids and MRNs ending in `MARK`."""
    rng = random.Random(77)
    resources: list[dict[str, Any]] = []
    serial = 0
    while len(resources) < size:
        entries = data.synthea_like_bundle(rng.randint(100, 300), rng, serial=serial)
        serial += 1
        ids: dict[str, str] = {}
        refs: dict[str, str] = {}
        for entry in entries:
            # 36 characters like the product's UUIDs, the last 10 being the mark.
            ids[entry["fullUrl"]] = str(uuid.UUID(int=rng.getrandbits(128)))[:26] + MARK
            refs[entry["fullUrl"]] = f"{entry['resource']['resourceType']}/{ids[entry['fullUrl']]}"
        for entry in entries:
            resource = _resolve(entry["resource"], refs)
            resource["id"] = ids[entry["fullUrl"]]
            for ident in resource.get("identifier", []):
                ident["value"] = f"{ident['value']}-{MARK}"
            resources.append(resource)
    return Seed(resources[:size])


def _resolve(node: Any, refs: dict[str, str]) -> Any:
    """`node` with every `{"reference": "urn:uuid:…"}` of the bundle made `Type/id`."""
    if isinstance(node, dict):
        if set(node) == {"reference"} and node["reference"] in refs:
            return {"reference": refs[node["reference"]]}
        return {k: _resolve(v, refs) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, refs) for v in node]
    return node


@dataclass(frozen=True)
class BigStore:
    database: str
    url: str
    size: int  # resources in `resource`
    seed_size: int
    built_at: datetime  # rows updated after this were loaded by a benchmark run
    build_seconds: float
    built_now: bool
    types: tuple[str, ...]

    @property
    def copies(self) -> int:
        return -(-self.size // self.seed_size)


def _connect(url: str) -> Any:
    conn = psycopg2.connect(url)
    conn.autocommit = True
    return conn


def schema_head() -> str:
    from alembic.script import ScriptDirectory

    from core.store.migrate import alembic_config

    return str(ScriptDirectory.from_config(alembic_config()).get_current_head())


def _layout(size: int) -> str:
    return f"head {schema_head()}, seed v{SEED_VERSION} of {min(size, SEED_SIZE)}, size {size}"


def open_store(admin_url: str, database: str, size: int) -> BigStore | None:
    """The kept store, if it exists and matches the current schema, seed and size."""
    from bench.services import database_url

    url = database_url(admin_url, database)
    try:
        conn = psycopg2.connect(url)
    except psycopg2.OperationalError:
        return None
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT to_regclass(%s)", (MARKER,))
            if cur.fetchone()[0] is None:
                return None
            cur.execute(f"SELECT layout, size, seed_size, built_at, build_seconds, types "
                        f"FROM {MARKER}")
            row = cur.fetchone()
    finally:
        conn.close()
    if row is None or row[0] != _layout(size):
        return None
    return BigStore(database, url, row[1], row[2], row[3], row[4], False, tuple(row[5]))


def prepare_store(admin_url: str, database: str) -> str:
    """A fresh database for a build, migrated to head; its URL."""
    from bench.services import _admin, database_url, drop_database
    from core.store.migrate import upgrade

    drop_database(admin_url, database)
    _admin(admin_url, "CREATE DATABASE {}", database)
    url = database_url(admin_url, database)
    upgrade(url)
    return url


def store_tables(cur: Any) -> list[str]:
    """The tables (partitioned parents, not their partitions) that hold rows keyed by
    (res_type, res_id) outside the job tables: resource, history and index tables."""
    cur.execute("""
        SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p') AND NOT c.relispartition
          AND c.relname NOT LIKE 'job%%' AND c.relname NOT LIKE 'bench%%'
          AND EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid
                      AND a.attname = 'res_type' AND NOT a.attisdropped)
          AND EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid
                      AND a.attname = 'res_id' AND NOT a.attisdropped)
        ORDER BY c.relname""")
    return [r[0] for r in cur.fetchall()]


def _columns(cur: Any, table: str) -> list[tuple[str, str]]:
    """(name, type) of the columns a copy writes (generated and identity ones fill
    themselves)."""
    cur.execute("""
        SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute
        WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped
          AND attgenerated = '' AND attidentity = ''
        ORDER BY attnum""", (table,))
    return cur.fetchall()


def _copy_expr(name: str, type_: str) -> sql.Composable:
    col = sql.SQL("s.") + sql.Identifier(name)
    repl = sql.SQL("replace({}, {}, m.mark)")
    if type_ in ("text", "character varying") or type_.startswith("character varying("):
        return repl.format(col, sql.Literal(MARK))
    if type_ in ("jsonb", "json", "text[]", "character varying[]"):
        return sql.SQL("replace({}::text, {}, m.mark)::{}").format(
            col, sql.Literal(MARK), sql.SQL(type_))
    return col


@dataclass
class _Definitions:
    """A table's indexes and unique/primary constraints, dropped for the bulk load."""

    indexes: list[str]
    constraints: list[tuple[str, str]]  # (name, definition)


def _drop_indexes(cur: Any, table: str) -> _Definitions:
    cur.execute("""
        SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint
        WHERE conrelid = %s::regclass AND contype IN ('p', 'u')""", (table,))
    constraints = cur.fetchall()
    cur.execute("""
        SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid) FROM pg_index i
        WHERE i.indrelid = %s::regclass
          AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)""",
                (table,))
    indexes = cur.fetchall()
    for name, _ in indexes:
        cur.execute(sql.SQL("DROP INDEX {}").format(sql.SQL(name)))
    for name, _ in constraints:
        cur.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
            sql.Identifier(table), sql.Identifier(name)))
    return _Definitions([d for _, d in indexes], constraints)


def _restore_indexes(cur: Any, table: str, defs: _Definitions) -> None:
    for name, definition in defs.constraints:
        cur.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
            sql.Identifier(table), sql.Identifier(name), sql.SQL(definition)))
    for definition in defs.indexes:
        # A partitioned table's index reads `ON ONLY` (the parent alone): build it on every
        # partition too.
        cur.execute(definition.replace(" ON ONLY ", " ON ", 1))


def multiply(url: str, size: int, seed: Seed, say: Say) -> None:
    """Grow the store from its seed (copy 0) to `size` resources; see the module docstring.
    A last, partial copy takes a prefix of the seed in its own order: whole patients but for
    the last one's tail, so none of its references dangles."""
    seed_size = len(seed.resources)
    copies = -(-size // seed_size)
    remainder = size - (copies - 1) * seed_size  # resources of the last copy
    conn = _connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("SET maintenance_work_mem = '512MB'")
            tables = store_tables(cur)
            cur.execute("CREATE UNLOGGED TABLE bench_w7_keys (res_type text, res_id text, "
                        "n int, PRIMARY KEY (res_type, res_id))")
            cur.execute("INSERT INTO bench_w7_keys SELECT * FROM unnest(%s::text[], %s::text[]) "
                        "WITH ORDINALITY AS k(res_type, res_id, n)",
                        ([r["resourceType"] for r in seed.resources],
                         [r["id"] for r in seed.resources]))
            seeds = {t: f"bench_w7_seed_{t}" for t in tables}
            for table, seed in seeds.items():
                cur.execute(sql.SQL("CREATE UNLOGGED TABLE {} AS SELECT s.*, k.n FROM {} s "
                                    "JOIN bench_w7_keys k USING (res_type, res_id)").format(
                    sql.Identifier(seed), sql.Identifier(table)))
            defs = {t: _drop_indexes(cur, t) for t in tables}
            for table in tables:
                cols = _columns(cur, table)
                statement = sql.SQL(
                    "INSERT INTO {} ({}) SELECT {} FROM {} s CROSS JOIN "
                    "(SELECT g, 'w7c' || lpad(g::text, 7, '0') AS mark "
                    " FROM generate_series(%(lo)s, %(hi)s) g) m "
                    "WHERE m.g < %(last)s OR s.n <= %(rem)s").format(
                    sql.Identifier(table),
                    sql.SQL(", ").join(sql.Identifier(c) for c, _ in cols),
                    sql.SQL(", ").join(_copy_expr(c, t) for c, t in cols),
                    sql.Identifier(seeds[table]))
                t0 = time.monotonic()
                for lo in range(1, copies, COPIES_PER_STATEMENT):
                    hi = min(lo + COPIES_PER_STATEMENT, copies) - 1
                    cur.execute(statement, {"lo": lo, "hi": hi, "last": copies - 1,
                                            "rem": remainder})
                say(f"W7 store: {table} multiplied ×{copies} in {time.monotonic() - t0:.0f} s")
            for table in tables:
                t0 = time.monotonic()
                _restore_indexes(cur, table, defs[table])
                say(f"W7 store: {table} indexes rebuilt in {time.monotonic() - t0:.0f} s")
            for seed in seeds.values():
                cur.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(seed)))
            cur.execute("DROP TABLE bench_w7_keys")
            t0 = time.monotonic()
            for table in tables:
                # Hint bits and the visibility map now, not during the measured runs.
                cur.execute(sql.SQL("VACUUM (ANALYZE) {}").format(sql.Identifier(table)))
            say(f"W7 store: vacuumed and analysed in {time.monotonic() - t0:.0f} s")
    finally:
        conn.close()


def mark_built(url: str, size: int, seed_size: int, built_at: datetime, seconds: float,
               types: list[str]) -> BigStore:
    conn = _connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(f"CREATE TABLE {MARKER} (layout text NOT NULL, size bigint NOT NULL, "
                        "seed_size int NOT NULL, built_at timestamptz NOT NULL, "
                        "build_seconds float NOT NULL, types text[] NOT NULL)")
            cur.execute(f"INSERT INTO {MARKER} VALUES (%s, %s, %s, %s, %s, %s)",
                        (_layout(size), size, seed_size, built_at, seconds, types))
            cur.execute("SELECT current_database()")
            database = cur.fetchone()[0]
    finally:
        conn.close()
    return BigStore(database, url, size, seed_size, built_at, seconds, True, tuple(types))


def server_now(url: str) -> datetime:
    conn = _connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT clock_timestamp()")
            return cur.fetchone()[0]
    finally:
        conn.close()


def remove_loaded(store: BigStore) -> int:
    """Delete what benchmark runs wrote since the build (and every job): the store holds its
    `size` built resources again. Returns how many resources went."""
    conn = _connect(store.url)
    try:
        with conn.cursor() as cur:
            cur.execute("SET lock_timeout = '10s'")
            cur.execute("TRUNCATE job, job_entry CASCADE")
            conn.autocommit = False
            cur.execute("CREATE TEMP TABLE loaded AS SELECT res_type, res_id FROM resource "
                        "WHERE res_type = ANY(%s) AND last_updated > %s",
                        (list(store.types), store.built_at))
            cur.execute("SELECT count(*) FROM loaded")
            n = cur.fetchone()[0]
            if n:
                for table in store_tables(cur):
                    cur.execute(sql.SQL("DELETE FROM {} t USING loaded l WHERE "
                                        "t.res_type = l.res_type AND t.res_id = l.res_id")
                                .format(sql.Identifier(table)))
            cur.execute("DROP TABLE loaded")
            conn.commit()
            return int(n)
    finally:
        conn.close()


def disk_per_resource(store: BigStore) -> tuple[float, int]:
    """(bytes on disk per resource — every store table with its indexes and TOAST, partitions
    included — and the resources counted)."""
    conn = _connect(store.url)
    try:
        with conn.cursor() as cur:
            total = 0
            for table in store_tables(cur):
                # A plain table is no partition tree: pg_partition_tree() gives nothing then.
                cur.execute("""
                    SELECT coalesce(sum(pg_total_relation_size(relid)), 0) FROM (
                        SELECT relid FROM pg_partition_tree(%(t)s::regclass)
                        UNION SELECT %(t)s::regclass) AS tree""", {"t": table})
                total += int(cur.fetchone()[0])
            cur.execute("SELECT count(*) FROM resource")
            count = int(cur.fetchone()[0])
    finally:
        conn.close()
    return total / max(1, count), count
