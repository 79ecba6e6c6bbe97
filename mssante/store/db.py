"""Engine creation and SQLite durability settings.

SQLite runs in WAL mode with ``synchronous=FULL`` so that a committed
transaction survives power loss (https://sqlite.org/pragma.html#pragma_synchronous),
and with pysqlite's own transaction handling switched off so that SQLAlchemy
emits ``BEGIN IMMEDIATE``: a writer takes the write lock at the start of the
transaction instead of failing half-way (SQLAlchemy "Serializable isolation /
Savepoints / Transactional DDL" recipe for pysqlite and aiosqlite).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.ext.asyncio import AsyncSession as AsyncSession

from mssante.store.models import Base

SessionMaker = async_sessionmaker[AsyncSession]


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def make_engine(url: str, *, synchronous: str = "FULL", writer: bool = False) -> AsyncEngine:
    """An engine for readers, or (``writer=True``) for the single writer task.

    On SQLite readers begin deferred transactions (WAL lets them read while
    the writer writes); the writer begins IMMEDIATE and uses one connection.
    """
    # hide_parameters: a database error must not write message fields
    # (subjects, addresses, INS) into the log through its SQL parameters.
    if not is_sqlite(url):
        return create_async_engine(url, pool_pre_ping=True, hide_parameters=True)
    kwargs: dict[str, Any] = {"connect_args": {"timeout": 30}, "hide_parameters": True}
    if writer:
        kwargs.update(pool_size=1, max_overflow=0)
    engine = create_async_engine(url, **kwargs)
    begin = "BEGIN IMMEDIATE" if writer else "BEGIN"

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql(begin)

    return engine


def make_sessionmaker(engine: AsyncEngine) -> SessionMaker:
    return async_sessionmaker(engine, expire_on_commit=False)


async def create_schema(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
