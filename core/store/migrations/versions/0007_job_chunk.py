"""The chunk ledger: which entries each running or waiting chunk of a job covers, and how often
it was started, so that a chunk that keeps dying (time limit, lost worker) is split until its
culprit is alone (core.jobs.chunks). `job.claimed_upto` is the claim cursor: every pending
entry below it belongs to a row of `job_chunk`.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "job", sa.Column("claimed_upto", sa.Integer, nullable=False, server_default="0")
    )
    op.create_table(
        "job_chunk",
        sa.Column("id", sa.Integer, sa.Identity(cycle=True), primary_key=True),
        sa.Column("job_id", sa.Text, sa.ForeignKey("job.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("lo", sa.Integer, nullable=False),
        sa.Column("hi", sa.Integer, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("time_limit", sa.Integer, nullable=False),
        sa.Column("failure", sa.Text),
        sa.Column("started_at", sa.DateTime(timezone=True)),
        sa.Column("deadline_at", sa.DateTime(timezone=True)),
        sa.CheckConstraint("state IN ('queued', 'running')", name="ck_job_chunk_state"),
    )
    op.create_index("ix_job_chunk_job", "job_chunk", ["job_id"])


def downgrade() -> None:
    op.drop_table("job_chunk")
    op.drop_column("job", "claimed_upto")
