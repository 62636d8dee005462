"""Each byte written once: a version's content lives only in `resource_history` (the current
row of `resource` names it by its version and keeps `content_hash` for no-op detection), and an
entry's result is a row of the insert-only `job_result` instead of a rewrite of its `job_entry`
request row (an entry without a result row is pending).

Moves existing data: any current version missing from the history is copied there before
`resource.content` goes (its hash is left to the first update, as for bulk creates), and every
finished entry's result moves to `job_result`. Takes an exclusive lock on these tables while it
runs: upgrade with the workers stopped.

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB, UUID

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("resource", sa.Column("content_hash", UUID))
    op.execute(
        """
        INSERT INTO resource_history (res_type, res_id, version, last_updated, deleted, method,
                                      content)
        SELECT res_type, res_id, version, last_updated, deleted, 'PUT',
               CASE WHEN deleted THEN NULL ELSE content END
        FROM resource
        ON CONFLICT (res_type, res_id, version) DO NOTHING
        """
    )
    op.drop_column("resource", "content")

    op.create_table(
        "job_result",
        sa.Column("job_id", sa.Text, sa.ForeignKey("job.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("idx", sa.Integer, nullable=False),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("location", sa.Text),
        sa.Column("etag", sa.Text),
        sa.Column("last_modified", sa.DateTime(timezone=True)),
        sa.Column("outcome", JSONB),
        sa.Column("res_type", sa.Text),
        sa.Column("res_id", sa.Text),
        sa.Column("res_version", sa.Integer),
        sa.Column("resource", JSONB),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("job_id", "idx"),
    )
    op.execute(
        """
        INSERT INTO job_result (job_id, idx, status, location, etag, last_modified, outcome,
                                res_type, res_id, res_version, resource, finished_at)
        SELECT job_id, idx, status, location, coalesce(etag, ''), last_modified, outcome,
               res_type, res_id, res_version, resource, coalesce(finished_at, now())
        FROM job_entry WHERE status IS NOT NULL
        """
    )
    op.create_index("ix_job_result_failed", "job_result", ["job_id", "idx"],
                    postgresql_where=sa.text("status >= 400"))
    op.create_index("ix_job_result_finished", "job_result", ["finished_at"])
    for column in ("status", "location", "etag", "last_modified", "outcome", "res_type",
                   "res_id", "res_version", "resource", "finished_at"):
        op.drop_column("job_entry", column)  # its indexes go with it


def downgrade() -> None:
    op.add_column("job_entry", sa.Column("status", sa.Integer))
    op.add_column("job_entry", sa.Column("location", sa.Text))
    op.add_column("job_entry", sa.Column("etag", sa.Text))
    op.add_column("job_entry", sa.Column("last_modified", sa.DateTime(timezone=True)))
    op.add_column("job_entry", sa.Column("outcome", JSONB))
    op.add_column("job_entry", sa.Column("res_type", sa.Text))
    op.add_column("job_entry", sa.Column("res_id", sa.Text))
    op.add_column("job_entry", sa.Column("res_version", sa.Integer))
    op.add_column("job_entry", sa.Column("resource", JSONB))
    op.add_column("job_entry", sa.Column("finished_at", sa.DateTime(timezone=True)))
    op.execute(
        """
        UPDATE job_entry e SET status = r.status,
            location = coalesce(r.location,
                                r.res_type || '/' || r.res_id || '/_history/' || r.res_version),
            etag = nullif(coalesce(r.etag, 'W/"' || r.res_version || '"'), ''),
            last_modified = r.last_modified, outcome = r.outcome, res_type = r.res_type,
            res_id = r.res_id, res_version = r.res_version, resource = r.resource,
            finished_at = r.finished_at
        FROM job_result r WHERE r.job_id = e.job_id AND r.idx = e.idx
        """
    )
    op.drop_table("job_result")
    op.create_index("ix_job_entry_pending", "job_entry", ["job_id", "idx"],
                    postgresql_where=sa.text("status IS NULL"))
    op.create_index("ix_job_entry_failed", "job_entry", ["job_id", "idx"],
                    postgresql_where=sa.text("status >= 400"))
    op.create_index("ix_job_entry_finished", "job_entry", ["finished_at"],
                    postgresql_where=sa.text("finished_at IS NOT NULL"))

    op.add_column("resource", sa.Column("content", JSONB))
    op.execute(
        """
        UPDATE resource r SET content = coalesce(h.content, '{}'::jsonb)
        FROM resource_history h
        WHERE h.res_type = r.res_type AND h.res_id = r.res_id AND h.version = r.version
        """
    )
    op.execute("UPDATE resource SET content = '{}'::jsonb WHERE content IS NULL")
    op.alter_column("resource", "content", nullable=False)
    op.drop_column("resource", "content_hash")
