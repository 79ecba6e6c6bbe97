"""CHUNKING / BDAT (RFC 3030) over a real socket, and the receiver in BDAT mode.

The gateway offers CHUNKING without BINARYMIME: chunks are counted in
octets (no dot transparency, no end mark) but the assembled message gets
the same content checks as DATA.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import re
import socket
import ssl
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import select

from mssante import demo
from mssante.app import Gateway
from mssante.cli import seed_demo
from mssante.smtp import replies
from mssante.smtp.data import DataProblem, DataReceiver
from mssante.store.accounts import add_account, hash_password
from mssante.store.blobs import Spool
from mssante.store.models import Message
from tests.conftest import FakeClock, make_settings
from tests.rawsmtp import RawSmtp, bdat_chunk

DOCTOR = "dr.durand@chu-exemple.mssante.fr"
RCPT = f"{demo.ACTIVATED}@patient.mssante.fr"
ENVELOPE = f"MAIL FROM:<{DOCTOR}>\r\nRCPT TO:<{RCPT}>\r\n".encode()


def expect(reply, expected: replies.Reply) -> None:  # type: ignore[no-untyped-def]
    assert reply.code == expected.code, reply
    assert reply.lines[-1].startswith(f"{expected.enhanced} "), reply
    assert reply.text == str(expected)[4:] or "{" in expected.text, reply


def stored_ref(reply) -> str:  # type: ignore[no-untyped-def]
    expect(reply, replies.MESSAGE_STORED)
    found = re.search(r"ref ([0-9a-f]+)", reply.text)
    assert found, reply
    return found[1]


async def connect(gw: Gateway) -> RawSmtp:
    c = await RawSmtp.connect("127.0.0.1", gw.smtp.port)
    r = await c.cmd("EHLO client.test")
    assert "CHUNKING" in r.lines, r
    return c


async def open_transaction(gw: Gateway) -> RawSmtp:
    c = await connect(gw)
    expect(await c.cmd(f"MAIL FROM:<{DOCTOR}>"), replies.SENDER_OK)
    expect(await c.cmd(f"RCPT TO:<{RCPT}>"), replies.RECIPIENT_OK)
    return c


async def stored(gw: Gateway) -> list[Message]:
    async with gw.store.reads() as s:
        return list(await s.scalars(select(Message).order_by(Message.id)))


def spool_files(gw: Gateway) -> list[Path]:
    return list(gw.store.blobs.spool_dir.iterdir())


async def still_in_step(c: RawSmtp) -> None:
    """Exactly one reply per command so far: the next NOOP's reply is the next one."""
    await c.send(b"NOOP\r\n")
    expect(await c.reply(), replies.OK)


MESSAGE = (
    b"From: Dr Durand <dr.durand@chu-exemple.mssante.fr>\r\n"
    b"Subject: compte rendu en plusieurs blocs\r\n"
    b"\r\n"
    + b"".join(b"ligne %04d du compte rendu, rien de particulier\r\n" % i for i in range(400))
)


# --- EHLO --------------------------------------------------------------------------


async def test_ehlo_advertises_chunking_not_binarymime(gateway: Gateway) -> None:
    c = await RawSmtp.connect("127.0.0.1", gateway.smtp.port)
    r = await c.cmd("EHLO client.test")
    await c.close()
    assert "CHUNKING" in r.lines
    assert "BINARYMIME" not in r.lines
    # RFC 3030 3: BODY=BINARYMIME needs BINARYMIME, which is not offered.
    c = await connect(gateway)
    assert (await c.cmd(f"MAIL FROM:<{DOCTOR}> BODY=BINARYMIME")).code == 501
    await c.close()


# --- delivery ------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [[1], [7, 300, 1], [4096], [len(MESSAGE) - 1]], ids=str)
async def test_message_in_several_chunks_arrives_byte_identical(
    gateway: Gateway, sizes: list[int]
) -> None:
    c = await open_transaction(gateway)
    pos = 0
    for size in sizes:
        piece = MESSAGE[pos : pos + size]
        r = await c.bdat(piece)
        expect(r, replies.CHUNK_RECEIVED)
        assert f"{len(piece)} octets" in r.text
        pos += size
    ref = stored_ref(await c.bdat(MESSAGE[pos:], last=True))
    await still_in_step(c)
    await c.close()
    assert await gateway.store.read_original(ref) == MESSAGE
    (m,) = await stored(gateway)
    assert m.size == len(MESSAGE)
    assert spool_files(gateway) == []


async def test_chunks_are_spooled_encrypted_on_arrival(gateway: Gateway) -> None:
    c = await open_transaction(gateway)
    expect(await c.bdat(MESSAGE[:5000]), replies.CHUNK_RECEIVED)
    (spool,) = spool_files(gateway)  # written as it arrived, not held in memory
    assert b"compte rendu" not in spool.read_bytes()
    stored_ref(await c.bdat(MESSAGE[5000:], last=True))
    await c.close()


# A DATA end mark, lines starting with a dot and a whole second transaction:
# with BDAT all of it is content, kept as sent (no dot-unstuffing).
DOTTY = (
    b"Subject: points\r\n"
    b"\r\n"
    b".une ligne qui commence par un point\r\n"
    b"..deux points\r\n"
    b".\r\n"
    b"MAIL FROM:<evil@example.org>\r\n"
    b"RCPT TO:<" + RCPT.encode() + b">\r\n"
    b"DATA\r\n"
    b"Subject: smuggled\r\n"
    b"\r\n"
    b"evil\r\n"
    b".\r\n"
    b"QUIT\r\n"
)


END = DOTTY.index(b"\r\n.\r\n")


@pytest.mark.parametrize("cut", [None, END + 2, END + 3])
async def test_end_marks_and_leading_dots_are_data(gateway: Gateway, cut: int | None) -> None:
    c = await open_transaction(gateway)
    if cut is not None:
        expect(await c.bdat(DOTTY[:cut]), replies.CHUNK_RECEIVED)
    ref = stored_ref(await c.bdat(DOTTY[cut or 0 :], last=True))
    await still_in_step(c)
    await c.close()
    assert await gateway.store.read_original(ref) == DOTTY
    assert len(await stored(gateway)) == 1  # one message, nothing smuggled out of it


async def test_bdat_0_last_ends_the_message(gateway: Gateway) -> None:
    c = await open_transaction(gateway)
    expect(await c.bdat(MESSAGE), replies.CHUNK_RECEIVED)
    ref = stored_ref(await c.bdat(b"", last=True))
    # And a message made of BDAT 0 LAST alone is the empty message.
    expect(await c.cmd(f"MAIL FROM:<{DOCTOR}>"), replies.SENDER_OK)
    expect(await c.cmd(f"RCPT TO:<{RCPT}>"), replies.RECIPIENT_OK)
    empty = stored_ref(await c.cmd("BDAT 0 LAST"))
    await c.close()
    assert await gateway.store.read_original(ref) == MESSAGE
    assert await gateway.store.read_original(empty) == b""


async def test_last_line_without_crlf_kept_as_sent(gateway: Gateway) -> None:
    c = await open_transaction(gateway)
    body = b"Subject: x\r\n\r\nno final line ending"
    ref = stored_ref(await c.bdat(body, last=True))
    await c.close()
    assert await gateway.store.read_original(ref) == body  # never rewritten


async def test_keyword_last_in_any_case_and_lenient_spaces(gateway: Gateway) -> None:
    c = await open_transaction(gateway)
    body = b"Subject: x\r\n\r\nok\r\n"
    await c.send(b"BDAT %d  last\r\n" % len(body) + body)
    stored_ref(await c.reply())
    await c.close()


# --- pipelining and segmentation (RFC 2920) ----------------------------------------------


async def test_several_bdats_pipelined_in_one_write(gateway: Gateway) -> None:
    c = await connect(gateway)
    a, b, rest = MESSAGE[:100], MESSAGE[100:2000], MESSAGE[2000:]
    await c.send(
        ENVELOPE
        + bdat_chunk(a)
        + bdat_chunk(b)
        + bdat_chunk(rest, last=True)
        + ENVELOPE
        + bdat_chunk(DOTTY, last=True)
        + b"QUIT\r\n"
    )
    got = [await c.reply() for _ in range(9)]
    assert [r.code for r in got] == [250] * 8 + [221], got
    assert "100 octets" in got[2].text and "1900 octets" in got[3].text
    first, second = stored_ref(got[4]), stored_ref(got[7])
    await c.close()
    assert await gateway.store.read_original(first) == MESSAGE
    assert await gateway.store.read_original(second) == DOTTY


async def test_chunk_split_over_many_tcp_writes(gateway: Gateway) -> None:
    c = await open_transaction(gateway)
    sock = c.writer.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    wire = bdat_chunk(DOTTY[:300]) + bdat_chunk(DOTTY[300:], last=True)
    # The command line itself and the octets come one by one.
    for i in range(len(wire)):
        await c.send(wire[i : i + 1])
    expect(await c.reply(), replies.CHUNK_RECEIVED)
    ref = stored_ref(await c.reply())
    await c.close()
    assert await gateway.store.read_original(ref) == DOTTY


async def test_chunk_arrives_in_two_parts_after_the_server_started_it(gateway: Gateway) -> None:
    c = await open_transaction(gateway)
    half = len(MESSAGE) // 2
    # The NOOP's reply proves the server read up to BDAT (and the first half
    # with it, same write) before the second half is even sent.
    await c.send(b"NOOP\r\n" + b"BDAT %d LAST\r\n" % len(MESSAGE) + MESSAGE[:half])
    expect(await c.reply(), replies.OK)
    with pytest.raises(TimeoutError):
        await c.reply(timeout=0.2)  # no reply before the chunk is complete
    await c.send(MESSAGE[half:])
    ref = stored_ref(await c.reply())
    await c.close()
    assert await gateway.store.read_original(ref) == MESSAGE


async def test_crlf_split_across_chunks_is_a_line_ending(gateway: Gateway) -> None:
    c = await open_transaction(gateway)
    cut = MESSAGE.index(b"\r\n", 100) + 1  # chunk 1 ends with CR, chunk 2 starts with LF
    expect(await c.bdat(MESSAGE[:cut]), replies.CHUNK_RECEIVED)
    ref = stored_ref(await c.bdat(MESSAGE[cut:], last=True))
    await c.close()
    assert await gateway.store.read_original(ref) == MESSAGE


# --- sequence (RFC 3030 2) ------------------------------------------------------------------

# If a refused chunk's octets were taken for commands, these would run.
SMUGGLED_COMMANDS = b"RSET\r\nMAIL FROM:<evil@example.org>\r\nNOOP\r\nQUIT\r\n"


async def test_bdat_before_ehlo_mail_or_rcpt_refused_and_chunk_dropped(gateway: Gateway) -> None:
    c = await RawSmtp.connect("127.0.0.1", gateway.smtp.port)
    expect(await c.bdat(SMUGGLED_COMMANDS), replies.HELO_FIRST)
    await still_in_step(c)
    await c.cmd("EHLO client.test")
    expect(await c.bdat(SMUGGLED_COMMANDS, last=True), replies.NEED_MAIL)
    await still_in_step(c)
    expect(await c.cmd(f"MAIL FROM:<{DOCTOR}>"), replies.SENDER_OK)
    expect(await c.bdat(SMUGGLED_COMMANDS), replies.NEED_RCPT)
    refused = await c.cmd(f"RCPT TO:<{demo.OPPOSED}@patient.mssante.fr>")
    assert refused.code == 550
    expect(await c.bdat(SMUGGLED_COMMANDS, last=True), replies.NEED_RCPT)
    await still_in_step(c)
    # The transaction itself is intact: a recipient, then BDAT works.
    expect(await c.cmd(f"RCPT TO:<{RCPT}>"), replies.RECIPIENT_OK)
    ref = stored_ref(await c.bdat(MESSAGE, last=True))
    await c.close()
    assert [m.ref for m in await stored(gateway)] == [ref]


async def test_data_after_bdat_refused_and_transaction_dropped(gateway: Gateway) -> None:
    c = await open_transaction(gateway)
    expect(await c.bdat(MESSAGE[:1000]), replies.CHUNK_RECEIVED)
    expect(await c.cmd("DATA"), replies.DATA_AFTER_BDAT)
    assert spool_files(gateway) == []
    # RFC 3030 2: the state is indeterminate; here the transaction is over.
    expect(await c.bdat(MESSAGE[1000:], last=True), replies.NEED_MAIL)
    expect(await c.cmd("RSET"), replies.OK)
    # DATA and BDAT in one session, separate transactions, are fine.
    expect(await c.cmd(f"MAIL FROM:<{DOCTOR}>"), replies.SENDER_OK)
    expect(await c.cmd(f"RCPT TO:<{RCPT}>"), replies.RECIPIENT_OK)
    assert (await c.cmd("DATA")).code == 354
    await c.send(b"Subject: data\r\n\r\nvia DATA\r\n.\r\n")
    stored_ref(await c.reply())
    await c.close()
    assert len(await stored(gateway)) == 1


async def test_rset_in_the_middle_discards_the_chunks(gateway: Gateway) -> None:
    c = await open_transaction(gateway)
    expect(await c.bdat(b"Subject: abandoned\r\n\r\nfirst part\r\n"), replies.CHUNK_RECEIVED)
    assert len(spool_files(gateway)) == 1
    expect(await c.cmd("RSET"), replies.OK)
    assert spool_files(gateway) == []
    expect(await c.bdat(b"second part\r\n", last=True), replies.NEED_MAIL)
    expect(await c.cmd(f"MAIL FROM:<{DOCTOR}>"), replies.SENDER_OK)
    expect(await c.cmd(f"RCPT TO:<{RCPT}>"), replies.RECIPIENT_OK)
    ref = stored_ref(await c.bdat(MESSAGE, last=True))
    await c.close()
    assert await gateway.store.read_original(ref) == MESSAGE  # nothing of the first
    assert len(await stored(gateway)) == 1


async def test_ehlo_in_the_middle_discards_the_chunks(gateway: Gateway) -> None:
    c = await open_transaction(gateway)
    expect(await c.bdat(MESSAGE[:100]), replies.CHUNK_RECEIVED)
    assert (await c.cmd("EHLO client.test")).code == 250
    assert spool_files(gateway) == []
    expect(await c.bdat(MESSAGE[100:], last=True), replies.NEED_MAIL)
    await c.close()
    assert await stored(gateway) == []


@pytest.mark.parametrize(
    "argument",
    ["", "abc", "-1", "+5", "0x10", "1.5", "10 NOTLAST", "10 LAST extra", "\uff11\uff10"],
    ids=repr,
)
async def test_malformed_bdat_gets_501_and_the_connection_closes(
    gateway: Gateway, argument: str
) -> None:
    c = await open_transaction(gateway)
    # Whatever follows could be chunk data or commands: none of it is run.
    await c.send(f"BDAT {argument}".rstrip().encode() + b"\r\n" + SMUGGLED_COMMANDS)
    expect(await c.reply(), replies.BDAT_SYNTAX)
    assert await c.closed_by_server()
    await c.close()
    assert await stored(gateway) == []


# --- limits ------------------------------------------------------------------------


async def test_size_limit_counts_across_chunks(gateway: Gateway) -> None:
    line = b"z" * 78 + b"\r\n"
    c = await open_transaction(gateway)
    expect(await c.bdat(b"Subject: big\r\n\r\n" + line * 1500), replies.CHUNK_RECEIVED)  # 120 KB
    # 240 KB in all > 200 KB: refused on the chunk that crosses the limit,
    # after its octets were read; the third, already pipelined, is dropped.
    await c.send(bdat_chunk(line * 1500) + bdat_chunk(line * 10, last=True))
    r = await c.reply()
    expect(r, replies.SIZE_EXCEEDED)
    assert "200000" in r.text
    expect(await c.reply(), replies.NEED_MAIL)
    await still_in_step(c)
    assert spool_files(gateway) == []
    # The session goes on.
    expect(await c.cmd(f"MAIL FROM:<{DOCTOR}>"), replies.SENDER_OK)
    expect(await c.cmd(f"RCPT TO:<{RCPT}>"), replies.RECIPIENT_OK)
    stored_ref(await c.bdat(MESSAGE, last=True))
    await c.close()
    assert [m.size for m in await stored(gateway)] == [len(MESSAGE)]


async def test_one_chunk_over_the_limit_is_read_and_refused(gateway: Gateway) -> None:
    c = await open_transaction(gateway)
    chunk = (b"Subject: huge\r\n\r\n" + b"y" * 98 + b"\r\n") * 2100  # 250 KB
    expect(await c.bdat(chunk + SMUGGLED_COMMANDS, last=True), replies.SIZE_EXCEEDED)
    await still_in_step(c)
    await c.close()
    assert await stored(gateway) == []


async def test_exactly_the_limit_is_accepted(gateway: Gateway) -> None:
    c = await open_transaction(gateway)
    head = b"Subject: exact\r\n\r\n"
    body = head + (b"w" * 98 + b"\r\n") * ((200_000 - len(head)) // 100)
    body += b"v" * (200_000 - len(body) - 2) + b"\r\n"
    assert len(body) == 200_000
    expect(await c.bdat(body[:150_000]), replies.CHUNK_RECEIVED)
    ref = stored_ref(await c.bdat(body[150_000:], last=True))
    await c.close()
    assert await gateway.store.read_original(ref) == body


async def test_header_section_limit_across_chunks(
    data_dir: Path, db_url: str, clock: FakeClock
) -> None:
    gw = Gateway(make_settings(data_dir, database_url=db_url, max_header_size=5000), clock=clock)
    await gw.start()
    await seed_demo(gw.store)
    try:
        header = b"".join(b"X-Filler-%04d: %s\r\n" % (i, b"v" * 80) for i in range(100))
        c = await open_transaction(gw)
        expect(await c.bdat(header[:3000]), replies.CHUNK_RECEIVED)
        r = await c.bdat(header[3000:6000])
        expect(r, replies.HEADER_TOO_BIG)
        assert "5000" in r.text
        expect(await c.bdat(header[6000:] + b"\r\nbody\r\n", last=True), replies.NEED_MAIL)
        # The same size is fine once the header section has ended.
        expect(await c.cmd(f"MAIL FROM:<{DOCTOR}>"), replies.SENDER_OK)
        expect(await c.cmd(f"RCPT TO:<{RCPT}>"), replies.RECIPIENT_OK)
        cut = 30 * (len(header) // 100)  # at a line start
        expect(await c.bdat(header[:cut] + b"\r\n"), replies.CHUNK_RECEIVED)
        stored_ref(await c.bdat(header[cut:], last=True))
        await c.close()
        assert len(await stored(gw)) == 1
    finally:
        await gw.stop()


# --- content checks, as DATA (RFC 5321 2.3.8, 4.5.3.1.6; RFC 5322 2.1) ------------------------


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
@pytest.mark.parametrize("chunked", [False, True], ids=["one-chunk", "two-chunks"])
async def test_smtp_smuggling_bare_lf_in_bdat_cve_2023_51764(
    gateway: Gateway, mark: bytes, chunked: bool
) -> None:
    """SMTP smuggling (CVE-2023-51764/51765/51766) inside BDAT data: a fake end of
    data and a second transaction are refused content of one message, never a
    second message, and never commands."""
    smuggled = (
        f"MAIL FROM:<{DOCTOR}>\r\nRCPT TO:<{RCPT}>\r\nDATA\r\nSubject: smuggled\r\n\r\nevil\r\n"
    ).encode()
    payload = b"Subject: carrier\r\n\r\nbody" + mark + smuggled + b".\r\n"
    c = await open_transaction(gateway)
    if chunked:
        cut = len(b"Subject: carrier\r\n\r\nbody") + 1  # inside the mark
        await c.send(bdat_chunk(payload[:cut]) + bdat_chunk(payload[cut:], last=True))
        first = await c.reply()
        r = first if first.code != 250 else await c.reply()
        if first.code != 250:
            expect(await c.reply(), replies.NEED_MAIL)  # the LAST chunk, dropped
    else:
        r = await c.bdat(payload, last=True)
    assert r.code == 554, r
    assert r.lines[-1].startswith("5.6.0 ")
    await still_in_step(c)
    await c.close()
    assert await stored(gateway) == []
    assert spool_files(gateway) == []


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"Subject: unix\n\nbody\n", replies.BARE_LINE_ENDING),
        (b"Subject: x\r\n\r\nbody\rmore\r\n", replies.BARE_LINE_ENDING),
        (b"Subject: x\r\n\r\nends with a bare CR\r", replies.BARE_LINE_ENDING),
        (b"Subject: x\r\n\r\nnul \x00 here\r\n", replies.NUL_IN_DATA),
        (b"Subject: x\r\n\r\n" + b"x" * 999 + b"\r\n", replies.LINE_TOO_LONG),
        (b"Subject: x\r\n\r\n" + b"x" * 999, replies.LINE_TOO_LONG),
    ],
    ids=["bare-lf", "bare-cr", "final-bare-cr", "nul", "long-line", "long-last-line"],
)
async def test_content_refused_as_with_data(
    gateway: Gateway, content: bytes, expected: replies.Reply
) -> None:
    c = await open_transaction(gateway)
    expect(await c.bdat(content, last=True), expected)
    await still_in_step(c)
    await c.close()
    assert await stored(gateway) == []


async def test_long_line_spanning_two_chunks_refused_on_the_second(gateway: Gateway) -> None:
    c = await open_transaction(gateway)
    expect(await c.bdat(b"Subject: x\r\n\r\n" + b"x" * 600), replies.CHUNK_RECEIVED)
    # 600 + 399 = 999 octets before the CRLF: one too many.
    expect(await c.bdat(b"x" * 399 + b"\r\nmore\r\n"), replies.LINE_TOO_LONG)
    expect(await c.bdat(b"end\r\n", last=True), replies.NEED_MAIL)
    await c.close()
    assert await stored(gateway) == []


async def test_998_octet_lines_across_chunks_are_fine(gateway: Gateway) -> None:
    body = b"Subject: x\r\n\r\n" + (b"a" * 998 + b"\r\n") * 3 + b"b" * 998
    c = await open_transaction(gateway)
    expect(await c.bdat(body[:1500]), replies.CHUNK_RECEIVED)
    ref = stored_ref(await c.bdat(body[1500:], last=True))
    await c.close()
    assert await gateway.store.read_original(ref) == body


async def test_logs_carry_no_content(gateway: Gateway, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    c = await open_transaction(gateway)
    await c.bdat(b"Subject: Resultats VIH\r\n\r\n")
    stored_ref(await c.bdat(b"confidentiel\r\n", last=True))
    expect(await c.cmd(f"MAIL FROM:<{DOCTOR}>"), replies.SENDER_OK)
    expect(await c.cmd(f"RCPT TO:<{RCPT}>"), replies.RECIPIENT_OK)
    expect(await c.bdat(b"Subject: secret\n\nconfidentiel\n", last=True), replies.BARE_LINE_ENDING)
    await c.close()
    text = "\n".join(rec.getMessage() for rec in caplog.records)
    assert "BDAT refused: bare_line_ending" in text
    for secret in ("VIH", "confidentiel", "secret"):
        assert secret not in text


# --- TLS ---------------------------------------------------------------------------


def dev_tls(gw: Gateway) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(gw.store.data_dir / "tls" / "dev-ca.pem"))


async def test_bdat_over_starttls(gateway: Gateway) -> None:
    c = await RawSmtp.connect("127.0.0.1", gateway.smtp.port)
    await c.cmd("EHLO client.test")
    await c.starttls(dev_tls(gateway), server_hostname="mx.test.localhost")
    r = await c.cmd("EHLO client.test")
    assert "CHUNKING" in r.lines
    expect(await c.cmd(f"MAIL FROM:<{DOCTOR}>"), replies.SENDER_OK)
    expect(await c.cmd(f"RCPT TO:<{RCPT}>"), replies.RECIPIENT_OK)
    await c.send(bdat_chunk(DOTTY[:50]) + bdat_chunk(DOTTY[50:], last=True))
    expect(await c.reply(), replies.CHUNK_RECEIVED)
    ref = stored_ref(await c.reply())
    await c.close()
    assert await gateway.store.read_original(ref) == DOTTY
    (m,) = await stored(gateway)
    assert b"with ESMTPS (TLSv1.3)" in m.trace_header


async def test_chunks_sent_in_clear_do_not_survive_starttls(gateway: Gateway) -> None:
    c = await open_transaction(gateway)
    expect(await c.bdat(b"Subject: in clear\r\n\r\n"), replies.CHUNK_RECEIVED)
    await c.starttls(dev_tls(gateway), server_hostname="mx.test.localhost")
    await c.cmd("EHLO client.test")
    # RFC 3207 4.2: the session starts over; no transaction, no chunks.
    expect(await c.bdat(b"body\r\n", last=True), replies.NEED_MAIL)
    await c.close()
    assert spool_files(gateway) == []
    assert await stored(gateway) == []


async def test_submission_offers_chunking_after_auth(gateway: Gateway, clock: FakeClock) -> None:
    pro, password = "dr.martin@cabinet-exemple.mssante.fr", "correct horse battery staple"
    hashed = await hash_password(password)

    async def job(session):  # type: ignore[no-untyped-def]
        await add_account(session, address=pro, at=clock.now(), actor="t", password_hash=hashed)

    await gateway.store.writer.run(job)
    c = await RawSmtp.connect("127.0.0.1", gateway.submission[0].port)
    await c.cmd("EHLO client.test")
    await c.starttls(dev_tls(gateway), server_hostname="mx.test.localhost")
    r = await c.cmd("EHLO client.test")
    assert "CHUNKING" in r.lines, r
    # Before AUTH: refused as MAIL would be, and the chunk is not run.
    expect(await c.bdat(SMUGGLED_COMMANDS, last=True), replies.AUTH_REQUIRED)
    await still_in_step(c)
    token = base64.b64encode(f"\0{pro}\0{password}".encode()).decode()
    expect(await c.cmd(f"AUTH PLAIN {token}"), replies.AUTH_OK)
    expect(await c.cmd(f"MAIL FROM:<{pro}>"), replies.SENDER_OK)
    expect(await c.cmd(f"RCPT TO:<{RCPT}>"), replies.RECIPIENT_OK)
    expect(await c.bdat(MESSAGE[:777]), replies.CHUNK_RECEIVED)
    ref = stored_ref(await c.bdat(MESSAGE[777:], last=True))
    await c.close()
    assert await gateway.store.read_original(ref) == MESSAGE


# --- failures -----------------------------------------------------------------------


async def test_spool_failure_mid_chunk_reads_the_chunk_then_451(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The disk is the outside world: it fills up after the first write.
    write, writes = Spool.write, []

    def filling(self: Spool, data: bytes) -> None:
        if writes:
            raise OSError(errno.ENOSPC, "No space left on device")
        writes.append(len(data))
        write(self, data)

    monkeypatch.setattr(Spool, "write", filling)
    c = await open_transaction(gateway)
    expect(await c.bdat(MESSAGE[:100]), replies.CHUNK_RECEIVED)
    assert writes
    # The write fails on the chunk's first part; the rest (commands-looking
    # octets) is still read as the chunk, never run, and only then comes 451.
    rest = MESSAGE[100:] + SMUGGLED_COMMANDS
    await c.send(b"NOOP\r\n" + b"BDAT %d LAST\r\n" % len(rest) + MESSAGE[100:1000])
    expect(await c.reply(), replies.OK)
    with pytest.raises(TimeoutError):
        await c.reply(timeout=0.2)  # no reply before the chunk is complete
    await c.send(rest[900:])
    expect(await c.reply(), replies.INTERNAL_ERROR)
    await still_in_step(c)
    await c.close()
    assert spool_files(gateway) == []
    assert await stored(gateway) == []


# --- connection lost ---------------------------------------------------------------


@pytest.mark.parametrize("mid_chunk", [True, False], ids=["mid-chunk", "between-chunks"])
async def test_connection_lost_keeps_nothing(gateway: Gateway, mid_chunk: bool) -> None:
    c = await open_transaction(gateway)
    expect(await c.bdat(MESSAGE[:1000]), replies.CHUNK_RECEIVED)
    assert len(spool_files(gateway)) == 1
    if mid_chunk:
        await c.send(b"BDAT 5000 LAST\r\n" + MESSAGE[1000:3000])
    await c.close()
    # The server learns of the closed socket on its own schedule: poll (bounded).
    for _ in range(500):
        if not spool_files(gateway):
            break
        await asyncio.sleep(0.01)
    assert spool_files(gateway) == []
    assert await stored(gateway) == []


# --- the receiver alone, in BDAT mode ----------------------------------------------------


def receive_counted(
    content: bytes, cuts: list[int], *, max_size: int = 10_000_000, max_header: int = 256 * 1024
) -> tuple[bytes, DataProblem | None]:
    out = bytearray()
    rx = DataReceiver(out.extend, max_size, max_header, dot_transparency=False)
    pos = 0
    for cut in [*sorted(cuts), len(content)]:
        assert rx.feed(content[pos:cut]) is None  # no end mark in BDAT mode
        pos = cut
    rx.finish()
    return bytes(out), rx.problem


@given(
    st.lists(
        st.binary(max_size=60).filter(lambda b: b"\r" not in b and b"\n" not in b), max_size=30
    ),
    st.lists(st.integers(0, 2000), max_size=8),
    st.booleans(),
)
def test_property_clean_text_round_trips_whatever_the_chunks(
    lines: list[bytes], cuts: list[int], final_crlf: bool
) -> None:
    content = b"\r\n".join(line.replace(b"\x00", b"") for line in lines)
    if final_crlf and content:
        content += b"\r\n"
    cuts = [min(cut, len(content)) for cut in cuts]
    assert receive_counted(content, cuts) == (content, None)


def test_receiver_counts_header_and_size_across_chunks() -> None:
    header = b"A: " + b"x" * 95 + b"\r\n"  # 100 octets
    ok = header * 9 + b"\r\n" + header * 50
    assert receive_counted(ok, [5, 333, 950], max_header=1000)[1] is None
    too_big_header = header * 11 + b"\r\nbody\r\n"
    assert receive_counted(too_big_header, [500], max_header=1000)[1] is DataProblem.HEADER_TOO_BIG
    assert receive_counted(ok, [10], max_size=len(ok))[1] is None
    assert receive_counted(ok, [10], max_size=len(ok) - 1)[1] is DataProblem.TOO_BIG
    # Over the limit in an unfinished line: known on the chunk that crosses it.
    rx = DataReceiver(bytearray().extend, 100, dot_transparency=False)
    rx.feed(b"y" * 101)
    assert rx.problem is DataProblem.TOO_BIG


def test_receiver_does_not_buffer_an_endless_line() -> None:
    rx = DataReceiver(bytearray().extend, 10_000_000, dot_transparency=False)
    for _ in range(100):
        rx.feed(b"x" * 10_000)
        assert len(rx._tail) <= 1000
    assert rx.problem is DataProblem.LINE_TOO_LONG


def test_receiver_keeps_dots_and_end_marks() -> None:
    assert receive_counted(DOTTY, [17, 18, 19]) == (DOTTY, None)
    assert receive_counted(b".\r\n", []) == (b".\r\n", None)
