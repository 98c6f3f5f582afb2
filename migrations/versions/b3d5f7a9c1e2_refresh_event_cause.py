"""Keep a refused refresh's error in a column of its own: the outcome is one of a fixed set

Revision ID: b3d5f7a9c1e2
Revises: 9a4c2e6f1b3d
Create Date: 2026-12-04 20:30:00.000000

"""

import sqlalchemy as sa
from alembic import op

revision = "b3d5f7a9c1e2"
down_revision = "9a4c2e6f1b3d"
branch_labels = None
depends_on = None

events = sa.table("refresh_events", sa.column("outcome", sa.String), sa.column("cause", sa.String))


def upgrade():
    with op.batch_alter_table("refresh_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("cause", sa.String(length=64), nullable=True))
    refused = events.c.outcome.startswith("refused:")
    op.execute(events.update().where(refused).values(cause=sa.func.substr(events.c.outcome, 9), outcome="refused"))


def downgrade():
    refused = events.c.outcome == "refused"
    op.execute(events.update().where(refused).values(outcome=sa.func.substr("refused:" + sa.func.coalesce(events.c.cause, ""), 1, 32)))
    with op.batch_alter_table("refresh_events", schema=None) as batch_op:
        batch_op.drop_column("cause")
