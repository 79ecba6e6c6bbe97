"""messages.origin: received over SMTP, written by the patient, or a service notice.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23 14:25:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.add_column(
            sa.Column("origin", sa.String(length=16), nullable=False, server_default="received")
        )


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("origin")
