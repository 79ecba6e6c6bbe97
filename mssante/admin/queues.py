"""Read-only views for the admin API: one patient's profile, the queues' depth.

Each is a few aggregate queries on a read session (they never wait for the
writer); nothing here reads a message or its metadata.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from mssante.admin.schemas import (
    Depth,
    NotificationCounts,
    NotificationDepth,
    NotificationQueues,
    OutboundDepth,
    PatientView,
    Queues,
)
from mssante.notify.planner import Profile, own_channel
from mssante.store.directory import get_patient
from mssante.store.models import (
    Channel,
    Notification,
    NotificationStatus,
    OutboundMessage,
    OutboundRecipient,
    OutboundStatus,
    PatientCredentials,
)


async def patient_view(session: AsyncSession, ins: str) -> PatientView | None:
    patient = await get_patient(session, ins)
    if patient is None:
        return None
    counts: dict[NotificationStatus, int] = {
        status: count
        for status, count in await session.execute(
            select(Notification.status, func.count())
            .where(Notification.recipient_id == patient.id)
            .group_by(Notification.status)
        )
    }
    has_password = await session.get(PatientCredentials, patient.id) is not None
    planned = own_channel(
        Profile(
            id=patient.id,
            status=patient.status,
            activation_email=patient.activation_email,
            insurer_email=patient.insurer_email,
            email_invalid=patient.email_invalid,
        )
    )
    return PatientView(
        ins=patient.ins,
        status=patient.status,
        activation_email=patient.activation_email,
        insurer_email=patient.insurer_email,
        email_invalid=patient.email_invalid,
        given_name=patient.given_name,
        family_name=patient.family_name,
        birth_date=patient.birth_date,
        postal_address=patient.postal_address.split("\n") if patient.postal_address else None,
        notification_channel=planned.channel if planned is not None else None,
        webmail_password=has_password,
        created_at=patient.created_at,
        updated_at=patient.updated_at,
        activated_at=patient.activated_at,
        notifications=NotificationCounts(
            pending=counts.get(NotificationStatus.PENDING, 0),
            failed=counts.get(NotificationStatus.FAILED, 0),
        ),
    )


def _depth(count: int, oldest: datetime | None, now: datetime) -> Depth:
    age = max((now - oldest).total_seconds(), 0.0) if oldest is not None else None
    return Depth(count=count, oldest_age_seconds=age)


async def queue_state(session: AsyncSession, *, now: datetime) -> Queues:
    outbound = {
        status: _depth(count, oldest, now)
        for status, count, oldest in await session.execute(
            select(OutboundRecipient.status, func.count(), func.min(OutboundMessage.created_at))
            .join(OutboundMessage, OutboundMessage.id == OutboundRecipient.outbound_id)
            .group_by(OutboundRecipient.status)
        )
    }
    waiting = (NotificationStatus.PENDING, NotificationStatus.FAILED)
    notifications = {
        (channel, status): _depth(count, oldest, now)
        for channel, status, count, oldest in await session.execute(
            select(
                Notification.channel,
                Notification.status,
                func.count(),
                func.min(Notification.created_at),
            )
            .where(Notification.status.in_(waiting))
            .group_by(Notification.channel, Notification.status)
        )
    }
    empty = Depth(count=0, oldest_age_seconds=None)

    def by_channel(channel: Channel) -> NotificationDepth:
        return NotificationDepth(
            pending=notifications.get((channel, NotificationStatus.PENDING), empty),
            failed=notifications.get((channel, NotificationStatus.FAILED), empty),
        )

    return Queues(
        at=now,
        outbound=OutboundDepth(
            pending=outbound.get(OutboundStatus.PENDING, empty),
            held=outbound.get(OutboundStatus.HELD, empty),
            failed=outbound.get(OutboundStatus.FAILED, empty),
            sent=outbound.get(OutboundStatus.SENT, empty),
        ),
        notifications=NotificationQueues(
            email=by_channel(Channel.EMAIL), postal=by_channel(Channel.POSTAL)
        ),
    )
