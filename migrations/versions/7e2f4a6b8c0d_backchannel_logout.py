"""Back-channel logout: each session's provider session id, and the logout tokens already seen

Revision ID: 7e2f4a6b8c0d
Revises: 5d1c0e7a9b21
Create Date: 2026-11-26 14:30:00.000000

"""

import sqlalchemy as sa
from alembic import op

revision = "7e2f4a6b8c0d"
down_revision = "5d1c0e7a9b21"
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("user_sessions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("provider_sid", sa.String(length=255), nullable=True))
        batch_op.create_index(batch_op.f("ix_user_sessions_provider_sid"), ["provider_sid"], unique=False)
    op.create_table(
        "seen_logout_tokens",
        sa.Column("jti_hash", sa.String(length=64), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("jti_hash"),
    )
    with op.batch_alter_table("seen_logout_tokens", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_seen_logout_tokens_expires_at"), ["expires_at"], unique=False)


def downgrade():
    with op.batch_alter_table("seen_logout_tokens", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_seen_logout_tokens_expires_at"))
    op.drop_table("seen_logout_tokens")
    with op.batch_alter_table("user_sessions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_user_sessions_provider_sid"))
        batch_op.drop_column("provider_sid")
