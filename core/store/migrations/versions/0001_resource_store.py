"""Resource store: current resources with search columns, history, string index.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "resource",
        sa.Column("res_type", sa.Text, nullable=False),
        sa.Column("res_id", sa.Text, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("last_updated", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deleted", sa.Boolean, nullable=False, server_default="false"),
        sa.Column("content", JSONB, nullable=False),
        sa.Column("tokens", ARRAY(sa.Text), nullable=False, server_default="{}"),
        sa.Column("date_lo", sa.DateTime(timezone=True)),
        sa.Column("date_hi", sa.DateTime(timezone=True)),
        sa.PrimaryKeyConstraint("res_type", "res_id"),
    )
    op.create_index("ix_resource_tokens", "resource", ["tokens"], postgresql_using="gin")
    op.create_index("ix_resource_type_updated", "resource", ["res_type", "last_updated"])
    op.create_index("ix_resource_type_date_lo", "resource", ["res_type", "date_lo"])
    op.create_index("ix_resource_type_date_hi", "resource", ["res_type", "date_hi"])

    op.create_table(
        "resource_history",
        sa.Column("res_type", sa.Text, nullable=False),
        sa.Column("res_id", sa.Text, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("last_updated", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deleted", sa.Boolean, nullable=False, server_default="false"),
        sa.Column("method", sa.Text, nullable=False),
        sa.Column("content", JSONB),
        sa.PrimaryKeyConstraint("res_type", "res_id", "version"),
    )
    op.create_index("ix_history_type_updated", "resource_history", ["res_type", "last_updated"])

    op.create_table(
        "resource_string",
        sa.Column("res_type", sa.Text, nullable=False),
        sa.Column("res_id", sa.Text, nullable=False),
        sa.Column("param", sa.Text, nullable=False),
        sa.Column("value", sa.Text(collation="C"), nullable=False),
    )
    op.create_index("ix_string_lookup", "resource_string", ["res_type", "param", "value"])
    op.create_index("ix_string_owner", "resource_string", ["res_type", "res_id"])


def downgrade() -> None:
    op.drop_table("resource_string")
    op.drop_table("resource_history")
    op.drop_table("resource")
