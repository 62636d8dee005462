"""`resource_history` partitioned by resource type: LIST (res_type), a partition for each type
that holds most of a clinical store (Synthea's volume: Observation, Encounter, claims,
reports…) and a default partition for every other type.

The history holds every version's content (since 0009 the only copy of it), so it is the
store's largest table by far; by type it gets a partition per bulk type that vacuum, reindex,
backup and a future retention of old versions can take one at a time, and an insert touches
only its type's indexes. Why by type rather than by hash of the id: every statement that reads
it names the type — a read or vread by (type, id, version), a search page joining its current
rows' versions, a type's `_history` — so the planner keeps that type's partition (at run time
when the keys come from a join, per row); HASH (res_id) would prune only statements that name
an id, not a type's history. The primary key already leads with `res_type`, as PostgreSQL
requires of the partition key. Only the system-wide `_history` reads every partition.

`resource` (the current rows: metadata and tokens, narrow since 0009) and the index tables
(`resource_string`, `resource_date`, `resource_number`) stay single tables. Their search
indexes lead with `res_type`, so a type's entries are one contiguous range already; and on
per-type partitions a search's planner weighs the whole-partition scan against its indexes
with the type's rows alone, which for the criteria its estimates get wrong (a string prefix,
a date range on two columns, a rare token at the fixed GIN guess) turned into sequential
scans of the type at a million resources (tests/test_search.py's EXPLAIN test): the one
table keeps those searches on their indexes.

The job tables stay as they are too. Partitioning them would pay off only if a partition could
be dropped whole when retention expires it: one partition per job (a DDL statement, with its
lock on the parent, for every accepted job, and thousands of tables) or per accept day (job
ids are random UUIDs: every lookup by job would visit every day's partition, or carry the day
in every key). Retention keeps deleting a finished job's rows in bounded batches.

A type with no partition of its own can get one later (README, "Store partitioning").

The data moves with the table: it is rebuilt as a partitioned one, its rows copied, then its
constraints and indexes (same names) built once over the copied rows. The table is locked
meanwhile: a maintenance window proportional to the store's history.

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

from alembic import op
from sqlalchemy import text

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

TABLES = ("resource_history",)
TYPES = (
    "Patient", "Observation", "Encounter", "Condition", "Procedure", "DiagnosticReport",
    "DocumentReference", "MedicationRequest", "Immunization", "Claim", "ExplanationOfBenefit",
)


def partition_name(table: str, resource_type: str | None) -> str:
    return f"{table}_{resource_type.lower() if resource_type else 'other'}"


def _rows(sql: str, **params: object) -> list[tuple[str, str]]:
    return [tuple(r) for r in op.get_bind().execute(text(sql), params)]  # type: ignore[misc]


def _rebuild(table: str, partitioned: bool) -> None:
    """Replace `table` with a copy of itself, partitioned by type or not, keeping its rows,
    defaults, checks, constraints and indexes (by name)."""
    constraints = _rows(
        "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE conrelid = CAST(:t AS regclass) AND contype IN ('p', 'u')", t=table)
    indexes = _rows(
        "SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid) FROM pg_index i "
        "WHERE i.indrelid = CAST(:t AS regclass) AND NOT EXISTS "
        "(SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)", t=table)
    new = f"{table}__rebuilt"
    scheme = " PARTITION BY LIST (res_type)" if partitioned else ""
    op.execute(f"CREATE TABLE {new} (LIKE {table} INCLUDING ALL EXCLUDING INDEXES){scheme}")
    if partitioned:
        for t in TYPES:
            op.execute(f"CREATE TABLE {partition_name(table, t)} PARTITION OF {new} "
                       f"FOR VALUES IN ('{t}')")
        op.execute(f"CREATE TABLE {partition_name(table, None)} PARTITION OF {new} DEFAULT")
    op.execute(f"INSERT INTO {new} SELECT * FROM {table}")
    op.execute(f"DROP TABLE {table}")
    op.execute(f"ALTER TABLE {new} RENAME TO {table}")
    for name, definition in constraints:
        op.execute(f'ALTER TABLE {table} ADD CONSTRAINT "{name}" {definition}')
    for _, definition in indexes:
        # A partitioned table's index reads `ON ONLY` (the parent alone): the rebuilt table's
        # partitions get it too.
        op.execute(definition.replace(" ON ONLY ", " ON ", 1))
    op.execute(f"ANALYZE {table}")


def upgrade() -> None:
    op.execute("SET LOCAL maintenance_work_mem = '256MB'")
    for table in TABLES:
        _rebuild(table, partitioned=True)


def downgrade() -> None:
    for table in TABLES:
        _rebuild(table, partitioned=False)
