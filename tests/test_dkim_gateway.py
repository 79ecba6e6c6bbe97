"""DKIM in the gateway: results stored beside the message, per-domain policy."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import select

from mssante import demo
from mssante.app import Gateway
from mssante.cli import seed_demo
from mssante.dkim import DkimSigner, StaticResolver, generate_key
from mssante.settings import DkimSettings
from mssante.smtp import replies
from mssante.store.models import Message
from tests.conftest import FakeClock, make_settings
from tests.rawsmtp import RawSmtp
from tests.test_gateway import DOCTOR, addr, professional_message

REQUIRED = "chu-exemple.mssante.fr"


@pytest.fixture
def signer() -> DkimSigner:
    return DkimSigner(
        domain=REQUIRED, selector="mss2026", private_key_pem=generate_key("ed25519-sha256")
    )


@pytest.fixture
def resolver(signer: DkimSigner) -> StaticResolver:
    return StaticResolver({signer.key_name: signer.dns_record()})


@pytest.fixture
async def gw(
    tmp_path: Path, db_url: str, clock: FakeClock, resolver: StaticResolver
) -> AsyncIterator[Gateway]:
    settings = make_settings(tmp_path / "data", database_url=db_url).model_copy(
        update={"dkim": DkimSettings(required_domains=[REQUIRED])}
    )
    gateway = Gateway(settings, clock=clock, dns=resolver)
    await gateway.start()
    await seed_demo(gateway.store)
    try:
        yield gateway
    finally:
        await gateway.stop()


async def transact(gw: Gateway, raw: bytes, sender: str = DOCTOR):  # type: ignore[no-untyped-def]
    c = await RawSmtp.connect("127.0.0.1", gw.smtp.port)
    await c.cmd("EHLO client.test")
    await c.cmd(f"MAIL FROM:<{sender}>")
    assert (await c.cmd(f"RCPT TO:<{addr(demo.ACTIVATED)}>")).code == 250
    assert (await c.cmd("DATA")).code == 354
    stuffed = b"".join(
        (b"." + line if line.startswith(b".") else line) for line in raw.splitlines(keepends=True)
    )
    await c.send(stuffed + b".\r\n")
    r = await c.reply()
    await c.close()
    return r


def wire(msg) -> bytes:  # type: ignore[no-untyped-def]
    return bytes(msg.as_bytes(policy=msg.policy.clone(linesep="\r\n")))


async def test_signed_message_passes_and_result_is_kept_beside_it(
    gw: Gateway, signer: DkimSigner
) -> None:
    raw = wire(professional_message([addr(demo.ACTIVATED)]))
    signed = await signer.sign(raw) + raw
    r = await transact(gw, signed)
    assert r.code == 250, r
    async with gw.store.reads() as s:
        (m,) = await s.scalars(select(Message))
    assert m.trace_header.startswith(b"Authentication-Results: mx.test.localhost;")
    assert b"dkim=pass header.d=chu-exemple.mssante.fr" in m.trace_header
    assert b"\r\nReceived: from " in m.trace_header
    assert await gw.store.read_original(m.ref) == signed  # received bytes untouched


async def test_unsigned_mail_from_a_required_domain_is_refused(gw: Gateway) -> None:
    raw = wire(professional_message([addr(demo.ACTIVATED)]))
    r = await transact(gw, raw)
    assert (r.code, r.enhanced) == (550, "5.7.22"), r
    assert REQUIRED in r.text
    assert list((gw.store.data_dir / "spool").rglob("*.tmp")) == []


async def test_altered_signed_message_is_refused(gw: Gateway, signer: DkimSigner) -> None:
    raw = wire(professional_message([addr(demo.ACTIVATED)], body="Resultat : normal\n"))
    signed = await signer.sign(raw) + raw
    r = await transact(gw, signed.replace(b"normal", b"anormal"))
    assert (r.code, r.enhanced) == (550, "5.7.22"), r


async def test_key_lookup_failure_is_temporary(
    gw: Gateway, signer: DkimSigner, resolver: StaticResolver
) -> None:
    resolver.temp_fail.add(signer.key_name)  # type: ignore[attr-defined]
    raw = wire(professional_message([addr(demo.ACTIVATED)]))
    r = await transact(gw, await signer.sign(raw) + raw)
    assert (r.code, r.enhanced) == (replies.DKIM_TEMPORARY.code, replies.DKIM_TEMPORARY.enhanced)


async def test_other_domains_need_no_signature(gw: Gateway) -> None:
    other = "dr.x@medecin.operateur-exemple.fr"
    raw = wire(professional_message([addr(demo.ACTIVATED)], sender=other))
    r = await transact(gw, raw, sender=other)
    assert r.code == 250, r
    async with gw.store.reads() as s:
        (m,) = await s.scalars(select(Message))
    assert b"dkim=none" in m.trace_header
