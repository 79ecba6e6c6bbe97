"""Liveness and readiness on the webmail's port (issue 9.2).

The checks are ops/health.py's, also served on the ops port with the
metrics: ``GET /healthz`` (alive) and ``GET /readyz`` (database and schema,
blob directories; 503 naming the check that failed).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mssante.ops import health
from mssante.web.context import web


async def healthz(request: Request) -> Response:
    return health.alive()


async def readyz(request: Request) -> Response:
    return await health.ready(web(request).store)


routes = [Route("/healthz", healthz), Route("/readyz", readyz)]
