"""Remember each cookie's expiry and refreshes whose reply was lost

Revision ID: 5d1c0e7a9b21
Revises: cbb9c852c206
Create Date: 2026-11-26 13:40:00.000000

"""

import sqlalchemy as sa
from alembic import op

revision = "5d1c0e7a9b21"
down_revision = "cbb9c852c206"
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("user_sessions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("cookie_expires_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.add_column(sa.Column("refresh_unsure", sa.Boolean(), server_default=sa.false(), nullable=False))


def downgrade():
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_column("refresh_unsure")
    with op.batch_alter_table("user_sessions", schema=None) as batch_op:
        batch_op.drop_column("cookie_expires_at")
