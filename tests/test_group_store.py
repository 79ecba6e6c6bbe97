"""Group commit stores a batch exactly as it would store its messages one by one.

The writer hands every message waiting to one ``store_messages`` call
(inbox.py), which threads them in memory.  These tests replay random
scenarios (several patients, a minor with two representatives,
professionals answering each other, ``[FIN]``, reopening, Reply-To
contacts, an unknown recipient) twice on the same database: once one
message per transaction, once all messages queued together, each run on
its own copy of the patients, and compare what was stored.
"""

from __future__ import annotations

import asyncio
import os
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from mssante.app import Store
from mssante.routing.ins import with_key
from mssante.routing.trust import TrustSpace
from mssante.store import audit
from mssante.store import directory as dirops
from mssante.store.conversations import open_conversation
from mssante.store.inbox import Arrival, IncomingMessage, Recipient, StoredMessage, store_messages
from mssante.store.mime import MessageSummary
from mssante.store.models import (
    Contact,
    Conversation,
    Delivery,
    Message,
    Notification,
    Patient,
    ProfileStatus,
)
from tests.conftest import make_settings

T0 = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
PROFESSIONALS = [
    ("dr.durand@chu-exemple.mssante.fr", "Dr Alice Durand"),
    ("secretariat@chu-exemple.mssante.fr", "Secrétariat"),
    ("labo@bio-exemple.mssante.fr", "Laboratoire"),
]
REPLY_TOS = [None, None, "service.cardio@chu-exemple.mssante.fr", "noreply@example.org"]
TRUST = TrustSpace(patient_domain="patient.mssante.fr")


@dataclass(frozen=True)
class Step:
    n: int
    patients: list[int]  # indexes into the run's patients; 4 = not in the directory
    professional: int
    name_variant: int
    answers: list[int]  # earlier steps this one answers
    fin: bool
    reply_to: str | None


def scenario(seed: int, length: int) -> list[Step]:
    rng = random.Random(seed)
    steps: list[Step] = []
    for n in range(length):
        answers = rng.sample(range(n), k=min(n, rng.choice([0, 0, 1, 2])))
        patients = rng.sample(range(5), k=rng.choice([1, 1, 2, 3]))
        steps.append(
            Step(
                n=n,
                patients=patients,
                professional=rng.randrange(len(PROFESSIONALS)),
                name_variant=rng.choice([0, 0, 1]),
                answers=answers,
                fin=rng.random() < 0.15,
                reply_to=rng.choice(REPLY_TOS),
            )
        )
    return steps


def records(run: str) -> list[dirops.PatientRecord]:
    """Four patients per run: two adults, a minor represented by both, one postal."""
    base = {"a": "2840575", "b": "1790169"}[run]
    ins = [with_key(f"{base}{900 + i:03d}{i:03d}") for i in range(4)]
    return [
        dirops.PatientRecord(ins[0], ProfileStatus.ACTIVATED, activation_email=f"{run}0@ex.org"),
        dirops.PatientRecord(ins[1], ProfileStatus.CREATED, insurer_email=f"{run}1@ex.org"),
        dirops.PatientRecord(ins[2], ProfileStatus.CREATED, representatives=(ins[0], ins[1])),
        dirops.PatientRecord(ins[3], ProfileStatus.CREATED, postal_address="1 rue\n75001 Paris"),
    ]


async def make_patients(store: Store, run: str) -> list[int]:
    async def job(session: Any) -> list[int]:
        ids = []
        for record in records(run):
            patient = await dirops.upsert_patient(session, record, at=T0, actor="test")
            ids.append(patient)
        await session.flush()
        for record, patient in zip(records(run), ids, strict=True):
            await dirops.set_links(session, patient, record, at=T0)
        return [p.id for p in ids]

    ids = await store.writer.run(job)
    return [*ids, 10_000_000 + len(run)]  # the last one is erased / unknown


def arrival(run: str, step: Step, patient_ids: list[int]) -> Arrival:
    address, name = PROFESSIONALS[step.professional]
    summary = MessageSummary(
        from_address=address,
        from_name=f"{name} ({step.name_variant})" if step.name_variant else name,
        to=None,
        cc=None,
        subject="[FIN]" if step.fin else f"Sujet {step.n}",
        date=None,
        message_id=f"<m{step.n}@test>",
        in_reply_to=[f"<m{a}@test>" for a in step.answers[:1]],
        references=[f"<m{a}@test>" for a in step.answers[1:]],
        reply_to=step.reply_to,
        mss_headers={},
        disposition_notification_to=None,
        attachments=[],
        defects=[],
        broken=False,
    )
    incoming = IncomingMessage(
        ref=f"{run}{step.n:05d}",
        received_at=T0 + timedelta(minutes=step.n),
        blob_key=f"{run}{step.n:05d}",
        message_key=os.urandom(32),
        size=1000 + step.n,
        sha256="0" * 64,
        trace_header=b"",
        mail_from=address,
        helo="test",
        peer="127.0.0.1",
        summary=summary,
    )
    return Arrival(
        incoming, [Recipient(f"p{i}@patient.mssante.fr", patient_ids[i]) for i in step.patients]
    )


async def outcome(store: Store, run: str, patient_ids: list[int]) -> dict[str, Any]:
    """What was stored, with ids replaced by their order of appearance."""
    index = {pid: i for i, pid in enumerate(patient_ids)}
    async with store.reads() as session:
        msgs = {
            m.id: m.ref[1:]
            for m in await session.scalars(select(Message).where(Message.ref.like(f"{run}%")))
        }
        deliveries = list(
            await session.scalars(
                select(Delivery)
                .where(Delivery.message_id.in_(msgs))
                .order_by(Delivery.message_id, Delivery.patient_id)
            )
        )
        conv_order: dict[int, int] = {}
        for d in deliveries:
            conv_order.setdefault(d.conversation_id, len(conv_order))
        convs = {
            c.id: c
            for c in await session.scalars(
                select(Conversation).where(Conversation.id.in_(conv_order))
            )
        }
        conversations = []
        for cid, order in sorted(conv_order.items(), key=lambda kv: kv[1]):
            c = convs[cid]
            dek = await store.keyring.data_key(session, c.patient_id)
            conversations.append(
                (
                    order,
                    index[c.patient_id],
                    c.professional,
                    c.last_message_at,
                    c.ended_at,
                    c.ended_by,
                    open_conversation(dek, c),
                )
            )
        notes = [
            (msgs[d.message_id], index[d.patient_id], index[n.recipient_id], n.channel)
            for d in deliveries
            for n in await session.scalars(
                select(Notification)
                .where(Notification.delivery_id == d.id)
                .order_by(Notification.id)
            )
        ]
        contacts = sorted(
            (index[c.patient_id], c.address, conv_order.get(c.conversation_id or -1))
            for c in await session.scalars(
                select(Contact).where(Contact.patient_id.in_(patient_ids))
            )
        )
        trail = [
            (e.kind, index[e.patient_id or -1], msgs[e.message_id or -1])
            for e in await session.scalars(
                select(audit.AuditEvent)
                .where(audit.AuditEvent.message_id.in_(msgs))
                .order_by(audit.AuditEvent.id)
            )
        ]
    return {
        "deliveries": [
            (
                msgs[d.message_id],
                index[d.patient_id],
                conv_order[d.conversation_id],
                d.ends_conversation,
                d.rcpt,
            )
            for d in deliveries
        ],
        "conversations": conversations,
        "notifications": notes,
        "contacts": contacts,
        "audit": trail,
    }


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_batch_stores_as_one_by_one(data_dir: Path, db_url: str, seed: int) -> None:
    store = Store(make_settings(data_dir, database_url=db_url))
    await store.open()
    try:
        steps = scenario(seed, 40)

        async def job(session: Any, arrivals: list[Arrival]) -> list[StoredMessage]:
            return await store_messages(session, arrivals, trust=TRUST, keyring=store.keyring)

        one = await make_patients(store, "a")
        for step in steps:
            await store.writer.run_batched(job, arrival("a", step, one))
        batches_before = store.writer.batches

        together = await make_patients(store, "b")
        results = await asyncio.gather(
            *(store.writer.run_batched(job, arrival("b", step, together)) for step in steps)
        )
        # The whole scenario went through a handful of transactions.
        assert store.writer.batches - batches_before <= 3
        assert len(results) == len(steps)
        for step, stored in zip(steps, results, strict=True):
            assert len(stored.delivery_ids) == len([i for i in step.patients if i != 4])

        first = await outcome(store, "a", one)
        second = await outcome(store, "b", together)
        assert first["deliveries"], "the scenario delivered nothing"
        assert any(c[4] is not None for c in first["conversations"]) or not any(
            s.fin for s in steps
        )
        assert first == second
        async with store.reads() as session:
            assert (await audit.verify_stored_chain(session))[1] == []
            assert await session.scalar(select(Patient.id).where(Patient.id == one[4])) is None
    finally:
        await store.close()


async def test_batch_with_a_failing_item_fails_only_that_item(data_dir: Path, db_url: str) -> None:
    """One bad message in a group: the group is retried one by one (writer.py)."""
    store = Store(make_settings(data_dir, database_url=db_url))
    await store.open()
    try:
        ids = await make_patients(store, "a")
        steps = scenario(7, 6)

        async def job(session: Any, arrivals: list[Arrival]) -> list[StoredMessage]:
            return await store_messages(session, arrivals, trust=TRUST, keyring=store.keyring)

        good = [arrival("a", s, ids) for s in steps]
        # Same public reference as the first message: the UNIQUE constraint fails it.
        dup = Arrival(good[0].incoming, good[0].recipients)
        outcomes = await asyncio.gather(
            *(store.writer.run_batched(job, a) for a in [*good, dup]), return_exceptions=True
        )
        assert [isinstance(o, Exception) for o in outcomes] == [False] * 6 + [True]
        async with store.reads() as session:
            refs = set(await session.scalars(select(Message.ref).where(Message.ref.like("a%"))))
            assert refs == {a.incoming.ref for a in good}
            assert (await audit.verify_stored_chain(session))[1] == []
    finally:
        await store.close()
