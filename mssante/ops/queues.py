"""Queue gauges, read from the database when Prometheus scrapes (ops/app.py).

The queues live in the database and are shared by every process, so these
are values of the whole service, the same from whichever process is
scraped.  Three small queries on indexed columns
(``ix_outbound_recipients_status_next``, ``ix_notifications_status_created``):
only rows still waiting are counted, never the history of sent ones.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import func, select

from mssante.metrics import Metrics
from mssante.store.models import (
    Channel,
    Notification,
    NotificationStatus,
    OutboundMessage,
    OutboundRecipient,
    OutboundStatus,
)

if TYPE_CHECKING:
    from mssante.app import Store

R = OutboundRecipient
N = Notification
QUEUED = (OutboundStatus.PENDING, OutboundStatus.HELD)


async def refresh(store: Store, metrics: Metrics, now: datetime) -> None:
    """Set the queue gauges to what the database holds now."""
    async with store.reads() as db:
        depth: dict[OutboundStatus, int] = {
            status: count
            for status, count in await db.execute(
                select(R.status, func.count()).where(R.status.in_(QUEUED)).group_by(R.status)
            )
        }
        oldest = await db.scalar(
            select(func.min(OutboundMessage.created_at))
            .join(R, R.outbound_id == OutboundMessage.id)
            .where(R.status == OutboundStatus.PENDING)
        )
        waiting: dict[Channel, int] = {
            channel: count
            for channel, count in await db.execute(
                select(N.channel, func.count())
                .where(N.status == NotificationStatus.PENDING)
                .group_by(N.channel)
            )
        }
    for status in QUEUED:
        metrics.outbound_queue.labels(status.value).set(depth.get(status, 0))
    metrics.outbound_oldest.set(max(0.0, (now - oldest).total_seconds()) if oldest else 0.0)
    for channel in Channel:
        metrics.notifications_pending.labels(channel.value).set(waiting.get(channel, 0))
