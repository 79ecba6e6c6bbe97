"""The ops endpoint's HTTP server: uvicorn in the process, like the webmail's.

Every process of ``mssante serve`` (every role) serves its own metrics on
``ops.port``; with ``smtp.workers > 1`` worker *i* listens on ``ops.port + i``
(each process counts its own sessions and messages; port 0 stays 0).  No
TLS, no access log: bind it to loopback or a monitoring network.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import uvicorn

from mssante.clock import Clock
from mssante.metrics import Metrics
from mssante.ops.app import create_app
from mssante.web.server import _EmbeddedServer

if TYPE_CHECKING:
    from mssante.app import Store


def ops_port(port: int, worker: int) -> int:
    """``ops.port`` for worker ``worker`` (0: any free port, for every worker)."""
    return port + worker if port else 0


class OpsServer:
    def __init__(
        self,
        store: Store,
        *,
        metrics: Metrics,
        clock: Clock,
        worker: int = 0,
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        ops = store.settings.ops
        self.app = create_app(store, metrics=metrics, clock=clock, stopping=stopping)
        config = uvicorn.Config(
            self.app,
            host=ops.host,
            port=ops_port(ops.port, worker),
            log_config=None,
            access_log=False,
            lifespan="off",
            server_header=False,
        )
        self._server = _EmbeddedServer(config)
        self._task: asyncio.Task[None] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{self._server.config.host}:{self.port}"

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(), name="ops")
        while not self._server.started:
            if self._task.done():
                # uvicorn logs why (port in use...) and exits its task.
                with contextlib.suppress(SystemExit):
                    await self._task
                raise OSError(
                    f"metrics endpoint could not listen on"
                    f" {self._server.config.host}:{self._server.config.port}"
                )
            await asyncio.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
