"""Bounce mode and the inbound DSN extension (issue #7 part 4), over a real socket.

``smtp.refusal = "dsn"``: a recipient refused for a patient cause is
accepted and reported to the sender in an RFC 3464 DSN queued in the
transaction that stores the message; RFC 3461 NOTIFY, RET, ENVID and ORCPT
are accepted (only when valid) and honoured.  Every DSN is read back from
the outbound queue and parsed with the email package.
"""

from __future__ import annotations

import base64
import email
import email.policy
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from email.message import EmailMessage, Message
from pathlib import Path

import pytest
from sqlalchemy import func, select

from mssante import demo
from mssante.app import Gateway, Role
from mssante.cli import seed_demo
from mssante.routing.ins import with_key
from mssante.settings import LimitsSettings
from mssante.smtp import replies
from mssante.smtp.dsn_parameters import xtext_decode
from mssante.store.accounts import add_account, hash_password
from mssante.store.models import (
    AuditEvent,
    Delivery,
    OutboundKind,
    OutboundMessage,
    OutboundRecipient,
)
from mssante.store.models import (
    Message as StoredMessage,
)
from tests.conftest import FakeClock, make_settings
from tests.rawsmtp import RawSmtp, Reply

DOMAIN = "patient.mssante.fr"
DOCTOR = "dr.durand@chu-exemple.mssante.fr"
HOSTNAME = "mx.test.localhost"  # make_settings
VALID = f"{demo.ACTIVATED}@{DOMAIN}"
VALID_2 = f"{demo.CREATED_EMAIL}@{DOMAIN}"
UNKNOWN = f"{with_key('1851275123999')}@{DOMAIN}"
OPPOSED = f"{demo.OPPOSED}@{DOMAIN}"
BAD_KEY = f"{demo.ACTIVATED[:13]}{(int(demo.ACTIVATED[13:]) % 97) + 1:02d}@{DOMAIN}"
BODY_SECRET = "Resultat confidentiel du patient"

StartGateway = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def start_gateway(
    data_dir: Path, db_url: str, clock: FakeClock
) -> AsyncIterator[StartGateway]:
    """Start a gateway with the given smtp settings (``refusal=...``) and limits.

    Without the notification and outbound workers: a queued DSN stays as
    queued, for the test to read.
    """
    started: list[Gateway] = []

    async def start(*, limits: LimitsSettings | None = None, **smtp: object) -> Gateway:
        settings = make_settings(data_dir, database_url=db_url, max_message_size=200_000, **smtp)
        if limits is not None:
            settings = settings.model_copy(update={"limits": limits})
        gw = Gateway(settings, clock=clock, roles={Role.GATEWAY})
        await gw.start()
        started.append(gw)
        await seed_demo(gw.store)
        return gw

    yield start
    for gw in started:
        await gw.stop()


def message_bytes(subject: str = "Compte rendu") -> bytes:
    msg = EmailMessage()
    msg["From"] = f"Dr Alice Durand <{DOCTOR}>"
    msg["To"] = VALID
    msg["Subject"] = subject
    msg["Message-ID"] = "<cr-42@chu-exemple.mssante.fr>"
    msg.set_content(BODY_SECRET)
    return msg.as_bytes(policy=email.policy.SMTP)


async def connect(gw: Gateway) -> RawSmtp:
    c = await RawSmtp.connect("127.0.0.1", gw.smtp.port)
    r = await c.cmd("EHLO client.test")
    assert r.code == 250
    assert "DSN" in r.lines  # RFC 3461 4
    return c


async def data(c: RawSmtp, content: bytes | None = None) -> Reply:
    assert (await c.cmd("DATA")).code == 354
    await c.send((content or message_bytes()) + b".\r\n")
    return await c.reply()


async def transaction(
    gw: Gateway, mail: str, rcpts: list[str], content: bytes | None = None
) -> tuple[Reply, list[Reply], Reply | None]:
    """MAIL, the RCPTs, then DATA if any recipient was accepted."""
    c = await connect(gw)
    try:
        mail_reply = await c.cmd(f"MAIL FROM:{mail}")
        assert mail_reply.code == 250, mail_reply
        rcpt_replies = [await c.cmd(f"RCPT TO:{r}") for r in rcpts]
        end = None
        if any(r.code == 250 for r in rcpt_replies):
            end = await data(c, content)
        return mail_reply, rcpt_replies, end
    finally:
        await c.close()


def expect(reply: Reply, expected: replies.Reply) -> None:
    assert (reply.code, reply.enhanced) == (expected.code, expected.enhanced), reply


async def queued_dsns(gw: Gateway) -> list[tuple[OutboundMessage, list[str], bytes]]:
    """Every queued outbound message: row, recipients and its bytes."""
    out = []
    async with gw.store.reads() as s:
        messages = list(
            (await s.execute(select(OutboundMessage).order_by(OutboundMessage.id))).scalars()
        )
        for m in messages:
            rcpts = list(
                (
                    await s.execute(
                        select(OutboundRecipient.address).where(
                            OutboundRecipient.outbound_id == m.id
                        )
                    )
                ).scalars()
            )
            out.append((m, rcpts, await gw.store.outbound.read(m)))
    return out


async def count(gw: Gateway, model: type[object]) -> int:
    async with gw.store.reads() as s:
        return int(await s.scalar(select(func.count()).select_from(model)) or 0)


def parse(raw: bytes) -> tuple[EmailMessage, str, list[Message], str]:
    """The DSN parsed back: message, human text, status blocks, attached headers."""
    # Well-formed for the wire: 7-bit, CRLF only, no line over 998 octets.
    assert raw.isascii()
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert not msg.defects
    text, status, headers = msg.iter_parts()
    assert text.get_content_type() == "text/plain"
    assert status.get_content_type() == "message/delivery-status"
    assert headers.get_content_type() == "text/rfc822-headers"
    blocks = status.get_payload()
    assert isinstance(blocks, list)
    return msg, text.get_content(), blocks, headers.get_content()


# --- rcpt mode (the default) is unchanged ------------------------------------------


async def test_rcpt_mode_refuses_at_rcpt_and_queues_nothing(start_gateway: StartGateway) -> None:
    gw = await start_gateway()
    _, (ok, unknown, opposed), end = await transaction(
        gw, f"<{DOCTOR}>", [f"<{VALID}>", f"<{UNKNOWN}>", f"<{OPPOSED}>"]
    )
    expect(ok, replies.RECIPIENT_OK)
    expect(unknown, replies.PATIENT_NOT_FOUND)
    expect(opposed, replies.MAILBOX_CLOSED)
    assert end is not None
    expect(end, replies.MESSAGE_STORED)
    assert await queued_dsns(gw) == []
    assert await count(gw, Delivery) == 1


# --- dsn mode ----------------------------------------------------------------------------


async def test_dsn_mode_mixed_recipients_store_once_and_queue_one_dsn(
    start_gateway: StartGateway,
) -> None:
    gw = await start_gateway(refusal="dsn")
    mail, rcpts, end = await transaction(
        gw,
        f"<{DOCTOR}> RET=HDRS ENVID=Lot-42+2BAbc",
        [
            f"<{VALID}>",
            f"<{UNKNOWN}> ORCPT=rfc822;{UNKNOWN.upper()}",
            f"<{OPPOSED}> NOTIFY=FAILURE,DELAY",
            f"<{BAD_KEY}>",
        ],
    )
    expect(mail, replies.SENDER_OK)
    for r in rcpts:  # each one accepted, with the reply of a valid address
        assert (r.code, r.text) == (250, str(replies.RECIPIENT_OK)[4:])
    assert end is not None
    expect(end, replies.MESSAGE_STORED)

    # The message is stored once, for the valid recipient only.
    assert await count(gw, StoredMessage) == 1
    assert await count(gw, Delivery) == 1
    # The refusals are audited as in rcpt mode.
    async with gw.store.reads() as s:
        causes = list(
            (
                await s.execute(
                    select(AuditEvent.details)
                    .where(AuditEvent.kind == "message.refused")
                    .order_by(AuditEvent.id)
                )
            ).scalars()
        )
    assert [c["cause"] for c in causes] == [
        "patient_not_found",
        "mailbox_closed",
        "invalid_address",
    ]

    [(row, to, raw)] = await queued_dsns(gw)
    assert row.kind is OutboundKind.DSN
    assert row.mail_from == ""  # RFC 3461 6.2: from the null reverse-path
    assert to == [DOCTOR]
    msg, text, blocks, headers = parse(raw)
    assert msg["Subject"] == "Message non distribué"
    assert msg["To"].addresses[0].addr_spec == DOCTOR
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Message-ID"] == row.message_id
    # French first, then English, one cause per refused recipient.
    assert text.index("patient non trouvé") < text.index("patient not found")
    for cause in ("messagerie fermée", "adresse invalide", "mailbox closed", "invalid address"):
        assert cause in text
    assert f"<{UNKNOWN}> : patient non trouvé" in text
    assert f"<{OPPOSED}> : messagerie fermée" in text
    assert f"<{BAD_KEY}> : adresse invalide" in text
    assert VALID not in text

    per_message, *per_recipient = blocks
    assert per_message["Original-Envelope-Id"] == "Lot-42+Abc"  # xtext decoded, case kept
    assert per_message["Reporting-MTA"] == f"dns; {HOSTNAME}"
    assert per_message["Received-From-MTA"] == "dns; client.test"
    assert per_message["Arrival-Date"]
    got = [
        (
            b["Final-Recipient"],
            b["Action"],
            b["Status"],
            b["Diagnostic-Code"],
            b["Original-Recipient"],
        )
        for b in per_recipient
    ]
    assert got == [
        (
            f"rfc822;{UNKNOWN}",
            "failed",
            "5.1.1",
            f"smtp; {replies.PATIENT_NOT_FOUND}",
            f"rfc822;{UNKNOWN.upper()}",
        ),
        (f"rfc822;{OPPOSED}", "failed", "5.2.1", f"smtp; {replies.MAILBOX_CLOSED}", None),
        (
            f"rfc822;{BAD_KEY}",
            "failed",
            "5.1.3",
            "smtp; 550 5.1.3 Adresse invalide : la partie locale n'est pas un INS valide"
            " (cle de controle incorrecte) / Invalid address: the local part is not a valid INS",
            None,
        ),
    ]
    # RET=HDRS: the header section, our trace header first, and never the body.
    assert headers.startswith("Received: from client.test")
    assert "Subject: Compte rendu" in headers
    assert "Message-ID: <cr-42@chu-exemple.mssante.fr>" in headers
    assert BODY_SECRET.encode() not in raw


async def test_dsn_mode_ret_full_still_attaches_headers_only(
    start_gateway: StartGateway,
) -> None:
    """Our choice (outbound/dsn.py): no body leaves, even when RET=FULL asks for it."""
    gw = await start_gateway(refusal="dsn")
    _, _, end = await transaction(gw, f"<{DOCTOR}> RET=FULL", [f"<{VALID}>", f"<{UNKNOWN}>"])
    assert end is not None and end.code == 250
    [(_, _, raw)] = await queued_dsns(gw)
    _, _, _, headers = parse(raw)
    assert "Subject: Compte rendu" in headers
    assert BODY_SECRET.encode() not in raw


async def test_dsn_mode_every_recipient_refused_queues_the_dsn_alone(
    start_gateway: StartGateway,
) -> None:
    gw = await start_gateway(refusal="dsn")
    _, rcpts, end = await transaction(gw, f"<{DOCTOR}>", [f"<{UNKNOWN}>", f"<{OPPOSED}>"])
    assert [r.code for r in rcpts] == [250, 250]
    assert end is not None
    # 250 once the DSN is durably queued: we took responsibility.
    expect(end, replies.REPORT_QUEUED)
    assert "avis de non-remise" in end.text
    assert await count(gw, StoredMessage) == 0
    assert await count(gw, Delivery) == 0
    [(_, to, raw)] = await queued_dsns(gw)
    assert to == [DOCTOR]
    _, _, blocks, _ = parse(raw)
    assert [(b["Action"], b["Status"]) for b in blocks[1:]] == [
        ("failed", "5.1.1"),
        ("failed", "5.2.1"),
    ]
    # Nothing of the message is left in the spool.
    assert list(gw.store.blobs.spool_dir.iterdir()) == []


async def test_dsn_mode_over_bdat(start_gateway: StartGateway) -> None:
    """BDAT LAST ends a transaction exactly as DATA does."""
    gw = await start_gateway(refusal="dsn")
    c = await connect(gw)
    assert (await c.cmd(f"MAIL FROM:<{DOCTOR}>")).code == 250
    assert (await c.cmd(f"RCPT TO:<{UNKNOWN}>")).code == 250
    expect(await c.bdat(message_bytes(), last=True), replies.REPORT_QUEUED)
    await c.close()
    [(_, _, raw)] = await queued_dsns(gw)
    _, _, blocks, _ = parse(raw)
    assert blocks[1]["Status"] == "5.1.1"


async def test_null_sender_is_never_bounced(start_gateway: StartGateway) -> None:
    """RFC 5321 4.5.5: no DSN to <>, so its refusals stay at RCPT in dsn mode."""
    gw = await start_gateway(refusal="dsn")
    _, (unknown, ok), end = await transaction(
        gw, "<>", [f"<{UNKNOWN}>", f"<{VALID}> NOTIFY=SUCCESS"]
    )
    expect(unknown, replies.PATIENT_NOT_FOUND)
    expect(ok, replies.RECIPIENT_OK)
    assert end is not None
    expect(end, replies.MESSAGE_STORED)
    assert await count(gw, Delivery) == 1
    assert await queued_dsns(gw) == []


@pytest.mark.parametrize("notify", ["NEVER", "SUCCESS", "DELAY", "never"])
async def test_notify_without_failure_gets_no_dsn(start_gateway: StartGateway, notify: str) -> None:
    """RFC 3461 4.1: no failure DSN unless asked; the refusal stays at RCPT then."""
    gw = await start_gateway(refusal="dsn")
    _, (unknown, ok), end = await transaction(
        gw, f"<{DOCTOR}>", [f"<{UNKNOWN}> NOTIFY={notify}", f"<{VALID}> NOTIFY=NEVER"]
    )
    expect(unknown, replies.PATIENT_NOT_FOUND)
    expect(ok, replies.RECIPIENT_OK)
    assert end is not None
    expect(end, replies.MESSAGE_STORED)
    assert await queued_dsns(gw) == []


@pytest.mark.parametrize("refusal", ["rcpt", "dsn"])
async def test_notify_success_queues_a_delivered_dsn(
    start_gateway: StartGateway, refusal: str
) -> None:
    gw = await start_gateway(refusal=refusal)
    _, rcpts, end = await transaction(
        gw,
        f"<{DOCTOR}> ENVID=env1",
        [
            f"<{VALID}> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Camille+2BMES@{DOMAIN}",
            f"<{VALID_2}>",  # no NOTIFY: no delivered entry
        ],
    )
    assert [r.code for r in rcpts] == [250, 250]
    assert end is not None
    expect(end, replies.MESSAGE_STORED)
    assert await count(gw, Delivery) == 2
    # Queued before the 250: the same transaction stored the message.
    [(row, to, raw)] = await queued_dsns(gw)
    assert (row.kind, row.mail_from, to) == (OutboundKind.DSN, "", [DOCTOR])
    msg, text, blocks, _ = parse(raw)
    assert msg["Subject"] == "Message distribué"
    assert "a été distribué" in text and "was delivered" in text
    assert blocks[0]["Original-Envelope-Id"] == "env1"
    assert len(blocks) == 2
    delivered = blocks[1]
    assert delivered["Final-Recipient"] == f"rfc822;{VALID}"
    assert delivered["Original-Recipient"] == f"rfc822;Camille+MES@{DOMAIN}"
    assert (delivered["Action"], delivered["Status"]) == ("delivered", "2.0.0")
    assert delivered["Diagnostic-Code"] is None
    assert BODY_SECRET.encode() not in raw


async def test_success_and_failure_in_one_dsn(start_gateway: StartGateway) -> None:
    gw = await start_gateway(refusal="dsn")
    _, _, end = await transaction(
        gw, f"<{DOCTOR}>", [f"<{VALID}> NOTIFY=SUCCESS,FAILURE", f"<{OPPOSED}>"]
    )
    assert end is not None
    expect(end, replies.MESSAGE_STORED)
    [(_, _, raw)] = await queued_dsns(gw)
    msg, text, blocks, _ = parse(raw)
    assert msg["Subject"] == "Message non distribué"
    assert [(b["Final-Recipient"], b["Action"]) for b in blocks[1:]] == [
        (f"rfc822;{OPPOSED}", "failed"),
        (f"rfc822;{VALID}", "delivered"),
    ]
    assert "messagerie fermée" in text and "a été distribué" in text


async def test_a_long_orcpt_and_envid_fit(start_gateway: StartGateway) -> None:
    """RFC 3461 4.2, 4.4: ORCPT up to 500 characters, ENVID up to 100, verbatim."""
    gw = await start_gateway(refusal="dsn")
    envid = "E" * 100
    orcpt = "rfc822;" + "o" * (500 - len("rfc822;") - len(DOMAIN) - 1) + "@" + DOMAIN
    assert len(orcpt) == 500
    _, (r,), end = await transaction(
        gw,
        f"<{DOCTOR}> RET=HDRS ENVID={envid}",
        [f"<{UNKNOWN}> NOTIFY=SUCCESS,FAILURE,DELAY ORCPT={orcpt}"],
    )
    expect(r, replies.RECIPIENT_OK)
    assert end is not None
    expect(end, replies.REPORT_QUEUED)
    [(_, _, raw)] = await queued_dsns(gw)
    _, _, blocks, _ = parse(raw)
    assert blocks[0]["Original-Envelope-Id"] == envid
    assert blocks[1]["Original-Recipient"] == orcpt


@pytest.mark.parametrize(
    ("mail", "rcpt", "expected"),
    [
        ("RET=ALL", "", replies.DSN_PARAMETER_INVALID),
        ("RET=FULL RET=HDRS", "", replies.DSN_PARAMETER_INVALID),
        ("ENVID=a+zz", "", replies.DSN_PARAMETER_INVALID),  # not a hexchar
        ("ENVID=a+0Db", "", replies.DSN_PARAMETER_INVALID),  # decodes to a CR
        ("ENVID=a+C3+A9", "", replies.DSN_PARAMETER_INVALID),  # not US-ASCII
        ("ENVID=" + "x" * 101, "", replies.DSN_PARAMETER_INVALID),
        ("ENVID=", "", replies.DSN_PARAMETER_INVALID),  # aiosmtpd: empty value
        ("NOTIFY=SUCCESS", "", replies.PARAMETER_UNKNOWN),  # a RCPT parameter
        ("", "NOTIFY=NEVER,SUCCESS", replies.DSN_PARAMETER_INVALID),
        ("", "NOTIFY=SOMETIMES", replies.DSN_PARAMETER_INVALID),
        ("", "NOTIFY=SUCCESS,SUCCESS", replies.DSN_PARAMETER_INVALID),
        ("", "NOTIFY=SUCCESS,", replies.DSN_PARAMETER_INVALID),
        ("", "ORCPT=no-address-type", replies.DSN_PARAMETER_INVALID),
        ("", "ORCPT=rfc822;", replies.DSN_PARAMETER_INVALID),
        ("", "ORCPT=rfc822;a+0D+0Ab@x", replies.DSN_PARAMETER_INVALID),  # CRLF injection
        ("", "ORCPT=rfc 822;a@x", replies.DSN_PARAMETER_INVALID),
        ("", "ORCPT=rfc822;" + "o" * 494, replies.DSN_PARAMETER_INVALID),  # 501 > 500
        ("", "ORCPT=rfc822;a@x ORCPT=rfc822;b@x", replies.DSN_PARAMETER_INVALID),
        ("", "RET=HDRS", replies.PARAMETER_UNKNOWN),  # a MAIL parameter
    ],
)
async def test_malformed_dsn_parameters_get_501(
    gateway: Gateway, mail: str, rcpt: str, expected: replies.Reply
) -> None:
    c = await connect(gateway)
    try:
        r = await c.cmd(f"MAIL FROM:<{DOCTOR}> {mail}".rstrip())
        if rcpt:
            expect(r, replies.SENDER_OK)
            r = await c.cmd(f"RCPT TO:<{VALID}> {rcpt}")
        expect(r, expected)
        # The session goes on: the same command without the parameter is fine.
        if rcpt:
            expect(await c.cmd(f"RCPT TO:<{VALID}>"), replies.RECIPIENT_OK)
        else:
            expect(await c.cmd(f"MAIL FROM:<{DOCTOR}>"), replies.SENDER_OK)
    finally:
        await c.close()


async def test_dsn_parameters_glued_to_the_address_are_refused(gateway: Gateway) -> None:
    c = await connect(gateway)
    try:
        expect(await c.cmd(f"MAIL FROM:<{DOCTOR}>RET=FULL"), replies.PARAMETER_SYNTAX)
        # Other parameters keep aiosmtpd's leniency.
        expect(await c.cmd(f"MAIL FROM:<{DOCTOR}>SIZE=10"), replies.SENDER_OK)
    finally:
        await c.close()


async def test_valid_parameters_in_any_case_are_accepted(start_gateway: StartGateway) -> None:
    gw = await start_gateway()
    c = await connect(gw)
    try:
        expect(await c.cmd(f"MAIL FROM:<{DOCTOR}> ret=hdrs envid=x SIZE=100"), replies.SENDER_OK)
        r = await c.cmd(f"RCPT TO:<{VALID}> notify=success,delay orcpt=RFC822;{VALID}")
        expect(r, replies.RECIPIENT_OK)
        expect(await data(c), replies.MESSAGE_STORED)
    finally:
        await c.close()
    [(_, _, raw)] = await queued_dsns(gw)
    _, _, blocks, _ = parse(raw)
    assert blocks[1]["Original-Recipient"] == f"rfc822;{VALID}"


async def test_relay_and_non_ascii_still_refused_at_rcpt_in_dsn_mode(
    start_gateway: StartGateway,
) -> None:
    gw = await start_gateway(refusal="dsn")
    c = await connect(gw)
    try:
        expect(await c.cmd(f"MAIL FROM:<{DOCTOR}> SMTPUTF8"), replies.SENDER_OK)
        r = await c.cmd(f"RCPT TO:<{demo.ACTIVATED}@example.org>")
        expect(r, replies.RELAY_DENIED)
        # An SMTPUTF8 address is no INS, but reporting it would need RFC 6533.
        expect(await c.cmd(f"RCPT TO:<patienté@{DOMAIN}>"), replies.INVALID_ADDRESS)
        # Nothing accepted: DATA has no recipient.
        expect(await c.cmd("DATA"), replies.NEED_RCPT)
    finally:
        await c.close()
    assert await queued_dsns(gw) == []


@pytest.mark.parametrize("refusal", ["rcpt", "dsn"])
async def test_abuse_budget_counts_dsn_mode_refusals(
    start_gateway: StartGateway, refusal: str
) -> None:
    """Bounce mode must not let a prober learn about INS faster (tests/test_abuse.py):
    the same budgets, the same 450 for every address once spent, the same 421."""
    gw = await start_gateway(
        refusal=refusal,
        limits=LimitsSettings(
            bad_recipients_per_session=3, bad_recipients_per_day=50, close_after_bad_in_session=6
        ),
    )
    c = await connect(gw)
    assert (await c.cmd(f"MAIL FROM:<{DOCTOR}>")).code == 250
    first = [await c.cmd(f"RCPT TO:<{with_key(f'18512751{n:05d}')}@{DOMAIN}>") for n in range(3)]
    assert [r.code for r in first] == ([550] * 3 if refusal == "rcpt" else [250] * 3)
    valid = await c.cmd(f"RCPT TO:<{VALID}>")
    invalid = await c.cmd(f"RCPT TO:<{UNKNOWN}>")
    assert (valid.code, valid.text) == (invalid.code, invalid.text)
    expect(valid, replies.TOO_MANY_BAD_RECIPIENTS)
    r = await c.cmd(f"RCPT TO:<{with_key('1851275100099')}@{DOMAIN}>")
    expect(r, replies.PROBING_CLOSED)
    assert await c.closed_by_server()
    await c.close()
    async with gw.store.reads() as s:
        refused = await s.scalar(
            select(func.count()).select_from(AuditEvent).where(AuditEvent.kind == "message.refused")
        )
    assert refused == 3


def test_xtext_decoding() -> None:
    """RFC 3461 4: "+" and two hex digits; printable US-ASCII only."""
    assert xtext_decode("a+2Bb+3Dc") == "a+b=c"
    assert xtext_decode("+20") == " "
    assert xtext_decode("") == ""
    for bad in ("a+", "a+2", "a+GG", "a=b", "a b", "+7F", "+0A", "é"):
        assert xtext_decode(bad) is None, bad


async def test_a_dsn_that_cannot_be_queued_stores_nothing(
    start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Message and DSN commit together: if queuing the DSN fails, the message
    is not stored either and the client gets 451 (and will retry)."""
    gw = await start_gateway(refusal="dsn")

    async def broken_add(*args: object, **kwargs: object) -> int:
        raise RuntimeError("outbound queue unavailable")

    monkeypatch.setattr(gw.store.outbound, "add", broken_add)
    _, rcpts, end = await transaction(gw, f"<{DOCTOR}>", [f"<{VALID}>", f"<{UNKNOWN}>"])
    assert [r.code for r in rcpts] == [250, 250]
    assert end is not None
    expect(end, replies.INTERNAL_ERROR)
    assert await count(gw, StoredMessage) == 0
    assert await count(gw, Delivery) == 0
    assert await queued_dsns(gw) == []


async def test_submission_offers_dsn_and_keeps_refusing_at_rcpt(
    start_gateway: StartGateway, clock: FakeClock
) -> None:
    """smtp.refusal is the MX's: a professional's client learns at RCPT.
    NOTIFY=SUCCESS is honoured on submission too."""
    gw = await start_gateway(refusal="dsn")
    pro = "dr.martin@cabinet-exemple.mssante.fr"
    password = "correct horse battery staple"
    hashed = await hash_password(password)
    await gw.store.writer.run(
        lambda s: add_account(s, address=pro, at=clock.now(), actor="t", password_hash=hashed)
    )
    c = await RawSmtp.connect("127.0.0.1", gw.submission[0].port)
    try:
        await c.cmd("EHLO client.test")
        tls = ssl.create_default_context(cafile=str(gw.store.data_dir / "tls" / "dev-ca.pem"))
        await c.starttls(tls, server_hostname=HOSTNAME)
        assert "DSN" in (await c.cmd("EHLO client.test")).lines
        credentials = base64.b64encode(f"\0{pro}\0{password}".encode()).decode()
        expect(await c.cmd(f"AUTH PLAIN {credentials}"), replies.AUTH_OK)
        expect(await c.cmd(f"MAIL FROM:<{pro}> ENVID=sub1"), replies.SENDER_OK)
        expect(await c.cmd(f"RCPT TO:<{UNKNOWN}>"), replies.PATIENT_NOT_FOUND)
        expect(await c.cmd(f"RCPT TO:<{VALID}> NOTIFY=SUCCESS"), replies.RECIPIENT_OK)
        expect(await data(c), replies.MESSAGE_STORED)
    finally:
        await c.close()
    [(_, to, raw)] = await queued_dsns(gw)
    assert to == [pro]
    _, _, blocks, _ = parse(raw)
    assert [(b["Final-Recipient"], b["Action"]) for b in blocks[1:]] == [
        (f"rfc822;{VALID}", "delivered")
    ]
