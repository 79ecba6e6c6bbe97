"""uvicorn inside ``mssante serve``: the webmail, the admin API and the ops endpoint.

Each runs as a task of the process's event loop, beside the SMTP
listeners.  No signal handling of its own (``mssante serve`` owns SIGTERM
and SIGHUP), no access log (URLs carry conversation ids or an INS; each
application logs what it should), port 0 for tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Iterator

import uvicorn

log = logging.getLogger("mssante")


class _Server(uvicorn.Server):
    """uvicorn without its signal handling."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class EmbeddedHttpServer:
    def __init__(self, config: uvicorn.Config, *, name: str) -> None:
        self._server = _Server(config)
        self._name = name  # the task's name, and the subject of log lines
        self._task: asyncio.Task[None] | None = None
        self.port = 0
        self.scheme = "https" if config.ssl_certfile else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self._server.config.host}:{self.port}"

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(), name=self._name)
        while not self._server.started:
            if self._task.done():
                # uvicorn logs why (port in use, unreadable certificate...) and exits its task.
                with contextlib.suppress(SystemExit):
                    await self._task
                config = self._server.config
                raise OSError(f"{self._name} could not listen on {config.host}:{config.port}")
            await asyncio.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]

    def reload_certificate(self) -> bool:
        """SIGHUP: load the certificate and key files again into the running
        TLS context; the next handshakes use them (a renewed certificate needs
        no restart).  A bad file keeps the previous one in force.  CAs for
        client certificates are read at start only: a live context can add
        CAs but never drop one."""
        config = self._server.config
        context = config.ssl
        if context is None or not config.ssl_certfile:
            return False
        try:
            context.load_cert_chain(str(config.ssl_certfile), config.ssl_keyfile)
        except (OSError, ssl.SSLError) as exc:
            log.error("%s: certificate reload failed, previous one kept: %s", self._name, exc)
            return False
        return True

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
