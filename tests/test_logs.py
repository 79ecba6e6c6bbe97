"""Structured logs (issue 9.3): mssante/logs.py and the SMTP transaction line.

One JSON object per line; one ``smtp.transaction`` line per SMTP
transaction, whose correlation id is the message's ``ref`` and is found in
the audit trail; never an INS, a subject, a body, a file name or an
address in the whole output.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import httpx
import pytest
from sqlalchemy import select

from mssante import demo
from mssante.app import Gateway
from mssante.cli import seed_demo
from mssante.logs import configure_logging
from mssante.routing.ins import with_key
from mssante.settings import LogSettings, TrustSettings
from mssante.store.models import AuditEvent
from tests.conftest import FakeClock, make_settings
from tests.rawsmtp import RawSmtp
from tests.test_cli import _env
from tests.test_gateway import DOCTOR, DOMAIN, addr

UNKNOWN = with_key("1851275123999")
SUBJECT = "Serologie ZQXSUBJECT confidentielle"
BODY = "Resultat ZQXBODY positif"
FILE_NAME = "ZQXFILE-compte-rendu.pdf"
TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@pytest.fixture
def log_output() -> Iterator[io.StringIO]:
    """The root logger's records as ``mssante serve --log json`` writes them,
    at DEBUG: whatever a logger says, it is in there."""
    stream = io.StringIO()
    root = logging.getLogger()
    level = root.level
    handler = configure_logging(LogSettings(format="json", level="DEBUG"), stream=stream)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        logging.captureWarnings(False)


def json_lines(text: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in text.splitlines()]
    for line in lines:
        assert {"ts", "level", "logger", "msg", "pid"} <= line.keys(), line
        assert TS.fullmatch(line["ts"]), line["ts"]
        assert line["pid"] == os.getpid()
    return lines


def transactions(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [line for line in lines if line.get("event") == "smtp.transaction"]


def secret_message() -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = f"Dr Alice Durand <{DOCTOR}>"
    msg["To"] = addr(demo.ACTIVATED)
    msg["Subject"] = SUBJECT
    msg.set_content(BODY)
    msg.add_attachment(b"%PDF-1.4\n", maintype="application", subtype="pdf", filename=FILE_NAME)
    return msg


async def audit(gw: Gateway, kind: str) -> list[AuditEvent]:
    async with gw.store.reads() as s:
        query = select(AuditEvent).where(AuditEvent.kind == kind).order_by(AuditEvent.id)
        return list(await s.scalars(query))


async def test_one_json_line_per_smtp_transaction_tied_to_the_audit_trail(
    log_output: io.StringIO, gateway: Gateway
) -> None:
    # 1. Accepted for one recipient, refused for another (opposed).
    async with aiosmtplib.SMTP(
        hostname="127.0.0.1", port=gateway.smtp.port, start_tls=False
    ) as client:
        errors, reply = await client.send_message(
            secret_message(),
            sender=DOCTOR,
            recipients=[addr(demo.ACTIVATED), addr(demo.OPPOSED)],
        )
    assert list(errors) == [addr(demo.OPPOSED)]
    ref = reply.rsplit(" ", 1)[-1]
    # 2. Unknown patient, then RSET; 3. refused at DATA (too big); 4. QUIT after MAIL.
    c = await RawSmtp.connect("127.0.0.1", gateway.smtp.port)
    await c.cmd("EHLO client.test")
    await c.cmd(f"MAIL FROM:<{DOCTOR}>")
    assert (await c.cmd(f"RCPT TO:<{addr(UNKNOWN)}>")).code == 550
    assert (await c.cmd("RSET")).code == 250
    await c.cmd(f"MAIL FROM:<{DOCTOR}>")
    await c.cmd(f"RCPT TO:<{addr(demo.ACTIVATED)}>")
    await c.cmd("DATA")
    await c.send(b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 210 + b".\r\n")
    assert (await c.reply()).code == 552
    await c.cmd(f"MAIL FROM:<{DOCTOR}>")
    assert (await c.cmd("QUIT")).code == 221
    await c.close()
    await asyncio.wait_for(gateway.smtp._idle.wait(), 20)

    lines = json_lines(log_output.getvalue())
    accepted, abandoned, too_big, quit_ = transactions(lines)
    pseudonym = gateway.pseudonym
    assert accepted | {"duration_ms": 0, "size": 0} == {
        "ts": accepted["ts"],
        "level": "INFO",
        "logger": "mssante.smtp",
        "msg": "smtp.transaction",
        "pid": os.getpid(),
        "event": "smtp.transaction",
        "correlation_id": ref,
        "listener": "mx",
        "peer_ip": "127.0.0.1",
        "tls": None,
        "identity": None,
        "mail_from_domain": "chu-exemple.mssante.fr",
        "rcpt_accepted": 1,
        "rcpt_refused": 1,
        "refusals": ["mailbox_closed"],
        "recipients": [pseudonym(demo.ACTIVATED)],
        "refused_recipients": [pseudonym(demo.OPPOSED)],
        "size": 0,
        "code": 250,
        "enhanced": "2.0.0",
        "reply": "message_stored",
        "ended_by": "data",
        "duration_ms": 0,
    }
    assert accepted["size"] > 300 and accepted["duration_ms"] >= 0
    assert (abandoned["ended_by"], abandoned["code"], abandoned["refusals"]) == (
        "rset",
        None,
        ["patient_not_found"],
    )
    assert abandoned["refused_recipients"] == [pseudonym(UNKNOWN)]
    assert (too_big["ended_by"], too_big["code"], too_big["enhanced"], too_big["reply"]) == (
        "data",
        552,
        "5.3.4",
        "size_exceeded",
    )
    assert (quit_["ended_by"], quit_["rcpt_accepted"], quit_["code"]) == ("quit", 0, None)
    assert len({t["correlation_id"] for t in (accepted, abandoned, too_big, quit_)}) == 4

    # The correlation id in the audit trail: the stored message's ref, and the refusals'.
    (delivered,) = await audit(gateway, "message.delivered")
    assert delivered.details["ref"] == ref
    refused = await audit(gateway, "message.refused")
    assert [(e.details["cause"], e.details["correlation"]) for e in refused] == [
        ("mailbox_closed", ref),
        ("patient_not_found", abandoned["correlation_id"]),
    ]

    # Nothing of the message nor any identity, in any line, at DEBUG.
    text = log_output.getvalue()
    for secret in (
        demo.ACTIVATED,
        demo.OPPOSED,
        UNKNOWN,
        "ZQXSUBJECT",
        "ZQXBODY",
        "ZQXFILE",
        DOCTOR,
        f"@{DOMAIN}",
    ):
        assert secret not in text, secret


async def test_a_refused_sender_is_a_transaction_with_its_audit_event(
    log_output: io.StringIO, data_dir: Path, db_url: str, clock: FakeClock
) -> None:
    """MAIL refused by the trust space (no client certificate): one line,
    ended by MAIL, with the correlation of the ``message.refused`` event."""
    settings = make_settings(data_dir, database_url=db_url)
    settings = settings.model_copy(update={"trust": TrustSettings(require_client_certificate=True)})
    gw = Gateway(settings, clock=clock)
    await gw.start()
    await seed_demo(gw.store)
    try:
        c = await RawSmtp.connect("127.0.0.1", gw.smtp.port)
        await c.cmd("EHLO client.test")
        assert (await c.cmd(f"MAIL FROM:<{DOCTOR}>")).code == 530
        await c.cmd("QUIT")
        await c.close()
        await asyncio.wait_for(gw.smtp._idle.wait(), 20)
        (line,) = transactions(json_lines(log_output.getvalue()))
        assert (line["ended_by"], line["code"], line["reply"], line["rcpt_accepted"]) == (
            "mail",
            530,
            "client_cert_required",
            0,
        )
        (event,) = await audit(gw, "message.refused")
        assert event.details["correlation"] == line["correlation_id"]
        assert DOCTOR not in log_output.getvalue()
    finally:
        await gw.stop()


def test_json_line_carries_fields_and_exceptions(log_output: io.StringIO) -> None:
    log = logging.getLogger("mssante.admin")
    log.info("patient status changed", extra={"fields": {"event": "admin.x", "msg": "no"}})
    try:
        raise ValueError("boom")
    except ValueError:
        log.error("failed", exc_info=True)
    first, second = json_lines(log_output.getvalue())
    assert first["event"] == "admin.x"
    assert first["msg"] == "patient status changed"  # a field never replaces a core key
    assert second["level"] == "ERROR" and second["msg"] == "failed"
    assert "Traceback" in second["exc"] and "ValueError: boom" in second["exc"]


def test_text_format_is_the_terminals(caplog: pytest.LogCaptureFixture) -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    level = root.level
    handler = configure_logging(LogSettings(), stream=stream)  # text, INFO
    try:
        log = logging.getLogger("mssante.smtp")
        log.info("stored ref=%s", "abc")
        log.debug("not at INFO")
        log.info("smtp.transaction", extra={"fields": {"listener": "mx", "refusals": ["a b"]}})
        configure_logging(LogSettings(), process_id=True, stream=stream)  # replaces the first
        log.warning("worker")
    finally:
        for h in [h for h in root.handlers if type(h) is type(handler)]:
            root.removeHandler(h)
        root.setLevel(level)
    lines = stream.getvalue().splitlines()
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
    assert re.fullmatch(rf"{stamp} INFO mssante\.smtp stored ref=abc", lines[0]), lines
    assert re.fullmatch(
        rf'{stamp} INFO mssante\.smtp smtp\.transaction listener=mx refusals=\["a b"\]', lines[1]
    ), lines
    assert re.fullmatch(rf"{stamp} WARNING \[{os.getpid()}\] mssante\.smtp worker", lines[2])
    assert len(lines) == 3


# --- mssante serve, as a process ---------------------------------------------------------


@pytest.fixture
async def serve_json(tmp_path: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    env = _env(tmp_path / "data") | {
        "MSSANTE_LOG__FORMAT": "json",
        # Plain SMTP from the test's client: this is about logs, not trust.
        "MSSANTE_SMTP__REQUIRE_TLS": "false",
        "MSSANTE_TRUST__REQUIRE_CLIENT_CERTIFICATE": "false",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mssante",
        "serve",
        "--demo",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_serve_writes_json_lines_and_serves_metrics(
    serve_json: asyncio.subprocess.Process,
) -> None:
    proc = serve_json
    assert proc.stdout is not None and proc.stderr is not None
    lines: list[dict[str, Any]] = []
    ops = asyncio.get_running_loop().create_future()

    async def read_stderr() -> None:
        assert proc.stderr is not None
        async for raw in proc.stderr:
            lines.append(json.loads(raw))  # every line is one JSON object
            if m := re.fullmatch(r"metrics and probes on (http://\S+)", lines[-1]["msg"]):
                ops.set_result(m.group(1))

    reader = asyncio.create_task(read_stderr())
    smtp = None
    while smtp is None:  # the demo banner: started and the demo patients seeded
        raw = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert raw, "serve ended before listening"
        if m := re.search(r"MX on 127\.0\.0\.1:(\d+)", raw.decode()):
            smtp = int(m.group(1))
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=smtp, start_tls=False) as client:
        await client.send_message(secret_message(), sender=DOCTOR)
    async with httpx.AsyncClient(base_url=await asyncio.wait_for(ops, 60)) as client:
        metrics = (await client.get("/metrics")).text
        assert (await client.get("/readyz")).status_code == 200
    assert 'mssante_smtp_messages_accepted_total{listener="mx"} 1.0' in metrics
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 60) == 0
    await asyncio.wait_for(reader, 60)
    assert all({"ts", "level", "logger", "msg", "pid"} <= line.keys() for line in lines)
    assert {line["pid"] for line in lines} == {proc.pid}
    (line,) = transactions(lines)
    assert (line["code"], line["rcpt_accepted"], line["ended_by"]) == (250, 1, "data")
    text = json.dumps(lines)
    for secret in (demo.ACTIVATED, "ZQXSUBJECT", "ZQXBODY", "ZQXFILE", DOCTOR):
        assert secret not in text, secret
