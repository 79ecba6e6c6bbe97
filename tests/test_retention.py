"""Retention: trashed messages and old audit events are purged; the chain still verifies."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, update

from mssante import demo
from mssante.app import Gateway
from mssante.store import audit
from mssante.store.check import check_store
from mssante.store.models import (
    AuditAnchor,
    AuditEvent,
    Conversation,
    Delivery,
    Message,
    OutboundKind,
    OutboundMessage,
    OutboundRecipient,
    OutboundStatus,
    Patient,
)
from mssante.store.retention import purge
from tests.conftest import FakeClock
from tests.test_encryption import _send
from tests.test_gateway import addr


async def _count(gw: Gateway, model: type) -> int:  # type: ignore[type-arg]
    async with gw.store.reads() as s:
        return int(await s.scalar(select(func.count()).select_from(model)) or 0)


async def test_purge_trash_and_audit(gateway: Gateway, clock: FakeClock) -> None:
    store = gateway.store
    shared = await _send(gateway, [addr(demo.ACTIVATED), addr(demo.CREATED_EMAIL)], "shared")
    alone = await _send(gateway, [addr(demo.ACTIVATED)], "alone")
    kept = await _send(gateway, [addr(demo.ACTIVATED)], "kept")
    async with store.reads() as s:
        activated = await s.scalar(select(Patient.id).where(Patient.ins == demo.ACTIVATED))
    # The activated patient trashes "shared" and "alone", 40 days ago.
    async with store.write_engine.begin() as conn:
        await conn.execute(
            update(Delivery)
            .where(
                Delivery.patient_id == activated,
                Delivery.message_id.in_(select(Message.id).where(Message.ref.in_([shared, alone]))),
            )
            .values(trashed_at=clock.now())
        )
    clock.advance(days=40)
    before_events = await _count(gateway, AuditEvent)
    report = await purge(
        store.writer, store.blobs, now=clock.now(), trash_days=30, audit_days=3650, actor="test"
    )
    assert (report.deliveries, report.messages, report.audit_events) == (2, 1, 0)
    # "shared" stays for its other recipient; "alone" is gone with its blob.
    assert b"Corps shared" in await store.read_original(shared)
    assert b"Corps kept" in await store.read_original(kept)
    async with store.reads() as s:
        refs = set(await s.scalars(select(Message.ref)))
    assert refs == {shared, kept}
    assert (await check_store(store.reads, store.blobs, store.keyring)).problems == []
    assert await _count(gateway, AuditEvent) == before_events + 1

    # Ten years later the whole trail but the new purge event is old enough.
    clock.advance(days=3651)
    await _send(gateway, [addr(demo.CREATED_EMAIL)], "recent")
    report = await purge(
        store.writer, store.blobs, now=clock.now(), trash_days=30, audit_days=3650, actor="test"
    )
    assert report.audit_events == before_events + 1
    assert await _count(gateway, AuditAnchor) == 1
    async with store.reads() as s:
        _, problems = await audit.verify_stored_chain(s)
    assert problems == []
    assert await _count(gateway, Conversation) >= 1


async def test_moved_anchor_is_detected(gateway: Gateway, clock: FakeClock) -> None:
    store = gateway.store
    await _send(gateway, [addr(demo.ACTIVATED)], "a")
    clock.advance(days=4000)
    await purge(
        store.writer, store.blobs, now=clock.now(), trash_days=30, audit_days=3650, actor="test"
    )
    async with store.write_engine.begin() as conn:
        await conn.execute(update(AuditAnchor).values(prev_hash="0" * 64))
    async with store.reads() as s:
        _, problems = await audit.verify_stored_chain(s)
    assert problems


async def test_purge_finished_outbound_mail_only(gateway: Gateway, clock: FakeClock) -> None:
    """Sent or failed outbound messages go after ``outbound_days`` with their
    blobs; pending and held ones stay whatever their age."""
    store = gateway.store

    async def queue(body: bytes) -> tuple[int, str]:
        prepared = await store.outbound.prepare(b"Subject: r\r\n\r\n" + body + b"\r\n")

        async def job(session: Any) -> int:
            return await store.outbound.add(
                session,
                prepared,
                kind=OutboundKind.REPLY,
                mail_from=addr(demo.ACTIVATED),
                recipients=["dr.durand@chu-exemple.mssante.fr", "labo@bio-exemple.mssante.fr"],
                at=clock.now(),
            )

        return await store.writer.run(job), prepared.blob_key

    async def set_status(outbound_id: int, *statuses: OutboundStatus) -> None:
        async with store.write_engine.begin() as conn:
            rows = await conn.execute(
                select(OutboundRecipient.id)
                .where(OutboundRecipient.outbound_id == outbound_id)
                .order_by(OutboundRecipient.id)
            )
            for rid, status in zip(list(rows.scalars()), statuses, strict=True):
                await conn.execute(
                    update(OutboundRecipient)
                    .where(OutboundRecipient.id == rid)
                    .values(status=status)
                )

    done, done_blob = await queue(b"old, sent and failed")
    await set_status(done, OutboundStatus.SENT, OutboundStatus.FAILED)
    waiting, waiting_blob = await queue(b"old, one still pending")
    await set_status(waiting, OutboundStatus.SENT, OutboundStatus.PENDING)
    held, held_blob = await queue(b"old, held")
    await set_status(held, OutboundStatus.HELD, OutboundStatus.FAILED)
    clock.advance(days=8)
    recent, recent_blob = await queue(b"recent, sent")
    await set_status(recent, OutboundStatus.SENT, OutboundStatus.SENT)

    report = await purge(
        store.writer,
        store.blobs,
        now=clock.now(),
        trash_days=30,
        audit_days=3650,
        outbound_days=7,
        actor="test",
    )
    assert report.outbound == 1
    async with store.reads() as s:
        left = set(await s.scalars(select(OutboundMessage.id)))
        orphan_recipients = await s.scalar(
            select(func.count())
            .select_from(OutboundRecipient)
            .where(OutboundRecipient.outbound_id == done)
        )
    assert left == {waiting, held, recent} and orphan_recipients == 0
    assert not store.blobs.path_of(done_blob).exists()
    for key in (waiting_blob, held_blob, recent_blob):
        assert store.blobs.path_of(key).exists()
    assert (await check_store(store.reads, store.blobs, store.keyring)).problems == []


async def test_purge_ended_webmail_sessions_and_spent_throttles(
    gateway: Gateway, clock: FakeClock
) -> None:
    """Ended sessions (idle or past their end) go, live ones stay; spent throttle rows go."""
    from datetime import timedelta

    from mssante.store.models import LoginThrottle, WebSession
    from mssante.store.retention import purge_sessions

    now = clock.now()
    rows = {
        "live": (now - timedelta(seconds=60), now + timedelta(hours=1)),
        "idle": (now - timedelta(seconds=901), now + timedelta(hours=1)),
        "over": (now - timedelta(seconds=10), now - timedelta(seconds=1)),
    }

    async def seed(session: Any) -> None:
        for name, (seen, expires) in rows.items():
            session.add(
                WebSession(
                    id=name,
                    patient_id=None,
                    acting_for=None,
                    csrf="x",
                    state={},
                    created_at=now - timedelta(hours=2),
                    last_seen_at=seen,
                    expires_at=expires,
                )
            )
        session.add(LoginThrottle(key="spent", failures=3, window_start=now - timedelta(hours=1)))
        session.add(
            LoginThrottle(
                key="locked",
                failures=5,
                window_start=now - timedelta(hours=1),
                locked_until=now + timedelta(minutes=5),
            )
        )
        session.add(LoginThrottle(key="recent", failures=1, window_start=now))

    await gateway.store.writer.run(seed)
    deleted = await purge_sessions(
        gateway.store.writer, now=now, idle_seconds=900, lockout_seconds=900
    )
    assert deleted == 2
    async with gateway.store.reads() as s:
        assert set(await s.scalars(select(WebSession.id))) == {"live"}
        assert set(await s.scalars(select(LoginThrottle.key))) == {"locked", "recent"}
