"""How a notification e-mail leaves: the injected transport (STYLE.md 10).

A :class:`Transport` takes the envelope and the finished, signed bytes and
either returns (the next hop took responsibility for the message) or raises
:class:`TemporaryFailure` (try again later) or :class:`PermanentFailure`
(this message will never be accepted).  Two implementations:

- :class:`FileTransport`, the development default: each e-mail becomes an
  ``.eml`` file in the data directory, with the ``Return-Path`` a final
  delivery would add (RFC 5321 4.4), so the demo shows what would be sent;
- :class:`SmarthostTransport`: aiosmtplib to a configured relay, STARTTLS
  with the relay's certificate verified, optional AUTH, one connection kept
  open between messages.

Which replies are temporary: RFC 5321 4.2.1, 4yz transient and 5yz
permanent.  A connection, TLS or authentication problem is ours or the
relay's, never the recipient's: temporary, so it is retried and, if it
lasts, ends as a failed notification an operator sees.
"""

from __future__ import annotations

import asyncio
import secrets
import ssl
from pathlib import Path
from typing import Protocol

import aiosmtplib

from mssante.clock import Clock
from mssante.durable import write_file


class TransportError(Exception):
    """A send that did not happen; ``code`` is the SMTP reply code when there was one."""

    def __init__(self, text: str, code: int | None = None) -> None:
        super().__init__(text)
        self.code = code


class TemporaryFailure(TransportError):
    """Try again later (RFC 5321 4yz, connection or TLS trouble)."""


class PermanentFailure(TransportError):
    """The next hop refused this message for good (RFC 5321 5yz)."""


class Transport(Protocol):
    async def send(self, envelope_from: str, recipients: list[str], message: bytes) -> None:
        """Hand ``message`` over; raise TemporaryFailure or PermanentFailure if not taken."""
        ...

    async def close(self) -> None:
        """Release connections (the worker is stopping or idle)."""
        ...


class FileTransport:
    """Writes each e-mail to ``directory/<time>-<random>.eml`` (development)."""

    def __init__(self, directory: Path, clock: Clock) -> None:
        self.directory = directory
        self._clock = clock

    async def send(self, envelope_from: str, recipients: list[str], message: bytes) -> None:
        name = f"{self._clock.now():%Y%m%dT%H%M%S%f}-{secrets.token_hex(4)}.eml"
        # RFC 5321 4.4: the final delivery records the envelope sender.
        data = f"Return-Path: <{envelope_from}>\r\n".encode("ascii") + message
        try:
            await asyncio.to_thread(self._write, self.directory / name, data)
        except OSError as exc:
            raise TemporaryFailure(f"cannot write {name}: {exc.strerror}") from exc

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file(path, data, mode=0o600)

    async def close(self) -> None:
        return None


class SmarthostTransport:
    """Sends through a relay with aiosmtplib, one message at a time on one connection."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        starttls: bool,
        tls_context: ssl.SSLContext | None,
        username: str | None,
        password: str | None,
        timeout: float,
        local_hostname: str | None = None,
    ) -> None:
        self._options = {
            "hostname": host,
            "port": port,
            "start_tls": starttls,
            "tls_context": tls_context,
            "username": username,
            "password": password,
            "timeout": timeout,
            "local_hostname": local_hostname,
        }
        self._client: aiosmtplib.SMTP | None = None
        self._lock = asyncio.Lock()
        self.connections = 0  # opened so far (the benchmark reports it)

    async def _connect(self) -> aiosmtplib.SMTP:
        client = aiosmtplib.SMTP(**self._options)  # type: ignore[arg-type]
        # connect() says EHLO, runs STARTTLS (required when start_tls is True)
        # and AUTH when a user name and password are set.
        await client.connect()
        self.connections += 1
        self._client = client
        return client

    async def send(self, envelope_from: str, recipients: list[str], message: bytes) -> None:
        async with self._lock:
            try:
                await self._send(envelope_from, recipients, message)
            except aiosmtplib.SMTPException as exc:
                await self._drop()
                raise _classify(exc) from exc
            except (OSError, ssl.SSLError, TimeoutError) as exc:
                await self._drop()
                raise TemporaryFailure(f"smarthost connection: {exc}") from exc

    async def _send(self, envelope_from: str, recipients: list[str], message: bytes) -> None:
        client = self._client
        reused = client is not None and client.is_connected
        if client is None or not reused:
            await self._drop()
            client = await self._connect()
        try:
            await client.mail(envelope_from)
        except aiosmtplib.SMTPServerDisconnected:
            if not reused:
                raise
            # The relay closed the idle connection; nothing was sent on it yet.
            await self._drop()
            client = await self._connect()
            await client.mail(envelope_from)
        for rcpt in recipients:
            await client.rcpt(rcpt)
        await client.data(message)

    async def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None and client.is_connected:
            client.close()

    async def close(self) -> None:
        async with self._lock:
            client, self._client = self._client, None
            if client is not None and client.is_connected:
                try:
                    await client.quit()
                except (aiosmtplib.SMTPException, OSError):
                    client.close()


def _classify(exc: aiosmtplib.SMTPException) -> TransportError:
    code: int | None = None
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused) and exc.recipients:
        code = exc.recipients[0].code
    elif isinstance(exc, aiosmtplib.SMTPResponseException):
        code = exc.code
    text = f"smarthost: {exc}"
    # AUTH refused (535) is our configuration, not the recipient: retried.
    if (
        code is not None
        and 500 <= code < 600
        and not isinstance(exc, aiosmtplib.SMTPAuthenticationError)
    ):
        return PermanentFailure(text, code)
    return TemporaryFailure(text, code)
