"""Index of job entries by the time they finished, for the entries/s that `/metrics` reports
(core.metrics) without reading every entry of a large job.

Partial (`finished_at IS NOT NULL`): accepting a job writes its pending entries without touching
it. Built CONCURRENTLY, so upgrading a live database does not stop the workers writing results.

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_job_entry_finished",
            "job_entry",
            ["finished_at"],
            postgresql_where="finished_at IS NOT NULL",
            postgresql_concurrently=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(
            "ix_job_entry_finished", table_name="job_entry", postgresql_concurrently=True
        )
