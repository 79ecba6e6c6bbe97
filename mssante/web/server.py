"""The webmail's HTTP server: uvicorn, in the process that runs the gateway.

``mssante serve`` starts it beside the SMTP listeners (in the first worker
only when there are several); with ``web.tls_cert`` it speaks HTTPS.  No
access log: URLs carry conversation ids, and the logs of issue 9 say what
is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Iterator
from typing import TYPE_CHECKING

import uvicorn

from mssante.clock import Clock
from mssante.pseudonym import Pseudonymizer
from mssante.web.app import create_app

log = logging.getLogger("mssante.web")

if TYPE_CHECKING:
    from mssante.app import Store
    from mssante.notify.transport import Transport


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handling: ``mssante serve`` owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class WebServer:
    def __init__(
        self,
        store: Store,
        *,
        clock: Clock,
        pseudonym: Pseudonymizer,
        transport: Transport | None = None,
    ) -> None:
        web = store.settings.web
        self.app = create_app(store, clock=clock, pseudonym=pseudonym, transport=transport)
        config = uvicorn.Config(
            self.app,
            host=web.host,
            port=web.port,
            log_config=None,
            access_log=False,
            lifespan="off",
            proxy_headers=web.behind_tls_proxy,
            server_header=False,
            ssl_certfile=str(web.tls_cert) if web.tls_cert else None,
            ssl_keyfile=str(web.tls_key) if web.tls_key else None,
            h11_max_incomplete_event_size=64 * 1024,
        )
        self._server = _EmbeddedServer(config)
        self._task: asyncio.Task[None] | None = None
        self.port = 0
        self.scheme = "https" if web.tls_cert else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self._server.config.host}:{self.port}"

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(), name="webmail")
        while not self._server.started:
            if self._task.done():
                # uvicorn logs why (port in use...) and exits its task.
                with contextlib.suppress(SystemExit):
                    await self._task
                raise OSError(f"webmail could not listen on {self._server.config.host}")
            await asyncio.sleep(0.01)
        sockets = self._server.servers[0].sockets
        self.port = sockets[0].getsockname()[1]

    def reload_certificate(self) -> bool:
        """SIGHUP: load ``web.tls_cert``/``tls_key`` again into the running
        context; the next TLS handshakes use them (a renewed certificate
        needs no restart).  A bad file keeps the previous one in force."""
        context = self._server.config.ssl
        config = self._server.config
        if context is None or not config.ssl_certfile:
            return False
        try:
            context.load_cert_chain(str(config.ssl_certfile), config.ssl_keyfile)
        except (OSError, ssl.SSLError) as exc:
            log.error("webmail certificate reload failed, previous one kept: %s", exc)
            return False
        return True

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
