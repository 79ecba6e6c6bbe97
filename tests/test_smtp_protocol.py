"""The SMTP dialogue over a real socket: EHLO, sizes, framing, smuggling, errors."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from sqlalchemy import select, text

from mssante import demo
from mssante.app import Gateway
from mssante.smtp import replies
from mssante.store.blobs import BlobStore
from mssante.store.models import Message
from mssante.store.reading import read_view
from tests.conftest import FakeClock, make_settings
from tests.rawsmtp import RawSmtp

DOCTOR = "dr.durand@chu-exemple.mssante.fr"
RCPT = f"{demo.ACTIVATED}@patient.mssante.fr"


def expect(reply, expected: replies.Reply) -> None:  # type: ignore[no-untyped-def]
    assert reply.code == expected.code, reply
    assert reply.lines[-1].startswith(f"{expected.enhanced} "), reply


async def open_transaction(gw: Gateway) -> RawSmtp:
    c = await RawSmtp.connect("127.0.0.1", gw.smtp.port)
    assert (await c.cmd("EHLO client.test")).code == 250
    assert (await c.cmd(f"MAIL FROM:<{DOCTOR}>")).code == 250
    assert (await c.cmd(f"RCPT TO:<{RCPT}>")).code == 250
    r = await c.cmd("DATA")
    assert r.code == 354, r
    return c


async def stored(gw: Gateway) -> list[Message]:
    async with gw.store.reads() as s:
        return list(await s.scalars(select(Message).order_by(Message.id)))


async def test_ehlo_advertises_extensions(gateway: Gateway) -> None:
    c = await RawSmtp.connect("127.0.0.1", gateway.smtp.port)
    r = await c.cmd("EHLO client.test")
    await c.close()
    keywords = {line.split()[0] for line in r.lines[1:]}
    assert {"SIZE", "PIPELINING", "ENHANCEDSTATUSCODES", "8BITMIME", "STARTTLS"} <= keywords
    assert "SIZE 200000" in r.lines


async def test_declared_size_over_limit_refused_at_mail(gateway: Gateway) -> None:
    c = await RawSmtp.connect("127.0.0.1", gateway.smtp.port)
    await c.cmd("EHLO client.test")
    r = await c.cmd(f"MAIL FROM:<{DOCTOR}> SIZE=200001")
    expect(r, replies.SIZE_DECLARED_TOO_BIG)
    assert "200000" in r.text
    # The session goes on: a smaller declaration is fine.
    assert (await c.cmd(f"MAIL FROM:<{DOCTOR}> SIZE=1000")).code == 250
    await c.close()


async def test_oversize_data_refused_and_nothing_kept(gateway: Gateway) -> None:
    c = await open_transaction(gateway)
    line = b"z" * 78 + b"\r\n"
    await c.send(b"Subject: big\r\n\r\n" + line * 3000 + b".\r\n")  # 240 KB > 200 KB
    expect(await c.reply(), replies.SIZE_EXCEEDED)
    # The session is still in step: a normal message goes through.
    assert (await c.cmd(f"MAIL FROM:<{DOCTOR}>")).code == 250
    assert (await c.cmd(f"RCPT TO:<{RCPT}>")).code == 250
    assert (await c.cmd("DATA")).code == 354
    await c.send(b"Subject: small\r\n\r\nok\r\n.\r\n")
    expect(await c.reply(), replies.MESSAGE_STORED)
    await c.close()
    assert [m.size for m in await stored(gateway)] == [len(b"Subject: small\r\n\r\nok\r\n")]
    assert list((gateway.store.data_dir / "spool").rglob("*.tmp")) == []


async def test_oversize_25mb_default_streams_without_holding_it(
    data_dir: Path, db_url: str, clock: FakeClock
) -> None:
    from mssante.cli import seed_demo

    gw = Gateway(make_settings(data_dir, database_url=db_url), clock=clock)  # default limit: 25 MB
    await gw.start()
    await seed_demo(gw.store)
    try:
        c = await open_transaction(gw)
        block = (b"A" * 998 + b"\r\n") * 1000  # 1 MB
        await c.send(b"Subject: big\r\n\r\n")
        for _ in range(26):
            await c.send(block)
        await c.send(b".\r\n")
        r = await c.reply()
        expect(r, replies.SIZE_EXCEEDED)
        assert "25000000" in r.text
        await c.close()
        assert await stored(gw) == []
    finally:
        await gw.stop()


@pytest.mark.parametrize(
    "mark",
    [b"\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\r\n\x00.\r\n", b"\r.\n"],
    ids=[
        "lf-dot-lf",
        "lf-dot-crlf",
        "cr-dot-crlf",
        "crlf-dot-cr",
        "crlf-nul-dot-crlf",
        "cr-dot-lf",
    ],
)
async def test_smtp_smuggling_cve_2023_51764(gateway: Gateway, mark: bytes) -> None:
    """SMTP smuggling (CVE-2023-51764/51765/51766): a fake end of data followed by
    a second transaction must not be taken as commands nor stored."""
    c = await open_transaction(gateway)
    smuggled = (
        f"MAIL FROM:<{DOCTOR}>\r\nRCPT TO:<{RCPT}>\r\nDATA\r\nSubject: smuggled\r\n\r\nevil\r\n"
    ).encode()
    await c.send(b"Subject: carrier\r\n\r\nbody" + mark + smuggled + b".\r\n")
    r = await c.reply()
    assert r.code == 554, r
    assert r.lines[-1].startswith("5.6.0 ")
    # Exactly one reply came: the smuggled commands were data.
    await c.send(b"NOOP\r\n")
    assert (await c.reply()).code == 250
    await c.close()
    assert await stored(gateway) == []


async def test_bare_lf_line_endings_refused(gateway: Gateway) -> None:
    c = await open_transaction(gateway)
    await c.send(b"Subject: unix\n\nbody\n\r\n.\r\n")
    expect(await c.reply(), replies.BARE_LINE_ENDING)
    await c.close()


async def test_line_over_998_octets_refused(gateway: Gateway) -> None:
    c = await open_transaction(gateway)
    await c.send(b"Subject: long\r\n\r\n" + b"x" * 999 + b"\r\n.\r\n")
    expect(await c.reply(), replies.LINE_TOO_LONG)
    await c.close()
    assert await stored(gateway) == []


async def test_pipelined_commands_after_data(gateway: Gateway) -> None:
    c = await RawSmtp.connect("127.0.0.1", gateway.smtp.port)
    await c.cmd("EHLO client.test")
    # RFC 2920: the whole transaction, the end of data and QUIT in one write.
    await c.send(
        f"MAIL FROM:<{DOCTOR}>\r\nRCPT TO:<{RCPT}>\r\nDATA\r\n".encode()
        + b"Subject: pipelined\r\n\r\nhi\r\n.\r\nQUIT\r\n"
    )
    codes = [(await c.reply()).code for _ in range(5)]
    assert codes == [250, 250, 354, 250, 221]
    await c.close()
    (m,) = await stored(gateway)
    meta = await read_view(gateway.store.reads, gateway.store.keyring, m.ref)
    assert meta.subject == "pipelined"


async def test_data_before_rcpt_and_commands_out_of_order(gateway: Gateway) -> None:
    c = await RawSmtp.connect("127.0.0.1", gateway.smtp.port)
    await c.cmd("EHLO client.test")
    await c.cmd(f"MAIL FROM:<{DOCTOR}>")
    await c.cmd(f"RCPT TO:<{demo.OPPOSED}@patient.mssante.fr>")
    expect(await c.cmd("DATA"), replies.NEED_RCPT)
    await c.close()


async def test_internal_error_is_451_with_log_id_and_no_detail(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    # A real failure inside the store: the audit table vanished under us.
    async with gateway.store.write_engine.begin() as conn:
        await conn.execute(text("DROP TABLE audit_events"))
    c = await open_transaction(gateway)
    await c.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    r = await c.reply()
    await c.close()
    expect(r, replies.INTERNAL_ERROR)
    assert "audit" not in r.text.lower() and "Error" not in r.text and "Traceback" not in r.text
    log_id = r.text.split("(ref ")[1].split(")")[0]
    assert any(log_id in rec.getMessage() for rec in caplog.records)


async def test_disk_full_is_452(gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    # The disk is the outside world: make the blob commit hit ENOSPC.
    def full(self: BlobStore, spool: object) -> str:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(BlobStore, "commit", full)
    c = await open_transaction(gateway)
    await c.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    expect(await c.reply(), replies.STORAGE_FULL)
    await c.close()
    assert await stored(gateway) == []


async def test_starttls_with_dev_certificate(gateway: Gateway) -> None:
    import ssl

    ctx = ssl.create_default_context(cafile=str(gateway.store.data_dir / "tls" / "dev-ca.pem"))
    c = await RawSmtp.connect("127.0.0.1", gateway.smtp.port)
    await c.cmd("EHLO client.test")
    await c.starttls(ctx, server_hostname="mx.test.localhost")
    await c.cmd("EHLO client.test")
    await c.cmd(f"MAIL FROM:<{DOCTOR}>")
    assert (await c.cmd(f"RCPT TO:<{RCPT}>")).code == 250
    assert (await c.cmd("DATA")).code == 354
    await c.send(b"Subject: tls\r\n\r\nbody\r\n.\r\n")
    expect(await c.reply(), replies.MESSAGE_STORED)
    await c.close()
    (m,) = await stored(gateway)
    assert b"with ESMTPS (TLSv1.3)" in m.trace_header


async def test_every_reply_has_an_enhanced_code(gateway: Gateway) -> None:
    """RFC 2034 3: with ENHANCEDSTATUSCODES advertised, every reply but the
    greeting and the EHLO lines carries one, including aiosmtpd's own."""
    c = await RawSmtp.connect("127.0.0.1", gateway.smtp.port)
    assert (await c.cmd("MAIL FROM:<a@b.c>")).enhanced == "5.5.1"  # before EHLO
    await c.cmd("EHLO client.test")
    commands = [
        "RCPT TO:<x@y.z>",  # before MAIL
        "DATA",
        "BOGUS",
        "MAIL FROM:<<<>",
        f"MAIL FROM:<{DOCTOR}> FOO=BAR",
        f"MAIL FROM:<{DOCTOR}>",
        f"MAIL FROM:<{DOCTOR}>",  # nested
        "RCPT TO:<no-at-sign>",
        "RCPT TO:<a@patient.mssante.fr.>",
        "VRFY someone",
        "EXPN list",
        "NOOP",
        "RSET",
        "DATA extra",
        "QUIT",
    ]
    for command in commands:
        r = await c.cmd(command)
        assert r.enhanced, f"{command!r} -> {r}"
        assert r.enhanced[0] == str(r.code)[0], f"{command!r} -> {r}"
    await c.close()


async def test_logs_carry_no_ins_nor_content(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    c = await RawSmtp.connect("127.0.0.1", gateway.smtp.port)
    await c.cmd("EHLO client.test")
    await c.cmd(f"MAIL FROM:<{DOCTOR}>")
    for rcpt in (RCPT, f"{demo.OPPOSED}@patient.mssante.fr", f"{demo.ACTIVATED}@elsewhere.org"):
        await c.cmd(f"RCPT TO:<{rcpt}>")
    await c.cmd("DATA")
    await c.send(b"Subject: Resultats VIH\r\n\r\nconfidentiel\r\n.\r\n")
    assert (await c.reply()).code == 250
    await c.close()
    text = "\n".join(rec.getMessage() for rec in caplog.records)
    assert "RCPT accepted ins=p-" in text
    for secret in (demo.ACTIVATED, demo.OPPOSED, "VIH", "confidentiel"):
        assert secret not in text


async def test_smtputf8_advertised_and_required_for_non_ascii(gateway: Gateway) -> None:
    c = await RawSmtp.connect("127.0.0.1", gateway.smtp.port)
    r = await c.cmd("EHLO client.test")
    assert "SMTPUTF8" in r.lines
    expect(
        await c.cmd("MAIL FROM:<médecin@chu-exemple.mssante.fr>"),
        replies.NON_ASCII_WITHOUT_SMTPUTF8,
    )
    expect(await c.cmd(f"MAIL FROM:<{DOCTOR}>"), replies.SENDER_OK)
    expect(await c.cmd("RCPT TO:<é@patient.mssante.fr>"), replies.NON_ASCII_WITHOUT_SMTPUTF8)
    await c.cmd("RSET")
    expect(await c.cmd("MAIL FROM:<médecin@chu-exemple.mssante.fr> SMTPUTF8"), replies.SENDER_OK)
    expect(await c.cmd(f"RCPT TO:<{RCPT}>"), replies.RECIPIENT_OK)
    await c.close()


async def test_header_section_limit(gateway: Gateway) -> None:
    c = await open_transaction(gateway)
    header = b"".join(b"X-Filler-%06d: %s\r\n" % (i, b"v" * 900) for i in range(300))  # 280 KB
    await c.send(header + b"\r\nbody\r\n.\r\n")
    r = await c.reply()
    expect(r, replies.HEADER_TOO_BIG)
    await c.close()
    assert await stored(gateway) == []


async def test_big_body_after_small_header_is_fine(gateway: Gateway) -> None:
    c = await open_transaction(gateway)
    await c.send(b"Subject: x\r\n\r\n" + (b"y" * 900 + b"\r\n") * 190 + b".\r\n")  # 171 KB
    expect(await c.reply(), replies.MESSAGE_STORED)
    await c.close()


async def test_command_line_too_long(gateway: Gateway) -> None:
    c = await RawSmtp.connect("127.0.0.1", gateway.smtp.port)
    await c.cmd("EHLO client.test")
    r = await c.cmd("NOOP " + "x" * 2000)
    expect(r, replies.COMMAND_TOO_LONG)
    assert (await c.cmd("NOOP")).code == 250  # still in step
    await c.close()
