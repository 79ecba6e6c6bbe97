"""How much waits in the queues: the outbound queue and the notifications.

Read by the ops endpoint's gauges (ops/queues.py) and the admin API's queue
state (admin/queues.py).  Two aggregate queries on a read session, on the
status indexes (``ix_outbound_recipients_status_next``,
``ix_notifications_status_created``); nothing about any message but counts
and ages.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from mssante.store.models import (
    Channel,
    Notification,
    NotificationStatus,
    OutboundMessage,
    OutboundRecipient,
    OutboundStatus,
)

R = OutboundRecipient
N = Notification
# Notifications still to act on: waiting to be sent, or given up on.
NOTIFICATIONS_WAITING = (NotificationStatus.PENDING, NotificationStatus.FAILED)


@dataclass(frozen=True, slots=True)
class Depth:
    count: int
    oldest: datetime | None  # creation of the oldest one; None when empty

    def age(self, now: datetime) -> float | None:
        return max((now - self.oldest).total_seconds(), 0.0) if self.oldest else None


EMPTY = Depth(0, None)


@dataclass(frozen=True, slots=True)
class QueueState:
    outbound: dict[OutboundStatus, Depth]  # recipients, by status; oldest: their message's
    notifications: dict[tuple[Channel, NotificationStatus], Depth]

    def recipients(self, status: OutboundStatus) -> Depth:
        return self.outbound.get(status, EMPTY)

    def notified(self, channel: Channel, status: NotificationStatus) -> Depth:
        return self.notifications.get((channel, status), EMPTY)


async def queue_state(session: AsyncSession, *, outbound: Collection[OutboundStatus]) -> QueueState:
    """Outbound recipients in the ``outbound`` statuses, and notifications
    pending or failed, each with a count and the oldest creation time."""
    recipients = {
        status: Depth(count, oldest)
        for status, count, oldest in await session.execute(
            select(R.status, func.count(), func.min(OutboundMessage.created_at))
            .join(OutboundMessage, OutboundMessage.id == R.outbound_id)
            .where(R.status.in_(list(outbound)))
            .group_by(R.status)
        )
    }
    notifications = {
        (channel, status): Depth(count, oldest)
        for channel, status, count, oldest in await session.execute(
            select(N.channel, N.status, func.count(), func.min(N.created_at))
            .where(N.status.in_(NOTIFICATIONS_WAITING))
            .group_by(N.channel, N.status)
        )
    }
    return QueueState(recipients, notifications)
