"""Interoperability with a real Postfix as a professional's operator (issue 7).

Postfix (tests/postfix.py: a private instance on loopback, started and
stopped by the test) runs the professional domain ``chu-exemple.mssante.fr``;
mssante runs in-process with the trust space on: STARTTLS and a whitelisted
client certificate required, anchors and CRL from tests/pki.py.

- A professional's message submitted to Postfix is relayed to mssante's MX
  over TLS with Postfix's client certificate, and stored byte for byte.
- With a certificate the whitelist does not list for that domain, or none,
  mssante refuses at MAIL and Postfix keeps the message deferred with that
  reply (``soft_bounce``): the trust check really ran on Postfix's session.
- The patient's reply (outbound/replies.py) is delivered by the outbound
  worker to Postfix's smtpd, mutual TLS both ways, and lands in the
  professional's Maildir, signed.

Without Postfix these tests fail (never skip): CI installs it (.ci/run).
"""

from __future__ import annotations

import asyncio
import atexit
import email
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import SMTP, default
from email.utils import make_msgid
from pathlib import Path
from typing import TypeVar

import dkim as dkimpy
import pytest
from sqlalchemy import select

from mssante import demo
from mssante.app import Gateway
from mssante.cli import seed_demo
from mssante.outbound.replies import Sent, reply
from mssante.outbound.worker import build_worker, load_signer
from mssante.settings import OutboundSettings, Settings, TrustSettings
from mssante.smtp import replies
from mssante.store.models import (
    Conversation,
    Delivery,
    Message,
    OutboundRecipient,
    OutboundStatus,
    Patient,
)
from tests.conftest import FakeClock, make_settings
from tests.pki import Issued, Pki, whitelist_xml
from tests.postfix import PostfixInstance, PostfixUnavailable, TlsFiles
from tests.test_dkim import dnsfunc

pytestmark = pytest.mark.slow

T = TypeVar("T")

PRO_DOMAIN = "chu-exemple.mssante.fr"
PRO_HOST = f"mx.{PRO_DOMAIN}"
# One operator certificate subject for Postfix's server and client certificates,
# the DNCertificatOperateur of its domain in the whitelist.
PRO_DN = f"CN={PRO_HOST},OU=26750045200011,O=CHU Exemple,ST=Paris (75),C=FR"
OTHER_DN = "CN=mx.operateur-exemple.fr,OU=81234567800019,O=Operateur Exemple,ST=Rhone (69),C=FR"
MSSANTE_HOST = "mx.test.localhost"  # make_settings' smtp.hostname, in the server certificate
MSSANTE_DN = f"CN={MSSANTE_HOST},O=Operateur Usagers,C=FR"
DOCTOR = f"dr.x@{PRO_DOMAIN}"
PATIENT = f"{demo.ACTIVATED}@patient.mssante.fr"
WAIT = 60.0  # seconds: Postfix's queue manager, pickup and smtp on a shared machine


@dataclass
class World:
    """One test PKI and whitelist, the certificates of both operators."""

    pki: Pki
    anchors: Path
    crl: Path
    whitelist: Path
    mssante_server: Issued
    mssante_client: Issued
    postfix_server: Issued
    postfix_client: Issued
    other_client: Issued  # right CA, subject listed for another domain

    def postfix(self, mssante_port: int, client: Issued | None, **extra: str) -> PostfixInstance:
        """Postfix as the operator of PRO_DOMAIN, relaying the patient domain to mssante."""
        return PostfixInstance(
            myhostname=PRO_HOST,
            domain=PRO_DOMAIN,
            mailboxes=["dr.x"],
            server=TlsFiles(
                self.postfix_server.cert_path, self.postfix_server.key_path, self.anchors
            ),
            relay={"patient.mssante.fr": f"127.0.0.1:{mssante_port}"},
            relay_match=MSSANTE_HOST,
            relay_anchors=self.anchors,
            client=None
            if client is None
            else TlsFiles(client.cert_path, client.key_path, self.anchors),
            extra=extra,
        )


@pytest.fixture
def world(tmp_path: Path) -> World:
    pki = Pki(tmp_path / "pki")
    whitelist = tmp_path / "listeblanche.xml"
    whitelist.write_text(
        whitelist_xml({PRO_DOMAIN: PRO_DN, "medecin.operateur-exemple.fr": OTHER_DN})
    )
    return World(
        pki=pki,
        anchors=pki.anchors(),
        crl=pki.crl(),
        whitelist=whitelist,
        mssante_server=pki.issue("mssante-server", MSSANTE_DN, server=True),
        mssante_client=pki.issue("mssante-client", MSSANTE_DN),
        postfix_server=pki.issue("postfix-server", PRO_DN, server=True),
        postfix_client=pki.issue("postfix-client", PRO_DN),
        other_client=pki.issue("other-client", OTHER_DN),
    )


@pytest.fixture
def clock() -> FakeClock:
    # Real time: Postfix, OpenSSL and DKIM verification all read the real clock.
    return FakeClock(datetime.now(UTC))


@pytest.fixture
def postfixes() -> Iterator[list[PostfixInstance]]:
    """Instances a test started: all stopped (no process left) and removed after it."""
    started: list[PostfixInstance] = []
    yield started
    problems = []
    for instance in started:
        try:
            instance.remove()
        except AssertionError as exc:
            problems.append(str(exc))
    assert not problems, problems


async def start_postfix(
    postfixes: list[PostfixInstance], make: Callable[[], PostfixInstance]
) -> PostfixInstance:
    """Make and start an instance; no Postfix here fails the test, saying what to install."""
    problem = ""
    try:
        instance = make()
        postfixes.append(instance)  # stopped and removed after the test, started or not
        atexit.register(instance.kill)  # should the session end without teardown
        await asyncio.to_thread(instance.start)
    except PostfixUnavailable as exc:
        problem = str(exc)
    if problem:  # outside the except: the message alone, not a chained traceback
        pytest.fail(problem, pytrace=False)
    return instance


def settings_for(world: World, data_dir: Path) -> Settings:
    settings = make_settings(
        data_dir,
        tls_cert=world.mssante_server.cert_path,
        tls_key=world.mssante_server.key_path,
        trust=TrustSettings(anchors=world.anchors, crls=[world.crl], whitelist=world.whitelist),
    )
    assert settings.smtp.require_tls and settings.trust.require_client_certificate
    return settings.model_copy(
        update={
            "outbound": OutboundSettings(
                worker_enabled=False,  # the test runs the passes, once Postfix's port is known
                client_cert=world.mssante_client.cert_path,
                client_key=world.mssante_client.key_path,
                timeout=30.0,
            )
        }
    )


@pytest.fixture
async def patient_mx(world: World, data_dir: Path, clock: FakeClock) -> AsyncIterator[Gateway]:
    gw = Gateway(settings_for(world, data_dir), clock=clock)
    await gw.start()
    await seed_demo(gw.store)
    try:
        yield gw
    finally:
        await gw.stop()


async def eventually(
    check: Callable[[], Awaitable[T | None]], what: str, postfix: PostfixInstance
) -> T:
    """Poll ``check`` until it returns a value, for at most WAIT seconds."""
    deadline = time.monotonic() + WAIT
    while True:
        found = await check()
        if found is not None:
            return found
        if time.monotonic() > deadline:
            queue = await asyncio.to_thread(postfix.queue_entries)
            pytest.fail(
                f"{what}: not within {WAIT:.0f} s\nPostfix queue: {queue}\n"
                f"Postfix log:\n{postfix.log_text()[-4000:]}"
            )
        await asyncio.sleep(0.1)


def professional_message(subject: str = "Compte rendu de consultation") -> bytes:
    msg = EmailMessage()
    msg["From"] = f"Dr X <{DOCTOR}>"
    msg["To"] = PATIENT
    msg["Subject"] = subject
    msg["Date"] = "Mon, 23 Nov 2026 10:00:00 +0100"
    msg["Message-ID"] = make_msgid(domain=PRO_DOMAIN)
    msg.set_content("Bonjour,\n\nVoici le compte rendu de votre consultation du 20 novembre.\n")
    return msg.as_bytes(policy=SMTP)


async def stored_messages(gw: Gateway) -> list[Message]:
    async with gw.store.reads() as s:
        return list(await s.scalars(select(Message).order_by(Message.id)))


async def submit_and_wait_stored(gw: Gateway, postfix: PostfixInstance, original: bytes) -> Message:
    await asyncio.to_thread(postfix.sendmail, original, sender=DOCTOR, recipients=[PATIENT])

    async def stored() -> Message | None:
        messages = await stored_messages(gw)
        assert len(messages) <= 1, "stored twice"
        return messages[0] if messages else None

    return await eventually(stored, "the message relayed by Postfix stored by mssante", postfix)


def header_names(section: bytes) -> list[str]:
    return [m.decode() for m in re.findall(rb"^([!-9;-~]+):", section, re.MULTILINE)]


# --- inbound: a professional's message through Postfix ----------------------------------


async def test_postfix_relays_a_professional_message_to_the_patient(
    world: World, patient_mx: Gateway, postfixes: list[PostfixInstance]
) -> None:
    postfix = await start_postfix(
        postfixes, lambda: world.postfix(patient_mx.smtp.port, world.postfix_client)
    )
    original = professional_message()
    message = await submit_and_wait_stored(patient_mx, postfix, original)

    # Byte-identical: Postfix added its Received field; the rest is what was submitted.
    raw = await patient_mx.store.read_original(message.ref)
    assert raw.endswith(original), raw[:600]
    added = raw[: -len(original)]
    assert header_names(added) == ["Received"], added
    assert f"by {PRO_HOST} (Postfix, from userid 0)".encode() in added
    # Our trace: Postfix's EHLO, over TLS 1.2 or 1.3.
    trace = message.trace_header.decode()
    assert f"from {PRO_HOST} ([127.0.0.1])" in trace, trace
    assert re.search(r"with ESMTPS \(TLSv1\.[23]\)", trace), trace
    assert message.mail_from == DOCTOR
    # Delivered to the patient.
    async with patient_mx.store.reads() as s:
        owner = await s.scalar(
            select(Patient.ins).join(Delivery).where(Delivery.message_id == message.id)
        )
    assert owner == demo.ACTIVATED
    # Postfix's side: our certificate verified (level "secure"), our 250 with the ref.
    log = postfix.log_text()
    assert (
        f"Verified TLS connection established to 127.0.0.1[127.0.0.1]:{patient_mx.smtp.port}" in log
    )
    assert re.search(rf"to=<{re.escape(PATIENT)}>.*status=sent \(250 2\.0\.0 .*{message.ref}", log)
    assert await asyncio.to_thread(postfix.queue_entries) == []


@pytest.mark.parametrize(
    ("who", "expected"),
    [("other operator", replies.WRONG_OPERATOR), ("no certificate", replies.CLIENT_CERT_REQUIRED)],
)
async def test_postfix_without_the_listed_certificate_is_refused_and_keeps_the_message(
    world: World,
    patient_mx: Gateway,
    postfixes: list[PostfixInstance],
    who: str,
    expected: replies.Reply,
) -> None:
    """The trust check ran on Postfix's real session: a chain that verifies but a
    subject not listed for chu-exemple.mssante.fr, or no certificate, is refused
    at MAIL; soft_bounce keeps the message in Postfix's queue with our reply."""
    client = world.other_client if who == "other operator" else None
    postfix = await start_postfix(
        postfixes, lambda: world.postfix(patient_mx.smtp.port, client, soft_bounce="yes")
    )
    await asyncio.to_thread(
        postfix.sendmail, professional_message(), sender=DOCTOR, recipients=[PATIENT]
    )

    async def deferred() -> str | None:
        for entry in await asyncio.to_thread(postfix.queue_entries):
            for rcpt in entry["recipients"]:  # type: ignore[attr-defined]
                if entry["queue_name"] == "deferred" and rcpt.get("delay_reason"):
                    return str(rcpt["delay_reason"])
        return None

    reason = await eventually(deferred, "the message deferred in Postfix's queue", postfix)
    assert f"said: {expected.code} {expected.enhanced} " in reason, reason
    assert "(in reply to MAIL FROM command)" in reason, reason
    log = postfix.log_text()
    # Postfix 3.x logs a 5xx kept by soft_bounce as SOFTBOUNCE.
    assert re.search(rf"to=<{re.escape(PATIENT)}>.*status=SOFTBOUNCE \(host 127\.0\.0\.1", log)
    # Over verified TLS, Postfix's certificate presented (or not) as the case says.
    (tls,) = re.findall(r"Verified TLS connection established to .*", log)
    assert ("client-signature" in tls) is (client is not None), tls
    assert await stored_messages(patient_mx) == []


# --- outbound: the patient's reply reaches the professional's mailbox ------------------


async def test_patient_reply_reaches_the_professional_mailbox_through_postfix(
    world: World, patient_mx: Gateway, postfixes: list[PostfixInstance], clock: FakeClock
) -> None:
    postfix = await start_postfix(
        postfixes, lambda: world.postfix(patient_mx.smtp.port, world.postfix_client)
    )
    original = professional_message(subject="Résultats d'analyse")
    received = await submit_and_wait_stored(patient_mx, postfix, original)
    async with patient_mx.store.reads() as s:
        patient_id = await s.scalar(select(Patient.id).where(Patient.ins == demo.ACTIVATED))
        conversation_id = await s.scalar(
            select(Conversation.id).where(Conversation.patient_id == patient_id)
        )
    assert patient_id is not None and conversation_id is not None
    body = "Merci docteur, je viendrai mardi à 9 h.\n"
    sent = await reply(
        patient_mx.store,
        patient_id=patient_id,
        conversation_id=conversation_id,
        body_text=body,
        attachments=[],
        at=clock.now(),
    )
    assert isinstance(sent, Sent), sent

    # The outbound worker, routed to Postfix's smtpd (outbound.routes).
    settings = patient_mx.settings.model_copy(
        update={
            "outbound": patient_mx.settings.outbound.model_copy(
                update={"routes": {PRO_DOMAIN: f"127.0.0.1:{postfix.port}"}}
            )
        }
    )
    # mssante checks Postfix's server certificate: chain to the anchors, the
    # address it connected to, subject = the DN listed for chu-exemple.
    assert settings.outbound.verify_operator_dn
    worker = build_worker(settings, patient_mx.store, patient_mx.trust, clock=clock)
    assert await worker.run_until_idle() == 1
    async with patient_mx.store.reads() as s:
        (row,) = await s.scalars(select(OutboundRecipient))
    assert row.status is OutboundStatus.SENT, (row.last_error, postfix.log_text()[-3000:])
    assert row.address == DOCTOR

    async def delivered() -> bytes | None:
        mails = postfix.maildir("dr.x")
        return mails[0] if mails else None

    mail = await eventually(delivered, "the reply in dr.x's Maildir", postfix)
    msg = email.message_from_bytes(mail, policy=default)
    assert isinstance(msg, EmailMessage)
    sent_ids = email.message_from_bytes(original, policy=default)
    assert msg["In-Reply-To"] == sent_ids["Message-ID"] == received.message_id
    assert msg["References"] == sent_ids["Message-ID"]
    assert msg["Subject"] == "Re: Résultats d'analyse"
    assert msg["From"].addresses[0].addr_spec == PATIENT
    assert msg["Delivered-To"] == DOCTOR
    assert msg.get_body(("plain",)).get_content() == body  # type: ignore[union-attr]
    # Signed for the patient domain, and still verifying after Postfix's relay.
    assert "DKIM-Signature" in msg
    signer = load_signer(settings, clock)
    assert dkimpy.verify(
        mail.replace(b"\n", b"\r\n"), dnsfunc=dnsfunc({signer.key_name: signer.dns_record()})
    )
    # Mutual TLS: Postfix verified our client certificate (its Received field and log).
    postfix_trace = str(msg.get_all("Received")[0])
    assert f'(Client CN "{MSSANTE_HOST}", Issuer ' in postfix_trace, postfix_trace
    assert "(verified OK)" in postfix_trace, postfix_trace
    assert "Trusted TLS connection established from" in postfix.log_text()
