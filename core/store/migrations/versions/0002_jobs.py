"""Async jobs: the job, its per-entry requests and results, and the unlogged upload staging.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "job",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("owner", sa.Text, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("state", sa.Text, nullable=False, server_default="accepted"),
        sa.Column("prefer_return", sa.Text, nullable=False, server_default="representation"),
        sa.Column("base_url", sa.Text, nullable=False),
        sa.Column("chunk_size", sa.Integer, nullable=False),
        sa.Column("total", sa.Integer, nullable=False, server_default="0"),
        sa.Column("done", sa.Integer, nullable=False, server_default="0"),
        sa.Column("succeeded", sa.Integer, nullable=False, server_default="0"),
        sa.Column("failed", sa.Integer, nullable=False, server_default="0"),
        sa.Column("gen", sa.Integer, nullable=False, server_default="0"),
        sa.Column("outcome", JSONB),
        sa.Column("outcome_status", sa.Integer),
        sa.Column("idempotency_key", sa.Text),
        sa.Column("body_hash", sa.Text),
        sa.Column("callback_url", sa.Text),
        sa.Column("callback_state", sa.Text),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column("started_at", sa.DateTime(timezone=True)),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column("dismissed_at", sa.DateTime(timezone=True)),
        sa.CheckConstraint(
            "state IN ('accepted', 'running', 'completed', 'failed', 'cancelled')",
            name="ck_job_state",
        ),
        sa.CheckConstraint("kind IN ('batch', 'transaction', 'upsert')", name="ck_job_kind"),
    )
    op.create_index("ix_job_owner_created", "job", ["owner", "created_at"])
    op.create_index(
        "ux_job_idempotency",
        "job",
        ["owner", "idempotency_key"],
        unique=True,
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
    )
    op.create_index(
        "ix_job_active",
        "job",
        ["updated_at"],
        postgresql_where=sa.text("state IN ('accepted', 'running')"),
    )

    op.create_table(
        "job_entry",
        sa.Column(
            "job_id", sa.Text, sa.ForeignKey("job.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("idx", sa.Integer, nullable=False),
        sa.Column("request", sa.JSON),
        sa.Column("status", sa.Integer),
        sa.Column("location", sa.Text),
        sa.Column("etag", sa.Text),
        sa.Column("last_modified", sa.DateTime(timezone=True)),
        sa.Column("outcome", JSONB),
        sa.Column("res_type", sa.Text),
        sa.Column("res_id", sa.Text),
        sa.Column("res_version", sa.Integer),
        sa.Column("resource", JSONB),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.PrimaryKeyConstraint("job_id", "idx"),
    )
    op.create_index(
        "ix_job_entry_pending",
        "job_entry",
        ["job_id", "idx"],
        postgresql_where=sa.text("status IS NULL"),
    )
    op.create_index(
        "ix_job_entry_failed",
        "job_entry",
        ["job_id", "idx"],
        postgresql_where=sa.text("status >= 400"),
    )

    op.create_table(
        "job_upload",
        sa.Column("job_id", sa.Text, primary_key=True),
        sa.Column("body", sa.Text, nullable=False),
        prefixes=["UNLOGGED"],
    )
    # The body is read once, right away: compressing 100 MB on the way in is wasted CPU.
    op.execute("ALTER TABLE job_upload ALTER COLUMN body SET STORAGE EXTERNAL")


def downgrade() -> None:
    op.drop_table("job_upload")
    op.drop_table("job_entry")
    op.drop_table("job")
