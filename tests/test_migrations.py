"""Schema migrations on SQLite and PostgreSQL: models and revisions agree, start-up checks."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Column, Integer, MetaData, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from mssante.app import Store
from mssante.store import migrations
from mssante.store.db import make_engine
from mssante.store.migrations import SchemaError
from mssante.store.models import Base
from tests.conftest import make_settings


@pytest.fixture
async def engine(db_url: str) -> Any:
    engine = make_engine(db_url, writer=True)
    yield engine
    await engine.dispose()


def _diff(conn: Connection, metadata: MetaData) -> list[Any]:
    context = MigrationContext.configure(conn, opts={"compare_type": True})
    return list(compare_metadata(context, metadata))


async def diff(engine: AsyncEngine, metadata: MetaData = Base.metadata) -> list[Any]:
    async with engine.connect() as conn:
        return await conn.run_sync(_diff, metadata)


async def test_models_and_migrations_agree(engine: AsyncEngine) -> None:
    """models.py changed without its migration: write one with
    `python -m mssante.store.migrations revision -m "..."` and review it."""
    await migrations.upgrade(engine)
    assert await diff(engine) == []


async def test_drift_is_detected(engine: AsyncEngine) -> None:
    """The check above is not vacuous: a column missing from the migrations shows."""
    await migrations.upgrade(engine)
    changed = MetaData()
    for table in Base.metadata.sorted_tables:
        table.to_metadata(changed)
    changed.tables["messages"].append_column(Column("added_later", Integer, nullable=True))
    assert [d[0] for d in await diff(engine, changed)] == ["add_column"]


async def test_empty_database_gets_the_schema_at_start(db_url: str, data_dir: Path) -> None:
    """The Quick start: nothing to run before the first `mssante serve`."""
    stores = [Store(make_settings(data_dir, database_url=db_url)) for _ in range(2)]
    try:
        # Two processes starting together: the writer lock makes one wait.
        await asyncio.gather(*(s.open() for s in stores))
        assert await migrations.current(stores[0].write_engine) == migrations.head()
    finally:
        for store in stores:
            await store.close()


async def test_outdated_or_unknown_schema_refuses_to_start(
    db_url: str, data_dir: Path, engine: AsyncEngine
) -> None:
    settings = make_settings(data_dir, database_url=db_url)
    await migrations.upgrade(engine)
    await migrations.downgrade(engine, "base")  # tables gone, alembic_version left

    with pytest.raises(SchemaError) as refused:
        await Store(settings).open()
    message = str(refused.value)
    assert "at revision none" in message
    assert f"needs {migrations.head()}" in message
    assert "`mssante db upgrade`" in message

    first = migrations.script().get_base()
    if first is not None and first != migrations.head():  # one revision behind head, or more
        await migrations.upgrade(engine, first)
        with pytest.raises(SchemaError, match=f"at revision {first}, .* needs {migrations.head()}"):
            await Store(settings).open()

    await migrations.upgrade(engine)
    store = Store(settings)
    await store.open()
    await store.close()

    async with engine.begin() as conn:
        await conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    with pytest.raises(SchemaError, match=f"at revision 9999, .* needs {migrations.head()}"):
        await Store(settings).open()


async def test_tables_not_made_by_migrations_are_left_alone(
    db_url: str, data_dir: Path, engine: AsyncEngine
) -> None:
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE someone_elses (id INTEGER PRIMARY KEY)"))
    with pytest.raises(SchemaError, match="no mssante schema revision"):
        await Store(make_settings(data_dir, database_url=db_url)).open()
    with pytest.raises(SchemaError, match="no mssante schema revision"):
        await migrations.upgrade(engine)
    assert await migrations.current(engine) is None


def _mssante(data_dir: Path, db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.update(
        MSSANTE_STORE__DATA_DIR=str(data_dir),
        MSSANTE_STORE__DATABASE_URL=db_url,
        MSSANTE_SMTP__HOST="127.0.0.1",
        MSSANTE_SMTP__PORT="0",
        MSSANTE_SUBMISSION__PORT="0",
        MSSANTE_WEB__PORT="0",  # no fixed port: the webmail listens too
        MSSANTE_OPS__PORT="0",  # nor for the metrics endpoint
    )
    return subprocess.run(
        [sys.executable, "-m", "mssante", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.slow
async def test_db_commands_and_serve_refusal(
    db_url: str, data_dir: Path, engine: AsyncEngine
) -> None:
    head = migrations.head()

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return _mssante(data_dir, db_url, *args)

    shown = await asyncio.to_thread(run, "db", "current")
    assert shown.returncode == 0, shown.stderr
    assert f"database schema: none; this mssante needs: {head}" in shown.stdout

    upgraded = await asyncio.to_thread(run, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    assert upgraded.stdout.strip() == f"database schema upgraded from none to {head}"
    again = await asyncio.to_thread(run, "db", "upgrade")
    assert again.stdout.strip() == f"database schema already at {head}"
    shown = await asyncio.to_thread(run, "db", "current")
    assert f"database schema: {head}; this mssante needs: {head} (up to date)" in shown.stdout

    await migrations.downgrade(engine, "base")
    refused = await asyncio.to_thread(run, "serve")
    assert refused.returncode != 0
    assert f"this version of mssante needs {head}: run `mssante db upgrade`" in refused.stderr
    assert "Traceback" not in refused.stderr
