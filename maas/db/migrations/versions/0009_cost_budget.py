"""A key's monthly budget in currency (the price table's), beside its budget in tokens, and
each usage record's cost at the price in force when it ran, which that budget sums.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("monthly_cost_budget", sa.Float(), nullable=True))
    with op.batch_alter_table("usage_records", schema=None) as batch_op:
        batch_op.add_column(sa.Column("cost", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("usage_records", schema=None) as batch_op:
        batch_op.drop_column("cost")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_column("monthly_cost_budget")
