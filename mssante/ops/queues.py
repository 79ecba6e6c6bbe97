"""Queue gauges, read from the database when Prometheus scrapes (ops/app.py).

The queues live in the database and are shared by every process, so these
are values of the whole service, the same from whichever process is
scraped (store/queues.py: only rows still waiting are counted, never the
history of sent ones).
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from mssante.metrics import Metrics
from mssante.store.models import Channel, NotificationStatus, OutboundStatus
from mssante.store.queues import queue_state

if TYPE_CHECKING:
    from mssante.app import Store

QUEUED = (OutboundStatus.PENDING, OutboundStatus.HELD)


async def refresh(store: Store, metrics: Metrics, now: datetime) -> None:
    """Set the queue gauges to what the database holds now."""
    async with store.reads() as db:
        state = await queue_state(db, outbound=QUEUED)
    for status in QUEUED:
        metrics.outbound_queue.labels(status.value).set(state.recipients(status).count)
    metrics.outbound_oldest.set(state.recipients(OutboundStatus.PENDING).age(now) or 0.0)
    for channel in Channel:
        pending = state.notified(channel, NotificationStatus.PENDING).count
        metrics.notifications_pending.labels(channel.value).set(pending)
