"""The trust space over real TLS: STARTTLS required, operator certificates, whitelist."""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mssante import demo
from mssante.app import Gateway
from mssante.cli import seed_demo
from mssante.settings import TrustSettings
from mssante.smtp import replies
from tests.conftest import FakeClock, make_settings
from tests.pki import Issued, Pki, whitelist_xml
from tests.rawsmtp import RawSmtp

RCPT = f"{demo.ACTIVATED}@patient.mssante.fr"
CHU = "CN=smtp.chu-exemple.fr,OU=26750045200011,O=CHU Exemple,ST=Paris (75),C=FR"
OTHER = "CN=mx.operateur-exemple.fr,OU=81234567800019,O=Operateur Exemple,ST=Rhone (69),C=FR"


@dataclass
class TrustWorld:
    gw: Gateway
    pki: Pki
    whitelist: Path
    chu: Issued
    other: Issued

    def client_context(
        self, who: Issued | None, *, max_version: ssl.TLSVersion | None = None
    ) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=str(self.pki.anchors()))
        if max_version is not None:
            ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
            ctx.maximum_version = max_version
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        if who is not None:
            ctx.load_cert_chain(who.cert_path, who.key_path)
        return ctx

    async def session(self, who: Issued | None) -> RawSmtp:
        c = await RawSmtp.connect("127.0.0.1", self.gw.smtp.port)
        assert (await c.cmd("EHLO operator.test")).code == 250
        await c.starttls(self.client_context(who), server_hostname="mx.test.localhost")
        return c


@pytest.fixture
async def world(tmp_path: Path, db_url: str, clock: FakeClock) -> AsyncIterator[TrustWorld]:
    pki = Pki(tmp_path / "pki")
    server = pki.issue("server", "CN=mx.test.localhost,O=Operateur Usagers,C=FR", server=True)
    chu = pki.issue("chu", CHU)
    other = pki.issue("other", OTHER)
    whitelist = tmp_path / "listeblanche.xml"
    whitelist.write_text(
        whitelist_xml(
            {
                "chu-exemple.mssante.fr": CHU,
                "medecin.operateur-exemple.fr": OTHER,
            }
        )
    )
    settings = make_settings(
        tmp_path / "data",
        database_url=db_url,
        tls_cert=server.cert_path,
        tls_key=server.key_path,
        trust=TrustSettings(anchors=pki.anchors(), crls=[pki.crl()], whitelist=whitelist),
    )
    gw = Gateway(settings, clock=clock)
    await gw.start()
    await seed_demo(gw.store)
    try:
        yield TrustWorld(gw, pki, whitelist, chu, other)
    finally:
        await gw.stop()


def expect(reply, expected: replies.Reply) -> None:  # type: ignore[no-untyped-def]
    assert reply.code == expected.code, reply
    assert reply.lines[-1].startswith(f"{expected.enhanced} "), reply


async def test_good_operator_delivers(world: TrustWorld) -> None:
    c = await world.session(world.chu)
    await c.cmd("EHLO operator.test")
    expect(await c.cmd("MAIL FROM:<dr.durand@chu-exemple.mssante.fr>"), replies.SENDER_OK)
    expect(await c.cmd(f"RCPT TO:<{RCPT}>"), replies.RECIPIENT_OK)
    assert (await c.cmd("DATA")).code == 354
    await c.send(b"Subject: ok\r\n\r\nbody\r\n.\r\n")
    expect(await c.reply(), replies.MESSAGE_STORED)
    # Null sender (a bounce) from a listed operator.
    expect(await c.cmd("MAIL FROM:<>"), replies.SENDER_OK)
    await c.close()


async def test_plaintext_mail_refused(world: TrustWorld) -> None:
    c = await RawSmtp.connect("127.0.0.1", world.gw.smtp.port)
    await c.cmd("EHLO operator.test")
    expect(await c.cmd("MAIL FROM:<dr.durand@chu-exemple.mssante.fr>"), replies.TLS_REQUIRED)
    expect(await c.cmd(f"RCPT TO:<{RCPT}>"), replies.TLS_REQUIRED)
    await c.close()


async def test_no_client_certificate_refused_at_mail(world: TrustWorld) -> None:
    c = await world.session(None)
    await c.cmd("EHLO operator.test")
    expect(
        await c.cmd("MAIL FROM:<dr.durand@chu-exemple.mssante.fr>"), replies.CLIENT_CERT_REQUIRED
    )
    await c.close()


async def test_domain_not_in_trust_space(world: TrustWorld) -> None:
    c = await world.session(world.chu)
    await c.cmd("EHLO operator.test")
    r = await c.cmd("MAIL FROM:<someone@gmail.com>")
    expect(r, replies.DOMAIN_NOT_TRUSTED)
    assert "gmail.com" in r.text
    await c.close()


async def test_certificate_not_the_operator_of_that_domain(world: TrustWorld) -> None:
    c = await world.session(world.other)
    await c.cmd("EHLO operator.test")
    expect(await c.cmd("MAIL FROM:<dr.durand@chu-exemple.mssante.fr>"), replies.WRONG_OPERATOR)
    # Its own domain is fine.
    expect(await c.cmd("MAIL FROM:<dr.x@medecin.operateur-exemple.fr>"), replies.SENDER_OK)
    await c.close()


def _blocking_session(world: TrustWorld, who: Issued) -> None:
    with smtplib.SMTP("127.0.0.1", world.gw.smtp.port, timeout=10) as client:
        client.ehlo("operator.test")
        client.starttls(context=world.client_context(who))
        # TLS 1.3: the server checks the certificate after the client's
        # Finished, so the alert arrives on the first read.
        client.ehlo("operator.test")


async def _handshake_refused(
    world: TrustWorld, who: Issued, alert: str, logged: str, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises((ssl.SSLError, smtplib.SMTPServerDisconnected)) as err:
        await asyncio.to_thread(_blocking_session, world, who)
    assert alert in str(err.value), err.value
    assert f"TLS handshake failed: {logged}" in caplog.text


async def test_untrusted_chain_refused_in_handshake(
    world: TrustWorld, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    stranger = Pki(tmp_path / "stranger", prefix="OTHER")
    intruder = stranger.issue("intruder", CHU)  # right DN, another PKI
    await _handshake_refused(world, intruder, "UNKNOWN_CA", "unable to get local issuer", caplog)


async def test_forged_chain_with_the_same_ca_names_refused(
    world: TrustWorld, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    forger = Pki(tmp_path / "forger")  # same CA names as the real ones, other keys
    forged = forger.issue("forged", CHU)
    await _handshake_refused(
        world, forged, "DECRYPT_ERROR", "certificate signature failure", caplog
    )


async def test_expired_certificate_refused_in_handshake(
    world: TrustWorld, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    old = world.pki.issue("old", CHU, expired=True)
    await _handshake_refused(world, old, "CERTIFICATE_EXPIRED", "certificate has expired", caplog)


async def test_revoked_certificate_refused_after_crl_reload(
    world: TrustWorld, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    # Good before the CRL names it...
    c = await world.session(world.chu)
    assert (await c.cmd("EHLO operator.test")).code == 250
    await c.close()
    world.pki.revoke(world.chu.cert)
    world.pki.crl()
    assert world.gw.trust.reload()  # what SIGHUP and the file watch do
    await _handshake_refused(world, world.chu, "CERTIFICATE_REVOKED", "certificate revoked", caplog)
    # ...and other operators are unaffected.
    c = await world.session(world.other)
    await c.cmd("EHLO operator.test")
    expect(await c.cmd("MAIL FROM:<dr.x@medecin.operateur-exemple.fr>"), replies.SENDER_OK)
    await c.close()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
@pytest.mark.parametrize("version", ["TLSv1", "TLSv1_1"])
async def test_old_tls_versions_refused(world: TrustWorld, version: str) -> None:
    c = await RawSmtp.connect("127.0.0.1", world.gw.smtp.port)
    await c.cmd("EHLO operator.test")
    with pytest.raises((ssl.SSLError, ConnectionError)):  # noqa: PT012 - handshake, then read
        await c.starttls(
            world.client_context(world.chu, max_version=ssl.TLSVersion[version]),
            server_hostname="mx.test.localhost",
        )
        await c.cmd("EHLO operator.test")


async def test_whitelist_reload_and_malformed_file_keeps_previous(
    world: TrustWorld, caplog: pytest.LogCaptureFixture
) -> None:
    world.whitelist.write_text(
        whitelist_xml(
            {
                "chu-exemple.mssante.fr": CHU,
                "ehpad-les-tilleuls.mssante.fr": CHU,
            }
        )
    )
    assert world.gw.trust.reload_if_changed()
    c = await world.session(world.chu)
    await c.cmd("EHLO operator.test")
    expect(await c.cmd("MAIL FROM:<accueil@ehpad-les-tilleuls.mssante.fr>"), replies.SENDER_OK)
    await c.close()

    world.whitelist.write_text("<ListeBlanche><broken")
    assert not world.gw.trust.reload()
    assert "trust reload failed" in caplog.text
    c = await world.session(world.chu)
    await c.cmd("EHLO operator.test")
    expect(await c.cmd("MAIL FROM:<accueil@ehpad-les-tilleuls.mssante.fr>"), replies.SENDER_OK)
    await c.close()


async def test_starttls_command_injection_cve_2011_0411(world: TrustWorld) -> None:
    """CVE-2011-0411 (Postfix), CVE-2021-38371 (Exim): commands pipelined in clear
    after STARTTLS must not run inside the TLS session."""
    c = await RawSmtp.connect("127.0.0.1", world.gw.smtp.port)
    await c.cmd("EHLO operator.test")
    await c.send(b"STARTTLS\r\nMAIL FROM:<evil@chu-exemple.mssante.fr>\r\n")
    r = await c.reply()
    assert r.code == 220, r
    await c.writer.start_tls(world.client_context(world.chu), server_hostname="mx.test.localhost")
    # The first reply inside TLS answers our EHLO, not the injected MAIL.
    r = await c.cmd("EHLO operator.test")
    assert r.code == 250 and r.lines[0] == "mx.test.localhost", r
    expect(await c.cmd("MAIL FROM:<dr.durand@chu-exemple.mssante.fr>"), replies.SENDER_OK)
    await c.close()


def test_sample_whitelist_of_the_domain_docs_reads() -> None:
    from mssante.routing.trust import parse_dn, read_whitelist

    # A copy of shared/samples/listeblanche-sample.xml (the published format).
    sample = Path(__file__).parent / "data" / "listeblanche-sample.xml"
    listed = read_whitelist(sample)
    assert listed["chu-exemple.mssante.fr"] == parse_dn(CHU)
    # DN order and attribute case do not matter.
    assert parse_dn(
        "c=FR,st=Paris (75),o=CHU Exemple,ou=26750045200011,cn=smtp.chu-exemple.fr"
    ) == parse_dn(CHU)
    assert listed["pharmacie.operateur-exemple.fr"] == parse_dn(OTHER)
