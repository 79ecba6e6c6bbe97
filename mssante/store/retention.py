"""Retention: purging trashed messages and old audit events (``mssante purge``).

- A delivery trashed more than ``trash_days`` ago is deleted; a message left
  with no delivery is deleted with its blob (after the commit: a crash in
  between leaves an orphan blob, which ``store check`` reports, never a row
  without its blob); a conversation left empty is deleted.
- An outbound message (outbound/queue.py) whose recipients are all done
  (sent or failed) and that was queued more than ``outbound_days`` ago is
  deleted with its blob: what the patient wrote stays in their mailbox as
  its own copy (outbound/replies.py); the queue only needs it to deliver.
- Audit events older than ``audit_days`` are deleted.  The hash of the last
  one deleted becomes the chain's anchor (``audit_anchor``) and is named in
  the purge's own audit event, so verification still proves the rest.

Each purge is itself audited.  Ended webmail sessions and spent login
throttles are deleted too (:func:`purge_sessions`, not audited: they hold
no patient data).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import delete, exists, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from mssante.store import audit
from mssante.store.blobs import BlobStore
from mssante.store.models import (
    AuditAnchor,
    AuditEvent,
    Conversation,
    Delivery,
    LoginThrottle,
    Message,
    OutboundMessage,
    OutboundRecipient,
    OutboundStatus,
    WebSession,
)
from mssante.store.writer import Writer


@dataclass
class PurgeReport:
    deliveries: int = 0
    messages: int = 0
    conversations: int = 0
    outbound: int = 0
    audit_events: int = 0
    blob_keys: list[str] = field(default_factory=list)


async def _purge(
    session: AsyncSession,
    *,
    now: datetime,
    trash_days: int,
    audit_days: int,
    outbound_days: int,
    actor: str,
) -> PurgeReport:
    report = PurgeReport()
    trash_cutoff = now - timedelta(days=trash_days)
    gone = await session.execute(
        delete(Delivery)
        .where(Delivery.trashed_at.is_not(None), Delivery.trashed_at < trash_cutoff)
        .returning(Delivery.message_id, Delivery.conversation_id)
    )
    touched = gone.all()
    report.deliveries = len(touched)
    message_ids = {m for m, _ in touched}
    conversation_ids = {c for _, c in touched}
    if message_ids:
        orphans = list(
            await session.execute(
                select(Message.id, Message.blob_key).where(
                    Message.id.in_(message_ids),
                    ~exists().where(Delivery.message_id == Message.id),
                )
            )
        )
        report.blob_keys = [key for _, key in orphans]
        report.messages = len(orphans)
        if orphans:
            await session.execute(delete(Message).where(Message.id.in_([i for i, _ in orphans])))
    if conversation_ids:
        result = await session.execute(
            delete(Conversation)
            .where(
                Conversation.id.in_(conversation_ids),
                ~exists().where(Delivery.conversation_id == Conversation.id),
            )
            .returning(Conversation.id)
        )
        report.conversations = len(result.all())

    finished = await session.execute(
        delete(OutboundMessage)
        .where(
            OutboundMessage.created_at < now - timedelta(days=outbound_days),
            ~exists().where(
                OutboundRecipient.outbound_id == OutboundMessage.id,
                OutboundRecipient.status.in_((OutboundStatus.PENDING, OutboundStatus.HELD)),
            ),
        )
        .returning(OutboundMessage.id, OutboundMessage.blob_key)
    )
    gone_outbound = finished.all()
    if gone_outbound:
        # Not every database enforces ON DELETE CASCADE (SQLite without the pragma).
        await session.execute(
            delete(OutboundRecipient).where(
                OutboundRecipient.outbound_id.in_([i for i, _ in gone_outbound])
            )
        )
    report.outbound = len(gone_outbound)
    report.blob_keys += [key for _, key in gone_outbound]

    audit_cutoff = now - timedelta(days=audit_days)
    last = (
        await session.execute(
            select(AuditEvent.id, AuditEvent.hash)
            .where(AuditEvent.occurred_at < audit_cutoff)
            .order_by(AuditEvent.id.desc())
            .limit(1)
        )
    ).first()
    anchor_note: dict[str, object] = {}
    if last is not None:
        through_id, anchor_hash = last
        report.audit_events = int(
            await session.scalar(
                select(func.count()).select_from(AuditEvent).where(AuditEvent.id <= through_id)
            )
            or 0
        )
        await session.execute(delete(AuditEvent).where(AuditEvent.id <= through_id))
        row = await session.get(AuditAnchor, 1)
        if row is None:
            session.add(
                AuditAnchor(id=1, prev_hash=anchor_hash, through_id=through_id, purged_at=now)
            )
        else:
            row.prev_hash, row.through_id, row.purged_at = anchor_hash, through_id, now
        anchor_note = {"anchor": anchor_hash, "through_id": through_id}
    await audit.append(
        session,
        at=now,
        kind="retention.purged",
        actor=actor,
        details={
            "deliveries": report.deliveries,
            "messages": report.messages,
            "conversations": report.conversations,
            "outbound": report.outbound,
            "audit_events": report.audit_events,
            **anchor_note,
        },
    )
    return report


async def purge(
    writer: Writer,
    blobs: BlobStore,
    *,
    now: datetime,
    trash_days: int,
    audit_days: int,
    outbound_days: int = 7,
    actor: str,
) -> PurgeReport:
    report = await writer.run(
        lambda s: _purge(
            s,
            now=now,
            trash_days=trash_days,
            audit_days=audit_days,
            outbound_days=outbound_days,
            actor=actor,
        )
    )

    # Only after the commit: the rows pointing to these blobs are gone.
    def delete_blobs() -> None:
        for key in report.blob_keys:
            blobs.delete(key)

    await asyncio.to_thread(delete_blobs)
    return report


async def purge_sessions(
    writer: Writer, *, now: datetime, idle_seconds: float, lockout_seconds: float
) -> int:
    """Delete ended webmail sessions and spent login-throttle rows; return the sessions deleted.

    Sessions already refuse to serve once timed out (web/sessions.py); this
    only keeps the tables small.  Not audited: no patient data is removed.
    """

    async def job(session: AsyncSession) -> int:
        idle = now - timedelta(seconds=idle_seconds)
        ended = await session.execute(
            delete(WebSession).where(
                (WebSession.expires_at <= now) | (WebSession.last_seen_at <= idle)
            )
        )
        spent = now - timedelta(seconds=lockout_seconds)
        await session.execute(
            delete(LoginThrottle).where(
                LoginThrottle.window_start <= spent,
                (LoginThrottle.locked_until.is_(None)) | (LoginThrottle.locked_until <= now),
            )
        )
        return int(getattr(ended, "rowcount", 0) or 0)

    return await writer.run(job)
