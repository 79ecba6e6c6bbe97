"""Bounces of notification e-mails: a real DSN over SMTP to the bounce listener.

The gateway sends a notification (file transport), then a delivery status
notification (RFC 3464) comes back over SMTP, with STARTTLS and no client
certificate, to the e-mail's VERP return path.
"""

from __future__ import annotations

import email
import email.policy
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from sqlalchemy import select

from mssante import demo
from mssante.app import Gateway
from mssante.cli import seed_demo
from mssante.notify.bounces import permanent_failure
from mssante.smtp import replies
from mssante.smtp.tls import client_context
from mssante.store import directory as dirops
from mssante.store.models import (
    AuditEvent,
    Channel,
    Notification,
    NotificationStatus,
    Patient,
)
from tests.conftest import FakeClock
from tests.rawsmtp import RawSmtp
from tests.test_gateway import addr, professional_message, send
from tests.test_notify_email import outbox
from tests.test_notify_worker import notify_settings

JEAN = "jean.dupont@example.org"


@pytest.fixture
async def gw(data_dir: Path, db_url: str, clock: FakeClock) -> AsyncIterator[Gateway]:
    settings = notify_settings(data_dir, db_url, None, bounce_port=0)
    gateway = Gateway(settings, clock=clock)
    await gateway.start()
    await seed_demo(gateway.store)
    try:
        yield gateway
    finally:
        await gateway.stop()


def dsn(original: bytes, *, action: str = "failed", status: str = "5.1.1") -> bytes:
    """A report as Postfix writes one (RFC 3464, RFC 6522)."""
    headers = original.split(b"\r\n\r\n", 1)[0]
    return (
        b"From: MAILER-DAEMON@mx.fournisseur.example (Mail Delivery System)\r\n"
        b"To: notification-sender\r\n"
        b"Subject: Undelivered Mail Returned to Sender\r\n"
        b"Auto-Submitted: auto-replied\r\n"
        b"MIME-Version: 1.0\r\n"
        b'Content-Type: multipart/report; report-type=delivery-status; boundary="B0"\r\n'
        b"\r\n--B0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        b"I'm sorry to have to inform you that your message could not be delivered.\r\n"
        b"\r\n--B0\r\nContent-Type: message/delivery-status\r\n\r\n"
        b"Reporting-MTA: dns; mx.fournisseur.example\r\n"
        b"Arrival-Date: Mon, 23 Nov 2026 09:00:01 +0100\r\n\r\n"
        b"Final-Recipient: rfc822; " + JEAN.encode() + b"\r\n"
        b"Action: " + action.encode() + b"\r\n"
        b"Status: " + status.encode() + b"\r\n"
        b"Diagnostic-Code: smtp; 550 5.1.1 <" + JEAN.encode() + b">: user unknown\r\n"
        b"\r\n--B0\r\nContent-Type: text/rfc822-headers\r\n\r\n" + headers + b"\r\n"
        b"\r\n--B0--\r\n"
    )


async def notify_jean(gw: Gateway) -> tuple[str, bytes]:
    await send(gw, professional_message([addr(demo.CREATED_EMAIL)], subject="Biopsie XYZ"))
    assert await gw.notifier.worker.run_once() == 1
    (data,) = outbox(gw)
    msg = email.message_from_bytes(data, policy=email.policy.default)
    return str(msg["Return-Path"]).strip("<>"), data


async def bounce(gw: Gateway, rcpt: str, report: bytes) -> None:
    assert gw.notifier.bounces is not None
    # The provider's MTA: STARTTLS with our certificate, no client certificate.
    async with aiosmtplib.SMTP(
        hostname="127.0.0.1",
        port=gw.notifier.bounces.port,
        start_tls=True,
        tls_context=client_context(gw.trust.anchors),
    ) as client:
        errors, reply = await client.sendmail("", [rcpt], report)
    assert errors == {}
    assert reply == str(replies.BOUNCE_RECEIVED)[4:]


async def jean(gw: Gateway) -> Patient:
    async with gw.store.reads() as s:
        patient = await dirops.get_patient(s, demo.CREATED_EMAIL)
    assert patient is not None
    return patient


async def test_permanent_bounce_switches_the_patient_to_postal(
    gw: Gateway, clock: FakeClock
) -> None:
    return_path, original = await notify_jean(gw)
    await bounce(gw, return_path, dsn(original))

    patient = await jean(gw)
    assert patient.email_invalid
    async with gw.store.reads() as s:
        (n,) = await s.scalars(select(Notification))
        (event,) = await s.scalars(
            select(AuditEvent).where(AuditEvent.kind == "notification.bounced")
        )
    # The patient was never told: the notification goes to the postal statement.
    assert (n.channel, n.status, n.last_error) == (
        Channel.POSTAL,
        NotificationStatus.PENDING,
        "e-mail bounced (5.1.1)",
    )
    assert event.patient_id == patient.id
    assert event.details == {"status": "5.1.1", "notifications": [n.id], "email_invalid": True}
    assert "Biopsie" not in str(event.details) and JEAN not in str(event.details)

    # The next message: the planner chooses postal.
    await send(gw, professional_message([addr(demo.CREATED_EMAIL)]))
    async with gw.store.reads() as s:
        newest = await s.scalar(select(Notification).order_by(Notification.id.desc()).limit(1))
    assert newest is not None and (newest.channel, newest.email) == (Channel.POSTAL, None)

    # The same report again changes nothing more.
    await bounce(gw, return_path, dsn(original))
    async with gw.store.reads() as s:
        events = list(
            await s.scalars(select(AuditEvent).where(AuditEvent.kind == "notification.bounced"))
        )
    assert len(events) == 1

    # A new address clears the flag (directory upsert, as patient_import does).
    async def new_address(session: Any) -> None:
        await dirops.upsert_patient(
            session,
            dirops.PatientRecord(
                ins=demo.CREATED_EMAIL,
                status=patient.status,
                insurer_email="jean.dupont@nouveau.example",
                given_name=patient.given_name,
                family_name=patient.family_name,
                birth_date=patient.birth_date,
                postal_address=patient.postal_address,
            ),
            at=clock.now(),
            actor="test",
        )

    await gw.store.writer.run(new_address)
    assert not (await jean(gw)).email_invalid


async def test_temporary_report_changes_nothing(gw: Gateway) -> None:
    return_path, original = await notify_jean(gw)
    await bounce(gw, return_path, dsn(original, action="delayed", status="4.4.7"))
    assert not (await jean(gw)).email_invalid
    async with gw.store.reads() as s:
        (n,) = await s.scalars(select(Notification))
        kinds = list(await s.scalars(select(AuditEvent.kind)))
    assert (n.channel, n.status) == (Channel.EMAIL, NotificationStatus.SENT)
    assert "notification.bounced" not in kinds


async def test_forged_and_unknown_bounce_addresses_are_refused(gw: Gateway) -> None:
    return_path, _ = await notify_jean(gw)
    local, _, domain = return_path.partition("@")
    forged_mac = local[:-1] + ("0" if local[-1] != "0" else "1")
    assert gw.notifier.bounces is not None
    c = await RawSmtp.connect("127.0.0.1", gw.notifier.bounces.port)
    try:
        assert (await c.cmd("EHLO mx.fournisseur.example")).code == 250
        assert (await c.cmd("MAIL FROM:<>")).code == 250
        expected = replies.BOUNCE_ADDRESS_UNKNOWN
        for rcpt in (
            f"{forged_mac}@{domain}",  # MAC does not verify
            f"{local}@autre.example",  # not the bounce domain
            f"postmaster@{domain}",
            addr(demo.ACTIVATED),
        ):
            r = await c.cmd(f"RCPT TO:<{rcpt}>")
            assert (r.code, r.text) == (expected.code, f"{expected.enhanced} {expected.text}")
        assert (await c.cmd(f"RCPT TO:<{return_path.upper()}>")).code == 250  # case-folded
        await c.cmd("QUIT")
    finally:
        await c.close()
    assert not (await jean(gw)).email_invalid


def test_report_reading() -> None:
    original = b"From: x@example.org\r\nSubject: s\r\n\r\nbody\r\n"
    assert permanent_failure(dsn(original)) == "5.1.1"
    assert permanent_failure(dsn(original, status="5.2.2 (mailbox full)")) == "5.2.2"
    assert permanent_failure(dsn(original, action="delayed", status="4.4.7")) is None
    assert permanent_failure(dsn(original, action="failed", status="4.4.7")) is None
    assert permanent_failure(dsn(original, action="delivered", status="2.0.0")) is None
    # An auto-reply or any other message to the return path is not a report.
    assert permanent_failure(original) is None
    not_dsn = dsn(original).replace(b"report-type=delivery-status", b"report-type=disposition")
    assert permanent_failure(not_dsn) is None
    assert permanent_failure(b"\x00\xff garbage") is None
