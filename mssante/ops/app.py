"""The ops endpoint: ``GET /metrics`` (Prometheus), ``/healthz``, ``/readyz``.

A port of its own (``ops.port``, loopback by default): what a monitoring
system reads, apart from what patients reach.  Nothing here names a
patient: metrics have bounded labels only (metrics.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mssante.clock import Clock
from mssante.metrics import CONTENT_TYPE, Metrics
from mssante.ops import health, queues

if TYPE_CHECKING:
    from mssante.app import Store

log = logging.getLogger("mssante.ops")
# The queue queries must not hold a scrape (Prometheus' default timeout is 10 s).
QUERY_TIMEOUT = 5.0


def create_app(
    store: Store, *, metrics: Metrics, clock: Clock, stopping: Callable[[], bool] = lambda: False
) -> Starlette:
    async def scrape(request: Request) -> Response:
        try:
            await asyncio.wait_for(queues.refresh(store, metrics, clock.now()), QUERY_TIMEOUT)
            metrics.db_up.set(1)
        except Exception as exc:
            # The rest is still worth reading: the process's own counters.
            log.warning("metrics: queue gauges not refreshed: %s: %s", type(exc).__name__, exc)
            metrics.db_up.set(0)
        return Response(metrics.render(), media_type=CONTENT_TYPE, headers=health.NO_STORE)

    async def healthz(request: Request) -> Response:
        return health.alive()

    async def readyz(request: Request) -> Response:
        return await health.ready(store, stopping=stopping())

    return Starlette(
        routes=[
            Route("/metrics", scrape),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
        ]
    )
