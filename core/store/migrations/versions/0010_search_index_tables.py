"""Search index tables for every date, number and quantity search parameter.

`resource_date` holds one row per (resource, date parameter, value range) and
`resource_number` one per (resource, number or quantity parameter, system, code, range); both
have btree indexes on (res_type, param, lo) and (res_type, param, hi) that serve range
queries and sorting. They replace `resource.date_lo` / `date_hi`, which held one date per type.

Resources stored before this revision keep their old index values until re-indexed: run
`fhirq db reindex` (batches of 500 resources, one statement each; safe to interrupt and
rerun, and to run while the server writes).

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "resource_date",
        sa.Column("res_type", sa.Text, nullable=False),
        sa.Column("res_id", sa.Text, nullable=False),
        sa.Column("param", sa.Text, nullable=False),
        sa.Column("lo", sa.DateTime(timezone=True), nullable=False),
        sa.Column("hi", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_date_lo", "resource_date", ["res_type", "param", "lo"],
                    postgresql_include=["hi", "res_id"])
    op.create_index("ix_date_hi", "resource_date", ["res_type", "param", "hi"],
                    postgresql_include=["lo", "res_id"])
    op.create_index("ix_date_owner", "resource_date", ["res_type", "res_id"])
    op.create_table(
        "resource_number",
        sa.Column("res_type", sa.Text, nullable=False),
        sa.Column("res_id", sa.Text, nullable=False),
        sa.Column("param", sa.Text, nullable=False),
        sa.Column("system", sa.Text, nullable=False),
        sa.Column("code", sa.Text, nullable=False),
        sa.Column("lo", sa.Numeric, nullable=False),
        sa.Column("hi", sa.Numeric, nullable=False),
    )
    op.create_index("ix_number_lo", "resource_number", ["res_type", "param", "lo"],
                    postgresql_include=["hi", "res_id"])
    op.create_index("ix_number_hi", "resource_number", ["res_type", "param", "hi"],
                    postgresql_include=["lo", "res_id"])
    op.create_index("ix_number_owner", "resource_number", ["res_type", "res_id"])
    op.drop_index("ix_resource_type_date_lo", table_name="resource")
    op.drop_index("ix_resource_type_date_hi", table_name="resource")
    op.drop_column("resource", "date_lo")
    op.drop_column("resource", "date_hi")


def downgrade() -> None:
    op.add_column("resource", sa.Column("date_lo", sa.DateTime(timezone=True)))
    op.add_column("resource", sa.Column("date_hi", sa.DateTime(timezone=True)))
    op.create_index("ix_resource_type_date_lo", "resource", ["res_type", "date_lo"])
    op.create_index("ix_resource_type_date_hi", "resource", ["res_type", "date_hi"])
    op.drop_table("resource_number")
    op.drop_table("resource_date")
