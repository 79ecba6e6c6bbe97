"""Notification delivery: row claiming, e-mail identity, postal letters.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 13:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "postal_letters",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("recipient_id", sa.Integer(), nullable=False),
        sa.Column("period_start", sa.Date(), nullable=False),
        sa.Column("period_end", sa.Date(), nullable=False),
        sa.Column("batch", sa.String(length=64), nullable=False),
        sa.Column("file_name", sa.String(length=255), nullable=False),
        sa.Column("events", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["recipient_id"], ["patients.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_postal_letters_recipient_id", "postal_letters", ["recipient_id"])
    op.create_index("ix_postal_letters_batch", "postal_letters", ["batch"])
    with op.batch_alter_table("notifications") as batch:
        batch.add_column(sa.Column("claimed_by", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("claimed_until", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("email_message_id", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("letter_id", sa.Integer(), nullable=True))
        batch.create_index("ix_notifications_email_message_id", ["email_message_id"])
        batch.create_index("ix_notifications_letter_id", ["letter_id"])
        batch.create_foreign_key(
            "fk_notifications_letter_id_postal_letters",
            "postal_letters",
            ["letter_id"],
            ["id"],
            ondelete="SET NULL",
        )


def downgrade() -> None:
    with op.batch_alter_table("notifications") as batch:
        batch.drop_constraint("fk_notifications_letter_id_postal_letters", type_="foreignkey")
        batch.drop_index("ix_notifications_letter_id")
        batch.drop_index("ix_notifications_email_message_id")
        batch.drop_column("letter_id")
        batch.drop_column("email_message_id")
        batch.drop_column("claimed_until")
        batch.drop_column("claimed_by")
    op.drop_index("ix_postal_letters_batch", table_name="postal_letters")
    op.drop_index("ix_postal_letters_recipient_id", table_name="postal_letters")
    op.drop_table("postal_letters")
