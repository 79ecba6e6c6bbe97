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
    OutboundStatus,
    PatientCredentials,
)
from mssante.store.queues import Depth as StoredDepth
from mssante.store.queues import queue_state as stored_queue_state


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


def _depth(depth: StoredDepth, now: datetime) -> Depth:
    return Depth(count=depth.count, oldest_age_seconds=depth.age(now))


async def queue_state(session: AsyncSession, *, now: datetime) -> Queues:
    state = await stored_queue_state(session, outbound=list(OutboundStatus))

    def by_channel(channel: Channel) -> NotificationDepth:
        return NotificationDepth(
            pending=_depth(state.notified(channel, NotificationStatus.PENDING), now),
            failed=_depth(state.notified(channel, NotificationStatus.FAILED), now),
        )

    return Queues(
        at=now,
        outbound=OutboundDepth(
            pending=_depth(state.recipients(OutboundStatus.PENDING), now),
            held=_depth(state.recipients(OutboundStatus.HELD), now),
            failed=_depth(state.recipients(OutboundStatus.FAILED), now),
            sent=_depth(state.recipients(OutboundStatus.SENT), now),
        ),
        notifications=NotificationQueues(
            email=by_channel(Channel.EMAIL), postal=by_channel(Channel.POSTAL)
        ),
    )
