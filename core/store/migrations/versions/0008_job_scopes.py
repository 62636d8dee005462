"""The SMART scopes a job was submitted with: a worker runs its entries with exactly these
(core.auth.permissions), so an async entry can do no more than the same call through REST.

Jobs accepted before this revision get the scopes their route required at the time (a Bundle
`system/*.cruds`, a batch upsert `system/*.cu`): all that is known of their submitters. A row
inserted without scopes holds none, so its entries are refused rather than run unchecked.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import ARRAY

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "job",
        sa.Column("scopes", ARRAY(sa.Text), nullable=False, server_default="{}"),
    )
    op.execute(
        "UPDATE job SET scopes = CASE WHEN kind = 'upsert' THEN '{system/*.cu}'::text[] "
        "ELSE '{system/*.cruds}'::text[] END"
    )


def downgrade() -> None:
    op.drop_column("job", "scopes")
