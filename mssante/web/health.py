"""Liveness and readiness for load balancers and orchestrators (issue 9.2, first part).

- ``GET /healthz``: the process answers (no dependency checked).
- ``GET /readyz``: the database answers and its schema is the code's
  (``alembic`` head), and the blob directory is writable; 503 otherwise,
  with which check failed (never an error text: it could name paths).
Served by the webmail's HTTP server for now; issue 9 adds a metrics port.
"""

from __future__ import annotations

import asyncio
import logging
import os

from sqlalchemy import text
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mssante.store import migrations
from mssante.web.context import web

log = logging.getLogger("mssante.web")
# A check that takes longer than this counts as failed (the probe must answer).
TIMEOUT = 5.0


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    w = web(request)
    checks: dict[str, str] = {}

    async def database() -> None:
        async with w.store.reads() as db:
            await db.execute(text("SELECT 1"))
        current = await migrations.current(w.store.read_engine)
        if current != migrations.head():
            raise RuntimeError(f"schema {current}, code {migrations.head()}")

    def blobs() -> None:
        for directory in (w.store.blobs.blob_dir, w.store.blobs.spool_dir):
            if not os.access(directory, os.W_OK | os.X_OK):
                raise OSError(f"{directory} not writable")

    for name, check in (("database", database), ("blobs", lambda: asyncio.to_thread(blobs))):
        try:
            await asyncio.wait_for(check(), TIMEOUT)
            checks[name] = "ok"
        except Exception as exc:
            log.warning("readiness: %s failed: %s", name, exc)
            checks[name] = "failed"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ok" if ready else "unavailable", **checks}, 200 if ready else 503
    )


routes = [Route("/healthz", healthz), Route("/readyz", readyz)]
