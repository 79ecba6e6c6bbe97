"""The database schema (SQLAlchemy 2 declarative, async-friendly).

Tables:
- ``patients`` and ``patient_links``: the directory (DOMAIN.md 3, 4);
- ``messages`` (one per received message), ``attachments``;
- ``conversations`` and ``deliveries`` (one per accepted recipient);
- ``contacts``: professionals a patient may write to (Reply-To);
- ``notifications``: the transactional outbox of what to tell whom;
- ``audit_events``: the hash-chained trail.
"""

from __future__ import annotations

import enum
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Date,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class UtcDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, on every database.

    SQLite keeps no time zone: values are stored as naive UTC and given their
    zone back when read, so comparisons never mix naive and aware values.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database; use the injected clock")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, datetime: UtcDateTime}  # noqa: RUF012


class ProfileStatus(enum.StrEnum):
    """DOMAIN.md 3: the profile status decides what happens to a message."""

    ACTIVATED = "activated"
    CREATED = "created"  # created automatically, not activated yet
    OPPOSED = "opposed"
    CLOSED = "closed"

    @property
    def accepts_mail(self) -> bool:
        return self in (ProfileStatus.ACTIVATED, ProfileStatus.CREATED)


class LinkRole(enum.StrEnum):
    REPRESENTATIVE = "representative"  # legal representative of a minor
    HELPER = "helper"  # aidant: reads and writes on behalf, is not notified


class Channel(enum.StrEnum):
    EMAIL = "email"
    POSTAL = "postal"


class NotificationStatus(enum.StrEnum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"


def _enum(cls: type[enum.Enum]) -> Enum:
    # Stored as the value strings, checked by a CHECK constraint-free VARCHAR so
    # adding a member needs no table rebuild on SQLite.
    return Enum(
        cls,
        native_enum=False,
        create_constraint=False,
        length=16,
        values_callable=lambda e: [m.value for m in e],
    )


class MessageOrigin(enum.StrEnum):
    """Who wrote a stored message."""

    RECEIVED = "received"  # came in over SMTP
    PATIENT = "patient"  # a reply the patient (or a helper) wrote
    NOTICE = "notice"  # written by the service ("Message non distribué")


class Patient(Base):
    __tablename__ = "patients"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ins: Mapped[str] = mapped_column(String(15), unique=True)
    status: Mapped[ProfileStatus] = mapped_column(_enum(ProfileStatus))
    # DOMAIN.md 3: activated -> address registered at activation;
    # created -> address known to the insurer, else postal.
    # Stored lower-case (import, activation): the webmail logs in by it (indexed).
    activation_email: Mapped[str | None] = mapped_column(String(320), index=True)
    insurer_email: Mapped[str | None] = mapped_column(String(320))
    email_invalid: Mapped[bool] = mapped_column(Boolean, default=False)
    # Name and postal block are what a postal activity statement needs.
    given_name: Mapped[str | None] = mapped_column(String(200))
    family_name: Mapped[str | None] = mapped_column(String(200))
    birth_date: Mapped[date | None] = mapped_column(Date)
    postal_address: Mapped[str | None] = mapped_column(Text)  # lines separated by "\n"
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    activated_at: Mapped[datetime | None]

    representatives: Mapped[list[PatientLink]] = relationship(
        foreign_keys="PatientLink.patient_id", back_populates="patient", lazy="raise"
    )


class PatientLink(Base):
    """A minor's (or assisted person's) profile attached to an adult profile."""

    __tablename__ = "patient_links"
    __table_args__ = (UniqueConstraint("patient_id", "adult_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id", ondelete="CASCADE"))
    adult_id: Mapped[int] = mapped_column(ForeignKey("patients.id", ondelete="CASCADE"), index=True)
    role: Mapped[LinkRole] = mapped_column(_enum(LinkRole))
    created_at: Mapped[datetime]

    patient: Mapped[Patient] = relationship(
        foreign_keys=[patient_id], back_populates="representatives", lazy="raise"
    )
    adult: Mapped[Patient] = relationship(foreign_keys=[adult_id], lazy="raise")


class Message(Base):
    """One received message, stored once whatever the number of recipients.

    Only what routing and listing need is in clear (ids, times, size,
    sender address, threading ids).  Subject, names, headers, attachment
    names and the digest are in ``sealed``, encrypted with the message key
    (crypto.py); the body blob is encrypted with the same key.
    """

    __tablename__ = "messages"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ref: Mapped[str] = mapped_column(String(32), unique=True)  # public id, in the 250 reply
    received_at: Mapped[datetime]
    blob_key: Mapped[str] = mapped_column(String(64))
    size: Mapped[int]
    # The trace header we add (HELO, IP, our name, date: no content), kept
    # beside the received bytes (STYLE.md 6).
    trace_header: Mapped[bytes] = mapped_column(LargeBinary)
    mail_from: Mapped[str] = mapped_column(String(320))
    helo: Mapped[str | None] = mapped_column(String(255))
    peer: Mapped[str | None] = mapped_column(String(64))
    from_address: Mapped[str | None] = mapped_column(String(320), index=True)
    message_id: Mapped[str | None] = mapped_column(String(998), index=True)
    in_reply_to: Mapped[str | None] = mapped_column(Text)
    references: Mapped[str | None] = mapped_column(Text)
    reply_to: Mapped[str | None] = mapped_column(String(320))
    disposition_notification_to: Mapped[str | None] = mapped_column(String(320))
    attachment_count: Mapped[int] = mapped_column(Integer, default=0)
    broken_mime: Mapped[bool] = mapped_column(Boolean, default=False)
    sealed: Mapped[bytes] = mapped_column(LargeBinary)
    origin: Mapped[MessageOrigin] = mapped_column(
        _enum(MessageOrigin), default=MessageOrigin.RECEIVED, server_default="received"
    )


class Conversation(Base):
    """DOMAIN.md 4: a patient's exchange with one professional."""

    __tablename__ = "conversations"
    __table_args__ = (
        Index("ix_conversations_patient_professional", "patient_id", "professional"),
        Index("ix_conversations_patient_last", "patient_id", "last_message_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id", ondelete="CASCADE"))
    professional: Mapped[str] = mapped_column(String(320))  # address, lower-case
    started_at: Mapped[datetime]
    last_message_at: Mapped[datetime]
    # DOMAIN.md 4: "[FIN]" or X-MSS-MES: FIN ends it; a later message reopens it.
    ended_at: Mapped[datetime | None]
    ended_by: Mapped[str | None] = mapped_column(String(320))
    # Professional's display name and first subject, under the patient's data key.
    sealed: Mapped[bytes] = mapped_column(LargeBinary)


class Delivery(Base):
    """One message in one patient's mailbox."""

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("message_id", "patient_id"),
        # The conversation list (store/mailbox.py) reads only these columns: covering.
        Index(
            "ix_deliveries_mailbox",
            "patient_id",
            "conversation_id",
            "trashed_at",
            "read_at",
            "delivered_at",
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"))
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id", ondelete="CASCADE"))
    conversation_id: Mapped[int] = mapped_column(
        ForeignKey("conversations.id", ondelete="CASCADE"), index=True
    )
    rcpt: Mapped[str] = mapped_column(String(320))  # RCPT TO as received
    # The message key, wrapped under this patient's data key.
    wrapped_key: Mapped[bytes] = mapped_column(LargeBinary)
    ends_conversation: Mapped[bool] = mapped_column(Boolean, default=False)
    delivered_at: Mapped[datetime]
    read_at: Mapped[datetime | None]
    trashed_at: Mapped[datetime | None]

    message: Mapped[Message] = relationship(lazy="raise")
    conversation: Mapped[Conversation] = relationship(lazy="raise")


class PatientKey(Base):
    """A patient's data key, wrapped by a master key; NULL once destroyed."""

    __tablename__ = "patient_keys"

    patient_id: Mapped[int] = mapped_column(
        ForeignKey("patients.id", ondelete="CASCADE"), primary_key=True
    )
    master_key_id: Mapped[str | None] = mapped_column(String(16), index=True)
    wrapped: Mapped[bytes | None] = mapped_column(LargeBinary)
    created_at: Mapped[datetime]
    rotated_at: Mapped[datetime | None]
    destroyed_at: Mapped[datetime | None]


class Contact(Base):
    """A professional address the patient may write to (Reply-To, DOMAIN.md 4)."""

    __tablename__ = "contacts"
    __table_args__ = (UniqueConstraint("patient_id", "address"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id", ondelete="CASCADE"))
    address: Mapped[str] = mapped_column(String(320))
    conversation_id: Mapped[int | None] = mapped_column(
        ForeignKey("conversations.id", ondelete="SET NULL")
    )
    source: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime]


class Notification(Base):
    """Transactional outbox: what must be told to whom (DOMAIN.md 3)."""

    __tablename__ = "notifications"
    __table_args__ = (Index("ix_notifications_status_created", "status", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    delivery_id: Mapped[int] = mapped_column(ForeignKey("deliveries.id", ondelete="CASCADE"))
    # Whose mailbox received the message, and who is told (a representative
    # for a minor).
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id", ondelete="CASCADE"))
    recipient_id: Mapped[int] = mapped_column(
        ForeignKey("patients.id", ondelete="CASCADE"), index=True
    )
    channel: Mapped[Channel] = mapped_column(_enum(Channel))
    email: Mapped[str | None] = mapped_column(String(320))
    status: Mapped[NotificationStatus] = mapped_column(
        _enum(NotificationStatus), default=NotificationStatus.PENDING
    )
    created_at: Mapped[datetime]
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None]
    sent_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    # Row claiming by the notification workers: a worker owns the row until
    # ``claimed_until`` (a lease; a crashed worker's rows come back).
    claimed_by: Mapped[str | None] = mapped_column(String(64))
    claimed_until: Mapped[datetime | None]
    # The notification e-mail that carried it (several rows share one when
    # coalesced); bounces come back to an address derived from it.
    email_message_id: Mapped[str | None] = mapped_column(String(255), index=True)
    # The postal activity statement that listed it.
    letter_id: Mapped[int | None] = mapped_column(
        ForeignKey("postal_letters.id", ondelete="SET NULL"), index=True
    )

    delivery: Mapped[Delivery] = relationship(lazy="raise")


class PostalLetter(Base):
    """One postal activity statement (relevé d'activité) for one person and period."""

    __tablename__ = "postal_letters"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    recipient_id: Mapped[int] = mapped_column(
        ForeignKey("patients.id", ondelete="CASCADE"), index=True
    )
    period_start: Mapped[date] = mapped_column(Date)
    period_end: Mapped[date] = mapped_column(Date)
    batch: Mapped[str] = mapped_column(String(64), index=True)
    file_name: Mapped[str] = mapped_column(String(255))
    events: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime]


class OutboundKind(enum.StrEnum):
    REPLY = "reply"  # a patient's message to a professional
    MDN = "mdn"  # RFC 8098 read receipt
    DSN = "dsn"  # RFC 3464 delivery status notification we send


class OutboundStatus(enum.StrEnum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"  # permanent failure or expired: ends here
    HELD = "held"  # set aside by an operator (queue hold / release)


class OutboundMessage(Base):
    """A message leaving through the outbound queue, once whatever its recipients.

    The bytes are an encrypted blob (blobs.py) under a per-message key,
    itself sealed under the master key (``wrapped_key``, context
    ``keys.outbound_key_context``): outbound mail lives days, not years, so
    it is not tied to a patient's data key (a DSN has no patient).
    """

    __tablename__ = "outbound_messages"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ref: Mapped[str] = mapped_column(String(32), unique=True)
    kind: Mapped[OutboundKind] = mapped_column(_enum(OutboundKind))
    created_at: Mapped[datetime]
    mail_from: Mapped[str] = mapped_column(String(320))  # "" for the null sender
    message_id: Mapped[str | None] = mapped_column(String(998), index=True)
    blob_key: Mapped[str] = mapped_column(String(64))
    size: Mapped[int]
    master_key_id: Mapped[str] = mapped_column(String(16))
    wrapped_key: Mapped[bytes] = mapped_column(LargeBinary)
    # What it is about (all optional): whose mailbox, which conversation,
    # which received delivery it answers or reports on.
    patient_id: Mapped[int | None] = mapped_column(
        ForeignKey("patients.id", ondelete="SET NULL"), index=True
    )
    conversation_id: Mapped[int | None] = mapped_column(
        ForeignKey("conversations.id", ondelete="SET NULL")
    )
    delivery_id: Mapped[int | None] = mapped_column(
        ForeignKey("deliveries.id", ondelete="SET NULL"), index=True
    )
    # RFC 3461 ENVID given by whoever asked for it (our DSNs), if any.
    envelope_id: Mapped[str | None] = mapped_column(String(100))


class OutboundRecipient(Base):
    """One recipient of an outbound message: its own attempts and fate."""

    __tablename__ = "outbound_recipients"
    __table_args__ = (Index("ix_outbound_recipients_status_next", "status", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    outbound_id: Mapped[int] = mapped_column(
        ForeignKey("outbound_messages.id", ondelete="CASCADE"), index=True
    )
    address: Mapped[str] = mapped_column(String(320))
    domain: Mapped[str] = mapped_column(String(255), index=True)
    status: Mapped[OutboundStatus] = mapped_column(
        _enum(OutboundStatus), default=OutboundStatus.PENDING
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None]
    expires_at: Mapped[datetime]
    last_error: Mapped[str | None] = mapped_column(Text)
    claimed_by: Mapped[str | None] = mapped_column(String(64))
    claimed_until: Mapped[datetime | None]
    sent_at: Mapped[datetime | None]
    failed_at: Mapped[datetime | None]


class AuditEvent(Base):
    """Append-only, hash-chained trail; never message content."""

    __tablename__ = "audit_events"
    # A patient's activity history, newest first (store/mailbox.py).
    __table_args__ = (Index("ix_audit_events_patient_time", "patient_id", "occurred_at", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    occurred_at: Mapped[datetime]
    kind: Mapped[str] = mapped_column(String(64), index=True)
    patient_id: Mapped[int | None] = mapped_column(Integer)
    message_id: Mapped[int | None] = mapped_column(Integer)
    actor: Mapped[str] = mapped_column(String(320))
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64), unique=True)


class AuditAnchor(Base):
    """Where the chain starts once old events were purged (retention).

    One row at most.  ``prev_hash`` is the hash of the last purged event,
    which the first remaining event points to; the purge is itself an
    audited event naming the same anchor, so moving it is detected too.
    """

    __tablename__ = "audit_anchor"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prev_hash: Mapped[str] = mapped_column(String(64))
    through_id: Mapped[int]
    purged_at: Mapped[datetime]


class Account(Base):
    """A professional account of the submission listener (issue 3).

    It authenticates with a password (argon2id hash) or, for an applicative
    mailbox, with a bound client certificate (SASL EXTERNAL, identified by
    the SHA-256 of its DER encoding).  It may use only its own addresses in
    MAIL FROM: ``address`` and ``aliases``.
    """

    __tablename__ = "accounts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    address: Mapped[str] = mapped_column(String(320), unique=True)
    aliases: Mapped[list[str]] = mapped_column(JSON, default=list)
    display_name: Mapped[str | None] = mapped_column(String(300))
    password_hash: Mapped[str | None] = mapped_column(String(200))
    certificate_sha256: Mapped[str | None] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime]
    disabled_at: Mapped[datetime | None]

    def may_send_as(self, sender: str) -> bool:
        sender = sender.lower()
        return sender == self.address or sender in self.aliases


# --- webmail (issue 8) -----------------------------------------------------------------


class PatientCredentials(Base):
    """How a patient logs in to the webmail, once the profile is activated.

    The password is an argon2id hash; the TOTP secret (optional second
    factor) is sealed under the patient's data key, so a copy of the
    database alone gives neither.
    """

    __tablename__ = "patient_credentials"

    patient_id: Mapped[int] = mapped_column(
        ForeignKey("patients.id", ondelete="CASCADE"), primary_key=True
    )
    password_hash: Mapped[str] = mapped_column(String(200))
    totp_sealed: Mapped[bytes | None] = mapped_column(LargeBinary)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class ActivationCode(Base):
    """A provisional code (``mssante patients issue-code``), stored hashed.

    Valid ``web.activation_code_days`` (6 weeks); ``attempts`` wrong tries
    spend it; issuing a new one revokes the previous ones.
    """

    __tablename__ = "activation_codes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[int] = mapped_column(
        ForeignKey("patients.id", ondelete="CASCADE"), index=True
    )
    code_hash: Mapped[str] = mapped_column(String(200))
    channel: Mapped[Channel] = mapped_column(_enum(Channel))
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class WebSession(Base):
    """A webmail session, kept on the server: the cookie holds a random token
    whose SHA-256 is ``id``.  ``patient_id`` is None before login (the
    activation steps keep their progress in ``state``); ``acting_for`` is the
    mailbox being read (the patient's own, or a represented minor's)."""

    __tablename__ = "web_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    patient_id: Mapped[int | None] = mapped_column(
        ForeignKey("patients.id", ondelete="CASCADE"), index=True
    )
    acting_for: Mapped[int | None] = mapped_column(Integer)
    csrf: Mapped[str] = mapped_column(String(64))
    state: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime]
    last_seen_at: Mapped[datetime]
    expires_at: Mapped[datetime]


class LoginThrottle(Base):
    """Failed attempts per keyed hash of an identifier (INS, e-mail address or
    client address): the same counters whether the identifier exists or not,
    so the answers tell nothing about who has an account."""

    __tablename__ = "login_throttle"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    window_start: Mapped[datetime]
    locked_until: Mapped[datetime | None]
