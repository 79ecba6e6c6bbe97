"""The outside world of the notification tests: a fake smarthost with failure switches.

:class:`FakeSmarthost` is a real aiosmtpd server on 127.0.0.1 port 0, with
real STARTTLS (a certificate from tests/pki.py), AUTH PLAIN/LOGIN, and
switches: ``temp_failures`` (answer ``451`` to the next N messages),
``permanent`` (``550 5.1.1`` at RCPT), ``tls_failure`` (present a
certificate from a CA the client does not trust), ``hold()`` (keep each
message waiting at the end of DATA until ``release()``: slow relay and
concurrency).  The tests here check that the switches do what they say.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from mssante.notify.transport import PermanentFailure, SmarthostTransport, TemporaryFailure
from mssante.smtp.tls import client_context, server_context
from tests.pki import Pki

USER, PASSWORD = "notify", "s3cret-relay"


@dataclass(frozen=True)
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes


class FakeSmarthost:
    def __init__(self, directory: Path, *, auth: bool = True) -> None:
        pki = Pki(directory / "pki")
        cert = pki.issue("smarthost", "CN=smarthost.test,O=Relais,C=FR", server=True)
        rogue_pki = Pki(directory / "rogue", prefix="ROGUE")
        rogue = rogue_pki.issue("rogue", "CN=smarthost.test,O=Imposteur,C=FR", server=True)
        self.ca = pki.anchors()
        self._good = server_context(cert.cert_path, cert.key_path)
        self._rogue = server_context(rogue.cert_path, rogue.key_path)
        self._auth = auth
        # Failure switches.
        self.temp_failures = 0
        self.permanent = False
        self.tls_failure = False
        self._gate: asyncio.Event | None = None
        # What happened.
        self.received: list[Received] = []
        self.waiting = 0
        self.connections = 0
        self._changed = asyncio.Condition()
        self._server: asyncio.Server | None = None

    # --- switches -------------------------------------------------------------
    def hold(self) -> None:
        self._gate = asyncio.Event()

    def release(self) -> None:
        if self._gate is not None:
            self._gate.set()
        self._gate = None

    async def wait_received(self, n: int, timeout: float = 60) -> None:
        """Until ``n`` messages were accepted."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: len(self.received) >= n), timeout)

    async def wait_waiting(self, n: int) -> None:
        """Until ``n`` messages are held at the end of DATA at the same time."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: self.waiting >= n), 30)

    # --- server ---------------------------------------------------------------
    def _protocol(self) -> SMTP:
        self.connections += 1
        kwargs: dict[str, Any] = {}
        if self._auth:
            kwargs = {"authenticator": self._authenticate, "auth_required": True}
        return SMTP(
            _Handler(self),
            hostname="smarthost.test",
            tls_context=self._rogue if self.tls_failure else self._good,
            require_starttls=True,
            loop=asyncio.get_running_loop(),
            **kwargs,
        )

    @staticmethod
    def _authenticate(
        server: Any, session: Any, envelope: Any, mechanism: str, data: Any
    ) -> AuthResult:
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == (
            USER.encode(),
            PASSWORD.encode(),
        )
        return AuthResult(success=ok, handled=False)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, "127.0.0.1", 0)

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def stop(self) -> None:
        self.release()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def transport(self, *, timeout: float = 10.0, password: str = PASSWORD) -> SmarthostTransport:
        return SmarthostTransport(
            host="127.0.0.1",
            port=self.port,
            starttls=True,
            tls_context=client_context(self.ca),
            username=USER if self._auth else None,
            password=password if self._auth else None,
            timeout=timeout,
        )

    async def _data(self, envelope: Any) -> str:
        gate = self._gate
        if gate is not None:
            async with self._changed:
                self.waiting += 1
                self._changed.notify_all()
            try:
                await gate.wait()
            finally:
                self.waiting -= 1
        if self.temp_failures > 0:
            self.temp_failures -= 1
            return "451 4.3.0 Relais indisponible, reessayez"
        self.received.append(
            Received(envelope.mail_from, list(envelope.rcpt_tos), envelope.content)
        )
        async with self._changed:
            self._changed.notify_all()
        return "250 2.0.0 Ok: queued"


class _Handler:
    def __init__(self, fake: FakeSmarthost) -> None:
        self._fake = fake

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if self._fake.permanent:
            return "550 5.1.1 Boite inconnue"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return await self._fake._data(envelope)


@contextlib.asynccontextmanager
async def running_smarthost(directory: Path) -> AsyncIterator[FakeSmarthost]:
    fake = FakeSmarthost(directory)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture
async def smarthost(tmp_path: Path) -> AsyncIterator[FakeSmarthost]:
    async with running_smarthost(tmp_path / "smarthost") as fake:
        yield fake


MESSAGE = b"From: a@example.org\r\nTo: b@example.org\r\nSubject: t\r\n\r\nhello\r\n"


# --- the switches do what they say -------------------------------------------------------


async def test_fake_smarthost_accepts_over_starttls_with_auth(smarthost: FakeSmarthost) -> None:
    transport = smarthost.transport()
    await transport.send("bounce@example.org", ["b@example.org"], MESSAGE)
    await transport.send("bounce@example.org", ["b@example.org"], MESSAGE)
    await transport.close()
    assert [r.rcpt_tos for r in smarthost.received] == [["b@example.org"]] * 2
    assert smarthost.received[0].data.endswith(b"hello\r\n")
    assert smarthost.connections == 1  # the connection is kept between messages


async def test_fake_smarthost_temporary_and_permanent_switches(smarthost: FakeSmarthost) -> None:
    transport = smarthost.transport()
    smarthost.temp_failures = 1
    with pytest.raises(TemporaryFailure) as temp:
        await transport.send("x@example.org", ["b@example.org"], MESSAGE)
    assert temp.value.code == 451
    smarthost.permanent = True
    with pytest.raises(PermanentFailure) as perm:
        await transport.send("x@example.org", ["b@example.org"], MESSAGE)
    assert perm.value.code == 550
    await transport.close()
    assert smarthost.received == []


async def test_fake_smarthost_tls_failure_is_temporary(smarthost: FakeSmarthost) -> None:
    smarthost.tls_failure = True
    transport = smarthost.transport()
    with pytest.raises(TemporaryFailure, match="certificate"):
        await transport.send("x@example.org", ["b@example.org"], MESSAGE)
    smarthost.tls_failure = False
    await transport.send("x@example.org", ["b@example.org"], MESSAGE)
    await transport.close()
    assert len(smarthost.received) == 1


async def test_fake_smarthost_wrong_password_is_temporary(smarthost: FakeSmarthost) -> None:
    """A refused AUTH is our configuration, not the recipient: retried, not failed."""
    transport = smarthost.transport(password="wrong")
    with pytest.raises(TemporaryFailure) as exc:
        await transport.send("x@example.org", ["b@example.org"], MESSAGE)
    assert exc.value.code == 535
    await transport.close()


async def test_fake_smarthost_slow_relay_times_out_as_temporary(
    smarthost: FakeSmarthost,
) -> None:
    smarthost.hold()
    transport = smarthost.transport(timeout=0.3)
    with pytest.raises(TemporaryFailure):
        await transport.send("x@example.org", ["b@example.org"], MESSAGE)
    await transport.close()
    assert smarthost.received == []


async def test_fake_smarthost_hold_keeps_messages_until_release(
    smarthost: FakeSmarthost,
) -> None:
    smarthost.hold()
    t1, t2 = smarthost.transport(), smarthost.transport()
    sends = [
        asyncio.create_task(t.send("x@example.org", ["b@example.org"], MESSAGE)) for t in (t1, t2)
    ]
    await smarthost.wait_waiting(2)
    assert smarthost.received == []
    smarthost.release()
    await asyncio.gather(*sends)
    assert len(smarthost.received) == 2
    for t in (t1, t2):
        await t.close()


def test_client_context_refuses_the_rogue_certificate(tmp_path: Path) -> None:
    fake = FakeSmarthost(tmp_path)
    assert client_context(fake.ca).verify_mode == ssl.CERT_REQUIRED
