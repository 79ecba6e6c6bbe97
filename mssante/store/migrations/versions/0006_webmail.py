"""Webmail: credentials, activation codes, sessions, login throttling.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23 16:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "patient_credentials",
        sa.Column("patient_id", sa.Integer(), nullable=False),
        sa.Column("password_hash", sa.String(length=200), nullable=False),
        sa.Column("totp_sealed", sa.LargeBinary(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["patient_id"], ["patients.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("patient_id"),
    )
    op.create_table(
        "activation_codes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("patient_id", sa.Integer(), nullable=False),
        sa.Column("code_hash", sa.String(length=200), nullable=False),
        sa.Column("channel", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["patient_id"], ["patients.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_activation_codes_patient_id", "activation_codes", ["patient_id"])
    op.create_table(
        "web_sessions",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("patient_id", sa.Integer(), nullable=True),
        sa.Column("acting_for", sa.Integer(), nullable=True),
        sa.Column("csrf", sa.String(length=64), nullable=False),
        sa.Column("state", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["patient_id"], ["patients.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_web_sessions_patient_id", "web_sessions", ["patient_id"])
    op.create_table(
        "login_throttle",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("window_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("locked_until", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("key"),
    )
    # Login by e-mail address (store/credentials.py); addresses are stored lower-case.
    op.execute("UPDATE patients SET activation_email = lower(activation_email)")
    op.create_index("ix_patients_activation_email", "patients", ["activation_email"])
    # The conversation list reads only these deliveries columns (covering index),
    # the activity history a patient's events newest first (bench/webmail.py).
    op.drop_index("ix_deliveries_patient_conversation", table_name="deliveries")
    op.create_index(
        "ix_deliveries_mailbox",
        "deliveries",
        ["patient_id", "conversation_id", "trashed_at", "read_at", "delivered_at"],
    )
    op.drop_index("ix_audit_events_patient_id", table_name="audit_events")
    op.create_index(
        "ix_audit_events_patient_time", "audit_events", ["patient_id", "occurred_at", "id"]
    )
    # The conversation list (webmail): a patient's conversations, latest first.
    op.create_index(
        "ix_conversations_patient_last", "conversations", ["patient_id", "last_message_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_audit_events_patient_time", table_name="audit_events")
    op.create_index("ix_audit_events_patient_id", "audit_events", ["patient_id"])
    op.drop_index("ix_deliveries_mailbox", table_name="deliveries")
    op.create_index(
        "ix_deliveries_patient_conversation", "deliveries", ["patient_id", "conversation_id"]
    )
    op.drop_index("ix_conversations_patient_last", table_name="conversations")
    op.drop_index("ix_patients_activation_email", table_name="patients")
    op.drop_table("login_throttle")
    op.drop_index("ix_web_sessions_patient_id", table_name="web_sessions")
    op.drop_table("web_sessions")
    op.drop_index("ix_activation_codes_patient_id", table_name="activation_codes")
    op.drop_table("activation_codes")
    op.drop_table("patient_credentials")
