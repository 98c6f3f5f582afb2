"""Remember access tokens handed to browsers or replaced while alive, so a sign-out can revoke them

Revision ID: d4e6a8c0b2f4
Revises: b3d5f7a9c1e2
Create Date: 2026-12-04 21:45:00.000000

"""

import sqlalchemy as sa
from alembic import op

revision = "d4e6a8c0b2f4"
down_revision = "b3d5f7a9c1e2"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "handed_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("session_hash", sa.String(length=64), nullable=True),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("token", sa.Text(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("handed_tokens", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_handed_tokens_user_id"), ["user_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_handed_tokens_expires_at"), ["expires_at"], unique=False)


def downgrade():
    with op.batch_alter_table("handed_tokens", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_handed_tokens_expires_at"))
        batch_op.drop_index(batch_op.f("ix_handed_tokens_user_id"))
    op.drop_table("handed_tokens")
