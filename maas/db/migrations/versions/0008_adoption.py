"""Adoption analytics: departments (a tenant's parent organisation), the market potential of
each industry, published adoption series, model prices, and an index covering what the
adoption aggregation reads.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.add_column(sa.Column("parent_id", sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f("ix_tenants_parent_id"), ["parent_id"], unique=False)
        batch_op.create_foreign_key(
            batch_op.f("fk_tenants_parent_id_tenants"), "tenants", ["parent_id"], ["id"]
        )
    op.create_table(
        "market_potentials",
        sa.Column("industry", sa.String(length=32), nullable=False),
        sa.Column("potential", sa.Float(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("industry", name=op.f("pk_market_potentials")),
    )
    op.create_table(
        "adoption_points",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("industry", sa.String(length=32), nullable=False),
        sa.Column("source", sa.String(length=200), nullable=False),
        sa.Column("period", sa.String(length=10), nullable=False),
        sa.Column("measure", sa.String(length=16), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("imported_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_adoption_points")),
        sa.UniqueConstraint(
            "industry", "source", "period", name=op.f("uq_adoption_points_industry")
        ),
    )
    op.create_table(
        "model_prices",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("prompt_per_1k", sa.Float(), nullable=False),
        sa.Column("completion_per_1k", sa.Float(), nullable=False),
        sa.Column("per_request", sa.Float(), nullable=False),
        sa.Column("per_item", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_prices")),
        sa.UniqueConstraint("model", "version", name=op.f("uq_model_prices_model")),
    )
    with op.batch_alter_table("usage_records", schema=None) as batch_op:
        batch_op.create_index(
            "ix_usage_records_adoption",
            ["tenant", "model", "day", "status", "industry", "prompt_tokens", "completion_tokens"],
            unique=False,
        )


def downgrade() -> None:
    with op.batch_alter_table("usage_records", schema=None) as batch_op:
        batch_op.drop_index("ix_usage_records_adoption")
    op.drop_table("model_prices")
    op.drop_table("adoption_points")
    op.drop_table("market_potentials")
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_tenants_parent_id_tenants"), type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_tenants_parent_id"))
        batch_op.drop_column("parent_id")
