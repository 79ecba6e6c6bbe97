"""Storing received messages for their accepted recipients.

Everything here runs inside one transaction that the caller commits
(STYLE.md 7): for each message its row, one delivery per recipient
threaded into a conversation, Reply-To contacts, the notifications to
send and the audit events.  Only after that commit does the client get
its ``250``.

The writer hands over all the messages waiting (group commit, writer.py),
and they are stored with a fixed number of statements whatever their
number: the directory rows, data keys, conversations and contacts they
need are loaded together, each message is then decided in arrival order in
memory (the same decisions as storing them one by one), and the rows are
inserted table by table with multi-row INSERTs.  Core statements, not ORM
units of work: at group-commit sizes the ORM's bookkeeping cost more than
the database.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, insert, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from mssante.notify.planner import PlannedNotification, Profile, plan
from mssante.routing.trust import TrustSpace
from mssante.store import audit
from mssante.store.conversations import ConversationState, Lookup, Threads, is_fin
from mssante.store.crypto import seal
from mssante.store.keys import Keyring, message_key_context, message_meta_context, seal_json
from mssante.store.mime import MessageSummary
from mssante.store.models import (
    Base,
    Contact,
    Conversation,
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
class Arrival:
    """A message waiting in the writer's queue, with its accepted recipients."""

    incoming: IncomingMessage
    recipients: list[Recipient]


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


async def _profiles(conn: AsyncConnection, patient_ids: list[int]) -> dict[int, Profile]:
    rows = await conn.execute(
        select(
            Patient.id,
            Patient.status,
            Patient.activation_email,
            Patient.insurer_email,
            Patient.email_invalid,
        ).where(Patient.id.in_(patient_ids))
    )
    return {row.id: _profile(row) for row in rows}


async def _representatives(
    conn: AsyncConnection, patient_ids: list[int]
) -> dict[int, list[Profile]]:
    rows = await conn.execute(
        select(
            PatientLink.patient_id.label("minor_id"),
            Patient.id,
            Patient.status,
            Patient.activation_email,
            Patient.insurer_email,
            Patient.email_invalid,
        )
        .join(PatientLink, PatientLink.adult_id == Patient.id)
        .where(
            PatientLink.patient_id.in_(patient_ids),
            PatientLink.role == LinkRole.REPRESENTATIVE,
        )
        .order_by(PatientLink.patient_id, Patient.id)
    )
    reps: dict[int, list[Profile]] = {}
    for row in rows:
        reps.setdefault(row.minor_id, []).append(_profile(row))
    return reps


def _profile(row: Any) -> Profile:
    return Profile(row.id, row.status, row.activation_email, row.insurer_email, row.email_invalid)


async def _known_contacts(
    conn: AsyncConnection, pairs: set[tuple[int, str]]
) -> set[tuple[int, str]]:
    if not pairs:
        return set()
    rows = await conn.execute(
        select(Contact.patient_id, Contact.address).where(
            tuple_(Contact.patient_id, Contact.address).in_(sorted(pairs))
        )
    )
    return {(row[0], row[1]) for row in rows}


def _message_row(incoming: IncomingMessage) -> dict[str, object]:
    s = incoming.summary
    return {
        "ref": incoming.ref,
        "received_at": incoming.received_at,
        "blob_key": incoming.blob_key,
        "size": incoming.size,
        "trace_header": incoming.trace_header,
        "mail_from": incoming.mail_from,
        "helo": incoming.helo,
        "peer": incoming.peer,
        "from_address": s.from_address,
        "message_id": s.message_id,
        "in_reply_to": " ".join(s.in_reply_to) or None,
        "references": " ".join(s.references) or None,
        "reply_to": s.reply_to,
        "disposition_notification_to": s.disposition_notification_to,
        "attachment_count": len(s.attachments),
        "broken_mime": s.broken,
        "sealed": seal_json(
            incoming.message_key, sealed_metadata(incoming), message_meta_context(incoming.ref)
        ),
    }


@dataclass(slots=True)
class _Decided:
    """One delivery, decided in memory before any row is written."""

    arrival: int
    patient_id: int
    rcpt: str
    conversation: ConversationState
    wrapped_key: bytes
    fin: bool
    new_contact: str | None
    planned: list[PlannedNotification]


def _professional(incoming: IncomingMessage) -> str:
    # The professional is who the message says it is from; the envelope
    # sender stands in when From is missing or unparseable.
    return (incoming.summary.from_address or incoming.mail_from).lower()


def _refs(incoming: IncomingMessage) -> list[str]:
    # RFC 5322 3.6.4: In-Reply-To first, then References newest first.
    s = incoming.summary
    return [*s.in_reply_to, *reversed(s.references)]


async def store_messages(
    session: AsyncSession,
    arrivals: list[Arrival],
    *,
    trust: TrustSpace,
    keyring: Keyring,
) -> list[StoredMessage]:
    """Store ``arrivals`` in the session's transaction, in order."""
    # ORM work of earlier jobs of this transaction goes first (ids follow
    # the order of events).
    await session.flush()
    conn = await session.connection()
    wanted = sorted({r.patient_id for a in arrivals for r in a.recipients})
    profiles = await _profiles(conn, wanted)
    present = sorted(profiles)  # a profile erased between RCPT and now gets nothing
    reps = await _representatives(conn, present)
    at = max(a.incoming.received_at for a in arrivals)
    deks = await keyring.data_keys_for_writing(session, present, at=at)
    lookups = [
        Lookup(r.patient_id, _professional(a.incoming), _refs(a.incoming))
        for a in arrivals
        for r in a.recipients
        if r.patient_id in profiles
    ]
    threads = await Threads.load(conn, lookups)
    reply_tos = {
        (r.patient_id, a.incoming.summary.reply_to)
        for a in arrivals
        for r in a.recipients
        if a.incoming.summary.reply_to and trust.is_mssante(a.incoming.summary.reply_to)
    }
    contacts = await _known_contacts(conn, reply_tos)

    decided: list[_Decided] = []
    for index, arrival in enumerate(arrivals):
        incoming, s = arrival.incoming, arrival.incoming.summary
        professional = _professional(incoming)
        fin = is_fin(s.subject, s.mss_headers)
        refs = _refs(incoming)
        for rcpt in arrival.recipients:
            profile = profiles.get(rcpt.patient_id)
            if profile is None:
                continue
            dek = deks[profile.id]
            conv = threads.join(
                Lookup(profile.id, professional, refs),
                dek=dek,
                professional_name=s.from_name,
                subject=s.subject,
                message_id=s.message_id,
                fin=fin,
                at=incoming.received_at,
            )
            # DOMAIN.md 4: a Reply-To MSSanté address becomes an authorised contact.
            contact = None
            pair = (profile.id, s.reply_to or "")
            if pair in reply_tos and pair not in contacts:
                contacts.add(pair)
                contact = s.reply_to
            decided.append(
                _Decided(
                    arrival=index,
                    patient_id=profile.id,
                    rcpt=rcpt.rcpt,
                    conversation=conv,
                    wrapped_key=seal(
                        dek, incoming.message_key, message_key_context(incoming.ref, profile.id)
                    ),
                    fin=fin,
                    new_contact=contact,
                    planned=plan(profile, reps.get(profile.id, [])),
                )
            )

    message_ids = await _insert_returning_ids(
        conn, Message, [_message_row(a.incoming) for a in arrivals]
    )
    await _write_conversations(conn, threads)
    delivery_ids = await _insert_returning_ids(
        conn,
        Delivery,
        [
            {
                "message_id": message_ids[d.arrival],
                "patient_id": d.patient_id,
                "conversation_id": d.conversation.id,
                "rcpt": d.rcpt,
                "wrapped_key": d.wrapped_key,
                "ends_conversation": d.fin,
                "delivered_at": arrivals[d.arrival].incoming.received_at,
                "read_at": None,
                "trashed_at": None,
            }
            for d in decided
        ],
    )
    contact_rows = [
        {
            "patient_id": d.patient_id,
            "address": d.new_contact,
            "conversation_id": d.conversation.id,
            "source": "reply-to",
            "created_at": arrivals[d.arrival].incoming.received_at,
        }
        for d in decided
        if d.new_contact is not None
    ]
    if contact_rows:
        await conn.execute(insert(Contact), contact_rows)
    notification_rows = [
        {
            "delivery_id": delivery_id,
            "patient_id": d.patient_id,
            "recipient_id": p.recipient_id,
            "channel": p.channel,
            "email": p.email,
            "status": NotificationStatus.PENDING,
            "created_at": arrivals[d.arrival].incoming.received_at,
            "attempts": 0,
            "next_attempt_at": arrivals[d.arrival].incoming.received_at,
        }
        for d, delivery_id in zip(decided, delivery_ids, strict=True)
        for p in d.planned
    ]
    if notification_rows:
        await conn.execute(insert(Notification), notification_rows)
    await audit.append_many(
        session,
        [
            {
                "occurred_at": arrivals[d.arrival].incoming.received_at,
                "kind": "message.delivered",
                "actor": _professional(arrivals[d.arrival].incoming),
                "patient_id": d.patient_id,
                "message_id": message_ids[d.arrival],
                "details": {
                    "ref": arrivals[d.arrival].incoming.ref,
                    "conversation": d.conversation.id,
                    "size": arrivals[d.arrival].incoming.size,
                    "attachments": len(arrivals[d.arrival].incoming.summary.attachments),
                    "ends_conversation": d.fin,
                    "notifications": [
                        {"to": p.recipient_id, "channel": p.channel.value} for p in d.planned
                    ],
                },
            }
            for d in decided
        ],
    )
    stored: list[StoredMessage] = [StoredMessage(mid, []) for mid in message_ids]
    for d, delivery_id in zip(decided, delivery_ids, strict=True):
        stored[d.arrival].delivery_ids.append(delivery_id)
    return stored


async def _insert_returning_ids(
    conn: AsyncConnection, entity: type[Base], rows: list[dict[str, object]]
) -> list[int]:
    if not rows:
        return []
    table = entity.__table__
    result = await conn.execute(
        insert(entity).returning(table.c.id, sort_by_parameter_order=True), rows
    )
    return [row[0] for row in result]


async def _write_conversations(conn: AsyncConnection, threads: Threads) -> None:
    if threads.new:
        ids = await _insert_returning_ids(conn, Conversation, [c.row() for c in threads.new])
        for conv, conv_id in zip(threads.new, ids, strict=True):
            conv.id = conv_id
    changed = threads.changed
    if changed:
        await conn.execute(
            update(Conversation)
            .where(Conversation.id == bindparam("conv_id"))
            .values(
                sealed=bindparam("sealed"),
                last_message_at=bindparam("last_message_at"),
                ended_at=bindparam("ended_at"),
                ended_by=bindparam("ended_by"),
            ),
            [
                {
                    "conv_id": c.id,
                    "sealed": c.sealed,
                    "last_message_at": c.last_message_at,
                    "ended_at": c.ended_at,
                    "ended_by": c.ended_by,
                }
                for c in changed
            ],
        )
