"""The admin API's HTTP server: uvicorn, in the process that runs the webmail.

As web/server.py: no signal handling of its own (``mssante serve`` owns
SIGTERM), no access log (URLs carry the INS; gate.py writes one line per
request without it), port 0 for tests.  With ``admin.client_ca`` the TLS
handshake requires a client certificate issued by those CAs
(``CERT_REQUIRED``): a client without one, or with another CA's, is
refused before any HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from mssante.admin.api import create_app
from mssante.admin.auth import CLIENT_CN
from mssante.clock import Clock
from mssante.pseudonym import Pseudonymizer
from mssante.settings import Settings

if TYPE_CHECKING:
    from mssante.app import Store

log = logging.getLogger("mssante.admin")


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handling: ``mssante serve`` owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _common_name(peer: dict[str, Any] | None) -> str | None:
    for rdn in (peer or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


class _ClientCertificateProtocol(H11Protocol):
    """HTTP/1.1 that hands the verified client certificate's CN to the application.

    uvicorn puts no TLS details in the ASGI scope; each request's scope gets
    a copy of the connection's ``app_state``, so the CN is added to this
    connection's copy once the handshake (which asyncio completes before
    ``connection_made``) has verified the certificate.
    """

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        if isinstance(ssl_object, ssl.SSLObject):
            cn = _common_name(ssl_object.getpeercert())
            if cn is not None:
                self.app_state = {**self.app_state, CLIENT_CN: cn}


class AdminServer:
    def __init__(
        self, store: Store, settings: Settings, *, clock: Clock, pseudonym: Pseudonymizer
    ) -> None:
        admin = settings.admin
        self.app = create_app(store, settings, clock=clock, pseudonym=pseudonym)
        tls: dict[str, Any] = {}
        if admin.tls_cert is not None:
            tls = {"ssl_certfile": str(admin.tls_cert), "ssl_keyfile": str(admin.tls_key)}
        if admin.client_ca is not None:
            tls |= {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": str(admin.client_ca)}
        config = uvicorn.Config(
            self.app,
            host=admin.host,
            port=admin.port,
            http=_ClientCertificateProtocol,
            log_config=None,
            access_log=False,
            lifespan="off",
            server_header=False,
            date_header=False,
            h11_max_incomplete_event_size=64 * 1024,
            **tls,
        )
        self._server = _EmbeddedServer(config)
        self._task: asyncio.Task[None] | None = None
        self.port = 0
        self.scheme = "https" if admin.tls_cert is not None else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self._server.config.host}:{self.port}"

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(), name="admin-api")
        while not self._server.started:
            if self._task.done():
                # uvicorn logs why (port in use, unreadable certificate...) and exits its task.
                with contextlib.suppress(SystemExit):
                    await self._task
                raise OSError(f"admin API could not listen on {self._server.config.host}")
            await asyncio.sleep(0.01)
        sockets = self._server.servers[0].sockets
        self.port = sockets[0].getsockname()[1]

    def reload_certificate(self) -> bool:
        """SIGHUP: load ``admin.tls_cert``/``tls_key`` again into the running
        context, as the webmail does; the next handshakes use them.  A bad file
        keeps the previous one in force.  ``admin.client_ca`` is read at start
        only: a live context can add CAs but never drop one, so a CA taken out
        of the file must not look removed before a restart."""
        context = self._server.config.ssl
        config = self._server.config
        if context is None or not config.ssl_certfile:
            return False
        try:
            context.load_cert_chain(str(config.ssl_certfile), config.ssl_keyfile)
        except (OSError, ssl.SSLError) as exc:
            log.error("admin API certificate reload failed, previous one kept: %s", exc)
            return False
        return True

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
