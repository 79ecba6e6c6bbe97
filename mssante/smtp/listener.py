"""Binding an SMTP listener and serving connections.

Three kinds, by their arguments: the MX (STARTTLS, no AUTH), submission on
587 (STARTTLS, AUTH required) and submission on 465 (implicit TLS, RFC 8314).
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import Callable
from typing import Any

from mssante.smtp import replies, speedups
from mssante.smtp.protocol import AlertingSSLProtocol, GatewayProtocol, record_handshake_failure
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
        implicit_tls: bool = False,
        auth: Callable[..., Any] | None = None,
        reuse_port: bool = False,
    ) -> None:
        speedups.install()
        # Several worker processes listen on the same port; the kernel
        # spreads the connections among them (serve --workers, workers.py).
        self._reuse_port = reuse_port
        self._require_tls = require_tls
        self._implicit = implicit_tls
        self._auth = auth
        self._policy = policy
        self._host = host
        self._port = port
        self._hostname = hostname
        self._max_size = max_message_size
        self._max_header = max_header_size
        self._timeout = timeout
        self._tls = tls_context
        self._server: asyncio.Server | None = None
        self._sessions: set[GatewayProtocol] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._shutting_down = False

    def _new_connection(self) -> asyncio.Protocol:
        if self._shutting_down:
            return _ShuttingDown()
        protocol = self._protocol()
        self._sessions.add(protocol)
        self._idle.clear()
        return protocol

    def _session_ended(self, protocol: GatewayProtocol) -> None:
        self._sessions.discard(protocol)
        if not self._sessions:
            self._idle.set()

    def _protocol(self) -> GatewayProtocol:
        if self._auth is None:
            # MX: operators authenticate by certificate; no SASL here.
            auth: dict[str, Any] = {"auth_exclude_mechanism": ["LOGIN", "PLAIN"]}
        else:
            # AUTH over TLS only (aiosmtpd's default); protocol.py tells
            # aiosmtpd that an implicit-TLS connection is TLS.
            auth = {"authenticator": self._auth, "auth_required": True}
        return GatewayProtocol(
            self._policy,
            max_message_size=self._max_size,
            max_header_size=self._max_header,
            hostname=self._hostname,  # configured: no DNS lookup per connection
            ident="mssante ESMTP",
            # Read per connection: a reloaded certificate or CRL applies to
            # the next session.
            tls_context=self._tls() if self._tls and not self._implicit else None,
            require_starttls=self._require_tls and not self._implicit,
            timeout=self._timeout,
            loop=asyncio.get_running_loop(),
            on_end=self._session_ended,
            metrics=self._policy.metrics,
            **auth,
        )

    def _implicit_context(self) -> ssl.SSLContext:
        """A context whose SNI hook hands each handshake the current context,
        so a reload applies to port 465 too."""
        assert self._tls is not None
        base = self._tls()
        current = self._tls

        def pick(ssl_object: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
            ssl_object.context = current()

        base.sni_callback = pick
        return base

    def _new_tls_connection(self, context: ssl.SSLContext) -> asyncio.BaseProtocol:
        """Implicit TLS: the TLS layer around the session, as ``create_server(ssl=)``
        builds it, but whose handshake's outcome we see: a failure is counted
        and logged as on STARTTLS, and the client gets the TLS alert."""
        loop = asyncio.get_running_loop()
        session = self._new_connection()
        handshake = loop.create_future()
        handshake.add_done_callback(functools.partial(self._handshake_done, session))
        return AlertingSSLProtocol(loop, session, context, handshake, server_side=True)

    def _handshake_done(
        self, session: asyncio.BaseProtocol, handshake: asyncio.Future[None]
    ) -> None:
        error = None if handshake.cancelled() else handshake.exception()
        if not isinstance(session, GatewayProtocol) or session.session is not None:
            return  # the handshake succeeded (connection_made ran), or shutting down
        record_handshake_failure(self._policy.metrics, error or ConnectionResetError())
        self._session_ended(session)  # it never began: connection_lost will not come

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        factory: Callable[[], asyncio.BaseProtocol] = self._new_connection
        if self._implicit:
            factory = functools.partial(self._new_tls_connection, self._implicit_context())
        self._server = await loop.create_server(
            factory, self._host, self._port, reuse_port=self._reuse_port or None
        )

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def sessions(self) -> int:
        """Sessions in progress."""
        return len(self._sessions)

    async def shut_down(self, grace: float) -> int:
        """Graceful stop (SIGTERM, issue 9.5).

        New connections are still accepted but only to hear ``421 4.3.2``
        (RFC 5321 3.8), so a sending MTA tries another MX at once instead of
        timing out.  Sessions in progress end with ``421 4.3.2`` as soon as
        they are between transactions; at ``grace`` seconds the ones still
        open get it too (a message not yet acknowledged is the client's to
        send again: nothing acknowledged is lost).  Returns how many
        sessions were cut at the deadline.
        """
        self._shutting_down = True
        for session in list(self._sessions):
            session.begin_shutdown()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=grace)
            return 0
        except TimeoutError:
            cut = list(self._sessions)
            for session in cut:
                session.hang_up_shutting_down()
            return len(cut)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None


class _ShuttingDown(asyncio.Protocol):
    """A connection that arrives during a graceful stop: ``421 4.3.2``, closed."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(f"{replies.SHUTTING_DOWN}\r\n".encode("ascii"))
        transport.close()
