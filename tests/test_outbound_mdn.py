"""Read receipts (issue 7.3): an RFC 8098 MDN on the first display, once only."""

from __future__ import annotations

import asyncio
import email
from email.message import EmailMessage
from email.message import Message as RawMessage
from email.policy import default as default_policy
from pathlib import Path

import aiosmtplib
from sqlalchemy import func, select

from mssante import demo
from mssante.app import Gateway
from mssante.outbound.mdn import on_first_display
from mssante.outbound.replies import Sent, reply
from mssante.store.models import (
    AuditEvent,
    Delivery,
    OutboundKind,
    OutboundMessage,
    OutboundRecipient,
)
from tests.conftest import FakeClock
from tests.test_gateway import DOCTOR, addr, patient_id, professional_message, send
from tests.test_outbound_replies import DR, wired_gateway


async def deliver(
    gw: Gateway, headers: dict[str, str] | None = None, *, sender: str = DOCTOR
) -> tuple[EmailMessage, int]:
    msg = professional_message([addr(demo.ACTIVATED)], subject="Resultats IRM", headers=headers)
    errors, _ = await send(gw, msg, sender=sender)
    assert not errors
    async with gw.store.reads() as s:
        delivery_id = await s.scalar(select(Delivery.id).order_by(Delivery.id.desc()).limit(1))
    assert delivery_id is not None
    return msg, delivery_id


async def outbound(gw: Gateway) -> list[tuple[OutboundMessage, list[str], bytes]]:
    async with gw.store.reads() as s:
        rows = list(await s.scalars(select(OutboundMessage).order_by(OutboundMessage.id)))
        out = []
        for m in rows:
            rcpts = list(
                await s.scalars(
                    select(OutboundRecipient.address).where(OutboundRecipient.outbound_id == m.id)
                )
            )
            out.append((m, rcpts, await gw.store.outbound.read(m)))
    return out


async def events(gw: Gateway, kind: str) -> list[AuditEvent]:
    async with gw.store.reads() as s:
        return list(await s.scalars(select(AuditEvent).where(AuditEvent.kind == kind)))


async def read_at(gw: Gateway, delivery_id: int):  # type: ignore[no-untyped-def]
    async with gw.store.reads() as s:
        return await s.scalar(select(Delivery.read_at).where(Delivery.id == delivery_id))


async def test_first_display_sends_one_well_formed_mdn(gateway: Gateway, clock: FakeClock) -> None:
    original, delivery_id = await deliver(
        gateway, {"Disposition-Notification-To": f"Dr Alice Durand <{DOCTOR}>"}
    )
    pid = await patient_id(gateway, demo.ACTIVATED)
    clock.advance(hours=3)
    first = clock.now()
    outbound_id = await on_first_display(
        gateway.store, patient_id=pid, delivery_id=delivery_id, at=clock.now()
    )
    assert outbound_id is not None
    assert await read_at(gateway, delivery_id) == clock.now()

    ((message, rcpts, raw),) = await outbound(gateway)
    assert message.id == outbound_id
    assert message.kind is OutboundKind.MDN
    assert message.mail_from == ""  # RFC 8098 3: null reverse-path
    assert rcpts == [DOCTOR]
    assert (message.patient_id, message.delivery_id) == (pid, delivery_id)
    assert b"\n" not in raw.replace(b"\r\n", b"")

    mdn = email.message_from_bytes(raw, policy=default_policy)
    assert isinstance(mdn, EmailMessage)
    assert mdn.get_content_type() == "multipart/report"
    assert mdn.get_param("report-type") == "disposition-notification"
    assert mdn["To"].addresses[0].addr_spec == DOCTOR
    assert mdn["From"].addresses[0].addr_spec == addr(demo.ACTIVATED)
    assert mdn["Auto-Submitted"] == "auto-replied"
    assert mdn["Message-ID"] == message.message_id
    assert mdn["In-Reply-To"] == original["Message-ID"]
    assert "Disposition-Notification-To" not in mdn  # never asks for one back
    human, report = mdn.get_payload()  # type: ignore[misc]
    assert human.get_content_type() == "text/plain"
    assert "a été affiché par son destinataire" in human.get_content()
    assert "was displayed by its recipient" in human.get_content()
    assert report.get_content_type() == "message/disposition-notification"
    (fields,) = report.get_payload()
    assert isinstance(fields, RawMessage)
    assert fields["Reporting-UA"] == "mx.test.localhost; mssante"
    assert fields["Original-Recipient"] == f"rfc822;{addr(demo.ACTIVATED)}"
    assert fields["Final-Recipient"] == f"rfc822;{addr(demo.ACTIVATED)}"
    assert fields["Original-Message-ID"] == original["Message-ID"]
    assert fields["Disposition"] == "manual-action/MDN-sent-automatically; displayed"
    # Nothing of the content: not the subject, not the body.
    assert b"IRM" not in raw and b"Bonjour" not in raw

    (read,) = await events(gateway, "message.read")
    (queued,) = await events(gateway, "mdn.queued")
    assert read.patient_id == queued.patient_id == pid
    assert queued.details["outbound"] == outbound_id

    # The second display: nothing more.
    clock.advance(minutes=1)
    again = await on_first_display(
        gateway.store, patient_id=pid, delivery_id=delivery_id, at=clock.now()
    )
    assert again is None
    assert len(await outbound(gateway)) == 1
    assert len(await events(gateway, "message.read")) == 1
    assert await read_at(gateway, delivery_id) == first


async def test_concurrent_first_displays_send_one_mdn(gateway: Gateway, clock: FakeClock) -> None:
    _, delivery_id = await deliver(gateway, {"Disposition-Notification-To": DOCTOR})
    pid = await patient_id(gateway, demo.ACTIVATED)
    results = await asyncio.gather(
        *(
            on_first_display(gateway.store, patient_id=pid, delivery_id=delivery_id, at=clock.now())
            for _ in range(5)
        )
    )
    assert len([r for r in results if r is not None]) == 1
    assert len(await outbound(gateway)) == 1
    assert len(await events(gateway, "mdn.queued")) == 1
    assert len(await events(gateway, "message.read")) == 1
    # The losers' blobs were dropped: the received message's and the MDN's remain.
    (message, _, _) = (await outbound(gateway))[0]
    assert gateway.store.blobs.path_of(message.blob_key).exists()
    assert len([p for p in gateway.store.blobs.blob_dir.glob("*/*/*") if p.is_file()]) == 2


async def test_no_mdn_without_the_header(gateway: Gateway, clock: FakeClock) -> None:
    _, delivery_id = await deliver(gateway)
    pid = await patient_id(gateway, demo.ACTIVATED)
    assert (
        await on_first_display(
            gateway.store, patient_id=pid, delivery_id=delivery_id, at=clock.now()
        )
        is None
    )
    assert await read_at(gateway, delivery_id) == clock.now()
    assert await outbound(gateway) == []
    assert len(await events(gateway, "message.read")) == 1
    assert await events(gateway, "mdn.skipped") == []


async def test_no_mdn_to_another_domain_than_the_envelope_senders(
    gateway: Gateway, clock: FakeClock
) -> None:
    """RFC 8098 2.1: a Disposition-Notification-To unlike the Return-Path is not answered."""
    _, delivery_id = await deliver(
        gateway, {"Disposition-Notification-To": "suivi@autre-hopital.mssante.fr"}
    )
    pid = await patient_id(gateway, demo.ACTIVATED)
    got = await on_first_display(
        gateway.store, patient_id=pid, delivery_id=delivery_id, at=clock.now()
    )
    assert got is None
    assert await outbound(gateway) == []
    (skipped,) = await events(gateway, "mdn.skipped")
    assert skipped.details["why"] == "domain_mismatch"
    assert await read_at(gateway, delivery_id) == clock.now()


async def test_no_mdn_for_a_null_sender_message(gateway: Gateway, clock: FakeClock) -> None:
    msg = professional_message(
        [addr(demo.ACTIVATED)], headers={"Disposition-Notification-To": DOCTOR}
    )
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=gateway.smtp.port, start_tls=False) as c:
        await c.sendmail("", [addr(demo.ACTIVATED)], msg.as_bytes())
    async with gateway.store.reads() as s:
        delivery_id = await s.scalar(select(Delivery.id))
    assert delivery_id is not None
    pid = await patient_id(gateway, demo.ACTIVATED)
    assert (
        await on_first_display(
            gateway.store, patient_id=pid, delivery_id=delivery_id, at=clock.now()
        )
        is None
    )
    (skipped,) = await events(gateway, "mdn.skipped")
    assert skipped.details["why"] == "null_sender"


async def test_another_patients_delivery_is_left_alone(gateway: Gateway, clock: FakeClock) -> None:
    _, delivery_id = await deliver(gateway, {"Disposition-Notification-To": DOCTOR})
    other = await patient_id(gateway, demo.CORSICAN)
    assert (
        await on_first_display(
            gateway.store, patient_id=other, delivery_id=delivery_id, at=clock.now()
        )
        is None
    )
    assert await read_at(gateway, delivery_id) is None
    assert await outbound(gateway) == []
    assert await events(gateway, "message.read") == []


async def test_the_patients_own_reply_never_triggers_an_mdn(
    gateway: Gateway, clock: FakeClock
) -> None:
    _, delivery_id = await deliver(gateway, {"Disposition-Notification-To": DOCTOR})
    pid = await patient_id(gateway, demo.ACTIVATED)
    async with gateway.store.reads() as s:
        conv = await s.scalar(select(Delivery.conversation_id).where(Delivery.id == delivery_id))
    assert conv is not None
    sent = await reply(
        gateway.store,
        patient_id=pid,
        conversation_id=conv,
        body_text="Bien reçu.",
        attachments=[],
        at=clock.now(),
    )
    assert isinstance(sent, Sent)
    async with gateway.store.reads() as s:
        copy = await s.scalar(
            select(Delivery.id).where(Delivery.id != delivery_id, Delivery.patient_id == pid)
        )
        kinds = list(await s.scalars(select(OutboundMessage.kind)))
    assert copy is not None
    assert (
        await on_first_display(gateway.store, patient_id=pid, delivery_id=copy, at=clock.now())
        is None
    )
    assert kinds == [OutboundKind.REPLY]
    async with gateway.store.reads() as s:
        n = await s.scalar(select(func.count()).select_from(OutboundMessage))
    assert n == 1


async def test_the_mdn_leaves_with_the_null_sender(
    data_dir: Path, db_url: str, clock: FakeClock
) -> None:
    async with wired_gateway(data_dir, db_url, clock) as (gw, chu, worker):
        msg = professional_message(
            [addr(demo.ACTIVATED)], sender=DR, headers={"Disposition-Notification-To": DR}
        )
        errors, _ = await send(gw, msg, sender=DR)
        assert not errors
        async with gw.store.reads() as s:
            delivery_id = await s.scalar(select(Delivery.id))
        assert delivery_id is not None
        pid = await patient_id(gw, demo.ACTIVATED)
        assert await on_first_display(
            gw.store, patient_id=pid, delivery_id=delivery_id, at=clock.now()
        )
        await worker.run_once()
        (got,) = chu.received
        assert (got.mail_from, got.rcpt_tos) == ("<>", [DR])  # MAIL FROM:<> (aiosmtpd keeps it so)
        mdn = email.message_from_bytes(got.data, policy=default_policy)
        assert mdn.get_content_type() == "multipart/report"
        assert "DKIM-Signature" in mdn
