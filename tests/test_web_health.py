"""Liveness and readiness probes (mssante/web/health.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import text

from tests.conftest import FakeClock
from tests.webmail import running_webmail


async def test_healthz_and_readyz(data_dir: Path, db_url: str, clock: FakeClock) -> None:
    async with running_webmail(data_dir, db_url, clock) as wm, wm.client() as client:
        alive = await client.get("/healthz")
        assert (alive.status_code, alive.json()) == (200, {"status": "ok"})
        ready = await client.get("/readyz")
        assert (ready.status_code, ready.json()) == (
            200,
            {"status": "ok", "database": "ok", "blobs": "ok"},
        )
        assert ready.headers["cache-control"] == "no-store"


async def test_readyz_fails_on_a_missing_blob_directory(
    data_dir: Path, db_url: str, clock: FakeClock
) -> None:
    async with running_webmail(data_dir, db_url, clock) as wm, wm.client() as client:
        blobs = wm.gateway.store.blobs.blob_dir
        moved = blobs.with_name("blobs-away")
        blobs.rename(moved)  # a lost mount (permissions would not stop root)
        try:
            r = await client.get("/readyz")
            assert (r.status_code, r.json()) == (
                503,
                {"status": "unavailable", "database": "ok", "blobs": "failed"},
            )
            assert "blobs-away" not in r.text and str(data_dir) not in r.text
        finally:
            moved.rename(blobs)
        assert (await client.get("/readyz")).status_code == 200


async def test_readyz_fails_on_a_schema_other_than_the_codes(
    data_dir: Path, db_url: str, clock: FakeClock
) -> None:
    async with running_webmail(data_dir, db_url, clock) as wm, wm.client() as client:

        async def stamp(session: Any) -> None:
            await session.execute(text("UPDATE alembic_version SET version_num = '0005'"))

        await wm.gateway.store.writer.run(stamp)
        r = await client.get("/readyz")
        assert (r.status_code, r.json()["database"]) == (503, "failed")
        assert (await client.get("/healthz")).status_code == 200  # alive all the same
