"""Uploaded files (/v1/files); data keys may belong to a file instead of a version.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "files",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("public_id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("created_by", sa.String(length=16), nullable=True),
        sa.Column("purpose", sa.String(length=16), nullable=False),
        sa.Column("filename", sa.String(length=255), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("relpath", sa.String(length=255), nullable=False),
        sa.Column("encrypted", sa.Boolean(), nullable=False),
        sa.Column("details", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_files_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_files")),
        sa.UniqueConstraint("public_id", name=op.f("uq_files_public_id")),
    )
    with op.batch_alter_table("files", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_files_tenant_id"), ["tenant_id"], unique=False)
    with op.batch_alter_table("data_keys", schema=None) as batch_op:
        batch_op.alter_column("version_id", existing_type=sa.Integer(), nullable=True)
        batch_op.add_column(sa.Column("file_id", sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f("ix_data_keys_file_id"), ["file_id"], unique=False)
        batch_op.create_foreign_key(
            batch_op.f("fk_data_keys_file_id_files"),
            "files",
            ["file_id"],
            ["id"],
            ondelete="CASCADE",
        )


def downgrade() -> None:
    op.execute("DELETE FROM data_keys WHERE file_id IS NOT NULL")
    with op.batch_alter_table("data_keys", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_data_keys_file_id_files"), type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_data_keys_file_id"))
        batch_op.drop_column("file_id")
        batch_op.alter_column("version_id", existing_type=sa.Integer(), nullable=False)
    with op.batch_alter_table("files", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_files_tenant_id"))
    op.drop_table("files")
