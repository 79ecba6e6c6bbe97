"""Retention: trashed messages and old audit events are purged; the chain still verifies."""

from __future__ import annotations

from sqlalchemy import func, select, update

from mssante import demo
from mssante.app import Gateway
from mssante.store import audit
from mssante.store.check import check_store
from mssante.store.models import AuditAnchor, AuditEvent, Conversation, Delivery, Message, Patient
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
