"""Graceful shutdown and reload (issue 9.5).

SIGTERM: new sessions hear ``421 4.3.2``; a session between transactions
gets it at once; one in a transaction finishes it (its 250 after the commit)
and then gets it; at the deadline the rest are cut.  SIGHUP reloads the
whitelist, CRLs and certificates.  In process on both databases, then
through real ``mssante serve`` processes and real signals.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from sqlalchemy import func, select

from mssante import demo
from mssante.app import Gateway, Store
from mssante.cli import seed_demo
from mssante.settings import OpsSettings, Settings
from mssante.smtp import replies
from mssante.store.models import Message
from tests.conftest import FakeClock, make_settings
from tests.pki import Pki
from tests.rawsmtp import RawSmtp

DOMAIN = "patient.mssante.fr"
SENDER = "dr.durand@chu-exemple.mssante.fr"
HEAD = (
    f"From: Dr Durand <{SENDER}>\r\nTo: {demo.ACTIVATED}@{DOMAIN}\r\n"
    "Subject: Compte rendu\r\nMessage-ID: <shutdown-1@chu-exemple.mssante.fr>\r\n\r\n"
).encode()
TAIL = b"Bonne journee.\r\n.\r\n"


async def open_transaction(port: int) -> RawSmtp:
    """A session in the middle of DATA: headers sent, the end not yet."""
    c = await RawSmtp.connect("127.0.0.1", port)
    assert (await c.cmd("EHLO client.test")).code == 250
    assert (await c.cmd(f"MAIL FROM:<{SENDER}>")).code == 250
    assert (await c.cmd(f"RCPT TO:<{demo.ACTIVATED}@{DOMAIN}>")).code == 250
    assert (await c.cmd("DATA")).code == 354
    await c.send(HEAD)
    return c


async def raw_greeting(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        return await asyncio.wait_for(reader.read(), 20)  # up to the server's close
    finally:
        writer.close()


def is_shutting_down(reply: object) -> bool:
    return str(reply).startswith(f"{replies.SHUTTING_DOWN.code} {replies.SHUTTING_DOWN.enhanced}")


async def message_count(settings: Settings) -> int:
    store = Store(settings)
    await store.open()
    try:
        async with store.reads() as session:
            return int(await session.scalar(select(func.count()).select_from(Message)) or 0)
    finally:
        await store.close()


@pytest.fixture
async def started(data_dir: Path, db_url: str, clock: FakeClock) -> Gateway:
    settings = make_settings(data_dir, database_url=db_url).model_copy(
        update={"ops": OpsSettings(port=0)}  # the readiness probe, during the stop
    )
    gw = Gateway(settings, clock=clock)
    await gw.start()
    await seed_demo(gw.store)
    return gw  # each test stops it: that is what it tests


async def test_sigterm_lets_the_transaction_finish_and_turns_new_sessions_away(
    started: Gateway,
) -> None:
    port = started.smtp.port
    busy = await open_transaction(port)
    idle = await RawSmtp.connect("127.0.0.1", port)
    assert (await idle.cmd("EHLO idle.test")).code == 250
    assert started.smtp.sessions == 2

    assert started.ops is not None
    async with httpx.AsyncClient(base_url=started.ops.url) as probe:
        assert (await probe.get("/readyz")).status_code == 200
        stopping = asyncio.create_task(started.stop(grace=60))
        # Between transactions: told at once, and the connection closes.
        assert is_shutting_down(await idle.reply())
        # The balancer is told to send nothing more here.
        ready = await probe.get("/readyz")
        assert (ready.status_code, ready.json()["shutdown"]) == (503, "failed")
    assert await idle.closed_by_server()
    await idle.close()
    # A new connection hears 421 4.3.2 instead of the greeting.
    greeting = await raw_greeting(port)
    assert greeting == f"{replies.SHUTTING_DOWN}\r\n".encode()
    assert not stopping.done()  # still waiting for the transaction

    # The transaction in progress finishes: 250 after its commit, then 421.
    await busy.send(TAIL)
    stored = await busy.reply()
    assert stored.code == 250 and "ref" in stored.text, stored
    assert is_shutting_down(await busy.reply())
    assert await busy.closed_by_server()
    await busy.close()
    await asyncio.wait_for(stopping, 30)
    assert await message_count(started.settings) == 1


async def test_shutdown_deadline_cuts_an_unfinished_transaction(started: Gateway) -> None:
    port = started.smtp.port
    stalled = await open_transaction(port)
    await asyncio.wait_for(started.stop(grace=0.2), 30)
    assert is_shutting_down(await stalled.reply())
    assert await stalled.closed_by_server()
    await stalled.close()
    # Never acknowledged, so not kept: the client sends it again elsewhere.
    assert await message_count(started.settings) == 0


async def test_shutdown_between_commands_of_a_transaction_waits_for_its_end(
    started: Gateway,
) -> None:
    """MAIL given, no DATA yet: the session is in a transaction and may end it;
    RSET ends it, and the 421 follows the RSET's reply."""
    port = started.smtp.port
    c = await RawSmtp.connect("127.0.0.1", port)
    assert (await c.cmd("EHLO client.test")).code == 250
    assert (await c.cmd(f"MAIL FROM:<{SENDER}>")).code == 250
    stopping = asyncio.create_task(started.stop(grace=60))
    assert (await c.cmd(f"RCPT TO:<{demo.ACTIVATED}@{DOMAIN}>")).code == 250
    assert (await c.cmd("RSET")).code == 250
    assert is_shutting_down(await c.reply())
    await c.close()
    await asyncio.wait_for(stopping, 30)


# --- real processes, real signals ---------------------------------------------------


def _serve_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        MSSANTE_STORE__DATA_DIR=str(data_dir),
        MSSANTE_SMTP__PORT="0",
        MSSANTE_SUBMISSION__ENABLED="false",
        MSSANTE_WEB__ENABLED="false",
        MSSANTE_OPS__PORT="0",
        MSSANTE_SMTP__HOSTNAME="mx.test.localhost",
        # Plain SMTP from any client: these tests are about signals, not trust.
        MSSANTE_SMTP__REQUIRE_TLS="false",
        MSSANTE_TRUST__REQUIRE_CLIENT_CERTIFICATE="false",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


class Served:
    """``mssante serve --demo`` in a process; its stderr read line by line."""

    def __init__(self, data_dir: Path, **env: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mssante", "serve", "--demo", "--role", "gateway"],
            env=_serve_env(data_dir, **env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.port = 0
        for line in self.proc.stdout:
            m = re.search(r"MX on 127\.0\.0\.1:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                break
        assert self.port, "serve did not print its address"

    def wait_for_log(self, pattern: str) -> str:
        """Lines of stderr up to the first matching ``pattern`` (the process's own word)."""
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if re.search(pattern, line):
                return line
        raise AssertionError(f"serve ended without logging {pattern!r}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = Served(tmp_path / "data")
    try:
        yield s
    finally:
        s.close()


@pytest.mark.slow
async def test_sigterm_to_serve_finishes_the_transaction_and_exits_0(
    served: Served, tmp_path: Path
) -> None:
    busy = await open_transaction(served.port)
    served.proc.send_signal(signal.SIGTERM)
    await asyncio.to_thread(served.wait_for_log, r"shutting down: 1 SMTP session")
    assert (await raw_greeting(served.port)).startswith(b"421 4.3.2 ")
    await busy.send(TAIL)
    assert (await busy.reply()).code == 250
    assert is_shutting_down(await busy.reply())
    await busy.close()
    assert await asyncio.to_thread(served.proc.wait, 30) == 0
    settings = Settings.model_validate({"store": {"data_dir": tmp_path / "data"}})
    assert await message_count(settings) == 1


def _server_cert_serial(port: int, ca: Path) -> int:
    """Serial number of the certificate the server shows after STARTTLS."""

    async def look() -> int:
        c = await RawSmtp.connect("127.0.0.1", port)
        await c.cmd("EHLO client.test")
        context = ssl.create_default_context(cafile=str(ca))
        await c.starttls(context, "mx.test.localhost")
        ssl_object = c.writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True)
        await c.close()
        return x509.load_der_x509_certificate(der).serial_number

    return asyncio.run(look())


@pytest.mark.slow
def test_sighup_reloads_the_server_certificate(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    first = pki.issue("mx", "CN=mx.test.localhost,O=TEST,C=FR", server=True)
    cert, key = tmp_path / "mx.pem", tmp_path / "mx.key"
    cert.write_bytes(first.cert_path.read_bytes())
    key.write_bytes(first.key_path.read_bytes())
    served = Served(
        tmp_path / "data",
        MSSANTE_SMTP__TLS_CERT=str(cert),
        MSSANTE_SMTP__TLS_KEY=str(key),
        # No periodic check: only the signal may reload.
        MSSANTE_TRUST__RELOAD_INTERVAL="3600",
    )
    try:
        ca = pki.anchors()
        assert _server_cert_serial(served.port, ca) == first.cert.serial_number
        renewed = pki.issue("mx2", "CN=mx.test.localhost,O=TEST,C=FR", server=True)
        cert.write_bytes(renewed.cert_path.read_bytes())
        key.write_bytes(renewed.key_path.read_bytes())
        served.proc.send_signal(signal.SIGHUP)
        served.wait_for_log(r"trust reloaded")
        assert _server_cert_serial(served.port, ca) == renewed.cert.serial_number
        # A broken file keeps the renewed certificate in force.
        cert.write_text("not a certificate")
        served.proc.send_signal(signal.SIGHUP)
        served.wait_for_log(r"trust reload failed")
        assert _server_cert_serial(served.port, ca) == renewed.cert.serial_number
        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(timeout=30) == 0
    finally:
        served.close()
