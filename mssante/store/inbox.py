"""Storing one received message for its accepted recipients.

Everything here runs inside one transaction that the caller commits
(STYLE.md 7): the message row, its attachments, one delivery per
recipient threaded into a conversation, Reply-To contacts, the
notifications to send and the audit events.  Only after that commit does
the client get its ``250``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from mssante.notify.planner import Profile, plan
from mssante.routing.trust import TrustSpace
from mssante.store import audit
from mssante.store.conversations import is_fin, thread
from mssante.store.crypto import seal
from mssante.store.keys import Keyring, message_key_context, message_meta_context, seal_json
from mssante.store.mime import MessageSummary
from mssante.store.models import (
    Contact,
    Delivery,
    LinkRole,
    Message,
    Notification,
    NotificationStatus,
    Patient,
    PatientLink,
)


@dataclass(frozen=True, slots=True)
class IncomingMessage:
    ref: str
    received_at: datetime
    blob_key: str
    message_key: bytes
    size: int
    sha256: str
    trace_header: bytes
    mail_from: str
    helo: str | None
    peer: str | None
    summary: MessageSummary


@dataclass(frozen=True, slots=True)
class Recipient:
    rcpt: str
    patient_id: int


@dataclass(frozen=True, slots=True)
class StoredMessage:
    message_id: int
    delivery_ids: list[int]


def sealed_metadata(incoming: IncomingMessage) -> dict[str, object]:
    """Everything of the message that may carry health information."""
    s = incoming.summary
    return {
        "from_name": s.from_name,
        "to": s.to,
        "cc": s.cc,
        "subject": s.subject,
        "date": s.date,
        "mss_headers": dict(s.mss_headers),
        "attachments": [
            {"name": a.filename, "type": a.content_type, "size": a.size} for a in s.attachments
        ],
        "defects": list(s.defects),
        "sha256": incoming.sha256,
    }


def _profile(p: Patient) -> Profile:
    return Profile(p.id, p.status, p.activation_email, p.insurer_email, p.email_invalid)


async def _representatives(session: AsyncSession, patient_id: int) -> list[Patient]:
    rows = await session.scalars(
        select(Patient)
        .join(PatientLink, PatientLink.adult_id == Patient.id)
        .where(
            PatientLink.patient_id == patient_id,
            PatientLink.role == LinkRole.REPRESENTATIVE,
        )
        .order_by(Patient.id)
    )
    return list(rows)


async def store_message(
    session: AsyncSession,
    incoming: IncomingMessage,
    recipients: list[Recipient],
    *,
    trust: TrustSpace,
    keyring: Keyring,
) -> StoredMessage:
    s = incoming.summary
    at = incoming.received_at
    message = Message(
        ref=incoming.ref,
        received_at=at,
        blob_key=incoming.blob_key,
        size=incoming.size,
        trace_header=incoming.trace_header,
        mail_from=incoming.mail_from,
        helo=incoming.helo,
        peer=incoming.peer,
        from_address=s.from_address,
        message_id=s.message_id,
        in_reply_to=" ".join(s.in_reply_to) or None,
        references=" ".join(s.references) or None,
        reply_to=s.reply_to,
        disposition_notification_to=s.disposition_notification_to,
        attachment_count=len(s.attachments),
        broken_mime=s.broken,
        sealed=seal_json(
            incoming.message_key, sealed_metadata(incoming), message_meta_context(incoming.ref)
        ),
    )
    session.add(message)
    await session.flush()  # message.id for the audit events

    # The professional is who the message says it is from; the envelope
    # sender stands in when From is missing or unparseable.
    professional = (s.from_address or incoming.mail_from).lower()
    fin = is_fin(s.subject, s.mss_headers)
    # RFC 5322 3.6.4: In-Reply-To first, then References newest first.
    refs = [*s.in_reply_to, *reversed(s.references)]

    deliveries: list[Delivery] = []
    for rcpt in recipients:
        patient = await session.get(Patient, rcpt.patient_id)
        if patient is None:  # erased between RCPT and now: nothing to deliver to
            continue
        dek = await keyring.data_key(session, patient.id, at=at)
        conv = await thread(
            session,
            dek=dek,
            patient_id=patient.id,
            professional=professional,
            professional_name=s.from_name,
            subject=s.subject,
            refs=refs,
            fin=fin,
            at=at,
        )
        delivery = Delivery(
            message=message,
            patient_id=patient.id,
            conversation=conv,
            rcpt=rcpt.rcpt,
            wrapped_key=seal(
                dek, incoming.message_key, message_key_context(incoming.ref, patient.id)
            ),
            ends_conversation=fin,
            delivered_at=at,
            read_at=None,
            trashed_at=None,
        )
        session.add(delivery)
        deliveries.append(delivery)

        # DOMAIN.md 4: a Reply-To MSSanté address becomes an authorised contact.
        if s.reply_to and trust.is_mssante(s.reply_to):
            known = await session.scalar(
                select(Contact.id).where(
                    Contact.patient_id == patient.id, Contact.address == s.reply_to
                )
            )
            if known is None:
                session.add(
                    Contact(
                        patient_id=patient.id,
                        address=s.reply_to,
                        conversation_id=conv.id,
                        source="reply-to",
                        created_at=at,
                    )
                )

        reps = await _representatives(session, patient.id)
        planned = plan(_profile(patient), [_profile(r) for r in reps])
        notifications = [
            Notification(
                delivery=delivery,
                patient_id=patient.id,
                recipient_id=p.recipient_id,
                channel=p.channel,
                email=p.email,
                status=NotificationStatus.PENDING,
                created_at=at,
                attempts=0,
                next_attempt_at=at,
                sent_at=None,
                last_error=None,
            )
            for p in planned
        ]
        session.add_all(notifications)

        await audit.append(
            session,
            at=at,
            kind="message.delivered",
            actor=professional,
            patient_id=patient.id,
            message_id=message.id,
            details={
                "ref": incoming.ref,
                "conversation": conv.id,
                "size": incoming.size,
                "attachments": len(s.attachments),
                "ends_conversation": fin,
                "notifications": [
                    {"to": p.recipient_id, "channel": p.channel.value} for p in planned
                ],
            },
        )
    await session.flush()
    return StoredMessage(message.id, [d.id for d in deliveries])
