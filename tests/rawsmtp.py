"""A minimal SMTP client over a real socket, byte-exact, for protocol tests.

smtplib and aiosmtplib normalise line endings and dot-stuff for you; tests
of framing and smuggling need to send exactly the bytes they mean.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass


@dataclass
class Reply:
    code: int
    lines: list[str]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def enhanced(self) -> str:
        first = self.lines[-1].split(" ", 1)[0] if self.lines else ""
        return first if first[:1].isdigit() and "." in first else ""

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


def bdat_chunk(data: bytes, *, last: bool = False) -> bytes:
    """The bytes of one BDAT command and its chunk, for pipelined writes."""
    return b"BDAT %d%s\r\n" % (len(data), b" LAST" if last else b"") + data


class RawSmtp:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, host: str, port: int) -> RawSmtp:
        reader, writer = await asyncio.open_connection(host, port)
        client = cls(reader, writer)
        greeting = await client.reply()
        assert greeting.code == 220, greeting
        return client

    async def reply(self, timeout: float = 20) -> Reply:
        lines: list[str] = []
        while True:
            raw = await asyncio.wait_for(self.reader.readline(), timeout)
            if not raw:
                raise ConnectionError(f"connection closed; got so far {lines}")
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            code, sep, text = line[:3], line[3:4], line[4:]
            lines.append(text)
            if sep != "-":
                return Reply(int(code), lines)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def cmd(self, line: str) -> Reply:
        await self.send(line.encode() + b"\r\n")
        return await self.reply()

    async def bdat(self, data: bytes, *, last: bool = False) -> Reply:
        """One RFC 3030 chunk: ``BDAT <len> [LAST]`` and its octets, then the reply."""
        await self.send(bdat_chunk(data, last=last))
        return await self.reply()

    async def closed_by_server(self, timeout: float = 20) -> bool:
        """True if the server closes the connection without sending anything more."""
        try:
            rest = await asyncio.wait_for(self.reader.read(), timeout)
        except (ConnectionError, ssl.SSLError):
            return True
        return rest == b""

    async def starttls(self, context: ssl.SSLContext, server_hostname: str) -> None:
        r = await self.cmd("STARTTLS")
        assert r.code == 220, r
        await self.writer.start_tls(context, server_hostname=server_hostname)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()
