"""Retention of finished jobs (core.jobs.retention): when a job's entries were purged, and an
index that finds the finished jobs whose entries are still kept, oldest first.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("job", sa.Column("entries_purged_at", sa.DateTime(timezone=True)))
    op.create_index(
        "ix_job_finished_kept", "job", ["finished_at"],
        postgresql_where=sa.text(
            "state IN ('completed', 'failed', 'cancelled') AND entries_purged_at IS NULL"
        ),
    )


def downgrade() -> None:
    op.drop_index("ix_job_finished_kept", table_name="job")
    op.drop_column("job", "entries_purged_at")
