"""The webmail's mailbox queries (issue 8): a mailbox built through the real
gateway (professionals' mail over SMTP, the patient's reply and read receipt
through their APIs), then read back as the pages will."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import timedelta
from email.message import EmailMessage
from email.utils import make_msgid
from typing import Any

from sqlalchemy import event, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from mssante import demo
from mssante.app import Gateway
from mssante.outbound.mdn import on_first_display
from mssante.outbound.replies import REFUSALS, RefusalReason, Refused, Sent, reply
from mssante.store import audit
from mssante.store.conversations import seal_conversation
from mssante.store.mailbox import (
    PROFESSIONAL,
    ConversationDetail,
    ConversationPage,
    ProfileChoice,
    conversation,
    history,
    list_conversations,
    may_act_for,
    message_for_download,
    represented,
    restore,
    trash,
    unread_count,
)
from mssante.store.models import (
    AuditEvent,
    Conversation,
    Delivery,
    LinkRole,
    Message,
    MessageOrigin,
    PatientLink,
    ProfileStatus,
)
from tests.conftest import FakeClock
from tests.test_gateway import DOCTOR, addr, patient_id, send
from tests.test_outbound_replies import PDF

KINE = "kine.leroy@cabinet-leroy.mssante.fr"
LABO = "resultats@labo-bio.mssante.fr"
SECRETARIAT = "secretariat@chu-exemple.mssante.fr"
# Distinctive content: none of it may reach the activity history.
SUBJECT = "Zorglub-sujet-7731 IRM lombaire"
BODY = "Quetzal-corps-5519 hernie discale"
REPLY_BODY = "Quetzal-reponse-8842 merci"


def pro_message(
    to: str,
    *,
    sender: str,
    name: str | None,
    subject: str,
    body: str = "Bonjour",
    headers: dict[str, str] | None = None,
    pdf: bytes | None = None,
) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = f"{name} <{sender}>" if name else sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = make_msgid(domain=sender.partition("@")[2])
    for key, value in (headers or {}).items():
        msg[key] = value
    msg.set_content(body)
    if pdf is not None:
        msg.add_attachment(pdf, maintype="application", subtype="pdf", filename="cr.pdf")
    return msg


async def deliver(gw: Gateway, ins: str, *, sender: str, **kwargs: Any) -> EmailMessage:
    msg = pro_message(addr(ins), sender=sender, **kwargs)
    errors, _ = await send(gw, msg, sender=sender)
    assert not errors
    return msg


async def conversation_with(gw: Gateway, pid: int, professional: str) -> int:
    async with gw.store.reads() as s:
        cid = await s.scalar(
            select(Conversation.id).where(
                Conversation.patient_id == pid, Conversation.professional == professional
            )
        )
    assert cid is not None
    return cid


async def deliveries_of(gw: Gateway, pid: int, cid: int) -> list[int]:
    async with gw.store.reads() as s:
        return list(
            await s.scalars(
                select(Delivery.id)
                .where(Delivery.patient_id == pid, Delivery.conversation_id == cid)
                .order_by(Delivery.id)
            )
        )


@dataclass(frozen=True)
class Mailbox:
    pid: int
    doctor: int  # read, answered, with an attachment
    kine: int  # two unread messages, the second "[FIN]"
    labo: int  # one unread message, no display name
    doctor_delivery: int


async def build_mailbox(gw: Gateway, clock: FakeClock) -> Mailbox:
    """Camille Martin's mailbox: three professionals, a read receipt, a reply."""
    ins = demo.ACTIVATED
    pid = await patient_id(gw, ins)
    await deliver(
        gw,
        ins,
        sender=DOCTOR,
        name="Dr Alice Durand",
        subject="Compte rendu",
        body=BODY,
        headers={"Disposition-Notification-To": DOCTOR},
        pdf=PDF,
    )
    clock.advance(hours=1)
    await deliver(gw, ins, sender=KINE, name="Marc Leroy", subject=SUBJECT, body=BODY)
    clock.advance(hours=1)
    await deliver(gw, ins, sender=LABO, name=None, subject="Résultats", body=BODY)
    clock.advance(hours=1)
    await deliver(gw, ins, sender=KINE, name="Marc Leroy", subject="[FIN]")
    clock.advance(hours=1)
    doctor = await conversation_with(gw, pid, DOCTOR)
    (doctor_delivery,) = await deliveries_of(gw, pid, doctor)
    assert await on_first_display(
        gw.store, patient_id=pid, delivery_id=doctor_delivery, at=clock.now()
    )
    clock.advance(minutes=10)
    sent = await reply(
        gw.store,
        patient_id=pid,
        conversation_id=doctor,
        body_text=REPLY_BODY,
        attachments=[],
        at=clock.now(),
    )
    assert isinstance(sent, Sent), sent
    clock.advance(minutes=10)
    return Mailbox(
        pid=pid,
        doctor=doctor,
        kine=await conversation_with(gw, pid, KINE),
        labo=await conversation_with(gw, pid, LABO),
        doctor_delivery=doctor_delivery,
    )


async def listed(
    gw: Gateway, pid: int, *, page: int = 1, per_page: int = 20, trash: bool = False
) -> ConversationPage:
    async with gw.store.reads() as s:
        return await list_conversations(
            s, gw.store.keyring, pid, page=page, per_page=per_page, trash=trash
        )


async def detail(
    gw: Gateway, pid: int, cid: int, *, trash: bool = False, author: int | None = None
) -> ConversationDetail | None:
    async with gw.store.reads() as s:
        return await conversation(
            s, gw.store.keyring, pid, cid, trash=trash, author_patient_id=author
        )


async def events(gw: Gateway, kind: str) -> list[AuditEvent]:
    async with gw.store.reads() as s:
        return list(
            await s.scalars(
                select(AuditEvent).where(AuditEvent.kind == kind).order_by(AuditEvent.id)
            )
        )


async def chain_problems(gw: Gateway) -> list[str]:
    async with gw.store.reads() as s:
        _, problems = await audit.verify_stored_chain(s)
    return problems


# --- the conversation list ------------------------------------------------------------


async def test_list_puts_unread_first_then_latest_and_pages(
    gateway: Gateway, clock: FakeClock
) -> None:
    box = await build_mailbox(gateway, clock)
    first = await listed(gateway, box.pid, per_page=2)
    second = await listed(gateway, box.pid, page=2, per_page=2)
    assert (first.total, first.pages, first.page) == (3, 2, 1)
    assert (second.total, second.pages, second.page) == (3, 2, 2)
    # Unread first (kiné's [FIN] is newer than the lab's message), then the
    # doctor's conversation although its reply is the newest message.
    assert [c.id for c in first.items + second.items] == [box.kine, box.labo, box.doctor]
    kine, labo = first.items
    (doctor,) = second.items
    assert (kine.professional_name, kine.subject) == ("Marc Leroy", SUBJECT)
    assert (kine.messages, kine.unread, kine.has_attachments) == (2, 2, False)
    assert (kine.ended, kine.ended_by_name) == (True, "Marc Leroy")
    # DOMAIN.md 4: no display name, and still no address.
    assert (labo.professional_name, labo.subject) == (PROFESSIONAL, "Résultats")
    assert (labo.messages, labo.unread, labo.ended, labo.ended_by_name) == (1, 1, False, None)
    assert (doctor.professional_name, doctor.subject) == ("Dr Alice Durand", "Compte rendu")
    assert (doctor.messages, doctor.unread, doctor.has_attachments) == (2, 0, True)
    assert doctor.last_message_at == clock.now() - timedelta(minutes=10)  # the reply
    assert "@" not in repr(first) + repr(second)

    beyond = await listed(gateway, box.pid, page=3, per_page=2)
    assert (beyond.items, beyond.total, beyond.pages) == ([], 3, 2)
    async with gateway.store.reads() as s:
        assert await unread_count(s, box.pid) == 3
    # Nothing in the trash yet.
    empty = await listed(gateway, box.pid, trash=True)
    assert (empty.items, empty.total, empty.pages) == ([], 0, 1)


async def test_list_of_a_large_mailbox_costs_a_fixed_number_of_queries(
    gateway: Gateway, clock: FakeClock
) -> None:
    """10,000 messages in 300 conversations: one aggregate, one count, the data key."""
    pid = await patient_id(gateway, demo.CORSICAN)
    base = clock.now()
    n_conv, n_msg = 300, 10_000

    async def job(session: AsyncSession) -> list[int]:
        dek = await gateway.store.keyring.data_key(session, pid, at=base)
        convs = [
            Conversation(
                patient_id=pid,
                professional=f"dr{i}@cabinet.mssante.fr",
                started_at=base,
                last_message_at=base,
                ended_at=None,
                ended_by=None,
                sealed=seal_conversation(dek, pid, f"Dr Numéro {i}", f"Sujet {i}"),
            )
            for i in range(n_conv)
        ]
        session.add_all(convs)
        await session.flush()
        ids = [c.id for c in convs]
        result = await session.execute(
            insert(Message).returning(Message.id, sort_by_parameter_order=True),
            [
                {
                    "ref": f"bulk{j}",
                    "received_at": base + timedelta(seconds=j),
                    "blob_key": f"bulk{j}",
                    "size": 1000,
                    "trace_header": b"",
                    "mail_from": f"dr{j % n_conv}@cabinet.mssante.fr",
                    "attachment_count": 1 if j % 53 == 0 else 0,
                    "broken_mime": False,
                    "sealed": b"",
                    "origin": MessageOrigin.RECEIVED,
                }
                for j in range(n_msg)
            ],
        )
        message_ids = list(result.scalars())
        await session.execute(
            insert(Delivery),
            [
                {
                    "message_id": message_ids[j],
                    "patient_id": pid,
                    "conversation_id": ids[j % n_conv],
                    "rcpt": addr(demo.CORSICAN),
                    "wrapped_key": b"",
                    "ends_conversation": False,
                    "delivered_at": base + timedelta(seconds=j),
                    "read_at": None if j % 37 == 0 else base,
                    "trashed_at": base if j % 101 == 0 else None,
                }
                for j in range(n_msg)
            ],
        )
        return ids

    ids = await gateway.store.writer.run(job)
    # What the list must say, computed here from the same rows.
    stats: dict[int, dict[str, Any]] = {}
    for j in range(n_msg):
        if j % 101 == 0:
            continue
        st = stats.setdefault(ids[j % n_conv], {"n": 0, "unread": 0, "att": False, "last": base})
        st["n"] += 1
        st["unread"] += j % 37 == 0
        st["att"] |= j % 53 == 0
        st["last"] = max(st["last"], base + timedelta(seconds=j))
    expected = sorted(
        stats, key=lambda c: (stats[c]["unread"] == 0, -stats[c]["last"].timestamp(), c)
    )

    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):  # not BEGIN
            statements.append(statement)

    engine = gateway.store.read_engine.sync_engine
    await listed(gateway, pid)  # connections opened, dialect set up
    event.listen(engine, "before_cursor_execute", record)
    try:
        page = await listed(gateway, pid, page=3, per_page=25)
    finally:
        event.remove(engine, "before_cursor_execute", record)
    # The page, the count, the page's attachment marks, the data key: whatever the size.
    assert len(statements) <= 4, statements
    assert (page.total, page.pages) == (len(stats), 12)
    assert [c.id for c in page.items] == expected[50:75]
    for item in page.items:
        st = stats[item.id]
        assert (item.messages, item.unread, item.has_attachments) == (
            st["n"],
            st["unread"],
            st["att"],
        )
        assert item.last_message_at == st["last"]
        assert item.professional_name == f"Dr Numéro {ids.index(item.id)}"
    trashed = await listed(gateway, pid, trash=True, per_page=1000)
    assert sum(c.messages for c in trashed.items) == len(range(0, n_msg, 101))
    async with gateway.store.reads() as s:
        unread = sum(1 for j in range(n_msg) if j % 37 == 0 and j % 101 != 0)
        assert await unread_count(s, pid) == unread


# --- one conversation -----------------------------------------------------------------


async def test_conversation_shows_messages_in_order_with_attachments(
    gateway: Gateway, clock: FakeClock
) -> None:
    box = await build_mailbox(gateway, clock)
    doctor = await detail(gateway, box.pid, box.doctor)
    assert doctor is not None
    assert (doctor.professional_name, doctor.subject, doctor.ended) == (
        "Dr Alice Durand",
        "Compte rendu",
        False,
    )
    assert (doctor.can_reply, doctor.reply_blocked, doctor.reply_blocked_reason) == (
        True,
        None,
        None,
    )
    received, answer = doctor.messages
    assert received.delivery_id == box.doctor_delivery
    assert (received.origin, received.from_name, received.subject, received.read) == (
        MessageOrigin.RECEIVED,
        "Dr Alice Durand",
        "Compte rendu",
        True,
    )
    ((attachment),) = received.attachments
    assert (attachment.name, attachment.type, attachment.size) == (
        "cr.pdf",
        "application/pdf",
        len(PDF),
    )
    assert received.received_at < answer.received_at
    assert (answer.origin, answer.from_name, answer.subject, answer.read) == (
        MessageOrigin.PATIENT,
        "Camille Martin",
        "Re: Compte rendu",
        True,
    )
    assert answer.attachments == []

    # The message and its key, for the download page.
    async with gateway.store.reads() as s:
        found = await message_for_download(s, gateway.store.keyring, box.pid, box.doctor_delivery)
    assert found is not None
    message, key = found
    raw = await asyncio.to_thread(gateway.store.blobs.read, message.blob_key, key)
    assert BODY.encode() in raw and message.ref == received.ref

    labo = await detail(gateway, box.pid, box.labo)
    assert labo is not None
    ((only),) = labo.messages
    assert (labo.professional_name, only.from_name, only.read) == (
        PROFESSIONAL,
        PROFESSIONAL,
        False,
    )
    assert "@" not in repr(labo) + repr(doctor)


async def test_ended_conversation_cannot_be_answered_with_replies_own_text(
    gateway: Gateway, clock: FakeClock
) -> None:
    box = await build_mailbox(gateway, clock)
    kine = await detail(gateway, box.pid, box.kine)
    assert kine is not None
    assert (kine.ended, kine.ended_by_name, kine.can_reply) == (True, "Marc Leroy", False)
    assert kine.reply_blocked is RefusalReason.ENDED
    assert kine.reply_blocked_reason == "Marc Leroy a mis fin à vos échanges."
    assert [m.ends_conversation for m in kine.messages] == [False, True]
    refused = await reply(
        gateway.store,
        patient_id=box.pid,
        conversation_id=box.kine,
        body_text="Bonjour",
        attachments=[],
        at=clock.now(),
    )
    assert isinstance(refused, Refused)
    assert (refused.reason_code, refused.french_text) == (
        kine.reply_blocked,
        kine.reply_blocked_reason,
    )


async def test_ended_by_someone_else_names_who_ended_it(gateway: Gateway, clock: FakeClock) -> None:
    """A [FIN] from the secretariat, threaded into the doctor's conversation."""
    pid = await patient_id(gateway, demo.CORSICAN)
    first = await deliver(
        gateway, demo.CORSICAN, sender=DOCTOR, name="Dr Alice Durand", subject="Bilan"
    )
    clock.advance(hours=1)
    await deliver(
        gateway,
        demo.CORSICAN,
        sender=SECRETARIAT,
        name="Secrétariat du Dr Durand",
        subject="[FIN]",
        headers={"In-Reply-To": first["Message-ID"]},
    )
    cid = await conversation_with(gateway, pid, DOCTOR)
    (summary,) = (await listed(gateway, pid)).items
    assert (summary.id, summary.ended, summary.ended_by_name) == (
        cid,
        True,
        "Secrétariat du Dr Durand",
    )
    found = await detail(gateway, pid, cid)
    assert found is not None and found.ended_by_name == "Secrétariat du Dr Durand"
    # The refusal text is the one the reply API gives.
    refused = await reply(
        gateway.store,
        patient_id=pid,
        conversation_id=cid,
        body_text="Bonjour",
        attachments=[],
        at=clock.now(),
    )
    assert isinstance(refused, Refused)
    assert (found.reply_blocked, found.reply_blocked_reason) == (
        refused.reason_code,
        refused.french_text,
    )


async def test_reply_rights_follow_the_author_as_replies_does(
    gateway: Gateway, clock: FakeClock
) -> None:
    minor = await patient_id(gateway, demo.MINOR)
    parent = await patient_id(gateway, demo.ACTIVATED)
    other_parent = await patient_id(gateway, demo.CREATED_EMAIL)
    stranger = await patient_id(gateway, demo.CORSICAN)
    await deliver(gateway, demo.MINOR, sender=DOCTOR, name="Dr Alice Durand", subject="Vaccin")
    cid = await conversation_with(gateway, minor, DOCTOR)

    async def refusal(author: int | None) -> RefusalReason | None:
        result = await reply(
            gateway.store,
            patient_id=minor,
            conversation_id=cid,
            body_text="Bonjour",
            attachments=[],
            author_patient_id=author,
            at=clock.now(),
        )
        return result.reason_code if isinstance(result, Refused) else None

    # The parent reads and may answer for the minor (checked before the reply
    # is sent, since a sent reply changes nothing here).
    as_parent = await detail(gateway, minor, cid, author=parent)
    assert as_parent is not None and as_parent.can_reply
    # The minor's own profile is not activated; nor is the other parent's.
    for author in (None, other_parent):
        seen = await detail(gateway, minor, cid, author=author)
        assert seen is not None
        assert (seen.can_reply, seen.reply_blocked) == (False, RefusalReason.INACTIVE)
        assert seen.reply_blocked_reason == REFUSALS[RefusalReason.INACTIVE]
        assert await refusal(author) is RefusalReason.INACTIVE
    # Not linked: as if it did not exist.
    assert await detail(gateway, minor, cid, author=stranger) is None
    assert await refusal(stranger) is RefusalReason.NOT_FOUND
    assert await refusal(parent) is None


async def test_professional_who_never_wrote_cannot_be_answered(
    gateway: Gateway, clock: FakeClock
) -> None:
    pid = await patient_id(gateway, demo.ACTIVATED)
    keyring = gateway.store.keyring

    async def job(session: AsyncSession) -> int:
        dek = await keyring.data_key(session, pid, at=clock.now())
        conv = Conversation(
            patient_id=pid,
            professional=DOCTOR,
            started_at=clock.now(),
            last_message_at=clock.now(),
            ended_at=None,
            ended_by=None,
            sealed=seal_conversation(dek, pid, "Dr Alice Durand", "Bonjour"),
        )
        session.add(conv)
        await session.flush()
        return conv.id

    cid = await gateway.store.writer.run(job)
    seen = await detail(gateway, pid, cid)
    assert seen is not None and seen.messages == []
    assert (seen.can_reply, seen.reply_blocked) == (False, RefusalReason.NEVER_WROTE)
    assert seen.reply_blocked_reason == REFUSALS[RefusalReason.NEVER_WROTE]
    # Not listed: nothing in it.
    assert (await listed(gateway, pid)).total == 0


async def test_another_patient_sees_nothing_of_this_mailbox(
    gateway: Gateway, clock: FakeClock
) -> None:
    box = await build_mailbox(gateway, clock)
    other = await patient_id(gateway, demo.CORSICAN)
    await deliver(gateway, demo.CORSICAN, sender=DOCTOR, name="Dr Alice Durand", subject="Bilan")
    mine = await conversation_with(gateway, other, DOCTOR)

    assert [c.id for c in (await listed(gateway, other)).items] == [mine]
    for cid in (box.doctor, box.kine, box.labo):
        assert await detail(gateway, other, cid) is None
        assert await detail(gateway, other, cid, trash=True) is None
    assert await detail(gateway, box.pid, mine) is None
    assert await detail(gateway, box.pid, 999_999) is None  # no such id: the same answer
    async with gateway.store.reads() as s:
        keyring = gateway.store.keyring
        assert await message_for_download(s, keyring, other, box.doctor_delivery) is None
        assert await message_for_download(s, keyring, box.pid, 999_999) is None
    # Trash and restore touch only the caller's own deliveries.
    assert (
        await trash(gateway.store, other, at=clock.now(), delivery_ids=[box.doctor_delivery]) == 0
    )
    assert await trash(gateway.store, other, at=clock.now(), conversation_id=box.doctor) == 0
    assert (await listed(gateway, box.pid)).total == 3
    assert await events(gateway, "mailbox.trashed") == []


# --- trash ----------------------------------------------------------------------------


async def test_trash_hides_restore_brings_back_and_both_are_audited(
    gateway: Gateway, clock: FakeClock
) -> None:
    box = await build_mailbox(gateway, clock)
    store = gateway.store

    # One message of the doctor's conversation.
    assert await trash(store, box.pid, at=clock.now(), delivery_ids=[box.doctor_delivery]) == 1
    doctor = next(c for c in (await listed(gateway, box.pid)).items if c.id == box.doctor)
    assert (doctor.messages, doctor.has_attachments) == (1, False)
    in_trash = await listed(gateway, box.pid, trash=True)
    assert [(c.id, c.messages, c.has_attachments) for c in in_trash.items] == [
        (box.doctor, 1, True)
    ]
    seen = await detail(gateway, box.pid, box.doctor)
    assert seen is not None and [m.origin for m in seen.messages] == [MessageOrigin.PATIENT]
    trashed = await detail(gateway, box.pid, box.doctor, trash=True)
    assert trashed is not None
    assert [m.delivery_id for m in trashed.messages] == [box.doctor_delivery]
    # Still downloadable from the trash.
    async with store.reads() as s:
        found = await message_for_download(s, store.keyring, box.pid, box.doctor_delivery)
    assert found is not None and found[0].ref == trashed.messages[0].ref
    # Already in the trash: nothing changes, nothing is written.
    assert await trash(store, box.pid, at=clock.now(), delivery_ids=[box.doctor_delivery]) == 0

    # A whole conversation: the kiné's two unread messages.
    clock.advance(minutes=1)
    assert await trash(store, box.pid, at=clock.now(), conversation_id=box.kine) == 2
    assert [c.id for c in (await listed(gateway, box.pid)).items] == [box.labo, box.doctor]
    async with store.reads() as s:
        assert await unread_count(s, box.pid) == 1
    in_trash = await listed(gateway, box.pid, trash=True)
    assert [(c.id, c.unread) for c in in_trash.items] == [(box.kine, 2), (box.doctor, 0)]

    clock.advance(minutes=1)
    assert await restore(store, box.pid, at=clock.now(), conversation_id=box.kine) == 2
    assert await restore(store, box.pid, at=clock.now(), delivery_ids=[box.doctor_delivery]) == 1
    assert await restore(store, box.pid, at=clock.now(), conversation_id=box.kine) == 0
    assert (await listed(gateway, box.pid, trash=True)).total == 0
    again = await listed(gateway, box.pid)
    assert [(c.id, c.messages) for c in again.items] == [
        (box.kine, 2),
        (box.labo, 1),
        (box.doctor, 2),
    ]

    kine = await deliveries_of(gateway, box.pid, box.kine)
    actor = f"patient:{box.pid}"
    trashed_events = await events(gateway, "mailbox.trashed")
    assert [(e.patient_id, e.actor, e.details) for e in trashed_events] == [
        (box.pid, actor, {"count": 1, "deliveries": [box.doctor_delivery], "author": box.pid}),
        (
            box.pid,
            actor,
            {"count": 2, "deliveries": kine, "author": box.pid, "conversation": box.kine},
        ),
    ]
    restored = await events(gateway, "mailbox.restored")
    assert [e.details["count"] for e in restored] == [2, 1]
    assert await chain_problems(gateway) == []


# --- activity history -----------------------------------------------------------------


async def test_history_in_plain_french_without_content_or_addresses(
    gateway: Gateway, clock: FakeClock
) -> None:
    box = await build_mailbox(gateway, clock)
    store = gateway.store
    await trash(store, box.pid, at=clock.now(), conversation_id=box.labo)
    clock.advance(minutes=1)
    await restore(store, box.pid, at=clock.now(), conversation_id=box.labo)
    clock.advance(minutes=1)
    minor = await patient_id(gateway, demo.MINOR)

    async def job(session: AsyncSession) -> None:
        for kind, pid, details in (
            ("web.login", box.pid, {"ip": "192.0.2.7"}),
            ("activation.code_issued", box.pid, {"channel": "postal"}),
            ("web.helper_access", minor, {"by": box.pid}),
            ("outbound.held", box.pid, {"outbound": 1}),  # an operator's tool: hidden
            ("something.new", box.pid, {"subject": SUBJECT, "to": DOCTOR}),
        ):
            await audit.append(
                session, at=clock.now(), kind=kind, actor="test", patient_id=pid, details=details
            )

    await store.writer.run(job)

    async with store.reads() as s:
        first = await history(s, store.keyring, box.pid, page=1, per_page=5)
        pages = [first] + [
            await history(s, store.keyring, box.pid, page=n, per_page=5)
            for n in range(2, first.pages + 1)
        ]
        for_minor = await history(s, store.keyring, minor, page=1, per_page=50)
    entries = [e for p in pages for e in p.items]
    assert len(entries) == first.total and first.pages == -(-first.total // 5)
    assert [e.at for e in entries] == sorted((e.at for e in entries), reverse=True)
    texts = {e.kind: e.text for e in entries}
    delivered = [e.text for e in entries if e.kind == "message.delivered"]
    assert sorted(delivered) == sorted(
        [
            "Message reçu de Dr Alice Durand",
            "Message reçu de Marc Leroy",
            "Message reçu de Marc Leroy",
            "Message reçu d'un professionnel de santé",
        ]
    )
    assert texts["message.read"] == "Lecture d'un message de Dr Alice Durand"
    assert texts["mdn.queued"] == "Accusé de lecture envoyé à Dr Alice Durand"
    assert texts["reply.queued"] == "Réponse envoyée à Dr Alice Durand"
    assert texts["mailbox.trashed"] == "1 message mis à la corbeille"
    assert texts["mailbox.restored"] == "1 message restauré depuis la corbeille"
    assert texts["web.login"] == "Connexion"
    assert texts["activation.code_issued"] == "Code provisoire envoyé par courrier"
    assert texts["something.new"] == "Opération sur votre messagerie"
    assert texts["patient.created"] == "Création de votre profil"
    assert "outbound.held" not in texts
    assert [e.text for e in for_minor.items if e.kind == "web.helper_access"] == [
        "Consultation par Camille Martin"
    ]
    everything = repr(pages) + repr(for_minor)
    for secret in (SUBJECT, "Zorglub", BODY, "Quetzal", "Compte rendu", "Résultats", "cr.pdf"):
        assert secret not in everything
    assert "@" not in everything and demo.ACTIVATED not in everything
    assert "192.0.2.7" not in everything


async def test_history_names_a_helper_who_acted(gateway: Gateway, clock: FakeClock) -> None:
    pid = await patient_id(gateway, demo.ACTIVATED)
    helper = await patient_id(gateway, demo.CORSICAN)

    async def link(session: AsyncSession) -> None:
        session.add(
            PatientLink(
                patient_id=pid, adult_id=helper, role=LinkRole.HELPER, created_at=clock.now()
            )
        )

    await gateway.store.writer.run(link)
    await deliver(gateway, demo.ACTIVATED, sender=DOCTOR, name="Dr Alice Durand", subject="Bilan")
    cid = await conversation_with(gateway, pid, DOCTOR)
    clock.advance(minutes=5)
    sent = await reply(
        gateway.store,
        patient_id=pid,
        conversation_id=cid,
        body_text=REPLY_BODY,
        attachments=[],
        author_patient_id=helper,
        at=clock.now(),
    )
    assert isinstance(sent, Sent)
    clock.advance(minutes=5)
    assert (
        await trash(
            gateway.store, pid, at=clock.now(), conversation_id=cid, author_patient_id=helper
        )
        == 2
    )
    (moved,) = await events(gateway, "mailbox.trashed")
    assert moved.actor == f"patient:{helper}"
    async with gateway.store.reads() as s:
        page = await history(s, gateway.store.keyring, pid, page=1, per_page=20)
    # (patient.created is dated by seed_demo's system clock, not the test's.)
    assert [e.text for e in page.items if e.kind != "patient.created"] == [
        "2 messages mis à la corbeille par Ange Santoni",
        "Réponse envoyée à Dr Alice Durand par Ange Santoni",
        "Message reçu de Dr Alice Durand",
    ]


# --- profiles -------------------------------------------------------------------------


async def test_represented_profiles_and_who_may_act_for_whom(
    gateway: Gateway, clock: FakeClock
) -> None:
    parent = await patient_id(gateway, demo.ACTIVATED)
    other_parent = await patient_id(gateway, demo.CREATED_EMAIL)
    minor = await patient_id(gateway, demo.MINOR)
    helped = await patient_id(gateway, demo.CREATED_POSTAL)
    stranger = await patient_id(gateway, demo.CORSICAN)

    async def link(session: AsyncSession) -> None:
        session.add(
            PatientLink(
                patient_id=helped, adult_id=parent, role=LinkRole.HELPER, created_at=clock.now()
            )
        )

    await gateway.store.writer.run(link)
    async with gateway.store.reads() as s:
        assert await represented(s, parent) == [
            ProfileChoice(helped, "Louise Bernard", LinkRole.HELPER, ProfileStatus.CREATED),
            ProfileChoice(minor, "Lucas Martin", LinkRole.REPRESENTATIVE, ProfileStatus.CREATED),
        ]
        assert await represented(s, other_parent) == [
            ProfileChoice(minor, "Lucas Martin", LinkRole.REPRESENTATIVE, ProfileStatus.CREATED)
        ]
        assert await represented(s, stranger) == []
        assert await represented(s, minor) == []

        assert await may_act_for(s, parent, parent) == "self"
        assert await may_act_for(s, parent, minor) is LinkRole.REPRESENTATIVE
        assert await may_act_for(s, other_parent, minor) is LinkRole.REPRESENTATIVE
        assert await may_act_for(s, parent, helped) is LinkRole.HELPER
        assert await may_act_for(s, stranger, minor) is None
        assert await may_act_for(s, minor, parent) is None  # links go one way
        assert await may_act_for(s, other_parent, helped) is None
        assert await may_act_for(s, parent, 999_999) is None
