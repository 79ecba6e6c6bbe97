"""The ops endpoint's HTTP server: uvicorn in the process, like the webmail's.

Every process of ``mssante serve`` (every role) serves its own metrics on
``ops.port``; with ``smtp.workers > 1`` worker *i* listens on ``ops.port + i``
(each process counts its own sessions and messages; port 0 stays 0).  No
TLS, no access log: bind it to loopback or a monitoring network.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import uvicorn

from mssante.clock import Clock
from mssante.httpserver import EmbeddedHttpServer
from mssante.metrics import Metrics
from mssante.ops.app import create_app

if TYPE_CHECKING:
    from mssante.app import Store


def ops_port(port: int, worker: int) -> int:
    """``ops.port`` for worker ``worker`` (0: any free port, for every worker)."""
    return port + worker if port else 0


class OpsServer(EmbeddedHttpServer):
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
        super().__init__(config, name="metrics endpoint")
