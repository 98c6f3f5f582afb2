"""Index each person's refresh events by kind and id, for the hook's look at the latest one

Revision ID: 9a4c2e6f1b3d
Revises: 7e2f4a6b8c0d
Create Date: 2026-11-26 17:00:00.000000

"""

from alembic import op

revision = "9a4c2e6f1b3d"
down_revision = "7e2f4a6b8c0d"
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("refresh_events", schema=None) as batch_op:
        batch_op.create_index("ix_refresh_events_user_id_kind_id", ["user_id", "kind", "id"], unique=False)
        batch_op.drop_index("ix_refresh_events_user_id")


def downgrade():
    with op.batch_alter_table("refresh_events", schema=None) as batch_op:
        batch_op.create_index("ix_refresh_events_user_id", ["user_id"], unique=False)
        batch_op.drop_index("ix_refresh_events_user_id_kind_id")
