"""Professional accounts of the submission listener (password or bound certificate).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 11:51:27.421531
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("address", sa.String(length=320), nullable=False),
        sa.Column("aliases", sa.JSON(), nullable=False),
        sa.Column("display_name", sa.String(length=300), nullable=True),
        sa.Column("password_hash", sa.String(length=200), nullable=True),
        sa.Column("certificate_sha256", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("address"),
        sa.UniqueConstraint("certificate_sha256"),
    )


def downgrade() -> None:
    op.drop_table("accounts")
