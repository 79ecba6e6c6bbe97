"""Liveness and readiness, for load balancers and orchestrators (issue 9.2).

- liveness (``/healthz``): the process answers; no dependency checked;
- readiness (``/readyz``): the database answers and its schema is the
  code's (``alembic`` head), and the blob and spool directories are
  writable; 503 otherwise, naming the check that failed (never an error
  text: it could name paths).

Served on the ops port (ops/app.py) and by the webmail (web/health.py), the
same checks: a probe may target either.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING

from sqlalchemy import text
from starlette.responses import JSONResponse, Response

from mssante.store import migrations

if TYPE_CHECKING:
    from mssante.app import Store

log = logging.getLogger("mssante.ops")
# A check that takes longer than this counts as failed (the probe must answer).
TIMEOUT = 5.0
NO_STORE = {"Cache-Control": "no-store"}


async def readiness(store: Store) -> dict[str, str]:
    """Each check's outcome, "ok" or "failed"."""

    async def database() -> None:
        started = time.perf_counter()
        async with store.reads() as db:
            await db.execute(text("SELECT 1"))
        current = await migrations.current(store.read_engine)
        store.metrics.db_readiness.observe(time.perf_counter() - started)
        if current != migrations.head():
            raise RuntimeError(f"schema {current}, code {migrations.head()}")

    def blobs() -> None:
        for directory in (store.blobs.blob_dir, store.blobs.spool_dir):
            if not os.access(directory, os.W_OK | os.X_OK):
                raise OSError(f"{directory} not writable")

    checks: dict[str, str] = {}
    for name, check in (("database", database), ("blobs", lambda: asyncio.to_thread(blobs))):
        try:
            await asyncio.wait_for(check(), TIMEOUT)
            checks[name] = "ok"
        except Exception as exc:
            log.warning("readiness: %s failed: %s", name, exc)
            checks[name] = "failed"
    return checks


def alive() -> Response:
    return JSONResponse({"status": "ok"}, headers=NO_STORE)


async def ready(store: Store, *, stopping: bool = False) -> Response:
    checks = await readiness(store)
    if stopping:
        # SIGTERM (Gateway.stop with a grace): the balancer stops sending
        # new sessions here while the ones in progress finish.
        checks["shutdown"] = "failed"
    ok = all(v == "ok" for v in checks.values())
    body = {"status": "ok" if ok else "unavailable", **checks}
    return JSONResponse(body, 200 if ok else 503, headers=NO_STORE)
