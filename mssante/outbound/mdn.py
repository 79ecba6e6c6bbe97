"""Read receipts: an RFC 8098 MDN the first time a patient opens a message (issue 7.3).

DOMAIN.md 4 (reported): when a message carries ``Disposition-Notification-To``,
MES sends an MDN when the patient first opens it, and the patient cannot
refuse.  The webmail calls :func:`on_first_display` whenever a message is
opened; it is the only way a delivery becomes read.

**Once only.**  Marking the delivery read is a conditional
``UPDATE ... WHERE read_at IS NULL`` in a writer transaction (one writer per
process; ``BEGIN IMMEDIATE`` or the PostgreSQL advisory lock across
processes): of two concurrent first displays exactly one changes the row,
and only that one queues the MDN, in the same transaction, with the
``message.read`` and ``mdn.queued`` audit events.  The MDN's bytes are
written as a blob beforehand (outside the transaction, like every queued
message); the loser drops its blob.

**When an MDN is not sent** (the delivery is still marked read, and
``mdn.skipped`` says why in the patient's history):

- the message was received with a null envelope sender: it is itself a
  report (RFC 8098 3.1 / 5: never answer a notification with one);
- the address's domain differs from the envelope sender's domain
  (RFC 8098 2.1: a Disposition-Notification-To unlike the Return-Path
  may be a way to make the recipient's system mail a third party, and must
  not be answered without the user's consent, which a MES patient cannot
  give).  The envelope sender's domain passed the trust-space check when
  the message came in, so a matching address is in the trust space too;
  the delivery worker checks the whitelist again anyway;
- the address is in the patient domain (no mail to ourselves).

**The MDN** (RFC 8098 3): ``multipart/report;
report-type=disposition-notification`` with a French and English text part
and the ``message/disposition-notification`` part: ``Reporting-UA`` (our
host name), ``Original-Recipient`` (the RCPT TO the professional's operator
gave us, RFC 8098 3.2.3), ``Final-Recipient`` (the mailbox),
``Original-Message-ID`` and ``Disposition:
manual-action/MDN-sent-automatically; displayed``: the patient opened the
message (a user action, RFC 8098 3.2.6.1 "manual-action"), the receipt left
without asking them ("MDN-sent-automatically").  The envelope sender is
null (RFC 8098 3: no DSN about an MDN).  It carries no subject, no content
and no copy of the original: only that the message, identified by its
Message-ID, was displayed, and when.
"""

from __future__ import annotations

import enum
import secrets
from datetime import datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from mssante.outbound.queue import PreparedMessage
from mssante.store import audit
from mssante.store.models import Delivery, Message, OutboundKind, Patient

if TYPE_CHECKING:
    from mssante.app import Store

PARIS = ZoneInfo("Europe/Paris")
REPORTING_PRODUCT = "mssante"
SUBJECT = "Accusé de lecture / Read receipt"


class Skip(enum.StrEnum):
    """Why a requested MDN is not sent."""

    NULL_SENDER = "null_sender"
    DOMAIN_MISMATCH = "domain_mismatch"
    PATIENT_DOMAIN = "patient_domain"


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".")


def should_send(message: Message, patient_domain: str) -> str | Skip | None:
    """The address to send an MDN to, why not, or None when none was asked for."""
    address = message.disposition_notification_to
    if not address or message.trace_header == b"":
        return None  # not asked for, or a message we wrote ourselves
    if message.mail_from.strip() in ("", "<>"):  # stored as given in MAIL FROM
        return Skip.NULL_SENDER
    if _domain(address) == patient_domain.lower():
        return Skip.PATIENT_DOMAIN
    if _domain(address) != _domain(message.mail_from):
        return Skip.DOMAIN_MISMATCH
    return address


def compose(
    *,
    to: str,
    mailbox: str,
    original_recipient: str,
    original_message_id: str | None,
    received_at: datetime,
    reporting_host: str,
    message_id: str,
    at: datetime,
) -> bytes:
    """The MDN's bytes (CRLF)."""
    msg = EmailMessage(policy=SMTP)
    local, _, domain = mailbox.partition("@")
    msg["From"] = Address("", local, domain)
    to_local, _, to_domain = to.partition("@")
    msg["To"] = Address("", to_local, to_domain)
    msg["Subject"] = SUBJECT
    msg["Date"] = format_datetime(at)
    msg["Message-ID"] = message_id
    if original_message_id:
        msg["In-Reply-To"] = original_message_id
        msg["References"] = original_message_id
    msg["Auto-Submitted"] = "auto-replied"  # RFC 3834 5, RFC 8098 3
    received = received_at.astimezone(PARIS)
    displayed = at.astimezone(PARIS)
    msg.set_content(
        f"Le message que vous avez envoyé à {mailbox} (reçu le"
        f" {received:%d/%m/%Y à %H:%M}) a été affiché par son destinataire le"
        f" {displayed:%d/%m/%Y à %H:%M} (heure de Paris).\n"
        "Cet accusé de lecture ne garantit pas que le message a été lu ou compris.\n\n"
        f"The message you sent to {mailbox} (received on {received_at:%Y-%m-%d %H:%M} UTC)"
        f" was displayed by its recipient on {at:%Y-%m-%d %H:%M} UTC.\n"
        "This receipt does not guarantee that the message was read or understood.\n",
        charset="utf-8",
    )
    msg.make_mixed()
    msg.set_type("multipart/report")
    msg.set_param("report-type", "disposition-notification")
    fields = [
        f"Reporting-UA: {reporting_host}; {REPORTING_PRODUCT}",
        f"Original-Recipient: rfc822;{original_recipient}",
        f"Final-Recipient: rfc822;{mailbox}",
    ]
    if original_message_id:
        fields.append(f"Original-Message-ID: {original_message_id}")
    fields.append("Disposition: manual-action/MDN-sent-automatically; displayed")
    notification = EmailMessage(policy=SMTP)
    notification["Content-Type"] = "message/disposition-notification"
    notification.set_payload("".join(f"{field}\r\n" for field in fields))
    msg.attach(notification)
    return msg.as_bytes()


async def on_first_display(
    store: Store, *, patient_id: int, delivery_id: int, at: datetime
) -> int | None:
    """Mark the delivery read; on the first display, queue its MDN if one is due.

    Returns the outbound message id of the MDN, or None (not this patient's
    delivery, already read, no MDN asked for, or not sent: see the module
    docstring).
    """
    domain = store.settings.smtp.patient_domain
    async with store.reads() as session:
        row = (
            await session.execute(
                select(Delivery, Message, Patient)
                .join(Message, Message.id == Delivery.message_id)
                .join(Patient, Patient.id == Delivery.patient_id)
                .where(Delivery.id == delivery_id, Delivery.patient_id == patient_id)
            )
        ).one_or_none()
    if row is None:
        return None
    delivery, message, patient = row
    if delivery.read_at is not None:
        return None
    decision = should_send(message, domain)
    mailbox = f"{patient.ins}@{domain}"
    mdn_id = f"<{secrets.token_hex(16)}@{domain}>"
    prepared: PreparedMessage | None = None
    if isinstance(decision, str) and not isinstance(decision, Skip):
        prepared = await store.outbound.prepare(
            compose(
                to=decision,
                mailbox=mailbox,
                original_recipient=delivery.rcpt,
                original_message_id=message.message_id,
                received_at=message.received_at,
                reporting_host=store.settings.smtp.hostname,
                message_id=mdn_id,
                at=at,
            )
        )

    async def job(session: AsyncSession) -> tuple[bool, int | None]:
        conn = await session.connection()
        marked = await conn.execute(
            update(Delivery)
            .where(
                Delivery.id == delivery_id,
                Delivery.patient_id == patient_id,
                Delivery.read_at.is_(None),
            )
            .values(read_at=at)
        )
        if marked.rowcount != 1:
            return False, None  # another display was first
        actor = f"patient:{patient_id}"
        details = {"ref": message.ref, "delivery": delivery_id}
        await audit.append(
            session,
            at=at,
            kind="message.read",
            actor=actor,
            patient_id=patient_id,
            message_id=message.id,
            details=details,
        )
        if isinstance(decision, Skip):
            await audit.append(
                session,
                at=at,
                kind="mdn.skipped",
                actor=actor,
                patient_id=patient_id,
                message_id=message.id,
                details={**details, "why": decision.value},
            )
            return True, None
        if prepared is None or decision is None:
            return True, None
        outbound_id = await store.outbound.add(
            session,
            prepared,
            kind=OutboundKind.MDN,
            mail_from="",  # RFC 8098 3: the null reverse-path
            recipients=[decision],
            at=at,
            message_id=mdn_id,
            patient_id=patient_id,
            conversation_id=delivery.conversation_id,
            delivery_id=delivery_id,
        )
        await audit.append(
            session,
            at=at,
            kind="mdn.queued",
            actor=actor,
            patient_id=patient_id,
            message_id=message.id,
            details={**details, "outbound": outbound_id, "domain": _domain(decision)},
        )
        return True, outbound_id

    try:
        first, outbound_id = await store.writer.run(job)
    except Exception:
        if prepared is not None:
            store.blobs.delete(prepared.blob_key)
        raise
    if not first and prepared is not None:
        store.blobs.delete(prepared.blob_key)
    return outbound_id
