"""Provisional activation codes delivered by the notification channels, and ``issue-code``.

A real gateway on SQLite and PostgreSQL; e-mails go through the
development file transport (an .eml per e-mail in the notify outbox) and
are parsed back; letters are read back with pypdf, as a print provider's
software would.  The patient first receives a real health message, whose
words must reach neither.
"""

from __future__ import annotations

import asyncio
import csv
import io
import re
from pathlib import Path

import dkim as dkimpy
from click.testing import CliRunner, Result
from pypdf import PdfReader
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from mssante import demo
from mssante.app import Gateway
from mssante.notify.postal import MANIFEST, MANIFEST_COLUMNS
from mssante.routing.ins import with_key
from mssante.store import credentials
from mssante.store import directory as dirops
from mssante.store.models import ActivationCode, AuditEvent, Channel, Patient
from mssante.web.activation import (
    activation_channel,
    letter_path,
    send_activation_code,
    send_email_confirmation,
)
from mssante.web.cli import issue_code_command
from tests.conftest import FakeClock
from tests.test_dkim import dnsfunc
from tests.test_gateway import addr, send
from tests.test_notify_email import assert_no_health_content, health_message, outbox, parse, parts

# FakeClock starts 2026-11-23 09:00 UTC; + 42 days is 4 January 2027, 10:00 in Paris (CET).
EXPIRY = "4 janvier 2027 à 10 h 00"
CODE = re.compile(r"[A-HJKMNP-Z2-9]{4}-[A-HJKMNP-Z2-9]{4}-[A-HJKMNP-Z2-9]{4}")


async def patient(gw: Gateway, ins: str) -> Patient:
    async with gw.store.reads() as session:
        found = await dirops.get_patient(session, ins)
    assert found is not None
    return found


async def issue_and_send(gw: Gateway, clock: FakeClock, ins: str) -> credentials.IssuedCode:
    p = await patient(gw, ins)
    channel = activation_channel(p)
    assert channel is not None
    issued = await credentials.issue_activation_code(
        gw.store, p.id, at=clock.now(), channel=channel
    )
    assert await send_activation_code(gw.store, gw.settings, clock, p, issued) is channel
    return issued


async def sent_events(gw: Gateway, patient_id: int) -> list[AuditEvent]:
    async with gw.store.reads() as session:
        rows = await session.scalars(
            select(AuditEvent)
            .where(AuditEvent.kind == "activation.code_sent", AuditEvent.patient_id == patient_id)
            .order_by(AuditEvent.id)
        )
        return list(rows)


def pdf_text(pdf: bytes) -> tuple[str, int]:
    reader = PdfReader(io.BytesIO(pdf))
    return "\n".join(page.extract_text() for page in reader.pages), len(reader.pages)


async def test_code_by_email_names_no_health_data(gateway: Gateway, clock: FakeClock) -> None:
    await send(gateway, health_message([addr(demo.CREATED_EMAIL)]))
    issued = await issue_and_send(gateway, clock, demo.CREATED_EMAIL)
    assert issued.channel is Channel.EMAIL
    (data,) = outbox(gateway)
    assert_no_health_content(data)
    msg = parse(data)
    text, html = parts(msg)
    n = gateway.settings.notify
    assert msg["To"] == "jean.dupont@example.org"
    assert msg["From"].addresses[0].addr_spec == n.from_address
    assert msg["Auto-Submitted"] == "auto-generated"  # RFC 3834
    assert msg["Subject"] == "Votre code d'activation de messagerie de santé"
    for part in (text, html):
        assert issued.code in part
        assert EXPIRY in part
        assert n.activation_url in part
        assert "Ne communiquez jamais ce code" in part
    assert '<html lang="fr">' in html and "<h1" in html and ">Activer mon profil</a>" in html
    # Nothing that, with the code, would open the profile.
    for identity in (demo.CREATED_EMAIL, "1979", "17/01", "Dupont"):
        assert identity not in text and identity not in html and identity.encode() not in data
    # Signed like notifications, with a return path of ours.
    signer = gateway.notifier.signer
    assert dkimpy.verify(data, dnsfunc=dnsfunc({signer.key_name: signer.dns_record()}))
    return_path = msg["Return-Path"].strip("<>")
    assert gateway.notifier.verp.token(return_path) is not None
    (event,) = await sent_events(gateway, (await patient(gateway, demo.CREATED_EMAIL)).id)
    assert event.details["channel"] == "email"
    assert event.details["message_id"] == msg["Message-ID"]


async def test_code_by_post_without_email(gateway: Gateway, clock: FakeClock) -> None:
    await send(gateway, health_message([addr(demo.CREATED_POSTAL)]))
    issued = await issue_and_send(gateway, clock, demo.CREATED_POSTAL)
    assert issued.channel is Channel.POSTAL
    assert outbox(gateway) == []
    path = letter_path(gateway.settings, issued)
    assert path.parent == gateway.settings.store.data_dir / "postal" / "activation-2026-11-23"
    assert path.name == f"activation-{issued.id}.pdf"
    text, pages = pdf_text(path.read_bytes())
    assert pages == 1
    flat = " ".join(text.split())
    assert issued.code in flat
    assert EXPIRY in flat
    assert gateway.settings.notify.activation_url in flat
    assert "Louise Bernard" in flat and "13100 Aix-en-Provence" in flat
    for secret in ("QUOKKA", "Quokka", "biopsie", "oncolog", "anapath", demo.CREATED_POSTAL):
        assert secret not in flat, secret
    assert demo.CREATED_POSTAL not in str(path)
    (event,) = await sent_events(gateway, (await patient(gateway, demo.CREATED_POSTAL)).id)
    assert event.details["file"] == path.name and event.details["batch"] == path.parent.name


async def test_postal_manifest_has_one_line_per_letter(gateway: Gateway, clock: FakeClock) -> None:
    first = await issue_and_send(gateway, clock, demo.CREATED_POSTAL)
    clock.advance(minutes=10)
    second = await issue_and_send(gateway, clock, demo.CREATED_POSTAL)
    manifest = letter_path(gateway.settings, second).parent / MANIFEST
    with manifest.open(newline="", encoding="utf-8") as f:
        header, *rows = list(csv.reader(f))
    assert tuple(header) == MANIFEST_COLUMNS
    assert [r[0] for r in rows] == [f"activation-{first.id}.pdf", f"activation-{second.id}.pdf"]
    row = dict(zip(header, rows[1], strict=True))
    assert row["recipient_name"] == "Louise Bernard"
    assert row["address_2"] == "8 chemin des Vignes"
    assert (row["pages"], row["events"]) == ("1", "0")
    # The first code was revoked by the second: its letter is printed anyway, and says
    # that only the latest code counts.
    text, _ = pdf_text(letter_path(gateway.settings, first).read_bytes())
    assert "seul le plus récent est valable" in " ".join(text.split())


async def test_bounced_address_means_a_letter(gateway: Gateway, clock: FakeClock) -> None:
    async def bounce(session: AsyncSession) -> None:
        p = await dirops.get_patient(session, demo.CREATED_EMAIL)
        assert p is not None
        p.email_invalid = True

    await gateway.store.writer.run(bounce)
    issued = await issue_and_send(gateway, clock, demo.CREATED_EMAIL)
    assert issued.channel is Channel.POSTAL
    assert letter_path(gateway.settings, issued).exists() and outbox(gateway) == []


def test_no_email_and_no_address_means_no_channel() -> None:
    nowhere = Patient(insurer_email=None, activation_email=None, postal_address=None)
    assert activation_channel(nowhere) is None
    bounced = Patient(insurer_email="a@example.org", email_invalid=True, postal_address=" \n ")
    assert activation_channel(bounced) is None


async def test_email_confirmation_code(gateway: Gateway, clock: FakeClock) -> None:
    await send_email_confirmation(
        gateway.store, gateway.settings, clock, "Jean.Perso@Example.org", "042917"
    )
    (data,) = outbox(gateway)
    msg = parse(data)
    text, html = parts(msg)
    assert msg["To"] == "Jean.Perso@Example.org"
    assert msg["Subject"] == "Confirmez votre adresse électronique"
    for part in (text, html):
        assert "042917" in part and "30 minutes" in part
    assert msg["Auto-Submitted"] == "auto-generated" and msg["DKIM-Signature"]


# --- the command ---------------------------------------------------------------------------


async def issue_code(gw: Gateway, *args: str) -> Result:
    """``mssante patients issue-code`` in a thread: it runs its own event loop and store."""
    runner = CliRunner()
    return await asyncio.to_thread(
        runner.invoke, issue_code_command, list(args), obj=gw.settings, catch_exceptions=False
    )


def emailed_code(gw: Gateway) -> str:
    text, _ = parts(parse(outbox(gw)[-1]))
    match = CODE.search(text)
    assert match is not None
    return match.group()


async def test_cli_never_prints_the_code_without_show(gateway: Gateway, clock: FakeClock) -> None:
    result = await issue_code(gateway, demo.CREATED_EMAIL)
    assert result.exit_code == 0, result.output
    assert "sent by e-mail" in result.output and "valid until" in result.output
    code = emailed_code(gateway)
    for form in (code, code.replace("-", ""), code[:4], code[-4:]):
        assert form not in result.output
    # The code sent is the one stored.
    p = await patient(gateway, demo.CREATED_EMAIL)
    checked = await credentials.check_activation(
        gateway.store, ins=demo.CREATED_EMAIL, birth_date=p.birth_date, code=code, at=clock.now()
    )
    assert checked.ok


async def test_cli_show_prints_the_code_sent(gateway: Gateway) -> None:
    result = await issue_code(gateway, demo.CREATED_EMAIL, "--show")
    assert result.exit_code == 0, result.output
    assert f"code: {emailed_code(gateway)}" in result.output


async def test_cli_postal_letter(gateway: Gateway) -> None:
    result = await issue_code(gateway, demo.CREATED_POSTAL)
    assert result.exit_code == 0, result.output
    p = await patient(gateway, demo.CREATED_POSTAL)
    async with gateway.store.reads() as session:
        (row,) = await session.scalars(
            select(ActivationCode).where(ActivationCode.patient_id == p.id)
        )
    match = re.search(r"postal letter (\S+\.pdf)", result.output)
    assert match is not None
    pdf = Path(match.group(1))
    assert pdf.name == f"activation-{row.id}.pdf" and pdf.exists()
    assert row.channel is Channel.POSTAL
    text, _ = pdf_text(pdf.read_bytes())
    assert CODE.search(" ".join(text.split())) is not None


async def test_cli_refuses_what_cannot_get_a_code(gateway: Gateway) -> None:
    for ins, status in ((demo.ACTIVATED, "activated"), (demo.OPPOSED, "opposed")):
        result = await issue_code(gateway, ins)
        assert result.exit_code == 1
        assert f"profile is {status}: only a created profile" in result.output
    unknown = await issue_code(gateway, with_key("1851275123999"))
    assert unknown.exit_code == 1 and "patient not found" in unknown.output
    bad = await issue_code(gateway, "12345")
    assert bad.exit_code == 2 and "not a valid INS" in bad.output
    async with gateway.store.reads() as session:
        assert list(await session.scalars(select(ActivationCode))) == []
    assert outbox(gateway) == []
