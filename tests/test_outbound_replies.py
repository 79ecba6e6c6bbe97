"""Patient replies (issue 7.2): real professional mail through the gateway, then the API.

Queued bytes are read back with ``store.outbound.read`` and parsed with the
email package; the copy and the non-delivery notice are read back through
mssante/store/reading.py, as the webmail will.
"""

from __future__ import annotations

import contextlib
import email
from collections.abc import AsyncIterator
from email.message import EmailMessage
from email.policy import default as default_policy
from email.utils import format_datetime
from pathlib import Path

import aiosmtplib
import pytest
from sqlalchemy import func, select

from mssante import demo
from mssante.app import Gateway
from mssante.cli import seed_demo
from mssante.outbound import attachments
from mssante.outbound.replies import (
    Attachment,
    Origin,
    RefusalReason,
    Refused,
    Sent,
    explain,
    non_delivery_recorder,
    origin,
    record_non_delivery,
    reply,
)
from mssante.outbound.worker import OutboundWorker, build_worker
from mssante.settings import OutboundSettings, ReplySettings, TrustSettings
from mssante.store.check import check_store
from mssante.store.conversations import seal_conversation
from mssante.store.models import (
    AuditEvent,
    Conversation,
    Delivery,
    LinkRole,
    Message,
    OutboundKind,
    OutboundMessage,
    OutboundRecipient,
    PatientLink,
)
from mssante.store.reading import read_original, read_view
from tests.conftest import FakeClock, make_settings
from tests.outbound_fakes import CHU, CHU_DN, FakeOperator, TrustWorld, running_operator
from tests.test_gateway import DOCTOR, addr, patient_id, professional_message, send

PDF = b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\n%%EOF\n"
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(20)
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(20)
EXE = b"MZ\x90\x00\x03\x00\x00\x00\x04\x00\x00\x00\xff\xff\x00\x00" + bytes(40)
OLE2 = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(40)
SECRETARIAT = "secretariat@chu-exemple.mssante.fr"


async def deliver(gw: Gateway, to: str = demo.ACTIVATED, **kwargs: object) -> EmailMessage:
    msg = professional_message([addr(to)], **kwargs)  # type: ignore[arg-type]
    errors, _ = await send(gw, msg)
    assert not errors
    return msg


async def conversation_of(gw: Gateway, ins: str = demo.ACTIVATED) -> int:
    pid = await patient_id(gw, ins)
    async with gw.store.reads() as s:
        ids = list(await s.scalars(select(Conversation.id).where(Conversation.patient_id == pid)))
    assert len(ids) == 1
    return ids[0]


async def send_reply(gw: Gateway, clock: FakeClock, ins: str = demo.ACTIVATED, **kwargs: object):  # type: ignore[no-untyped-def]
    kwargs.setdefault("body_text", "Merci docteur, je viendrai mardi.")
    kwargs.setdefault("attachments", [])
    return await reply(
        gw.store,
        patient_id=await patient_id(gw, ins),
        conversation_id=kwargs.pop("conversation_id", None) or await conversation_of(gw, ins),
        at=clock.now(),
        **kwargs,  # type: ignore[arg-type]
    )


async def queued(gw: Gateway) -> list[tuple[OutboundMessage, list[str], EmailMessage]]:
    async with gw.store.reads() as s:
        messages = list(await s.scalars(select(OutboundMessage).order_by(OutboundMessage.id)))
        out = []
        for m in messages:
            rcpts = list(
                await s.scalars(
                    select(OutboundRecipient.address).where(OutboundRecipient.outbound_id == m.id)
                )
            )
            raw = await gw.store.outbound.read(m)
            parsed = email.message_from_bytes(raw, policy=default_policy)
            assert isinstance(parsed, EmailMessage)
            assert b"\n" not in raw.replace(b"\r\n", b"")  # CRLF only
            out.append((m, rcpts, parsed))
    return out


async def audit_events(gw: Gateway, kind: str) -> list[AuditEvent]:
    async with gw.store.reads() as s:
        return list(
            await s.scalars(
                select(AuditEvent).where(AuditEvent.kind == kind).order_by(AuditEvent.id)
            )
        )


async def count(gw: Gateway, model: type) -> int:
    async with gw.store.reads() as s:
        return int(await s.scalar(select(func.count()).select_from(model)) or 0)


# --- an allowed reply -------------------------------------------------------------------


async def test_reply_is_queued_threaded_and_kept_in_the_conversation(
    gateway: Gateway, clock: FakeClock
) -> None:
    original = await deliver(
        gateway,
        subject="Compte rendu de consultation",
        headers={"References": "<a1@chu-exemple.mssante.fr> <a2@chu-exemple.mssante.fr>"},
    )
    clock.advance(hours=2)
    result = await send_reply(gateway, clock)
    assert isinstance(result, Sent), result

    ((outbound, rcpts, msg),) = await queued(gateway)
    pid = await patient_id(gateway, demo.ACTIVATED)
    conv = await conversation_of(gateway)
    me = addr(demo.ACTIVATED)
    assert outbound.id == result.outbound_id
    assert outbound.kind is OutboundKind.REPLY
    assert (outbound.mail_from, rcpts) == (me, [DOCTOR])
    assert (outbound.patient_id, outbound.conversation_id) == (pid, conv)
    assert outbound.message_id == result.message_id == msg["Message-ID"]
    assert msg["Message-ID"].endswith("@patient.mssante.fr>")
    assert msg["From"].addresses[0].addr_spec == me
    assert msg["From"].addresses[0].display_name == "Camille Martin"
    assert msg["To"].addresses[0].addr_spec == DOCTOR
    assert msg["Subject"] == "Re: Compte rendu de consultation"
    assert msg["Date"] == format_datetime(clock.now())
    # RFC 5322 3.6.4: the parent's References, then its Message-ID.
    assert msg["In-Reply-To"] == original["Message-ID"]
    assert msg["References"].split() == [
        "<a1@chu-exemple.mssante.fr>",
        "<a2@chu-exemple.mssante.fr>",
        original["Message-ID"],
    ]
    assert msg.get_content().strip() == "Merci docteur, je viendrai mardi."
    assert not [k for k in msg if k.lower().startswith("x-mss")]

    # The copy in the patient's conversation, encrypted, read, by the patient.
    async with gateway.store.reads() as s:
        copy = await s.scalar(select(Message).where(Message.ref == result.ref))
        assert copy is not None
        delivery = await s.scalar(select(Delivery).where(Delivery.message_id == copy.id))
        conv_row = await s.get(Conversation, conv)
    assert delivery is not None and conv_row is not None
    assert origin(copy) is Origin.PATIENT
    assert (delivery.patient_id, delivery.conversation_id) == (pid, conv)
    assert delivery.read_at == clock.now()
    assert conv_row.last_message_at == clock.now()
    assert copy.message_id == result.message_id
    assert b"je viendrai" not in copy.sealed
    seen = await read_view(gateway.store.reads, gateway.store.keyring, result.ref, pid)
    assert (seen.subject, seen.from_name) == ("Re: Compte rendu de consultation", "Camille Martin")
    body = await read_original(
        gateway.store.reads, gateway.store.blobs, gateway.store.keyring, result.ref
    )
    assert body == await gateway.store.outbound.read(outbound)

    (event,) = await audit_events(gateway, "reply.queued")
    assert (event.patient_id, event.message_id) == (pid, copy.id)
    assert event.details["outbound"] == outbound.id
    assert "viendrai" not in str(event.details) and "Compte" not in str(event.details)


async def test_reply_answers_the_professionals_latest_message(
    gateway: Gateway, clock: FakeClock
) -> None:
    first = await deliver(gateway, subject="Resultats")
    clock.advance(minutes=5)
    # No References, a single In-Reply-To: RFC 5322 3.6.4 builds on it.
    second = await deliver(
        gateway,
        subject="XDM/1.0/DDM+Bilan sanguin MARTIN Camille 20261120",
        headers={"In-Reply-To": first["Message-ID"]},
    )
    result = await send_reply(gateway, clock)
    assert isinstance(result, Sent)
    ((_, _, msg),) = await queued(gateway)
    assert msg["In-Reply-To"] == second["Message-ID"]
    assert msg["References"].split() == [first["Message-ID"], second["Message-ID"]]
    # DOMAIN.md 5: the document-mail prefix is not carried into the reply.
    assert msg["Subject"] == "Re: Bilan sanguin MARTIN Camille 20261120"


async def test_reply_to_a_reply_keeps_a_single_re(gateway: Gateway, clock: FakeClock) -> None:
    await deliver(gateway, subject="RE: Rendez-vous")
    assert isinstance(await send_reply(gateway, clock), Sent)
    ((_, _, msg),) = await queued(gateway)
    assert msg["Subject"] == "RE: Rendez-vous"


def blob_files(gw: Gateway) -> int:
    return len([p for p in gw.store.blobs.blob_dir.glob("*/*/*") if p.is_file()])


def interleave(gw: Gateway, arrival: EmailMessage) -> None:
    """Deliver ``arrival`` while the reply's bytes are being written (between the
    checks on a read session and the writer transaction)."""
    prepare = gw.store.outbound.prepare
    pending = [arrival]

    async def prepare_then_deliver(message: bytes):  # type: ignore[no-untyped-def]
        prepared = await prepare(message)
        if pending:
            errors, _ = await send(gw, pending.pop())
            assert not errors
        return prepared

    gw.store.outbound.prepare = prepare_then_deliver  # type: ignore[method-assign]


async def test_fin_arriving_while_the_reply_is_written_wins(
    gateway: Gateway, clock: FakeClock
) -> None:
    await deliver(gateway)
    fin = professional_message([addr(demo.ACTIVATED)], subject="[FIN]")
    interleave(gateway, fin)
    result = await send_reply(gateway, clock)
    assert isinstance(result, Refused) and result.reason_code is RefusalReason.ENDED
    assert await count(gateway, OutboundMessage) == 0
    assert blob_files(gateway) == await count(gateway, Message) == 2  # no blob left behind


async def test_message_arriving_while_the_reply_is_written_is_the_one_answered(
    gateway: Gateway, clock: FakeClock
) -> None:
    await deliver(gateway, subject="Resultats")
    newer = professional_message([addr(demo.ACTIVATED)], subject="Resultats complets")
    interleave(gateway, newer)
    result = await send_reply(gateway, clock)
    assert isinstance(result, Sent)
    ((_, _, msg),) = await queued(gateway)
    assert msg["In-Reply-To"] == newer["Message-ID"]
    assert msg["Subject"] == "Re: Resultats complets"
    # Two received, the reply's copy, the queued reply: the first try's blobs were dropped.
    assert blob_files(gateway) == 4


async def test_a_message_without_from_is_answered_to_its_envelope_sender(
    gateway: Gateway, clock: FakeClock
) -> None:
    raw = (
        b"To: x\r\nSubject: Sans From\r\n"
        b"Message-ID: <nofrom@chu-exemple.mssante.fr>\r\n\r\nBonjour\r\n"
    )
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=gateway.smtp.port, start_tls=False) as c:
        await c.sendmail(DOCTOR, [addr(demo.ACTIVATED)], raw)
    assert isinstance(await send_reply(gateway, clock), Sent)
    ((_, rcpts, msg),) = await queued(gateway)
    assert rcpts == [DOCTOR]
    assert msg["In-Reply-To"] == "<nofrom@chu-exemple.mssante.fr>"


# --- refusals ---------------------------------------------------------------------------


async def test_no_reply_after_fin_until_the_professional_writes_again(
    gateway: Gateway, clock: FakeClock
) -> None:
    await deliver(gateway, subject="Suivi")
    await deliver(gateway, subject="Fin du suivi", headers={"X-MSS-MES": "FIN"})
    result = await send_reply(gateway, clock)
    assert result == Refused(RefusalReason.ENDED, "Dr Alice Durand a mis fin à vos échanges.")
    assert await count(gateway, OutboundMessage) == 0
    assert await count(gateway, Message) == 2  # no copy either
    assert await audit_events(gateway, "reply.queued") == []

    await deliver(gateway, subject="Reprise du suivi")  # DOMAIN.md 4: reopens
    assert isinstance(await send_reply(gateway, clock), Sent)


async def test_someone_elses_or_unknown_conversation_is_not_found(
    gateway: Gateway, clock: FakeClock
) -> None:
    await deliver(gateway)
    theirs = await conversation_of(gateway)
    other = await send_reply(gateway, clock, ins=demo.CORSICAN, conversation_id=theirs)
    missing = await send_reply(gateway, clock, conversation_id=theirs + 1000)
    assert isinstance(other, Refused) and other.reason_code is RefusalReason.NOT_FOUND
    assert other == missing  # the same answer: ids cannot be probed
    assert await count(gateway, OutboundMessage) == 0


async def test_professional_who_never_wrote_cannot_be_answered(
    gateway: Gateway, clock: FakeClock
) -> None:
    """A conversation left without any message of its professional (its messages purged)."""
    pid = await patient_id(gateway, demo.ACTIVATED)
    keyring = gateway.store.keyring

    async def job(session):  # type: ignore[no-untyped-def]
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

    conv_id = await gateway.store.writer.run(job)
    result = await send_reply(gateway, clock, conversation_id=conv_id)
    assert isinstance(result, Refused) and result.reason_code is RefusalReason.NEVER_WROTE


async def test_reply_to_goes_to_the_authorised_contact(gateway: Gateway, clock: FakeClock) -> None:
    await deliver(gateway, headers={"Reply-To": f"Secretariat <{SECRETARIAT}>"})
    assert isinstance(await send_reply(gateway, clock), Sent)
    assert isinstance(await send_reply(gateway, clock, to=DOCTOR.upper()), Sent)
    refused = await send_reply(gateway, clock, to="dr.x@autre-hopital.mssante.fr")
    assert isinstance(refused, Refused) and refused.reason_code is RefusalReason.RECIPIENT
    to_patient = await send_reply(gateway, clock, to=addr(demo.CORSICAN))
    assert isinstance(to_patient, Refused) and to_patient.reason_code is RefusalReason.RECIPIENT
    got = [(rcpts, msg["To"].addresses[0].addr_spec) for _, rcpts, msg in await queued(gateway)]
    assert got == [([SECRETARIAT], SECRETARIAT), ([DOCTOR], DOCTOR)]


async def test_reply_to_outside_mssante_is_not_a_contact(
    gateway: Gateway, clock: FakeClock
) -> None:
    await deliver(gateway, headers={"Reply-To": "docteur@gmail.com"})
    refused = await send_reply(gateway, clock, to="docteur@gmail.com")
    assert isinstance(refused, Refused) and refused.reason_code is RefusalReason.RECIPIENT
    assert isinstance(await send_reply(gateway, clock), Sent)
    ((_, rcpts, _),) = await queued(gateway)
    assert rcpts == [DOCTOR]


async def test_empty_reply_is_refused(gateway: Gateway, clock: FakeClock) -> None:
    await deliver(gateway)
    result = await send_reply(gateway, clock, body_text=" \n\t ")
    assert result == Refused(RefusalReason.EMPTY, "Votre message est vide.")
    only_file = await send_reply(
        gateway, clock, body_text="", attachments=[Attachment("cr.pdf", "application/pdf", PDF)]
    )
    assert isinstance(only_file, Sent)


async def test_attachments_are_checked_by_name_and_content(
    gateway: Gateway, clock: FakeClock
) -> None:
    await deliver(gateway)
    fake_pdf = Attachment("ordonnance.pdf", "application/pdf", EXE)
    refused = await send_reply(gateway, clock, attachments=[fake_pdf])
    assert isinstance(refused, Refused)
    assert refused.reason_code is RefusalReason.ATTACHMENT_TYPE
    assert "ordonnance.pdf" in refused.french_text
    assert await count(gateway, OutboundMessage) == 0

    files = [
        Attachment("Photo.PNG", "application/octet-stream", PNG),  # browser's type ignored
        Attachment("analyse.pdf", "application/pdf", PDF),
        Attachment("note.txt", "text/plain", "Tension: 12/8, à jeun".encode()),
    ]
    assert isinstance(await send_reply(gateway, clock, attachments=files), Sent)
    ((_, _, msg),) = await queued(gateway)
    parts = [
        (p.get_filename(), p.get_content_type(), p.get_content()) for p in msg.iter_attachments()
    ]
    assert parts == [
        ("Photo.PNG", "image/png", PNG),
        ("analyse.pdf", "application/pdf", PDF),
        ("note.txt", "text/plain", "Tension: 12/8, à jeun"),
    ]


async def test_size_quota_and_attachment_count(gateway: Gateway, clock: FakeClock) -> None:
    await deliver(gateway)
    store = gateway.store
    store.settings = store.settings.model_copy(
        update={"replies": ReplySettings(max_size=1000, max_attachments=2)}
    )
    text = "x" * 400
    at_limit = [Attachment("a.txt", "text/plain", b"y" * 600)]
    over = [Attachment("a.txt", "text/plain", b"y" * 601)]
    result = await send_reply(gateway, clock, body_text=text, attachments=over)
    assert result == Refused(
        RefusalReason.TOO_LARGE,
        "Votre message dépasse la taille autorisée (0.001 Mo, pièces jointes comprises).",
    )
    three = [Attachment(f"{i}.pdf", "application/pdf", PDF) for i in range(3)]
    many = await send_reply(gateway, clock, attachments=three)
    assert isinstance(many, Refused) and many.reason_code is RefusalReason.TOO_MANY
    assert await count(gateway, OutboundMessage) == 0
    assert isinstance(await send_reply(gateway, clock, body_text=text, attachments=at_limit), Sent)


# --- helpers and representatives --------------------------------------------------------


async def link(gw: Gateway, minor: str, adult: str, role: LinkRole, clock: FakeClock) -> None:
    pid, aid = await patient_id(gw, minor), await patient_id(gw, adult)

    async def job(session):  # type: ignore[no-untyped-def]
        session.add(PatientLink(patient_id=pid, adult_id=aid, role=role, created_at=clock.now()))

    await gw.store.writer.run(job)


async def test_a_helpers_reply_is_signed_as_such(gateway: Gateway, clock: FakeClock) -> None:
    await deliver(gateway)
    await link(gateway, demo.ACTIVATED, demo.CORSICAN, LinkRole.HELPER, clock)
    helper = await patient_id(gateway, demo.CORSICAN)
    result = await send_reply(gateway, clock, author_patient_id=helper)
    assert isinstance(result, Sent)
    ((_, _, msg),) = await queued(gateway)
    assert msg["From"].addresses[0].addr_spec == addr(demo.ACTIVATED)
    assert (
        msg.get_content()
        .rstrip()
        .endswith("Ce message a été rédigé par Ange Santoni, l'aidant de Camille Martin.")
    )
    (event,) = await audit_events(gateway, "reply.queued")
    assert (event.actor, event.details["author"]) == (f"patient:{helper}", helper)


async def test_a_parent_answers_for_a_minor(gateway: Gateway, clock: FakeClock) -> None:
    await deliver(gateway, to=demo.MINOR)
    parent = await patient_id(gateway, demo.ACTIVATED)
    result = await send_reply(gateway, clock, ins=demo.MINOR, author_patient_id=parent)
    assert isinstance(result, Sent)
    ((outbound, _, msg),) = await queued(gateway)
    assert outbound.patient_id == await patient_id(gateway, demo.MINOR)
    assert msg["From"].addresses[0].addr_spec == addr(demo.MINOR)
    assert "rédigé par Camille Martin, représentant légal de Lucas Martin." in msg.get_content()

    # Not linked to the minor: as if the conversation did not exist.
    stranger = await send_reply(
        gateway, clock, ins=demo.MINOR, author_patient_id=await patient_id(gateway, demo.CORSICAN)
    )
    assert isinstance(stranger, Refused) and stranger.reason_code is RefusalReason.NOT_FOUND
    # The other representative never activated a profile: cannot write.
    inactive = await send_reply(
        gateway,
        clock,
        ins=demo.MINOR,
        author_patient_id=await patient_id(gateway, demo.CREATED_EMAIL),
    )
    assert isinstance(inactive, Refused) and inactive.reason_code is RefusalReason.INACTIVE


# --- non-delivery -----------------------------------------------------------------------


async def fail(
    gw: Gateway, clock: FakeClock, reason: str
) -> tuple[OutboundMessage, OutboundRecipient]:
    async with gw.store.reads() as s:
        message = await s.scalar(select(OutboundMessage))
        assert message is not None
        recipient = await s.scalar(
            select(OutboundRecipient).where(OutboundRecipient.outbound_id == message.id)
        )
    assert recipient is not None
    on_failure = non_delivery_recorder(gw.store)
    await gw.store.writer.run(lambda s: on_failure(s, message, recipient, reason, clock.now()))
    return message, recipient


async def test_undelivered_reply_shows_a_notice_in_the_conversation(
    gateway: Gateway, clock: FakeClock
) -> None:
    await deliver(gateway)
    sent = await send_reply(gateway, clock)
    assert isinstance(sent, Sent)
    clock.advance(hours=1)
    remote = "550 5.1.1 <dr.durand@chu-exemple.mssante.fr>: Recipient address rejected"
    await fail(gateway, clock, remote)

    pid = await patient_id(gateway, demo.ACTIVATED)
    conv = await conversation_of(gateway)
    (event,) = await audit_events(gateway, "reply.undelivered")
    assert event.patient_id == pid
    assert event.details["cause"] == "unknown_address"
    ref = event.details["notice"]
    async with gateway.store.reads() as s:
        notice = await s.scalar(select(Message).where(Message.ref == ref))
        assert notice is not None
        delivery = await s.scalar(select(Delivery).where(Delivery.message_id == notice.id))
    assert delivery is not None
    assert (delivery.patient_id, delivery.conversation_id, delivery.read_at) == (pid, conv, None)
    assert origin(notice) is Origin.NOTICE and event.message_id == notice.id
    seen = await read_view(gateway.store.reads, gateway.store.keyring, ref, pid)
    assert (seen.subject, seen.from_name) == ("Message non distribué", "Messagerie de santé")
    raw = await read_original(gateway.store.reads, gateway.store.blobs, gateway.store.keyring, ref)
    text = email.message_from_bytes(raw, policy=default_policy).get_content()  # type: ignore[attr-defined]
    assert "Votre message à Dr Alice Durand, envoyé le 23/11/2026 à 10:00" in text
    assert "l'adresse de ce professionnel n'existe pas ou plus" in text
    assert "5.1.1" not in text and "rejected" not in text and DOCTOR not in text
    assert b"Dr Alice" not in notice.sealed

    # The worker recording the same failure again adds no second notice.
    await fail(gateway, clock, remote)
    async with gateway.store.reads() as s:
        notices = await s.scalar(
            select(func.count()).select_from(Message).where(Message.mail_from == "")
        )
    assert notices == 1

    # The copy and the notice pass the consistency checker like received mail
    # (the queued message's blob is the outbound queue's, not a message's).
    report = await check_store(gateway.store.reads, gateway.store.blobs, gateway.store.keyring)
    queue_blobs = [m.blob_key for m, _, _ in await queued(gateway)]
    assert report.messages == 3
    assert [p for p in report.problems if not any(b in p for b in queue_blobs)] == []


async def test_undelivered_mdn_is_only_audited(gateway: Gateway, clock: FakeClock) -> None:
    await deliver(gateway)
    assert isinstance(await send_reply(gateway, clock), Sent)
    async with gateway.store.reads() as s:
        message = await s.scalar(select(OutboundMessage))
        recipient = await s.scalar(select(OutboundRecipient))
    assert message is not None and recipient is not None
    message.kind = OutboundKind.MDN  # detached copy: only what the callback reads
    await gateway.store.writer.run(
        lambda s: record_non_delivery(
            s, message, recipient, "expired", clock.now(), store=gateway.store
        )
    )
    (event,) = await audit_events(gateway, "mdn.undelivered")
    assert event.details["cause"] == "expired" and "notice" not in event.details
    assert await audit_events(gateway, "reply.undelivered") == []
    assert await count(gateway, Message) == 2  # the received one and the reply's copy


# --- pure logic ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "data", "ok"),
    [
        ("cr.pdf", PDF, True),
        ("CR.PDF", PDF, True),
        ("ordonnance.pdf", EXE, False),  # an executable renamed
        ("ordonnance.pdf.exe", PDF, False),
        ("photo.PNG", PNG, True),
        ("photo.png", JPEG, False),  # name and content disagree
        ("photo.jpg", JPEG, True),
        ("photo.jpeg", JPEG, True),
        ("scan.tif", b"II*\x00" + bytes(10), True),
        ("scan.tiff", b"MM\x00*" + bytes(10), True),
        ("lettre.rtf", b"{\\rtf1\\ansi Bonjour}", True),
        ("lettre.doc", OLE2, True),
        ("lettre.docx", b"PK\x03\x04" + bytes(10), False),
        ("note.txt", "Température 38°C".encode(), True),
        ("note.txt", b"a\x00b", False),  # NUL: not text
        ("note.txt", b"\xff\xfe", False),  # not UTF-8
        ("note.txt", PDF, False),
        ("pdf", PDF, False),  # no extension
        (".pdf", PDF, False),
        ("../../etc/cr.pdf", PDF, False),
        ("cr\r\n.pdf", PDF, False),
        ("archive.zip", b"PK\x03\x04", False),
    ],
)
def test_attachment_check(name: str, data: bytes, ok: bool) -> None:
    result = attachments.check(Attachment(name, "application/octet-stream", data))
    assert (result is not None) is ok


@pytest.mark.parametrize(
    ("reason", "cause"),
    [
        ("550 5.1.1 user unknown", "unknown_address"),
        ("550 5.2.1 mailbox disabled", "mailbox_closed"),
        ("552 5.2.2 over quota", "mailbox_full"),
        ("552 5.3.4 message too big", "too_large"),
        ("554 5.7.1 rejected by policy", "refused"),
        ("550 rejected", "refused"),
        ("domain autre.fr not in the whitelist", "not_trusted"),
        ("ConnectionRefusedError: [Errno 111]", "unreachable"),
        ("expired", "expired"),
    ],
)
def test_explain_non_delivery(reason: str, cause: str, clock: FakeClock) -> None:
    recipient = OutboundRecipient(expires_at=clock.now())
    clock.advance(seconds=-1)  # not expired yet, except for the "expired" reason
    assert explain(reason, recipient, clock.now()) == cause


# --- end to end: the outbound worker and a fake operator ----------------------------------


@contextlib.asynccontextmanager
async def wired_gateway(
    data_dir: Path, db_url: str, clock: FakeClock
) -> AsyncIterator[tuple[Gateway, FakeOperator, OutboundWorker]]:
    """A gateway whose outbound worker delivers to a fake operator for chu.mssante.fr
    (mutual TLS, tests/outbound_fakes.py), with the non-delivery notice wired in."""
    world = TrustWorld(data_dir.parent / "world")
    async with running_operator(world, "chu", CHU_DN) as chu:
        trust = TrustSettings(
            anchors=world.anchors,
            crls=[world.crl],
            whitelist=world.whitelist,
            require_client_certificate=False,  # the professional's mail comes in plain
        )
        settings = make_settings(
            data_dir, database_url=db_url, trust=trust, require_tls=False
        ).model_copy(
            update={
                "outbound": OutboundSettings(
                    worker_enabled=False,  # the test runs the passes
                    routes={CHU: chu.hop},
                    client_cert=world.client_cert,
                    client_key=world.client_key,
                    timeout=10.0,
                )
            }
        )
        gw = Gateway(settings, clock=clock)
        await gw.start()
        await seed_demo(gw.store)
        try:
            worker = build_worker(
                settings,
                gw.store,
                gw.trust,
                clock=clock,
                on_failure=[non_delivery_recorder(gw.store)],
            )
            yield gw, chu, worker
        finally:
            await gw.stop()


DR = f"dr.durand@{CHU}"


async def test_reply_reaches_the_professionals_operator(
    data_dir: Path, db_url: str, clock: FakeClock
) -> None:
    async with wired_gateway(data_dir, db_url, clock) as (gw, chu, worker):
        original = professional_message([addr(demo.ACTIVATED)], sender=DR, subject="Bilan")
        errors, _ = await send(gw, original, sender=DR)
        assert not errors
        assert isinstance(await send_reply(gw, clock), Sent)
        await worker.run_once()
        (got,) = chu.received
        assert (got.mail_from, got.rcpt_tos) == (addr(demo.ACTIVATED), [DR])
        msg = email.message_from_bytes(got.data, policy=default_policy)
        assert msg["In-Reply-To"] == original["Message-ID"]
        assert msg["Subject"] == "Re: Bilan"
        assert "DKIM-Signature" in msg
        assert await audit_events(gw, "reply.undelivered") == []


async def test_reply_refused_by_the_operator_shows_the_notice(
    data_dir: Path, db_url: str, clock: FakeClock
) -> None:
    async with wired_gateway(data_dir, db_url, clock) as (gw, chu, worker):
        errors, _ = await send(
            gw, professional_message([addr(demo.ACTIVATED)], sender=DR), sender=DR
        )
        assert not errors
        assert isinstance(await send_reply(gw, clock), Sent)
        chu.permanent = True  # 550 5.1.1 to every RCPT
        await worker.run_once()
        assert chu.received == []
        (event,) = await audit_events(gw, "reply.undelivered")
        assert event.details["cause"] == "unknown_address"
        raw = await read_original(
            gw.store.reads, gw.store.blobs, gw.store.keyring, event.details["notice"]
        )
        notice = email.message_from_bytes(raw, policy=default_policy)
        assert notice["Subject"] == "Message non distribué"
        text = notice.get_content()  # type: ignore[attr-defined]
        assert "Votre message à Dr Alice Durand" in text
        assert "n'existe pas ou plus" in text and "Destinataire inconnu" not in text
