"""End to end: a real client, a real socket, the real server and database."""

from __future__ import annotations

import asyncio
from email.message import EmailMessage
from email.utils import make_msgid

import aiosmtplib
import pytest
from sqlalchemy import select

from mssante import demo
from mssante.app import Gateway
from mssante.routing.ins import with_key
from mssante.smtp import replies
from mssante.store.audit import verify_chain
from mssante.store.models import (
    AuditEvent,
    Channel,
    Contact,
    Conversation,
    Delivery,
    Message,
    Notification,
    Patient,
)
from mssante.store.reading import read_view
from tests.conftest import FakeClock
from tests.rawsmtp import RawSmtp

DOMAIN = "patient.mssante.fr"
DOCTOR = "dr.durand@chu-exemple.mssante.fr"


def addr(ins: str) -> str:
    return f"{ins}@{DOMAIN}"


def professional_message(
    to: list[str],
    *,
    sender: str = DOCTOR,
    subject: str = "Compte rendu",
    body: str = "Bonjour",
    headers: dict[str, str] | None = None,
    pdf: bytes | None = None,
) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = f"Dr Alice Durand <{sender}>"
    msg["To"] = ", ".join(to)
    msg["Subject"] = subject
    msg["Message-ID"] = make_msgid(domain="chu-exemple.mssante.fr")
    for name, value in (headers or {}).items():
        msg[name] = value
    msg.set_content(body)
    if pdf is not None:
        msg.add_attachment(pdf, maintype="application", subtype="pdf", filename="cr.pdf")
    return msg


async def send(
    gw: Gateway, msg: EmailMessage, *, sender: str = DOCTOR, recipients: list[str] | None = None
) -> tuple[dict[str, object], str]:
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.smtp.port, start_tls=False) as c:
        errors, text = await c.send_message(msg, sender=sender, recipients=recipients)
    return errors, text


async def rcpt_reply(gw: Gateway, rcpt: str) -> tuple[int, str]:
    client = await RawSmtp.connect("127.0.0.1", gw.smtp.port)
    try:
        assert (await client.cmd("EHLO client.test")).code == 250
        assert (await client.cmd(f"MAIL FROM:<{DOCTOR}>")).code == 250
        r = await client.cmd(f"RCPT TO:<{rcpt}>")
        return r.code, r.text
    finally:
        await client.close()


async def rows(gw: Gateway, stmt):  # type: ignore[no-untyped-def]
    async with gw.store.reads() as s:
        return list((await s.execute(stmt)).scalars())


async def patient_id(gw: Gateway, ins: str) -> int:
    async with gw.store.reads() as s:
        pid = await s.scalar(select(Patient.id).where(Patient.ins == ins))
    assert pid is not None
    return pid


# --- RCPT verdicts ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ins", "expected"),
    [
        (demo.ACTIVATED, replies.RECIPIENT_OK),
        (demo.CREATED_EMAIL, replies.RECIPIENT_OK),
        (demo.CREATED_POSTAL, replies.RECIPIENT_OK),
        (demo.CORSICAN, replies.RECIPIENT_OK),
        (demo.OPPOSED, replies.MAILBOX_CLOSED),
        (demo.CLOSED, replies.MAILBOX_CLOSED),
        (with_key("1851275123999"), replies.PATIENT_NOT_FOUND),
    ],
)
async def test_rcpt_verdict_by_profile_status(
    gateway: Gateway, ins: str, expected: replies.Reply
) -> None:
    code, text = await rcpt_reply(gateway, addr(ins))
    assert (code, text) == (expected.code, f"{expected.enhanced} {expected.text}")


def _bad_key(ins: str) -> str:
    key = (int(ins[13:]) % 97) + 1
    return f"{ins[:13]}{key:02d}"


@pytest.mark.parametrize(
    ("rcpt", "code", "enhanced", "cause"),
    [
        (f"{demo.ACTIVATED}@example.org", 550, "5.7.1", "Relais refuse"),
        (f"{demo.ACTIVATED}@mssante.fr", 550, "5.7.1", "Relais refuse"),
        (f"{demo.ACTIVATED}@sub.{DOMAIN}", 550, "5.7.1", "Relais refuse"),
        # aiosmtpd's address parser refuses a trailing dot before routing sees it.
        (f"{demo.ACTIVATED}@{DOMAIN}.", 553, "5.1.3", "Adresse mal formee"),
        (f"{demo.ACTIVATED}@PATIENT.MSSANTE.FR", 250, "2.1.5", "Destinataire accepte"),
        (f"{demo.ACTIVATED[:14]}@{DOMAIN}", 550, "5.1.3", "15 caracteres"),
        (f"{demo.ACTIVATED}0@{DOMAIN}", 550, "5.1.3", "15 caracteres"),
        (f"{_bad_key(demo.ACTIVATED)}@{DOMAIN}", 550, "5.1.3", "cle de controle"),
        (f"{with_key('1841375123999')}@{DOMAIN}", 550, "5.1.3", "mois"),
        (
            f"{with_key('1840375123999')[:5]}2C{with_key('1840375123999')[7:]}@{DOMAIN}",
            550,
            "5.1.3",
            "departement",
        ),
        (f"2A{demo.ACTIVATED[2:]}@{DOMAIN}", 550, "5.1.3", "caracteres non autorises"),
        (f"{with_key('5840375123999')}@{DOMAIN}", 550, "5.1.3", "premier chiffre"),
        # RFC 5321 4.1.2: a quoted local part that needs no quoting is the same mailbox.
        (f'"{demo.ACTIVATED}"@{DOMAIN}', 250, "2.1.5", "Destinataire accepte"),
        (f'"{demo.ACTIVATED[:7]} {demo.ACTIVATED[7:]}"@{DOMAIN}', 550, "5.1.3", "Adresse invalide"),
        (f'"{demo.ACTIVATED}@example.org"@{DOMAIN}', 550, "5.1.3", "Adresse invalide"),
        (f"{demo.ACTIVATED}%example.org@{DOMAIN}", 550, "5.1.3", "Adresse invalide"),
        (f"postmaster@{DOMAIN}", 550, "5.1.3", "Adresse invalide"),
    ],
)
async def test_rcpt_invalid_address_variants(
    gateway: Gateway, rcpt: str, code: int, enhanced: str, cause: str
) -> None:
    got_code, text = await rcpt_reply(gateway, rcpt)
    assert got_code == code, text
    assert text.startswith(enhanced + " ")
    assert cause in text
    if code >= 500:
        assert " / " in text  # French cause, then English


async def test_corsica_lowercase_letters_are_the_same_ins(gateway: Gateway) -> None:
    code, _ = await rcpt_reply(gateway, addr(demo.CORSICAN.lower()))
    assert code == 250


# --- delivery -----------------------------------------------------------------------------


async def test_mixed_recipients_deliver_to_accepted_only(gateway: Gateway) -> None:
    msg = professional_message([addr(demo.ACTIVATED), addr(demo.OPPOSED)])
    recipients = [
        addr(demo.ACTIVATED),
        addr(demo.OPPOSED),
        addr(with_key("1851275123999")),
        addr(demo.CREATED_POSTAL),
    ]
    errors, text = await send(gateway, msg, recipients=recipients)
    assert set(errors) == {addr(demo.OPPOSED), addr(with_key("1851275123999"))}
    assert text.startswith("2.0.0 ")
    deliveries = await rows(gateway, select(Delivery).order_by(Delivery.id))
    got = {d.patient_id for d in deliveries}
    assert got == {
        await patient_id(gateway, demo.ACTIVATED),
        await patient_id(gateway, demo.CREATED_POSTAL),
    }
    messages = await rows(gateway, select(Message))
    assert len(messages) == 1  # stored once, delivered twice


async def test_stored_bytes_are_exactly_what_was_sent(gateway: Gateway) -> None:
    body = "ligne\n.ligne qui commence par un point\n..deux points\n" + "x" * 900
    msg = professional_message([addr(demo.ACTIVATED)], body=body, pdf=b"%PDF-1.4 test\x00\xff")
    raw = msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=gateway.smtp.port, start_tls=False) as c:
        await c.sendmail(DOCTOR, [addr(demo.ACTIVATED)], raw)
    (message,) = await rows(gateway, select(Message))
    assert await gateway.store.read_original(message.ref) == raw
    assert message.size == len(raw)
    assert b"\r\nReceived: from " in message.trace_header
    assert message.ref.encode() in message.trace_header
    assert message.from_address == DOCTOR
    meta = await read_view(gateway.store.reads, gateway.store.keyring, message.ref)
    assert meta.subject == "Compte rendu"
    assert meta.from_name == "Dr Alice Durand"
    assert [(a.name, a.type, a.size) for a in meta.attachments] == [
        ("cr.pdf", "application/pdf", 15)
    ]
    assert message.attachment_count == 1


async def test_message_survives_restart_byte_identical(  # type: ignore[no-untyped-def]
    data_dir, db_url: str, clock: FakeClock
) -> None:
    from mssante.cli import seed_demo
    from tests.conftest import make_settings

    settings = make_settings(data_dir, database_url=db_url)
    gw = Gateway(settings, clock=clock)
    await gw.start()
    await seed_demo(gw.store)
    msg = professional_message([addr(demo.ACTIVATED)], pdf=bytes(range(256)) * 100)
    raw = msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.smtp.port, start_tls=False) as c:
        await c.sendmail(DOCTOR, [addr(demo.ACTIVATED)], raw)
    await gw.stop()

    gw2 = Gateway(settings, clock=clock)
    await gw2.start()
    try:
        (message,) = await rows(gw2, select(Message))
        assert await gw2.store.read_original(message.ref) == raw
        (delivery,) = await rows(gw2, select(Delivery))
        assert delivery.patient_id == await patient_id(gw2, demo.ACTIVATED)
    finally:
        await gw2.stop()


async def test_broken_mime_is_stored_and_flagged(gateway: Gateway) -> None:
    raw = (
        b"From: Dr X <" + DOCTOR.encode() + b">\r\nSubject: broken\r\n"
        b'Content-Type: multipart/mixed; boundary="zz"\r\n\r\n'
        b"--zz\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        b"JVBERi0x!!!notbase64\r\n"
    )
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=gateway.smtp.port, start_tls=False) as c:
        _, text = await c.sendmail(DOCTOR, [addr(demo.ACTIVATED)], raw)
    assert text.startswith("2.0.0")
    (message,) = await rows(gateway, select(Message))
    assert message.broken_mime
    assert await gateway.store.read_original(message.ref) == raw


# --- conversations --------------------------------------------------------------------------


async def test_conversation_threading_fin_and_reopening(gateway: Gateway) -> None:
    to = [addr(demo.ACTIVATED)]
    first = professional_message(to, subject="Resultats")
    await send(gateway, first)
    reply = professional_message(
        to, subject="Re: Resultats", headers={"In-Reply-To": first["Message-ID"]}
    )
    await send(gateway, reply)
    convs = await rows(gateway, select(Conversation))
    assert len(convs) == 1 and convs[0].ended_at is None

    await send(gateway, professional_message(to, subject="[FIN]"))
    (conv,) = await rows(gateway, select(Conversation))
    assert conv.ended_at is not None and conv.ended_by == DOCTOR

    await send(gateway, professional_message(to, subject="Nouveau resultat"))
    (conv,) = await rows(gateway, select(Conversation))
    assert conv.ended_at is None  # DOMAIN.md 4: a later message reopens it

    await send(gateway, professional_message(to, subject="Fin", headers={"X-MSS-MES": "FIN"}))
    (conv,) = await rows(gateway, select(Conversation))
    assert conv.ended_at is not None
    fins = [
        d.ends_conversation for d in await rows(gateway, select(Delivery).order_by(Delivery.id))
    ]
    assert fins == [False, False, True, False, True]


async def test_subject_only_containing_fin_does_not_end(gateway: Gateway) -> None:
    await send(gateway, professional_message([addr(demo.ACTIVATED)], subject="[FIN] du suivi"))
    (conv,) = await rows(gateway, select(Conversation))
    assert conv.ended_at is None


async def test_other_professional_gets_own_conversation_unless_replying(gateway: Gateway) -> None:
    to = [addr(demo.ACTIVATED)]
    first = professional_message(to)
    await send(gateway, first)
    other = "secretariat@chu-exemple.mssante.fr"
    await send(gateway, professional_message(to, sender=other), sender=other)
    await send(
        gateway,
        professional_message(to, sender=other, headers={"References": first["Message-ID"]}),
        sender=other,
    )
    deliveries = await rows(gateway, select(Delivery).order_by(Delivery.id))
    convs = [d.conversation_id for d in deliveries]
    assert convs[0] != convs[1] and convs[2] == convs[0]


async def test_threads_never_cross_patients(gateway: Gateway) -> None:
    first = professional_message([addr(demo.ACTIVATED)])
    await send(gateway, first)
    answer = professional_message(
        [addr(demo.CREATED_EMAIL)], headers={"In-Reply-To": first["Message-ID"]}
    )
    await send(gateway, answer)
    convs = await rows(gateway, select(Conversation).order_by(Conversation.id))
    assert [c.patient_id for c in convs] == [
        await patient_id(gateway, demo.ACTIVATED),
        await patient_id(gateway, demo.CREATED_EMAIL),
    ]


async def test_reply_to_mssante_address_becomes_contact(gateway: Gateway) -> None:
    to = [addr(demo.ACTIVATED)]
    await send(
        gateway,
        professional_message(
            to, headers={"Reply-To": "Secretariat <secretariat.cardio@chu-exemple.mssante.fr>"}
        ),
    )
    await send(gateway, professional_message(to, headers={"Reply-To": "x@gmail.com"}))
    await send(gateway, professional_message(to, headers={"Reply-To": addr(demo.CREATED_EMAIL)}))
    contacts = await rows(gateway, select(Contact))
    assert [c.address for c in contacts] == ["secretariat.cardio@chu-exemple.mssante.fr"]
    assert contacts[0].source == "reply-to"


# --- notifications ----------------------------------------------------------------------------


async def _notifications(gw: Gateway, ins: str) -> list[tuple[int, Channel, str | None]]:
    pid = await patient_id(gw, ins)
    return [
        (n.recipient_id, n.channel, n.email)
        for n in await rows(
            gw, select(Notification).where(Notification.patient_id == pid).order_by(Notification.id)
        )
    ]


async def test_notification_rows_follow_profile_status(gateway: Gateway) -> None:
    for ins in (demo.ACTIVATED, demo.CREATED_EMAIL, demo.CREATED_POSTAL):
        await send(gateway, professional_message([addr(ins)]))
    assert await _notifications(gateway, demo.ACTIVATED) == [
        (await patient_id(gateway, demo.ACTIVATED), Channel.EMAIL, "camille.martin@example.org")
    ]
    assert await _notifications(gateway, demo.CREATED_EMAIL) == [
        (await patient_id(gateway, demo.CREATED_EMAIL), Channel.EMAIL, "jean.dupont@example.org")
    ]
    assert await _notifications(gateway, demo.CREATED_POSTAL) == [
        (await patient_id(gateway, demo.CREATED_POSTAL), Channel.POSTAL, None)
    ]


async def test_minor_notifies_each_representative_by_own_channel(gateway: Gateway) -> None:
    await send(gateway, professional_message([addr(demo.MINOR)]))
    assert await _notifications(gateway, demo.MINOR) == [
        (await patient_id(gateway, demo.ACTIVATED), Channel.EMAIL, "camille.martin@example.org"),
        (await patient_id(gateway, demo.CREATED_EMAIL), Channel.EMAIL, "jean.dupont@example.org"),
    ]
    # DOMAIN.md 4: the message is in the minor's mailbox, never the parents'.
    (delivery,) = await rows(gateway, select(Delivery))
    assert delivery.patient_id == await patient_id(gateway, demo.MINOR)


async def test_delivery_is_audited_and_chain_verifies(gateway: Gateway) -> None:
    await send(gateway, professional_message([addr(demo.ACTIVATED), addr(demo.CREATED_POSTAL)]))
    events = await rows(gateway, select(AuditEvent).order_by(AuditEvent.id))
    delivered = [e for e in events if e.kind == "message.delivered"]
    assert len(delivered) == 2
    assert all(e.actor == DOCTOR for e in delivered)
    assert "Compte rendu" not in str([e.details for e in events])  # no content in the trail
    assert verify_chain(events) == []


async def test_concurrent_sessions_all_stored(gateway: Gateway) -> None:
    async def one(i: int) -> str:
        msg = professional_message([addr(demo.ACTIVATED)], subject=f"n{i}")
        _, text = await send(gateway, msg)
        return text

    texts = await asyncio.gather(*(one(i) for i in range(30)))
    assert all(t.startswith("2.0.0") for t in texts)
    messages = await rows(gateway, select(Message))
    subjects = [
        (await read_view(gateway.store.reads, gateway.store.keyring, m.ref)).subject
        for m in messages
    ]
    assert sorted(subjects) == sorted(f"n{i}" for i in range(30))
    refs = {t.split()[4] for t in texts}
    assert refs == {m.ref for m in messages}
    events = await rows(gateway, select(AuditEvent).order_by(AuditEvent.id))
    assert verify_chain(events) == []


async def test_refusals_are_audited_without_the_address(gateway: Gateway) -> None:
    for ins in (demo.OPPOSED, with_key("1851275123999")):
        await rcpt_reply(gateway, addr(ins))
    await rcpt_reply(gateway, f"{demo.ACTIVATED}@example.org")
    events = await rows(
        gateway,
        select(AuditEvent).where(AuditEvent.kind == "message.refused").order_by(AuditEvent.id),
    )
    assert [e.details["cause"] for e in events] == [
        "mailbox_closed",
        "patient_not_found",
        "relay_denied",
    ]
    # The opposed patient sees it in their history; unknown INS stay unnamed.
    assert events[0].patient_id == await patient_id(gateway, demo.OPPOSED)
    assert events[1].patient_id is None
    assert all(e.actor == DOCTOR for e in events)
    assert demo.ACTIVATED not in str([e.details for e in events])
