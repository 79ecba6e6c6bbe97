"""Submission for professional clients, and no relay from any listener."""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mssante import demo
from mssante.app import Gateway
from mssante.cli import seed_demo
from mssante.smtp import replies
from mssante.store.accounts import add_account, certificate_fingerprint, hash_password
from tests.conftest import FakeClock, make_settings
from tests.rawsmtp import RawSmtp

PRO = "dr.martin@cabinet-exemple.mssante.fr"
PASSWORD = "correct horse battery staple"
RCPT = f"{demo.ACTIVATED}@patient.mssante.fr"


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


@pytest.fixture
async def gw(tmp_path: Path, db_url: str, clock: FakeClock) -> AsyncIterator[Gateway]:
    gateway = Gateway(make_settings(tmp_path / "data", database_url=db_url), clock=clock)
    await gateway.start()
    await seed_demo(gateway.store)
    hashed = await hash_password(PASSWORD)
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    dev_op = x509.load_pem_x509_certificate(
        (gateway.store.data_dir / "tls" / "dev-operator.pem").read_bytes()
    )

    async def job(session):  # type: ignore[no-untyped-def]
        await add_account(
            session,
            address=PRO,
            at=clock.now(),
            actor="t",
            password_hash=hashed,
            aliases=["secretariat@cabinet-exemple.mssante.fr"],
        )
        await add_account(
            session,
            address="dpi@chu-exemple.mssante.fr",
            at=clock.now(),
            actor="t",
            certificate_sha256=certificate_fingerprint(dev_op.public_bytes(Encoding.DER)),
        )
        await add_account(
            session,
            address="gone@cabinet-exemple.mssante.fr",
            at=clock.now(),
            actor="t",
            password_hash=hashed,
        )

    await gateway.store.writer.run(job)
    from mssante.store.accounts import disable_account

    await gateway.store.writer.run(
        lambda s: disable_account(s, "gone@cabinet-exemple.mssante.fr", at=clock.now(), actor="t")
    )
    try:
        yield gateway
    finally:
        await gateway.stop()


def tls_context(gw: Gateway, *, client_cert: bool = False) -> ssl.SSLContext:
    tls = gw.store.data_dir / "tls"
    ctx = ssl.create_default_context(cafile=str(tls / "dev-ca.pem"))
    if client_cert:
        ctx.load_cert_chain(tls / "dev-operator.pem", tls / "dev-operator.key")
    return ctx


async def submission(gw: Gateway, *, client_cert: bool = False) -> RawSmtp:
    c = await RawSmtp.connect("127.0.0.1", gw.submission[0].port)
    await c.cmd("EHLO client.test")
    await c.starttls(tls_context(gw, client_cert=client_cert), server_hostname="mx.test.localhost")
    r = await c.cmd("EHLO client.test")
    assert any(line.startswith("AUTH ") for line in r.lines), r
    return c


def expect(reply, expected: replies.Reply) -> None:  # type: ignore[no-untyped-def]
    assert reply.code == expected.code, reply
    assert reply.lines[-1].startswith(f"{expected.enhanced} "), reply


async def test_password_account_submits_to_a_patient(gw: Gateway) -> None:
    c = await submission(gw)
    expect(await c.cmd(f"AUTH PLAIN {plain(PRO, PASSWORD)}"), replies.AUTH_OK)
    expect(
        await c.cmd("MAIL FROM:<someone.else@cabinet-exemple.mssante.fr>"), replies.SENDER_NOT_OWNED
    )
    expect(await c.cmd("MAIL FROM:<secretariat@cabinet-exemple.mssante.fr>"), replies.SENDER_OK)
    await c.cmd("RSET")
    expect(await c.cmd(f"MAIL FROM:<{PRO}>"), replies.SENDER_OK)
    expect(await c.cmd(f"RCPT TO:<{RCPT}>"), replies.RECIPIENT_OK)
    assert (await c.cmd("DATA")).code == 354
    await c.send(b"Subject: submitted\r\n\r\nbody\r\n.\r\n")
    expect(await c.reply(), replies.MESSAGE_STORED)
    await c.close()


async def test_auth_login_works_too(gw: Gateway) -> None:
    c = await submission(gw)
    assert (await c.cmd("AUTH LOGIN")).code == 334
    assert (await c.cmd(base64.b64encode(PRO.encode()).decode())).code == 334
    expect(await c.cmd(base64.b64encode(PASSWORD.encode()).decode()), replies.AUTH_OK)
    await c.close()


@pytest.mark.parametrize(
    ("user", "password"),
    [
        (PRO, "wrong"),
        ("nobody@cabinet-exemple.mssante.fr", PASSWORD),
        ("gone@cabinet-exemple.mssante.fr", PASSWORD),
    ],
    ids=["wrong-password", "unknown-account", "disabled-account"],
)
async def test_refused_credentials(gw: Gateway, user: str, password: str) -> None:
    c = await submission(gw)
    expect(await c.cmd(f"AUTH PLAIN {plain(user, password)}"), replies.AUTH_FAILED)
    expect(await c.cmd(f"MAIL FROM:<{user}>"), replies.AUTH_REQUIRED)
    await c.close()


async def test_no_auth_in_clear_and_no_mail_without_auth(gw: Gateway) -> None:
    c = await RawSmtp.connect("127.0.0.1", gw.submission[0].port)
    r = await c.cmd("EHLO client.test")
    assert not any(line.startswith("AUTH") for line in r.lines)
    assert (await c.cmd(f"AUTH PLAIN {plain(PRO, PASSWORD)}")).code in (530, 538)
    await c.close()
    c = await submission(gw)
    expect(await c.cmd(f"MAIL FROM:<{PRO}>"), replies.AUTH_REQUIRED)
    await c.close()


async def test_external_with_a_bound_certificate(gw: Gateway) -> None:
    c = await submission(gw, client_cert=True)
    expect(await c.cmd("AUTH EXTERNAL ="), replies.AUTH_OK)
    expect(await c.cmd("MAIL FROM:<dpi@chu-exemple.mssante.fr>"), replies.SENDER_OK)
    await c.close()
    c = await submission(gw)  # no certificate
    expect(await c.cmd("AUTH EXTERNAL ="), replies.AUTH_NO_CERTIFICATE)
    await c.close()


async def test_implicit_tls_port_offers_auth(tmp_path: Path, db_url: str, clock: FakeClock) -> None:
    """aiosmtpd 1.4.6 hides AUTH on implicit TLS (it only knows STARTTLS)."""
    settings = make_settings(tmp_path / "data", database_url=db_url)
    gw = Gateway(settings, clock=clock)
    await gw.start()
    try:
        hashed = await hash_password(PASSWORD)
        await gw.store.writer.run(
            lambda s: add_account(s, address=PRO, at=clock.now(), actor="t", password_hash=hashed)
        )
        port = gw.submission[1].port
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=tls_context(gw), server_hostname="mx.test.localhost"
        )
        c = RawSmtp(reader, writer)
        assert (await c.reply()).code == 220
        r = await c.cmd("EHLO client.test")
        assert any(line.startswith("AUTH ") for line in r.lines), r
        assert "STARTTLS" not in r.lines
        expect(await c.cmd(f"AUTH PLAIN {plain(PRO, PASSWORD)}"), replies.AUTH_OK)
        expect(await c.cmd(f"MAIL FROM:<{PRO}>"), replies.SENDER_OK)
        await c.close()
    finally:
        await gw.stop()


async def test_password_hashing_does_not_block_the_loop() -> None:
    ticks = 0
    done = False

    async def ticker() -> None:
        nonlocal ticks
        while not done:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    before = ticks
    await hash_password(PASSWORD)  # argon2id: tens of ms of CPU
    done = True
    await task
    assert ticks - before > 1  # the loop kept running meanwhile


# --- never an open relay ------------------------------------------------------------------

FOREIGN = [
    "someone@example.org",
    f"{demo.ACTIVATED}@example.org",
    f"{demo.ACTIVATED}@patient.mssante.fr.evil.org",
    f"{demo.ACTIVATED}%example.org@patient.mssante.fr",
    "someone%example.org@patient.mssante.fr",
    '"someone@example.org"@patient.mssante.fr',
    "@relay.example.org:someone@example.org",
    f"{demo.ACTIVATED}@patient.mssante.fr.",
    "someone@[192.0.2.1]",
    "SOMEONE@EXAMPLE.ORG",
    "postmaster@patient.mssante.fr",
]


async def _mx_plain(gw: Gateway) -> RawSmtp:
    c = await RawSmtp.connect("127.0.0.1", gw.smtp.port)
    await c.cmd("EHLO client.test")
    return c


async def _mx_tls(gw: Gateway) -> RawSmtp:
    c = await _mx_plain(gw)
    await c.starttls(tls_context(gw, client_cert=True), server_hostname="mx.test.localhost")
    await c.cmd("EHLO client.test")
    return c


async def _submission_auth(gw: Gateway) -> RawSmtp:
    c = await submission(gw)
    expect(await c.cmd(f"AUTH PLAIN {plain(PRO, PASSWORD)}"), replies.AUTH_OK)
    return c


@pytest.mark.parametrize("path", ["mx-plain", "mx-tls", "submission-auth"])
async def test_never_an_open_relay(gw: Gateway, path: str) -> None:
    opener = {"mx-plain": _mx_plain, "mx-tls": _mx_tls, "submission-auth": _submission_auth}
    sender = PRO if path == "submission-auth" else "dr.durand@chu-exemple.mssante.fr"
    for rcpt in FOREIGN:
        c = await opener[path](gw)
        assert (await c.cmd(f"MAIL FROM:<{sender}>")).code == 250
        r = await c.cmd(f"RCPT TO:<{rcpt}>")
        assert 500 <= r.code < 600, (path, rcpt, r)
        await c.close()
    # ...while the patient domain itself, in any case, is served.
    c = await opener[path](gw)
    await c.cmd(f"MAIL FROM:<{sender}>")
    assert (await c.cmd(f"RCPT TO:<{demo.ACTIVATED}@Patient.MSSante.FR>")).code == 250
    await c.close()
