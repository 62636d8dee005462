"""Callback delivery bookkeeping, so that a callback whose worker died while sending it is sent
again (core.jobs.control.reap_callbacks): when it was last claimed, and how many attempts were
made, counted across workers.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "job", sa.Column("callback_attempts", sa.Integer, nullable=False, server_default="0")
    )
    op.add_column("job", sa.Column("callback_claimed_at", sa.DateTime(timezone=True)))


def downgrade() -> None:
    op.drop_column("job", "callback_claimed_at")
    op.drop_column("job", "callback_attempts")
