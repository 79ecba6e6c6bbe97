"""The audit trail: append-only events, hash-chained, never message content.

Each event's ``hash`` is SHA-256 over its canonical JSON form, which
includes the previous event's hash, so an edited, inserted or deleted event
breaks the chain from that point on (``verify_chain``).  Appends happen
inside the caller's transaction (STYLE.md 7) and are serialised: within a
process by the store's single writer, across processes by SQLite's write
lock (``BEGIN IMMEDIATE``) or PostgreSQL's advisory lock taken at the start
of every writer transaction (db.py), so two events never claim the same
predecessor.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from mssante.store.models import AuditAnchor, AuditEvent

GENESIS = "0" * 64
_HEAD = "mssante.audit.head"


def event_hash(
    *,
    prev_hash: str,
    occurred_at: datetime,
    kind: str,
    patient_id: int | None,
    message_id: int | None,
    actor: str,
    details: dict[str, Any],
) -> str:
    canonical = json.dumps(
        {
            "prev": prev_hash,
            "at": occurred_at.isoformat(),
            "kind": kind,
            "patient": patient_id,
            "message": message_id,
            "actor": actor,
            "details": details,
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


async def _head(session: AsyncSession) -> str:
    # The chain head is read once per transaction and then carried in the
    # session (the writer serialises transactions, so nobody else appends
    # meanwhile; a rolled-back session is thrown away with its cache).
    prev_hash: str | None = session.info.get(_HEAD)
    if prev_hash is None:
        prev = await session.scalar(select(AuditEvent.hash).order_by(AuditEvent.id.desc()).limit(1))
        if prev is None:
            # Empty trail: the start, or everything purged (retention.py).
            anchor = await session.get(AuditAnchor, 1)
            prev = anchor.prev_hash if anchor is not None else None
        prev_hash = prev or GENESIS
    return prev_hash


def _chained(prev_hash: str, event: dict[str, Any]) -> dict[str, Any]:
    return event | {"prev_hash": prev_hash, "hash": event_hash(prev_hash=prev_hash, **event)}


async def append(
    session: AsyncSession,
    *,
    at: datetime,
    kind: str,
    actor: str,
    patient_id: int | None = None,
    message_id: int | None = None,
    details: dict[str, Any] | None = None,
) -> AuditEvent:
    row = _chained(
        await _head(session),
        {
            "occurred_at": at,
            "kind": kind,
            "patient_id": patient_id,
            "message_id": message_id,
            "actor": actor,
            "details": details or {},
        },
    )
    event = AuditEvent(**row)
    session.add(event)
    session.info[_HEAD] = event.hash
    # Rows of one class are inserted in the order they were added, so ids
    # follow the chain without a flush here.
    return event


async def append_many(session: AsyncSession, events: list[dict[str, Any]]) -> None:
    """Append events given as column values (occurred_at, kind, patient_id,
    message_id, actor, details), in order, with one INSERT.

    Events the ORM holds for this session are flushed first so that ids
    keep following the chain.
    """
    if not events:
        return
    await session.flush()
    prev_hash = await _head(session)
    rows = []
    for event in events:
        row = _chained(prev_hash, event)
        rows.append(row)
        prev_hash = row["hash"]
    conn = await session.connection()
    await conn.execute(insert(AuditEvent), rows)
    session.info[_HEAD] = prev_hash


def verify_chain(events: Iterable[AuditEvent], *, start: str = GENESIS) -> list[str]:
    """Problems found walking the events in id order; empty when intact."""
    problems: list[str] = []
    prev_hash = start
    for event in events:
        if event.prev_hash != prev_hash:
            problems.append(f"event {event.id}: chain broken (previous hash does not match)")
        expected = event_hash(
            prev_hash=event.prev_hash,
            occurred_at=event.occurred_at,
            kind=event.kind,
            patient_id=event.patient_id,
            message_id=event.message_id,
            actor=event.actor,
            details=event.details,
        )
        if event.hash != expected:
            problems.append(f"event {event.id}: content does not match its hash")
        prev_hash = event.hash
    return problems


async def verify_stored_chain(
    session: AsyncSession, *, expect_head: str | None = None
) -> tuple[int, list[str]]:
    """Walk the stored trail; return (events, problems).

    The chain alone cannot show that its newest events were cut off: keep
    the head printed by ``mssante audit head`` somewhere else and pass it as
    ``expect_head`` to check that it is still in the trail.
    """
    problems: list[str] = []
    prev_hash = GENESIS
    anchor = await session.get(AuditAnchor, 1)
    if anchor is not None:
        # Old events were purged (retention.py): the chain starts at the anchor,
        # which the newest purge event must name.
        prev_hash = anchor.prev_hash
        named = await session.scalar(
            select(AuditEvent.details)
            .where(AuditEvent.kind == "retention.purged", AuditEvent.id > anchor.through_id)
            .order_by(AuditEvent.id.desc())
            .limit(1)
        )
        if not named or named.get("anchor") != anchor.prev_hash:
            problems.append("anchor does not match the newest purge event")
    count = 0
    found_head = expect_head is None
    events = await session.stream_scalars(select(AuditEvent).order_by(AuditEvent.id))
    async for event in events:
        count += 1
        problems += verify_chain([event], start=prev_hash)
        prev_hash = event.hash
        if event.hash == expect_head:
            found_head = True
    if not found_head:
        problems.append(f"expected head {expect_head} is not in the trail (events removed?)")
    return count, problems


async def head(session: AsyncSession) -> str:
    last = await session.scalar(select(AuditEvent.hash).order_by(AuditEvent.id.desc()).limit(1))
    return last or GENESIS
