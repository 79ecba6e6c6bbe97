"""Binding the SMTP listener and serving connections."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable

from mssante.smtp.protocol import GatewayProtocol
from mssante.smtp.session import Policy


class SmtpListener:
    def __init__(
        self,
        policy: Policy,
        *,
        host: str,
        port: int,
        hostname: str,
        max_message_size: int,
        max_header_size: int = 256 * 1024,
        timeout: float,
        tls_context: Callable[[], ssl.SSLContext] | None,
        require_tls: bool = False,
    ) -> None:
        self._require_tls = require_tls
        self._policy = policy
        self._host = host
        self._port = port
        self._hostname = hostname
        self._max_size = max_message_size
        self._max_header = max_header_size
        self._timeout = timeout
        self._tls = tls_context
        self._server: asyncio.Server | None = None

    def _protocol(self) -> GatewayProtocol:
        return GatewayProtocol(
            self._policy,
            max_message_size=self._max_size,
            max_header_size=self._max_header,
            hostname=self._hostname,  # configured: no DNS lookup per connection
            ident="mssante ESMTP",
            # Read per connection: a reloaded certificate or CRL applies to
            # the next session.
            tls_context=self._tls() if self._tls else None,
            require_starttls=self._require_tls,
            timeout=self._timeout,
            loop=asyncio.get_running_loop(),
        )

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, self._host, self._port)

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
