"""The notification e-mail itself: no health content, accessible, signed, bounce-ready.

A real message goes through the gateway with a distinctive subject, body,
sender and attachment name; the worker writes its e-mails with the
development file transport; each file is parsed back with the email
package and checked.
"""

from __future__ import annotations

import email
import email.policy
from collections.abc import AsyncIterator
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import dkim as dkimpy
import pytest
from sqlalchemy import select

from mssante import demo
from mssante.app import Gateway
from mssante.cli import seed_demo
from mssante.store.models import Notification, NotificationStatus
from tests.conftest import FakeClock
from tests.test_dkim import dnsfunc
from tests.test_gateway import DOCTOR, addr, send
from tests.test_notify_worker import WEBMAIL, notifier, notify_settings

# Everything of the health message that must never reach a notification.
SECRETS = ("QUOKKA", "Quokka", "quokka", "oncolog", "biopsie", "anapath", "Lucas")


def health_message(to: list[str]) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = Address("Dr Zoé Quokka, oncologue", addr_spec=DOCTOR)
    msg["To"] = ", ".join(to)
    msg["Subject"] = "Résultats de biopsie QUOKKA-7731"
    msg["Message-ID"] = make_msgid(domain="chu-exemple.mssante.fr")
    msg.set_content("Madame, la biopsie QUOKKA montre une lésion.\n")
    msg.add_attachment(
        b"%PDF-1.4\n%%EOF\n", maintype="application", subtype="pdf", filename="QUOKKA-anapath.pdf"
    )
    return msg


@pytest.fixture
async def gw(data_dir: Path, db_url: str, clock: FakeClock, request: Any) -> AsyncIterator[Gateway]:
    extra = getattr(request, "param", {})
    gateway = Gateway(notify_settings(data_dir, db_url, None, **extra), clock=clock)
    await gateway.start()
    await seed_demo(gateway.store)
    try:
        yield gateway
    finally:
        await gateway.stop()


def outbox(gw: Gateway) -> list[bytes]:
    directory = gw.settings.notify.outbox_path(gw.settings.store.data_dir)
    return [p.read_bytes() for p in sorted(directory.glob("*.eml"))]


def parse(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def parts(msg: EmailMessage) -> tuple[str, str]:
    text, html = msg.get_body(("plain",)), msg.get_body(("html",))
    assert text is not None and html is not None
    return str(text.get_content()), str(html.get_content())


def assert_no_health_content(data: bytes) -> None:
    msg = parse(data)
    decoded = "\n".join([*(f"{k}: {v}" for k, v in msg.items()), *parts(msg)])
    for secret in SECRETS:
        assert secret not in decoded, secret
        assert secret.encode() not in data, secret
    assert [p.get_content_type() for p in msg.walk()] == [
        "multipart/alternative",
        "text/plain",
        "text/html",
    ]  # no attachment of any kind


async def test_email_says_only_that_a_message_waits(gw: Gateway, clock: FakeClock) -> None:
    await send(gw, health_message([addr(demo.ACTIVATED)]))
    assert await gw.notifier.worker.run_once() == 1
    (data,) = outbox(gw)
    assert_no_health_content(data)
    msg = parse(data)
    text, html = parts(msg)
    assert msg["To"] == "camille.martin@example.org"
    assert msg["Subject"] == "Un nouveau message dans votre messagerie de santé"
    assert msg["Auto-Submitted"] == "auto-generated"  # RFC 3834
    assert "Vous avez un nouveau message dans votre messagerie de santé." in text
    assert WEBMAIL in text and f'href="{WEBMAIL}"' in html
    # Accessible HTML: language, title, landmark, heading, a link that says where it goes.
    assert '<html lang="fr">' in html and "<title>" in html
    assert "<main" in html and "<h1" in html and ">Lire mes messages</a>" in html

    async with gw.store.reads() as s:
        (n,) = await s.scalars(select(Notification))
    assert n.status is NotificationStatus.SENT
    assert msg["Message-ID"] == n.email_message_id
    # VERP: the return path names this e-mail and authenticates it.
    return_path = msg["Return-Path"].strip("<>")
    token = gw.notifier.verp.token(return_path)
    assert token is not None and gw.notifier.verp.message_id(token) == n.email_message_id
    assert return_path.endswith("@" + gw.settings.notify.bounce_domain)


async def test_notification_dkim_signature_verifies_with_dkimpy(gw: Gateway) -> None:
    await send(gw, health_message([addr(demo.ACTIVATED)]))
    await gw.notifier.worker.run_once()
    (data,) = outbox(gw)
    signer = gw.notifier.signer
    lookup = dnsfunc({signer.key_name: signer.dns_record()})
    assert data.split(b"\r\n", 2)[1].startswith(b"DKIM-Signature:")
    assert dkimpy.verify(data, dnsfunc=lookup)
    assert not dkimpy.verify(data.replace(b"Bonjour", b"Bonsoir", 1), dnsfunc=lookup)
    assert b"d=notifications.patient.mssante.localhost" in data


@pytest.mark.parametrize("gw", [{"show_sender_name": True}], indirect=True)
async def test_sender_display_name_only_when_configured(gw: Gateway) -> None:
    await send(gw, health_message([addr(demo.ACTIVATED)]))
    await gw.notifier.worker.run_once()
    (data,) = outbox(gw)
    text, html = parts(parse(data))
    assert "Expéditeur : Dr Zoé Quokka, oncologue." in text  # the display name, as sent
    assert "QUOKKA-7731" not in text + html and "biopsie" not in text + html
    assert "anapath" not in text + html


async def test_created_profile_is_told_how_to_activate(gw: Gateway) -> None:
    await send(gw, health_message([addr(demo.CREATED_EMAIL)]))
    await gw.notifier.worker.run_once()
    (data,) = outbox(gw)
    assert_no_health_content(data)
    text, html = parts(parse(data))
    assert "Votre profil n'est pas encore activé" in text
    assert WEBMAIL + "activer" in text and ">Activer mon profil</a>" in html
    assert "Lire mes messages" not in html


async def test_minor_representatives_are_told_about_the_childs_mailbox(
    gw: Gateway, clock: FakeClock
) -> None:
    """Issue 6.6, DOMAIN.md 4: each legal representative, through their own channel,
    hears that the child's mailbox has a message, and nothing medical or naming."""
    await send(gw, health_message([addr(demo.MINOR)]))
    assert await notifier(gw, clock).worker.run_once() == 2
    mails = {parse(d)["To"]: d for d in outbox(gw)}
    assert set(mails) == {"camille.martin@example.org", "jean.dupont@example.org"}
    for data in mails.values():
        assert_no_health_content(data)  # nor the child's name (Lucas)
        msg = parse(data)
        text, _ = parts(msg)
        assert msg["Subject"] == "Un nouveau message dans la messagerie de santé de votre enfant"
        assert (
            "Un nouveau message est arrivé dans la messagerie de santé de votre enfant,"
            " que vous consultez en tant que représentant légal." in text
        )
        assert "dans votre messagerie de santé." not in text  # not their own mailbox
    # Each through their own profile: Camille activated, Jean not yet.
    assert "Lire mes messages" in parts(parse(mails["camille.martin@example.org"]))[1]
    assert "Activer mon profil" in parts(parse(mails["jean.dupont@example.org"]))[1]


async def test_own_and_childs_messages_in_one_email(gw: Gateway) -> None:
    await send(gw, health_message([addr(demo.ACTIVATED)]))
    await send(gw, health_message([addr(demo.MINOR)]))
    await send(gw, health_message([addr(demo.MINOR)]))
    await gw.notifier.worker.run_once()
    camille = next(d for d in outbox(gw) if parse(d)["To"] == "camille.martin@example.org")
    text, _ = parts(parse(camille))
    assert "Vous avez un nouveau message dans votre messagerie de santé." in text
    assert "2 nouveaux messages sont arrivés dans la messagerie de santé de votre enfant" in text
