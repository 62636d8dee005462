"""Table definitions of the resource store (SQLAlchemy Core; Alembic migrations mirror them).

- `resource`: the current version of every resource, with the search index columns that the
  supported search parameters need (`tokens` GIN, `date_lo`/`date_hi`, `last_updated`).
- `resource_history`: every version ever written, current one included (vread, _history).
- `resource_string`: normalised string search values (name/family/given), one row per value,
  so that prefix search is a btree range scan.

Content is stored without `meta.versionId` / `meta.lastUpdated`: those live in columns and are
put back on read, so that comparing stored content detects no-op updates in SQL.
"""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

metadata = MetaData()

resource = Table(
    "resource",
    metadata,
    Column("res_type", Text, nullable=False),
    Column("res_id", Text, nullable=False),
    Column("version", Integer, nullable=False),
    Column("last_updated", DateTime(timezone=True), nullable=False),
    Column("deleted", Boolean, nullable=False, server_default="false"),
    Column("content", JSONB, nullable=False),
    # Token and reference search values, e.g. "identifier:http://x|123", "gender:*|male",
    # "subject:Patient/1". Format owned by core.fhir.search_params.
    Column("tokens", ARRAY(Text), nullable=False, server_default="{}"),
    Column("date_lo", DateTime(timezone=True)),
    Column("date_hi", DateTime(timezone=True)),
    PrimaryKeyConstraint("res_type", "res_id"),
    Index("ix_resource_tokens", "tokens", postgresql_using="gin"),
    Index("ix_resource_type_updated", "res_type", "last_updated"),
    Index("ix_resource_type_date_lo", "res_type", "date_lo"),
    Index("ix_resource_type_date_hi", "res_type", "date_hi"),
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
