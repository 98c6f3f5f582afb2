"""Keep the refresh token a viewer authorization brings, so it can be revoked when replaced and at sign-out

Revision ID: e5a7c9b1d3f5
Revises: d4e6a8c0b2f4
Create Date: 2026-12-05 10:00:00.000000

"""

import sqlalchemy as sa
from alembic import op

revision = "e5a7c9b1d3f5"
down_revision = "d4e6a8c0b2f4"
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.add_column(sa.Column("viewer_refresh_token", sa.Text(), nullable=True))


def downgrade():
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_column("viewer_refresh_token")
